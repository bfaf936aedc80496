//! The XDP pre-filter's per-packet cost through BPF_PROG_TEST_RUN, beside
//! the TC sender's hook and both no-op floors, measured in one dataplane in
//! one run: what a denied packet costs where each drops it, and what an
//! allowed new flow pays for having the pre-filter in front.

use std::fmt::Write as _;
use std::net::IpAddr;

use anyhow::{Context, anyhow};
use sgfw::ebpf::testrun::{TC_ACT_OK, TC_ACT_SHOT, TestDataplane, XDP_DROP, XDP_PASS, frame};
use sgfw::model::IpPermission;
use sgfw::packet::{Packet, TcpFlags};
use sgfw_common::program_names as pn;

use super::{BenchArgs, median, models};
use crate::cli::Failure;

/// The figures, in ns per packet (medians).
#[derive(Debug, Clone, serde::Serialize)]
pub struct XdpFigures {
    pub rules: usize,
    pub tc_floor_ns: f64,
    pub xdp_floor_ns: f64,
    pub tc_denied_ns: f64,
    pub xdp_denied_ns: f64,
    pub tc_new_flow_ns: f64,
    pub xdp_new_flow_ns: f64,
}

fn run_n(
    dp: &mut TestDataplane,
    xdp: bool,
    prog: &str,
    frame: &[u8],
    want: u32,
    a: &BenchArgs,
) -> Result<f64, Failure> {
    let mut v = Vec::with_capacity(a.runs);
    for _ in 0..a.runs {
        let (act, ns) = if xdp {
            dp.run_xdp(prog, frame, a.repeat, 0)?
        } else {
            dp.run_frame(prog, frame, a.repeat)?
        };
        if act != want {
            return Err(Failure::Runtime(anyhow!(
                "{prog}: action {act} on the benchmark packet, expected {want}"
            )));
        }
        v.push(ns as f64);
    }
    Ok(median(v))
}

/// One point: the benchmark instance sends, with `rules` egress rules of
/// which only the last allows (TCP 443 anywhere).
fn point(rules: usize, a: &BenchArgs) -> Result<XdpFigures, Failure> {
    let mut m = models::target(1, 1, "brbench");
    for (g, sg) in m.security_groups.iter_mut().enumerate() {
        sg.ip_permissions_egress.clear();
        for k in (g..rules.saturating_sub(1)).step_by(5) {
            let p = 1000 + (k % 20_000) as u16;
            sg.ip_permissions_egress
                .push(IpPermission::tcp(p, p).from_cidr(&format!(
                    "11.{}.{}.0/24",
                    k / 256,
                    k % 256
                )));
        }
    }
    if let Some(sg) = m.security_groups.first_mut() {
        sg.ip_permissions_egress
            .push(IpPermission::tcp(443, 443).from_cidr("0.0.0.0/0"));
    }
    let (v, _) =
        sgfw::validate::validate(&m).map_err(|e| anyhow!("benchmark model invalid: {e}"))?;
    let model = v.flatten();
    let mut dp = TestDataplane::new(&model, 65_536).context("loading the benchmark dataplane")?;
    let src: IpAddr = "10.20.0.10".parse().map_err(|e| anyhow!("{e}"))?;
    let dst: IpAddr = "198.51.100.7".parse().map_err(|e| anyhow!("{e}"))?;
    let denied = frame(&Packet::udp(src, dst, 40000, 9));
    let allowed = frame(&Packet::tcp(src, dst, 40000, 443, TcpFlags::SYN));
    let (mut tcf, mut xdpf) = (Vec::new(), Vec::new());
    for _ in 0..a.runs {
        tcf.push(dp.run_noop(&denied, a.repeat)? as f64);
        xdpf.push(dp.run_xdp_noop(&denied, a.repeat)? as f64);
    }
    let (tc_floor, xdp_floor) = (median(tcf), median(xdpf));
    let tc_denied = run_n(&mut dp, false, pn::FROM_INSTANCE, &denied, TC_ACT_SHOT, a)?;
    let xdp_denied = run_n(&mut dp, true, pn::XDP_FROM_INSTANCE, &denied, XDP_DROP, a)?;
    // New flow: every packet misses conntrack (TCP "new" expires at once).
    dp.update_config(|c| c.tcp_new_ns = 0)?;
    let tc_new = run_n(&mut dp, false, pn::FROM_INSTANCE, &allowed, TC_ACT_OK, a)?;
    let xdp_new = run_n(&mut dp, true, pn::XDP_FROM_INSTANCE, &allowed, XDP_PASS, a)?;
    Ok(XdpFigures {
        rules,
        tc_floor_ns: tc_floor,
        xdp_floor_ns: xdp_floor,
        tc_denied_ns: tc_denied,
        xdp_denied_ns: xdp_denied,
        tc_new_flow_ns: tc_new,
        xdp_new_flow_ns: xdp_new,
    })
}

/// Runs the XDP part; returns its report section and figures.
pub fn run(a: &BenchArgs) -> Result<(String, Vec<XdpFigures>), Failure> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## XDP pre-filter: per-packet cost (BPF_PROG_TEST_RUN)\n"
    );
    let _ = writeln!(
        out,
        "The benchmark instance sends: a UDP datagram its SG egress denies, and a TCP SYN the last of its egress rules allows (new flow: conntrack miss every time). Median of {} runs of {} repeats. XDP's *allowed* figure is what the pre-filter adds: the packet is then judged again by the TC hook. The test run does not include what the kernel saves by dropping before an skb is built; the flood measurement below does.\n",
        a.runs, a.repeat
    );
    let _ = writeln!(
        out,
        "| egress rules | TC floor ns | XDP floor ns | denied at TC ns (×TC floor) | denied at XDP ns (×XDP floor) | new flow, TC ns | new flow, XDP + TC ns (×TC alone) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    let mut pts = Vec::new();
    for rules in [10usize, 1_000] {
        eprintln!("bench:   XDP, {rules} egress rules");
        let p = point(rules, a)?;
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.0} ({:.2}×) | {:.0} ({:.2}×) | {:.0} | {:.0} ({:.2}×) |",
            p.rules,
            p.tc_floor_ns,
            p.xdp_floor_ns,
            p.tc_denied_ns,
            p.tc_denied_ns / p.tc_floor_ns,
            p.xdp_denied_ns,
            p.xdp_denied_ns / p.xdp_floor_ns,
            p.tc_new_flow_ns,
            p.xdp_new_flow_ns + p.tc_new_flow_ns,
            (p.xdp_new_flow_ns + p.tc_new_flow_ns) / p.tc_new_flow_ns
        );
        pts.push(p);
    }
    let _ = writeln!(out);
    Ok((out, pts))
}
