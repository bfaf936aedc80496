//! Loading the BPF object: map capacities set before load, every program
//! verified, and the map fds for [`MapOps`]. It owns nothing on the host:
//! pinning and attaching are [`super::pins`]'s.

use super::*;

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

/// The XDP program of the object by name.
pub fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp, EbpfError> {
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

/// Whether a program of the object is an XDP program (the rest are TC
/// classifiers).
pub fn is_xdp(name: &str) -> bool {
    name == pn::XDP_FROM_INSTANCE || name == pn::XDP_NOOP
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
    pn::XDP_FROM_INSTANCE,
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
        let loaded = if is_xdp(name) {
            xdp_program(&mut ebpf, name)?.load()
        } else {
            classifier(&mut ebpf, name)?.load()
        };
        loaded.map_err(|e| prog_err(format!("loading program {name}"), e))?;
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

pub(super) fn map_fd(map: &Map) -> Result<std::os::fd::OwnedFd, EbpfError> {
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
