//! Differential test: random valid models and random packets through the
//! BPF classifiers (BPF_PROG_TEST_RUN) and through the reference evaluator;
//! every verdict must agree. Time advances across every timeout; models are
//! re-applied mid-stream (rules removed) while conntrack carries on.
//!
//! Packets travel between ports: each instance has a port of its own (a
//! dummy device in a private network namespace), half the instances are
//! bound to theirs, and the generator makes the hostile classes of
//! docs/semantics.md too: fragments (in order, out of order, first fragment
//! missing), broadcast and multicast, spoofed sources, ICMP ids that collide
//! with tracked flows, VLAN tags; SG *and* NACL changes between applies.
//!
//! `SGFW_DIFF_SEED=N` replays one seed; `SGFW_DIFF_PACKETS` sets the total
//! (default 100,000) and `SGFW_DIFF_PER_MODEL` the packets per model
//! (default 2,000). The long run (1,000,000 packets over 200 models) is
//! `cargo xtask test-long`.

use sgfw::ebpf::testrun::{TestDataplane, XdpTally, private_ports};
use sgfw::eval::{Conntrack, evaluate_wire};
use sgfw::packet::Wire;
use sgfw::validate::validate;
use sgfw_tests::random::{self, Rng};

/// Per-seed tallies: (delivered, dropped, tracked-or-related, passthrough,
/// blocked before any stage, later fragments delivered).
type Tally = [usize; 6];

fn run_seed(
    seed: u64,
    packets: usize,
    tally: &mut Tally,
    xdp: Option<&mut XdpTally>,
) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let model = random::model(&mut rng);
    let (valid, _) =
        validate(&model).map_err(|e| format!("seed {seed}: generated model invalid:\n{e}"))?;
    let mut flat = valid.flatten();
    let mut dp =
        TestDataplane::new(&flat, 65_536).map_err(|e| format!("seed {seed}: load: {e:?}"))?;
    let ports = private_ports(flat.instances.len()).map_err(|e| format!("ports: {e:?}"))?;
    dp.set_ports(&flat, &ports)
        .map_err(|e| format!("seed {seed}: ports: {e:?}"))?;
    dp.set_xdp(xdp.is_some());
    let mut pending: Vec<Wire> = Vec::new();
    let mut next_id: u32 = 1;
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
            if rng.chance(50) {
                random::mutate_nacls(&mut rng, &mut m);
            }
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
        // Now and then a datagram in fragments: sent in order, out of
        // order, or without its first fragment.
        let wire = if !pending.is_empty() && rng.chance(40) {
            let i = if rng.chance(70) {
                0
            } else {
                rng.below(pending.len())
            };
            pending.remove(i)
        } else {
            let w = random::wire(&mut rng, &flat, &history);
            if rng.chance(6) && !w.vlan {
                let id = if rng.chance(10) { 1 } else { next_id };
                next_id += 1;
                let mut frags = random::fragments(&mut rng, &w, id);
                if rng.chance(15) {
                    frags.remove(0);
                }
                let first = frags.remove(0);
                pending.extend(frags);
                first
            } else {
                w
            }
        };
        let pkt = wire.packet.clone();
        dp.set_time(now).map_err(|e| format!("{e:?}"))?;
        let want = evaluate_wire(&flat, &mut ct, &wire, now);
        let got = dp
            .deliver_wire(&wire)
            .map_err(|e| format!("seed {seed}: run: {e:?}"))?;
        if got != want.allowed {
            return Err(format!(
                "seed {seed}, packet {n}: dataplane {} but the reference evaluator {}\n  wire: {wire:?}\n  evaluator: {want:?}\n  replay: SGFW_DIFF_SEED={seed} cargo xtask test -- --test differential",
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
        if want.blocked.is_some() {
            tally[4] += 1;
        }
        if want.fragment {
            tally[5] += 1;
        }
        // Mostly remember delivered packets: their replies exercise tracking.
        if (want.allowed || rng.chance(20)) && wire.fragment.is_none_or(|f| !f.is_later()) {
            history.push(pkt);
        }
        if history.len() > 64 {
            history.remove(0);
        }
    }
    if let Some(x) = xdp {
        let t = dp.xdp_tally();
        x.judged += t.judged;
        x.dropped += t.dropped;
        x.missed += t.missed;
        if t.missed != 0 {
            return Err(format!(
                "seed {seed}: the XDP pre-filter passed {} frame(s) that the TC sender's hook then dropped\n  replay: SGFW_DIFF_SEED={seed}",
                t.missed
            ));
        }
    }
    Ok(())
}

#[test]
fn bpf_classifier_agrees_with_reference_evaluator() {
    if !sgfw_tests::require_root("differential") {
        return;
    }
    // Each run unshares its network namespace for its ports: a thread of its own.
    let h = std::thread::spawn(|| run_all(false));
    if let Err(e) = h.join() {
        std::panic::resume_unwind(e);
    }
}

/// The `xdp` dataplane: `sgfw_xdp_from_instance` in front of the TC
/// sender's hook. Delivery must still agree with the evaluator packet by
/// packet, and the pre-filter must drop every denial of the sending leg
/// itself (a frame it passes that TC then drops is a failure), so it is
/// held to the same semantics, not just shadowed by TC.
#[test]
fn xdp_prefilter_agrees_with_reference_evaluator() {
    if !sgfw_tests::require_root("differential (xdp)") {
        return;
    }
    let h = std::thread::spawn(|| run_all(true));
    if let Err(e) = h.join() {
        std::panic::resume_unwind(e);
    }
}

#[expect(clippy::panic, reason = "the body of a test, on its own thread")]
fn run_all(xdp: bool) {
    let total: usize = std::env::var("SGFW_DIFF_PACKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    if let Some(seed) = std::env::var("SGFW_DIFF_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        let mut x = XdpTally::default();
        if let Err(e) = run_seed(seed, total.min(20_000), &mut [0; 6], xdp.then_some(&mut x)) {
            panic!("{e}");
        }
        return;
    }
    let per_model: usize = std::env::var("SGFW_DIFF_PER_MODEL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let mut failures = Vec::new();
    let mut tally = [0; 6];
    let mut x = XdpTally::default();
    for seed in 1..=(total / per_model) as u64 {
        if let Err(e) = run_seed(seed, per_model, &mut tally, xdp.then_some(&mut x)) {
            failures.push(e);
            if failures.len() >= 3 {
                break;
            }
        }
    }
    eprintln!(
        "differential: {} packets over {} models agreed: {} delivered, {} dropped, {} by tracking, {} passthrough, {} blocked before any stage, {} later fragments delivered",
        tally[0] + tally[1],
        total / per_model,
        tally[0],
        tally[1],
        tally[2],
        tally[3],
        tally[4],
        tally[5]
    );
    if xdp {
        eprintln!(
            "differential (xdp): the pre-filter judged {} frames at senders' ports and dropped {}; {} missed",
            x.judged, x.dropped, x.missed
        );
        assert!(
            x.dropped > total / 100,
            "the XDP pre-filter dropped too little: {x:?}"
        );
    }
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
    assert!(tally[2] > total / 100, "too few tracked packets: {tally:?}");
    assert!(tally[4] > total / 100, "too few hostile packets: {tally:?}");
    assert!(
        tally[5] > total / 1000,
        "too few fragments delivered: {tally:?}"
    );
}
