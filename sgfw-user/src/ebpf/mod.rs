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
#[cfg(feature = "lab")]
pub mod testrun;

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::{Map, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{SchedClassifier, TcAttachType};
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

/// What a later run needs to know about the policy in force.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    /// Policy generation (bumped by each apply).
    pub generation: u32,
    /// Ids of the compiled objects in the maps, by content.
    #[serde(default)]
    pub book: IdBook,
    /// Stable instance/subnet numbering.
    pub indices: Indices,
    /// SG rule reference → display name.
    pub rule_refs: BTreeMap<u32, String>,
    /// Instance index → id.
    pub instance_ids: BTreeMap<u32, String>,
    /// Subnet id → bridge.
    pub bridges: BTreeMap<String, String>,
    /// Map name → max_entries as loaded.
    pub capacities: BTreeMap<String, u32>,
    /// Instance id → bound interface name.
    pub interfaces: BTreeMap<String, String>,
    /// Instance id → (ingress rules, egress rules) after flattening.
    #[serde(default)]
    pub rule_counts: BTreeMap<String, (usize, usize)>,
    /// Subnet id → NACL id in force.
    #[serde(default)]
    pub nacls: BTreeMap<String, String>,
    /// Entries per map after the last apply (for the capacity check).
    #[serde(default)]
    pub entry_counts: BTreeMap<String, usize>,
    /// An apply began writing the maps and did not record that it finished
    /// (it was killed, or failed while removing retired ids): `book` may not
    /// describe what the maps hold. `generation` and `book.next` were
    /// already advanced past everything that apply may have written, so
    /// neither is ever handed out twice; the next apply writes every object
    /// under new ids and sweeps every id it does not use.
    #[serde(default)]
    pub unsettled: bool,
    /// The subnets' prefixes, for the bridge-family fence ([`fence_rules`]).
    #[serde(default)]
    pub prefixes: Vec<String>,
}

impl State {
    /// Reads the state file; `None` when sgfw is not applied.
    pub fn load(path: &Path) -> Result<Option<State>, EbpfError> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|source| EbpfError::State {
                    path: path.to_path_buf(),
                    source,
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SysError::File {
                what: "reading",
                path: path.to_path_buf(),
                source,
            }
            .into()),
        }
    }

    fn save(&self, path: &Path) -> Result<(), EbpfError> {
        parent_dir(path)?;
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| EbpfError::State {
            path: path.to_path_buf(),
            source,
        })?;
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|source| {
                SysError::File {
                    what: "writing",
                    path: path.to_path_buf(),
                    source,
                }
                .into()
            })
    }
}

/// Creates the directory a file of sgfw's goes in.
fn parent_dir(path: &Path) -> Result<(), SysError> {
    match path.parent() {
        Some(dir) => std::fs::create_dir_all(dir).map_err(|source| SysError::File {
            what: "creating",
            path: dir.to_path_buf(),
            source,
        }),
        None => Ok(()),
    }
}

fn lpm_bytes<K: bytemuck::Pod>(prefix_len: u32, key: &K) -> Vec<u8> {
    let mut v = prefix_len.to_ne_bytes().to_vec();
    v.extend_from_slice(bytemuck::bytes_of(key));
    v
}

/// The map contents an apply writes, as (map, key bytes, value bytes).
fn lpm_rows<'a, K: bytemuck::Pod, V: bytemuck::Pod>(
    map: &'static str,
    rows: &'a [LpmEntry<K, V>],
    keep: impl Fn(&K) -> bool + 'a,
) -> impl Iterator<Item = (&'static str, Vec<u8>, Vec<u8>)> + 'a {
    rows.iter().filter(move |e| keep(&e.key)).map(move |e| {
        (
            map,
            lpm_bytes(e.prefix_len, &e.key),
            bytemuck::bytes_of(&e.value).to_vec(),
        )
    })
}

/// Key size of each id-carrying map, with where the id sits in the key.
const GENERATIONAL: &[(&str, usize, usize)] = &[
    // (map, key size incl. prefixlen, offset of the big-endian id)
    (mn::SG_CIDR_V4, 4 + size_of::<CidrKeyV4>(), 4),
    (mn::SG_CIDR_V6, 4 + size_of::<CidrKeyV6>(), 4),
    (mn::SG_PORTS, 4 + size_of::<PortKey>(), 4),
    (mn::NACL_CIDR_V4, 4 + size_of::<CidrKeyV4>(), 4),
    (mn::NACL_CIDR_V6, 4 + size_of::<CidrKeyV6>(), 4),
    (mn::NACL_PORTS, 4 + size_of::<PortKey>(), 4),
];

/// The `CONFIG` element for a model and generation.
pub fn config_for(model: &FlatModel, generation: u32, flags: u32) -> Config {
    let t = model.timeouts;
    let ns = |s: u32| u64::from(s) * 1_000_000_000;
    Config {
        time_override_ns: 0,
        tcp_established_ns: ns(t.tcp_established),
        tcp_new_ns: ns(t.tcp_new),
        tcp_closing_ns: ns(t.tcp_closing),
        udp_ns: ns(t.udp),
        udp_stream_ns: ns(t.udp_stream),
        icmp_ns: ns(t.icmp),
        other_ns: ns(t.other),
        flags,
        events_per_sec: 1000,
        generation,
        slot: 0,
    }
}

/// One map's contents: key bytes → value bytes.
type Snapshot = BTreeMap<Vec<u8>, Vec<u8>>;

/// The bridge-family fence for ports not attached yet, as one `nft -f`
/// transaction that replaces `table bridge NAME`. It complements the TC
/// fence (which stops what such a port *sends*) with what is sent *to* it,
/// and between two such ports. `meta ibrname` is missing on some kernels,
/// so the rules are scoped by the ports sgfw attached and by the subnets'
/// prefixes, never by bridge name:
/// - `forward` (a frame one port of a bridge hands another): from an
///   attached port to one that is not attached; from a port that is not
///   attached, to or from a subnet address;
/// - `output` (the host hands a bridge a frame): to a subnet address (IP,
///   or ARP asking for one) at a port that is not attached.
pub fn fence_rules(table: &str, attached: &BTreeSet<u32>, prefixes: &[String]) -> String {
    let (v4, v6): (Vec<&String>, Vec<&String>) = prefixes.iter().partition(|p| !p.contains(':'));
    let set = |name: &str, ty: &str, flags: &str, elems: Vec<String>| {
        if elems.is_empty() {
            format!("  set {name} {{ type {ty}; {flags}}}\n")
        } else {
            format!(
                "  set {name} {{ type {ty}; {flags}elements = {{ {} }} }}\n",
                elems.join(", ")
            )
        }
    };
    let mut t = format!("table bridge {table} {{}}\ndelete table bridge {table}\n");
    t.push_str(&format!("table bridge {table} {{\n"));
    t.push_str(&set(
        "attached",
        "iface_index",
        "",
        attached.iter().map(u32::to_string).collect(),
    ));
    t.push_str(&set(
        "prefixes4",
        "ipv4_addr",
        "flags interval; ",
        v4.iter().map(|s| s.to_string()).collect(),
    ));
    t.push_str(&set(
        "prefixes6",
        "ipv6_addr",
        "flags interval; ",
        v6.iter().map(|s| s.to_string()).collect(),
    ));
    t.push_str(
        "  chain forward {\n    type filter hook forward priority -300; policy accept;\n    \
         iif @attached oif != @attached counter drop\n    \
         iif != @attached ip saddr @prefixes4 counter drop\n    \
         iif != @attached ip daddr @prefixes4 counter drop\n    \
         iif != @attached ip6 saddr @prefixes6 counter drop\n    \
         iif != @attached ip6 daddr @prefixes6 counter drop\n    \
         iif != @attached arp daddr ip @prefixes4 counter drop\n  }\n",
    );
    t.push_str(
        "  chain output {\n    type filter hook output priority -300; policy accept;\n    \
         oif != @attached ip daddr @prefixes4 counter drop\n    \
         oif != @attached ip6 daddr @prefixes6 counter drop\n    \
         oif != @attached arp daddr ip @prefixes4 counter drop\n  }\n}\n",
    );
    t
}

/// The maps with two halves ([`sgfw_common::Config::slot`]): (map, key
/// size, value size).
const SLOTTED: [(&str, usize, usize); 4] = [
    (mn::IDENTITIES, 4, size_of::<AddrKey>()),
    (
        mn::ADDRS,
        size_of::<AddrKey>(),
        size_of::<sgfw_common::AddrInfo>(),
    ),
    (mn::INSTANCES, 4, size_of::<InstancePolicy>()),
    (mn::SUBNETS, 4, size_of::<SubnetPolicy>()),
];

/// The half a key of a [`SLOTTED`] map is in.
fn slot_of(map: &str, key: &[u8]) -> u32 {
    if map == mn::ADDRS {
        u32::from(key.get(1).copied().unwrap_or(0) & 1)
    } else {
        let b = [
            key.first().copied().unwrap_or(0),
            key.get(1).copied().unwrap_or(0),
            key.get(2).copied().unwrap_or(0),
            key.get(3).copied().unwrap_or(0),
        ];
        u32::from_ne_bytes(b) >> 31
    }
}

/// Empties one half of every [`SLOTTED`] map.
fn clear_slot(maps: &mut dyn MapOps, slot: u32) -> Result<(), SysError> {
    for (map, ks, _) in SLOTTED {
        for k in maps.keys(map, ks)? {
            if slot_of(map, &k) == slot {
                maps.delete(map, &k)?;
            }
        }
    }
    Ok(())
}

/// The half of the maps in force (0 before the first apply).
pub(crate) fn slot_in_force(maps: &mut dyn MapOps) -> Result<u32, SysError> {
    Ok(maps
        .lookup(mn::CONFIG, &0u32.to_ne_bytes(), size_of::<Config>())?
        .and_then(|v| bytemuck::try_pod_read_unaligned::<Config>(&v).ok())
        .map_or(0, |c| c.slot & 1))
}

/// Writes a compiled generation into the maps with the switch protocol
/// described in the module docs: everything the datapath reads per
/// instance, subnet and address goes into the half of the maps not in
/// force, then one write of `CONFIG` (generation and half) switches all of
/// it at once, then the old half and the retired ids are removed. `ports`
/// is ifindex → instance index for bound ports. On an error before the
/// switch, the maps are as they were (best effort for the restore itself)
/// and the error is returned; a kill at any point leaves either the old
/// policy or the new one in force, whole.
pub fn write_generation(
    maps: &mut dyn MapOps,
    c: &Compiled,
    ports: &[(u32, u32)],
    config: &Config,
) -> Result<(), SysError> {
    let new = slot_in_force(maps)? ^ 1;
    // Port bindings are not halved (instance indices are stable): keep them
    // to restore on failure.
    let mut old_ports: Snapshot = BTreeMap::new();
    for k in maps.keys(mn::PORTS, 4)? {
        if let Some(v) = maps.lookup(mn::PORTS, &k, 4)? {
            old_ports.insert(k, v);
        }
    }
    let mut config = *config;
    config.slot = new;
    // The half about to be written held the generation before last, the only
    // one that still named the ids the last apply retired: both go now.
    let result = clear_slot(maps, new)
        .and_then(|()| delete_ids(maps, &c.retire_now, &c.retire_now_kinds))
        .and_then(|()| write_and_switch(maps, c, ports, &config, new));
    if let Err(e) = result {
        // Roll back: the half in force was never touched.
        let _ = clear_slot(maps, new);
        if let Ok(keys) = maps.keys(mn::PORTS, 4) {
            for k in keys {
                if !old_ports.contains_key(&k) {
                    let _ = maps.delete(mn::PORTS, &k);
                }
            }
        }
        for (k, v) in &old_ports {
            let _ = maps.update(mn::PORTS, k, v);
        }
        // The new objects were never referenced: drop them again.
        let _ = delete_ids(maps, &c.fresh, &c.fresh_kinds);
        return Err(e);
    }
    // The new generation is in force. The old half, and the ids only it
    // names, stay until the next apply: a packet whose hook read `CONFIG`
    // just before the switch, or whose stamp names the old half, still finds
    // them (deleting them at once lost replies under 1,000 applies).
    let keep: BTreeSet<Vec<u8>> = ports
        .iter()
        .map(|(i, _)| i.to_ne_bytes().to_vec())
        .collect();
    for k in maps.keys(mn::PORTS, 4)? {
        if !keep.contains(&k) {
            maps.delete(mn::PORTS, &k)?;
        }
    }
    Ok(())
}

/// Deletes every entry of these ids (one pass over the id-keyed maps; none
/// when there is nothing to delete).
fn delete_ids(
    maps: &mut dyn MapOps,
    ids: &BTreeSet<u32>,
    kinds: &BTreeSet<char>,
) -> Result<(), SysError> {
    if ids.is_empty() {
        return Ok(());
    }
    // Only the maps that objects of these kinds have entries in.
    let holds = |map: &str| match map {
        mn::SG_CIDR_V4 | mn::SG_CIDR_V6 => kinds.contains(&'p'),
        mn::SG_PORTS => kinds.contains(&'s'),
        _ => kinds.contains(&'n'),
    };
    for (map, ks, off) in GENERATIONAL.iter().filter(|g| holds(g.0)) {
        for k in maps.keys(map, *ks)? {
            let id = u32::from_be_bytes([k[*off], k[off + 1], k[off + 2], k[off + 3]]);
            if ids.contains(&id) {
                maps.delete(map, &k)?;
            }
        }
    }
    if kinds.contains(&'n') {
        for id in ids {
            maps.delete(mn::NACL_META, &id.to_ne_bytes())?;
        }
    }
    Ok(())
}

/// Deletes every entry of the id-keyed maps whose id `book` does not use:
/// what an apply that did not finish may have left, whole or in part.
fn sweep_ids(maps: &mut dyn MapOps, book: &IdBook) -> Result<(), SysError> {
    let live: BTreeSet<u32> = book.ids.values().copied().collect();
    for (map, ks, off) in GENERATIONAL {
        for k in maps.keys(map, *ks)? {
            let id = u32::from_be_bytes([k[*off], k[off + 1], k[off + 2], k[off + 3]]);
            if !live.contains(&id) {
                maps.delete(map, &k)?;
            }
        }
    }
    for k in maps.keys(mn::NACL_META, 4)? {
        let id = u32::from_ne_bytes([k[0], k[1], k[2], k[3]]);
        if !live.contains(&id) {
            maps.delete(mn::NACL_META, &k)?;
        }
    }
    Ok(())
}

/// The id inside an LPM key's data (big-endian, first 4 bytes).
fn key_id(table: [u8; 4]) -> u32 {
    u32::from_be_bytes(table)
}

fn write_and_switch(
    maps: &mut dyn MapOps,
    c: &Compiled,
    ports: &[(u32, u32)],
    config: &Config,
    slot: u32,
) -> Result<(), SysError> {
    // 1. The new objects' lookup structures, beside the ones in force
    //    (objects the maps already hold keep their ids and are not touched).
    let fresh = |id: u32| c.fresh.contains(&id);
    let rows = lpm_rows(mn::SG_CIDR_V4, &c.sg_cidr_v4, |k| fresh(key_id(k.table)))
        .chain(lpm_rows(mn::SG_CIDR_V6, &c.sg_cidr_v6, |k| {
            fresh(key_id(k.table))
        }))
        .chain(lpm_rows(mn::SG_PORTS, &c.sg_ports, |k| {
            fresh(key_id(k.set))
        }))
        .chain(lpm_rows(mn::NACL_CIDR_V4, &c.nacl_cidr_v4, |k| {
            fresh(key_id(k.table))
        }))
        .chain(lpm_rows(mn::NACL_CIDR_V6, &c.nacl_cidr_v6, |k| {
            fresh(key_id(k.table))
        }))
        .chain(lpm_rows(mn::NACL_PORTS, &c.nacl_ports, |k| {
            fresh(key_id(k.set))
        }));
    for (map, k, v) in rows {
        maps.update(map, &k, &v)?;
    }
    for (id, meta) in c.nacl_meta.iter().filter(|(id, _)| fresh(*id)) {
        maps.update(
            mn::NACL_META,
            &id.to_ne_bytes(),
            bytemuck::bytes_of::<NaclMeta>(meta),
        )?;
    }
    // 2. The half not in force: subnets, instances, identities, addresses.
    let key = |i: u32| sgfw_common::slotted(i, slot).to_ne_bytes();
    let in_slot = |k: &AddrKey| AddrKey {
        slot: slot as u8,
        ..*k
    };
    for (idx, sp) in &c.subnets {
        maps.update(mn::SUBNETS, &key(*idx), bytemuck::bytes_of(sp))?;
    }
    for (idx, ip) in &c.instances {
        maps.update(mn::INSTANCES, &key(*idx), bytemuck::bytes_of(ip))?;
    }
    for (id, k) in &c.identities {
        maps.update(mn::IDENTITIES, &key(*id), bytemuck::bytes_of(&in_slot(k)))?;
    }
    for (k, v) in &c.addrs {
        maps.update(
            mn::ADDRS,
            bytemuck::bytes_of(&in_slot(k)),
            bytemuck::bytes_of(v),
        )?;
    }
    // Bindings of bound ports (instance indices are the same in both halves).
    for (ifx, inst) in ports {
        maps.update(mn::PORTS, &ifx.to_ne_bytes(), &inst.to_ne_bytes())?;
    }
    // 3. The switch: one array write makes the new half, and a new
    //    generation (every conntrack fast-path cache is re-validated), in
    //    force for every hook at once.
    maps.update(mn::CONFIG, &0u32.to_ne_bytes(), bytemuck::bytes_of(config))?;
    Ok(())
}

/// Map capacities for a first load: generous, since LPM tries allocate on
/// demand and two generations coexist during a switch.
fn capacities(c: &Compiled, conntrack_max: u32) -> BTreeMap<&'static str, u32> {
    let cap = |n: usize, min: u32| -> u32 {
        u32::try_from(n.saturating_mul(4).saturating_add(1024))
            .unwrap_or(u32::MAX)
            .max(min)
    };
    let mut m = BTreeMap::new();
    m.insert(mn::ADDRS, cap(c.addrs.len(), 4096));
    m.insert(mn::IDENTITIES, 65_536);
    m.insert(mn::INSTANCES, cap(c.instances.len(), 4096));
    m.insert(mn::SUBNETS, cap(c.subnets.len(), 1024));
    m.insert(mn::PORTS, cap(c.instances.len(), 4096));
    m.insert(mn::SG_CIDR_V4, cap(c.sg_cidr_v4.len(), 65_536));
    m.insert(mn::SG_CIDR_V6, cap(c.sg_cidr_v6.len(), 65_536));
    m.insert(mn::SG_PORTS, cap(c.sg_ports.len(), 262_144));
    m.insert(mn::NACL_CIDR_V4, cap(c.nacl_cidr_v4.len(), 16_384));
    m.insert(mn::NACL_CIDR_V6, cap(c.nacl_cidr_v6.len(), 16_384));
    m.insert(mn::NACL_PORTS, cap(c.nacl_ports.len(), 65_536));
    m.insert(mn::NACL_META, cap(c.nacl_meta.len(), 4096));
    m.insert(mn::CONNTRACK, conntrack_max);
    // Fragmented datagrams in flight per hook: bounded, LRU, 30 s each.
    m.insert(mn::FRAGS, 16_384);
    m.insert(
        mn::COUNTERS,
        (cap(c.instances.len(), 4096) + 1) * Reason::COUNT as u32,
    );
    m
}

/// Entries each map needs while both generations coexist.
fn needed(c: &Compiled, old: &BTreeMap<String, usize>) -> Vec<(&'static str, usize)> {
    let o = |m: &str| old.get(m).copied().unwrap_or(0);
    vec![
        (mn::ADDRS, c.addrs.len() + o(mn::ADDRS)),
        (mn::INSTANCES, c.instances.len() + o(mn::INSTANCES)),
        (mn::SUBNETS, c.subnets.len() + o(mn::SUBNETS)),
        (mn::SG_CIDR_V4, c.sg_cidr_v4.len() + o(mn::SG_CIDR_V4)),
        (mn::SG_CIDR_V6, c.sg_cidr_v6.len() + o(mn::SG_CIDR_V6)),
        (mn::SG_PORTS, c.sg_ports.len() + o(mn::SG_PORTS)),
        (mn::NACL_CIDR_V4, c.nacl_cidr_v4.len() + o(mn::NACL_CIDR_V4)),
        (mn::NACL_CIDR_V6, c.nacl_cidr_v6.len() + o(mn::NACL_CIDR_V6)),
        (mn::NACL_PORTS, c.nacl_ports.len() + o(mn::NACL_PORTS)),
        (mn::NACL_META, c.nacl_meta.len() + o(mn::NACL_META)),
    ]
}

/// Every map the object defines.
pub const ALL_MAPS: &[&str] = &[
    mn::ADDRS,
    mn::INSTANCES,
    mn::SUBNETS,
    mn::PORTS,
    mn::SG_CIDR_V4,
    mn::SG_CIDR_V6,
    mn::SG_PORTS,
    mn::NACL_CIDR_V4,
    mn::NACL_CIDR_V6,
    mn::NACL_PORTS,
    mn::NACL_META,
    mn::CONNTRACK,
    mn::CONFIG,
    mn::COUNTERS,
    mn::EVENTS,
    mn::FRAGS,
    mn::IDENTITIES,
    mn::EVENT_RATE,
    mn::SCRATCH,
];

/// Options of an apply.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Conntrack capacity at first load.
    pub conntrack_max: u32,
    /// Also report accepted new flows as events.
    pub emit_accepts: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            conntrack_max: 262_144,
            emit_accepts: false,
        }
    }
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
#[derive(Debug, Clone)]
pub struct EbpfBackend {
    /// Pin directory (normally [`PIN_ROOT`]).
    pub pin_root: PathBuf,
    /// State file (normally [`STATE_PATH`]).
    pub state_path: PathBuf,
}

impl Default for EbpfBackend {
    fn default() -> Self {
        EbpfBackend {
            pin_root: PathBuf::from(PIN_ROOT),
            state_path: PathBuf::from(STATE_PATH),
        }
    }
}

fn map_pin(root: &Path, name: &str) -> PathBuf {
    root.join("maps").join(name)
}

/// A TC classifier of the object by name.
pub fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut SchedClassifier, EbpfError> {
    ebpf.program_mut(name)
        .ok_or_else(|| {
            prog_err(
                format!("finding program {name}"),
                SysError::NoSuchMap(name.into()),
            )
        })?
        .try_into()
        .map_err(|e| prog_err(format!("program {name}"), e))
}

/// Loads the embedded object with the given map sizes (not attached, not pinned).
pub fn load_object(caps: &BTreeMap<&'static str, u32>) -> Result<Ebpf, EbpfError> {
    load_programs(BPF_OBJECT, caps, PRODUCTION_PROGRAMS)
}

/// The programs of the production object, each loaded (verified) by every
/// first apply. The test object adds the benchmark floor and the port-count
/// programs (`testrun::load_test_object`, with the `lab` feature).
pub const PRODUCTION_PROGRAMS: &[&str] = &[
    pn::FROM_INSTANCE,
    pn::TO_INSTANCE,
    pn::BRIDGE_UP,
    pn::BRIDGE_DOWN,
];

/// Loads `object` with map capacities `caps` and verifies `programs`.
///
/// # Errors
///
/// [`EbpfError::NotBuilt`] for an empty object, else the load's error.
pub fn load_programs(
    object: &[u8],
    caps: &BTreeMap<&'static str, u32>,
    programs: &[&str],
) -> Result<Ebpf, EbpfError> {
    if object.is_empty() {
        return Err(EbpfError::NotBuilt);
    }
    let mut loader = EbpfLoader::new();
    for (name, n) in caps {
        loader.map_max_entries(name, *n);
    }
    let mut ebpf = loader
        .load(object)
        .map_err(|e| EbpfError::Load(Box::new(e)))?;
    for &name in programs {
        classifier(&mut ebpf, name)?
            .load()
            .map_err(|e| prog_err(format!("loading program {name}"), e))?;
    }
    Ok(ebpf)
}

/// Whether the eBPF backend can run here: the object is embedded and the
/// kernel loads its programs (needs CAP_BPF and CAP_NET_ADMIN, BTF, TCX).
/// `Err` says why not.
pub fn probe() -> Result<(), String> {
    if BPF_OBJECT.is_empty() {
        return Err(
            "this binary has no BPF object embedded (build with `cargo xtask build`)".into(),
        );
    }
    if EbpfBackend::default().is_applied() {
        return Ok(());
    }
    let mut caps = BTreeMap::new();
    caps.insert(mn::CONNTRACK, 1024);
    match load_object(&caps) {
        Ok(_) => Ok(()),
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            // The verifier log is long; the first line says enough here.
            Err(msg.lines().next().unwrap_or_default().to_string())
        }
    }
}

/// Opens the maps of a loaded object for [`MapOps`].
pub fn kernel_maps_of(ebpf: &Ebpf) -> Result<KernelMaps, EbpfError> {
    let mut km = KernelMaps::default();
    for (name, map) in ebpf.maps() {
        let fd = map_fd(map)?;
        km.insert(name, fd);
    }
    Ok(km)
}

fn map_fd(map: &Map) -> Result<std::os::fd::OwnedFd, EbpfError> {
    let data: &MapData = match map {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::LpmTrie(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d)
        | Map::RingBuf(d) => d,
        _ => {
            return Err(prog_err(
                "opening a map".into(),
                SysError::NoSuchMap("unexpected map type".into()),
            ));
        }
    };
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| prog_err("duplicating a map fd".into(), e))
}

/// The dataplane's decision events ([`sgfw_common::Event`]), read from the
/// pinned ring buffer, with the state that names their instances and rules.
pub struct EventStream {
    ring: aya::maps::RingBuf<MapData>,
    state: State,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("generation", &self.state.generation)
            .finish_non_exhaustive()
    }
}

impl EventStream {
    /// The next event waiting, if any (never blocks).
    pub fn next_event(&mut self) -> Option<sgfw_common::Event> {
        loop {
            let item = self.ring.next()?;
            let n = size_of::<sgfw_common::Event>().min(item.len());
            if let Ok(ev) = bytemuck::try_pod_read_unaligned::<sgfw_common::Event>(&item[..n]) {
                return Some(ev);
            }
        }
    }

    /// The state of the policy the events were judged by.
    pub fn state(&self) -> &State {
        &self.state
    }
}

impl EbpfBackend {
    /// The state of the policy in force, if any.
    pub fn state(&self) -> Result<Option<State>, EbpfError> {
        State::load(&self.state_path)
    }

    /// Whether sgfw's pins exist.
    pub fn is_applied(&self) -> bool {
        map_pin(&self.pin_root, mn::CONFIG).exists()
    }

    /// Opens the pinned event ring for reading.
    ///
    /// # Errors
    ///
    /// [`EbpfError::NotApplied`] without pins, else the open's error.
    pub fn events(&self) -> Result<EventStream, EbpfError> {
        let path = map_pin(&self.pin_root, mn::EVENTS);
        if !path.exists() {
            return Err(EbpfError::NotApplied);
        }
        let data = MapData::from_pin(&path)
            .map_err(|e| prog_err(format!("opening {}", path.display()), e))?;
        let ring = aya::maps::RingBuf::try_from(Map::RingBuf(data))
            .map_err(|e| prog_err("opening the event ring".into(), e))?;
        Ok(EventStream {
            ring,
            state: self.state()?.unwrap_or_default(),
        })
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

    /// Validated model in, enforcement out: compiles, loads and pins on first
    /// use, writes the new generation atomically, attaches every bridge port.
    /// Nothing is changed when compiling fails or the maps are too small.
    pub fn apply(
        &self,
        model: &FlatModel,
        host: &dyn Host,
        opts: &ApplyOptions,
    ) -> Result<ApplyReport, EbpfError> {
        let _lock = self.lock()?;
        if self.is_applied() && self.state()?.is_none() {
            // Pins without their state (the state directory was cleared):
            // the numbering they were written with is lost, so start afresh.
            tracing::warn!(
                "{} holds pins but {} is gone; removing them and loading afresh",
                self.pin_root.display(),
                self.state_path.display()
            );
            self.teardown_unlocked()?;
        }
        let prev = self.state()?.filter(|_| self.is_applied());
        let mut state = prev.clone().unwrap_or_default();
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
        }
        let t = std::time::Instant::now();
        let compiled = compile::compile(model, &state.indices, &state.book)?;
        tracing::info!(
            "compiled {} instances: {} SG prefixes, {} port-set entries, {} NACL tables ({} ms)",
            compiled.instances.len(),
            compiled.sg_cidr_v4.len() + compiled.sg_cidr_v6.len(),
            compiled.sg_ports.len(),
            compiled.nacl_meta.len(),
            t.elapsed().as_millis()
        );
        let mut report = ApplyReport::default();

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
            state.capacities = caps.iter().map(|(k, v)| (k.to_string(), *v)).collect();
            report.loaded = true;
            km
        };

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
            let mut journal = state.clone();
            journal.generation = generation;
            journal.book.next = journal.book.next.max(compiled.book.next);
            journal.unsettled = true;
            journal.save(&self.state_path)?;
        }
        let written = write_generation(&mut maps, &compiled, &ports, &config).and_then(|()| {
            if sweep {
                sweep_ids(&mut maps, &compiled.book)
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            if report.loaded {
                // Nothing was in force before: leave nothing behind.
                let _ = self.teardown_unlocked();
            }
            return Err(e.into());
        }

        state.generation = generation;
        state.book = compiled.book.clone();
        state.rule_refs = compiled
            .rule_refs
            .iter()
            .map(|(id, o)| (*id, o.to_string()))
            .collect();
        state.instance_ids = compiled.instance_ids.clone();
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
            (mn::SG_CIDR_V4, compiled.sg_cidr_v4.len()),
            (mn::SG_CIDR_V6, compiled.sg_cidr_v6.len()),
            (mn::SG_PORTS, compiled.sg_ports.len()),
            (mn::NACL_CIDR_V4, compiled.nacl_cidr_v4.len()),
            (mn::NACL_CIDR_V6, compiled.nacl_cidr_v6.len()),
            (mn::NACL_PORTS, compiled.nacl_ports.len()),
            (mn::NACL_META, compiled.nacl_meta.len()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        // The maps now hold exactly this model's entries.
        state.entry_counts = report.entries.clone();
        state.unsettled = false;
        state.save(&self.state_path)?;

        report.attached = self.attach_ports_unlocked(host)?;
        report.generation = generation;
        Ok(report)
    }

    fn pin_object(&self, ebpf: &mut Ebpf) -> Result<(), EbpfError> {
        for dir in ["maps", "progs", "links"] {
            let d = self.pin_root.join(dir);
            std::fs::create_dir_all(&d).map_err(|source| SysError::File {
                what: "creating",
                path: d,
                source,
            })?;
        }
        for (name, map) in ebpf.maps() {
            // Only sgfw's own maps; the programs keep .rodata alive themselves.
            if !name.starts_with("SGFW_") {
                continue;
            }
            let path = map_pin(&self.pin_root, name);
            map.pin(&path)
                .map_err(|e| prog_err(format!("pinning map {name}"), e))?;
        }
        for name in [
            pn::FROM_INSTANCE,
            pn::TO_INSTANCE,
            pn::BRIDGE_UP,
            pn::BRIDGE_DOWN,
        ] {
            let path = self.pin_root.join("progs").join(name);
            classifier(ebpf, name)?
                .pin(&path)
                .map_err(|e| prog_err(format!("pinning program {name}"), e))?;
        }
        Ok(())
    }

    /// Pinned links: (path, interface name, ifindex), from the pin names
    /// that [`EbpfBackend::link_pin`] gives them.
    fn link_pins(&self) -> Vec<(PathBuf, String, u32)> {
        let Ok(entries) = std::fs::read_dir(self.pin_root.join("links")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let (ifname, rest) = name.split_once('@')?;
                let ifx = rest.split('-').next()?.parse::<u32>().ok()?;
                Some((e.path(), ifname.to_string(), ifx))
            })
            .collect()
    }

    /// Ports with both links pinned: (interface name, ifindex).
    pub fn attached_ports(&self) -> Vec<(String, u32)> {
        let mut out: BTreeMap<(String, u32), u8> = BTreeMap::new();
        for (_, ifname, ifx) in self.link_pins() {
            *out.entry((ifname, ifx)).or_default() += 1;
        }
        out.into_iter()
            .filter(|(_, n)| *n == 2)
            .map(|(k, _)| k)
            .collect()
    }

    // bpffs reserves names with dots for the kernel's own entries.
    fn link_pin(&self, port: &sys::Port, dir: &str) -> PathBuf {
        self.pin_root
            .join("links")
            .join(format!("{}@{}-{dir}", port.name, port.ifindex))
    }

    /// Attaches the classifiers: first to each bridge device of the state
    /// (the fence: `sgfw_bridge_down` on its egress, `sgfw_bridge_up` on its
    /// ingress), then to every port of it that is not attached yet; forgets
    /// links of interfaces that are gone. Returns the names of the ports (and
    /// bridge devices) newly attached.
    ///
    /// The bridge device comes first so that what the host hands a bridge is
    /// stamped before any port's fence can see it.
    ///
    /// An instance's interface that appeared (or was re-created, with a new
    /// ifindex) since the apply is bound to its instance first, so its first
    /// frame is judged as that instance's; a binding whose ifindex is no
    /// longer its interface's is removed (an ifindex can be reused).
    ///
    /// Takes the backend's lock: safe to call from a watcher while another
    /// process applies.
    pub fn attach_ports(&self, host: &dyn Host) -> Result<Vec<String>, EbpfError> {
        let _lock = self.lock()?;
        self.attach_ports_unlocked(host)
    }

    fn attach_ports_unlocked(&self, host: &dyn Host) -> Result<Vec<String>, EbpfError> {
        let Some(state) = self.state()? else {
            return Err(EbpfError::NotApplied);
        };
        // Forget links of interfaces that no longer exist (or were re-created
        // under the same name).
        for (path, ifname, ifx) in self.link_pins() {
            if host.ifindex(&ifname)? != Some(ifx) {
                let _ = std::fs::remove_file(path);
            }
        }
        self.rebind(&state, host)?;
        let mut attached = Vec::new();
        let mut progs: BTreeMap<&'static str, SchedClassifier> = BTreeMap::new();
        let bridges: BTreeSet<&String> = state.bridges.values().collect();
        let result = self.attach_bridges(host, bridges, &mut progs, &mut attached);
        // Whatever got attached (also when a later port failed), the fence
        // follows: a port joins `attached` only once both its links are in.
        self.update_fence(host, &state);
        result.map(|()| attached)
    }

    fn attach_bridges(
        &self,
        host: &dyn Host,
        bridges: BTreeSet<&String>,
        progs: &mut BTreeMap<&'static str, SchedClassifier>,
        attached: &mut Vec<String>,
    ) -> Result<(), EbpfError> {
        for bridge in bridges {
            let Some(ifindex) = host.ifindex(bridge)? else {
                continue;
            };
            let dev = sys::Port {
                name: bridge.clone(),
                ifindex,
            };
            if self.attach_one(&dev, pn::BRIDGE_UP, pn::BRIDGE_DOWN, progs)? {
                attached.push(dev.name);
            }
            for port in host.bridge_ports(bridge)? {
                if self.attach_one(&port, pn::FROM_INSTANCE, pn::TO_INSTANCE, progs)? {
                    attached.push(port.name.clone());
                }
            }
        }
        Ok(())
    }

    /// The bridge-family nft table of this backend's fence (one per pin
    /// root, so test beds with pin roots of their own do not share one).
    pub fn fence_table(&self) -> String {
        let base = self
            .pin_root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let clean: String = base
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        format!("{clean}_fence")
    }

    /// Writes the fence table for the ports attached now (one `nft`
    /// transaction replacing the table). The TC fence does not depend on
    /// it: where `nft` cannot run, this is logged and the frames *to* a
    /// port not attached yet are judged by their sender's hook only.
    fn update_fence(&self, host: &dyn Host, state: &State) {
        let ports: BTreeSet<u32> = self.attached_ports().into_iter().map(|(_, i)| i).collect();
        let text = fence_rules(&self.fence_table(), &ports, &state.prefixes);
        // What was written last, beside the state file: an apply or a link
        // event that changes neither the ports nor the prefixes runs no `nft`.
        let record = self.state_path.with_extension("fence");
        if std::fs::read_to_string(&record).is_ok_and(|t| t == text) {
            return;
        }
        match host.nft(&["-f", "-"], Some(&text)) {
            Ok(_) => {
                let _ = std::fs::write(&record, &text);
            }
            Err(e) => {
                let _ = std::fs::remove_file(&record);
                tracing::warn!(
                    "the bridge fence (nft table bridge {}) could not be written: {e}",
                    self.fence_table()
                );
            }
        }
    }

    /// Makes `PORTS` hold exactly the bound interfaces as they are now:
    /// (current ifindex of the instance's interface → instance index).
    fn rebind(&self, state: &State, host: &dyn Host) -> Result<(), EbpfError> {
        let mut want: BTreeMap<u32, u32> = BTreeMap::new();
        for (inst, ifname) in &state.interfaces {
            if let (Some(idx), Some(ifx)) =
                (state.indices.instances.get(inst), host.ifindex(ifname)?)
            {
                want.insert(ifx, *idx);
            }
        }
        let mut maps = self.open_maps()?;
        let mut have: BTreeMap<u32, u32> = BTreeMap::new();
        for k in maps.keys(mn::PORTS, 4)? {
            let Ok(key) = <[u8; 4]>::try_from(k.as_slice()) else {
                continue;
            };
            let ifx = u32::from_ne_bytes(key);
            let v = maps.lookup(mn::PORTS, &k, 4)?;
            if let Some(v) = v.and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok()) {
                have.insert(ifx, u32::from_ne_bytes(v));
            }
        }
        for (ifx, idx) in &want {
            if have.get(ifx) != Some(idx) {
                maps.update(mn::PORTS, &ifx.to_ne_bytes(), &idx.to_ne_bytes())?;
            }
        }
        for ifx in have.keys() {
            if !want.contains_key(ifx) {
                maps.delete(mn::PORTS, &ifx.to_ne_bytes())?;
            }
        }
        Ok(())
    }

    /// Attaches `ingress` and `egress` to one interface unless both links are
    /// pinned already, pinning each link; true when something was attached.
    fn attach_one(
        &self,
        dev: &sys::Port,
        ingress: &'static str,
        egress: &'static str,
        progs: &mut BTreeMap<&'static str, SchedClassifier>,
    ) -> Result<bool, EbpfError> {
        let pin_in = self.link_pin(dev, "ingress");
        let pin_out = self.link_pin(dev, "egress");
        let mut any = false;
        for (name, kind, pin) in [
            (ingress, TcAttachType::Ingress, &pin_in),
            (egress, TcAttachType::Egress, &pin_out),
        ] {
            if pin.exists() {
                continue;
            }
            let prog = match progs.entry(name) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => v.insert(
                    SchedClassifier::from_pin(self.pin_root.join("progs").join(name))
                        .map_err(|e| prog_err(format!("opening pinned program {name}"), e))?,
                ),
            };
            let id = prog
                .attach(&dev.name, kind)
                .map_err(|e| prog_err(format!("attaching to {} ({kind:?})", dev.name), e))?;
            let link = prog
                .take_link(id)
                .map_err(|e| prog_err(format!("taking link of {}", dev.name), e))?;
            let fd: FdLink = link
                .try_into()
                .map_err(|e| prog_err(format!("link of {} is not a TCX link", dev.name), e))?;
            fd.pin(pin)
                .map_err(|e| prog_err(format!("pinning link {}", pin.display()), e))?;
            any = true;
        }
        Ok(any)
    }

    /// Removes every trace: links (detaching the programs), programs, maps,
    /// the pin directory and the state file. Succeeds when nothing is there.
    pub fn teardown(&self) -> Result<(), EbpfError> {
        let _lock = self.lock()?;
        self.teardown_unlocked()
    }

    /// One apply or teardown at a time on this host (per pin root): an
    /// exclusive `flock` on a file beside the state file, released on drop.
    fn lock(&self) -> Result<std::fs::File, EbpfError> {
        let path = self.state_path.with_extension("lock");
        parent_dir(&path)?;
        let file = std::fs::File::create(&path).map_err(|source| SysError::File {
            what: "creating",
            path: path.clone(),
            source,
        })?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) } != 0 {
            return Err(SysError::File {
                what: "locking",
                path,
                source: std::io::Error::last_os_error(),
            }
            .into());
        }
        Ok(file)
    }

    fn teardown_unlocked(&self) -> Result<(), EbpfError> {
        // The fence first: with the links gone every port is "not attached".
        let _ = std::fs::remove_file(self.state_path.with_extension("fence"));
        let table = self.fence_table();
        let _ = sys::RealHost.nft(
            &["-f", "-"],
            Some(&format!(
                "table bridge {table} {{}}\ndelete table bridge {table}\n"
            )),
        );
        let links = self.pin_root.join("links");
        if let Ok(entries) = std::fs::read_dir(&links) {
            for e in entries.flatten() {
                // Unpinning the last reference detaches the TCX link.
                if let Ok(l) = PinnedLink::from_pin(e.path()) {
                    let _ = l.unpin();
                } else {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        if self.pin_root.exists() {
            std::fs::remove_dir_all(&self.pin_root).map_err(|source| SysError::File {
                what: "removing",
                path: self.pin_root.clone(),
                source,
            })?;
        }
        match std::fs::remove_file(&self.state_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(SysError::File {
                    what: "removing",
                    path: self.state_path.clone(),
                    source,
                }
                .into());
            }
        }
        // The lock file stays: unlinking it would let a process waiting on
        // the old inode and one locking a fresh file both hold "the" lock.
        Ok(())
    }

    /// Changes the `CONFIG` in force (flags) under the backend's lock, so an
    /// apply's switch is never undone by a stale copy.
    pub fn update_config(&self, f: impl FnOnce(&mut Config)) -> Result<(), EbpfError> {
        let _lock = self.lock()?;
        let mut maps = self.open_maps()?;
        let key = 0u32.to_ne_bytes();
        if let Some(v) = maps.lookup(mn::CONFIG, &key, size_of::<Config>())?
            && let Ok(mut cfg) = bytemuck::try_pod_read_unaligned::<Config>(&v)
        {
            f(&mut cfg);
            maps.update(mn::CONFIG, &key, bytemuck::bytes_of(&cfg))?;
        }
        Ok(())
    }

    /// Sums the per-CPU counters: (instance index, reason) → packets.
    pub fn counters(&self) -> Result<BTreeMap<(u32, Reason), u64>, EbpfError> {
        let path = map_pin(&self.pin_root, mn::COUNTERS);
        let data = MapData::from_pin(&path)
            .map_err(|e| prog_err(format!("opening {}", path.display()), e))?;
        let arr: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(data))
            .map_err(|e| prog_err("reading counters".into(), e))?;
        let mut out = BTreeMap::new();
        let state = self.state()?.unwrap_or_default();
        let mut idxs: Vec<u32> = state.instance_ids.keys().copied().collect();
        idxs.push(0);
        for inst in idxs {
            for r in Reason::ALL {
                let i = sgfw_common::counter_index(inst, r);
                if let Ok(vals) = arr.get(&i, 0) {
                    let total: u64 = vals.iter().sum();
                    if total > 0 {
                        out.insert((inst, r), total);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Number of conntrack entries.
    pub fn conntrack_len(&self) -> Result<usize, EbpfError> {
        let mut km = self.open_maps()?;
        Ok(km.keys(mn::CONNTRACK, size_of::<CtKey>())?.len())
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
        write_generation(maps, &c, &[(7, 1)], &config_for(model, generation, 0))?;
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
