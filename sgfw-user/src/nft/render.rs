//! [`FlatModel`] → nftables ruleset text, deterministically.
//!
//! This module owns the text of `table inet sgfw` and `table bridge sgfw`.
//! Every value written into them comes from a typed value: addresses and
//! prefixes ([`IpAddr`], [`IpNet`]), protocol numbers and ICMP types/codes
//! (`u8`), ports (`u16`), timeouts (`u32`) and names derived from indices
//! (`sg_in_3`) — or is an interface name checked by [`ifname_ok`]. Instance,
//! subnet and group ids appear only in `#` comments and counter comments, and
//! only after [`sanitize`] has reduced them to `[A-Za-z0-9._-]`: a hostile id
//! can never close a string, a block or a line. It must never widen a rule:
//! a matcher that cannot be expressed is a [`RenderError`], never "match all".
//!
//! The layout (see the module docs of [`crate::nft`] for why):
//! - `table bridge sgfw`, at every port of the model's bridges: VLAN-tagged
//!   and other non-IP, non-ARP frames drop; a bound port's source check
//!   (frames it sends) and destination check (frames it is handed).
//! - `table inet sgfw`, chain `decide`:
//!   1. passthrough, either leg (`accept`): NDP, the service addresses
//!      ([`SERVICES`], from `sgfw_common::passthrough`), the subnet's DNS;
//!   2. ICMPv6 redirects on the model's bridges: drop;
//!   3. DHCP in its client shape with a peer that is no instance: `goto` the
//!      one leg that still judges it (`leg_in` for 68→67, `leg_out` for
//!      67→68);
//!   4. both legs: broadcast and multicast destinations on the model's
//!      bridges drop; NACLs, every packet: `ip saddr vmap @nacl_out_v4` →
//!      `nacl_out_<subnet>`, `ip daddr vmap @nacl_in_v4` → `nacl_in_<subnet>`
//!      (and `ip6`); `ct state established,related` / `ct status confirmed`:
//!      accept; SGs: `ip saddr vmap @sg_out_v4` → `sg_out_<instance>`, `ip
//!      daddr vmap @sg_in_v4` → `sg_in_<instance>`, each chain `return`s on
//!      its first match and ends in `drop`; a new flow that passed
//!      everything: conntrack timeouts.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use sgfw_common::passthrough as pt;

use crate::flat::{FirewallRule, FlatModel, Owner, Ownership, OwnershipError};
use crate::policy::{
    Direction, Family, Match, NaclEntry, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
    RuleAction, Stage,
};

// ---------- the traffic classes ----------
//
// docs/semantics.md, "Passthrough" and "Not carried". The passthrough
// classes are defined once for every backend in `sgfw_common::passthrough`;
// every rule below that names one reads it from here.

const fn v4_of(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::new(a[0], a[1], a[2], a[3])
}

const fn v6_of(a: [u8; 16]) -> Ipv6Addr {
    Ipv6Addr::new(
        u16::from_be_bytes([a[0], a[1]]),
        u16::from_be_bytes([a[2], a[3]]),
        u16::from_be_bytes([a[4], a[5]]),
        u16::from_be_bytes([a[6], a[7]]),
        u16::from_be_bytes([a[8], a[9]]),
        u16::from_be_bytes([a[10], a[11]]),
        u16::from_be_bytes([a[12], a[13]]),
        u16::from_be_bytes([a[14], a[15]]),
    )
}

const fn service(i: usize) -> (&'static str, Ipv4Addr, Ipv6Addr) {
    (
        pt::SERVICE_NAMES[i],
        v4_of(pt::SERVICES_V4[i]),
        v6_of(pt::SERVICES_V6[i]),
    )
}

/// The VPC's service addresses, passthrough both ways: (name, IPv4, IPv6) —
/// metadata, Time Sync, Amazon DNS.
pub const SERVICES: [(&str, Ipv4Addr, Ipv6Addr); 3] = [service(0), service(1), service(2)];
/// DHCP (IPv4): an instance's client sends from this port ...
const DHCP_CLIENT_PORT: u16 = pt::DHCP_CLIENT_PORT;
/// ... to the server's.
const DHCP_SERVER_PORT: u16 = pt::DHCP_SERVER_PORT;
/// ICMPv6 router solicitation/advertisement, neighbour solicitation/advertisement.
const NDP_TYPES: (u8, u8) = (*pt::NDP_TYPES.start(), *pt::NDP_TYPES.end());
/// ICMPv6 redirect: never delivered.
const ICMPV6_REDIRECT: u8 = pt::ICMPV6_REDIRECT;
/// IPv4 multicast, not carried.
const GROUP_V4: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(224, 0, 0, 0), 4);
/// The limited broadcast address, not carried (beside each subnet's broadcast).
const BROADCAST_V4: Ipv4Addr = Ipv4Addr::BROADCAST;
/// IPv6 multicast, not carried.
const GROUP_V6: Ipv6Net = Ipv6Net::new_assert(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8);
/// IPv6 link-local addresses: a bound port's instance sends and receives them.
const LINK_LOCAL_V6: Ipv6Net = Ipv6Net::new_assert(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10);

/// The one table sgfw owns. Nothing else is ever touched.
pub const TABLE: &str = "inet sgfw";

/// sgfw's bridge table: the checks at the ports of the model's bridges.
pub const BRIDGE_TABLE: &str = "bridge sgfw";

/// The NFLOG group every drop is logged to (prefix `sgfw drop <stage> <who> `).
pub const NFLOG_GROUP: u16 = 3210;

/// Base-chain priority: before the usual `filter` chains (priority 0) of
/// other tables, so sgfw's drops happen first.
pub const HOOK_PRIORITY: &str = "filter - 10";

/// Why a model cannot be rendered. Validation rejects all of these first; the
/// renderer still refuses them rather than widen anything.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The model is inconsistent ([`FlatModel::ownership`]).
    #[error(transparent)]
    Ownership(#[from] OwnershipError),
    /// A matcher this renderer cannot express exactly.
    #[error("cannot express matcher {matcher} exactly in nftables")]
    Matcher {
        /// The matcher.
        matcher: Match,
    },
    /// An interface name the source check cannot name safely (only
    /// letters, digits and `._-@+` are written into the ruleset).
    #[error("Instances[{instance}].Interface: {name:?} cannot be written into an nft ruleset")]
    Interface {
        /// Instance id.
        instance: String,
        /// The name.
        name: String,
    },
    /// A bridge name that cannot be written into the ruleset (see
    /// [`RenderError::Interface`]).
    #[error("Subnets[{subnet}].Bridge: {name:?} cannot be written into an nft ruleset")]
    Bridge {
        /// Subnet id.
        subnet: String,
        /// The name.
        name: String,
    },
    /// A port found on one of the model's bridges whose name cannot be
    /// written into the ruleset: refused, since the port could not be checked.
    #[error("port {name:?} of a managed bridge cannot be written into an nft ruleset")]
    Port {
        /// The name.
        name: String,
    },
}

/// Whether an interface name may be written into the ruleset, quoted: 1-15
/// letters, digits and `._-@+`. Never a quote, and never `*` (a wildcard
/// in nft, which would match other interfaces).
pub fn ifname_ok(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-@+".contains(c))
}

/// How nft spells the pieces of an address family ([`Family`] is the one type).
trait NftFamily: Copy {
    /// `ip` / `ip6` (the payload expression's protocol).
    fn l3(self) -> &'static str;
    /// `ipv4` / `ipv6` (`meta nfproto`).
    fn nfproto(self) -> &'static str;
    /// `ipv4_addr` / `ipv6_addr` (set types).
    fn addr_type(self) -> &'static str;
    /// `v4` / `v6` (name suffixes).
    fn suffix(self) -> &'static str;
    /// `ip` / `ip6` (`l3proto` of a ct timeout object).
    fn l3proto(self) -> &'static str {
        self.l3()
    }
}

impl NftFamily for Family {
    fn l3(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
    fn nfproto(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }
    fn addr_type(self) -> &'static str {
        match self {
            Family::V4 => "ipv4_addr",
            Family::V6 => "ipv6_addr",
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Family::V4 => "v4",
            Family::V6 => "v6",
        }
    }
}

/// Which address of the packet is the remote one.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Side {
    Saddr,
    Daddr,
}

impl Side {
    fn word(self) -> &'static str {
        match self {
            Side::Saddr => "saddr",
            Side::Daddr => "daddr",
        }
    }
}

/// Reduces a user string to `[A-Za-z0-9._-]` (anything else becomes `_`),
/// at most 64 characters, so it is inert in a `#` comment or a quoted
/// comment. Ids are validated to that alphabet already; this does not rely on it.
pub fn sanitize(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() {
        out.push('_');
    }
    out
}

/// The chains' order in the ruleset: NACLs, then security groups.
pub(crate) const CHAIN_ORDER: [Stage; 4] = [
    Stage::NaclOut,
    Stage::NaclIn,
    Stage::SgEgress,
    Stage::SgIngress,
];

/// How a stage ([`Stage`], the one type) names its chains and picks them.
pub(crate) trait NftStage: Copy {
    /// Chain/map/counter name prefix.
    fn prefix(self) -> &'static str;
    /// Which packet address picks the chain from the verdict map: the
    /// sender's for outbound/egress, the receiver's for inbound/ingress.
    fn key_side(self) -> Side;
    /// Which packet address is the remote one inside the chain.
    fn remote_side(self) -> Side {
        match self.key_side() {
            Side::Saddr => Side::Daddr,
            Side::Daddr => Side::Saddr,
        }
    }
    /// `s` (subnet) or `i` (instance) in log prefixes.
    fn who(self) -> &'static str;
}

impl NftStage for Stage {
    fn prefix(self) -> &'static str {
        match self {
            Stage::NaclOut => "nacl_out",
            Stage::NaclIn => "nacl_in",
            Stage::SgEgress => "sg_out",
            Stage::SgIngress => "sg_in",
        }
    }
    fn key_side(self) -> Side {
        match self.direction() {
            Direction::Egress => Side::Saddr,
            Direction::Ingress => Side::Daddr,
        }
    }
    fn who(self) -> &'static str {
        if self.is_nacl() { "s" } else { "i" }
    }
}

/// Text with tab indentation, one statement per line.
#[derive(Default)]
struct Out {
    text: String,
}

impl Out {
    fn line(&mut self, depth: usize, s: impl Display) {
        for _ in 0..depth {
            self.text.push('\t');
        }
        self.text.push_str(&s.to_string());
        self.text.push('\n');
    }
    fn blank(&mut self) {
        self.text.push('\n');
    }
}

/// An address for nft: plain for a host, `a/len` for a prefix.
fn net_text(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

/// `{ a, b }`, or the single element without braces.
fn set_text(items: &[String]) -> String {
    match items {
        [one] => one.clone(),
        many => format!("{{ {} }}", many.join(", ")),
    }
}

/// Minimal covering list of CIDRs (overlaps and neighbours merged), sorted.
fn aggregate(family: Family, nets: &[IpNet]) -> Vec<IpNet> {
    match family {
        Family::V4 => {
            let v: Vec<Ipv4Net> = nets
                .iter()
                .filter_map(|n| match n {
                    IpNet::V4(n) => Some(*n),
                    IpNet::V6(_) => None,
                })
                .collect();
            Ipv4Net::aggregate(&v).into_iter().map(IpNet::V4).collect()
        }
        Family::V6 => {
            let v: Vec<Ipv6Net> = nets
                .iter()
                .filter_map(|n| match n {
                    IpNet::V6(n) => Some(*n),
                    IpNet::V4(_) => None,
                })
                .collect();
            Ipv6Net::aggregate(&v).into_iter().map(IpNet::V6).collect()
        }
    }
}

/// The address part of a rule: `ip daddr { ... }`, or only the family when
/// the set covers the whole family (`meta nfproto ipv4`).
fn addr_match(family: Family, side: Side, nets: &[IpNet]) -> String {
    if nets.iter().any(|n| n.prefix_len() == 0) {
        return format!("meta nfproto {}", family.nfproto());
    }
    let items: Vec<String> = nets.iter().map(net_text).collect();
    format!("{} {} {}", family.l3(), side.word(), set_text(&items))
}

/// Merges inclusive port ranges (overlapping or adjacent), sorted.
fn merge_ports(mut ranges: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    ranges.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::new();
    for (from, to) in ranges {
        match out.last_mut() {
            Some(last) if u32::from(from) <= u32::from(last.1) + 1 => last.1 = last.1.max(to),
            _ => out.push((from, to)),
        }
    }
    out
}

fn port_text((from, to): (u16, u16)) -> String {
    if from == to {
        from.to_string()
    } else {
        format!("{from}-{to}")
    }
}

fn l4_name(proto: u8) -> Option<&'static str> {
    match proto {
        PROTO_TCP => Some("tcp"),
        PROTO_UDP => Some("udp"),
        _ => None,
    }
}

/// The protocol part of a rule for a packet of `family`. `Ok(None)`: the
/// matcher can never match a packet of this family (an ICMP matcher of the
/// other family), so the rule is left out — leaving out a rule that cannot
/// match changes nothing. `Ok(Some(""))`: every protocol.
fn proto_match(family: Family, m: &Match) -> Result<Option<String>, RenderError> {
    Ok(Some(match *m {
        Match::All => String::new(),
        Match::Proto(p) => format!("meta l4proto {p}"),
        Match::Ports { proto, from, to } => {
            let name = l4_name(proto).ok_or(RenderError::Matcher { matcher: *m })?;
            format!("{name} dport {}", port_text((from, to)))
        }
        Match::Icmp {
            proto,
            icmp_type,
            code,
        } => {
            let word = match (proto, family) {
                (PROTO_ICMP, Family::V4) => "icmp",
                (PROTO_ICMPV6, Family::V6) => "icmpv6",
                (PROTO_ICMP | PROTO_ICMPV6, _) => return Ok(None),
                _ => return Err(RenderError::Matcher { matcher: *m }),
            };
            let mut s = format!("meta l4proto {proto}");
            if let Some(t) = icmp_type {
                s.push_str(&format!(" {word} type {t}"));
            }
            if let Some(c) = code {
                s.push_str(&format!(" {word} code {c}"));
            }
            s
        }
    }))
}

fn join_nonempty(parts: &[&str]) -> String {
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

fn counter_name(kind: Stage, index: usize, allowed: bool) -> String {
    format!(
        "{}_{index}_{}",
        kind.prefix(),
        if allowed { "allow" } else { "drop" }
    )
}

fn log_drop(kind: Stage, index: usize, rule: Option<u16>) -> String {
    let rule = rule.map_or_else(|| "*".to_string(), |n| format!("r{n}"));
    format!(
        "log prefix \"sgfw drop {} {}{index} {rule} \" group {NFLOG_GROUP}",
        kind.name(),
        kind.who()
    )
}

/// Per-subnet and per-instance indices, from the one checked
/// [`Ownership`] index.
struct Index<'a> {
    model: &'a FlatModel,
    /// (family) → subnet → its instances' addresses.
    subnet_addrs: BTreeMap<(Family, usize), BTreeSet<IpAddr>>,
    /// Every instance address → its owner.
    owner: Ownership,
}

impl<'a> Index<'a> {
    fn new(model: &'a FlatModel) -> Result<Index<'a>, RenderError> {
        let owner = model.ownership()?;
        let mut subnet_addrs: BTreeMap<(Family, usize), BTreeSet<IpAddr>> = BTreeMap::new();
        for (addr, o) in owner.iter() {
            subnet_addrs
                .entry((Family::of_addr(addr), o.subnet))
                .or_default()
                .insert(*addr);
        }
        Ok(Index {
            model,
            subnet_addrs,
            owner,
        })
    }

    fn addrs_of(&self, family: Family) -> impl Iterator<Item = (&IpAddr, &Owner)> {
        self.owner
            .iter()
            .filter(move |(a, _)| Family::of_addr(a) == family)
    }

    /// (instance address, DNS address of its subnet) pairs of one family.
    fn dns_pairs(&self, family: Family) -> BTreeSet<(IpAddr, IpAddr)> {
        let mut pairs = BTreeSet::new();
        for (addr, o) in self.addrs_of(family) {
            let Some(s) = self.model.subnets.get(o.subnet) else {
                continue;
            };
            for dns in s.dns.iter().filter(|d| Family::of_addr(d) == family) {
                pairs.insert((*addr, *dns));
                pairs.insert((*dns, *addr));
            }
        }
        pairs
    }
}

/// Writes a named set or map declaration with its elements, one per line.
fn declare(out: &mut Out, kind: &str, name: &str, ty: &str, elements: &[String]) {
    out.line(1, format!("{kind} {name} {{"));
    out.line(2, format!("type {ty}"));
    if !elements.is_empty() {
        out.line(2, "elements = {");
        let last = elements.len() - 1;
        for (i, e) in elements.iter().enumerate() {
            out.line(3, format!("{e}{}", if i == last { "" } else { "," }));
        }
        out.line(2, "}");
    }
    out.line(1, "}");
}

/// Renders the model as the text of `table inet sgfw` and `table bridge
/// sgfw`, with the port-level checks at the model's bound interfaces only
/// (see [`render_with_ports`]). Deterministic: the same model always gives
/// byte-identical text.
///
/// # Errors
///
/// As [`render_with_ports`].
pub fn render(model: &FlatModel) -> Result<String, RenderError> {
    render_with_ports(model, &[])
}

/// Renders the model; `ports` are the ports found on the model's bridges
/// (the host ends of the instances' veths), which get the port-level checks
/// of `table bridge sgfw` beside the model's bound interfaces.
/// Deterministic: the same model and ports always give byte-identical text.
///
/// # Errors
///
/// [`RenderError`] when the model is inconsistent (an instance in a subnet
/// that does not exist, an address owned twice), a matcher cannot be
/// expressed exactly, or an interface, bridge or port name cannot be
/// written safely; validated, flattened models never are (but ports found on
/// the host can be).
pub fn render_with_ports(model: &FlatModel, ports: &[String]) -> Result<String, RenderError> {
    let ix = Index::new(model)?;
    for s in &model.subnets {
        if !ifname_ok(&s.bridge) {
            return Err(RenderError::Bridge {
                subnet: s.id.clone(),
                name: s.bridge.clone(),
            });
        }
    }
    let mut out = Out::default();
    out.line(
        0,
        "# sgfw: AWS VPC security groups and network ACLs (generated; do not edit).",
    );
    out.line(0, "# Decision order: frame and port checks (table bridge sgfw), passthrough, not carried, NACLs (every packet), tracked flows, SG egress, SG ingress.");
    for (i, s) in model.subnets.iter().enumerate() {
        out.line(
            0,
            format!(
                "# subnet {i}: {} (nacl {})",
                sanitize(&s.id),
                sanitize(&s.nacl_id)
            ),
        );
    }
    for (i, inst) in model.instances.iter().enumerate() {
        out.line(
            0,
            format!(
                "# instance {i}: {} (subnet {})",
                sanitize(&inst.id),
                inst.subnet_index
            ),
        );
    }
    out.line(0, format!("table {TABLE} {{"));

    render_timeouts(&mut out, model);
    out.blank();
    render_counters(&mut out, model);
    out.blank();
    render_sets(&mut out, &ix);
    out.blank();
    render_entry(&mut out);
    for (i, s) in model.subnets.iter().enumerate() {
        out.blank();
        render_nacl_chain(&mut out, &ix, Stage::NaclOut, i, &s.outbound)?;
        out.blank();
        render_nacl_chain(&mut out, &ix, Stage::NaclIn, i, &s.inbound)?;
    }
    for (i, inst) in model.instances.iter().enumerate() {
        out.blank();
        render_sg_chain(&mut out, Stage::SgEgress, i, &inst.egress)?;
        out.blank();
        render_sg_chain(&mut out, Stage::SgIngress, i, &inst.ingress)?;
    }
    out.line(0, "}");
    render_bridge_table(&mut out, model, ports)?;
    Ok(out.text)
}

/// The verdict-map jumps to the chains of one stage, both families.
fn dispatch(out: &mut Out, kind: Stage) {
    for f in Family::ALL {
        out.line(
            2,
            format!(
                "{} {} vmap @{}_{}",
                f.l3(),
                kind.key_side().word(),
                kind.prefix(),
                f.suffix()
            ),
        );
    }
}

/// A drop statement with its named counter and NFLOG line:
/// `counter name "drop_<reason>" log prefix "sgfw drop <reason> <who> * " ... drop`.
fn drop_as(reason: &str, who: &str) -> String {
    format!(
        "counter name \"drop_{}\" log prefix \"sgfw drop {reason} {who} * \" group {NFLOG_GROUP} drop",
        reason.replace('-', "_")
    )
}

/// The reasons `table bridge sgfw` drops for, in counter order.
const BRIDGE_DROPS: [&str; 4] = ["vlan", "non-ip", "source-check", "not-for-instance"];

/// The reasons `table inet sgfw` drops for besides the NACL and SG stages.
const INET_DROPS: [&str; 1] = ["not-carried"];

/// `table bridge sgfw`: the checks that need the port a frame comes from or
/// goes to, which the inet hooks (via br_netfilter) do not see, and the
/// frames br_netfilter never hands to them (VLAN-tagged, non-IP). Hooks:
/// `prerouting` (what a port sends), `forward` and `output` (what a port is
/// handed, from another port or from the host), all at priority
/// `filter - 10`, before br_netfilter (0) and so before the inet chains.
/// At every port of the model's bridges: a VLAN-tagged frame (802.1Q,
/// 802.1ad, also a priority tag with VID 0: nft rebuilds a tag the kernel
/// moved into the skb's metadata, so `ether type` sees it) drops, ARP passes,
/// any other non-IP frame drops. At a bound port, in the order of
/// docs/semantics.md — before any passthrough class: the source check of
/// what it sends (the instance's addresses, fe80::/10, and 0.0.0.0 / :: only
/// in a DHCP-client or NDP packet) and the destination check of what it is
/// handed (the instance's addresses, fe80::/10, or a group or broadcast
/// address, which `table inet sgfw` then judges as not carried).
fn render_bridge_table(
    out: &mut Out,
    model: &FlatModel,
    ports: &[String],
) -> Result<(), RenderError> {
    let mut bound = Vec::new();
    for (i, inst) in model.instances.iter().enumerate() {
        if let Some(name) = &inst.interface {
            if !ifname_ok(name) {
                return Err(RenderError::Interface {
                    instance: inst.id.clone(),
                    name: name.clone(),
                });
            }
            bound.push((i, name.as_str(), inst));
        }
    }
    let mut all_ports: BTreeSet<&str> = bound.iter().map(|(_, n, _)| *n).collect();
    for p in ports {
        if !ifname_ok(p) {
            return Err(RenderError::Port { name: p.clone() });
        }
        all_ports.insert(p);
    }
    out.line(0, format!("table {BRIDGE_TABLE} {{"));
    for reason in BRIDGE_DROPS {
        out.line(
            1,
            format!(
                "counter drop_{} {{ comment \"{reason}\"; }}",
                reason.replace('-', "_")
            ),
        );
    }
    out.blank();
    let quoted: Vec<String> = all_ports.iter().map(|n| format!("\"{n}\"")).collect();
    declare(out, "set", "ports", "ifname", &quoted);
    for (map, chain) in [
        ("bound_from", "source_check"),
        ("bound_to", "receive_check"),
    ] {
        let elems: Vec<String> = bound
            .iter()
            .map(|(i, name, _)| format!("\"{name}\" : jump {chain}_{i}"))
            .collect();
        declare(out, "map", map, "ifname : verdict", &elems);
    }
    for (hook, side, chain) in [
        ("prerouting", "iifname", "from_port"),
        ("forward", "oifname", "to_port"),
        ("output", "oifname", "to_port"),
    ] {
        out.blank();
        out.line(1, format!("chain {hook} {{"));
        out.line(
            2,
            format!("type filter hook {hook} priority {HOOK_PRIORITY}; policy accept;"),
        );
        out.line(2, format!("{side} @ports jump {chain}"));
        out.line(1, "}");
    }
    for (chain, side, map, what) in [
        ("from_port", "iifname", "bound_from", "What a port sends"),
        ("to_port", "oifname", "bound_to", "What a port is handed"),
    ] {
        out.blank();
        out.line(1, format!("chain {chain} {{"));
        out.line(
            2,
            format!("# {what}: VLAN-tagged frames drop, ARP and IP pass, other frames drop."),
        );
        out.line(
            2,
            format!("ether type {{ 8021q, 8021ad }} {}", drop_as("vlan", "-")),
        );
        out.line(
            2,
            format!(
                "ether type != {{ ip, ip6, arp }} {}",
                drop_as("non-ip", "-")
            ),
        );
        out.line(2, format!("{side} vmap @{map}"));
        out.line(1, "}");
    }
    let broadcasts: Vec<IpNet> = model
        .subnets
        .iter()
        .map(|s| IpNet::V4(Ipv4Net::from(s.cidr_v4.broadcast())))
        .collect();
    for (i, name, inst) in &bound {
        let own = |f: Family| -> Vec<String> {
            inst.addrs
                .iter()
                .filter(|a| Family::of_addr(a) == f)
                .map(ToString::to_string)
                .collect()
        };
        out.blank();
        out.line(1, format!("chain source_check_{i} {{"));
        out.line(
            2,
            format!("# What {name} sends: only from the instance's addresses (before any passthrough class)."),
        );
        out.line(2, "ether type arp return");
        let v4 = own(Family::V4);
        if !v4.is_empty() {
            out.line(2, format!("ip saddr {} return", set_text(&v4)));
        }
        let mut v6 = own(Family::V6);
        v6.push(LINK_LOCAL_V6.to_string());
        out.line(2, format!("ip6 saddr {} return", set_text(&v6)));
        out.line(
            2,
            format!(
                "ip saddr {} udp sport {DHCP_CLIENT_PORT} udp dport {DHCP_SERVER_PORT} return",
                Ipv4Addr::UNSPECIFIED
            ),
        );
        out.line(
            2,
            format!(
                "ip6 saddr {} icmpv6 type {}-{} return",
                Ipv6Addr::UNSPECIFIED,
                NDP_TYPES.0,
                NDP_TYPES.1
            ),
        );
        out.line(2, drop_as("source-check", &format!("i{i}")));
        out.line(1, "}");
        out.blank();
        out.line(1, format!("chain receive_check_{i} {{"));
        out.line(
            2,
            format!("# What {name} is handed: only to the instance's addresses, or to a group or broadcast address."),
        );
        out.line(2, "ether type arp return");
        let mut v4: Vec<IpNet> = inst
            .addrs
            .iter()
            .filter(|a| a.is_ipv4())
            .map(|a| IpNet::from(*a))
            .collect();
        v4.extend([IpNet::V4(GROUP_V4), IpNet::from(IpAddr::V4(BROADCAST_V4))]);
        v4.extend(broadcasts.iter().copied());
        let v4: Vec<String> = aggregate(Family::V4, &v4).iter().map(net_text).collect();
        out.line(2, format!("ip daddr {} return", set_text(&v4)));
        let mut v6: Vec<IpNet> = inst
            .addrs
            .iter()
            .filter(|a| a.is_ipv6())
            .map(|a| IpNet::from(*a))
            .collect();
        v6.extend([IpNet::V6(LINK_LOCAL_V6), IpNet::V6(GROUP_V6)]);
        let v6: Vec<String> = aggregate(Family::V6, &v6).iter().map(net_text).collect();
        out.line(2, format!("ip6 daddr {} return", set_text(&v6)));
        out.line(2, drop_as("not-for-instance", &format!("i{i}")));
        out.line(1, "}");
    }
    out.line(0, "}");
    Ok(())
}

fn render_timeouts(out: &mut Out, model: &FlatModel) {
    let t = model.timeouts;
    out.line(
        1,
        "# Conntrack timeouts of SEMANTICS.md, set on each new flow sgfw allowed (chain ct_new).",
    );
    out.line(
        1,
        "# ICMP and other protocols: kernel timeouts (nft cannot set them per flow here).",
    );
    for f in Family::ALL {
        out.line(
            1,
            format!(
                "ct timeout tcp_{} {{ protocol tcp; l3proto {}; policy = {{ established: {}, syn_sent: {n}, syn_recv: {n}, fin_wait: {c}, close_wait: {c}, last_ack: {c}, time_wait: {c}, close: {c} }}; }}",
                f.suffix(),
                f.l3proto(),
                t.tcp_established,
                n = t.tcp_new,
                c = t.tcp_closing,
            ),
        );
        out.line(
            1,
            format!(
                "ct timeout udp_{} {{ protocol udp; l3proto {}; policy = {{ unreplied: {}, replied: {} }}; }}",
                f.suffix(),
                f.l3proto(),
                t.udp,
                t.udp_stream
            ),
        );
    }
}

fn render_counters(out: &mut Out, model: &FlatModel) {
    out.line(1, "counter passthrough { comment \"passthrough\"; }");
    out.line(1, "counter tracked { comment \"tracked\"; }");
    for reason in INET_DROPS {
        out.line(
            1,
            format!(
                "counter drop_{} {{ comment \"{reason}\"; }}",
                reason.replace('-', "_")
            ),
        );
    }
    for kind in CHAIN_ORDER {
        let ids: Vec<&str> = match kind {
            Stage::NaclOut | Stage::NaclIn => model.subnets.iter().map(|s| s.id.as_str()).collect(),
            Stage::SgEgress | Stage::SgIngress => {
                model.instances.iter().map(|i| i.id.as_str()).collect()
            }
        };
        for (i, id) in ids.iter().enumerate() {
            for allowed in [true, false] {
                out.line(
                    1,
                    format!(
                        "counter {} {{ comment \"{}\"; }}",
                        counter_name(kind, i, allowed),
                        sanitize(id)
                    ),
                );
            }
        }
    }
}

fn render_sets(out: &mut Out, ix: &Index<'_>) {
    let bridges: BTreeSet<&str> = ix.model.subnets.iter().map(|s| s.bridge.as_str()).collect();
    let quoted: Vec<String> = bridges.iter().map(|b| format!("\"{b}\"")).collect();
    declare(out, "set", "bridges", "ifname", &quoted);
    // Destinations a VPC does not carry: IPv4 multicast, the limited
    // broadcast and every subnet's broadcast address; IPv6 multicast.
    let mut v4 = vec![IpNet::V4(GROUP_V4), IpNet::from(IpAddr::V4(BROADCAST_V4))];
    v4.extend(
        ix.model
            .subnets
            .iter()
            .map(|s| IpNet::V4(Ipv4Net::from(s.cidr_v4.broadcast()))),
    );
    for (f, nets) in [(Family::V4, v4), (Family::V6, vec![IpNet::V6(GROUP_V6)])] {
        let elems: Vec<String> = aggregate(f, &nets).iter().map(net_text).collect();
        out.line(1, format!("set not_carried_{} {{", f.suffix()));
        out.line(2, format!("type {}", f.addr_type()));
        out.line(2, "flags interval");
        out.line(2, "elements = {");
        let last = elems.len().saturating_sub(1);
        for (i, e) in elems.iter().enumerate() {
            out.line(3, format!("{e}{}", if i == last { "" } else { "," }));
        }
        out.line(2, "}");
        out.line(1, "}");
    }
    for f in Family::ALL {
        let all: Vec<String> = ix.addrs_of(f).map(|(a, _)| a.to_string()).collect();
        declare(
            out,
            "set",
            &format!("instances_{}", f.suffix()),
            f.addr_type(),
            &all,
        );
    }
    for (s, _) in ix.model.subnets.iter().enumerate() {
        for f in Family::ALL {
            let addrs: Vec<String> = ix
                .subnet_addrs
                .get(&(f, s))
                .into_iter()
                .flatten()
                .map(ToString::to_string)
                .collect();
            declare(
                out,
                "set",
                &format!("subnet_{s}_{}", f.suffix()),
                f.addr_type(),
                &addrs,
            );
        }
    }
    for f in Family::ALL {
        let pairs: Vec<String> = ix
            .dns_pairs(f)
            .iter()
            .map(|(a, b)| format!("{a} . {b}"))
            .collect();
        let ty = format!("{t} . {t}", t = f.addr_type());
        declare(
            out,
            "set",
            &format!("dns_pairs_{}", f.suffix()),
            &ty,
            &pairs,
        );
    }
    for kind in CHAIN_ORDER {
        for f in Family::ALL {
            let elems: Vec<String> = ix
                .addrs_of(f)
                .map(|(a, o)| {
                    let target = if kind.is_nacl() { o.subnet } else { o.instance };
                    format!("{a} : jump {}_{target}", kind.prefix())
                })
                .collect();
            let ty = format!("{} : verdict", f.addr_type());
            declare(
                out,
                "map",
                &format!("{}_{}", kind.prefix(), f.suffix()),
                &ty,
                &elems,
            );
        }
    }
}

/// A leg of a packet: the sender's (what an instance sends: SG egress, the
/// outbound NACL) or the receiver's (what is delivered to it: the inbound
/// NACL, SG ingress).
/// What the inet hooks need of a leg ([`Direction`], the one type).
trait NftLeg {
    /// The inet hook's interface on the leg's side: a packet from a port of
    /// one of the model's bridges came in on the bridge (br_netfilter names
    /// the bridge, not the port), one to a port goes out on it.
    fn ifname(self) -> &'static str;
    /// The leg's NACL stage.
    fn nacl(self) -> Stage;
    /// The leg's security-group stage.
    fn sg(self) -> Stage;
}

impl NftLeg for Direction {
    fn ifname(self) -> &'static str {
        match self {
            Direction::Egress => "iifname",
            Direction::Ingress => "oifname",
        }
    }
    fn nacl(self) -> Stage {
        match self {
            Direction::Egress => Stage::NaclOut,
            Direction::Ingress => Stage::NaclIn,
        }
    }
    fn sg(self) -> Stage {
        match self {
            Direction::Egress => Stage::SgEgress,
            Direction::Ingress => Stage::SgIngress,
        }
    }
}

/// The stages of `legs`, in the order of docs/semantics.md: not carried
/// (broadcast and multicast destinations on the model's bridges), the NACLs
/// (every packet, before any conntrack shortcut), the tracked-flow shortcut,
/// the SG chains (sender's egress before receiver's ingress), then the
/// timeouts of a new flow.
fn render_legs(out: &mut Out, legs: &[Direction]) {
    out.line(
        2,
        "# Not carried: a broadcast or multicast destination to or from a port of the model's bridges.",
    );
    for leg in legs {
        for f in Family::ALL {
            out.line(
                2,
                format!(
                    "{} @bridges {} daddr @not_carried_{} {}",
                    leg.ifname(),
                    f.l3(),
                    f.suffix(),
                    drop_as("not-carried", "-")
                ),
            );
        }
    }
    out.line(
        2,
        "# NACLs are stateless: every packet, before any conntrack shortcut.",
    );
    for leg in legs {
        dispatch(out, leg.nacl());
    }
    out.line(
        2,
        "# A flow the kernel tracks passed its SG legs when it began: skip the SG rules.",
    );
    out.line(
        2,
        "ct state established,related counter name \"tracked\" accept",
    );
    out.line(2, "ct status confirmed counter name \"tracked\" accept");
    out.line(
        2,
        match legs {
            [_, _] => "# SG egress of the sender, then SG ingress of the receiver (chains return on allow).",
            _ => "# The leg's SG chain (returns on allow).",
        },
    );
    for leg in legs {
        dispatch(out, leg.sg());
    }
    out.line(
        2,
        "# A new flow allowed by every stage: the SEMANTICS timeouts.",
    );
    for f in Family::ALL {
        for side in [Side::Saddr, Side::Daddr] {
            out.line(
                2,
                format!(
                    "{} {} @instances_{} goto ct_new",
                    f.l3(),
                    side.word(),
                    f.suffix()
                ),
            );
        }
    }
}

/// Base chains and the shared decision chain.
fn render_entry(out: &mut Out) {
    for hook in ["forward", "input", "output"] {
        out.line(1, format!("chain {hook} {{"));
        out.line(
            2,
            format!("type filter hook {hook} priority {HOOK_PRIORITY}; policy accept;"),
        );
        out.line(2, "jump decide");
        out.line(1, "}");
        out.blank();
    }
    let pass = "counter name \"passthrough\" accept";
    out.line(1, "chain decide {");
    out.line(
        2,
        "# 1. Passthrough, either leg: NDP (not redirects), the service addresses, the subnet's DNS.",
    );
    out.line(
        2,
        format!("icmpv6 type {}-{} {pass}", NDP_TYPES.0, NDP_TYPES.1),
    );
    let v4: Vec<String> = SERVICES.iter().map(|(_, a, _)| a.to_string()).collect();
    let v6: Vec<String> = SERVICES.iter().map(|(_, _, a)| a.to_string()).collect();
    for (f, addrs) in [(Family::V4, &v4), (Family::V6, &v6)] {
        for side in [Side::Daddr, Side::Saddr] {
            out.line(
                2,
                format!("{} {} {} {pass}", f.l3(), side.word(), set_text(addrs)),
            );
        }
    }
    for f in Family::ALL {
        out.line(
            2,
            format!(
                "{l3} saddr . {l3} daddr @dns_pairs_{} {pass}",
                f.suffix(),
                l3 = f.l3()
            ),
        );
    }
    out.line(
        2,
        "# 2. Not carried: ICMPv6 redirects to or from a port of the model's bridges.",
    );
    for leg in [Direction::Egress, Direction::Ingress] {
        out.line(
            2,
            format!(
                "{} @bridges icmpv6 type {ICMPV6_REDIRECT} {}",
                leg.ifname(),
                drop_as("not-carried", "-")
            ),
        );
    }
    out.line(
        2,
        "# 3. DHCP in its client shape, with a peer that is no instance, is passthrough for one leg: the other leg still judges it.",
    );
    out.line(
        2,
        format!(
            "meta nfproto ipv4 udp sport {DHCP_CLIENT_PORT} udp dport {DHCP_SERVER_PORT} ip daddr != @instances_v4 goto leg_in"
        ),
    );
    out.line(
        2,
        format!(
            "meta nfproto ipv4 udp sport {DHCP_SERVER_PORT} udp dport {DHCP_CLIENT_PORT} ip saddr != @instances_v4 goto leg_out"
        ),
    );
    out.line(2, "# 4. Both legs.");
    render_legs(out, &[Direction::Egress, Direction::Ingress]);
    out.line(1, "}");
    for (name, leg, what) in [
        (
            "leg_out",
            Direction::Egress,
            "DHCP 67->68: passthrough where it is delivered; the sender's leg judges it",
        ),
        (
            "leg_in",
            Direction::Ingress,
            "DHCP 68->67: passthrough where it is sent; the receiver's leg judges it",
        ),
    ] {
        out.blank();
        out.line(1, format!("chain {name} {{"));
        out.line(2, format!("# {what}."));
        render_legs(out, &[leg]);
        out.line(1, "}");
    }
    out.blank();
    out.line(1, "chain ct_new {");
    for f in Family::ALL {
        for proto in ["tcp", "udp"] {
            out.line(
                2,
                format!(
                    "meta nfproto {} meta l4proto {proto} ct timeout set \"{proto}_{}\"",
                    f.nfproto(),
                    f.suffix()
                ),
            );
        }
    }
    out.line(1, "}");
}

/// One subnet's NACL in one direction: same-subnet traffic returns at once;
/// then the entries in rule-number order, first match decides; then deny.
fn render_nacl_chain(
    out: &mut Out,
    ix: &Index<'_>,
    kind: Stage,
    subnet: usize,
    entries: &[NaclEntry],
) -> Result<(), RenderError> {
    let side = kind.remote_side();
    out.line(1, format!("chain {}_{subnet} {{", kind.prefix()));
    out.line(2, "# Two instances of one subnet never see its NACL.");
    for f in Family::ALL {
        if ix.subnet_addrs.contains_key(&(f, subnet)) {
            out.line(
                2,
                format!(
                    "{} {} @subnet_{subnet}_{} return",
                    f.l3(),
                    side.word(),
                    f.suffix()
                ),
            );
        }
    }
    let allow = counter_name(kind, subnet, true);
    let drop = counter_name(kind, subnet, false);
    for e in entries {
        let f = Family::of_net(&e.cidr);
        let Some(proto) = proto_match(f, &e.matcher)? else {
            out.line(
                2,
                format!("# rule {}: cannot match this family", e.rule_number),
            );
            continue;
        };
        let addr = addr_match(f, side, &[e.cidr]);
        let verdict = match e.action {
            RuleAction::Allow => format!("counter name \"{allow}\" return"),
            RuleAction::Deny => format!(
                "counter name \"{drop}\" {} drop",
                log_drop(kind, subnet, Some(e.rule_number))
            ),
        };
        out.line(
            2,
            format!(
                "{} # rule {}",
                join_nonempty(&[&addr, &proto, &verdict]),
                e.rule_number
            ),
        );
    }
    out.line(
        2,
        format!(
            "counter name \"{drop}\" {} drop # rule *",
            log_drop(kind, subnet, None)
        ),
    );
    out.line(1, "}");
    Ok(())
}

/// TCP/UDP rules that share a CIDR set: (family, protocol, aggregated CIDRs).
type PortGroup = (Family, u8, Vec<IpNet>);

/// One instance's SG rules in one direction. Rules are a union, so their
/// order does not matter: they are grouped into as few rules as possible
/// (one per protocol matcher, CIDRs as one set; TCP/UDP ports with the same
/// CIDR set merged into one port set). Each match `return`s — never
/// `accept`, which would skip the other instance's leg — and the chain ends
/// in `drop`.
fn render_sg_chain(
    out: &mut Out,
    kind: Stage,
    inst: usize,
    rules: &[FirewallRule],
) -> Result<(), RenderError> {
    let side = kind.remote_side();
    out.line(1, format!("chain {}_{inst} {{", kind.prefix()));
    // (family, matcher) → remotes.
    let mut by_match: BTreeMap<(Family, Match), Vec<IpNet>> = BTreeMap::new();
    for r in rules {
        by_match
            .entry((Family::of_net(&r.remote), r.matcher))
            .or_default()
            .push(r.remote);
    }
    // Port rules with the same CIDR set share one rule: (family, proto, cidrs) → ranges.
    let mut ports: BTreeMap<PortGroup, Vec<(u16, u16)>> = BTreeMap::new();
    let allow = counter_name(kind, inst, true);
    for ((f, m), nets) in &by_match {
        let nets = aggregate(*f, nets);
        if let Match::Ports { proto, from, to } = *m {
            if l4_name(proto).is_none() {
                return Err(RenderError::Matcher { matcher: *m });
            }
            ports.entry((*f, proto, nets)).or_default().push((from, to));
            continue;
        }
        let Some(proto) = proto_match(*f, m)? else {
            continue;
        };
        let addr = addr_match(*f, side, &nets);
        out.line(
            2,
            join_nonempty(&[&addr, &proto, &format!("counter name \"{allow}\" return")]),
        );
    }
    for ((f, proto, nets), ranges) in ports {
        let addr = addr_match(f, side, &nets);
        let items: Vec<String> = merge_ports(ranges).into_iter().map(port_text).collect();
        let name = l4_name(proto).unwrap_or("th");
        out.line(
            2,
            format!(
                "{addr} {name} dport {} counter name \"{allow}\" return",
                set_text(&items)
            ),
        );
    }
    out.line(
        2,
        format!(
            "counter name \"{}\" {} drop",
            counter_name(kind, inst, false),
            log_drop(kind, inst, None)
        ),
    );
    out.line(1, "}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_keeps_ids_and_neutralises_everything_else() {
        assert_eq!(sanitize("i-0abc.x_y"), "i-0abc.x_y");
        assert_eq!(sanitize("a\";}\n#b"), "a_____b");
        assert_eq!(sanitize(""), "_");
        assert_eq!(sanitize(&"x".repeat(200)).len(), 64);
    }

    #[test]
    fn merge_ports_merges_overlap_and_adjacent() {
        assert_eq!(
            merge_ports(vec![
                (80, 90),
                (22, 22),
                (91, 100),
                (85, 86),
                (65535, 65535),
                (23, 23)
            ]),
            vec![(22, 23), (80, 100), (65535, 65535)]
        );
    }

    #[test]
    fn icmp_matcher_of_other_family_is_left_out_not_widened() {
        let m = Match::Icmp {
            proto: PROTO_ICMP,
            icmp_type: Some(8),
            code: None,
        };
        assert_eq!(proto_match(Family::V6, &m).ok().flatten(), None);
        assert_eq!(
            proto_match(Family::V4, &m).ok().flatten().as_deref(),
            Some("meta l4proto 1 icmp type 8")
        );
        let bad = Match::Ports {
            proto: 47,
            from: 1,
            to: 2,
        };
        assert!(proto_match(Family::V4, &bad).is_err());
    }
}
