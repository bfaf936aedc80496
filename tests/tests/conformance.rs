//! Conformance suite: every scenario runs with real TCP, UDP, ICMP and
//! ICMPv6 traffic between network namespaces, once on the eBPF backend (TC
//! only, and again with the XDP pre-filter in front) and once on the
//! nftables backend, unchanged. Each expectation is stated from
//! docs/semantics.md (quoted above the scenario) and also checked against the
//! reference evaluator.

use sgfw::model::IpPermission;
use sgfw_tests::scenario::{Backend, Lab, Probe, all_anywhere, entry, nacl, sg};

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod ebpf {
            $(#[test] fn $name() { if sgfw_tests::require_root(stringify!($name)) { super::$name(sgfw_tests::scenario::Backend::Ebpf) } })*
        }
        mod xdp {
            $(#[test] fn $name() { if sgfw_tests::require_root(stringify!($name)) { super::$name(sgfw_tests::scenario::Backend::Xdp) } })*
        }
        mod nftables {
            $(#[test] fn $name() { if sgfw_tests::require_root(stringify!($name)) { super::$name(sgfw_tests::scenario::Backend::Nft) } })*
        }
    };
}

on_both!(
    sg_rules_protocols_families_and_group_references,
    sg_egress_rules_limit_what_an_instance_sends,
    egress_allow_never_skips_the_receivers_ingress_check,
    tracked_flows_survive_sg_rule_removal,
    nacl_first_match_and_subnet_boundary,
    nacl_change_cuts_established_flows,
    nacl_applies_to_its_own_subnet_only,
    nacl_is_stateless_replies_are_checked,
    host_traffic_is_outside,
);

/// "Rules only allow ... No rule matching = drop." "An IPv4 CIDR never
/// matches IPv6 traffic and vice versa; icmp matches only IPv4 ICMP, icmpv6
/// only ICMPv6." "a referenced security group (= every private IPv4/IPv6
/// address of every instance that has that group attached)".
fn sg_rules_protocols_families_and_group_references(b: Backend) {
    let mut lab = Lab::new(b, &["a", "b"], &[("client", 0), ("web", 1), ("db", 1)]);
    let a4 = lab.cidr(0, false);
    let model = lab.model(
        &[
            ("client", &["sg-client"]),
            ("web", &["sg-web"]),
            ("db", &["sg-db"]),
        ],
        vec![
            sg("sg-client", vec![], vec![all_anywhere()]),
            sg(
                "sg-web",
                vec![
                    IpPermission::tcp(80, 80)
                        .from_cidr("0.0.0.0/0")
                        .from_cidr("::/0"),
                    IpPermission::udp(53, 53).from_cidr(&a4),
                    IpPermission::with_ports("icmp", 8, -1).from_cidr("0.0.0.0/0"),
                    IpPermission::with_ports("icmpv6", -1, -1).from_cidr("::/0"),
                ],
                vec![all_anywhere()],
            ),
            sg(
                "sg-db",
                vec![IpPermission::tcp(5432, 5432).from_group("sg-web")],
                vec![all_anywhere()],
            ),
        ],
        vec![],
    );
    lab.serve("web", &[80, 81], &[53]);
    lab.serve("db", &[5432], &[]);
    lab.serve("client", &[80], &[]);
    lab.apply(&model);
    lab.expect("client", "web", false, Probe::Tcp(80), true);
    lab.expect("client", "web", true, Probe::Tcp(80), true);
    lab.expect("client", "web", false, Probe::Tcp(81), false);
    lab.expect("client", "web", false, Probe::Udp(53), true);
    lab.expect("client", "web", true, Probe::Udp(53), false);
    lab.expect("client", "web", false, Probe::Ping, true);
    lab.expect("client", "web", true, Probe::Ping, true);
    lab.expect("client", "db", false, Probe::Tcp(5432), false);
    lab.expect("web", "db", false, Probe::Tcp(5432), true);
    lab.expect("web", "db", true, Probe::Tcp(5432), true);
    lab.expect("db", "web", false, Probe::Tcp(80), true);
    lab.expect("db", "client", false, Probe::Tcp(80), false);
}

/// "The instance's effective rule set per direction is the union of every
/// rule of every group attached to it." — for egress too.
fn sg_egress_rules_limit_what_an_instance_sends(b: Backend) {
    let mut lab = Lab::new(b, &["a", "b"], &[("a1", 0), ("b1", 1)]);
    let model = lab.model(
        &[("a1", &["sg-out443"]), ("b1", &["sg-open"])],
        vec![
            sg(
                "sg-out443",
                vec![],
                vec![IpPermission::tcp(443, 443).from_cidr("0.0.0.0/0")],
            ),
            sg("sg-open", vec![all_anywhere()], vec![all_anywhere()]),
        ],
        vec![],
    );
    lab.serve("b1", &[443, 80], &[53]);
    lab.serve("a1", &[22], &[]);
    lab.apply(&model);
    lab.expect("a1", "b1", false, Probe::Tcp(443), true);
    lab.expect("a1", "b1", false, Probe::Tcp(80), false);
    lab.expect("a1", "b1", true, Probe::Tcp(443), false);
    lab.expect("a1", "b1", false, Probe::Udp(53), false);
    lab.expect("a1", "b1", false, Probe::Ping, false);
    lab.expect("b1", "a1", false, Probe::Tcp(22), false);
}

/// "Each instance's SG decision is its own: instance A → instance B needs
/// A's egress rules (or A's tracking) and B's ingress rules."
fn egress_allow_never_skips_the_receivers_ingress_check(b: Backend) {
    let mut lab = Lab::new(b, &["a"], &[("a1", 0), ("a2", 0), ("a3", 0)]);
    let model = lab.model(
        &[
            ("a1", &["sg-sender"]),
            ("a2", &["sg-closed"]),
            ("a3", &["sg-web"]),
        ],
        vec![
            sg("sg-sender", vec![], vec![all_anywhere()]),
            sg("sg-closed", vec![], vec![all_anywhere()]),
            sg(
                "sg-web",
                vec![IpPermission::tcp(80, 80).from_cidr("0.0.0.0/0")],
                vec![all_anywhere()],
            ),
        ],
        vec![],
    );
    lab.serve("a2", &[80], &[]);
    lab.serve("a3", &[80], &[]);
    lab.apply(&model);
    lab.expect("a1", "a2", false, Probe::Tcp(80), false);
    lab.expect("a1", "a2", false, Probe::Ping, false);
    lab.expect("a1", "a3", false, Probe::Tcp(80), true);
}

/// "Removing or narrowing an SG rule does not cut tracked flows; they live
/// until they time out." New flows are refused at once.
fn tracked_flows_survive_sg_rule_removal(b: Backend) {
    let mut lab = Lab::new(b, &["a", "b"], &[("client", 0), ("db", 1)]);
    let with = |open: bool| {
        lab.model(
            &[("client", &["sg-client"]), ("db", &["sg-db"])],
            vec![
                sg("sg-client", vec![], vec![all_anywhere()]),
                sg(
                    "sg-db",
                    if open {
                        vec![IpPermission::tcp(5432, 5432).from_group("sg-client")]
                    } else {
                        vec![]
                    },
                    vec![all_anywhere()],
                ),
            ],
            vec![],
        )
    };
    let (open, closed) = (with(true), with(false));
    lab.serve("db", &[5432], &[]);
    lab.apply(&open);
    let mut conn = lab.connect("client", "db", false, 5432);
    let mut conn6 = lab.connect("client", "db", true, 5432);
    assert!(
        conn.alive() && conn6.alive(),
        "the connections must work before the change"
    );
    lab.apply(&closed);
    assert!(
        conn.alive(),
        "[{:?}] an established IPv4 flow was cut by an SG rule removal",
        lab.backend()
    );
    assert!(
        conn6.alive(),
        "[{:?}] an established IPv6 flow was cut by an SG rule removal",
        lab.backend()
    );
    lab.expect("client", "db", false, Probe::Tcp(5432), false);
    lab.expect("client", "db", true, Probe::Tcp(5432), false);
    // Re-applying the same model many times changes nothing either.
    for _ in 0..20 {
        lab.apply(&closed);
    }
    assert!(
        conn.alive(),
        "[{:?}] the flow died during re-applies",
        lab.backend()
    );
}

/// "Evaluated in ascending rule number; the first rule that matches
/// decides"; "Two instances of the same subnet never see NACLs between them."
fn nacl_first_match_and_subnet_boundary(b: Backend) {
    let mut lab = Lab::new(b, &["a", "b"], &[("a1", 0), ("b1", 1), ("b2", 1)]);
    let model = lab.model(
        &[
            ("a1", &["sg-open"]),
            ("b1", &["sg-open"]),
            ("b2", &["sg-open"]),
        ],
        vec![sg("sg-open", vec![all_anywhere()], vec![all_anywhere()])],
        vec![nacl(
            "acl-b",
            &lab.subnet_id(1),
            vec![
                entry(90, false, "6", "deny", "0.0.0.0/0", Some((22, 22))),
                entry(100, false, "-1", "allow", "0.0.0.0/0", None),
                entry(101, false, "-1", "allow", "::/0", None),
                entry(100, true, "-1", "allow", "0.0.0.0/0", None),
                entry(101, true, "-1", "allow", "::/0", None),
            ],
        )],
    );
    lab.serve("b1", &[22, 80], &[]);
    lab.serve("a1", &[22], &[]);
    lab.apply(&model);
    lab.expect("a1", "b1", false, Probe::Tcp(22), false);
    lab.expect("a1", "b1", false, Probe::Tcp(80), true);
    lab.expect("a1", "b1", true, Probe::Tcp(22), true);
    lab.expect("b2", "b1", false, Probe::Tcp(22), true);
    lab.expect("b1", "a1", false, Probe::Tcp(22), true);
}

/// "Stateless: every packet is checked, replies included, tracked or not. A
/// NACL change takes effect on established flows at once."
fn nacl_change_cuts_established_flows(b: Backend) {
    let mut lab = Lab::new(b, &["a", "b"], &[("a1", 0), ("b1", 1)]);
    let groups: &[(&str, &[&str])] = &[("a1", &["sg-open"]), ("b1", &["sg-open"])];
    let sgs = || vec![sg("sg-open", vec![all_anywhere()], vec![all_anywhere()])];
    let allow_all = |extra: Vec<sgfw::model::NetworkAclEntry>| {
        let mut e = extra;
        e.extend([
            entry(100, false, "-1", "allow", "0.0.0.0/0", None),
            entry(101, false, "-1", "allow", "::/0", None),
            entry(100, true, "-1", "allow", "0.0.0.0/0", None),
            entry(101, true, "-1", "allow", "::/0", None),
        ]);
        e
    };
    let before = lab.model(
        groups,
        sgs(),
        vec![nacl("acl-b", &lab.subnet_id(1), allow_all(vec![]))],
    );
    let after = lab.model(
        groups,
        sgs(),
        vec![nacl(
            "acl-b",
            &lab.subnet_id(1),
            allow_all(vec![entry(
                50,
                false,
                "6",
                "deny",
                "0.0.0.0/0",
                Some((80, 80)),
            )]),
        )],
    );
    lab.serve("b1", &[80, 81], &[]);
    lab.apply(&before);
    let mut conn = lab.connect("a1", "b1", false, 80);
    let mut other = lab.connect("a1", "b1", false, 81);
    assert!(conn.alive() && other.alive());
    lab.apply(&after);
    assert!(
        !conn.alive(),
        "[{:?}] a NACL deny did not cut an established flow",
        lab.backend()
    );
    assert!(
        other.alive(),
        "[{:?}] a flow the new NACL entry does not match was cut",
        lab.backend()
    );
    lab.expect("a1", "b1", false, Probe::Tcp(80), false);
}

/// "A NACL is evaluated only when traffic crosses the subnet boundary: the
/// outbound list of the source subnet ..., the inbound list of the
/// destination subnet"; "A new custom NACL has no rules: it denies everything."
fn nacl_applies_to_its_own_subnet_only(b: Backend) {
    let mut lab = Lab::new(
        b,
        &["a", "b", "c"],
        &[("a1", 0), ("b1", 1), ("c1", 2), ("c2", 2)],
    );
    let model = lab.model(
        &[
            ("a1", &["sg-open"]),
            ("b1", &["sg-open"]),
            ("c1", &["sg-open"]),
            ("c2", &["sg-open"]),
        ],
        vec![sg("sg-open", vec![all_anywhere()], vec![all_anywhere()])],
        vec![nacl("acl-c", &lab.subnet_id(2), vec![])],
    );
    lab.serve("b1", &[80], &[]);
    lab.serve("a1", &[80], &[]);
    lab.serve("c1", &[80], &[]);
    lab.apply(&model);
    lab.expect("a1", "b1", false, Probe::Tcp(80), true);
    lab.expect("b1", "a1", true, Probe::Tcp(80), true);
    lab.expect("a1", "c1", false, Probe::Tcp(80), false);
    lab.expect("c1", "a1", false, Probe::Tcp(80), false);
    lab.expect("c2", "c1", false, Probe::Tcp(80), true);
    lab.expect("a1", "c1", true, Probe::Ping, false);
}

/// "Stateless: every packet is checked, replies included" — a reply to an
/// ephemeral port needs an outbound entry for it.
fn nacl_is_stateless_replies_are_checked(b: Backend) {
    let mut lab = Lab::new(b, &["a", "b"], &[("a1", 0), ("b1", 1)]);
    let groups: &[(&str, &[&str])] = &[("a1", &["sg-open"]), ("b1", &["sg-open"])];
    let sgs = || vec![sg("sg-open", vec![all_anywhere()], vec![all_anywhere()])];
    let with_out = |ports: (i64, i64)| {
        lab.model(
            groups,
            sgs(),
            vec![nacl(
                "acl-b",
                &lab.subnet_id(1),
                vec![
                    entry(100, false, "6", "allow", "0.0.0.0/0", Some((80, 80))),
                    entry(100, true, "6", "allow", "0.0.0.0/0", Some(ports)),
                ],
            )],
        )
    };
    let (wide, narrow) = (with_out((1024, 65535)), with_out((80, 80)));
    lab.serve("b1", &[80, 81], &[]);
    lab.apply(&wide);
    lab.expect("a1", "b1", false, Probe::Tcp(80), true);
    lab.expect("a1", "b1", false, Probe::Tcp(81), false);
    lab.expect("a1", "b1", false, Probe::Ping, false);
    // Replies leave b from port 80 to an ephemeral port: only 80 is open now.
    lab.apply(&narrow);
    lab.expect("a1", "b1", false, Probe::Tcp(80), false);
}

/// "Everything that is not an instance address (the host, other bridges,
/// the internet) is outside": only the instance's own SG applies.
fn host_traffic_is_outside(b: Backend) {
    let mut lab = Lab::new(b, &["a"], &[("a1", 0), ("a2", 0)]);
    let model = lab.model(
        &[("a1", &["sg-out443"]), ("a2", &["sg-open"])],
        vec![
            sg(
                "sg-out443",
                vec![],
                vec![IpPermission::tcp(443, 443).from_cidr("0.0.0.0/0")],
            ),
            sg("sg-open", vec![all_anywhere()], vec![all_anywhere()]),
        ],
        vec![],
    );
    lab.apply(&model);
    let router = std::net::IpAddr::V4(lab.bed.subnets[0].router_v4);
    lab.expect_addr("a1", router, Probe::Ping, false);
    lab.expect_addr("a2", router, Probe::Ping, true);
}
