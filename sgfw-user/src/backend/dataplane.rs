//! The [`Backend`] trait: what every dataplane does (apply, attach,
//! teardown, status, counters, flows), and the one place where switching
//! from one backend to another happens ([`apply_switching`]).
//!
//! This module owns the common shape of a backend's answers ([`Applied`],
//! [`Status`], [`Counters`]) and the switch: the new backend enforces first,
//! then any other backend still applied on the host is removed. Both the
//! library's [`super::Enforcer`] and the `sgfw` command go through it. It
//! must never decide which backend to use (that is [`super::select`]) nor
//! take the host lock (its callers hold it).

use std::collections::BTreeMap;

use serde::Serialize;
use sgfw_common::Reason;

use super::{EnforceError, EnforcementMode};
use crate::ebpf::{ApplyOptions, EbpfBackend, EventStream};
use crate::flat::FlatModel;
use crate::nft::{CounterKind, NftBackend};
use crate::sys::{Host, RealHost};

/// What an apply did, whichever backend did it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Applied {
    /// The backend that enforces now.
    pub mode: Option<EnforcementMode>,
    /// Policy generation now in force (eBPF).
    pub generation: Option<u32>,
    /// Whether the programs were loaded and pinned by this apply (eBPF).
    pub loaded: bool,
    /// Ports newly attached (eBPF).
    pub attached: Vec<String>,
    /// Size of the ruleset text (nftables).
    pub ruleset_bytes: Option<usize>,
    /// Sysctls this apply had to set to 1 (nftables).
    pub sysctls_set: Vec<String>,
    /// What the operator should know.
    pub notes: Vec<String>,
    /// The backends this apply replaced and removed.
    pub replaced: Vec<EnforcementMode>,
}

impl Applied {
    /// One line for an operator, starting with `; ` (appended to "applied …").
    pub fn summary(&self) -> String {
        let mut s = String::new();
        match self.mode {
            Some(EnforcementMode::Ebpf) => {
                s.push_str(&format!(
                    "; generation {}, {} ports newly attached",
                    self.generation.unwrap_or(0),
                    self.attached.len()
                ));
                if self.loaded {
                    s.push_str(", programs loaded and pinned under /sys/fs/bpf/sgfw");
                }
            }
            Some(EnforcementMode::Nftables) => {
                s.push_str(&format!(
                    "; {} bytes of ruleset in one nft transaction",
                    self.ruleset_bytes.unwrap_or(0)
                ));
                if !self.sysctls_set.is_empty() {
                    s.push_str(&format!(", set {}", self.sysctls_set.join(", ")));
                }
            }
            Some(EnforcementMode::Disabled) | None => {
                s.push_str("; enforcement disabled (metadata only)");
            }
        }
        for r in &self.replaced {
            s.push_str(match r {
                EnforcementMode::Ebpf => "; the eBPF dataplane it replaces was removed",
                EnforcementMode::Nftables => "; the nftables ruleset it replaces was removed",
                EnforcementMode::Disabled => "",
            });
        }
        s
    }
}

/// Packets per (instance id, `allow:<stage>` / `drop:<reason>`); `None` is
/// traffic no instance is charged with (passthrough, drops before any stage).
pub type Counters = BTreeMap<(Option<String>, String), u64>;

/// `sgfw status --json`: the backend in force and what it enforces.
#[derive(Debug, Serialize)]
pub struct Status {
    /// `ebpf`, `nftables` or `none`.
    pub backend: String,
    /// Why that backend.
    pub reason: String,
    /// Policy generation (eBPF).
    pub generation: Option<u32>,
    /// `tc` or `xdp` (eBPF): where instance ports judge what they send.
    pub dataplane: Option<String>,
    /// Subnets.
    pub subnets: Vec<SubnetStatus>,
    /// Instances.
    pub instances: Vec<InstanceStatus>,
    /// Connection-tracking entries in use (eBPF).
    pub conntrack_entries: Option<usize>,
    /// Connection-tracking capacity (eBPF).
    pub conntrack_capacity: Option<u32>,
    /// Kernel memory of the connection-tracking map, bytes (eBPF).
    pub conntrack_bytes: Option<u64>,
    /// Counters not tied to an instance: reason → packets.
    pub unattributed: BTreeMap<String, u64>,
}

/// One subnet.
#[derive(Debug, Serialize)]
pub struct SubnetStatus {
    /// Subnet id.
    pub id: String,
    /// Bridge.
    pub bridge: String,
    /// NACL in force.
    pub nacl: String,
    /// Ports with the classifiers attached.
    pub ports: Vec<String>,
}

/// One instance.
#[derive(Debug, Serialize)]
pub struct InstanceStatus {
    /// Instance id.
    pub id: String,
    /// Bound interface.
    pub interface: Option<String>,
    /// Resolved ingress rules.
    pub ingress_rules: usize,
    /// Resolved egress rules.
    pub egress_rules: usize,
    /// reason → packets (`allow:sg-egress`, `drop:nacl-in`, ...).
    pub counters: BTreeMap<String, u64>,
}

/// A dataplane that enforces a [`FlatModel`] on this host.
pub trait Backend: std::fmt::Debug {
    /// Which one it is.
    fn mode(&self) -> EnforcementMode;
    /// Whether it enforces something on this host now.
    fn applied(&self) -> bool;
    /// Enforces `model`, atomically: on error the previous policy stays.
    ///
    /// # Errors
    ///
    /// The backend's error, with its cause chain.
    fn enforce(&self, model: &FlatModel, opts: &ApplyOptions) -> Result<Applied, EnforceError>;
    /// Attaches to bridge ports that appeared since the last apply; their names.
    ///
    /// # Errors
    ///
    /// The backend's error.
    fn attach(&self) -> Result<Vec<String>, EnforceError>;
    /// Removes every trace of it.
    ///
    /// # Errors
    ///
    /// The backend's error.
    fn remove(&self) -> Result<(), EnforceError>;
    /// What it enforces now.
    ///
    /// # Errors
    ///
    /// The backend's error.
    fn status(&self) -> Result<Status, EnforceError>;
    /// Its packet counters.
    ///
    /// # Errors
    ///
    /// The backend's error.
    fn counters(&self) -> Result<Counters, EnforceError>;
    /// A live stream of its decisions.
    ///
    /// # Errors
    ///
    /// [`EnforceError::Unsupported`] where it has none.
    fn flows(&self) -> Result<EventStream, EnforceError>;
}

/// The backend for `mode` at its default place on this host.
pub fn backend_for(mode: EnforcementMode) -> Box<dyn Backend> {
    match mode {
        EnforcementMode::Ebpf => Box::new(EbpfBackend::default()),
        EnforcementMode::Nftables => Box::new(NftBackend::new(&RealHost)),
        EnforcementMode::Disabled => Box::new(Disabled),
    }
}

/// The backend in force on this host, if any (eBPF first).
pub fn applied_mode() -> Option<EnforcementMode> {
    [EnforcementMode::Ebpf, EnforcementMode::Nftables]
        .into_iter()
        .find(|m| backend_for(*m).applied())
}

/// The switch, in one place: `target` enforces `model`, then every backend
/// of `others` still applied is removed (the new one enforces before the old
/// one goes, so there is no unfiltered moment). The caller holds the host lock.
///
/// # Errors
///
/// The first backend error; when `target` failed nothing else was touched.
pub fn apply_switching(
    target: &dyn Backend,
    others: &[&dyn Backend],
    model: &FlatModel,
    opts: &ApplyOptions,
) -> Result<Applied, EnforceError> {
    let mut applied = target.enforce(model, opts)?;
    for other in others {
        if other.mode() != target.mode() && other.applied() {
            other.remove()?;
            applied.replaced.push(other.mode());
        }
    }
    Ok(applied)
}

/// Metadata only: every call succeeds and changes nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Disabled;

impl Backend for Disabled {
    fn mode(&self) -> EnforcementMode {
        EnforcementMode::Disabled
    }
    fn applied(&self) -> bool {
        false
    }
    fn enforce(&self, _: &FlatModel, _: &ApplyOptions) -> Result<Applied, EnforceError> {
        Ok(Applied {
            mode: Some(EnforcementMode::Disabled),
            ..Applied::default()
        })
    }
    fn attach(&self) -> Result<Vec<String>, EnforceError> {
        Ok(Vec::new())
    }
    fn remove(&self) -> Result<(), EnforceError> {
        Ok(())
    }
    fn status(&self) -> Result<Status, EnforceError> {
        Ok(Status {
            backend: "none".into(),
            reason: "sgfw is not applied on this host (sgfw apply -f MODEL)".into(),
            generation: None,
            dataplane: None,
            subnets: vec![],
            instances: vec![],
            conntrack_entries: None,
            conntrack_capacity: None,
            conntrack_bytes: None,
            unattributed: BTreeMap::new(),
        })
    }
    fn counters(&self) -> Result<Counters, EnforceError> {
        Ok(Counters::new())
    }
    fn flows(&self) -> Result<EventStream, EnforceError> {
        Err(EnforceError::Unsupported {
            what: "flows",
            why: "enforcement is disabled".into(),
        })
    }
}

fn reason_label(r: Reason) -> String {
    format!(
        "{}:{}",
        if r.is_drop() { "drop" } else { "allow" },
        r.name()
    )
}

/// What an eBPF apply did, as [`Applied`].
pub(crate) fn applied_of(r: crate::ebpf::ApplyReport) -> Applied {
    Applied {
        mode: Some(EnforcementMode::Ebpf),
        generation: Some(r.generation),
        loaded: r.loaded,
        attached: r.attached,
        ..Applied::default()
    }
}

impl Backend for EbpfBackend {
    fn mode(&self) -> EnforcementMode {
        EnforcementMode::Ebpf
    }
    fn applied(&self) -> bool {
        self.is_applied()
    }
    fn enforce(&self, model: &FlatModel, opts: &ApplyOptions) -> Result<Applied, EnforceError> {
        Ok(applied_of(self.apply(model, &RealHost, opts)?))
    }
    fn attach(&self) -> Result<Vec<String>, EnforceError> {
        Ok(self.attach_ports(&RealHost)?)
    }
    fn remove(&self) -> Result<(), EnforceError> {
        Ok(self.teardown()?)
    }
    fn status(&self) -> Result<Status, EnforceError> {
        let state = self.state()?.unwrap_or_default();
        let counters = EbpfBackend::counters(self)?;
        let ports = self.attached_ports();
        let host = RealHost;
        let subnets = state
            .bridges
            .iter()
            .map(|(id, br)| {
                let on_bridge: Vec<String> = host
                    .bridge_ports(br)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|p| p.name)
                    .collect();
                SubnetStatus {
                    id: id.clone(),
                    bridge: br.clone(),
                    nacl: state.nacls.get(id).cloned().unwrap_or_default(),
                    ports: ports
                        .iter()
                        .filter(|(n, _)| on_bridge.contains(n))
                        .map(|(n, _)| n.clone())
                        .collect(),
                }
            })
            .collect();
        let instances = state
            .instance_ids
            .iter()
            .map(|(idx, id)| {
                let (i, e) = state.rule_counts.get(id).copied().unwrap_or_default();
                InstanceStatus {
                    id: id.clone(),
                    interface: state.interfaces.get(id).cloned(),
                    ingress_rules: i,
                    egress_rules: e,
                    counters: counters
                        .iter()
                        .filter(|((ix, _), _)| ix == idx)
                        .map(|((_, r), v)| (reason_label(*r), *v))
                        .collect(),
                }
            })
            .collect();
        Ok(Status {
            backend: "ebpf".into(),
            reason: match state.dataplane {
                crate::ebpf::Dataplane::Tc => {
                    format!("TC classifiers pinned under {}", self.pin_root.display())
                }
                crate::ebpf::Dataplane::Xdp => format!(
                    "XDP pre-filter and TC classifiers pinned under {}",
                    self.pin_root.display()
                ),
            },
            generation: Some(state.generation),
            dataplane: Some(state.dataplane.to_string()),
            subnets,
            instances,
            conntrack_entries: self.conntrack_len().ok(),
            conntrack_capacity: state
                .capacities
                .get(sgfw_common::map_names::CONNTRACK)
                .copied(),
            conntrack_bytes: self
                .open_maps()
                .ok()
                .and_then(|m| m.memory().get(sgfw_common::map_names::CONNTRACK).copied()),
            unattributed: counters
                .iter()
                .filter(|((ix, _), _)| *ix == 0)
                .map(|((_, r), v)| (reason_label(*r), *v))
                .collect(),
        })
    }
    fn counters(&self) -> Result<Counters, EnforceError> {
        let state = self.state()?.unwrap_or_default();
        Ok(EbpfBackend::counters(self)?
            .into_iter()
            .map(|((ix, r), v)| ((state.instance_ids.get(&ix).cloned(), reason_label(r)), v))
            .collect())
    }
    fn flows(&self) -> Result<EventStream, EnforceError> {
        Ok(self.events()?)
    }
}

impl Backend for NftBackend<'_> {
    fn mode(&self) -> EnforcementMode {
        EnforcementMode::Nftables
    }
    fn applied(&self) -> bool {
        self.probe().is_ok() && self.is_applied().unwrap_or(false)
    }
    fn enforce(&self, model: &FlatModel, _: &ApplyOptions) -> Result<Applied, EnforceError> {
        let r = self.apply(model)?;
        Ok(Applied {
            mode: Some(EnforcementMode::Nftables),
            ruleset_bytes: Some(r.ruleset_bytes),
            sysctls_set: r.sysctls_set,
            notes: r.notes,
            ..Applied::default()
        })
    }
    fn attach(&self) -> Result<Vec<String>, EnforceError> {
        // nftables rules follow addresses and bridges, not ports.
        Ok(Vec::new())
    }
    fn remove(&self) -> Result<(), EnforceError> {
        Ok(self.teardown()?)
    }
    fn status(&self) -> Result<Status, EnforceError> {
        let mut unattributed = BTreeMap::new();
        let mut per: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for ((who, label), v) in Backend::counters(self)? {
            match who {
                Some(id) => *per.entry(id).or_default().entry(label).or_default() += v,
                None => *unattributed.entry(label).or_default() += v,
            }
        }
        Ok(Status {
            backend: "nftables".into(),
            reason: "table inet sgfw (counters per subnet and instance)".into(),
            generation: None,
            dataplane: None,
            subnets: vec![],
            instances: per
                .into_iter()
                .map(|(id, counters)| InstanceStatus {
                    id,
                    interface: None,
                    ingress_rules: 0,
                    egress_rules: 0,
                    counters,
                })
                .collect(),
            conntrack_entries: None,
            conntrack_capacity: None,
            conntrack_bytes: None,
            unattributed,
        })
    }
    fn counters(&self) -> Result<Counters, EnforceError> {
        let mut out = Counters::new();
        for c in NftBackend::counters(self)? {
            let (who, label) = match c.kind {
                CounterKind::Passthrough => (None, "allow:passthrough".to_string()),
                CounterKind::Tracked => (None, "allow:tracked".to_string()),
                CounterKind::Dropped { reason } => (None, format!("drop:{reason}")),
                CounterKind::Stage { stage, allowed, .. } => (
                    Some(c.label.clone()),
                    format!("{}:{stage}", if allowed { "allow" } else { "drop" }),
                ),
            };
            *out.entry((who, label)).or_default() += c.packets;
        }
        Ok(out)
    }
    fn flows(&self) -> Result<EventStream, EnforceError> {
        Err(EnforceError::Unsupported {
            what: "flows",
            why: NftBackend::flows_supported()
                .err()
                .unwrap_or("not supported")
                .into(),
        })
    }
}

#[cfg(test)]
mod tests {
    //! The switch, with recording fakes: the new backend enforces before the
    //! old one goes, and a failed apply touches nothing else.
    use std::cell::RefCell;

    use super::*;

    #[derive(Debug)]
    struct Fake<'a> {
        mode: EnforcementMode,
        applied: bool,
        fail: bool,
        log: &'a RefCell<Vec<String>>,
    }

    impl Backend for Fake<'_> {
        fn mode(&self) -> EnforcementMode {
            self.mode
        }
        fn applied(&self) -> bool {
            self.applied
        }
        fn enforce(&self, _: &FlatModel, _: &ApplyOptions) -> Result<Applied, EnforceError> {
            self.log.borrow_mut().push(format!("enforce {}", self.mode));
            if self.fail {
                return Err(EnforceError::Unsupported {
                    what: "apply",
                    why: "fake failure".into(),
                });
            }
            Ok(Applied {
                mode: Some(self.mode),
                ..Applied::default()
            })
        }
        fn attach(&self) -> Result<Vec<String>, EnforceError> {
            Ok(vec![])
        }
        fn remove(&self) -> Result<(), EnforceError> {
            self.log.borrow_mut().push(format!("remove {}", self.mode));
            Ok(())
        }
        fn status(&self) -> Result<Status, EnforceError> {
            Disabled.status()
        }
        fn counters(&self) -> Result<Counters, EnforceError> {
            Ok(Counters::new())
        }
        fn flows(&self) -> Result<EventStream, EnforceError> {
            Disabled.flows()
        }
    }

    fn model() -> FlatModel {
        crate::testutil::flat_of(crate::testutil::FIXTURE)
    }

    #[test]
    fn the_new_backend_enforces_before_the_old_one_goes() {
        let log = RefCell::new(vec![]);
        let new = Fake {
            mode: EnforcementMode::Ebpf,
            applied: false,
            fail: false,
            log: &log,
        };
        let old = Fake {
            mode: EnforcementMode::Nftables,
            applied: true,
            fail: false,
            log: &log,
        };
        let others: [&dyn Backend; 2] = [&new, &old];
        let a = apply_switching(&new, &others, &model(), &ApplyOptions::default()).unwrap();
        assert_eq!(*log.borrow(), ["enforce ebpf", "remove nftables"]);
        assert_eq!(a.replaced, [EnforcementMode::Nftables]);
        assert!(
            a.summary()
                .contains("nftables ruleset it replaces was removed")
        );
    }

    #[test]
    fn a_failed_apply_leaves_the_old_backend_in_force() {
        let log = RefCell::new(vec![]);
        let new = Fake {
            mode: EnforcementMode::Nftables,
            applied: false,
            fail: true,
            log: &log,
        };
        let old = Fake {
            mode: EnforcementMode::Ebpf,
            applied: true,
            fail: false,
            log: &log,
        };
        let others: [&dyn Backend; 1] = [&old];
        assert!(apply_switching(&new, &others, &model(), &ApplyOptions::default()).is_err());
        assert_eq!(*log.borrow(), ["enforce nftables"], "nothing removed");
    }
}
