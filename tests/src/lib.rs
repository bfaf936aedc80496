//! What sgfw's privileged integration tests share: the privilege check, the
//! seeded random model and packet generators of the differential test, and
//! the network-namespace test bed.
#![deny(missing_docs)]

pub mod privilege;
pub mod random;
pub mod testbed;

pub use privilege::require_root;
pub mod scenario;

/// The `sgfw` binary the privileged tests drive as a user would: `SGFW_BIN`
/// (set by `cargo xtask test`), else the workspace's release build.
pub fn sgfw_bin() -> std::path::PathBuf {
    std::env::var_os("SGFW_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/sgfw")
        })
}

/// Runs `sgfw ARGS` and returns its output.
#[expect(
    clippy::expect_used,
    reason = "test support: a failed start is a failed test"
)]
pub fn sgfw<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    std::process::Command::new(sgfw_bin())
        .args(args)
        .output()
        .expect("running sgfw")
}

/// Runs `sgfw teardown` when dropped: whatever a test applied through the
/// CLI is removed however the test ends.
#[derive(Debug)]
pub struct TeardownOnDrop;

impl Drop for TeardownOnDrop {
    fn drop(&mut self) {
        let _ = sgfw(&["teardown"]);
    }
}
