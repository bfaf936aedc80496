//! Real traffic between two lab instances in different subnets (iperf3):
//! no filtering, the eBPF backend and the nftables backend, each at 10,
//! 1,000 and 10,000 rules, as ratios to the baseline of the same run.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, anyhow};
use sgfw::ebpf::{ApplyOptions, EbpfBackend};
use sgfw::lab::{InstanceSpec, SubnetSpec, TestBed};
use sgfw::model::{IpPermission, Model, SecurityGroup};
use sgfw::nft::NftBackend;
use sgfw::sys::RealHost;

use super::{BenchArgs, chart};
use crate::cli::Failure;

#[derive(Clone, Copy)]
struct Result3 {
    tcp1_gbps: f64,
    tcp4_gbps: f64,
    udp_kpps: f64,
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

fn iperf(
    bed: &TestBed,
    server: &str,
    args: &[&str],
    secs: u32,
) -> Result<serde_json::Value, Failure> {
    let t = secs.to_string();
    let mut v = vec!["-c", server, "-t", t.as_str(), "-J"];
    v.extend_from_slice(args);
    let mut full = vec!["iperf3"];
    full.extend(v);
    let out = bed
        .exec("client", &full)
        .map_err(|e| anyhow!("iperf3 {}: {e}", args.join(" ")))?;
    Ok(serde_json::from_str(&out).context("iperf3's JSON")?)
}

fn measure(bed: &TestBed, secs: u32) -> Result<Result3, Failure> {
    let server = bed.instance("server").v4.to_string();
    let tcp1 = iperf(bed, &server, &[], secs)?;
    let tcp4 = iperf(bed, &server, &["-P", "4"], secs)?;
    let udp = iperf(bed, &server, &["-u", "-b", "0", "-l", "64"], secs)?;
    let gbps = |j: &serde_json::Value| {
        j["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e9
    };
    let sum = &udp["end"]["sum"];
    let packets = sum["packets"].as_f64().unwrap_or(0.0);
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    let seconds = sum["seconds"].as_f64().unwrap_or(1.0).max(0.001);
    Ok(Result3 {
        tcp1_gbps: gbps(&tcp1),
        tcp4_gbps: gbps(&tcp4),
        udp_kpps: (packets - lost) / seconds / 1000.0,
    })
}

/// Runs the traffic part; returns its report section.
pub fn run(a: &BenchArgs) -> Result<String, Failure> {
    let mut bed = TestBed::new(
        &[
            SubnetSpec {
                name: "a".into(),
                ipv6: false,
            },
            SubnetSpec {
                name: "b".into(),
                ipv6: false,
            },
        ],
        &[
            InstanceSpec {
                name: "client".into(),
                subnet: 0,
            },
            InstanceSpec {
                name: "server".into(),
                subnet: 1,
            },
        ],
    )
    .context("building the benchmark lab")?;
    let tag = bed.instance("client").netns.clone();
    let ebpf = EbpfBackend {
        pin_root: PathBuf::from(format!("/sys/fs/bpf/{tag}")),
        state_path: PathBuf::from(format!("/run/sgfw/{tag}.json")),
    };
    let mut server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &bed.instance("server").netns,
            "iperf3",
            "-s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    let server_pid = server.id();
    {
        let be = ebpf.clone();
        bed.on_drop(move || {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(server_pid as i32, libc::SIGTERM) };
            let _ = be.teardown();
            let _ = NftBackend::new(&RealHost).teardown();
        });
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut rows: Vec<(String, Result3)> = Vec::new();
    // The baseline is measured at the start, in the middle and at the end;
    // ratios are to its median, and its spread shows the run's noise.
    let mut baselines = Vec::new();
    eprintln!("bench:   baseline (no filtering)");
    baselines.push(measure(&bed, a.seconds)?);
    for rules in [10usize, 1_000, 10_000] {
        if rules == 10_000 {
            eprintln!("bench:   baseline again");
            baselines.push(measure(&bed, a.seconds)?);
        }
        let m = model(&bed, rules);
        let (v, _) =
            sgfw::validate::validate(&m).map_err(|e| anyhow!("traffic model invalid: {e}"))?;
        let flat = v.flatten();
        eprintln!("bench:   eBPF, {rules} rules");
        ebpf.apply(&flat, &RealHost, &ApplyOptions::default())
            .context("eBPF apply")?;
        rows.push((format!("eBPF, {rules} rules"), measure(&bed, a.seconds)?));
        ebpf.teardown().context("eBPF teardown")?;
        eprintln!("bench:   nftables, {rules} rules");
        let nft = NftBackend::new(&RealHost);
        nft.apply(&flat).context("nft apply")?;
        rows.push((
            format!("nftables, {rules} rules"),
            measure(&bed, a.seconds)?,
        ));
        nft.teardown().context("nft teardown")?;
    }
    eprintln!("bench:   baseline once more");
    baselines.push(measure(&bed, a.seconds)?);
    let _ = server.kill();
    let _ = server.wait();
    drop(bed);
    let med = |f: fn(&Result3) -> f64| super::median(baselines.iter().map(f).collect());
    let base = Result3 {
        tcp1_gbps: med(|r| r.tcp1_gbps),
        tcp4_gbps: med(|r| r.tcp4_gbps),
        udp_kpps: med(|r| r.udp_kpps),
    };
    let spread = |f: fn(&Result3) -> f64| {
        let v: Vec<f64> = baselines.iter().map(f).collect();
        let (lo, hi) = (
            v.iter().copied().fold(f64::MAX, f64::min),
            v.iter().copied().fold(0.0, f64::max),
        );
        format!("{:.2}–{:.2}×", lo / med(f), hi / med(f))
    };
    rows.insert(0, ("no filtering (median of 3)".into(), base));

    let mut s = String::new();
    let _ = writeln!(s, "## 2. Real traffic\n");
    let _ = writeln!(
        s,
        "iperf3 between two namespaces in different subnets (routed through the host, {} s per run): TCP one stream and four, and 64-byte UDP at full rate (received packets per second). Rules are the server's ingress permissions (the matching one last).\n",
        a.seconds
    );
    let _ = writeln!(
        s,
        "The baseline was measured three times (start, middle, end); its spread in this run — TCP 1 stream {}, TCP 4 streams {}, UDP {} of its median — is the noise floor of the ratios below.\n",
        spread(|r| r.tcp1_gbps),
        spread(|r| r.tcp4_gbps),
        spread(|r| r.udp_kpps)
    );
    let _ = writeln!(
        s,
        "| dataplane | TCP 1 stream Gbit/s (×base) | TCP 4 streams Gbit/s (×base) | UDP 64 B kpps (×base) |\n|---|---|---|---|"
    );
    for (name, r) in &rows {
        let _ = writeln!(
            s,
            "| {name} | {:.2} ({:.2}×) | {:.2} ({:.2}×) | {:.0} ({:.2}×) |",
            r.tcp1_gbps,
            r.tcp1_gbps / base.tcp1_gbps,
            r.tcp4_gbps,
            r.tcp4_gbps / base.tcp4_gbps,
            r.udp_kpps,
            r.udp_kpps / base.udp_kpps
        );
    }
    chart::bars(
        &a.out.join("traffic.svg"),
        "TCP 1-stream throughput, ratio to no filtering",
        &rows.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        &rows
            .iter()
            .map(|(_, r)| r.tcp1_gbps / base.tcp1_gbps)
            .collect::<Vec<_>>(),
    )?;
    let _ = writeln!(s, "\nChart: `traffic.svg`.\n");
    Ok(s)
}
