//! What sgfw's privileged integration tests share: the privilege check, the
//! seeded random model and packet generators of the differential test, and
//! the network-namespace test bed.
#![deny(missing_docs)]

pub mod privilege;
pub mod random;
pub mod testbed;

pub use privilege::require_root;
pub mod scenario;
