//! Control plane: validate, compile and apply a 1,000-instance model, the
//! time for a one-rule change to be enforced, BPF map memory. Measured in a
//! child process so its peak memory is its own.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, anyhow};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use serde::{Deserialize, Serialize};
use sgfw::backend::{EnforcementMode, Enforcer};
use sgfw::ebpf::compile::{Indices, compile};
use sgfw::ebpf::testrun::{TC_ACT_OK, TC_ACT_SHOT, frame};
use sgfw::ebpf::{ApplyOptions, EbpfBackend};
use sgfw::model::{IpPermission, Model};
use sgfw::nft::NftBackend;
use sgfw::packet::{Packet, TcpFlags};
use sgfw::sys::{Host as _, RealHost};
use sgfw::vpc::{Delta, Vpc};
use sgfw_common::program_names as pn;

use super::models;
use crate::cli::Failure;

#[derive(Debug, Serialize, Deserialize)]
struct Measured {
    instances: usize,
    flat_rules: usize,
    parse_ms: f64,
    validate_flatten_ms: f64,
    compile_ms: f64,
    first_apply_ms: f64,
    reapply_same_ms: f64,
    one_rule_change_ms: f64,
    one_rule_apply_only_ms: f64,
    small_one_rule_change_ms: f64,
    small_one_rule_apply_only_ms: f64,
    /// `Vpc::apply` of one Authorize/Revoke until a probe sees it, median of
    /// several.
    delta_ms: Vec<f64>,
    /// `Vpc::replace` with a one-rule change until a probe sees it.
    vpc_replace_ms: f64,
    /// The nftables backend on the 20- and the 1,000-instance model.
    nft: Vec<NftMeasured>,
    map_entries: Vec<(String, usize)>,
    map_memory: Vec<(String, u64)>,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Runs the child and formats its report section with its peak RSS;
/// returns it with the `control` figures of report.json.
pub fn run() -> Result<(String, serde_json::Value), Failure> {
    let exe = std::env::current_exe().context("finding the sgfw binary")?;
    let out = std::process::Command::new(exe)
        .args(["bench", "--control-child"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running the control-plane child")?;
    if !out.status.success() {
        return Err(Failure::Runtime(anyhow!(
            "the control-plane benchmark failed ({})",
            out.status
        )));
    }
    let m: Measured =
        serde_json::from_slice(&out.stdout).context("reading the child's measurements")?;
    // SAFETY: getrusage writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer; RUSAGE_CHILDREN covers the waited-for child.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let peak_mib = ru.ru_maxrss as f64 / 1024.0;
    let mut s = String::new();
    let _ = writeln!(s, "## 3. Control plane\n");
    let _ = writeln!(
        s,
        "{} instances in 10 subnets, each with 5 of 50 groups of 60 ingress + 60 egress permissions (one per group references another group; the rest name an IPv4 and an IPv6 CIDR), 20-entry NACLs per direction and family: {} resolved SG rules in all.\n",
        m.instances, m.flat_rules
    );
    let _ = writeln!(s, "| step | time |\n|---|---|");
    let _ = writeln!(s, "| parse JSON | {:.0} ms |", m.parse_ms);
    let _ = writeln!(
        s,
        "| validate + flatten | {:.0} ms |",
        m.validate_flatten_ms
    );
    let _ = writeln!(s, "| compile to map entries | {:.0} ms |", m.compile_ms);
    let _ = writeln!(
        s,
        "| first apply (compile, load, pin, write; target < 2 s) | {:.0} ms |",
        m.first_apply_ms
    );
    let _ = writeln!(
        s,
        "| re-apply of the same model (new generation) | {:.0} ms |",
        m.reapply_same_ms
    );
    let _ = writeln!(
        s,
        "| one-rule change without state: validate + flatten + apply + probe sees it | {:.0} ms (apply alone {:.0} ms) |",
        m.one_rule_change_ms, m.one_rule_apply_only_ms
    );
    let _ = writeln!(
        s,
        "| the same one-rule change on a 20-instance model (43,800 rules) | {:.1} ms (apply alone {:.1} ms) |",
        m.small_one_rule_change_ms, m.small_one_rule_apply_only_ms
    );
    let delta_ms = super::median(m.delta_ms.clone());
    let _ = writeln!(
        s,
        "| one Authorize or Revoke through `Vpc::apply` until a probe sees it (target < 5 ms; median of {}) | {delta_ms:.1} ms |",
        m.delta_ms.len()
    );
    let _ = writeln!(
        s,
        "| whole-model `Vpc::replace` with one rule more, until a probe sees it (what `sgfw run` does; target < 50 ms) | {:.1} ms |",
        m.vpc_replace_ms
    );
    for n in &m.nft {
        let _ = writeln!(
            s,
            "| nftables backend, {} instances: first apply (one transaction replacing both tables, {:.1} MiB) | {:.0} ms |",
            n.instances,
            n.ruleset_bytes as f64 / 1048576.0,
            n.first_apply_ms
        );
        let _ = writeln!(
            s,
            "| nftables backend, {} instances: one Authorize or Revoke through `Vpc::apply` (median of {}) | {:.1} ms |",
            n.instances,
            n.delta_ms.len(),
            super::median(n.delta_ms.clone())
        );
        let _ = writeln!(
            s,
            "| nftables backend, {} instances: whole-model `Vpc::replace` with one rule more (target < 50 ms) | {:.1} ms |",
            n.instances, n.vpc_replace_ms
        );
        let _ = writeln!(
            s,
            "| nftables backend, {} instances: the one-rule change without a Vpc, validate + flatten + render + {} transaction of {:.1} KiB | {:.0} ms |",
            n.instances,
            if n.change_incremental {
                "an in-place"
            } else {
                "a replacing"
            },
            n.change_bytes as f64 / 1024.0,
            n.one_rule_change_ms
        );
        let _ = writeln!(
            s,
            "| nftables backend, {} instances: the same apply again (nothing changed) | {:.0} ms |",
            n.instances, n.reapply_same_ms
        );
    }
    let _ = writeln!(
        s,
        "| peak resident memory of the process | {peak_mib:.0} MiB |\n"
    );
    let total: u64 = m.map_memory.iter().map(|(_, b)| *b).sum();
    let _ = writeln!(
        s,
        "BPF map memory (kernel memlock): **{:.1} MiB** in all.\n",
        total as f64 / 1048576.0
    );
    let _ = writeln!(s, "| map | entries written | memory |\n|---|---|---|");
    for (name, bytes) in &m.map_memory {
        let n = m
            .map_entries
            .iter()
            .find(|(k, _)| k == name)
            .map_or("-".to_string(), |(_, v)| v.to_string());
        let _ = writeln!(s, "| {name} | {n} | {:.1} MiB |", *bytes as f64 / 1048576.0);
    }
    let _ = writeln!(s);
    let nft_at = |n: usize| m.nft.iter().find(|x| x.instances == n);
    let json = serde_json::json!({
        "instances": m.instances,
        "flat_rules": m.flat_rules,
        "first_apply_ms_1000": m.first_apply_ms,
        "reapply_same_ms_1000": m.reapply_same_ms,
        "one_rule_change_ms_1000": m.vpc_replace_ms,
        "stateless_one_rule_change_ms_1000": m.one_rule_change_ms,
        "stateless_one_rule_apply_only_ms_1000": m.one_rule_apply_only_ms,
        "delta_ms_1000": delta_ms,
        "nft_one_rule_change_ms_1000": nft_at(1000).map(|n| n.vpc_replace_ms),
        "nft_delta_ms_1000": nft_at(1000).map(|n| super::median(n.delta_ms.clone())),
        "nft_stateless_one_rule_change_ms_1000": nft_at(1000).map(|n| n.one_rule_change_ms),
        "nft_first_apply_ms_1000": nft_at(1000).map(|n| n.first_apply_ms),
        "nft_ruleset_mib_1000": nft_at(1000).map(|n| n.ruleset_bytes as f64 / 1048576.0),
        "nft_first_apply_ms_20": nft_at(20).map(|n| n.first_apply_ms),
        "nft_one_rule_change_ms_20": nft_at(20).map(|n| n.vpc_replace_ms),
        "nft_delta_ms_20": nft_at(20).map(|n| super::median(n.delta_ms.clone())),
        "delta_samples_ms_1000": m.delta_ms,
        "one_rule_change_ms_20": m.small_one_rule_change_ms,
        "peak_rss_mib_1000": peak_mib,
        "bpf_map_mib": total as f64 / 1048576.0,
    });
    Ok((s, json))
}

fn probe(pin_root: &std::path::Path, pkt: &Packet) -> Result<u32, Failure> {
    let prog = SchedClassifier::from_pin(pin_root.join("progs").join(pn::TO_INSTANCE))
        .context("opening the pinned program")?;
    let f = frame(pkt);
    // As the host hands it to the bridge (stamped by the bridge's hook).
    let mut ctx = [0u8; 44];
    ctx[8..12].copy_from_slice(
        &(sgfw_common::STAMP_HOST << sgfw_common::MARK_IDENTITY_SHIFT).to_ne_bytes(),
    );
    let mut out = [0u8; 512];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(&f);
    opts.ctx_in = Some(&ctx);
    opts.ctx_out = Some(&mut out);
    Ok(prog
        .test_run(opts)
        .context("BPF_PROG_TEST_RUN")?
        .return_value)
}

/// The measurement itself (in the child); prints JSON on stdout.
pub fn child() -> Result<(), Failure> {
    let model = models::large(1_000);
    let json = model.to_json().map_err(|e| anyhow!("{e}"))?;
    let t = Instant::now();
    let parsed = Model::from_json(&json).map_err(|e| anyhow!("{e}"))?;
    let parse_ms = ms(t);
    let t = Instant::now();
    let (valid, _) =
        sgfw::validate::validate(&parsed).map_err(|e| anyhow!("large model invalid: {e}"))?;
    let flat = valid.flatten();
    let validate_flatten_ms = ms(t);
    let flat_rules = flat
        .instances
        .iter()
        .map(|i| i.ingress.len() + i.egress.len())
        .sum();
    let t = Instant::now();
    let mut idx = Indices::default();
    idx.update(&flat);
    let c = compile(&flat, &idx, &sgfw::ebpf::compile::IdBook::default())
        .map_err(|e| anyhow!("{e}"))?;
    let compile_ms = ms(t);
    drop(c);

    let tag = format!("sgfw-bench-{}", std::process::id());
    let be = EbpfBackend::at(
        PathBuf::from(format!("/sys/fs/bpf/{tag}")),
        PathBuf::from(format!("/run/sgfw/{tag}.json")),
    );
    let result = (|| -> Result<Measured, Failure> {
        let t = Instant::now();
        let report = be
            .apply(&flat, &RealHost, &ApplyOptions::default())
            .context("first apply")?;
        let first_apply_ms = ms(t);
        let t = Instant::now();
        be.apply(&flat, &RealHost, &ApplyOptions::default())
            .context("re-apply")?;
        let reapply_same_ms = ms(t);

        let (one_rule_change_ms, one_rule_apply_only_ms) = one_rule_change(&be, &parsed, &flat)?;
        let (delta_ms, vpc_replace_ms) = vpc_changes(&be, &parsed, &flat)?;
        let map_memory = be.open_maps()?.memory().into_iter().collect();
        Ok(Measured {
            instances: flat.instances.len(),
            flat_rules,
            parse_ms,
            validate_flatten_ms,
            compile_ms,
            first_apply_ms,
            reapply_same_ms,
            one_rule_change_ms,
            one_rule_apply_only_ms,
            small_one_rule_change_ms: f64::NAN,
            small_one_rule_apply_only_ms: f64::NAN,
            delta_ms,
            vpc_replace_ms,
            nft: Vec::new(),
            map_entries: report.entries.into_iter().collect(),
            map_memory,
        })
    })();
    let _ = be.teardown();
    // The lock file is the backend's to keep; this one's state path is the bench's own.
    let _ = std::fs::remove_file(be.state_path.with_extension("lock"));
    let mut m = result?;
    // The same change on an emulator-sized model of 20 instances.
    let small = models::large(20);
    let (v, _) =
        sgfw::validate::validate(&small).map_err(|e| anyhow!("small model invalid: {e}"))?;
    let small_flat = v.flatten();
    let be = EbpfBackend::at(
        PathBuf::from(format!("/sys/fs/bpf/{tag}-small")),
        PathBuf::from(format!("/run/sgfw/{tag}-small.json")),
    );
    let r = be
        .apply(&small_flat, &RealHost, &ApplyOptions::default())
        .context("small model apply")
        .map_err(Failure::from)
        .and_then(|_| one_rule_change(&be, &small, &small_flat));
    let _ = be.teardown();
    // The lock file is the backend's to keep; this one's state path is the bench's own.
    let _ = std::fs::remove_file(be.state_path.with_extension("lock"));
    (m.small_one_rule_change_ms, m.small_one_rule_apply_only_ms) = r?;
    // The nftables backend: the first apply replaces the tables, the
    // one-rule change updates them in place.
    m.nft = vec![
        nft_changes(&small, &small_flat)?,
        nft_changes(&parsed, &flat)?,
    ];
    println!("{}", serde_json::to_string(&m)?);
    Ok(())
}

/// The nftables backend on one model.
#[derive(Debug, Serialize, Deserialize)]
struct NftMeasured {
    instances: usize,
    /// First apply: render, one transaction replacing both tables.
    first_apply_ms: f64,
    /// Its nft input, bytes.
    ruleset_bytes: usize,
    /// One rule more in sg-00: validate + flatten + render + the in-place
    /// transaction, until nft returned (the kernel has it then).
    one_rule_change_ms: f64,
    /// Its transaction, bytes, and whether it went in place.
    change_bytes: usize,
    change_incremental: bool,
    /// The same apply again, nothing changed.
    reapply_same_ms: f64,
    /// Through a [`Vpc`] on the nftables backend: Authorize and Revoke of
    /// one rule of sg-00, alternately, until nft returned.
    delta_ms: Vec<f64>,
    /// Its whole-model `Vpc::replace` with one rule more.
    vpc_replace_ms: f64,
}

fn nft_changes(model: &Model, flat: &sgfw::flat::FlatModel) -> Result<NftMeasured, Failure> {
    let nft = NftBackend::new(&RealHost);
    let r = (|| -> Result<NftMeasured, Failure> {
        let t = Instant::now();
        let first = nft.apply(flat).context("nft apply")?;
        let first_apply_ms = ms(t);
        let mut changed = model.clone();
        changed.security_groups[0]
            .ip_permissions
            .push(IpPermission::tcp(9999, 9999).from_cidr("198.51.100.0/24"));
        let t = Instant::now();
        let (v2, _) = sgfw::validate::validate(&changed).map_err(|e| anyhow!("{e}"))?;
        let flat2 = v2.flatten();
        let change = nft.apply(&flat2).context("nft one-rule apply")?;
        let one_rule_change_ms = ms(t);
        let t = Instant::now();
        nft.apply(&flat2).context("nft re-apply")?;
        let reapply_same_ms = ms(t);
        let (delta_ms, vpc_replace_ms) = nft_vpc_changes(model)?;
        Ok(NftMeasured {
            instances: flat.instances.len(),
            first_apply_ms,
            ruleset_bytes: first.ruleset_bytes,
            one_rule_change_ms,
            change_bytes: change.ruleset_bytes,
            change_incremental: change.incremental,
            reapply_same_ms,
            delta_ms,
            vpc_replace_ms,
        })
    })();
    let _ = nft.teardown();
    r
}

/// The `round`-th delta of the churn both backends are measured with:
/// Authorize (even rounds) or Revoke of tcp 9998 from 198.51.100.0/24 on
/// `group_id`'s ingress; whether it authorizes, and the delta.
fn churn(group_id: &str, round: u16) -> (bool, Delta) {
    let authorize = round.is_multiple_of(2);
    let group_id = group_id.to_string();
    let permissions = vec![IpPermission::tcp(9998, 9998).from_cidr("198.51.100.0/24")];
    let d = if authorize {
        Delta::Authorize {
            group_id,
            egress: false,
            permissions,
        }
    } else {
        Delta::Revoke {
            group_id,
            egress: false,
            permissions,
        }
    };
    (authorize, d)
}

/// `model` with one rule more in the first group: tcp 9997 from
/// 198.51.100.0/24 (the whole-model replace both backends are measured with).
fn one_rule_more(model: &Model) -> Model {
    let mut changed = model.clone();
    changed.security_groups[0]
        .ip_permissions
        .push(IpPermission::tcp(9997, 9997).from_cidr("198.51.100.0/24"));
    changed
}

/// [`vpc_changes`] on the nftables backend (its tables applied already):
/// each delta timed until nft returned (the kernel has it then), and
/// checked afterwards in sg-00's chain.
fn nft_vpc_changes(parsed: &Model) -> Result<(Vec<f64>, f64), Failure> {
    let enforcer = Enforcer::with_mode(EnforcementMode::Nftables);
    let (mut vpc, _) = Vpc::new(parsed, enforcer).context("Vpc::new (nftables)")?;
    let group_id = parsed.security_groups[0].group_id.clone();
    let in_chain = |port: &str| -> Result<bool, Failure> {
        let chain = format!("grp_in_{group_id}");
        let text = RealHost
            .nft(&["list", "chain", "inet", "sgfw", &chain], None)
            .context("listing sg-00's chain")?;
        Ok(text.contains(port))
    };
    let mut times = Vec::new();
    for round in 0..6 {
        let (authorize, d) = churn(&group_id, round);
        let t = Instant::now();
        vpc.apply(&d).context("Vpc::apply (nftables)")?;
        times.push(ms(t));
        if in_chain("9998")? != authorize {
            return Err(Failure::Runtime(anyhow!(
                "nftables: after {} sg-00's chain {} port 9998",
                if authorize { "Authorize" } else { "Revoke" },
                if authorize { "lacks" } else { "still has" }
            )));
        }
    }
    let changed = one_rule_more(vpc.model());
    let t = Instant::now();
    vpc.replace(&changed).context("Vpc::replace (nftables)")?;
    let replace_ms = ms(t);
    if !in_chain("9997")? {
        return Err(Failure::Runtime(anyhow!(
            "nftables: the replaced model's new rule is not in sg-00's chain"
        )));
    }
    Ok((times, replace_ms))
}

/// Through a [`Vpc`] holding the model: Authorize and Revoke of one rule of
/// sg-00, alternately, each timed until a probe through the pinned
/// classifier sees it; then a whole-model replace with one rule more.
/// Returns (each delta's ms, the replace's ms).
fn vpc_changes(
    be: &EbpfBackend,
    parsed: &Model,
    flat: &sgfw::flat::FlatModel,
) -> Result<(Vec<f64>, f64), Failure> {
    let enforcer = Enforcer::with_mode(EnforcementMode::Ebpf).with_ebpf(be.clone());
    let (mut vpc, _) = Vpc::new(parsed, enforcer).context("Vpc::new")?;
    let dst: IpAddr = flat.instances[0].addrs[0];
    let src: IpAddr = "198.51.100.7".parse().map_err(|e| anyhow!("{e}"))?;
    let group_id = parsed.security_groups[0].group_id.clone();
    let mut times = Vec::new();
    for round in 0..6 {
        let (authorize, d) = churn(&group_id, round);
        let pkt = Packet::tcp(src, dst, 40000 + round, 9998, TcpFlags::SYN);
        let t = Instant::now();
        vpc.apply(&d).context("Vpc::apply")?;
        let seen = probe(&be.pin_root, &pkt)?;
        times.push(ms(t));
        let want = if authorize { TC_ACT_OK } else { TC_ACT_SHOT };
        if seen != want {
            return Err(Failure::Runtime(anyhow!(
                "after {} the probe got {seen}, expected {want}",
                if authorize { "Authorize" } else { "Revoke" }
            )));
        }
    }
    let changed = one_rule_more(vpc.model());
    let pkt = Packet::tcp(src, dst, 40100, 9997, TcpFlags::SYN);
    let t = Instant::now();
    vpc.replace(&changed).context("Vpc::replace")?;
    let seen = probe(&be.pin_root, &pkt)?;
    let replace_ms = ms(t);
    if seen != TC_ACT_OK {
        return Err(Failure::Runtime(anyhow!(
            "the probe did not see the replaced model's new rule"
        )));
    }
    Ok((times, replace_ms))
}

/// Adds one rule to sg-00 (which the first instance has) and measures until
/// a probe through the pinned classifier sees it: (validate + apply + probe,
/// apply alone), in ms.
fn one_rule_change(
    be: &EbpfBackend,
    parsed: &Model,
    flat: &sgfw::flat::FlatModel,
) -> Result<(f64, f64), Failure> {
    let dst: IpAddr = flat.instances[0].addrs[0];
    let src: IpAddr = "198.51.100.7".parse().map_err(|e| anyhow!("{e}"))?;
    let pkt = Packet::tcp(src, dst, 40000, 9999, TcpFlags::SYN);
    if probe(&be.pin_root, &pkt)? != TC_ACT_SHOT {
        return Err(Failure::Runtime(anyhow!(
            "the probe passed before the rule existed"
        )));
    }
    let mut changed = parsed.clone();
    changed.security_groups[0]
        .ip_permissions
        .push(IpPermission::tcp(9999, 9999).from_cidr("198.51.100.0/24"));
    let t = Instant::now();
    let (v2, _) = sgfw::validate::validate(&changed).map_err(|e| anyhow!("{e}"))?;
    let f2 = v2.flatten();
    let ta = Instant::now();
    be.apply(&f2, &RealHost, &ApplyOptions::default())
        .context("one-rule apply")?;
    let apply_ms = ms(ta);
    let seen = probe(&be.pin_root, &pkt)?;
    let total_ms = ms(t);
    if seen != TC_ACT_OK {
        return Err(Failure::Runtime(anyhow!(
            "the probe did not see the new rule"
        )));
    }
    Ok((total_ms, apply_ms))
}
