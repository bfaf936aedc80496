//! What sgfw leaves on the host: pins under the pin root, TCX links on the
//! bridge ports and bridge devices, the nft bridge fence for ports not
//! attached yet, and teardown of all of it under the backend's lock. It must
//! never leave a port of a model bridge unfenced once the bridge is known.

use super::*;

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

pub(super) fn map_pin(root: &Path, name: &str) -> PathBuf {
    root.join("maps").join(name)
}

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

impl EbpfBackend {
    pub(super) fn pin_object(&self, ebpf: &mut Ebpf) -> Result<(), EbpfError> {
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
        let name = pn::XDP_FROM_INSTANCE;
        xdp_program(ebpf, name)?
            .pin(self.pin_root.join("progs").join(name))
            .map_err(|e| prog_err(format!("pinning program {name}"), e))?;
        Ok(())
    }

    /// Pinned links: (path, interface name, ifindex, hook), from the pin
    /// names that [`EbpfBackend::link_pin`] gives them.
    pub(super) fn link_pins(&self) -> Vec<(PathBuf, String, u32, String)> {
        let Ok(entries) = std::fs::read_dir(self.pin_root.join("links")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let (ifname, rest) = name.split_once('@')?;
                let (ifx, hook) = rest.split_once('-')?;
                let ifx = ifx.parse::<u32>().ok()?;
                Some((e.path(), ifname.to_string(), ifx, hook.to_string()))
            })
            .collect()
    }

    /// Ports with both TC links pinned: (interface name, ifindex). The XDP
    /// pre-filter's link does not count: TC is what enforces.
    pub fn attached_ports(&self) -> Vec<(String, u32)> {
        let mut out: BTreeMap<(String, u32), u8> = BTreeMap::new();
        for (_, ifname, ifx, hook) in self.link_pins() {
            if hook == "ingress" || hook == "egress" {
                *out.entry((ifname, ifx)).or_default() += 1;
            }
        }
        out.into_iter()
            .filter(|(_, n)| *n == 2)
            .map(|(k, _)| k)
            .collect()
    }

    // bpffs reserves names with dots for the kernel's own entries.
    pub(super) fn link_pin(&self, port: &sys::Port, dir: &str) -> PathBuf {
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

    pub(super) fn attach_ports_unlocked(&self, host: &dyn Host) -> Result<Vec<String>, EbpfError> {
        let Some(state) = self.state()? else {
            return Err(EbpfError::NotApplied);
        };
        self.attach_ports_with(host, &state)
    }

    /// [`EbpfBackend::attach_ports_unlocked`] with the state in force given
    /// (the apply that saved it).
    pub(super) fn attach_ports_with(
        &self,
        host: &dyn Host,
        state: &State,
    ) -> Result<Vec<String>, EbpfError> {
        // Forget links of interfaces that no longer exist (or were re-created
        // under the same name).
        for (path, ifname, ifx, hook) in self.link_pins() {
            // Also the XDP pre-filter's links once the dataplane is TC again
            // (unpinning the last reference detaches the link).
            let stale = hook == "xdp" && state.dataplane != Dataplane::Xdp;
            if stale || host.ifindex(&ifname)? != Some(ifx) {
                let _ = std::fs::remove_file(path);
            }
        }
        self.rebind(state, host)?;
        let mut attached = Vec::new();
        let mut progs: BTreeMap<&'static str, SchedClassifier> = BTreeMap::new();
        let bridges: BTreeSet<&String> = state.bridges.values().collect();
        let result = self
            .attach_bridges(host, bridges, &mut progs, &mut attached)
            .and_then(|()| {
                if state.dataplane == Dataplane::Xdp {
                    self.attach_xdp(host, state)
                } else {
                    Ok(())
                }
            });
        // Whatever got attached (also when a later port failed), the fence
        // follows: a port joins `attached` only once both its links are in.
        self.update_fence(host, state);
        result.map(|()| attached)
    }

    pub(super) fn attach_bridges(
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

    /// Attaches the XDP pre-filter to every port of the state's bridges that
    /// has not got it (native mode; generic where the driver has none, with
    /// a warning: the semantics are the same, the saving is not). A port
    /// whose XDP attach fails keeps its TC hooks, which enforce alone.
    pub(super) fn attach_xdp(&self, host: &dyn Host, state: &State) -> Result<(), EbpfError> {
        let mut prog: Option<Xdp> = None;
        let bridges: BTreeSet<&String> = state.bridges.values().collect();
        for bridge in bridges {
            if host.ifindex(bridge)?.is_none() {
                continue;
            }
            for port in host.bridge_ports(bridge)? {
                let pin = self.link_pin(&port, "xdp");
                if pin.exists() {
                    continue;
                }
                let p = match prog.as_mut() {
                    Some(p) => p,
                    None => prog.insert(
                        Xdp::from_pin(
                            self.pin_root.join("progs").join(pn::XDP_FROM_INSTANCE),
                            aya_obj::programs::XdpAttachType::Interface,
                        )
                        .map_err(|e| prog_err("opening the pinned XDP program".into(), e))?,
                    ),
                };
                let id = match p.attach_to_if_index(port.ifindex, XdpMode::Driver) {
                    Ok(id) => id,
                    Err(native) => {
                        tracing::warn!(
                            "{}: native XDP refused ({native}); attaching in generic mode",
                            port.name
                        );
                        p.attach_to_if_index(port.ifindex, XdpMode::Skb)
                            .map_err(|e| prog_err(format!("attaching XDP to {}", port.name), e))?
                    }
                };
                let link = p
                    .take_link(id)
                    .map_err(|e| prog_err(format!("taking XDP link of {}", port.name), e))?;
                let fd: FdLink = link.try_into().map_err(|e| {
                    prog_err(format!("XDP link of {} is not a bpf link", port.name), e)
                })?;
                fd.pin(&pin)
                    .map_err(|e| prog_err(format!("pinning link {}", pin.display()), e))?;
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
    pub(super) fn update_fence(&self, host: &dyn Host, state: &State) {
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
    pub(super) fn rebind(&self, state: &State, host: &dyn Host) -> Result<(), EbpfError> {
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
    pub(super) fn attach_one(
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
        self.session().forget();
        self.teardown_unlocked()
    }

    /// One apply or teardown at a time on this host (per pin root): an
    /// exclusive `flock` on a file beside the state file, released on drop.
    pub(super) fn lock(&self) -> Result<std::fs::File, EbpfError> {
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

    pub(super) fn teardown_unlocked(&self) -> Result<(), EbpfError> {
        // The fence first: with the links gone every port is "not attached".
        let _ = std::fs::remove_file(self.state_path.with_extension("fence"));
        let _ = std::fs::remove_file(self.keys_path());
        let _ = std::fs::remove_file(Journal::path(&self.state_path));
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
}
