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

use crate::model::{IpPermission, Model, NetworkAclEntry};
pub use crate::policy::ValidModel;
use crate::policy::{
    ConntrackTimeouts, Match, NaclEntry, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
    RuleAction, SubnetFirewall, ValidGroup, ValidInstance, ValidPermission, ValidRemote,
};

/// AWS default quota: rules per security group, per direction, per address family.
pub const QUOTA_SG_RULES: usize = 60;
/// AWS default quota: security groups per network interface.
pub const QUOTA_SGS_PER_INTERFACE: usize = 5;
/// AWS hard limit on security groups per network interface (an error beyond it).
pub const MAX_SGS_PER_INTERFACE: usize = 16;
/// AWS limit: security-group rules per network interface (groups x rules per group).
pub const QUOTA_RULES_PER_INTERFACE: usize = 1000;
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
    c.rules_per_interface(model);
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
            let list = path.split('[').next().unwrap_or_default().to_owned();
            self.err(
                path,
                format!("{id:?} is a duplicate id (also {list}[{first}])"),
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

    /// AWS: rules per group x groups per interface may not exceed 1000; here
    /// the actual rules an interface gets, per direction and family (a warning).
    fn rules_per_interface(&mut self, model: &Model) {
        for (i, inst) in model.instances.iter().enumerate() {
            let mut counts = [0usize; 4];
            for g in model
                .security_groups
                .iter()
                .filter(|g| inst.security_group_ids.contains(&g.group_id))
            {
                for (k, perms) in [&g.ip_permissions, &g.ip_permissions_egress]
                    .into_iter()
                    .enumerate()
                {
                    for p in perms {
                        let refs = p.user_id_group_pairs.len() + p.prefix_list_ids.len();
                        counts[2 * k] += p.ip_ranges.len() + refs;
                        counts[2 * k + 1] += p.ipv6_ranges.len() + refs;
                    }
                }
            }
            for (n, what) in counts.into_iter().zip([
                "IPv4 inbound",
                "IPv6 inbound",
                "IPv4 outbound",
                "IPv6 outbound",
            ]) {
                if n > QUOTA_RULES_PER_INTERFACE {
                    self.warn(
                        format!("Instances[{}].SecurityGroupIds", label(&inst.instance_id, i)),
                        format!("{n} {what} rules across its groups exceed AWS's limit of {QUOTA_RULES_PER_INTERFACE} per interface"),
                    );
                }
            }
        }
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
                    ", or -1 and -1 for all ports"
                } else {
                    ""
                };
                self.err(path, format!("{v} is not a port (0-65535{also})"));
                ok = false;
            }
        }
        if !ok {
            return None;
        }
        if from > to {
            let to_name = to_path.rsplit('.').next().unwrap_or_default();
            self.err(from_path, format!("{from} is greater than {to_name} {to}"));
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
            // Protocol 58 with an IPv4 CIDR matches all ICMPv6 (docs/semantics.md).
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

#[cfg(test)]
mod tests {
    //! Every bad input gets its own test and its exact message (docs/semantics.md,
    //! "Addresses and inputs": "an error that names the field and value").
    use super::*;
    use crate::model::{Instance, IpPermission, SecurityGroup};

    const BASE: &str = r#"{
     "Subnets": [
       {"SubnetId": "subnet-a", "CidrBlock": "10.0.1.0/24", "Ipv6CidrBlock": "fd00:1::/64", "Bridge": "br-a", "DnsAddress": "10.0.0.2"},
       {"SubnetId": "subnet-b", "CidrBlock": "10.0.2.0/24", "Bridge": "br-b"}],
     "Instances": [
       {"InstanceId": "i-web", "SubnetId": "subnet-a", "PrivateIpAddress": "10.0.1.10", "Ipv6Addresses": ["fd00:1::10"], "SecurityGroupIds": ["sg-web"], "Interface": "veth-web"},
       {"InstanceId": "i-db", "SubnetId": "subnet-b", "PrivateIpAddress": "10.0.2.20", "SecurityGroupIds": ["sg-db"]}],
     "SecurityGroups": [
       {"GroupId": "sg-web", "IpPermissions": [
          {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "0.0.0.0/0"}, {"CidrIp": "10.0.0.0/8"}]},
          {"IpProtocol": "icmp", "FromPort": 8, "ToPort": -1, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
        "IpPermissionsEgress": [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]},
       {"GroupId": "sg-db", "IpPermissions": [{"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "UserIdGroupPairs": [{"GroupId": "sg-web"}], "PrefixListIds": [{"PrefixListId": "pl-admin"}]}]}],
     "NetworkAcls": [{"NetworkAclId": "acl-a", "Associations": [{"SubnetId": "subnet-a"}], "Entries": [
       {"RuleNumber": 100, "Protocol": "6", "RuleAction": "allow", "Egress": false, "CidrBlock": "0.0.0.0/0", "PortRange": {"From": 443, "To": 443}},
       {"RuleNumber": 110, "Protocol": "1", "RuleAction": "allow", "Egress": false, "CidrBlock": "0.0.0.0/0", "IcmpTypeCode": {"Type": -1, "Code": -1}},
       {"RuleNumber": 100, "Protocol": "-1", "RuleAction": "allow", "Egress": true, "CidrBlock": "0.0.0.0/0"},
       {"RuleNumber": 32767, "Protocol": "-1", "RuleAction": "deny", "Egress": true, "CidrBlock": "0.0.0.0/0"}]}],
     "PrefixLists": [{"PrefixListId": "pl-admin", "Entries": [{"Cidr": "192.0.2.0/24"}, {"Cidr": "2001:db8::/32"}]}]
    }"#;

    fn check(json: &str) -> Result<(ValidModel, Vec<Warning>), ValidationErrors> {
        validate(&Model::from_json(json).unwrap())
    }

    /// The error lines for BASE with `old` replaced by `new` (exactly once).
    fn errors_with(old: &str, new: &str) -> Vec<String> {
        assert_eq!(
            BASE.matches(old).count(),
            1,
            "{old} must occur once in BASE"
        );
        match check(&BASE.replacen(old, new, 1)) {
            Ok(_) => vec![],
            Err(e) => e.errors.iter().map(ToString::to_string).collect(),
        }
    }

    fn warnings_of(json: &str) -> Vec<String> {
        check(json)
            .unwrap()
            .1
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn base_is_valid_without_warnings() {
        let (_, w) = check(BASE).unwrap();
        assert!(w.is_empty(), "{w:?}");
    }

    macro_rules! bad_input {
        ($($name:ident: $old:expr => $new:expr, [$($want:expr),+ $(,)?];)*) => {$(
            #[test]
            fn $name() {
                assert_eq!(errors_with($old, $new), vec![$($want.to_string()),+]);
            }
        )*};
    }

    bad_input! {
        bad_sg_ipv4_cidr: r#"{"CidrIp": "10.0.0.0/8"}"# => r#"{"CidrIp": "10.0.0.300/24"}"#,
            [r#"SecurityGroups[sg-web].IpPermissions[0].IpRanges[1].CidrIp: "10.0.0.300/24" is not an IPv4 CIDR"#];
        bad_sg_ipv4_cidr_given_ipv6: r#"{"CidrIp": "10.0.0.0/8"}"# => r#"{"CidrIp": "::/0"}"#,
            [r#"SecurityGroups[sg-web].IpPermissions[0].IpRanges[1].CidrIp: "::/0" is not an IPv4 CIDR"#];
        bad_sg_ipv6_cidr: r#""IpPermissionsEgress": [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]"#
            => r#""IpPermissionsEgress": [{"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "10.0.0.0/8"}]}]"#,
            [r#"SecurityGroups[sg-web].IpPermissionsEgress[0].Ipv6Ranges[0].CidrIpv6: "10.0.0.0/8" is not an IPv6 CIDR"#];
        bad_sg_unknown_protocol_name: r#""IpProtocol": "icmp""# => r#""IpProtocol": "gre""#,
            [r#"SecurityGroups[sg-web].IpPermissions[1].IpProtocol: "gre" is not a protocol (tcp, udp, icmp, icmpv6, -1 or a number 0-255)"#];
        bad_sg_protocol_number_out_of_range: r#""IpProtocol": "icmp""# => r#""IpProtocol": "256""#,
            ["SecurityGroups[sg-web].IpPermissions[1].IpProtocol: 256 is not a protocol number (0-255, or -1 for all)"];
        bad_sg_port_out_of_range: r#""FromPort": 443, "ToPort": 443"# => r#""FromPort": 443, "ToPort": 70000"#,
            ["SecurityGroups[sg-web].IpPermissions[0].ToPort: 70000 is not a port (0-65535, or -1 and -1 for all ports)"];
        bad_sg_negative_port: r#""FromPort": 443, "ToPort": 443"# => r#""FromPort": -1, "ToPort": 443"#,
            ["SecurityGroups[sg-web].IpPermissions[0].FromPort: -1 is not a port (0-65535, or -1 and -1 for all ports)"];
        bad_sg_from_greater_than_to: r#""FromPort": 443, "ToPort": 443"# => r#""FromPort": 444, "ToPort": 443"#,
            ["SecurityGroups[sg-web].IpPermissions[0].FromPort: 444 is greater than ToPort 443"];
        bad_sg_tcp_without_ports: r#""FromPort": 5432, "ToPort": 5432"# => r#""FromPort": 5432"#,
            ["SecurityGroups[sg-db].IpPermissions[0].ToPort: missing: protocol tcp needs FromPort and ToPort (-1 and -1 for all ports)"];
        bad_sg_icmp_code_without_type: r#""FromPort": 8, "ToPort": -1"# => r#""FromPort": -1, "ToPort": 4"#,
            ["SecurityGroups[sg-web].IpPermissions[1].ToPort: ICMP code 4 without an ICMP type (FromPort is -1)"];
        bad_sg_icmp_type_out_of_range: r#""FromPort": 8, "ToPort": -1"# => r#""FromPort": 300, "ToPort": -1"#,
            ["SecurityGroups[sg-web].IpPermissions[1].FromPort: 300 is not an ICMP type (0-255, or -1 for any)"];
        bad_sg_icmp_code_out_of_range: r#""FromPort": 8, "ToPort": -1"# => r#""FromPort": 8, "ToPort": 256"#,
            ["SecurityGroups[sg-web].IpPermissions[1].ToPort: 256 is not an ICMP code (0-255, or -1 for any)"];
        bad_sg_icmp_without_type: r#""FromPort": 8, "ToPort": -1"# => r#""ToPort": -1"#,
            ["SecurityGroups[sg-web].IpPermissions[1].FromPort: missing: protocol icmp needs FromPort (ICMP type) and ToPort (ICMP code), -1 for any"];
        bad_sg_unknown_referenced_group: r#"[{"GroupId": "sg-web"}]"# => r#"[{"GroupId": "sg-nope"}]"#,
            [r#"SecurityGroups[sg-db].IpPermissions[0].UserIdGroupPairs[0].GroupId: "sg-nope" is not a security group of the model"#];
        bad_sg_unknown_prefix_list: r#"[{"PrefixListId": "pl-admin"}]"# => r#"[{"PrefixListId": "pl-nope"}]"#,
            [r#"SecurityGroups[sg-db].IpPermissions[0].PrefixListIds[0].PrefixListId: "pl-nope" is not a prefix list of the model"#];
        bad_prefix_list_cidr: r#"{"Cidr": "192.0.2.0/24"}"# => r#"{"Cidr": "192.0.2.0/33"}"#,
            [r#"PrefixLists[pl-admin].Entries[0].Cidr: "192.0.2.0/33" is not a CIDR"#];
        bad_duplicate_security_group_id: r#"{"GroupId": "sg-db", "#=> r#"{"GroupId": "sg-web", "#,
            [r#"Instances[i-db].SecurityGroupIds[0]: "sg-db" is not a security group of the model"#,
             r#"SecurityGroups[sg-web].GroupId: "sg-web" is a duplicate id (also SecurityGroups[0])"#];
        bad_id_characters: r#""InstanceId": "i-db""# => r#""InstanceId": "i-db;drop""#,
            [r#"Instances[1].InstanceId: "i-db;drop" is not a valid id (1-255 characters of A-Z a-z 0-9 . _ -)"#];
        bad_empty_id: r#""NetworkAclId": "acl-a""# => r#""NetworkAclId": """#,
            [r#"NetworkAcls[0].NetworkAclId: "" is not a valid id (1-255 characters of A-Z a-z 0-9 . _ -)"#];
        bad_duplicate_subnet_id: r#""SubnetId": "subnet-b", "CidrBlock""# => r#""SubnetId": "subnet-a", "CidrBlock""#,
            [r#"Subnets[subnet-a].SubnetId: "subnet-a" is a duplicate id (also Subnets[0])"#,
             r#"Instances[i-db].SubnetId: "subnet-b" is not a subnet of the model"#];
        bad_subnet_cidr: r#""CidrBlock": "10.0.2.0/24""# => r#""CidrBlock": "10.0.2.0""#,
            [r#"Subnets[subnet-b].CidrBlock: "10.0.2.0" is not an IPv4 CIDR"#];
        bad_subnet_ipv6_cidr: r#""Ipv6CidrBlock": "fd00:1::/64""# => r#""Ipv6CidrBlock": "fd00:1::/129""#,
            [r#"Subnets[subnet-a].Ipv6CidrBlock: "fd00:1::/129" is not an IPv6 CIDR"#];
        bad_overlapping_subnets: r#""CidrBlock": "10.0.2.0/24""# => r#""CidrBlock": "10.0.0.0/16""#,
            [r#"Subnets[subnet-b].CidrBlock: "10.0.0.0/16" overlaps Subnets[subnet-a].CidrBlock 10.0.1.0/24"#];
        bad_bridge_name_whitespace: r#""Bridge": "br-b""# => r#""Bridge": "br b""#,
            [r#"Subnets[subnet-b].Bridge: "br b" is not a Linux interface name (1-15 characters, no '/', ':', quotes or whitespace)"#];
        bad_bridge_name_too_long: r#""Bridge": "br-b""# => r#""Bridge": "br-0123456789abc""#,
            [r#"Subnets[subnet-b].Bridge: "br-0123456789abc" is not a Linux interface name (1-15 characters, no '/', ':', quotes or whitespace)"#];
        bad_bridge_name_quote: r#""Bridge": "br-b""# => r#""Bridge": "br\"b""#,
            [r#"Subnets[subnet-b].Bridge: "br\"b" is not a Linux interface name (1-15 characters, no '/', ':', quotes or whitespace)"#];
        bad_bridge_shared_by_two_subnets: r#""Bridge": "br-b""# => r#""Bridge": "br-a""#,
            [r#"Subnets[subnet-b].Bridge: "br-a" is already the bridge of Subnets[subnet-a]"#];
        bad_interface_name: r#""Interface": "veth-web""# => r#""Interface": "veth:web""#,
            [r#"Instances[i-web].Interface: "veth:web" is not a Linux interface name (1-15 characters, no '/', ':', quotes or whitespace)"#];
        bad_interface_is_a_bridge: r#""Interface": "veth-web""# => r#""Interface": "br-b""#,
            [r#"Instances[i-web].Interface: "br-b" is a subnet's bridge, not an instance port"#];
        bad_dns_address: r#""DnsAddress": "10.0.0.2""# => r#""DnsAddress": "10.0.0.256""#,
            [r#"Subnets[subnet-a].DnsAddress: "10.0.0.256" is not an IP address"#];
        bad_dns_address_is_an_instance: r#""DnsAddress": "10.0.0.2""# => r#""DnsAddress": "10.0.1.10""#,
            [r#"Subnets[subnet-a].DnsAddress: "10.0.1.10" is an address of instance i-web: its traffic would never be filtered"#];
        bad_instance_subnet: r#""SubnetId": "subnet-b", "PrivateIpAddress""# => r#""SubnetId": "subnet-c", "PrivateIpAddress""#,
            [r#"Instances[i-db].SubnetId: "subnet-c" is not a subnet of the model"#];
        bad_instance_address_outside_subnet: r#""PrivateIpAddress": "10.0.2.20""# => r#""PrivateIpAddress": "10.0.3.20""#,
            [r#"Instances[i-db].PrivateIpAddress: "10.0.3.20" is not inside its subnet's CidrBlock 10.0.2.0/24"#];
        bad_instance_address_not_ipv4: r#""PrivateIpAddress": "10.0.2.20""# => r#""PrivateIpAddress": "fd00::1""#,
            [r#"Instances[i-db].PrivateIpAddress: "fd00::1" is not an IPv4 address"#];
        bad_address_used_twice: r#""PrivateIpAddress": "10.0.2.20""# => r#""PrivateIpAddress": "10.0.2.20", "SecondaryPrivateIpAddresses": ["10.0.2.21", "10.0.2.20"]"#,
            [r#"Instances[i-db].SecondaryPrivateIpAddresses[1]: "10.0.2.20" is already used by Instances[i-db]"#];
        bad_ipv6_address_without_subnet_ipv6: r#""PrivateIpAddress": "10.0.2.20""# => r#""PrivateIpAddress": "10.0.2.20", "Ipv6Addresses": ["fd00:2::20"]"#,
            [r#"Instances[i-db].Ipv6Addresses[0]: "fd00:2::20": its subnet has no Ipv6CidrBlock"#];
        bad_ipv6_address_outside_subnet: r#""Ipv6Addresses": ["fd00:1::10"]"# => r#""Ipv6Addresses": ["fd00:9::10"]"#,
            [r#"Instances[i-web].Ipv6Addresses[0]: "fd00:9::10" is not inside its subnet's Ipv6CidrBlock fd00:1::/64"#];
        bad_ipv6_address_syntax: r#""Ipv6Addresses": ["fd00:1::10"]"# => r#""Ipv6Addresses": ["fd00:1::10::1"]"#,
            [r#"Instances[i-web].Ipv6Addresses[0]: "fd00:1::10::1" is not an IPv6 address"#];
        bad_instance_without_security_groups: r#""SecurityGroupIds": ["sg-db"]"# => r#""SecurityGroupIds": []"#,
            ["Instances[i-db].SecurityGroupIds: an instance needs 1 to 16 security groups, found 0"];
        bad_instance_group_listed_twice: r#""SecurityGroupIds": ["sg-db"]"# => r#""SecurityGroupIds": ["sg-db", "sg-db"]"#,
            [r#"Instances[i-db].SecurityGroupIds[1]: "sg-db" is listed twice"#];
        bad_instance_unknown_group: r#""SecurityGroupIds": ["sg-db"]"# => r#""SecurityGroupIds": ["sg-x"]"#,
            [r#"Instances[i-db].SecurityGroupIds[0]: "sg-x" is not a security group of the model"#];
        bad_nacl_rule_number_zero: r#""RuleNumber": 110"# => r#""RuleNumber": 0"#,
            ["NetworkAcls[acl-a].Entries[1].RuleNumber: 0 is not a rule number (1-32766)"];
        bad_nacl_rule_number_too_big: r#""RuleNumber": 110"# => r#""RuleNumber": 40000"#,
            ["NetworkAcls[acl-a].Entries[1].RuleNumber: 40000 is not a rule number (1-32766)"];
        bad_nacl_duplicate_rule_number: r#""RuleNumber": 110"# => r#""RuleNumber": 100"#,
            ["NetworkAcls[acl-a].Entries[1].RuleNumber: 100 is used twice in the inbound entries (also Entries[0])"];
        bad_nacl_rule_action: r#""RuleAction": "allow", "Egress": true"# => r#""RuleAction": "permit", "Egress": true"#,
            [r#"NetworkAcls[acl-a].Entries[2].RuleAction: "permit" is not allow or deny"#];
        bad_nacl_protocol: r#""Protocol": "6""# => r#""Protocol": "tcpx""#,
            [r#"NetworkAcls[acl-a].Entries[0].Protocol: "tcpx" is not a protocol number (0-255, or -1 for all)"#];
        bad_nacl_missing_port_range: r#", "PortRange": {"From": 443, "To": 443}"# => "",
            ["NetworkAcls[acl-a].Entries[0].PortRange: missing: protocol 6 needs PortRange From and To"];
        bad_nacl_port_range_reversed: r#""PortRange": {"From": 443, "To": 443}"# => r#""PortRange": {"From": 444, "To": 443}"#,
            ["NetworkAcls[acl-a].Entries[0].PortRange.From: 444 is greater than To 443"];
        bad_nacl_port_out_of_range: r#""PortRange": {"From": 443, "To": 443}"# => r#""PortRange": {"From": -1, "To": 443}"#,
            ["NetworkAcls[acl-a].Entries[0].PortRange.From: -1 is not a port (0-65535)"];
        bad_nacl_icmp_code_without_type: r#""IcmpTypeCode": {"Type": -1, "Code": -1}"# => r#""IcmpTypeCode": {"Type": -1, "Code": 3}"#,
            ["NetworkAcls[acl-a].Entries[1].IcmpTypeCode.Code: ICMP code 3 without an ICMP type (Type is -1)"];
        bad_nacl_icmp_missing_type_code: r#", "IcmpTypeCode": {"Type": -1, "Code": -1}"# => "",
            ["NetworkAcls[acl-a].Entries[1].IcmpTypeCode: missing: protocol 1 needs IcmpTypeCode Type and Code (-1 for any)"];
        bad_nacl_without_cidr: r#""RuleNumber": 100, "Protocol": "-1", "RuleAction": "allow", "Egress": true, "CidrBlock": "0.0.0.0/0""#
            => r#""RuleNumber": 100, "Protocol": "-1", "RuleAction": "allow", "Egress": true"#,
            ["NetworkAcls[acl-a].Entries[2]: needs a CidrBlock or an Ipv6CidrBlock"];
        bad_nacl_with_both_cidrs: r#""RuleAction": "allow", "Egress": true, "CidrBlock": "0.0.0.0/0"}"#
            => r#""RuleAction": "allow", "Egress": true, "CidrBlock": "0.0.0.0/0", "Ipv6CidrBlock": "::/0"}"#,
            ["NetworkAcls[acl-a].Entries[2]: has both a CidrBlock and an Ipv6CidrBlock; an entry is for one family"];
        bad_nacl_cidr: r#""Egress": false, "CidrBlock": "0.0.0.0/0", "PortRange""# => r#""Egress": false, "CidrBlock": "0.0.0/0", "PortRange""#,
            [r#"NetworkAcls[acl-a].Entries[0].CidrBlock: "0.0.0/0" is not an IPv4 CIDR"#];
        bad_nacl_star_entry_that_allows: r#""RuleNumber": 32767, "Protocol": "-1", "RuleAction": "deny""# => r#""RuleNumber": 32767, "Protocol": "-1", "RuleAction": "allow""#,
            ["NetworkAcls[acl-a].Entries[3].RuleNumber: 32767 is EC2's implicit-deny entry: only RuleAction deny with Protocol -1 is accepted"];
        bad_nacl_association_unknown_subnet: r#""Associations": [{"SubnetId": "subnet-a"}]"# => r#""Associations": [{"SubnetId": "subnet-z"}]"#,
            [r#"NetworkAcls[acl-a].Associations[0].SubnetId: "subnet-z" is not a subnet of the model"#];
        bad_subnet_associated_twice: r#""Associations": [{"SubnetId": "subnet-a"}]"# => r#""Associations": [{"SubnetId": "subnet-a"}, {"SubnetId": "subnet-a"}]"#,
            [r#"NetworkAcls[acl-a].Associations[1].SubnetId: "subnet-a" is already associated with NetworkAcls[acl-a]"#];
        bad_two_default_nacls: r#""NetworkAclId": "acl-a","# => r#""NetworkAclId": "acl-a", "IsDefault": true}, {"NetworkAclId": "acl-b", "IsDefault": true,"#,
            ["NetworkAcls[acl-b].IsDefault: only one NACL can be the default (also NetworkAcls[acl-a])"];
        bad_tcp_established_timeout: r#""PrefixLists""# => r#""ConnectionTracking": {"TcpEstablishedTimeout": 59}, "PrefixLists""#,
            ["ConnectionTracking.TcpEstablishedTimeout: 59 is out of range (60-432000 seconds)"];
        bad_udp_stream_timeout: r#""PrefixLists""# => r#""ConnectionTracking": {"UdpStreamTimeout": 181}, "PrefixLists""#,
            ["ConnectionTracking.UdpStreamTimeout: 181 is out of range (60-180 seconds)"];
        bad_udp_timeout: r#""PrefixLists""# => r#""ConnectionTracking": {"UdpTimeout": 61}, "PrefixLists""#,
            ["ConnectionTracking.UdpTimeout: 61 is out of range (30-60 seconds)"];
        bad_interface_used_twice: r#""SecurityGroupIds": ["sg-db"]"# => r#""SecurityGroupIds": ["sg-db"], "Interface": "veth-web""#,
            [r#"Instances[i-db].Interface: "veth-web" is already the interface of Instances[i-web]"#];
        bad_address_used_by_two_instances: r#""PrivateIpAddress": "10.0.2.20""# => r#""PrivateIpAddress": "10.0.2.20", "SecondaryPrivateIpAddresses": ["10.0.1.10"]"#,
            [r#"Instances[i-db].SecondaryPrivateIpAddresses[0]: "10.0.1.10" is not inside its subnet's CidrBlock 10.0.2.0/24"#,
             r#"Instances[i-db].SecondaryPrivateIpAddresses[0]: "10.0.1.10" is already used by Instances[i-web]"#];
    }

    /// "a protocol number 0-255 (6/17/1/58 are the same as the names)".
    #[test]
    fn semantics_sg_protocol_numbers_equal_names() {
        let named = check(BASE).unwrap().0;
        let numbered = check(
            &BASE
                .replace(r#""IpProtocol": "tcp""#, r#""IpProtocol": "6""#)
                .replace(r#""IpProtocol": "icmp""#, r#""IpProtocol": 1"#),
        )
        .unwrap()
        .0;
        assert_eq!(named.groups, numbered.groups);
        assert_eq!(
            named.groups["sg-web"].ingress[1].matcher,
            Match::Icmp {
                proto: 1,
                icmp_type: Some(8),
                code: None
            }
        );
    }

    /// "(-1/-1 with tcp/udp means all ports.)" and 0-65535 is the same.
    #[test]
    fn semantics_sg_tcp_minus_one_means_all_ports() {
        for ports in [
            r#""FromPort": -1, "ToPort": -1"#,
            r#""FromPort": 0, "ToPort": 65535"#,
        ] {
            let (v, _) = check(&BASE.replace(r#""FromPort": 443, "ToPort": 443"#, ports)).unwrap();
            assert_eq!(v.groups["sg-web"].ingress[0].matcher, Match::Proto(6));
        }
    }

    /// "icmp/icmpv6: FromPort is the ICMP type, ToPort the code; -1 = any ...
    /// icmpv6 with no range = all types and codes."
    #[test]
    fn semantics_sg_icmp_type_code_and_icmpv6_without_range() {
        let (v, _) = check(&BASE.replace(
            r#""IpProtocol": "icmp", "FromPort": 8, "ToPort": -1"#,
            r#""IpProtocol": "icmpv6""#,
        ))
        .unwrap();
        assert_eq!(
            v.groups["sg-web"].ingress[1].matcher,
            Match::Icmp {
                proto: 58,
                icmp_type: None,
                code: None
            }
        );
        let (v, _) = check(&BASE.replace(
            r#""FromPort": 8, "ToPort": -1"#,
            r#""FromPort": 3, "ToPort": 4"#,
        ))
        .unwrap();
        assert_eq!(
            v.groups["sg-web"].ingress[1].matcher,
            Match::Icmp {
                proto: 1,
                icmp_type: Some(3),
                code: Some(4)
            }
        );
    }

    /// "`-1` or any other protocol number: ports are ignored (match all)" — with a warning when ports are given.
    #[test]
    fn semantics_sg_other_protocols_ignore_ports_with_a_warning() {
        let json = BASE.replace(
            r#""IpProtocol": "icmp", "FromPort": 8"#,
            r#""IpProtocol": "47", "FromPort": 8"#,
        );
        let (v, w) = check(&json).unwrap();
        assert_eq!(v.groups["sg-web"].ingress[1].matcher, Match::Proto(47));
        assert_eq!(w.len(), 1);
        assert_eq!(
            w[0].to_string(),
            "SecurityGroups[sg-web].IpPermissions[1]: FromPort/ToPort are ignored for protocol 47: the rule matches all ports"
        );
        let json = BASE.replace(
            r#""IpPermissionsEgress": [{"IpProtocol": "-1","#,
            r#""IpPermissionsEgress": [{"IpProtocol": "-1", "FromPort": -1, "ToPort": -1,"#,
        );
        let (v, w) = check(&json).unwrap();
        assert_eq!(v.groups["sg-web"].egress[0].matcher, Match::All);
        assert!(w.is_empty());
    }

    /// "A model with any error is rejected whole": every error is reported together.
    #[test]
    fn semantics_inputs_all_errors_reported_together() {
        let json = BASE
            .replace(
                r#"{"CidrIp": "10.0.0.0/8"}"#,
                r#"{"CidrIp": "10.0.0.300/24"}"#,
            )
            .replace(r#""RuleNumber": 110"#, r#""RuleNumber": 0"#)
            .replace(r#""Bridge": "br-b""#, r#""Bridge": "br b""#);
        let errs = check(&json).unwrap_err();
        assert_eq!(errs.errors.len(), 3);
        assert_eq!(
            errs.to_string(),
            [
                r#"Subnets[subnet-b].Bridge: "br b" is not a Linux interface name (1-15 characters, no '/', ':', quotes or whitespace)"#,
                r#"SecurityGroups[sg-web].IpPermissions[0].IpRanges[1].CidrIp: "10.0.0.300/24" is not an IPv4 CIDR"#,
                "NetworkAcls[acl-a].Entries[1].RuleNumber: 0 is not a rule number (1-32766)",
            ]
            .join("\n")
        );
    }

    /// "Nothing is ever silently dropped or widened: a rule that cannot be
    /// expressed must never turn into 'allow from anywhere'."
    #[test]
    fn semantics_inputs_unexpressible_rule_is_an_error_never_allow_all() {
        for (old, new) in [
            (r#""FromPort": 443, "ToPort": 443"#, r#""FromPort": 443"#),
            (r#"{"CidrIp": "10.0.0.0/8"}"#, r#"{"CidrIp": "10.0.0.0"}"#),
            (r#""IpProtocol": "icmp""#, r#""IpProtocol": "ip""#),
        ] {
            assert!(check(&BASE.replace(old, new)).is_err(), "{new}");
        }
    }

    /// "CIDRs are canonicalised (host bits cleared: 100.68.0.18/18 is 100.68.0.0/18)."
    #[test]
    fn semantics_inputs_cidrs_are_canonicalised() {
        let json = BASE
            .replace(
                r#"{"CidrIp": "10.0.0.0/8"}"#,
                r#"{"CidrIp": "100.68.0.18/18"}"#,
            )
            .replace(
                r#""CidrBlock": "10.0.2.0/24""#,
                r#""CidrBlock": "10.0.2.77/24""#,
            )
            .replace(r#"{"Cidr": "192.0.2.0/24"}"#, r#"{"Cidr": "192.0.2.9/24"}"#);
        let (v, _) = check(&json).unwrap();
        assert_eq!(
            v.groups["sg-web"].ingress[0].remotes[1],
            ValidRemote::Cidr("100.68.0.0/18".parse().unwrap())
        );
        assert_eq!(v.subnets[1].cidr_v4.to_string(), "10.0.2.0/24");
        assert_eq!(v.prefix_lists["pl-admin"][0].to_string(), "192.0.2.0/24");
    }

    /// "rule numbers 1-32766, unique per direction": the same number may be used inbound and outbound.
    #[test]
    fn semantics_nacl_rule_numbers_unique_per_direction_only() {
        let (v, _) = check(BASE).unwrap();
        assert_eq!(v.subnets[0].inbound[0].rule_number, 100);
        assert_eq!(v.subnets[0].outbound[0].rule_number, 100);
        // ... but not across families in one direction (as in AWS).
        let errs = errors_with(
            r#"{"RuleNumber": 32767, "Protocol": "-1", "RuleAction": "deny", "Egress": true, "CidrBlock": "0.0.0.0/0"}"#,
            r#"{"RuleNumber": 100, "Protocol": "-1", "RuleAction": "allow", "Egress": true, "Ipv6CidrBlock": "::/0"}"#,
        );
        assert_eq!(
            errs,
            [
                "NetworkAcls[acl-a].Entries[3].RuleNumber: 100 is used twice in the outbound entries (also Entries[2])"
            ]
        );
    }

    /// EC2's printed `*` entries (32767, 32768) are accepted and mean the implicit deny: they are dropped.
    #[test]
    fn nacl_star_entries_are_dropped() {
        let (v, _) = check(BASE).unwrap();
        assert_eq!(v.subnets[0].outbound.len(), 1);
    }

    /// "exactly one network ACL (the VPC's default NACL if none is given)".
    #[test]
    fn semantics_world_subnet_without_nacl_uses_the_default_nacl() {
        let json = BASE.replace(
            r#""NetworkAclId": "acl-a","#,
            r#""NetworkAclId": "acl-a", "IsDefault": true}, {"NetworkAclId": "acl-b","#,
        );
        let (v, _) = check(&json).unwrap();
        // acl-a is now the default and associated with nothing; acl-b holds subnet-a.
        assert_eq!(v.subnets[0].nacl_id, "acl-b");
        assert_eq!(v.subnets[1].nacl_id, "acl-a");
        // Without any IsDefault NACL: AWS's default, rule 100 (IPv4) / 101 (IPv6) allow all.
        let (v, _) = check(BASE).unwrap();
        assert_eq!(v.subnets[1].nacl_id, IMPLICIT_DEFAULT_NACL_ID);
        assert_eq!(v.subnets[1].inbound.len(), 1, "subnet-b has no IPv6");
        assert_eq!(v.subnets[1].inbound[0].matcher, Match::All);
    }

    /// "1 to 16 security groups" — 17 is an error; above 5 is a quota warning.
    #[test]
    fn semantics_world_instance_has_1_to_16_groups() {
        let mut m = Model::from_json(BASE).unwrap();
        for k in 0..17 {
            m.security_groups.push(SecurityGroup {
                group_id: format!("sg-{k}"),
                ..Default::default()
            });
        }
        m.instances[1].security_group_ids = (0..17).map(|k| format!("sg-{k}")).collect();
        let errs = validate(&m).unwrap_err();
        assert_eq!(
            errs.to_string(),
            "Instances[i-db].SecurityGroupIds: an instance needs 1 to 16 security groups, found 17"
        );
        m.instances[1].security_group_ids.truncate(6);
        let (_, w) = validate(&m).unwrap();
        assert_eq!(
            w.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "Instances[i-db].SecurityGroupIds: 6 security groups exceed AWS's default quota of 5 per interface"
            ]
        );
    }

    /// "warnings, not errors, when a model exceeds them": 60 SG rules per direction per family.
    #[test]
    fn semantics_quota_sg_rules_is_a_warning() {
        let mut m = Model::from_json(BASE).unwrap();
        let mut p = IpPermission::tcp(22, 22);
        for k in 0..61 {
            p = p.from_cidr(&format!("192.0.2.{k}/32"));
        }
        m.security_groups[1].ip_permissions_egress.push(p);
        let (_, w) = validate(&m).unwrap();
        assert_eq!(
            w.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "SecurityGroups[sg-db].IpPermissionsEgress: 61 IPv4 rules exceed AWS's default quota of 60 per group and direction"
            ]
        );
    }

    /// "rules x groups <= 1000": more rules than that on one interface is a warning.
    #[test]
    fn semantics_quota_rules_per_interface_is_a_warning() {
        let mut m = Model::from_json(BASE).unwrap();
        for k in 0..3 {
            let mut p = IpPermission::tcp(22, 22);
            for a in 0..=200 {
                p = p.from_cidr(&format!("192.{k}.{a}.0/24"));
            }
            let mut g = SecurityGroup {
                group_id: format!("sg-big{k}"),
                ..Default::default()
            };
            g.ip_permissions = vec![p.clone(), p.clone()];
            m.security_groups.push(g);
            m.instances[1].security_group_ids.push(format!("sg-big{k}"));
        }
        let (_, w) = validate(&m).unwrap();
        let w: Vec<String> = w.iter().map(ToString::to_string).collect();
        assert!(w.contains(&"Instances[i-db].SecurityGroupIds: 1208 IPv4 inbound rules across its groups exceed AWS's limit of 1000 per interface".to_string()), "{w:?}");
    }

    /// "20 NACL rules per direction per family (adjustable to 40). sgfw must work far beyond these".
    #[test]
    fn semantics_quota_nacl_rules_is_a_warning() {
        let mut m = Model::from_json(BASE).unwrap();
        for k in 0..21 {
            m.network_acls[0].entries.push(NetworkAclEntry {
                rule_number: 1000 + k,
                protocol: "-1".into(),
                rule_action: "deny".into(),
                egress: false,
                ipv6_cidr_block: Some(format!("2001:db8:{k:x}::/48")),
                ..Default::default()
            });
        }
        let (v, w) = validate(&m).unwrap();
        assert_eq!(v.subnets[0].inbound.len(), 23);
        assert_eq!(
            w.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "NetworkAcls[acl-a].Entries: 21 inbound IPv6 entries exceed AWS's default quota of 20"
            ]
        );
    }

    /// A permission with no remote matches nothing: legal, but said.
    #[test]
    fn permission_without_remote_is_a_warning() {
        let w = warnings_of(&BASE.replace(
            r#", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
        "IpPermissionsEgress""#,
            r#"}],
        "IpPermissionsEgress""#,
        ));
        assert_eq!(
            w,
            [
                "SecurityGroups[sg-web].IpPermissions[1]: has no IpRanges, Ipv6Ranges, UserIdGroupPairs or PrefixListIds: it matches nothing"
            ]
        );
    }

    /// "The EC2 API's names and bounds": values inside the bounds are taken.
    #[test]
    fn connection_tracking_timeouts_in_bounds_are_used() {
        let (v, _) = check(&BASE.replace(
            r#""PrefixLists""#,
            r#""ConnectionTracking": {"TcpEstablishedTimeout": 60, "UdpStreamTimeout": 180, "UdpTimeout": 30}, "PrefixLists""#,
        ))
        .unwrap();
        assert_eq!(
            (
                v.timeouts.tcp_established,
                v.timeouts.udp_stream,
                v.timeouts.udp
            ),
            (60, 180, 30)
        );
    }

    /// The shipped example models are valid and warning-free.
    #[test]
    fn examples_are_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                let model = crate::model::load_path(&path).unwrap();
                let (_, w) =
                    validate(&model).unwrap_or_else(|e| panic!("{}:\n{e}", path.display()));
                assert!(w.is_empty(), "{}: {w:?}", path.display());
                n += 1;
            }
        }
        assert!(n >= 3);
    }

    #[test]
    fn names_and_ids() {
        assert!(is_valid_id("sg-0a1B_2.x"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("a\"b"));
        assert!(!is_valid_id(&"a".repeat(256)));
        assert!(is_valid_ifname("veth0.100"));
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a'b",
            "0123456789abcdef",
            "é",
        ] {
            assert!(!is_valid_ifname(bad), "{bad}");
        }
    }

    /// A model built in code (no JSON) validates like one read from JSON.
    #[test]
    fn model_built_in_code() {
        let m = Model {
            subnets: vec![crate::model::Subnet {
                subnet_id: "s".into(),
                cidr_block: "10.9.0.0/16".into(),
                bridge: "br9".into(),
                ..Default::default()
            }],
            instances: vec![Instance {
                instance_id: "i".into(),
                subnet_id: "s".into(),
                private_ip_address: "10.9.0.5".into(),
                security_group_ids: vec!["g".into()],
                ..Default::default()
            }],
            security_groups: vec![SecurityGroup {
                group_id: "g".into(),
                ip_permissions: vec![IpPermission::udp(53, 53).from_group("g").from_cidr("::/0")],
                ..Default::default()
            }],
            ..Default::default()
        };
        let (v, w) = validate(&m).unwrap();
        assert!(w.is_empty());
        assert_eq!(v.model(), &m);
    }
}
