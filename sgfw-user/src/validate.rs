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
mod groups;
mod nacls;
mod subnets;

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
    validate_owned(model.clone())
}

/// [`validate`] of a model the caller gives up (a [`crate::vpc::Vpc`]'s
/// changed copy): kept as the valid model's source without another copy.
///
/// # Errors
///
/// As [`validate`].
pub fn validate_owned(owned: Model) -> Result<(ValidModel, Vec<Warning>), ValidationErrors> {
    let mut c = Checker::default();
    let model = &owned;
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
        source: owned,
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

    /// An IPv4 CIDR; `path` is written only for an error (a valid model's
    /// tens of thousands of paths are never formatted).
    fn v4_cidr(&mut self, path: impl FnOnce() -> String, s: &str) -> Option<Ipv4Net> {
        match s.parse::<Ipv4Net>() {
            Ok(n) => Some(n.trunc()),
            Err(_) => {
                self.err(path(), format!("{s:?} is not an IPv4 CIDR"));
                None
            }
        }
    }

    /// An IPv6 CIDR (`path` as for [`Checker::v4_cidr`]).
    fn v6_cidr(&mut self, path: impl FnOnce() -> String, s: &str) -> Option<Ipv6Net> {
        match s.parse::<Ipv6Net>() {
            Ok(n) => Some(n.trunc()),
            Err(_) => {
                self.err(path(), format!("{s:?} is not an IPv6 CIDR"));
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
