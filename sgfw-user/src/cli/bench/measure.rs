//! What the real-traffic parts measure with: host CPU busy time from
//! `/proc/stat`, and medians with interquartile ranges over rounds.

use anyhow::anyhow;
use sgfw::ebpf::EbpfBackend;
use sgfw::lab::{InstanceSpec, SubnetSpec, TestBed};

use super::median;
use crate::cli::Failure;

/// Median and interquartile range of some samples.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Spread {
    pub median: f64,
    pub q1: f64,
    pub q3: f64,
}

impl Spread {
    /// Of these samples (linear interpolation between order statistics).
    pub fn of(v: &[f64]) -> Spread {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let q = |p: f64| {
            if s.is_empty() {
                return f64::NAN;
            }
            let x = p * (s.len() - 1) as f64;
            let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
            s[lo] + (s[hi] - s[lo]) * (x - lo as f64)
        };
        Spread {
            median: median(s.clone()),
            q1: q(0.25),
            q3: q(0.75),
        }
    }

    /// Every figure divided by `by` (a ratio to a baseline's median).
    pub fn over(self, by: f64) -> Spread {
        Spread {
            median: self.median / by,
            q1: self.q1 / by,
            q3: self.q3 / by,
        }
    }

    /// `median [q1–q3]` with `p` decimals.
    pub fn cell(self, p: usize) -> String {
        format!(
            "{:.*} [{:.*}–{:.*}]",
            p, self.median, p, self.q1, p, self.q3
        )
    }
}

/// The order the interleaved measurements run in: every one of `n` once
/// per round, the order reversed every other round (drift on a shared
/// machine then hits them all alike); yields (round, index).
pub fn interleaved(n: usize, rounds: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rounds).flat_map(move |r| (0..n).map(move |i| (r, if r % 2 == 1 { n - 1 - i } else { i })))
}

/// Busy time of all CPUs so far, in ns: user, nice, system, irq, softirq
/// and steal jiffies of the `cpu` line of `/proc/stat` (idle and iowait are
/// not busy).
pub fn cpu_busy_ns() -> Result<f64, Failure> {
    let stat = std::fs::read_to_string("/proc/stat")
        .map_err(|e| Failure::Runtime(anyhow!("reading /proc/stat: {e}")))?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| Failure::Runtime(anyhow!("/proc/stat has no cpu line")))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Ok(busy as f64 * 1e9 / hz)
}

/// A lab for the real-traffic parts: subnets `a` and `b`, these instances
/// (name, subnet index), an eBPF backend pinned under the lab's own tag,
/// and `iperf3 -s` in the instance `server`. When the bed goes it kills
/// the server, removes what the eBPF backend applied, then runs `cleanup`
/// (whatever else the part may have put in force).
pub struct Lab {
    /// The namespaces and bridges.
    pub bed: TestBed,
    /// The eBPF backend of this lab.
    pub ebpf: EbpfBackend,
    server: std::process::Child,
}

impl Lab {
    /// Builds the lab.
    pub fn new(
        instances: &[(&str, usize)],
        cleanup: impl FnOnce() + Send + 'static,
    ) -> Result<Lab, Failure> {
        let subnets: Vec<SubnetSpec> = ["a", "b"]
            .iter()
            .map(|n| SubnetSpec {
                name: (*n).into(),
                ipv6: false,
            })
            .collect();
        let specs: Vec<InstanceSpec> = instances
            .iter()
            .map(|(name, subnet)| InstanceSpec {
                name: (*name).into(),
                subnet: *subnet,
            })
            .collect();
        let mut bed = TestBed::new(&subnets, &specs)
            .map_err(|e| Failure::Runtime(anyhow!("building the benchmark lab: {e}")))?;
        let tag = bed.instances[0].netns.clone();
        let ebpf = EbpfBackend::at(
            format!("/sys/fs/bpf/{tag}").into(),
            format!("/run/sgfw/{tag}.json").into(),
        );
        let server = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &bed.instance("server").netns,
                "iperf3",
                "-s",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| Failure::Runtime(anyhow!("starting iperf3 -s: {e}")))?;
        let server_pid = server.id();
        let be = ebpf.clone();
        bed.on_drop(move || {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(server_pid as i32, libc::SIGTERM) };
            let _ = be.teardown();
            // The lock file stays with a backend; this state path is the bench's own.
            let _ = std::fs::remove_file(be.state_path.with_extension("lock"));
            cleanup();
        });
        std::thread::sleep(std::time::Duration::from_millis(500));
        Ok(Lab { bed, ebpf, server })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}
