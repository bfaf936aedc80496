//! Whether a privileged test may run: root, or a printed skip — except under
//! `CI=true`, where a skip is a failure.

/// True when running as root. Otherwise prints why the test is skipped and
/// returns false — or panics when `CI=true`, since CI must run every test.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let msg = format!("{test}: needs root (network namespaces, BPF); skipped");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        #[expect(
            clippy::panic,
            reason = "under CI=true a skipped privileged test is a failure"
        )]
        {
            panic!("{msg} — under CI=true a skip is a failure");
        }
    }
    eprintln!("{msg}");
    false
}
