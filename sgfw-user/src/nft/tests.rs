//! Unprivileged tests: a fake host records every `nft` run and sysctl access.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::*;
use crate::flat::OwnershipError;
use crate::model::Model;
use crate::sys::Port;
use crate::validate::validate;

/// Records `nft` calls; answers from a script; sysctls in a map.
#[derive(Default)]
struct FakeHost {
    calls: RefCell<Vec<(Vec<String>, Option<String>)>>,
    /// stderr to fail `nft` with, when the args start with this word.
    fail: RefCell<BTreeMap<String, String>>,
    /// stdout per whole argument list (space-joined), else per first arg.
    stdout: BTreeMap<String, String>,
    sysctls: RefCell<BTreeMap<String, String>>,
    sysctl_read_only: bool,
    no_nft: bool,
}

impl FakeHost {
    fn with_bridge_nf(v4: &str, v6: &str) -> FakeHost {
        let h = FakeHost::default();
        h.sysctls
            .borrow_mut()
            .insert(SYSCTL_CALL_IPTABLES.into(), v4.into());
        h.sysctls
            .borrow_mut()
            .insert(SYSCTL_CALL_IP6TABLES.into(), v6.into());
        h
    }
    fn fail_when(&self, first_arg: &str, stderr: &str) {
        self.fail
            .borrow_mut()
            .insert(first_arg.into(), stderr.into());
    }
    fn nft_calls(&self) -> Vec<(Vec<String>, Option<String>)> {
        self.calls.borrow().clone()
    }
}

impl Host for FakeHost {
    fn bridge_ports(&self, _bridge: &str) -> Result<Vec<Port>, SysError> {
        Ok(Vec::new())
    }
    fn ifindex(&self, _name: &str) -> Result<Option<u32>, SysError> {
        Ok(None)
    }
    fn nft(&self, args: &[&str], stdin: Option<&str>) -> Result<String, SysError> {
        if self.no_nft {
            return Err(SysError::Spawn {
                program: "nft".into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        self.calls.borrow_mut().push((
            args.iter().map(ToString::to_string).collect(),
            stdin.map(ToString::to_string),
        ));
        let first = args.first().copied().unwrap_or_default();
        if let Some(stderr) = self.fail.borrow().get(first) {
            return Err(SysError::Command {
                program: format!("nft {}", args.join(" ")),
                stderr: stderr.clone(),
            });
        }
        Ok(self
            .stdout
            .get(&args.join(" "))
            .or_else(|| self.stdout.get(first))
            .cloned()
            .unwrap_or_default())
    }
    fn read_sysctl(&self, key: &str) -> Result<Option<String>, SysError> {
        Ok(self.sysctls.borrow().get(key).cloned())
    }
    fn write_sysctl(&self, key: &str, value: &str) -> Result<(), SysError> {
        if self.sysctl_read_only {
            return Err(SysError::File {
                what: "writing",
                path: Path::new("/proc/sys").join(key),
                source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            });
        }
        self.sysctls.borrow_mut().insert(key.into(), value.into());
        Ok(())
    }
}

fn flat(json: &str) -> FlatModel {
    let model = Model::from_json(json).unwrap();
    let (valid, _) = validate(&model).unwrap_or_else(|e| panic!("model invalid:\n{e}"));
    valid.flatten()
}

fn fixture() -> FlatModel {
    flat(crate::testutil::FIXTURE)
}

/// The body of one chain (lines between `chain NAME {` and its `}`).
fn chain<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    let head = format!("\tchain {name} {{");
    let mut lines = text.lines().skip_while(|l| *l != head);
    assert!(lines.next().is_some(), "chain {name} missing");
    lines.take_while(|l| *l != "\t}").map(str::trim).collect()
}

// ---------- rendering ----------

#[test]
fn render_is_deterministic() {
    let m = fixture();
    assert_eq!(render(&m).unwrap(), render(&m.clone()).unwrap());
}

#[test]
fn hostile_interface_names_are_refused_not_written() {
    // `*` would be a wildcard in nft: it must never stand for other ports.
    for p in PAYLOADS.iter().chain(&["*", " x", "\t"]) {
        let mut m = fixture();
        m.instances[0].interface = Some(format!("veth{p}"));
        match render(&m) {
            Err(RenderError::Interface { name, .. }) => assert_eq!(name, format!("veth{p}")),
            other => panic!("{p:?}: expected an Interface error, got {other:?}"),
        }
        let mut m = fixture();
        m.subnets[1].bridge = format!("br{p}");
        match render(&m) {
            Err(RenderError::Bridge { name, .. }) => assert_eq!(name, format!("br{p}")),
            other => panic!("{p:?}: expected a Bridge error, got {other:?}"),
        }
        match render_with_ports(&fixture(), &["ok0".into(), format!("port{p}")]) {
            Err(RenderError::Port { name }) => assert_eq!(name, format!("port{p}")),
            other => panic!("{p:?}: expected a Port error, got {other:?}"),
        }
    }
    assert!(!ifname_ok(&"x".repeat(16)));
    assert!(ifname_ok("veth-a.1@x+y_z"));
}

#[test]
fn render_is_sgfws_two_tables_only() {
    let text = render(&fixture()).unwrap();
    let tables: Vec<&str> = text.lines().filter(|l| l.starts_with("table")).collect();
    assert_eq!(tables, ["table inet sgfw {", "table bridge sgfw {"]);
    assert!(!text.contains("flush ruleset"));
    assert_eq!(text.lines().last(), Some("}"));
}

/// The chain the verdict map `map` sends `addr` to.
fn vmap_target(text: &str, map: &str, addr: &str) -> String {
    let head = format!("\tmap {map} {{");
    let prefix = format!("{addr} : goto ");
    text.lines()
        .skip_while(|l| *l != head)
        .take_while(|l| *l != "\t}")
        .find_map(|l| {
            l.trim()
                .trim_end_matches(',')
                .strip_prefix(&prefix)
                .map(String::from)
        })
        .unwrap_or_else(|| panic!("{addr} not in {map}"))
}

#[test]
fn list_chains_try_their_groups_count_the_drop_and_end_in_drop() {
    let m = fixture();
    let text = render(&m).unwrap();
    let mut seen = 0;
    for (kind, dir, side) in [
        ("sg_out", "grp_out_", "saddr"),
        ("sg_in", "grp_in_", "daddr"),
    ] {
        for head in text
            .lines()
            .filter(|l| l.starts_with(&format!("\tchain {kind}_l")))
        {
            let name = head
                .trim()
                .trim_start_matches("chain ")
                .trim_end_matches(" {");
            let body = chain(&text, name);
            let n = body.len();
            assert!(body[0].starts_with('#'), "{body:?}");
            for l in &body[1..n - 3] {
                assert!(l.starts_with(&format!("jump {dir}")), "{l}");
            }
            assert_eq!(body[n - 3], format!("ip {side} @{kind}_drop_v4"));
            assert_eq!(body[n - 2], format!("ip6 {side} @{kind}_drop_v6"));
            assert!(body[n - 1].starts_with("log prefix") && body[n - 1].ends_with(" drop"));
            seen += 1;
        }
    }
    assert!(seen >= 4, "{seen}");
    // i-web1's ingress comes from sg-web alone; i-web2 has the same list,
    // so the same chain.
    let web1 = vmap_target(&text, "sg_in_v4", "10.0.1.10");
    assert_eq!(chain(&text, &web1)[1..2], ["jump grp_in_sg-web"]);
    assert_eq!(vmap_target(&text, "sg_in_v4", "10.0.1.11"), web1);
    assert_eq!(vmap_target(&text, "sg_in_v6", "fd00:1::10"), web1);
    // Every instance address has its counter elements, with its id.
    for set in [
        "sg_in_allow_v4",
        "sg_in_drop_v4",
        "sg_out_allow_v4",
        "sg_out_drop_v4",
    ] {
        assert!(
            text.contains(&format!(
                "\tset {set} {{\n\t\ttype ipv4_addr\n\t\tcounter\n"
            )),
            "{set}"
        );
    }
    assert!(text.contains("10.0.1.10 comment \"i-web1\""));
}

#[test]
fn group_chains_go_on_to_the_next_stage_and_never_accept_or_return() {
    let text = render(&fixture()).unwrap();
    let mut seen = 0;
    for (prefix, next) in [
        ("grp_in_", "goto sg_in_pass"),
        ("grp_out_", "goto sg_out_pass"),
    ] {
        for head in text
            .lines()
            .filter(|l| l.starts_with(&format!("\tchain {prefix}")))
        {
            let name = head
                .trim()
                .trim_start_matches("chain ")
                .trim_end_matches(" {");
            let body = chain(&text, name);
            for l in body.iter().filter(|l| !l.starts_with('#')) {
                assert!(l.ends_with(next), "{name}: {l}");
                assert!(
                    !l.contains("accept") && !l.contains("return"),
                    "{name}: {l}"
                );
            }
            seen += 1;
        }
    }
    assert!(seen >= 3, "{seen} group chains");
}

#[test]
fn egress_allow_cannot_skip_ingress_check() {
    // Every way out of SG egress leads to SG ingress: the decide chain goes
    // there when the sender is no instance, an instance's allow goes there
    // through sg_out_pass; only sg_ingress leads on to sg_done.
    let text = render(&fixture()).unwrap();
    let decide = chain(&text, "decide");
    let tail: Vec<&str> = decide[decide.len() - 3..].to_vec();
    assert_eq!(
        tail,
        [
            "ip saddr vmap @sg_out_v4",
            "ip6 saddr vmap @sg_out_v6",
            "goto sg_ingress"
        ]
    );
    assert_eq!(chain(&text, "sg_out_pass").last(), Some(&"goto sg_ingress"));
    assert_eq!(
        chain(&text, "sg_ingress"),
        [
            "ip daddr vmap @sg_in_v4",
            "ip6 daddr vmap @sg_in_v6",
            "goto sg_done"
        ]
    );
    assert_eq!(chain(&text, "sg_in_pass").last(), Some(&"goto sg_done"));
    // No chain on the path can fall off its end back into an instance's
    // chain (which would go on to its next group, then drop) or into the
    // base chain's policy.
    for c in ["sg_done", "ct_new"] {
        assert_eq!(chain(&text, c).last(), Some(&"accept"), "{c}");
    }
    assert_eq!(chain(&text, "leg_in").last(), Some(&"goto sg_ingress"));
    assert_eq!(chain(&text, "leg_out").last(), Some(&"goto sg_done"));
    // The instances' SG chains are reached by goto (nothing to return to).
    assert!(vmap_target(&text, "sg_out_v4", "10.0.1.10").starts_with("sg_out_l"));
    assert!(vmap_target(&text, "sg_in_v4", "10.0.1.10").starts_with("sg_in_l"));
    assert!(!text.contains(": jump sg_"));
}

#[test]
fn nacls_come_before_the_conntrack_shortcut_and_after_passthrough() {
    let text = render(&fixture()).unwrap();
    let body = chain(&text, "decide");
    let pos = |needle: &str| body.iter().position(|l| l.contains(needle)).unwrap();
    assert!(pos("dns_pairs_v6") < pos("vmap @nacl_out_v4"));
    assert!(pos("vmap @nacl_in_v6") < pos("ct state established,related"));
    assert!(pos("ct status confirmed") < pos("vmap @sg_out_v4"));
}

#[test]
fn nacl_chain_is_per_subnet_and_skips_same_subnet() {
    let m = fixture();
    let text = render(&m).unwrap();
    // web1 (10.0.1.10) in subnet 0, db (10.0.2.20) in subnet 1.
    assert!(text.contains("10.0.1.10 : jump nacl_out_subnet-a"));
    assert!(text.contains("10.0.2.20 : jump nacl_out_subnet-b"));
    assert!(text.contains("10.0.2.20 : jump nacl_in_subnet-b"));
    let out0 = chain(&text, "nacl_out_subnet-a");
    assert_eq!(out0[1], "ip daddr @subnet_subnet-a_v4 return");
    assert_eq!(out0[2], "ip6 daddr @subnet_subnet-a_v6 return");
    let in1 = chain(&text, "nacl_in_subnet-b");
    assert!(in1.contains(&"ip saddr @subnet_subnet-b_v4 return"));
    assert!(in1.last().unwrap().contains("drop # rule *"));
}

#[test]
fn nacl_entries_keep_rule_order_and_deny_below_allow() {
    let m = flat(&golden_model("nacl-deny-below-allow"));
    let text = render(&m).unwrap();
    let body = chain(&text, "nacl_in_subnet-a");
    let rules: Vec<&str> = body
        .iter()
        .filter_map(|l| l.rsplit_once("# rule ").map(|(_, n)| n))
        .collect();
    assert_eq!(rules, ["90", "100", "110", "*"]);
    assert!(
        body.iter()
            .any(|l| l.contains("tcp dport 22") && l.contains(" drop # rule 90"))
    );
}

#[test]
fn dns_pairs_cover_both_directions_per_subnet() {
    let text = render(&fixture()).unwrap();
    // subnet-a's DNS 10.0.0.2; subnet-b has none.
    assert!(text.contains("10.0.0.2 . 10.0.1.10"));
    assert!(text.contains("10.0.1.10 . 10.0.0.2"));
    assert!(!text.contains("10.0.0.2 . 10.0.2.20"));
}

#[test]
fn timeouts_come_from_the_model() {
    let mut m = fixture();
    m.timeouts.tcp_established = 3600;
    let text = render(&m).unwrap();
    assert!(text.contains("policy = { established: 3600, syn_sent: 60,"));
    assert!(text.contains("policy = { unreplied: 30, replied: 180 }"));
}

#[test]
fn unknown_subnet_and_duplicate_address_are_refused() {
    let mut m = fixture();
    m.instances[0].subnet_index = 99;
    assert!(matches!(
        render(&m),
        Err(RenderError::Ownership(OwnershipError::UnknownSubnet { .. }))
    ));
    let mut m = fixture();
    let a = m.instances[0].addrs[0];
    m.instances[1].addrs.push(a);
    assert!(matches!(
        render(&m),
        Err(RenderError::Ownership(
            OwnershipError::DuplicateAddress { .. }
        ))
    ));
}

// ---------- docs/semantics.md: frames, source check, passthrough, not carried ----------

/// The fixture with i-web1 bound to `veth-web1`, and its object name.
fn bound_fixture() -> (FlatModel, &'static str) {
    let mut m = fixture();
    let i = m.instances.iter().position(|i| i.id == "i-web1").unwrap();
    m.instances[i].interface = Some("veth-web1".into());
    (m, "i-web1")
}

/// The body of a chain of `table bridge sgfw`.
fn bridge_chain<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    let bridge = &text[text.find("table bridge sgfw {").unwrap()..];
    chain(bridge, name)
}

#[test]
fn vlan_tagged_and_non_ip_frames_drop_at_every_port_both_ways() {
    let (m, _) = bound_fixture();
    let text = render_with_ports(&m, &["vport7".into(), "vport3".into()]).unwrap();
    // Every port of the bridges and every bound interface, in both directions.
    assert!(text.contains("\t\t\t\"veth-web1\",\n\t\t\t\"vport3\",\n\t\t\t\"vport7\"\n"));
    for (hook, line) in [
        ("prerouting", "iifname @ports jump from_port"),
        ("forward", "oifname @ports jump to_port"),
        ("output", "oifname @ports jump to_port"),
    ] {
        let body = bridge_chain(&text, hook);
        assert_eq!(
            body,
            [
                format!("type filter hook {hook} priority filter - 10; policy accept;").as_str(),
                line
            ]
        );
    }
    for c in ["from_port", "to_port"] {
        let body = bridge_chain(&text, c);
        assert!(
            body[1].starts_with("ether type { 8021q, 8021ad } counter name \"drop_vlan\"")
                && body[1].ends_with(" drop"),
            "{body:?}"
        );
        assert!(
            body[2].starts_with("ether type != { ip, ip6, arp } counter name \"drop_non_ip\"")
                && body[2].ends_with(" drop"),
            "{body:?}"
        );
    }
}

#[test]
fn source_check_comes_first_and_admits_only_the_instances_own_sources() {
    let (m, i) = bound_fixture();
    let text = render(&m).unwrap();
    assert!(text.contains(&format!("\"veth-web1\" : jump source_check_{i}")));
    let body = bridge_chain(&text, &format!("source_check_{i}"));
    assert_eq!(
        &body[1..],
        [
            "ether type arp return",
            "ip saddr 10.0.1.10 return",
            "ip6 saddr { fd00:1::10, fe80::/10 } return",
            "ip saddr 0.0.0.0 udp sport 68 udp dport 67 return",
            "ip6 saddr :: icmpv6 type 133-136 return",
            &format!(
                "counter name \"drop_source_check\" log prefix \"sgfw drop source-check i{i} * \" group 3210 drop"
            ),
        ]
    );
    // No service address, DNS address or DHCP server shape may be sent from a bound port.
    let all = body.join("\n");
    for (_, v4, v6) in SERVICES {
        assert!(!all.contains(&v4.to_string()) && !all.contains(&v6.to_string()));
    }
    assert!(!all.contains("10.0.0.2") && !all.contains("sport 67"));
    // The bridge chains run before br_netfilter hands the packet to the inet
    // chains (priority 0), so before any passthrough class there.
    assert!(text.contains("type filter hook prerouting priority filter - 10;"));
}

#[test]
fn a_bound_port_is_handed_only_its_own_group_and_broadcast_destinations() {
    let (m, i) = bound_fixture();
    let text = render(&m).unwrap();
    let body = bridge_chain(&text, &format!("receive_check_{i}"));
    assert_eq!(
        &body[1..4],
        [
            "ether type arp return",
            "ip daddr { 10.0.1.10, 10.0.1.255, 10.0.2.255, 224.0.0.0/4, 255.255.255.255 } return",
            "ip6 daddr { fd00:1::10, fe80::/10, ff00::/8 } return",
        ]
    );
    assert!(body[4].contains("drop_not_for_instance") && body[4].ends_with(" drop"));
}

#[test]
fn broadcast_and_multicast_are_not_carried_on_the_models_bridges() {
    let text = render(&fixture()).unwrap();
    let set = |name: &str| -> Vec<String> {
        let head = format!("\tset {name} {{");
        text.lines()
            .skip_while(|l| *l != head)
            .skip(1)
            .take_while(|l| *l != "\t}")
            .map(|l| l.trim().trim_end_matches(',').to_string())
            .collect()
    };
    assert_eq!(
        set("not_carried_v4"),
        [
            "type ipv4_addr",
            "flags interval",
            "elements = {",
            "10.0.1.255",
            "10.0.2.255",
            "224.0.0.0/4",
            "255.255.255.255",
            "}"
        ]
    );
    assert_eq!(set("not_carried_v6")[3], "ff00::/8");
    assert_eq!(
        set("bridges"),
        ["type ifname", "elements = {", "\"br-a\"", "\"br-b\"", "}"]
    );
    // In every chain that judges a leg, before that leg's NACL and SG stages.
    for (c, legs) in [
        ("decide", &["iifname", "oifname"][..]),
        ("leg_out", &["iifname"][..]),
        ("leg_in", &["oifname"][..]),
    ] {
        let body = chain(&text, c);
        let first_stage = body.iter().position(|l| l.contains(" vmap @")).unwrap();
        for side in legs {
            for f in ["ip", "ip6"] {
                let v = if f == "ip" { "v4" } else { "v6" };
                let want = format!(
                    "{side} @bridges {f} daddr @not_carried_{v} counter name \"drop_not_carried\""
                );
                let at = body
                    .iter()
                    .position(|l| l.starts_with(&want) && l.ends_with(" drop"))
                    .unwrap_or_else(|| panic!("{c}: {want} missing: {body:?}"));
                assert!(at < first_stage, "{c}: {want} after the stages");
            }
        }
        // The leg chains judge only their own leg.
        if legs.len() == 1 {
            let other = if legs[0] == "iifname" {
                "oifname"
            } else {
                "iifname"
            };
            assert!(body.iter().all(|l| !l.starts_with(other)), "{c}: {body:?}");
        }
    }
}

#[test]
fn passthrough_is_ndp_the_service_addresses_and_the_subnet_dns_only() {
    let text = render(&fixture()).unwrap();
    let body = chain(&text, "decide");
    let accepts: Vec<&str> = body
        .iter()
        .copied()
        .filter(|l| l.ends_with(" accept") && l.contains("passthrough"))
        .collect();
    assert_eq!(
        accepts,
        [
            "icmpv6 type 133-136 counter name \"passthrough\" accept",
            "ip daddr { 169.254.169.254, 169.254.169.123, 169.254.169.253 } counter name \"passthrough\" accept",
            "ip saddr { 169.254.169.254, 169.254.169.123, 169.254.169.253 } counter name \"passthrough\" accept",
            "ip6 daddr { fd00:ec2::254, fd00:ec2::123, fd00:ec2::253 } counter name \"passthrough\" accept",
            "ip6 saddr { fd00:ec2::254, fd00:ec2::123, fd00:ec2::253 } counter name \"passthrough\" accept",
            "ip saddr . ip daddr @dns_pairs_v4 counter name \"passthrough\" accept",
            "ip6 saddr . ip6 daddr @dns_pairs_v6 counter name \"passthrough\" accept",
        ]
    );
    // Nothing accepts DHCP or ICMPv6 137 anywhere in the inet table.
    let inet = &text[..text.find("table bridge sgfw {").unwrap()];
    for l in inet.lines() {
        assert!(
            !(l.contains("udp sport 6") && l.ends_with("accept")),
            "DHCP accepted: {l}"
        );
        assert!(!l.contains("133-137"), "{l}");
    }
}

#[test]
fn icmpv6_redirects_are_not_delivered() {
    let text = render(&fixture()).unwrap();
    let body = chain(&text, "decide");
    for side in ["iifname", "oifname"] {
        let at = body
            .iter()
            .position(|l| {
                l.starts_with(&format!(
                    "{side} @bridges icmpv6 type 137 counter name \"drop_not_carried\""
                )) && l.ends_with(" drop")
            })
            .unwrap_or_else(|| panic!("{side}: no redirect drop: {body:?}"));
        // Before the DHCP legs and every stage: nothing can let it through first.
        assert!(at < body.iter().position(|l| l.contains("goto leg_in")).unwrap());
    }
}

#[test]
fn dhcp_is_passthrough_for_one_leg_only() {
    let text = render(&fixture()).unwrap();
    let body = chain(&text, "decide");
    // Only with a peer that is no instance: between two instances both legs judge.
    assert!(body.contains(
        &"meta nfproto ipv4 udp sport 68 udp dport 67 ip daddr != @instances_v4 goto leg_in"
    ));
    assert!(body.contains(
        &"meta nfproto ipv4 udp sport 67 udp dport 68 ip saddr != @instances_v4 goto leg_out"
    ));
    // 68->67: the sender's leg is passed, the receiver's NACL-in and SG ingress judge it.
    let vmaps = |c: &str| -> Vec<String> {
        chain(&text, c)
            .iter()
            .filter(|l| l.contains(" vmap @"))
            .map(|l| l.to_string())
            .collect()
    };
    assert_eq!(
        vmaps("leg_in"),
        ["ip daddr vmap @nacl_in_v4", "ip6 daddr vmap @nacl_in_v6"]
    );
    assert_eq!(chain(&text, "leg_in").last(), Some(&"goto sg_ingress"));
    // 67->68: the receiver's leg is passed, the sender's NACL-out judges it
    // (its SG egress cannot: the sender is no instance, so it goes straight
    // on to the new-flow timeouts, never through SG ingress).
    assert_eq!(
        vmaps("leg_out"),
        ["ip saddr vmap @nacl_out_v4", "ip6 saddr vmap @nacl_out_v6"]
    );
    assert_eq!(chain(&text, "leg_out").last(), Some(&"goto sg_done"));
}

// ---------- no injection ----------

const PAYLOADS: [&str; 6] = [
    "\";}\ntable ip evil { chain x { type filter hook input priority -500; policy drop; } }\n#",
    "x; flush ruleset",
    "'}'",
    "a\nb",
    "i-1\"",
    "}",
];

#[test]
fn hostile_ids_in_a_flat_model_are_rendered_inert() {
    let mut m = fixture();
    for (k, p) in PAYLOADS.iter().enumerate() {
        let s = k % m.subnets.len();
        m.subnets[s].id = format!("subnet{p}");
        m.subnets[s].nacl_id = format!("acl{p}");
        // Hostile bridge and interface names are refused outright (checked above).
        let i = k % m.instances.len();
        m.instances[i].id = format!("i{p}");
        m.instances[i].subnet_id = format!("subnet{p}");
        m.instances[i].interface = None;
        if let Some(r) = std::sync::Arc::make_mut(&mut m.instances[i].ingress).first_mut() {
            r.origin.group_id = format!("sg{p}");
        }
        let text = render(&m).unwrap();
        assert_eq!(text.lines().filter(|l| l.starts_with("table")).count(), 2);
        // Words of a payload may survive sanitising, but only as `_`-joined
        // text inside a comment: never as a statement.
        assert!(
            !text.contains("table ip evil") && !text.contains("flush ruleset"),
            "{text}"
        );
        for line in text.lines().filter(|l| l.contains("evil")) {
            let t = line.trim_start();
            let in_comment = t
                .split_once(" comment \"")
                .is_some_and(|(_, c)| c.contains("evil") && c.trim_end_matches(',').ends_with('"'));
            assert!(
                t.starts_with('#') || t.starts_with("counter ") || in_comment,
                "{line}"
            );
        }
        for line in text.lines() {
            for piece in p.split('\n').filter(|x| x.len() > 1) {
                assert!(!line.contains(piece), "payload {piece:?} in line {line:?}");
            }
        }
        // Quotes stay balanced on every line: no string was closed early.
        for line in text.lines() {
            assert_eq!(line.matches('"').count() % 2, 0, "{line}");
        }
    }
}

#[test]
fn hostile_cidrs_and_ids_are_rejected_by_validation() {
    let base = crate::testutil::FIXTURE;
    for bad in [
        base.replace("10.0.1.0/24\"", "10.0.1.0/24; flush ruleset\""),
        base.replace(
            "\"0.0.0.0/0\"}], \"Ipv6Ranges\"",
            "\"0.0.0.0/0 }\"}], \"Ipv6Ranges\"",
        ),
        base.replace("\"i-web1\"", "\"i-web1\\\"; }\\n\""),
        base.replace("\"sg-db\"", "\"sg-db}\""),
        base.replace("\"fd00:2::20\"", "\"fd00:2::20\\n\""),
    ] {
        assert_ne!(bad, base, "the replacement did not apply");
        let model = Model::from_json(&bad).unwrap();
        assert!(validate(&model).is_err(), "accepted: {bad}");
    }
}

#[test]
fn hostile_descriptions_are_dropped_before_rendering() {
    let payload = "x\"; } table ip evil {\n";
    let json = crate::testutil::FIXTURE.replace(
        "{\"CidrIp\": \"0.0.0.0/0\"}",
        &format!(
            "{{\"CidrIp\": \"0.0.0.0/0\", \"Description\": {}}}",
            serde_json::to_string(payload).unwrap()
        ),
    );
    assert_ne!(json, crate::testutil::FIXTURE);
    let text = render(&flat(&json)).unwrap();
    assert!(!text.contains("evil"));
    assert_eq!(text, render(&fixture()).unwrap());
}

// ---------- backend against the fake host ----------

#[test]
fn apply_is_one_transaction_replacing_only_our_table() {
    let host = FakeHost::with_bridge_nf("1", "1");
    let report = NftBackend::new(&host).apply(&fixture()).unwrap();
    let calls = host.nft_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].0, ["-f", "-"]);
    let stdin = calls[0].1.as_deref().unwrap();
    assert!(stdin.starts_with("add table inet sgfw\ndelete table inet sgfw\n"));
    let (rest, guard) = stdin.split_at(stdin.find("add chain inet sgfw generation_").unwrap());
    assert!(rest.ends_with(&render(&fixture()).unwrap()));
    assert!(
        guard.contains("add chain bridge sgfw generation_"),
        "{guard}"
    );
    assert!(!report.incremental);
    assert_eq!(report.instances, 3);
    assert!(report.sysctls_set.is_empty());
    assert!(report.notes.is_empty());
}

#[test]
fn apply_sets_bridge_sysctls_when_zero() {
    let host = FakeHost::with_bridge_nf("0", "0");
    let report = NftBackend::new(&host).apply(&fixture()).unwrap();
    assert_eq!(
        report.sysctls_set,
        [
            "net.bridge.bridge-nf-call-iptables",
            "net.bridge.bridge-nf-call-ip6tables"
        ]
    );
    assert_eq!(host.sysctls.borrow()[SYSCTL_CALL_IP6TABLES], "1");
}

#[test]
fn apply_without_br_netfilter_fails_naming_the_fix_and_touches_nothing() {
    let host = FakeHost::default();
    let err = NftBackend::new(&host).apply(&fixture()).unwrap_err();
    assert!(matches!(err, NftError::BrNetfilterMissing));
    assert!(err.to_string().contains("modprobe br_netfilter"));
    assert!(host.nft_calls().is_empty());
}

#[test]
fn apply_with_unsettable_sysctl_fails_naming_the_fix() {
    let mut host = FakeHost::with_bridge_nf("1", "0");
    host.sysctl_read_only = true;
    let err = NftBackend::new(&host).apply(&fixture()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("sysctl -w net.bridge.bridge-nf-call-ip6tables=1"),
        "{msg}"
    );
    assert!(host.nft_calls().is_empty());
}

#[test]
fn apply_reports_nft_errors_and_render_errors_touch_nothing() {
    let host = FakeHost::with_bridge_nf("1", "1");
    host.fail_when(
        "-f",
        "Error: Could not process rule: Operation not permitted",
    );
    let err = NftBackend::new(&host).apply(&fixture()).unwrap_err();
    assert!(matches!(
        err,
        NftError::Nft {
            what: "applying the ruleset",
            ..
        }
    ));

    let host = FakeHost::with_bridge_nf("1", "1");
    let mut m = fixture();
    m.instances[0].subnet_index = 7;
    assert!(matches!(
        NftBackend::new(&host).apply(&m),
        Err(NftError::Render(_))
    ));
    assert!(host.nft_calls().is_empty());
}

#[test]
fn apply_notes_timeouts_it_cannot_set() {
    let host = FakeHost::with_bridge_nf("1", "1");
    let mut m = fixture();
    m.timeouts.icmp = 60;
    let report = NftBackend::new(&host).apply(&m).unwrap();
    assert_eq!(report.notes.len(), 1);
    assert!(report.notes[0].contains("ICMP"));
}

#[test]
fn teardown_deletes_only_our_table_and_tolerates_absence() {
    let host = FakeHost::default();
    NftBackend::new(&host).teardown().unwrap();
    let calls = host.nft_calls();
    assert_eq!(
        calls[0].1.as_deref(),
        Some(
            "add table inet sgfw\ndelete table inet sgfw\nadd table bridge sgfw\ndelete table bridge sgfw\n"
        )
    );
}

#[test]
fn is_applied_distinguishes_absent_from_failure() {
    let host = FakeHost::default();
    assert!(NftBackend::new(&host).is_applied().unwrap());
    let host = FakeHost::default();
    host.fail_when(
        "list",
        "Error: No such file or directory\nlist table inet sgfw",
    );
    assert!(!NftBackend::new(&host).is_applied().unwrap());
    let host = FakeHost::default();
    host.fail_when("list", "Error: Operation not permitted");
    assert!(NftBackend::new(&host).is_applied().is_err());
}

#[test]
fn probe_reports_missing_nft_rights_and_br_netfilter() {
    let host = FakeHost::with_bridge_nf("1", "1");
    assert_eq!(probe_nftables(&host), Ok(()));
    assert_eq!(host.nft_calls()[0].0, ["-c", "-f", "-"]);

    let host = FakeHost {
        no_nft: true,
        ..FakeHost::default()
    };
    assert!(
        probe_nftables(&host)
            .unwrap_err()
            .contains("apt-get install nftables")
    );

    let host = FakeHost::with_bridge_nf("1", "1");
    host.fail_when("-c", "Error: Operation not permitted");
    let e = probe_nftables(&host).unwrap_err();
    assert!(
        e.contains("CAP_NET_ADMIN") && e.contains("Operation not permitted"),
        "{e}"
    );

    let host = FakeHost::default();
    assert!(
        probe_nftables(&host)
            .unwrap_err()
            .contains("modprobe br_netfilter")
    );
}

#[test]
fn counters_parse_nft_json() {
    let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
      {"counter": {"family": "inet", "name": "sg_in_2_drop", "table": "sgfw", "handle": 9, "comment": "i-db", "packets": 3, "bytes": 180}},
      {"counter": {"family": "inet", "name": "nacl_out_0_allow", "table": "sgfw", "handle": 7, "comment": "subnet-a", "packets": 10, "bytes": 900}},
      {"counter": {"family": "inet", "name": "passthrough", "table": "sgfw", "handle": 3, "comment": "passthrough", "packets": 1, "bytes": 60}},
      {"counter": {"family": "ip", "name": "other", "table": "filter", "handle": 1, "packets": 1, "bytes": 1}}]}"#;
    let bridge = r#"{"nftables": [{"counter": {"family": "bridge", "name": "drop_vlan", "table": "sgfw", "handle": 2, "comment": "vlan", "packets": 4, "bytes": 240}}]}"#;
    let mut host = FakeHost::default();
    host.stdout.insert("-j".into(), json.into());
    host.stdout
        .insert("-j list counters table bridge sgfw".into(), bridge.into());
    let c = NftBackend::new(&host).counters().unwrap();
    assert_eq!(c.len(), 4);
    assert_eq!(
        c[0].kind,
        CounterKind::Dropped {
            reason: "vlan".into()
        }
    );
    assert_eq!(c[0].packets, 4);
    let c = &c[1..];
    assert_eq!(c[0].name, "nacl_out_0_allow");
    assert_eq!(
        c[0].kind,
        CounterKind::Stage {
            stage: Stage::NaclOut,
            key: "0".into(),
            allowed: true
        }
    );
    assert_eq!(c[1].kind, CounterKind::Passthrough);
    assert_eq!(c[2].label, "i-db");
    assert_eq!((c[2].packets, c[2].bytes), (3, 180));
    assert_eq!(
        host.nft_calls()[0].0,
        ["-j", "list", "counters", "table", "inet", "sgfw"]
    );
    assert_eq!(
        host.nft_calls()[1].0,
        ["-j", "list", "counters", "table", "bridge", "sgfw"]
    );
}

#[test]
fn every_rendered_counter_name_parses() {
    let text = render(&fixture()).unwrap();
    for l in text.lines().filter(|l| l.starts_with("\tcounter ")) {
        let name = l.trim().split(' ').nth(1).unwrap();
        assert!(parse_counter_name(name).is_some(), "{name}");
    }
}

#[test]
fn flows_are_not_supported_with_a_reason() {
    let e = NftBackend::flows_supported().unwrap_err();
    assert!(e.contains("NFLOG group 3210"));
}

// ---------- golden files ----------

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/nft")
}

fn golden_model(name: &str) -> String {
    std::fs::read_to_string(golden_dir().join(format!("{name}.json"))).unwrap()
}

/// The golden models ([`crate::testutil::golden_models`]).
fn golden_cases() -> Vec<(String, String)> {
    crate::testutil::golden_models()
}

/// Compares each rendering with `tests/golden/nft/<name>.nft`;
/// `SGFW_BLESS=1` rewrites them.
#[test]
fn golden_rulesets() {
    let bless = std::env::var("SGFW_BLESS").is_ok_and(|v| v == "1");
    let cases = golden_cases();
    assert!(cases.len() >= 5, "hand-made golden models missing");
    let mut failed = Vec::new();
    for (name, json) in cases {
        let text = render(&flat(&json)).unwrap();
        let path = golden_dir().join(format!("{name}.nft"));
        if bless {
            std::fs::write(&path, &text).unwrap();
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(want) if want == text => {}
            Ok(_) => failed.push(format!(
                "{name}: differs (SGFW_BLESS=1 to regenerate, then review)"
            )),
            Err(_) => failed.push(format!("{name}: {} missing (SGFW_BLESS=1)", path.display())),
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}

#[test]
fn a_rule_list_shared_by_both_directions_gets_both_group_chains() {
    // Rule lists are split by group once per list; the same allocation in
    // another direction is another list (every jump has its chain).
    let mut m = fixture();
    m.instances[0].egress = m.instances[0].ingress.clone();
    let text = render(&m).unwrap();
    for l in text.lines().filter_map(|l| l.trim().strip_prefix("jump ")) {
        assert!(text.contains(&format!("\tchain {l} {{")), "no chain {l}");
    }
    assert!(text.contains("\tchain grp_out_sg-db {"));
}

/// A model with a change to one group's rules and membership: `sg` gets
/// one more permission, and `instance` moves to the group list `groups`.
fn changed(model: &Model, step: usize) -> Model {
    let mut m = model.clone();
    let ng = m.security_groups.len();
    if ng > 0 {
        let g = &mut m.security_groups[step % ng];
        let port = 2000 + step as u16;
        g.ip_permissions
            .push(crate::model::IpPermission::tcp(port, port).from_cidr("198.51.100.0/24"));
        if step.is_multiple_of(3) {
            g.ip_permissions.truncate(1);
        }
        if step % 2 == 1 && ng > 1 {
            let other = m.security_groups[(step + 1) % ng].group_id.clone();
            if let Some(i) = m.instances.first_mut() {
                i.security_group_ids = vec![other];
            }
        }
    }
    m
}

#[test]
fn the_render_memo_changes_nothing_a_render_gives() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/nft");
    let mut hits = 0;
    for name in [
        "referenced-groups",
        "two-subnets",
        "ipv6",
        "bound-interfaces",
    ] {
        let json = std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap();
        let base = Model::from_json(&json).unwrap();
        let mut models = vec![base.clone()];
        for step in 0..8 {
            // Changes, and a return to the first model now and then.
            let next = if step % 4 == 3 {
                base.clone()
            } else {
                changed(models.last().unwrap(), step)
            };
            models.push(next);
        }
        let valid: Vec<_> = models.iter().map(|m| validate(m).unwrap().0).collect();
        let mut memo = RenderMemo::default();
        let mut flat = valid[0].flatten();
        for (g, v) in valid.iter().enumerate() {
            if g > 0 {
                // As a Vpc does: lists a change cannot reach are carried.
                flat = crate::flat::reflatten(&valid[g - 1], flat, v);
            }
            let ports = ["veth-x".to_string()];
            let with = ruleset_with(&flat, &ports, &mut memo).unwrap().text();
            let without = ruleset(&flat, &ports).unwrap().text();
            assert_eq!(with, without, "{name}, render {g}");
            hits += memo.hits();
        }
    }
    assert!(hits > 0, "the memo was never used");
}
