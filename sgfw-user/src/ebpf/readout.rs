//! Reading the dataplane back: decision events from the ring buffer, the
//! per-reason counters, the conntrack size, and the one `CONFIG` change a
//! reader may make (accept events on or off) under the backend's lock. It
//! must never write policy.

use super::*;

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
