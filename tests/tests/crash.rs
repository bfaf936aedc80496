//! An apply killed at any moment leaves a policy in force that is the
//! previous one or (instance by instance, as the switch goes) the new one,
//! and the next apply enforces exactly its model — also when the kill came
//! while the previous apply was removing the ids it retired, and without
//! ever writing a generation number twice.
//!
//! `sgfw apply` runs with `SGFW_CRASH_AFTER_MAP_WRITES=N`, which aborts the
//! process just before its (N+1)-th map write, for N from 0 up to the whole
//! apply. After each kill the pinned classifiers are run (BPF_PROG_TEST_RUN
//! on the programs in force, with the maps in force) on new flows from
//! outside to every instance and compared with the reference evaluator:
//! each verdict must be model A's or model B's; after re-applying A, every
//! verdict must be A's; after killing B again and applying a third model C,
//! every verdict must be C's. Re-applying A reuses A's objects by content;
//! C's new objects get new ids, which must not be those whose entries the
//! killed apply had begun to write.
#![expect(
    clippy::unwrap_used,
    reason = "test code: a failed step is a failed test"
)]

use std::net::IpAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use sgfw::eval::{Conntrack, evaluate_wire};
use sgfw::flat::FlatModel;
use sgfw::packet::{Packet, TcpFlags, Wire};
use sgfw_common::{MARK_IDENTITY_SHIFT, STAMP_HOST, program_names as pn};
use sgfw_tests::random::{self, Rng};
use sgfw_tests::{TeardownOnDrop, require_root, sgfw, sgfw_bin};

const PIN_ROOT: &str = "/sys/fs/bpf/sgfw";
const STATE: &str = "/run/sgfw/ebpf.json";

/// A random model whose bridges exist nowhere (no port is attached).
fn model(seed: u64) -> (String, FlatModel) {
    let mut m = random::model(&mut Rng::new(seed));
    for (i, s) in m.subnets.iter_mut().enumerate() {
        s.bridge = format!("sgfwcrash{i}");
    }
    let (valid, _) = sgfw::validate::validate(&m).unwrap();
    (m.to_json().unwrap(), valid.flatten())
}

/// New flows from outside to every address of every instance.
fn probes(flat: &FlatModel, sport: &mut u16) -> Vec<Packet> {
    let outside_v4: [IpAddr; 3] = [
        "203.0.113.9".parse().unwrap(),
        "10.0.0.77".parse().unwrap(),
        "192.168.5.5".parse().unwrap(),
    ];
    let outside_v6: [IpAddr; 2] = [
        "2001:db8::9".parse().unwrap(),
        "fd00:1::77".parse().unwrap(),
    ];
    let mut out = Vec::new();
    for inst in &flat.instances {
        for &dst in &inst.addrs {
            let srcs: &[IpAddr] = if dst.is_ipv4() {
                &outside_v4
            } else {
                &outside_v6
            };
            for &src in srcs {
                for dport in [22u16, 80, 443, 5432, 8080] {
                    *sport = sport.wrapping_add(1).max(1024);
                    out.push(Packet::tcp(src, dst, *sport, dport, TcpFlags::SYN));
                    *sport = sport.wrapping_add(1).max(1024);
                    out.push(Packet::udp(src, dst, *sport, dport));
                }
            }
        }
    }
    out
}

/// The verdict of the classifier in force at an instance's port for a
/// packet the host hands the bridge.
fn in_force(pkt: &Packet) -> bool {
    let prog =
        SchedClassifier::from_pin(Path::new(PIN_ROOT).join("progs").join(pn::TO_INSTANCE)).unwrap();
    let frame = sgfw::ebpf::testrun::frame(pkt);
    let mut ctx = [0u8; 44];
    ctx[8..12].copy_from_slice(&(STAMP_HOST << MARK_IDENTITY_SHIFT).to_ne_bytes());
    let mut out = [0u8; 512];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(&frame);
    opts.ctx_in = Some(&ctx);
    opts.ctx_out = Some(&mut out);
    prog.test_run(opts).unwrap().return_value == 0
}

/// The evaluator's verdict under `flat`, at the port of whichever instance
/// owns the destination there (addresses move between instances across
/// models); an address of no instance is not sgfw's to judge.
fn expected(flat: &FlatModel, pkt: &Packet) -> bool {
    let wire = Wire {
        packet: pkt.clone(),
        from: None,
        to: flat
            .instances
            .iter()
            .position(|i| i.addrs.contains(&pkt.dst)),
        unattached: false,
        vlan: false,
        fragment: None,
    };
    evaluate_wire(flat, &mut Conntrack::new(), &wire, 1).allowed
}

fn apply(path: &Path, crash_after: Option<u64>) -> std::process::ExitStatus {
    let mut cmd = Command::new(sgfw_bin());
    cmd.args(["apply", "--backend", "ebpf", "-f"]).arg(path);
    if let Some(n) = crash_after {
        cmd.env("SGFW_CRASH_AFTER_MAP_WRITES", n.to_string());
    }
    cmd.output().unwrap().status
}

fn generation() -> u64 {
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(STATE).unwrap()).unwrap();
    s["generation"].as_u64().unwrap()
}

#[test]
fn killed_applies_leave_a_whole_policy() {
    if !require_root("killed_applies_leave_a_whole_policy") {
        return;
    }
    let _teardown = TeardownOnDrop;
    let _ = sgfw(&["teardown"]);
    let dir = std::env::temp_dir().join(format!("sgfw-crash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Models whose instances are the same (indices are stable) but whose
    // groups and NACLs differ: B retires most of A's objects.
    let (mut a_json, mut a) = model(11);
    let (mut b_json, mut b) = model(12);
    for seed in 13..200 {
        if a.instances.len() == b.instances.len() && !a.instances.is_empty() {
            break;
        }
        (b_json, b) = model(seed);
        if seed % 7 == 0 {
            (a_json, a) = model(seed + 1000);
        }
    }
    let (c_json, c) = model(9_999);
    let (pa, pb, pc) = (dir.join("a.json"), dir.join("b.json"), dir.join("c.json"));
    std::fs::write(&pa, &a_json).unwrap();
    std::fs::write(&pb, &b_json).unwrap();
    std::fs::write(&pc, &c_json).unwrap();
    let mut sport = 1024u16;
    let mut n = 0u64;
    let mut kills = 0;
    let mut in_retire = 0;
    let mut failures = Vec::new();
    loop {
        assert!(apply(&pa, None).success(), "applying A");
        let gen_a = generation();
        let status = apply(&pb, Some(n));
        if status.success() {
            break;
        }
        assert_eq!(
            status.signal(),
            Some(libc::SIGABRT),
            "apply B with a crash after {n} writes: {status}"
        );
        kills += 1;
        // Whatever was in force when it died: A's or B's verdict, per flow.
        let probes_now = probes(&a, &mut sport);
        let mut saw_b_only = false;
        for p in &probes_now {
            let got = in_force(p);
            let (wa, wb) = (expected(&a, p), expected(&b, p));
            if got != wa && got != wb {
                failures.push(format!(
                    "killed after {n} writes: {p:?} -> {got}, A {wa}, B {wb}"
                ));
            }
            saw_b_only |= got == wb && got != wa;
        }
        if saw_b_only {
            in_retire += 1;
        }
        // The next apply enforces exactly its model, under a new generation.
        assert!(apply(&pa, None).success(), "re-applying A after the kill");
        let gen_again = generation();
        if gen_again <= gen_a {
            failures.push(format!(
                "killed after {n} writes: generation {gen_again} after re-applying, was {gen_a}"
            ));
        }
        for p in probes(&a, &mut sport) {
            if in_force(&p) != expected(&a, &p) {
                failures.push(format!("re-applied A after a kill at {n}: {p:?}"));
            }
        }
        // A third model: new objects under new ids, which must not be the
        // ids B's killed apply had begun to write.
        if !c.instances.is_empty() {
            // (The same point may fall elsewhere in this apply, or past it.)
            let _ = apply(&pb, Some(n));
            assert!(apply(&pc, None).success(), "applying C after a kill");
            for p in probes(&c, &mut sport) {
                if in_force(&p) != expected(&c, &p) {
                    failures.push(format!("applied C after a kill at {n}: {p:?}"));
                }
            }
        }
        assert!(failures.len() < 20, "{}", failures.join("\n"));
        // Every early point, then steps of an eighth.
        n = if n < 16 { n + 1 } else { n + n / 8 };
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "crash: {kills} kills (B in force somewhere after {in_retire}), whole apply {n} writes or fewer"
    );
    assert!(kills >= 10, "too few crash points: {kills}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
