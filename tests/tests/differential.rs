//! Differential test: random valid models and random packets through the
//! BPF classifiers (BPF_PROG_TEST_RUN) and through the reference evaluator;
//! every verdict must agree. Time advances across every timeout; models are
//! re-applied mid-stream (rules removed) while conntrack carries on.
//!
//! `SGFW_DIFF_SEED=N` replays one seed; `SGFW_DIFF_PACKETS` sets the total
//! (default 100,000).

use sgfw::ebpf::testrun::TestDataplane;
use sgfw::eval::{Conntrack, evaluate};
use sgfw::validate::validate;
use sgfw_tests::random::{self, Rng};

/// Per-seed tallies: (delivered, dropped, tracked-or-related, passthrough).
type Tally = [usize; 4];

fn run_seed(seed: u64, packets: usize, tally: &mut Tally) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let model = random::model(&mut rng);
    let (valid, _) =
        validate(&model).map_err(|e| format!("seed {seed}: generated model invalid:\n{e}"))?;
    let mut flat = valid.flatten();
    let mut dp =
        TestDataplane::new(&flat, 65_536).map_err(|e| format!("seed {seed}: load: {e:?}"))?;
    let mut ct = Conntrack::new();
    let mut now: u64 = 1_000_000_000_000;
    let mut history = Vec::new();
    for n in 0..packets {
        now += match rng.below(60) {
            0 => 35_000_000_000,
            1 => 65_000_000_000,
            2 => 200_000_000_000,
            3 => 700_000_000_000,
            4 => 11_000_000_000,
            _ => rng.below(2_000_000_000) as u64,
        };
        // Now and then, remove a rule and re-apply: tracked flows must survive.
        if rng.chance(2) {
            let mut m = valid.model().clone();
            if let Some(g) = m.security_groups.get_mut(rng.below(4)) {
                if !g.ip_permissions.is_empty() {
                    let i = rng.below(g.ip_permissions.len());
                    g.ip_permissions.remove(i);
                }
                if !g.ip_permissions_egress.is_empty() && rng.chance(50) {
                    let i = rng.below(g.ip_permissions_egress.len());
                    g.ip_permissions_egress.remove(i);
                }
            }
            if let Ok((v, _)) = validate(&m) {
                flat = v.flatten();
                dp.apply(&flat)
                    .map_err(|e| format!("seed {seed}: re-apply: {e:?}"))?;
            }
        }
        let pkt = random::packet(&mut rng, &flat, &history);
        dp.set_time(now).map_err(|e| format!("{e:?}"))?;
        let want = evaluate(&flat, &mut ct, &pkt, now);
        let got = dp
            .deliver(&flat, &pkt)
            .map_err(|e| format!("seed {seed}: run: {e:?}"))?;
        if got != want.allowed {
            return Err(format!(
                "seed {seed}, packet {n}: dataplane {} but the reference evaluator {}\n  packet: {pkt:?}\n  evaluator: {want:?}\n  replay: SGFW_DIFF_SEED={seed} cargo xtask test -- --test differential",
                if got { "delivered" } else { "dropped" },
                if want.allowed { "allows" } else { "denies" },
            ));
        }
        if want.allowed {
            tally[0] += 1;
        } else {
            tally[1] += 1;
        }
        if want.stages.iter().any(|s| {
            matches!(
                s.by,
                sgfw::eval::Decider::Tracked | sgfw::eval::Decider::Related
            )
        }) {
            tally[2] += 1;
        }
        if want.passthrough.is_some() {
            tally[3] += 1;
        }
        // Mostly remember delivered packets: their replies exercise tracking.
        if want.allowed || rng.chance(20) {
            history.push(pkt);
        }
        if history.len() > 64 {
            history.remove(0);
        }
    }
    Ok(())
}

#[test]
fn bpf_classifier_agrees_with_reference_evaluator() {
    if !sgfw_tests::require_root("differential") {
        return;
    }
    let total: usize = std::env::var("SGFW_DIFF_PACKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    if let Some(seed) = std::env::var("SGFW_DIFF_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        if let Err(e) = run_seed(seed, total.min(20_000), &mut [0; 4]) {
            panic!("{e}");
        }
        return;
    }
    let per_model = 2_000;
    let mut failures = Vec::new();
    let mut tally = [0; 4];
    for seed in 1..=(total / per_model) as u64 {
        if let Err(e) = run_seed(seed, per_model, &mut tally) {
            failures.push(e);
            if failures.len() >= 3 {
                break;
            }
        }
    }
    eprintln!(
        "differential: {} packets agreed: {} delivered, {} dropped, {} by tracking, {} passthrough",
        tally[0] + tally[1],
        tally[0],
        tally[1],
        tally[2],
        tally[3]
    );
    // The generator must exercise both outcomes and the stateful path.
    assert!(
        failures.is_empty(),
        "{} disagreement(s):\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert!(
        tally[0] > total / 10 && tally[1] > total / 10,
        "generator too one-sided: {tally:?}"
    );
    assert!(tally[2] > total / 50, "too few tracked packets: {tally:?}");
}
