//! sgfw on a real container runtime's bridges: rootful podman with netavark,
//! busybox containers from the local image `cargo xtask setup` builds.
//!
//! The scenario of docs/semantics.md, "What a decision is based on", on both
//! backends: two podman networks, each the CIDR of one subnet of the model;
//! web containers (sg-web: tcp/80 from anywhere) and a db container (sg-db:
//! tcp/5432 from sg-web); a NACL on the db subnet whose rule 90 denies web2.
//! netavark masquerades what crosses between the networks, so the db port
//! sees the gateway's address as the source: the referenced group and the
//! NACL must still be matched on the senders' own addresses. Then, under
//! `sgfw run`: a container in the model started after the apply, a restart
//! (new veth, new ifindex), a container whose very first act is to send, and
//! the db restarted — each judged from its first packet.
//!
//! The test removes its containers and networks, and the nft tables netavark
//! made when they did not exist before it.
#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed step is a failed test"
)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sgfw_tests::{TeardownOnDrop, require_root, sgfw, sgfw_bin};

/// The podman invocation this machine needs (TOOLCHAIN.md): runc, cgroupfs.
const PODMAN: &[&str] = &["--runtime", "runc", "--cgroup-manager=cgroupfs"];
const IMAGE: &str = "localhost/sgfw-busybox:1";
/// One scenario at a time: both use the host's real pins and nft tables.
static TURN: Mutex<()> = Mutex::new(());

fn podman(args: &[&str]) -> std::process::Output {
    Command::new("podman")
        .args(PODMAN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running podman {args:?}: {e}"))
}

fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Whether podman and the image are here; a skip is a failure under CI=true.
fn require_podman(test: &str) -> bool {
    if !require_root(test) {
        return false;
    }
    let ok = Command::new("podman")
        .args(["image", "exists", IMAGE])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let msg = format!("{test}: podman or {IMAGE} missing (run `cargo xtask setup`)");
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{msg} — under CI=true a skip is a failure"
        );
        eprintln!("{msg}; skipped");
    }
    ok
}

fn nft_has_table(family: &str, name: &str) -> bool {
    Command::new("nft")
        .args(["list", "table", family, name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Everything the scenario made, removed on drop however the test ends:
/// `sgfw run`, containers, networks, the tables netavark made.
struct World {
    tag: String,
    containers: Vec<String>,
    networks: Vec<String>,
    netavark_tables: Vec<(&'static str, &'static str)>,
    daemon: Option<Child>,
    dir: PathBuf,
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &d.id().to_string()])
                .status();
            let _ = d.wait();
        }
        let _ = sgfw(&["teardown"]);
        if !self.containers.is_empty() {
            let mut args = vec!["rm", "-f", "-t", "0"];
            args.extend(self.containers.iter().map(String::as_str));
            let _ = podman(&args);
        }
        for n in &self.networks {
            let _ = podman(&["network", "rm", "-f", n]);
        }
        for (family, name) in &self.netavark_tables {
            let _ = Command::new("nft")
                .args(["delete", "table", family, name])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const WEB_NET: &str = "10.72.1";
const DB_NET: &str = "10.72.2";

impl World {
    fn new(tag: &str) -> World {
        let netavark_tables = [
            ("ip", "nat"),
            ("ip", "filter"),
            ("ip6", "nat"),
            ("ip6", "filter"),
        ]
        .into_iter()
        .filter(|(f, n)| !nft_has_table(f, n))
        .collect();
        let dir = std::env::temp_dir().join(format!("sgfw-podman-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = World {
            tag: tag.into(),
            containers: Vec::new(),
            networks: Vec::new(),
            netavark_tables,
            daemon: None,
            dir,
        };
        for (net, prefix) in [("web", WEB_NET), ("db", DB_NET)] {
            let name = w.net(net);
            let _ = podman(&["network", "rm", "-f", &name]);
            podman_ok(&[
                "network",
                "create",
                "--subnet",
                &format!("{prefix}.0/24"),
                "--gateway",
                &format!("{prefix}.1"),
                &name,
            ]);
            w.networks.push(name);
        }
        w
    }

    fn net(&self, which: &str) -> String {
        format!("sgfw-{}-{which}", self.tag)
    }

    fn name(&self, c: &str) -> String {
        format!("sgfw-{}-{c}", self.tag)
    }

    /// The Linux bridge podman made for a network.
    fn bridge(&self, which: &str) -> String {
        podman_ok(&[
            "network",
            "inspect",
            &self.net(which),
            "--format",
            "{{.NetworkInterface}}",
        ])
    }

    /// Starts a container with echo servers on tcp/80, 5432 and 22; `first`
    /// runs before them, as the container's very first act.
    fn start(&mut self, c: &str, net: &str, addr: &str, mac: &str, first: &str) {
        let name = self.name(c);
        let _ = podman(&["rm", "-f", "-t", "0", &name]);
        let script = format!(
            "{first} nc -ll -p 80 -e /bin/cat & nc -ll -p 5432 -e /bin/cat & \
             nc -ll -p 22 -e /bin/cat & sleep 100000"
        );
        podman_ok(&[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            &self.net(net),
            "--ip",
            addr,
            "--mac-address",
            mac,
            "--ulimit",
            "nofile=10000:10000",
            "--ulimit",
            "nproc=10000:10000",
            IMAGE,
            "sh",
            "-c",
            &script,
        ]);
        if !self.containers.contains(&name) {
            self.containers.push(name);
        }
    }

    /// Whether `c` gets its own line echoed back from `addr:port` (a whole
    /// TCP exchange: both directions judged).
    fn tcp(&self, c: &str, addr: &str, port: u16) -> bool {
        let out = podman(&[
            "exec",
            &self.name(c),
            "sh",
            "-c",
            &format!("echo sgfw-probe | timeout 3 nc -w 2 {addr} {port}"),
        ]);
        String::from_utf8_lossy(&out.stdout).contains("sgfw-probe")
    }

    /// Sends the line `WHAT-1` from `c` to the host's listener.
    fn to_host(&self, c: &str, gw: &str, what: &str) {
        let _ = podman(&[
            "exec",
            &self.name(c),
            "sh",
            "-c",
            &format!("{} wait", burst(gw, what, 1)),
        ]);
    }

    /// Runs TCP probes `(what, from, to, port, reachable)`; a probe that
    /// should get through is retried for a moment (the daemon may be
    /// attaching a port), one that should not is tried once.
    fn expect(&self, failures: &mut Vec<String>, cases: &[(&str, &str, &String, u16, bool)]) {
        for (what, from, to, port, want) in cases {
            let got = if *want {
                eventually(|| self.tcp(from, to, *port))
            } else {
                self.tcp(from, to, *port)
            };
            if got != *want {
                failures.push(format!("{what}: got {got}, want {want}"));
            }
        }
    }

    fn model(&self) -> PathBuf {
        let (web_br, db_br) = (self.bridge("web"), self.bridge("db"));
        let inst = |id: &str, subnet: &str, addr: &str, sg: &str| {
            format!(
                r#"{{"InstanceId": "{id}", "SubnetId": "{subnet}", "PrivateIpAddress": "{addr}", "SecurityGroupIds": ["{sg}"]}}"#
            )
        };
        let model = format!(
            r#"{{
  "Subnets": [
    {{"SubnetId": "subnet-web", "CidrBlock": "{WEB_NET}.0/24", "Bridge": "{web_br}"}},
    {{"SubnetId": "subnet-db", "CidrBlock": "{DB_NET}.0/24", "Bridge": "{db_br}"}}
  ],
  "Instances": [{}, {}, {}, {}, {}, {}],
  "SecurityGroups": [
    {{"GroupId": "sg-web",
      "IpPermissions": [{{"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80, "IpRanges": [{{"CidrIp": "0.0.0.0/0"}}]}}],
      "IpPermissionsEgress": [{{"IpProtocol": "-1", "IpRanges": [{{"CidrIp": "0.0.0.0/0"}}]}}]}},
    {{"GroupId": "sg-quiet",
      "IpPermissions": [{{"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80, "IpRanges": [{{"CidrIp": "0.0.0.0/0"}}]}}]}},
    {{"GroupId": "sg-db",
      "IpPermissions": [{{"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "UserIdGroupPairs": [{{"GroupId": "sg-web"}}]}}],
      "IpPermissionsEgress": [{{"IpProtocol": "-1", "IpRanges": [{{"CidrIp": "0.0.0.0/0"}}]}}]}}
  ],
  "NetworkAcls": [
    {{"NetworkAclId": "acl-db", "IsDefault": false, "Associations": [{{"SubnetId": "subnet-db"}}],
      "Entries": [
        {{"RuleNumber": 90, "Protocol": "-1", "RuleAction": "deny", "Egress": false, "CidrBlock": "{WEB_NET}.12/32"}},
        {{"RuleNumber": 100, "Protocol": "-1", "RuleAction": "allow", "Egress": false, "CidrBlock": "0.0.0.0/0"}},
        {{"RuleNumber": 100, "Protocol": "-1", "RuleAction": "allow", "Egress": true, "CidrBlock": "0.0.0.0/0"}}
      ]}}
  ]
}}"#,
            inst("i-web1", "subnet-web", &format!("{WEB_NET}.11"), "sg-web"),
            inst("i-web2", "subnet-web", &format!("{WEB_NET}.12"), "sg-web"),
            inst("i-web3", "subnet-web", &format!("{WEB_NET}.13"), "sg-web"),
            inst("i-web4", "subnet-web", &format!("{WEB_NET}.14"), "sg-web"),
            inst("i-web5", "subnet-web", &format!("{WEB_NET}.15"), "sg-quiet"),
            inst("i-db1", "subnet-db", &format!("{DB_NET}.21"), "sg-db"),
        );
        let path = self.dir.join("vpc.json");
        std::fs::write(&path, model).unwrap();
        path
    }

    /// Starts `sgfw run` and waits until it has applied.
    fn run_daemon(&mut self, model: &std::path::Path, backend: &[&str]) {
        let log = std::fs::File::create(self.dir.join("run.log")).unwrap();
        let child = Command::new(sgfw_bin())
            .args(["run", "-f"])
            .arg(model)
            .args(backend)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            let log = std::fs::read_to_string(self.dir.join("run.log")).unwrap_or_default();
            if log.contains("applied") {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "sgfw run did not apply within 20 s:\n{}",
            std::fs::read_to_string(self.dir.join("run.log")).unwrap_or_default()
        );
    }
}

/// Retries a check that may take the daemon a moment (attaching a port);
/// true as soon as it holds.
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    // About 6 s when each try is refused at once: a restarted container's
    // listener may take that long to come up on a loaded machine.
    for _ in 0..20 {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    false
}

/// A TCP listener on the host: what containers send to their gateway
/// (busybox's nc has no UDP). Each connection's first line is kept.
struct HostTcp(std::sync::Arc<Mutex<Vec<String>>>);

const HOST_PORT: u16 = 39_999;

impl HostTcp {
    /// The one listener of this process (its thread never ends; the
    /// scenarios take turns).
    fn get() -> &'static HostTcp {
        static ONE: std::sync::OnceLock<HostTcp> = std::sync::OnceLock::new();
        ONE.get_or_init(HostTcp::bind)
    }

    fn bind() -> HostTcp {
        let l = std::net::TcpListener::bind(("0.0.0.0", HOST_PORT)).unwrap();
        let got = std::sync::Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                let mut line = String::new();
                let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(c), &mut line);
                g.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(line.trim().to_string());
            }
        });
        HostTcp(got)
    }

    /// Everything received so far (after 300 ms for the last line).
    fn drain(&self) -> Vec<String> {
        std::thread::sleep(Duration::from_millis(300));
        std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// A shell line that opens `n` connections to the host at once, each
/// sending one line.
fn burst(to: &str, what: &str, n: u32) -> String {
    let seq: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
    format!(
        "for i in {}; do echo {what}-$i | nc -w 1 {to} {HOST_PORT} & done;",
        seq.join(" ")
    )
}

/// The host ends of the containers' veths on a bridge that have no XDP
/// program (`ip -d link` prints `prog/xdp` for one that has).
fn ports_without_xdp(bridge: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "-d", "link", "show", "master", bridge])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains("prog/xdp"))
        .map(|l| l.split(':').nth(1).unwrap_or(l).trim().to_string())
        .collect()
}

/// The dataplane of a scenario: the backend, and on eBPF whether the XDP
/// pre-filter runs in front of the TC hooks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Plane {
    Nft,
    Tc,
    Xdp,
}

fn scenario(plane: Plane) {
    let _turn = TURN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let _teardown = TeardownOnDrop;
    let (tag, backend, args): (&str, &str, &[&str]) = match plane {
        Plane::Nft => ("pn", "nftables", &["--backend", "nftables"]),
        Plane::Tc => ("pe", "ebpf", &["--backend", "ebpf", "--dataplane", "tc"]),
        Plane::Xdp => (
            "px",
            "ebpf+xdp",
            &["--backend", "ebpf", "--dataplane", "xdp"],
        ),
    };
    let mut w = World::new(tag);
    let host = HostTcp::get();
    host.drain();
    let gw = format!("{WEB_NET}.1");
    let (web1, web2, web3, web4, web5, db1) = (
        format!("{WEB_NET}.11"),
        format!("{WEB_NET}.12"),
        format!("{WEB_NET}.13"),
        format!("{WEB_NET}.14"),
        format!("{WEB_NET}.15"),
        format!("{DB_NET}.21"),
    );
    w.start("web1", "web", &web1, "02:72:01:00:00:11", "");
    w.start("web2", "web", &web2, "02:72:01:00:00:12", "");
    w.start("db1", "db", &db1, "02:72:02:00:00:21", "");
    let model = w.model();
    // Before sgfw everything is open: the probes can succeed.
    assert!(
        w.tcp("db1", &web1, 22),
        "{backend}: no connectivity before sgfw"
    );
    w.to_host("web1", &gw, "control");
    assert_eq!(
        host.drain(),
        ["control-1"],
        "{backend}: the host socket gets nothing"
    );

    let mut apply = vec!["apply", "-f", model.to_str().unwrap()];
    apply.extend_from_slice(args);
    let out = sgfw(&apply);
    assert!(
        out.status.success(),
        "{backend}: apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // In XDP mode every container's port has the pre-filter, natively (the
    // lab's veths support it); re-checked once `sgfw run` follows new ports.
    let xdp_everywhere = |w: &World| {
        ["web", "db"]
            .iter()
            .flat_map(|n| ports_without_xdp(&w.bridge(n)))
            .collect::<Vec<_>>()
    };
    if plane == Plane::Xdp {
        assert_eq!(
            xdp_everywhere(&w),
            Vec::<String>::new(),
            "ports without XDP after apply"
        );
        let st = String::from_utf8_lossy(&sgfw(&["status"]).stdout).into_owned();
        assert!(st.contains("dataplane: xdp"), "sgfw status: {st}");
    }
    let mut failures = Vec::new();
    let check = |failures: &mut Vec<String>, what: &str, got: bool, want: bool| {
        if got != want {
            failures.push(format!("{what}: got {got}, want {want}"));
        }
    };
    // Across networks, through netavark's masquerade.
    w.expect(
        &mut failures,
        &[
            (
                "web1 -> db1:5432 (sg-web referenced)",
                "web1",
                &db1,
                5432,
                true,
            ),
            (
                "web2 -> db1:5432 (NACL rule 90 denies web2)",
                "web2",
                &db1,
                5432,
                false,
            ),
            ("web1 -> db1:22 (no rule)", "web1", &db1, 22, false),
            ("db1 -> web1:80 (from anywhere)", "db1", &web1, 80, true),
            ("db1 -> web1:22 (no rule)", "db1", &web1, 22, false),
        ],
    );
    // Inside a network: the referenced group is sg-web's peers only on 5432 at db.
    w.expect(
        &mut failures,
        &[
            ("web2 -> web1:5432 (no rule)", "web2", &web1, 5432, false),
            ("web2 -> web1:80", "web2", &web1, 80, true),
        ],
    );

    // A container started after the apply with nothing following ports: its
    // very first connections to the host. On eBPF its port has no hooks and is
    // fenced (nothing arrives, though sg-web lets it send anything); on
    // nftables the rules cover it by bridge name and judge it (it arrives).
    w.start(
        "web4",
        "web",
        &web4,
        "02:72:01:00:00:14",
        &burst(&gw, "web4-first", 3),
    );
    std::thread::sleep(Duration::from_millis(700));
    let got = host.drain();
    let fenced = plane != Plane::Nft;
    check(
        &mut failures,
        &format!("web4's first connections, port not attached (got {got:?}) are fenced"),
        got.is_empty(),
        fenced,
    );

    // `sgfw run` follows containers from here on; it attaches web4 at once.
    w.run_daemon(&model, args);
    check(
        &mut failures,
        "web4 -> host, judged once attached (sg-web: egress anything)",
        eventually(|| {
            w.to_host("web4", &gw, "web4-later");
            !host.drain().is_empty()
        }),
        true,
    );
    // A container of the model started after the apply.
    w.start("web3", "web", &web3, "02:72:01:00:00:13", "");
    w.expect(
        &mut failures,
        &[
            ("db1 -> web3:22, started later", "db1", &web3, 22, false),
            ("db1 -> web3:80, started later", "db1", &web3, 80, true),
            ("web3 -> db1:5432, started later", "web3", &db1, 5432, true),
        ],
    );
    // A restart: a new veth with a new ifindex.
    podman_ok(&["restart", "-t", "0", &w.name("web1")]);
    w.expect(
        &mut failures,
        &[
            ("db1 -> web1:22 after restart", "db1", &web1, 22, false),
            ("web1 -> db1:5432 after restart", "web1", &db1, 5432, true),
            ("web1 -> db1:22 after restart", "web1", &db1, 22, false),
        ],
    );
    // A container whose first act is to send what its own policy denies
    // (sg-quiet: no egress at all), as fast as it can, while `sgfw run`
    // races to attach it: not one connection may arrive, fenced or judged.
    w.start(
        "web5",
        "web",
        &web5,
        "02:72:01:00:00:15",
        &burst(&gw, "web5-first", 20),
    );
    std::thread::sleep(Duration::from_millis(700));
    let got = host.drain();
    check(
        &mut failures,
        &format!("web5's first connections (got {got:?})"),
        got.is_empty(),
        true,
    );
    w.expect(
        &mut failures,
        &[(
            "db1 -> web5:80 (sg-quiet: tcp/80 from anywhere)",
            "db1",
            &web5,
            80,
            true,
        )],
    );
    // And the db side: db1 restarted, a new port on the db bridge.
    podman_ok(&["restart", "-t", "0", &w.name("db1")]);
    w.expect(
        &mut failures,
        &[
            (
                "web1 -> db1:5432 after db1 restarted",
                "web1",
                &db1,
                5432,
                true,
            ),
            (
                "web2 -> db1:5432 after db1 restarted",
                "web2",
                &db1,
                5432,
                false,
            ),
            (
                "web3 -> db1:22 after db1 restarted",
                "web3",
                &db1,
                22,
                false,
            ),
        ],
    );

    // The ports `sgfw run` attached (new containers, restarts) got the
    // pre-filter too.
    if plane == Plane::Xdp {
        let missing = xdp_everywhere(&w);
        check(
            &mut failures,
            &format!("every port has XDP under sgfw run (missing: {missing:?})"),
            missing.is_empty(),
            true,
        );
    }
    // Stop `sgfw run`: it tears down; everything is open again.
    if let Some(mut d) = w.daemon.take() {
        let _ = Command::new("kill")
            .args(["-TERM", &d.id().to_string()])
            .status();
        let _ = d.wait();
    }
    w.expect(
        &mut failures,
        &[(
            "db1 -> web1:22 after sgfw run stopped",
            "db1",
            &web1,
            22,
            true,
        )],
    );
    check(
        &mut failures,
        "no pins after stop",
        std::path::Path::new("/sys/fs/bpf/sgfw").exists(),
        false,
    );
    check(
        &mut failures,
        "no nft table after stop",
        nft_has_table("inet", "sgfw"),
        false,
    );
    assert!(
        failures.is_empty(),
        "{backend} on podman:\n  {}\n--- sgfw run log:\n{}",
        failures.join("\n  "),
        std::fs::read_to_string(w.dir.join("run.log")).unwrap_or_default()
    );
}

#[test]
fn podman_scenario_ebpf() {
    if require_podman("podman_scenario_ebpf") {
        scenario(Plane::Tc);
    }
}

#[test]
fn podman_scenario_ebpf_xdp() {
    if require_podman("podman_scenario_ebpf_xdp") {
        scenario(Plane::Xdp);
    }
}

#[test]
fn podman_scenario_nftables() {
    if require_podman("podman_scenario_nftables") {
        scenario(Plane::Nft);
    }
}
