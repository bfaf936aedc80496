//! The one seam between sgfw and the kernel.
//!
//! Every interaction with the host that a backend needs — BPF map element
//! operations, finding a bridge's ports, running `nft` — passes through the
//! traits here, so unprivileged tests can replace the host with a fake and
//! exercise failures without root. Loading and attaching BPF programs goes
//! through aya in [`crate::ebpf`]; this module owns the raw `bpf(2)` map
//! element calls, with the syscall named in every error.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A failed interaction with the host.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// A `bpf(2)` command failed.
    #[error("bpf({cmd}) on map {map} failed")]
    Bpf {
        /// The command's name.
        cmd: &'static str,
        /// The map.
        map: String,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// Reading or writing a file (sysfs, bpffs, state).
    #[error("{what} {path}")]
    File {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A helper program could not be run or failed.
    #[error("{program} failed: {stderr}")]
    Command {
        /// The program.
        program: String,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
    /// A helper program could not be started.
    #[error("could not run {program}")]
    Spawn {
        /// The program.
        program: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// No map with this name is open.
    #[error("map {0} is not open")]
    NoSuchMap(String),
}

/// A port of a bridge: the host end of an instance's veth.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Port {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub ifindex: u32,
}

/// Network-facing host operations.
pub trait Host {
    /// The ports enslaved to `bridge` (empty when the bridge does not exist).
    fn bridge_ports(&self, bridge: &str) -> Result<Vec<Port>, SysError>;
    /// The ifindex of an interface, `None` when it does not exist.
    fn ifindex(&self, name: &str) -> Result<Option<u32>, SysError>;
    /// Runs `nft` with `args`, feeding `stdin`; returns its stdout.
    fn nft(&self, args: &[&str], stdin: Option<&str>) -> Result<String, SysError>;
    /// The host's bridges and their addresses (for `sgfw import`'s bridge
    /// discovery). The default implementation knows none.
    fn bridge_addresses(&self) -> Result<Vec<(String, Vec<ipnet::IpNet>)>, SysError> {
        Ok(Vec::new())
    }
    /// Reads a sysctl by its path under `/proc/sys` (e.g.
    /// `net/bridge/bridge-nf-call-iptables`), trimmed; `None` when it does not
    /// exist (for that one: `br_netfilter` is not loaded).
    ///
    /// The default implementation fails: hosts that do not implement it
    /// cannot run the nftables backend.
    fn read_sysctl(&self, key: &str) -> Result<Option<String>, SysError> {
        Err(unsupported("reading (not supported by this host)", key))
    }
    /// Writes a sysctl by its path under `/proc/sys`.
    ///
    /// The default implementation fails, like [`Host::read_sysctl`].
    fn write_sysctl(&self, key: &str, value: &str) -> Result<(), SysError> {
        let _ = value;
        Err(unsupported("writing (not supported by this host)", key))
    }

    /// Reads a small state file of sgfw's (under `/run/sgfw` on a real host).
    /// The default implementation has none.
    fn load_state(&self, _name: &str) -> Option<String> {
        None
    }

    /// Writes a small state file of sgfw's. The default keeps nothing.
    fn save_state(&self, _name: &str, _contents: &str) {}

    /// Removes a state file of sgfw's. The default does nothing.
    fn remove_state(&self, _name: &str) {}
}

fn unsupported(what: &'static str, key: &str) -> SysError {
    SysError::File {
        what,
        path: Path::new("/proc/sys").join(key),
        source: io::Error::from(io::ErrorKind::Unsupported),
    }
}

/// The file of a sysctl key; keys are sgfw's own constants, still checked so
/// that no key can leave `/proc/sys`.
fn sysctl_path(key: &str) -> Result<PathBuf, SysError> {
    let ok = !key.is_empty()
        && key.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        });
    if ok {
        Ok(Path::new("/proc/sys").join(key))
    } else {
        Err(SysError::File {
            what: "refusing sysctl key",
            path: PathBuf::from(key),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })
    }
}

/// Where a real host keeps sgfw's small state files.
pub const STATE_DIR: &str = "/run/sgfw";

/// The real host: sysfs for links, the `nft` program for nftables.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealHost;

fn read_trim(path: &Path) -> Result<String, SysError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| SysError::File {
            what: "reading",
            path: path.to_path_buf(),
            source,
        })
}

impl Host for RealHost {
    fn bridge_addresses(&self) -> Result<Vec<(String, Vec<ipnet::IpNet>)>, SysError> {
        let dir = Path::new("/sys/class/net");
        let entries = std::fs::read_dir(dir).map_err(|source| SysError::File {
            what: "listing",
            path: dir.to_path_buf(),
            source,
        })?;
        let mut bridges: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().join("bridge").exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        bridges.sort();
        let out = Command::new("ip")
            .args(["-j", "addr", "show"])
            .output()
            .map_err(|source| SysError::Spawn {
                program: "ip".into(),
                source,
            })?;
        if !out.status.success() {
            return Err(SysError::Command {
                program: "ip -j addr show".into(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        let links: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|_| SysError::Command {
                program: "ip -j addr show".into(),
                stderr: "output is not JSON".into(),
            })?;
        let mut res = Vec::new();
        for b in bridges {
            let addrs = links
                .as_array()
                .into_iter()
                .flatten()
                .filter(|l| l.get("ifname").and_then(|n| n.as_str()) == Some(b.as_str()))
                .flat_map(|l| {
                    l.get("addr_info")
                        .and_then(|a| a.as_array())
                        .cloned()
                        .unwrap_or_default()
                })
                .filter_map(|a| {
                    let ip: std::net::IpAddr = a.get("local")?.as_str()?.parse().ok()?;
                    let len = u8::try_from(a.get("prefixlen")?.as_u64()?).ok()?;
                    ipnet::IpNet::new(ip, len).ok()
                })
                .collect();
            res.push((b, addrs));
        }
        Ok(res)
    }

    fn bridge_ports(&self, bridge: &str) -> Result<Vec<Port>, SysError> {
        let dir = Path::new("/sys/class/net").join(bridge).join("brif");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(SysError::File {
                    what: "listing",
                    path: dir,
                    source,
                });
            }
        };
        let mut ports = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(ifindex) = self.ifindex(&name)? {
                ports.push(Port { name, ifindex });
            }
        }
        ports.sort();
        Ok(ports)
    }

    fn ifindex(&self, name: &str) -> Result<Option<u32>, SysError> {
        let path = Path::new("/sys/class/net").join(name).join("ifindex");
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(s.trim().parse().ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            // An interface being deleted answers EINVAL or ENODEV for a
            // moment before its directory goes: it is gone.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENODEV)) => Ok(None),
            Err(source) => Err(SysError::File {
                what: "reading",
                path,
                source,
            }),
        }
    }

    fn nft(&self, args: &[&str], stdin: Option<&str>) -> Result<String, SysError> {
        use std::io::Write;
        if let (["-f", "-"], Some(input)) = (args, stdin)
            && input.len() <= libnft::MAX_INPUT
            && let Some(result) = libnft::run(input)
        {
            return result.map_err(|stderr| SysError::Command {
                program: format!("nft {}", args.join(" ")),
                stderr,
            });
        }
        let mut child = Command::new("nft")
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| SysError::Spawn {
                program: "nft".into(),
                source,
            })?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())
                .map_err(|source| SysError::Spawn {
                    program: "nft".into(),
                    source,
                })?;
        }
        let out = child.wait_with_output().map_err(|source| SysError::Spawn {
            program: "nft".into(),
            source,
        })?;
        if !out.status.success() {
            return Err(SysError::Command {
                program: format!("nft {}", args.join(" ")),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn read_sysctl(&self, key: &str) -> Result<Option<String>, SysError> {
        let path = sysctl_path(key)?;
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s.trim().to_string())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SysError::File {
                what: "reading",
                path,
                source,
            }),
        }
    }

    fn write_sysctl(&self, key: &str, value: &str) -> Result<(), SysError> {
        let path = sysctl_path(key)?;
        std::fs::write(&path, value).map_err(|source| SysError::File {
            what: "writing",
            path,
            source,
        })
    }

    fn load_state(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(Path::new(STATE_DIR).join(name)).ok()
    }

    fn save_state(&self, name: &str, contents: &str) {
        let _ = std::fs::create_dir_all(STATE_DIR);
        let _ = std::fs::write(Path::new(STATE_DIR).join(name), contents);
    }

    fn remove_state(&self, name: &str) {
        let _ = std::fs::remove_file(Path::new(STATE_DIR).join(name));
        // Only removes the directory when nothing else of sgfw's is left.
        let _ = std::fs::remove_dir(STATE_DIR);
    }
}

/// Element operations on BPF maps, by map name and raw bytes. LPM-trie keys
/// are the kernel's `{u32 prefixlen; data}` layout.
pub trait MapOps {
    /// Inserts or replaces an element.
    fn update(&mut self, map: &str, key: &[u8], value: &[u8]) -> Result<(), SysError>;
    /// Deletes an element; a missing element is not an error.
    fn delete(&mut self, map: &str, key: &[u8]) -> Result<(), SysError>;
    /// Every key of the map.
    fn keys(&mut self, map: &str, key_size: usize) -> Result<Vec<Vec<u8>>, SysError>;
    /// One element's value.
    fn lookup(
        &mut self,
        map: &str,
        key: &[u8],
        value_size: usize,
    ) -> Result<Option<Vec<u8>>, SysError>;
    /// Inserts or replaces every element of `rows` (keys of one size,
    /// values of one size), in order; on an error the elements before the
    /// failing one are written, as a loop of [`MapOps::update`] leaves them.
    fn update_many(&mut self, map: &str, rows: &[(&[u8], &[u8])]) -> Result<(), SysError> {
        for (k, v) in rows {
            self.update(map, k, v)?;
        }
        Ok(())
    }
    /// Deletes every key of `keys` (one size); missing keys are no error.
    fn delete_many(&mut self, map: &str, keys: &[&[u8]]) -> Result<(), SysError> {
        for k in keys {
            self.delete(map, k)?;
        }
        Ok(())
    }
}

/// Real maps, by file descriptor.
#[derive(Debug, Default)]
pub struct KernelMaps {
    fds: BTreeMap<String, OwnedFd>,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Elements per batch syscall: bounds the kernel buffer and one call's time.
const BATCH: usize = 4096;

/// `union bpf_attr` as the `BPF_MAP_*_BATCH` commands read it.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// One batch command; `Ok` or the error with how many elements it did.
fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> Result<(), (io::Error, usize)> {
    // SAFETY: `attr` is a valid bpf_attr prefix for the batch commands; the
    // key and value buffers it points to hold `count` elements and outlive
    // the call; the kernel writes back only `count`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err((io::Error::last_os_error(), attr.count as usize))
    } else {
        Ok(())
    }
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_map_info`.
#[repr(C)]
#[derive(Default)]
struct MapInfoHead {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
}

/// A map's key and value sizes, from the kernel.
fn map_sizes(fd: u32) -> io::Result<(usize, usize)> {
    let mut info = MapInfoHead::default();
    let attr = InfoAttr {
        bpf_fd: fd,
        info_len: size_of::<MapInfoHead>() as u32,
        info: &raw mut info as u64,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for BPF_OBJ_GET_INFO_BY_FD;
    // the kernel writes at most `info_len` bytes into `info`, which outlives
    // the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw const attr,
            size_of::<InfoAttr>() as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((info.key_size as usize, info.value_size as usize))
}

/// Whether a batch command failed because the kernel or the map type lacks
/// it (then the elements are written one by one).
fn batch_unsupported(e: &io::Error, done: usize) -> bool {
    // 524 = ENOTSUPP, the kernel-internal code a missing map op returns.
    done == 0
        && matches!(
            e.raw_os_error(),
            Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
        )
}

/// Keys (or values) of one size back to back, or `None` when the sizes differ.
fn packed(items: impl Iterator<Item = impl AsRef<[u8]>>) -> Option<(Vec<u8>, usize)> {
    let mut out = Vec::new();
    let mut size = None;
    for it in items {
        let b = it.as_ref();
        if *size.get_or_insert(b.len()) != b.len() {
            return None;
        }
        out.extend_from_slice(b);
    }
    Some((out, size.unwrap_or(0)))
}

/// `union bpf_attr` as the map element commands read it.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf_elem(cmd: libc::c_long, attr: &ElemAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid bpf_attr prefix for the map element commands;
    // the pointers in it outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const ElemAttr,
            size_of::<ElemAttr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl KernelMaps {
    /// Adds an open map under its name.
    pub fn insert(&mut self, name: &str, fd: OwnedFd) {
        self.fds.insert(name.to_string(), fd);
    }

    /// Kernel memory charged to each open map (`memlock` in its fdinfo), bytes.
    pub fn memory(&self) -> BTreeMap<String, u64> {
        self.fds
            .iter()
            .filter_map(|(name, fd)| {
                let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
                    .ok()?;
                let bytes = info
                    .lines()
                    .find_map(|l| l.strip_prefix("memlock:"))
                    .and_then(|v| v.trim().parse().ok())?;
                Some((name.clone(), bytes))
            })
            .collect()
    }

    fn fd(&self, map: &str) -> Result<u32, SysError> {
        self.fds
            .get(map)
            .map(|f| f.as_raw_fd() as u32)
            .ok_or_else(|| SysError::NoSuchMap(map.to_string()))
    }
}

/// Crash injection for the crash tests (`tests/tests/crash.rs`): with
/// `SGFW_CRASH_AFTER_MAP_WRITES=N` in the environment, the process aborts
/// just before its (N+1)-th map update or delete, as a kill at that moment
/// would leave it. Unset (always, outside those tests) it costs one atomic
/// load per write.
fn crash_point() {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let limit = LIMIT.get_or_init(|| {
        std::env::var("SGFW_CRASH_AFTER_MAP_WRITES")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if let Some(n) = limit
        && WRITES.fetch_add(1, Ordering::Relaxed) >= *n
    {
        std::process::abort();
    }
}

impl MapOps for KernelMaps {
    fn update(&mut self, map: &str, key: &[u8], value: &[u8]) -> Result<(), SysError> {
        crash_point();
        let attr = ElemAttr {
            map_fd: self.fd(map)?,
            key: key.as_ptr() as u64,
            value: value.as_ptr() as u64,
            ..ElemAttr::default()
        };
        bpf_elem(BPF_MAP_UPDATE_ELEM, &attr).map_err(|source| SysError::Bpf {
            cmd: "BPF_MAP_UPDATE_ELEM",
            map: map.to_string(),
            source,
        })
    }

    fn delete(&mut self, map: &str, key: &[u8]) -> Result<(), SysError> {
        crash_point();
        let attr = ElemAttr {
            map_fd: self.fd(map)?,
            key: key.as_ptr() as u64,
            ..ElemAttr::default()
        };
        match bpf_elem(BPF_MAP_DELETE_ELEM, &attr) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(source) => Err(SysError::Bpf {
                cmd: "BPF_MAP_DELETE_ELEM",
                map: map.to_string(),
                source,
            }),
        }
    }

    fn update_many(&mut self, map: &str, rows: &[(&[u8], &[u8])]) -> Result<(), SysError> {
        let fd = self.fd(map)?;
        for chunk in rows.chunks(BATCH) {
            let batched = match (
                packed(chunk.iter().map(|r| r.0)),
                packed(chunk.iter().map(|r| r.1)),
            ) {
                (Some((keys, _)), Some((values, _))) => {
                    // A kill lands between batches: the kernel does one whole.
                    crash_point();
                    let mut attr = BatchAttr {
                        keys: keys.as_ptr() as u64,
                        values: values.as_ptr() as u64,
                        count: chunk.len() as u32,
                        map_fd: fd,
                        ..BatchAttr::default()
                    };
                    match bpf_batch(BPF_MAP_UPDATE_BATCH, &mut attr) {
                        Ok(()) => true,
                        Err((e, done)) if batch_unsupported(&e, done) => false,
                        Err((source, _)) => {
                            return Err(SysError::Bpf {
                                cmd: "BPF_MAP_UPDATE_BATCH",
                                map: map.to_string(),
                                source,
                            });
                        }
                    }
                }
                _ => false,
            };
            if !batched {
                for (k, v) in chunk {
                    self.update(map, k, v)?;
                }
            }
        }
        Ok(())
    }

    fn delete_many(&mut self, map: &str, keys: &[&[u8]]) -> Result<(), SysError> {
        let fd = self.fd(map)?;
        for chunk in keys.chunks(BATCH) {
            let Some((packed_keys, ks)) = packed(chunk.iter()) else {
                for k in chunk {
                    self.delete(map, k)?;
                }
                continue;
            };
            crash_point();
            // The kernel stops at the first missing key: skip it, go on.
            let mut from = 0;
            while from < chunk.len() {
                let mut attr = BatchAttr {
                    keys: packed_keys[from * ks..].as_ptr() as u64,
                    count: (chunk.len() - from) as u32,
                    map_fd: fd,
                    ..BatchAttr::default()
                };
                match bpf_batch(BPF_MAP_DELETE_BATCH, &mut attr) {
                    Ok(()) => break,
                    Err((e, done)) if e.raw_os_error() == Some(libc::ENOENT) => from += done + 1,
                    Err((e, done)) if batch_unsupported(&e, done) => {
                        for k in &chunk[from..] {
                            self.delete(map, k)?;
                        }
                        break;
                    }
                    Err((source, _)) => {
                        return Err(SysError::Bpf {
                            cmd: "BPF_MAP_DELETE_BATCH",
                            map: map.to_string(),
                            source,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn keys(&mut self, map: &str, key_size: usize) -> Result<Vec<Vec<u8>>, SysError> {
        let fd = self.fd(map)?;
        if let Some(keys) = keys_batched(fd, map, key_size)? {
            return Ok(keys);
        }
        let mut out = Vec::new();
        let mut cur: Option<Vec<u8>> = None;
        loop {
            let mut next = vec![0u8; key_size];
            let attr = ElemAttr {
                map_fd: fd,
                key: cur.as_ref().map_or(0, |k| k.as_ptr() as u64),
                value: next.as_mut_ptr() as u64,
                ..ElemAttr::default()
            };
            match bpf_elem(BPF_MAP_GET_NEXT_KEY, &attr) {
                Ok(()) => {
                    out.push(next.clone());
                    cur = Some(next);
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
                Err(source) => {
                    return Err(SysError::Bpf {
                        cmd: "BPF_MAP_GET_NEXT_KEY",
                        map: map.to_string(),
                        source,
                    });
                }
            }
        }
    }

    fn lookup(
        &mut self,
        map: &str,
        key: &[u8],
        value_size: usize,
    ) -> Result<Option<Vec<u8>>, SysError> {
        let mut value = vec![0u8; value_size];
        let attr = ElemAttr {
            map_fd: self.fd(map)?,
            key: key.as_ptr() as u64,
            value: value.as_mut_ptr() as u64,
            ..ElemAttr::default()
        };
        match bpf_elem(BPF_MAP_LOOKUP_ELEM, &attr) {
            Ok(()) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(source) => Err(SysError::Bpf {
                cmd: "BPF_MAP_LOOKUP_ELEM",
                map: map.to_string(),
                source,
            }),
        }
    }
}

/// Every key of a map by `BPF_MAP_LOOKUP_BATCH` (a few syscalls, not one
/// per key); `None` when the kernel or map type lacks it, or the sizes are
/// not what the caller expects (then the caller walks the keys).
fn keys_batched(fd: u32, map: &str, key_size: usize) -> Result<Option<Vec<Vec<u8>>>, SysError> {
    let Ok((ks, vs)) = map_sizes(fd) else {
        return Ok(None);
    };
    if ks != key_size || vs == 0 {
        return Ok(None);
    }
    let mut out = Vec::new();
    // The resume token: a key for tries and arrays, a bucket index for hashes.
    let mut token_in = vec![0u8; ks.max(8)];
    let mut token_out = vec![0u8; ks.max(8)];
    let mut keys = vec![0u8; BATCH * ks];
    let mut values = vec![0u8; BATCH * vs];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd,
            ..BatchAttr::default()
        };
        let r = bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(BATCH);
        let last = match r {
            Ok(()) => n == 0,
            Err((e, _)) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err((e, done)) if first && batch_unsupported(&e, done) => return Ok(None),
            Err((source, _)) => {
                return Err(SysError::Bpf {
                    cmd: "BPF_MAP_LOOKUP_BATCH",
                    map: map.to_string(),
                    source,
                });
            }
        };
        out.extend(keys[..n * ks].chunks_exact(ks).map(<[u8]>::to_vec));
        if last {
            return Ok(Some(out));
        }
        token_in.copy_from_slice(&token_out);
        first = false;
    }
}

/// In-memory maps for unprivileged tests; can be told to fail an operation.
#[derive(Debug, Default, Clone)]
pub struct FakeMaps {
    /// Map name → key → value.
    pub maps: BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>>,
    /// Fail the n-th update (0-based) from now on, once.
    pub fail_update_at: Option<usize>,
    /// Updates performed so far.
    pub updates: usize,
}

impl MapOps for FakeMaps {
    fn update(&mut self, map: &str, key: &[u8], value: &[u8]) -> Result<(), SysError> {
        if self.fail_update_at == Some(self.updates) {
            self.fail_update_at = None;
            return Err(SysError::Bpf {
                cmd: "BPF_MAP_UPDATE_ELEM",
                map: map.to_string(),
                source: io::Error::from_raw_os_error(libc::E2BIG),
            });
        }
        self.updates += 1;
        self.maps
            .entry(map.to_string())
            .or_default()
            .insert(key.to_vec(), value.to_vec());
        Ok(())
    }
    fn delete(&mut self, map: &str, key: &[u8]) -> Result<(), SysError> {
        if let Some(m) = self.maps.get_mut(map) {
            m.remove(key);
        }
        Ok(())
    }
    fn keys(&mut self, map: &str, _key_size: usize) -> Result<Vec<Vec<u8>>, SysError> {
        Ok(self
            .maps
            .get(map)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default())
    }
    fn lookup(
        &mut self,
        map: &str,
        key: &[u8],
        _value_size: usize,
    ) -> Result<Option<Vec<u8>>, SysError> {
        Ok(self.maps.get(map).and_then(|m| m.get(key).cloned()))
    }
}

/// Makes sure a BPF filesystem is mounted at `/sys/fs/bpf`.
pub fn ensure_bpffs() -> Result<(), SysError> {
    let mounts = read_trim(Path::new("/proc/mounts"))?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    let out = Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .output()
        .map_err(|source| SysError::Spawn {
            program: "mount".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(SysError::Command {
            program: "mount -t bpf bpf /sys/fs/bpf".into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Whether the container daemon the environment points at shares this
/// host's network namespace, so that enforcing here filters its containers.
/// `Err(why)` for a daemon that runs elsewhere: `DOCKER_HOST` or
/// `CONTAINER_HOST` naming a remote (`tcp://`, `ssh://`) or a Docker Desktop
/// or podman machine socket, or daemons running only in other network
/// namespaces. No daemon at all is `Ok` (namespaces and veths made by hand).
pub fn container_daemon_netns() -> Result<(), String> {
    let env: Vec<(&str, String)> = ["DOCKER_HOST", "CONTAINER_HOST"]
        .into_iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k, v)))
        .collect();
    daemon_verdict(&env, &daemon_namespaces())
}

/// (daemon process name, whether it is in this process's network namespace)
/// for every dockerd, podman and containerd running.
fn daemon_namespaces() -> Vec<(String, bool)> {
    let own = std::fs::read_link("/proc/self/ns/net").ok();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let p = e.path();
        let Ok(comm) = std::fs::read_to_string(p.join("comm")) else {
            continue;
        };
        let comm = comm.trim();
        if !matches!(comm, "dockerd" | "containerd" | "podman") {
            continue;
        }
        let ns = std::fs::read_link(p.join("ns/net")).ok();
        out.push((comm.to_string(), ns.is_some() && ns == own));
    }
    out
}

/// The decision of [`container_daemon_netns`], on its inputs.
fn daemon_verdict(env: &[(&str, String)], daemons: &[(String, bool)]) -> Result<(), String> {
    for (k, v) in env {
        let remote = !(v.starts_with("unix://") || v.starts_with('/'));
        let vm = [".docker/desktop", "podman-machine", "podman/machine"]
            .iter()
            .any(|m| v.contains(m));
        if remote || vm {
            return Err(format!(
                "{k}={v}: the container daemon runs on another machine or in a VM (Docker Desktop, podman machine), whose network this host cannot filter"
            ));
        }
    }
    if !daemons.is_empty() && daemons.iter().all(|(_, same)| !same) {
        let names: Vec<&str> = daemons.iter().map(|(n, _)| n.as_str()).collect();
        return Err(format!(
            "the container daemon ({}) runs in another network namespace than this process, so its bridges are not this host's",
            names.join(", ")
        ));
    }
    Ok(())
}

/// Whether [`RealHost`]'s `nft -f -` transactions run in-process through
/// libnftables (else through the `nft` command).
pub fn nft_in_process() -> bool {
    libnft::in_use()
}

/// nftables' own library, `libnftables.so.1` (the `nft` command is a thin
/// front end to it), opened at run time with one context for the process:
/// a transaction (up to `MAX_INPUT`, 256 KiB) then costs neither a process
/// start nor the close of a netlink socket, which after a commit that removed rules waits for an RCU
/// grace period (one rule-chain refill at 1,000 instances: ≈37 ms through
/// the command, ≈15 ms here). `SGFW_NFT_COMMAND=1`, or no library, runs the
/// command instead.
mod libnft {
    use std::ffi::{CStr, CString, c_char, c_int, c_void};
    use std::sync::{Mutex, OnceLock};

    type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
    type CtxFn = unsafe extern "C" fn(*mut c_void) -> c_int;
    type RunFile = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;
    type Buffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;

    /// The library and the one context.
    struct Lib {
        ctx: *mut c_void,
        run: RunFile,
        output: Buffer,
        error: Buffer,
        /// Kept loaded for as long as `ctx` and the functions are used
        /// (for the process: the context is never freed).
        _lib: libloading::Library,
    }

    // SAFETY: the context is used by one thread at a time (behind the
    // mutex below); libnftables keeps no thread-local state of its own.
    unsafe impl Send for Lib {}

    static LIB: OnceLock<Option<Mutex<Lib>>> = OnceLock::new();

    /// The largest transaction run in-process. A whole ruleset (a first
    /// apply, a replace: 1.6 MiB at 1,000 instances) goes to the command:
    /// parsing it takes nft ≈50 MiB, which in-process would stay in this
    /// process's peak memory, and there the process start is a small part
    /// of the cost. In-place changes are kilobytes.
    pub(super) const MAX_INPUT: usize = 256 * 1024;

    /// Whether transactions go through the library.
    pub(super) fn in_use() -> bool {
        LIB.get_or_init(open).is_some()
    }

    fn open() -> Option<Mutex<Lib>> {
        if std::env::var_os("SGFW_NFT_COMMAND").is_some_and(|v| v != "0") {
            return None;
        }
        // SAFETY: loading nftables' library runs its initialisers, which
        // have no requirements of the caller.
        let lib = unsafe { libloading::Library::new("libnftables.so.1") }
            .map_err(|e| tracing::debug!("libnftables: {e}; running the nft command"))
            .ok()?;
        // SAFETY: the symbols have these C signatures (libnftables.h,
        // stable since nftables 0.9); the pointers are copied out while
        // `lib` stays loaded for as long as they are used.
        let lib_fns = unsafe {
            (
                lib.get::<CtxNew>(b"nft_ctx_new\0").map(|s| *s),
                lib.get::<CtxFn>(b"nft_ctx_buffer_output\0").map(|s| *s),
                lib.get::<CtxFn>(b"nft_ctx_buffer_error\0").map(|s| *s),
                lib.get::<RunFile>(b"nft_run_cmd_from_filename\0")
                    .map(|s| *s),
                lib.get::<Buffer>(b"nft_ctx_get_output_buffer\0")
                    .map(|s| *s),
                lib.get::<Buffer>(b"nft_ctx_get_error_buffer\0").map(|s| *s),
            )
        };
        let (Ok(new), Ok(buffer_output), Ok(buffer_error), Ok(run), Ok(output), Ok(error)) =
            lib_fns
        else {
            tracing::debug!("libnftables lacks a function sgfw uses; running the nft command");
            return None;
        };
        // SAFETY: NFT_CTX_DEFAULT (0); a null context means failure.
        let ctx = unsafe { new(0) };
        if ctx.is_null() {
            return None;
        }
        // SAFETY: `ctx` is a live context.
        if unsafe { buffer_output(ctx) } != 0 || unsafe { buffer_error(ctx) } != 0 {
            return None;
        }
        Some(Mutex::new(Lib {
            ctx,
            run,
            output,
            error,
            _lib: lib,
        }))
    }

    /// Runs `input` as `nft -f -` would: its output, or what nft reported
    /// on failure (word for word what the command prints); `None` when the
    /// library cannot be used.
    ///
    /// The input goes through a memory file read by name, as the command
    /// reads `/dev/stdin`: libnftables' buffer entry point reports errors
    /// against the wrong line.
    pub(super) fn run(input: &str) -> Option<Result<String, String>> {
        use std::io::Write;
        use std::os::fd::{AsRawFd, FromRawFd};
        let lib = LIB.get_or_init(open).as_ref()?;
        // SAFETY: a name and flags; the descriptor is owned below.
        let fd = unsafe { libc::memfd_create(c"sgfw-nft".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a descriptor just made and owned by nothing else.
        let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
        if file.write_all(input.as_bytes()).is_err() {
            return None;
        }
        let name = format!("/proc/self/fd/{}", file.as_raw_fd());
        let Ok(cmd) = CString::new(name.as_str()) else {
            return None;
        };
        let guard = match lib.lock() {
            Ok(g) => g,
            // A panic while holding it left no half-done state of ours.
            Err(p) => p.into_inner(),
        };
        let copy = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                // SAFETY: libnftables returns a NUL-terminated buffer that
                // stays valid until the next call on this context.
                unsafe { CStr::from_ptr(p) }
                    .to_string_lossy()
                    .trim()
                    .to_string()
            }
        };
        // SAFETY: a live context and a NUL-terminated file name.
        let rc = unsafe { (guard.run)(guard.ctx, cmd.as_ptr()) };
        // SAFETY: as above; both buffers are read (and so reset) every run.
        let (out, err) = unsafe {
            (
                copy((guard.output)(guard.ctx)),
                copy((guard.error)(guard.ctx)),
            )
        };
        drop(file);
        Some(if rc == 0 {
            Ok(out)
        } else {
            Err(err.replace(&format!("{name}:"), "/dev/stdin:"))
        })
    }
}

#[cfg(test)]
mod daemon_tests {
    use super::daemon_verdict;

    #[test]
    fn a_daemon_elsewhere_is_named() {
        assert!(
            daemon_verdict(&[], &[]).is_ok(),
            "no daemon: namespaces by hand"
        );
        assert!(
            daemon_verdict(
                &[("DOCKER_HOST", "unix:///run/docker.sock".into())],
                &[("dockerd".into(), true)]
            )
            .is_ok()
        );
        for v in [
            "tcp://10.0.0.5:2375",
            "ssh://me@vm",
            "unix:///home/me/.docker/desktop/docker.sock",
        ] {
            let e = daemon_verdict(&[("DOCKER_HOST", v.into())], &[]).unwrap_err();
            assert!(e.contains(v), "{e}");
        }
        let e = daemon_verdict(
            &[(
                "CONTAINER_HOST",
                "unix:///run/user/1000/podman/podman-machine-default-api.sock".into(),
            )],
            &[],
        )
        .unwrap_err();
        assert!(e.contains("CONTAINER_HOST"), "{e}");
        let e = daemon_verdict(&[], &[("dockerd".into(), false)]).unwrap_err();
        assert!(e.contains("dockerd"), "{e}");
        assert!(
            daemon_verdict(
                &[],
                &[("dockerd".into(), false), ("containerd".into(), true)]
            )
            .is_ok()
        );
    }
}
