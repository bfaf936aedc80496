//! A flood of denied 64-byte frames from one lab instance, as fast as one
//! sender can push them (`sendmmsg`, 64 per call), under no filtering, the
//! TC dataplane and the XDP pre-filter, while a legitimate TCP flow runs
//! between two other instances.
//!
//! Three instances: `attacker` and `client` in subnet a, `server` in subnet
//! b. The attacker's group allows only TCP 443 out, so its UDP flood to
//! `server:9` is denied by its own SG egress: at the attacker's bridge port,
//! by TC's ingress classifier or, in XDP mode, by the pre-filter before an
//! skb is built. The client may send anything; the server admits TCP 5201
//! from the client only.
//!
//! Per round and mode, three windows of `--seconds`:
//! 1. the flood alone: frames sent per second and host CPU per frame
//!    (busy jiffies of the `cpu` line of `/proc/stat`, all cores, over the
//!    window, divided by the frames sent; the sender's own syscall cost is
//!    in every mode's figure alike);
//! 2. the flood and iperf3 (one TCP stream client → server) together: the
//!    legitimate flow's throughput under attack;
//! 3. iperf3 alone: the same flow's throughput without the flood.
//!
//! Modes are interleaved within each round and their order reversed every
//! other round (drift on a shared machine hits all modes alike); medians and
//! interquartile ranges over the rounds are reported.
//!
//! In both filtered modes a socket on `server:9` checks that not one flood
//! frame was delivered: a figure measured on a filter that leaked would be
//! meaningless.

use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use sgfw::ebpf::{ApplyOptions, Dataplane};
use sgfw::lab::TestBed;
use sgfw::model::{IpPermission, Model, SecurityGroup};
use sgfw::sys::RealHost;

use super::BenchArgs;
use super::measure::{Lab, Spread, cpu_busy_ns, interleaved};
use crate::cli::Failure;

/// UDP payload of a flood frame: 14 (Ethernet) + 20 (IPv4) + 8 (UDP) + 18
/// = 60 bytes on the veth, 64 with the FCS a wire would add.
const PAYLOAD: usize = 18;
/// Datagrams per `sendmmsg` call.
const BATCH: usize = 64;
/// Rounds of all three modes.
const ROUNDS: usize = 3;

/// How the bed is filtered during a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    None,
    Tc,
    Xdp,
}

impl Mode {
    fn key(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Tc => "tc",
            Mode::Xdp => "xdp",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Mode::None => "no filtering",
            Mode::Tc => "TC only",
            Mode::Xdp => "XDP pre-filter + TC",
        }
    }
}

/// One round's figures for one mode.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    flood_kpps: f64,
    cpu_ns_per_frame: f64,
    legit_gbps_flooded: f64,
    legit_gbps_alone: f64,
}

/// Per-mode figures over the rounds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct ModeFigures {
    /// Flood frames sent per second (thousands).
    pub flood_kpps: Spread,
    /// Host CPU per flood frame, ns (all cores' busy time / frames sent).
    pub cpu_ns_per_frame: Spread,
    /// The legitimate TCP flow's throughput during the flood, Gbit/s.
    pub legit_gbps_flooded: Spread,
    /// The same flow without the flood, Gbit/s.
    pub legit_gbps_alone: Spread,
}

/// The flood figures for report.json.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FloodFigures {
    pub rounds: usize,
    pub seconds: u32,
    pub frame_bytes: usize,
    pub none: ModeFigures,
    pub tc: ModeFigures,
    pub xdp: ModeFigures,
    /// XDP's CPU per denied frame over TC's (medians): below 1, XDP saves.
    pub cpu_per_denied_xdp_to_tc: f64,
    /// The legitimate flow under flood, XDP over TC (medians).
    pub legit_under_flood_xdp_to_tc: f64,
    /// The legitimate flow without flood, XDP over TC (medians): what the
    /// pre-filter costs traffic it lets through.
    pub legit_alone_xdp_to_tc: f64,
}

/// Sends flood frames on a connected socket until `stop`; returns how many
/// the kernel accepted (refusals from ICMP errors are not counted).
fn flood(sock: &UdpSocket, stop: &AtomicBool) -> u64 {
    let mut buf = [0u8; PAYLOAD];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: PAYLOAD,
    }];
    // SAFETY: an all-zero mmsghdr is valid (null name, no control data).
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for m in &mut msgs {
        m.msg_hdr.msg_iov = iov.as_mut_ptr();
        m.msg_hdr.msg_iovlen = 1;
    }
    let fd = sock.as_raw_fd();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `msgs` holds BATCH headers pointing at `iov`/`buf`, which
        // outlive the call; the socket is connected, so no names are needed.
        let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, 0) };
        if n > 0 {
            sent += n as u64;
        }
    }
    sent
}

/// A running flood: its thread and stop flag.
struct Flood {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl Flood {
    fn start(sock: &UdpSocket) -> Result<Flood, Failure> {
        let sock = sock.try_clone().context("cloning the flood socket")?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || flood(&sock, &s));
        Ok(Flood { stop, thread })
    }
    fn stop(self) -> Result<u64, Failure> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| Failure::Runtime(anyhow!("the flood thread panicked")))
    }
}

fn model(bed: &TestBed) -> Model {
    let mut m = bed.model_skeleton(|name| vec![format!("sg-{name}")]);
    let client = format!("{}/32", bed.instance("client").v4);
    m.security_groups = vec![
        SecurityGroup {
            group_id: "sg-attacker".into(),
            ip_permissions_egress: vec![IpPermission::tcp(443, 443).from_cidr("0.0.0.0/0")],
            ..SecurityGroup::default()
        },
        SecurityGroup {
            group_id: "sg-client".into(),
            ip_permissions_egress: vec![IpPermission::all().from_cidr("0.0.0.0/0")],
            ..SecurityGroup::default()
        },
        SecurityGroup {
            group_id: "sg-server".into(),
            ip_permissions: vec![IpPermission::tcp(5201, 5201).from_cidr(&client)],
            ip_permissions_egress: vec![IpPermission::all().from_cidr("0.0.0.0/0")],
            ..SecurityGroup::default()
        },
    ];
    m
}

/// One TCP stream client → server for `secs`; Gbit/s received.
fn iperf(bed: &TestBed, secs: u32) -> Result<f64, Failure> {
    let server = bed.instance("server").v4.to_string();
    let t = secs.to_string();
    let out = bed
        .exec("client", &["iperf3", "-c", &server, "-t", &t, "-J"])
        .map_err(|e| anyhow!("iperf3: {e}"))?;
    let j: serde_json::Value = serde_json::from_str(&out).context("iperf3's JSON")?;
    Ok(j["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9)
}

fn window(bed: &TestBed, mode: Mode, attacker: &UdpSocket, secs: u32) -> Result<Sample, Failure> {
    let dur = Duration::from_secs(u64::from(secs));
    // A listener on the flood's target proves, in filtered modes, that the
    // filter dropped every frame.
    let sink = if mode == Mode::None {
        None
    } else {
        let ns = bed.instance("server").netns.clone();
        let s = sgfw::lab::in_netns(&ns, || UdpSocket::bind("0.0.0.0:9"))
            .ok_or_else(|| anyhow!("entering {ns}"))?
            .context("binding the flood sink on server:9")?;
        s.set_nonblocking(true).context("flood sink")?;
        Some(s)
    };
    // 1. The flood alone.
    let b0 = cpu_busy_ns()?;
    let t0 = Instant::now();
    let f = Flood::start(attacker)?;
    std::thread::sleep(dur);
    let sent = f.stop()?;
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu_ns = cpu_busy_ns()? - b0;
    // 2. The flood and the legitimate flow.
    let f = Flood::start(attacker)?;
    let flooded = iperf(bed, secs);
    f.stop()?;
    let flooded = flooded?;
    // 3. The legitimate flow alone.
    let alone = iperf(bed, secs)?;
    if let Some(s) = sink {
        let mut buf = [0u8; 64];
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            return Err(Failure::Runtime(anyhow!(
                "{}: a denied flood frame reached the server ({n} bytes from {from})",
                mode.label()
            )));
        }
    }
    Ok(Sample {
        flood_kpps: sent as f64 / elapsed / 1e3,
        cpu_ns_per_frame: if sent > 0 {
            cpu_ns / sent as f64
        } else {
            f64::NAN
        },
        legit_gbps_flooded: flooded,
        legit_gbps_alone: alone,
    })
}

fn figures(v: &[Sample]) -> ModeFigures {
    let col = |f: fn(&Sample) -> f64| Spread::of(&v.iter().map(f).collect::<Vec<_>>());
    ModeFigures {
        flood_kpps: col(|s| s.flood_kpps),
        cpu_ns_per_frame: col(|s| s.cpu_ns_per_frame),
        legit_gbps_flooded: col(|s| s.legit_gbps_flooded),
        legit_gbps_alone: col(|s| s.legit_gbps_alone),
    }
}

/// Runs the flood measurement; returns its report section and figures.
pub fn run(a: &BenchArgs) -> Result<(String, FloodFigures), Failure> {
    let lab = Lab::new(&[("attacker", 0), ("client", 0), ("server", 1)], || {})?;
    let (bed, ebpf) = (&lab.bed, &lab.ebpf);
    let (v, _) =
        sgfw::validate::validate(&model(bed)).map_err(|e| anyhow!("flood model invalid: {e}"))?;
    let flat = v.flatten();
    let attacker = bed
        .udp_socket("attacker", false)
        .map_err(|e| anyhow!("attacker socket: {e}"))?;
    let target = SocketAddr::new(bed.instance("server").v4.into(), 9);
    attacker
        .connect(target)
        .with_context(|| format!("connecting the flood socket to {target}"))?;
    let mut samples: [Vec<Sample>; 3] = Default::default();
    let modes = [Mode::None, Mode::Tc, Mode::Xdp];
    for (round, i) in interleaved(modes.len(), ROUNDS) {
        let mode = modes[i];
        eprintln!(
            "bench:   flood round {}/{ROUNDS}: {}",
            round + 1,
            mode.label()
        );
        let dataplane = match mode {
            Mode::None => None,
            Mode::Tc => Some(Dataplane::Tc),
            Mode::Xdp => Some(Dataplane::Xdp),
        };
        match dataplane {
            None => ebpf.teardown().context("eBPF teardown")?,
            Some(dataplane) => {
                let opts = ApplyOptions {
                    dataplane,
                    ..ApplyOptions::default()
                };
                ebpf.apply(&flat, &RealHost, &opts).context("eBPF apply")?;
            }
        }
        samples[i].push(window(bed, mode, &attacker, a.seconds)?);
    }
    ebpf.teardown().context("eBPF teardown")?;
    drop(lab);
    let [none, tc, xdp] = [
        figures(&samples[0]),
        figures(&samples[1]),
        figures(&samples[2]),
    ];
    let f = FloodFigures {
        rounds: ROUNDS,
        seconds: a.seconds,
        frame_bytes: 14 + 20 + 8 + PAYLOAD + 4,
        none,
        tc,
        xdp,
        cpu_per_denied_xdp_to_tc: xdp.cpu_ns_per_frame.median / tc.cpu_ns_per_frame.median,
        legit_under_flood_xdp_to_tc: xdp.legit_gbps_flooded.median / tc.legit_gbps_flooded.median,
        legit_alone_xdp_to_tc: xdp.legit_gbps_alone.median / tc.legit_gbps_alone.median,
    };
    let mut s = String::new();
    let _ = writeln!(s, "## XDP pre-filter: a flood of denied frames\n");
    let _ = writeln!(
        s,
        "One instance floods 64-byte UDP frames (sendmmsg, {BATCH} per call, one sender thread) at a server its own SG egress does not allow; meanwhile one iperf3 TCP stream runs between two other instances (client in the attacker's subnet, server in the other). {ROUNDS} rounds, modes interleaved, {} s windows; median [q1–q3]. CPU per frame is all cores' busy time over the flood-alone window divided by the frames sent, so it includes the sender's own cost, alike in every mode. In the filtered modes a socket on the target port received nothing.\n",
        a.seconds
    );
    let _ = writeln!(
        s,
        "| mode | flood kframes/s sent | host CPU ns per flood frame | legit TCP Gbit/s under flood | legit TCP Gbit/s, no flood |\n|---|---|---|---|---|"
    );
    for (mode, m) in [
        (Mode::None, &f.none),
        (Mode::Tc, &f.tc),
        (Mode::Xdp, &f.xdp),
    ] {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            mode.label(),
            m.flood_kpps.cell(0),
            m.cpu_ns_per_frame.cell(0),
            m.legit_gbps_flooded.cell(2),
            m.legit_gbps_alone.cell(2)
        );
    }
    let _ = writeln!(
        s,
        "\nXDP over TC: CPU per denied frame {:.2}×, legitimate flow under flood {:.2}×, legitimate flow without flood {:.2}×. (Mode keys in report.json: {}, {}, {}.)\n",
        f.cpu_per_denied_xdp_to_tc,
        f.legit_under_flood_xdp_to_tc,
        f.legit_alone_xdp_to_tc,
        Mode::None.key(),
        Mode::Tc.key(),
        Mode::Xdp.key()
    );
    Ok((s, f))
}
