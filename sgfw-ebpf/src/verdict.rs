//! The end of every decision: count it per instance and reason, and send
//! drops (and, when asked, newly allowed flows) to user space, rate-limited.

use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};
use sgfw_common::{CONFIG_EMIT_ACCEPTS, Config, Direction, Event, Reason, counter_index};

use crate::maps::{COUNTERS, EVENT_RATE, EVENTS};
use crate::parse::Pkt;

/// A decision about one packet.
pub struct Decision {
    pub reason: Reason,
    /// Instance index (0: none).
    pub instance: u32,
    /// SG rule reference or NACL rule number (`u32::MAX`: none).
    pub rule: u32,
    /// At the sender's hook: the identity of the instance's own source
    /// address, for `skb->mark` (0: none).
    pub identity: u32,
}

#[inline(always)]
fn count(instance: u32, reason: Reason) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter_index(instance, reason)) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn rate_ok(cfg: &Config, now: u64) -> bool {
    let Some(r) = EVENT_RATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, no concurrent writer.
    let r = unsafe { &mut *r };
    if now.wrapping_sub(r[0]) >= 1_000_000_000 {
        r[0] = now;
        r[1] = 0;
    }
    if r[1] >= cfg.events_per_sec as u64 {
        return false;
    }
    r[1] += 1;
    true
}

/// Counts the decision, reports it if it is a drop (or an accepted new flow
/// when asked), and returns the TC action.
#[inline(always)]
pub fn finish(
    d: &Decision,
    p: Option<&Pkt>,
    dir: Direction,
    ifindex: u32,
    len: u32,
    cfg: &Config,
    now: u64,
) -> i32 {
    count(d.instance, d.reason);
    let new_flow = matches!(d.reason, Reason::AllowSgEgress | Reason::AllowSgIngress);
    let report = d.reason.is_drop() || (new_flow && cfg.flags & CONFIG_EMIT_ACCEPTS != 0);
    if report && rate_ok(cfg, now) {
        if let Some(mut e) = EVENTS.reserve::<Event>(0) {
            // Fill the reservation in place: an Event on the stack would not fit.
            let ev = e.as_mut_ptr();
            // SAFETY: `ev` points to a reserved, exclusively owned Event slot;
            // every field is written before submit.
            unsafe {
                (*ev).ts_ns = now;
                (*ev).instance = d.instance;
                (*ev).rule = d.rule;
                (*ev).ifindex = ifindex;
                (*ev).len = len;
                (*ev).reason = d.reason as u8;
                (*ev).direction = dir as u8;
                match p {
                    Some(p) => {
                        (*ev).src = bytemuck::cast(p.src);
                        (*ev).dst = bytemuck::cast(p.dst);
                        (*ev).proto = p.proto;
                        (*ev).family = p.family;
                        if p.is_icmp_proto() {
                            (*ev).sport = p.icmp_type as u16;
                            (*ev).dport = p.icmp_code as u16;
                        } else {
                            (*ev).sport = p.sport;
                            (*ev).dport = p.dport;
                        }
                    }
                    None => {
                        (*ev).src = [0; 16];
                        (*ev).dst = [0; 16];
                        (*ev).proto = 0;
                        (*ev).family = 0;
                        (*ev).sport = 0;
                        (*ev).dport = 0;
                    }
                }
            }
            e.submit(0);
        }
    }
    if d.reason.is_drop() {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}
