//! The nftables backend against the real `nft` and kernel (root).
//!
//! `table inet sgfw` has a fixed name, so everything runs in ONE test
//! function, serialised with other runs by a file lock; it refuses to run
//! when the table already exists (it would be someone's live ruleset), and a
//! guard deletes the table on every exit path. Traffic is tested by the
//! conformance suite; this test checks syntax, atomicity and cleanup.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed step is a failed test"
)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use sgfw::flat::FlatModel;
use sgfw::model::Model;
use sgfw::nft::{NftBackend, NftError, transaction};
use sgfw::sys::{Host, Port, RealHost, SysError};
use sgfw::validate::validate;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../sgfw-user/tests/golden/nft")
}

fn flat_of(name: &str) -> FlatModel {
    let json = std::fs::read_to_string(golden_dir().join(format!("{name}.json"))).unwrap();
    let (valid, _) = validate(&Model::from_json(&json).unwrap()).unwrap();
    valid.flatten()
}

fn list_tables() -> String {
    RealHost.nft(&["list", "tables"], None).unwrap()
}

fn list_ours() -> String {
    RealHost
        .nft(&["list", "table", "inet", "sgfw"], None)
        .unwrap()
}

/// Serialises runs of this test on one host (the table name is fixed).
const LOCK: &str = "/run/sgfw-nft-test.lock";

/// Deletes `table inet sgfw` however the test ends.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Err(e) = NftBackend::new(&RealHost).teardown() {
            eprintln!("nft_backend: cleanup failed: {e}");
        }
        let _ = std::fs::remove_file(LOCK);
    }
}

/// The real host, except that every `nft -f` transaction gets one more
/// command that the kernel rejects: the whole transaction must then fail.
struct BreakingHost;

impl Host for BreakingHost {
    fn bridge_ports(&self, bridge: &str) -> Result<Vec<Port>, SysError> {
        RealHost.bridge_ports(bridge)
    }
    fn ifindex(&self, name: &str) -> Result<Option<u32>, SysError> {
        RealHost.ifindex(name)
    }
    fn nft(&self, args: &[&str], stdin: Option<&str>) -> Result<String, SysError> {
        match stdin {
            Some(text) if args == ["-f", "-"] => {
                let broken = format!("{text}add rule inet sgfw no_such_chain drop\n");
                RealHost.nft(args, Some(&broken))
            }
            _ => RealHost.nft(args, stdin),
        }
    }
    fn read_sysctl(&self, key: &str) -> Result<Option<String>, SysError> {
        RealHost.read_sysctl(key)
    }
    fn write_sysctl(&self, key: &str, value: &str) -> Result<(), SysError> {
        RealHost.write_sysctl(key, value)
    }
}

#[test]
fn nft_backend_apply_reapply_failed_apply_and_teardown() {
    if !sgfw_tests::require_root("nft_backend") {
        return;
    }
    if RealHost.nft(&["--version"], None).is_err() {
        // `cargo xtask test` installs nftables; a skip under CI is a failure.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "nft is not installed"
        );
        eprintln!("nft_backend: the nft program is not installed; skipped");
        return;
    }
    // One run at a time on this host (the table name is fixed).
    let lock = File::create(LOCK).unwrap();
    // SAFETY: flock on a file descriptor we own; released when `lock` drops.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);

    let backend = NftBackend::new(&RealHost);
    if backend.is_applied().unwrap() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "table inet sgfw already exists on the CI host"
        );
        eprintln!(
            "nft_backend: table inet sgfw already exists (a live sgfw?); skipped, not touching it"
        );
        return;
    }
    let tables_before = list_tables();
    let _cleanup = Cleanup;

    // The probe works here.
    backend.probe().unwrap();

    // Every golden ruleset is valid nft (check mode changes nothing).
    let mut checked = 0;
    for entry in std::fs::read_dir(golden_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "nft") {
            let text = std::fs::read_to_string(&path).unwrap();
            if let Err(e) = RealHost.nft(&["-c", "-f", "-"], Some(&transaction(&text))) {
                panic!("{}: nft -c failed: {e}", path.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 6, "only {checked} golden files");

    // A model with hostile ids renders to a ruleset nft accepts as is: the
    // payload is inert (it would be a syntax error, or a second table, if not).
    let mut hostile = flat_of("two-subnets");
    let payload =
        "\";}\ntable ip evil { chain x { type filter hook input priority -500; policy drop; } }\n#";
    for s in &mut hostile.subnets {
        s.id = format!("subnet{payload}");
        s.nacl_id = format!("acl{payload}");
    }
    for i in &mut hostile.instances {
        i.id = format!("i{payload}");
    }
    let text = sgfw::nft::render(&hostile).unwrap();
    RealHost
        .nft(&["-c", "-f", "-"], Some(&transaction(&text)))
        .unwrap();
    assert_eq!(list_tables(), tables_before);

    // Apply.
    let a = flat_of("two-subnets");
    let report = backend.apply(&a).unwrap();
    assert_eq!(report.instances, 3);
    assert!(backend.is_applied().unwrap());
    let listed_a = list_ours();
    assert!(listed_a.contains("chain sg_in_0"), "{listed_a}");
    assert!(listed_a.contains("10.0.1.10 : jump sg_out_1"), "{listed_a}");
    let counters = backend.counters().unwrap();
    assert_eq!(
        counters.len(),
        2 + 4 * a.subnets.len() + 4 * a.instances.len()
    );
    assert!(counters.iter().any(|c| c.label == "i-db"));

    // Re-apply a different model: replaced whole.
    let b = flat_of("ipv6");
    backend.apply(&b).unwrap();
    let listed_b = list_ours();
    assert!(listed_b.contains("2001:db8:6::10"), "{listed_b}");
    assert!(!listed_b.contains("10.0.2.20"), "{listed_b}");
    assert!(!listed_b.contains("chain sg_in_2"), "{listed_b}");

    // A transaction the kernel rejects leaves the previous ruleset in force.
    let err = NftBackend::new(&BreakingHost).apply(&a).unwrap_err();
    assert!(matches!(err, NftError::Nft { .. }), "{err}");
    assert_eq!(list_ours(), listed_b);

    // Teardown removes only our table; a second teardown is fine.
    backend.teardown().unwrap();
    assert!(!backend.is_applied().unwrap());
    assert_eq!(list_tables(), tables_before);
    backend.teardown().unwrap();
    assert_eq!(list_tables(), tables_before);
}
