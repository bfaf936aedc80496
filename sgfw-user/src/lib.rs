//! sgfw: AWS VPC security groups and network ACLs, enforced on a Linux host.
//!
//! The pipeline is: [`model`] (EC2's own JSON shapes) → [`validate`] (every
//! error named, the model rejected whole) → [`flat`] (per-instance resolved
//! rules and per-subnet ordered NACL entries, the one intermediate every
//! backend consumes) → a backend. [`eval`] is the reference evaluator that
//! the backends are tested against.
#![deny(missing_docs)]

pub mod eval;
pub mod flat;
pub mod model;
pub mod validate;
