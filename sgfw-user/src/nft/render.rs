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
//!      accept; SGs: `ip saddr vmap @sg_out_v4` → `sg_out_<instance>`
//!      (jumps to its groups' `grp_out_<group>`, a match goes on to
//!      `sg_out_pass` → `sg_ingress`; no match: `drop`), then `ip daddr vmap
//!      @sg_in_v4` → `sg_in_<instance>` likewise → `sg_in_pass` →
//!      `sg_done`: conntrack timeouts of a new flow, `accept`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use sgfw_common::passthrough as pt;

mod chains;
mod sets;

use chains::*;
pub use sets::RenderMemo;
pub(crate) use sets::sg_counter_set;
use sets::*;

use super::ruleset::{Kind, Obj, Ruleset, Table};
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
    /// Two ids of one kind that name their objects alike ([`key_of`]: two
    /// ids hashing to the same 64 bits); refused rather than merged.
    #[error("{what} ids {id:?} and {other:?} would name the same nft objects")]
    Name {
        /// Subnet, instance or security group.
        what: &'static str,
        /// One id.
        id: String,
        /// The other.
        other: String,
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

/// Renders the model as text; `ports` are the ports found on the model's
/// bridges (the host ends of the instances' veths), which get the
/// port-level checks of `table bridge sgfw` beside the model's bound
/// interfaces. Deterministic: the same model and ports always give
/// byte-identical text.
///
/// # Errors
///
/// As [`ruleset`].
pub fn render_with_ports(model: &FlatModel, ports: &[String]) -> Result<String, RenderError> {
    Ok(ruleset(model, ports)?.text())
}

/// The model as sgfw's two tables of named objects ([`Ruleset::text`] is
/// what [`render_with_ports`] returns).
///
/// Objects are named by the ids of their subnet, instance or group
/// ([`key_of`]), never by a position in the model, so adding or removing
/// one changes only its own objects and the set elements that name it.
///
/// # Errors
///
/// [`RenderError`] when the model is inconsistent (an instance in a subnet
/// that does not exist, an address owned twice), a matcher cannot be
/// expressed exactly, or an interface, bridge or port name cannot be
/// written safely; validated, flattened models never are (but ports found on
/// the host can be).
pub fn ruleset(model: &FlatModel, ports: &[String]) -> Result<Ruleset, RenderError> {
    ruleset_with(model, ports, &mut RenderMemo::default())
}

/// [`ruleset`], taking the chains of groups whose inputs did not change
/// from `memo` (see [`RenderMemo`]) and leaving in it what this render
/// used. The result is the one [`ruleset`] gives.
///
/// # Errors
///
/// As [`ruleset`]; `memo` may then have forgotten some of what it held.
pub fn ruleset_with(
    model: &FlatModel,
    ports: &[String],
    memo: &mut RenderMemo,
) -> Result<Ruleset, RenderError> {
    let ix = Index::new_with(model, memo)?;
    for s in &model.subnets {
        if !ifname_ok(&s.bridge) {
            return Err(RenderError::Bridge {
                subnet: s.id.clone(),
                name: s.bridge.clone(),
            });
        }
    }
    let mut header = vec![
        "# sgfw: AWS VPC security groups and network ACLs (generated; do not edit).".to_string(),
        "# Decision order: frame and port checks (table bridge sgfw), passthrough, not carried, NACLs (every packet), tracked flows, SG egress, SG ingress.".to_string(),
        "# Conntrack timeouts of SEMANTICS.md are set on each new flow sgfw allowed (chain ct_new); ICMP and other protocols keep the kernel's (nft cannot set them per flow here).".to_string(),
    ];
    for (s, key) in model.subnets.iter().zip(&ix.subnet_key) {
        header.push(format!(
            "# subnet {key}: {} (nacl {})",
            sanitize(&s.id),
            sanitize(&s.nacl_id)
        ));
    }
    let mut t = Table::new(TABLE);
    render_timeouts(&mut t, model);
    render_counters(&mut t, &ix);
    render_sets(&mut t, &ix);
    render_entry(&mut t);
    for (i, s) in model.subnets.iter().enumerate() {
        t.push(render_nacl_chain(&ix, Stage::NaclOut, i, &s.outbound)?);
        t.push(render_nacl_chain(&ix, Stage::NaclIn, i, &s.inbound)?);
    }
    for chain in ix.group_chains.values() {
        t.push(chain.clone());
    }
    for ((dir, lkey), groups) in &ix.lists {
        let kind = match dir {
            Direction::Ingress => Stage::SgIngress,
            Direction::Egress => Stage::SgEgress,
        };
        t.push(render_sg_chain(kind, lkey, groups, &ix));
    }
    let bridge = render_bridge_table(&ix, ports)?;
    Ok(Ruleset {
        header,
        tables: vec![t, bridge],
    })
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
