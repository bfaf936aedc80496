//! sgfw: AWS VPC security groups and network ACLs, enforced on a Linux host.
//!
//! The pipeline is: [`model`] (EC2's own JSON shapes) → [`validate`] (every
//! error named, the model rejected whole) → [`flat`] (per-instance resolved
//! rules and per-subnet ordered NACL entries, the one intermediate every
//! backend consumes) → a backend. [`eval`] is the reference evaluator that
//! the backends are tested against; [`packet`] is the packet it judges.
//!
//! ```
//! use sgfw::{eval, model::Model, packet::{Packet, TcpFlags}, validate::validate};
//!
//! let model = Model::from_json(r#"{
//!   "Subnets": [{"SubnetId": "subnet-a", "CidrBlock": "10.0.1.0/24", "Bridge": "br-a"}],
//!   "Instances": [
//!     {"InstanceId": "i-web", "SubnetId": "subnet-a", "PrivateIpAddress": "10.0.1.10", "SecurityGroupIds": ["sg-web"]},
//!     {"InstanceId": "i-db", "SubnetId": "subnet-a", "PrivateIpAddress": "10.0.1.20", "SecurityGroupIds": ["sg-db"]}],
//!   "SecurityGroups": [
//!     {"GroupId": "sg-web", "IpPermissionsEgress": [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]},
//!     {"GroupId": "sg-db", "IpPermissions": [{"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432,
//!                                             "UserIdGroupPairs": [{"GroupId": "sg-web"}]}]}]
//! }"#)?;
//! let (valid, warnings) = validate(&model)?;
//! assert!(warnings.is_empty());
//! let flat = valid.flatten();
//! let syn = Packet::tcp("10.0.1.10".parse()?, "10.0.1.20".parse()?, 40000, 5432, TcpFlags::SYN);
//! let verdict = eval::explain_new_flow(&flat, &syn);
//! assert!(verdict.allowed);
//! assert_eq!(verdict.stages[1].by.to_string(), "sg-db/ingress[0]");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod backend;
pub mod ebpf;
#[cfg(feature = "ec2")]
pub mod ec2;
pub mod eval;
#[cfg(feature = "k8s")]
pub mod export;
pub mod flat;
pub mod hostlock;
pub mod import;
#[cfg(feature = "lab")]
pub mod lab;
pub mod model;
pub mod nft;
pub mod packet;
pub mod policy;
pub mod sys;
#[cfg(test)]
pub(crate) mod testutil;
pub mod validate;
pub mod vpc;
#[cfg(feature = "watch")]
pub mod watch;
