//! The hostile-traffic cases measured against the first cut, replayed
//! through the BPF classifiers (BPF_PROG_TEST_RUN, each instance on a port of
//! its own, all bound) and through the reference evaluator. Every expected
//! value comes from docs/semantics.md, not from either implementation: each
//! case asserts that both the dataplane and the evaluator deliver exactly
//! what the specification says.
//!
//! Subnet A (a1, a2, a3) and subnet B (b1). A's inbound NACL admits only ICMP
//! echo replies (type 0, code 0) and UDP; a1's groups admit nothing inbound
//! but let everything out; a2 admits nothing; a3 and b1 admit and send
//! everything.
#![expect(
    clippy::unwrap_used,
    reason = "test code: a failed step is a failed test"
)]

use std::net::IpAddr;

use sgfw::ebpf::testrun::{TestDataplane, private_ports};
use sgfw::eval::{Conntrack, evaluate_wire};
use sgfw::flat::FlatModel;
use sgfw::model::{
    IcmpTypeCode, Instance, IpPermission, Model, NetworkAcl, NetworkAclEntry, SecurityGroup, Subnet,
};
use sgfw::packet::{Fragment, L4, Packet, TcpFlags, Wire};
use sgfw_common::program_names as pn;

const A1: &str = "10.40.1.11";
const A2: &str = "10.40.1.12";
const A3: &str = "10.40.1.13";
const B1: &str = "10.40.2.21";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn model() -> FlatModel {
    let inst = |id: &str, subnet: &str, addr: &str, v6: &str, sg: &str, port: &str| Instance {
        instance_id: id.into(),
        subnet_id: subnet.into(),
        private_ip_address: addr.into(),
        ipv6_addresses: vec![v6.into()],
        security_group_ids: vec![sg.into()],
        interface: Some(port.into()),
        ..Instance::default()
    };
    let mut echo_reply = NetworkAclEntry::new(10, false, "1", "allow", "0.0.0.0/0", None);
    echo_reply.icmp_type_code = Some(IcmpTypeCode {
        r#type: Some(0),
        code: Some(0),
    });
    let m = Model {
        subnets: vec![
            Subnet {
                subnet_id: "subnet-a".into(),
                cidr_block: "10.40.1.0/24".into(),
                ipv6_cidr_block: Some("fd40:1::/64".into()),
                bridge: "bra".into(),
                ..Subnet::default()
            },
            Subnet {
                subnet_id: "subnet-b".into(),
                cidr_block: "10.40.2.0/24".into(),
                ipv6_cidr_block: Some("fd40:2::/64".into()),
                bridge: "brb".into(),
                ..Subnet::default()
            },
        ],
        instances: vec![
            inst("a1", "subnet-a", A1, "fd40:1::11", "sg-out", "pa1"),
            inst("a2", "subnet-a", A2, "fd40:1::12", "sg-none", "pa2"),
            inst("a3", "subnet-a", A3, "fd40:1::13", "sg-open", "pa3"),
            inst("b1", "subnet-b", B1, "fd40:2::21", "sg-open", "pb1"),
        ],
        security_groups: vec![
            SecurityGroup {
                group_id: "sg-out".into(),
                ip_permissions_egress: vec![
                    IpPermission::all().from_cidr("0.0.0.0/0").from_cidr("::/0"),
                ],
                ..SecurityGroup::default()
            },
            SecurityGroup {
                group_id: "sg-none".into(),
                ..SecurityGroup::default()
            },
            SecurityGroup {
                group_id: "sg-open".into(),
                ip_permissions: vec![IpPermission::all().from_cidr("0.0.0.0/0").from_cidr("::/0")],
                ip_permissions_egress: vec![
                    IpPermission::all().from_cidr("0.0.0.0/0").from_cidr("::/0"),
                ],
                ..SecurityGroup::default()
            },
        ],
        network_acls: vec![NetworkAcl::custom(
            "acl-a",
            "subnet-a",
            vec![
                echo_reply,
                NetworkAclEntry::new(20, false, "17", "allow", "0.0.0.0/0", Some((0, 65535))),
                NetworkAclEntry::new(100, true, "-1", "allow", "0.0.0.0/0", None),
                NetworkAclEntry::new(101, true, "-1", "allow", "::/0", None),
            ],
        )],
        ..Model::default()
    };
    sgfw::validate::validate(&m).unwrap().0.flatten()
}

/// One bed: the dataplane with ports, the evaluator's state, the clock.
struct Bed {
    m: FlatModel,
    dp: TestDataplane,
    ports: Vec<u32>,
    ct: Conntrack,
    now: u64,
    /// The `xdp` dataplane: the pre-filter judges what a port sends first.
    xdp: bool,
}

impl Bed {
    fn new(xdp: bool) -> Bed {
        let m = model();
        let mut dp = TestDataplane::new(&m, 4096).unwrap();
        let ports = private_ports(m.instances.len()).unwrap();
        dp.set_ports(&m, &ports).unwrap();
        dp.set_xdp(xdp);
        Bed {
            m,
            dp,
            ports,
            ct: Conntrack::new(),
            now: 1_000_000_000_000,
            xdp,
        }
    }

    fn port(&self, id: &str) -> Option<usize> {
        self.m.instances.iter().position(|i| i.id == id)
    }

    /// Sends `pkt` from `from`'s port to `to`'s port; asserts that the
    /// dataplane and the evaluator both do what the specification says.
    fn send(&mut self, what: &str, w: impl std::borrow::Borrow<Wire>, delivered: bool) {
        let w = w.borrow();
        self.now += 1_000_000;
        self.dp.set_time(self.now).unwrap();
        let want = evaluate_wire(&self.m, &mut self.ct, w, self.now);
        let got = self.dp.deliver_wire(w).unwrap();
        assert_eq!(
            (got, want.allowed),
            (delivered, delivered),
            "{what} ({}): (dataplane, evaluator) delivered, specification says {delivered}\n  {w:?}\n  {want:?}",
            if self.xdp {
                "xdp dataplane"
            } else {
                "tc dataplane"
            }
        );
    }

    /// The ifindex of an instance's port.
    fn dp_port(&self, id: &str) -> u32 {
        self.ports[self.port(id).unwrap()]
    }

    fn wire(&self, from: &str, to: &str, packet: Packet) -> Wire {
        Wire {
            packet,
            from: self.port(from),
            to: self.port(to),
            unattached: false,
            vlan: false,
            fragment: None,
        }
    }
}

/// Runs a case on the `tc` dataplane, then again with the XDP pre-filter
/// in front of every sender's hook (the `xdp` dataplane), each on a fresh
/// bed: both must do what the specification says.
fn run(f: impl Fn(&mut Bed) + Send + Sync + 'static) {
    if !sgfw_tests::require_root("hostile") {
        return;
    }
    let f = std::sync::Arc::new(f);
    for xdp in [false, true] {
        let f = f.clone();
        // Ports live in a network namespace of the test thread's own.
        let h = std::thread::spawn(move || f(&mut Bed::new(xdp)));
        if let Err(e) = h.join() {
            std::panic::resume_unwind(e);
        }
    }
}

/// "A query flow is (addresses, id, query kind)": after a1's echo to b1 and
/// its reply, b1's echo request and timestamp request with the same id do not
/// ride on the tracked flow or on its cached NACL pass; a reply with a
/// non-zero code does not ride on the cache either.
#[test]
fn icmp_queries_with_a_tracked_id_are_judged() {
    run(|bed| {
        let req = Packet::icmp(ip(A1), ip(B1), 8, 0, 77);
        bed.send("a1 echo to b1", bed.wire("a1", "b1", req.clone()), true);
        bed.send("b1's reply", bed.wire("b1", "a1", req.reply()), true);
        bed.send(
            "b1's reply again (cached)",
            bed.wire("b1", "a1", req.reply()),
            true,
        );
        let rev = Packet::icmp(ip(B1), ip(A1), 8, 0, 77);
        bed.send("b1 echo request, same id", bed.wire("b1", "a1", rev), false);
        let ts = Packet::icmp(ip(B1), ip(A1), 13, 0, 77);
        bed.send(
            "b1 timestamp request, same id",
            bed.wire("b1", "a1", ts),
            false,
        );
        let odd = Packet::icmp(ip(B1), ip(A1), 0, 5, 77);
        bed.send("b1 reply with code 5", bed.wire("b1", "a1", odd), false);
    });
}

/// "An error is related only when its quote names a tracked flow of that
/// instance": a destination-unreachable quoting nothing, with a code that
/// equals a tracked echo's key, is judged by the rules (a1 admits nothing).
#[test]
fn forged_icmp_errors_are_not_related() {
    run(|bed| {
        let req = Packet::icmp(ip(A1), ip(B1), 8, 0, 3);
        bed.send("a1 echo to b1", bed.wire("a1", "b1", req), true);
        // UDP is admitted by A's NACL, so only a1's SG can stop what follows.
        let udp = Packet::udp(ip(A1), ip(B1), 4000, 53);
        bed.send("a1 udp to b1", bed.wire("a1", "b1", udp), true);
        let bare = Packet::icmp(ip(B1), ip(A1), 3, 8, 0);
        bed.send(
            "unreachable quoting nothing",
            bed.wire("b1", "a1", bare),
            false,
        );
        let mut quoting = Packet::icmp(ip(B1), ip(A1), 3, 3, 0);
        if let L4::Icmp { quoted, .. } = &mut quoting.l4 {
            *quoted = Some(Box::new(Packet::udp(ip(A2), ip(B1), 4000, 53)));
        }
        bed.send(
            "unreachable quoting a2's flow, to a1",
            bed.wire("b1", "a1", quoting),
            false,
        );
    });
}

/// "Broadcast and multicast are not delivered": not to a2 (which admits
/// nothing), not even after a3's datagram was admitted at another port.
#[test]
fn broadcast_and_multicast_are_not_carried() {
    run(|bed| {
        // a3 admits everything: only "not carried" can stop these.
        for dst in [
            "224.0.0.251",
            "255.255.255.255",
            "10.40.1.255",
            "239.255.255.250",
        ] {
            let p = Packet::udp(ip(A1), ip(dst), 5353, 5353);
            bed.send(
                &format!("a1 -> {dst} at a3's port"),
                bed.wire("a1", "a3", p),
                false,
            );
            // From the host side (no sender hook) to a3's port.
            let mut w = bed.wire(
                "a1",
                "a3",
                Packet::udp(ip("10.40.1.1"), ip(dst), 5353, 5353),
            );
            w.from = None;
            bed.send(&format!("host -> {dst} at a3's port"), w, false);
        }
        let p = Packet::udp(ip("fd40:1::11"), ip("ff02::fb"), 5353, 5353);
        bed.send(
            "a1 -> ff02::fb at a3's port",
            bed.wire("a1", "a3", p),
            false,
        );
        // The same datagram to a3's own address is delivered: the control.
        let p = Packet::udp(ip(A1), ip(A3), 5353, 5353);
        bed.send("a1 -> a3 unicast (control)", bed.wire("a1", "a3", p), true);
        let p = Packet::udp(ip("fd40:1::13"), ip("ff02::fb"), 5353, 5353);
        bed.send("a3 -> ff02::fb", bed.wire("a3", "a2", p), false);
        // A unicast frame carrying a broadcast IP, handed to a2's port.
        let mut w = bed.wire("b1", "a2", Packet::udp(ip(B1), ip("10.40.1.255"), 1, 2));
        w.from = None;
        bed.send("broadcast IP in a unicast frame", w, false);
        // DHCP's broadcast answer and NDP are passthrough classes.
        let mut offer = bed.wire(
            "a2",
            "a2",
            Packet::udp(ip("10.40.1.1"), ip("255.255.255.255"), 67, 68),
        );
        offer.from = None;
        bed.send("DHCP offer to 255.255.255.255", offer, true);
        let ns = Packet::icmp(ip("fe80::1"), ip("ff02::1:ff00:12"), 135, 0, 0);
        let mut w = bed.wire("a2", "a2", ns);
        w.from = None;
        bed.send("neighbour solicitation", w, true);
        let redirect = Packet::icmp(ip("fe80::1"), ip("fd40:1::12"), 137, 0, 0);
        let mut w = bed.wire("a2", "a2", redirect);
        w.from = None;
        bed.send("ICMPv6 redirect", w, false);
    });
}

/// "The source check comes first": a bound instance can never speak as the
/// metadata service, the DNS address, another instance, or a DHCP server's
/// shape to an instance that admits nothing.
#[test]
fn spoofed_sources_are_dropped_first() {
    run(|bed| {
        for src in ["169.254.169.254", "169.254.169.253", A2, "10.40.1.2"] {
            let p = Packet::tcp(ip(src), ip(A3), 40000, 22, TcpFlags::SYN);
            let mut w = bed.wire("a1", "a3", p);
            w.from = bed.port("a1");
            bed.send(&format!("a1 as {src}"), w, false);
        }
        let p = Packet::tcp(
            ip("fd00:ec2::254"),
            ip("fd40:1::13"),
            40000,
            22,
            TcpFlags::SYN,
        );
        let mut w = bed.wire("a1", "a3", p);
        w.from = bed.port("a1");
        bed.send("a1 as fd00:ec2::254", w, false);
        // A 67 -> 68 datagram between instances is not DHCP: a2 admits nothing.
        bed.send(
            "a1 udp 67->68 to a2",
            bed.wire("a1", "a2", Packet::udp(ip(A1), ip(A2), 67, 68)),
            false,
        );
        // Legit: a1 talks to the metadata service and asks DHCP.
        let mut md = bed.wire(
            "a2",
            "a2",
            Packet::tcp(ip(A2), ip("169.254.169.254"), 40000, 80, TcpFlags::SYN),
        );
        md.to = None;
        bed.send("a2 to the metadata service", md, true);
        let mut disc = bed.wire(
            "a2",
            "a2",
            Packet::udp(ip("0.0.0.0"), ip("255.255.255.255"), 68, 67),
        );
        disc.to = None;
        bed.send("a2 DHCP discover", disc, true);
    });
}

/// The fence: a frame straight from a port sgfw has not attached yet (a
/// container that just started) is dropped at the receiving instance's hook
/// and at the bridge device — whatever source it claims, to an instance that
/// admits everything; the same packet from an attached port or from the
/// host is delivered.
#[test]
fn frames_from_ports_not_attached_yet_are_fenced() {
    run(|bed| {
        // b1 admits everything, and its subnet has the default NACL.
        for (src, dst) in [
            (A1, B1),
            ("198.51.100.7", B1),
            ("fd40:1::11", "fd40:2::21"),
            ("2001:db8::7", "fd40:2::21"),
        ] {
            let p = Packet::tcp(ip(src), ip(dst), 40000, 80, TcpFlags::SYN);
            let mut w = bed.wire("a1", "b1", p);
            let label = format!("{src} -> {dst}");
            if bed.m.instance_by_addr(ip(src)).is_some() {
                bed.send(&format!("{label} from a1's port"), w.clone(), true);
            } else {
                w.from = None;
                bed.send(&format!("{label} from the host"), w.clone(), true);
            }
            w.from = None;
            w.unattached = true;
            bed.send(
                &format!("{label} from a port not attached yet"),
                w.clone(),
                false,
            );
            // Up to the host (to be routed elsewhere): the bridge's own hook.
            w.to = None;
            bed.send(
                &format!("{label} up from a port not attached yet"),
                w,
                false,
            );
        }
        // ARP too: nothing from such a port reaches an instance.
        let mut arp = vec![0xffu8; 6];
        arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99, 0x08, 0x06]);
        arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99, 198, 51, 100, 7]);
        arp.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 40, 1, 13]);
        arp.resize(60, 0);
        let b1 = bed.dp_port("b1");
        let shift = sgfw_common::MARK_IDENTITY_SHIFT;
        for (stamp, delivered) in [
            (sgfw_common::STAMP_NONE, false),
            (sgfw_common::STAMP_HOST, true),
            (sgfw_common::STAMP_PORT, true),
        ] {
            let (act, _, _) = bed
                .dp
                .run_frame_marked(pn::TO_INSTANCE, &arp, 1, b1, stamp << shift)
                .unwrap();
            assert_eq!(
                act == 0,
                delivered,
                "ARP with stamp {stamp:#x} at b1's port"
            );
        }
    });
}

/// "Frames with VLAN tags are not delivered", whatever their contents.
#[test]
fn vlan_tagged_frames_are_dropped() {
    run(|bed| {
        let p = Packet::tcp(ip(A1), ip(A3), 40000, 80, TcpFlags::SYN);
        bed.send("untagged", bed.wire("a1", "a3", p.clone()), true);
        let mut w = bed.wire("a1", "a3", p);
        w.vlan = true;
        bed.send("priority-tagged", w, false);
    });
}

/// "IP fragments of an allowed flow are delivered": in order and out of
/// order after the first; never without it; never after a denied one.
#[test]
fn fragments_follow_their_first_fragment() {
    run(|bed| {
        let frag = |w: &Wire, id, offset, more| Wire {
            fragment: Some(Fragment { id, offset, more }),
            ..w.clone()
        };
        for (src, dst) in [(A1, A3), ("fd40:1::11", "fd40:1::13")] {
            let w = bed.wire("a1", "a3", Packet::udp(ip(src), ip(dst), 4000, 53));
            bed.send("first", frag(&w, 9, 0, true), true);
            bed.send("third before second", frag(&w, 9, 370, false), true);
            bed.send("second", frag(&w, 9, 185, true), true);
            bed.send("orphan", frag(&w, 10, 185, false), false);
            // To a2, which admits nothing: the first is denied, the rest too.
            let d = bed.wire(
                "a1",
                "a2",
                Packet::udp(
                    ip(src),
                    ip(if src == A1 { A2 } else { "fd40:1::12" }),
                    4000,
                    53,
                ),
            );
            bed.send("denied first", frag(&d, 11, 0, true), false);
            bed.send("its second", frag(&d, 11, 185, false), false);
        }
    });
}
