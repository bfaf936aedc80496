//! Build → embed → load → attach → observe: the port-count classifier on
//! every port of a bridge counts exactly the packets a test sends.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed step is a failed test"
)]

use aya::maps::{MapData, PerCpuHashMap};
use aya::programs::{SchedClassifier, TcAttachType};
use sgfw_common::{Direction, PortCountKey, map_names as mn, program_names as pn};
use sgfw_tests::testbed::{InstanceSpec, SubnetSpec, TestBed};

fn count(map: &PerCpuHashMap<&MapData, PortCountKey, u64>, ifindex: u32, dir: Direction) -> u64 {
    let key = PortCountKey {
        ifindex,
        direction: dir as u32,
    };
    map.get(&key, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

fn ifindex(name: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn port_counter_counts_exact_packets_per_port_and_direction() {
    if !sgfw_tests::require_root("port_count") {
        return;
    }
    let bed = TestBed::new(
        &[SubnetSpec {
            name: "a".into(),
            ipv6: false,
        }],
        &[
            InstanceSpec {
                name: "x".into(),
                subnet: 0,
            },
            InstanceSpec {
                name: "y".into(),
                subnet: 0,
            },
        ],
    )
    .unwrap();
    let x = bed.instance("x").clone();
    let y = bed.instance("y").clone();
    // No background chatter: no IPv6 (RS, MLD, ND) anywhere, ARP resolved in advance.
    for ns in [&x.netns, &y.netns] {
        sgfw_tests::testbed::sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
        ])
        .unwrap();
    }
    for port in [&x.port, &y.port, &bed.subnets[0].bridge] {
        std::fs::write(format!("/proc/sys/net/ipv6/conf/{port}/disable_ipv6"), "1").unwrap();
    }
    let mac = |ns: &str| {
        bed.exec(ns, &["cat", "/sys/class/net/eth0/address"])
            .unwrap()
            .trim()
            .to_string()
    };
    let (mx, my) = (mac("x"), mac("y"));
    bed.exec(
        "x",
        &[
            "ip",
            "neigh",
            "replace",
            &y.v4.to_string(),
            "lladdr",
            &my,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )
    .unwrap();
    bed.exec(
        "y",
        &[
            "ip",
            "neigh",
            "replace",
            &x.v4.to_string(),
            "lladdr",
            &mx,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )
    .unwrap();

    let caps = std::collections::BTreeMap::new();
    let mut ebpf = sgfw::ebpf::testrun::load_test_object(&caps).unwrap();
    // Links are owned by the programs: dropping `ebpf` detaches them.
    for port in [&x.port, &y.port] {
        for (name, kind) in [
            (pn::PORT_COUNT_INGRESS, TcAttachType::Ingress),
            (pn::PORT_COUNT_EGRESS, TcAttachType::Egress),
        ] {
            let prog: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            prog.attach(port, kind).unwrap();
        }
    }
    // The host's own chatter on a new bridge (its unsolicited IGMPv3
    // reports, sent within about two seconds of the bridge coming up) would
    // be counted too: let it pass, then take the counts around the pings only.
    std::thread::sleep(std::time::Duration::from_millis(3000));
    let map = ebpf.map(mn::PORT_COUNTS).unwrap();
    let counts: PerCpuHashMap<&MapData, PortCountKey, u64> = PerCpuHashMap::try_from(map).unwrap();
    let (ix, iy) = (ifindex(&x.port), ifindex(&y.port));
    let snapshot = |c: &PerCpuHashMap<&MapData, PortCountKey, u64>| {
        [
            count(c, ix, Direction::Ingress),
            count(c, ix, Direction::Egress),
            count(c, iy, Direction::Egress),
            count(c, iy, Direction::Ingress),
        ]
    };
    let before = snapshot(&counts);
    let sent = 7;
    let out = bed
        .exec(
            "x",
            &[
                "ping",
                "-n",
                "-q",
                "-c",
                &sent.to_string(),
                "-i",
                "0.05",
                &y.v4.to_string(),
            ],
        )
        .unwrap();
    assert!(out.contains(&format!("{sent} received")), "{out}");

    let after = snapshot(&counts);
    let d: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    // The port's TC ingress sees what its instance sends; TC egress what it receives.
    assert_eq!(
        d,
        vec![sent; 4],
        "x sent, x received, y received, y sent (before: {before:?})"
    );
    drop(ebpf);
    drop(bed);
}
