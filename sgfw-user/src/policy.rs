//! The canonical forms of policy: the one vocabulary validation produces and
//! the resolver ([`crate::flat`]), the evaluator and both backends consume.
//!
//! This module owns a rule's match ([`Match`], whose L4 kind says what its
//! ports mean), a NACL entry ([`NaclEntry`]) and a subnet's resolved NACL
//! ([`SubnetFirewall`]), the one direction type for legs, stages, permission
//! lists and programs ([`Direction`], shared with the BPF side) and the
//! stages it orders ([`Stage`]), the address family ([`Family`]), the
//! conntrack timeouts, the IP protocol numbers, and the validated model
//! ([`ValidModel`]) that only [`crate::validate::validate`] makes.
//!
//! It is a leaf: it imports nothing of this crate but the input shapes of
//! [`crate::model`]. It must never judge input (that is `validate`) nor
//! resolve references (that is `flat`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Serialize;

use crate::model::Model;

pub use sgfw_common::Direction;

/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// IP protocol number of ICMP (IPv4).
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;

/// IPv4 or IPv6: the one address-family type. The BPF maps spell it as
/// [`Family::tag`]; the nft renderer adds its own spellings to this type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// Both, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The family of a prefix.
    pub fn of_net(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    /// The family of an address.
    pub fn of_addr(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The tag the BPF maps' keys carry ([`sgfw_common::limits::AF_INET`]).
    pub const fn tag(self) -> u8 {
        match self {
            Family::V4 => sgfw_common::limits::AF_INET,
            Family::V6 => sgfw_common::limits::AF_INET6,
        }
    }

    /// The family of a map key's tag (anything but the IPv4 tag is IPv6,
    /// as the BPF programs read it).
    pub const fn from_tag(tag: u8) -> Family {
        if tag == sgfw_common::limits::AF_INET {
            Family::V4
        } else {
            Family::V6
        }
    }

    /// A map key's address: (tag, 16 bytes, IPv4 in the first four).
    pub fn key_of(addr: &IpAddr) -> (u8, [u8; 16]) {
        let mut b = [0u8; 16];
        match addr {
            IpAddr::V4(a) => b[..4].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => b = a.octets(),
        }
        (Family::of_addr(addr).tag(), b)
    }

    /// The address a map key's (tag, bytes) spell ([`Family::key_of`] reversed).
    pub fn addr_of_key(tag: u8, b: &[u8; 16]) -> IpAddr {
        match Family::from_tag(tag) {
            Family::V4 => IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
            Family::V6 => IpAddr::V6(std::net::Ipv6Addr::from(*b)),
        }
    }

    /// `IPv4` / `IPv6`, as messages write it.
    pub const fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// The instance metadata address: never filtered.
pub const METADATA_ADDR: IpAddr = {
    let [a, b, c, d] = sgfw_common::passthrough::SERVICES_V4[0];
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
};

/// The one direction type: [`Direction::Egress`] is what an instance sends
/// (its SG egress list, the outbound NACL, the `from_instance` program),
/// [`Direction::Ingress`] what is delivered to it.
/// One check a packet passes through, in the order they apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Stage {
    /// The sending instance's security groups, egress.
    SgEgress,
    /// The source subnet's NACL, outbound.
    NaclOut,
    /// The destination subnet's NACL, inbound.
    NaclIn,
    /// The receiving instance's security groups, ingress.
    SgIngress,
}

impl Stage {
    /// Stable name as in flow logs: `sg-egress`, `nacl-out`, `nacl-in`, `sg-ingress`.
    pub const fn name(self) -> &'static str {
        match self {
            Stage::SgEgress => "sg-egress",
            Stage::NaclOut => "nacl-out",
            Stage::NaclIn => "nacl-in",
            Stage::SgIngress => "sg-ingress",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Stage {
    /// The four, in the order they apply.
    pub const ALL: [Stage; 4] = [
        Stage::SgEgress,
        Stage::NaclOut,
        Stage::NaclIn,
        Stage::SgIngress,
    ];

    /// The leg it belongs to: the sender's (egress) or the receiver's (ingress).
    pub const fn direction(self) -> Direction {
        match self {
            Stage::SgEgress | Stage::NaclOut => Direction::Egress,
            Stage::NaclIn | Stage::SgIngress => Direction::Ingress,
        }
    }

    /// Whether it is a subnet's NACL (else an instance's security groups).
    pub const fn is_nacl(self) -> bool {
        matches!(self, Stage::NaclOut | Stage::NaclIn)
    }
}

/// One subnet: its bridge and its NACL, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubnetFirewall {
    /// Subnet id.
    pub id: String,
    /// Host bridge name.
    pub bridge: String,
    /// IPv4 CIDR (canonical).
    pub cidr_v4: Ipv4Net,
    /// IPv6 CIDR (canonical), if any.
    pub cidr_v6: Option<Ipv6Net>,
    /// DNS addresses: traffic to and from them is never filtered. Sorted.
    pub dns: Vec<IpAddr>,
    /// Id of the NACL in force (the default NACL's when none is associated).
    pub nacl_id: String,
    /// Inbound entries of both families, ascending rule number.
    pub inbound: Vec<NaclEntry>,
    /// Outbound entries of both families, ascending rule number.
    pub outbound: Vec<NaclEntry>,
}

/// Whether a NACL entry allows or denies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    /// Let the packet through this stage.
    Allow,
    /// Drop the packet.
    Deny,
}

impl fmt::Display for RuleAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RuleAction::Allow => "allow",
            RuleAction::Deny => "deny",
        })
    }
}

/// One NACL entry, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct NaclEntry {
    /// Rule number, 1-32766.
    pub rule_number: u16,
    /// Allow or deny.
    pub action: RuleAction,
    /// Remote CIDR (canonical); its family is the family the entry applies to.
    pub cidr: IpNet,
    /// What traffic it matches (ports are destination ports).
    pub matcher: Match,
}

/// What traffic a rule or NACL entry matches, in one canonical form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Match {
    /// Every protocol.
    All,
    /// One protocol, any port or type.
    Proto(u8),
    /// TCP or UDP, destination port in `from..=to` (never the full range: that is `Proto`).
    Ports {
        /// 6 or 17.
        proto: u8,
        /// First port.
        from: u16,
        /// Last port.
        to: u16,
    },
    /// ICMP (1, IPv4 packets only) or ICMPv6 (58, IPv6 packets only).
    Icmp {
        /// 1 or 58.
        proto: u8,
        /// Type; `None` = any (and then `code` is `None` too).
        icmp_type: Option<u8>,
        /// Code; `None` = any.
        code: Option<u8>,
    },
}

impl Match {
    /// Whether the matcher can match any packet of the family of `net`.
    pub fn possible_for(&self, net: &IpNet) -> bool {
        match self {
            Match::Icmp { proto, .. } => match net {
                IpNet::V4(_) => *proto == PROTO_ICMP,
                IpNet::V6(_) => *proto == PROTO_ICMPV6,
            },
            _ => true,
        }
    }

    /// The matcher written back as a security-group permission's
    /// (`IpProtocol`, `FromPort`, `ToPort`); validating that gives this matcher again.
    pub fn to_sg_fields(&self) -> (String, Option<i64>, Option<i64>) {
        match *self {
            Match::All => ("-1".into(), None, None),
            Match::Proto(p @ (PROTO_TCP | PROTO_UDP)) => (proto_name(p), Some(0), Some(65535)),
            Match::Proto(p) => (p.to_string(), None, None),
            Match::Ports { proto, from, to } => {
                (proto_name(proto), Some(from.into()), Some(to.into()))
            }
            Match::Icmp {
                proto,
                icmp_type,
                code,
            } => (
                proto_name(proto),
                Some(icmp_type.map_or(-1, i64::from)),
                Some(code.map_or(-1, i64::from)),
            ),
        }
    }
}

fn proto_name(p: u8) -> String {
    match p {
        PROTO_TCP => "tcp".into(),
        PROTO_UDP => "udp".into(),
        PROTO_ICMP => "icmp".into(),
        PROTO_ICMPV6 => "icmpv6".into(),
        other => other.to_string(),
    }
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Match::All => f.write_str("all"),
            Match::Proto(p) => write!(f, "{}", proto_name(p)),
            Match::Ports { proto, from, to } if from == to => {
                write!(f, "{} {from}", proto_name(proto))
            }
            Match::Ports { proto, from, to } => write!(f, "{} {from}-{to}", proto_name(proto)),
            Match::Icmp {
                proto,
                icmp_type,
                code,
            } => {
                write!(f, "{}", proto_name(proto))?;
                match (icmp_type, code) {
                    (None, _) => f.write_str(" any"),
                    (Some(t), None) => write!(f, " type {t}"),
                    (Some(t), Some(c)) => write!(f, " type {t} code {c}"),
                }
            }
        }
    }
}

/// Connection-tracking timeouts, seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ConntrackTimeouts {
    /// TCP after a packet in both directions.
    pub tcp_established: u32,
    /// TCP before any reply.
    pub tcp_new: u32,
    /// TCP after FIN or RST.
    pub tcp_closing: u32,
    /// UDP, one direction seen.
    pub udp: u32,
    /// UDP, both directions seen.
    pub udp_stream: u32,
    /// ICMP and ICMPv6.
    pub icmp: u32,
    /// Any other protocol.
    pub other: u32,
}

impl Default for ConntrackTimeouts {
    /// docs/semantics.md: TCP established 432000 s, not yet established 60 s,
    /// closing 10 s; UDP 30 s, stream 180 s; ICMP 30 s; other 600 s.
    fn default() -> Self {
        ConntrackTimeouts {
            tcp_established: 432_000,
            tcp_new: 60,
            tcp_closing: 10,
            udp: 30,
            udp_stream: 180,
            icmp: 30,
            other: 600,
        }
    }
}

/// A subnet's broadcast address (its last address), which a VPC does not
/// carry; `None` for /31 and /32, whose last address is a host.
pub fn subnet_broadcast(cidr: &Ipv4Net) -> Option<Ipv4Addr> {
    (cidr.prefix_len() <= 30).then(|| cidr.broadcast())
}

/// A model that passed validation, in typed form. Only [`validate`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidModel {
    pub(crate) source: Model,
    /// Sorted by id, NACLs resolved.
    pub(crate) subnets: Vec<SubnetFirewall>,
    /// Sorted by id.
    pub(crate) instances: Vec<ValidInstance>,
    pub(crate) groups: BTreeMap<String, ValidGroup>,
    pub(crate) prefix_lists: BTreeMap<String, Vec<IpNet>>,
    pub(crate) timeouts: ConntrackTimeouts,
}

impl ValidModel {
    /// The model as it was written.
    pub fn model(&self) -> &Model {
        &self.source
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ValidInstance {
    pub(crate) id: String,
    pub(crate) subnet_id: String,
    /// IPv4 then IPv6, sorted.
    pub(crate) addrs: Vec<IpAddr>,
    pub(crate) interface: Option<String>,
    /// In the order given, without duplicates.
    pub(crate) groups: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct ValidGroup {
    pub(crate) ingress: Vec<ValidPermission>,
    pub(crate) egress: Vec<ValidPermission>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ValidPermission {
    pub(crate) matcher: Match,
    pub(crate) remotes: Vec<ValidRemote>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ValidRemote {
    Cidr(IpNet),
    Group(String),
    PrefixList(String),
}
