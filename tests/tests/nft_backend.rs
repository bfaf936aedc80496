//! The nftables backend against the real `nft` and kernel (root).
//!
//! `table inet sgfw` has a fixed name, so the tests take turns, serialised
//! with other runs on the host by a file lock; they refuse to run when the
//! table already exists (it would be someone's live ruleset), and a guard
//! deletes the table on every exit path. The first test checks syntax,
//! atomicity and cleanup; the others send crafted frames through a test bed
//! for what the conformance suite's sockets cannot send (docs/semantics.md:
//! VLAN tags, spoofed sources, broadcast and multicast, DHCP and service
//! addresses per leg, fragments) and watch, at the receiving ports, what
//! the bridge delivered.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed step is a failed test"
)]

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use sgfw::flat::FlatModel;
use sgfw::model::Model;
use sgfw::nft::{NftBackend, NftError, transaction};
use sgfw::sys::{Host, Port, RealHost, SysError};
use sgfw::validate::validate;
use sgfw_tests::scenario::{Backend, Lab, all_anywhere, sg};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../sgfw-user/tests/golden/nft")
}

fn flat_of(name: &str) -> FlatModel {
    let json = std::fs::read_to_string(golden_dir().join(format!("{name}.json"))).unwrap();
    let (valid, _) = validate(&Model::from_json(&json).unwrap()).unwrap();
    valid.flatten()
}

fn list_tables() -> String {
    RealHost.nft(&["list", "tables"], None).unwrap()
}

fn list_ours() -> String {
    RealHost
        .nft(&["list", "table", "inet", "sgfw"], None)
        .unwrap()
}

/// Serialises runs of this test on one host (the table name is fixed).
const LOCK: &str = "/run/sgfw-nft-test.lock";

/// Deletes `table inet sgfw` however the test ends.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Err(e) = NftBackend::new(&RealHost).teardown() {
            eprintln!("nft_backend: cleanup failed: {e}");
        }
    }
}

/// Root, `nft` installed, this host's turn (the lock, held until the file
/// drops) and no live `table inet sgfw`; `None` (a printed skip, a failure
/// under `CI=true`) otherwise.
fn exclusive(test: &str) -> Option<File> {
    if !sgfw_tests::require_root(test) {
        return None;
    }
    let ci = std::env::var("CI").as_deref() == Ok("true");
    if RealHost.nft(&["--version"], None).is_err() {
        // `cargo xtask test` installs nftables; a skip under CI is a failure.
        assert!(!ci, "nft is not installed");
        eprintln!("{test}: the nft program is not installed; skipped");
        return None;
    }
    // One run at a time on this host (the table name is fixed). The file
    // stays: removing it would let a second run lock a new one beside it.
    let lock = File::create(LOCK).unwrap();
    // SAFETY: flock on a file descriptor we own; released when `lock` drops.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    if NftBackend::new(&RealHost).is_applied().unwrap() {
        assert!(!ci, "table inet sgfw already exists on the CI host");
        eprintln!(
            "{test}: table inet sgfw already exists (a live sgfw?); skipped, not touching it"
        );
        return None;
    }
    Some(lock)
}

/// Both of sgfw's tables as `nft -j` lists them, made comparable: no
/// handles, no counter values, no generation guard chain, set elements
/// sorted (a hash set lists in the kernel's order, which follows the
/// order elements were added in).
fn tables_json() -> serde_json::Value {
    fn scrub(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                for k in ["handle", "packets", "bytes"] {
                    m.remove(k);
                }
                if let Some(serde_json::Value::Array(elems)) = m.get_mut("elem") {
                    elems.sort_by_key(|e| e.to_string());
                }
                m.values_mut().for_each(scrub);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(scrub),
            _ => {}
        }
    }
    // Objects in any order (nft lists them in the order they were made);
    // each chain's rules in their order.
    let mut objects = std::collections::BTreeSet::new();
    let mut rules: std::collections::BTreeMap<String, Vec<serde_json::Value>> =
        std::collections::BTreeMap::new();
    for family in ["inet", "bridge"] {
        let text = RealHost
            .nft(&["-j", "list", "table", family, "sgfw"], None)
            .unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        scrub(&mut v);
        for item in v["nftables"].as_array().cloned().unwrap_or_default() {
            if item.get("metainfo").is_some()
                || item["chain"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("generation_"))
            {
                continue;
            }
            if let Some(r) = item.get("rule") {
                let chain = format!("{family} {}", r["chain"]);
                rules.entry(chain).or_default().push(r.clone());
            } else {
                objects.insert(item.to_string());
            }
        }
    }
    serde_json::json!({ "objects": objects, "rules": rules })
}

/// What a fresh apply of `m` (tables replaced whole) leaves.
fn fresh(m: &FlatModel) -> serde_json::Value {
    let backend = NftBackend::new(&RealHost);
    backend.teardown().unwrap();
    let report = backend.apply(m).unwrap();
    assert!(!report.incremental);
    tables_json()
}

/// Models one after another, each a change of the one before: the golden
/// models (whole subnets, groups and bound ports come and go) and small
/// edits of one (an instance added, removed, moved to other groups; a rule
/// and a NACL entry changed; a port bound).
fn model_walk() -> Vec<(String, FlatModel)> {
    let mut names: Vec<String> = std::fs::read_dir(golden_dir())
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension().is_some_and(|x| x == "json"))
                .then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    names.sort();
    let mut walk: Vec<(String, FlatModel)> =
        names.iter().map(|n| (n.clone(), flat_of(n))).collect();
    let base = flat_of("referenced-groups");
    let mut m = base.clone();
    walk.push(("referenced-groups".into(), m.clone()));
    let mut extra = m.instances[0].clone();
    extra.id = "i-extra".into();
    extra.addrs = vec!["10.10.0.99".parse().unwrap()];
    m.instances.push(extra);
    m.instances.sort_by(|a, b| a.id.cmp(&b.id));
    walk.push(("+ i-extra".into(), m.clone()));
    let last = m.instances.len() - 1;
    m.instances[last].ingress = m.instances[last].egress.clone();
    walk.push(("other rules for one instance".into(), m.clone()));
    let was = m.instances[0].ingress.clone();
    let revoked: std::sync::Arc<[_]> = was.iter().skip(1).cloned().collect();
    for i in &mut m.instances {
        if i.ingress == was {
            i.ingress = revoked.clone();
        }
    }
    walk.push(("one rule revoked".into(), m.clone()));
    if let Some(e) = m.subnets[0].inbound.first_mut() {
        e.rule_number += 1;
    }
    walk.push(("a NACL entry renumbered".into(), m.clone()));
    m.instances[0].interface = Some("sgfwtest0".into());
    walk.push(("a port bound".into(), m.clone()));
    m.instances.retain(|i| i.id != "i-extra");
    walk.push(("- i-extra".into(), m.clone()));
    walk.push(("back to the start".into(), base));
    walk
}

#[test]
fn nft_in_place_updates_leave_what_a_fresh_apply_leaves() {
    let Some(_lock) = exclusive("nft_in_place_updates_leave_what_a_fresh_apply_leaves") else {
        return;
    };
    let _cleanup = Cleanup;
    let backend = NftBackend::new(&RealHost);
    let walk = model_walk();
    let mut incremental = 0;
    for (name, m) in &walk {
        let report = backend.apply(m).unwrap_or_else(|e| panic!("{name}: {e}"));
        incremental += usize::from(report.incremental);
        let got = tables_json();
        let want = fresh(m);
        assert!(
            got == want,
            "{name}: the in-place update differs from a fresh apply:\n{}",
            diff(&got, &want)
        );
    }
    // Every step after the first went in place (each fresh apply above is
    // a replace, and the next step starts from it).
    assert_eq!(incremental, walk.len() - 1);
    // Nothing changed (the tables are the last step's fresh apply): the
    // transaction is the guard alone.
    let report = backend.apply(&walk[walk.len() - 1].1).unwrap();
    assert!(
        report.incremental && report.objects_changed == 0,
        "{report:?}"
    );
}

/// The lines of `got` that `want` lacks and back, as pretty JSON.
fn diff(got: &serde_json::Value, want: &serde_json::Value) -> String {
    let g = serde_json::to_string_pretty(got).unwrap();
    let w = serde_json::to_string_pretty(want).unwrap();
    let gl: std::collections::BTreeSet<&str> = g.lines().collect();
    let wl: std::collections::BTreeSet<&str> = w.lines().collect();
    let mut out = String::new();
    for l in gl.difference(&wl).take(20) {
        out.push_str(&format!("+ {l}\n"));
    }
    for l in wl.difference(&gl).take(20) {
        out.push_str(&format!("- {l}\n"));
    }
    out
}

#[test]
fn nft_tables_changed_behind_sgfws_back_are_replaced_not_patched() {
    let Some(_lock) = exclusive("nft_tables_changed_behind_sgfws_back_are_replaced_not_patched")
    else {
        return;
    };
    let _cleanup = Cleanup;
    let backend = NftBackend::new(&RealHost);
    let a = flat_of("two-subnets");
    backend.apply(&a).unwrap();
    // Someone loads other tables of the same shape (a rule of i-db's group
    // differs) by hand, or an sgfw with another state directory does.
    let mut other = a.clone();
    for i in &mut other.instances {
        let kept: Vec<_> = i.ingress.iter().skip(1).cloned().collect();
        i.ingress = kept.into();
    }
    let text = sgfw::nft::render(&other).unwrap();
    RealHost
        .nft(&["-f", "-"], Some(&transaction(&text)))
        .unwrap();
    // The next apply must not patch those tables as if they were its own:
    // it replaces them, and the result is what a fresh apply leaves.
    let mut next = a.clone();
    next.instances[0].egress = next.instances[0].ingress.clone();
    let report = backend.apply(&next).unwrap();
    assert!(!report.incremental, "{report:?}");
    let got = tables_json();
    assert!(got == fresh(&next), "patched tables it did not own");
    // A table deleted behind its back: replaced too.
    RealHost
        .nft(&["delete", "table", "bridge", "sgfw"], None)
        .unwrap();
    let report = backend.apply(&a).unwrap();
    assert!(!report.incremental, "{report:?}");
    assert!(tables_json() == fresh(&a));
}

/// The real host, except that every `nft -f` transaction gets one more
/// command that the kernel rejects: the whole transaction must then fail.
struct BreakingHost;

impl Host for BreakingHost {
    fn bridge_ports(&self, bridge: &str) -> Result<Vec<Port>, SysError> {
        RealHost.bridge_ports(bridge)
    }
    fn ifindex(&self, name: &str) -> Result<Option<u32>, SysError> {
        RealHost.ifindex(name)
    }
    fn nft(&self, args: &[&str], stdin: Option<&str>) -> Result<String, SysError> {
        match stdin {
            Some(text) if args == ["-f", "-"] => {
                let broken = format!("{text}add rule inet sgfw no_such_chain drop\n");
                RealHost.nft(args, Some(&broken))
            }
            _ => RealHost.nft(args, stdin),
        }
    }
    fn read_sysctl(&self, key: &str) -> Result<Option<String>, SysError> {
        RealHost.read_sysctl(key)
    }
    fn write_sysctl(&self, key: &str, value: &str) -> Result<(), SysError> {
        RealHost.write_sysctl(key, value)
    }
}

#[test]
fn nft_backend_apply_reapply_failed_apply_and_teardown() {
    let Some(_lock) = exclusive("nft_backend") else {
        return;
    };
    let backend = NftBackend::new(&RealHost);
    let tables_before = list_tables();
    let _cleanup = Cleanup;

    // The probe works here.
    backend.probe().unwrap();

    // Every golden ruleset is valid nft (check mode changes nothing).
    let mut checked = 0;
    for entry in std::fs::read_dir(golden_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "nft") {
            let text = std::fs::read_to_string(&path).unwrap();
            if let Err(e) = RealHost.nft(&["-c", "-f", "-"], Some(&transaction(&text))) {
                panic!("{}: nft -c failed: {e}", path.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 6, "only {checked} golden files");

    // A model with hostile ids renders to a ruleset nft accepts as is: the
    // payload is inert (it would be a syntax error, or a second table, if not).
    let mut hostile = flat_of("two-subnets");
    let payload =
        "\";}\ntable ip evil { chain x { type filter hook input priority -500; policy drop; } }\n#";
    for s in &mut hostile.subnets {
        s.id = format!("subnet{payload}");
        s.nacl_id = format!("acl{payload}");
    }
    for i in &mut hostile.instances {
        i.id = format!("i{payload}");
    }
    let text = sgfw::nft::render(&hostile).unwrap();
    RealHost
        .nft(&["-c", "-f", "-"], Some(&transaction(&text)))
        .unwrap();
    assert_eq!(list_tables(), tables_before);

    // Apply.
    let a = flat_of("two-subnets");
    let report = backend.apply(&a).unwrap();
    assert_eq!(report.instances, 3);
    assert!(backend.is_applied().unwrap());
    let listed_a = list_ours();
    assert!(listed_a.contains("chain grp_in_sg-db"), "{listed_a}");
    assert!(listed_a.contains("10.0.1.10 : goto sg_out_l"), "{listed_a}");
    let counters = backend.counters().unwrap();
    // passthrough, tracked, not-carried; vlan, non-ip, source-check,
    // not-for-instance; allow/drop per NACL stage and subnet, SG stage and instance.
    assert_eq!(
        counters.len(),
        3 + 4 + 4 * a.subnets.len() + 4 * a.instances.len()
    );
    assert!(counters.iter().any(|c| c.label == "i-db"));

    // Re-apply a different model: changed in place.
    let b = flat_of("ipv6");
    let report = backend.apply(&b).unwrap();
    assert!(report.incremental, "{report:?}");
    let listed_b = list_ours();
    assert!(listed_b.contains("2001:db8:6::10"), "{listed_b}");
    assert!(!listed_b.contains("10.0.2.20"), "{listed_b}");
    assert!(!listed_b.contains("chain grp_in_sg-db"), "{listed_b}");

    // A transaction the kernel rejects leaves the previous ruleset in force.
    let err = NftBackend::new(&BreakingHost).apply(&a).unwrap_err();
    assert!(matches!(err, NftError::Nft { .. }), "{err}");
    assert_eq!(list_ours(), listed_b);

    // Teardown removes only our table; a second teardown is fine.
    backend.teardown().unwrap();
    assert!(!backend.is_applied().unwrap());
    assert_eq!(list_tables(), tables_before);
    backend.teardown().unwrap();
    assert_eq!(list_tables(), tables_before);
}

// ---------- crafted frames through a test bed ----------

/// Frames built byte by byte: Ethernet (with VLAN tags), IPv4/IPv6 with
/// valid header checksums (br_netfilter drops a bad IPv4 header before any
/// rule could), UDP, TCP SYN and ICMPv6 with valid checksums.
mod wire {
    use std::net::IpAddr;

    pub const ETH_IP: u16 = 0x0800;
    pub const ETH_IP6: u16 = 0x86dd;
    pub const TPID_8021Q: u16 = 0x8100;
    pub const TPID_8021AD: u16 = 0x88a8;

    fn sum(data: &[u8], mut acc: u32) -> u32 {
        for c in data.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_be_bytes([c[0], 0])
            };
            acc += u32::from(w);
        }
        acc
    }

    fn fold(mut acc: u32) -> u16 {
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        !(acc as u16)
    }

    fn octets(a: IpAddr) -> Vec<u8> {
        match a {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        }
    }

    /// The L4 checksum over the pseudo-header and `l4` (checksum field zero).
    fn l4_sum(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> u16 {
        let mut pseudo = octets(src);
        pseudo.extend(octets(dst));
        match src {
            IpAddr::V4(_) => pseudo.extend([0, proto, (l4.len() >> 8) as u8, l4.len() as u8]),
            IpAddr::V6(_) => {
                pseudo.extend((l4.len() as u32).to_be_bytes());
                pseudo.extend([0, 0, 0, proto]);
            }
        }
        fold(sum(l4, sum(&pseudo, 0)))
    }

    /// An IP packet around `l4`: IPv4 with this identification and
    /// flags/fragment-offset field, or IPv6.
    pub fn ip(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8], id: u16, frag: u16) -> Vec<u8> {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let len = (20 + l4.len()) as u16;
                let mut h = vec![0x45, 0];
                h.extend(len.to_be_bytes());
                h.extend(id.to_be_bytes());
                h.extend(frag.to_be_bytes());
                h.extend([64, proto, 0, 0]);
                h.extend(s.octets());
                h.extend(d.octets());
                let c = fold(sum(&h, 0));
                h[10..12].copy_from_slice(&c.to_be_bytes());
                h.extend(l4);
                h
            }
            _ => {
                let mut h = vec![0x60, 0, 0, 0];
                h.extend((l4.len() as u16).to_be_bytes());
                h.extend([proto, 255]);
                h.extend(octets(src));
                h.extend(octets(dst));
                h.extend(l4);
                h
            }
        }
    }

    pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut u = Vec::new();
        u.extend(sport.to_be_bytes());
        u.extend(dport.to_be_bytes());
        u.extend(((8 + payload.len()) as u16).to_be_bytes());
        u.extend([0, 0]);
        u.extend(payload);
        let c = l4_sum(src, dst, 17, &u);
        u[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
        ip(src, dst, 17, &u, 0x5347, 0)
    }

    pub fn tcp_syn(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend(sport.to_be_bytes());
        t.extend(dport.to_be_bytes());
        t.extend(1u32.to_be_bytes());
        t.extend(0u32.to_be_bytes());
        t.extend([0x50, 0x02]);
        t.extend(64240u16.to_be_bytes());
        t.extend([0, 0, 0, 0]);
        t.extend(payload);
        let c = l4_sum(src, dst, 6, &t);
        t[16..18].copy_from_slice(&c.to_be_bytes());
        ip(src, dst, 6, &t, 0x5348, 0)
    }

    pub fn icmpv6(src: IpAddr, dst: IpAddr, icmp_type: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![icmp_type, 0, 0, 0];
        m.extend(body);
        let c = l4_sum(src, dst, 58, &m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        ip(src, dst, 58, &m, 0, 0)
    }

    /// An Ethernet frame: `tags` are (TPID, VID) outermost first.
    pub fn eth(
        dst: [u8; 6],
        src: [u8; 6],
        tags: &[(u16, u16)],
        ethertype: u16,
        l3: &[u8],
    ) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend(src);
        for (tpid, vid) in tags {
            f.extend(tpid.to_be_bytes());
            f.extend(vid.to_be_bytes());
        }
        f.extend(ethertype.to_be_bytes());
        f.extend(l3);
        f
    }

    /// The multicast MAC of a group address (IPv4 01:00:5e, IPv6 33:33).
    pub fn group_mac(a: IpAddr) -> [u8; 6] {
        match a {
            IpAddr::V4(a) => {
                let o = a.octets();
                [0x01, 0x00, 0x5e, o[1] & 0x7f, o[2], o[3]]
            }
            IpAddr::V6(a) => {
                let o = a.octets();
                [0x33, 0x33, o[12], o[13], o[14], o[15]]
            }
        }
    }

    pub const BROADCAST_MAC: [u8; 6] = [0xff; 6];
}

/// Enters a network namespace on this thread (`None`: stay in the host's).
fn enter(ns: Option<&str>) {
    if let Some(ns) = ns {
        let f = File::open(format!("/run/netns/{ns}")).unwrap();
        // SAFETY: setns on a namespace fd we own; affects only this thread.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
    }
}

fn ifindex(name: &str) -> i32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no interface {name}");
    i as i32
}

/// A packet socket on one interface, bound to every protocol.
fn packet_socket(ifname: &str, protocol: u16) -> i32 {
    // SAFETY: plain socket/bind calls on a fresh descriptor with a zeroed,
    // filled-in sockaddr_ll.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol.to_be()));
        assert!(fd >= 0, "AF_PACKET socket");
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = protocol.to_be();
        sll.sll_ifindex = ifindex(ifname);
        let r = libc::bind(
            fd,
            (&raw const sll).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(r, 0, "bind to {ifname}");
        fd
    }
}

/// Sends raw frames out of `ifname` in namespace `ns` (the host's: `None`).
fn send_frames(ns: Option<&str>, ifname: &str, frames: &[Vec<u8>]) {
    let (ns, ifname, frames) = (ns.map(str::to_string), ifname.to_string(), frames.to_vec());
    std::thread::spawn(move || {
        enter(ns.as_deref());
        let fd = packet_socket(&ifname, 0);
        for f in &frames {
            // SAFETY: send on our socket from a live buffer of its length.
            let n = unsafe { libc::send(fd, f.as_ptr().cast(), f.len(), 0) };
            assert_eq!(n, f.len() as isize, "sending a frame on {ifname}");
        }
        // SAFETY: closing our own descriptor.
        unsafe { libc::close(fd) };
    })
    .join()
    .unwrap();
}

/// Records every frame handed to an interface (not the ones it sends, nor
/// ones for another host's MAC that a flooding bridge passed by).
struct Sniffer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Vec<u8>>>,
}

impl Sniffer {
    fn start(ns: Option<&str>, ifname: &str) -> Sniffer {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (ns, ifname, s2) = (ns.map(str::to_string), ifname.to_string(), stop.clone());
        let thread = std::thread::spawn(move || {
            enter(ns.as_deref());
            let fd = packet_socket(&ifname, libc::ETH_P_ALL as u16);
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 20_000,
            };
            // SAFETY: setsockopt with a timeval of the right size.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const tv).cast(),
                    size_of::<libc::timeval>() as u32,
                );
            }
            tx.send(()).unwrap();
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !s2.load(Ordering::Relaxed) {
                // SAFETY: recvfrom into our buffer and a zeroed sockaddr_ll.
                let (n, kind) = unsafe {
                    let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                    let mut len = size_of::<libc::sockaddr_ll>() as u32;
                    let n = libc::recvfrom(
                        fd,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        (&raw mut sll).cast(),
                        &raw mut len,
                    );
                    (n, sll.sll_pkttype)
                };
                if n > 0 && !matches!(kind, libc::PACKET_OUTGOING | libc::PACKET_OTHERHOST) {
                    frames.push(buf[..n as usize].to_vec());
                }
            }
            // SAFETY: closing our own descriptor.
            unsafe { libc::close(fd) };
            frames
        });
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        Sniffer { stop, thread }
    }

    /// Stops (after the frames in flight had time to arrive) and returns
    /// the markers of `markers` that were seen.
    fn seen(self, markers: &[&[u8]]) -> Vec<String> {
        std::thread::sleep(std::time::Duration::from_millis(300));
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let frames = self.thread.join().unwrap();
        markers
            .iter()
            .filter(|m| frames.iter().any(|f| f.windows(m.len()).any(|w| w == **m)))
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .collect()
    }
}

fn mac_of(text: &str) -> [u8; 6] {
    let v: Vec<u8> = text
        .trim()
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

/// An instance's MAC (its eth0).
fn instance_mac(lab: &Lab, inst: &str) -> [u8; 6] {
    mac_of(
        &lab.bed
            .exec(inst, &["cat", "/sys/class/net/eth0/address"])
            .unwrap(),
    )
}

fn ns_of(lab: &Lab, inst: &str) -> String {
    lab.bed.instance(inst).netns.clone()
}

fn v4(lab: &Lab, inst: &str) -> IpAddr {
    IpAddr::V4(lab.bed.instance(inst).v4)
}

fn v6(lab: &Lab, inst: &str) -> IpAddr {
    IpAddr::V6(lab.bed.instance(inst).v6.unwrap())
}

/// A packet counter of `table bridge sgfw` or `table inet sgfw`, by name.
fn counter(name: &str) -> u64 {
    NftBackend::new(&RealHost)
        .counters()
        .unwrap()
        .into_iter()
        .find(|c| c.name == name)
        .map_or(0, |c| c.packets)
}

/// One subnet `a`: `open` admits and sends everything, `closed` nothing;
/// `sender` sends everything and admits nothing.
fn open_closed_lab(extra: &[(&str, usize)]) -> (Lab, Model) {
    let mut insts = vec![("sender", 0), ("open", 0), ("closed", 0)];
    insts.extend_from_slice(extra);
    let lab = Lab::new(Backend::Nft, &["a"], &insts);
    let mut model = lab.model(
        &[
            ("sender", &["sg-sender"]),
            ("open", &["sg-open"]),
            ("closed", &["sg-closed"]),
        ],
        vec![
            sg("sg-sender", vec![], vec![all_anywhere()]),
            sg("sg-open", vec![all_anywhere()], vec![all_anywhere()]),
            sg("sg-closed", vec![], vec![]),
        ],
        vec![],
    );
    // Extra bed instances are not in the model: ports of the bridge that are
    // no instance (the outside, on the subnet's bridge).
    model
        .instances
        .retain(|i| ["i-sender", "i-open", "i-closed"].contains(&i.instance_id.as_str()));
    (lab, model)
}

/// docs/semantics.md, checks at one hook, 1: "a VLAN-tagged frame (802.1Q,
/// 802.1ad, also priority tags with VID 0) is dropped". br_netfilter never
/// hands a tagged frame to the inet hooks, so only `table bridge sgfw` can.
#[test]
fn nft_vlan_tagged_frames_are_dropped_at_the_port() {
    let Some(_lock) = exclusive("nft_vlan_tagged_frames_are_dropped_at_the_port") else {
        return;
    };
    let (mut lab, model) = open_closed_lab(&[]);
    lab.apply(&model);
    let (src, smac) = (v4(&lab, "sender"), instance_mac(&lab, "sender"));
    let mut frames = Vec::new();
    let mut markers: Vec<Vec<u8>> = Vec::new();
    for (name, tags) in [
        ("untagged", &[][..]),
        ("prio-q", &[(wire::TPID_8021Q, 0)][..]),
        ("vid5-q", &[(wire::TPID_8021Q, 5)][..]),
        ("prio-ad", &[(wire::TPID_8021AD, 0)][..]),
        (
            "prio-qinq",
            &[(wire::TPID_8021AD, 0), (wire::TPID_8021Q, 0)][..],
        ),
    ] {
        for (to, dport) in [("open", 9), ("closed", 22)] {
            let marker = format!("vlan-{name}-{to}");
            let dst = v4(&lab, to);
            let l3 = wire::tcp_syn(src, dst, 40001, dport, marker.as_bytes());
            frames.push(wire::eth(
                instance_mac(&lab, to),
                smac,
                tags,
                wire::ETH_IP,
                &l3,
            ));
            markers.push(marker.into_bytes());
        }
    }
    let sniffers = [
        Sniffer::start(Some(&ns_of(&lab, "open")), "eth0"),
        Sniffer::start(Some(&ns_of(&lab, "closed")), "eth0"),
    ];
    send_frames(Some(&ns_of(&lab, "sender")), "eth0", &frames);
    let refs: Vec<&[u8]> = markers.iter().map(Vec::as_slice).collect();
    let mut seen: Vec<String> = Vec::new();
    for s in sniffers {
        seen.extend(s.seen(&refs));
    }
    // The untagged SYN to the open instance is delivered (the frames are
    // good); the closed instance's SG drops it; every tagged one drops.
    assert_eq!(seen, ["vlan-untagged-open"], "delivered: {seen:?}");
    assert!(counter("drop_vlan") >= 8, "{}", counter("drop_vlan"));
}

/// docs/semantics.md, checks at one hook, 3: "the source must be one of the
/// instance's addresses, or an IPv6 link-local address, or the unspecified
/// address in a DHCP-client or NDP packet. Anything else drops, whatever it
/// carries" — before any passthrough class; and what a bound port is handed
/// must be for the instance.
#[test]
fn nft_source_check_comes_before_passthrough() {
    let Some(_lock) = exclusive("nft_source_check_comes_before_passthrough") else {
        return;
    };
    let (mut lab, model) = open_closed_lab(&[]);
    lab.apply(&model);
    let smac = instance_mac(&lab, "sender");
    let bridge = lab.bed.subnets[0].bridge.clone();
    let own = v4(&lab, "sender");
    let metadata = IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254));
    let unspecified = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let to_closed = (v4(&lab, "closed"), instance_mac(&lab, "closed"));
    let to_open = (v4(&lab, "open"), instance_mac(&lab, "open"));
    let bcast = (IpAddr::V4(Ipv4Addr::BROADCAST), wire::BROADCAST_MAC);
    let nobody = {
        let o = lab.bed.subnets[0].router_v4.octets();
        IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], 99))
    };
    // (marker, source, (destination, MAC), sport, dport, delivered)
    let cases = [
        ("src-own-open", own, to_open, 40002, 7, true),
        // A bound instance speaking as the metadata service, to a closed port.
        ("src-metadata-closed", metadata, to_closed, 80, 22, false),
        ("src-metadata-dhcp", metadata, to_closed, 67, 68, false),
        (
            "src-other-instance",
            v4(&lab, "open"),
            to_closed,
            40003,
            22,
            false,
        ),
        (
            "src-other-open",
            v4(&lab, "closed"),
            to_open,
            40004,
            7,
            false,
        ),
        // The unspecified source only in the DHCP client shape.
        ("src-zero-dhcp-client", unspecified, bcast, 68, 67, true),
        ("src-zero-dhcp-server", unspecified, bcast, 67, 68, false),
        ("src-zero-udp", unspecified, to_open, 40005, 7, false),
        // The receiver's side of a bound port: "open" is handed only its own
        // destinations (here: an address of the subnet no instance has).
        (
            "dst-not-for-open",
            own,
            (nobody, to_open.1),
            40006,
            7,
            false,
        ),
    ];
    let mut frames = Vec::new();
    for (m, src, (dst, dmac), sport, dport, _) in cases {
        let l3 = wire::udp(src, dst, sport, dport, m.as_bytes());
        frames.push(wire::eth(dmac, smac, &[], wire::ETH_IP, &l3));
    }
    // IPv6: own, link-local and the unspecified address in an NDP packet pass.
    let own6 = v6(&lab, "sender");
    let open6 = v6(&lab, "open");
    let solicited: IpAddr = {
        let o = match open6 {
            IpAddr::V6(a) => a.octets(),
            IpAddr::V4(_) => unreachable!(),
        };
        IpAddr::V6(Ipv6Addr::new(
            0xff02,
            0,
            0,
            0,
            0,
            1,
            0xff00 | u16::from(o[13]),
            u16::from_be_bytes([o[14], o[15]]),
        ))
    };
    let omac = instance_mac(&lab, "open");
    let mut ns_body = vec![0u8; 4];
    if let IpAddr::V6(t) = open6 {
        ns_body.extend(t.octets());
    }
    ns_body.extend(b"src6-zero-ndp");
    let v6_cases: Vec<(&str, Vec<u8>, [u8; 6], bool)> = vec![
        (
            "src6-own",
            wire::udp(own6, open6, 40006, 7, b"src6-own"),
            omac,
            true,
        ),
        (
            "src6-link-local",
            wire::udp(
                "fe80::1234".parse().unwrap(),
                "fe80::5678".parse().unwrap(),
                40007,
                7,
                b"src6-link-local",
            ),
            omac,
            true,
        ),
        (
            "src6-zero-ndp",
            wire::icmpv6(IpAddr::V6(Ipv6Addr::UNSPECIFIED), solicited, 135, &ns_body),
            wire::group_mac(solicited),
            true,
        ),
        (
            "src6-zero-udp",
            wire::udp(
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                open6,
                40008,
                7,
                b"src6-zero-udp",
            ),
            omac,
            false,
        ),
        (
            "src6-metadata",
            wire::udp(
                "fd00:ec2::254".parse().unwrap(),
                open6,
                80,
                7,
                b"src6-metadata",
            ),
            omac,
            false,
        ),
    ];
    for (_, l3, dmac, _) in &v6_cases {
        frames.push(wire::eth(*dmac, smac, &[], wire::ETH_IP6, l3));
    }
    let sniffers = [
        Sniffer::start(Some(&ns_of(&lab, "open")), "eth0"),
        Sniffer::start(Some(&ns_of(&lab, "closed")), "eth0"),
        Sniffer::start(None, &bridge),
    ];
    send_frames(Some(&ns_of(&lab, "sender")), "eth0", &frames);
    let mut markers: Vec<&[u8]> = cases.iter().map(|c| c.0.as_bytes()).collect();
    markers.extend(v6_cases.iter().map(|c| c.0.as_bytes()));
    let mut seen: Vec<String> = Vec::new();
    for s in sniffers {
        seen.extend(s.seen(&markers));
    }
    let mut want: Vec<&str> = cases.iter().filter(|c| c.5).map(|c| c.0).collect();
    want.extend(v6_cases.iter().filter(|c| c.3).map(|c| c.0));
    seen.sort();
    seen.dedup();
    want.sort_unstable();
    assert_eq!(seen, want);
    assert!(counter("drop_source_check") >= 6);
}

/// "Traffic a VPC does not carry": broadcast and multicast (255.255.255.255,
/// subnet-directed broadcast, 224.0.0.0/4, ff00::/8) are not delivered,
/// between instances and from outside to instances, except ARP, NDP and
/// DHCP (in its client shape at each leg); ICMPv6 redirects never are.
#[test]
fn nft_broadcast_multicast_and_redirects_are_not_carried() {
    let Some(_lock) = exclusive("nft_broadcast_multicast_and_redirects_are_not_carried") else {
        return;
    };
    let (mut lab, model) = open_closed_lab(&[]);
    lab.apply(&model);
    let smac = instance_mac(&lab, "sender");
    let bridge = lab.bed.subnets[0].bridge.clone();
    let router = IpAddr::V4(lab.bed.subnets[0].router_v4);
    let src = v4(&lab, "sender");
    let subnet_bcast = {
        let o = lab.bed.subnets[0].router_v4.octets();
        IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], 255))
    };
    let mdns4: IpAddr = "224.0.0.251".parse().unwrap();
    let mdns6: IpAddr = "ff02::fb".parse().unwrap();
    let all_bcast = IpAddr::V4(Ipv4Addr::BROADCAST);
    let open_mac = instance_mac(&lab, "open");
    let src6 = v6(&lab, "sender");

    // From the sender (sends everything; "open" admits everything).
    let from_sender: Vec<(&str, Vec<u8>, [u8; 6])> = vec![
        (
            "mc-mdns4",
            wire::udp(src, mdns4, 5353, 5353, b"mc-mdns4"),
            wire::group_mac(mdns4),
        ),
        (
            "mc-mdns6",
            wire::udp(src6, mdns6, 5353, 5353, b"mc-mdns6"),
            wire::group_mac(mdns6),
        ),
        (
            "bc-all",
            wire::udp(src, all_bcast, 40010, 7, b"bc-all"),
            wire::BROADCAST_MAC,
        ),
        (
            "bc-subnet",
            wire::udp(src, subnet_bcast, 40011, 7, b"bc-subnet"),
            wire::BROADCAST_MAC,
        ),
        // A unicast frame carrying a broadcast address.
        (
            "bc-unicast-mac",
            wire::udp(src, all_bcast, 40012, 7, b"bc-unicast-mac"),
            open_mac,
        ),
        // DHCP: a client's broadcast passes the sender's leg (it reaches the
        // host, where a server would be) but not an instance's receiving leg;
        // a "server" reply from an instance is not passthrough for its sender.
        (
            "dhcp-client-bc",
            wire::udp(src, all_bcast, 68, 67, b"dhcp-client-bc"),
            wire::BROADCAST_MAC,
        ),
        (
            "dhcp-server-bc",
            wire::udp(src, all_bcast, 67, 68, b"dhcp-server-bc"),
            wire::BROADCAST_MAC,
        ),
        // ICMPv6 redirect (137) to an instance.
        (
            "redirect",
            wire::icmpv6(
                src6,
                v6(&lab, "open"),
                137,
                &[b"\0\0\0\0".as_slice(), &[0u8; 32], b"redirect"].concat(),
            ),
            open_mac,
        ),
        // The control: a unicast datagram to "open" is delivered.
        (
            "unicast-open",
            wire::udp(src, v4(&lab, "open"), 40013, 7, b"unicast-open"),
            open_mac,
        ),
    ];
    // From the host (outside), through its IP stack (a raw frame would skip
    // the inet hooks that judge what the host sends): multicast and
    // broadcast to the instances are not delivered; a DHCP server's reply
    // is, broadcast or unicast, even to "closed".
    let from_host: Vec<(&str, u16, IpAddr, u16)> = vec![
        ("host-mc", 0, mdns4, 5353),
        ("host-bc", 0, all_bcast, 7),
        ("host-subnet-bc", 0, subnet_bcast, 7),
        ("host-dhcp-offer", 67, all_bcast, 68),
        ("host-dhcp-unicast", 67, v4(&lab, "closed"), 68),
    ];
    let frames_of = |v: &[(&str, Vec<u8>, [u8; 6])], smac: [u8; 6]| -> Vec<Vec<u8>> {
        v.iter()
            .map(|(_, l3, dmac)| {
                let dst = if l3[0] >> 4 == 6 {
                    wire::ETH_IP6
                } else {
                    wire::ETH_IP
                };
                wire::eth(*dmac, smac, &[], dst, l3)
            })
            .collect()
    };
    let markers: Vec<&[u8]> = from_sender
        .iter()
        .map(|c| c.0.as_bytes())
        .chain(from_host.iter().map(|c| c.0.as_bytes()))
        .collect();
    let open = Sniffer::start(Some(&ns_of(&lab, "open")), "eth0");
    let closed = Sniffer::start(Some(&ns_of(&lab, "closed")), "eth0");
    send_frames(
        Some(&ns_of(&lab, "sender")),
        "eth0",
        &frames_of(&from_sender, smac),
    );
    for (m, sport, dst, dport) in &from_host {
        host_send(&bridge, router, *sport, *dst, *dport, m.as_bytes());
    }
    assert_eq!(open.seen(&markers), ["unicast-open", "host-dhcp-offer"]);
    assert_eq!(
        closed.seen(&markers),
        ["host-dhcp-offer", "host-dhcp-unicast"]
    );
    assert!(
        counter("drop_not_carried") >= 10,
        "{}",
        counter("drop_not_carried")
    );
}

/// A UDP datagram the host sends from `src:sport` out of `bridge`.
fn host_send(bridge: &str, src: IpAddr, sport: u16, dst: IpAddr, dport: u16, payload: &[u8]) {
    let s = std::net::UdpSocket::bind((src, sport)).unwrap();
    s.set_broadcast(true).unwrap();
    let dev = std::ffi::CString::new(bridge).unwrap();
    // SAFETY: SO_BINDTODEVICE with a NUL-terminated name and its length.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            dev.as_ptr().cast(),
            dev.as_bytes_with_nul().len() as u32,
        )
    };
    assert_eq!(r, 0, "SO_BINDTODEVICE {bridge}");
    // A drop in the output hook fails the send with EPERM.
    if let Err(e) = s.send_to(payload, (dst, dport)) {
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    }
}

/// Passthrough per leg (docs/semantics.md, checks at one hook, 4): DHCP
/// 68->67 only where it is sent, 67->68 only where it is delivered, both
/// only with a peer that is no instance; the service addresses both ways
/// (metadata, Time Sync, Amazon DNS).
#[test]
fn nft_passthrough_is_per_leg_and_covers_every_service_address() {
    let Some(_lock) = exclusive("nft_passthrough_is_per_leg_and_covers_every_service_address")
    else {
        return;
    };
    // "svc" is a port of the bridge that is no instance: it stands for the
    // service addresses (it answers nothing; what it is handed is watched).
    let (mut lab, model) = open_closed_lab(&[("svc", 0)]);
    lab.apply(&model);
    let svc_mac = instance_mac(&lab, "svc");
    let closed = v4(&lab, "closed");
    let closed_mac = instance_mac(&lab, "closed");
    let open_mac = instance_mac(&lab, "open");
    let mut from_closed: Vec<(String, Vec<u8>, [u8; 6])> = vec![
        // "closed" sends nothing: a 67->68 datagram it sends is judged by its
        // SG egress, even to an instance that admits everything.
        (
            "closed-dhcp-server".into(),
            wire::udp(closed, v4(&lab, "open"), 67, 68, b"closed-dhcp-server"),
            open_mac,
        ),
    ];
    let mut from_svc = Vec::new();
    for (name, a4, a6) in sgfw::nft::SERVICES {
        for (svc, me, ethertype) in [
            (IpAddr::V4(a4), closed, wire::ETH_IP),
            (IpAddr::V6(a6), v6(&lab, "closed"), wire::ETH_IP6),
        ] {
            let fam = if ethertype == wire::ETH_IP { "4" } else { "6" };
            // To the service address: passthrough at the sender's leg.
            let m = format!("to-{name}-{fam}");
            from_closed.push((
                m.clone(),
                wire::udp(me, svc, 40020, 53, m.as_bytes()),
                svc_mac,
            ));
            // From it: passthrough at the receiver's leg ("closed" admits nothing).
            let m = format!("from-{name}-{fam}");
            from_svc.push((
                m.clone(),
                wire::udp(svc, me, 53, 40021, m.as_bytes()),
                closed_mac,
            ));
        }
    }
    // DHCP between two instances is judged by both legs: "sender" (sends
    // everything) to "closed" (admits nothing), either shape; and "closed"'s
    // client datagram to "open" (admits everything) by its SG egress.
    let sender = v4(&lab, "sender");
    let from_sender = vec![
        (
            "sender-dhcp-client".to_string(),
            wire::udp(sender, closed, 68, 67, b"sender-dhcp-client"),
            closed_mac,
        ),
        (
            "sender-dhcp-server".to_string(),
            wire::udp(sender, closed, 67, 68, b"sender-dhcp-server"),
            closed_mac,
        ),
    ];
    from_closed.push((
        "closed-dhcp-client".into(),
        wire::udp(closed, v4(&lab, "open"), 68, 67, b"closed-dhcp-client"),
        open_mac,
    ));
    // A server that is no instance answers "closed": passthrough where it is
    // delivered; and "closed"'s client datagram to it passes its sender's leg.
    let svc4 = IpAddr::V4(lab.bed.instance("svc").v4);
    from_svc.push((
        "svc-dhcp-server".into(),
        wire::udp(svc4, closed, 67, 68, b"svc-dhcp-server"),
        closed_mac,
    ));
    from_closed.push((
        "closed-dhcp-to-svc".into(),
        wire::udp(closed, svc4, 68, 67, b"closed-dhcp-to-svc"),
        svc_mac,
    ));
    let frames = |v: &[(String, Vec<u8>, [u8; 6])], smac: [u8; 6]| -> Vec<Vec<u8>> {
        v.iter()
            .map(|(_, l3, dmac)| {
                let et = if l3[0] >> 4 == 6 {
                    wire::ETH_IP6
                } else {
                    wire::ETH_IP
                };
                wire::eth(*dmac, smac, &[], et, l3)
            })
            .collect()
    };
    let all: Vec<String> = from_closed
        .iter()
        .chain(&from_svc)
        .chain(&from_sender)
        .map(|c| c.0.clone())
        .collect();
    let markers: Vec<&[u8]> = all.iter().map(|m| m.as_bytes()).collect();
    let sniffers = [
        Sniffer::start(Some(&ns_of(&lab, "open")), "eth0"),
        Sniffer::start(Some(&ns_of(&lab, "closed")), "eth0"),
        Sniffer::start(Some(&ns_of(&lab, "svc")), "eth0"),
    ];
    send_frames(
        Some(&ns_of(&lab, "closed")),
        "eth0",
        &frames(&from_closed, closed_mac),
    );
    send_frames(
        Some(&ns_of(&lab, "svc")),
        "eth0",
        &frames(&from_svc, svc_mac),
    );
    send_frames(
        Some(&ns_of(&lab, "sender")),
        "eth0",
        &frames(&from_sender, instance_mac(&lab, "sender")),
    );
    let mut seen: Vec<String> = Vec::new();
    for s in sniffers {
        seen.extend(s.seen(&markers));
    }
    // (svc's ICMP error for a datagram to an address it does not have
    // quotes the marker back to the sender: seen twice.)
    seen.sort();
    seen.dedup();
    let mut want: Vec<String> = all
        .iter()
        .filter(|m| {
            m.starts_with("to-")
                || m.starts_with("from-")
                || *m == "svc-dhcp-server"
                || *m == "closed-dhcp-to-svc"
        })
        .cloned()
        .collect();
    want.sort();
    assert_eq!(seen, want);
    // The SG stages count per instance (`sgfw status`): "sender"'s two
    // datagrams passed its egress and were dropped at "closed"'s ingress;
    // "closed"'s two datagrams to "open" were dropped at its own egress.
    for (name, at_least) in [
        ("sg_out_i-sender_allow", 2),
        ("sg_in_i-closed_drop", 2),
        ("sg_out_i-closed_drop", 2),
    ] {
        assert!(counter(name) >= at_least, "{name}: {}", counter(name));
    }
    assert_eq!(counter("sg_in_i-sender_allow"), 0);
}

/// docs/semantics.md, "Fragments" (nftables): the chains judge whole
/// datagrams, reassembled by nf_defrag before them and refragmented by
/// br_netfilter on the way out. A 4000-byte datagram of an allowed flow at
/// MTU 1500 arrives whole; a fragment without its first fragment is never
/// reassembled and never reaches the port.
#[test]
fn nft_fragments_of_allowed_datagrams_arrive_orphans_do_not() {
    let Some(_lock) = exclusive("nft_fragments_of_allowed_datagrams_arrive_orphans_do_not") else {
        return;
    };
    let (mut lab, model) = open_closed_lab(&[]);
    lab.apply(&model);
    for v6 in [false, true] {
        let dst = lab.addr("open", v6);
        let ns = ns_of(&lab, "open");
        let (tx, rx) = std::sync::mpsc::channel();
        let recv = std::thread::spawn(move || {
            enter(Some(&ns));
            let s =
                std::net::UdpSocket::bind(if v6 { "[::]:9400" } else { "0.0.0.0:9400" }).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            tx.send(()).unwrap();
            let mut buf = vec![0u8; 9000];
            s.recv_from(&mut buf).map(|(n, _)| buf[..n].to_vec()).ok()
        });
        rx.recv().unwrap();
        let payload: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
        let p2 = payload.clone();
        let sns = ns_of(&lab, "sender");
        std::thread::spawn(move || {
            enter(Some(&sns));
            let s = std::net::UdpSocket::bind(if v6 { "[::]:0" } else { "0.0.0.0:0" }).unwrap();
            s.send_to(&p2, (dst, 9400)).unwrap();
        })
        .join()
        .unwrap();
        let got = recv.join().unwrap();
        assert_eq!(
            got.as_deref(),
            Some(&payload[..]),
            "v6={v6}: the 4000-byte datagram"
        );
    }
    // A later fragment (offset 1480) of a datagram whose first fragment never came.
    let src = v4(&lab, "sender");
    let dst = v4(&lab, "open");
    let mut body = b"orphan-fragment".to_vec();
    body.resize(64, 0);
    let l3 = wire::ip(src, dst, 17, &body, 0x7a7a, 1480 / 8);
    let frame = wire::eth(
        instance_mac(&lab, "open"),
        instance_mac(&lab, "sender"),
        &[],
        wire::ETH_IP,
        &l3,
    );
    let control = wire::eth(
        instance_mac(&lab, "open"),
        instance_mac(&lab, "sender"),
        &[],
        wire::ETH_IP,
        &wire::udp(src, dst, 40030, 7, b"whole-datagram"),
    );
    let sniffer = Sniffer::start(Some(&ns_of(&lab, "open")), "eth0");
    send_frames(Some(&ns_of(&lab, "sender")), "eth0", &[frame, control]);
    assert_eq!(
        sniffer.seen(&[b"orphan-fragment", b"whole-datagram"]),
        ["whole-datagram"]
    );
}

/// `nft -f -` goes through libnftables in-process (one context, no process
/// start, no socket close per transaction): a failing transaction reports
/// what the nft command reports, and changes nothing; a good one is in
/// force at once.
#[test]
fn transactions_through_the_library_fail_and_succeed_as_the_command_does() {
    let Some(_lock) =
        exclusive("transactions_through_the_library_fail_and_succeed_as_the_command_does")
    else {
        return;
    };
    // The library is installed with nft (`cargo xtask test` installs both).
    assert!(
        sgfw::sys::nft_in_process(),
        "libnftables.so.1 was not loaded"
    );
    // One good command, then one naming a chain that does not exist: the
    // whole transaction is refused.
    let text = "add table inet sgfw_libtest\nadd chain inet sgfw_libtest c\nadd rule inet sgfw_libtest nosuchchain accept\n";
    let lib = RealHost.nft(&["-f", "-"], Some(text));
    let Err(SysError::Command { stderr, .. }) = lib else {
        panic!("expected nft's error, got {lib:?}");
    };
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert_eq!(stderr, String::from_utf8_lossy(&out.stderr).trim());
    assert!(stderr.contains("nosuchchain"), "{stderr}");
    assert!(
        !list_tables().contains("sgfw_libtest"),
        "a refused transaction left a table"
    );
    // A good transaction is there when the call returns.
    let made = RealHost.nft(
        &["-f", "-"],
        Some("add table inet sgfw_libtest\nadd chain inet sgfw_libtest c\n"),
    );
    let listed = list_tables();
    let _ = RealHost.nft(&["delete", "table", "inet", "sgfw_libtest"], None);
    made.unwrap();
    assert!(listed.contains("sgfw_libtest"), "{listed}");
}
