//! `sgfw bench`: per-packet classifier cost, real traffic, control plane and
//! connection tracking at scale, measured side by side in one run and
//! reported as ratios to a baseline of the same run (these machines are
//! shared and noisy). Writes `report.md` and SVG charts into `--out`.
//!
//! Nothing here is a test: timings never decide pass or fail.

mod chart;
mod control;
mod flood;
mod measure;
mod models;
mod packet;
mod traffic;
mod xdp;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};

use super::Failure;

/// Which parts to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Part {
    /// BPF_PROG_TEST_RUN cost per packet vs rule and NACL counts.
    Packet,
    /// iperf3 between namespaces: baseline, eBPF, nftables.
    Traffic,
    /// Validate/compile/apply time and memory of a 1,000-instance model.
    Control,
    /// One million tracked flows.
    Conntrack,
    /// The XDP pre-filter against the TC sender's hook.
    Xdp,
}

/// Benchmarks (root): per-packet cost, real traffic, control plane, conntrack scale.
///
/// Example: `sgfw bench --out target/bench` (what `cargo xtask bench` runs)
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  sgfw bench --out target/bench\n  sgfw bench --only packet --repeat 200000"
)]
pub struct BenchArgs {
    /// Where report.md and the charts go.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// BPF_PROG_TEST_RUN repeats per measurement.
    #[arg(long, default_value_t = 1_000_000)]
    pub repeat: u32,
    /// Measurements per point (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 3)]
    pub seconds: u32,
    /// Only these parts (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Part>,
    /// Internal: run the control-plane measurement in this process and
    /// print it as JSON (the parent reads its peak memory).
    #[arg(long, hide = true)]
    pub control_child: bool,
}

fn wants(a: &BenchArgs, p: Part) -> bool {
    a.only.is_empty() || a.only.contains(&p)
}

/// The median of some samples.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .nth(1)
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024 / 1024);
    let commit = commit();
    format!(
        "{cores} cores ({cpu}), {mem} GiB, kernel {}, sgfw {} commit {commit}",
        kernel.trim(),
        env!("CARGO_PKG_VERSION")
    )
}

/// Runs `sgfw bench`.
/// The commit benchmarked (`unknown` outside a git checkout).
fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

pub fn run(a: &BenchArgs) -> Result<ExitCode, Failure> {
    if a.control_child {
        control::child()?;
        return Ok(ExitCode::SUCCESS);
    }
    let t = Instant::now();
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut report = String::new();
    let _ = writeln!(report, "# sgfw benchmark report\n");
    let _ = writeln!(report, "Machine: {}\n", machine());
    let _ = writeln!(
        report,
        "All figures of one table come from one run on this machine; read the ratios, not the absolute numbers (the machine is shared and noisy).\n"
    );
    let mut failed = 0;
    let mut part = |report: &mut String, what: &str, r: Result<String, Failure>| match r {
        Ok(s) => report.push_str(&s),
        Err(e) => {
            failed += 1;
            let msg = match e {
                Failure::BadInput(e) | Failure::Runtime(e) => super::chain(&e),
            };
            eprintln!("bench: {what} failed: {msg}");
            let _ = writeln!(report, "## {what}: FAILED\n\n{msg}\n");
        }
    };
    let mut json = serde_json::Map::new();
    json.insert("commit".into(), commit().into());
    let mut per_packet = serde_json::Map::new();
    if wants(a, Part::Packet) {
        eprintln!(
            "bench: per-packet classifier cost (BPF_PROG_TEST_RUN, {} repeats x {} runs)",
            a.repeat, a.runs
        );
        match packet::run(a) {
            Ok((text, v)) => {
                report.push_str(&text);
                if let serde_json::Value::Object(o) = v {
                    per_packet.extend(o);
                }
            }
            Err(e) => part(&mut report, "per-packet cost", Err(e)),
        }
    }
    if wants(a, Part::Xdp) {
        eprintln!("bench: the XDP pre-filter (BPF_PROG_TEST_RUN)");
        match xdp::run(a) {
            Ok((text, pts)) => {
                report.push_str(&text);
                let last = pts.last();
                let mut v = serde_json::json!({
                    "denied_ns": last.map(|p| p.xdp_denied_ns),
                    "denied_tc_ns": last.map(|p| p.tc_denied_ns),
                    "denied_ratio_to_tc": last.map(|p| p.xdp_denied_ns / p.tc_denied_ns),
                    "new_flow_ns": last.map(|p| p.xdp_new_flow_ns),
                    "new_flow_added_ratio": last.map(|p| (p.xdp_new_flow_ns + p.tc_new_flow_ns) / p.tc_new_flow_ns),
                    "points": pts,
                });
                eprintln!("bench: a flood of denied frames under no filtering, TC and XDP");
                match flood::run(a) {
                    Ok((text, f)) => {
                        report.push_str(&text);
                        v["flood"] = serde_json::to_value(&f)?;
                    }
                    Err(e) => part(&mut report, "XDP flood", Err(e)),
                }
                json.insert("xdp".into(), v);
            }
            Err(e) => part(&mut report, "XDP pre-filter", Err(e)),
        }
    }
    if wants(a, Part::Conntrack) {
        eprintln!("bench: connection tracking at 1,000,000 flows");
        match packet::conntrack_scale(a) {
            Ok((text, v)) => {
                report.push_str(&text);
                if let serde_json::Value::Object(o) = v {
                    per_packet.extend(o);
                }
            }
            Err(e) => part(&mut report, "conntrack at scale", Err(e)),
        }
    }
    if !per_packet.is_empty() {
        json.insert("per_packet".into(), per_packet.into());
    }
    if wants(a, Part::Control) {
        eprintln!("bench: control plane (1,000 instances x 5 groups x 60 rules per direction)");
        match control::run() {
            Ok((text, v)) => {
                report.push_str(&text);
                json.insert("control".into(), v);
            }
            Err(e) => part(&mut report, "control plane", Err(e)),
        }
    }
    if wants(a, Part::Traffic) {
        eprintln!("bench: real traffic (iperf3, {} s per run)", a.seconds);
        match traffic::run(a) {
            Ok((text, t)) => {
                report.push_str(&text);
                json.insert("traffic".into(), serde_json::to_value(&t)?);
            }
            Err(e) => part(&mut report, "real traffic", Err(e)),
        }
    }
    let _ = writeln!(
        report,
        "\n_Total benchmark time: {:.0} s._",
        t.elapsed().as_secs_f64()
    );
    let jpath = a.out.join("report.json");
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(json))?;
    std::fs::write(&jpath, text).with_context(|| format!("writing {}", jpath.display()))?;
    let path = a.out.join("report.md");
    std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    println!("{report}");
    eprintln!("bench: wrote {}", path.display());
    if failed > 0 {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "{failed} benchmark part(s) failed"
        )));
    }
    Ok(ExitCode::SUCCESS)
}
