//! A lab of real Linux networking for the demo and the integration tests:
//! subnets as Linux bridges carrying their router addresses, instances as
//! network namespaces joined to their bridge by a veth pair, routing between
//! subnets through the host, and probes (TCP, UDP, ICMP) between them.
//!
//! Names are unique per bed (process id and a counter), so tests run side by
//! side. Everything a bed creates — and every cleanup registered with it,
//! such as an sgfw teardown — is undone on drop, on panic (drop runs while
//! unwinding) and on Ctrl-C (a handler runs every registered cleanup and
//! exits). Beds left by a killed process are removed by the next bed.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// Test bed errors.
#[derive(Debug, thiserror::Error)]
pub enum BedError {
    /// A setup command failed.
    #[error("`{cmd}` failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its stderr.
        stderr: String,
    },
    /// Something else.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BedError {
    let what = what.into();
    move |source| BedError::Io { what, source }
}

/// Runs a command, failing with its stderr.
pub fn sh(args: &[&str]) -> Result<String, BedError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("running {}", args.join(" "))))?;
    if !out.status.success() {
        return Err(BedError::Command {
            cmd: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a cleanup command, ignoring failure.
fn sh_quiet(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

type Cleanup = Box<dyn FnOnce() + Send>;

/// Cleanups of every live bed, for the Ctrl-C handler.
fn registry() -> &'static Mutex<BTreeMap<u32, Vec<Cleanup>>> {
    static R: OnceLock<Mutex<BTreeMap<u32, Vec<Cleanup>>>> = OnceLock::new();
    R.get_or_init(|| {
        let _ = ctrlc::set_handler(|| {
            if let Ok(mut r) = registry().lock() {
                for (_, cleanups) in std::mem::take(&mut *r) {
                    for c in cleanups.into_iter().rev() {
                        c();
                    }
                }
            }
            restore_forwarding();
            std::process::exit(130);
        });
        Mutex::new(BTreeMap::new())
    })
}

/// Host forwarding sysctls as they were before the first bed, restored when
/// the last bed goes.
static FORWARDING: Mutex<Option<(u32, String, String)>> = Mutex::new(None);

const FWD4: &str = "/proc/sys/net/ipv4/ip_forward";
const FWD6: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

fn enable_forwarding() -> Result<(), BedError> {
    let mut g = FORWARDING.lock().unwrap_or_else(|e| e.into_inner());
    match g.as_mut() {
        Some((n, _, _)) => *n += 1,
        None => {
            let v4 = std::fs::read_to_string(FWD4).map_err(io_err(FWD4))?;
            let v6 = std::fs::read_to_string(FWD6).map_err(io_err(FWD6))?;
            std::fs::write(FWD4, "1").map_err(io_err(FWD4))?;
            std::fs::write(FWD6, "1").map_err(io_err(FWD6))?;
            *g = Some((1, v4.trim().to_string(), v6.trim().to_string()));
        }
    }
    Ok(())
}

fn release_forwarding() {
    let mut g = FORWARDING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((n, v4, v6)) = g.as_mut() {
        *n -= 1;
        if *n == 0 {
            let _ = std::fs::write(FWD4, v4.as_bytes());
            let _ = std::fs::write(FWD6, v6.as_bytes());
            *g = None;
        }
    }
}

fn restore_forwarding() {
    let g = FORWARDING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, v4, v6)) = g.as_ref() {
        let _ = std::fs::write(FWD4, v4.as_bytes());
        let _ = std::fs::write(FWD6, v6.as_bytes());
    }
}

/// Removes beds of processes that no longer exist (a killed test run).
fn reap_stale() {
    let Ok(list) = sh(&["ip", "-o", "netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        // sgt<pid>x<bed>n<i>
        let Some(rest) = name.strip_prefix("sgt") else {
            continue;
        };
        let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            sh_quiet(&["ip", "netns", "del", name]);
        }
    }
    if let Ok(links) = sh(&["ip", "-o", "link", "show", "type", "bridge"]) {
        for line in links.lines() {
            let Some(name) = line.split(": ").nth(1) else {
                continue;
            };
            let Some(rest) = name.strip_prefix('g') else {
                continue;
            };
            let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                sh_quiet(&["ip", "link", "del", name]);
            }
        }
    }
}

/// A subnet to build.
#[derive(Debug, Clone)]
pub struct SubnetSpec {
    /// Short name used in the model (e.g. `a`).
    pub name: String,
    /// Whether it gets an IPv6 prefix too.
    pub ipv6: bool,
}

/// An instance to build.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// Short name (e.g. `web1`).
    pub name: String,
    /// Index into the subnets.
    pub subnet: usize,
}

/// A built subnet.
#[derive(Debug, Clone)]
pub struct BedSubnet {
    /// Short name.
    pub name: String,
    /// Bridge interface name.
    pub bridge: String,
    /// IPv4 prefix.
    pub cidr_v4: String,
    /// IPv6 prefix.
    pub cidr_v6: Option<String>,
    /// The bridge's (router's) IPv4 address.
    pub router_v4: Ipv4Addr,
    /// The bridge's IPv6 address.
    pub router_v6: Option<Ipv6Addr>,
}

/// A built instance.
#[derive(Debug, Clone)]
pub struct BedInstance {
    /// Short name.
    pub name: String,
    /// Its subnet index.
    pub subnet: usize,
    /// Network namespace name.
    pub netns: String,
    /// Host end of its veth (a port of the bridge).
    pub port: String,
    /// IPv4 address.
    pub v4: Ipv4Addr,
    /// IPv6 address.
    pub v6: Option<Ipv6Addr>,
}

/// A topology of bridges and namespaces that removes itself on drop.
pub struct TestBed {
    id: u32,
    /// Per-process bed number (names, address octets).
    n: u32,
    /// Second octet of this bed's IPv4 prefixes.
    oct: u8,
    /// The subnets.
    pub subnets: Vec<BedSubnet>,
    /// The instances.
    pub instances: Vec<BedInstance>,
    servers: Vec<Server>,
}

impl std::fmt::Debug for TestBed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestBed")
            .field("subnets", &self.subnets)
            .field("instances", &self.instances)
            .finish()
    }
}

/// Puts a fresh veth of an instance to work: its host end `port` a bridge
/// port with no addresses of its own, its `eth0` in `netns` with the
/// instance's addresses and default routes via the subnet's router.
fn plug(
    port: &str,
    netns: &str,
    v4: Ipv4Addr,
    v6: Option<Ipv6Addr>,
    sub: &BedSubnet,
) -> Result<(), BedError> {
    std::fs::write(format!("/proc/sys/net/ipv6/conf/{port}/disable_ipv6"), "1")
        .map_err(io_err(format!("disabling IPv6 on {port}")))?;
    sh(&["ip", "link", "set", port, "master", &sub.bridge, "up"])?;
    let x = |args: &[&str]| -> Result<String, BedError> {
        let mut v = vec!["ip", "netns", "exec", netns];
        v.extend_from_slice(args);
        sh(&v)
    };
    x(&["ip", "link", "set", "lo", "up"])?;
    x(&["ip", "addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
    x(&["ip", "link", "set", "eth0", "up"])?;
    x(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        &sub.router_v4.to_string(),
    ])?;
    if let (Some(a), Some(r)) = (v6, sub.router_v6) {
        x(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{a}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        x(&["ip", "-6", "route", "add", "default", "via", &r.to_string()])?;
    }
    Ok(())
}

static BED_COUNTER: AtomicU32 = AtomicU32::new(0);

impl TestBed {
    /// Builds the topology. Subnet `s` of the bed gets 10.(150+bed).(s).0/24
    /// and fd5e:(bed):(s)::/64; instance `i` gets host number 10+i.
    pub fn new(subnets: &[SubnetSpec], instances: &[InstanceSpec]) -> Result<TestBed, BedError> {
        reap_stale();
        let n = BED_COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let id = pid.wrapping_mul(100).wrapping_add(n);
        let oct = 150 + (n % 100) as u8;
        enable_forwarding()?;
        registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Vec::new());
        let mut bed = TestBed {
            id,
            n,
            oct,
            subnets: Vec::new(),
            instances: Vec::new(),
            servers: Vec::new(),
        };
        for (s, spec) in subnets.iter().enumerate() {
            let bridge = format!("g{pid}x{n}b{s}");
            let router_v4 = Ipv4Addr::new(10, oct, s as u8, 1);
            let router_v6 = spec
                .ipv6
                .then(|| format!("fd5e:{n:x}:{s:x}::1").parse::<Ipv6Addr>().ok())
                .flatten();
            bed.on_drop({
                let b = bridge.clone();
                move || sh_quiet(&["ip", "link", "del", &b])
            });
            sh(&["ip", "link", "add", &bridge, "type", "bridge"])?;
            // No duplicate address detection: a tentative link-local address
            // delays neighbour discovery (and so the first IPv6 packets) by
            // about a second.
            std::fs::write(format!("/proc/sys/net/ipv6/conf/{bridge}/accept_dad"), "0")
                .map_err(io_err(format!("disabling DAD on {bridge}")))?;
            sh(&[
                "ip",
                "addr",
                "add",
                &format!("{router_v4}/24"),
                "dev",
                &bridge,
            ])?;
            if let Some(r6) = router_v6 {
                sh(&[
                    "ip",
                    "-6",
                    "addr",
                    "add",
                    &format!("{r6}/64"),
                    "dev",
                    &bridge,
                    "nodad",
                ])?;
            }
            sh(&["ip", "link", "set", &bridge, "up"])?;
            bed.subnets.push(BedSubnet {
                name: spec.name.clone(),
                bridge,
                cidr_v4: format!("10.{oct}.{s}.0/24"),
                cidr_v6: router_v6.map(|r| {
                    ipnet::Ipv6Net::new(r, 64)
                        .map(|n| n.trunc().to_string())
                        .unwrap_or_default()
                }),
                router_v4,
                router_v6,
            });
        }
        for spec in instances {
            bed.add_instance(spec)?;
        }
        Ok(bed)
    }

    /// Adds an instance to a built bed (an instance started later): a
    /// namespace, a veth into its subnet's bridge, addresses and routes.
    pub fn add_instance(&mut self, spec: &InstanceSpec) -> Result<BedInstance, BedError> {
        let (pid, n, oct) = (std::process::id(), self.n, self.oct);
        let i = self.instances.len();
        let sub = self
            .subnets
            .get(spec.subnet)
            .cloned()
            .ok_or_else(|| BedError::Command {
                cmd: format!("instance {}", spec.name),
                stderr: format!("no subnet {}", spec.subnet),
            })?;
        let netns = format!("sgt{pid}x{n}n{i}");
        let port = format!("g{pid}x{n}p{i}");
        let host = 10 + i as u8;
        let v4 = Ipv4Addr::new(10, oct, spec.subnet as u8, host);
        let v6 = sub.router_v6.and_then(|_| {
            format!("fd5e:{n:x}:{:x}::{host:x}", spec.subnet)
                .parse::<Ipv6Addr>()
                .ok()
        });
        self.on_drop({
            let (ns, port) = (netns.clone(), port.clone());
            move || {
                // The veth goes first and at once: a namespace outlives its
                // name while sockets in it linger (TIME_WAIT, for a minute),
                // and with it the host end of its veth.
                sh_quiet(&["ip", "link", "del", &port]);
                sh_quiet(&["ip", "netns", "del", &ns]);
            }
        });
        sh(&["ip", "netns", "add", &netns])?;
        // No duplicate address detection inside either (see the bridge).
        sh(&[
            "ip",
            "netns",
            "exec",
            &netns,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ])?;
        sh(&[
            "ip", "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ])?;
        plug(&port, &netns, v4, v6, &sub)?;
        let inst = BedInstance {
            name: spec.name.clone(),
            subnet: spec.subnet,
            netns,
            port,
            v4,
            v6,
        };
        self.instances.push(inst.clone());
        Ok(inst)
    }

    /// Re-creates an instance's veth, as a container runtime does on a
    /// restart: the same names and addresses, a new ifindex, and a port that
    /// nothing has attached yet. Sockets in the namespace survive.
    pub fn replug(&self, inst: &str) -> Result<(), BedError> {
        let i = self.instance(inst).clone();
        let sub = self
            .subnets
            .get(i.subnet)
            .cloned()
            .ok_or_else(|| BedError::Command {
                cmd: format!("replug {inst}"),
                stderr: format!("no subnet {}", i.subnet),
            })?;
        // The instance keeps its MAC address, as an ENI (and a container
        // started with `--mac-address`) does.
        let mac = sh(&[
            "ip",
            "netns",
            "exec",
            &i.netns,
            "cat",
            "/sys/class/net/eth0/address",
        ])?;
        let mac = mac.trim().to_string();
        sh(&["ip", "link", "del", &i.port])?;
        sh(&[
            "ip", "link", "add", &i.port, "type", "veth", "peer", "name", "eth0", "address", &mac,
            "netns", &i.netns,
        ])?;
        plug(&i.port, &i.netns, i.v4, i.v6, &sub)?;
        Ok(())
    }

    /// A model of this bed: its subnets (`subnet-NAME`, bridge, CIDRs) and
    /// instances (`i-NAME`, addresses, bound to their ports) with the
    /// security groups `groups(name)` returns; no groups or NACLs yet.
    pub fn model_skeleton(&self, groups: impl Fn(&str) -> Vec<String>) -> crate::model::Model {
        use crate::model::{Instance, Model, Subnet};
        Model {
            subnets: self
                .subnets
                .iter()
                .map(|s| Subnet {
                    subnet_id: format!("subnet-{}", s.name),
                    cidr_block: s.cidr_v4.clone(),
                    ipv6_cidr_block: s.cidr_v6.clone(),
                    bridge: s.bridge.clone(),
                    ..Subnet::default()
                })
                .collect(),
            instances: self
                .instances
                .iter()
                .map(|i| Instance {
                    instance_id: format!("i-{}", i.name),
                    subnet_id: format!("subnet-{}", self.subnets[i.subnet].name),
                    private_ip_address: i.v4.to_string(),
                    ipv6_addresses: i.v6.map(|a| vec![a.to_string()]).unwrap_or_default(),
                    security_group_ids: groups(&i.name),
                    interface: Some(i.port.clone()),
                    ..Instance::default()
                })
                .collect(),
            ..Model::default()
        }
    }

    /// A UDP socket inside an instance's namespace, bound to an ephemeral
    /// port (for flows that must keep one 5-tuple).
    pub fn udp_socket(&self, inst: &str, v6: bool) -> Result<UdpSocket, BedError> {
        let ns = self.instance(inst).netns.clone();
        in_netns(&ns, move || {
            UdpSocket::bind(if v6 { "[::]:0" } else { "0.0.0.0:0" })
        })
        .ok_or_else(|| BedError::Command {
            cmd: format!("udp socket in {ns}"),
            stderr: "could not enter the namespace".into(),
        })?
        .map_err(io_err("binding a UDP socket"))
    }

    /// Registers a cleanup that runs when the bed goes (before its own
    /// interfaces are removed), also on Ctrl-C.
    pub fn on_drop(&mut self, f: impl FnOnce() + Send + 'static) {
        if let Some(v) = registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&self.id)
        {
            v.push(Box::new(f));
        }
    }

    /// The instance named `name`.
    pub fn instance(&self, name: &str) -> &BedInstance {
        match self.instances.iter().find(|i| i.name == name) {
            Some(i) => i,
            None => unreachable_instance(name),
        }
    }

    /// Runs a command inside an instance's namespace.
    pub fn exec(&self, inst: &str, args: &[&str]) -> Result<String, BedError> {
        let ns = self.instance(inst).netns.clone();
        let mut v = vec!["ip", "netns", "exec", ns.as_str()];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// Starts TCP and UDP echo servers in an instance on these ports.
    pub fn serve(&mut self, inst: &str, tcp: &[u16], udp: &[u16]) -> Result<(), BedError> {
        let ns = self.instance(inst).netns.clone();
        for &p in tcp {
            self.servers.push(Server::tcp(&ns, p)?);
        }
        for &p in udp {
            self.servers.push(Server::udp(&ns, p)?);
        }
        Ok(())
    }

    /// TCP connect from an instance to `dst:port`: delivered iff the handshake completes
    /// (or is refused: the SYN reached and the answer came back).
    pub fn tcp(&self, from: &str, dst: IpAddr, port: u16) -> bool {
        let ns = self.instance(from).netns.clone();
        in_netns(&ns, move || {
            match TcpStream::connect_timeout(&SocketAddr::new(dst, port), PROBE_TIMEOUT) {
                Ok(_) => true,
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
            }
        })
        .unwrap_or(false)
    }

    /// UDP request/reply to an echo server: delivered iff the reply arrives.
    pub fn udp(&self, from: &str, dst: IpAddr, port: u16) -> bool {
        let ns = self.instance(from).netns.clone();
        in_netns(&ns, move || {
            let bind: SocketAddr = if dst.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
                .parse()
                .ok()?;
            let s = UdpSocket::bind(bind).ok()?;
            s.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
            s.send_to(b"sgfw-probe", SocketAddr::new(dst, port)).ok()?;
            let mut buf = [0u8; 64];
            let (n, _) = s.recv_from(&mut buf).ok()?;
            Some(&buf[..n] == b"sgfw-probe")
        })
        .flatten()
        .unwrap_or(false)
    }

    /// ICMP or ICMPv6 echo: delivered iff the reply arrives.
    pub fn ping(&self, from: &str, dst: IpAddr) -> bool {
        let ns = self.instance(from).netns.clone();
        let d = dst.to_string();
        Command::new("ip")
            .args([
                "netns", "exec", &ns, "ping", "-n", "-q", "-c", "1", "-W", "0.5", &d,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Opens a long-lived TCP connection (the server must echo).
    pub fn connect(&self, from: &str, dst: IpAddr, port: u16) -> Result<LongConn, BedError> {
        let ns = self.instance(from).netns.clone();
        let stream = in_netns(&ns, move || {
            TcpStream::connect_timeout(&SocketAddr::new(dst, port), PROBE_TIMEOUT)
        })
        .ok_or_else(|| BedError::Command {
            cmd: format!("connect to {dst}:{port}"),
            stderr: "thread failed".into(),
        })?
        .map_err(io_err(format!("connecting to {dst}:{port}")))?;
        stream
            .set_read_timeout(Some(PROBE_TIMEOUT))
            .map_err(io_err("set_read_timeout"))?;
        Ok(LongConn { stream })
    }
}

#[expect(
    clippy::panic,
    reason = "a test naming an instance it did not build is a bug in the test"
)]
fn unreachable_instance(name: &str) -> ! {
    panic!("no instance {name} in the test bed")
}

/// How long a probe waits for an answer; local veths answer in well under 1 ms.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(400);

/// Runs `f` on a thread that has entered the network namespace `ns`.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || enter_netns(&path).then(f))
        .join()
        .ok()
        .flatten()
}

/// A TCP connection kept open across a policy change.
#[derive(Debug)]
pub struct LongConn {
    stream: TcpStream,
}

impl LongConn {
    /// Whether the connection still carries data both ways.
    pub fn alive(&mut self) -> bool {
        if self.stream.write_all(b"x").is_err() {
            return false;
        }
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(1))
    }
}

/// An echo server thread inside a namespace, stopped on drop.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Enters the network namespace at `path` on the calling thread.
fn enter_netns(path: &str) -> bool {
    std::fs::File::open(path)
        // SAFETY: setns on a valid namespace fd; affects only this thread.
        .map(|f| unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } == 0)
        .unwrap_or(false)
}

impl Server {
    /// A thread that enters `ns`, binds with `bind` and then runs `serve`
    /// until the stop flag is set; fails when the bind fails.
    fn start<S: Send + 'static>(
        ns: &str,
        what: String,
        bind: impl FnOnce() -> Option<S> + Send + 'static,
        serve: impl FnOnce(S, &AtomicBool) + Send + 'static,
    ) -> Result<Server, BedError> {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = format!("/run/netns/{ns}");
        let thread = std::thread::spawn(move || {
            let bound = if enter_netns(&path) { bind() } else { None };
            let _ = tx.send(bound.is_some());
            if let Some(b) = bound {
                serve(b, &s2);
            }
        });
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(true) => Ok(Server {
                stop,
                thread: Some(thread),
            }),
            _ => Err(BedError::Command {
                cmd: what,
                stderr: "could not bind".into(),
            }),
        }
    }

    /// A TCP echo server on `port` (IPv4 and IPv6).
    fn tcp(ns: &str, port: u16) -> Result<Server, BedError> {
        Server::start(
            ns,
            format!("tcp server on {ns}:{port}"),
            move || TcpListener::bind(("::", port)).ok(),
            |l, stop| {
                let _ = l.set_nonblocking(true);
                std::thread::scope(|scope| {
                    while !stop.load(Ordering::Relaxed) {
                        match l.accept() {
                            Ok((mut c, _)) => {
                                scope.spawn(move || {
                                    let _ = c.set_read_timeout(Some(Duration::from_millis(100)));
                                    let mut buf = [0u8; 1024];
                                    while !stop.load(Ordering::Relaxed) {
                                        match c.read(&mut buf) {
                                            Ok(0) => break,
                                            Ok(n) => {
                                                if c.write_all(&buf[..n]).is_err() {
                                                    break;
                                                }
                                            }
                                            Err(e)
                                                if matches!(
                                                    e.kind(),
                                                    std::io::ErrorKind::WouldBlock
                                                        | std::io::ErrorKind::TimedOut
                                                ) => {}
                                            Err(_) => break,
                                        }
                                    }
                                });
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(5)),
                        }
                    }
                });
            },
        )
    }

    /// A UDP echo server on `port` (IPv4 and IPv6).
    fn udp(ns: &str, port: u16) -> Result<Server, BedError> {
        Server::start(
            ns,
            format!("udp server on {ns}:{port}"),
            move || UdpSocket::bind(("::", port)).ok(),
            |s, stop| {
                let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = s.recv_from(&mut buf) {
                        let _ = s.send_to(&buf[..n], from);
                    }
                }
            },
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        self.servers.clear();
        let cleanups = registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id)
            .unwrap_or_default();
        // Registered last = undone first: sgfw teardown before interfaces go.
        for c in cleanups.into_iter().rev() {
            c();
        }
        release_forwarding();
    }
}
