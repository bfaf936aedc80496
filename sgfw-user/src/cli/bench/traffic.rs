//! Real traffic between two lab instances in different subnets (iperf3),
//! under every dataplane a user could pick: no filtering, the eBPF backend,
//! sgfw's nftables backend, and the linear nftables peer — the seed
//! design's shape: one forward chain, `ct state established,related accept`
//! first, then one rule per (instance, rule) in a line — each at 10, 1,000
//! and 10,000 rules.
//!
//! Dataplanes are interleaved (every round runs each once, the order
//! reversed every other round) over [`ROUNDS`] rounds; each figure is the
//! median and interquartile range over the rounds, and ratios are to no
//! filtering's median in the same run. Per round and dataplane:
//! - UDP, 64-byte datagrams, a fixed count ([`UDP_PACKETS`]) as fast as
//!   iperf3 sends them: received packets per second, and host CPU per
//!   packet (busy time of all cores from `/proc/stat` over the run, divided
//!   by the packets sent);
//! - TCP, one stream for `--seconds`: Gbit/s received.

use std::fmt::Write as _;

use anyhow::{Context, anyhow};
use sgfw::ebpf::{ApplyOptions, EbpfBackend};
use sgfw::flat::FlatModel;
use sgfw::lab::TestBed;
use sgfw::model::{IpPermission, Model, SecurityGroup};
use sgfw::nft::NftBackend;
use sgfw::sys::{Host, RealHost};

use super::measure::{Lab, Spread, cpu_busy_ns, interleaved};
use super::{BenchArgs, chart};
use crate::cli::Failure;

/// Rounds of every dataplane.
pub const ROUNDS: usize = 5;
/// Datagrams per UDP run.
pub const UDP_PACKETS: u64 = 300_000;
/// Rule counts measured.
const RULES: [usize; 3] = [10, 1_000, 10_000];
/// The linear peer's table.
const LINEAR_TABLE: &str = "sgfw_bench_linear";

/// A dataplane under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plane {
    None,
    Ebpf(usize),
    Nft(usize),
    Linear(usize),
}

impl Plane {
    fn label(self) -> String {
        match self {
            Plane::None => "no filtering".into(),
            Plane::Ebpf(n) => format!("eBPF, {n} rules"),
            Plane::Nft(n) => format!("sgfw nftables, {n} rules"),
            Plane::Linear(n) => format!("linear nft peer, {n} rules"),
        }
    }
    fn short(self) -> String {
        match self {
            Plane::None => "none".into(),
            Plane::Ebpf(n) => format!("ebpf {n}"),
            Plane::Nft(n) => format!("nft {n}"),
            Plane::Linear(n) => format!("linear {n}"),
        }
    }
    fn key(self) -> String {
        match self {
            Plane::None => "none".into(),
            Plane::Ebpf(n) => format!("ebpf_{n}"),
            Plane::Nft(n) => format!("nft_{n}"),
            Plane::Linear(n) => format!("linear_{n}"),
        }
    }
    fn rules(self) -> usize {
        match self {
            Plane::None => 0,
            Plane::Ebpf(n) | Plane::Nft(n) | Plane::Linear(n) => n,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    udp_kpps: f64,
    udp_cpu_ns: f64,
    tcp_gbps: f64,
}

/// One dataplane's figures over the rounds, for report.json.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlaneFigures {
    pub dataplane: String,
    pub rules: usize,
    pub udp_kpps: Spread,
    pub udp_cpu_ns_per_packet: Spread,
    pub tcp_gbps: Spread,
    pub udp_pps_ratio: Spread,
    pub udp_cpu_ratio: Spread,
    pub tcp_ratio: Spread,
}

/// The traffic figures for report.json.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrafficFigures {
    pub rounds: usize,
    pub udp_packets: u64,
    pub tcp_seconds: u32,
    pub ebpf_10k_pps_ratio: f64,
    pub ebpf_10k_cpu_ratio: f64,
    pub nft_10k_pps_ratio: f64,
    pub linear_peer_10k_pps_ratio: f64,
    pub linear_peer_10k_cpu_ratio: f64,
    pub dataplanes: Vec<PlaneFigures>,
}

fn model(bed: &TestBed, rules: usize) -> Model {
    let client = bed.instance("client");
    let mut m = bed.model_skeleton(|name| {
        if name == "server" {
            (0..5).map(|g| format!("sg-{g}")).collect()
        } else {
            vec!["sg-client".into()]
        }
    });
    let all = || IpPermission::all().from_cidr("0.0.0.0/0");
    let mut groups: Vec<SecurityGroup> = (0..5)
        .map(|g| SecurityGroup {
            group_id: format!("sg-{g}"),
            ip_permissions_egress: vec![all()],
            ..SecurityGroup::default()
        })
        .collect();
    for k in 0..rules.saturating_sub(2) {
        let p = (1000 + k % 50_000) as u16;
        groups[k % 5]
            .ip_permissions
            .push(IpPermission::tcp(p, p).from_cidr(&format!("11.{}.{}.0/24", k / 256, k % 256)));
    }
    let me = format!("{}/32", client.v4);
    groups[4]
        .ip_permissions
        .push(IpPermission::tcp(5201, 5201).from_cidr(&me));
    groups[4]
        .ip_permissions
        .push(IpPermission::udp(5201, 5201).from_cidr(&me));
    groups.push(SecurityGroup {
        group_id: "sg-client".into(),
        ip_permissions_egress: vec![all()],
        ..SecurityGroup::default()
    });
    m.security_groups = groups;
    m
}

/// One nft rule body for a permission towards (`ingress`) or from an
/// instance address, one per remote CIDR.
fn linear_rules(addr: &str, p: &IpPermission, ingress: bool, out: &mut String) {
    let l4 = match (p.ip_protocol.as_str(), p.from_port, p.to_port) {
        ("-1", _, _) => String::new(),
        (proto @ ("tcp" | "udp"), Some(lo), Some(hi)) if lo >= 0 && hi >= 0 => {
            if lo == hi {
                format!(" {proto} dport {lo}")
            } else {
                format!(" {proto} dport {lo}-{hi}")
            }
        }
        (proto @ ("tcp" | "udp"), _, _) => format!(" meta l4proto {proto}"),
        // Not in the benchmark's models.
        _ => return,
    };
    for r in &p.ip_ranges {
        let (me, them) = if ingress {
            ("daddr", "saddr")
        } else {
            ("saddr", "daddr")
        };
        let _ = writeln!(out, "    ip {me} {addr} ip {them} {}{l4} accept", r.cidr_ip);
    }
}

/// The seed design's ruleset for a model: every instance's ingress rules,
/// then their egress rules, one line each, after the conntrack shortcut.
pub fn linear_ruleset(m: &Model) -> String {
    let mut body = String::new();
    for ingress in [true, false] {
        for inst in &m.instances {
            for g in &inst.security_group_ids {
                let Some(sg) = m.security_groups.iter().find(|s| &s.group_id == g) else {
                    continue;
                };
                let perms = if ingress {
                    &sg.ip_permissions
                } else {
                    &sg.ip_permissions_egress
                };
                for p in perms {
                    linear_rules(&inst.private_ip_address, p, ingress, &mut body);
                }
            }
        }
    }
    format!(
        "table inet {LINEAR_TABLE} {{\n  chain forward {{\n    type filter hook forward priority filter; policy drop;\n    ct state established,related accept\n{body}  }}\n}}\n"
    )
}

fn iperf(bed: &TestBed, args: &[&str]) -> Result<serde_json::Value, Failure> {
    let server = bed.instance("server").v4.to_string();
    let mut full = vec!["iperf3", "-c", server.as_str(), "-J"];
    full.extend_from_slice(args);
    let out = bed
        .exec("client", &full)
        .map_err(|e| anyhow!("iperf3 {}: {e}", args.join(" ")))?;
    Ok(serde_json::from_str(&out).context("iperf3's JSON")?)
}

fn measure(bed: &TestBed, secs: u32) -> Result<Sample, Failure> {
    let k = UDP_PACKETS.to_string();
    let b0 = cpu_busy_ns()?;
    let udp = iperf(bed, &["-u", "-b", "0", "-l", "64", "-k", &k])?;
    let busy = cpu_busy_ns()? - b0;
    let sum = &udp["end"]["sum"];
    let packets = sum["packets"].as_f64().unwrap_or(0.0);
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    let seconds = sum["seconds"].as_f64().unwrap_or(1.0).max(0.001);
    let t = secs.to_string();
    let tcp = iperf(bed, &["-t", &t])?;
    Ok(Sample {
        udp_kpps: (packets - lost) / seconds / 1000.0,
        udp_cpu_ns: busy / packets.max(1.0),
        tcp_gbps: tcp["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e9,
    })
}

/// Puts `plane` in force (and nothing else).
fn switch(
    plane: Plane,
    flats: &[(usize, FlatModel, String)],
    ebpf: &EbpfBackend,
) -> Result<(), Failure> {
    ebpf.teardown().context("eBPF teardown")?;
    let nft = NftBackend::new(&RealHost);
    nft.teardown().context("nft teardown")?;
    let _ = RealHost.nft(&["delete", "table", "inet", LINEAR_TABLE], None);
    let find = |n: usize| {
        flats
            .iter()
            .find(|(r, _, _)| *r == n)
            .ok_or_else(|| Failure::Runtime(anyhow!("no {n}-rule model")))
    };
    match plane {
        Plane::None => {}
        Plane::Ebpf(n) => {
            ebpf.apply(&find(n)?.1, &RealHost, &ApplyOptions::default())
                .context("eBPF apply")?;
        }
        Plane::Nft(n) => {
            nft.apply(&find(n)?.1).context("nft apply")?;
        }
        Plane::Linear(n) => {
            RealHost
                .nft(&["-f", "-"], Some(&find(n)?.2))
                .context("loading the linear peer's ruleset")?;
        }
    }
    Ok(())
}

/// Runs the traffic part; returns its report section and figures.
pub fn run(a: &BenchArgs) -> Result<(String, TrafficFigures), Failure> {
    let lab = Lab::new(&[("client", 0), ("server", 1)], || {
        let _ = NftBackend::new(&RealHost).teardown();
        let _ = RealHost.nft(&["delete", "table", "inet", LINEAR_TABLE], None);
    })?;
    let (bed, ebpf) = (&lab.bed, &lab.ebpf);
    let mut flats = Vec::new();
    for rules in RULES {
        let m = model(bed, rules);
        let (v, _) =
            sgfw::validate::validate(&m).map_err(|e| anyhow!("traffic model invalid: {e}"))?;
        flats.push((rules, v.flatten(), linear_ruleset(&m)));
    }
    let mut planes = vec![Plane::None];
    for n in RULES {
        planes.extend([Plane::Ebpf(n), Plane::Nft(n), Plane::Linear(n)]);
    }
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); planes.len()];
    for (round, i) in interleaved(planes.len(), ROUNDS) {
        eprintln!(
            "bench:   traffic round {}/{ROUNDS}: {}",
            round + 1,
            planes[i].label()
        );
        switch(planes[i], &flats, ebpf)?;
        samples[i].push(measure(bed, a.seconds)?);
    }
    switch(Plane::None, &flats, ebpf)?;
    drop(lab);

    let col =
        |i: usize, f: fn(&Sample) -> f64| Spread::of(&samples[i].iter().map(f).collect::<Vec<_>>());
    let base = (
        col(0, |s| s.udp_kpps).median,
        col(0, |s| s.udp_cpu_ns).median,
        col(0, |s| s.tcp_gbps).median,
    );
    let figs: Vec<PlaneFigures> = planes
        .iter()
        .enumerate()
        .map(|(i, p)| PlaneFigures {
            dataplane: p.key(),
            rules: p.rules(),
            udp_kpps: col(i, |s| s.udp_kpps),
            udp_cpu_ns_per_packet: col(i, |s| s.udp_cpu_ns),
            tcp_gbps: col(i, |s| s.tcp_gbps),
            udp_pps_ratio: col(i, |s| s.udp_kpps).over(base.0),
            udp_cpu_ratio: col(i, |s| s.udp_cpu_ns).over(base.1),
            tcp_ratio: col(i, |s| s.tcp_gbps).over(base.2),
        })
        .collect();
    let at = |p: Plane| {
        figs.iter()
            .find(|f| f.dataplane == p.key())
            .map_or((f64::NAN, f64::NAN), |f| {
                (f.udp_pps_ratio.median, f.udp_cpu_ratio.median)
            })
    };
    let t = TrafficFigures {
        rounds: ROUNDS,
        udp_packets: UDP_PACKETS,
        tcp_seconds: a.seconds,
        ebpf_10k_pps_ratio: at(Plane::Ebpf(10_000)).0,
        ebpf_10k_cpu_ratio: at(Plane::Ebpf(10_000)).1,
        nft_10k_pps_ratio: at(Plane::Nft(10_000)).0,
        linear_peer_10k_pps_ratio: at(Plane::Linear(10_000)).0,
        linear_peer_10k_cpu_ratio: at(Plane::Linear(10_000)).1,
        dataplanes: figs,
    };

    let mut s = String::new();
    let _ = writeln!(s, "## 2. Real traffic\n");
    let _ = writeln!(
        s,
        "iperf3 between two namespaces in different subnets (routed through the host). Rules are the server's ingress permissions, the matching one last. Every dataplane once per round, {ROUNDS} rounds, the order reversed every other round; median [q1–q3] over the rounds, ratios to no filtering's median. UDP: {UDP_PACKETS} datagrams of 64 bytes as fast as iperf3 sends; CPU per packet is all cores' busy time (/proc/stat) over the run divided by the packets sent. TCP: one stream, {} s. The linear nft peer is the seed design: one forward chain, `ct state established,related accept` first, then a rule per (instance, rule).\n",
        a.seconds
    );
    let _ = writeln!(
        s,
        "| dataplane | UDP kpps received | ×none | CPU ns/packet | ×none | TCP Gbit/s | ×none |\n|---|---|---|---|---|---|---|"
    );
    for (p, f) in planes.iter().zip(&t.dataplanes) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            p.label(),
            f.udp_kpps.cell(0),
            f.udp_pps_ratio.cell(2),
            f.udp_cpu_ns_per_packet.cell(0),
            f.udp_cpu_ratio.cell(2),
            f.tcp_gbps.cell(2),
            f.tcp_ratio.cell(2)
        );
    }
    let _ = writeln!(
        s,
        "\nAt 10,000 rules: eBPF {:.2}× no filtering in UDP packets per second (goal ≥ 0.95) at {:.2}× its CPU per packet (goal ≤ 1.2); sgfw nftables {:.2}×; the linear peer {:.2}× at {:.2}× CPU.\n",
        t.ebpf_10k_pps_ratio,
        t.ebpf_10k_cpu_ratio,
        t.nft_10k_pps_ratio,
        t.linear_peer_10k_pps_ratio,
        t.linear_peer_10k_cpu_ratio
    );
    let labels: Vec<String> = planes.iter().map(|p| p.short()).collect();
    chart::bars(
        &a.out.join("traffic.svg"),
        "UDP 64 B packets per second, ratio to no filtering (median, whiskers q1–q3)",
        &labels,
        &t.dataplanes
            .iter()
            .map(|f| f.udp_pps_ratio.median)
            .collect::<Vec<_>>(),
        Some(
            &t.dataplanes
                .iter()
                .map(|f| (f.udp_pps_ratio.q1, f.udp_pps_ratio.q3))
                .collect::<Vec<_>>(),
        ),
    )?;
    chart::bars(
        &a.out.join("traffic-cpu.svg"),
        "Host CPU per UDP packet, ratio to no filtering (median, whiskers q1–q3)",
        &labels,
        &t.dataplanes
            .iter()
            .map(|f| f.udp_cpu_ratio.median)
            .collect::<Vec<_>>(),
        Some(
            &t.dataplanes
                .iter()
                .map(|f| (f.udp_cpu_ratio.q1, f.udp_cpu_ratio.q3))
                .collect::<Vec<_>>(),
        ),
    )?;
    let _ = writeln!(s, "Charts: `traffic.svg`, `traffic-cpu.svg`.\n");
    Ok((s, t))
}
