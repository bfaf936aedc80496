//! Racing applies and teardowns through the `sgfw` command: rounds of four
//! concurrent `sgfw apply` runs (two `--backend ebpf`, two `--backend
//! nftables`), every fifth round with a concurrent `sgfw teardown` in place
//! of one of them. Each round applies a model of its own (even rounds admit
//! TCP 80, odd rounds TCP 81), so a stale model shows in real traffic.
//!
//! After every round, exactly one backend is in place and it enforces this
//! round's model — or, only in a round with a teardown, nothing is. Never
//! both, never neither after the applies, never the previous round's model.
//! This holds because every apply (with the removal of the backend it
//! replaces) and every teardown holds the host-wide lock (`sgfw::hostlock`).
#![expect(
    clippy::expect_used,
    reason = "test code: a failed step is a failed test"
)]

use std::path::Path;
use std::process::Command;

use sgfw::model::IpPermission;
use sgfw_tests::scenario::{Backend, Lab, all_anywhere, sg};

use sgfw_tests::sgfw;

fn nft_present() -> bool {
    let o = Command::new("nft")
        .args(["list", "table", "inet", "sgfw"])
        .output()
        .expect("running nft");
    o.status.success()
}

fn ebpf_present() -> bool {
    Path::new("/sys/fs/bpf/sgfw/maps/SGFW_CONFIG").exists()
}

#[test]
fn concurrent_applies_and_teardowns_end_with_one_backend_and_the_last_model() {
    if !sgfw_tests::require_root("race") {
        return;
    }
    let mut lab = Lab::new(Backend::Ebpf, &["a", "b"], &[("client", 0), ("web", 1)]);
    let _guard = sgfw_tests::TeardownOnDrop;
    lab.serve("web", &[80, 81], &[]);
    let web = lab.addr("web", false);
    let mut files = Vec::new();
    for port in [80u16, 81] {
        let model = lab.model(
            &[("client", &["sg-client"]), ("web", &["sg-web"])],
            vec![
                sg("sg-client", vec![], vec![all_anywhere()]),
                sg(
                    "sg-web",
                    vec![IpPermission::tcp(port, port).from_cidr("0.0.0.0/0")],
                    vec![all_anywhere()],
                ),
            ],
            vec![],
        );
        let tag = lab.bed.instances[0].netns.clone();
        let path = std::env::temp_dir().join(format!("{tag}-race-{port}.json"));
        std::fs::write(&path, model.to_json().unwrap()).unwrap();
        files.push(path);
    }
    let rounds = 20;
    let mut ended_empty = 0;
    for round in 0..rounds {
        let file = files[round % 2].to_str().unwrap().to_string();
        let with_teardown = round % 5 == 4;
        let mut jobs: Vec<Vec<String>> = ["ebpf", "nftables", "ebpf", "nftables"]
            .iter()
            .map(|b| {
                vec![
                    "apply".to_string(),
                    "-f".to_string(),
                    file.clone(),
                    "--backend".to_string(),
                    (*b).to_string(),
                ]
            })
            .collect();
        if with_teardown {
            jobs[3] = vec!["teardown".to_string()];
        }
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|args| std::thread::spawn(move || (args.clone(), sgfw(&args))))
            .collect();
        for h in handles {
            let (args, o) = h.join().unwrap();
            assert!(
                o.status.success(),
                "round {round}: sgfw {args:?} failed:\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let (nft, ebpf) = (nft_present(), ebpf_present());
        assert!(!(nft && ebpf), "round {round}: both backends are in place");
        if !nft && !ebpf {
            assert!(
                with_teardown,
                "round {round}: no backend in place after four applies"
            );
            ended_empty += 1;
            continue;
        }
        // The model of this round, not the previous one's.
        let (open, closed) = if round % 2 == 0 { (80, 81) } else { (81, 80) };
        assert!(
            lab.bed.tcp("client", web, open),
            "round {round}: port {open} of this round's model is refused ({})",
            if nft { "nftables" } else { "ebpf" }
        );
        assert!(
            !lab.bed.tcp("client", web, closed),
            "round {round}: port {closed} of the previous model still admitted ({})",
            if nft { "nftables" } else { "ebpf" }
        );
    }
    eprintln!(
        "race: {rounds} rounds of 4 concurrent runs; {ended_empty} ended with a teardown last"
    );
    for f in files {
        let _ = std::fs::remove_file(f);
    }
}
