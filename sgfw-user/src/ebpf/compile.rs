//! Compiles a [`FlatModel`] into the contents of the BPF maps.
//!
//! This module owns the translation from rules to lookup structures and
//! nothing else: it is pure, deterministic, and never touches the kernel.
//!
//! - **SG**: per (instance, direction) the rule list is interned into a
//!   policy id. For each distinct remote prefix of a policy, the rules of
//!   every prefix that contains it are folded in, so the longest-prefix
//!   match alone gives all applicable rules; that folded rule set is interned
//!   into a port-set id. A port set becomes LPM entries over
//!   (set, protocol, 16-bit port): all protocols = the 32-bit prefix, one
//!   protocol = 40 bits, a port range split into at most ~30 aligned
//!   prefixes. No per-CIDR port-entry limit.
//! - **NACL**: per (subnet, direction, family) the entries in rule-number
//!   order get one bit each (at most [`limits::NACL_ENTRIES`]). The CIDR trie
//!   maps each entry prefix to the bits of every entry whose CIDR contains
//!   it; the port trie maps elementary protocol/port intervals to the bits
//!   of every entry matching them. The dataplane ANDs them and takes the
//!   lowest bit.
//!
//! Ids are content-addressed and kept across applies ([`IdBook`]): the same
//! policy, port set, NACL table or rule gets the same id again, so a
//! re-apply writes only what changed — new objects under new ids, beside
//! the ones in force — switches each instance and subnet with one write,
//! and then retires the ids nothing uses any more.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use sgfw_common::{
    AddrInfo, AddrKey, BROADCAST_OWNER, CidrKeyV4, CidrKeyV6, InstancePolicy, NaclBits, NaclMeta,
    PortKey, SUBNET_HAS_DNS_V4, SUBNET_HAS_DNS_V6, SubnetPolicy, limits,
};

use crate::flat::{
    FirewallRule, FlatModel, Match, NaclEntry, OwnershipError, RuleAction, RuleOrigin,
};

/// Why a model cannot be compiled for the BPF dataplane.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    /// A NACL direction has more entries of one family than one bitmask holds.
    #[error(
        "NetworkAcls[{nacl}] ({subnet}): {count} {direction} {family} entries; the eBPF backend supports at most {max} per direction and family"
    )]
    TooManyNaclEntries {
        /// NACL id.
        nacl: String,
        /// Subnet id.
        subnet: String,
        /// "inbound" or "outbound".
        direction: &'static str,
        /// "IPv4" or "IPv6".
        family: &'static str,
        /// Entries given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// More objects than a 31-bit id space holds.
    #[error("too many {0} for the eBPF backend's id space")]
    IdSpace(&'static str),
    /// The model is inconsistent ([`FlatModel::ownership`]).
    #[error(transparent)]
    Ownership(#[from] OwnershipError),
    /// A subnet or instance has no index ([`Indices::update`] was not given this model).
    #[error("{kind} {id} has no index: the indices were built for another model")]
    Unindexed {
        /// "subnet" or "instance".
        kind: &'static str,
        /// Its id.
        id: String,
    },
}

/// Stable numbering of instances and subnets across applies, so counters and
/// conntrack ownership keep their meaning. Index 0 means "no instance".
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Indices {
    /// Instance id → index (≥ 1).
    pub instances: BTreeMap<String, u32>,
    /// Subnet id → index (≥ 1).
    pub subnets: BTreeMap<String, u32>,
}

impl Indices {
    /// Keeps known ids' indices, gives new ids fresh ones, forgets ids that
    /// are gone.
    pub fn update(&mut self, model: &FlatModel) {
        fn renumber<'a>(map: &mut BTreeMap<String, u32>, ids: impl Iterator<Item = &'a str>) {
            let ids: Vec<&str> = ids.collect();
            let present: std::collections::HashSet<&str> = ids.iter().copied().collect();
            map.retain(|k, _| present.contains(k.as_str()));
            let mut next = map.values().max().copied().unwrap_or(0) + 1;
            let mut used: Vec<u32> = map.values().copied().collect();
            used.sort_unstable();
            for id in ids {
                if !map.contains_key(id) {
                    // Reuse the lowest free index so indices stay dense.
                    let mut candidate = 1;
                    for u in &used {
                        if *u == candidate {
                            candidate += 1;
                        } else if *u > candidate {
                            break;
                        }
                    }
                    if candidate >= next {
                        candidate = next;
                        next += 1;
                    }
                    used.push(candidate);
                    used.sort_unstable();
                    map.insert(id.to_string(), candidate);
                }
            }
        }
        renumber(
            &mut self.instances,
            model.instances.iter().map(|i| i.id.as_str()),
        );
        renumber(
            &mut self.subnets,
            model.subnets.iter().map(|s| s.id.as_str()),
        );
    }
}

/// An LPM-trie entry: prefix length in bits, key data, value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LpmEntry<K, V> {
    /// Significant bits of `key`.
    pub prefix_len: u32,
    /// Key data.
    pub key: K,
    /// Value.
    pub value: V,
}

/// Everything the maps hold for one model, in deterministic order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Compiled {
    /// Ids handed out by this compile: only their entries need writing.
    pub fresh: BTreeSet<u32>,
    /// Ids of policies and port sets that the maps hold already and that
    /// this compile carried from the previous book without emitting their
    /// entries (the `sg_*` rows hold only what was emitted; see
    /// [`IdBook::parts`] and [`Compiled::entry_counts`]).
    pub carried: BTreeSet<u32>,
    /// Ids of the previous book that nothing uses any more.
    pub retired: BTreeSet<u32>,
    /// Kinds of the fresh and of the retired ids (`p` policy, `s` port set,
    /// `n` NACL table, `r` rule): which maps can hold their entries.
    pub fresh_kinds: BTreeSet<char>,
    /// See [`Compiled::fresh_kinds`].
    pub retired_kinds: BTreeSet<char>,
    /// Ids the previous apply retired, which this apply deletes (before it
    /// writes anything: they are named only by the half it clears).
    pub retire_now: BTreeSet<u32>,
    /// Kinds of [`Compiled::retire_now`].
    pub retire_now_kinds: BTreeSet<char>,
    /// The book to keep for the next apply.
    pub book: IdBook,
    /// Address → owner.
    pub addrs: Vec<(AddrKey, AddrInfo)>,
    /// Address identity (carried in `skb->mark`) → the instance address.
    pub identities: Vec<(u32, AddrKey)>,
    /// Instance index → policies.
    pub instances: Vec<(u32, InstancePolicy)>,
    /// Subnet index → NACL tables and DNS.
    pub subnets: Vec<(u32, SubnetPolicy)>,
    /// SG remote prefixes, IPv4.
    pub sg_cidr_v4: Vec<LpmEntry<CidrKeyV4, u32>>,
    /// SG remote prefixes, IPv6.
    pub sg_cidr_v6: Vec<LpmEntry<CidrKeyV6, u32>>,
    /// SG port sets.
    pub sg_ports: Vec<LpmEntry<PortKey, u32>>,
    /// NACL CIDR bitmasks, IPv4.
    pub nacl_cidr_v4: Vec<LpmEntry<CidrKeyV4, NaclBits>>,
    /// NACL CIDR bitmasks, IPv6.
    pub nacl_cidr_v6: Vec<LpmEntry<CidrKeyV6, NaclBits>>,
    /// NACL protocol/port bitmasks.
    pub nacl_ports: Vec<LpmEntry<PortKey, u64>>,
    /// NACL table id → decision metadata.
    pub nacl_meta: Vec<(u32, NaclMeta)>,
    /// SG rule reference → where it came from.
    pub rule_refs: BTreeMap<u32, RuleOrigin>,
    /// Instance index → instance id.
    pub instance_ids: BTreeMap<u32, String>,
}

/// Ids of compiled objects by content, kept across applies in the state.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdBook {
    /// Kind letter + 128-bit content hash → id.
    pub ids: BTreeMap<IdKey, u32>,
    /// The next id to hand out (ids are never reused while sgfw is loaded).
    pub next: u32,
    /// Ids the compile of this book retired (kind letter → ids): the half of
    /// the maps no longer in force may still name them, and a packet that
    /// read `CONFIG` just before the switch may still look them up, so they
    /// are deleted by the next apply, when it clears that half.
    #[serde(default)]
    pub retiring: BTreeMap<char, BTreeSet<u32>>,
    /// The secret seed of the content hashes ([`hash128`]), drawn at random
    /// when a book starts (0 = not drawn yet): a model's author cannot
    /// craft two policies that hash alike without knowing it.
    #[serde(default)]
    pub seed: u64,
    /// Per SG policy and port set: the port sets it names and how many
    /// entries it has in each SG map. What lets a later compile carry an
    /// unchanged policy (same content, so same id, already in the maps)
    /// without emitting its entries again: one Authorize touches the
    /// policies of the group lists that hold the group, not all of them.
    /// A book without it (older state, a sweep) makes the compile emit all.
    #[serde(default)]
    pub parts: BTreeMap<u32, Part>,
}

/// What [`IdBook::parts`] records of one SG policy or port set.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Part {
    /// The port sets a policy's prefixes name (empty for a port set).
    pub names: Vec<u32>,
    /// Its entries in `SG_CIDR_V4`, `SG_CIDR_V6` and `SG_PORTS`.
    pub entries: [u32; 3],
}

/// A random non-zero seed for a new book (from the process's random hasher
/// keys; no dependency for 8 bytes).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.finish().max(1)
}

/// The bytes a value's `Hash` feeds, collected for one hashing pass.
struct Bytes(Vec<u8>);

impl std::hash::Hasher for Bytes {
    fn write(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn finish(&self) -> u64 {
        0
    }
}

/// A keyed 128-bit hash of a value (XXH3-128 with the book's seed) over the
/// bytes its `Hash` feeds (collected in `b`): the content address of a
/// compiled object.
fn hash128(b: &mut Bytes, seed: u64, kind: char, v: &impl std::hash::Hash) -> IdKey {
    use std::hash::Hash;
    b.0.clear();
    (kind, v).hash(b);
    IdKey {
        kind,
        hash: xxhash_rust::xxh3::xxh3_128_with_seed(&b.0, seed),
    }
}

/// The content address of a compiled object: its kind letter and the
/// 128-bit hash of its content ([`hash128`]). Compared as numbers (a
/// compile makes tens of thousands of lookups); written in the state as
/// the letter and 32 hex digits, which sort the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdKey {
    /// `p` policy, `s` port set, `n` NACL table, `r` rule.
    pub kind: char,
    /// The keyed content hash.
    pub hash: u128,
}

impl fmt::Display for IdKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{:032x}", self.kind, self.hash)
    }
}

impl std::str::FromStr for IdKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut chars = s.chars();
        let kind = chars.next().ok_or("an empty object key")?;
        let hex = chars.as_str();
        if hex.len() != 32 {
            return Err(format!("object key {s:?}: not a letter and 32 hex digits"));
        }
        let hash = u128::from_str_radix(hex, 16).map_err(|e| format!("object key {s:?}: {e}"))?;
        Ok(IdKey { kind, hash })
    }
}

impl serde::Serialize for IdKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // As `Display` writes it, without the formatting machinery (a state
        // file holds tens of thousands).
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [0u8; 4 + 32];
        let kind = self.kind.encode_utf8(&mut buf[..4]).len();
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = HEX[((self.hash >> (4 * (31 - i))) & 0xf) as usize];
        }
        buf[kind..kind + 32].copy_from_slice(&out);
        match std::str::from_utf8(&buf[..kind + 32]) {
            Ok(text) => s.serialize_str(text),
            Err(_) => s.collect_str(self),
        }
    }
}

impl<'de> serde::Deserialize<'de> for IdKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Hands out ids for one compile from the previous book.
struct Ids<'a> {
    old: &'a IdBook,
    book: IdBook,
    fresh: BTreeSet<u32>,
    /// Scratch for [`hash128`], reused by every intern.
    scratch: Bytes,
    /// The old book by id (built on the first [`Ids::carry`]).
    old_keys: Option<std::collections::HashMap<u32, IdKey>>,
    /// Ids carried without emitting.
    carried: std::collections::HashSet<u32>,
}

impl<'a> Ids<'a> {
    fn new(old: &'a IdBook) -> Self {
        Ids {
            old,
            book: IdBook {
                ids: BTreeMap::new(),
                next: old.next.max(1),
                retiring: BTreeMap::new(),
                parts: BTreeMap::new(),
                seed: if old.seed == 0 {
                    random_seed()
                } else {
                    old.seed
                },
            },
            fresh: BTreeSet::new(),
            scratch: Bytes(Vec::with_capacity(4096)),
            old_keys: None,
            carried: std::collections::HashSet::new(),
        }
    }

    /// Takes the policy `pid` over from the old book without emitting it:
    /// it must be an id the maps hold already (in the old book, not fresh)
    /// whose parts the old book recorded, with every port set it names;
    /// those join this book with it. False (nothing changed) otherwise:
    /// then the caller emits the policy.
    fn carry(&mut self, pid: u32) -> bool {
        if self.fresh.contains(&pid) {
            return false;
        }
        let old = self.old;
        let Some(part) = old.parts.get(&pid) else {
            return false;
        };
        let rev = self
            .old_keys
            .get_or_insert_with(|| old.ids.iter().map(|(k, v)| (*v, *k)).collect());
        let mut names = Vec::with_capacity(part.names.len());
        for sid in &part.names {
            // Port sets are shared by many policies: one carried already
            // is in this book, whole.
            if self.carried.contains(sid) {
                continue;
            }
            match (rev.get(sid), old.parts.get(sid)) {
                (Some(key), Some(sp)) => names.push((*key, *sid, sp)),
                _ => return false,
            }
        }
        for (key, sid, sp) in names {
            if let std::collections::btree_map::Entry::Vacant(e) = self.book.ids.entry(key) {
                e.insert(sid);
                self.book.parts.insert(sid, sp.clone());
                self.carried.insert(sid);
            }
        }
        self.book.parts.insert(pid, part.clone());
        self.carried.insert(pid);
        true
    }

    /// The id of `v` of kind `kind`, and whether this compile sees it for
    /// the first time (then its entries are emitted).
    fn intern(
        &mut self,
        kind: char,
        v: &impl std::hash::Hash,
    ) -> Result<(u32, bool), CompileError> {
        let key = self.key(kind, v);
        self.intern_key(key)
    }

    /// The content address of `v` of kind `kind` under this book's seed.
    fn key(&mut self, kind: char, v: &impl std::hash::Hash) -> IdKey {
        hash128(&mut self.scratch, self.book.seed, kind, v)
    }

    /// [`Ids::intern`] of an object whose content address is known.
    fn intern_key(&mut self, key: IdKey) -> Result<(u32, bool), CompileError> {
        if let Some(id) = self.book.ids.get(&key) {
            return Ok((*id, false));
        }
        let id = match self.old.ids.get(&key) {
            Some(id) => *id,
            None => {
                let id = self.book.next;
                self.book.next = id.checked_add(1).ok_or(CompileError::IdSpace("ids"))?;
                self.fresh.insert(id);
                id
            }
        };
        self.book.ids.insert(key, id);
        Ok((id, true))
    }
}

/// The content address of every rule list a compile interned, by the
/// list's allocation, for the next compile in the same process (kept by the
/// backend's session, `ebpf::session`).
///
/// A rule list is an `Arc<[FirewallRule]>` that [`crate::flat::reflatten`]
/// carries unchanged from one model to the next for every instance a change
/// cannot reach. The memo holds a clone of each list it names, so the
/// allocation cannot be freed and reused by another list while the memo
/// names it: the same allocation is the same content, and its content
/// address (under the same seed) is the one computed before. What it covers
/// is exactly that hash, and the distinct rule references of the list;
/// whether the object is still in the maps is decided by the book
/// ([`Ids::carry`]), as without the memo.
#[derive(Debug, Clone, Default)]
pub struct CompileMemo {
    /// The seed the addresses were computed under.
    seed: u64,
    /// List address → what is known of it.
    lists: std::collections::HashMap<usize, MemoList>,
    /// Lists the last compile found here (not hashed again).
    hits: usize,
}

/// What [`CompileMemo`] knows of one rule list.
#[derive(Debug, Clone)]
struct MemoList {
    /// The list itself: keeps its allocation, and so its address, its own.
    rules: std::sync::Arc<[FirewallRule]>,
    /// Its content address as a policy.
    key: IdKey,
    /// Its distinct rule references: each one's content address, and the
    /// index of a rule of the list it comes from.
    refs: std::sync::Arc<[RefAt]>,
}

impl CompileMemo {
    /// How many lists it names.
    pub fn len(&self) -> usize {
        self.lists.len()
    }

    /// Whether it names none.
    pub fn is_empty(&self) -> bool {
        self.lists.is_empty()
    }

    /// How many lists the last compile found here (and did not hash).
    pub fn hits(&self) -> usize {
        self.hits
    }

    fn get(&self, rules: &std::sync::Arc<[FirewallRule]>, seed: u64) -> Option<&MemoList> {
        if self.seed != seed {
            return None;
        }
        self.lists
            .get(&(rules.as_ptr() as usize))
            .filter(|m| std::sync::Arc::ptr_eq(&m.rules, rules))
    }
}

/// A rule reference's content address, and the index of a rule it names.
type RefAt = (IdKey, usize);

/// The rule references of `rules`: one per rule, and the distinct ones (by
/// content address, with the index of a rule of each); each is named in
/// `out.rule_refs`.
fn intern_refs(
    out: &mut Compiled,
    ids: &mut Ids<'_>,
    rules: &[FirewallRule],
) -> Result<(Vec<u32>, Vec<RefAt>), CompileError> {
    let mut per_rule = Vec::with_capacity(rules.len());
    let mut distinct: Vec<RefAt> = Vec::new();
    let mut seen: std::collections::HashSet<IdKey> = std::collections::HashSet::new();
    let mut last: Option<(&RuleOrigin, u32)> = None;
    for (i, r) in rules.iter().enumerate() {
        // Rules of one permission (one per remote) come together.
        if let Some((o, rref)) = last
            && *o == r.origin
        {
            per_rule.push(rref);
            continue;
        }
        let key = ids.key('r', &r.origin);
        let (rref, _) = ids.intern_key(key)?;
        if seen.insert(key) {
            distinct.push((key, i));
            out.rule_refs
                .entry(rref)
                .or_insert_with(|| r.origin.clone());
        }
        last = Some((&r.origin, rref));
        per_rule.push(rref);
    }
    Ok((per_rule, distinct))
}

/// What a matcher covers in the (protocol, 16-bit port) space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Span {
    /// Every protocol.
    All,
    /// One protocol, every port.
    Proto(u8),
    /// One protocol, ports (or ICMP `type << 8 | code`) `lo..=hi`.
    Range(u8, u16, u16),
}

fn span(m: &Match) -> Span {
    match *m {
        Match::All => Span::All,
        Match::Proto(p) => Span::Proto(p),
        Match::Ports { proto, from, to } => Span::Range(proto, from, to),
        Match::Icmp {
            proto,
            icmp_type,
            code,
        } => match (icmp_type, code) {
            (None, _) => Span::Proto(proto),
            (Some(t), None) => Span::Range(proto, u16::from(t) << 8, (u16::from(t) << 8) | 0xff),
            (Some(t), Some(c)) => {
                let v = (u16::from(t) << 8) | u16::from(c);
                Span::Range(proto, v, v)
            }
        },
    }
}

/// Splits `lo..=hi` into aligned prefixes: (value, prefix length in 0..=16).
pub fn range_prefixes(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let mut cur = u32::from(lo);
    let hi = u32::from(hi);
    while cur <= hi {
        // Largest aligned block starting at `cur` that stays within `hi`.
        let mut size: u32 = if cur == 0 {
            1 << 16
        } else {
            cur & cur.wrapping_neg()
        };
        while cur + size - 1 > hi {
            size >>= 1;
        }
        let bits = size.trailing_zeros();
        out.push((cur as u16, 16 - bits));
        cur += size;
    }
    out
}

fn port_key(set: u32, proto: u8, port: u16) -> PortKey {
    PortKey {
        set: set.to_be_bytes(),
        proto,
        port: port.to_be_bytes(),
    }
}

fn cidr_v4(table: u32, net: &ipnet::Ipv4Net) -> LpmEntry<CidrKeyV4, ()> {
    LpmEntry {
        prefix_len: 32 + u32::from(net.prefix_len()),
        key: CidrKeyV4 {
            table: table.to_be_bytes(),
            addr: net.network().octets(),
        },
        value: (),
    }
}

fn cidr_v6(table: u32, net: &ipnet::Ipv6Net) -> LpmEntry<CidrKeyV6, ()> {
    LpmEntry {
        prefix_len: 32 + u32::from(net.prefix_len()),
        key: CidrKeyV6 {
            table: table.to_be_bytes(),
            addr: net.network().octets(),
        },
        value: (),
    }
}

/// The [`AddrKey`] of an address.
pub fn addr_key(a: &IpAddr) -> AddrKey {
    let (family, addr) = crate::policy::Family::key_of(a);
    AddrKey {
        family,
        slot: 0,
        _pad: [0; 2],
        addr,
    }
}

/// One NACL direction of one family, as the dataplane sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct NaclTable {
    entries: Vec<(u16, bool, IpNet, Span)>,
}

/// Compiles `model`, reusing the ids of `book` for content it already has.
/// Every entry is in the result; [`Compiled::fresh`] says which ids are new.
pub fn compile(model: &FlatModel, idx: &Indices, book: &IdBook) -> Result<Compiled, CompileError> {
    compile_with(model, idx, book, &mut CompileMemo::default())
}

/// [`compile`], reading and then updating what `memo` knows of the rule
/// lists of the last compile: a list it names is not hashed again. The
/// result is the one [`compile`] gives.
///
/// # Errors
///
/// As [`compile`]; `memo` is then left as it was.
pub fn compile_with(
    model: &FlatModel,
    idx: &Indices,
    book: &IdBook,
    memo: &mut CompileMemo,
) -> Result<Compiled, CompileError> {
    // The one ownership index: an inconsistent model is refused here, as
    // the nft renderer refuses it, never compiled with an entry skipped.
    model.ownership()?;
    let mut out = Compiled::default();
    let mut ids = Ids::new(book);
    let mut shared: std::collections::HashMap<usize, u32> = std::collections::HashMap::new();
    let mut emitted_names: Vec<(u32, BTreeSet<u32>)> = Vec::new();
    // The memo of this compile (see [`CompileMemo`]), and the references of
    // each policy content seen so far.
    let mut next_memo: std::collections::HashMap<usize, MemoList> =
        std::collections::HashMap::new();
    let mut by_key: std::collections::HashMap<IdKey, std::sync::Arc<[RefAt]>> =
        std::collections::HashMap::new();
    let mut refs_named: std::collections::HashSet<IdKey> = std::collections::HashSet::new();
    let mut hits = 0;

    // Subnets and their NACL tables.
    for s in &model.subnets {
        let sidx = *idx
            .subnets
            .get(&s.id)
            .ok_or_else(|| CompileError::Unindexed {
                kind: "subnet",
                id: s.id.clone(),
            })?;
        let mut table_ids = [0u32; 4];
        for (slot, (entries, dir_name, v6)) in [
            (&s.inbound, "inbound", false),
            (&s.outbound, "outbound", false),
            (&s.inbound, "inbound", true),
            (&s.outbound, "outbound", true),
        ]
        .into_iter()
        .enumerate()
        {
            let table = nacl_table(entries, v6);
            if table.entries.len() > limits::NACL_ENTRIES {
                return Err(CompileError::TooManyNaclEntries {
                    nacl: s.nacl_id.clone(),
                    subnet: s.id.clone(),
                    direction: dir_name,
                    family: if v6 { "IPv6" } else { "IPv4" },
                    count: table.entries.len(),
                    max: limits::NACL_ENTRIES,
                });
            }
            let (id, new) = ids.intern('n', &table)?;
            if new {
                emit_nacl_table(&mut out, id, &table, v6);
            }
            table_ids[slot] = id;
        }
        let mut sp = SubnetPolicy {
            nacl_in_v4: table_ids[0],
            nacl_out_v4: table_ids[1],
            nacl_in_v6: table_ids[2],
            nacl_out_v6: table_ids[3],
            flags: 0,
            dns_v4: [0; 4],
            dns_v6: [0; 16],
            net_v4: s.cidr_v4.network().octets(),
            mask_v4: s.cidr_v4.netmask().octets(),
            net_v6: s.cidr_v6.map_or([0; 16], |n| n.network().octets()),
            mask_v6: s.cidr_v6.map_or([0; 16], |n| n.netmask().octets()),
        };
        for d in &s.dns {
            match d {
                IpAddr::V4(a) if sp.flags & SUBNET_HAS_DNS_V4 == 0 => {
                    sp.flags |= SUBNET_HAS_DNS_V4;
                    sp.dns_v4 = a.octets();
                }
                IpAddr::V6(a) if sp.flags & SUBNET_HAS_DNS_V6 == 0 => {
                    sp.flags |= SUBNET_HAS_DNS_V6;
                    sp.dns_v6 = a.octets();
                }
                _ => {}
            }
        }
        // The subnet's broadcast address: a destination no hook delivers.
        if let Some(b) = crate::flat::subnet_broadcast(&s.cidr_v4) {
            out.addrs.push((
                addr_key(&IpAddr::V4(b)),
                AddrInfo {
                    instance: BROADCAST_OWNER,
                    subnet: sidx,
                    identity: 0,
                },
            ));
        }
        out.subnets.push((sidx, sp));
    }

    // Instances and their SG policies.
    for inst in &model.instances {
        let unindexed = |kind, id: &str| CompileError::Unindexed {
            kind,
            id: id.to_string(),
        };
        let iidx = *idx
            .instances
            .get(&inst.id)
            .ok_or_else(|| unindexed("instance", &inst.id))?;
        let sidx = *idx
            .subnets
            .get(&inst.subnet_id)
            .ok_or_else(|| unindexed("subnet", &inst.subnet_id))?;
        out.instance_ids.insert(iidx, inst.id.clone());
        for a in &inst.addrs {
            out.addrs.push((
                addr_key(a),
                AddrInfo {
                    instance: iidx,
                    subnet: sidx,
                    identity: 0,
                },
            ));
        }
        let mut policy_ids = [0u32; 2];
        for (slot, rules) in [&inst.ingress, &inst.egress].into_iter().enumerate() {
            // A list shared by several instances (same group list) is
            // content-hashed once; the address is a valid key while `model`
            // is borrowed, and equal addresses mean equal contents. A list
            // the last compile saw is not hashed at all ([`CompileMemo`]).
            let at = rules.as_ptr() as usize;
            let pid = match shared.get(&at) {
                Some(pid) => *pid,
                None => {
                    let known = memo.get(rules, ids.book.seed);
                    hits += usize::from(known.is_some());
                    let key = match known {
                        Some(m) => m.key,
                        None => ids.key('p', rules),
                    };
                    let mut refs = known.map(|m| std::sync::Arc::clone(&m.refs));
                    let (pid, new) = ids.intern_key(key)?;
                    if new {
                        match &refs {
                            // Unchanged and in the maps: only its rule
                            // references are named again.
                            Some(known) if ids.carry(pid) => {
                                for (rk, i) in known.iter() {
                                    // Lists of group lists that share a
                                    // group share its references.
                                    if !refs_named.insert(*rk) {
                                        continue;
                                    }
                                    let (rref, _) = ids.intern_key(*rk)?;
                                    if let Some(r) = rules.get(*i) {
                                        out.rule_refs
                                            .entry(rref)
                                            .or_insert_with(|| r.origin.clone());
                                    }
                                }
                            }
                            _ => {
                                let (per_rule, distinct) = intern_refs(&mut out, &mut ids, rules)?;
                                if !ids.carry(pid) {
                                    let names =
                                        emit_policy(&mut out, pid, rules, &per_rule, &mut ids)?;
                                    emitted_names.push((pid, names));
                                }
                                refs = Some(distinct.into());
                            }
                        }
                    } else if refs.is_none() {
                        // Same content as a list interned before in this
                        // compile: the same references, at the same places.
                        refs = by_key.get(&key).cloned();
                    }
                    if let Some(refs) = refs {
                        by_key.insert(key, std::sync::Arc::clone(&refs));
                        next_memo.insert(
                            at,
                            MemoList {
                                rules: std::sync::Arc::clone(rules),
                                key,
                                refs,
                            },
                        );
                    }
                    shared.insert(at, pid);
                    pid
                }
            };
            policy_ids[slot] = pid;
        }
        out.instances.push((
            iidx,
            InstancePolicy {
                subnet: sidx,
                policy_ingress: policy_ids[0],
                policy_egress: policy_ids[1],
                _pad: 0,
            },
        ));
    }
    let in_use: BTreeSet<u32> = ids.book.ids.values().copied().collect();
    for (key, id) in &book.ids {
        if !in_use.contains(id) {
            out.retired.insert(*id);
            out.retired_kinds.insert(key.kind);
            ids.book.retiring.entry(key.kind).or_default().insert(*id);
        }
    }
    // What the previous apply retired goes now (see `IdBook::retiring`).
    for (kind, set) in &book.retiring {
        out.retire_now.extend(set.iter().copied());
        out.retire_now_kinds.insert(*kind);
    }
    for (key, id) in &ids.book.ids {
        if ids.fresh.contains(id) {
            out.fresh_kinds.insert(key.kind);
        }
    }
    out.fresh = ids.fresh;
    out.carried = ids.carried.into_iter().collect();
    out.book = ids.book;
    out.addrs.sort_by_key(|a| (a.0.family, a.0.addr));
    // Identities in address order (deterministic for a model):
    // 1..=IDENTITY_MAX, the bits of `skb->mark` sgfw owns less its stamps.
    let mut next = 0u32;
    for (k, v) in &mut out.addrs {
        if v.instance == BROADCAST_OWNER {
            continue;
        }
        next += 1;
        if next > sgfw_common::IDENTITY_MAX {
            return Err(CompileError::IdSpace(
                "instance addresses (at most 65,533: the identity bits of skb->mark)",
            ));
        }
        v.identity = next;
        out.identities.push((next, *k));
    }
    // Two rules of one set may produce the same key: keep one (any is a match).
    dedup_lpm(&mut out.sg_ports);
    // The parts of what was emitted (carried objects brought theirs).
    let mut count = |id: [u8; 4], map: usize| {
        out.book.parts.entry(key_id(id)).or_default().entries[map] += 1;
    };
    out.sg_cidr_v4.iter().for_each(|e| count(e.key.table, 0));
    out.sg_cidr_v6.iter().for_each(|e| count(e.key.table, 1));
    out.sg_ports.iter().for_each(|e| count(e.key.set, 2));
    for (pid, names) in emitted_names {
        let part = out.book.parts.entry(pid).or_default();
        part.names = names.into_iter().collect();
    }
    *memo = CompileMemo {
        seed: out.book.seed,
        lists: next_memo,
        hits,
    };
    Ok(out)
}

/// The id an LPM key's data starts with (big-endian).
pub fn key_id(b: [u8; 4]) -> u32 {
    u32::from_be_bytes(b)
}

impl Compiled {
    /// Entries each id-keyed and per-object map holds for this model once it
    /// is written: SG maps from the parts of every policy and port set of
    /// the book (emitted or carried), the others from the rows.
    pub fn entry_counts(&self) -> [(&'static str, usize); 6] {
        let mut sg = [0usize; 3];
        for id in self.book.ids.values() {
            if let Some(p) = self.book.parts.get(id) {
                for (n, e) in sg.iter_mut().zip(p.entries) {
                    *n += e as usize;
                }
            }
        }
        [
            (sgfw_common::map_names::SG_CIDR_V4, sg[0]),
            (sgfw_common::map_names::SG_CIDR_V6, sg[1]),
            (sgfw_common::map_names::SG_PORTS, sg[2]),
            (
                sgfw_common::map_names::NACL_CIDR_V4,
                self.nacl_cidr_v4.len(),
            ),
            (
                sgfw_common::map_names::NACL_CIDR_V6,
                self.nacl_cidr_v6.len(),
            ),
            (sgfw_common::map_names::NACL_PORTS, self.nacl_ports.len()),
        ]
    }
}

fn nacl_table(entries: &[NaclEntry], v6: bool) -> NaclTable {
    NaclTable {
        entries: entries
            .iter()
            .filter(|e| matches!(e.cidr, IpNet::V6(_)) == v6)
            // An ICMP entry of the other family can never match: leaving it
            // out changes no decision and saves a bit.
            .filter(|e| e.matcher.possible_for(&e.cidr))
            .map(|e| {
                (
                    e.rule_number,
                    e.action == RuleAction::Allow,
                    e.cidr,
                    span(&e.matcher),
                )
            })
            .collect(),
    }
}

fn emit_nacl_table(out: &mut Compiled, id: u32, t: &NaclTable, v6: bool) {
    let mut meta = NaclMeta {
        allow_mask: 0,
        rule_numbers: [0; limits::NACL_ENTRIES],
    };
    for (i, (num, allow, _, _)) in t.entries.iter().enumerate() {
        meta.rule_numbers[i] = *num;
        if *allow {
            meta.allow_mask |= 1 << i;
        }
    }
    out.nacl_meta.push((id, meta));

    // CIDR bits: each distinct prefix gets the bits of every entry containing it.
    let mut prefixes: Vec<IpNet> = t.entries.iter().map(|e| e.2).collect();
    prefixes.sort();
    prefixes.dedup();
    for p in prefixes {
        let mut entries = 0u64;
        for (i, e) in t.entries.iter().enumerate() {
            if e.2.contains(&p) {
                entries |= 1 << i;
            }
        }
        let bits = NaclBits {
            entries,
            allow_mask: meta.allow_mask,
        };
        match (p, v6) {
            (IpNet::V4(n), false) => {
                let e = cidr_v4(id, &n);
                out.nacl_cidr_v4.push(LpmEntry {
                    prefix_len: e.prefix_len,
                    key: e.key,
                    value: bits,
                });
            }
            (IpNet::V6(n), true) => {
                let e = cidr_v6(id, &n);
                out.nacl_cidr_v6.push(LpmEntry {
                    prefix_len: e.prefix_len,
                    key: e.key,
                    value: bits,
                });
            }
            _ => {}
        }
    }

    // Port bits over elementary intervals.
    let spans: Vec<(usize, Span)> = t
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| (i, e.3))
        .collect();
    for (plen, key, bits) in span_masks(id, &spans) {
        out.nacl_ports.push(LpmEntry {
            prefix_len: plen,
            key,
            value: bits,
        });
    }
}

/// LPM entries (prefix length, key, bitmask) such that the longest match for
/// any (protocol, port) carries exactly the bits of the spans covering it.
fn span_masks(set: u32, spans: &[(usize, Span)]) -> Vec<(u32, PortKey, u64)> {
    let mut out = Vec::new();
    let all: u64 = spans
        .iter()
        .filter(|(_, s)| *s == Span::All)
        .fold(0, |m, (i, _)| m | 1 << i);
    out.push((32, port_key(set, 0, 0), all));
    let mut protos: Vec<u8> = spans
        .iter()
        .filter_map(|(_, s)| match s {
            Span::All => None,
            Span::Proto(p) | Span::Range(p, _, _) => Some(*p),
        })
        .collect();
    protos.sort_unstable();
    protos.dedup();
    for p in protos {
        let proto_mask = spans
            .iter()
            .filter(|(_, s)| *s == Span::Proto(p))
            .fold(all, |m, (i, _)| m | 1 << i);
        out.push((40, port_key(set, p, 0), proto_mask));
        let ranges: Vec<(usize, u16, u16)> = spans
            .iter()
            .filter_map(|(i, s)| match s {
                Span::Range(q, lo, hi) if *q == p => Some((*i, *lo, *hi)),
                _ => None,
            })
            .collect();
        if ranges.is_empty() {
            continue;
        }
        // Elementary intervals between breakpoints.
        let mut cuts: Vec<u32> = vec![0, 65536];
        for (_, lo, hi) in &ranges {
            cuts.push(u32::from(*lo));
            cuts.push(u32::from(*hi) + 1);
        }
        cuts.sort_unstable();
        cuts.dedup();
        let mut merged: Vec<(u32, u32, u64)> = Vec::new();
        for w in cuts.windows(2) {
            let (lo, hi) = (w[0], w[1] - 1);
            let mask = ranges
                .iter()
                .filter(|(_, a, b)| u32::from(*a) <= lo && hi <= u32::from(*b))
                .fold(proto_mask, |m, (i, _, _)| m | 1 << i);
            match merged.last_mut() {
                Some(last) if last.2 == mask && last.1 + 1 == lo => last.1 = hi,
                _ => merged.push((lo, hi, mask)),
            }
        }
        for (lo, hi, mask) in merged {
            if mask == proto_mask {
                continue; // the 40-bit protocol entry already answers these
            }
            for (v, bits) in range_prefixes(lo as u16, hi as u16) {
                out.push((40 + bits, port_key(set, p, v), mask));
            }
        }
    }
    out
}

fn emit_policy(
    out: &mut Compiled,
    pid: u32,
    rules: &[FirewallRule],
    rrefs: &[u32],
    ids: &mut Ids<'_>,
) -> Result<BTreeSet<u32>, CompileError> {
    let mut names = BTreeSet::new();
    // Rules by remote prefix, their references, and the prefix lengths that
    // occur: a prefix's containing prefixes are its truncations to those
    // lengths, so folding costs a few map lookups per prefix, not a pass
    // over every rule.
    let mut by_net: BTreeMap<IpNet, Vec<(Span, u32)>> = BTreeMap::new();
    let mut lengths: BTreeSet<(bool, u8)> = BTreeSet::new();
    for (r, &rref) in rules.iter().zip(rrefs) {
        by_net
            .entry(r.remote)
            .or_default()
            .push((span(&r.matcher), rref));
        lengths.insert((r.remote.addr().is_ipv6(), r.remote.prefix_len()));
    }
    let prefixes: Vec<IpNet> = by_net.keys().copied().collect();
    for p in prefixes {
        // Fold in every rule whose remote contains this prefix.
        let mut set: BTreeMap<Span, u32> = BTreeMap::new();
        let v6 = p.addr().is_ipv6();
        for &(_, len) in lengths
            .iter()
            .filter(|(f, l)| *f == v6 && *l <= p.prefix_len())
        {
            let Ok(anc) = IpNet::new(p.addr(), len).map(|n| n.trunc()) else {
                continue;
            };
            for &(s, rref) in by_net.get(&anc).into_iter().flatten() {
                set.entry(s)
                    .and_modify(|v| *v = (*v).min(rref))
                    .or_insert(rref);
            }
        }
        let set: Vec<(Span, u32)> = set.into_iter().collect();
        let (sid, new) = ids.intern('s', &set)?;
        names.insert(sid);
        if new {
            for (s, rref) in &set {
                match *s {
                    Span::All => out.sg_ports.push(LpmEntry {
                        prefix_len: 32,
                        key: port_key(sid, 0, 0),
                        value: *rref,
                    }),
                    Span::Proto(pr) => out.sg_ports.push(LpmEntry {
                        prefix_len: 40,
                        key: port_key(sid, pr, 0),
                        value: *rref,
                    }),
                    Span::Range(pr, lo, hi) => {
                        for (v, bits) in range_prefixes(lo, hi) {
                            out.sg_ports.push(LpmEntry {
                                prefix_len: 40 + bits,
                                key: port_key(sid, pr, v),
                                value: *rref,
                            });
                        }
                    }
                }
            }
        }
        match p {
            IpNet::V4(n) => {
                let e = cidr_v4(pid, &n);
                out.sg_cidr_v4.push(LpmEntry {
                    prefix_len: e.prefix_len,
                    key: e.key,
                    value: sid,
                });
            }
            IpNet::V6(n) => {
                let e = cidr_v6(pid, &n);
                out.sg_cidr_v6.push(LpmEntry {
                    prefix_len: e.prefix_len,
                    key: e.key,
                    value: sid,
                });
            }
        }
    }
    Ok(names)
}

fn dedup_lpm<K: Copy + bytemuck::Pod, V: Copy + Ord>(v: &mut Vec<LpmEntry<K, V>>) {
    let mut seen: BTreeMap<(u32, Vec<u8>), V> = BTreeMap::new();
    for e in v.iter() {
        seen.entry((e.prefix_len, bytemuck::bytes_of(&e.key).to_vec()))
            .and_modify(|x| *x = (*x).min(e.value))
            .or_insert(e.value);
    }
    v.clear();
    for ((plen, key), value) in seen {
        if let Ok(k) = bytemuck::try_pod_read_unaligned::<K>(&key) {
            v.push(LpmEntry {
                prefix_len: plen,
                key: k,
                value,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    //! The compiler's own pieces, against brute force: the prefix split of a
    //! port range, the span masks an LPM lookup returns, and stable ids.
    use super::*;
    use proptest::prelude::*;

    /// Whether an LPM entry of `plen` bits over `key` matches `probe`.
    fn lpm_match(plen: u32, key: &[u8], probe: &[u8]) -> bool {
        (0..plen as usize).all(|bit| {
            let (byte, shift) = (bit / 8, 7 - bit % 8);
            (key[byte] >> shift) & 1 == (probe[byte] >> shift) & 1
        })
    }

    /// The mask the BPF map would answer for (proto, port): the longest
    /// matching entry's.
    fn lookup(entries: &[(u32, PortKey, u64)], proto: u8, port: u16) -> Option<u64> {
        let probe = port_key(7, proto, port);
        entries
            .iter()
            .filter(|(plen, k, _)| {
                lpm_match(*plen, bytemuck::bytes_of(k), bytemuck::bytes_of(&probe))
            })
            .max_by_key(|(plen, _, _)| *plen)
            .map(|(_, _, m)| *m)
    }

    fn covers(s: &Span, proto: u8, port: u16) -> bool {
        match *s {
            Span::All => true,
            Span::Proto(p) => p == proto,
            Span::Range(p, lo, hi) => p == proto && lo <= port && port <= hi,
        }
    }

    fn span_strategy() -> impl Strategy<Value = Span> {
        let proto = prop_oneof![Just(6u8), Just(17u8), Just(1u8)];
        prop_oneof![
            1 => Just(Span::All),
            2 => proto.clone().prop_map(Span::Proto),
            8 => (proto, any::<u16>(), any::<u16>())
                .prop_map(|(p, a, b)| Span::Range(p, a.min(b), a.max(b))),
        ]
    }

    proptest! {
        #![proptest_config(crate::testutil::config())]

        /// `range_prefixes` covers exactly `lo..=hi` with aligned,
        /// disjoint blocks, at most two per bit.
        #[test]
        fn range_prefixes_cover_exactly_the_range(a in any::<u16>(), b in any::<u16>()) {
            let (lo, hi) = (a.min(b), a.max(b));
            let blocks = range_prefixes(lo, hi);
            prop_assert!(blocks.len() <= 32);
            let mut next = u32::from(lo);
            for (v, bits) in &blocks {
                let size = 1u32 << (16 - bits);
                prop_assert_eq!(u32::from(*v), next, "blocks are contiguous, in order");
                prop_assert_eq!(u32::from(*v) % size, 0, "block {} /{} is aligned", v, bits);
                next += size;
            }
            prop_assert_eq!(next, u32::from(hi) + 1);
        }

        /// The longest match for any (protocol, port) carries exactly the
        /// bits of the spans covering it.
        #[test]
        fn span_masks_answer_exactly_the_covering_spans(
            spans in proptest::collection::vec(span_strategy(), 0..8),
            probes in proptest::collection::vec(
                (prop_oneof![Just(6u8), Just(17u8), Just(1u8), Just(47u8)], any::<u16>()), 1..64),
        ) {
            let indexed: Vec<(usize, Span)> = spans.iter().copied().enumerate().collect();
            let entries = span_masks(7, &indexed);
            // Edges of every range too, where off-by-ones live.
            let edges = spans.iter().filter_map(|s| match *s {
                Span::Range(p, lo, hi) => Some([(p, lo), (p, hi), (p, lo.wrapping_sub(1)), (p, hi.wrapping_add(1))]),
                _ => None,
            }).flatten();
            for (proto, port) in probes.into_iter().chain(edges) {
                let want = indexed
                    .iter()
                    .filter(|(_, s)| covers(s, proto, port))
                    .fold(0u64, |m, (i, _)| m | 1 << i);
                prop_assert_eq!(lookup(&entries, proto, port).unwrap_or(0), want,
                    "proto {} port {} spans {:?}", proto, port, spans);
            }
        }
    }

    /// The book's keys are written as a letter and 32 hex digits (the
    /// state file's shape), read back exactly, and a malformed key is an
    /// error naming it.
    #[test]
    fn object_keys_round_trip_through_the_state_file() {
        let mut book = IdBook {
            seed: 7,
            ..IdBook::default()
        };
        for (i, kind) in ['p', 's', 'n', 'r'].into_iter().enumerate() {
            let hash = u128::MAX / (i as u128 + 1);
            book.ids.insert(IdKey { kind, hash }, i as u32 + 1);
        }
        let json = serde_json::to_string(&book).unwrap();
        assert!(
            json.contains(&format!("\"p{:032x}\":1", u128::MAX)),
            "{json}"
        );
        let back: IdBook = serde_json::from_str(&json).unwrap();
        assert_eq!(back, book);
        // The fast writer writes what Display writes.
        for hash in [0, 1, 0xabc, u128::MAX / 3, u128::MAX] {
            let key = IdKey { kind: 's', hash };
            assert_eq!(serde_json::to_string(&key).unwrap(), format!("\"{key}\""));
        }
        for bad in ["\"p12\"", "\"\"", "\"pzz000000000000000000000000000000\""] {
            let err = serde_json::from_str::<IdKey>(bad).unwrap_err().to_string();
            assert!(err.contains("key"), "{bad}: {err}");
        }
    }

    /// Interning: the same content gets the same id in a later compile, new
    /// content a fresh id above every id handed out, and a retired id is
    /// never handed out again.
    #[test]
    fn interning_is_stable_and_never_reuses_an_id() {
        let book = IdBook::default();
        let mut ids = Ids::new(&book);
        let (a, fresh_a) = ids.intern('s', &1u32).unwrap();
        let (b, _) = ids.intern('s', &2u32).unwrap();
        let (a2, fresh_again) = ids.intern('s', &1u32).unwrap();
        assert!(
            fresh_a && !fresh_again,
            "emitted on its first use in a compile only"
        );
        assert_eq!(a, a2);
        assert_ne!(a, b);
        // Same kind letter and value in a later compile: the same id, not fresh.
        let book1 = ids.book.clone();
        let mut later = Ids::new(&book1);
        let (a3, _) = later.intern('s', &1u32).unwrap();
        assert_eq!(a3, a);
        assert!(!later.fresh.contains(&a3));
        // Another kind is another object.
        let (p, _) = later.intern('p', &1u32).unwrap();
        assert_ne!(p, a);
        // `b` is not used any more; content like it later gets a new id.
        let book2 = later.book.clone();
        let mut again = Ids::new(&book2);
        let (b2, _) = again.intern('s', &2u32).unwrap();
        assert!(b2 > b && b2 > p, "{b2} reuses an id handed out before");
    }

    /// One ownership index, one policy: an address with two owners, or an
    /// instance in a subnet that does not exist, is refused, as the nft
    /// renderer refuses it, never compiled with the entry left out.
    #[test]
    fn an_inconsistent_model_is_an_error_not_a_skipped_entry() {
        let good = crate::testutil::flat_of(crate::testutil::FIXTURE);
        let mut idx = Indices::default();
        idx.update(&good);
        assert!(compile(&good, &idx, &IdBook::default()).is_ok());

        let mut dup = good.clone();
        let stolen = dup.instances[0].addrs[0];
        dup.instances[1].addrs.push(stolen);
        assert!(matches!(
            compile(&dup, &idx, &IdBook::default()),
            Err(CompileError::Ownership(OwnershipError::DuplicateAddress { addr, .. })) if addr == stolen
        ));

        let mut lost = good.clone();
        lost.instances[2].subnet_index = 9;
        assert!(matches!(
            compile(&lost, &idx, &IdBook::default()),
            Err(CompileError::Ownership(OwnershipError::UnknownSubnet {
                subnet_index: 9,
                ..
            }))
        ));

        // An instance the indices were not built for is refused too.
        let mut other = good.clone();
        other.instances[0].id = "i-unindexed".into();
        assert!(matches!(
            compile(&other, &idx, &IdBook::default()),
            Err(CompileError::Unindexed {
                kind: "instance",
                ..
            })
        ));
    }
}
