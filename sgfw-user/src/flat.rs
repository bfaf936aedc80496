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
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

pub use crate::policy::{
    ConntrackTimeouts, Direction, Match, NaclEntry, RuleAction, SubnetFirewall, subnet_broadcast,
};
use crate::policy::{ValidInstance, ValidModel, ValidRemote};

/// The whole model, flattened.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct FlatModel {
    /// Subnets, sorted by id.
    pub subnets: Vec<SubnetFirewall>,
    /// Instances, sorted by id.
    pub instances: Vec<InstanceRules>,
    /// Connection-tracking timeouts.
    pub timeouts: ConntrackTimeouts,
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
    ///
    /// Shared: the rules follow from the instance's group list alone, so
    /// every instance with the same list holds the same allocation (one
    /// flatten per distinct list, and compile content-hashes each shared
    /// list once; see [`RuleMemo`]).
    pub ingress: Arc<[FirewallRule]>,
    /// Allow rules for traffic it sends (shared as `ingress` is).
    pub egress: Arc<[FirewallRule]>,
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

/// Where a rule came from: a group, a direction and an index into its
/// `IpPermissions` or `IpPermissionsEgress`. Displays as `sg-web/ingress[0]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct RuleOrigin {
    /// Security-group id.
    pub group_id: String,
    /// Which permission list.
    pub direction: Direction,
    /// Index in that list.
    pub permission: usize,
}

impl fmt::Display for RuleOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}[{}]",
            self.group_id,
            self.direction.name(),
            self.permission
        )
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

    /// Whether `addr` is the broadcast address of one of the model's subnets.
    pub fn is_subnet_broadcast(&self, addr: IpAddr) -> bool {
        let IpAddr::V4(a) = addr else {
            return false;
        };
        self.subnets
            .iter()
            .any(|s| subnet_broadcast(&s.cidr_v4) == Some(a))
    }
}

impl ValidModel {
    /// The flattened view ([`flatten`]).
    pub fn flatten(&self) -> FlatModel {
        flatten(self)
    }
}

/// Why a [`FlatModel`] is inconsistent. [`flatten`] never makes one; a
/// model built by hand can be, and every backend refuses it the same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnershipError {
    /// An instance names a subnet index that does not exist.
    #[error("Instances[{instance}] ({id}): subnet index {subnet_index} does not exist")]
    UnknownSubnet {
        /// Index of the instance in the model.
        instance: usize,
        /// Its id.
        id: String,
        /// The bad subnet index.
        subnet_index: usize,
    },
    /// Two instances share an address.
    #[error("address {addr} belongs to Instances[{first}] and Instances[{second}]")]
    DuplicateAddress {
        /// The address.
        addr: IpAddr,
        /// Index of the first instance.
        first: usize,
        /// Index of the second instance.
        second: usize,
    },
}

/// Who owns each instance address: the one address-ownership index every
/// backend builds its tables from. Built by [`FlatModel::ownership`], which
/// refuses an inconsistent model (an error, never a skipped entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    owner: BTreeMap<IpAddr, Owner>,
}

/// One address's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Index of the instance in [`FlatModel::instances`].
    pub instance: usize,
    /// Index of its subnet in [`FlatModel::subnets`] (checked to exist).
    pub subnet: usize,
}

impl Ownership {
    /// The owner of `addr`, if an instance has it.
    pub fn get(&self, addr: &IpAddr) -> Option<Owner> {
        self.owner.get(addr).copied()
    }

    /// Every instance address and its owner, in address order.
    pub fn iter(&self) -> impl Iterator<Item = (&IpAddr, &Owner)> {
        self.owner.iter()
    }
}

impl FlatModel {
    /// The address-ownership index, checked: every instance's subnet exists
    /// and no address has two owners.
    ///
    /// # Errors
    ///
    /// [`OwnershipError`] naming the first inconsistency.
    pub fn ownership(&self) -> Result<Ownership, OwnershipError> {
        let mut owner = BTreeMap::new();
        for (i, inst) in self.instances.iter().enumerate() {
            if inst.subnet_index >= self.subnets.len() {
                return Err(OwnershipError::UnknownSubnet {
                    instance: i,
                    id: inst.id.clone(),
                    subnet_index: inst.subnet_index,
                });
            }
            for addr in &inst.addrs {
                let o = Owner {
                    instance: i,
                    subnet: inst.subnet_index,
                };
                if let Some(first) = owner.insert(*addr, o) {
                    return Err(OwnershipError::DuplicateAddress {
                        addr: *addr,
                        first: first.instance,
                        second: i,
                    });
                }
            }
        }
        Ok(Ownership { owner })
    }
}

/// Referenced group → every address of every instance that has it.
type Members<'a> = BTreeMap<&'a str, Vec<IpAddr>>;

fn members(model: &ValidModel) -> Members<'_> {
    let mut members: Members<'_> = BTreeMap::new();
    for inst in &model.instances {
        for g in &inst.groups {
            members
                .entry(g.as_str())
                .or_default()
                .extend(inst.addrs.iter().copied());
        }
    }
    members
}

fn subnet_indices(model: &ValidModel) -> BTreeMap<&str, usize> {
    model
        .subnets
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect()
}

/// Flattens a validated model. Deterministic: the same model gives the same value.
pub fn flatten(model: &ValidModel) -> FlatModel {
    let subnet_index = subnet_indices(model);
    let members = members(model);
    let mut memo = RuleMemo::default();
    let instances = model
        .instances
        .iter()
        .map(|inst| flatten_instance(inst, &members, model, &subnet_index, &mut memo))
        .collect();
    FlatModel {
        subnets: model.subnets.clone(),
        instances,
        timeouts: model.timeouts,
    }
}

/// Flattens `new` given `old` and its flattening `old_flat` (consumed, so
/// nothing is copied): instances whose
/// resolved rules cannot have changed are taken from `old_flat`, the rest
/// are flattened afresh. Always equal to `flatten(new)` (a property test
/// holds it to that); the cost follows what changed, not the model's size.
///
/// An instance is flattened afresh when it is new or its own entry changed
/// (groups, addresses, subnet, interface), or one of its groups is *dirty*:
/// its permissions changed, or they name a group whose members' addresses
/// changed, or a prefix list whose CIDRs changed.
pub fn reflatten(old: &ValidModel, old_flat: FlatModel, new: &ValidModel) -> FlatModel {
    let subnet_index = subnet_indices(new);
    let (old_members, new_members) = (members(old), members(new));
    let changed_members = |g: &str| old_members.get(g) != new_members.get(g);
    let changed_list = |p: &str| old.prefix_lists.get(p) != new.prefix_lists.get(p);
    let mut dirty: std::collections::BTreeSet<&str> = std::collections::BTreeSet::new();
    for (gid, g) in &new.groups {
        let changed = old.groups.get(gid) != Some(g)
            || g.ingress.iter().chain(&g.egress).any(|p| {
                p.remotes.iter().any(|r| match r {
                    ValidRemote::Cidr(_) => false,
                    ValidRemote::Group(h) => changed_members(h),
                    ValidRemote::PrefixList(l) => changed_list(l),
                })
            });
        if changed {
            dirty.insert(gid.as_str());
        }
    }
    // Groups that are gone (or were never defined) leave their instances dirty too.
    for gid in old.groups.keys() {
        if !new.groups.contains_key(gid) {
            dirty.insert(gid.as_str());
        }
    }
    let old_inst: BTreeMap<&str, &ValidInstance> =
        old.instances.iter().map(|i| (i.id.as_str(), i)).collect();
    let mut old_rules: BTreeMap<String, InstanceRules> = old_flat
        .instances
        .into_iter()
        .map(|i| (i.id.clone(), i))
        .collect();
    let mut memo = RuleMemo::default();
    let instances = new
        .instances
        .iter()
        .map(|inst| {
            let same = old_inst.get(inst.id.as_str()) == Some(&inst)
                && !inst.groups.iter().any(|g| dirty.contains(g.as_str()));
            match old_rules.remove(&inst.id) {
                Some(r) if same => {
                    // Clean groups: the carried lists hold under `new`, and
                    // instances flattened afresh with the same list share them.
                    memo.lists
                        .entry(inst.groups.clone())
                        .or_insert_with(|| (Arc::clone(&r.ingress), Arc::clone(&r.egress)));
                    InstanceRules {
                        subnet_index: subnet_index
                            .get(inst.subnet_id.as_str())
                            .copied()
                            .unwrap_or(usize::MAX),
                        ..r
                    }
                }
                _ => flatten_instance(inst, &new_members, new, &subnet_index, &mut memo),
            }
        })
        .collect();
    FlatModel {
        subnets: new.subnets.clone(),
        instances,
        timeouts: new.timeouts,
    }
}

/// The rule lists of one flatten, by group list: an instance's rules are a
/// function of its groups (in order) and the model alone, never of the
/// instance itself, so instances with the same list share one allocation.
#[derive(Default)]
struct RuleMemo {
    lists: BTreeMap<Vec<String>, RuleLists>,
}

/// An instance's (ingress, egress) rules.
type RuleLists = (Arc<[FirewallRule]>, Arc<[FirewallRule]>);

fn flatten_instance(
    inst: &ValidInstance,
    members: &Members<'_>,
    model: &ValidModel,
    subnet_index: &BTreeMap<&str, usize>,
    memo: &mut RuleMemo,
) -> InstanceRules {
    let (ingress, egress) = match memo.lists.get(&inst.groups) {
        Some((i, e)) => (Arc::clone(i), Arc::clone(e)),
        None => {
            let lists = group_rules(&inst.groups, members, model);
            memo.lists.insert(inst.groups.clone(), lists.clone());
            lists
        }
    };
    InstanceRules {
        id: inst.id.clone(),
        subnet_id: inst.subnet_id.clone(),
        subnet_index: subnet_index
            .get(inst.subnet_id.as_str())
            .copied()
            .unwrap_or(usize::MAX),
        addrs: inst.addrs.clone(),
        interface: inst.interface.clone(),
        ingress,
        egress,
    }
}

/// The effective rules of a group list.
fn group_rules(groups: &[String], members: &Members<'_>, model: &ValidModel) -> RuleLists {
    let mut ingress = BTreeMap::new();
    let mut egress = BTreeMap::new();
    for gid in groups {
        let Some(group) = model.groups.get(gid) else {
            continue;
        };
        for (dir, perms, out) in [
            (Direction::Ingress, &group.ingress, &mut ingress),
            (Direction::Egress, &group.egress, &mut egress),
        ] {
            for (idx, perm) in perms.iter().enumerate() {
                let origin = RuleOrigin {
                    group_id: gid.clone(),
                    direction: dir,
                    permission: idx,
                };
                for net in resolve_remotes(&perm.remotes, members, model) {
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
    (sorted_rules(ingress).into(), sorted_rules(egress).into())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        IpPermission, Model, NaclAssociation, NetworkAcl, NetworkAclEntry, PortRange, PrefixList,
        PrefixListEntry, SecurityGroup,
    };
    use crate::policy::ValidRemote;
    use crate::testutil::config;
    use crate::testutil::{FIXTURE, flat_of, ip};
    use crate::validate::validate;
    use proptest::prelude::*;

    fn rules_of<'a>(m: &'a FlatModel, id: &str, ingress: bool) -> &'a [FirewallRule] {
        let i = m.instance(id).unwrap();
        if ingress { &i.ingress } else { &i.egress }
    }

    /// "a referenced security group (= every private IPv4/IPv6 address of every
    /// instance that has that group attached, in the model)".
    #[test]
    fn semantics_sg_referenced_group_resolves_to_member_addresses() {
        let m = flat_of(FIXTURE);
        let remotes: Vec<String> = rules_of(&m, "i-db", true)
            .iter()
            .map(|r| r.remote.to_string())
            .collect();
        assert_eq!(remotes, ["10.0.1.10/32", "10.0.1.11/32", "fd00:1::10/128"]);
        assert!(rules_of(&m, "i-db", true).iter().all(|r| r.matcher
            == Match::Ports {
                proto: 6,
                from: 5432,
                to: 5432
            }));
    }

    /// "or a prefix list (= its CIDR entries)".
    #[test]
    fn semantics_sg_prefix_list_resolves_to_its_cidrs() {
        let json = FIXTURE.replacen('{', r#"{"PrefixLists": [{"PrefixListId": "pl-1", "Entries": [{"Cidr": "192.0.2.0/24"}, {"Cidr": "2001:db8::/32"}]}],"#, 1)
            .replace(r#""UserIdGroupPairs": [{"GroupId": "sg-web"}]"#, r#""PrefixListIds": [{"PrefixListId": "pl-1"}]"#);
        let m = flat_of(&json);
        let remotes: Vec<String> = rules_of(&m, "i-db", true)
            .iter()
            .map(|r| r.remote.to_string())
            .collect();
        assert_eq!(remotes, ["192.0.2.0/24", "2001:db8::/32"]);
    }

    /// "IPv4 and IPv6 apart": an icmp rule with an IPv6 remote can never match and is left out.
    #[test]
    fn rules_that_cannot_match_their_family_are_left_out() {
        let json = FIXTURE.replace(
            r#"{"IpProtocol": "icmp", "FromPort": 8, "ToPort": -1, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}"#,
            r#"{"IpProtocol": "icmp", "FromPort": 8, "ToPort": -1, "IpRanges": [{"CidrIp": "0.0.0.0/0"}], "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}"#,
        );
        let m = flat_of(&json);
        let icmp: Vec<_> = rules_of(&m, "i-web1", true)
            .iter()
            .filter(|r| matches!(r.matcher, Match::Icmp { .. }))
            .collect();
        assert_eq!(icmp.len(), 1);
        assert_eq!(icmp[0].remote.to_string(), "0.0.0.0/0");
    }

    /// "duplicates merged": the same (remote, matcher) from two permissions or groups keeps the smallest origin.
    #[test]
    fn duplicates_are_merged_keeping_the_smallest_origin() {
        let json = FIXTURE.replace(
            r#"{"IpProtocol": "icmp", "FromPort": 8, "ToPort": -1, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}"#,
            r#"{"IpProtocol": "icmp", "FromPort": 8, "ToPort": -1, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
               {"IpProtocol": "6", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "0.0.0.17/0"}]}"#,
        );
        let m = flat_of(&json);
        let https: Vec<_> = rules_of(&m, "i-web1", true)
            .iter()
            .filter(|r| {
                r.remote.to_string() == "0.0.0.0/0"
                    && r.matcher
                        != Match::Icmp {
                            proto: 1,
                            icmp_type: Some(8),
                            code: None,
                        }
            })
            .collect();
        assert_eq!(https.len(), 1);
        assert_eq!(https[0].origin.to_string(), "sg-web/ingress[0]");
    }

    #[test]
    fn instances_subnets_and_addresses_are_sorted_and_indexed() {
        let m = flat_of(FIXTURE);
        let ids: Vec<_> = m.instances.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["i-db", "i-web1", "i-web2"]);
        let db = m.instance("i-db").unwrap();
        assert_eq!(m.subnets[db.subnet_index].id, "subnet-b");
        assert_eq!(db.addrs, [ip("10.0.2.20"), ip("fd00:2::20")]);
        assert_eq!(m.instance_by_addr(ip("fd00:1::10")).unwrap().id, "i-web1");
        assert!(m.instance_by_addr(ip("10.0.1.99")).is_none());
        assert_eq!(m.subnets[0].dns, [ip("10.0.0.2")]);
    }

    #[test]
    fn origin_and_match_display() {
        let o = RuleOrigin {
            group_id: "sg-web".into(),
            direction: Direction::Ingress,
            permission: 0,
        };
        assert_eq!(o.to_string(), "sg-web/ingress[0]");
        assert_eq!(
            Match::Ports {
                proto: 6,
                from: 80,
                to: 80
            }
            .to_string(),
            "tcp 80"
        );
        assert_eq!(
            Match::Ports {
                proto: 17,
                from: 1,
                to: 9
            }
            .to_string(),
            "udp 1-9"
        );
        assert_eq!(
            Match::Icmp {
                proto: 58,
                icmp_type: None,
                code: None
            }
            .to_string(),
            "icmpv6 any"
        );
        assert_eq!(
            Match::Icmp {
                proto: 1,
                icmp_type: Some(3),
                code: Some(4)
            }
            .to_string(),
            "icmp type 3 code 4"
        );
        assert_eq!(Match::All.to_string(), "all");
        assert_eq!(Match::Proto(47).to_string(), "47");
    }

    #[test]
    fn default_timeouts_follow_semantics() {
        let t = ConntrackTimeouts::default();
        assert_eq!(
            (
                t.tcp_established,
                t.tcp_new,
                t.tcp_closing,
                t.udp,
                t.udp_stream,
                t.icmp,
                t.other
            ),
            (432_000, 60, 10, 30, 180, 30, 600)
        );
    }

    #[test]
    fn flat_model_serialises_to_json() {
        let v = serde_json::to_value(flat_of(FIXTURE)).unwrap();
        assert_eq!(
            v["instances"][0]["ingress"][0]["origin"]["group_id"],
            "sg-db"
        );
        assert_eq!(v["subnets"][0]["inbound"][0]["action"], "allow");
    }

    // --- properties: canonicalisation is idempotent, flattening is deterministic ---

    fn arb_cidr() -> impl Strategy<Value = String> {
        prop_oneof![
            (any::<u32>(), 0u8..=32)
                .prop_map(|(a, p)| format!("{}/{p}", std::net::Ipv4Addr::from(a))),
            (any::<u128>(), 0u8..=128)
                .prop_map(|(a, p)| format!("{}/{p}", std::net::Ipv6Addr::from(a))),
        ]
    }

    fn arb_permission() -> impl Strategy<Value = (String, Option<i64>, Option<i64>)> {
        let port = prop_oneof![0i64..=65535, Just(0), Just(65535)];
        let ports = prop_oneof![
            Just((-1i64, -1i64)),
            (port.clone(), port).prop_map(|(a, b)| (a.min(b), a.max(b)))
        ];
        let icmp = prop_oneof![Just(-1i64), 0i64..=255];
        prop_oneof![
            Just(("-1".to_string(), None, None)),
            (prop::sample::select(vec!["tcp", "udp", "6", "17"]), ports).prop_map(|(p, (a, b))| (
                p.to_string(),
                Some(a),
                Some(b)
            )),
            (
                prop::sample::select(vec!["icmp", "icmpv6", "1", "58"]),
                icmp.clone(),
                icmp
            )
                .prop_map(|(p, t, c)| (
                    p.to_string(),
                    Some(t),
                    Some(if t == -1 { -1 } else { c })
                )),
            (0u8..=255)
                .prop_filter("ports needed", |p| ![1, 6, 17, 58].contains(p))
                .prop_map(|p| (p.to_string(), None, None)),
        ]
    }

    static BASE: std::sync::LazyLock<Model> =
        std::sync::LazyLock::new(|| Model::from_json(FIXTURE).unwrap());

    /// One SG whose single ingress permission is `perm` with remote `cidr`.
    fn one_rule_model(perm: &(String, Option<i64>, Option<i64>), cidr: &str) -> Model {
        let mut m = BASE.clone();
        let p = IpPermission {
            ip_protocol: perm.0.clone(),
            from_port: perm.1,
            to_port: perm.2,
            ..Default::default()
        };
        m.security_groups[0].ip_permissions = vec![p.from_cidr(cidr)];
        m
    }

    /// A random valid model: the fixture plus random groups, prefix lists and NACL entries.
    fn arb_model() -> impl Strategy<Value = Model> {
        let perm = (arb_permission(), arb_cidr(), 0usize..3, any::<bool>());
        (
            prop::collection::vec(perm, 0..6),
            prop::collection::vec(arb_cidr(), 0..3),
            prop::collection::btree_map(
                1i64..200,
                (any::<bool>(), arb_cidr(), any::<bool>(), 0i64..1000),
                0..6,
            ),
        )
            .prop_map(|(perms, pl, nacl)| {
                let mut m = BASE.clone();
                m.prefix_lists.push(PrefixList {
                    prefix_list_id: "pl-r".into(),
                    entries: pl
                        .into_iter()
                        .map(|cidr| PrefixListEntry {
                            cidr,
                            description: None,
                        })
                        .collect(),
                });
                let mut g = SecurityGroup {
                    group_id: "sg-r".into(),
                    ..Default::default()
                };
                for ((proto, from, to), cidr, kind, egress) in perms {
                    let p = IpPermission {
                        ip_protocol: proto,
                        from_port: from,
                        to_port: to,
                        ..Default::default()
                    };
                    let p = match kind {
                        0 => p.from_cidr(&cidr),
                        1 => p.from_group("sg-web"),
                        _ => p.from_prefix_list("pl-r"),
                    };
                    if egress {
                        g.ip_permissions_egress.push(p)
                    } else {
                        g.ip_permissions.push(p)
                    }
                }
                m.security_groups.push(g);
                m.instances[2].security_group_ids.push("sg-r".into());
                let entries = nacl
                    .into_iter()
                    .map(|(n, (allow, cidr, egress, port))| {
                        let v6 = cidr.contains(':');
                        NetworkAclEntry {
                            rule_number: n,
                            protocol: "6".into(),
                            rule_action: if allow { "allow" } else { "deny" }.into(),
                            egress,
                            cidr_block: (!v6).then(|| cidr.clone()),
                            ipv6_cidr_block: v6.then_some(cidr),
                            port_range: Some(PortRange {
                                from: Some(port),
                                to: Some(port + 5),
                            }),
                            icmp_type_code: None,
                        }
                    })
                    .collect();
                m.network_acls.push(NetworkAcl {
                    network_acl_id: "acl-r".into(),
                    associations: vec![NaclAssociation {
                        subnet_id: "subnet-b".into(),
                        network_acl_association_id: None,
                    }],
                    entries,
                    ..Default::default()
                });
                m
            })
    }

    fn shuffled(m: &Model, seed: u64) -> Model {
        fn rotate<T>(v: &mut [T], by: u64) {
            if !v.is_empty() {
                let k = (by as usize) % v.len();
                v.rotate_left(k);
                if by % 2 == 1 {
                    v.reverse();
                }
            }
        }
        let mut m = m.clone();
        rotate(&mut m.subnets, seed);
        rotate(&mut m.instances, seed / 3);
        rotate(&mut m.security_groups, seed / 5);
        rotate(&mut m.network_acls, seed / 7);
        rotate(&mut m.prefix_lists, seed / 11);
        for a in &mut m.network_acls {
            rotate(&mut a.entries, seed / 13);
        }
        for p in &mut m.prefix_lists {
            rotate(&mut p.entries, seed / 17);
        }
        for i in &mut m.instances {
            rotate(&mut i.security_group_ids, seed / 19);
            rotate(&mut i.secondary_private_ip_addresses, seed / 23);
        }
        m
    }

    proptest! {
        #![proptest_config(config())]

        /// "CIDRs are canonicalised": canonicalising a canonical CIDR changes nothing.
        #[test]
        fn canonicalisation_is_idempotent(perm in arb_permission(), cidr in arb_cidr()) {
            let Ok((once, _)) = validate(&one_rule_model(&perm, &cidr)) else {
                return Err(TestCaseError::fail(format!("generated input must be valid: {perm:?} {cidr}")));
            };
            let rule = &once.groups["sg-web"].ingress[0];
            let ValidRemote::Cidr(net) = rule.remotes[0] else { unreachable!() };
            prop_assert_eq!(net, net.trunc());
            // Write the canonical form back and validate again: the same rule.
            let again = validate(&one_rule_model(&rule.matcher.to_sg_fields(), &net.to_string())).unwrap().0;
            prop_assert_eq!(&again.groups["sg-web"].ingress[0], rule);
        }

        /// Flattening is deterministic: the same model, listed in any order, gives the same view.
        #[test]
        fn flatten_is_deterministic(m in arb_model(), seed in any::<u64>()) {
            let (v1, w1) = validate(&m).unwrap();
            let (v2, w2) = validate(&shuffled(&m, seed)).unwrap();
            prop_assert_eq!(w1.len(), w2.len());
            let (f1, f2) = (v1.flatten(), v2.flatten());
            prop_assert_eq!(&f1, &v1.flatten());
            prop_assert_eq!(&f1, &f2);
            for inst in &f1.instances {
                let mut sorted = inst.ingress.to_vec();
                sorted.sort_by(|a, b| (&a.origin, a.remote, a.matcher).cmp(&(&b.origin, b.remote, b.matcher)));
                prop_assert_eq!(&sorted[..], &inst.ingress[..]);
                let keys: std::collections::BTreeSet<_> = inst.ingress.iter().map(|r| (r.remote, r.matcher)).collect();
                prop_assert_eq!(keys.len(), inst.ingress.len(), "duplicates merged");
            }
        }
    }
}
