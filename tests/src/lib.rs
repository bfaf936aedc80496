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

/// The tests' Python that imports `modules` (e.g. `"scapy.all"`):
/// `SGFW_PYTHON` (set by `cargo xtask test`), else xtask's environment
/// under `~/.cache/sgfw/venv`, else `python3`. `None` is a skip, and a
/// panic under `CI=true` (a skip there is a failure); `test` names the caller.
#[expect(clippy::panic, reason = "under CI a missing tool fails the test")]
pub fn python_with(modules: &str, test: &str) -> Option<std::path::PathBuf> {
    use std::path::{Path, PathBuf};
    let candidates = std::env::var_os("SGFW_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain(std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/sgfw/venv/bin/python3")))
        .chain([PathBuf::from("python3")]);
    for p in candidates {
        let ok = std::process::Command::new(&p)
            .args(["-c", &format!("import {modules}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(p);
        }
    }
    let msg = format!(
        "{test}: no Python that imports {modules} (cargo xtask test makes one; or set SGFW_PYTHON)"
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg} — under CI=true a skip is a failure");
    }
    eprintln!("{msg}; skipped");
    None
}
