//! Per-packet classifier cost through BPF_PROG_TEST_RUN, beside a no-op
//! classifier measured in the same run, and conntrack at one million flows.

use std::fmt::Write as _;
use std::net::IpAddr;

use anyhow::{Context, anyhow};
use sgfw::ebpf::testrun::{TC_ACT_OK, TestDataplane, frame};
use sgfw::packet::{Packet, TcpFlags};
use sgfw_common::program_names as pn;

use super::{BenchArgs, chart, median, models};
use crate::cli::Failure;

/// ns per packet for one program and frame: the median of `runs` test runs
/// of `repeat` repetitions each.
fn measure(
    dp: &mut TestDataplane,
    prog: &str,
    frame: &[u8],
    a: &BenchArgs,
) -> Result<f64, Failure> {
    let mut v = Vec::with_capacity(a.runs);
    for _ in 0..a.runs {
        // The no-op floor lives in the test object, not the production one.
        let (act, ns) = if prog == pn::NOOP {
            (TC_ACT_OK, dp.run_noop(frame, a.repeat)?)
        } else {
            dp.run_frame(prog, frame, a.repeat)?
        };
        if act != TC_ACT_OK {
            return Err(Failure::Runtime(anyhow!(
                "{prog} dropped the benchmark packet (action {act})"
            )));
        }
        v.push(ns as f64);
    }
    Ok(median(v))
}

struct Point {
    label: String,
    floor: f64,
    new_v4: f64,
    est_v4: f64,
    new_v6: f64,
    est_v6: f64,
}

fn flat(m: &sgfw::model::Model) -> Result<sgfw::flat::FlatModel, Failure> {
    let (v, _) =
        sgfw::validate::validate(m).map_err(|e| anyhow!("benchmark model invalid: {e}"))?;
    Ok(v.flatten())
}

/// New flow: every packet misses conntrack (its entry is expired at once:
/// TCP "new" timeout 0), is judged by the NACL and SG lookups and inserts
/// an entry. Established: the entry stays live and the fast path answers.
fn point(label: String, rules: usize, nacl: usize, a: &BenchArgs) -> Result<Point, Failure> {
    let model = flat(&models::target(rules, nacl, "brbench"))?;
    let mut dp = TestDataplane::new(&model, 65_536).context("loading the benchmark dataplane")?;
    let (s4, s6, port) = models::last_rule_source(rules);
    let dst4: IpAddr = "10.20.0.10".parse().map_err(|e| anyhow!("{e}"))?;
    let dst6: IpAddr = "fd20::10".parse().map_err(|e| anyhow!("{e}"))?;
    let syn = |s: &str, d: IpAddr| -> Result<Vec<u8>, Failure> {
        let src: IpAddr = s.parse().map_err(|e| anyhow!("{e}"))?;
        Ok(frame(&Packet::tcp(src, d, 40000, port, TcpFlags::SYN)))
    };
    let (f4, f6) = (syn(&s4, dst4)?, syn(&s6, dst6)?);
    let floor = measure(&mut dp, pn::NOOP, &f4, a)?;
    dp.update_config(|c| c.tcp_new_ns = 0)?;
    let new_v4 = measure(&mut dp, pn::TO_INSTANCE, &f4, a)?;
    let new_v6 = measure(&mut dp, pn::TO_INSTANCE, &f6, a)?;
    dp.update_config(|c| c.tcp_new_ns = 60_000_000_000)?;
    dp.clear_conntrack()?;
    let est_v4 = measure(&mut dp, pn::TO_INSTANCE, &f4, a)?;
    let est_v6 = measure(&mut dp, pn::TO_INSTANCE, &f6, a)?;
    let floor = median(vec![floor, measure(&mut dp, pn::NOOP, &f4, a)?]);
    Ok(Point {
        label,
        floor,
        new_v4,
        est_v4,
        new_v6,
        est_v6,
    })
}

fn table(out: &mut String, head: &str, pts: &[Point]) {
    let _ = writeln!(
        out,
        "| {head} | floor ns | new v4 ns (×floor) | established v4 ns (×floor) | new v6 ns (×floor) | established v6 ns (×floor) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for p in pts {
        let r = |x: f64| format!("{x:.0} ({:.2}×)", x / p.floor);
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} | {} | {} | {} |",
            p.label,
            p.floor,
            r(p.new_v4),
            r(p.est_v4),
            r(p.new_v6),
            r(p.est_v6)
        );
    }
}

/// Runs the per-packet part; returns its report section.
/// Runs the per-packet part; returns its report section and the
/// `per_packet` figures of report.json.
pub fn run(a: &BenchArgs) -> Result<(String, serde_json::Value), Failure> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## 1. Per-packet classifier cost (BPF_PROG_TEST_RUN)\n"
    );
    let _ = writeln!(
        out,
        "One IPv4 or IPv6 TCP SYN from outside to an instance, through `sgfw_to_instance` (inbound NACL, then SG ingress), matching the **last** SG rule; median of {} runs of {} repeats. *Floor* is a no-op classifier (one array read) measured in the same dataplane. *New flow*: conntrack miss, NACL + SG lookups, entry created. *Established*: the conntrack fast path.\n",
        a.runs, a.repeat
    );
    let mut sg_pts = Vec::new();
    for rules in [1usize, 10, 100, 1_000, 10_000] {
        eprintln!("bench:   {rules} SG rules per instance");
        sg_pts.push(point(format!("{rules} SG rules (5 groups)"), rules, 1, a)?);
    }
    table(&mut out, "SG rules per instance", &sg_pts);
    let flat_ratio = |f: fn(&Point) -> f64| {
        let (lo, hi) = (&sg_pts[1], &sg_pts[4]);
        (f(hi) / hi.floor) / (f(lo) / lo.floor)
    };
    let _ = writeln!(
        out,
        "\nFlatness, 10,000 vs 10 rules (ratio of the ×floor figures): new v4 {:.2}, established v4 {:.2}, new v6 {:.2}, established v6 {:.2} (target ≤ 1.25).\n",
        flat_ratio(|p| p.new_v4),
        flat_ratio(|p| p.est_v4),
        flat_ratio(|p| p.new_v6),
        flat_ratio(|p| p.est_v6)
    );
    let mut nacl_pts = Vec::new();
    for n in [1usize, 20, 40] {
        eprintln!("bench:   NACL of {n} entries");
        nacl_pts.push(point(
            format!("NACL {n} entries (match last), 10 SG rules"),
            10,
            n,
            a,
        )?);
    }
    table(&mut out, "NACL entries per direction and family", &nacl_pts);
    let _ = writeln!(out);
    chart::lines(
        &a.out.join("per-packet.svg"),
        "ns per packet vs SG rules per instance",
        &sg_pts
            .iter()
            .map(|p| p.label.split(' ').next().unwrap_or("").to_string())
            .collect::<Vec<_>>(),
        &[
            ("floor", sg_pts.iter().map(|p| p.floor).collect()),
            ("new v4", sg_pts.iter().map(|p| p.new_v4).collect()),
            ("established v4", sg_pts.iter().map(|p| p.est_v4).collect()),
            ("new v6", sg_pts.iter().map(|p| p.new_v6).collect()),
            ("established v6", sg_pts.iter().map(|p| p.est_v6).collect()),
        ],
    )?;
    let _ = writeln!(out, "Chart: `per-packet.svg`.\n");
    let all: Vec<&Point> = sg_pts.iter().chain(&nacl_pts).collect();
    let max = |f: fn(&Point) -> f64| all.iter().map(|p| f(p) / p.floor).fold(f64::NAN, f64::max);
    let flatness = [
        flat_ratio(|p| p.new_v4),
        flat_ratio(|p| p.est_v4),
        flat_ratio(|p| p.new_v6),
        flat_ratio(|p| p.est_v6),
    ]
    .into_iter()
    .fold(f64::NAN, f64::max);
    let json = serde_json::json!({
        "floor_ns": median(all.iter().map(|p| p.floor).collect()),
        "established_ratio_max": max(|p| p.est_v4.max(p.est_v6)),
        "new_flow_ratio_max": max(|p| p.new_v4.max(p.new_v6)),
        "flatness_max": flatness,
        "points": all.iter().map(|p| serde_json::json!({
            "label": p.label,
            "floor_ns": p.floor,
            "new_v4_ns": p.new_v4,
            "established_v4_ns": p.est_v4,
            "new_v6_ns": p.new_v6,
            "established_v6_ns": p.est_v6,
        })).collect::<Vec<_>>(),
    });
    Ok((out, json))
}

/// One million tracked flows inserted through the classifier; memory and
/// the established-packet cost at that size.
/// Runs the conntrack-at-scale part; returns its report section and its
/// figures (merged into `per_packet` of report.json).
pub fn conntrack_scale(a: &BenchArgs) -> Result<(String, serde_json::Value), Failure> {
    const FLOWS: u32 = 1_000_000;
    let model = flat(&models::target(10, 1, "brbench"))?;
    let mut dp = TestDataplane::new(&model, 1 << 20)
        .context("loading a dataplane with room for 1M flows")?;
    let (s4, _, port) = models::last_rule_source(10);
    let base: std::net::Ipv4Addr = s4.parse().map_err(|e| anyhow!("{e}"))?;
    let dst: IpAddr = "10.20.0.10".parse().map_err(|e| anyhow!("{e}"))?;
    let probe = frame(&Packet::tcp(
        IpAddr::V4(base),
        dst,
        40000,
        port,
        TcpFlags::SYN,
    ));
    let floor = measure(&mut dp, pn::NOOP, &probe, a)?;
    let empty = measure(&mut dp, pn::TO_INSTANCE, &probe, a)?;
    let mem_empty = dp
        .maps()
        .memory()
        .get(sgfw_common::map_names::CONNTRACK)
        .copied()
        .unwrap_or(0);
    let t = std::time::Instant::now();
    let o = base.octets();
    for i in 0..FLOWS {
        // Distinct flows: the source's last octet and port vary.
        let src = std::net::Ipv4Addr::new(o[0], o[1], o[2], (i % 250) as u8 + 1);
        let sport = 1024 + (i / 250) as u16;
        let f = frame(&Packet::tcp(
            IpAddr::V4(src),
            dst,
            sport,
            port,
            TcpFlags::SYN,
        ));
        dp.run_frame(pn::TO_INSTANCE, &f, 1)?;
    }
    let insert_s = t.elapsed().as_secs_f64();
    let tracked = dp.conntrack_len()?;
    let full = measure(&mut dp, pn::TO_INSTANCE, &probe, a)?;
    let floor = median(vec![floor, measure(&mut dp, pn::NOOP, &probe, a)?]);
    let mem = dp
        .maps()
        .memory()
        .get(sgfw_common::map_names::CONNTRACK)
        .copied()
        .unwrap_or(0);
    let mut out = String::new();
    let _ = writeln!(out, "## 4. Connection tracking at scale\n");
    let _ = writeln!(
        out,
        "{FLOWS} distinct TCP flows sent through `sgfw_to_instance` one packet each ({insert_s:.1} s including one syscall per packet); {tracked} entries tracked afterwards (LRU map of 1,048,576).\n"
    );
    let _ = writeln!(out, "| | value |\n|---|---|");
    let _ = writeln!(
        out,
        "| conntrack map memory (kernel memlock) | {:.1} MiB ({:.0} bytes per entry of capacity) |",
        mem as f64 / 1048576.0,
        mem as f64 / f64::from(1u32 << 20)
    );
    let _ = writeln!(
        out,
        "| same map, empty | {:.1} MiB (preallocated) |",
        mem_empty as f64 / 1048576.0
    );
    let _ = writeln!(out, "| floor (no-op) | {floor:.0} ns |");
    let _ = writeln!(
        out,
        "| established packet, conntrack nearly empty | {empty:.0} ns ({:.2}× floor) |",
        empty / floor
    );
    let _ = writeln!(
        out,
        "| established packet, {tracked} flows tracked | {full:.0} ns ({:.2}× floor) |\n",
        full / floor
    );
    let json = serde_json::json!({
        "established_ratio_1m_flows": full / floor,
        "flows_tracked_1m": tracked,
        "conntrack_mib_1m": mem as f64 / 1048576.0,
    });
    Ok((out, json))
}
