//! IP fragments and IPv6 extension headers through the classifier
//! (BPF_PROG_TEST_RUN). The documented behaviour: a first fragment (offset
//! 0) carries the L4 header and is judged like any packet, and its verdict
//! is recorded for the datagram; a later fragment gets that verdict, and is
//! dropped when the first fragment was denied or never seen; IPv6 extension headers (hop-by-hop, routing, destination
//! options, fragment, AH) are walked, at most six; more is malformed.
#![expect(
    clippy::unwrap_used,
    reason = "test code: a failed step is a failed test"
)]

use sgfw::ebpf::testrun::{TC_ACT_OK, TC_ACT_SHOT, TestDataplane, frame};
use sgfw::model::{Instance, IpPermission, Model, SecurityGroup, Subnet};
use sgfw::packet::Packet;
use sgfw_common::program_names as pn;

fn model() -> sgfw::flat::FlatModel {
    let m = Model {
        subnets: vec![Subnet {
            subnet_id: "subnet-a".into(),
            cidr_block: "10.30.0.0/16".into(),
            ipv6_cidr_block: Some("fd30::/64".into()),
            bridge: "brfrag".into(),
            ..Subnet::default()
        }],
        instances: vec![Instance {
            instance_id: "i-a".into(),
            subnet_id: "subnet-a".into(),
            private_ip_address: "10.30.0.10".into(),
            ipv6_addresses: vec!["fd30::10".into()],
            security_group_ids: vec!["sg-a".into()],
            ..Instance::default()
        }],
        security_groups: vec![SecurityGroup {
            group_id: "sg-a".into(),
            ip_permissions: vec![
                IpPermission::udp(53, 53)
                    .from_cidr("0.0.0.0/0")
                    .from_cidr("::/0"),
            ],
            ..SecurityGroup::default()
        }],
        ..Model::default()
    };
    sgfw::validate::validate(&m).unwrap().0.flatten()
}

fn v4_udp(dport: u16, frag_field: u16) -> Vec<u8> {
    let pkt = Packet::udp(
        "192.0.2.9".parse().unwrap(),
        "10.30.0.10".parse().unwrap(),
        5353,
        dport,
    );
    let mut f = frame(&pkt);
    // Flags/fragment offset at IP header offset 6 (frame offset 14 + 6);
    // the checksum is not checked by the classifier.
    f[20..22].copy_from_slice(&frag_field.to_be_bytes());
    f
}

/// An IPv6 UDP packet with the given extension headers (next-header values)
/// before UDP; a fragment header gets `frag_offset` (in 8-byte units).
fn v6_udp(dport: u16, exts: &[u8], frag_offset: u16) -> Vec<u8> {
    let pkt = Packet::udp(
        "2001:db8::9".parse().unwrap(),
        "fd30::10".parse().unwrap(),
        5353,
        dport,
    );
    let plain = frame(&pkt);
    let (eth_ip, udp) = plain.split_at(14 + 40);
    let mut out = eth_ip.to_vec();
    let mut chain = Vec::new();
    for (i, &h) in exts.iter().enumerate() {
        let next = exts.get(i + 1).copied().unwrap_or(17);
        match h {
            44 => {
                let mut fh = vec![next, 0, 0, 0, 0, 0, 0, 1];
                fh[2..4].copy_from_slice(&(frag_offset << 3).to_be_bytes());
                chain.extend(fh);
            }
            _ => chain.extend([next, 0, 1, 4, 0, 0, 0, 0]),
        }
    }
    out[14 + 6] = exts.first().copied().unwrap_or(17);
    out.extend(chain);
    out.extend_from_slice(&udp[..8]);
    let payload_len = (out.len() - 54) as u16;
    out[14 + 4..14 + 6].copy_from_slice(&payload_len.to_be_bytes());
    out
}

fn verdict(dp: &mut TestDataplane, f: &[u8]) -> u32 {
    dp.run_frame(pn::TO_INSTANCE, f, 1).unwrap().0
}

#[test]
fn fragments_and_extension_headers() {
    if !sgfw_tests::require_root("fragments") {
        return;
    }
    let mut dp = TestDataplane::new(&model(), 1024).unwrap();
    // IPv4: unfragmented and first fragments are judged by their ports.
    assert_eq!(verdict(&mut dp, &v4_udp(53, 0)), TC_ACT_OK);
    assert_eq!(verdict(&mut dp, &v4_udp(54, 0)), TC_ACT_SHOT);
    assert_eq!(
        verdict(&mut dp, &v4_udp(53, 0x2000)),
        TC_ACT_OK,
        "first fragment of an allowed flow"
    );
    // Later fragments (offset > 0) of that datagram get its verdict.
    assert_eq!(
        verdict(&mut dp, &v4_udp(53, 0x2000 | 185)),
        TC_ACT_OK,
        "middle fragment of an allowed datagram"
    );
    assert_eq!(
        verdict(&mut dp, &v4_udp(53, 185)),
        TC_ACT_OK,
        "last fragment of an allowed datagram"
    );
    // A denied first fragment with the same identification replaces the
    // record: the later fragments of that datagram drop.
    assert_eq!(
        verdict(&mut dp, &v4_udp(54, 0x2000)),
        TC_ACT_SHOT,
        "first fragment of a denied flow"
    );
    assert_eq!(
        verdict(&mut dp, &v4_udp(53, 185)),
        TC_ACT_SHOT,
        "later fragment of a denied datagram"
    );
    // "Don't fragment" alone is not a fragment.
    assert_eq!(verdict(&mut dp, &v4_udp(53, 0x4000)), TC_ACT_OK);

    dp.clear_conntrack().unwrap();
    // IPv6: extension headers are walked to the UDP header.
    assert_eq!(verdict(&mut dp, &v6_udp(53, &[], 0)), TC_ACT_OK);
    assert_eq!(verdict(&mut dp, &v6_udp(54, &[], 0)), TC_ACT_SHOT);
    dp.clear_conntrack().unwrap();
    assert_eq!(
        verdict(&mut dp, &v6_udp(53, &[0, 60], 0)),
        TC_ACT_OK,
        "hop-by-hop + destination options"
    );
    assert_eq!(verdict(&mut dp, &v6_udp(54, &[0, 60], 0)), TC_ACT_SHOT);
    dp.clear_conntrack().unwrap();
    assert_eq!(
        verdict(&mut dp, &v6_udp(53, &[44], 0)),
        TC_ACT_OK,
        "first fragment"
    );
    assert_eq!(verdict(&mut dp, &v6_udp(54, &[44], 0)), TC_ACT_SHOT);
    assert_eq!(
        verdict(&mut dp, &v6_udp(53, &[44], 100)),
        TC_ACT_SHOT,
        "later fragment whose first fragment was never seen"
    );
    // Too many extension headers: malformed, dropped.
    assert_eq!(
        verdict(&mut dp, &v6_udp(53, &[0, 60, 60, 60, 60, 60, 60], 0)),
        TC_ACT_SHOT
    );
    // Truncated: a header that promises more than the frame has.
    let mut short = v6_udp(53, &[60], 0);
    short[14 + 40 + 1] = 200;
    assert_eq!(verdict(&mut dp, &short), TC_ACT_SHOT);
}
