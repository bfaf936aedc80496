//! The `sgfw` command as an operator uses it: apply, status, flows,
//! teardown, the `run` daemon (model edits, instances started later), bad
//! input, and the demo on both backends. These use sgfw's real pin paths and
//! nft table, so they take turns.
#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code: a failed step is a failed test"
)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sgfw::model::IpPermission;
use sgfw_tests::scenario::{Backend, Lab, all_anywhere, sg};
use sgfw_tests::testbed::InstanceSpec;

static TURN: Mutex<()> = Mutex::new(());

use sgfw_tests::{sgfw, sgfw_bin as bin};

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn write_model(lab: &Lab, m: &sgfw::model::Model) -> PathBuf {
    let tag = lab.bed.instances[0].netns.clone();
    let path = std::env::temp_dir().join(format!("{tag}.json"));
    std::fs::write(&path, m.to_json().unwrap()).unwrap();
    path
}

#[test]
fn apply_status_flows_teardown() {
    if !sgfw_tests::require_root("cli_apply") {
        return;
    }
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new(Backend::Ebpf, &["a", "b"], &[("client", 0), ("web", 1)]);
    let model = lab.model(
        &[("client", &["sg-client"]), ("web", &["sg-web"])],
        vec![
            sg("sg-client", vec![], vec![all_anywhere()]),
            sg(
                "sg-web",
                vec![IpPermission::tcp(80, 80).from_cidr("0.0.0.0/0")],
                vec![all_anywhere()],
            ),
        ],
        vec![],
    );
    let file = write_model(&lab, &model);
    let _guard = sgfw_tests::TeardownOnDrop;
    lab.serve("web", &[80, 81], &[]);
    // First on nftables, then switched to eBPF: one backend at a time.
    let o = sgfw(&[
        "apply",
        "-f",
        file.to_str().unwrap(),
        "--backend",
        "nftables",
    ]);
    assert!(o.status.success(), "nft apply failed: {}", text(&o));
    let o = sgfw(&["apply", "-f", file.to_str().unwrap(), "--backend", "ebpf"]);
    assert!(o.status.success(), "apply failed: {}", text(&o));
    let tables = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    // The nftables backend's tables go; the eBPF backend's own bridge fence
    // (`table bridge sgfw_fence`) is what stays.
    let listed = String::from_utf8_lossy(&tables.stdout).into_owned();
    assert!(
        !listed
            .lines()
            .any(|l| l.trim() == "table inet sgfw" || l.trim() == "table bridge sgfw"),
        "switching to eBPF must remove the nft ruleset: {listed}"
    );
    assert!(
        listed
            .lines()
            .any(|l| l.trim() == "table bridge sgfw_fence"),
        "the eBPF backend's fence is missing: {listed}"
    );
    assert!(Path::new("/sys/fs/bpf/sgfw/maps/SGFW_CONFIG").exists());
    let web = lab.addr("web", false);
    assert!(lab.bed.tcp("client", web, 80), "allowed probe after apply");

    // A REJECT line for a blocked probe.
    let mut flows: Child = Command::new(bin())
        .args(["flows", "--json", "--timeout", "3"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!lab.bed.tcp("client", web, 81), "port 81 must be blocked");
    // Other drops may show up too (the host's IGMP and MLD traffic to bound
    // ports): find the probe's line.
    let lines: Vec<String> = BufReader::new(flows.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .collect();
    let _ = flows.wait();
    let needle = format!("\"dstaddr\":\"{web}\"");
    let line = lines
        .iter()
        .find(|l| l.contains(&needle))
        .unwrap_or_else(|| panic!("no flow line for the blocked probe in {lines:?}"))
        .clone();
    let rec: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(rec["action"], "REJECT", "{line}");
    assert_eq!(rec["stage"], "sg-ingress", "{line}");
    assert_eq!(rec["interface_id"], "i-web", "{line}");
    assert_eq!(rec["dstport"], 81, "{line}");
    assert_eq!(rec["dstaddr"], web.to_string(), "{line}");

    let o = sgfw(&["status", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["backend"], "ebpf");
    let web_st = st["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "i-web")
        .unwrap()
        .clone();
    assert!(
        web_st["counters"]["drop:sg-ingress"].as_u64().unwrap() >= 1,
        "{web_st}"
    );
    assert!(
        web_st["counters"]["allow:sg-ingress"].as_u64().unwrap() >= 1,
        "{web_st}"
    );
    assert_eq!(st["subnets"].as_array().unwrap().len(), 2);

    let o = sgfw(&["teardown"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!Path::new("/sys/fs/bpf/sgfw").exists(), "pins left behind");
    assert!(
        lab.bed.tcp("client", web, 81),
        "nothing enforces after teardown"
    );
    let _ = std::fs::remove_file(file);
}

#[test]
fn bad_model_is_rejected_whole_and_changes_nothing() {
    if !sgfw_tests::require_root("cli_bad_input") {
        return;
    }
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let path = std::env::temp_dir().join(format!("sgfw-bad-{}.json", std::process::id()));
    std::fs::write(
        &path,
        r#"{"Subnets":[{"SubnetId":"subnet-a","CidrBlock":"10.9.0.0/16","Bridge":"brx"}],
            "Instances":[{"InstanceId":"i-a","SubnetId":"subnet-a","PrivateIpAddress":"10.9.0.5","SecurityGroupIds":["sg-a"]}],
            "SecurityGroups":[{"GroupId":"sg-a","IpPermissions":[{"IpProtocol":"tcp","FromPort":80,"ToPort":80,
              "IpRanges":[{"CidrIp":"10.0.0.300/24"}]}]}]}"#,
    )
    .unwrap();
    let o = sgfw(&["apply", "-f", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains(r#"SecurityGroups[sg-a].IpPermissions[0].IpRanges[0].CidrIp: "10.0.0.300/24""#),
        "{t}"
    );
    assert!(
        !Path::new("/sys/fs/bpf/sgfw").exists(),
        "a rejected model must change nothing"
    );
    let _ = std::fs::remove_file(path);
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

#[test]
fn run_follows_model_edits_and_new_instances() {
    if !sgfw_tests::require_root("cli_run") {
        return;
    }
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new(Backend::Ebpf, &["a"], &[("x", 0), ("y", 0)]);
    // z is in the model from the start but only starts (gets its port) later.
    let z_name = {
        // The lab names ports by position: z will be the third instance.
        let y = lab.bed.instance("y").port.clone();
        format!("{}2", &y[..y.len() - 1])
    };
    let make = |y_open: bool| {
        let mut m = lab.model(
            &[("x", &["sg-x"]), ("y", &["sg-y"])],
            vec![
                sg("sg-x", vec![], vec![all_anywhere()]),
                sg(
                    "sg-y",
                    if y_open {
                        vec![IpPermission::tcp(80, 80).from_cidr("0.0.0.0/0")]
                    } else {
                        vec![]
                    },
                    vec![all_anywhere()],
                ),
            ],
            vec![],
        );
        let s = &lab.bed.subnets[0];
        let z_v4 = {
            let o = lab.bed.instance("x").v4.octets();
            std::net::Ipv4Addr::new(o[0], o[1], o[2], 12)
        };
        m.instances.push(sgfw::model::Instance {
            instance_id: "i-z".into(),
            subnet_id: format!("subnet-{}", s.name),
            private_ip_address: z_v4.to_string(),
            security_group_ids: vec!["sg-y".into()],
            interface: Some(z_name.clone()),
            ..Default::default()
        });
        m
    };
    let (closed, open) = (make(false), make(true));
    let file = write_model(&lab, &closed);
    let _guard = sgfw_tests::TeardownOnDrop;
    lab.serve("y", &[80], &[]);
    let y = lab.addr("y", false);
    let mut daemon = Command::new(bin())
        .args(["run", "-f", file.to_str().unwrap(), "--backend", "ebpf"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the daemon's first apply", 10, || {
        Path::new("/sys/fs/bpf/sgfw/maps/SGFW_CONFIG").exists()
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !lab.bed.tcp("x", y, 80),
        "closed model must block x -> y:80"
    );

    // A model edit is picked up without restart.
    std::fs::write(&file, open.to_json().unwrap()).unwrap();
    wait_for("the edited model to be enforced", 10, || {
        lab.bed.tcp("x", y, 80)
    });

    // A broken edit is reported and the running policy stays.
    std::fs::write(&file, "{ not json").unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    assert!(
        lab.bed.tcp("x", y, 80),
        "a bad edit must leave the running policy"
    );
    std::fs::write(&file, open.to_json().unwrap()).unwrap();

    // An instance started later is attached and enforced.
    let z = lab
        .bed
        .add_instance(&InstanceSpec {
            name: "z".into(),
            subnet: 0,
        })
        .unwrap();
    assert_eq!(z.port, z_name);
    lab.bed.serve("z", &[80, 81], &[]).unwrap();
    let z_addr = std::net::IpAddr::V4(z.v4);
    wait_for("the new port to be attached", 10, || {
        Path::new("/sys/fs/bpf/sgfw/links")
            .read_dir()
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(&z_name))
            })
            .unwrap_or(false)
    });
    std::thread::sleep(Duration::from_millis(600));
    assert!(lab.bed.tcp("x", z_addr, 80), "z admits 80");
    assert!(
        !lab.bed.tcp("x", z_addr, 81),
        "z's port must enforce its SG (81 closed)"
    );

    // SIGTERM: the daemon tears down.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let st = daemon.wait().unwrap();
    assert!(st.success(), "daemon exit: {st}");
    assert!(
        !Path::new("/sys/fs/bpf/sgfw").exists(),
        "run must tear down on SIGTERM"
    );
    let _ = std::fs::remove_file(file);
}

#[test]
fn demo_matches_on_both_backends() {
    if !sgfw_tests::require_root("cli_demo") {
        return;
    }
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    for backend in ["ebpf", "nftables"] {
        let o = sgfw(&["demo", "--backend", backend]);
        let t = text(&o);
        assert!(o.status.success(), "demo on {backend} failed:\n{t}");
        assert!(t.contains("15 of 15 rows match"), "{t}");
        assert!(!t.contains("MISMATCH"), "{t}");
    }
    assert!(!Path::new("/sys/fs/bpf/sgfw").exists());
    let tables = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains("sgfw"),
        "demo left its nft table"
    );
}
