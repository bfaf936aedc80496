//! Synthetic models of a given size for the benchmarks.

use sgfw::model::{
    Instance, IpPermission, Model, NetworkAcl, NetworkAclEntry, SecurityGroup, Subnet,
};

/// The outside address whose packets match the last SG rule of
/// [`target`]'s model, and the port: (IPv4 source, IPv6 source, port).
pub fn last_rule_source(rules: usize) -> (String, String, u16) {
    let k = rules.saturating_sub(1);
    (
        format!("11.{}.{}.5", k / 256, k % 256),
        format!("2001:db8:{k:x}::5"),
        port_of(k),
    )
}

fn port_of(k: usize) -> u16 {
    (1000 + (k % 50_000)) as u16
}

fn entry(
    num: i64,
    proto: &str,
    action: &str,
    cidr: &str,
    ports: Option<(i64, i64)>,
) -> NetworkAclEntry {
    NetworkAclEntry::new(num, false, proto, action, cidr, ports)
}

/// One instance `i-target` (10.20.0.10, fd20::10) in `subnet-a`, with
/// `rules` ingress permissions spread over 5 groups — permission k admits
/// TCP port 1000+k from 11.(k/256).(k%256).0/24 and 2001:db8:k::/48 — and an
/// inbound NACL of `nacl` entries per family whose last entry (allow all) is
/// the one that matches.
pub fn target(rules: usize, nacl: usize, bridge: &str) -> Model {
    let mut groups: Vec<SecurityGroup> = (0..5)
        .map(|g| SecurityGroup {
            group_id: format!("sg-{g}"),
            ip_permissions_egress: vec![
                IpPermission::all().from_cidr("0.0.0.0/0").from_cidr("::/0"),
            ],
            ..SecurityGroup::default()
        })
        .collect();
    for k in 0..rules {
        let p = port_of(k);
        groups[k % 5].ip_permissions.push(
            IpPermission::tcp(p, p)
                .from_cidr(&format!("11.{}.{}.0/24", k / 256, k % 256))
                .from_cidr(&format!("2001:db8:{k:x}::/48")),
        );
    }
    let mut entries = Vec::new();
    for i in 0..nacl.saturating_sub(1) {
        let n = 10 + i as i64;
        // Entries that do not match the probe (another source, another port).
        entries.push(entry(n, "6", "deny", "192.0.2.0/24", Some((1, 1))));
        entries.push(entry(
            n + 1000,
            "6",
            "deny",
            "2001:db8:ffff::/48",
            Some((1, 1)),
        ));
    }
    entries.push(entry(5000, "-1", "allow", "0.0.0.0/0", None));
    entries.push(entry(5001, "-1", "allow", "::/0", None));
    let mut out = entries.clone();
    for e in &mut out {
        e.egress = true;
    }
    entries.extend(out);
    Model {
        subnets: vec![Subnet {
            subnet_id: "subnet-a".into(),
            cidr_block: "10.20.0.0/16".into(),
            ipv6_cidr_block: Some("fd20::/64".into()),
            bridge: bridge.into(),
            ..Subnet::default()
        }],
        instances: vec![Instance {
            instance_id: "i-target".into(),
            subnet_id: "subnet-a".into(),
            private_ip_address: "10.20.0.10".into(),
            ipv6_addresses: vec!["fd20::10".into()],
            security_group_ids: (0..5).map(|g| format!("sg-{g}")).collect(),
            ..Instance::default()
        }],
        security_groups: groups,
        network_acls: vec![NetworkAcl::custom("acl-a", "subnet-a", entries)],
        ..Model::default()
    }
}

/// The control-plane model: `instances` instances in 10 subnets, each with 5
/// of 50 groups; every group has 60 ingress and 60 egress permissions (a few
/// of them referencing other groups); every subnet has a 20-entry NACL per
/// direction and family (the last allows the rest).
pub fn large(instances: usize) -> Model {
    let nsub = 10;
    let subnets = (0..nsub)
        .map(|s| Subnet {
            subnet_id: format!("subnet-{s}"),
            cidr_block: format!("10.{}.0.0/16", 100 + s),
            ipv6_cidr_block: Some(format!("fd{:02x}::/64", 0x10 + s)),
            bridge: format!("brbench{s}"),
            ..Subnet::default()
        })
        .collect();
    let insts = (0..instances)
        .map(|i| {
            let s = i % nsub;
            Instance {
                instance_id: format!("i-{i:05}"),
                subnet_id: format!("subnet-{s}"),
                private_ip_address: format!(
                    "10.{}.{}.{}",
                    100 + s,
                    (i / 10) / 200,
                    10 + (i / 10) % 200
                ),
                ipv6_addresses: vec![format!("fd{:02x}::{:x}", 0x10 + s, 0x100 + i)],
                security_group_ids: (0..5)
                    .map(|g| format!("sg-{:02}", (i + g * 7) % 50))
                    .collect(),
                ..Instance::default()
            }
        })
        .collect();
    let perm = |g: usize, k: usize| {
        let port = (1000 + g * 100 + k) as u16;
        if k == 0 {
            IpPermission::tcp(port, port).from_group(&format!("sg-{:02}", (g + 1) % 50))
        } else {
            IpPermission::tcp(port, port + (k % 3) as u16)
                .from_cidr(&format!("172.{}.{}.0/24", 16 + g % 16, k))
                .from_cidr(&format!("2001:db8:{g:x}:{k:x}::/64"))
        }
    };
    let groups = (0..50)
        .map(|g| SecurityGroup {
            group_id: format!("sg-{g:02}"),
            ip_permissions: (0..60).map(|k| perm(g, k)).collect(),
            ip_permissions_egress: (0..60).map(|k| perm(g, k + 60)).collect(),
            ..SecurityGroup::default()
        })
        .collect();
    let nacls = (0..nsub)
        .map(|s| {
            let mut entries = Vec::new();
            for egress in [false, true] {
                // 19 specific entries per family, then allow the rest (20 in all).
                for (num, cidr) in [(1000, "0.0.0.0/0"), (1001, "::/0")] {
                    let mut e = entry(num, "-1", "allow", cidr, None);
                    e.egress = egress;
                    entries.push(e);
                }
                for i in 0..19i64 {
                    let mut v4 = entry(
                        100 + i * 2,
                        "6",
                        if i % 4 == 0 { "deny" } else { "allow" },
                        &format!("10.{}.0.0/16", 100 + i),
                        Some((1000 + i * 10, 1009 + i * 10)),
                    );
                    v4.egress = egress;
                    let mut v6 = entry(
                        101 + i * 2,
                        "17",
                        "allow",
                        &format!("fd{:02x}::/64", 0x10 + i),
                        Some((53, 53)),
                    );
                    v6.egress = egress;
                    entries.push(v4);
                    entries.push(v6);
                }
            }
            NetworkAcl::custom(&format!("acl-{s}"), &format!("subnet-{s}"), entries)
        })
        .collect();
    Model {
        subnets,
        instances: insts,
        security_groups: groups,
        network_acls: nacls,
        ..Model::default()
    }
}
