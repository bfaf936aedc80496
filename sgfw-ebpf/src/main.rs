//! sgfw's TC classifiers.
//!
//! `sgfw_from_instance` runs at TC ingress of an instance's bridge port (what
//! the instance sends: its SG egress and its subnet's outbound NACL),
//! `sgfw_to_instance` at TC egress (what is delivered to it: the inbound NACL
//! and its SG ingress). Each hook decides only for its own instance; a packet
//! between two instances passes both.
//!
//! Every frame an instance port's hook lets through carries a *stamp* in the
//! identity bits of `skb->mark`: the sender's address identity, or
//! [`STAMP_PORT`]. The bridge device's own hooks close the window between a
//! port joining a bridge and sgfw attaching it: `sgfw_bridge_down` (TC
//! egress of the bridge: what the host hands it) stamps [`STAMP_HOST`],
//! `sgfw_bridge_up` (TC ingress: what the ports hand up) drops an unstamped
//! frame, and `sgfw_to_instance` drops one before any other check. So a
//! frame from a port with no hook yet reaches neither an instance nor the
//! host. Only two ports that are both not attached yet could talk to each
//! other; `sgfw run` and the library's watcher attach a port on the netlink
//! event that enslaves it.
//!
//! Order of checks at one hook (the reference evaluator's order; the
//! specification is docs/semantics.md):
//! 1. frame: VLAN-tagged frames drop; ARP passes; other non-IP and malformed
//!    headers drop; a later fragment gets its first fragment's recorded
//!    verdict at this hook (a first fragment's verdict is recorded at the end);
//! 2. fast path: a live conntrack entry whose cached checks are of the current
//!    policy generation and this port, for a packet whose NACL inputs the key
//!    fixes → allow (one map lookup);
//! 3. source check on bound ports (before passthrough: an instance never
//!    speaks as a service address);
//! 4. passthrough classes (NDP, DHCP client shape, service addresses);
//! 5. not carried: broadcast and multicast destinations, ICMPv6 redirects;
//!    an address of no instance → not ours;
//! 6. the leg's stages in order — sender: SG egress, NACL out; receiver:
//!    NACL in, SG ingress — NACLs only when the peer is not an instance of
//!    the same subnet; the SG stage is: tracked flow of this instance,
//!    related ICMP error, or a rule;
//! 7. commit: a new flow allowed by a rule starts a conntrack entry.
#![no_std]
#![no_main]

mod conntrack;
mod maps;
mod nacl;
mod parse;
mod sg;
mod verdict;

use aya_ebpf::{
    bindings::{
        TC_ACT_OK, TC_ACT_SHOT,
        xdp_action::{XDP_DROP, XDP_PASS},
    },
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use sgfw_common::{
    AddrInfo, AddrKey, BROADCAST_OWNER, Config, Direction, MARK_IDENTITY_MASK, MARK_IDENTITY_SHIFT,
    Reason, STAMP_HOST, STAMP_NONE, STAMP_PORT, SUBNET_HAS_DNS_V4, SUBNET_HAS_DNS_V6, SubnetPolicy,
    identity_stamp,
    limits::{AF_INET, AF_INET6},
    passthrough as pt, slotted, stamp_identity,
};

#[cfg(feature = "test-programs")]
use crate::maps::PORT_COUNTS;
use crate::maps::{ADDRS, CONFIG, IDENTITIES, INSTANCES, PORTS, SCRATCH, SUBNETS};
use crate::parse::{Addr, FRAG_FIRST, Frame, IPPROTO_ICMPV6, IPPROTO_UDP, Pkt};
use crate::verdict::{Decision, finish};

const NO_RULE: u32 = u32::MAX;

#[classifier]
pub fn sgfw_from_instance(ctx: TcContext) -> i32 {
    classify(&ctx, Direction::Egress)
}

#[classifier]
pub fn sgfw_to_instance(ctx: TcContext) -> i32 {
    classify(&ctx, Direction::Ingress)
}

/// XDP on an instance port, in front of `sgfw_from_instance` (the `xdp`
/// dataplane): drops what the instance sends that its leg denies, before
/// the host allocates an skb for it.
///
/// It is a pre-filter, never the authority: it judges with the same
/// [`try_classify`] on the same maps but commits nothing (no conntrack entry
/// created or refreshed, no fragment record, no count or event for what it
/// passes), so everything it passes is judged again, committed, stamped and
/// counted by `sgfw_from_instance`. It can therefore only drop what that
/// hook would drop (both read the generation in force; a packet judged
/// across a switch may see the old one). Drops are counted and reported
/// here, once. Later fragments pass: their verdict is the first fragment's
/// record, which only the TC hook writes. A VLAN tag the kernel moved out
/// of the frame is invisible here and dropped at TC.
#[xdp]
pub fn sgfw_xdp_from_instance(ctx: XdpContext) -> u32 {
    try_xdp_from_instance(&ctx)
}

#[cfg(feature = "test-programs")]
/// The XDP floor for benchmarks: one array read, then pass.
#[xdp]
pub fn sgfw_xdp_noop(_ctx: XdpContext) -> u32 {
    match CONFIG.get(0) {
        Some(_) => XDP_PASS,
        None => XDP_DROP,
    }
}

#[inline(always)]
fn try_xdp_from_instance(ctx: &XdpContext) -> u32 {
    let Some(cfg) = CONFIG.get(0) else {
        return XDP_DROP;
    };
    let now = conntrack::now(cfg);
    let ifx = ctx.ingress_ifindex() as u32;
    let len = (ctx.data_end() - ctx.data()) as u32;
    let Some(p) = SCRATCH.get_ptr_mut(0) else {
        return XDP_DROP;
    };
    // SAFETY: this CPU's scratch slot; the program is not re-entered on the
    // same CPU while it runs, and the TC hook that runs later on the same
    // CPU parses afresh.
    let p = unsafe { &mut *p };
    let (d, parsed) = match parse::parse(ctx, p) {
        Err(reason) => (decision(reason, 0), None),
        Ok(Frame::Arp | Frame::LaterFragment) => return XDP_PASS,
        Ok(Frame::Ip) => (
            try_classify::<false>(p, Direction::Egress, ifx, cfg, now, 0),
            Some(&*p),
        ),
    };
    if !d.reason.is_drop() {
        return XDP_PASS;
    }
    finish(&d, parsed, Direction::Egress, ifx, len, cfg, now);
    XDP_DROP
}

#[cfg(feature = "test-programs")]
#[classifier]
pub fn sgfw_port_count_ingress(ctx: TcContext) -> i32 {
    port_count(&ctx, Direction::Ingress)
}

#[cfg(feature = "test-programs")]
#[classifier]
pub fn sgfw_port_count_egress(ctx: TcContext) -> i32 {
    port_count(&ctx, Direction::Egress)
}

#[cfg(feature = "test-programs")]
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

#[cfg(feature = "test-programs")]
#[inline(always)]
fn port_count(ctx: &TcContext, dir: Direction) -> i32 {
    // TC ingress of the port is the instance's egress and vice versa; the
    // key records the TC hook's own direction as `Direction` of the port.
    let key = sgfw_common::PortCountKey {
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
fn decision(reason: Reason, instance: u32) -> Decision {
    Decision {
        reason,
        instance,
        rule: NO_RULE,
        identity: 0,
    }
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
    let stamp = (read_mark(ctx) & MARK_IDENTITY_MASK) >> MARK_IDENTITY_SHIFT;
    // The fence: a frame handed to an instance that no hook of sgfw's has
    // stamped came straight from a port of this bridge that is not attached
    // yet. It drops, whatever it claims to be, until that port is attached.
    if matches!(dir, Direction::Ingress) && stamp == STAMP_NONE {
        return finish(
            &decision(Reason::DropUnattached, 0),
            None,
            dir,
            ifx,
            len,
            cfg,
            now,
        );
    }
    let (d, parsed) = judge(ctx, dir, ifx, cfg, now, stamp_identity(stamp));
    let act = finish(&d, parsed, dir, ifx, len, cfg, now);
    if matches!(dir, Direction::Egress) && act == TC_ACT_OK {
        // What an instance port sends carries a stamp to the receiver's hook
        // (and never one it came with): its own address's identity, or
        // "an attached port" when it speaks as no instance.
        let ours = if d.identity != 0 {
            identity_stamp(d.identity, cfg.slot)
        } else {
            STAMP_PORT
        };
        write_mark(
            ctx,
            (read_mark(ctx) & !MARK_IDENTITY_MASK)
                | ((ours << MARK_IDENTITY_SHIFT) & MARK_IDENTITY_MASK),
        );
    }
    act
}

/// The decision of one hook for a stamped frame (see the crate doc for the
/// order), and the parsed packet when there is one to report.
#[inline(always)]
fn judge(
    ctx: &TcContext,
    dir: Direction,
    ifx: u32,
    cfg: &Config,
    now: u64,
    peer_identity: u32,
) -> (Decision, Option<&'static Pkt>) {
    // A tag the kernel moved into the skb (it strips one 802.1Q/802.1ad tag,
    // VID 0 priority tags included, before TC sees the frame): a VPC carries
    // no VLANs. Tags left in the frame are caught by the parser.
    // SAFETY: the context pointer the kernel passed to the program.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        return (decision(Reason::DropVlan, 0), None);
    }
    let Some(p) = SCRATCH.get_ptr_mut(0) else {
        return (decision(Reason::DropNoPolicy, 0), None);
    };
    // SAFETY: this CPU's scratch slot; a TC program is not re-entered on the
    // same CPU while it runs.
    let p = unsafe { &mut *p };
    match parse::parse(ctx, p) {
        Err(reason) => {
            // A first fragment that cannot be judged is denied, and so are
            // the rest of its datagram.
            if p.frag == FRAG_FIRST {
                conntrack::frag_record(p, dir, ifx, false, now);
            }
            (decision(reason, 0), None)
        }
        Ok(Frame::Arp) => (decision(Reason::AllowPassthrough, 0), None),
        Ok(Frame::LaterFragment) => {
            let reason = if conntrack::frag_allowed(p, dir, ifx, now) {
                Reason::AllowFragment
            } else {
                Reason::DropFragment
            };
            (decision(reason, 0), Some(p))
        }
        Ok(Frame::Ip) => {
            let d = try_classify::<true>(p, dir, ifx, cfg, now, peer_identity);
            if p.frag == FRAG_FIRST {
                conntrack::frag_record(p, dir, ifx, !d.reason.is_drop(), now);
            }
            (d, Some(p))
        }
    }
}

/// TC ingress on a subnet's bridge device: what the bridge's ports hand up
/// to the host (to the gateway address, or to be routed to another subnet
/// or outside). Every port's own hook stamped what it let through; a frame
/// without a stamp came from a port not attached yet, and drops.
#[classifier]
pub fn sgfw_bridge_up(ctx: TcContext) -> i32 {
    let Some(cfg) = CONFIG.get(0) else {
        return TC_ACT_SHOT;
    };
    if (read_mark(&ctx) & MARK_IDENTITY_MASK) >> MARK_IDENTITY_SHIFT != STAMP_NONE {
        return TC_ACT_OK;
    }
    let now = conntrack::now(cfg);
    finish(
        &decision(Reason::DropUnattached, 0),
        None,
        Direction::Egress,
        ifindex(&ctx),
        ctx.len(),
        cfg,
        now,
    )
}

/// TC egress on a subnet's bridge device: what the host hands to the bridge.
/// A frame that came through an instance's hook keeps its identity (the
/// host's forwarding and NAT keep the mark); anything else is stamped as the
/// host's, so the receiving port's fence lets it be judged.
#[classifier]
pub fn sgfw_bridge_down(ctx: TcContext) -> i32 {
    let mark = read_mark(&ctx);
    if (mark & MARK_IDENTITY_MASK) >> MARK_IDENTITY_SHIFT == STAMP_NONE {
        write_mark(
            &ctx,
            (mark & !MARK_IDENTITY_MASK) | (STAMP_HOST << MARK_IDENTITY_SHIFT),
        );
    }
    TC_ACT_OK
}

/// `skb->mark`, read at its constant offset from the context (the verifier
/// refuses context accesses through a pointer LLVM derived and kept).
#[inline(never)]
fn read_mark(ctx: &TcContext) -> u32 {
    let skb = ctx.skb.skb;
    // SAFETY: the context pointer the kernel passed to the program.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*skb).mark)) }
}

/// Sets `skb->mark` (writable for TC programs); see [`read_mark`].
#[inline(never)]
fn write_mark(ctx: &TcContext, mark: u32) {
    let skb = ctx.skb.skb;
    // SAFETY: the context pointer the kernel passed to the program.
    unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!((*skb).mark), mark) }
}

#[inline(always)]
fn addr_key(family: u8, addr: &Addr, slot: u32) -> AddrKey {
    AddrKey {
        family,
        slot: slot as u8,
        _pad: [0; 2],
        addr: bytemuck::cast(*addr),
    }
}

#[inline(always)]
fn lookup_addr(family: u8, addr: &Addr, slot: u32) -> Option<AddrInfo> {
    // SAFETY: read-only copy of a hash value.
    unsafe { ADDRS.get(&addr_key(family, addr, slot)) }.copied()
}

/// No owner: instance indices start at 1. A plain value instead of an
/// `Option<AddrInfo>`, whose undefined payload LLVM may copy around in
/// registers the verifier has never seen written.
const NOBODY: AddrInfo = AddrInfo {
    instance: 0,
    subnet: 0,
    identity: 0,
};

#[inline(always)]
fn owner_of(family: u8, addr: &Addr, slot: u32) -> AddrInfo {
    lookup_addr(family, addr, slot).unwrap_or(NOBODY)
}

/// The first two bytes of an address word, in network order.
#[inline(always)]
fn lead(a: &Addr) -> (u8, u8) {
    let b = a[0].to_ne_bytes();
    (b[0], b[1])
}

/// fe80::/10.
#[inline(always)]
fn is_link_local_v6(family: u8, a: &Addr) -> bool {
    let (b0, b1) = lead(a);
    family == AF_INET6 && b0 == 0xfe && b1 & 0xc0 == 0x80
}

/// 224.0.0.0/4, 255.255.255.255, ff00::/8 (a subnet's broadcast address is
/// found through the address map). Takes the address's first word only.
#[inline(never)]
fn is_group_addr(family: u8, first_word: u32) -> bool {
    let b0 = first_word.to_ne_bytes()[0];
    if family == AF_INET6 {
        return b0 == 0xff;
    }
    if b0 & 0xf0 == 0xe0 {
        return true;
    }
    first_word == u32::MAX
}

/// Whether a VPC carries this packet at all: not to a group or broadcast
/// destination (`dst_broadcast`: the address map says the destination, or
/// at the sender's hook the source, is a subnet's broadcast address), not an
/// ICMPv6 redirect.
#[inline(never)]
fn not_carried(p: &Pkt, broadcast: bool) -> bool {
    if broadcast {
        return true;
    }
    if is_group_addr(p.family, p.dst[0]) {
        return true;
    }
    p.family == AF_INET6 && p.proto == IPPROTO_ICMPV6 && p.icmp_type == pt::ICMPV6_REDIRECT
}

/// IPv4 UDP from `sport` to `dport`.
#[inline(always)]
fn is_udp4(p: &Pkt, sport: u16, dport: u16) -> bool {
    p.family == AF_INET && p.proto == IPPROTO_UDP && p.sport == sport && p.dport == dport
}

/// DHCP as an instance's client sends it (68 -> 67).
#[inline(always)]
fn is_dhcp_client(p: &Pkt) -> bool {
    is_udp4(p, pt::DHCP_CLIENT_PORT, pt::DHCP_SERVER_PORT)
}

/// DHCP as a server answers an instance's client (67 -> 68).
#[inline(always)]
fn is_dhcp_server(p: &Pkt) -> bool {
    is_udp4(p, pt::DHCP_SERVER_PORT, pt::DHCP_CLIENT_PORT)
}

#[inline(always)]
fn is_ndp(p: &Pkt) -> bool {
    p.family == AF_INET6 && p.proto == IPPROTO_ICMPV6 && pt::NDP_TYPES.contains(&p.icmp_type)
}

/// One of the VPC's service addresses (metadata, Time Sync, Amazon DNS), or
/// the subnet's DNS address.
#[inline(always)]
fn is_service(family: u8, a: &Addr, subnet: Option<&SubnetPolicy>) -> bool {
    if family == AF_INET {
        let w = a[0];
        if w == u32::from_ne_bytes(pt::SERVICES_V4[0])
            || w == u32::from_ne_bytes(pt::SERVICES_V4[1])
            || w == u32::from_ne_bytes(pt::SERVICES_V4[2])
        {
            return true;
        }
        if let Some(s) = subnet {
            return s.flags & SUBNET_HAS_DNS_V4 != 0 && w == u32::from_ne_bytes(s.dns_v4);
        }
    } else {
        if *a == bytemuck::cast::<[u8; 16], Addr>(pt::SERVICES_V6[0])
            || *a == bytemuck::cast::<[u8; 16], Addr>(pt::SERVICES_V6[1])
            || *a == bytemuck::cast::<[u8; 16], Addr>(pt::SERVICES_V6[2])
        {
            return true;
        }
        if let Some(s) = subnet {
            return s.flags & SUBNET_HAS_DNS_V6 != 0
                && *a == bytemuck::cast::<[u8; 16], Addr>(s.dns_v6);
        }
    }
    false
}

/// The classes docs/semantics.md leaves unfiltered, as seen from this hook:
/// NDP either way; DHCP in its client shape (sent 68 -> 67, delivered
/// 67 -> 68) with a peer that is no instance; a service address as the peer.
#[inline(always)]
/// `peer_owner` is the owner of the peer's address on the wire (the one
/// lookup of it that `try_classify` makes).
fn passthrough(p: &Pkt, dir: Direction, subnet: Option<&SubnetPolicy>, peer_owner: u32) -> bool {
    if is_ndp(p) {
        return true;
    }
    let (dhcp, peer) = match dir {
        Direction::Egress => (is_dhcp_client(p), &p.dst),
        Direction::Ingress => (is_dhcp_server(p), &p.src),
    };
    // The DHCP server is the VPC's, never an instance: an instance's 67 -> 68
    // to another is judged by both instances' groups.
    if dhcp && (peer_owner == 0 || peer_owner == BROADCAST_OWNER) {
        return true;
    }
    is_service(p.family, peer, subnet)
}

/// The source check of a bound port: whether the instance may send with
/// this source (its own address, its IPv6 link-local address, or the
/// unspecified address while it has none: DHCP client, NDP).
#[inline(always)]
fn may_send_as(p: &Pkt, own: bool) -> bool {
    own || is_link_local_v6(p.family, &p.src)
        || (p.src == [0; 4] && (is_dhcp_client(p) || is_ndp(p)))
}

/// Whether a bound port may be handed this destination: the instance's own
/// address, its IPv6 link-local address, or a group address (then the
/// passthrough and not-carried checks decide).
#[inline(always)]
fn may_receive_as(p: &Pkt, own: bool) -> bool {
    own || is_link_local_v6(p.family, &p.dst) || is_group_addr(p.family, p.dst[0])
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

/// What decided the SG stage.
enum SgOutcome {
    Tracked(*mut sgfw_common::CtEntry),
    Related,
    Rule(u32),
    NoMatch,
}

/// The SG stage, in precedence order: (1) the flow is tracked for this
/// instance; (2) an ICMP error quoting a flow tracked for this instance;
/// (3) a rule of the instance's policy for this direction allows it; else no
/// match.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "one call site; the leg's inputs")]
fn sg_stage(
    p: &Pkt,
    hit: Option<*mut sgfw_common::CtEntry>,
    instance: u32,
    policy: u32,
    local: &Addr,
    remote: &Addr,
    cfg: &Config,
    now: u64,
) -> SgOutcome {
    if let Some(e) = hit {
        if conntrack::owned_by(e, instance) {
            return SgOutcome::Tracked(e);
        }
    }
    if p.is_icmp_error && p.has_inner {
        if let Some(ik) = conntrack::inner_key(p.family, &p.inner, local) {
            if let Some(e) = conntrack::lookup_live(&ik, cfg, now) {
                if conntrack::owned_by(e, instance) {
                    return SgOutcome::Related;
                }
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
            identity: 0,
        }),
        Err(reason) => Some(decision(reason, instance)),
    }
}

/// One leg's decision for a parsed IP packet. With `COMMIT` false (the XDP
/// pre-filter) it changes no map: the same decision, no side effects.
#[inline(always)]
fn try_classify<const COMMIT: bool>(
    p: &Pkt,
    dir: Direction,
    ifx: u32,
    cfg: &Config,
    now: u64,
    peer_identity: u32,
) -> Decision {
    let key = conntrack::key(p, dir);
    // An ICMP error is never a flow of its own: its type/code key must never
    // find one (it could collide with an echo identifier).
    let hit = if p.is_icmp_error {
        None
    } else {
        conntrack::lookup_live(&key, cfg, now)
    };
    // 2. Fast path: a tracked flow whose stateless checks passed under this
    // policy generation at this port, for a packet the cache covers.
    if let Some(e) = hit {
        // A flow with an instance as its peer needs that instance's identity
        // at the receiver's hook: without one, the slow path decides.
        let identity_ok = matches!(dir, Direction::Egress)
            || peer_identity != 0
            || !conntrack::peer_is_instance(e);
        if identity_ok && conntrack::cache_valid(e, p, dir, ifx, cfg) {
            if COMMIT {
                conntrack::touch(e, dir, p, now);
            }
            // SAFETY: see conntrack::lookup_live.
            let (instance, identity) = unsafe { ((*e).instance, (*e).local_identity) };
            let mut d = decision(Reason::AllowTracked, instance);
            d.identity = identity;
            return d;
        }
    }

    let (local, remote) = match dir {
        Direction::Egress => (&p.src, &p.dst),
        Direction::Ingress => (&p.dst, &p.src),
    };
    // SAFETY: read-only hash lookup.
    let bound = unsafe { PORTS.get(&ifx) }.copied();
    // Every policy lookup below reads the half of the maps in force.
    let slot = cfg.slot & 1;
    let found = owner_of(p.family, local, slot);
    // The peer as the VPC sees it: at the receiver's hook, the sender's own
    // address from the identity its hook wrote into `skb->mark`, whatever the
    // host's NAT made of the source. An identity that names no address is
    // an address that cannot be known: drop.
    let mut peer: Addr = *remote;
    // The one lookup of the wire peer's owner on this path: the unattached
    // check, DHCP's "peer is no instance", the sender's broadcast check and
    // (unless an identity names another address) the boundary crossing.
    let wire_owner = owner_of(p.family, remote, slot);
    let mut peer_owner = Some(wire_owner);
    let wire_peer_is_instance = wire_owner.instance != 0 && wire_owner.instance != BROADCAST_OWNER;
    if matches!(dir, Direction::Ingress) && peer_identity == 0 && wire_peer_is_instance {
        // From an instance's address, but not through that instance's hook.
        return decision(Reason::DropUnattached, 0);
    }
    if peer_identity != 0 {
        // SAFETY: read-only hash lookup.
        match unsafe { IDENTITIES.get(&peer_identity) } {
            Some(k) if k.family == p.family => {
                peer = bytemuck::cast(k.addr);
                // Looked up only if the crossing needs it.
                peer_owner = None;
            }
            Some(_) => {}
            None => return decision(Reason::DropNoPolicy, 0),
        }
    }
    let remote = &peer;
    let broadcast_local = found.instance == BROADCAST_OWNER;
    let mut local_info = if broadcast_local { NOBODY } else { found };
    // The identity of the instance's own source address (0 when it sends as
    // link-local or unspecified).
    let mut own_identity = local_info.identity;
    // 3. Source check on bound ports, before anything else: an instance never
    // speaks as another address, whatever the packet carries. Link-scoped
    // traffic of a bound port belongs to the port's instance.
    if let Some(b) = bound {
        let own = local_info.instance == b;
        let ok = match dir {
            Direction::Egress => may_send_as(p, own),
            Direction::Ingress => may_receive_as(p, own) || broadcast_local,
        };
        if !ok {
            return decision(
                match dir {
                    Direction::Egress => Reason::DropSourceCheck,
                    Direction::Ingress => Reason::DropNotForInstance,
                },
                b,
            );
        }
        if !own {
            own_identity = 0;
            // SAFETY: read-only hash lookup.
            local_info = match unsafe { INSTANCES.get(&slotted(b, slot)) } {
                Some(ip) => AddrInfo {
                    instance: b,
                    subnet: ip.subnet,
                    identity: 0,
                },
                None => NOBODY,
            };
        }
    }
    let local_instance = local_info.instance;
    // SAFETY: read-only hash lookups.
    let subnet = if local_instance != 0 {
        unsafe { SUBNETS.get(&slotted(local_info.subnet, slot)) }
    } else {
        None
    };

    // 4. Passthrough classes.
    if passthrough(p, dir, subnet, wire_owner.instance) {
        let mut d = decision(Reason::AllowPassthrough, local_instance);
        d.identity = own_identity;
        return d;
    }
    // 5. Not carried: group destinations, a subnet's broadcast address
    // (the destination's, at the sender's hook), ICMPv6 redirects.
    let remote_broadcast =
        matches!(dir, Direction::Egress) && wire_owner.instance == BROADCAST_OWNER;
    if not_carried(p, broadcast_local || remote_broadcast) {
        return decision(Reason::DropNotCarried, local_instance);
    }
    if local_instance == 0 {
        return decision(Reason::AllowUnmanaged, 0);
    }
    let li = local_info;
    let no_policy = decision(Reason::DropNoPolicy, li.instance);
    // SAFETY: read-only hash lookup.
    let Some(inst) = (unsafe { INSTANCES.get(&slotted(li.instance, slot)) }) else {
        return no_policy;
    };
    let Some(subnet) = subnet else {
        return no_policy;
    };
    // Outside the subnet's prefix the peer cannot be an instance of it: the
    // packet crosses the boundary without an owner lookup.
    let crossing = !in_prefix(subnet, p.family, remote) || {
        let r = peer_owner.unwrap_or_else(|| owner_of(p.family, remote, slot));
        r.instance == 0 || r.instance == BROADCAST_OWNER || r.subnet != li.subnet
    };
    let v4 = p.family == AF_INET;

    // 6. The leg's stages.
    let outcome = match dir {
        Direction::Egress => {
            let sg = sg_stage(
                p,
                hit,
                li.instance,
                inst.policy_egress,
                local,
                remote,
                cfg,
                now,
            );
            if let SgOutcome::NoMatch = sg {
                return decision(Reason::DropSgEgress, li.instance);
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
            let sg = sg_stage(
                p,
                hit,
                li.instance,
                inst.policy_ingress,
                local,
                remote,
                cfg,
                now,
            );
            if let SgOutcome::NoMatch = sg {
                return decision(Reason::DropSgIngress, li.instance);
            }
            sg
        }
    };

    // 7. Commit: the whole leg allowed the packet.
    let mut d = match outcome {
        SgOutcome::Tracked(e) => {
            if COMMIT {
                conntrack::touch(e, dir, p, now);
                conntrack::cache_pass(e, p, dir, ifx, cfg);
            }
            decision(Reason::AllowTracked, li.instance)
        }
        SgOutcome::Related => decision(Reason::AllowRelated, li.instance),
        SgOutcome::Rule(rule) => {
            // ICMP errors are never tracked.
            if COMMIT && !p.is_icmp_error {
                conntrack::create(
                    &key,
                    p,
                    li.instance,
                    own_identity,
                    peer_identity != 0 || wire_peer_is_instance,
                    dir,
                    ifx,
                    cfg,
                    now,
                );
            }
            Decision {
                reason: match dir {
                    Direction::Egress => Reason::AllowSgEgress,
                    Direction::Ingress => Reason::AllowSgIngress,
                },
                instance: li.instance,
                rule,
                identity: 0,
            }
        }
        SgOutcome::NoMatch => no_policy,
    };
    d.identity = own_identity;
    d
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
