//! Fixtures and generators shared by the unit and property tests of every
//! module (test builds only; nothing here ships).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use proptest::prelude::*;
use proptest::test_runner::Config;

use crate::flat::{FirewallRule, FlatModel, InstanceRules, RuleOrigin, SubnetFirewall};
use crate::model::Model;
use crate::packet::{L4, Packet, TcpFlags};
use crate::policy::{ConntrackTimeouts, Direction, Match, NaclEntry, RuleAction};
use crate::validate::validate;

/// Two subnets (a: custom NACL allowing everything but what tests change,
/// b: the default NACL), web1/web2 in a, db in b.
pub(crate) const FIXTURE: &str = r#"{
  "Subnets": [
    {"SubnetId": "subnet-a", "CidrBlock": "10.0.1.0/24", "Ipv6CidrBlock": "fd00:1::/64", "Bridge": "br-a", "DnsAddress": "10.0.0.2"},
    {"SubnetId": "subnet-b", "CidrBlock": "10.0.2.0/24", "Ipv6CidrBlock": "fd00:2::/64", "Bridge": "br-b"}
  ],
  "Instances": [
    {"InstanceId": "i-web1", "SubnetId": "subnet-a", "PrivateIpAddress": "10.0.1.10", "Ipv6Addresses": ["fd00:1::10"], "SecurityGroupIds": ["sg-web"]},
    {"InstanceId": "i-web2", "SubnetId": "subnet-a", "PrivateIpAddress": "10.0.1.11", "SecurityGroupIds": ["sg-web"]},
    {"InstanceId": "i-db", "SubnetId": "subnet-b", "PrivateIpAddress": "10.0.2.20", "Ipv6Addresses": ["fd00:2::20"], "SecurityGroupIds": ["sg-db"]}
  ],
  "SecurityGroups": [
    {"GroupId": "sg-web",
     "IpPermissions": [
       {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "0.0.0.0/0"}], "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
       {"IpProtocol": "icmp", "FromPort": 8, "ToPort": -1, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
     "IpPermissionsEgress": [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}], "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}]},
    {"GroupId": "sg-db",
     "IpPermissions": [{"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "UserIdGroupPairs": [{"GroupId": "sg-web"}]}],
     "IpPermissionsEgress": []}
  ],
  "NetworkAcls": [
    {"NetworkAclId": "acl-a", "Associations": [{"SubnetId": "subnet-a"}], "Entries": [
      {"RuleNumber": 100, "Protocol": "-1", "RuleAction": "allow", "Egress": false, "CidrBlock": "0.0.0.0/0"},
      {"RuleNumber": 101, "Protocol": "-1", "RuleAction": "allow", "Egress": false, "Ipv6CidrBlock": "::/0"},
      {"RuleNumber": 100, "Protocol": "-1", "RuleAction": "allow", "Egress": true, "CidrBlock": "0.0.0.0/0"},
      {"RuleNumber": 101, "Protocol": "-1", "RuleAction": "allow", "Egress": true, "Ipv6CidrBlock": "::/0"}]}
  ]
}"#;

pub(crate) fn flat_of(json: &str) -> FlatModel {
    let model = Model::from_json(json).unwrap();
    let (valid, _) = validate(&model).unwrap_or_else(|e| panic!("fixture invalid:\n{e}"));
    valid.flatten()
}

pub(crate) fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `PROPTEST_CASES` is honoured (proptest reads it); under CI at least 10,000.
pub(crate) fn config() -> Config {
    let mut c = Config::default();
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") && c.cases < 10_000 {
        c.cases = 10_000;
    }
    // Keep the repository free of regression files; failures print the case.
    c.failure_persistence = None;
    c
}

const INSTANCES: [(&str, usize, &str, Option<&str>); 3] = [
    ("i-0", 0, "10.0.1.10", Some("fd00:1::10")),
    ("i-1", 0, "10.0.1.11", Some("fd00:1::11")),
    ("i-2", 1, "10.0.2.20", Some("fd00:2::20")),
];
const ADDRS_V4: [&str; 5] = [
    "10.0.1.10",
    "10.0.1.11",
    "10.0.2.20",
    "203.0.113.7",
    "10.0.2.99",
];
const ADDRS_V6: [&str; 5] = [
    "fd00:1::10",
    "fd00:1::11",
    "fd00:2::20",
    "2001:db8::7",
    "fd00:2::99",
];
const NETS: [&str; 12] = [
    "0.0.0.0/0",
    "10.0.0.0/16",
    "10.0.1.0/24",
    "10.0.2.20/32",
    "203.0.113.0/24",
    "10.0.1.10/32",
    "::/0",
    "fd00::/16",
    "fd00:1::/64",
    "fd00:2::20/128",
    "2001:db8::/32",
    "fd00:1::11/128",
];

/// Draws small numbers out of random words. Proptest generating a few
/// words is far cheaper (in debug builds) than a tree of strategies, and
/// words shrinking towards zero still shrink the model towards the empty one.
#[derive(Debug, Clone)]
struct Draw {
    words: Vec<u64>,
    next: usize,
    cur: u64,
    budget: u64,
}

impl Draw {
    fn new(words: Vec<u64>) -> Draw {
        Draw {
            words,
            next: 0,
            cur: 0,
            budget: 0,
        }
    }

    /// A number in `0..n`.
    fn pick(&mut self, n: u64) -> u64 {
        if self.budget < n {
            self.cur = self.words.get(self.next).copied().unwrap_or(0);
            self.next += 1;
            self.budget = u64::MAX;
        }
        let v = self.cur % n;
        self.cur /= n;
        self.budget /= n;
        v
    }

    fn of<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.pick(items.len() as u64) as usize]
    }
}

fn match_of(d: &mut Draw) -> Match {
    match d.pick(4) {
        0 => Match::All,
        1 => Match::Proto(d.of(&[6, 17, 1, 58, 47])),
        2 => {
            let proto = d.of(&[6, 17]);
            let from = 20 + d.pick(6) as u16;
            Match::Ports {
                proto,
                from,
                to: from + d.pick(3) as u16,
            }
        }
        _ => {
            let proto = d.of(&[1, 58]);
            let icmp_type = if d.pick(2) == 0 {
                None
            } else {
                Some(d.of(&[0, 3, 8, 128, 129]))
            };
            let code = if icmp_type.is_some() && d.pick(2) == 1 {
                Some(d.pick(2) as u8)
            } else {
                None
            };
            Match::Icmp {
                proto,
                icmp_type,
                code,
            }
        }
    }
}

fn rule_of(d: &mut Draw, dir: Direction) -> FirewallRule {
    FirewallRule {
        remote: NET_POOL[d.pick(NETS.len() as u64) as usize],
        matcher: match_of(d),
        origin: RuleOrigin {
            group_id: "sg-p".into(),
            direction: dir,
            permission: d.pick(3) as usize,
        },
    }
}

fn rules_of(d: &mut Draw, dir: Direction) -> Vec<FirewallRule> {
    (0..d.pick(4)).map(|_| rule_of(d, dir)).collect()
}

fn nacl_of(d: &mut Draw) -> Vec<NaclEntry> {
    let mut entries = BTreeMap::new();
    for _ in 0..d.pick(5) {
        let rule_number = 1 + d.pick(39) as u16;
        let action = if d.pick(2) == 0 {
            RuleAction::Allow
        } else {
            RuleAction::Deny
        };
        let cidr = NET_POOL[d.pick(NETS.len() as u64) as usize];
        entries.insert(
            rule_number,
            NaclEntry {
                rule_number,
                action,
                cidr,
                matcher: match_of(d),
            },
        );
    }
    entries.into_values().collect()
}

fn words() -> impl Strategy<Value = Draw> {
    prop::collection::vec(any::<u64>(), 16).prop_map(Draw::new)
}

pub(crate) fn arb_rule(dir: Direction) -> impl Strategy<Value = FirewallRule> {
    words().prop_map(move |mut d| rule_of(&mut d, dir))
}

pub(crate) fn arb_nacl() -> impl Strategy<Value = Vec<NaclEntry>> {
    words().prop_map(|mut d| nacl_of(&mut d))
}

fn subnet(
    id: &str,
    v4: &str,
    v6: &str,
    inbound: Vec<NaclEntry>,
    outbound: Vec<NaclEntry>,
) -> SubnetFirewall {
    SubnetFirewall {
        id: id.into(),
        bridge: format!("br-{id}"),
        cidr_v4: v4.parse().unwrap(),
        cidr_v6: Some(v6.parse().unwrap()),
        dns: vec![],
        nacl_id: format!("acl-{id}"),
        inbound,
        outbound,
    }
}

/// Two subnets, three instances (two in the first subnet), random NACLs and SG rules.
pub(crate) fn arb_model() -> impl Strategy<Value = FlatModel> {
    words().prop_map(|mut d| {
        let mut m = BASE_MODEL.clone();
        for s in &mut m.subnets {
            s.inbound = nacl_of(&mut d);
            s.outbound = nacl_of(&mut d);
        }
        for inst in &mut m.instances {
            inst.ingress = rules_of(&mut d, Direction::Ingress).into();
            inst.egress = rules_of(&mut d, Direction::Egress).into();
        }
        m
    })
}

/// Parsed once: parsing in every generated case dominates the run time in debug builds.
static NET_POOL: std::sync::LazyLock<Vec<IpNet>> =
    std::sync::LazyLock::new(|| NETS.iter().map(|s| s.parse().unwrap()).collect());
pub(crate) static V4_POOL: std::sync::LazyLock<Vec<IpAddr>> =
    std::sync::LazyLock::new(|| ADDRS_V4.iter().map(|s| ip(s)).collect());
pub(crate) static V6_POOL: std::sync::LazyLock<Vec<IpAddr>> =
    std::sync::LazyLock::new(|| ADDRS_V6.iter().map(|s| ip(s)).collect());
static BASE_MODEL: std::sync::LazyLock<FlatModel> = std::sync::LazyLock::new(|| FlatModel {
    subnets: vec![
        subnet("a", "10.0.1.0/24", "fd00:1::/64", vec![], vec![]),
        subnet("b", "10.0.2.0/24", "fd00:2::/64", vec![], vec![]),
    ],
    instances: INSTANCES
        .iter()
        .map(|(id, subnet_index, v4, v6)| InstanceRules {
            id: (*id).into(),
            subnet_id: if *subnet_index == 0 {
                "a".into()
            } else {
                "b".into()
            },
            subnet_index: *subnet_index,
            addrs: std::iter::once(ip(v4)).chain(v6.map(ip)).collect(),
            interface: None,
            ingress: Vec::new().into(),
            egress: Vec::new().into(),
        })
        .collect(),
    timeouts: ConntrackTimeouts::default(),
});

pub(crate) fn arb_l4() -> impl Strategy<Value = L4> {
    prop_oneof![
        (20u16..26, 20u16..26, any::<[bool; 4]>()).prop_map(
            |(sport, dport, [syn, ack, fin, rst])| L4::Tcp {
                sport,
                dport,
                flags: TcpFlags { syn, ack, fin, rst }
            }
        ),
        (20u16..26, 20u16..26).prop_map(|(sport, dport)| L4::Udp { sport, dport }),
        (
            prop::sample::select(vec![0u8, 3, 8, 11, 128, 129, 1, 2, 5]),
            0u8..2,
            0u16..2
        )
            .prop_map(|(icmp_type, code, id)| L4::Icmp {
                icmp_type,
                code,
                id,
                quoted: None
            }),
        Just(L4::Other { proto: 47 }),
    ]
}

/// A packet between two of the model's addresses (or outside ones) of one family.
pub(crate) fn arb_packet() -> impl Strategy<Value = Packet> {
    (any::<bool>(), 0usize..5, 0usize..5, arb_l4()).prop_map(|(v6, s, d, l4)| {
        let pool = if v6 { &V6_POOL } else { &V4_POOL };
        Packet {
            src: pool[s],
            dst: pool[d],
            l4,
        }
    })
}

/// (golden name, model JSON) of every `examples/*.json` (named
/// `example-<stem>`) and every hand-made `tests/golden/nft/*.json`: the
/// models the golden tests of every renderer and exporter run on.
pub(crate) fn golden_models() -> Vec<(String, String)> {
    use std::path::{Path, PathBuf};
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cases = Vec::new();
    for (dir, prefix) in [
        (root.join("../examples"), "example-"),
        (root.join("tests/golden/nft"), ""),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        for p in paths {
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            cases.push((
                format!("{prefix}{stem}"),
                std::fs::read_to_string(&p).unwrap(),
            ));
        }
    }
    cases
}
