//! Conformance scenarios: a test bed, a model built from its addresses, a
//! backend enforcing it, and probes whose expected outcome is stated by the
//! test (from docs/semantics.md) *and* checked against the reference evaluator.
//! The same scenario code runs on the eBPF and the nftables backend.

use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};

use sgfw::ebpf::{ApplyOptions, EbpfBackend};
use sgfw::eval::{Conntrack, evaluate};
use sgfw::flat::FlatModel;
use sgfw::model::{IpPermission, Model, NetworkAcl, NetworkAclEntry, SecurityGroup};
use sgfw::nft::NftBackend;
use sgfw::packet::{Packet, TcpFlags};
use sgfw::sys::RealHost;

use crate::testbed::{InstanceSpec, LongConn, SubnetSpec, TestBed};

/// Which dataplane enforces the scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// TC classifiers.
    Ebpf,
    /// `table inet sgfw`.
    Nft,
    /// TC classifiers with the XDP pre-filter in front on every port.
    Xdp,
}

/// The nft table is host-global: nft scenarios take turns.
static NFT_TURN: Mutex<()> = Mutex::new(());

/// A probe kind.
#[derive(Debug, Clone, Copy)]
pub enum Probe {
    /// TCP connect to a port.
    Tcp(u16),
    /// UDP request/reply to a port.
    Udp(u16),
    /// ICMP / ICMPv6 echo.
    Ping,
}

/// A running scenario.
pub struct Lab {
    /// The topology.
    pub bed: TestBed,
    backend: Backend,
    ebpf: EbpfBackend,
    flat: Option<FlatModel>,
    _turn: Option<MutexGuard<'static, ()>>,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("backend", &self.backend)
            .field("bed", &self.bed)
            .finish()
    }
}

/// A security group with ingress and egress permissions.
pub fn sg(id: &str, ingress: Vec<IpPermission>, egress: Vec<IpPermission>) -> SecurityGroup {
    SecurityGroup {
        group_id: id.into(),
        ip_permissions: ingress,
        ip_permissions_egress: egress,
        ..SecurityGroup::default()
    }
}

/// Egress (or ingress) to everything, both families.
pub fn all_anywhere() -> IpPermission {
    IpPermission::all().from_cidr("0.0.0.0/0").from_cidr("::/0")
}

/// A NACL entry.
pub fn entry(
    num: i64,
    egress: bool,
    proto: &str,
    action: &str,
    cidr: &str,
    ports: Option<(i64, i64)>,
) -> NetworkAclEntry {
    NetworkAclEntry::new(num, egress, proto, action, cidr, ports)
}

/// A custom NACL associated with one subnet.
pub fn nacl(id: &str, subnet: &str, entries: Vec<NetworkAclEntry>) -> NetworkAcl {
    NetworkAcl::custom(id, subnet, entries)
}

impl Lab {
    /// Builds the bed. `subnets`: names (all dual-stack); `instances`:
    /// (name, subnet index).
    pub fn new(backend: Backend, subnets: &[&str], instances: &[(&str, usize)]) -> Lab {
        let turn =
            (backend == Backend::Nft).then(|| NFT_TURN.lock().unwrap_or_else(|e| e.into_inner()));
        let bed = TestBed::new(
            &subnets
                .iter()
                .map(|s| SubnetSpec {
                    name: (*s).into(),
                    ipv6: true,
                })
                .collect::<Vec<_>>(),
            &instances
                .iter()
                .map(|(n, s)| InstanceSpec {
                    name: (*n).into(),
                    subnet: *s,
                })
                .collect::<Vec<_>>(),
        )
        .unwrap_or_else(|e| fail(&format!("building the test bed: {e}")));
        let tag = bed
            .instances
            .first()
            .map(|i| i.netns.clone())
            .unwrap_or_default();
        let ebpf = EbpfBackend::at(
            format!("/sys/fs/bpf/{tag}").into(),
            format!("/run/sgfw-test/{tag}.json").into(),
        );
        let mut lab = Lab {
            bed,
            backend,
            ebpf: ebpf.clone(),
            flat: None,
            _turn: turn,
        };
        lab.bed.on_drop(move || match backend {
            Backend::Ebpf | Backend::Xdp => {
                let _ = ebpf.teardown();
                // The backend keeps its lock file; this bed's is its own.
                let _ = std::fs::remove_file(ebpf.state_path.with_extension("lock"));
                let _ = std::fs::remove_dir("/run/sgfw-test");
            }
            Backend::Nft => {
                let _ = NftBackend::new(&RealHost).teardown();
            }
        });
        lab
    }

    /// Subnet id of subnet `i` in models.
    pub fn subnet_id(&self, i: usize) -> String {
        format!("subnet-{}", self.bed.subnets[i].name)
    }

    /// A subnet's CIDR.
    pub fn cidr(&self, i: usize, v6: bool) -> String {
        let s = &self.bed.subnets[i];
        if v6 {
            s.cidr_v6.clone().unwrap_or_default()
        } else {
            s.cidr_v4.clone()
        }
    }

    /// An instance's address.
    pub fn addr(&self, inst: &str, v6: bool) -> IpAddr {
        let i = self.bed.instance(inst);
        match (v6, i.v6) {
            (true, Some(a)) => IpAddr::V6(a),
            _ => IpAddr::V4(i.v4),
        }
    }

    /// The model: the bed's subnets and instances (each bound to its port)
    /// with these groups, security groups and NACLs.
    pub fn model(
        &self,
        groups: &[(&str, &[&str])],
        sgs: Vec<SecurityGroup>,
        nacls: Vec<NetworkAcl>,
    ) -> Model {
        let mut m = self.bed.model_skeleton(|name| {
            groups
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, g)| g.iter().map(|s| (*s).to_string()).collect())
                .unwrap_or_default()
        });
        m.security_groups = sgs;
        m.network_acls = nacls;
        m
    }

    /// Validates and enforces a model with the lab's backend.
    pub fn apply(&mut self, model: &Model) {
        let (valid, _) = sgfw::validate::validate(model)
            .unwrap_or_else(|e| fail(&format!("invalid scenario model:\n{e}")));
        let flat = valid.flatten();
        match self.backend {
            Backend::Ebpf | Backend::Xdp => {
                let opts = ApplyOptions {
                    dataplane: if self.backend == Backend::Xdp {
                        sgfw::ebpf::Dataplane::Xdp
                    } else {
                        sgfw::ebpf::Dataplane::Tc
                    },
                    ..ApplyOptions::default()
                };
                if let Err(e) = self.ebpf.apply(&flat, &RealHost, &opts) {
                    fail(&format!("eBPF apply: {e:?}"));
                }
            }
            Backend::Nft => {
                if let Err(e) = NftBackend::new(&RealHost).apply(&flat) {
                    fail(&format!("nft apply: {e:?}"));
                }
            }
        }
        if self.backend == Backend::Xdp {
            // The pre-filter must really be in front: a link on every port
            // of the lab's bridges, native mode on these veths.
            for inst in &self.bed.instances {
                let port = &inst.port;
                let l = crate::testbed::sh(&["ip", "-d", "link", "show", "dev", port])
                    .unwrap_or_default();
                if !l.contains(" xdp ") {
                    fail(&format!(
                        "xdp dataplane: no native XDP program on {port}: {l}"
                    ));
                }
            }
        }
        self.flat = Some(flat);
    }

    /// Attaches the lab's eBPF classifiers to ports that appeared (what the
    /// watcher does on a link event); returns their names.
    pub fn attach_ports(&self) -> Vec<String> {
        self.ebpf
            .attach_ports(&RealHost)
            .unwrap_or_else(|e| fail(&format!("attaching ports: {e:?}")))
    }

    /// What the reference evaluator says of the probe: the first packet and
    /// its reply both delivered, from fresh connection tracking.
    pub fn evaluator(&self, from: &str, to: IpAddr, probe: Probe) -> bool {
        let Some(flat) = &self.flat else { return false };
        let src = self.addr(from, to.is_ipv6());
        let req = match probe {
            Probe::Tcp(p) => Packet::tcp(src, to, 40000, p, TcpFlags::SYN),
            Probe::Udp(p) => Packet::udp(src, to, 40000, p),
            Probe::Ping => Packet::echo_request(src, to, 7),
        };
        let mut ct = Conntrack::new();
        let now = 1_000_000_000_000;
        evaluate(flat, &mut ct, &req, now).allowed
            && evaluate(flat, &mut ct, &req.reply(), now + 1000).allowed
    }

    /// Sends the probe for real.
    pub fn probe(&self, from: &str, to: IpAddr, probe: Probe) -> bool {
        match probe {
            Probe::Tcp(p) => self.bed.tcp(from, to, p),
            Probe::Udp(p) => self.bed.udp(from, to, p),
            Probe::Ping => self.bed.ping(from, to),
        }
    }

    /// Asserts that the probe is delivered iff `expected`, and that the
    /// reference evaluator agrees.
    pub fn expect(&self, from: &str, to: &str, v6: bool, probe: Probe, expected: bool) {
        let dst = self.addr(to, v6);
        self.expect_addr(from, dst, probe, expected);
    }

    /// [`Lab::expect`] to any address.
    pub fn expect_addr(&self, from: &str, dst: IpAddr, probe: Probe, expected: bool) {
        let model_says = self.evaluator(from, dst, probe);
        assert_eq!(
            model_says, expected,
            "the reference evaluator disagrees with the scenario: {from} -> {dst} {probe:?}"
        );
        let got = self.probe(from, dst, probe);
        assert_eq!(
            got,
            expected,
            "[{:?}] {from} -> {dst} {probe:?}: {} but expected {}",
            self.backend,
            if got { "delivered" } else { "not delivered" },
            if expected {
                "delivered"
            } else {
                "not delivered"
            }
        );
    }

    /// Switches between the eBPF dataplanes (TC only, XDP in front) for the
    /// next [`Lab::apply`]; the nftables backend is not one of them.
    pub fn set_dataplane(&mut self, xdp: bool) {
        assert!(
            self.backend != Backend::Nft,
            "set_dataplane on an nftables lab"
        );
        self.backend = if xdp { Backend::Xdp } else { Backend::Ebpf };
    }

    /// This lab's eBPF backend (its own pin root and state file).
    pub fn ebpf(&self) -> &EbpfBackend {
        &self.ebpf
    }

    /// Starts echo servers.
    pub fn serve(&mut self, inst: &str, tcp: &[u16], udp: &[u16]) {
        if let Err(e) = self.bed.serve(inst, tcp, udp) {
            fail(&format!("starting servers: {e}"));
        }
    }

    /// Opens a long-lived connection (must succeed).
    pub fn connect(&self, from: &str, to: &str, v6: bool, port: u16) -> LongConn {
        self.bed
            .connect(from, self.addr(to, v6), port)
            .unwrap_or_else(|e| fail(&format!("long connection: {e}")))
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }
}

#[expect(clippy::panic, reason = "scenario helpers fail the calling test")]
fn fail(msg: &str) -> ! {
    panic!("{msg}")
}
