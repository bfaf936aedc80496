//! The reference evaluator: the oracle every backend is tested against.
//!
//! This module owns the decision for one packet: passthrough classes, the
//! sender leg (SG egress, then outbound NACL), the receiver leg (inbound NACL,
//! then SG ingress), and per-instance connection tracking with its timeouts.
//! It is written for clarity over speed and is pure: time comes in as an
//! argument and all state lives in the caller's [`Conntrack`].
//!
//! It must never diverge from `docs/semantics.md`: the eBPF dataplane implements
//! the same steps and a differential test compares the two packet by packet.
//!
//! Decision order for one packet (numbered as the dataplane comments them):
//! 1. passthrough (NDP, DHCP, metadata, the subnet's DNS): allowed, no state;
//! 2. sender leg, if the source is an instance A: SG egress of A (tracked flow,
//!    related ICMP error, or a rule), then A's subnet's outbound NACL unless the
//!    destination is in the same subnet; stop at the first deny; commit A's
//!    conntrack only when the whole leg allowed;
//! 3. receiver leg, if the destination is an instance B: B's subnet's inbound
//!    NACL unless the source is in the same subnet, then SG ingress of B; the
//!    same stop and commit rules for B.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

use crate::flat::{
    ConntrackTimeouts, Direction, FlatModel, InstanceRules, RuleAction, RuleOrigin, SubnetFirewall,
};
use crate::packet::{
    L4, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Packet, Wire, is_icmp_error,
    query_request_type,
};
mod conntrack;
mod explain;

pub use crate::policy::{METADATA_ADDR, Stage};
pub use conntrack::*;
pub use explain::*;
use sgfw_common::passthrough as pt;

/// What decided a stage.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum Decider {
    /// A security-group rule allowed a new flow.
    SgRule(RuleOrigin),
    /// A NACL entry (allow or deny), by rule number.
    NaclRule(u16),
    /// No NACL entry matched: the implicit `*` deny.
    NaclDefaultDeny,
    /// No security-group rule matched.
    SgNoMatch,
    /// The flow is tracked for this instance.
    Tracked,
    /// An ICMP error quoting a flow tracked for this instance.
    Related,
}

impl fmt::Display for Decider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decider::SgRule(o) => write!(f, "{o}"),
            Decider::NaclRule(n) => write!(f, "rule {n}"),
            Decider::NaclDefaultDeny => f.write_str("rule * (no entry matched)"),
            Decider::SgNoMatch => f.write_str("no rule matched"),
            Decider::Tracked => f.write_str("tracked flow"),
            Decider::Related => f.write_str("related to a tracked flow"),
        }
    }
}

/// The outcome of one stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StageResult {
    /// Which stage.
    pub stage: Stage,
    /// Whether it let the packet through.
    pub allowed: bool,
    /// What decided.
    pub by: Decider,
}

/// Traffic a VPC never filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum PassthroughClass {
    /// ARP (never a [`Packet`]; the dataplane passes it before any policy).
    Arp,
    /// IPv6 neighbour discovery and router solicitation/advertisement (ICMPv6 133-137).
    Ndp,
    /// DHCP (UDP 67/68).
    Dhcp,
    /// The instance metadata service, 169.254.169.254 / fd00:ec2::254.
    Metadata,
    /// Amazon Time Sync, 169.254.169.123 / fd00:ec2::123.
    TimeSync,
    /// Amazon DNS at 169.254.169.253 / fd00:ec2::253.
    AmazonDns,
    /// The subnet's DNS address.
    Dns,
}

impl PassthroughClass {
    /// Stable lowercase name.
    pub const fn name(self) -> &'static str {
        match self {
            PassthroughClass::Arp => "arp",
            PassthroughClass::Ndp => "ndp",
            PassthroughClass::Dhcp => "dhcp",
            PassthroughClass::Metadata => "metadata",
            PassthroughClass::TimeSync => "time-sync",
            PassthroughClass::AmazonDns => "amazon-dns",
            PassthroughClass::Dns => "dns",
        }
    }
}

impl fmt::Display for PassthroughClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a packet was dropped before any SG or NACL stage judged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Blocked {
    /// The frame carries a VLAN tag.
    Vlan,
    /// A bound port sent a source that is not its instance's.
    SourceCheck,
    /// A bound port was handed a destination that is not its instance's.
    NotForInstance,
    /// Broadcast, multicast or an ICMPv6 redirect: a VPC does not carry it.
    NotCarried,
    /// A later fragment whose first fragment was not allowed at this hook.
    Fragment,
    /// Straight from a port not attached yet, or from an instance's address
    /// without passing that instance's hook.
    Unattached,
}

impl Blocked {
    /// Stable name, the same as the dataplane's drop reason.
    pub const fn name(self) -> &'static str {
        match self {
            Blocked::Vlan => "vlan",
            Blocked::SourceCheck => "source-check",
            Blocked::NotForInstance => "not-for-instance",
            Blocked::NotCarried => "not-carried",
            Blocked::Fragment => "fragment",
            Blocked::Unattached => "unattached",
        }
    }
}

/// The decision for one packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Whether the packet is delivered: every listed stage allowed.
    pub allowed: bool,
    /// The stages evaluated, in order; a denied packet's last stage is the one that denied.
    pub stages: Vec<StageResult>,
    /// Set when a leg let the packet through unfiltered (that leg adds no stages).
    pub passthrough: Option<PassthroughClass>,
    /// Set when the packet was dropped before any stage.
    pub blocked: Option<Blocked>,
    /// A later fragment let through on its first fragment's verdict.
    pub fragment: bool,
}

impl Verdict {
    /// The stage that denied, if the packet was denied.
    pub fn denied_by(&self) -> Option<&StageResult> {
        if self.allowed || self.blocked.is_some() {
            None
        } else {
            self.stages.last()
        }
    }
}

/// fe80::/10.
fn is_link_local_v6(a: IpAddr) -> bool {
    matches!(a, IpAddr::V6(v) if v.segments()[0] & 0xffc0 == 0xfe80)
}

/// 224.0.0.0/4, 255.255.255.255 and ff00::/8.
fn is_group(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v) => v.is_multicast() || v.is_broadcast(),
        IpAddr::V6(v) => v.is_multicast(),
    }
}

fn is_unspecified(a: IpAddr) -> bool {
    a.is_unspecified()
}

fn is_dhcp(pkt: &Packet, sport: u16, dport: u16) -> bool {
    !pkt.is_v6() && matches!(pkt.l4, L4::Udp { sport: s, dport: d } if s == sport && d == dport)
}

/// DHCP as an instance's client sends it (68 -> 67).
fn is_dhcp_client(pkt: &Packet) -> bool {
    is_dhcp(pkt, pt::DHCP_CLIENT_PORT, pt::DHCP_SERVER_PORT)
}

/// DHCP as a server answers an instance's client (67 -> 68).
fn is_dhcp_server(pkt: &Packet) -> bool {
    is_dhcp(pkt, pt::DHCP_SERVER_PORT, pt::DHCP_CLIENT_PORT)
}

fn is_ndp(pkt: &Packet) -> bool {
    pkt.is_v6()
        && matches!(pkt.l4, L4::Icmp { icmp_type, .. } if pt::NDP_TYPES.contains(&icmp_type))
}

fn is_redirect(pkt: &Packet) -> bool {
    pkt.is_v6()
        && matches!(
            pkt.l4,
            L4::Icmp {
                icmp_type: pt::ICMPV6_REDIRECT,
                ..
            }
        )
}

/// The service (metadata, Time Sync, Amazon DNS) an address is, if any.
pub fn service_class(a: IpAddr) -> Option<PassthroughClass> {
    const CLASSES: [PassthroughClass; 3] = [
        PassthroughClass::Metadata,
        PassthroughClass::TimeSync,
        PassthroughClass::AmazonDns,
    ];
    let i = match a {
        IpAddr::V4(v) => pt::SERVICES_V4.iter().position(|s| *s == v.octets()),
        IpAddr::V6(v) => pt::SERVICES_V6.iter().position(|s| *s == v.octets()),
    }?;
    CLASSES.get(i).copied()
}

/// The passthrough class of `pkt` at one hook, for the instance (if any) that
/// hook decides for: NDP either way; DHCP in its client shape (sent 68 -> 67,
/// delivered 67 -> 68) with a peer that is no instance; a service address or
/// the subnet's DNS as the peer.
fn passthrough_at(
    model: &FlatModel,
    inst: Option<&InstanceRules>,
    dir: Direction,
    pkt: &Packet,
) -> Option<PassthroughClass> {
    if is_ndp(pkt) {
        return Some(PassthroughClass::Ndp);
    }
    let (dhcp, peer) = match dir {
        Direction::Egress => (is_dhcp_client(pkt), pkt.dst),
        Direction::Ingress => (is_dhcp_server(pkt), pkt.src),
    };
    // The DHCP server is the VPC's, never an instance.
    if dhcp && model.instance_by_addr(peer).is_none() {
        return Some(PassthroughClass::Dhcp);
    }
    if let Some(c) = service_class(peer) {
        return Some(c);
    }
    let dns = inst.and_then(|i| model.subnet_of(i)).map(|s| &s.dns);
    dns.is_some_and(|d| d.contains(&peer))
        .then_some(PassthroughClass::Dns)
}

/// Whether a packet is never filtered by SGs or NACLs, and why: the class of
/// its sender's leg or its receiver's leg (address-based, as `sgfw explain`
/// shows it).
pub fn is_passthrough(model: &FlatModel, pkt: &Packet) -> Option<PassthroughClass> {
    let sender = model.instance_by_addr(pkt.src);
    let receiver = model.instance_by_addr(pkt.dst);
    passthrough_at(model, sender, Direction::Egress, pkt)
        .or_else(|| passthrough_at(model, receiver, Direction::Ingress, pkt))
}

/// What to write to conntrack once a leg has allowed.
#[derive(Clone, Copy)]
enum Commit {
    Nothing,
    Create(FlowKey),
    Refresh(FlowKey),
}

/// Decides one packet whose sender and receiver are the owners of its
/// addresses, sent and received at their own ports, and updates connection
/// tracking. See [`evaluate_wire`] for packets with other ports, tags or
/// fragments.
pub fn evaluate(model: &FlatModel, ct: &mut Conntrack, pkt: &Packet, now_ns: u64) -> Verdict {
    let index_of = |a: IpAddr| model.instances.iter().position(|i| i.addrs.contains(&a));
    let wire = Wire {
        packet: pkt.clone(),
        from: index_of(pkt.src),
        to: index_of(pkt.dst),
        unattached: false,
        vlan: false,
        fragment: None,
    };
    evaluate_wire(model, ct, &wire, now_ns)
}

/// Decides one packet on the wire: the hook at the sender's port (if it was
/// sent from an instance's port), then the hook at the receiver's port (if it
/// is handed to one); delivered when both let it through. Updates connection
/// tracking and the fragment records.
pub fn evaluate_wire(model: &FlatModel, ct: &mut Conntrack, wire: &Wire, now_ns: u64) -> Verdict {
    let mut v = Verdict {
        allowed: true,
        stages: Vec::new(),
        passthrough: None,
        blocked: None,
        fragment: false,
    };
    // The fence: what no hook of sgfw's stamped (straight from a port not
    // attached yet) is dropped, whatever it claims to be — by the receiving
    // port's hook before anything else, or by the bridge device's own hook
    // on its way up to the host.
    if wire.unattached {
        v.allowed = false;
        v.blocked = Some(Blocked::Unattached);
        return v;
    }
    for (port, dir) in [
        (wire.from, Direction::Egress),
        (wire.to, Direction::Ingress),
    ] {
        let Some(port) = port else { continue };
        if !hook(model, ct, wire, port, dir, now_ns, &mut v) {
            v.allowed = false;
            return v;
        }
    }
    v
}

/// One hook: the frame checks, fragments, then the leg; records a first
/// fragment's verdict. False = dropped here.
fn hook(
    model: &FlatModel,
    ct: &mut Conntrack,
    wire: &Wire,
    port: usize,
    dir: Direction,
    now_ns: u64,
    v: &mut Verdict,
) -> bool {
    if wire.vlan {
        v.blocked = Some(Blocked::Vlan);
        return false;
    }
    let pkt = &wire.packet;
    let record = wire.fragment.map(|f| FragRecord {
        port,
        dir,
        src: pkt.src,
        dst: pkt.dst,
        proto: pkt.proto(),
        id: f.id,
    });
    if let (Some(f), Some(r)) = (wire.fragment, record)
        && f.is_later()
    {
        let ok = ct
            .frags
            .get(&r)
            .is_some_and(|&(allowed, expires)| allowed && now_ns < expires);
        if ok {
            v.fragment = true;
        } else {
            v.blocked = Some(Blocked::Fragment);
        }
        return ok;
    }
    // At the receiver's hook, a packet from an instance's address must have
    // passed that instance's hook (the identity in `skb->mark`): one sent
    // from a port with no hook (not attached yet) or forged by the host drops.
    if dir == Direction::Ingress && wire.from.is_none() && model.instance_by_addr(pkt.src).is_some()
    {
        v.blocked = Some(Blocked::Unattached);
        return false;
    }
    let ok = leg(model, ct, pkt, port, dir, now_ns, v);
    if let (Some(f), Some(r)) = (wire.fragment, record)
        && f.is_first()
    {
        ct.frags.insert(
            r,
            (ok, now_ns.saturating_add(sgfw_common::FRAGMENT_TIMEOUT_NS)),
        );
    }
    ok
}

/// One leg at the port of instance index `port`: the source (or
/// destination) check of a bound port, passthrough, not-carried, then the
/// stages (sender: SG egress, NACL out; receiver: NACL in, SG ingress).
fn leg(
    model: &FlatModel,
    ct: &mut Conntrack,
    pkt: &Packet,
    port: usize,
    dir: Direction,
    now_ns: u64,
    v: &mut Verdict,
) -> bool {
    let Some(port_inst) = model.instances.get(port) else {
        return true;
    };
    let (local, remote) = match dir {
        Direction::Egress => (pkt.src, pkt.dst),
        Direction::Ingress => (pkt.dst, pkt.src),
    };
    let owner = model.instance_by_addr(local);
    let inst = if port_inst.interface.is_some() {
        let own = owner.is_some_and(|o| o.id == port_inst.id);
        let ok = match dir {
            Direction::Egress => {
                own || is_link_local_v6(local)
                    || (is_unspecified(local) && (is_dhcp_client(pkt) || is_ndp(pkt)))
            }
            Direction::Ingress => {
                own || is_link_local_v6(local)
                    || is_group(local)
                    || model.is_subnet_broadcast(local)
            }
        };
        if !ok {
            v.blocked = Some(match dir {
                Direction::Egress => Blocked::SourceCheck,
                Direction::Ingress => Blocked::NotForInstance,
            });
            return false;
        }
        Some(port_inst)
    } else {
        owner
    };
    if let Some(class) = passthrough_at(model, inst, dir, pkt) {
        v.passthrough = Some(class);
        return true;
    }
    if is_group(pkt.dst)
        || model.is_subnet_broadcast(pkt.dst)
        || (dir == Direction::Egress && model.is_subnet_broadcast(pkt.src))
        || is_redirect(pkt)
    {
        v.blocked = Some(Blocked::NotCarried);
        return false;
    }
    // Not an instance at this end: not ours to judge.
    let Some(inst) = inst else {
        return true;
    };
    let crossing = model
        .instance_by_addr(remote)
        .is_none_or(|r| r.subnet_index != inst.subnet_index);
    let nacl = |v: &mut Verdict, stage| {
        let r = nacl_stage(model.subnet_of(inst), stage, pkt);
        let ok = r.allowed;
        v.stages.push(r);
        ok
    };
    if dir == Direction::Ingress && crossing && !nacl(v, Stage::NaclIn) {
        return false;
    }
    let (sg, commit) = sg_stage(model, ct, inst, dir, pkt, now_ns);
    let ok = sg.allowed;
    v.stages.push(sg);
    if !ok {
        return false;
    }
    if dir == Direction::Egress && crossing && !nacl(v, Stage::NaclOut) {
        return false;
    }
    apply(ct, commit, inst, dir, pkt, now_ns);
    true
}

/// The verdict for the first packet of a new flow (no tracked state).
pub fn explain_new_flow(model: &FlatModel, pkt: &Packet) -> Verdict {
    evaluate(model, &mut Conntrack::new(), pkt, 0)
}

/// The security-group stage of instance `inst` in direction `dir`.
fn sg_stage(
    model: &FlatModel,
    ct: &mut Conntrack,
    inst: &InstanceRules,
    dir: Direction,
    pkt: &Packet,
    now_ns: u64,
) -> (StageResult, Commit) {
    let (stage, local, remote, rules) = match dir {
        Direction::Egress => (Stage::SgEgress, pkt.src, pkt.dst, &inst.egress),
        Direction::Ingress => (Stage::SgIngress, pkt.dst, pkt.src, &inst.ingress),
    };
    let allow = |by| StageResult {
        stage,
        allowed: true,
        by,
    };
    let key = flow_key(pkt, dir);
    match &key {
        // 1. A live flow tracked for this instance: allowed whatever the rules say now.
        Some(k) if ct.is_live(k, &inst.id, &model.timeouts, now_ns) => {
            return (allow(Decider::Tracked), Commit::Refresh(*k));
        }
        Some(_) => {}
        // 2. An ICMP error quoting a live flow of this instance: allowed, the flow not refreshed.
        None => {
            if let Some(inner) = related_key(pkt, local)
                && ct.is_live(&inner, &inst.id, &model.timeouts, now_ns)
            {
                return (allow(Decider::Related), Commit::Nothing);
            }
        }
    }
    // 3. The first rule whose remote contains the peer and whose matcher matches.
    match rules
        .iter()
        .find(|r| r.remote.contains(&remote) && r.matcher.matches(pkt))
    {
        Some(rule) => (
            allow(Decider::SgRule(rule.origin.clone())),
            key.map_or(Commit::Nothing, Commit::Create),
        ),
        None => (
            StageResult {
                stage,
                allowed: false,
                by: Decider::SgNoMatch,
            },
            Commit::Nothing,
        ),
    }
}

/// A NACL stage: the first entry (ascending rule number) of the packet's
/// family whose CIDR contains the remote address and whose matcher matches.
fn nacl_stage(subnet: Option<&SubnetFirewall>, stage: Stage, pkt: &Packet) -> StageResult {
    let (entries, remote) = match (subnet, stage) {
        (Some(s), Stage::NaclOut) => (s.outbound.as_slice(), pkt.dst),
        (Some(s), _) => (s.inbound.as_slice(), pkt.src),
        // A flattened model always has the subnet; fail closed if not.
        (None, _) => (&[][..], pkt.src),
    };
    for e in entries {
        if e.cidr.addr().is_ipv6() != pkt.is_v6() {
            continue;
        }
        if e.cidr.contains(&remote) && e.matcher.matches(pkt) {
            return StageResult {
                stage,
                allowed: e.action == RuleAction::Allow,
                by: Decider::NaclRule(e.rule_number),
            };
        }
    }
    StageResult {
        stage,
        allowed: false,
        by: Decider::NaclDefaultDeny,
    }
}

/// Commits a leg's conntrack change.
fn apply(
    ct: &mut Conntrack,
    commit: Commit,
    inst: &InstanceRules,
    dir: Direction,
    pkt: &Packet,
    now_ns: u64,
) {
    match commit {
        Commit::Nothing => {}
        Commit::Create(key) => {
            ct.flows.insert(
                key,
                FlowEntry {
                    instance: inst.id.clone(),
                    state: FlowState::New,
                    origin: dir,
                    created_ns: now_ns,
                    last_seen_ns: now_ns,
                    packets: 1,
                },
            );
        }
        Commit::Refresh(key) => {
            let Some(e) = ct.flows.get_mut(&key) else {
                return;
            };
            e.last_seen_ns = now_ns;
            e.packets += 1;
            if dir != e.origin && e.state == FlowState::New {
                e.state = FlowState::Established;
            }
            if let L4::Tcp { flags, .. } = &pkt.l4
                && (flags.fin || flags.rst)
            {
                e.state = FlowState::Closing;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Each test names the docs/semantics.md statement it checks.
    use super::*;
    use crate::flat::{FirewallRule, Match, NaclEntry};
    use crate::packet::TcpFlags;
    use crate::testutil::{FIXTURE, flat_of, ip};
    use ipnet::IpNet;

    fn fixture() -> FlatModel {
        flat_of(FIXTURE)
    }

    const WEB1: &str = "10.0.1.10";
    const WEB2: &str = "10.0.1.11";
    const DB: &str = "10.0.2.20";
    const OUT: &str = "203.0.113.7";
    const SEC: u64 = 1_000_000_000;

    fn syn(src: &str, dst: &str, dport: u16) -> Packet {
        Packet::tcp(ip(src), ip(dst), 40000, dport, TcpFlags::SYN)
    }

    fn stage_names(v: &Verdict) -> Vec<String> {
        v.stages
            .iter()
            .map(|s| {
                format!(
                    "{} {} {}",
                    s.stage,
                    if s.allowed { "allow" } else { "deny" },
                    s.by
                )
            })
            .collect()
    }

    fn subnet_mut<'a>(m: &'a mut FlatModel, id: &str) -> &'a mut SubnetFirewall {
        m.subnets.iter_mut().find(|s| s.id == id).unwrap()
    }

    fn inst_mut<'a>(m: &'a mut FlatModel, id: &str) -> &'a mut InstanceRules {
        m.instances.iter_mut().find(|s| s.id == id).unwrap()
    }

    fn entry(n: u16, action: RuleAction, cidr: &str, matcher: Match) -> NaclEntry {
        NaclEntry {
            rule_number: n,
            action,
            cidr: cidr.parse().unwrap(),
            matcher,
        }
    }

    // --- One packet, end to end ---

    /// "Instance A (subnet 1) sends to instance B (subnet 2). The verdict is the AND of" steps 1-4.
    #[test]
    fn semantics_end_to_end_instance_to_instance_in_other_subnet_has_four_stages() {
        let v = explain_new_flow(&fixture(), &syn(WEB1, DB, 5432));
        assert!(v.allowed);
        assert_eq!(
            stage_names(&v),
            [
                "sg-egress allow sg-web/egress[0]",
                "nacl-out allow rule 100",
                "nacl-in allow rule 100",
                "sg-ingress allow sg-db/ingress[0]"
            ]
        );
    }

    /// "From outside to B: steps 3 and 4."
    #[test]
    fn semantics_end_to_end_outside_to_instance_is_nacl_in_then_sg_ingress() {
        let v = explain_new_flow(&fixture(), &syn(OUT, WEB1, 443));
        assert!(v.allowed);
        assert_eq!(
            stage_names(&v),
            [
                "nacl-in allow rule 100",
                "sg-ingress allow sg-web/ingress[0]"
            ]
        );
    }

    /// "From A to outside: steps 1 and 2."
    #[test]
    fn semantics_end_to_end_instance_to_outside_is_sg_egress_then_nacl_out() {
        let v = explain_new_flow(&fixture(), &syn(WEB1, OUT, 80));
        assert!(v.allowed);
        assert_eq!(
            stage_names(&v),
            [
                "sg-egress allow sg-web/egress[0]",
                "nacl-out allow rule 100"
            ]
        );
    }

    /// "Everything that is not an instance address (the host, other bridges, the internet) is 'outside'."
    #[test]
    fn semantics_world_outside_to_outside_is_not_judged() {
        let v = explain_new_flow(&fixture(), &syn(OUT, "10.0.1.1", 22));
        assert!(v.allowed);
        assert!(v.stages.is_empty());
        assert_eq!(v.passthrough, None);
    }

    /// "Flow log style reasons name the stage that decided: sg-egress, nacl-out, nacl-in, sg-ingress."
    #[test]
    fn semantics_end_to_end_stage_names() {
        let names: Vec<_> = [
            Stage::SgEgress,
            Stage::NaclOut,
            Stage::NaclIn,
            Stage::SgIngress,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(names, ["sg-egress", "nacl-out", "nacl-in", "sg-ingress"]);
        // ... with the matching rule: the deciding stage is the last one listed.
        let v = explain_new_flow(&fixture(), &syn(OUT, WEB1, 22));
        assert!(!v.allowed);
        let d = v.denied_by().unwrap();
        assert_eq!((d.stage, &d.by), (Stage::SgIngress, &Decider::SgNoMatch));
    }

    /// Sender leg denies: the receiver leg is not evaluated and nothing of it changes.
    #[test]
    fn sender_leg_deny_stops_before_receiver() {
        let mut ct = Conntrack::new();
        // i-db has no egress rules.
        let v = evaluate(&fixture(), &mut ct, &syn(DB, WEB1, 443), 0);
        assert!(!v.allowed);
        assert_eq!(stage_names(&v), ["sg-egress deny no rule matched"]);
        assert!(ct.is_empty());
    }

    /// Receiver denies: the sender's conntrack entry is still committed (its leg allowed).
    #[test]
    fn receiver_leg_deny_keeps_sender_commit() {
        let mut ct = Conntrack::new();
        let v = evaluate(&fixture(), &mut ct, &syn(WEB1, DB, 22), 0);
        assert!(!v.allowed);
        assert_eq!(v.denied_by().unwrap().stage, Stage::SgIngress);
        assert_eq!(ct.len(), 1);
        assert_eq!(ct.iter().next().unwrap().1.instance, "i-web1");
    }

    // --- Security groups ---

    /// "Rules only allow. The instance's effective rule set per direction is the
    /// union of every rule of every group attached to it. No rule matching = drop."
    #[test]
    fn semantics_sg_union_of_groups_and_no_match_drops() {
        let json = FIXTURE.replace(
            r#""SecurityGroupIds": ["sg-db"]"#,
            r#""SecurityGroupIds": ["sg-db", "sg-web"]"#,
        );
        let m = flat_of(&json);
        // 443 from outside: only sg-web allows it; db now has it by union.
        let v = explain_new_flow(&m, &syn(OUT, DB, 443));
        assert!(v.allowed);
        assert_eq!(v.stages[1].by.to_string(), "sg-web/ingress[0]");
        // 22: nobody allows it.
        let v = explain_new_flow(&m, &syn(OUT, DB, 22));
        assert_eq!(v.denied_by().unwrap().by, Decider::SgNoMatch);
    }

    /// "Remote is ... a referenced security group (= every private IPv4/IPv6 address of every instance that has that group attached)".
    #[test]
    fn semantics_sg_referenced_group_allows_members_only() {
        let m = fixture();
        assert!(explain_new_flow(&m, &syn(WEB2, DB, 5432)).allowed);
        assert!(
            explain_new_flow(
                &m,
                &Packet::tcp(ip("fd00:1::10"), ip("fd00:2::20"), 1, 5432, TcpFlags::SYN)
            )
            .allowed
        );
        assert!(!explain_new_flow(&m, &syn(OUT, DB, 5432)).allowed);
    }

    /// "An IPv4 CIDR never matches IPv6 traffic and vice versa".
    #[test]
    fn semantics_sg_ipv4_cidr_never_matches_ipv6() {
        let mut m = fixture();
        let web1 = inst_mut(&mut m, "i-web1");
        web1.ingress = web1
            .ingress
            .iter()
            .filter(|r| r.remote.addr().is_ipv4())
            .cloned()
            .collect();
        // 0.0.0.0/0 tcp 443 remains; IPv6 traffic must not match it.
        let v = explain_new_flow(
            &m,
            &Packet::tcp(ip("2001:db8::1"), ip("fd00:1::10"), 1, 443, TcpFlags::SYN),
        );
        assert_eq!(v.denied_by().unwrap().by, Decider::SgNoMatch);
    }

    /// "`icmp` matches only IPv4 ICMP, `icmpv6` only ICMPv6."
    #[test]
    fn semantics_sg_icmp_matches_only_its_family() {
        let mut m = fixture();
        let web1 = inst_mut(&mut m, "i-web1");
        web1.ingress = vec![
            FirewallRule {
                remote: "::/0".parse().unwrap(),
                matcher: Match::Icmp {
                    proto: 1,
                    icmp_type: None,
                    code: None,
                },
                origin: RuleOrigin {
                    group_id: "sg-x".into(),
                    direction: Direction::Ingress,
                    permission: 0,
                },
            },
            FirewallRule {
                remote: "0.0.0.0/0".parse().unwrap(),
                matcher: Match::Icmp {
                    proto: 58,
                    icmp_type: None,
                    code: None,
                },
                origin: RuleOrigin {
                    group_id: "sg-x".into(),
                    direction: Direction::Ingress,
                    permission: 1,
                },
            },
        ]
        .into();
        assert!(
            !explain_new_flow(
                &m,
                &Packet::echo_request(ip("2001:db8::1"), ip("fd00:1::10"), 1)
            )
            .allowed
        );
        assert!(!explain_new_flow(&m, &Packet::echo_request(ip(OUT), ip(WEB1), 1)).allowed);
        // The fixture's icmp type 8 rule allows IPv4 echo.
        assert!(explain_new_flow(&fixture(), &Packet::echo_request(ip(OUT), ip(WEB1), 1)).allowed);
        assert!(!explain_new_flow(&fixture(), &Packet::icmp(ip(OUT), ip(WEB1), 13, 0, 1)).allowed);
    }

    /// "tcp/udp: FromPort..ToPort inclusive".
    #[test]
    fn semantics_sg_port_range_inclusive_by_destination_port() {
        let json = FIXTURE.replace(
            r#""FromPort": 443, "ToPort": 443"#,
            r#""FromPort": 8000, "ToPort": 8080"#,
        );
        let m = flat_of(&json);
        for (port, ok) in [(7999, false), (8000, true), (8080, true), (8081, false)] {
            assert_eq!(
                explain_new_flow(&m, &syn(OUT, WEB1, port)).allowed,
                ok,
                "port {port}"
            );
        }
        // The source port does not matter for the rule.
        assert!(
            !explain_new_flow(&m, &Packet::tcp(ip(OUT), ip(WEB1), 8000, 22, TcpFlags::SYN)).allowed
        );
    }

    /// "Stateful ... A packet of a flow that this instance's SG already allowed
    /// in one direction is allowed in both directions, whatever the rules say now." (TCP by 5-tuple)
    #[test]
    fn semantics_sg_stateful_tcp_reply_allowed() {
        let m = fixture();
        let mut ct = Conntrack::new();
        let p = syn(WEB1, OUT, 80);
        assert!(evaluate(&m, &mut ct, &p, 0).allowed);
        // sg-web has no ingress rule for port 40000 from OUT: the reply passes as tracked.
        let v = evaluate(&m, &mut ct, &p.reply(), SEC);
        assert!(v.allowed);
        assert_eq!(
            stage_names(&v),
            ["nacl-in allow rule 100", "sg-ingress allow tracked flow"]
        );
        // A different source port is another flow.
        let other = Packet::tcp(ip(OUT), ip(WEB1), 80, 40001, TcpFlags::ACK);
        assert!(!evaluate(&m, &mut ct, &other, SEC).allowed);
    }

    /// "UDP ... by 5-tuple".
    #[test]
    fn semantics_sg_stateful_udp_reply_allowed() {
        let m = fixture();
        let mut ct = Conntrack::new();
        let q = Packet::udp(ip(WEB1), ip("8.8.8.8"), 5353, 53);
        assert!(evaluate(&m, &mut ct, &q, 0).allowed);
        assert!(evaluate(&m, &mut ct, &q.reply(), SEC).allowed);
        assert!(
            !evaluate(
                &m,
                &mut ct,
                &Packet::udp(ip("8.8.8.8"), ip(WEB1), 53, 5354),
                SEC
            )
            .allowed
        );
    }

    /// "ICMP echo/other query types by (addresses, id/type)".
    #[test]
    fn semantics_sg_stateful_icmp_echo_by_id() {
        let m = fixture();
        let mut ct = Conntrack::new();
        let req = Packet::echo_request(ip(WEB1), ip(OUT), 77);
        assert!(evaluate(&m, &mut ct, &req, 0).allowed);
        assert_eq!(
            evaluate(&m, &mut ct, &req.reply(), SEC).stages[1].by,
            Decider::Tracked
        );
        let wrong_id = Packet::icmp(ip(OUT), ip(WEB1), 0, 0, 78);
        assert!(!evaluate(&m, &mut ct, &wrong_id, SEC).allowed);
        // IPv6 echo too.
        let req6 = Packet::echo_request(ip("fd00:1::10"), ip("2001:db8::1"), 5);
        assert!(evaluate(&m, &mut ct, &req6, 0).allowed);
        assert!(evaluate(&m, &mut ct, &req6.reply(), SEC).allowed);
    }

    /// "any other protocol by (addresses, protocol number)".
    #[test]
    fn semantics_sg_stateful_other_protocol_by_addresses_and_number() {
        let m = fixture();
        let mut ct = Conntrack::new();
        let gre = Packet {
            src: ip(WEB1),
            dst: ip(OUT),
            l4: L4::Other { proto: 47 },
        };
        assert!(evaluate(&m, &mut ct, &gre, 0).allowed);
        let back = Packet {
            src: ip(OUT),
            dst: ip(WEB1),
            l4: L4::Other { proto: 47 },
        };
        assert_eq!(
            evaluate(&m, &mut ct, &back, SEC).stages[1].by,
            Decider::Tracked
        );
        let esp = Packet {
            src: ip(OUT),
            dst: ip(WEB1),
            l4: L4::Other { proto: 50 },
        };
        assert!(!evaluate(&m, &mut ct, &esp, SEC).allowed);
    }

    /// "ICMP errors (IPv4 destination unreachable incl. fragmentation needed, time
    /// exceeded, parameter problem; ICMPv6 ...) that quote a tracked flow are allowed."
    #[test]
    fn semantics_sg_icmp_error_quoting_tracked_flow_is_related() {
        let m = fixture();
        let mut ct = Conntrack::new();
        let p = syn(WEB1, OUT, 80);
        assert!(evaluate(&m, &mut ct, &p, 0).allowed);
        let before = ct.clone();
        for t in [3u8, 11, 12] {
            let err = Packet {
                src: ip("198.51.100.1"),
                dst: ip(WEB1),
                l4: L4::Icmp {
                    icmp_type: t,
                    code: 4,
                    id: 0,
                    quoted: Some(Box::new(p.clone())),
                },
            };
            let v = evaluate(&m, &mut ct, &err, SEC);
            assert!(v.allowed, "type {t}");
            assert_eq!(v.stages[1].by, Decider::Related);
        }
        // Related packets neither create nor refresh entries.
        assert_eq!(ct, before);
        // An error quoting an untracked flow falls through to the rules (none allow it).
        let stray = Packet {
            src: ip("198.51.100.1"),
            dst: ip(WEB1),
            l4: L4::Icmp {
                icmp_type: 3,
                code: 1,
                id: 0,
                quoted: Some(Box::new(syn(WEB1, OUT, 81))),
            },
        };
        assert_eq!(
            evaluate(&m, &mut ct, &stray, SEC).denied_by().unwrap().by,
            Decider::SgNoMatch
        );
    }

    /// ICMPv6 packet too big (type 2) quoting a tracked IPv6 flow.
    #[test]
    fn semantics_sg_icmpv6_packet_too_big_is_related() {
        let m = fixture();
        let mut ct = Conntrack::new();
        let p = Packet::tcp(
            ip("fd00:1::10"),
            ip("2001:db8::1"),
            1234,
            443,
            TcpFlags::SYN,
        );
        assert!(evaluate(&m, &mut ct, &p, 0).allowed);
        for t in [1u8, 2, 3, 4] {
            let err = Packet {
                src: ip("2001:db8::ff"),
                dst: ip("fd00:1::10"),
                l4: L4::Icmp {
                    icmp_type: t,
                    code: 0,
                    id: 0,
                    quoted: Some(Box::new(p.clone())),
                },
            };
            assert_eq!(
                evaluate(&m, &mut ct, &err, SEC).stages[1].by,
                Decider::Related,
                "type {t}"
            );
        }
    }

    /// An error the instance sends about a flow it tracks (quoting an inbound packet) is related too.
    #[test]
    fn icmp_error_sent_by_instance_about_inbound_flow_is_related() {
        let mut m = fixture();
        inst_mut(&mut m, "i-web1").egress = Vec::new().into();
        let mut ct = Conntrack::new();
        let inbound = syn(OUT, WEB1, 443);
        assert!(evaluate(&m, &mut ct, &inbound, 0).allowed);
        let err = Packet {
            src: ip(WEB1),
            dst: ip(OUT),
            l4: L4::Icmp {
                icmp_type: 3,
                code: 3,
                id: 0,
                quoted: Some(Box::new(inbound)),
            },
        };
        assert_eq!(
            evaluate(&m, &mut ct, &err, SEC).stages[0].by,
            Decider::Related
        );
    }

    /// ICMP errors are never tracked, even when a rule allows them.
    #[test]
    fn icmp_errors_are_never_tracked() {
        let m = fixture();
        let mut ct = Conntrack::new();
        let err = Packet::icmp(ip(WEB1), ip(OUT), 3, 1, 0);
        assert_eq!(
            evaluate(&m, &mut ct, &err, 0).stages[0].by.to_string(),
            "sg-web/egress[0]"
        );
        assert!(ct.is_empty());
    }

    /// "Removing or narrowing an SG rule does not cut tracked flows; they live until they time out."
    #[test]
    fn semantics_sg_rule_removal_keeps_tracked_flows() {
        let mut m = fixture();
        let mut ct = Conntrack::new();
        let p = syn(OUT, WEB1, 443);
        assert!(evaluate(&m, &mut ct, &p, 0).allowed);
        assert!(evaluate(&m, &mut ct, &p.reply(), SEC).allowed);
        inst_mut(&mut m, "i-web1").ingress = Vec::new().into();
        inst_mut(&mut m, "i-web1").egress = Vec::new().into();
        let data = Packet::tcp(ip(OUT), ip(WEB1), 40000, 443, TcpFlags::ACK);
        assert_eq!(
            evaluate(&m, &mut ct, &data, 2 * SEC).stages[1].by,
            Decider::Tracked
        );
        assert!(evaluate(&m, &mut ct, &data.reply(), 3 * SEC).allowed);
        // A new flow is not allowed any more.
        assert!(
            !evaluate(
                &m,
                &mut ct,
                &Packet::tcp(ip(OUT), ip(WEB1), 40001, 443, TcpFlags::SYN),
                3 * SEC
            )
            .allowed
        );
    }

    /// Drive a flow to a state and check when it expires.
    fn expires_after(
        m: &FlatModel,
        first: &Packet,
        replies: usize,
        extra: Option<&Packet>,
        secs: u64,
    ) {
        let mut ct = Conntrack::new();
        let mut now = 0;
        assert!(evaluate(m, &mut ct, first, now).allowed);
        for _ in 0..replies {
            now += SEC;
            assert!(evaluate(m, &mut ct, &first.reply(), now).allowed);
        }
        if let Some(x) = extra {
            now += SEC;
            assert!(evaluate(m, &mut ct, x, now).allowed);
        }
        let probe = first.reply();
        let mut early = ct.clone();
        assert!(
            evaluate(m, &mut early, &probe, now + secs * SEC - 1).allowed,
            "alive just before {secs}s"
        );
        let v = evaluate(m, &mut ct, &probe, now + secs * SEC);
        assert!(!v.allowed, "expired at {secs}s");
    }

    /// "Timeouts: TCP established 432000 s".
    #[test]
    fn semantics_timeout_tcp_established_432000() {
        expires_after(&fixture(), &syn(WEB1, OUT, 80), 1, None, 432_000);
    }

    /// "TCP not yet established (SYN seen, no reply) 60 s".
    #[test]
    fn semantics_timeout_tcp_new_60() {
        let m = fixture();
        let mut ct = Conntrack::new();
        assert!(evaluate(&m, &mut ct, &syn(WEB1, OUT, 80), 0).allowed);
        let e = ct.iter().next().unwrap().1.clone();
        assert_eq!(e.state, FlowState::New);
        assert_eq!(e.timeout_ns(PROTO_TCP, &m.timeouts), 60 * SEC);
        assert!(
            evaluate(
                &m,
                &mut ct.clone(),
                &syn(WEB1, OUT, 80).reply(),
                60 * SEC - 1
            )
            .allowed
        );
        assert!(!evaluate(&m, &mut ct, &syn(WEB1, OUT, 80).reply(), 60 * SEC).allowed);
    }

    /// "closing (FIN/RST seen) 10 s".
    #[test]
    fn semantics_timeout_tcp_closing_10() {
        let fin = Packet::tcp(
            ip(WEB1),
            ip(OUT),
            40000,
            80,
            TcpFlags {
                fin: true,
                ack: true,
                ..TcpFlags::default()
            },
        );
        expires_after(&fixture(), &syn(WEB1, OUT, 80), 1, Some(&fin), 10);
        let rst = Packet::tcp(
            ip(WEB1),
            ip(OUT),
            40000,
            80,
            TcpFlags {
                rst: true,
                ..TcpFlags::default()
            },
        );
        expires_after(&fixture(), &syn(WEB1, OUT, 80), 1, Some(&rst), 10);
    }

    /// "UDP 30 s, or 180 s once traffic has been seen in both directions (a 'stream')".
    #[test]
    fn semantics_timeout_udp_30_and_stream_180() {
        let q = Packet::udp(ip(WEB1), ip(OUT), 5000, 53);
        expires_after(&fixture(), &q, 0, None, 30);
        expires_after(&fixture(), &q, 1, None, 180);
    }

    /// "ICMP 30 s".
    #[test]
    fn semantics_timeout_icmp_30() {
        expires_after(
            &fixture(),
            &Packet::echo_request(ip(WEB1), ip(OUT), 1),
            1,
            None,
            30,
        );
    }

    /// "other protocols 600 s".
    #[test]
    fn semantics_timeout_other_600() {
        expires_after(
            &fixture(),
            &Packet {
                src: ip(WEB1),
                dst: ip(OUT),
                l4: L4::Other { proto: 47 },
            },
            1,
            None,
            600,
        );
    }

    /// "TCP established 432000 s (configurable 60-432000)".
    #[test]
    fn semantics_timeout_tcp_established_configurable() {
        let json = FIXTURE.replacen('{', r#"{"ConnectionTracking": {"TcpEstablishedTimeout": 120, "UdpStreamTimeout": 60, "UdpTimeout": 40},"#, 1);
        let m = flat_of(&json);
        expires_after(&m, &syn(WEB1, OUT, 80), 1, None, 120);
        expires_after(&m, &Packet::udp(ip(WEB1), ip(OUT), 5000, 53), 0, None, 40);
        expires_after(&m, &Packet::udp(ip(WEB1), ip(OUT), 5000, 53), 1, None, 60);
    }

    /// An expired entry is removed on lookup.
    #[test]
    fn expired_entry_is_removed_on_lookup() {
        let m = fixture();
        let mut ct = Conntrack::new();
        let p = Packet::udp(ip(WEB1), ip(OUT), 5000, 53);
        assert!(evaluate(&m, &mut ct, &p, 0).allowed);
        assert_eq!(ct.len(), 1);
        assert!(!evaluate(&m, &mut ct, &p.reply(), 31 * SEC).allowed);
        assert!(ct.is_empty());
        // expire() does the same in bulk.
        assert!(evaluate(&m, &mut ct, &p, 0).allowed);
        ct.expire(&m.timeouts, 29 * SEC);
        assert_eq!(ct.len(), 1);
        ct.expire(&m.timeouts, 30 * SEC);
        assert!(ct.is_empty());
    }

    /// States: NEW, then ESTABLISHED on the first packet in the other direction, CLOSING on FIN/RST.
    #[test]
    fn conntrack_state_machine() {
        let m = fixture();
        let mut ct = Conntrack::new();
        let p = syn(WEB1, OUT, 80);
        evaluate(&m, &mut ct, &p, 0);
        let state = |ct: &Conntrack| ct.iter().next().unwrap().1.state;
        assert_eq!(state(&ct), FlowState::New);
        // Same direction again: still NEW.
        evaluate(&m, &mut ct, &p, SEC);
        assert_eq!(state(&ct), FlowState::New);
        evaluate(&m, &mut ct, &p.reply(), 2 * SEC);
        assert_eq!(state(&ct), FlowState::Established);
        let (_, e) = ct.iter().next().unwrap();
        assert_eq!(
            (e.origin, e.created_ns, e.last_seen_ns, e.packets),
            (Direction::Egress, 0, 2 * SEC, 3)
        );
        let fin = Packet::tcp(
            ip(OUT),
            ip(WEB1),
            80,
            40000,
            TcpFlags {
                fin: true,
                ack: true,
                ..TcpFlags::default()
            },
        );
        evaluate(&m, &mut ct, &fin, 3 * SEC);
        assert_eq!(state(&ct), FlowState::Closing);
        evaluate(&m, &mut ct, &p, 4 * SEC);
        assert_eq!(state(&ct), FlowState::Closing);
    }

    /// "AWS's 'untracked flow' optimisation ... is not modelled: all flows are tracked."
    #[test]
    fn semantics_sg_all_flows_tracked_even_when_open_both_ways() {
        let mut m = fixture();
        let open = |dir, g: &str| FirewallRule {
            remote: "0.0.0.0/0".parse().unwrap(),
            matcher: Match::All,
            origin: RuleOrigin {
                group_id: g.into(),
                direction: dir,
                permission: 0,
            },
        };
        let web1 = inst_mut(&mut m, "i-web1");
        web1.ingress = vec![open(Direction::Ingress, "sg-open")].into();
        web1.egress = vec![open(Direction::Egress, "sg-open")].into();
        let mut ct = Conntrack::new();
        assert!(evaluate(&m, &mut ct, &syn(OUT, WEB1, 22), 0).allowed);
        assert_eq!(ct.len(), 1);
        // And so it survives closing the group.
        let web1 = inst_mut(&mut m, "i-web1");
        web1.ingress = Vec::new().into();
        web1.egress = Vec::new().into();
        assert!(evaluate(&m, &mut ct, &syn(OUT, WEB1, 22).reply(), SEC).allowed);
    }

    /// "Each instance's SG decision is its own: instance A → instance B needs A's
    /// egress rules (or A's tracking) and B's ingress rules (or B's tracking)."
    #[test]
    fn semantics_sg_each_instance_decides_for_itself() {
        let mut m = fixture();
        let mut ct = Conntrack::new();
        let p = syn(WEB1, DB, 5432);
        assert!(evaluate(&m, &mut ct, &p, 0).allowed);
        // Two independent entries, one per instance.
        let owners: Vec<_> = ct.iter().map(|(_, e)| e.instance.clone()).collect();
        assert_eq!(owners.len(), 2);
        assert!(owners.contains(&"i-web1".to_string()) && owners.contains(&"i-db".to_string()));
        // B's tracking lets its reply out although sg-db has no egress rules.
        let v = evaluate(&m, &mut ct, &p.reply(), SEC);
        assert_eq!(v.stages[0].by, Decider::Tracked);
        assert_eq!(v.stages[3].by, Decider::Tracked);
        // A's egress alone is not enough for a new flow to port 22 (B's ingress denies) ...
        assert_eq!(
            evaluate(&m, &mut ct, &syn(WEB1, DB, 22), SEC)
                .denied_by()
                .unwrap()
                .stage,
            Stage::SgIngress
        );
        // ... and B's ingress alone is not enough when A's egress denies.
        inst_mut(&mut m, "i-web1").egress = Vec::new().into();
        let v = evaluate(
            &m,
            &mut ct,
            &Packet::tcp(ip(WEB1), ip(DB), 40001, 5432, TcpFlags::SYN),
            SEC,
        );
        assert_eq!(v.denied_by().unwrap().stage, Stage::SgEgress);
    }

    // --- Network ACLs ---

    /// "Evaluated in ascending rule number; the first rule that matches decides (allow or deny)".
    #[test]
    fn semantics_nacl_first_match_by_rule_number_decides() {
        let mut m = fixture();
        let a = subnet_mut(&mut m, "subnet-a");
        a.inbound = vec![
            entry(
                50,
                RuleAction::Deny,
                "203.0.113.0/24",
                Match::Ports {
                    proto: 6,
                    from: 443,
                    to: 443,
                },
            ),
            entry(100, RuleAction::Allow, "0.0.0.0/0", Match::All),
        ];
        let v = explain_new_flow(&m, &syn(OUT, WEB1, 443));
        assert_eq!(stage_names(&v), ["nacl-in deny rule 50"]);
        assert!(explain_new_flow(&m, &syn("198.51.100.9", WEB1, 443)).allowed);
        // An allow with a lower number wins over a later deny.
        let a = subnet_mut(&mut m, "subnet-a");
        a.inbound[0].rule_number = 200;
        a.inbound.sort_by_key(|e| e.rule_number);
        assert!(explain_new_flow(&m, &syn(OUT, WEB1, 443)).allowed);
    }

    /// "nothing matches = deny (the `*` rule, 32767 for IPv4, 32768 for IPv6)".
    #[test]
    fn semantics_nacl_no_match_denies() {
        let mut m = fixture();
        subnet_mut(&mut m, "subnet-a")
            .inbound
            .retain(|e| e.cidr.addr().is_ipv4());
        let v = explain_new_flow(
            &m,
            &Packet::tcp(ip("2001:db8::1"), ip("fd00:1::10"), 1, 443, TcpFlags::SYN),
        );
        assert_eq!(stage_names(&v), ["nacl-in deny rule * (no entry matched)"]);
    }

    /// "An entry is (... port range for 6/17 ...)": the range is the destination port.
    #[test]
    fn semantics_nacl_port_range_is_destination_port() {
        let mut m = fixture();
        subnet_mut(&mut m, "subnet-a").outbound = vec![entry(
            10,
            RuleAction::Allow,
            "0.0.0.0/0",
            Match::Ports {
                proto: 6,
                from: 80,
                to: 80,
            },
        )];
        assert!(explain_new_flow(&m, &syn(WEB1, OUT, 80)).allowed);
        assert!(
            !explain_new_flow(&m, &Packet::tcp(ip(WEB1), ip(OUT), 80, 81, TcpFlags::SYN)).allowed
        );
    }

    /// "`-1` or any other protocol: ports and ICMP fields are ignored. Protocol
    /// 58 with an IPv4 CIDR matches all ICMP types. Type or code -1 = any."
    #[test]
    fn semantics_nacl_protocol_matching() {
        let json = FIXTURE.replace(
            r#"{"RuleNumber": 100, "Protocol": "-1", "RuleAction": "allow", "Egress": false, "CidrBlock": "0.0.0.0/0"}"#,
            r#"{"RuleNumber": 10, "Protocol": "58", "RuleAction": "allow", "Egress": false, "CidrBlock": "0.0.0.0/0", "IcmpTypeCode": {"Type": 3, "Code": 0}},
               {"RuleNumber": 20, "Protocol": "1", "RuleAction": "allow", "Egress": false, "CidrBlock": "0.0.0.0/0", "IcmpTypeCode": {"Type": 8, "Code": -1}},
               {"RuleNumber": 30, "Protocol": "47", "RuleAction": "allow", "Egress": false, "CidrBlock": "0.0.0.0/0", "PortRange": {"From": 1, "To": 1}}"#,
        );
        let m = flat_of(&json);
        let a = &m.subnets[0];
        assert_eq!(a.inbound[0].matcher, Match::Proto(58));
        assert_eq!(
            a.inbound[1].matcher,
            Match::Icmp {
                proto: 1,
                icmp_type: Some(8),
                code: None
            }
        );
        assert_eq!(a.inbound[2].matcher, Match::Proto(47));
        let nacl_in = |p: &Packet| nacl_stage(Some(a), Stage::NaclIn, p);
        assert_eq!(
            nacl_in(&Packet::icmp(ip(OUT), ip(WEB1), 8, 5, 1)).by,
            Decider::NaclRule(20)
        );
        assert_eq!(
            nacl_in(&Packet::icmp(ip(OUT), ip(WEB1), 0, 0, 1)).by,
            Decider::NaclDefaultDeny
        );
        assert_eq!(
            nacl_in(&Packet {
                src: ip(OUT),
                dst: ip(WEB1),
                l4: L4::Other { proto: 47 }
            })
            .by,
            Decider::NaclRule(30)
        );
        // Proto 58 on an IPv4 CIDR is a protocol compare: it never matches IPv4 ICMP.
        assert_eq!(
            nacl_in(&Packet::icmp(ip(OUT), ip(WEB1), 3, 0, 0)).by,
            Decider::NaclDefaultDeny
        );
    }

    /// ICMP type/code for 58 with an IPv6 CIDR.
    #[test]
    fn semantics_nacl_icmpv6_type_code_with_ipv6_cidr() {
        let mut m = fixture();
        subnet_mut(&mut m, "subnet-a").inbound = vec![entry(
            10,
            RuleAction::Allow,
            "::/0",
            Match::Icmp {
                proto: 58,
                icmp_type: Some(128),
                code: None,
            },
        )];
        let a = m.subnets[0].clone();
        let p = Packet::echo_request(ip("2001:db8::1"), ip("fd00:1::10"), 1);
        assert_eq!(
            nacl_stage(Some(&a), Stage::NaclIn, &p).by,
            Decider::NaclRule(10)
        );
        let reply = Packet::icmp(ip("2001:db8::1"), ip("fd00:1::10"), 129, 0, 1);
        assert_eq!(
            nacl_stage(Some(&a), Stage::NaclIn, &reply).by,
            Decider::NaclDefaultDeny
        );
    }

    /// "Stateless: every packet is checked, replies included, tracked or not."
    #[test]
    fn semantics_nacl_checks_replies_of_tracked_flows() {
        let mut m = fixture();
        subnet_mut(&mut m, "subnet-a").inbound = vec![entry(
            10,
            RuleAction::Allow,
            "0.0.0.0/0",
            Match::Ports {
                proto: 6,
                from: 443,
                to: 443,
            },
        )];
        let mut ct = Conntrack::new();
        let p = syn(WEB1, OUT, 80);
        assert!(evaluate(&m, &mut ct, &p, 0).allowed);
        // The reply's destination port 40000 is not open inbound: NACL denies a tracked flow's reply.
        let v = evaluate(&m, &mut ct, &p.reply(), SEC);
        assert_eq!(stage_names(&v), ["nacl-in deny rule * (no entry matched)"]);
    }

    /// "A NACL change takes effect on established flows at once."
    #[test]
    fn semantics_nacl_change_cuts_established_flow() {
        let mut m = fixture();
        let mut ct = Conntrack::new();
        let p = syn(OUT, WEB1, 443);
        assert!(evaluate(&m, &mut ct, &p, 0).allowed);
        assert!(evaluate(&m, &mut ct, &p.reply(), SEC).allowed);
        subnet_mut(&mut m, "subnet-a")
            .inbound
            .insert(0, entry(1, RuleAction::Deny, "203.0.113.0/24", Match::All));
        let data = Packet::tcp(ip(OUT), ip(WEB1), 40000, 443, TcpFlags::ACK);
        assert_eq!(
            stage_names(&evaluate(&m, &mut ct, &data, 2 * SEC)),
            ["nacl-in deny rule 1"]
        );
    }

    /// "A NACL is evaluated only when traffic crosses the subnet boundary ...
    /// Two instances of the same subnet never see NACLs between them."
    #[test]
    fn semantics_nacl_same_subnet_never_sees_nacl() {
        let mut m = fixture();
        let a = subnet_mut(&mut m, "subnet-a");
        a.inbound.clear();
        a.outbound.clear();
        let v = explain_new_flow(&m, &syn(WEB1, WEB2, 443));
        assert!(v.allowed);
        assert_eq!(
            stage_names(&v),
            [
                "sg-egress allow sg-web/egress[0]",
                "sg-ingress allow sg-web/ingress[0]"
            ]
        );
        // Leaving the subnet does see it.
        assert_eq!(
            explain_new_flow(&m, &syn(WEB1, DB, 5432))
                .denied_by()
                .unwrap()
                .stage,
            Stage::NaclOut
        );
    }

    /// "the outbound list of the source subnet when the packet leaves it, the
    /// inbound list of the destination subnet when it enters it."
    #[test]
    fn semantics_nacl_out_of_source_subnet_and_in_of_destination_subnet() {
        let mut m = fixture();
        subnet_mut(&mut m, "subnet-a").inbound.clear(); // not consulted for a → b
        assert!(explain_new_flow(&m, &syn(WEB1, DB, 5432)).allowed);
        subnet_mut(&mut m, "subnet-b").inbound =
            vec![entry(7, RuleAction::Deny, "10.0.1.0/24", Match::All)];
        let v = explain_new_flow(&m, &syn(WEB1, DB, 5432));
        assert_eq!(v.denied_by().unwrap().stage, Stage::NaclIn);
        assert_eq!(v.denied_by().unwrap().by, Decider::NaclRule(7));
        // NACL-out uses the destination as remote.
        let mut m = fixture();
        subnet_mut(&mut m, "subnet-a")
            .outbound
            .insert(0, entry(1, RuleAction::Deny, "10.0.2.20/32", Match::All));
        assert_eq!(
            stage_names(&explain_new_flow(&m, &syn(WEB1, DB, 5432)))[1],
            "nacl-out deny rule 1"
        );
    }

    /// "The VPC's default NACL: rule 100 allow all, IPv4 and (with IPv6) IPv6, both directions."
    #[test]
    fn semantics_nacl_default_allows_all() {
        let m = fixture();
        let b = &m.subnets[1];
        assert_eq!(b.nacl_id, crate::validate::IMPLICIT_DEFAULT_NACL_ID);
        let v = explain_new_flow(
            &m,
            &Packet::tcp(ip("2001:db8::1"), ip("fd00:2::20"), 1, 5432, TcpFlags::SYN),
        );
        assert_eq!(v.stages[0].by, Decider::NaclRule(101));
        let v = explain_new_flow(&m, &syn(OUT, DB, 5432));
        assert_eq!(v.stages[0].by, Decider::NaclRule(100));
    }

    /// "A new custom NACL has no rules: it denies everything."
    #[test]
    fn semantics_nacl_custom_without_rules_denies_everything() {
        let json = FIXTURE.replace(
            r#""Associations": [{"SubnetId": "subnet-a"}], "Entries": ["#,
            r#""Associations": [{"SubnetId": "subnet-a"}], "Entries": [], "X": ["#,
        );
        let m = flat_of(&json);
        assert!(m.subnets[0].inbound.is_empty());
        assert_eq!(
            stage_names(&explain_new_flow(&m, &syn(OUT, WEB1, 443))),
            ["nacl-in deny rule * (no entry matched)"]
        );
        assert_eq!(
            explain_new_flow(&m, &syn(WEB1, OUT, 443))
                .denied_by()
                .unwrap()
                .stage,
            Stage::NaclOut
        );
    }

    // --- Passthrough ---

    /// "Not filtered: ... IPv6 neighbour discovery and router solicitation/advertisement
    /// (ICMPv6 133-136; redirects (137) are not delivered)".
    #[test]
    fn semantics_passthrough_ndp() {
        let mut m = fixture();
        let a = subnet_mut(&mut m, "subnet-a");
        a.inbound.clear();
        let redirect = evaluate(
            &m,
            &mut Conntrack::new(),
            &Packet::icmp(ip("fe80::1"), ip("fd00:1::10"), 137, 0, 0),
            0,
        );
        assert_eq!(
            (redirect.allowed, redirect.blocked),
            (false, Some(Blocked::NotCarried))
        );
        for t in 133..=136 {
            let p = Packet::icmp(ip("fe80::1"), ip("fd00:1::10"), t, 0, 0);
            let mut ct = Conntrack::new();
            let v = evaluate(&m, &mut ct, &p, 0);
            assert_eq!(
                (v.allowed, v.passthrough, v.stages.len()),
                (true, Some(PassthroughClass::Ndp), 0)
            );
            assert!(ct.is_empty());
        }
        // 132 and 138 are not NDP.
        assert!(
            !explain_new_flow(
                &m,
                &Packet::icmp(ip("fe80::1"), ip("fd00:1::10"), 138, 0, 0)
            )
            .allowed
        );
        // IPv4 ICMP type 133 is nothing special.
        assert_eq!(
            is_passthrough(&m, &Packet::icmp(ip(OUT), ip(WEB1), 133, 0, 0)),
            None
        );
    }

    /// "DHCP (UDP 67/68)".
    #[test]
    fn semantics_passthrough_dhcp() {
        let mut m = fixture();
        inst_mut(&mut m, "i-web1").egress = Vec::new().into();
        let discover = Packet::udp(ip("0.0.0.0"), ip("255.255.255.255"), 68, 67);
        assert_eq!(is_passthrough(&m, &discover), Some(PassthroughClass::Dhcp));
        let mut ct = Conntrack::new();
        let v = evaluate(
            &m,
            &mut ct,
            &Packet::udp(ip(WEB1), ip("10.0.1.1"), 68, 67),
            0,
        );
        assert_eq!(v.passthrough, Some(PassthroughClass::Dhcp));
        assert!(v.allowed && ct.is_empty());
        assert!(
            evaluate(
                &m,
                &mut ct,
                &Packet::udp(ip("10.0.1.1"), ip(WEB1), 67, 68),
                0
            )
            .allowed
        );
        assert!(
            !evaluate(
                &m,
                &mut ct,
                &Packet::udp(ip(WEB1), ip("10.0.1.1"), 68, 68),
                0
            )
            .allowed
        );
    }

    /// "traffic to the instance metadata address 169.254.169.254".
    #[test]
    fn semantics_passthrough_metadata() {
        let mut m = fixture();
        inst_mut(&mut m, "i-web1").egress = Vec::new().into();
        let p = Packet::tcp(ip(WEB1), ip("169.254.169.254"), 40000, 80, TcpFlags::SYN);
        let v = explain_new_flow(&m, &p);
        assert_eq!(
            (v.allowed, v.passthrough),
            (true, Some(PassthroughClass::Metadata))
        );
        assert_eq!(
            explain_new_flow(&m, &p.reply()).passthrough,
            Some(PassthroughClass::Metadata)
        );
    }

    /// "and, where the model names one, to the subnet's DNS address".
    #[test]
    fn semantics_passthrough_subnet_dns() {
        let mut m = fixture();
        inst_mut(&mut m, "i-web1").egress = Vec::new().into();
        let q = Packet::udp(ip(WEB1), ip("10.0.0.2"), 5353, 53);
        assert_eq!(
            explain_new_flow(&m, &q).passthrough,
            Some(PassthroughClass::Dns)
        );
        assert_eq!(
            explain_new_flow(&m, &q.reply()).passthrough,
            Some(PassthroughClass::Dns)
        );
        // Subnet b names no DNS address: its instances' traffic to 10.0.0.2 is filtered.
        assert_eq!(
            explain_new_flow(&m, &Packet::udp(ip(DB), ip("10.0.0.2"), 5353, 53)).passthrough,
            None
        );
    }

    /// "Not filtered at all: ARP" — ARP is not an IP packet; the class exists for the dataplane.
    #[test]
    fn semantics_passthrough_arp_class() {
        assert_eq!(PassthroughClass::Arp.to_string(), "arp");
    }

    /// The flow key of an ICMP error is none; of queries (id, request type); of other ICMP (type, code).
    #[test]
    fn flow_keys() {
        let k = flow_key(
            &Packet::icmp(ip(WEB1), ip(OUT), 0, 0, 9),
            Direction::Ingress,
        )
        .unwrap();
        // A reply delivered to OUT: OUT asked.
        assert_eq!(
            (k.local, k.local_port, k.remote_port),
            (ip(OUT), 9, sgfw_common::CT_ICMP_QUERY_LOCAL | 8)
        );
        // The same reply seen from its sender: the peer asked.
        let k = flow_key(&Packet::icmp(ip(WEB1), ip(OUT), 0, 0, 9), Direction::Egress).unwrap();
        assert_eq!(k.remote_port, sgfw_common::CT_ICMP_QUERY_REMOTE | 8);
        let k = flow_key(&Packet::icmp(ip(WEB1), ip(OUT), 5, 1, 9), Direction::Egress).unwrap();
        assert_eq!((k.local_port, k.remote_port, k.proto), (5, 1, 1));
        assert_eq!(
            flow_key(
                &Packet::icmp(ip(WEB1), ip(OUT), 11, 0, 0),
                Direction::Egress
            ),
            None
        );
        let k = flow_key(&syn(WEB1, OUT, 80), Direction::Ingress).unwrap();
        assert_eq!(
            (k.local, k.remote, k.local_port, k.remote_port),
            (ip(OUT), ip(WEB1), 80, 40000)
        );
    }

    /// Multiple matching rules: the first in the sorted rule list is reported.
    #[test]
    fn first_matching_rule_is_reported() {
        let json = FIXTURE.replace(
            r#"{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}], "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}"#,
            r#"{"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80, "IpRanges": [{"CidrIp": "203.0.113.0/24"}]},
               {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}], "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}"#,
        );
        let m = flat_of(&json);
        assert_eq!(
            explain_new_flow(&m, &syn(WEB1, OUT, 80)).stages[0]
                .by
                .to_string(),
            "sg-web/egress[0]"
        );
        assert_eq!(
            explain_new_flow(&m, &syn(WEB1, OUT, 81)).stages[0]
                .by
                .to_string(),
            "sg-web/egress[1]"
        );
    }

    /// `explain --json` names the Reachability Analyzer code of the stage
    /// that denied: the NACL's, a security group's, the source check's.
    #[test]
    fn explanation_codes_name_the_deciding_check() {
        let json = FIXTURE.replace(
            r#"{"RuleNumber": 100, "Protocol": "-1", "RuleAction": "allow", "Egress": true, "CidrBlock": "0.0.0.0/0"}"#,
            r#"{"RuleNumber": 90, "Protocol": "6", "RuleAction": "deny", "Egress": true, "CidrBlock": "10.0.2.0/24", "PortRange": {"From": 5432, "To": 5432}},
               {"RuleNumber": 100, "Protocol": "-1", "RuleAction": "allow", "Egress": true, "CidrBlock": "0.0.0.0/0"}"#,
        );
        let mut m = flat_of(&json);
        let code = |m: &FlatModel, p: &Packet| explanation_code(&explain_new_flow(m, p));
        assert_eq!(
            code(&m, &syn(WEB1, DB, 5432)),
            Some("SUBNET_ACL_RESTRICTION")
        );
        assert_eq!(code(&m, &syn(WEB1, DB, 22)), Some("ENI_SG_RULES_MISMATCH"));
        assert_eq!(code(&m, &syn(OUT, WEB1, 443)), None, "allowed");
        // web1's bound port sends web2's address.
        let port = m.instances.iter().position(|i| i.id == "i-web1").unwrap();
        m.instances[port].interface = Some("veth-web1".into());
        let w = Wire {
            packet: syn(WEB2, DB, 5432),
            from: Some(port),
            unattached: false,
            to: None,
            vlan: false,
            fragment: None,
        };
        let v = evaluate_wire(&m, &mut Conntrack::default(), &w, 0);
        assert_eq!(
            explanation_code(&v),
            Some("ENI_SOURCE_DEST_CHECK_RESTRICTION")
        );
    }

    /// `sgfw explain` output: first line ALLOW/DENY, then one line per stage with the rule that decided.
    #[test]
    fn explain_text_and_json() {
        let m = fixture();
        let p = syn(WEB1, DB, 22);
        let v = explain_new_flow(&m, &p);
        assert_eq!(
            explain_text(&m, &p, &v),
            "DENY\n\
             sg-egress   allow  sg-web/egress[0]\n\
             nacl-out    allow  acl-a rule 100\n\
             nacl-in     allow  implicit-default rule 100\n\
             sg-ingress  deny   no rule matched\n"
        );
        assert_eq!(
            explain_json(&m, &p, &v),
            serde_json::json!({"verdict": "deny", "passthrough": null, "blocked": null,
                "explanation_code": "ENI_SG_RULES_MISMATCH", "stages": [
                {"stage": "sg-egress", "verdict": "allow", "rule": "sg-web/egress[0]"},
                {"stage": "nacl-out", "verdict": "allow", "rule": "acl-a rule 100"},
                {"stage": "nacl-in", "verdict": "allow", "rule": "implicit-default rule 100"},
                {"stage": "sg-ingress", "verdict": "deny", "rule": "no rule matched"}]})
        );
        let dhcp = Packet::udp(ip(WEB1), ip("10.0.1.1"), 68, 67);
        let v = explain_new_flow(&m, &dhcp);
        assert_eq!(explain_text(&m, &dhcp, &v), "ALLOW\npassthrough dhcp\n");
        assert_eq!(explain_json(&m, &dhcp, &v)["passthrough"], "dhcp");
        assert_eq!(
            explain_json(&m, &dhcp, &v)["explanation_code"],
            serde_json::Value::Null
        );
        let outside = syn(OUT, "198.51.100.1", 80);
        let v = explain_new_flow(&m, &outside);
        assert_eq!(
            explain_text(&m, &outside, &v),
            "ALLOW\nno stage: neither address belongs to an instance of the model\n"
        );
    }

    #[test]
    fn ip_net_contains_is_family_strict() {
        let n: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(!n.contains(&ip("::1")));
    }
}

#[cfg(test)]
mod props {
    //! Properties that hold for all inputs (small random models, so that
    //! 10,000 cases per property run in seconds).
    use super::*;
    use crate::flat::{FirewallRule, NaclEntry};
    use crate::policy::Match;
    use crate::testutil::{
        V4_POOL, V6_POOL, arb_l4, arb_model, arb_nacl, arb_packet, arb_rule, config,
    };
    use ipnet::IpNet;
    use proptest::prelude::*;

    fn allow_all() -> Vec<NaclEntry> {
        vec![
            NaclEntry {
                rule_number: 100,
                action: RuleAction::Allow,
                cidr: "0.0.0.0/0".parse().unwrap(),
                matcher: Match::All,
            },
            NaclEntry {
                rule_number: 101,
                action: RuleAction::Allow,
                cidr: "::/0".parse().unwrap(),
                matcher: Match::All,
            },
        ]
    }

    fn is_error(p: &Packet) -> bool {
        matches!(&p.l4, L4::Icmp { icmp_type, .. } if is_icmp_error(p.is_v6(), *icmp_type))
    }

    proptest! {
        #![proptest_config(config())]

        /// "Rules only allow": adding an SG rule never turns an allow into a deny.
        #[test]
        fn adding_an_sg_rule_never_turns_allow_into_deny(
            m in arb_model(), p in arb_packet(), who in 0usize..3, egress in any::<bool>(),
            extra in arb_rule(Direction::Ingress), pos in 0usize..5,
        ) {
            let before = explain_new_flow(&m, &p);
            let mut m2 = m;
            let list = if egress { &mut m2.instances[who].egress } else { &mut m2.instances[who].ingress };
            let at = pos.min(list.len());
            let mut v = list.to_vec();
            v.insert(at, extra);
            *list = v.into();
            let after = explain_new_flow(&m2, &p);
            prop_assert!(!before.allowed || after.allowed, "before {before:?}\nafter {after:?}");
        }

        /// "the first rule that matches decides": a lower-numbered matching deny beats a higher-numbered allow.
        #[test]
        fn lower_numbered_nacl_deny_beats_higher_allow(
            mut m in arb_model(), p in arb_packet(), which in 0usize..4, lo in 1u16..40, gap in 1u16..40,
        ) {
            let subnet = &mut m.subnets[which / 2];
            let (stage, list, remote) = if which % 2 == 0 {
                (Stage::NaclIn, &mut subnet.inbound, p.src)
            } else {
                (Stage::NaclOut, &mut subnet.outbound, p.dst)
            };
            let hi = lo + gap;
            list.retain(|e| e.rule_number != lo && e.rule_number != hi);
            list.push(NaclEntry { rule_number: lo, action: RuleAction::Deny, cidr: IpNet::from(remote), matcher: Match::All });
            list.push(NaclEntry { rule_number: hi, action: RuleAction::Allow, cidr: IpNet::from(remote), matcher: Match::All });
            list.sort_by_key(|e| e.rule_number);
            let r = nacl_stage(Some(&m.subnets[which / 2]), stage, &p);
            let decided = match r.by { Decider::NaclRule(n) => n, _ => u16::MAX };
            prop_assert!(decided <= lo, "{r:?}");
            if decided == lo {
                prop_assert!(!r.allowed);
            }
            // And in a whole evaluation, that subnet's stage is never decided by the shadowed allow.
            let end = if stage == Stage::NaclIn { p.dst } else { p.src };
            let applies = m.instance_by_addr(end).is_some_and(|i| i.subnet_index == which / 2);
            let v = explain_new_flow(&m, &p);
            prop_assert!(!applies || !v.stages.iter().any(|s| s.stage == stage && s.by == Decider::NaclRule(hi)), "{v:?}");
        }

        /// "Two instances of the same subnet never see NACLs between them", whatever the NACL
        /// and across a whole sequence of packets (conntrack included).
        #[test]
        fn traffic_inside_one_subnet_never_depends_on_its_nacl(
            m in arb_model(), other in arb_nacl(), other_out in arb_nacl(),
            pkts in prop::collection::vec((any::<bool>(), any::<bool>(), arb_l4(), any::<bool>()), 1..6),
        ) {
            let mut m2 = m.clone();
            m2.subnets[0].inbound = other;
            m2.subnets[0].outbound = other_out;
            let (mut ct1, mut ct2) = (Conntrack::new(), Conntrack::new());
            for (k, (v6, forward, l4, reply)) in pkts.into_iter().enumerate() {
                let (a, b) = if v6 { (V6_POOL[0], V6_POOL[1]) } else { (V4_POOL[0], V4_POOL[1]) };
                let (src, dst) = if forward { (a, b) } else { (b, a) };
                let mut p = Packet { src, dst, l4 };
                if reply { p = p.reply(); }
                let now = k as u64 * 1_000_000_000;
                let v1 = evaluate(&m, &mut ct1, &p, now);
                let v2 = evaluate(&m2, &mut ct2, &p, now);
                prop_assert_eq!(&v1, &v2);
                prop_assert!(v1.stages.iter().all(|s| matches!(s.stage, Stage::SgEgress | Stage::SgIngress)));
            }
            prop_assert_eq!(ct1, ct2);
        }

        /// "A packet of a flow that this instance's SG already allowed ... is allowed in both
        /// directions, whatever the rules say now" (NACLs allowing all).
        #[test]
        fn reply_of_allowed_tracked_flow_is_allowed_whatever_the_rules(
            mut m in arb_model(), mut p in arb_packet(), new_rules in arb_model(),
        ) {
            if is_error(&p) {
                // Errors are never tracked: nothing to reply to.
                return Ok(());
            }
            // A query reply has no reply of its own (its "reply" is another
            // reply, which continues no flow): start from its request.
            let v6 = p.is_v6();
            if let L4::Icmp { icmp_type, .. } = &mut p.l4
                && let Some(r) = query_request_type(v6, *icmp_type)
            {
                *icmp_type = r;
            }
            for s in &mut m.subnets {
                s.inbound = allow_all();
                s.outbound = allow_all();
            }
            // Whatever rules there were, one of them lets the first packet out and in.
            for inst in &mut m.instances {
                for (dir, list) in [(Direction::Ingress, &mut inst.ingress), (Direction::Egress, &mut inst.egress)] {
                    let mut v = list.to_vec();
                    for net in ["0.0.0.0/0", "::/0"] {
                        v.push(FirewallRule {
                            remote: net.parse().unwrap(),
                            matcher: Match::All,
                            origin: RuleOrigin { group_id: "sg-open".into(), direction: dir, permission: 0 },
                        });
                    }
                    *list = v.into();
                }
            }
            let mut ct = Conntrack::new();
            let first = evaluate(&m, &mut ct, &p, 0);
            prop_assert!(first.allowed);
            for (inst, new) in m.instances.iter_mut().zip(new_rules.instances) {
                inst.ingress = new.ingress;
                inst.egress = new.egress;
            }
            let v = evaluate(&m, &mut ct, &p.reply(), 1_000_000_000);
            prop_assert!(v.allowed, "first {first:?}\nreply {v:?}");
        }

        /// Evaluation is a function of its inputs.
        #[test]
        fn evaluate_is_deterministic(m in arb_model(), pkts in prop::collection::vec(arb_packet(), 1..5)) {
            let (mut c1, mut c2) = (Conntrack::new(), Conntrack::new());
            for (k, p) in pkts.iter().enumerate() {
                let now = k as u64;
                prop_assert_eq!(evaluate(&m, &mut c1, p, now), evaluate(&m, &mut c2, p, now));
            }
            prop_assert_eq!(c1, c2);
        }
    }
}
