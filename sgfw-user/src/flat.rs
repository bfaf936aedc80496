//! The flattened view: what every backend consumes.
//!
//! This module owns [`FlatModel`]: per instance and direction the resolved
//! allow rules (referenced groups turned into their members' addresses,
//! prefix lists into their CIDRs, canonical CIDRs, duplicates merged), and per
//! subnet its NACL entries in rule-number order. Everything is sorted, so the
//! same model always flattens to the same value.
//!
//! It must never fail and never judge: [`flatten`] only takes a
//! [`ValidModel`], whose validation already rejected anything that cannot be
//! expressed.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Serialize;

use crate::packet::{L4, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Packet};
use crate::validate::{ValidModel, ValidRemote};

/// The whole model, flattened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlatModel {
    /// Subnets, sorted by id.
    pub subnets: Vec<SubnetFirewall>,
    /// Instances, sorted by id.
    pub instances: Vec<InstanceRules>,
    /// Connection-tracking timeouts.
    pub timeouts: ConntrackTimeouts,
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

/// One instance and its effective security-group rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceRules {
    /// Instance id.
    pub id: String,
    /// Its subnet's id.
    pub subnet_id: String,
    /// Index of its subnet in [`FlatModel::subnets`].
    pub subnet_index: usize,
    /// Its addresses, IPv4 then IPv6, each sorted.
    pub addrs: Vec<IpAddr>,
    /// Host end of its veth, when bound.
    pub interface: Option<String>,
    /// Allow rules for traffic delivered to it.
    pub ingress: Vec<FirewallRule>,
    /// Allow rules for traffic it sends.
    pub egress: Vec<FirewallRule>,
}

/// One resolved security-group allow rule.
///
/// One rule per (remote CIDR, matcher): identical rules from several
/// permissions are merged and keep the smallest origin. Rules that can
/// never match (an `icmp` rule with an IPv6 remote, an `icmpv6` rule with an
/// IPv4 remote) are left out.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FirewallRule {
    /// Remote CIDR (canonical); its family is the family the rule applies to.
    pub remote: IpNet,
    /// What traffic it matches.
    pub matcher: Match,
    /// The permission it came from.
    pub origin: RuleOrigin,
}

/// Ingress or egress, as a security group's permission lists are split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SgDirection {
    /// `IpPermissions`: traffic delivered to the instance.
    Ingress,
    /// `IpPermissionsEgress`: traffic the instance sends.
    Egress,
}

impl fmt::Display for SgDirection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SgDirection::Ingress => "ingress",
            SgDirection::Egress => "egress",
        })
    }
}

/// Where a rule came from: a group, a direction and an index into its
/// `IpPermissions` or `IpPermissionsEgress`. Displays as `sg-web/ingress[0]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct RuleOrigin {
    /// Security-group id.
    pub group_id: String,
    /// Which permission list.
    pub direction: SgDirection,
    /// Index in that list.
    pub permission: usize,
}

impl fmt::Display for RuleOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}[{}]",
            self.group_id, self.direction, self.permission
        )
    }
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
    /// Whether this matcher matches a packet: protocol, TCP/UDP destination
    /// port, ICMP type and code. ICMP matchers match only their own family.
    pub fn matches(&self, pkt: &Packet) -> bool {
        match *self {
            Match::All => true,
            Match::Proto(p) => pkt.proto() == p,
            Match::Ports { proto, from, to } => {
                pkt.proto() == proto && pkt.dport().is_some_and(|d| (from..=to).contains(&d))
            }
            Match::Icmp {
                proto,
                icmp_type,
                code,
            } => {
                let L4::Icmp {
                    icmp_type: t,
                    code: c,
                    ..
                } = &pkt.l4
                else {
                    return false;
                };
                let family_ok = if pkt.is_v6() {
                    proto == PROTO_ICMPV6
                } else {
                    proto == PROTO_ICMP
                };
                family_ok
                    && icmp_type.is_none_or(|want| want == *t)
                    && code.is_none_or(|want| want == *c)
            }
        }
    }

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
    /// SEMANTICS.md: TCP established 432000 s, not yet established 60 s,
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

impl FlatModel {
    /// The instance that owns an address.
    pub fn instance_by_addr(&self, addr: IpAddr) -> Option<&InstanceRules> {
        self.instances.iter().find(|i| i.addrs.contains(&addr))
    }

    /// The instance with this id.
    pub fn instance(&self, id: &str) -> Option<&InstanceRules> {
        self.instances.iter().find(|i| i.id == id)
    }

    /// The subnet an instance sits in.
    pub fn subnet_of(&self, instance: &InstanceRules) -> Option<&SubnetFirewall> {
        self.subnets.get(instance.subnet_index)
    }
}

/// Flattens a validated model. Deterministic: the same model gives the same value.
pub fn flatten(model: &ValidModel) -> FlatModel {
    let subnets = model.subnets.clone();
    let subnet_index: BTreeMap<&str, usize> = subnets
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect();

    // Referenced group -> every address of every instance that has it.
    let mut members: BTreeMap<&str, Vec<IpAddr>> = BTreeMap::new();
    for inst in &model.instances {
        for g in &inst.groups {
            members
                .entry(g.as_str())
                .or_default()
                .extend(inst.addrs.iter().copied());
        }
    }

    let instances = model
        .instances
        .iter()
        .map(|inst| {
            let mut ingress = BTreeMap::new();
            let mut egress = BTreeMap::new();
            for gid in &inst.groups {
                let Some(group) = model.groups.get(gid) else {
                    continue;
                };
                for (dir, perms, out) in [
                    (SgDirection::Ingress, &group.ingress, &mut ingress),
                    (SgDirection::Egress, &group.egress, &mut egress),
                ] {
                    for (idx, perm) in perms.iter().enumerate() {
                        let origin = RuleOrigin {
                            group_id: gid.clone(),
                            direction: dir,
                            permission: idx,
                        };
                        for net in resolve_remotes(&perm.remotes, &members, model) {
                            if !perm.matcher.possible_for(&net) {
                                continue;
                            }
                            out.entry((net, perm.matcher))
                                .and_modify(|o: &mut RuleOrigin| {
                                    if origin < *o {
                                        *o = origin.clone();
                                    }
                                })
                                .or_insert_with(|| origin.clone());
                        }
                    }
                }
            }
            InstanceRules {
                id: inst.id.clone(),
                subnet_id: inst.subnet_id.clone(),
                subnet_index: subnet_index
                    .get(inst.subnet_id.as_str())
                    .copied()
                    .unwrap_or(usize::MAX),
                addrs: inst.addrs.clone(),
                interface: inst.interface.clone(),
                ingress: sorted_rules(ingress),
                egress: sorted_rules(egress),
            }
        })
        .collect();

    FlatModel {
        subnets,
        instances,
        timeouts: model.timeouts,
    }
}

fn resolve_remotes(
    remotes: &[ValidRemote],
    members: &BTreeMap<&str, Vec<IpAddr>>,
    model: &ValidModel,
) -> Vec<IpNet> {
    let mut nets = Vec::new();
    for remote in remotes {
        match remote {
            ValidRemote::Cidr(net) => nets.push(*net),
            ValidRemote::Group(g) => {
                nets.extend(
                    members
                        .get(g.as_str())
                        .into_iter()
                        .flatten()
                        .map(|a| IpNet::from(*a)),
                );
            }
            ValidRemote::PrefixList(p) => {
                nets.extend(model.prefix_lists.get(p).into_iter().flatten().copied())
            }
        }
    }
    nets
}

/// Rules in the order of the permissions they came from (then remote, then matcher),
/// so that the first match names the earliest permission.
fn sorted_rules(rules: BTreeMap<(IpNet, Match), RuleOrigin>) -> Vec<FirewallRule> {
    let mut v: Vec<FirewallRule> = rules
        .into_iter()
        .map(|((remote, matcher), origin)| FirewallRule {
            remote,
            matcher,
            origin,
        })
        .collect();
    v.sort_by(|a, b| (&a.origin, a.remote, a.matcher).cmp(&(&b.origin, b.remote, b.matcher)));
    v
}
