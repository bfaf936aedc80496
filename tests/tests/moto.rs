//! A real EC2 implementation in, a model out: moto's server on loopback,
//! driven by boto3 (`tests/moto/scenario.py`), builds a VPC with IPv4 and
//! IPv6 subnets, groups with CIDR, IPv6, referenced-group and prefix-list
//! rules, a NACL whose allow and deny entries shadow each other, and
//! instances; the describe-* output is imported with `sgfw import` and
//! every verdict of a flow matrix is compared with the same model written by
//! hand (the reference evaluator on both), then a few through `sgfw explain`.
//! Needs no root; needs Python with moto and boto3 (`cargo xtask test`
//! installs them into `~/.cache/sgfw/venv`; under CI=true their absence is a
//! failure).
#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed step is a failed test"
)]

use std::net::{IpAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sgfw::eval::explain_new_flow;
use sgfw::flat::FlatModel;
use sgfw::packet::{Packet, TcpFlags};

/// The interpreter the test drives ([`sgfw_tests::python_with`]).
fn python() -> Option<PathBuf> {
    sgfw_tests::python_with("moto.server, boto3", "moto")
}

/// A directory of its own under the temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("sgfw-moto-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// moto's server on a free loopback port, killed on drop.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Moto {
    fn start(python: &Path) -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(python)
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(30), "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn scenario(python: &Path, moto: &Moto, out: &Path, args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("moto/scenario.py");
    let o = Command::new(python)
        .arg(script)
        .arg(&moto.endpoint)
        .arg(out)
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "scenario {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// moto running, the scenario created in it and dumped into a fresh
/// directory, and the ids it made.
fn created(py: &Path) -> (Moto, TempDir, Value) {
    let moto = Moto::start(py);
    let dir = TempDir::new();
    scenario(py, &moto, dir.path(), &["create"]);
    let ids = serde_json::from_str(&std::fs::read_to_string(dir.path().join("ids.json")).unwrap())
        .unwrap();
    (moto, dir, ids)
}

/// `--vpc` and a `--bridge` per subnet, as the import needs them.
fn placement(ids: &Value) -> Vec<String> {
    vec![
        "--vpc".into(),
        ids["vpc"].as_str().unwrap().into(),
        "--bridge".into(),
        format!("{}=br-a", ids["subnet_a"].as_str().unwrap()),
        "--bridge".into(),
        format!("{}=br-b", ids["subnet_b"].as_str().unwrap()),
    ]
}

/// The same VPC, written by hand in the model format: what the scenario
/// created, as EC2 (moto) keeps it — a new group's default egress rule
/// allows all IPv4 and (the VPC has an IPv6 block) all IPv6; the default
/// NACL's IPv6 entries are the ones the scenario adds (moto has none).
fn hand_model(ids: &Value) -> String {
    let id = |k: &str| ids[k].as_str().unwrap().to_string();
    let v6 = |k: &str| ids[k].as_str().unwrap().to_string();
    format!(
        r#"{{
  "Subnets": [
    {{"SubnetId": "{sa}", "CidrBlock": "10.30.1.0/24", "Ipv6CidrBlock": "{v6a}", "Bridge": "br-a", "DnsAddress": "10.30.0.2"}},
    {{"SubnetId": "{sb}", "CidrBlock": "10.30.2.0/24", "Ipv6CidrBlock": "{v6b}", "Bridge": "br-b", "DnsAddress": "10.30.0.2"}}
  ],
  "Instances": [
    {{"InstanceId": "{web1}", "SubnetId": "{sa}", "PrivateIpAddress": "10.30.1.10", "Ipv6Addresses": ["{web1_v6}"], "SecurityGroupIds": ["{web}"]}},
    {{"InstanceId": "{web2}", "SubnetId": "{sa}", "PrivateIpAddress": "10.30.1.11", "SecurityGroupIds": ["{web}"]}},
    {{"InstanceId": "{db1}", "SubnetId": "{sb}", "PrivateIpAddress": "10.30.2.20", "Ipv6Addresses": ["{db1_v6}"], "SecurityGroupIds": ["{db}"]}}
  ],
  "SecurityGroups": [
    {{"GroupId": "{web}",
     "IpPermissions": [
       {{"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{{"CidrIp": "0.0.0.0/0"}}], "Ipv6Ranges": [{{"CidrIpv6": "::/0"}}]}},
       {{"IpProtocol": "icmp", "FromPort": 8, "ToPort": -1, "IpRanges": [{{"CidrIp": "10.30.0.0/16"}}]}}],
     "IpPermissionsEgress": [{{"IpProtocol": "-1", "IpRanges": [{{"CidrIp": "0.0.0.0/0"}}], "Ipv6Ranges": [{{"CidrIpv6": "::/0"}}]}}]}},
    {{"GroupId": "{db}",
     "IpPermissions": [
       {{"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "UserIdGroupPairs": [{{"GroupId": "{web}"}}]}},
       {{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "PrefixListIds": [{{"PrefixListId": "{pl}"}}]}}],
     "IpPermissionsEgress": [{{"IpProtocol": "-1", "IpRanges": [{{"CidrIp": "0.0.0.0/0"}}], "Ipv6Ranges": [{{"CidrIpv6": "::/0"}}]}}]}}
  ],
  "NetworkAcls": [
    {{"NetworkAclId": "{acl}", "Associations": [{{"SubnetId": "{sb}"}}], "Entries": [
      {{"RuleNumber": 90, "Protocol": "-1", "RuleAction": "deny", "Egress": false, "CidrBlock": "10.30.1.11/32"}},
      {{"RuleNumber": 100, "Protocol": "-1", "RuleAction": "allow", "Egress": false, "CidrBlock": "0.0.0.0/0"}},
      {{"RuleNumber": 110, "Protocol": "6", "RuleAction": "deny", "Egress": false, "CidrBlock": "0.0.0.0/0", "PortRange": {{"From": 5432, "To": 5432}}}},
      {{"RuleNumber": 101, "Protocol": "-1", "RuleAction": "allow", "Egress": false, "Ipv6CidrBlock": "::/0"}},
      {{"RuleNumber": 100, "Protocol": "-1", "RuleAction": "allow", "Egress": true, "CidrBlock": "0.0.0.0/0"}},
      {{"RuleNumber": 101, "Protocol": "-1", "RuleAction": "allow", "Egress": true, "Ipv6CidrBlock": "::/0"}}]}},
    {{"NetworkAclId": "acl-default", "IsDefault": true, "Associations": [{{"SubnetId": "{sa}"}}], "Entries": [
      {{"RuleNumber": 100, "Protocol": "-1", "RuleAction": "allow", "Egress": false, "CidrBlock": "0.0.0.0/0"}},
      {{"RuleNumber": 100, "Protocol": "-1", "RuleAction": "allow", "Egress": true, "CidrBlock": "0.0.0.0/0"}},
      {{"RuleNumber": 101, "Protocol": "-1", "RuleAction": "allow", "Egress": false, "Ipv6CidrBlock": "::/0"}},
      {{"RuleNumber": 101, "Protocol": "-1", "RuleAction": "allow", "Egress": true, "Ipv6CidrBlock": "::/0"}}]}}
  ],
  "PrefixLists": [{{"PrefixListId": "{pl}", "Entries": [{{"Cidr": "198.51.100.0/24"}}]}}]
}}"#,
        sa = id("subnet_a"),
        sb = id("subnet_b"),
        v6a = v6("v6_a"),
        v6b = v6("v6_b"),
        web1 = id("web1"),
        web2 = id("web2"),
        db1 = id("db1"),
        web1_v6 = v6("web1_v6"),
        db1_v6 = v6("db1_v6"),
        web = id("web"),
        db = id("db"),
        pl = id("pl"),
        acl = id("acl"),
    )
}

fn flat_of(text: &str) -> FlatModel {
    let m = sgfw::model::Model::from_json(text).unwrap();
    let (v, _) = sgfw::validate::validate(&m).unwrap_or_else(|e| panic!("invalid:\n{e}"));
    v.flatten()
}

fn import(dir: &Path, ids: &Value) -> PathBuf {
    let mut args: Vec<String> = vec!["import".into()];
    for f in [
        "vpcs",
        "subnets",
        "instances",
        "security-groups",
        "network-acls",
        "prefix-lists",
    ] {
        args.push(dir.join(format!("{f}.json")).display().to_string());
    }
    let pl = ids["pl"].as_str().unwrap();
    args.push(dir.join(format!("entries-{pl}.json")).display().to_string());
    let out = dir.join("imported.json");
    args.extend(placement(ids));
    args.extend(["-o".into(), out.display().to_string()]);
    let o = sgfw_tests::sgfw(&args);
    assert!(
        o.status.success(),
        "sgfw import: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// (allowed, deciding stage, why blocked) of a new flow.
fn verdict(m: &FlatModel, p: &Packet) -> (bool, Option<String>, Option<String>) {
    let v = explain_new_flow(m, p);
    let decider = if v.allowed {
        None
    } else {
        v.stages.last().map(|s| s.stage.to_string())
    };
    (v.allowed, decider, v.blocked.map(|b| b.name().to_string()))
}

fn packets(ids: &Value) -> Vec<Packet> {
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let v4 = [
        "10.30.1.10",
        "10.30.1.11",
        "10.30.2.20",
        "198.51.100.7",
        "203.0.113.9",
    ];
    let v6 = [
        ids["web1_v6"].as_str().unwrap(),
        ids["db1_v6"].as_str().unwrap(),
        "2001:db8::9",
    ];
    let mut out = Vec::new();
    for family in [&v4[..], &v6[..]] {
        for s in family {
            for d in family {
                if s == d {
                    continue;
                }
                for port in [22u16, 80, 443, 5432] {
                    out.push(Packet::tcp(ip(s), ip(d), 40000, port, TcpFlags::SYN));
                }
                out.push(Packet::udp(ip(s), ip(d), 40000, 53));
                if family.len() == v4.len() {
                    out.push(Packet::icmp(ip(s), ip(d), 8, 0, 7));
                }
            }
        }
    }
    out
}

#[test]
fn moto_describe_output_imports_to_the_model_written_by_hand() {
    let Some(py) = python() else { return };
    let (_moto, dir, ids) = created(&py);
    let imported_path = import(dir.path(), &ids);
    let imported = flat_of(&std::fs::read_to_string(&imported_path).unwrap());
    let hand_text = hand_model(&ids);
    let hand = flat_of(&hand_text);

    // The statements the scenario was built to show (docs/semantics.md).
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let syn = |s: &str, d: &str, p: u16| Packet::tcp(ip(s), ip(d), 40000, p, TcpFlags::SYN);
    let expect = [
        (
            syn("10.30.1.10", "10.30.2.20", 5432),
            true,
            "referenced group; rule 110 shadowed by 100",
        ),
        (
            syn("10.30.1.11", "10.30.2.20", 5432),
            false,
            "NACL rule 90 denies web2 first",
        ),
        (
            syn("198.51.100.7", "10.30.2.20", 22),
            true,
            "prefix-list rule",
        ),
        (
            syn("203.0.113.9", "10.30.2.20", 22),
            false,
            "outside the prefix list",
        ),
        (syn("203.0.113.9", "10.30.1.10", 443), true, "CIDR rule"),
        (
            syn("2001:db8::9", ids["web1_v6"].as_str().unwrap(), 443),
            true,
            "IPv6 range",
        ),
        (syn("203.0.113.9", "10.30.1.10", 80), false, "no rule"),
        (
            syn(
                ids["web1_v6"].as_str().unwrap(),
                ids["db1_v6"].as_str().unwrap(),
                5432,
            ),
            true,
            "referenced group, IPv6 member address",
        ),
    ];
    for (p, allowed, why) in &expect {
        assert_eq!(
            explain_new_flow(&hand, p).allowed,
            *allowed,
            "hand model: {p:?} ({why})"
        );
    }

    let mut compared = 0;
    let mut differ = Vec::new();
    for p in packets(&ids) {
        let (a, b) = (verdict(&imported, &p), verdict(&hand, &p));
        if a != b {
            differ.push(format!("{p:?}: imported {a:?}, by hand {b:?}"));
        }
        compared += 1;
    }
    assert!(compared >= 150, "{compared} flows");
    assert!(
        differ.is_empty(),
        "{} of {compared} differ:\n{}",
        differ.len(),
        differ.join("\n")
    );

    // The same through the command, as an operator would ask.
    let hand_path = dir.path().join("hand.json");
    std::fs::write(&hand_path, &hand_text).unwrap();
    for (s, d, port) in [
        ("10.30.1.10", "10.30.2.20", "5432"),
        ("10.30.1.11", "10.30.2.20", "5432"),
    ] {
        let ask = |m: &Path| {
            let o = sgfw_tests::sgfw(&[
                "explain",
                "-f",
                &m.display().to_string(),
                "--src",
                s,
                "--dst",
                d,
                "--proto",
                "tcp",
                "--dport",
                port,
                "--json",
            ]);
            let v: Value = serde_json::from_slice(&o.stdout).unwrap();
            let stages: Vec<(Value, Value)> = v["stages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| (s["stage"].clone(), s["verdict"].clone()))
                .collect();
            (v["verdict"].clone(), v["explanation_code"].clone(), stages)
        };
        let (imported, by_hand) = (ask(&imported_path), ask(&hand_path));
        assert_eq!(imported, by_hand, "{s} -> {d}:{port}");
        assert!(imported.0.is_string(), "{imported:?}");
        // web1 is let in by the referenced group; web2 is stopped by rule 90.
        let want = if s == "10.30.1.10" { "allow" } else { "deny" };
        assert_eq!(imported.0, want, "{s} -> {d}:{port}");
        if want == "deny" {
            assert_eq!(imported.1, "SUBNET_ACL_RESTRICTION");
        }
    }

    // A describe-instances document is read as what it is, never as an
    // empty model: alone it is refused with the missing subnet named.
    let o = sgfw_tests::sgfw(&[
        "validate",
        "-f",
        &dir.path().join("instances.json").display().to_string(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(ids["subnet_a"].as_str().unwrap()), "{err}");
}

#[test]
fn what_cannot_be_expressed_is_refused_by_name() {
    let Some(py) = python() else { return };
    let (_moto, dir, ids) = created(&py);
    // An instance that routes for others (source/dest check off).
    let path = dir.path().join("instances.json");
    let mut doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for r in doc["Reservations"].as_array_mut().unwrap() {
        for i in r["Instances"].as_array_mut().unwrap() {
            if i["InstanceId"] == ids["web2"] {
                i["NetworkInterfaces"][0]["SourceDestCheck"] = Value::Bool(false);
            }
        }
    }
    std::fs::write(&path, doc.to_string()).unwrap();
    let mut args = vec![
        "import".to_string(),
        dir.path().join("subnets.json").display().to_string(),
        path.display().to_string(),
    ];
    args.extend(placement(&ids));
    let o = sgfw_tests::sgfw(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("SourceDestCheck") && err.contains("false"),
        "{err}"
    );
    assert!(o.stdout.is_empty(), "nothing written");
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {secs}s waiting for: {what}");
}

/// The live source on both backends: `sgfw run --ec2-endpoint` follows a
/// VPC built in moto for the lab's addresses; an AuthorizeSecurityGroupIngress
/// through boto3 opens a port within seconds, the RevokeSecurityGroupIngress
/// closes it again, and an endpoint that goes away leaves the policy in
/// force (neither opened nor emptied).
#[test]
fn a_live_endpoint_is_followed_authorize_and_revoke_take_effect() {
    if !sgfw_tests::require_root("moto_live") {
        return;
    }
    let Some(py) = python() else { return };
    for backend in ["ebpf", "nftables"] {
        live(&py, backend);
    }
}

fn live(py: &Path, backend: &str) {
    use sgfw_tests::testbed::{InstanceSpec, SubnetSpec, TestBed};
    let spec = |name: &str| SubnetSpec {
        name: name.into(),
        ipv6: false,
    };
    let inst = |name: &str, subnet| InstanceSpec {
        name: name.into(),
        subnet,
    };
    let mut bed =
        TestBed::new(&[spec("a"), spec("b")], &[inst("web1", 0), inst("db1", 1)]).unwrap();
    bed.serve("db1", &[5432, 8080], &[]).unwrap();
    let (a, b) = (bed.subnets[0].clone(), bed.subnets[1].clone());
    let (web1, db1) = (bed.instance("web1").v4, bed.instance("db1").v4);
    let vpc_cidr = format!(
        "{}/16",
        a.cidr_v4.split('.').take(2).collect::<Vec<_>>().join(".") + ".0.0"
    );

    let moto = Moto::start(py);
    let dir = TempDir::new();
    scenario(
        py,
        &moto,
        dir.path(),
        &[
            "create-live",
            &vpc_cidr,
            &a.cidr_v4,
            &b.cidr_v4,
            &web1.to_string(),
            &db1.to_string(),
        ],
    );
    let ids: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("ids.json")).unwrap())
            .unwrap();
    let id = |k: &str| ids[k].as_str().unwrap().to_string();

    let _guard = sgfw_tests::TeardownOnDrop;
    let mut daemon = Command::new(sgfw_tests::sgfw_bin())
        .args([
            "run",
            "--ec2-endpoint",
            &moto.endpoint,
            "--vpc",
            &id("vpc"),
            "--bridge",
            &format!("{}={}", id("subnet_a"), a.bridge),
            "--bridge",
            &format!("{}={}", id("subnet_b"), b.bridge),
            "--backend",
            backend,
            "--poll-interval",
            "0.5",
        ])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(dir.path().join("run.log")).unwrap())
        .spawn()
        .unwrap();
    let db1 = IpAddr::V4(db1);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // Enforced once the daemon's first apply is in: 8080 denied (db's
        // group has no rule for it), 5432 allowed (the referenced group).
        wait_for(&format!("{backend}: the first apply"), 20, || {
            assert!(
                daemon.try_wait().unwrap().is_none(),
                "{backend}: daemon exited"
            );
            !bed.tcp("web1", db1, 8080)
        });
        assert!(
            bed.tcp("web1", db1, 5432),
            "{backend}: web1 -> db1:5432 (referenced group)"
        );
        scenario(py, &moto, dir.path(), &["authorize", &id("db"), "8080"]);
        wait_for(
            &format!("{backend}: 8080 after AuthorizeSecurityGroupIngress"),
            15,
            || bed.tcp("web1", db1, 8080),
        );
        scenario(py, &moto, dir.path(), &["revoke", &id("db"), "8080"]);
        wait_for(
            &format!("{backend}: 8080 closed after RevokeSecurityGroupIngress"),
            15,
            || !bed.tcp("web1", db1, 8080),
        );
        assert!(bed.tcp("web1", db1, 5432), "{backend}: 5432 stays open");
        assert!(
            daemon.try_wait().unwrap().is_none(),
            "{backend}: daemon exited"
        );
    }));
    // The endpoint goes away: polls fail, the policy in force stays.
    drop(moto);
    let after = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if result.is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(1500));
        assert!(
            bed.tcp("web1", db1, 5432),
            "{backend}: endpoint gone, allowed flow must stay"
        );
        assert!(
            !bed.tcp("web1", db1, 8080),
            "{backend}: endpoint gone, denied flow must stay denied"
        );
        assert!(
            daemon.try_wait().unwrap().is_none(),
            "{backend}: the daemon must survive a failing endpoint"
        );
    }));
    // SIGTERM: the daemon tears down and exits 0.
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = daemon.try_wait().unwrap() {
            break Some(s);
        }
        if t.elapsed() > Duration::from_secs(10) {
            let _ = daemon.kill();
            let _ = daemon.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for r in [result, after] {
        if let Err(e) = r {
            let log = std::fs::read_to_string(dir.path().join("run.log")).unwrap_or_default();
            eprintln!("sgfw run's log:\n{log}");
            std::panic::resume_unwind(e);
        }
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "{backend}: exit {status:?}"
    );
}
