//! Random valid models and packets for the differential test, from a seed
//! that reproduces them exactly.

use std::net::IpAddr;

use sgfw::model::{
    IcmpTypeCode, Instance, IpPermission, IpRange, Ipv6Range, Model, NaclAssociation, NetworkAcl,
    NetworkAclEntry, PortRange, SecurityGroup, Subnet, UserIdGroupPair,
};
use sgfw::packet::{Fragment, L4, Packet, TcpFlags, Wire};

/// xorshift64*: small, fast, and the same everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (0 is mapped to a fixed non-zero state).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    /// True with probability `p` percent.
    pub fn chance(&mut self, p: u32) -> bool {
        self.below(100) < p as usize
    }
    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// Addresses outside every subnet.
pub const OUTSIDE_V4: &[&str] = &["192.0.2.1", "198.51.100.7", "10.99.0.5"];
/// IPv6 addresses outside every subnet.
pub const OUTSIDE_V6: &[&str] = &["2001:db8::1", "2001:db8:5::9"];

const PORTS: &[(i64, i64)] = &[
    (22, 22),
    (80, 80),
    (443, 443),
    (1000, 2000),
    (0, 65535),
    (-1, -1),
    (5000, 5100),
    (53, 53),
];
const ICMP: &[(i64, i64)] = &[
    (-1, -1),
    (8, -1),
    (8, 0),
    (0, -1),
    (3, -1),
    (3, 4),
    (11, 0),
    (128, -1),
    (129, 0),
    (1, -1),
];

/// A random valid model with 2–3 subnets, 2–6 instances and 2–5 groups.
pub fn model(rng: &mut Rng) -> Model {
    let nsub = 2 + rng.below(2);
    let mut m = Model::default();
    for s in 0..nsub {
        m.subnets.push(Subnet {
            subnet_id: format!("subnet-{s}"),
            cidr_block: format!("10.{s}.0.0/16"),
            ipv6_cidr_block: Some(format!("fd00:{s}::/64")),
            bridge: format!("br{s}"),
            dns_address: if rng.chance(30) {
                vec![format!("10.{s}.0.2")]
            } else {
                vec![]
            },
        });
    }
    let ngroups = 2 + rng.below(4);
    let ninst = 2 + rng.below(5);
    let mut addrs_v4 = Vec::new();
    for i in 0..ninst {
        let s = rng.below(nsub);
        let mut groups: Vec<String> = (0..1 + rng.below(2))
            .map(|_| format!("sg-{}", rng.below(ngroups)))
            .collect();
        groups.sort();
        groups.dedup();
        let v4 = format!("10.{s}.1.{}", 10 + i);
        addrs_v4.push(v4.clone());
        m.instances.push(Instance {
            instance_id: format!("i-{i}"),
            subnet_id: format!("subnet-{s}"),
            private_ip_address: v4,
            secondary_private_ip_addresses: vec![],
            ipv6_addresses: if rng.chance(70) {
                vec![format!("fd00:{s}::{:x}", 0x10 + i)]
            } else {
                vec![]
            },
            security_group_ids: groups,
            // Half the instances are bound to their port: the source check.
            interface: rng.chance(50).then(|| format!("tport{i}")),
        });
    }
    for g in 0..ngroups {
        let mut sg = SecurityGroup {
            group_id: format!("sg-{g}"),
            ..SecurityGroup::default()
        };
        // Like AWS's default egress rule, often.
        if rng.chance(50) {
            sg.ip_permissions_egress
                .push(IpPermission::all().from_cidr("0.0.0.0/0"));
        }
        for egress in [false, true] {
            let n = rng.below(6);
            for _ in 0..n {
                let perm = permission(rng, ngroups, nsub, &addrs_v4);
                if egress {
                    sg.ip_permissions_egress.push(perm);
                } else {
                    sg.ip_permissions.push(perm);
                }
            }
        }
        m.security_groups.push(sg);
    }
    // NACLs: sometimes a custom one per subnet.
    for s in 0..nsub {
        if rng.chance(60) {
            let mut acl = NetworkAcl {
                network_acl_id: format!("acl-{s}"),
                is_default: false,
                associations: vec![NaclAssociation {
                    subnet_id: format!("subnet-{s}"),
                    ..NaclAssociation::default()
                }],
                entries: vec![],
            };
            let mut used = Vec::new();
            for _ in 0..rng.below(7) {
                let num = 1 + rng.below(200) as i64;
                let egress = rng.chance(50);
                if used.contains(&(num, egress)) {
                    continue;
                }
                used.push((num, egress));
                acl.entries.push(nacl_entry(rng, num, egress, nsub));
            }
            // Mostly let the rest through, so SG behaviour is exercised too.
            if rng.chance(80) {
                for egress in [false, true] {
                    acl.entries.push(allow_all(1000, egress, false));
                    acl.entries.push(allow_all(1001, egress, true));
                }
            }
            m.network_acls.push(acl);
        }
    }
    m
}

fn allow_all(num: i64, egress: bool, v6: bool) -> NetworkAclEntry {
    NetworkAclEntry {
        rule_number: num,
        protocol: "-1".into(),
        rule_action: "allow".into(),
        egress,
        cidr_block: if v6 { None } else { Some("0.0.0.0/0".into()) },
        ipv6_cidr_block: if v6 { Some("::/0".into()) } else { None },
        port_range: None,
        icmp_type_code: None,
    }
}

fn cidr_pool(rng: &mut Rng, nsub: usize, addrs_v4: &[String]) -> (bool, String) {
    let s = rng.below(nsub);
    match rng.below(9) {
        0 => (false, "0.0.0.0/0".into()),
        1 => (false, format!("10.{s}.0.0/16")),
        2 => (false, format!("{}/32", rng.pick(addrs_v4))),
        3 => (false, format!("{}/32", rng.pick(OUTSIDE_V4))),
        4 => (false, "192.0.2.0/24".into()),
        5 => (true, "::/0".into()),
        6 => (true, format!("fd00:{s}::/64")),
        7 => (true, "2001:db8::/32".into()),
        _ => (false, "10.0.0.0/8".into()),
    }
}

fn permission(rng: &mut Rng, ngroups: usize, nsub: usize, addrs_v4: &[String]) -> IpPermission {
    let mut p = match rng.below(7) {
        0 | 1 => {
            let (f, t) = *rng.pick(PORTS);
            IpPermission::with_ports("tcp", f, t)
        }
        2 => {
            let (f, t) = *rng.pick(PORTS);
            IpPermission::with_ports("udp", f, t)
        }
        3 => {
            let (f, t) = *rng.pick(ICMP);
            IpPermission::with_ports("icmp", f, t)
        }
        4 => {
            let (f, t) = *rng.pick(ICMP);
            IpPermission::with_ports("icmpv6", f, t)
        }
        5 => IpPermission::all(),
        _ => IpPermission {
            ip_protocol: "47".into(),
            ..IpPermission::default()
        },
    };
    for _ in 0..1 + rng.below(2) {
        if rng.chance(25) {
            p.user_id_group_pairs.push(UserIdGroupPair {
                group_id: format!("sg-{}", rng.below(ngroups)),
                ..UserIdGroupPair::default()
            });
        } else {
            let (v6, c) = cidr_pool(rng, nsub, addrs_v4);
            if v6 {
                p.ipv6_ranges.push(Ipv6Range {
                    cidr_ipv6: c,
                    ..Ipv6Range::default()
                });
            } else {
                p.ip_ranges.push(IpRange {
                    cidr_ip: c,
                    ..IpRange::default()
                });
            }
        }
    }
    p
}

fn nacl_entry(rng: &mut Rng, num: i64, egress: bool, nsub: usize) -> NetworkAclEntry {
    let (v6, cidr) = cidr_pool(rng, nsub, &["10.0.1.10".to_string()]);
    let proto = *rng.pick(&["6", "17", "1", "58", "-1", "47"]);
    let mut e = NetworkAclEntry {
        rule_number: num,
        protocol: proto.into(),
        rule_action: if rng.chance(50) {
            "allow".into()
        } else {
            "deny".into()
        },
        egress,
        cidr_block: if v6 { None } else { Some(cidr.clone()) },
        ipv6_cidr_block: if v6 { Some(cidr) } else { None },
        port_range: None,
        icmp_type_code: None,
    };
    match proto {
        "6" | "17" => {
            let (f, t) = *rng.pick(&[
                (22, 22),
                (80, 80),
                (1000, 2000),
                (0, 65535),
                (443, 443),
                (1024, 65535),
            ]);
            e.port_range = Some(PortRange {
                from: Some(f),
                to: Some(t),
            });
        }
        "1" | "58" => {
            let (t, c) = *rng.pick(ICMP);
            e.icmp_type_code = Some(IcmpTypeCode {
                r#type: Some(t),
                code: Some(c),
            });
        }
        _ => {}
    }
    e
}

/// A random packet between the model's instances and outside addresses.
pub fn packet(rng: &mut Rng, model: &sgfw::flat::FlatModel, history: &[Packet]) -> Packet {
    // Replies and ICMP errors about earlier packets.
    if !history.is_empty() && rng.chance(50) {
        let prev = rng.pick(history).clone();
        if rng.chance(15) {
            let v6 = prev.is_v6();
            let (t, c) = if v6 {
                *rng.pick(&[(1u8, 4u8), (2, 0), (3, 0)])
            } else {
                *rng.pick(&[(3u8, 3u8), (3, 4), (11, 0)])
            };
            // The error travels back from the destination (or a router) to the source.
            let from = if rng.chance(70) {
                prev.dst
            } else {
                outside(rng, v6)
            };
            return Packet {
                src: from,
                dst: prev.src,
                l4: L4::Icmp {
                    icmp_type: t,
                    code: c,
                    id: 0,
                    quoted: Some(Box::new(prev)),
                },
            };
        }
        let mut r = prev.reply();
        if let L4::Tcp { flags, .. } = &mut r.l4 {
            if rng.chance(10) {
                flags.fin = true;
            }
            if rng.chance(5) {
                flags.rst = true;
            }
        }
        return r;
    }
    let v6 = rng.chance(35);
    let mut addrs: Vec<IpAddr> = model
        .instances
        .iter()
        .flat_map(|i| i.addrs.iter().copied())
        .filter(|a| a.is_ipv6() == v6)
        .collect();
    addrs.push(outside(rng, v6));
    if !v6 && rng.chance(3) {
        addrs.push(
            "169.254.169.254"
                .parse()
                .unwrap_or(IpAddr::from([169, 254, 169, 254])),
        );
    }
    for s in &model.subnets {
        for d in &s.dns {
            if d.is_ipv6() == v6 && rng.chance(20) {
                addrs.push(*d);
            }
        }
    }
    let src = *rng.pick(&addrs);
    let mut dst = *rng.pick(&addrs);
    if dst == src {
        dst = outside(rng, v6);
    }
    let port =
        |rng: &mut Rng| *rng.pick(&[22u16, 80, 443, 1500, 5050, 53, 40000, 67, 68, 65535, 0]);
    let l4 = match rng.below(6) {
        0 | 1 => L4::Tcp {
            sport: port(rng),
            dport: port(rng),
            flags: TcpFlags {
                syn: rng.chance(70),
                ..TcpFlags::default()
            },
        },
        2 => L4::Udp {
            sport: port(rng),
            dport: port(rng),
        },
        3 | 4 => {
            let t = if v6 {
                *rng.pick(&[128u8, 129, 135, 1, 4, 200])
            } else {
                *rng.pick(&[8u8, 0, 13, 3, 5, 11])
            };
            L4::Icmp {
                icmp_type: t,
                code: *rng.pick(&[0u8, 1, 4]),
                id: rng.below(4) as u16,
                quoted: None,
            }
        }
        _ => L4::Other {
            proto: *rng.pick(&[47u8, 50, 132]),
        },
    };
    Packet { src, dst, l4 }
}

fn outside(rng: &mut Rng, v6: bool) -> IpAddr {
    let s = if v6 {
        *rng.pick(OUTSIDE_V6)
    } else {
        *rng.pick(OUTSIDE_V4)
    };
    s.parse().unwrap_or(IpAddr::from([192, 0, 2, 1]))
}

/// Destinations a VPC does not carry, or that only the passthrough classes use.
const GROUP_V4: &[&str] = &["224.0.0.251", "255.255.255.255", "239.1.2.3"];
const GROUP_V6: &[&str] = &["ff02::fb", "ff02::1", "ff02::1:ff00:10"];
/// Service addresses (metadata, Time Sync, Amazon DNS).
const SERVICE_V4: &[&str] = &["169.254.169.254", "169.254.169.123", "169.254.169.253"];
const SERVICE_V6: &[&str] = &["fd00:ec2::254", "fd00:ec2::123", "fd00:ec2::253"];

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap_or(IpAddr::from([192, 0, 2, 1]))
}

/// A random packet on the wire: mostly [`packet`] between its owners' ports,
/// and also the hostile and unusual classes of docs/semantics.md —
/// broadcast and multicast destinations, spoofed sources on bound ports
/// (another instance, a service address, the unspecified address),
/// link-local addresses, DHCP shapes, ICMP whose ids collide with tracked
/// flows, VLAN tags. Fragments are made by [`fragments`].
pub fn wire(rng: &mut Rng, model: &sgfw::flat::FlatModel, history: &[Packet]) -> Wire {
    let index_of = |a: IpAddr| model.instances.iter().position(|i| i.addrs.contains(&a));
    let bound: Vec<usize> = (0..model.instances.len())
        .filter(|&i| model.instances[i].interface.is_some())
        .collect();
    let mut pkt = packet(rng, model, history);
    let v6 = pkt.is_v6();
    let any_port = |rng: &mut Rng| rng.below(model.instances.len().max(1));
    match rng.below(100) {
        // A group or broadcast destination, handed to some port.
        0..=5 => {
            let d = if v6 {
                addr(rng.pick::<&str>(GROUP_V6))
            } else if rng.chance(40) && !model.subnets.is_empty() {
                let s = rng.pick(&model.subnets);
                IpAddr::V4(s.cidr_v4.broadcast())
            } else {
                addr(rng.pick::<&str>(GROUP_V4))
            };
            pkt.dst = d;
        }
        // A service address as source or destination.
        6..=9 => {
            let a = addr(if v6 {
                rng.pick::<&str>(SERVICE_V6)
            } else {
                rng.pick::<&str>(SERVICE_V4)
            });
            if rng.chance(50) {
                pkt.dst = a;
            } else {
                pkt.src = a;
            }
        }
        // DHCP shapes, between anything.
        10..=12 if !v6 => {
            let (sp, dp) = *rng.pick(&[(68u16, 67u16), (67, 68)]);
            if rng.chance(40) {
                pkt.src = addr("0.0.0.0");
            }
            if rng.chance(40) {
                pkt.dst = addr("255.255.255.255");
            }
            pkt.l4 = L4::Udp {
                sport: sp,
                dport: dp,
            };
        }
        // Link-local IPv6, NDP and redirects.
        13..=21 if v6 => {
            if rng.chance(50) {
                pkt.src = addr(&format!("fe80::{:x}", 1 + rng.below(3)));
            } else {
                pkt.dst = addr(&format!("fe80::{:x}", 1 + rng.below(3)));
            }
            if rng.chance(40) {
                pkt.l4 = L4::Icmp {
                    icmp_type: *rng.pick(&[133u8, 134, 135, 136, 137]),
                    code: 0,
                    id: 0,
                    quoted: None,
                };
            }
        }
        // ICMP whose ids and codes collide with tracked flows: requests in the
        // reverse direction, errors quoting nothing whose type/code look like
        // an echo key, timestamp queries.
        22..=27 => {
            if let Some(prev) = (!history.is_empty()).then(|| rng.pick(history).clone()) {
                pkt.src = prev.dst;
                pkt.dst = prev.src;
                let pv6 = prev.is_v6();
                let id = match prev.l4 {
                    L4::Icmp { id, .. } => id,
                    _ => rng.below(4) as u16,
                };
                let t = if pv6 {
                    *rng.pick(&[128u8, 129, 1, 2])
                } else {
                    *rng.pick(&[8u8, 0, 13, 14, 3, 11])
                };
                pkt.l4 = L4::Icmp {
                    icmp_type: t,
                    code: *rng.pick(&[0u8, 0, 8, 1]),
                    id,
                    quoted: None,
                };
            }
        }
        _ => {}
    }
    let mut from = index_of(pkt.src);
    let mut to = index_of(pkt.dst);
    // Spoofing: a bound instance sends someone else's source.
    if !bound.is_empty() && rng.chance(5) {
        from = Some(*rng.pick(&bound));
    }
    // Group, broadcast and link-local destinations reach some port.
    if to.is_none() && !model.instances.is_empty() {
        let flooded = match pkt.dst {
            IpAddr::V4(a) => {
                a.is_multicast() || a.is_broadcast() || model.is_subnet_broadcast(pkt.dst)
            }
            IpAddr::V6(a) => a.is_multicast() || a.segments()[0] & 0xffc0 == 0xfe80,
        };
        if flooded || rng.chance(3) {
            to = Some(any_port(rng));
        }
    }
    if from.is_none()
        && (pkt.src.is_unspecified()
            || matches!(pkt.src, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80))
        && !model.instances.is_empty()
    {
        from = Some(any_port(rng));
    }
    // From an instance's address but not through its port (a port not
    // attached yet, or the host forging it).
    if from.is_some() && rng.chance(2) {
        from = None;
    }
    // Straight from a port not attached yet, as anything (the fence).
    let unattached = from.is_none() && rng.chance(3);
    Wire {
        packet: pkt,
        from,
        to,
        unattached,
        vlan: rng.chance(1),
        fragment: None,
    }
}

/// The fragments of a datagram: the first (carrying the L4 header) and one
/// or two later ones, with identification `id`.
pub fn fragments(rng: &mut Rng, w: &Wire, id: u32) -> Vec<Wire> {
    let n = 2 + rng.below(2);
    (0..n)
        .map(|k| Wire {
            fragment: Some(Fragment {
                id,
                offset: (k as u16) * 2,
                more: k + 1 < n,
            }),
            ..w.clone()
        })
        .collect()
}

/// A change to the model's NACLs: an entry removed, or a deny entry added
/// in front.
pub fn mutate_nacls(rng: &mut Rng, m: &mut Model) {
    let nsub = m.subnets.len();
    let Some(acl) = (!m.network_acls.is_empty())
        .then(|| rng.below(m.network_acls.len()))
        .and_then(|i| m.network_acls.get_mut(i))
    else {
        return;
    };
    if !acl.entries.is_empty() && rng.chance(50) {
        let i = rng.below(acl.entries.len());
        acl.entries.remove(i);
    } else {
        let num = 1 + rng.below(200) as i64;
        let egress = rng.chance(50);
        if !acl
            .entries
            .iter()
            .any(|e| e.rule_number == num && e.egress == egress)
        {
            acl.entries.push(nacl_entry(rng, num, egress, nsub));
        }
    }
}

/// A random change to `m` in the terms of an EC2 call: mostly ones that
/// apply, some that EC2 refuses (a duplicate authorize, a revoke of a rule
/// the group lacks, an unknown id) and some that make the model invalid.
pub fn delta(rng: &mut Rng, m: &Model) -> sgfw::vpc::Delta {
    use sgfw::vpc::Delta;
    let nsub = m.subnets.len().max(1);
    let ngroups = m.security_groups.len().max(1);
    let addrs_v4: Vec<String> = m
        .instances
        .iter()
        .map(|i| i.private_ip_address.clone())
        .chain(std::iter::once("10.0.1.10".to_string()))
        .collect();
    let group = |rng: &mut Rng| {
        if rng.chance(5) {
            "sg-missing".to_string()
        } else {
            format!("sg-{}", rng.below(ngroups))
        }
    };
    match rng.below(9) {
        0 | 1 => Delta::Authorize {
            group_id: group(rng),
            egress: rng.chance(50),
            permissions: vec![permission(rng, ngroups, nsub, &addrs_v4)],
        },
        2 | 3 => {
            // Revoke one remote of an existing permission, or a made-up one.
            let egress = rng.chance(50);
            let sg = &m.security_groups[rng.below(m.security_groups.len())];
            let perms = if egress {
                &sg.ip_permissions_egress
            } else {
                &sg.ip_permissions
            };
            let p = if !perms.is_empty() && rng.chance(85) {
                let mut p = perms[rng.below(perms.len())].clone();
                if p.ip_ranges.len() > 1 {
                    p.ip_ranges.truncate(1);
                    p.ipv6_ranges.clear();
                    p.user_id_group_pairs.clear();
                    p.prefix_list_ids.clear();
                }
                p
            } else {
                permission(rng, ngroups, nsub, &addrs_v4)
            };
            Delta::Revoke {
                group_id: sg.group_id.clone(),
                egress,
                permissions: vec![p],
            }
        }
        4 => {
            let n = m.instances.len() + rng.below(1000);
            let s = rng.below(nsub);
            Delta::AddInstance(Instance {
                instance_id: format!("i-new{n}"),
                subnet_id: format!("subnet-{s}"),
                // Sometimes an address another instance has (invalid).
                private_ip_address: if rng.chance(10) && !m.instances.is_empty() {
                    m.instances[0].private_ip_address.clone()
                } else {
                    format!("10.{s}.2.{}", 1 + n % 250)
                },
                secondary_private_ip_addresses: vec![],
                ipv6_addresses: if rng.chance(50) {
                    vec![format!("fd00:{s}::2:{:x}", n)]
                } else {
                    vec![]
                },
                security_group_ids: vec![format!("sg-{}", rng.below(ngroups))],
                interface: None,
            })
        }
        5 => Delta::RemoveInstance {
            instance_id: if m.instances.is_empty() || rng.chance(10) {
                "i-missing".into()
            } else {
                m.instances[rng.below(m.instances.len())]
                    .instance_id
                    .clone()
            },
        },
        6 => Delta::SetInstanceGroups {
            instance_id: if m.instances.is_empty() {
                "i-missing".into()
            } else {
                m.instances[rng.below(m.instances.len())]
                    .instance_id
                    .clone()
            },
            security_group_ids: (0..1 + rng.below(2))
                .map(|_| group(rng))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
        },
        7 => {
            let acl = if m.network_acls.is_empty() {
                "acl-missing".to_string()
            } else {
                m.network_acls[rng.below(m.network_acls.len())]
                    .network_acl_id
                    .clone()
            };
            if rng.chance(50) {
                let num = 1 + rng.below(200) as i64;
                let egress = rng.chance(50);
                Delta::ReplaceNaclEntry {
                    network_acl_id: acl,
                    entry: nacl_entry(rng, num, egress, nsub),
                }
            } else {
                let entry = m
                    .network_acls
                    .iter()
                    .find(|a| a.network_acl_id == acl)
                    .and_then(|a| {
                        (!a.entries.is_empty())
                            .then(|| a.entries[rng.below(a.entries.len())].clone())
                    });
                Delta::DeleteNaclEntry {
                    network_acl_id: acl,
                    rule_number: entry.as_ref().map_or(31_000, |e| e.rule_number),
                    egress: entry.is_some_and(|e| e.egress),
                }
            }
        }
        _ => Delta::AssociateNacl {
            subnet_id: format!("subnet-{}", rng.below(nsub)),
            network_acl_id: if m.network_acls.is_empty() {
                "acl-missing".into()
            } else {
                m.network_acls[rng.below(m.network_acls.len())]
                    .network_acl_id
                    .clone()
            },
        },
    }
}
