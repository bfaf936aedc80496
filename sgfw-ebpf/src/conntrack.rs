//! Per-instance connection tracking.
//!
//! Keys are written from the local instance's point of view, so both
//! directions of a flow find the same entry. An entry is created only after
//! the whole leg (SG and NACL) allowed the packet; a hit refreshes
//! `last_seen` and the state in place (a store, not a map update).

use sgfw_common::{
    CT_CLOSING, CT_ESTABLISHED, CT_ICMP_QUERY_LOCAL, CT_ICMP_QUERY_REMOTE, CT_NACL_OK_EGRESS,
    CT_NACL_OK_INGRESS, CT_NEW, Config, CtEntry, CtKey, Direction, FRAGMENT_TIMEOUT_NS, FragEntry,
    FragKey, limits::AF_INET,
};

use crate::maps::{CONNTRACK, FRAGS};
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

/// The conntrack ports of an ICMP query: the identifier, and the request
/// type marked with who asked (the local instance when it sends a request or
/// receives a reply). A request from the other side with the same identifier
/// is another flow.
#[inline(always)]
fn query_ports(id: u16, request: u8, is_request: bool, local_sends: bool) -> (u16, u16) {
    let asker = if is_request == local_sends {
        CT_ICMP_QUERY_LOCAL
    } else {
        CT_ICMP_QUERY_REMOTE
    };
    (id, asker | request as u16)
}

/// The key of the packet's flow for the instance at `dir`'s end. Meaningless
/// for ICMP errors, which are never tracked and never looked up by their own key.
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
                query_ports(
                    p.icmp_id,
                    p.icmp_request,
                    p.icmp_type == p.icmp_request,
                    matches!(dir, Direction::Egress),
                )
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
/// is `local`; `None` when the quote does not involve `local` or quotes
/// another ICMP error.
#[inline(always)]
pub fn inner_key(family: u8, i: &Inner, local: &Addr) -> Option<CtKey> {
    // The quote is a packet as its sender sent it: `local` sent it when it
    // is the quote's source.
    let local_sent = if i.src == *local {
        true
    } else if i.dst == *local {
        false
    } else {
        return None;
    };
    let (l, r, lport, rport) = if local_sent {
        (i.src, i.dst, i.sport, i.dport)
    } else {
        (i.dst, i.src, i.dport, i.sport)
    };
    let is_icmp = (family == AF_INET && i.proto == IPPROTO_ICMP)
        || (family != AF_INET && i.proto == IPPROTO_ICMPV6);
    let (local_port, remote_port) = match i.proto {
        IPPROTO_TCP | IPPROTO_UDP => (lport, rport),
        _ if is_icmp => {
            if i.icmp_query {
                query_ports(i.sport, i.dport as u8, i.icmp_request_sent, local_sent)
            } else if i.icmp_error {
                return None;
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

/// Whether the cache may speak for this packet at all: every input of the
/// checks it stands in for must be fixed by (key, direction, generation,
/// port). The key fixes addresses, protocol, ports and ICMP type; it does not
/// fix the ICMP code, so ICMP with a non-zero code never uses the cache (and
/// never fills it). See docs/semantics.md, "What a cached decision covers".
#[inline(always)]
pub fn cacheable(p: &Pkt) -> bool {
    !(p.is_icmp_proto() && p.icmp_code != 0)
}

/// Whether the entry's cached stateless checks vouch for this packet, so the
/// full evaluation can be skipped: the same policy generation, the same
/// port, the NACL of this direction passed, and a [`cacheable`] packet.
#[inline(always)]
pub fn cache_valid(e: *mut CtEntry, p: &Pkt, dir: Direction, ifindex: u32, cfg: &Config) -> bool {
    // SAFETY: see `lookup_live`.
    let entry = unsafe { &*e };
    entry.generation == cfg.generation
        && entry.ifindex == ifindex
        && entry.nacl_ok & nacl_bit(dir) != 0
        && cacheable(p)
}

/// Whether the entry's flow was created for a peer that is an instance.
#[inline(always)]
pub fn peer_is_instance(e: *mut CtEntry) -> bool {
    // SAFETY: see `lookup_live`.
    unsafe { (*e).peer_instance != 0 }
}

/// Whether a (live) entry is the given instance's: a tracked flow stands in
/// for the SG stage of its own instance only.
#[inline(always)]
pub fn owned_by(e: *mut CtEntry, instance: u32) -> bool {
    // SAFETY: see `lookup_live`.
    unsafe { (*e).instance == instance }
}

/// Records that this packet passed the full evaluation at `ifindex`.
#[inline(always)]
pub fn cache_pass(e: *mut CtEntry, p: &Pkt, dir: Direction, ifindex: u32, cfg: &Config) {
    if !cacheable(p) {
        return;
    }
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
#[expect(clippy::too_many_arguments, reason = "the new entry's fields")]
pub fn create(
    k: &CtKey,
    p: &Pkt,
    instance: u32,
    local_identity: u32,
    peer_instance: bool,
    dir: Direction,
    ifindex: u32,
    cfg: &Config,
    now: u64,
) {
    let e = CtEntry {
        last_seen_ns: now,
        created_ns: now,
        packets: 1,
        generation: cfg.generation,
        instance,
        ifindex,
        state: CT_NEW,
        origin: dir as u8,
        nacl_ok: if cacheable(p) { nacl_bit(dir) } else { 0 },
        peer_instance: peer_instance as u8,
        local_identity,
        _pad2: 0,
    };
    // An insert can only fail when the LRU map cannot evict; the packet was
    // allowed by the rules either way, so it still passes.
    let _ = CONNTRACK.insert(k, &e, 0);
}

/// The key of a fragmented datagram at one hook.
#[inline(always)]
fn frag_key(p: &Pkt, dir: Direction, ifindex: u32) -> FragKey {
    FragKey {
        src: bytemuck::cast(p.src),
        dst: bytemuck::cast(p.dst),
        id: p.frag_id,
        ifindex,
        proto: p.frag_proto,
        family: p.family,
        direction: dir as u8,
        _pad: 0,
    }
}

/// Records the verdict of a datagram's first fragment at this hook, allowed
/// or denied (a denied one must replace an older allowed record of the same
/// identification).
#[inline(always)]
pub fn frag_record(p: &Pkt, dir: Direction, ifindex: u32, allowed: bool, now: u64) {
    let e = FragEntry {
        expires_ns: now.saturating_add(FRAGMENT_TIMEOUT_NS),
        allowed: allowed as u8,
        _pad: [0; 7],
    };
    // Fails only when the LRU cannot evict: then later fragments find no
    // record and drop (fail closed).
    let _ = FRAGS.insert(&frag_key(p, dir, ifindex), &e, 0);
}

/// Whether a later fragment may pass: its first fragment was allowed at this
/// hook and the record still stands.
#[inline(always)]
pub fn frag_allowed(p: &Pkt, dir: Direction, ifindex: u32, now: u64) -> bool {
    // SAFETY: read-only copy of a hash value.
    match unsafe { FRAGS.get(&frag_key(p, dir, ifindex)) } {
        Some(e) => e.allowed != 0 && now < e.expires_ns,
        None => false,
    }
}
