//! "Every decision uses the addresses as the VPC sees them": the host
//! masquerades traffic from subnet A to subnet B (as netavark does between
//! podman networks), so B's ports see the router's address as the source.
//! Referenced-group rules and NACL rules naming A's instances must still be
//! judged on those instances' own addresses, on both backends.
//!
//! web1, web2 (subnet A, group sg-web) → db (subnet B, group sg-db: TCP 5432
//! from sg-web only); B's inbound NACL: rule 90 denies web2's /32, rule 100
//! allows all. Expected (docs/semantics.md): web1 → db:5432 allowed, web2 →
//! db:5432 denied (NACL), other → db:5432 denied (SG).
#![expect(
    clippy::expect_used,
    reason = "test code: a failed step is a failed test"
)]

use std::process::Command;

use sgfw::model::IpPermission;
use sgfw_tests::scenario::{Backend, Lab, Probe, all_anywhere, entry, nacl, sg};

/// The masquerade rule, removed however the test ends.
struct Masquerade(String);

impl Masquerade {
    fn new(table: &str, from: &str, to: &str) -> Masquerade {
        let script = format!(
            "table ip {table} {{\n chain post {{\n type nat hook postrouting priority srcnat; policy accept;\n ip saddr {from} ip daddr {to} masquerade\n }}\n}}\n"
        );
        let o = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                if let Some(mut i) = c.stdin.take() {
                    i.write_all(script.as_bytes())?;
                }
                c.wait()
            })
            .expect("running nft");
        assert!(o.success(), "installing the masquerade rule failed");
        Masquerade(table.to_string())
    }
}

impl Drop for Masquerade {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "ip", &self.0])
            .status();
    }
}

fn scenario(backend: Backend) {
    if !sgfw_tests::require_root("nat") {
        return;
    }
    let mut lab = Lab::new(
        backend,
        &["a", "b"],
        &[("web1", 0), ("web2", 0), ("other", 0), ("db", 1)],
    );
    let web2 = lab.addr("web2", false);
    let model = lab.model(
        &[
            ("web1", &["sg-web"]),
            ("web2", &["sg-web"]),
            ("other", &["sg-other"]),
            ("db", &["sg-db"]),
        ],
        vec![
            sg("sg-web", vec![], vec![all_anywhere()]),
            sg("sg-other", vec![], vec![all_anywhere()]),
            sg(
                "sg-db",
                vec![IpPermission::tcp(5432, 5432).from_group("sg-web")],
                vec![all_anywhere()],
            ),
        ],
        vec![nacl(
            "acl-b",
            &lab.subnet_id(1),
            vec![
                entry(
                    90,
                    false,
                    "6",
                    "deny",
                    &format!("{web2}/32"),
                    Some((0, 65535)),
                ),
                entry(100, false, "-1", "allow", "0.0.0.0/0", None),
                entry(101, false, "-1", "allow", "::/0", None),
                entry(100, true, "-1", "allow", "0.0.0.0/0", None),
                entry(101, true, "-1", "allow", "::/0", None),
            ],
        )],
    );
    let (a, b) = (
        lab.bed.subnets[0].cidr_v4.clone(),
        lab.bed.subnets[1].cidr_v4.clone(),
    );
    let table = format!(
        "sgfw_test_nat_{}_{}",
        std::process::id(),
        lab.bed.subnets[0].bridge
    );
    let _nat = Masquerade::new(&table, &a, &b);
    lab.serve("db", &[5432], &[]);
    lab.apply(&model);
    lab.expect("web1", "db", false, Probe::Tcp(5432), true);
    lab.expect("web2", "db", false, Probe::Tcp(5432), false);
    lab.expect("other", "db", false, Probe::Tcp(5432), false);
}

#[test]
fn verdicts_do_not_change_under_host_nat_ebpf() {
    scenario(Backend::Ebpf);
}

#[test]
fn verdicts_do_not_change_under_host_nat_nftables() {
    scenario(Backend::Nft);
}
