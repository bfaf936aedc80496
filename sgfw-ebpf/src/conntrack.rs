//! Per-instance connection tracking.
//!
//! Keys are written from the local instance's point of view, so both
//! directions of a flow find the same entry. An entry is created only after
//! the whole leg (SG and NACL) allowed the packet; a hit refreshes
//! `last_seen` and the state in place (a store, not a map update).

use sgfw_common::{
    CT_CLOSING, CT_ESTABLISHED, CT_NACL_OK_EGRESS, CT_NACL_OK_INGRESS, CT_NEW, Config, CtEntry,
    CtKey, Direction, limits::AF_INET,
};

use crate::maps::CONNTRACK;
use crate::parse::{
    Addr, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Inner, Pkt, TCP_FIN, TCP_RST,
};

/// The dataplane clock: the test override when set, else monotonic time.
#[inline(always)]
pub fn now(cfg: &Config) -> u64 {
    if cfg.time_override_ns != 0 {
        cfg.time_override_ns
    } else {
        // SAFETY: no preconditions.
        unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() }
    }
}

/// The key of the packet's flow for the instance at `dir`'s end.
#[inline(always)]
pub fn key(p: &Pkt, dir: Direction) -> CtKey {
    let (local, remote, lport, rport) = match dir {
        Direction::Egress => (p.src, p.dst, p.sport, p.dport),
        Direction::Ingress => (p.dst, p.src, p.dport, p.sport),
    };
    let (local_port, remote_port) = match p.proto {
        IPPROTO_TCP | IPPROTO_UDP => (lport, rport),
        IPPROTO_ICMP | IPPROTO_ICMPV6 if p.is_icmp_proto() => {
            if p.is_icmp_query {
                (p.icmp_id, p.icmp_request as u16)
            } else {
                (p.icmp_type as u16, p.icmp_code as u16)
            }
        }
        _ => (0, 0),
    };
    CtKey {
        local: bytemuck::cast(local),
        remote: bytemuck::cast(remote),
        local_port,
        remote_port,
        proto: p.proto,
        family: p.family,
        _pad: [0; 2],
    }
}

/// The key of the flow an ICMP error quotes, for the instance whose address
/// is `local`; `None` when the quote does not involve `local`.
#[inline(always)]
pub fn inner_key(family: u8, i: &Inner, local: &Addr) -> Option<CtKey> {
    let (l, r, lport, rport) = if i.src == *local {
        (i.src, i.dst, i.sport, i.dport)
    } else if i.dst == *local {
        (i.dst, i.src, i.dport, i.sport)
    } else {
        return None;
    };
    let is_icmp = (family == AF_INET && i.proto == IPPROTO_ICMP)
        || (family != AF_INET && i.proto == IPPROTO_ICMPV6);
    let (local_port, remote_port) = match i.proto {
        IPPROTO_TCP | IPPROTO_UDP => (lport, rport),
        _ if is_icmp => {
            if i.icmp_query {
                (i.sport, i.dport)
            } else {
                (i.icmp_type as u16, i.icmp_code as u16)
            }
        }
        _ => (0, 0),
    };
    Some(CtKey {
        local: bytemuck::cast(l),
        remote: bytemuck::cast(r),
        local_port,
        remote_port,
        proto: i.proto,
        family,
        _pad: [0; 2],
    })
}

#[inline(always)]
fn timeout(cfg: &Config, e: &CtEntry, proto: u8) -> u64 {
    match proto {
        IPPROTO_TCP => match e.state {
            CT_NEW => cfg.tcp_new_ns,
            CT_ESTABLISHED => cfg.tcp_established_ns,
            _ => cfg.tcp_closing_ns,
        },
        IPPROTO_UDP => {
            if e.state == CT_NEW {
                cfg.udp_ns
            } else {
                cfg.udp_stream_ns
            }
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => cfg.icmp_ns,
        _ => cfg.other_ns,
    }
}

/// A live (not expired) entry for `k`.
#[inline(always)]
pub fn lookup_live(k: &CtKey, cfg: &Config, now: u64) -> Option<*mut CtEntry> {
    let e = CONNTRACK.get_ptr_mut(k)?;
    // SAFETY: a pointer into the map value returned by the kernel; reading a
    // possibly concurrently updated entry is benign (whole-u64 fields).
    let entry = unsafe { &*e };
    if now
        >= entry
            .last_seen_ns
            .saturating_add(timeout(cfg, entry, k.proto))
    {
        return None;
    }
    Some(e)
}

/// Records one more packet of a tracked flow.
#[inline(always)]
pub fn touch(e: *mut CtEntry, dir: Direction, p: &Pkt, now: u64) {
    // SAFETY: see `lookup_live`; concurrent writers race benignly (last wins).
    let entry = unsafe { &mut *e };
    entry.last_seen_ns = now;
    entry.packets += 1;
    if p.proto == IPPROTO_TCP && p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        entry.state = CT_CLOSING;
    } else if entry.state == CT_NEW && entry.origin != dir as u8 {
        entry.state = CT_ESTABLISHED;
    }
}

/// The `CT_NACL_OK_*` bit for packets seen at `dir`.
#[inline(always)]
pub fn nacl_bit(dir: Direction) -> u8 {
    match dir {
        Direction::Egress => CT_NACL_OK_EGRESS,
        Direction::Ingress => CT_NACL_OK_INGRESS,
    }
}

/// Whether the entry's cached stateless checks vouch for this packet, so the
/// full evaluation can be skipped.
#[inline(always)]
pub fn cache_valid(e: *mut CtEntry, dir: Direction, ifindex: u32, cfg: &Config) -> bool {
    // SAFETY: see `lookup_live`.
    let entry = unsafe { &*e };
    entry.generation == cfg.generation
        && entry.ifindex == ifindex
        && entry.nacl_ok & nacl_bit(dir) != 0
}

/// Records that this packet passed the full evaluation at `ifindex`.
#[inline(always)]
pub fn cache_pass(e: *mut CtEntry, dir: Direction, ifindex: u32, cfg: &Config) {
    // SAFETY: see `touch`.
    let entry = unsafe { &mut *e };
    if entry.generation != cfg.generation || entry.ifindex != ifindex {
        entry.generation = cfg.generation;
        entry.ifindex = ifindex;
        entry.nacl_ok = 0;
    }
    entry.nacl_ok |= nacl_bit(dir);
}

/// Starts tracking a flow that the rules just allowed.
#[inline(always)]
pub fn create(k: &CtKey, instance: u32, dir: Direction, ifindex: u32, cfg: &Config, now: u64) {
    let e = CtEntry {
        last_seen_ns: now,
        created_ns: now,
        packets: 1,
        generation: cfg.generation,
        instance,
        ifindex,
        state: CT_NEW,
        origin: dir as u8,
        nacl_ok: nacl_bit(dir),
        _pad: 0,
    };
    // An insert can only fail when the LRU map cannot evict; the packet was
    // allowed by the rules either way, so it still passes.
    let _ = CONNTRACK.insert(k, &e, 0);
}
