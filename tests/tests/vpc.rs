//! The delta API ([`sgfw::vpc::Vpc`]) without privileges: random models,
//! random EC2-style changes, and after each one the incremental flattening
//! must equal a flattening from scratch of the changed model; a refused
//! change must leave the model exactly as it was. Plus the EC2 meaning of
//! Authorize and Revoke against hand-written cases.
#![expect(
    clippy::unwrap_used,
    reason = "test code: a failed step is a failed test"
)]

use sgfw::backend::{EnforcementMode, Enforcer};
use sgfw::flat::reflatten;
use sgfw::model::{IpPermission, Model};
use sgfw::validate::validate;
use sgfw::vpc::{Delta, Vpc, VpcError};
use sgfw_tests::random;

fn metadata_only(m: &Model) -> Vpc {
    Vpc::new(m, Enforcer::with_mode(EnforcementMode::Disabled))
        .unwrap()
        .0
}

fn from_scratch(m: &Model) -> sgfw::flat::FlatModel {
    validate(m).unwrap().0.flatten()
}

/// 400 models × 25 changes: the state a Vpc keeps is always what a whole
/// validate + flatten of its model gives, and a refused change leaves the
/// model as it was.
#[test]
fn incremental_flattening_equals_flattening_from_scratch() {
    let (mut applied, mut refused) = (0, 0);
    for seed in 0..400u64 {
        let mut rng = random::Rng::new(seed);
        let mut vpc = metadata_only(&random::model(&mut rng));
        for step in 0..25 {
            let d = random::delta(&mut rng, vpc.model());
            let before = vpc.model().clone();
            match vpc.apply(&d) {
                Ok(_) => {
                    applied += 1;
                    assert_eq!(
                        vpc.flat(),
                        &from_scratch(vpc.model()),
                        "seed {seed} step {step}: {d:?}"
                    );
                }
                Err(e) => {
                    refused += 1;
                    assert!(
                        !matches!(e, VpcError::Enforce(_)),
                        "seed {seed}: metadata-only enforcement failed: {e}"
                    );
                    assert_eq!(vpc.model(), &before, "seed {seed} step {step}: {e}");
                    assert_eq!(vpc.flat(), &from_scratch(&before));
                }
            }
        }
    }
    // Both paths were exercised in earnest.
    assert!(applied > 4000, "{applied} changes applied");
    assert!(refused > 500, "{refused} changes refused");
}

/// `reflatten` on its own, for whole-model replacements: any two random
/// models (the second often a mutation of the first).
#[test]
fn reflatten_of_any_two_models_equals_flatten() {
    for seed in 0..500u64 {
        let mut rng = random::Rng::new(seed);
        let a = random::model(&mut rng);
        let b = if seed % 3 == 0 {
            random::model(&mut rng)
        } else {
            let mut b = a.clone();
            for _ in 0..3 {
                if let Ok(m) = sgfw::vpc::change(&b, &random::delta(&mut rng, &b))
                    && validate(&m).is_ok()
                {
                    b = m;
                }
            }
            b
        };
        let (va, vb) = (validate(&a).unwrap().0, validate(&b).unwrap().0);
        let fa = va.flatten();
        assert_eq!(reflatten(&va, fa, &vb), vb.flatten(), "seed {seed}");
    }
}

fn base() -> Model {
    Model::from_json(
        r#"{
      "Subnets": [{"SubnetId": "subnet-a", "CidrBlock": "10.0.0.0/24", "Bridge": "br-a"}],
      "Instances": [
        {"InstanceId": "i-1", "SubnetId": "subnet-a", "PrivateIpAddress": "10.0.0.10", "SecurityGroupIds": ["sg-web"]},
        {"InstanceId": "i-2", "SubnetId": "subnet-a", "PrivateIpAddress": "10.0.0.11", "SecurityGroupIds": ["sg-db"]}
      ],
      "SecurityGroups": [
        {"GroupId": "sg-web", "IpPermissions": [
          {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443,
           "IpRanges": [{"CidrIp": "192.0.2.0/24"}, {"CidrIp": "198.51.100.0/24"}]}
        ]},
        {"GroupId": "sg-db"}
      ]
    }"#,
    )
    .unwrap()
}

fn ingress_remotes(v: &Vpc, id: &str) -> Vec<String> {
    let mut r: Vec<String> = v
        .flat()
        .instance(id)
        .unwrap()
        .ingress
        .iter()
        .map(|r| r.remote.to_string())
        .collect();
    r.sort();
    r
}

#[test]
fn revoke_removes_one_remote_and_authorize_restores_it() {
    let mut v = metadata_only(&base());
    let one = |cidr: &str| vec![IpPermission::tcp(443, 443).from_cidr(cidr)];
    v.apply(&Delta::Revoke {
        group_id: "sg-web".into(),
        egress: false,
        permissions: one("198.51.100.0/24"),
    })
    .unwrap();
    assert_eq!(ingress_remotes(&v, "i-1"), ["192.0.2.0/24"]);
    // The protocol may be named by number, as EC2 accepts it.
    let mut by_number = one("192.0.2.0/24");
    by_number[0].ip_protocol = "6".into();
    v.apply(&Delta::Revoke {
        group_id: "sg-web".into(),
        egress: false,
        permissions: by_number,
    })
    .unwrap();
    assert!(ingress_remotes(&v, "i-1").is_empty());
    assert!(
        v.model().security_groups[0].ip_permissions.is_empty(),
        "a permission without remotes is gone"
    );
    v.apply(&Delta::Authorize {
        group_id: "sg-web".into(),
        egress: false,
        permissions: one("198.51.100.0/24"),
    })
    .unwrap();
    assert_eq!(ingress_remotes(&v, "i-1"), ["198.51.100.0/24"]);
}

#[test]
fn refused_changes_name_what_is_wrong_and_change_nothing() {
    let mut v = metadata_only(&base());
    let before = v.model().clone();
    let cases: Vec<(Delta, &str)> = vec![
        (
            Delta::Authorize {
                group_id: "sg-web".into(),
                egress: false,
                permissions: vec![IpPermission::tcp(443, 443).from_cidr("192.0.2.0/24")],
            },
            "InvalidPermission.Duplicate",
        ),
        (
            Delta::Revoke {
                group_id: "sg-web".into(),
                egress: false,
                permissions: vec![IpPermission::tcp(80, 80).from_cidr("192.0.2.0/24")],
            },
            "InvalidPermission.NotFound",
        ),
        (
            Delta::Authorize {
                group_id: "sg-nope".into(),
                egress: true,
                permissions: vec![IpPermission::all().from_cidr("0.0.0.0/0")],
            },
            "SecurityGroup sg-nope does not exist",
        ),
        (
            // Not expressible: must be an error, never "allow from anywhere".
            Delta::Authorize {
                group_id: "sg-db".into(),
                egress: false,
                permissions: vec![IpPermission::tcp(5432, 5432).from_cidr("10.0.0.0/33")],
            },
            "10.0.0.0/33",
        ),
        (
            Delta::SetInstanceGroups {
                instance_id: "i-2".into(),
                security_group_ids: vec!["sg-ghost".into()],
            },
            "sg-ghost",
        ),
        (
            Delta::RemoveInstance {
                instance_id: "i-9".into(),
            },
            "Instance i-9 does not exist",
        ),
        (
            Delta::AddInstance(sgfw::model::Instance {
                instance_id: "i-3".into(),
                subnet_id: "subnet-a".into(),
                private_ip_address: "10.0.0.10".into(),
                security_group_ids: vec!["sg-db".into()],
                ..Default::default()
            }),
            "10.0.0.10",
        ),
    ];
    for (d, want) in cases {
        let e = v.apply(&d).unwrap_err();
        let text = format!("{e}");
        assert!(text.contains(want), "{d:?}: {text}");
        assert_eq!(v.model(), &before, "{d:?} changed the model");
    }
    // A batch is all or nothing: one good change, one bad.
    let e = v.apply_all(&[
        Delta::RemoveInstance {
            instance_id: "i-1".into(),
        },
        Delta::RemoveInstance {
            instance_id: "i-1".into(),
        },
    ]);
    assert!(e.is_err());
    assert_eq!(v.model(), &before);
}

/// Group references follow membership: a new member of sg-web becomes a
/// remote of every group that names sg-web, without touching other instances.
#[test]
fn membership_changes_reach_referencing_groups() {
    let mut m = base();
    m.security_groups[1].ip_permissions.push(IpPermission {
        user_id_group_pairs: vec![sgfw::model::UserIdGroupPair {
            group_id: "sg-web".into(),
            ..Default::default()
        }],
        ..IpPermission::tcp(5432, 5432)
    });
    let mut v = metadata_only(&m);
    assert_eq!(ingress_remotes(&v, "i-2"), ["10.0.0.10/32"]);
    v.apply(&Delta::AddInstance(sgfw::model::Instance {
        instance_id: "i-3".into(),
        subnet_id: "subnet-a".into(),
        private_ip_address: "10.0.0.12".into(),
        security_group_ids: vec!["sg-web".into()],
        ..Default::default()
    }))
    .unwrap();
    assert_eq!(ingress_remotes(&v, "i-2"), ["10.0.0.10/32", "10.0.0.12/32"]);
    v.apply(&Delta::SetInstanceGroups {
        instance_id: "i-1".into(),
        security_group_ids: vec!["sg-db".into()],
    })
    .unwrap();
    assert_eq!(ingress_remotes(&v, "i-2"), ["10.0.0.12/32"]);
    assert_eq!(v.flat(), &from_scratch(v.model()));
}

/// A prefix list's CIDRs changing reaches every group that names it.
#[test]
fn prefix_list_changes_reach_the_groups_that_name_them() {
    let mut m = base();
    m.prefix_lists.push(sgfw::model::PrefixList {
        prefix_list_id: "pl-1".into(),
        entries: vec![sgfw::model::PrefixListEntry {
            cidr: "203.0.113.0/24".into(),
            ..Default::default()
        }],
    });
    m.security_groups[1].ip_permissions.push(IpPermission {
        prefix_list_ids: vec![sgfw::model::PrefixListRef {
            prefix_list_id: "pl-1".into(),
            ..Default::default()
        }],
        ..IpPermission::tcp(5432, 5432)
    });
    let mut v = metadata_only(&m);
    assert_eq!(ingress_remotes(&v, "i-2"), ["203.0.113.0/24"]);
    let mut changed = v.model().clone();
    changed.prefix_lists[0].entries[0].cidr = "203.0.113.128/25".into();
    v.replace(&changed).unwrap();
    assert_eq!(ingress_remotes(&v, "i-2"), ["203.0.113.128/25"]);
    assert_eq!(v.flat(), &from_scratch(v.model()));
}

/// Deltas on the eBPF backend with real traffic between lab namespaces:
/// each takes effect at the call (no wait before the probe), and a delta the
/// backend refuses leaves the policy in force as it was.
#[test]
fn deltas_take_effect_at_once_on_the_ebpf_backend() {
    use sgfw::lab::{InstanceSpec, SubnetSpec, TestBed};
    if !sgfw_tests::require_root("vpc deltas on eBPF") {
        return;
    }
    let subnet = |name: &str| SubnetSpec {
        name: name.into(),
        ipv6: false,
    };
    let inst = |name: &str, subnet| InstanceSpec {
        name: name.into(),
        subnet,
    };
    let mut bed = TestBed::new(
        &[subnet("a"), subnet("b")],
        &[inst("client", 0), inst("server", 1)],
    )
    .unwrap();
    let tag = bed.instance("client").netns.clone();
    let ebpf = sgfw::ebpf::EbpfBackend::at(
        format!("/sys/fs/bpf/{tag}").into(),
        format!("/run/sgfw/{tag}.json").into(),
    );
    {
        let be = ebpf.clone();
        bed.on_drop(move || {
            let _ = be.teardown();
            // The lock file stays with a backend; this state path is the test's own.
            let _ = std::fs::remove_file(be.state_path.with_extension("lock"));
        });
    }
    bed.serve("server", &[80, 443], &[]).unwrap();
    let mut m = bed.model_skeleton(|name| vec![format!("sg-{name}")]);
    let all = || IpPermission::all().from_cidr("0.0.0.0/0");
    m.security_groups = vec![
        sgfw::model::SecurityGroup {
            group_id: "sg-client".into(),
            ip_permissions_egress: vec![all()],
            ..Default::default()
        },
        sgfw::model::SecurityGroup {
            group_id: "sg-server".into(),
            ip_permissions_egress: vec![all()],
            ..Default::default()
        },
    ];
    let server: std::net::IpAddr = bed.instance("server").v4.into();
    let client_cidr = format!("{}/32", bed.instance("client").v4);
    let enforcer = Enforcer::with_mode(EnforcementMode::Ebpf).with_ebpf(ebpf.clone());
    let (mut vpc, _) = Vpc::new(&m, enforcer).unwrap();
    assert!(!bed.tcp("client", server, 80), "nothing admitted yet");
    let http = || vec![IpPermission::tcp(80, 80).from_cidr(&client_cidr)];
    vpc.apply(&Delta::Authorize {
        group_id: "sg-server".into(),
        egress: false,
        permissions: http(),
    })
    .unwrap();
    assert!(bed.tcp("client", server, 80), "authorized: at once");
    assert!(!bed.tcp("client", server, 443), "only what was authorized");
    // A change the eBPF backend cannot compile (more NACL entries than one
    // bitmask holds): refused whole, the policy in force stays.
    let before = vpc.model().clone();
    let nacl = sgfw::model::NetworkAcl {
        network_acl_id: "acl-big".into(),
        entries: (1..=70)
            .map(|n| {
                sgfw::model::NetworkAclEntry::new(
                    n,
                    false,
                    "6",
                    "allow",
                    &format!("10.{n}.0.0/16"),
                    Some((1, 65535)),
                )
            })
            .collect(),
        ..Default::default()
    };
    let mut big = before.clone();
    big.network_acls.push(sgfw::model::NetworkAcl {
        associations: vec![sgfw::model::NaclAssociation {
            subnet_id: "subnet-b".into(),
            ..Default::default()
        }],
        ..nacl
    });
    let e = vpc.replace(&big).unwrap_err();
    assert!(format!("{e:?}").contains("acl-big"), "{e:?}");
    assert_eq!(vpc.model(), &before, "a refused change changes nothing");
    assert!(
        bed.tcp("client", server, 80),
        "a refused change keeps the policy"
    );
    vpc.apply(&Delta::Revoke {
        group_id: "sg-server".into(),
        egress: false,
        permissions: http(),
    })
    .unwrap();
    assert!(!bed.tcp("client", server, 80), "revoked: at once");
    // An instance that starts later: once added and its port attached, the
    // rules that name its group reach it.
    bed.add_instance(&inst("late", 1)).unwrap();
    bed.serve("late", &[80], &[]).unwrap();
    let late = bed.instance("late").clone();
    vpc.apply(&Delta::AddInstance(sgfw::model::Instance {
        instance_id: "i-late".into(),
        subnet_id: "subnet-b".into(),
        private_ip_address: late.v4.to_string(),
        security_group_ids: vec!["sg-server".into()],
        interface: Some(late.port.clone()),
        ..Default::default()
    }))
    .unwrap();
    vpc.apply(&Delta::Authorize {
        group_id: "sg-server".into(),
        egress: false,
        permissions: http(),
    })
    .unwrap();
    assert!(
        bed.tcp("client", late.v4.into(), 80),
        "the later instance, admitted"
    );
    assert!(bed.tcp("client", server, 80));
    drop(vpc);
    ebpf.teardown().unwrap();
}
