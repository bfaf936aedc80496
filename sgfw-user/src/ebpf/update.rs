//! The atomic update protocol: every generation is written into the
//! inactive half of the slotted maps and under fresh content-addressed ids,
//! switched in by one `CONFIG` write, and the old half and retired ids are
//! deleted by the next apply (docs/semantics.md, "Atomic updates"). It owns
//! the map writes of an apply and the capacities they need; it must never
//! write into the half in force, and it restores the previous contents on
//! any failure before the switch.

use super::*;
pub(super) use compile::key_id;

pub(super) fn lpm_bytes<K: bytemuck::Pod>(prefix_len: u32, key: &K) -> Vec<u8> {
    let mut v = prefix_len.to_ne_bytes().to_vec();
    v.extend_from_slice(bytemuck::bytes_of(key));
    v
}

/// The map contents an apply writes, as (map, key bytes, value bytes).
pub(super) fn lpm_rows<'a, K: bytemuck::Pod, V: bytemuck::Pod>(
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
pub(super) const GENERATIONAL: &[(&str, usize, usize)] = &[
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
pub(super) type Snapshot = BTreeMap<Vec<u8>, Vec<u8>>;

/// The maps with two halves ([`sgfw_common::Config::slot`]): (map, key
/// size, value size).
pub(super) const SLOTTED: [(&str, usize, usize); 4] = [
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
pub(super) fn slot_of(map: &str, key: &[u8]) -> u32 {
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
pub(super) fn clear_slot(maps: &mut dyn MapOps, slot: u32) -> Result<(), SysError> {
    for (map, ks, _) in SLOTTED {
        let keys = maps.keys(map, ks)?;
        let half: Vec<&[u8]> = keys
            .iter()
            .filter(|k| slot_of(map, k) == slot)
            .map(Vec::as_slice)
            .collect();
        maps.delete_many(map, &half)?;
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
    known: Option<&ObjectKeys>,
) -> Result<(), SysError> {
    write_generation_over(maps, c, ports, config, known, &mut [None, None])
}

/// What one half of the [`SLOTTED`] maps holds: per map, in [`SLOTTED`]'s
/// order, key bytes → value bytes.
pub type Half = [Snapshot; 4];

/// The rows of the half `slot` for a compile: exactly what that half holds
/// once the compile is written.
pub(super) fn half_rows(c: &Compiled, slot: u32) -> Half {
    let key = |i: u32| sgfw_common::slotted(i, slot).to_ne_bytes().to_vec();
    let in_slot = |k: &AddrKey| AddrKey {
        slot: slot as u8,
        ..*k
    };
    [
        c.identities
            .iter()
            .map(|(id, k)| (key(*id), bytemuck::bytes_of(&in_slot(k)).to_vec()))
            .collect(),
        c.addrs
            .iter()
            .map(|(k, v)| {
                (
                    bytemuck::bytes_of(&in_slot(k)).to_vec(),
                    bytemuck::bytes_of(v).to_vec(),
                )
            })
            .collect(),
        c.instances
            .iter()
            .map(|(idx, ip)| (key(*idx), bytemuck::bytes_of(ip).to_vec()))
            .collect(),
        c.subnets
            .iter()
            .map(|(idx, sp)| (key(*idx), bytemuck::bytes_of(sp).to_vec()))
            .collect(),
    ]
}

/// [`write_generation`] with a record of each half as this process last
/// wrote it (`halves[slot]`; `None`: not known). When the half about to be
/// written is known, only what differs from the new rows is deleted and
/// written (a delta touches a few instances' entries, not every one);
/// otherwise it is cleared first, as [`write_generation`] does. Either way
/// the half ends up holding exactly the new rows, which become its record;
/// after a failure its record is `None`.
///
/// A record must describe the kernel's half exactly: only the apply that
/// wrote it may keep it, and only while no other process applied since
/// (`session` checks the state file for that).
///
/// # Errors
///
/// As [`write_generation`].
pub fn write_generation_over(
    maps: &mut dyn MapOps,
    c: &Compiled,
    ports: &[(u32, u32)],
    config: &Config,
    known: Option<&ObjectKeys>,
    halves: &mut [Option<Half>; 2],
) -> Result<(), SysError> {
    let new = slot_in_force(maps)? ^ 1;
    let held = halves[new as usize].take();
    let rows = half_rows(c, new);
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
    let cleared = match &held {
        // Known: the stale rows go with the diff below.
        Some(_) => Ok(()),
        None => clear_slot(maps, new),
    };
    let result = cleared
        .and_then(
            |()| match known.filter(|k| c.retire_now.iter().all(|id| k.contains_key(id))) {
                // Every retired object's keys are known: delete exactly those.
                Some(k) => delete_keys(maps, &c.retire_now, k),
                None => delete_ids(maps, &c.retire_now, &c.retire_now_kinds),
            },
        )
        .and_then(|()| write_and_switch(maps, c, ports, &config, &rows, held.as_ref()));
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
    halves[new as usize] = Some(rows);
    Ok(())
}

/// Deletes every entry of these ids (one pass over the id-keyed maps; none
/// when there is nothing to delete).
pub(super) fn delete_ids(
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
        let keys = maps.keys(map, *ks)?;
        let theirs: Vec<&[u8]> = keys
            .iter()
            .filter(|k| {
                ids.contains(&u32::from_be_bytes([
                    k[*off],
                    k[off + 1],
                    k[off + 2],
                    k[off + 3],
                ]))
            })
            .map(Vec::as_slice)
            .collect();
        maps.delete_many(map, &theirs)?;
    }
    if kinds.contains(&'n') {
        let keys: Vec<[u8; 4]> = ids.iter().map(|id| id.to_ne_bytes()).collect();
        let keys: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
        maps.delete_many(mn::NACL_META, &keys)?;
    }
    Ok(())
}

/// Every LPM key of every object a compile holds, by object id (ids of
/// objects without entries map to nothing): what a later apply deletes when
/// those objects retire, without walking the tries for them (a walk of a
/// 1,000-instance model's 87,000 SG prefix keys took ≈115 ms). A key is
/// `(index into GENERATIONAL, key bytes)`; each names its own id, so a stale
/// record can only miss entries (left for a sweep), never delete a live one.
pub type ObjectKeys = BTreeMap<u32, Vec<(u8, Vec<u8>)>>;

/// The [`ObjectKeys`] of a compile: every object of its book it emitted
/// (carried objects have no rows here: see [`keys_for_next`]).
pub fn object_keys(c: &Compiled) -> ObjectKeys {
    let mut out: ObjectKeys = c
        .book
        .ids
        .values()
        .filter(|id| !c.carried.contains(id))
        .map(|id| (*id, Vec::new()))
        .collect();
    for (id, ks) in object_rows(c) {
        out.entry(id).or_default().push(ks);
    }
    out
}

/// What an apply records for the next one: the keys of every object of its
/// compile, and — carried over from `known`, the record it read — those of
/// the objects it carried without emitting and of those it retired, which
/// the next apply deletes. An object whose keys are not known is left out,
/// so that deleting it walks the tries.
///
/// Built from `known` itself when there is one: what the last apply
/// deleted goes, the objects this compile emitted are written in, and
/// everything else is kept as recorded (an id names one content for ever,
/// so its keys are the ones recorded). The same record as building it from
/// the compile, without touching every object of the book.
pub fn keys_for_next(c: &Compiled, known: Option<ObjectKeys>) -> ObjectKeys {
    let Some(mut keys) = known else {
        return object_keys(c);
    };
    // Kept: what is in the book or retiring now. What goes: what this
    // apply deleted (the last one retired it), and anything of another book.
    let live: std::collections::HashSet<u32> = c
        .book
        .ids
        .values()
        .chain(c.book.retiring.values().flatten())
        .copied()
        .collect();
    keys.retain(|id, _| live.contains(id));
    // What this compile emitted, as it emitted it.
    let mut emitted: ObjectKeys = BTreeMap::new();
    for (id, ks) in object_rows(c) {
        emitted.entry(id).or_default().push(ks);
    }
    keys.extend(emitted);
    // Objects of the book without entries that the record lacks.
    for id in c.book.ids.values() {
        if !c.carried.contains(id) {
            keys.entry(*id).or_default();
        }
    }
    keys
}

/// Every emitted LPM key of a compile as (object id, (map index, key)).
fn object_rows(c: &Compiled) -> impl Iterator<Item = (u32, (u8, Vec<u8>))> + '_ {
    lpm_rows(mn::SG_CIDR_V4, &c.sg_cidr_v4, |_| true)
        .chain(lpm_rows(mn::SG_CIDR_V6, &c.sg_cidr_v6, |_| true))
        .chain(lpm_rows(mn::SG_PORTS, &c.sg_ports, |_| true))
        .chain(lpm_rows(mn::NACL_CIDR_V4, &c.nacl_cidr_v4, |_| true))
        .chain(lpm_rows(mn::NACL_CIDR_V6, &c.nacl_cidr_v6, |_| true))
        .chain(lpm_rows(mn::NACL_PORTS, &c.nacl_ports, |_| true))
        .filter_map(|(map, k, _)| {
            let gi = GENERATIONAL.iter().position(|g| g.0 == map)?;
            let off = GENERATIONAL[gi].2;
            let idb = k.get(off..off + 4)?;
            let id = u32::from_be_bytes([idb[0], idb[1], idb[2], idb[3]]);
            Some((id, (gi as u8, k)))
        })
}

/// Deletes the recorded keys of `ids` (and their NACL metadata), checking
/// that each key names the id it is recorded under.
pub(super) fn delete_keys(
    maps: &mut dyn MapOps,
    ids: &BTreeSet<u32>,
    known: &ObjectKeys,
) -> Result<(), SysError> {
    let mut by_map: Vec<Vec<&[u8]>> = vec![Vec::new(); GENERATIONAL.len()];
    for id in ids {
        for (gi, k) in known.get(id).into_iter().flatten() {
            let Some((_, ks, off)) = GENERATIONAL.get(usize::from(*gi)) else {
                continue;
            };
            let named = k
                .get(*off..off + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
            if k.len() != *ks || named != Some(*id) {
                continue;
            }
            by_map[usize::from(*gi)].push(k);
        }
    }
    for ((map, _, _), keys) in GENERATIONAL.iter().zip(&by_map) {
        maps.delete_many(map, keys)?;
    }
    // NACL tables' metadata is keyed by id alone (absent for other kinds:
    // deleting it is a no-op).
    let meta: Vec<[u8; 4]> = ids.iter().map(|id| id.to_ne_bytes()).collect();
    let meta: Vec<&[u8]> = meta.iter().map(|k| k.as_slice()).collect();
    maps.delete_many(mn::NACL_META, &meta)?;
    Ok(())
}

/// Deletes every entry of the id-keyed maps whose id `book` does not use:
/// what an apply that did not finish may have left, whole or in part.
pub(super) fn sweep_ids(maps: &mut dyn MapOps, book: &IdBook) -> Result<(), SysError> {
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

/// One element to write: key bytes, value bytes.
type Row = (Vec<u8>, Vec<u8>);

pub(super) fn write_and_switch(
    maps: &mut dyn MapOps,
    c: &Compiled,
    ports: &[(u32, u32)],
    config: &Config,
    half: &Half,
    held: Option<&Half>,
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
    // Batched per map: nothing in force names these objects before the switch.
    let mut by_map: Vec<(&'static str, Vec<Row>)> = Vec::new();
    let mut written = 0usize;
    for (map, k, v) in rows {
        match by_map.last_mut() {
            Some((m, rows)) if *m == map => rows.push((k, v)),
            _ => by_map.push((map, vec![(k, v)])),
        }
        written += 1;
    }
    let batch = |maps: &mut dyn MapOps, map: &str, rows: &[Row]| {
        let refs: Vec<(&[u8], &[u8])> = rows
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        maps.update_many(map, &refs)
    };
    for (map, rows) in &by_map {
        batch(maps, map, rows)?;
    }
    tracing::debug!("apply: {written} lookup entries of new objects written");
    let meta: Vec<Row> = c
        .nacl_meta
        .iter()
        .filter(|(id, _)| fresh(*id))
        .map(|(id, meta)| {
            (
                id.to_ne_bytes().to_vec(),
                bytemuck::bytes_of::<NaclMeta>(meta).to_vec(),
            )
        })
        .collect();
    batch(maps, mn::NACL_META, &meta)?;
    // 2. The half not in force: subnets, instances, identities, addresses
    //    (when what it holds is known, only what differs).
    for (i, (map, _, _)) in SLOTTED.iter().enumerate().rev() {
        let want = &half[i];
        match held.map(|h| &h[i]) {
            Some(have) => {
                let stale: Vec<&[u8]> = have
                    .keys()
                    .filter(|k| !want.contains_key(*k))
                    .map(Vec::as_slice)
                    .collect();
                maps.delete_many(map, &stale)?;
                let changed: Vec<(&[u8], &[u8])> = want
                    .iter()
                    .filter(|(k, v)| have.get(*k) != Some(*v))
                    .map(|(k, v)| (k.as_slice(), v.as_slice()))
                    .collect();
                maps.update_many(map, &changed)?;
            }
            None => {
                let all: Vec<(&[u8], &[u8])> = want
                    .iter()
                    .map(|(k, v)| (k.as_slice(), v.as_slice()))
                    .collect();
                maps.update_many(map, &all)?;
            }
        }
    }
    // Bindings of bound ports (instance indices are the same in both halves).
    let bound: Vec<_> = ports
        .iter()
        .map(|(ifx, inst)| (ifx.to_ne_bytes().to_vec(), inst.to_ne_bytes().to_vec()))
        .collect();
    batch(maps, mn::PORTS, &bound)?;
    // 3. The switch: one array write makes the new half, and a new
    //    generation (every conntrack fast-path cache is re-validated), in
    //    force for every hook at once.
    maps.update(mn::CONFIG, &0u32.to_ne_bytes(), bytemuck::bytes_of(config))?;
    Ok(())
}

/// Map capacities for a first load: generous, since LPM tries allocate on
/// demand and two generations coexist during a switch.
pub(super) fn capacities(c: &Compiled, conntrack_max: u32) -> BTreeMap<&'static str, u32> {
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
    m.insert(
        mn::CONNTRACK,
        if conntrack_max == 0 {
            conntrack_capacity_for(c.instances.len())
        } else {
            conntrack_max
        },
    );
    // Fragmented datagrams in flight per hook: bounded, LRU, 30 s each.
    m.insert(mn::FRAGS, 16_384);
    m.insert(
        mn::COUNTERS,
        (cap(c.instances.len(), 4096) + 1) * Reason::COUNT as u32,
    );
    m
}

/// Entries each map needs while both generations coexist.
pub(super) fn needed(c: &Compiled, old: &BTreeMap<String, usize>) -> Vec<(&'static str, usize)> {
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
