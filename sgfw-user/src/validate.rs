//! Validation: from a [`Model`] as written to a [`ValidModel`] that can be
//! flattened without any further failure.
//!
//! This module owns every judgement about the input: that CIDRs, addresses,
//! protocols, ports, ICMP types and rule numbers are well formed, that every
//! reference resolves, that ids and interface names are safe to hand to the
//! kernel and to `nft`, and the canonical form of each rule
//! ([`Match`]). It reports **all** errors at once, each naming its place in
//! the model and the offending value in one line, and rejects a model with
//! any error whole. Exceeding AWS's default quotas is a [`Warning`].
//!
//! It must never drop, narrow or widen a rule to make a model pass: a rule
//! that cannot be expressed is an error.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::flat::{ConntrackTimeouts, FlatModel, Match, NaclEntry, RuleAction, SubnetFirewall};
use crate::model::{IpPermission, Model, NetworkAclEntry};
use crate::packet::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

/// AWS default quota: rules per security group, per direction, per address family.
pub const QUOTA_SG_RULES: usize = 60;
/// AWS default quota: security groups per network interface.
pub const QUOTA_SGS_PER_INTERFACE: usize = 5;
/// AWS hard limit on security groups per network interface (an error beyond it).
pub const MAX_SGS_PER_INTERFACE: usize = 16;
/// AWS default quota: NACL rules per direction, per address family.
pub const QUOTA_NACL_RULES: usize = 20;
/// Id given to the implicit AWS default NACL when the model has no `IsDefault` NACL.
pub const IMPLICIT_DEFAULT_NACL_ID: &str = "implicit-default";

/// One problem in a model: where and what. Displays as `path: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ValidationError {
    /// Place in the model, e.g. `SecurityGroups[sg-web].IpPermissions[0].IpRanges[1].CidrIp`.
    pub path: String,
    /// What is wrong, quoting the offending value.
    pub message: String,
}

/// Every error found in a model; displays one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors {
    /// The errors, in the order the model was checked.
    pub errors: Vec<ValidationError>,
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Something legal but worth knowing (a quota exceeded, a rule that matches nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// Place in the model.
    pub path: String,
    /// What is notable.
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
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

    /// The flattened view ([`crate::flat::flatten`]).
    pub fn flatten(&self) -> FlatModel {
        crate::flat::flatten(self)
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

/// Checks a model and puts it in typed, canonical form.
///
/// # Errors
///
/// [`ValidationErrors`] with every problem found, when there is any.
pub fn validate(model: &Model) -> Result<(ValidModel, Vec<Warning>), ValidationErrors> {
    let mut c = Checker::default();
    let prefix_lists = c.prefix_lists(model);
    let group_ids: BTreeSet<&str> = model
        .security_groups
        .iter()
        .map(|g| g.group_id.as_str())
        .collect();
    let mut subnets = c.subnets(model);
    let instances = c.instances(model, &subnets, &group_ids);
    c.dns_not_instance(&subnets, &instances);
    let groups = c.groups(model, &prefix_lists);
    c.nacls(model, &mut subnets);
    let timeouts = c.timeouts(model);
    if !c.errors.is_empty() {
        return Err(ValidationErrors { errors: c.errors });
    }
    let mut subnets: Vec<SubnetFirewall> = subnets.into_iter().map(|s| s.firewall).collect();
    subnets.sort_by(|a, b| a.id.cmp(&b.id));
    let mut instances = instances;
    instances.sort_by(|a, b| a.id.cmp(&b.id));
    let valid = ValidModel {
        source: model.clone(),
        subnets,
        instances,
        groups,
        prefix_lists,
        timeouts,
    };
    Ok((valid, c.warnings))
}

/// Whether `s` is a valid id: 1-255 characters of `A-Z a-z 0-9 . _ -`.
/// Ids end up in nft rulesets, map names and log lines: nothing else may pass.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Whether `s` is a valid Linux interface name: 1-15 printable ASCII
/// characters, not `.` or `..`, without `/`, `:`, quotes, backslash or whitespace.
pub fn is_valid_ifname(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && !b"/:\"'`\\".contains(&b))
}

const ID_RULE: &str = "is not a valid id (1-255 characters of A-Z a-z 0-9 . _ -)";
const IFNAME_RULE: &str =
    "is not a Linux interface name (1-15 characters, no '/', ':', quotes or whitespace)";

/// Path label of a list item: its id when that is valid, else its index.
fn label(id: &str, index: usize) -> String {
    if is_valid_id(id) {
        id.to_owned()
    } else {
        index.to_string()
    }
}

struct CheckedSubnet {
    firewall: SubnetFirewall,
    path: String,
    /// Whether a NACL has claimed this subnet, and which.
    nacl: Option<String>,
}

#[derive(Default)]
struct Checker {
    errors: Vec<ValidationError>,
    warnings: Vec<Warning>,
}

impl Checker {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ValidationError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn warn(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Warning {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Checks an id and its uniqueness; returns whether it can be used.
    fn id(
        &mut self,
        path: String,
        id: &str,
        seen: &mut BTreeMap<String, usize>,
        index: usize,
    ) -> bool {
        if !is_valid_id(id) {
            self.err(path, format!("{id:?} {ID_RULE}"));
            return false;
        }
        if let Some(first) = seen.get(id) {
            self.err(
                path,
                format!("{id:?} is a duplicate id (also item {first})"),
            );
            return false;
        }
        seen.insert(id.to_owned(), index);
        true
    }

    fn v4_cidr(&mut self, path: String, s: &str) -> Option<Ipv4Net> {
        match s.parse::<Ipv4Net>() {
            Ok(n) => Some(n.trunc()),
            Err(_) => {
                self.err(path, format!("{s:?} is not an IPv4 CIDR"));
                None
            }
        }
    }

    fn v6_cidr(&mut self, path: String, s: &str) -> Option<Ipv6Net> {
        match s.parse::<Ipv6Net>() {
            Ok(n) => Some(n.trunc()),
            Err(_) => {
                self.err(path, format!("{s:?} is not an IPv6 CIDR"));
                None
            }
        }
    }

    fn prefix_lists(&mut self, model: &Model) -> BTreeMap<String, Vec<IpNet>> {
        let mut seen = BTreeMap::new();
        let mut out = BTreeMap::new();
        for (i, pl) in model.prefix_lists.iter().enumerate() {
            let base = format!("PrefixLists[{}]", label(&pl.prefix_list_id, i));
            let ok = self.id(
                format!("{base}.PrefixListId"),
                &pl.prefix_list_id,
                &mut seen,
                i,
            );
            let mut nets = BTreeSet::new();
            for (k, e) in pl.entries.iter().enumerate() {
                match e.cidr.parse::<IpNet>() {
                    Ok(n) => {
                        nets.insert(n.trunc());
                    }
                    Err(_) => self.err(
                        format!("{base}.Entries[{k}].Cidr"),
                        format!("{:?} is not a CIDR", e.cidr),
                    ),
                }
            }
            if ok {
                out.insert(pl.prefix_list_id.clone(), nets.into_iter().collect());
            }
        }
        out
    }

    fn subnets(&mut self, model: &Model) -> Vec<CheckedSubnet> {
        let mut seen = BTreeMap::new();
        let mut bridges: BTreeMap<&str, String> = BTreeMap::new();
        let mut out: Vec<CheckedSubnet> = Vec::new();
        for (i, s) in model.subnets.iter().enumerate() {
            let base = format!("Subnets[{}]", label(&s.subnet_id, i));
            let id_ok = self.id(format!("{base}.SubnetId"), &s.subnet_id, &mut seen, i);
            let v4 = self.v4_cidr(format!("{base}.CidrBlock"), &s.cidr_block);
            let v6 = s
                .ipv6_cidr_block
                .as_deref()
                .map(|c| self.v6_cidr(format!("{base}.Ipv6CidrBlock"), c));
            if !is_valid_ifname(&s.bridge) {
                self.err(
                    format!("{base}.Bridge"),
                    format!("{:?} {IFNAME_RULE}", s.bridge),
                );
            } else if let Some(other) = bridges.get(s.bridge.as_str()) {
                self.err(
                    format!("{base}.Bridge"),
                    format!("{:?} is already the bridge of {other}", s.bridge),
                );
            } else {
                bridges.insert(&s.bridge, base.clone());
            }
            let mut dns = Vec::new();
            for (k, d) in s.dns_address.iter().enumerate() {
                let path = if s.dns_address.len() == 1 {
                    format!("{base}.DnsAddress")
                } else {
                    format!("{base}.DnsAddress[{k}]")
                };
                match d.parse::<IpAddr>() {
                    Ok(a) => dns.push(a),
                    Err(_) => self.err(path, format!("{d:?} is not an IP address")),
                }
            }
            dns.sort();
            dns.dedup();
            // Overlapping subnets would make "which subnet is this address in" ambiguous.
            if let Some(v4) = v4 {
                for o in &out {
                    if o.firewall.cidr_v4.contains(&v4.network())
                        || v4.contains(&o.firewall.cidr_v4.network())
                    {
                        self.err(
                            format!("{base}.CidrBlock"),
                            format!(
                                "{:?} overlaps {}.CidrBlock {}",
                                s.cidr_block, o.path, o.firewall.cidr_v4
                            ),
                        );
                    }
                }
            }
            if let Some(Some(v6)) = v6 {
                for o in &out {
                    if let Some(ov6) = o.firewall.cidr_v6
                        && (ov6.contains(&v6.network()) || v6.contains(&ov6.network()))
                    {
                        self.err(
                            format!("{base}.Ipv6CidrBlock"),
                            format!(
                                "{:?} overlaps {}.Ipv6CidrBlock {ov6}",
                                s.ipv6_cidr_block.as_deref().unwrap_or(""),
                                o.path
                            ),
                        );
                    }
                }
            }
            if let (true, Some(v4), None | Some(Some(_))) = (id_ok, v4, v6) {
                out.push(CheckedSubnet {
                    firewall: SubnetFirewall {
                        id: s.subnet_id.clone(),
                        bridge: s.bridge.clone(),
                        cidr_v4: v4,
                        cidr_v6: v6.flatten(),
                        dns,
                        nacl_id: String::new(),
                        inbound: Vec::new(),
                        outbound: Vec::new(),
                    },
                    path: base,
                    nacl: None,
                });
            }
        }
        out
    }

    fn instances(
        &mut self,
        model: &Model,
        subnets: &[CheckedSubnet],
        group_ids: &BTreeSet<&str>,
    ) -> Vec<ValidInstance> {
        let mut seen = BTreeMap::new();
        let mut owners: BTreeMap<IpAddr, String> = BTreeMap::new();
        let mut interfaces: BTreeMap<&str, String> = BTreeMap::new();
        let mut out = Vec::new();
        let subnet_ids: BTreeSet<&str> =
            model.subnets.iter().map(|s| s.subnet_id.as_str()).collect();
        for (i, inst) in model.instances.iter().enumerate() {
            let base = format!("Instances[{}]", label(&inst.instance_id, i));
            let id_ok = self.id(
                format!("{base}.InstanceId"),
                &inst.instance_id,
                &mut seen,
                i,
            );
            let subnet = subnets.iter().find(|s| s.firewall.id == inst.subnet_id);
            if subnet.is_none() && !subnet_ids.contains(inst.subnet_id.as_str()) {
                self.err(
                    format!("{base}.SubnetId"),
                    format!("{:?} is not a subnet of the model", inst.subnet_id),
                );
            }
            let mut addrs = Vec::new();
            let v4_items =
                std::iter::once((format!("{base}.PrivateIpAddress"), &inst.private_ip_address))
                    .chain(
                        inst.secondary_private_ip_addresses
                            .iter()
                            .enumerate()
                            .map(|(k, a)| (format!("{base}.SecondaryPrivateIpAddresses[{k}]"), a)),
                    );
            for (path, s) in v4_items {
                let Ok(a) = s.parse::<Ipv4Addr>() else {
                    self.err(path, format!("{s:?} is not an IPv4 address"));
                    continue;
                };
                if let Some(sub) = subnet
                    && !sub.firewall.cidr_v4.contains(&a)
                {
                    self.err(
                        path.clone(),
                        format!(
                            "{s:?} is not inside its subnet's CidrBlock {}",
                            sub.firewall.cidr_v4
                        ),
                    );
                }
                self.claim_addr(&mut owners, IpAddr::V4(a), path, &base, s, &mut addrs);
            }
            for (k, s) in inst.ipv6_addresses.iter().enumerate() {
                let path = format!("{base}.Ipv6Addresses[{k}]");
                let Ok(a) = s.parse::<Ipv6Addr>() else {
                    self.err(path, format!("{s:?} is not an IPv6 address"));
                    continue;
                };
                if let Some(sub) = subnet {
                    match sub.firewall.cidr_v6 {
                        None => self.err(
                            path.clone(),
                            format!("{s:?}: its subnet has no Ipv6CidrBlock"),
                        ),
                        Some(n) if !n.contains(&a) => self.err(
                            path.clone(),
                            format!("{s:?} is not inside its subnet's Ipv6CidrBlock {n}"),
                        ),
                        Some(_) => {}
                    }
                }
                self.claim_addr(&mut owners, IpAddr::V6(a), path, &base, s, &mut addrs);
            }
            addrs.sort();

            let n = inst.security_group_ids.len();
            if n == 0 || n > MAX_SGS_PER_INTERFACE {
                self.err(
                    format!("{base}.SecurityGroupIds"),
                    format!(
                        "an instance needs 1 to {MAX_SGS_PER_INTERFACE} security groups, found {n}"
                    ),
                );
            } else if n > QUOTA_SGS_PER_INTERFACE {
                self.warn(
                    format!("{base}.SecurityGroupIds"),
                    format!("{n} security groups exceed AWS's default quota of {QUOTA_SGS_PER_INTERFACE} per interface"),
                );
            }
            let mut groups: Vec<String> = Vec::new();
            for (k, g) in inst.security_group_ids.iter().enumerate() {
                let path = format!("{base}.SecurityGroupIds[{k}]");
                if !group_ids.contains(g.as_str()) {
                    self.err(path, format!("{g:?} is not a security group of the model"));
                } else if groups.contains(g) {
                    self.err(path, format!("{g:?} is listed twice"));
                } else {
                    groups.push(g.clone());
                }
            }
            if let Some(ifname) = &inst.interface {
                let path = format!("{base}.Interface");
                if !is_valid_ifname(ifname) {
                    self.err(path, format!("{ifname:?} {IFNAME_RULE}"));
                } else if let Some(other) = interfaces.get(ifname.as_str()) {
                    self.err(
                        path,
                        format!("{ifname:?} is already the interface of {other}"),
                    );
                } else if model.subnets.iter().any(|s| &s.bridge == ifname) {
                    self.err(
                        path,
                        format!("{ifname:?} is a subnet's bridge, not an instance port"),
                    );
                } else {
                    interfaces.insert(ifname, base.clone());
                }
            }
            if id_ok && let Some(sub) = subnet {
                out.push(ValidInstance {
                    id: inst.instance_id.clone(),
                    subnet_id: sub.firewall.id.clone(),
                    addrs,
                    interface: inst.interface.clone(),
                    groups,
                });
            }
        }
        out
    }

    fn claim_addr(
        &mut self,
        owners: &mut BTreeMap<IpAddr, String>,
        a: IpAddr,
        path: String,
        owner: &str,
        text: &str,
        addrs: &mut Vec<IpAddr>,
    ) {
        if let Some(other) = owners.get(&a) {
            self.err(path, format!("{text:?} is already used by {other}"));
        } else {
            owners.insert(a, owner.to_owned());
            addrs.push(a);
        }
    }

    /// A DNS address that is an instance's would make that instance unfiltered.
    fn dns_not_instance(&mut self, subnets: &[CheckedSubnet], instances: &[ValidInstance]) {
        for s in subnets {
            for d in &s.firewall.dns {
                if let Some(i) = instances.iter().find(|i| i.addrs.contains(d)) {
                    self.err(
                        format!("{}.DnsAddress", s.path),
                        format!("\"{d}\" is an address of instance {}: its traffic would never be filtered", i.id),
                    );
                }
            }
        }
    }

    fn groups(
        &mut self,
        model: &Model,
        prefix_lists: &BTreeMap<String, Vec<IpNet>>,
    ) -> BTreeMap<String, ValidGroup> {
        let mut seen = BTreeMap::new();
        let group_ids: BTreeSet<&str> = model
            .security_groups
            .iter()
            .map(|g| g.group_id.as_str())
            .collect();
        let pl_ids: BTreeSet<&str> = model
            .prefix_lists
            .iter()
            .map(|p| p.prefix_list_id.as_str())
            .collect();
        let mut out = BTreeMap::new();
        for (i, g) in model.security_groups.iter().enumerate() {
            let base = format!("SecurityGroups[{}]", label(&g.group_id, i));
            let ok = self.id(format!("{base}.GroupId"), &g.group_id, &mut seen, i);
            let mut vg = ValidGroup::default();
            for (list, perms, dst) in [
                ("IpPermissions", &g.ip_permissions, &mut vg.ingress),
                (
                    "IpPermissionsEgress",
                    &g.ip_permissions_egress,
                    &mut vg.egress,
                ),
            ] {
                let (mut n4, mut n6) = (0usize, 0usize);
                for (k, p) in perms.iter().enumerate() {
                    let path = format!("{base}.{list}[{k}]");
                    n4 += p.ip_ranges.len() + p.user_id_group_pairs.len() + p.prefix_list_ids.len();
                    n6 +=
                        p.ipv6_ranges.len() + p.user_id_group_pairs.len() + p.prefix_list_ids.len();
                    if let Some(vp) = self.permission(&path, p, &group_ids, &pl_ids, prefix_lists) {
                        dst.push(vp);
                    }
                }
                for (family, n) in [("IPv4", n4), ("IPv6", n6)] {
                    if n > QUOTA_SG_RULES {
                        self.warn(
                            format!("{base}.{list}"),
                            format!("{n} {family} rules exceed AWS's default quota of {QUOTA_SG_RULES} per group and direction"),
                        );
                    }
                }
            }
            if ok {
                out.insert(g.group_id.clone(), vg);
            }
        }
        out
    }

    fn permission(
        &mut self,
        path: &str,
        p: &IpPermission,
        group_ids: &BTreeSet<&str>,
        pl_ids: &BTreeSet<&str>,
        prefix_lists: &BTreeMap<String, Vec<IpNet>>,
    ) -> Option<ValidPermission> {
        let matcher = self.sg_match(path, p);
        let mut remotes = Vec::new();
        for (k, r) in p.ip_ranges.iter().enumerate() {
            if let Some(n) = self.v4_cidr(format!("{path}.IpRanges[{k}].CidrIp"), &r.cidr_ip) {
                remotes.push(ValidRemote::Cidr(IpNet::V4(n)));
            }
        }
        for (k, r) in p.ipv6_ranges.iter().enumerate() {
            if let Some(n) = self.v6_cidr(format!("{path}.Ipv6Ranges[{k}].CidrIpv6"), &r.cidr_ipv6)
            {
                remotes.push(ValidRemote::Cidr(IpNet::V6(n)));
            }
        }
        for (k, r) in p.user_id_group_pairs.iter().enumerate() {
            if group_ids.contains(r.group_id.as_str()) {
                remotes.push(ValidRemote::Group(r.group_id.clone()));
            } else {
                self.err(
                    format!("{path}.UserIdGroupPairs[{k}].GroupId"),
                    format!("{:?} is not a security group of the model", r.group_id),
                );
            }
        }
        for (k, r) in p.prefix_list_ids.iter().enumerate() {
            if pl_ids.contains(r.prefix_list_id.as_str()) {
                if prefix_lists
                    .get(&r.prefix_list_id)
                    .is_some_and(|v| v.is_empty())
                {
                    self.warn(
                        format!("{path}.PrefixListIds[{k}].PrefixListId"),
                        format!(
                            "{:?} has no entries: this remote matches nothing",
                            r.prefix_list_id
                        ),
                    );
                }
                remotes.push(ValidRemote::PrefixList(r.prefix_list_id.clone()));
            } else {
                self.err(
                    format!("{path}.PrefixListIds[{k}].PrefixListId"),
                    format!("{:?} is not a prefix list of the model", r.prefix_list_id),
                );
            }
        }
        if p.ip_ranges.is_empty()
            && p.ipv6_ranges.is_empty()
            && p.user_id_group_pairs.is_empty()
            && p.prefix_list_ids.is_empty()
        {
            self.warn(path, "has no IpRanges, Ipv6Ranges, UserIdGroupPairs or PrefixListIds: it matches nothing");
        }
        Some(ValidPermission {
            matcher: matcher?,
            remotes,
        })
    }

    /// The canonical matcher of a security-group permission.
    fn sg_match(&mut self, path: &str, p: &IpPermission) -> Option<Match> {
        let proto_path = format!("{path}.IpProtocol");
        let proto = match p.ip_protocol.to_ascii_lowercase().as_str() {
            "tcp" => PROTO_TCP,
            "udp" => PROTO_UDP,
            "icmp" => PROTO_ICMP,
            "icmpv6" => PROTO_ICMPV6,
            other => {
                match other.parse::<i64>() {
                    Ok(-1) => {
                        self.ports_ignored(path, "-1", p.from_port, p.to_port);
                        return Some(Match::All);
                    }
                    Ok(n) => match u8::try_from(n) {
                        Ok(n) => n,
                        Err(_) => {
                            self.err(
                                proto_path,
                                format!("{n} is not a protocol number (0-255, or -1 for all)"),
                            );
                            return None;
                        }
                    },
                    Err(_) => {
                        self.err(
                        proto_path,
                        format!("{:?} is not a protocol (tcp, udp, icmp, icmpv6, -1 or a number 0-255)", p.ip_protocol),
                    );
                        return None;
                    }
                }
            }
        };
        let (from_path, to_path) = (format!("{path}.FromPort"), format!("{path}.ToPort"));
        match proto {
            PROTO_TCP | PROTO_UDP => {
                let name = if proto == PROTO_TCP { "tcp" } else { "udp" };
                let (Some(from), Some(to)) = (p.from_port, p.to_port) else {
                    let missing = if p.from_port.is_none() {
                        from_path
                    } else {
                        to_path
                    };
                    self.err(missing, format!("missing: protocol {name} needs FromPort and ToPort (-1 and -1 for all ports)"));
                    return None;
                };
                self.port_range(&from_path, &to_path, from, to, proto, true)
            }
            PROTO_ICMP | PROTO_ICMPV6 => {
                let name = if proto == PROTO_ICMP {
                    "icmp"
                } else {
                    "icmpv6"
                };
                let (from, to) = match (p.from_port, p.to_port) {
                    (Some(f), Some(t)) => (f, t),
                    (None, None) if proto == PROTO_ICMPV6 => (-1, -1),
                    (f, _) => {
                        let missing = if f.is_none() { from_path } else { to_path };
                        self.err(missing, format!("missing: protocol {name} needs FromPort (ICMP type) and ToPort (ICMP code), -1 for any"));
                        return None;
                    }
                };
                self.icmp_type_code(&from_path, &to_path, "FromPort", from, to, proto)
            }
            other => {
                self.ports_ignored(path, &other.to_string(), p.from_port, p.to_port);
                Some(Match::Proto(other))
            }
        }
    }

    /// Ports given with a protocol that has none are ignored, as in EC2; say so
    /// rather than let someone believe they narrow the rule.
    fn ports_ignored(&mut self, path: &str, proto: &str, from: Option<i64>, to: Option<i64>) {
        if from.is_some_and(|f| f != -1) || to.is_some_and(|t| t != -1) {
            self.warn(
                path,
                format!(
                    "FromPort/ToPort are ignored for protocol {proto}: the rule matches all ports"
                ),
            );
        }
    }

    /// A TCP/UDP port range; `allow_minus_one`: `-1`/`-1` means all (SG only).
    fn port_range(
        &mut self,
        from_path: &str,
        to_path: &str,
        from: i64,
        to: i64,
        proto: u8,
        allow_minus_one: bool,
    ) -> Option<Match> {
        if allow_minus_one && from == -1 && to == -1 {
            return Some(Match::Proto(proto));
        }
        let mut ok = true;
        for (path, v) in [(from_path, from), (to_path, to)] {
            if !(0..=65535).contains(&v) {
                let also = if allow_minus_one {
                    " (or -1 with -1 for all)"
                } else {
                    ""
                };
                self.err(path, format!("{v} is not a port (0-65535){also}"));
                ok = false;
            }
        }
        if !ok {
            return None;
        }
        if from > to {
            self.err(
                from_path,
                format!("{from} is greater than the end of the range, {to}"),
            );
            return None;
        }
        Some(if from == 0 && to == 65535 {
            Match::Proto(proto)
        } else {
            Match::Ports {
                proto,
                from: from as u16,
                to: to as u16,
            }
        })
    }

    fn icmp_type_code(
        &mut self,
        type_path: &str,
        code_path: &str,
        type_field: &str,
        t: i64,
        c: i64,
        proto: u8,
    ) -> Option<Match> {
        let mut ok = true;
        for (path, v, what) in [
            (type_path, t, "an ICMP type"),
            (code_path, c, "an ICMP code"),
        ] {
            if !(-1..=255).contains(&v) {
                self.err(path, format!("{v} is not {what} (0-255, or -1 for any)"));
                ok = false;
            }
        }
        if !ok {
            return None;
        }
        if t == -1 && c != -1 {
            self.err(
                code_path,
                format!("ICMP code {c} without an ICMP type ({type_field} is -1)"),
            );
            return None;
        }
        let opt = |v: i64| u8::try_from(v).ok();
        Some(Match::Icmp {
            proto,
            icmp_type: opt(t),
            code: opt(c),
        })
    }

    fn nacls(&mut self, model: &Model, subnets: &mut [CheckedSubnet]) {
        let mut seen = BTreeMap::new();
        let mut default: Option<(String, Vec<NaclEntry>, Vec<NaclEntry>)> = None;
        let mut default_path: Option<String> = None;
        for (i, acl) in model.network_acls.iter().enumerate() {
            let base = format!("NetworkAcls[{}]", label(&acl.network_acl_id, i));
            let ok = self.id(
                format!("{base}.NetworkAclId"),
                &acl.network_acl_id,
                &mut seen,
                i,
            );
            let (inbound, outbound) = self.nacl_entries(&base, &acl.entries);
            if acl.is_default {
                if let Some(first) = &default_path {
                    self.err(
                        format!("{base}.IsDefault"),
                        format!("only one NACL can be the default (also {first})"),
                    );
                } else {
                    default_path = Some(base.clone());
                    default = Some((
                        acl.network_acl_id.clone(),
                        inbound.clone(),
                        outbound.clone(),
                    ));
                }
            }
            for (k, assoc) in acl.associations.iter().enumerate() {
                let path = format!("{base}.Associations[{k}].SubnetId");
                if !model.subnets.iter().any(|s| s.subnet_id == assoc.subnet_id) {
                    self.err(
                        path,
                        format!("{:?} is not a subnet of the model", assoc.subnet_id),
                    );
                    continue;
                }
                let Some(sub) = subnets
                    .iter_mut()
                    .find(|s| s.firewall.id == assoc.subnet_id)
                else {
                    continue;
                };
                if let Some(other) = &sub.nacl {
                    self.err(
                        path,
                        format!("{:?} is already associated with {other}", assoc.subnet_id),
                    );
                    continue;
                }
                sub.nacl = Some(base.clone());
                if ok {
                    sub.firewall.nacl_id = acl.network_acl_id.clone();
                    sub.firewall.inbound = inbound.clone();
                    sub.firewall.outbound = outbound.clone();
                }
            }
        }
        for sub in subnets.iter_mut().filter(|s| s.nacl.is_none()) {
            match &default {
                Some((id, inbound, outbound)) => {
                    sub.firewall.nacl_id = id.clone();
                    sub.firewall.inbound = inbound.clone();
                    sub.firewall.outbound = outbound.clone();
                }
                None => {
                    // AWS's default NACL: rule 100 allows all IPv4, rule 101 all IPv6.
                    let mut entries = vec![NaclEntry {
                        rule_number: 100,
                        action: RuleAction::Allow,
                        cidr: IpNet::V4(Ipv4Net::default()),
                        matcher: Match::All,
                    }];
                    if sub.firewall.cidr_v6.is_some() {
                        entries.push(NaclEntry {
                            rule_number: 101,
                            action: RuleAction::Allow,
                            cidr: IpNet::V6(Ipv6Net::default()),
                            matcher: Match::All,
                        });
                    }
                    sub.firewall.nacl_id = IMPLICIT_DEFAULT_NACL_ID.to_owned();
                    sub.firewall.inbound = entries.clone();
                    sub.firewall.outbound = entries;
                }
            }
        }
    }

    /// (inbound, outbound), each sorted by rule number; EC2's `*` entries dropped.
    fn nacl_entries(
        &mut self,
        base: &str,
        entries: &[NetworkAclEntry],
    ) -> (Vec<NaclEntry>, Vec<NaclEntry>) {
        let mut inbound: Vec<NaclEntry> = Vec::new();
        let mut outbound: Vec<NaclEntry> = Vec::new();
        let mut numbers: [BTreeMap<i64, usize>; 2] = [BTreeMap::new(), BTreeMap::new()];
        let mut counts: BTreeMap<(bool, bool), usize> = BTreeMap::new();
        for (k, e) in entries.iter().enumerate() {
            let path = format!("{base}.Entries[{k}]");
            let dir = if e.egress { "outbound" } else { "inbound" };
            let action = match e.rule_action.as_str() {
                "allow" => Some(RuleAction::Allow),
                "deny" => Some(RuleAction::Deny),
                other => {
                    self.err(
                        format!("{path}.RuleAction"),
                        format!("{other:?} is not allow or deny"),
                    );
                    None
                }
            };
            if e.rule_number == 32767 || e.rule_number == 32768 {
                // EC2 prints the implicit deny as rule 32767 (IPv4) / 32768 (IPv6).
                if action != Some(RuleAction::Deny) || e.protocol != "-1" {
                    self.err(
                        format!("{path}.RuleNumber"),
                        format!("{} is EC2's implicit-deny entry: only RuleAction deny with Protocol -1 is accepted", e.rule_number),
                    );
                }
                continue;
            }
            let mut ok = action.is_some();
            if !(1..=32766).contains(&e.rule_number) {
                self.err(
                    format!("{path}.RuleNumber"),
                    format!("{} is not a rule number (1-32766)", e.rule_number),
                );
                ok = false;
            } else if let Some(first) = numbers[usize::from(e.egress)].get(&e.rule_number) {
                self.err(
                    format!("{path}.RuleNumber"),
                    format!(
                        "{} is used twice in the {dir} entries (also Entries[{first}])",
                        e.rule_number
                    ),
                );
                ok = false;
            } else {
                numbers[usize::from(e.egress)].insert(e.rule_number, k);
            }
            let cidr = match (&e.cidr_block, &e.ipv6_cidr_block) {
                (Some(c), None) => self.v4_cidr(format!("{path}.CidrBlock"), c).map(IpNet::V4),
                (None, Some(c)) => self
                    .v6_cidr(format!("{path}.Ipv6CidrBlock"), c)
                    .map(IpNet::V6),
                (None, None) => {
                    self.err(path.clone(), "needs a CidrBlock or an Ipv6CidrBlock");
                    None
                }
                (Some(_), Some(_)) => {
                    self.err(
                        path.clone(),
                        "has both a CidrBlock and an Ipv6CidrBlock; an entry is for one family",
                    );
                    None
                }
            };
            let matcher = cidr.and_then(|c| self.nacl_match(&path, e, c.addr().is_ipv6()));
            if let (true, Some(action), Some(cidr), Some(matcher)) = (ok, action, cidr, matcher) {
                *counts.entry((e.egress, cidr.addr().is_ipv6())).or_default() += 1;
                let entry = NaclEntry {
                    rule_number: e.rule_number as u16,
                    action,
                    cidr,
                    matcher,
                };
                if e.egress {
                    outbound.push(entry)
                } else {
                    inbound.push(entry)
                }
            }
        }
        for ((egress, v6), n) in counts {
            if n > QUOTA_NACL_RULES {
                let dir = if egress { "outbound" } else { "inbound" };
                let family = if v6 { "IPv6" } else { "IPv4" };
                self.warn(
                    format!("{base}.Entries"),
                    format!("{n} {dir} {family} entries exceed AWS's default quota of {QUOTA_NACL_RULES}"),
                );
            }
        }
        inbound.sort_by_key(|e| e.rule_number);
        outbound.sort_by_key(|e| e.rule_number);
        (inbound, outbound)
    }

    fn nacl_match(&mut self, path: &str, e: &NetworkAclEntry, v6: bool) -> Option<Match> {
        let proto = match e.protocol.to_ascii_lowercase().as_str() {
            "tcp" => PROTO_TCP,
            "udp" => PROTO_UDP,
            "icmp" => PROTO_ICMP,
            "icmpv6" => PROTO_ICMPV6,
            s => match s.parse::<i64>() {
                Ok(-1) => {
                    self.nacl_fields_ignored(path, e, "-1");
                    return Some(Match::All);
                }
                Ok(n) if (0..=255).contains(&n) => n as u8,
                _ => {
                    self.err(
                        format!("{path}.Protocol"),
                        format!(
                            "{:?} is not a protocol number (0-255, or -1 for all)",
                            e.protocol
                        ),
                    );
                    return None;
                }
            },
        };
        match proto {
            PROTO_TCP | PROTO_UDP => {
                let range = e.port_range.as_ref();
                let (Some(from), Some(to)) = (range.and_then(|r| r.from), range.and_then(|r| r.to))
                else {
                    self.err(
                        format!("{path}.PortRange"),
                        format!("missing: protocol {proto} needs PortRange From and To"),
                    );
                    return None;
                };
                self.port_range(
                    &format!("{path}.PortRange.From"),
                    &format!("{path}.PortRange.To"),
                    from,
                    to,
                    proto,
                    false,
                )
            }
            PROTO_ICMP | PROTO_ICMPV6 if proto == PROTO_ICMP || v6 => {
                let tc = e.icmp_type_code.as_ref();
                let (Some(t), Some(c)) = (tc.and_then(|x| x.r#type), tc.and_then(|x| x.code))
                else {
                    self.err(
                        format!("{path}.IcmpTypeCode"),
                        format!("missing: protocol {proto} needs IcmpTypeCode Type and Code (-1 for any)"),
                    );
                    return None;
                };
                self.icmp_type_code(
                    &format!("{path}.IcmpTypeCode.Type"),
                    &format!("{path}.IcmpTypeCode.Code"),
                    "Type",
                    t,
                    c,
                    proto,
                )
            }
            // Protocol 58 with an IPv4 CIDR matches all ICMPv6 (SEMANTICS.md).
            other => {
                self.nacl_fields_ignored(path, e, &other.to_string());
                Some(Match::Proto(other))
            }
        }
    }

    fn nacl_fields_ignored(&mut self, path: &str, e: &NetworkAclEntry, proto: &str) {
        let ports = e
            .port_range
            .as_ref()
            .is_some_and(|r| r.from.is_some_and(|v| v != -1) || r.to.is_some_and(|v| v != -1));
        let icmp = e
            .icmp_type_code
            .as_ref()
            .is_some_and(|r| r.r#type.is_some_and(|v| v != -1) || r.code.is_some_and(|v| v != -1));
        if ports || icmp {
            self.warn(path, format!("PortRange/IcmpTypeCode are ignored for protocol {proto}: the entry matches all of it"));
        }
    }

    fn timeouts(&mut self, model: &Model) -> ConntrackTimeouts {
        let mut t = ConntrackTimeouts::default();
        let Some(ct) = &model.connection_tracking else {
            return t;
        };
        for (name, value, lo, hi, slot) in [
            (
                "TcpEstablishedTimeout",
                ct.tcp_established_timeout,
                60,
                432_000,
                &mut t.tcp_established,
            ),
            (
                "UdpStreamTimeout",
                ct.udp_stream_timeout,
                60,
                180,
                &mut t.udp_stream,
            ),
            ("UdpTimeout", ct.udp_timeout, 30, 60, &mut t.udp),
        ] {
            if let Some(v) = value {
                if (lo..=hi).contains(&v) {
                    *slot = v as u32;
                } else {
                    self.err(
                        format!("ConnectionTracking.{name}"),
                        format!("{v} is out of range ({lo}-{hi} seconds)"),
                    );
                }
            }
        }
        t
    }
}
