//! The policy model, in EC2's own JSON shapes.
//!
//! This module owns the serde types for one model document: subnets,
//! instances, security groups (the items of `aws ec2 describe-security-groups`),
//! network ACLs (the items of `aws ec2 describe-network-acls`), prefix lists
//! and connection-tracking timeouts, plus loading a document from a string,
//! a file or stdin. Keys are PascalCase as EC2 prints them; unknown fields are
//! ignored so that pasted AWS CLI output loads.
//!
//! It must never judge a value: addresses, CIDRs, protocols and ports are kept
//! exactly as written (strings and signed integers) so that
//! [`crate::validate`] can name the offending value in its error.
//!
//! A model can equally be built in code; every field is public and every
//! struct implements [`Default`]:
//!
//! ```
//! use sgfw::model::*;
//! let model = Model {
//!     subnets: vec![Subnet {
//!         subnet_id: "subnet-a".into(),
//!         cidr_block: "10.0.1.0/24".into(),
//!         bridge: "br-a".into(),
//!         ..Default::default()
//!     }],
//!     instances: vec![Instance {
//!         instance_id: "i-web".into(),
//!         subnet_id: "subnet-a".into(),
//!         private_ip_address: "10.0.1.10".into(),
//!         security_group_ids: vec!["sg-web".into()],
//!         ..Default::default()
//!     }],
//!     security_groups: vec![SecurityGroup {
//!         group_id: "sg-web".into(),
//!         ip_permissions: vec![IpPermission::tcp(443, 443).from_cidr("0.0.0.0/0")],
//!         ip_permissions_egress: vec![IpPermission::all().from_cidr("0.0.0.0/0")],
//!         ..Default::default()
//!     }],
//!     ..Default::default()
//! };
//! assert!(sgfw::validate::validate(&model).is_ok());
//! ```

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

/// Why a model document could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The document is not JSON of the expected shape.
    #[error("the model is not valid model JSON")]
    Json(#[source] serde_json::Error),
    /// The file could not be read.
    #[error("cannot read the model file {path}")]
    Read {
        /// The file (`-` for stdin).
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// One model document: the VPC that sgfw enforces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Model {
    /// The subnets, each a Linux bridge on the host.
    #[serde(default)]
    pub subnets: Vec<Subnet>,
    /// The instances (one network interface each).
    #[serde(default)]
    pub instances: Vec<Instance>,
    /// The security groups.
    #[serde(default)]
    pub security_groups: Vec<SecurityGroup>,
    /// The network ACLs.
    #[serde(default)]
    pub network_acls: Vec<NetworkAcl>,
    /// Managed prefix lists that security-group rules may name.
    #[serde(default)]
    pub prefix_lists: Vec<PrefixList>,
    /// Connection-tracking timeouts; absent = EC2's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_tracking: Option<ConnectionTracking>,
}

/// A subnet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Subnet {
    /// Id, e.g. `subnet-0a1b`.
    pub subnet_id: String,
    /// IPv4 CIDR, e.g. `10.0.1.0/24`.
    pub cidr_block: String,
    /// IPv6 CIDR, e.g. `fd00:1::/64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_cidr_block: Option<String>,
    /// Name of the host's Linux bridge for this subnet.
    pub bridge: String,
    /// The subnet's DNS resolver address(es), at most one per family: a string or a list.
    #[serde(
        default,
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub dns_address: Vec<String>,
}

/// An instance: one network interface in one subnet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Instance {
    /// Id, e.g. `i-0abc`.
    pub instance_id: String,
    /// The subnet it sits in.
    pub subnet_id: String,
    /// Primary private IPv4 address.
    pub private_ip_address: String,
    /// Further private IPv4 addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secondary_private_ip_addresses: Vec<String>,
    /// IPv6 addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ipv6_addresses: Vec<String>,
    /// Attached security groups (1 to 16).
    #[serde(default)]
    pub security_group_ids: Vec<String>,
    /// Host end of the instance's veth, when bound to one port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
}

/// A security group (an item of `describe-security-groups`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SecurityGroup {
    /// Id, e.g. `sg-0abc`.
    pub group_id: String,
    /// Name (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_name: Option<String>,
    /// Inbound rules.
    #[serde(default)]
    pub ip_permissions: Vec<IpPermission>,
    /// Outbound rules.
    #[serde(default)]
    pub ip_permissions_egress: Vec<IpPermission>,
}

/// One security-group permission: a protocol and port range and a list of remotes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IpPermission {
    /// `tcp`, `udp`, `icmp`, `icmpv6`, `-1` (all) or a protocol number.
    #[serde(deserialize_with = "string_or_number")]
    pub ip_protocol: String,
    /// First port, or the ICMP type; `-1` = all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_port: Option<i64>,
    /// Last port, or the ICMP code; `-1` = all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_port: Option<i64>,
    /// IPv4 remotes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_ranges: Vec<IpRange>,
    /// IPv6 remotes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ipv6_ranges: Vec<Ipv6Range>,
    /// Referenced security groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_id_group_pairs: Vec<UserIdGroupPair>,
    /// Referenced prefix lists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefix_list_ids: Vec<PrefixListRef>,
}

impl IpPermission {
    /// TCP, ports `from..=to`, no remotes yet.
    pub fn tcp(from: u16, to: u16) -> IpPermission {
        IpPermission::with_ports("tcp", from.into(), to.into())
    }

    /// UDP, ports `from..=to`, no remotes yet.
    pub fn udp(from: u16, to: u16) -> IpPermission {
        IpPermission::with_ports("udp", from.into(), to.into())
    }

    /// Every protocol (`-1`), no remotes yet.
    pub fn all() -> IpPermission {
        IpPermission {
            ip_protocol: "-1".into(),
            ..Default::default()
        }
    }

    /// A protocol name or number with `FromPort`/`ToPort`, no remotes yet.
    pub fn with_ports(protocol: &str, from: i64, to: i64) -> IpPermission {
        IpPermission {
            ip_protocol: protocol.into(),
            from_port: Some(from),
            to_port: Some(to),
            ..Default::default()
        }
    }

    /// Adds an IPv4 or IPv6 CIDR remote (chosen by whether it contains `:`).
    pub fn from_cidr(mut self, cidr: &str) -> IpPermission {
        if cidr.contains(':') {
            self.ipv6_ranges.push(Ipv6Range {
                cidr_ipv6: cidr.into(),
                description: None,
            });
        } else {
            self.ip_ranges.push(IpRange {
                cidr_ip: cidr.into(),
                description: None,
            });
        }
        self
    }

    /// Adds a referenced security group as a remote.
    pub fn from_group(mut self, group_id: &str) -> IpPermission {
        self.user_id_group_pairs.push(UserIdGroupPair {
            group_id: group_id.into(),
            ..Default::default()
        });
        self
    }

    /// Adds a prefix list as a remote.
    pub fn from_prefix_list(mut self, prefix_list_id: &str) -> IpPermission {
        self.prefix_list_ids.push(PrefixListRef {
            prefix_list_id: prefix_list_id.into(),
            description: None,
        });
        self
    }
}

/// An IPv4 remote of a permission.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IpRange {
    /// IPv4 CIDR.
    pub cidr_ip: String,
    /// Description (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// An IPv6 remote of a permission.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Ipv6Range {
    /// IPv6 CIDR.
    pub cidr_ipv6: String,
    /// Description (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A referenced security group as a remote: every address of every instance that has it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UserIdGroupPair {
    /// The referenced group.
    pub group_id: String,
    /// Owner account (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Description (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A prefix list named as a remote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PrefixListRef {
    /// The prefix list's id.
    pub prefix_list_id: String,
    /// Description (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A network ACL (an item of `describe-network-acls`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkAcl {
    /// Id, e.g. `acl-0abc`.
    pub network_acl_id: String,
    /// The VPC's default NACL: used by every subnet that no NACL names.
    #[serde(default)]
    pub is_default: bool,
    /// The subnets this NACL applies to.
    #[serde(default)]
    pub associations: Vec<NaclAssociation>,
    /// Entries of both directions and families.
    #[serde(default)]
    pub entries: Vec<NetworkAclEntry>,
}

/// A NACL's association with a subnet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NaclAssociation {
    /// The subnet.
    pub subnet_id: String,
    /// Association id (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_acl_association_id: Option<String>,
}

/// One NACL entry as EC2 prints it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkAclEntry {
    /// 1-32766; 32767/32768 are EC2's printed `*` (implicit deny) entries.
    pub rule_number: i64,
    /// Protocol number as a string, or `-1` (names are accepted too).
    #[serde(deserialize_with = "string_or_number")]
    pub protocol: String,
    /// `allow` or `deny`.
    pub rule_action: String,
    /// `true` = outbound, `false` = inbound.
    #[serde(default)]
    pub egress: bool,
    /// IPv4 CIDR (exactly one of this and `Ipv6CidrBlock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr_block: Option<String>,
    /// IPv6 CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_cidr_block: Option<String>,
    /// Destination port range, for protocols 6 and 17.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_range: Option<PortRange>,
    /// ICMP type and code, for protocol 1 and for 58 with an IPv6 CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_type_code: Option<IcmpTypeCode>,
}

impl NetworkAclEntry {
    /// An entry; the CIDR's text decides whether it is `CidrBlock` or
    /// `Ipv6CidrBlock`. `ports` is the `PortRange` (for protocols 6 and 17).
    pub fn new(
        rule_number: i64,
        egress: bool,
        protocol: &str,
        action: &str,
        cidr: &str,
        ports: Option<(i64, i64)>,
    ) -> Self {
        let v6 = cidr.contains(':');
        NetworkAclEntry {
            rule_number,
            protocol: protocol.into(),
            rule_action: action.into(),
            egress,
            cidr_block: (!v6).then(|| cidr.into()),
            ipv6_cidr_block: v6.then(|| cidr.into()),
            port_range: ports.map(|(from, to)| PortRange {
                from: Some(from),
                to: Some(to),
            }),
            ..NetworkAclEntry::default()
        }
    }
}

impl NetworkAcl {
    /// A custom (non-default) NACL associated with one subnet.
    pub fn custom(id: &str, subnet_id: &str, entries: Vec<NetworkAclEntry>) -> Self {
        NetworkAcl {
            network_acl_id: id.into(),
            is_default: false,
            associations: vec![NaclAssociation {
                subnet_id: subnet_id.into(),
                ..NaclAssociation::default()
            }],
            entries,
        }
    }
}

/// A NACL entry's port range.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PortRange {
    /// First port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<i64>,
    /// Last port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<i64>,
}

/// A NACL entry's ICMP type and code (`-1` = any).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IcmpTypeCode {
    /// ICMP type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#type: Option<i64>,
    /// ICMP code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i64>,
}

/// A managed prefix list: a named set of CIDRs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PrefixList {
    /// Id, e.g. `pl-0abc`.
    pub prefix_list_id: String,
    /// Its CIDRs (IPv4 and/or IPv6).
    #[serde(default)]
    pub entries: Vec<PrefixListEntry>,
}

/// One CIDR of a prefix list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PrefixListEntry {
    /// The CIDR.
    pub cidr: String,
    /// Description (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Connection-tracking timeouts, seconds, with the EC2 API's names and bounds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ConnectionTracking {
    /// Established TCP, 60-432000 (default 432000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_established_timeout: Option<i64>,
    /// UDP seen in both directions, 60-180 (default 180).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_stream_timeout: Option<i64>,
    /// UDP seen in one direction, 30-60 (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_timeout: Option<i64>,
}

impl Model {
    /// Parses a model document. Unknown fields are ignored.
    ///
    /// # Errors
    ///
    /// [`ModelError::Json`] when the text is not JSON of the model's shape.
    pub fn from_json(text: &str) -> Result<Model, ModelError> {
        serde_json::from_str(text).map_err(ModelError::Json)
    }

    /// The model as pretty-printed JSON.
    ///
    /// # Errors
    ///
    /// [`ModelError::Json`] if serialisation fails (it does not for these types).
    pub fn to_json(&self) -> Result<String, ModelError> {
        serde_json::to_string_pretty(self).map_err(ModelError::Json)
    }
}

/// Reads a model from a file, or from stdin when `path` is `-`.
///
/// # Errors
///
/// [`ModelError::Read`] when the file or stdin cannot be read,
/// [`ModelError::Json`] when its content is not a model document.
pub fn load_path(path: &Path) -> Result<Model, ModelError> {
    let read_err = |source| ModelError::Read {
        path: path.to_path_buf(),
        source,
    };
    let text = if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(read_err)?;
        text
    } else {
        std::fs::read_to_string(path).map_err(read_err)?
    };
    Model::from_json(&text)
}

/// Reads a model from any reader.
///
/// # Errors
///
/// As [`load_path`]; `path` is only used to name the source in the error.
pub fn load_reader(mut reader: impl Read, path: &Path) -> Result<Model, ModelError> {
    let mut text = String::new();
    reader
        .read_to_string(&mut text)
        .map_err(|source| ModelError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    Model::from_json(&text)
}

/// Accepts `"6"` and `6` alike (EC2 prints protocols as strings; people type numbers).
fn string_or_number<'de, D: Deserializer<'de>>(de: D) -> Result<String, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a protocol name or number")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    de.deserialize_any(V)
}

/// Accepts one string or a list of strings.
fn one_or_many<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(de)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real `aws ec2 describe-security-groups` / `describe-network-acls`
    /// output, trimmed, with every field AWS prints: it must load as is.
    const AWS_OUTPUT: &str = r#"{
      "Subnets": [{"SubnetId": "subnet-1", "CidrBlock": "10.0.1.0/24", "Bridge": "br1",
                   "VpcId": "vpc-1", "AvailabilityZone": "eu-west-1a", "DnsAddress": "10.0.0.2"}],
      "Instances": [{"InstanceId": "i-1", "SubnetId": "subnet-1", "PrivateIpAddress": "10.0.1.10",
                     "SecurityGroupIds": ["sg-1"], "State": {"Name": "running"}}],
      "SecurityGroups": [{
        "Description": "web", "GroupName": "web", "OwnerId": "123456789012", "GroupId": "sg-1",
        "VpcId": "vpc-1", "Tags": [{"Key": "Name", "Value": "web"}],
        "IpPermissions": [{
          "FromPort": 443, "IpProtocol": "tcp", "ToPort": 443,
          "IpRanges": [{"CidrIp": "0.0.0.0/0", "Description": "https"}],
          "Ipv6Ranges": [{"CidrIpv6": "::/0"}],
          "PrefixListIds": [],
          "UserIdGroupPairs": [{"GroupId": "sg-1", "UserId": "123456789012"}]
        }],
        "IpPermissionsEgress": [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}],
                                 "Ipv6Ranges": [], "PrefixListIds": [], "UserIdGroupPairs": []}]
      }],
      "NetworkAcls": [{
        "Associations": [{"NetworkAclAssociationId": "aclassoc-1", "NetworkAclId": "acl-1", "SubnetId": "subnet-1"}],
        "Entries": [
          {"CidrBlock": "0.0.0.0/0", "Egress": true, "Protocol": "-1", "RuleAction": "allow", "RuleNumber": 100},
          {"CidrBlock": "0.0.0.0/0", "Egress": true, "Protocol": "-1", "RuleAction": "deny", "RuleNumber": 32767},
          {"CidrBlock": "0.0.0.0/0", "Egress": false, "Protocol": "6", "RuleAction": "allow", "RuleNumber": 100,
           "PortRange": {"From": 443, "To": 443}},
          {"Ipv6CidrBlock": "::/0", "Egress": false, "Protocol": "-1", "RuleAction": "deny", "RuleNumber": 32768}
        ],
        "IsDefault": true, "NetworkAclId": "acl-1", "Tags": [], "VpcId": "vpc-1", "OwnerId": "123456789012"
      }]
    }"#;

    #[test]
    fn aws_cli_output_loads_with_unknown_fields_ignored() {
        let m = Model::from_json(AWS_OUTPUT).unwrap();
        assert_eq!(m.security_groups[0].ip_permissions[0].from_port, Some(443));
        assert_eq!(
            m.security_groups[0].ip_permissions[0].ip_ranges[0]
                .description
                .as_deref(),
            Some("https")
        );
        assert_eq!(m.network_acls[0].entries.len(), 4);
        assert_eq!(
            m.network_acls[0].entries[2].port_range,
            Some(PortRange {
                from: Some(443),
                to: Some(443)
            })
        );
        assert_eq!(m.subnets[0].dns_address, vec!["10.0.0.2".to_string()]);
    }

    #[test]
    fn protocol_may_be_a_json_number() {
        let m = Model::from_json(
            r#"{"SecurityGroups": [{"GroupId": "sg-1", "IpPermissions": [{"IpProtocol": 6, "FromPort": 1, "ToPort": 2}]}]}"#,
        )
        .unwrap();
        assert_eq!(m.security_groups[0].ip_permissions[0].ip_protocol, "6");
    }

    #[test]
    fn dns_address_may_be_a_list() {
        let m = Model::from_json(
            r#"{"Subnets": [{"SubnetId": "s", "CidrBlock": "10.0.0.0/24", "Bridge": "b", "DnsAddress": ["10.0.0.2", "fd00::2"]}]}"#,
        )
        .unwrap();
        assert_eq!(m.subnets[0].dns_address.len(), 2);
    }

    #[test]
    fn json_round_trip() {
        let m = Model::from_json(AWS_OUTPUT).unwrap();
        let again = Model::from_json(&m.to_json().unwrap()).unwrap();
        assert_eq!(m, again);
    }

    #[test]
    fn bad_json_is_an_error() {
        assert!(matches!(Model::from_json("{"), Err(ModelError::Json(_))));
        assert!(matches!(
            Model::from_json(r#"{"Subnets": 3}"#),
            Err(ModelError::Json(_))
        ));
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = load_path(Path::new("/nonexistent/model.json")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot read the model file /nonexistent/model.json"
        );
    }

    #[test]
    fn load_reader_reads_everything() {
        let m = load_reader(AWS_OUTPUT.as_bytes(), Path::new("-")).unwrap();
        assert_eq!(m.instances[0].instance_id, "i-1");
    }
}
