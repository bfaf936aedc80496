//! sgfw's TC classifiers.
//!
//! `sgfw_from_instance` runs at TC ingress of an instance's bridge port (what
//! the instance sends: its SG egress and its subnet's outbound NACL),
//! `sgfw_to_instance` at TC egress (what is delivered to it: the inbound NACL
//! and its SG ingress). Each hook decides only for its own instance; a packet
//! between two instances passes both.
//!
//! Order of checks at one hook (the reference evaluator's order):
//! 1. parse; ARP passes, other non-IP, malformed headers and non-first
//!    fragments drop;
//! 2. fast path: a live conntrack entry whose cached checks are of the current
//!    policy generation and this port → allow (one map lookup);
//! 3. passthrough classes (NDP, DHCP, metadata, the subnet's DNS address);
//! 4. source check on bound ports; an address of no instance → not ours;
//! 5. the leg's stages in order — sender: SG egress, NACL out; receiver:
//!    NACL in, SG ingress — NACLs only when the peer is not an instance of
//!    the same subnet; the SG stage is: tracked flow, related ICMP error, or a
//!    rule;
//! 6. commit: a new flow allowed by a rule starts a conntrack entry.
#![no_std]
#![no_main]

mod conntrack;
mod maps;
mod nacl;
mod parse;
mod sg;
mod verdict;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use sgfw_common::{
    AddrInfo, AddrKey, Config, Direction, PortCountKey, Reason, SUBNET_HAS_DNS_V4,
    SUBNET_HAS_DNS_V6, SubnetPolicy,
    limits::{AF_INET, AF_INET6},
};

use crate::maps::{ADDRS, CONFIG, INSTANCES, PORT_COUNTS, PORTS, SCRATCH, SUBNETS};
use crate::parse::{Addr, Frame, IPPROTO_ICMPV6, IPPROTO_UDP, Pkt};
use crate::verdict::{Decision, finish};

const NO_RULE: u32 = u32::MAX;
/// 169.254.169.254 as an address word.
const METADATA: u32 = u32::from_ne_bytes([169, 254, 169, 254]);

#[classifier]
pub fn sgfw_from_instance(ctx: TcContext) -> i32 {
    classify(&ctx, Direction::Egress)
}

#[classifier]
pub fn sgfw_to_instance(ctx: TcContext) -> i32 {
    classify(&ctx, Direction::Ingress)
}

#[classifier]
pub fn sgfw_port_count_ingress(ctx: TcContext) -> i32 {
    port_count(&ctx, Direction::Ingress)
}

#[classifier]
pub fn sgfw_port_count_egress(ctx: TcContext) -> i32 {
    port_count(&ctx, Direction::Egress)
}

/// The floor for benchmarks: one array read, then pass.
#[classifier]
pub fn sgfw_noop(_ctx: TcContext) -> i32 {
    match CONFIG.get(0) {
        Some(_) => TC_ACT_OK,
        None => TC_ACT_SHOT,
    }
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer the kernel passed to the program.
    unsafe { (*ctx.skb.skb).ifindex }
}

#[inline(always)]
fn port_count(ctx: &TcContext, dir: Direction) -> i32 {
    // TC ingress of the port is the instance's egress and vice versa; the
    // key records the TC hook's own direction as `Direction` of the port.
    let key = PortCountKey {
        ifindex: ifindex(ctx),
        direction: dir as u32,
    };
    match PORT_COUNTS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value, no concurrent writer.
        Some(c) => unsafe { *c += 1 },
        None => {
            let _ = PORT_COUNTS.insert(&key, &1, 0);
        }
    }
    TC_ACT_OK
}

#[inline(always)]
fn classify(ctx: &TcContext, dir: Direction) -> i32 {
    // Without configuration there is no policy: fail closed.
    let Some(cfg) = CONFIG.get(0) else {
        return TC_ACT_SHOT;
    };
    let now = conntrack::now(cfg);
    let ifx = ifindex(ctx);
    let len = ctx.len();
    let Some(p) = SCRATCH.get_ptr_mut(0) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: this CPU's scratch slot; a TC program is not re-entered on the
    // same CPU while it runs.
    let p = unsafe { &mut *p };
    match parse::parse(ctx, p) {
        Err(reason) => finish(
            &Decision {
                reason,
                instance: 0,
                rule: NO_RULE,
            },
            None,
            dir,
            ifx,
            len,
            cfg,
            now,
        ),
        Ok(Frame::Arp) => finish(
            &Decision {
                reason: Reason::AllowPassthrough,
                instance: 0,
                rule: NO_RULE,
            },
            None,
            dir,
            ifx,
            len,
            cfg,
            now,
        ),
        Ok(Frame::Ip) => {
            let d = try_classify(p, dir, ifx, cfg, now);
            finish(&d, Some(p), dir, ifx, len, cfg, now)
        }
    }
}

#[inline(always)]
fn addr_key(family: u8, addr: &Addr) -> AddrKey {
    AddrKey {
        family,
        _pad: [0; 3],
        addr: bytemuck::cast(*addr),
    }
}

#[inline(always)]
fn lookup_addr(family: u8, addr: &Addr) -> Option<AddrInfo> {
    // SAFETY: read-only copy of a hash value.
    unsafe { ADDRS.get(&addr_key(family, addr)) }.copied()
}

/// The classes SEMANTICS.md leaves unfiltered, as seen from this hook.
#[inline(always)]
fn passthrough(p: &Pkt, dir: Direction, subnet: Option<&SubnetPolicy>) -> bool {
    if p.family == AF_INET6 && p.proto == IPPROTO_ICMPV6 && (133..=137).contains(&p.icmp_type) {
        return true;
    }
    if p.proto == IPPROTO_UDP
        && ((p.sport == 68 && p.dport == 67) || (p.sport == 67 && p.dport == 68))
    {
        return true;
    }
    if p.family == AF_INET && (p.src[0] == METADATA || p.dst[0] == METADATA) {
        return true;
    }
    if let Some(s) = subnet {
        let peer = match dir {
            Direction::Egress => &p.dst,
            Direction::Ingress => &p.src,
        };
        if p.family == AF_INET
            && s.flags & SUBNET_HAS_DNS_V4 != 0
            && peer[0] == u32::from_ne_bytes(s.dns_v4)
        {
            return true;
        }
        if p.family == AF_INET6
            && s.flags & SUBNET_HAS_DNS_V6 != 0
            && *peer == bytemuck::cast::<[u8; 16], Addr>(s.dns_v6)
        {
            return true;
        }
    }
    false
}

/// Whether `a` lies in the subnet's prefix of its family.
#[inline(always)]
fn in_prefix(s: &SubnetPolicy, family: u8, a: &Addr) -> bool {
    if family == AF_INET {
        a[0] & u32::from_ne_bytes(s.mask_v4) == u32::from_ne_bytes(s.net_v4)
    } else {
        let (net, mask): (Addr, Addr) = (bytemuck::cast(s.net_v6), bytemuck::cast(s.mask_v6));
        (a[0] & mask[0]) == net[0]
            && (a[1] & mask[1]) == net[1]
            && (a[2] & mask[2]) == net[2]
            && (a[3] & mask[3]) == net[3]
    }
}

/// Addresses that only make sense on the local link: an IPv6 link-local or
/// unspecified source (sent by the instance), or a multicast or broadcast
/// destination, or an IPv6 link-local destination (delivered to it).
#[inline(always)]
fn link_scoped(p: &Pkt, dir: Direction) -> bool {
    // The first two bytes of an address word, in network order.
    let lead = |a: &Addr| {
        let b = a[0].to_ne_bytes();
        (b[0], b[1])
    };
    match dir {
        Direction::Egress => {
            let (b0, b1) = lead(&p.src);
            p.family == AF_INET6 && ((b0 == 0xfe && b1 & 0xc0 == 0x80) || p.src == [0; 4])
        }
        Direction::Ingress => {
            let (b0, b1) = lead(&p.dst);
            if p.family == AF_INET6 {
                b0 == 0xff || (b0 == 0xfe && b1 & 0xc0 == 0x80)
            } else {
                b0 & 0xf0 == 0xe0 || p.dst[0] == u32::MAX
            }
        }
    }
}

/// What decided the SG stage.
enum SgOutcome {
    Tracked(*mut sgfw_common::CtEntry),
    Related,
    Rule(u32),
    NoMatch,
}

/// The SG stage, in precedence order: (1) the flow is tracked for this
/// instance; (2) an ICMP error quoting a flow tracked for it; (3) a rule of
/// the instance's policy for this direction allows it; else no match.
#[inline(always)]
fn sg_stage(
    p: &Pkt,
    hit: Option<*mut sgfw_common::CtEntry>,
    policy: u32,
    local: &Addr,
    remote: &Addr,
    cfg: &Config,
    now: u64,
) -> SgOutcome {
    if let Some(e) = hit {
        return SgOutcome::Tracked(e);
    }
    if p.is_icmp_error && p.has_inner {
        if let Some(ik) = conntrack::inner_key(p.family, &p.inner, local) {
            if conntrack::lookup_live(&ik, cfg, now).is_some() {
                return SgOutcome::Related;
            }
        }
    }
    match sg::allows(policy, p, remote) {
        Some(rule) => SgOutcome::Rule(rule),
        None => SgOutcome::NoMatch,
    }
}

/// A NACL stage: `None` when the table allows, else the drop (its rule
/// number), or `DropNoPolicy` when the table is missing (fail closed).
#[inline(always)]
fn nacl_stage(table: u32, p: &Pkt, remote: &Addr, deny: Reason, instance: u32) -> Option<Decision> {
    match nacl::check(table, p, remote) {
        Ok((true, _)) => None,
        Ok((false, rule)) => Some(Decision {
            reason: deny,
            instance,
            rule,
        }),
        Err(reason) => Some(Decision {
            reason,
            instance,
            rule: NO_RULE,
        }),
    }
}

#[inline(always)]
fn try_classify(p: &Pkt, dir: Direction, ifx: u32, cfg: &Config, now: u64) -> Decision {
    let key = conntrack::key(p, dir);
    let hit = conntrack::lookup_live(&key, cfg, now);
    // Fast path: a tracked flow whose stateless checks passed under this
    // policy generation at this port.
    if let Some(e) = hit {
        if conntrack::cache_valid(e, dir, ifx, cfg) {
            conntrack::touch(e, dir, p, now);
            // SAFETY: see conntrack::lookup_live.
            let instance = unsafe { (*e).instance };
            return Decision {
                reason: Reason::AllowTracked,
                instance,
                rule: NO_RULE,
            };
        }
    }

    let (local, remote) = match dir {
        Direction::Egress => (&p.src, &p.dst),
        Direction::Ingress => (&p.dst, &p.src),
    };
    // SAFETY: read-only hash lookup.
    let bound = unsafe { PORTS.get(&ifx) }.copied();
    let mut local_info = lookup_addr(p.family, local);
    // On a bound port, link-scoped traffic (IPv6 link-local sources, and
    // multicast or broadcast destinations) belongs to the port's instance:
    // its security group judges it like any other packet.
    if let (Some(b), None) = (bound, local_info) {
        if link_scoped(p, dir) {
            // SAFETY: read-only hash lookup.
            if let Some(ip) = unsafe { INSTANCES.get(&b) } {
                local_info = Some(AddrInfo {
                    instance: b,
                    subnet: ip.subnet,
                });
            }
        }
    }
    // SAFETY: read-only hash lookups.
    let subnet = local_info.and_then(|li| unsafe { SUBNETS.get(&li.subnet) });
    let local_instance = local_info.map_or(0, |li| li.instance);

    if passthrough(p, dir, subnet) {
        return Decision {
            reason: Reason::AllowPassthrough,
            instance: local_instance,
            rule: NO_RULE,
        };
    }
    if let Some(bound) = bound {
        if local_instance != bound {
            return Decision {
                reason: match dir {
                    Direction::Egress => Reason::DropSourceCheck,
                    Direction::Ingress => Reason::DropNotForInstance,
                },
                instance: bound,
                rule: NO_RULE,
            };
        }
    }
    let Some(li) = local_info else {
        return Decision {
            reason: Reason::AllowUnmanaged,
            instance: 0,
            rule: NO_RULE,
        };
    };
    let no_policy = Decision {
        reason: Reason::DropNoPolicy,
        instance: li.instance,
        rule: NO_RULE,
    };
    // SAFETY: read-only hash lookup.
    let Some(inst) = (unsafe { INSTANCES.get(&li.instance) }) else {
        return no_policy;
    };
    let Some(subnet) = subnet else {
        return no_policy;
    };
    // Outside the subnet's prefix the peer cannot be an instance of it: the
    // packet crosses the boundary without an owner lookup.
    let crossing = !in_prefix(subnet, p.family, remote)
        || lookup_addr(p.family, remote).is_none_or(|r| r.subnet != li.subnet);
    let v4 = p.family == AF_INET;

    let outcome = match dir {
        Direction::Egress => {
            let sg = sg_stage(p, hit, inst.policy_egress, local, remote, cfg, now);
            if let SgOutcome::NoMatch = sg {
                return Decision {
                    reason: Reason::DropSgEgress,
                    instance: li.instance,
                    rule: NO_RULE,
                };
            }
            if crossing {
                let table = if v4 {
                    subnet.nacl_out_v4
                } else {
                    subnet.nacl_out_v6
                };
                if let Some(drop) = nacl_stage(table, p, remote, Reason::DropNaclOut, li.instance) {
                    return drop;
                }
            }
            sg
        }
        Direction::Ingress => {
            if crossing {
                let table = if v4 {
                    subnet.nacl_in_v4
                } else {
                    subnet.nacl_in_v6
                };
                if let Some(drop) = nacl_stage(table, p, remote, Reason::DropNaclIn, li.instance) {
                    return drop;
                }
            }
            let sg = sg_stage(p, hit, inst.policy_ingress, local, remote, cfg, now);
            if let SgOutcome::NoMatch = sg {
                return Decision {
                    reason: Reason::DropSgIngress,
                    instance: li.instance,
                    rule: NO_RULE,
                };
            }
            sg
        }
    };

    // Commit: the whole leg allowed the packet.
    match outcome {
        SgOutcome::Tracked(e) => {
            conntrack::touch(e, dir, p, now);
            conntrack::cache_pass(e, dir, ifx, cfg);
            Decision {
                reason: Reason::AllowTracked,
                instance: li.instance,
                rule: NO_RULE,
            }
        }
        SgOutcome::Related => Decision {
            reason: Reason::AllowRelated,
            instance: li.instance,
            rule: NO_RULE,
        },
        SgOutcome::Rule(rule) => {
            // ICMP errors are never tracked.
            if !p.is_icmp_error {
                conntrack::create(&key, li.instance, dir, ifx, cfg, now);
            }
            Decision {
                reason: match dir {
                    Direction::Egress => Reason::AllowSgEgress,
                    Direction::Ingress => Reason::AllowSgIngress,
                },
                instance: li.instance,
                rule,
            }
        }
        SgOutcome::NoMatch => no_policy,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
