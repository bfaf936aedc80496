//! The eBPF backend: compiles a [`FlatModel`] into BPF maps and keeps TC
//! classifiers attached to every port of every subnet bridge.
//!
//! Owns the BPF object's lifecycle (load, pin under [`PIN_ROOT`], attach with
//! TCX, teardown) and the atomic update protocol ([`write_generation`]). It
//! must never leave a half-written policy in force: new entries are written
//! under ids of their own (content-addressed, so unchanged objects are not
//! rewritten), each instance and subnet is then
//! switched with one hash-map write, and only then are old entries removed;
//! any failure before the switch completes restores the previous contents.

pub mod compile;
mod loader;
mod pins;
mod readout;
mod session;
mod state;
#[cfg(feature = "lab")]
pub mod testrun;
mod update;

pub use loader::*;
pub use pins::*;
pub use readout::*;
pub use state::*;
pub use update::*;

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::{Map, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use serde::{Deserialize, Serialize};
use sgfw_common::{
    AddrKey, CidrKeyV4, CidrKeyV6, Config, CtKey, InstancePolicy, NaclMeta, PortKey, Reason,
    SubnetPolicy, map_names as mn, program_names as pn,
};

use crate::flat::FlatModel;
use crate::sys::{self, Host, KernelMaps, MapOps, SysError};
use compile::{CompileError, Compiled, IdBook, Indices, LpmEntry};

/// Where sgfw pins its maps, programs and links.
pub const PIN_ROOT: &str = "/sys/fs/bpf/sgfw";
/// Where sgfw keeps the state a later `apply`, `status` or `flows` needs.
pub const STATE_PATH: &str = "/run/sgfw/ebpf.json";

/// The BPF object, embedded at build time (empty when built without it).
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sgfw.bpf.o"));

/// Errors of the eBPF backend.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The model does not fit the dataplane's structures.
    #[error("the model cannot be compiled for the eBPF backend")]
    Compile(#[from] CompileError),
    /// This binary was built without the BPF object.
    #[error("this sgfw binary has no BPF object embedded; build it with `cargo xtask build`")]
    NotBuilt,
    /// Loading the object or a program failed (verifier, permissions, kernel).
    #[error("loading the BPF object failed")]
    Load(#[source] Box<aya::EbpfError>),
    /// A program operation failed.
    #[error("{what} failed")]
    Program {
        /// What was being done, naming the program or interface.
        what: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A host interaction failed.
    #[error(transparent)]
    Sys(#[from] SysError),
    /// A map is too small for the new model next to the one in force.
    #[error(
        "map {map} holds at most {capacity} entries but this apply needs {needed}; run `sgfw teardown` and apply again to resize"
    )]
    Capacity {
        /// The map.
        map: &'static str,
        /// Its max_entries.
        capacity: u32,
        /// Entries needed during the switch.
        needed: usize,
    },
    /// The state file is unreadable.
    #[error("state file {path} is corrupt")]
    State {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// sgfw is not applied on this host.
    #[error("sgfw (eBPF backend) is not applied on this host")]
    NotApplied,
}

fn prog_err(what: String, e: impl std::error::Error + Send + Sync + 'static) -> EbpfError {
    EbpfError::Program {
        what,
        source: Box::new(e),
    }
}

/// Where an instance port's sending leg is judged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dataplane {
    /// TC classifiers only.
    #[default]
    Tc,
    /// An XDP pre-filter (`sgfw_xdp_from_instance`, native mode where the
    /// driver has it) in front of the TC classifiers on every bound and
    /// unbound instance port: what the instance sends that its leg denies
    /// drops before the bridge and TC see it; everything else is judged by
    /// TC as with [`Dataplane::Tc`]. On veth ports it costs more than it
    /// saves (veth copies each skb into an XDP buffer, and the peer loses
    /// TSO): see the README's measurements.
    Xdp,
}

impl std::fmt::Display for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dataplane::Tc => "tc",
            Dataplane::Xdp => "xdp",
        })
    }
}

impl std::str::FromStr for Dataplane {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tc" => Ok(Dataplane::Tc),
            "xdp" => Ok(Dataplane::Xdp),
            other => Err(format!("dataplane {other:?}: expected tc or xdp")),
        }
    }
}

/// Options of an apply.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Conntrack capacity at first load; 0 = from the model's size
    /// ([`conntrack_capacity_for`]).
    pub conntrack_max: u32,
    /// Also report accepted new flows as events.
    pub emit_accepts: bool,
    /// TC only, or an XDP pre-filter in front (eBPF backend only).
    pub dataplane: Dataplane,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            conntrack_max: 0,
            emit_accepts: false,
            dataplane: Dataplane::Tc,
        }
    }
}

/// Conntrack entries per instance when the capacity comes from the model.
pub const CONNTRACK_PER_INSTANCE: u32 = 2048;
/// Bounds of a capacity that comes from the model.
pub const CONNTRACK_MIN: u32 = 65_536;
/// See [`CONNTRACK_MIN`].
pub const CONNTRACK_MAX: u32 = 1 << 20;

/// The conntrack capacity for a model of `instances` instances when no
/// flag sets it: [`CONNTRACK_PER_INSTANCE`] each, rounded up to a power of
/// two, within [`CONNTRACK_MIN`]..=[`CONNTRACK_MAX`] (the map is
/// preallocated: about 150 bytes of kernel memory per entry).
pub fn conntrack_capacity_for(instances: usize) -> u32 {
    u32::try_from(instances)
        .unwrap_or(u32::MAX)
        .saturating_mul(CONNTRACK_PER_INSTANCE)
        .checked_next_power_of_two()
        .unwrap_or(CONNTRACK_MAX)
        .clamp(CONNTRACK_MIN, CONNTRACK_MAX)
}

/// What an apply did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ApplyReport {
    /// Generation now in force.
    pub generation: u32,
    /// Whether the object was loaded by this apply (first apply).
    pub loaded: bool,
    /// Ports newly attached.
    pub attached: Vec<String>,
    /// Entries written per map.
    pub entries: BTreeMap<String, usize>,
}

/// The eBPF backend, rooted at a pin directory and a state file.
///
/// Clones share what the backend remembers of its own last apply (the
/// state it saved, its objects' keys, the content addresses of its rule
/// lists: see `session`), which makes the next apply of this process cost
/// what the change costs. That memory is trusted only while the state file
/// is the one this process wrote.
#[derive(Debug, Clone)]
pub struct EbpfBackend {
    /// Pin directory (normally [`PIN_ROOT`]).
    pub pin_root: PathBuf,
    /// State file (normally [`STATE_PATH`]).
    pub state_path: PathBuf,
    session: std::sync::Arc<session::Shared>,
}

impl Default for EbpfBackend {
    fn default() -> Self {
        EbpfBackend::at(PathBuf::from(PIN_ROOT), PathBuf::from(STATE_PATH))
    }
}

impl EbpfBackend {
    /// The backend at other pin and state paths (tests, benchmarks,
    /// several emulators on one host).
    pub fn at(pin_root: PathBuf, state_path: PathBuf) -> EbpfBackend {
        EbpfBackend {
            pin_root,
            state_path,
            session: std::sync::Arc::default(),
        }
    }

    /// The session's memory (a poisoned lock only means an apply panicked
    /// half-way: the memory is then forgotten, never trusted).
    fn session(&self) -> std::sync::MutexGuard<'_, session::Session> {
        match self.session.0.lock() {
            Ok(g) => g,
            Err(p) => {
                let mut g = p.into_inner();
                g.forget();
                g
            }
        }
    }

    /// The state of the policy in force, if any.
    pub fn state(&self) -> Result<Option<State>, EbpfError> {
        State::load(&self.state_path)
    }

    /// Whether sgfw's pins exist.
    pub fn is_applied(&self) -> bool {
        map_pin(&self.pin_root, mn::CONFIG).exists()
    }

    /// Opens the pinned maps.
    pub fn open_maps(&self) -> Result<KernelMaps, EbpfError> {
        let mut km = KernelMaps::default();
        for name in ALL_MAPS {
            let path = map_pin(&self.pin_root, name);
            if !path.exists() {
                continue;
            }
            let data = MapData::from_pin(&path)
                .map_err(|e| prog_err(format!("opening {}", path.display()), e))?;
            let fd = data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| prog_err("duplicating a map fd".into(), e))?;
            km.insert(name, fd);
        }
        Ok(km)
    }

    /// Where the last apply recorded its objects' map keys ([`ObjectKeys`]).
    pub(crate) fn keys_path(&self) -> PathBuf {
        self.state_path.with_extension("keys")
    }

    /// Validated model in, enforcement out: compiles, loads and pins on first
    /// use, writes the new generation atomically, attaches every bridge port.
    /// Nothing is changed when compiling fails or the maps are too small.
    pub fn apply(
        &self,
        model: &FlatModel,
        host: &dyn Host,
        opts: &ApplyOptions,
    ) -> Result<ApplyReport, EbpfError> {
        self.apply_with(model, host, opts, false)
    }

    /// [`EbpfBackend::apply`] for a process that applies again soon (a
    /// [`crate::vpc::Vpc`]'s deltas): the record of the objects' keys is
    /// written when this backend is let go of, not by every apply. Until
    /// then an apply by another process walks the tries instead of reading
    /// it (slower, the same result).
    ///
    /// # Errors
    ///
    /// As [`EbpfBackend::apply`].
    pub fn apply_deferred(
        &self,
        model: &FlatModel,
        host: &dyn Host,
        opts: &ApplyOptions,
    ) -> Result<ApplyReport, EbpfError> {
        self.apply_with(model, host, opts, true)
    }

    fn apply_with(
        &self,
        model: &FlatModel,
        host: &dyn Host,
        opts: &ApplyOptions,
        defer_keys: bool,
    ) -> Result<ApplyReport, EbpfError> {
        let _lock = self.lock()?;
        let mut session = self.session();
        let mut on_file = session.state(&self.state_path)?;
        if self.is_applied() && on_file.is_none() {
            // Pins without their state (the state directory was cleared):
            // the numbering they were written with is lost, so start afresh.
            tracing::warn!(
                "{} holds pins but {} is gone; removing them and loading afresh",
                self.pin_root.display(),
                self.state_path.display()
            );
            session.forget();
            self.teardown_unlocked()?;
            on_file = self.state()?;
        }
        let applied = self.is_applied();
        let mut state = on_file.filter(|_| applied).unwrap_or_default();
        // What the maps hold now, as the last apply left them (nothing
        // before the first).
        let prev = applied.then(|| Prev {
            generation: state.generation,
            entry_counts: state.entry_counts.clone(),
            capacities: state.capacities.clone(),
        });
        state.indices.update(model);
        // After an apply that did not finish, no object of the book may be
        // trusted to be whole in the maps: compile everything fresh (under
        // ids after every id handed out so far) and sweep the rest.
        let sweep = state.unsettled;
        if sweep {
            tracing::warn!(
                "the last apply did not finish; rewriting every object under new ids and removing the rest"
            );
            state.book.ids.clear();
            state.book.parts.clear();
        }
        let t = std::time::Instant::now();
        let mut compiled =
            compile::compile_with(model, &state.indices, &state.book, &mut session.memo)?;
        let counts = compiled.entry_counts();
        tracing::info!(
            "compiled {} instances: {} SG prefixes, {} port-set entries, {} NACL tables ({} emitted, {} ms)",
            compiled.instances.len(),
            counts[0].1 + counts[1].1,
            counts[2].1,
            compiled.nacl_meta.len(),
            compiled.sg_cidr_v4.len() + compiled.sg_cidr_v6.len() + compiled.sg_ports.len(),
            t.elapsed().as_millis()
        );
        let mut report = ApplyReport::default();
        let phase = std::cell::Cell::new(std::time::Instant::now());
        let lap = |what: &str| {
            tracing::debug!("apply: {what} {} us", phase.get().elapsed().as_micros());
            phase.set(std::time::Instant::now());
        };

        sys::ensure_bpffs()?;
        let mut maps = if let Some(prev) = &prev {
            let km = self.open_maps()?;
            // Capacity check before anything is written: what the maps hold
            // now (recorded by the last apply) plus everything of this model.
            let old = prev.entry_counts.clone();
            for (map, need) in needed(&compiled, &old) {
                let capacity = prev.capacities.get(map).copied().unwrap_or(0);
                if need > capacity as usize {
                    return Err(EbpfError::Capacity {
                        map,
                        capacity,
                        needed: need,
                    });
                }
            }
            km
        } else {
            let caps = capacities(&compiled, opts.conntrack_max);
            for (map, need) in needed(&compiled, &BTreeMap::new()) {
                let capacity = caps.get(map).copied().unwrap_or(0);
                if need > capacity as usize {
                    return Err(EbpfError::Capacity {
                        map,
                        capacity,
                        needed: need,
                    });
                }
            }
            tracing::info!("loading the BPF object (first apply)");
            let mut ebpf = load_object(&caps)?;
            let km = kernel_maps_of(&ebpf)?;
            self.pin_object(&mut ebpf)?;
            tracing::info!(
                "connection tracking: {} entries, {:.1} MiB of kernel memory (preallocated)",
                caps.get(mn::CONNTRACK).copied().unwrap_or(0),
                km.memory().get(mn::CONNTRACK).copied().unwrap_or(0) as f64 / 1_048_576.0
            );
            state.capacities = caps.iter().map(|(k, v)| (k.to_string(), *v)).collect();
            report.loaded = true;
            km
        };

        lap("open maps, capacity check");
        // Bound ports: an instance's interface that exists now.
        let mut ports = Vec::new();
        state.interfaces.clear();
        for inst in &model.instances {
            if let (Some(ifname), Some(idx)) =
                (&inst.interface, state.indices.instances.get(&inst.id))
            {
                state.interfaces.insert(inst.id.clone(), ifname.clone());
                if let Some(ifx) = host.ifindex(ifname)? {
                    ports.push((ifx, *idx));
                }
            }
        }
        let generation = state.generation.wrapping_add(1).max(1);
        let flags = if opts.emit_accepts {
            sgfw_common::CONFIG_EMIT_ACCEPTS
        } else {
            0
        };
        let config = config_for(model, generation, flags);
        tracing::info!(
            "writing generation {generation} and switching {} instances",
            compiled.instances.len()
        );
        // The journal, before the first map write: this generation and these
        // ids are taken whatever happens next.
        if prev.is_some() {
            Journal {
                generation,
                next: state.book.next.max(compiled.book.next),
                indices: state.indices.clone(),
            }
            .save(&self.state_path)?;
        } else {
            // A journal of a load before a teardown is spent.
            let _ = std::fs::remove_file(Journal::path(&self.state_path));
        }
        lap("ports, journal");
        // The keys of the objects this apply retires, as the last apply
        // recorded them (a missing or stale record: walk the tries).
        let known = prev
            .as_ref()
            .and_then(|p| session.keys(&self.keys_path(), p.generation));
        let written = write_generation_over(
            &mut maps,
            &compiled,
            &ports,
            &config,
            known.as_ref(),
            &mut session.halves,
        )
        .and_then(|()| {
            if sweep {
                sweep_ids(&mut maps, &compiled.book)
            } else {
                Ok(())
            }
        });
        lap("map writes and switch");
        if let Err(e) = written {
            if report.loaded {
                // Nothing was in force before: leave nothing behind.
                let _ = self.teardown_unlocked();
            }
            return Err(e.into());
        }

        // The keys of this apply's objects for the next one. The next apply
        // deletes what this one retired: their keys are carried over from
        // the record this apply read.
        let keys = keys_for_next(&compiled, known);
        state.generation = generation;
        state.book = std::mem::take(&mut compiled.book);
        // A rule reference's id names one origin (content-addressed): the
        // names written for ids the last apply had are the same.
        let mut named = std::mem::take(&mut state.rule_refs);
        state.rule_refs = compiled
            .rule_refs
            .iter()
            .map(|(id, o)| (*id, named.remove(id).unwrap_or_else(|| o.to_string())))
            .collect();
        state.instance_ids = std::mem::take(&mut compiled.instance_ids);
        state.bridges = model
            .subnets
            .iter()
            .map(|s| (s.id.clone(), s.bridge.clone()))
            .collect();
        state.nacls = model
            .subnets
            .iter()
            .map(|s| (s.id.clone(), s.nacl_id.clone()))
            .collect();
        state.prefixes = model
            .subnets
            .iter()
            .flat_map(|s| {
                std::iter::once(s.cidr_v4.to_string()).chain(s.cidr_v6.map(|c| c.to_string()))
            })
            .collect();
        state.rule_counts = model
            .instances
            .iter()
            .map(|i| (i.id.clone(), (i.ingress.len(), i.egress.len())))
            .collect();
        report.entries = [
            (mn::ADDRS, compiled.addrs.len()),
            (mn::INSTANCES, compiled.instances.len()),
            (mn::SUBNETS, compiled.subnets.len()),
            (mn::NACL_META, compiled.nacl_meta.len()),
        ]
        .into_iter()
        .chain(counts)
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        // The maps now hold exactly this model's entries.
        state.entry_counts = report.entries.clone();
        state.unsettled = false;
        state.dataplane = opts.dataplane;
        state.save(&self.state_path)?;
        lap("state saved");
        drop(compiled);
        lap("compile output freed");

        let attached = self.attach_ports_with(host, &state);
        session.saved(&self.state_path, &self.keys_path(), state, keys, defer_keys);
        report.attached = attached?;
        lap("attach");
        report.generation = generation;
        Ok(report)
    }
}

/// What an apply needs of the state the last apply left.
struct Prev {
    generation: u32,
    entry_counts: BTreeMap<String, usize>,
    capacities: BTreeMap<String, u32>,
}

/// The record of [`ObjectKeys`] beside the state file: `SGFWKEY1`, the
/// generation (u32 LE), then per key the object id (u32 LE), the map's
/// index in `GENERATIONAL` (u8), the key's length (u16 LE) and its bytes.
mod keys_file {
    use super::ObjectKeys;
    use std::path::Path;

    const MAGIC: &[u8; 8] = b"SGFWKEY1";

    pub fn save(path: &Path, generation: u32, keys: &ObjectKeys) -> std::io::Result<()> {
        let mut out = Vec::with_capacity(16 + keys.len() * 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&generation.to_le_bytes());
        for (id, ks) in keys {
            if ks.is_empty() {
                // An object without entries: recorded so its absence is known.
                out.extend_from_slice(&id.to_le_bytes());
                out.push(u8::MAX);
                out.extend_from_slice(&0u16.to_le_bytes());
            }
            for (gi, k) in ks {
                let len = u16::try_from(k.len()).map_err(std::io::Error::other)?;
                out.extend_from_slice(&id.to_le_bytes());
                out.push(*gi);
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(k);
            }
        }
        let tmp = path.with_extension("keys.tmp");
        std::fs::write(&tmp, &out)?;
        std::fs::rename(&tmp, path)
    }

    /// The record, if it is whole and of `generation`.
    pub fn load(path: &Path, generation: u32) -> Option<ObjectKeys> {
        let b = std::fs::read(path).ok()?;
        let rest = b.strip_prefix(MAGIC.as_slice())?;
        let (g, mut rest) = rest.split_at_checked(4)?;
        if u32::from_le_bytes(g.try_into().ok()?) != generation {
            return None;
        }
        let mut keys = ObjectKeys::new();
        while !rest.is_empty() {
            let (head, tail) = rest.split_at_checked(7)?;
            let id = u32::from_le_bytes(head[0..4].try_into().ok()?);
            let gi = head[4];
            let len = usize::from(u16::from_le_bytes(head[5..7].try_into().ok()?));
            let (k, tail) = tail.split_at_checked(len)?;
            let e = keys.entry(id).or_default();
            if gi != u8::MAX {
                e.push((gi, k.to_vec()));
            }
            rest = tail;
        }
        Some(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::FakeMaps;

    fn names(object: &[u8], name: &str) -> bool {
        object.windows(name.len()).any(|w| w == name.as_bytes())
    }

    /// The production object holds the production programs only; the test
    /// programs (benchmark floor, port counts) and their map are in the test
    /// object. An empty object (not built) is a failure under CI.
    #[test]
    fn the_production_object_has_no_test_programs() {
        if BPF_OBJECT.is_empty() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but no BPF object is embedded"
            );
            return;
        }
        for p in PRODUCTION_PROGRAMS {
            assert!(names(BPF_OBJECT, p), "{p} missing");
        }
        for p in [
            pn::NOOP,
            pn::XDP_NOOP,
            pn::PORT_COUNT_INGRESS,
            pn::PORT_COUNT_EGRESS,
            mn::PORT_COUNTS,
        ] {
            assert!(!names(BPF_OBJECT, p), "{p} is in the production object");
        }
        #[cfg(feature = "lab")]
        if !testrun::BPF_TEST_OBJECT.is_empty() {
            for p in testrun::TEST_PROGRAMS {
                assert!(
                    names(testrun::BPF_TEST_OBJECT, p),
                    "{p} missing from the test object"
                );
            }
        }
    }

    fn flat(json: &str) -> FlatModel {
        let m = crate::model::Model::from_json(json).unwrap();
        crate::validate::validate(&m).unwrap().0.flatten()
    }

    const A: &str = r#"{"Subnets":[{"SubnetId":"subnet-a","CidrBlock":"10.0.0.0/24","Ipv6CidrBlock":"fd00::/64","Bridge":"bra"},
        {"SubnetId":"subnet-b","CidrBlock":"10.0.1.0/24","Bridge":"brb"}],
      "Instances":[{"InstanceId":"i-1","SubnetId":"subnet-a","PrivateIpAddress":"10.0.0.5","Ipv6Addresses":["fd00::5"],"SecurityGroupIds":["sg-1"]},
        {"InstanceId":"i-2","SubnetId":"subnet-b","PrivateIpAddress":"10.0.1.5","SecurityGroupIds":["sg-2"]}],
      "SecurityGroups":[{"GroupId":"sg-1","IpPermissions":[{"IpProtocol":"tcp","FromPort":80,"ToPort":90,"IpRanges":[{"CidrIp":"0.0.0.0/0"}]}],
          "IpPermissionsEgress":[{"IpProtocol":"-1","IpRanges":[{"CidrIp":"0.0.0.0/0"}]}]},
        {"GroupId":"sg-2","IpPermissions":[{"IpProtocol":"udp","FromPort":53,"ToPort":53,"UserIdGroupPairs":[{"GroupId":"sg-1"}]}]}],
      "NetworkAcls":[{"NetworkAclId":"acl-b","IsDefault":false,"Associations":[{"SubnetId":"subnet-b"}],
        "Entries":[{"RuleNumber":10,"Protocol":"6","RuleAction":"deny","Egress":false,"CidrBlock":"10.0.0.0/24","PortRange":{"From":22,"To":22}},
                   {"RuleNumber":20,"Protocol":"-1","RuleAction":"allow","Egress":false,"CidrBlock":"0.0.0.0/0"}]}]}"#;

    /// B: i-2 gone, i-3 added, sg-1 narrowed; every kind of map changes.
    const B: &str = r#"{"Subnets":[{"SubnetId":"subnet-a","CidrBlock":"10.0.0.0/24","Ipv6CidrBlock":"fd00::/64","Bridge":"bra"}],
      "Instances":[{"InstanceId":"i-1","SubnetId":"subnet-a","PrivateIpAddress":"10.0.0.5","SecurityGroupIds":["sg-1"]},
        {"InstanceId":"i-3","SubnetId":"subnet-a","PrivateIpAddress":"10.0.0.7","Ipv6Addresses":["fd00::7"],"SecurityGroupIds":["sg-1"]}],
      "SecurityGroups":[{"GroupId":"sg-1","IpPermissions":[{"IpProtocol":"tcp","FromPort":443,"ToPort":443,"Ipv6Ranges":[{"CidrIpv6":"::/0"}]}]}]}"#;

    /// Compiles against the book and writes; returns the book to keep.
    fn apply(
        maps: &mut FakeMaps,
        model: &FlatModel,
        idx: &mut Indices,
        book: &IdBook,
        generation: u32,
    ) -> Result<(Compiled, IdBook), SysError> {
        idx.update(model);
        let c = compile::compile(model, idx, book).unwrap();
        write_generation(maps, &c, &[(7, 1)], &config_for(model, generation, 0), None)?;
        let b = c.book.clone();
        Ok((c, b))
    }

    /// Every id found in the LPM keys and NACL metadata.
    fn ids_in_maps(maps: &FakeMaps) -> BTreeSet<u32> {
        let mut ids = BTreeSet::new();
        for (map, _, off) in GENERATIONAL {
            for k in maps
                .maps
                .get(*map)
                .map(|m| m.keys().cloned().collect::<Vec<_>>())
                .unwrap_or_default()
            {
                ids.insert(u32::from_be_bytes([
                    k[*off],
                    k[off + 1],
                    k[off + 2],
                    k[off + 3],
                ]));
            }
        }
        for k in maps
            .maps
            .get(mn::NACL_META)
            .map(|m| m.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            ids.insert(u32::from_ne_bytes([k[0], k[1], k[2], k[3]]));
        }
        ids
    }

    /// The conntrack capacity follows the model unless a flag sets it.
    #[test]
    fn conntrack_capacity_comes_from_the_model_unless_set() {
        assert_eq!(conntrack_capacity_for(0), CONNTRACK_MIN);
        assert_eq!(conntrack_capacity_for(20), CONNTRACK_MIN);
        assert_eq!(conntrack_capacity_for(100), 262_144);
        assert_eq!(conntrack_capacity_for(1_000), CONNTRACK_MAX);
        assert_eq!(conntrack_capacity_for(usize::MAX), CONNTRACK_MAX);
        let a = flat(A);
        let mut idx = Indices::default();
        idx.update(&a);
        let c = compile::compile(&a, &idx, &IdBook::default()).unwrap();
        assert_eq!(capacities(&c, 0)[mn::CONNTRACK], CONNTRACK_MIN);
        assert_eq!(capacities(&c, 12_345)[mn::CONNTRACK], 12_345);
    }

    /// Deleting retired objects by the keys the previous apply recorded
    /// leaves the maps exactly as walking the tries does, apply after apply,
    /// and the recorded path is the one taken once a record exists.
    #[test]
    fn recorded_keys_delete_exactly_what_walking_the_tries_deletes() {
        let (a, b) = (flat(A), flat(B));
        let (mut walk, mut rec) = (FakeMaps::default(), FakeMaps::default());
        let (mut iw, mut ir) = (Indices::default(), Indices::default());
        let (mut bw, mut br) = (IdBook::default(), IdBook::default());
        let mut known: Option<ObjectKeys> = None;
        let mut deleted_by_record = 0;
        for (g, m) in [&a, &b, &a, &b, &a].into_iter().enumerate() {
            let cfg = config_for(m, g as u32 + 1, 0);
            iw.update(m);
            let cw = compile::compile(m, &iw, &bw).unwrap();
            write_generation(&mut walk, &cw, &[(7, 1)], &cfg, None).unwrap();
            bw = cw.book.clone();
            ir.update(m);
            let cr = compile::compile(m, &ir, &br).unwrap();
            if known.as_ref().is_some_and(|k| {
                !cr.retire_now.is_empty() && cr.retire_now.iter().all(|id| k.contains_key(id))
            }) {
                deleted_by_record += 1;
            }
            write_generation(&mut rec, &cr, &[(7, 1)], &cfg, known.as_ref()).unwrap();
            known = Some(keys_for_next(&cr, known.take()));
            br = cr.book.clone();
            assert_eq!(walk.maps, rec.maps, "after apply {g}");
        }
        assert!(
            deleted_by_record >= 2,
            "the record was used {deleted_by_record} times"
        );
    }

    /// C: A with sg-2 widened by one permission; sg-1 (i-1's) unchanged.
    const C: &str = r#"{"Subnets":[{"SubnetId":"subnet-a","CidrBlock":"10.0.0.0/24","Ipv6CidrBlock":"fd00::/64","Bridge":"bra"},
        {"SubnetId":"subnet-b","CidrBlock":"10.0.1.0/24","Bridge":"brb"}],
      "Instances":[{"InstanceId":"i-1","SubnetId":"subnet-a","PrivateIpAddress":"10.0.0.5","Ipv6Addresses":["fd00::5"],"SecurityGroupIds":["sg-1"]},
        {"InstanceId":"i-2","SubnetId":"subnet-b","PrivateIpAddress":"10.0.1.5","SecurityGroupIds":["sg-2"]},
        {"InstanceId":"i-4","SubnetId":"subnet-b","PrivateIpAddress":"10.0.1.9","SecurityGroupIds":["sg-1"]}],
      "SecurityGroups":[{"GroupId":"sg-1","IpPermissions":[{"IpProtocol":"tcp","FromPort":80,"ToPort":90,"IpRanges":[{"CidrIp":"0.0.0.0/0"}]}],
          "IpPermissionsEgress":[{"IpProtocol":"-1","IpRanges":[{"CidrIp":"0.0.0.0/0"}]}]},
        {"GroupId":"sg-2","IpPermissions":[{"IpProtocol":"udp","FromPort":53,"ToPort":53,"UserIdGroupPairs":[{"GroupId":"sg-1"}]},
          {"IpProtocol":"tcp","FromPort":1000,"ToPort":2000,"IpRanges":[{"CidrIp":"192.0.2.0/24"},{"CidrIp":"0.0.0.0/0"}],"Ipv6Ranges":[{"CidrIpv6":"::/0"}]}]}],
      "NetworkAcls":[{"NetworkAclId":"acl-b","IsDefault":false,"Associations":[{"SubnetId":"subnet-b"}],
        "Entries":[{"RuleNumber":10,"Protocol":"6","RuleAction":"deny","Egress":false,"CidrBlock":"10.0.0.0/24","PortRange":{"From":22,"To":22}},
                   {"RuleNumber":20,"Protocol":"-1","RuleAction":"allow","Egress":false,"CidrBlock":"0.0.0.0/0"}]}]}"#;

    /// A compile that carries unchanged policies (and their port sets)
    /// without emitting them leaves the maps, the book's ids and the entry
    /// counts exactly as one that emits everything, apply after apply,
    /// whether retired objects are deleted by their recorded keys or by
    /// walking the tries; and it does carry.
    #[test]
    fn carrying_unchanged_policies_writes_exactly_what_emitting_all_writes() {
        let models: Vec<FlatModel> = [A, C, A, B, C, C, A, C].iter().map(|j| flat(j)).collect();
        let start = IdBook {
            seed: 42,
            ..IdBook::default()
        };
        // (maps, indices, book, recorded keys) for: emit all, carry with a
        // record, carry walking.
        let mut runs: Vec<(FakeMaps, Indices, IdBook, Option<ObjectKeys>)> = (0..3)
            .map(|_| (FakeMaps::default(), Indices::default(), start.clone(), None))
            .collect();
        let mut carried = 0;
        for (g, m) in models.iter().enumerate() {
            let cfg = config_for(m, g as u32 + 1, 0);
            let mut compiled = Vec::new();
            for (r, (maps, idx, book, known)) in runs.iter_mut().enumerate() {
                idx.update(m);
                let from = if r == 0 {
                    IdBook {
                        parts: BTreeMap::new(),
                        ..book.clone()
                    }
                } else {
                    book.clone()
                };
                let c = compile::compile(m, idx, &from).unwrap();
                let rec = if r == 2 { None } else { known.as_ref() };
                if r == 1 && g > 0 {
                    // The record names everything retiring (carried objects
                    // included): no apply falls back to walking the tries.
                    assert!(
                        rec.is_some_and(|k| c.retire_now.iter().all(|id| k.contains_key(id))),
                        "apply {g} would walk the tries"
                    );
                }
                write_generation(maps, &c, &[(7, 1)], &cfg, rec).unwrap();
                let next = keys_for_next(&c, rec.cloned());
                // The record built from the last one is the one built from
                // the compile, with the last one's entries carried.
                let mut reference = object_keys(&c);
                if let Some(mut k) = rec.cloned() {
                    for id in c.book.retiring.values().flatten().chain(&c.carried) {
                        if let Some(v) = k.remove(id) {
                            reference.insert(*id, v);
                        }
                    }
                }
                assert_eq!(next, reference, "record after apply {g}, run {r}");
                *known = Some(next);
                *book = c.book.clone();
                compiled.push(c);
            }
            let full = &compiled[0];
            assert!(full.carried.is_empty());
            let rows = [
                full.sg_cidr_v4.len(),
                full.sg_cidr_v6.len(),
                full.sg_ports.len(),
            ];
            for (r, c) in compiled.iter().enumerate().skip(1) {
                assert_eq!(
                    runs[0].0.maps, runs[r].0.maps,
                    "maps after apply {g}, run {r}"
                );
                assert_eq!(full.book.ids, c.book.ids, "ids after apply {g}, run {r}");
                assert_eq!(full.rule_refs, c.rule_refs, "rule refs after apply {g}");
                assert_eq!(
                    c.entry_counts().map(|(_, n)| n)[..3],
                    rows,
                    "entry counts after apply {g}, run {r}"
                );
                assert_eq!(full.fresh, c.fresh);
                assert_eq!(full.retired, c.retired);
            }
            carried += compiled[1].carried.len();
        }
        assert!(carried >= 4, "carried {carried} objects in all");
    }

    #[test]
    fn writing_only_what_differs_in_a_known_half_leaves_the_maps_a_full_rewrite_leaves() {
        let models: Vec<FlatModel> = [A, C, A, B, C, C, A, B, B, C]
            .iter()
            .map(|j| flat(j))
            .collect();
        // (maps, indices, book) written with a record of the halves, and
        // without (clearing the half each time).
        let (mut diffed, mut full) = (FakeMaps::default(), FakeMaps::default());
        let (mut idx, mut book) = (Indices::default(), IdBook::default());
        let mut halves: [Option<Half>; 2] = [None, None];
        let mut skipped = 0;
        for (g, m) in models.iter().enumerate() {
            idx.update(m);
            let c = compile::compile(m, &idx, &book).unwrap();
            let cfg = config_for(m, g as u32 + 1, 0);
            if g == 4 || g == 7 {
                // A failed apply (rolled back): the half it wrote is no
                // longer known, and the next apply clears it.
                diffed.fail_update_at = Some(diffed.updates + 1);
                let r = write_generation_over(&mut diffed, &c, &[(7, 1)], &cfg, None, &mut halves);
                assert!(r.is_err(), "apply {g} should have failed");
                assert_eq!(halves.iter().filter(|x| x.is_some()).count(), 1);
            }
            let before = diffed.updates;
            write_generation_over(&mut diffed, &c, &[(7, 1)], &cfg, None, &mut halves).unwrap();
            let diffed_writes = diffed.updates - before;
            let before = full.updates;
            write_generation(&mut full, &c, &[(7, 1)], &cfg, None).unwrap();
            let full_writes = full.updates - before;
            assert_eq!(diffed.maps, full.maps, "maps after apply {g}");
            skipped += full_writes - diffed_writes;
            book = c.book;
        }
        // Applying A, C, A…: the half written two applies ago mostly holds
        // the rows wanted now.
        assert!(skipped > 0, "no write was saved");
    }

    #[test]
    fn the_memo_of_rule_lists_changes_nothing_a_compile_gives() {
        let valid: Vec<crate::policy::ValidModel> = [A, C, A, B, C, C, A, C, B]
            .iter()
            .map(|j| {
                let m = crate::model::Model::from_json(j).unwrap();
                crate::validate::validate(&m).unwrap().0
            })
            .collect();
        let mut memo = compile::CompileMemo::default();
        let mut idx = Indices::default();
        let mut book = IdBook {
            seed: 42,
            ..IdBook::default()
        };
        let mut flat = valid[0].flatten();
        let mut hits = 0;
        for (g, v) in valid.iter().enumerate() {
            if g > 0 {
                // As a Vpc does: lists the change cannot reach are carried.
                flat = crate::flat::reflatten(&valid[g - 1], flat, v);
            }
            idx.update(&flat);
            let with = compile::compile_with(&flat, &idx, &book, &mut memo).unwrap();
            let without = compile::compile(&flat, &idx, &book).unwrap();
            assert_eq!(with, without, "compile {g}");
            hits += memo.hits();
            book = with.book;
        }
        assert!(hits >= 4, "the memo was used {hits} times");
        // Another seed (a book started afresh) is never served from it.
        let other = IdBook {
            seed: 7,
            ..IdBook::default()
        };
        let with = compile::compile_with(&flat, &idx, &other, &mut memo).unwrap();
        assert_eq!(memo.hits(), 0);
        assert_eq!(with, compile::compile(&flat, &idx, &other).unwrap());
    }

    #[test]
    fn a_failed_write_at_any_point_restores_the_previous_contents() {
        let (a, b) = (flat(A), flat(B));
        let mut base = FakeMaps::default();
        let mut idx = Indices::default();
        let (_, book) = apply(&mut base, &a, &mut idx, &IdBook::default(), 1).unwrap();
        let before = base.maps.clone();
        // How many writes a successful switch to B takes.
        let mut probe = base.clone();
        let start = probe.updates;
        apply(&mut probe, &b, &mut idx.clone(), &book, 2).unwrap();
        let total = probe.updates - start;
        assert!(
            total >= 5,
            "the switch should write several entries, wrote {total}"
        );
        for n in 0..total {
            let mut maps = base.clone();
            maps.fail_update_at = Some(maps.updates + n);
            let err = apply(&mut maps, &b, &mut idx.clone(), &book, 2);
            assert!(err.is_err(), "write {n} should have failed");
            let non_empty = |m: &BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>>| {
                m.iter()
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<BTreeMap<_, _>>()
            };
            assert_eq!(
                non_empty(&maps.maps),
                non_empty(&before),
                "after a failure at write {n} the previous generation must be intact"
            );
        }
    }

    #[test]
    fn a_switch_keeps_exactly_the_ids_in_use_and_rewrites_nothing_unchanged() {
        let (a, b) = (flat(A), flat(B));
        let mut idx = Indices::default();
        let mut maps = FakeMaps::default();
        let (_, book_a) = apply(&mut maps, &a, &mut idx, &IdBook::default(), 1).unwrap();
        let (cb, book_b) = apply(&mut maps, &b, &mut idx, &book_a, 2).unwrap();
        let in_use: BTreeSet<u32> = book_b.ids.values().copied().collect();
        let present = ids_in_maps(&maps);
        // The ids B retired stay for one apply (the old half names them).
        let retiring: BTreeSet<u32> = book_b.retiring.values().flatten().copied().collect();
        assert_eq!(retiring, cb.retired);
        assert!(
            present.is_subset(&in_use.union(&retiring).copied().collect()),
            "unknown ids: {:?}",
            present.difference(&in_use)
        );
        // Every key the compile produced is in the maps.
        let expected: BTreeSet<u32> = cb
            .sg_cidr_v4
            .iter()
            .map(|e| key_id(e.key.table))
            .chain(cb.sg_cidr_v6.iter().map(|e| key_id(e.key.table)))
            .chain(cb.sg_ports.iter().map(|e| key_id(e.key.set)))
            .chain(cb.nacl_ports.iter().map(|e| key_id(e.key.set)))
            .collect();
        assert!(
            expected.is_subset(&present),
            "missing: {:?}",
            expected.difference(&present)
        );
        assert!(!cb.retired.is_empty(), "B drops objects of A");
        // Applying B again writes no lookup entry at all: only the switch maps.
        let before = maps.updates;
        let (c2, _) = apply(&mut maps, &b, &mut idx, &book_b, 3).unwrap();
        assert!(c2.fresh.is_empty() && c2.retired.is_empty());
        // ... and deletes what B retired: now exactly the ids in use remain.
        let present = ids_in_maps(&maps);
        assert!(
            present.is_subset(&in_use) && present.is_disjoint(&cb.retired),
            "retired ids stayed: {:?}",
            present.difference(&in_use)
        );
        let switch_writes = c2.identities.len() + c2.addrs.len() + c2.instances.len() + c2.subnets.len() + 1 /* port */ + 1 /* config */;
        assert_eq!(
            maps.updates - before,
            switch_writes,
            "an unchanged model rewrote lookup entries"
        );
        // Stable indices: i-1 kept its number across the change.
        assert_eq!(idx.instances.get("i-1"), Some(&1));
    }

    #[test]
    fn content_addressed_ids_survive_reordering_and_change_with_content() {
        let a = flat(A);
        let mut idx = Indices::default();
        idx.update(&a);
        let c1 = compile::compile(&a, &idx, &IdBook::default()).unwrap();
        let c2 = compile::compile(&a, &idx, &c1.book).unwrap();
        assert_eq!(c1.book, c2.book, "the same model maps to the same ids");
        assert!(c2.fresh.is_empty());
        let b = flat(B);
        idx.update(&b);
        let c3 = compile::compile(&b, &idx, &c1.book).unwrap();
        assert!(!c3.fresh.is_empty(), "changed policies need new ids");
        assert!(
            c3.fresh
                .iter()
                .all(|id| !c1.book.ids.values().any(|v| v == id)),
            "new ids are never reused ones"
        );
    }
}
