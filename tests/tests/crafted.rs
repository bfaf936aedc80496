//! Crafted packets through the real dataplane, on both backends: Ethernet
//! frames made with scapy (tests/crafted/craft.py) are written to an
//! instance's interface inside its namespace after `sgfw apply`, and whether
//! they arrive is seen by capturing inside the receiving namespace. Every
//! expected outcome comes from docs/semantics.md, not from either backend.
//!
//! The lab: subnet A (a1, a2), subnet B (b1), every instance bound to its
//! port; an "outside" namespace `svc`, routed through the host from subnet A,
//! that owns the metadata, Time Sync and Amazon DNS addresses (v4 and v6)
//! and the DNS address the model names for subnet A, so traffic to them can
//! be seen where it arrives. The model:
//!
//! - a1 (`sg-a1`): nothing in, everything out. The victim of forged ICMP
//!   and the sender of spoofed sources and hostile broadcast/VLAN frames.
//! - a2 (`sg-a2`): TCP 80 and UDP 5000-5999 in from anywhere; out only UDP
//!   7000-7999 to subnet B. The receiver of a1's frames, and the sender of
//!   the passthrough classes (which its rules would all deny).
//! - b1 (`sg-b1`): everything in and out.
//! - subnet A's NACL: in, ICMP echo reply (0/0) and destination unreachable
//!   (3/any), ICMPv6 echo reply (129/0) and destination unreachable (1/any),
//!   UDP from subnet B, UDP 5353 and TCP 80 from anywhere; out, everything
//!   but the service addresses and the DNS address.
//!
//! Every case that must be dropped has a control that must be delivered and
//! differs only in what the case is about. All cases run; the test prints
//! each with its outcome and fails listing those that did not do what the
//! specification says.
//!
//! The cases run under sgfw's host lock (no other `sgfw apply` or teardown
//! meanwhile), and the test fails rather than judge a dataplane it did not
//! apply, or a lab whose prefixes another test process's bed routes too.
//! Run alone: `SGFW_BIN=target/release/sgfw cargo test --release -p
//! sgfw-tests --test crafted -- --nocapture` (root; `SGFW_PYTHON`, else
//! `~/.cache/sgfw/venv/bin/python3`, must import scapy).
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step is a failed test"
)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::sync::Mutex;

use serde_json::{Value, json};
use sgfw::model::{IcmpTypeCode, IpPermission, NetworkAcl, NetworkAclEntry, SecurityGroup};
use sgfw_tests::testbed::{InstanceSpec, SubnetSpec, TestBed, sh};

/// `sgfw apply` and `sgfw teardown` act on the host's one dataplane: the two
/// tests take turns.
static TURN: Mutex<()> = Mutex::new(());

#[test]
fn ebpf() {
    if sgfw_tests::require_root("crafted_ebpf") {
        run("ebpf");
    }
}

/// The eBPF backend with the XDP pre-filter in front of the TC hooks on
/// every port (`--dataplane xdp`): the same cases, the same expectations.
#[test]
fn xdp() {
    if sgfw_tests::require_root("crafted_xdp") {
        run("xdp");
    }
}

#[test]
fn nftables() {
    if sgfw_tests::require_root("crafted_nftables") {
        run("nftables");
    }
}

use sgfw_tests::sgfw;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The interpreter the test drives ([`sgfw_tests::python_with`]).
fn python() -> Option<PathBuf> {
    sgfw_tests::python_with("scapy.all", "crafted")
}

/// The running craft.py.
struct Craft {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Craft {
    fn start(python: &Path) -> Craft {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("crafted/craft.py");
        let mut child = Command::new(python)
            .arg(&script)
            .arg("serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting craft.py");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut c = Craft {
            child,
            stdin,
            stdout,
        };
        let hello = c.read();
        assert_eq!(hello["ready"], true, "craft.py: {hello}");
        c
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("reading craft.py");
        assert!(!line.is_empty(), "craft.py exited");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("craft.py said {line:?}: {e}"))
    }

    fn call(&mut self, req: &Value) -> Value {
        writeln!(self.stdin, "{req}").expect("writing to craft.py");
        self.stdin.flush().expect("writing to craft.py");
        let r = self.read();
        assert_eq!(r["ok"], true, "craft.py failed: {r}\nrequest: {req}");
        r
    }
}

impl Drop for Craft {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a frame is captured: an interface inside a namespace (None: the
/// host), and a scapy expression over `p` (the frame) that picks the probe.
#[derive(Debug, Clone)]
struct Tap {
    ns: Option<String>,
    iface: String,
    matcher: String,
    info: Option<String>,
}

/// What a probe sends.
#[derive(Debug, Clone)]
enum Send {
    /// Frames (a scapy expression) written to an interface in a namespace.
    Frames {
        ns: Option<String>,
        iface: String,
        expr: String,
    },
    /// A datagram through a namespace's own IP stack.
    Udp {
        ns: Option<String>,
        src: (IpAddr, u16),
        device: Option<String>,
        dst: (IpAddr, u16),
        payload: String,
    },
}

impl Send {
    fn json(&self) -> Value {
        match self {
            Send::Frames { ns, iface, expr } => json!({"ns": ns, "iface": iface, "frames": expr}),
            Send::Udp {
                ns,
                src,
                device,
                dst,
                payload,
            } => json!({"ns": ns, "udp": {
                "family": if dst.0.is_ipv6() { 6 } else { 4 },
                "src": [src.0.to_string(), src.1],
                "device": device,
                "dst": [dst.0.to_string(), dst.1],
                "payload": payload,
            }}),
        }
    }
}

/// A UDP socket that receives whole datagrams inside a namespace.
#[derive(Debug, Clone)]
struct Sink {
    ns: Option<String>,
    v6: bool,
    port: u16,
    device: Option<String>,
}

/// How long a probe waits for what must not come, and at most for what must.
const QUIET: f64 = 0.6;
const PATIENT: f64 = 2.0;

/// An instance as the frames see it.
#[derive(Debug, Clone)]
struct Node {
    ns: String,
    mac: String,
    ll: Ipv6Addr,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
}

/// A subnet's router (its bridge on the host).
#[derive(Debug, Clone)]
struct Router {
    bridge: String,
    mac: String,
    v4: Ipv4Addr,
}

/// The outside namespace owning the service addresses.
#[derive(Debug, Clone)]
struct Svc {
    ns: String,
    /// Its interface's MAC and the host end's.
    mac: String,
    host_mac: String,
}

const MD4: &str = "169.254.169.254";
const TS4: &str = "169.254.169.123";
const ADNS4: &str = "169.254.169.253";
/// In the services' range and routed to `svc`, but not a service address.
const NOT_SVC4: &str = "169.254.169.250";
const MD6: &str = "fd00:ec2::254";
const TS6: &str = "fd00:ec2::123";
const ADNS6: &str = "fd00:ec2::253";
const NOT_SVC6: &str = "fd00:ec2::250";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn mac_of(ns: Option<&str>, dev: &str) -> String {
    let mut args = vec!["ip"];
    if let Some(n) = ns {
        args.extend(["-n", n]);
    }
    args.extend(["-j", "link", "show", "dev", dev]);
    let v: Value = serde_json::from_str(&sh(&args).unwrap()).unwrap();
    v[0]["address"].as_str().unwrap().to_string()
}

fn link_local(ns: &str) -> Ipv6Addr {
    let out = sh(&[
        "ip", "-n", ns, "-j", "-6", "addr", "show", "dev", "eth0", "scope", "link",
    ])
    .unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    v[0]["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|a| a["local"].as_str()?.parse().ok())
        .unwrap_or_else(|| panic!("no link-local address in {ns}: {out}"))
}

/// The solicited-node group of an address and its MAC.
fn solicited(a: Ipv6Addr) -> (Ipv6Addr, String) {
    let o = a.octets();
    let g = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    );
    (
        g,
        format!("33:33:ff:{:02x}:{:02x}:{:02x}", o[13], o[14], o[15]),
    )
}

fn eth(src: &str, dst: &str) -> String {
    format!("Ether(src='{src}',dst='{dst}')")
}

/// Builds the outside namespace: a veth from the host, the service
/// addresses (and `extra`) on its end, routes to them in a table of their
/// own that only traffic arriving from `bridge` consults (the host's own
/// routes stay as they are), and a default route back through the host.
fn add_services(bed: &mut TestBed, bridge: &str, extra: &[IpAddr]) -> Svc {
    let stem = bed.instances[0]
        .netns
        .strip_suffix("n0")
        .unwrap()
        .to_string();
    let ns = format!("{stem}svc");
    let host_if = format!("{}sv", bridge.strip_suffix("b0").unwrap());
    let table = (20_000 + std::process::id() % 10_000).to_string();
    bed.on_drop({
        let (ns, host_if, table) = (ns.clone(), host_if.clone(), table.clone());
        move || {
            for fam in ["-4", "-6"] {
                let _ = sh(&["ip", fam, "rule", "del", "pref", &table]);
                let _ = sh(&["ip", fam, "route", "flush", "table", &table]);
            }
            let _ = sh(&["ip", "link", "del", &host_if]);
            let _ = sh(&["ip", "netns", "del", &ns]);
        }
    });
    let x = |args: &[&str]| {
        let mut v = vec!["ip", "netns", "exec", ns.as_str()];
        v.extend_from_slice(args);
        sh(&v).unwrap();
    };
    sh(&["ip", "netns", "add", &ns]).unwrap();
    x(&[
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0",
    ]);
    sh(&[
        "ip", "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
    ])
    .unwrap();
    std::fs::write(format!("/proc/sys/net/ipv6/conf/{host_if}/accept_dad"), "0").unwrap();
    std::fs::write(format!("/proc/sys/net/ipv4/conf/{host_if}/rp_filter"), "0").unwrap();
    sh(&["ip", "addr", "add", "169.254.99.1/32", "dev", &host_if]).unwrap();
    sh(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fe80::1/64",
        "dev",
        &host_if,
        "nodad",
    ])
    .unwrap();
    sh(&["ip", "link", "set", &host_if, "up"]).unwrap();
    x(&["ip", "link", "set", "lo", "up"]);
    x(&["ip", "link", "set", "eth0", "up"]);
    x(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fe80::2/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    let mut addrs: Vec<IpAddr> = [MD4, TS4, ADNS4, NOT_SVC4, MD6, TS6, ADNS6, NOT_SVC6]
        .iter()
        .map(|a| ip(a))
        .collect();
    addrs.extend_from_slice(extra);
    for a in &addrs {
        if a.is_ipv6() {
            x(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{a}/128"),
                "dev",
                "eth0",
                "nodad",
            ]);
            sh(&[
                "ip",
                "-6",
                "route",
                "add",
                &format!("{a}/128"),
                "via",
                "fe80::2",
                "dev",
                &host_if,
                "table",
                &table,
            ])
            .unwrap();
        } else {
            x(&["ip", "addr", "add", &format!("{a}/32"), "dev", "eth0"]);
            sh(&[
                "ip",
                "route",
                "add",
                &format!("{a}/32"),
                "dev",
                &host_if,
                "table",
                &table,
            ])
            .unwrap();
        }
    }
    x(&["ip", "route", "add", "169.254.99.1/32", "dev", "eth0"]);
    x(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        "169.254.99.1",
        "dev",
        "eth0",
    ]);
    x(&[
        "ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
    ]);
    for fam in ["-4", "-6"] {
        sh(&[
            "ip", fam, "rule", "add", "iif", bridge, "lookup", &table, "pref", &table,
        ])
        .unwrap();
    }
    Svc {
        mac: mac_of(Some(&ns), "eth0"),
        host_mac: mac_of(None, &host_if),
        ns,
    }
}

/// One case's outcome.
struct Outcome {
    class: &'static str,
    case: String,
    want: bool,
    got: bool,
    detail: String,
}

/// The lab, the helper, and what the cases found.
struct World {
    backend: &'static str,
    craft: Craft,
    a1: Node,
    a2: Node,
    b1: Node,
    ra: Router,
    rb: Router,
    svc: Svc,
    dns4: Ipv4Addr,
    dns6: Ipv6Addr,
    /// Subnet A's and B's broadcast addresses.
    bcast_a: Ipv4Addr,
    bcast_b: Ipv4Addr,
    next: u32,
    /// What craft.py sent in the last probe (frame counts, "refused").
    last_sent: Value,
    outcomes: Vec<Outcome>,
}

fn want_text(delivered: bool) -> &'static str {
    if delivered { "delivered" } else { "dropped" }
}

impl World {
    /// A fresh marker: IPv4 identification, IPv6 flow label, ICMP id, ports.
    fn id(&mut self) -> u32 {
        self.next += 1;
        self.next
    }

    fn record(&mut self, class: &'static str, case: String, want: bool, got: bool, detail: String) {
        let ok = want == got;
        eprintln!(
            "[{}] {:<5} {class:<12} {case}: want {}, got {}{}",
            self.backend,
            if ok { "ok" } else { "FAIL" },
            want_text(want),
            want_text(got),
            if ok {
                String::new()
            } else {
                format!(" ({detail})")
            }
        );
        self.outcomes.push(Outcome {
            class,
            case,
            want,
            got,
            detail,
        });
    }

    /// Sends, captures at every tap, and returns each tap's result and each
    /// sink's datagrams. `until`: how many matches each tap and sink waits
    /// for (None: wait the whole quiet time, something must not arrive).
    fn probe(
        &mut self,
        sends: &[Send],
        taps: &[(&Tap, Option<usize>)],
        sinks: &[(&Sink, Option<usize>)],
    ) -> (Vec<Value>, Vec<Value>) {
        let all_until = taps.iter().all(|t| t.1.is_some()) && sinks.iter().all(|s| s.1.is_some());
        let req = json!({
            "op": "probe",
            "taps": taps.iter().map(|(t, n)| json!({
                "ns": t.ns, "iface": t.iface, "match": t.matcher, "info": t.info, "until": n,
            })).collect::<Vec<_>>(),
            "sockets": sinks.iter().map(|(s, n)| json!({
                "ns": s.ns, "family": if s.v6 { 6 } else { 4 }, "port": s.port,
                "device": s.device, "until": n,
            })).collect::<Vec<_>>(),
            "sends": sends.iter().map(Send::json).collect::<Vec<_>>(),
            "timeout": if all_until { PATIENT } else { QUIET },
        });
        let r = self.craft.call(&req);
        self.last_sent = r["sent"].clone();
        (
            r["taps"].as_array().unwrap().clone(),
            r["sockets"].as_array().unwrap().clone(),
        )
    }

    /// One case: `send`, and whether `tap` sees it, against `want`.
    fn case(&mut self, class: &'static str, case: &str, send: Send, tap: &Tap, want: bool) {
        self.cases(class, &[send], &[(case, tap, want)]);
    }

    /// Several outcomes of one send (e.g. a frame and the answer to it).
    fn cases(&mut self, class: &'static str, sends: &[Send], taps: &[(&str, &Tap, bool)]) {
        let t: Vec<(&Tap, Option<usize>)> =
            taps.iter().map(|(_, t, w)| (*t, w.then_some(1))).collect();
        let (res, _) = self.probe(sends, &t, &[]);
        for ((case, _, want), r) in taps.iter().zip(res) {
            let n = r["count"].as_u64().unwrap_or(0);
            let detail = format!("sent {}, captured {r}", self.last_sent);
            self.record(class, (*case).to_string(), *want, n > 0, detail);
        }
    }

    // Frames and taps.

    fn frames(node: &Node, expr: String) -> Send {
        Send::Frames {
            ns: Some(node.ns.clone()),
            iface: "eth0".into(),
            expr,
        }
    }

    fn tap(node: &Node, matcher: String) -> Tap {
        Tap {
            ns: Some(node.ns.clone()),
            iface: "eth0".into(),
            matcher,
            info: None,
        }
    }

    fn svc_tap(&self, matcher: String) -> Tap {
        Tap {
            ns: Some(self.svc.ns.clone()),
            iface: "eth0".into(),
            matcher,
            info: None,
        }
    }

    /// Matches an IPv4 packet by source and identification.
    fn m4(src: impl std::fmt::Display, id: u32) -> String {
        format!(
            "IP in p and p[IP].id == {} and same(p[IP].src, '{src}')",
            id & 0xffff
        )
    }

    /// Matches an IPv6 packet by source and flow label.
    fn m6(src: impl std::fmt::Display, fl: u32) -> String {
        format!(
            "IPv6 in p and p[IPv6].fl == {} and same(p[IPv6].src, '{src}')",
            fl & 0xfffff
        )
    }

    /// IPv4 header with a marker.
    fn ip4(src: impl std::fmt::Display, dst: impl std::fmt::Display, id: u32) -> String {
        format!("IP(src='{src}',dst='{dst}',id={})", id & 0xffff)
    }

    /// IPv6 header with a marker.
    fn ip6(src: impl std::fmt::Display, dst: impl std::fmt::Display, fl: u32) -> String {
        format!("IPv6(src='{src}',dst='{dst}',fl={})", fl & 0xfffff)
    }

    /// IPv6 header for neighbour discovery (hop limit 255) with a marker.
    fn nd6(src: impl std::fmt::Display, dst: impl std::fmt::Display, fl: u32) -> String {
        format!("IPv6(src='{src}',dst='{dst}',fl={},hlim=255)", fl & 0xfffff)
    }

    fn marker(id: u32) -> String {
        format!("sgfw-crafted-{id}")
    }

    /// A TCP SYN from `from` (with source `src`) to `to`'s port 80, on
    /// `to`'s MAC: `(send, tap at to)`.
    fn syn(&mut self, from: &Node, src: IpAddr, to: &Node, l2dst: &str) -> (Send, Tap) {
        let id = self.id();
        let sport = 20_000 + (id % 20_000) as u16;
        let (l3, m) = match src {
            IpAddr::V4(s) => (Self::ip4(s, to.v4, id), Self::m4(s, id)),
            IpAddr::V6(s) => (Self::ip6(s, to.v6, id), Self::m6(s, id)),
        };
        (
            Self::frames(
                from,
                format!(
                    "{}/{l3}/TCP(sport={sport},dport=80,flags='S',seq={id})",
                    eth(&from.mac, l2dst)
                ),
            ),
            Self::tap(to, m),
        )
    }

    /// A UDP datagram `src:sport -> dst:dport` from `from`'s interface to
    /// `l2dst`, matched at a tap by its marker.
    fn udp(
        &mut self,
        from: &Node,
        src: IpAddr,
        sport: u16,
        dst: IpAddr,
        dport: u16,
        l2dst: &str,
    ) -> (Send, String) {
        let id = self.id();
        let (l3, m) = match (src, dst) {
            (IpAddr::V6(s), d) => (Self::ip6(s, d, id), Self::m6(s, id)),
            (s, d) => (Self::ip4(s, d, id), Self::m4(s, id)),
        };
        (
            Self::frames(
                from,
                format!(
                    "{}/{l3}/UDP(sport={sport},dport={dport})/Raw(b'{}')",
                    eth(&from.mac, l2dst),
                    Self::marker(id)
                ),
            ),
            m,
        )
    }

    fn host_udp(&mut self, src: (IpAddr, u16), dst: (IpAddr, u16)) -> (Send, String) {
        let id = self.id();
        let payload = Self::marker(id);
        let m = format!(
            "UDP in p and p[UDP].sport == {} and b'{payload}' in raw",
            src.1
        );
        (
            Send::Udp {
                ns: None,
                src,
                device: Some(self.ra.bridge.clone()),
                dst,
                payload,
            },
            m,
        )
    }
}

fn run(backend: &'static str) {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let Some(python) = python() else { return };
    let craft = Craft::start(&python);

    let mut bed = TestBed::new(
        &[
            SubnetSpec {
                name: "a".into(),
                ipv6: true,
            },
            SubnetSpec {
                name: "b".into(),
                ipv6: true,
            },
        ],
        &[
            InstanceSpec {
                name: "a1".into(),
                subnet: 0,
            },
            InstanceSpec {
                name: "a2".into(),
                subnet: 0,
            },
            InstanceSpec {
                name: "b1".into(),
                subnet: 1,
            },
        ],
    )
    .expect("building the test bed");
    // Unregistered multicast is flooded either way; no snooping state
    // (which the host's own reports would feed) decides what reaches a port.
    for s in &bed.subnets {
        sh(&[
            "ip",
            "link",
            "set",
            &s.bridge,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])
        .unwrap();
    }
    let (sa, sb) = (bed.subnets[0].clone(), bed.subnets[1].clone());
    let oct = sa.router_v4.octets()[1];
    let dns4 = Ipv4Addr::new(10, oct, 200, 2);
    let r6 = sa.router_v6.unwrap().segments();
    let dns6 = Ipv6Addr::new(r6[0], r6[1], 0xc8, 0, 0, 0, 0, 2);
    let svc = add_services(&mut bed, &sa.bridge, &[IpAddr::V4(dns4), IpAddr::V6(dns6)]);
    bed.serve("b1", &[], &[7777, 7778]).unwrap();

    let node = |bed: &TestBed, name: &str| {
        let i = bed.instance(name);
        Node {
            ns: i.netns.clone(),
            mac: mac_of(Some(&i.netns), "eth0"),
            ll: link_local(&i.netns),
            v4: i.v4,
            v6: i.v6.unwrap(),
        }
    };
    let (a1, a2, b1) = (node(&bed, "a1"), node(&bed, "a2"), node(&bed, "b1"));
    let router = |s: &sgfw_tests::testbed::BedSubnet| Router {
        bridge: s.bridge.clone(),
        mac: mac_of(None, &s.bridge),
        v4: s.router_v4,
    };

    // Neighbour caches warm (before any filtering): the first routed frame
    // of a case never waits for address resolution.
    for (from, to) in [
        ("a1", IpAddr::V4(b1.v4)),
        ("a1", IpAddr::V6(b1.v6)),
        ("a2", IpAddr::V4(b1.v4)),
        ("a2", IpAddr::V6(b1.v6)),
        ("b1", IpAddr::V4(a1.v4)),
        ("b1", IpAddr::V6(a1.v6)),
        ("b1", IpAddr::V4(a2.v4)),
        ("b1", IpAddr::V6(a2.v6)),
        ("a1", ip(MD4)),
        ("a2", ip(MD6)),
        ("a1", IpAddr::V4(a2.v4)),
        ("a1", IpAddr::V6(a2.v6)),
        ("a2", IpAddr::V6(a1.v6)),
    ] {
        let _ = bed.ping(from, to);
    }
    for to in [a1.v4, a2.v4] {
        let _ = sh(&[
            "ip",
            "netns",
            "exec",
            &svc.ns,
            "ping",
            "-c1",
            "-W1",
            "-I",
            MD4,
            &to.to_string(),
        ]);
    }

    let model = model(&bed, dns4, dns6);
    let file = std::env::temp_dir().join(format!("{}-crafted.json", a1.ns));
    std::fs::write(&file, model.to_json().unwrap()).unwrap();
    bed.on_drop({
        let file = file.clone();
        move || {
            let _ = sgfw(&["teardown"]);
            let _ = std::fs::remove_file(&file);
        }
    });
    let (cli_backend, dataplane) = match backend {
        "xdp" => ("ebpf", "xdp"),
        b => (b, "tc"),
    };
    let o = sgfw(&[
        "apply",
        "-f",
        file.to_str().unwrap(),
        "--backend",
        cli_backend,
        "--dataplane",
        dataplane,
    ]);
    assert!(o.status.success(), "sgfw apply failed: {}", text(&o));
    if dataplane == "xdp" {
        // The pre-filter is on every port of the lab's bridges, in native
        // mode on these veths.
        for port in [&bed.instance("a1").port, &bed.instance("b1").port] {
            let l = sh(&["ip", "-d", "link", "show", "dev", port]).unwrap_or_default();
            assert!(l.contains("xdp"), "no XDP program on {port}: {l}");
        }
    }
    // No other sgfw apply or teardown on this host while the cases run (it
    // would void them); ours is still in place once the lock is held.
    let lock = sgfw::hostlock::HostLock::acquire().expect("taking sgfw's host lock");
    let ours = [sa.bridge.as_str(), bed.instance("a1").port.as_str()];
    still_ours(cli_backend, &ours, "after apply");
    no_twin(&bed, "after apply");

    let mut w = World {
        backend,
        craft,
        ra: router(&sa),
        rb: router(&sb),
        a1,
        a2,
        b1,
        svc,
        dns4,
        dns6,
        bcast_a: Ipv4Addr::new(10, oct, 0, 255),
        bcast_b: Ipv4Addr::new(10, oct, 1, 255),
        next: 1000 + std::process::id() % 20_000,
        last_sent: Value::Null,
        outcomes: Vec::new(),
    };
    icmp(&mut w);
    broadcast(&mut w);
    vlan(&mut w);
    spoofed(&mut w);
    fragments(&mut w);
    passthrough(&mut w);
    still_ours(cli_backend, &ours, "after the cases");
    no_twin(&bed, "after the cases");
    drop(lock);

    let failed: Vec<String> = w
        .outcomes
        .iter()
        .filter(|o| o.want != o.got)
        .map(|o| {
            format!(
                "  {} {}: want {}, got {} ({})",
                o.class,
                o.case,
                want_text(o.want),
                want_text(o.got),
                o.detail
            )
        })
        .collect();
    let classes: BTreeSet<&str> = w
        .outcomes
        .iter()
        .filter(|o| o.want != o.got)
        .map(|o| o.class)
        .collect();
    drop(w);
    drop(bed);
    assert!(
        failed.is_empty(),
        "[{backend}] {} case(s) not as docs/semantics.md says, in {classes:?}:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

/// Fails when another bed on this host (another test process) routes this
/// bed's prefixes to a bridge of its own: the lab's addresses are unique per
/// process only, and routed cases would reach the other bed.
fn no_twin(bed: &TestBed, when: &str) {
    for s in &bed.subnets {
        for cidr in [Some(&s.cidr_v4), s.cidr_v6.as_ref()].into_iter().flatten() {
            let routes = sh(&["ip", "-o", "route", "show", cidr]).unwrap_or_default();
            let other: Vec<&str> = routes
                .lines()
                .filter(|l| !l.contains(&format!("dev {} ", s.bridge)))
                .collect();
            assert!(
                other.is_empty(),
                "{when}: another test bed on this host uses {cidr} too (run one test process at a time): {other:?}"
            );
        }
    }
}

/// Fails unless `backend` enforces this lab's model (its bridge or a1's
/// port, names unique to this bed, are in the applied state): a run of cases
/// against anything else proves nothing.
fn still_ours(backend: &str, names: &[&str], when: &str) {
    let o = sgfw(&["status", "--json"]);
    let st: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("sgfw status --json {when}: {e}: {}", text(&o)));
    let state = if backend == "nftables" {
        // Its status names no bridges: the ruleset does.
        ["inet", "bridge"]
            .iter()
            .map(|f| sh(&["nft", "list", "table", f, "sgfw"]).unwrap_or_default())
            .collect::<String>()
    } else {
        st.to_string()
    };
    assert!(
        st["backend"] == backend && names.iter().any(|n| state.contains(n)),
        "{when}: sgfw does not enforce this test's model with {backend} (another process changed it?): {st}"
    );
}

fn model(bed: &TestBed, dns4: Ipv4Addr, dns6: Ipv6Addr) -> sgfw::model::Model {
    let groups = |name: &str| vec![format!("sg-{name}")];
    let mut m = bed.model_skeleton(groups);
    m.subnets[0].dns_address = vec![dns4.to_string(), dns6.to_string()];
    let b4 = &bed.subnets[1].cidr_v4;
    let b6 = bed.subnets[1].cidr_v6.clone().unwrap();
    let all = || IpPermission::all().from_cidr("0.0.0.0/0").from_cidr("::/0");
    let sg = |id: &str, ingress: Vec<IpPermission>, egress: Vec<IpPermission>| SecurityGroup {
        group_id: id.into(),
        ip_permissions: ingress,
        ip_permissions_egress: egress,
        ..SecurityGroup::default()
    };
    m.security_groups = vec![
        sg("sg-a1", vec![], vec![all()]),
        sg(
            "sg-a2",
            vec![
                IpPermission::tcp(80, 80)
                    .from_cidr("0.0.0.0/0")
                    .from_cidr("::/0"),
                IpPermission::udp(5000, 5999)
                    .from_cidr("0.0.0.0/0")
                    .from_cidr("::/0"),
            ],
            vec![IpPermission::udp(7000, 7999).from_cidr(b4)],
        ),
        sg("sg-b1", vec![all()], vec![all()]),
    ];
    let icmp = |num, proto: &str, cidr: &str, t: i64, c: i64| {
        let mut e = NetworkAclEntry::new(num, false, proto, "allow", cidr, None);
        e.icmp_type_code = Some(IcmpTypeCode {
            r#type: Some(t),
            code: Some(c),
        });
        e
    };
    let dns_net4 = format!("10.{}.200.0/24", bed.subnets[0].router_v4.octets()[1]);
    let s6 = dns6.segments();
    let dns_net6 = format!("{:x}:{:x}:{:x}::/64", s6[0], s6[1], s6[2]);
    m.network_acls = vec![NetworkAcl::custom(
        "acl-a",
        "subnet-a",
        vec![
            icmp(10, "1", "0.0.0.0/0", 0, 0),
            icmp(11, "58", "::/0", 129, 0),
            icmp(15, "1", "0.0.0.0/0", 3, -1),
            icmp(16, "58", "::/0", 1, -1),
            NetworkAclEntry::new(20, false, "17", "allow", b4, Some((0, 65535))),
            NetworkAclEntry::new(21, false, "17", "allow", &b6, Some((0, 65535))),
            NetworkAclEntry::new(22, false, "17", "allow", "0.0.0.0/0", Some((5353, 5353))),
            NetworkAclEntry::new(23, false, "17", "allow", "::/0", Some((5353, 5353))),
            NetworkAclEntry::new(30, false, "6", "allow", "0.0.0.0/0", Some((80, 80))),
            NetworkAclEntry::new(31, false, "6", "allow", "::/0", Some((80, 80))),
            NetworkAclEntry::new(50, true, "-1", "deny", "169.254.0.0/16", None),
            NetworkAclEntry::new(51, true, "-1", "deny", "fd00:ec2::/32", None),
            NetworkAclEntry::new(52, true, "-1", "deny", &dns_net4, None),
            NetworkAclEntry::new(53, true, "-1", "deny", &dns_net6, None),
            NetworkAclEntry::new(100, true, "-1", "allow", "0.0.0.0/0", None),
            NetworkAclEntry::new(101, true, "-1", "allow", "::/0", None),
        ],
    )];
    m
}

/// docs/semantics.md, "ICMP tracking": a query flow is (addresses,
/// identifier, query kind, which side asked); only the asker's requests and
/// the other side's replies continue it. An error is related only when it
/// quotes a flow tracked for the instance at this hook.
fn icmp(w: &mut World) {
    const C: &str = "icmp";
    let (a1, a2, b1) = (w.a1.clone(), w.a2.clone(), w.b1.clone());
    let (ra, rb) = (w.ra.mac.clone(), w.rb.mac.clone());

    // IPv4 echo: a1 asks b1 (b1's kernel answers).
    let eid = w.id() & 0xffff;
    let id = w.id();
    let ask = World::frames(
        &a1,
        format!(
            "{}/{}/ICMP(type=8,id={eid},seq=1)/Raw(b'{}')",
            eth(&a1.mac, &ra),
            World::ip4(a1.v4, b1.v4, id),
            World::marker(id)
        ),
    );
    let reply = World::tap(
        &a1,
        format!(
            "ICMP in p and p[ICMP].type == 0 and p[ICMP].id == {eid} and same(p[IP].src, '{}')",
            b1.v4
        ),
    );
    w.case(
        C,
        "a1 echo request to b1: b1's reply reaches a1",
        ask,
        &reply,
        true,
    );
    let from_b1 = |w: &mut World, icmp: String| {
        let id = w.id();
        (
            World::frames(
                &b1,
                format!(
                    "{}/{}/{icmp}",
                    eth(&b1.mac, &rb),
                    World::ip4(b1.v4, a1.v4, id)
                ),
            ),
            World::tap(&a1, World::m4(b1.v4, id)),
        )
    };
    let (s, t) = from_b1(w, format!("ICMP(type=0,id={eid},seq=2)"));
    w.case(C, "b1 another echo reply, same id (tracked)", s, &t, true);
    let (s, t) = from_b1(w, format!("ICMP(type=0,id={eid},seq=3)"));
    w.case(C, "b1 another echo reply, same id (cached)", s, &t, true);
    let (s, t) = from_b1(w, format!("ICMP(type=8,id={eid},seq=1)"));
    w.case(C, "b1 echo request with a1's tracked id", s, &t, false);
    let (s, t) = from_b1(w, format!("ICMP(type=13,id={eid},seq=1)"));
    w.case(C, "b1 timestamp request with a1's tracked id", s, &t, false);
    let (s, t) = from_b1(w, format!("ICMP(type=0,code=5,id={eid},seq=4)"));
    w.case(
        C,
        "b1 echo reply with code 5 (NACL admits 0/0)",
        s,
        &t,
        false,
    );

    // IPv6 echo.
    let eid6 = w.id() & 0xffff;
    let fl = w.id();
    let ask = World::frames(
        &a1,
        format!(
            "{}/{}/ICMPv6EchoRequest(id={eid6},seq=1,data=b'{}')",
            eth(&a1.mac, &ra),
            World::ip6(a1.v6, b1.v6, fl),
            World::marker(fl)
        ),
    );
    let reply6 = World::tap(
        &a1,
        format!(
            "ICMPv6EchoReply in p and p[ICMPv6EchoReply].id == {eid6} and same(p[IPv6].src, '{}')",
            b1.v6
        ),
    );
    w.case(
        C,
        "a1 ICMPv6 echo to b1: b1's reply reaches a1",
        ask,
        &reply6,
        true,
    );
    let from_b1_6 = |w: &mut World, icmp: String| {
        let fl = w.id();
        (
            World::frames(
                &b1,
                format!(
                    "{}/{}/{icmp}",
                    eth(&b1.mac, &rb),
                    World::ip6(b1.v6, a1.v6, fl)
                ),
            ),
            World::tap(&a1, World::m6(b1.v6, fl)),
        )
    };
    let (s, t) = from_b1_6(w, format!("ICMPv6EchoReply(id={eid6},seq=2)"));
    w.case(C, "b1 another ICMPv6 echo reply, same id", s, &t, true);
    let (s, t) = from_b1_6(w, format!("ICMPv6EchoRequest(id={eid6},seq=1)"));
    w.case(
        C,
        "b1 ICMPv6 echo request with a1's tracked id",
        s,
        &t,
        false,
    );

    // Errors: a1 has a UDP flow with b1 (b1 echoes), a2 another.
    let sport = 30_000 + (w.id() % 10_000) as u16;
    let (s, _) = w.udp(&a1, IpAddr::V4(a1.v4), sport, IpAddr::V4(b1.v4), 7777, &ra);
    let echo = World::tap(
        &a1,
        format!("UDP in p and p[UDP].sport == 7777 and p[UDP].dport == {sport}"),
    );
    w.case(C, "a1 UDP to b1:7777: b1's echo reaches a1", s, &echo, true);
    let sport2 = sport + 1;
    let (s, _) = w.udp(&a2, IpAddr::V4(a2.v4), sport2, IpAddr::V4(b1.v4), 7778, &ra);
    let echo2 = World::tap(
        &a2,
        format!("UDP in p and p[UDP].sport == 7778 and p[UDP].dport == {sport2}"),
    );
    w.case(
        C,
        "a2 UDP to b1:7778: b1's echo reaches a2",
        s,
        &echo2,
        true,
    );
    let quote = |src: Ipv4Addr, sp: u16, dp: u16| {
        format!(
            "ICMP(type=3,code=3)/IPerror(src='{src}',dst='{}')/UDPerror(sport={sp},dport={dp})",
            b1.v4
        )
    };
    let (s, t) = from_b1(w, quote(a1.v4, sport, 7777));
    w.case(C, "b1 unreachable quoting a1's tracked flow", s, &t, true);
    let (s, t) = from_b1(w, "ICMP(type=3,code=3)".into());
    w.case(C, "b1 unreachable quoting nothing", s, &t, false);
    let (s, t) = from_b1(w, "ICMP(type=3,code=1)/Raw(b'\\x00'*12)".into());
    w.case(C, "b1 unreachable quoting a truncated header", s, &t, false);
    let (s, t) = from_b1(w, quote(a1.v4, sport + 2, 7777));
    w.case(
        C,
        "b1 unreachable quoting a flow a1 never had",
        s,
        &t,
        false,
    );
    let (s, t) = from_b1(w, quote(a2.v4, sport2, 7778));
    w.case(C, "b1 unreachable to a1 quoting a2's flow", s, &t, false);

    let sport6 = sport + 3;
    let (s, _) = w.udp(&a1, IpAddr::V6(a1.v6), sport6, IpAddr::V6(b1.v6), 7777, &ra);
    let echo6 = World::tap(
        &a1,
        format!("UDP in p and p[UDP].sport == 7777 and p[UDP].dport == {sport6}"),
    );
    w.case(
        C,
        "a1 UDP/v6 to b1:7777: b1's echo reaches a1",
        s,
        &echo6,
        true,
    );
    let (s, t) = from_b1_6(
        w,
        format!(
            "ICMPv6DestUnreach(code=4)/IPerror6(src='{}',dst='{}')/UDPerror(sport={sport6},dport=7777)",
            a1.v6, b1.v6
        ),
    );
    w.case(
        C,
        "b1 ICMPv6 unreachable quoting a1's tracked flow",
        s,
        &t,
        true,
    );
    let (s, t) = from_b1_6(w, "ICMPv6DestUnreach(code=4)".into());
    w.case(C, "b1 ICMPv6 unreachable quoting nothing", s, &t, false);
}

/// "Not carried": 255.255.255.255, any subnet's broadcast address,
/// 224.0.0.0/4 and ff00::/8 are dropped at either hook, after the
/// passthrough classes (DHCP to 255.255.255.255 and NDP pass).
fn broadcast(w: &mut World) {
    const C: &str = "broadcast";
    let (a1, a2) = (w.a1.clone(), w.a2.clone());
    let cases4: Vec<(String, Ipv4Addr, String)> = vec![
        ("a1 -> a2 unicast (control)".into(), a2.v4, a2.mac.clone()),
        (
            "a1 -> 224.0.0.251".into(),
            "224.0.0.251".parse().unwrap(),
            "01:00:5e:00:00:fb".into(),
        ),
        (
            "a1 -> 239.255.255.250".into(),
            "239.255.255.250".parse().unwrap(),
            "01:00:5e:7f:ff:fa".into(),
        ),
        (
            "a1 -> 255.255.255.255".into(),
            Ipv4Addr::BROADCAST,
            "ff:ff:ff:ff:ff:ff".into(),
        ),
        (
            format!("a1 -> {} (subnet A's broadcast)", w.bcast_a),
            w.bcast_a,
            "ff:ff:ff:ff:ff:ff".into(),
        ),
        (
            "a1 -> 255.255.255.255 in a frame to a2's MAC".into(),
            Ipv4Addr::BROADCAST,
            a2.mac.clone(),
        ),
        (
            format!("a1 -> {} in a frame to a2's MAC", w.bcast_a),
            w.bcast_a,
            a2.mac.clone(),
        ),
        (
            format!(
                "a1 -> {} (subnet B's broadcast) in a frame to a2's MAC",
                w.bcast_b
            ),
            w.bcast_b,
            a2.mac.clone(),
        ),
        (
            "a1 -> 224.0.0.251 in a frame to a2's MAC".into(),
            "224.0.0.251".parse().unwrap(),
            a2.mac.clone(),
        ),
    ];
    for (i, (case, dst, l2)) in cases4.into_iter().enumerate() {
        let (s, m) = w.udp(&a1, IpAddr::V4(a1.v4), 5353, IpAddr::V4(dst), 5353, &l2);
        w.case(C, &case, s, &World::tap(&a2, m), i == 0);
    }
    let cases6: Vec<(&str, Ipv6Addr, String)> = vec![
        ("a1 -> a2 unicast IPv6 (control)", a2.v6, a2.mac.clone()),
        (
            "a1 -> ff02::fb",
            "ff02::fb".parse().unwrap(),
            "33:33:00:00:00:fb".into(),
        ),
        (
            "a1 -> ff02::1",
            "ff02::1".parse().unwrap(),
            "33:33:00:00:00:01".into(),
        ),
        (
            "a1 -> ff05::fb",
            "ff05::fb".parse().unwrap(),
            "33:33:00:00:00:fb".into(),
        ),
        (
            "a1 -> ff02::fb in a frame to a2's MAC",
            "ff02::fb".parse().unwrap(),
            a2.mac.clone(),
        ),
    ];
    for (i, (case, dst, l2)) in cases6.into_iter().enumerate() {
        let (s, m) = w.udp(&a1, IpAddr::V6(a1.v6), 5353, IpAddr::V6(dst), 5353, &l2);
        w.case(C, case, s, &World::tap(&a2, m), i == 0);
    }
    // A link-local source is the sender's own: multicast from it is still
    // not carried.
    let (s, m) = w.udp(
        &a1,
        IpAddr::V6(a1.ll),
        5353,
        ip("ff02::fb"),
        5353,
        "33:33:00:00:00:fb",
    );
    w.case(
        C,
        "a1 (link-local) -> ff02::fb",
        s,
        &World::tap(&a2, m),
        false,
    );

    // From the host's own stack, through the subnet's bridge.
    let router = IpAddr::V4(w.ra.v4);
    let (s, m) = w.host_udp((router, 5000), (IpAddr::V4(a2.v4), 5353));
    w.case(
        C,
        "host -> a2 unicast UDP 5353 (control)",
        s,
        &World::tap(&a2, m),
        true,
    );
    for dst in [
        Ipv4Addr::BROADCAST,
        w.bcast_a,
        "224.0.0.251".parse().unwrap(),
    ] {
        let (s, m) = w.host_udp((router, 5000), (IpAddr::V4(dst), 5353));
        w.case(
            C,
            &format!("host -> {dst}:5353"),
            s,
            &World::tap(&a2, m),
            false,
        );
    }

    // The passthrough classes among them.
    let (s, m) = w.host_udp((router, 67), (IpAddr::V4(Ipv4Addr::BROADCAST), 68));
    w.case(
        C,
        "host DHCP offer 67->68 to 255.255.255.255",
        s,
        &World::tap(&a2, m),
        true,
    );
    let fl = w.id();
    let (g, gmac) = solicited(a2.v6);
    let ns = World::frames(
        &a1,
        format!(
            "{}/{}/ICMPv6ND_NS(tgt='{}')/ICMPv6NDOptSrcLLAddr(lladdr='{}')",
            eth(&a1.mac, &gmac),
            World::nd6(a1.ll, g, fl),
            a2.v6,
            a1.mac
        ),
    );
    w.case(
        C,
        &format!("a1 neighbour solicitation to {g}"),
        ns,
        &World::tap(&a2, World::m6(a1.ll, fl)),
        true,
    );
}

/// "Frame: a VLAN-tagged frame (802.1Q, 802.1ad, also priority tags with
/// VID 0) is dropped."
fn vlan(w: &mut World) {
    const C: &str = "vlan";
    let (a1, a2) = (w.a1.clone(), w.a2.clone());
    for (fam, src) in [("", IpAddr::V4(a1.v4)), (" IPv6", IpAddr::V6(a1.v6))] {
        let (s, t) = w.syn(&a1, src, &a2, &a2.mac);
        w.case(
            C,
            &format!("untagged{fam} TCP SYN a1 -> a2:80"),
            s,
            &t,
            true,
        );
        for (what, tag) in [
            ("802.1Q VID 0 (priority tag)", "Dot1Q(prio=5,vlan=0)"),
            ("802.1Q VID 5", "Dot1Q(vlan=5)"),
            (
                "802.1ad VID 5 over 802.1Q VID 6",
                "Dot1AD(vlan=5)/Dot1Q(vlan=6)",
            ),
        ] {
            let (s, t) = w.syn(&a1, src, &a2, &a2.mac);
            let Send::Frames { ns, iface, expr } = s else {
                unreachable!()
            };
            let ether = eth(&a1.mac, &a2.mac);
            let tagged = expr.replacen(&ether, &format!("{ether}/{tag}"), 1);
            assert_ne!(tagged, expr);
            w.case(
                C,
                &format!("{what}{fam} TCP SYN a1 -> a2:80"),
                Send::Frames {
                    ns,
                    iface,
                    expr: tagged,
                },
                &t,
                false,
            );
        }
    }
}

/// "Source check": on a bound port the source must be one of the
/// instance's addresses (or link-local, or unspecified in DHCP-client and
/// NDP shapes), whatever the packet carries; passthrough never widens past
/// its shapes.
fn spoofed(w: &mut World) {
    const C: &str = "spoofed";
    let (a1, a2, b1) = (w.a1.clone(), w.a2.clone(), w.b1.clone());
    let cases: Vec<(String, IpAddr, bool)> = vec![
        ("a1 as itself (control)".into(), IpAddr::V4(a1.v4), true),
        (format!("a1 as {MD4}"), ip(MD4), false),
        (format!("a1 as {TS4}"), ip(TS4), false),
        (format!("a1 as {ADNS4}"), ip(ADNS4), false),
        (
            format!("a1 as the subnet DNS {}", w.dns4),
            IpAddr::V4(w.dns4),
            false,
        ),
        (format!("a1 as b1 ({})", b1.v4), IpAddr::V4(b1.v4), false),
        ("a1 as 0.0.0.0 (not DHCP)".into(), ip("0.0.0.0"), false),
        (
            "a1 as itself, IPv6 (control)".into(),
            IpAddr::V6(a1.v6),
            true,
        ),
        (format!("a1 as {MD6}"), ip(MD6), false),
        (
            format!("a1 as the subnet DNS {}", w.dns6),
            IpAddr::V6(w.dns6),
            false,
        ),
        (format!("a1 as b1 ({})", b1.v6), IpAddr::V6(b1.v6), false),
    ];
    for (case, src, want) in cases {
        let (s, t) = w.syn(&a1, src, &a2, &a2.mac);
        w.case(C, &format!("TCP SYN {case} -> a2:80"), s, &t, want);
    }
    // Routed: b1 through the host.
    let rb = w.rb.mac.clone();
    let (s, t) = w.syn(&b1, IpAddr::V4(b1.v4), &a2, &rb);
    w.case(C, "TCP SYN b1 as itself -> a2:80 (control)", s, &t, true);
    let (s, t) = w.syn(&b1, ip(MD4), &a2, &rb);
    w.case(C, &format!("TCP SYN b1 as {MD4} -> a2:80"), s, &t, false);

    // 67->68 from an instance is no DHCP server's answer.
    let (s, m) = w.udp(
        &a1,
        IpAddr::V4(a1.v4),
        5067,
        IpAddr::V4(a2.v4),
        5068,
        &a2.mac,
    );
    w.case(
        C,
        "UDP a1:5067 -> a2:5068 (control)",
        s,
        &World::tap(&a2, m),
        true,
    );
    // Handed to a2's port but for another address: not a2's to receive.
    let (s, m) = w.udp(
        &a1,
        IpAddr::V4(a1.v4),
        5067,
        IpAddr::V4(b1.v4),
        5068,
        &a2.mac,
    );
    w.case(
        C,
        "UDP a1 -> b1's address in a frame to a2's MAC",
        s,
        &World::tap(&a2, m),
        false,
    );
    let (s, m) = w.udp(
        &a1,
        IpAddr::V6(a1.v6),
        5067,
        IpAddr::V6(b1.v6),
        5068,
        &a2.mac,
    );
    w.case(
        C,
        "UDP a1 -> b1's IPv6 address in a frame to a2's MAC",
        s,
        &World::tap(&a2, m),
        false,
    );
    let (s, m) = w.udp(&a1, IpAddr::V4(a1.v4), 67, IpAddr::V4(a2.v4), 68, &a2.mac);
    w.case(C, "UDP a1:67 -> a2:68", s, &World::tap(&a2, m), false);
    let (s, m) = w.udp(
        &a1,
        IpAddr::V4(a1.v4),
        67,
        IpAddr::V4(Ipv4Addr::BROADCAST),
        68,
        "ff:ff:ff:ff:ff:ff",
    );
    w.case(
        C,
        "UDP a1:67 -> 255.255.255.255:68",
        s,
        &World::tap(&a2, m),
        false,
    );

    // Legit: a1 to the metadata service (its own NACL denies 169.254/16: only
    // the passthrough lets it out), and a1 as a DHCP client.
    let ra = w.ra.mac.clone();
    let (s, m) = w.udp(&a1, IpAddr::V4(a1.v4), 40_000, ip(MD4), 80, &ra);
    let t = w.svc_tap(m);
    w.case(C, &format!("UDP a1 -> {MD4}:80 reaches it"), s, &t, true);
    dhcp_client(w, C, &a1);
}

/// A DHCP discover from `from` leaves its port: the host's stack receives
/// it on the subnet's bridge; the other instance is not handed it.
fn dhcp_client(w: &mut World, class: &'static str, from: &Node) {
    let other = if from.ns == w.a1.ns {
        w.a2.clone()
    } else {
        w.a1.clone()
    };
    let (s, m) = w.udp(
        from,
        ip("0.0.0.0"),
        68,
        IpAddr::V4(Ipv4Addr::BROADCAST),
        67,
        "ff:ff:ff:ff:ff:ff",
    );
    let bridge = Tap {
        ns: None,
        iface: w.ra.bridge.clone(),
        matcher: m.clone(),
        info: None,
    };
    let sink = Sink {
        ns: None,
        v6: false,
        port: 67,
        device: Some(w.ra.bridge.clone()),
    };
    let peer = World::tap(&other, m);
    let name = if from.ns == w.a1.ns { "a1" } else { "a2" };
    let (taps, sinks) = w.probe(
        std::slice::from_ref(&s),
        &[(&bridge, Some(1)), (&peer, None)],
        &[(&sink, Some(1))],
    );
    let on_bridge = taps[0]["count"].as_u64().unwrap_or(0) > 0;
    let got = sinks[0]["datagrams"]
        .as_array()
        .is_some_and(|d| !d.is_empty());
    w.record(
        class,
        format!("{name} DHCP discover 0.0.0.0:68 -> 255.255.255.255:67 leaves the port"),
        true,
        on_bridge,
        format!("bridge tap {}", taps[0]),
    );
    w.record(
        class,
        format!("{name} DHCP discover reaches the host's DHCP socket"),
        true,
        got,
        format!("socket {}", sinks[0]),
    );
    w.record(
        class,
        format!("{name} DHCP discover handed to the other instance"),
        false,
        taps[1]["count"].as_u64().unwrap_or(0) > 0,
        format!("tap {}", taps[1]),
    );
}

/// "Fragments": every fragment of a datagram gets the verdict of its first
/// fragment; a non-first fragment whose first was never seen, or was
/// denied, is dropped. nftables judges reassembled datagrams (and the
/// bridge refragments them): the same outcome at the receiver.
fn fragments(w: &mut World) {
    const C: &str = "fragments";
    let (a1, a2) = (w.a1.clone(), w.a2.clone());
    for v6 in [false, true] {
        let fam = if v6 { "IPv6" } else { "IPv4" };
        // (what, dport, order, delivered)
        let cases = [
            ("in order", 5001 + u16::from(v6) * 10, "fs", true),
            (
                "first, then the rest last to first",
                5002 + u16::from(v6) * 10,
                "first_then_reversed(fs)",
                true,
            ),
            (
                "without the first",
                5003 + u16::from(v6) * 10,
                "without_first(fs)",
                false,
            ),
            (
                "of a denied datagram (port 6001)",
                6001 + u16::from(v6) * 10,
                "fs",
                false,
            ),
        ];
        for (what, dport, order, want) in cases {
            let id = w.id();
            let marker = World::marker(id);
            // 3000 bytes of UDP: three fragments either way.
            let body_len = 3000 - 8;
            let body: String = marker.chars().cycle().take(body_len).collect();
            let sport = 40_000 + (id % 10_000) as u16;
            let (frags, matcher, info, offsets) = if v6 {
                (
                    format!(
                        "frags6({}/IPv6ExtHdrFragment(id={id})/UDP(sport={sport},dport={dport})/Raw(b'{body}'), 1280)",
                        World::ip6(a1.v6, a2.v6, id)
                    ),
                    World::m6(a1.v6, id),
                    "p[IPv6ExtHdrFragment].offset if IPv6ExtHdrFragment in p else -1",
                    vec![0u64, 154, 308],
                )
            } else {
                (
                    format!(
                        "frags4({}/UDP(sport={sport},dport={dport})/Raw(b'{body}'), 1000)",
                        World::ip4(a1.v4, a2.v4, id)
                    ),
                    World::m4(a1.v4, id),
                    "p[IP].frag",
                    vec![0u64, 125, 250],
                )
            };
            let send = World::frames(
                &a1,
                format!(
                    "(lambda fs: on_wire('{}', '{}', {order}))({frags})",
                    a1.mac, a2.mac
                ),
            );
            let mut tap = World::tap(&a2, matcher);
            tap.info = Some(info.into());
            let sink = Sink {
                ns: Some(a2.ns.clone()),
                v6,
                port: dport,
                device: None,
            };
            let n = want.then_some(3);
            let (taps, sinks) = w.probe(&[send], &[(&tap, n)], &[(&sink, want.then_some(1))]);
            let seen: BTreeSet<u64> = taps[0]["info"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_u64)
                .collect();
            let count = taps[0]["count"].as_u64().unwrap_or(0);
            let datagrams = sinks[0]["datagrams"].as_array().unwrap().clone();
            let whole = datagrams
                .iter()
                .any(|d| d["hex"].as_str().is_some_and(|h| h == hex(body.as_bytes())));
            let case = format!("{fam} fragments {what}");
            if want {
                let all = seen == offsets.iter().copied().collect::<BTreeSet<u64>>();
                w.record(
                    C,
                    format!("{case}: every fragment reaches a2"),
                    true,
                    all,
                    format!("{count} captured at offsets {seen:?}, sent {offsets:?}"),
                );
                w.record(
                    C,
                    format!("{case}: a2 receives the whole datagram"),
                    true,
                    whole,
                    format!("{} datagram(s)", datagrams.len()),
                );
            } else {
                w.record(
                    C,
                    format!("{case}: any fragment reaches a2"),
                    false,
                    count > 0,
                    format!("{count} captured at offsets {seen:?}"),
                );
                w.record(
                    C,
                    format!("{case}: a2 receives a datagram"),
                    false,
                    !datagrams.is_empty(),
                    format!("{} datagram(s)", datagrams.len()),
                );
            }
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// "Passthrough": ARP, NDP (133-136; never 137), DHCP in its client shape
/// (and a server's answer), the service addresses and the subnet's DNS
/// address, both ways: never filtered by SGs or NACLs. a2 sends them: its
/// groups admit none of it and its subnet's NACL denies the service ranges.
fn passthrough(w: &mut World) {
    const C: &str = "passthrough";
    let (a1, a2, b1) = (w.a1.clone(), w.a2.clone(), w.b1.clone());

    // ARP, and the answer.
    let id = w.id();
    let marker = World::marker(id);
    let who_has = World::frames(
        &a2,
        format!(
            "{}/ARP(op=1,hwsrc='{}',psrc='{}',pdst='{}')/Raw(b'{marker}')",
            eth(&a2.mac, "ff:ff:ff:ff:ff:ff"),
            a2.mac,
            a2.v4,
            a1.v4
        ),
    );
    let at_a1 = World::tap(&a1, format!("ARP in p and b'{marker}' in raw"));
    let answer = World::tap(
        &a2,
        format!(
            "ARP in p and p[ARP].op == 2 and same(p[ARP].psrc, '{}') and same(p[ARP].pdst, '{}')",
            a1.v4, a2.v4
        ),
    );
    w.cases(
        C,
        &[who_has],
        &[
            ("a2 ARP request for a1 reaches a1", &at_a1, true),
            ("a1's ARP reply reaches a2", &answer, true),
        ],
    );
    let id = w.id();
    let marker = World::marker(id);
    let other = World::frames(
        &a2,
        format!(
            "Ether(src='{}',dst='{}',type=0x88b5)/Raw(b'{marker}')",
            a2.mac, a1.mac
        ),
    );
    let t = World::tap(&a1, format!("b'{marker}' in raw"));
    w.case(C, "a2 non-IP frame (0x88b5) to a1", other, &t, false);

    // NDP.
    let (g, gmac) = solicited(a1.v6);
    let fl = w.id();
    let ns = World::frames(
        &a2,
        format!(
            "{}/{}/ICMPv6ND_NS(tgt='{}')/ICMPv6NDOptSrcLLAddr(lladdr='{}')",
            eth(&a2.mac, &gmac),
            World::nd6(a2.ll, g, fl),
            a1.v6,
            a2.mac
        ),
    );
    let at_a1 = World::tap(&a1, World::m6(a2.ll, fl));
    let na = World::tap(
        &a2,
        format!(
            "ICMPv6ND_NA in p and same(p[ICMPv6ND_NA].tgt, '{}') and same(p[IPv6].dst, '{}')",
            a1.v6, a2.ll
        ),
    );
    w.cases(
        C,
        &[ns],
        &[
            ("a2 neighbour solicitation for a1 reaches a1", &at_a1, true),
            ("a1's neighbour advertisement reaches a2", &na, true),
        ],
    );
    let tentative = {
        let s = a1.v6.segments();
        Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0x99)
    };
    let (g, gmac) = solicited(tentative);
    let fl = w.id();
    let dad = World::frames(
        &a2,
        format!(
            "{}/{}/ICMPv6ND_NS(tgt='{tentative}')",
            eth(&a2.mac, &gmac),
            World::nd6("::", g, fl)
        ),
    );
    let t = World::tap(&a1, World::m6("::", fl));
    w.case(C, "a2 duplicate address detection from ::", dad, &t, true);
    let fl = w.id();
    let rs = World::frames(
        &a2,
        format!(
            "{}/{}/ICMPv6ND_RS()/ICMPv6NDOptSrcLLAddr(lladdr='{}')",
            eth(&a2.mac, "33:33:00:00:00:02"),
            World::nd6(a2.ll, "ff02::2", fl),
            a2.mac
        ),
    );
    let t = World::tap(&a1, World::m6(a2.ll, fl));
    w.case(C, "a2 router solicitation to ff02::2", rs, &t, true);
    let fl = w.id();
    let redirect = World::frames(
        &a2,
        format!(
            "{}/{}/ICMPv6ND_Redirect(tgt='{}',dst='{}')",
            eth(&a2.mac, &a1.mac),
            World::nd6(a2.ll, a1.v6, fl),
            a2.ll,
            b1.v6
        ),
    );
    let t = World::tap(&a1, World::m6(a2.ll, fl));
    w.case(
        C,
        "a2 ICMPv6 redirect to a1 (137, never)",
        redirect,
        &t,
        false,
    );
    let fl = w.id();
    let echo = World::frames(
        &a2,
        format!(
            "{}/{}/ICMPv6EchoRequest(id=9)",
            eth(&a2.mac, &a1.mac),
            World::ip6(a2.v6, a1.v6, fl)
        ),
    );
    let t = World::tap(&a1, World::m6(a2.v6, fl));
    w.case(
        C,
        "a2 ICMPv6 echo request to a1 (control: judged)",
        echo,
        &t,
        false,
    );

    // DHCP.
    dhcp_client(w, C, &a2);
    let router = IpAddr::V4(w.ra.v4);
    let (s, m) = w.host_udp((router, 67), (IpAddr::V4(Ipv4Addr::BROADCAST), 68));
    w.case(
        C,
        "host DHCP offer 67 -> 255.255.255.255:68 reaches a2",
        s,
        &World::tap(&a2, m),
        true,
    );
    let (s, m) = w.host_udp((router, 67), (IpAddr::V4(a2.v4), 68));
    w.case(
        C,
        "host DHCP offer 67 -> a2:68 reaches a2",
        s,
        &World::tap(&a2, m),
        true,
    );
    let rb = w.rb.mac.clone();
    let (s, m) = w.udp(&b1, IpAddr::V4(b1.v4), 68, IpAddr::V4(a2.v4), 5067, &rb);
    w.case(
        C,
        "b1:68 -> a2:5067 (control)",
        s,
        &World::tap(&a2, m),
        true,
    );
    let (s, m) = w.udp(&b1, IpAddr::V4(b1.v4), 68, IpAddr::V4(a2.v4), 67, &rb);
    w.case(
        C,
        "b1:68 -> a2:67 (an instance's client shape to an instance: judged)",
        s,
        &World::tap(&a2, m),
        false,
    );
    let (s, m) = w.udp(&a1, IpAddr::V4(a1.v4), 68, IpAddr::V4(a2.v4), 67, &a2.mac);
    w.case(
        C,
        "a1:68 -> a2:67 (delivered to an instance: judged)",
        s,
        &World::tap(&a2, m),
        false,
    );

    // The service addresses and the subnet's DNS, both ways.
    let ra = w.ra.mac.clone();
    let (dns4, dns6) = (IpAddr::V4(w.dns4), IpAddr::V6(w.dns6));
    let services: Vec<(IpAddr, u16, bool)> = vec![
        (ip(MD4), 80, true),
        (ip(TS4), 123, true),
        (ip(ADNS4), 53, true),
        (dns4, 53, true),
        (ip(NOT_SVC4), 53, false),
        (ip(MD6), 80, true),
        (ip(TS6), 123, true),
        (ip(ADNS6), 53, true),
        (dns6, 53, true),
        (ip(NOT_SVC6), 53, false),
    ];
    for &(addr, port, want) in &services {
        let src = if addr.is_ipv6() {
            IpAddr::V6(a2.v6)
        } else {
            IpAddr::V4(a2.v4)
        };
        let (s, m) = w.udp(&a2, src, 41_000, addr, port, &ra);
        let t = w.svc_tap(m);
        let what = if want {
            ""
        } else {
            " (control: not a service)"
        };
        w.case(C, &format!("a2 -> {addr}:{port}{what}"), s, &t, want);
        let tcp = port == 80;
        if tcp {
            let id = w.id();
            let (l3, m) = match (src, addr) {
                (IpAddr::V4(s), d) => (World::ip4(s, d, id), World::m4(s, id)),
                (s, d) => (World::ip6(s, d, id), World::m6(s, id)),
            };
            let syn = World::frames(
                &a2,
                format!(
                    "{}/{l3}/TCP(sport=41001,dport=80,flags='S')",
                    eth(&a2.mac, &ra)
                ),
            );
            let t = w.svc_tap(m);
            w.case(C, &format!("a2 TCP SYN -> {addr}:80"), syn, &t, true);
        }
    }
    let svc = w.svc.clone();
    for &(addr, port, want) in &services {
        let dst = if addr.is_ipv6() {
            IpAddr::V6(a2.v6)
        } else {
            IpAddr::V4(a2.v4)
        };
        let id = w.id();
        let (l3, m) = match (addr, dst) {
            (IpAddr::V4(s), d) => (World::ip4(s, d, id), World::m4(s, id)),
            (s, d) => (World::ip6(s, d, id), World::m6(s, id)),
        };
        let s = Send::Frames {
            ns: Some(svc.ns.clone()),
            iface: "eth0".into(),
            expr: format!(
                "{}/{l3}/UDP(sport={port},dport=9999)/Raw(b'{}')",
                eth(&svc.mac, &svc.host_mac),
                World::marker(id)
            ),
        };
        let what = if want {
            ""
        } else {
            " (control: not a service)"
        };
        w.case(
            C,
            &format!("{addr}:{port} -> a2:9999{what}"),
            s,
            &World::tap(&a2, m),
            want,
        );
    }
}
