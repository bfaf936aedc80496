//! `sgfw demo`: a small VPC in network namespaces, enforced for real, probed
//! with real traffic, compared row by row with the reference evaluator, one
//! live change shown, then everything removed.

use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, anyhow};
use clap::Args;
use sgfw::eval::{Decider, Verdict, explain_new_flow};
use sgfw::flat::FlatModel;
use sgfw::lab::{InstanceSpec, SubnetSpec, TestBed};
use sgfw::model::{IpPermission, Model, NetworkAcl, NetworkAclEntry, SecurityGroup};
use sgfw::packet::{Packet, TcpFlags};

use super::{BackendArg, Failure};

/// Build a small VPC in network namespaces, enforce it, probe it, tear it down.
///
/// Two subnets (public: web1, web2; private: db1, db2), IPv4 and IPv6. The
/// `sg-web` group admits HTTP from anywhere; `sg-db` admits PostgreSQL and
/// SSH only from `sg-web`; the private subnet's NACL denies SSH (rule 90)
/// below an allow-all (rule 100). Every probe is real traffic; the expected
/// column comes from the reference evaluator. Exits 1 if any row differs.
///
/// Example: `sgfw demo --backend nftables`
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  sgfw demo\n  sgfw demo --backend nftables --keep")]
pub struct DemoArgs {
    /// Which dataplane enforces the demo VPC.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub backend: BackendArg,
    /// Keep the VPC running for exploring; Ctrl-C removes it.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Clone, Copy)]
enum Kind {
    Tcp(u16),
    Udp(u16),
    Ping,
}

impl Kind {
    fn label(self, v6: bool) -> String {
        match self {
            Kind::Tcp(p) => format!("tcp/{p}{}", if v6 { " v6" } else { "" }),
            Kind::Udp(p) => format!("udp/{p}{}", if v6 { " v6" } else { "" }),
            Kind::Ping => if v6 { "icmpv6 echo" } else { "icmp echo" }.to_string(),
        }
    }
}

fn ingress(id: &str, perms: Vec<IpPermission>) -> SecurityGroup {
    SecurityGroup {
        group_id: id.into(),
        ip_permissions: perms,
        ip_permissions_egress: vec![IpPermission::all().from_cidr("0.0.0.0/0").from_cidr("::/0")],
        ..SecurityGroup::default()
    }
}

fn nacl_entry(
    num: i64,
    egress: bool,
    proto: &str,
    action: &str,
    cidr: &str,
    port: Option<i64>,
) -> NetworkAclEntry {
    NetworkAclEntry::new(num, egress, proto, action, cidr, port.map(|p| (p, p)))
}

/// The demo model over the lab's addresses. `db_open`: sg-db admits
/// PostgreSQL; `pg_denied`: the private NACL denies PostgreSQL (rule 80).
fn model(bed: &TestBed, db_open: bool, pg_denied: bool) -> Model {
    let mut m = bed.model_skeleton(|name| {
        vec![
            if name.starts_with("web") {
                "sg-web"
            } else {
                "sg-db"
            }
            .into(),
        ]
    });
    let mut db = vec![IpPermission::tcp(22, 22).from_group("sg-web")];
    if db_open {
        db.insert(0, IpPermission::tcp(5432, 5432).from_group("sg-web"));
    }
    let mut entries = vec![
        nacl_entry(90, false, "6", "deny", "0.0.0.0/0", Some(22)),
        nacl_entry(100, false, "-1", "allow", "0.0.0.0/0", None),
        nacl_entry(101, false, "-1", "allow", "::/0", None),
        nacl_entry(100, true, "-1", "allow", "0.0.0.0/0", None),
        nacl_entry(101, true, "-1", "allow", "::/0", None),
    ];
    if pg_denied {
        entries.push(nacl_entry(80, false, "6", "deny", "0.0.0.0/0", Some(5432)));
        entries.push(nacl_entry(81, false, "6", "deny", "::/0", Some(5432)));
    }
    m.security_groups = vec![
        ingress(
            "sg-web",
            vec![
                IpPermission::tcp(80, 80)
                    .from_cidr("0.0.0.0/0")
                    .from_cidr("::/0"),
                IpPermission::with_ports("icmp", 8, -1).from_cidr("0.0.0.0/0"),
                IpPermission::with_ports("icmpv6", -1, -1).from_cidr("::/0"),
            ],
        ),
        ingress("sg-db", db),
    ];
    m.network_acls = vec![NetworkAcl::custom("acl-private", "subnet-private", entries)];
    m
}

fn decided_by(v: &Verdict) -> String {
    if let Some(p) = &v.passthrough {
        return format!("passthrough ({p})");
    }
    let stage = if v.allowed {
        v.stages.last()
    } else {
        v.denied_by()
    };
    match stage {
        None => "outside".into(),
        Some(s) => {
            let rule = match &s.by {
                Decider::SgRule(o) => o.to_string(),
                Decider::NaclRule(n) => format!("rule {n}"),
                Decider::NaclDefaultDeny => "rule *".into(),
                Decider::SgNoMatch => "no rule".into(),
                Decider::Tracked => "tracked".into(),
                Decider::Related => "related".into(),
            };
            format!("{} {rule}", s.stage)
        }
    }
}

struct Demo {
    bed: TestBed,
    flat: FlatModel,
    mode: sgfw::backend::EnforcementMode,
    rows: usize,
    mismatches: usize,
}

impl Demo {
    fn apply(&mut self, m: &Model) -> Result<(), Failure> {
        let (valid, _) =
            sgfw::validate::validate(m).map_err(|e| anyhow!("demo model invalid:\n{e}"))?;
        self.flat = valid.flatten();
        super::apply_with(
            self.mode,
            &self.flat,
            &super::apply_options(Some(65_536), sgfw::ebpf::Dataplane::Tc),
        )?;
        Ok(())
    }

    fn addr(&self, name: &str, v6: bool) -> IpAddr {
        let i = self.bed.instance(name);
        match (v6, i.v6) {
            (true, Some(a)) => IpAddr::V6(a),
            _ => IpAddr::V4(i.v4),
        }
    }

    fn row(&mut self, from: &str, to: &str, v6: bool, kind: Kind) {
        let (src, dst) = (self.addr(from, v6), self.addr(to, v6));
        let pkt = match kind {
            Kind::Tcp(p) => Packet::tcp(src, dst, 40000, p, TcpFlags::SYN),
            Kind::Udp(p) => Packet::udp(src, dst, 40000, p),
            Kind::Ping => Packet::echo_request(src, dst, 1),
        };
        let verdict = explain_new_flow(&self.flat, &pkt);
        let observed = match kind {
            Kind::Tcp(p) => self.bed.tcp(from, dst, p),
            Kind::Udp(p) => self.bed.udp(from, dst, p),
            Kind::Ping => self.bed.ping(from, dst),
        };
        let ok = observed == verdict.allowed;
        self.rows += 1;
        if !ok {
            self.mismatches += 1;
        }
        let yn = |b: bool| if b { "ALLOW" } else { "DENY" };
        println!(
            "{:<6} {:<6} {:<13} {:<8} {:<8} {:<28} {}",
            from,
            to,
            kind.label(v6),
            yn(verdict.allowed),
            yn(observed),
            decided_by(&verdict),
            if ok { "ok" } else { "MISMATCH" }
        );
    }

    fn check(&mut self, what: &str, expected: bool, observed: bool) {
        self.rows += 1;
        let ok = expected == observed;
        if !ok {
            self.mismatches += 1;
        }
        println!(
            "  {:<62} expected {:<5} observed {:<5} {}",
            what,
            expected,
            observed,
            if ok { "ok" } else { "MISMATCH" }
        );
    }
}

/// Runs `sgfw demo`.
pub fn run(a: &DemoArgs) -> Result<ExitCode, Failure> {
    let t = Instant::now();
    if let Some(m) = super::applied_mode() {
        return Err(Failure::Runtime(anyhow!(
            "sgfw is already applied on this host ({m} backend); the demo would replace it. Run `sgfw teardown` first"
        )));
    }
    let mode = super::choose(a.backend)?;
    println!("sgfw demo: building a VPC in network namespaces (backend: {mode})");
    let bed = TestBed::new(
        &[
            SubnetSpec {
                name: "public".into(),
                ipv6: true,
            },
            SubnetSpec {
                name: "private".into(),
                ipv6: true,
            },
        ],
        &[
            InstanceSpec {
                name: "web1".into(),
                subnet: 0,
            },
            InstanceSpec {
                name: "web2".into(),
                subnet: 0,
            },
            InstanceSpec {
                name: "db1".into(),
                subnet: 1,
            },
            InstanceSpec {
                name: "db2".into(),
                subnet: 1,
            },
        ],
    )
    .context("building the demo VPC (needs root)")?;
    let mut demo = Demo {
        bed,
        flat: FlatModel {
            subnets: vec![],
            instances: vec![],
            timeouts: Default::default(),
        },
        mode,
        rows: 0,
        mismatches: 0,
    };
    demo.bed.on_drop(|| {
        let _ = super::teardown_all();
    });
    for (name, tcp) in [
        ("web1", &[80u16][..]),
        ("web2", &[80]),
        ("db1", &[5432, 22]),
        ("db2", &[5432, 22]),
    ] {
        demo.bed
            .serve(name, tcp, &[53])
            .context("starting servers")?;
    }
    for s in &demo.bed.subnets {
        println!(
            "  subnet-{:<8} bridge {:<14} {} {}",
            s.name,
            s.bridge,
            s.cidr_v4,
            s.cidr_v6.clone().unwrap_or_default()
        );
    }
    for i in &demo.bed.instances {
        println!(
            "  i-{:<6} netns {:<16} port {:<14} {} {}",
            i.name,
            i.netns,
            i.port,
            i.v4,
            i.v6.map(|a| a.to_string()).unwrap_or_default()
        );
    }
    let base = model(&demo.bed, true, false);
    demo.apply(&base)?;
    println!(
        "\n{:<6} {:<6} {:<13} {:<8} {:<8} {:<28} ",
        "SRC", "DST", "PROTO", "EXPECTED", "OBSERVED", "DECIDED BY"
    );
    demo.row("web1", "web2", false, Kind::Tcp(80));
    demo.row("web1", "web2", true, Kind::Tcp(80));
    demo.row("db1", "web1", false, Kind::Tcp(80));
    demo.row("web1", "db1", false, Kind::Tcp(5432));
    demo.row("web2", "db2", true, Kind::Tcp(5432));
    demo.row("db2", "db1", false, Kind::Tcp(5432));
    demo.row("web1", "db1", false, Kind::Tcp(22));
    demo.row("web1", "db1", false, Kind::Udp(53));
    demo.row("db1", "web1", false, Kind::Ping);
    demo.row("db1", "web2", true, Kind::Ping);
    demo.row("web1", "db2", true, Kind::Ping);

    println!("\nlive change 1: revoke sg-db's PostgreSQL rule while web1 -> db1:5432 is connected");
    let db1 = demo.addr("db1", false);
    let mut conn = demo
        .bed
        .connect("web1", db1, 5432)
        .context("opening web1 -> db1:5432")?;
    let before = conn.alive();
    demo.check(
        "established connection carries data before the change",
        true,
        before,
    );
    demo.apply(&model(&demo.bed, false, false))?;
    let alive = conn.alive();
    demo.check(
        "established connection still carries data (tracked flow)",
        true,
        alive,
    );
    let fresh = demo.bed.tcp("web2", db1, 5432);
    demo.check("a new connection web2 -> db1:5432 is refused", false, fresh);

    println!(
        "\nlive change 2: add NACL deny rule 80 (tcp 5432) to the private subnet's inbound list"
    );
    demo.apply(&model(&demo.bed, false, true))?;
    let alive = conn.alive();
    demo.check(
        "the established connection stops (NACLs are stateless)",
        false,
        alive,
    );

    println!(
        "\n{} of {} rows match ({:.1} s, backend {mode})",
        demo.rows - demo.mismatches,
        demo.rows,
        t.elapsed().as_secs_f64()
    );
    if a.keep {
        demo.apply(&base)?;
        println!(
            "\nthe demo VPC keeps running (policy back to the start). Try:\n  ip netns exec {} ping {}\n  sgfw status\n  sgfw flows --accepts\nCtrl-C removes everything.",
            demo.bed.instance("web1").netns,
            demo.addr("db1", false)
        );
        loop {
            std::thread::park();
        }
    }
    drop(demo.bed);
    if demo.mismatches > 0 {
        eprintln!("sgfw demo: {} row(s) did not match", demo.mismatches);
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
