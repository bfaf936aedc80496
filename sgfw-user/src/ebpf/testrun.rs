//! Runs the classifiers on synthetic packets with `BPF_PROG_TEST_RUN`.
//!
//! Owns a private, unpinned, unattached instance of the BPF object whose
//! maps hold a compiled model, and the encoding of a [`Packet`] into an
//! Ethernet frame. The differential test and the benchmarks drive the
//! dataplane through it; it never touches the host's interfaces.

use std::collections::BTreeMap;
use std::net::IpAddr;

use aya::Ebpf;
use aya::programs::{TestRun, TestRunOptions};
use sgfw_common::{Config, Direction, map_names as mn, program_names as pn};

use super::compile::{self, Indices};
use super::{EbpfError, config_for, kernel_maps_of, load_object, prog_err, write_generation};
use crate::flat::FlatModel;
use crate::packet::{L4, Packet, Wire};
use crate::sys::{KernelMaps, MapOps};

/// The test object (`cargo xtask build`: the production programs plus the
/// benchmark floor `sgfw_noop` and the port-count programs), embedded with
/// the `lab` feature. Never loaded by an apply.
pub static BPF_TEST_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sgfw-test.bpf.o"));

/// Every program of the test object.
pub const TEST_PROGRAMS: &[&str] = &[
    pn::FROM_INSTANCE,
    pn::TO_INSTANCE,
    pn::BRIDGE_UP,
    pn::BRIDGE_DOWN,
    pn::PORT_COUNT_INGRESS,
    pn::PORT_COUNT_EGRESS,
    pn::NOOP,
    pn::XDP_FROM_INSTANCE,
    pn::XDP_NOOP,
];

/// Loads the test object and verifies all its programs.
///
/// # Errors
///
/// [`EbpfError::NotBuilt`] when it was not embedded, else the load's error.
pub fn load_test_object(caps: &BTreeMap<&'static str, u32>) -> Result<Ebpf, EbpfError> {
    super::load_programs(BPF_TEST_OBJECT, caps, TEST_PROGRAMS)
}

/// `TC_ACT_OK`.
pub const TC_ACT_OK: u32 = 0;
/// `TC_ACT_SHOT`.
pub const TC_ACT_SHOT: u32 = 2;
/// `XDP_DROP`.
pub const XDP_DROP: u32 = 1;
/// `XDP_PASS`.
pub const XDP_PASS: u32 = 2;

/// What the XDP pre-filter did in [`TestDataplane::deliver_wire`] (the
/// `xdp` dataplane), for tests that hold it to the TC hook behind it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XdpTally {
    /// Frames the XDP program judged at a sender's port.
    pub judged: usize,
    /// Frames it dropped (the TC hook never saw them).
    pub dropped: usize,
    /// Frames it passed that the TC hook then dropped, not counting later
    /// fragments (which it passes by design): each is a denial the
    /// pre-filter missed.
    pub missed: usize,
}

/// A loaded, unattached dataplane for test runs.
pub struct TestDataplane {
    ebpf: Ebpf,
    maps: KernelMaps,
    indices: Indices,
    book: compile::IdBook,
    generation: u32,
    config: Config,
    /// Instance index in the model → ifindex of its (test) port.
    port_ifindex: Vec<u32>,
    /// The test object, for the benchmark floor.
    floor: Option<Ebpf>,
    /// The `xdp` dataplane: `sgfw_xdp_from_instance` runs before
    /// `sgfw_from_instance` at a sender's port.
    xdp: bool,
    xdp_tally: XdpTally,
}

impl std::fmt::Debug for TestDataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDataplane")
            .field("generation", &self.generation)
            .finish()
    }
}

impl TestDataplane {
    /// Loads a private copy of the object (conntrack sized `conntrack_max`)
    /// and writes `model` into it.
    pub fn new(model: &FlatModel, conntrack_max: u32) -> Result<Self, EbpfError> {
        let mut indices = Indices::default();
        indices.update(model);
        let compiled = compile::compile(model, &indices, &compile::IdBook::default())?;
        let mut caps = super::capacities(&compiled, conntrack_max);
        // Room for many re-applies of growing test models.
        for v in caps.values_mut() {
            *v = (*v).max(1024);
        }
        let ebpf = load_object(&caps)?;
        let maps = kernel_maps_of(&ebpf)?;
        let config = config_for(model, 1, 0);
        let mut dp = TestDataplane {
            ebpf,
            maps,
            indices,
            book: compile::IdBook::default(),
            generation: 0,
            config,
            port_ifindex: Vec::new(),
            xdp: false,
            xdp_tally: XdpTally::default(),
            floor: None,
        };
        dp.apply(model)?;
        Ok(dp)
    }

    /// Re-applies a (changed) model with the same switch protocol as a real apply.
    pub fn apply(&mut self, model: &FlatModel) -> Result<(), EbpfError> {
        self.indices.update(model);
        let compiled = compile::compile(model, &self.indices, &self.book)?;
        self.generation += 1;
        let mut config = config_for(model, self.generation, 0);
        config.time_override_ns = self.config.time_override_ns;
        let ports = self.bound_ports(model);
        write_generation(&mut self.maps, &compiled, &ports, &config, None)?;
        self.book = compiled.book.clone();
        config.slot = super::slot_in_force(&mut self.maps)?;
        self.config = config;
        Ok(())
    }

    /// Changes the dataplane configuration (timeouts, clock) in place.
    pub fn update_config(&mut self, f: impl FnOnce(&mut Config)) -> Result<(), EbpfError> {
        f(&mut self.config);
        self.maps.update(
            mn::CONFIG,
            &0u32.to_ne_bytes(),
            bytemuck::bytes_of(&self.config),
        )?;
        Ok(())
    }

    /// The loaded object's maps, for tests of the map operations themselves.
    pub fn maps_mut(&mut self) -> &mut KernelMaps {
        &mut self.maps
    }

    /// Sets the dataplane clock (ns); 0 returns to the kernel clock.
    pub fn set_time(&mut self, now_ns: u64) -> Result<(), EbpfError> {
        self.update_config(|c| c.time_override_ns = now_ns)
    }

    /// Gives instance `i` of the model the port `ifindexes[i]` (devices that
    /// exist in this thread's network namespace: see [`private_ports`]);
    /// instances bound to an `Interface` get the port's binding, as an attach
    /// would write it. Takes effect now and on every later apply.
    pub fn set_ports(&mut self, model: &FlatModel, ifindexes: &[u32]) -> Result<(), EbpfError> {
        self.port_ifindex = ifindexes.to_vec();
        self.apply(model)
    }

    fn bound_ports(&self, model: &FlatModel) -> Vec<(u32, u32)> {
        model
            .instances
            .iter()
            .zip(&self.port_ifindex)
            .filter(|(inst, _)| inst.interface.is_some())
            .filter_map(|(inst, ifx)| Some((*ifx, *self.indices.instances.get(&inst.id)?)))
            .collect()
    }

    /// Runs one hook on a frame `repeat` times; returns (TC action, mean ns per run).
    pub fn run_frame(
        &mut self,
        program: &str,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, u64), EbpfError> {
        self.run_frame_at(program, frame, repeat, 0)
    }

    /// [`TestDataplane::run_frame`] as if at the port with this ifindex (0: the
    /// kernel's default, loopback).
    pub fn run_frame_at(
        &mut self,
        program: &str,
        frame: &[u8],
        repeat: u32,
        ifindex: u32,
    ) -> Result<(u32, u64), EbpfError> {
        // What reaches an instance's hook without a sender's hook before it
        // is taken to be the host's (stamped by the bridge device's egress
        // hook); `run_frame_marked` sends other stamps.
        let mark = if program == pn::TO_INSTANCE {
            sgfw_common::STAMP_HOST << sgfw_common::MARK_IDENTITY_SHIFT
        } else {
            0
        };
        let (act, ns, _) = self.run_frame_marked(program, frame, repeat, ifindex, mark)?;
        Ok((act, ns))
    }

    /// [`TestDataplane::run_frame_at`] with `skb->mark` set to `mark`;
    /// returns the mark the program left as well.
    pub fn run_frame_marked(
        &mut self,
        program: &str,
        frame: &[u8],
        repeat: u32,
        ifindex: u32,
        mark: u32,
    ) -> Result<(u32, u64, u32), EbpfError> {
        test_run(&mut self.ebpf, program, frame, repeat, ifindex, mark)
    }

    /// Runs `sgfw_xdp_from_instance` before the TC sender's hook in
    /// [`TestDataplane::deliver_wire`] (the `xdp` dataplane) or not.
    pub fn set_xdp(&mut self, on: bool) {
        self.xdp = on;
    }

    /// What the XDP pre-filter did so far.
    pub fn xdp_tally(&self) -> XdpTally {
        self.xdp_tally
    }

    /// Runs an XDP program of the object on a frame `repeat` times as if
    /// received on `ifindex` (0: no device); returns (XDP action, mean ns).
    pub fn run_xdp(
        &mut self,
        program: &str,
        frame: &[u8],
        repeat: u32,
        ifindex: u32,
    ) -> Result<(u32, u64), EbpfError> {
        xdp_test_run(&mut self.ebpf, program, frame, repeat, ifindex)
    }

    /// The hook program for a direction ([`Direction::program`]).
    pub fn program(dir: Direction) -> &'static str {
        dir.program()
    }

    /// What the dataplane does to a packet on the wire: the sender's hook at
    /// its port ([`TestDataplane::set_ports`] must have given the instances
    /// ports), or — for a packet the host hands to the bridge — the bridge
    /// device's egress hook, or nothing for one straight from a port not
    /// attached yet; then the receiver's hook at its port, or the bridge
    /// device's ingress hook for what goes up to the host. True = delivered.
    pub fn deliver_wire(&mut self, wire: &Wire) -> Result<bool, EbpfError> {
        let frame = wire_frame(wire);
        // The mark the first hook leaves travels to the next, as the host's
        // forwarding keeps it.
        let mut mark = 0;
        let first = match (wire.from, wire.unattached) {
            (Some(i), _) => Some((pn::FROM_INSTANCE, self.port_ifindex.get(i).copied())),
            (None, false) => Some((pn::BRIDGE_DOWN, None)),
            (None, true) => None,
        };
        let last = match wire.to {
            Some(i) => (pn::TO_INSTANCE, self.port_ifindex.get(i).copied()),
            None => (pn::BRIDGE_UP, None),
        };
        for (program, ifx) in first.into_iter().chain([last]) {
            // The `xdp` dataplane: the pre-filter sees the frame first.
            let xdp = self.xdp && program == pn::FROM_INSTANCE;
            if xdp {
                let (act, _) = self.run_xdp(pn::XDP_FROM_INSTANCE, &frame, 1, ifx.unwrap_or(0))?;
                self.xdp_tally.judged += 1;
                if act != XDP_PASS {
                    self.xdp_tally.dropped += 1;
                    return Ok(false);
                }
            }
            let (act, _, m) = self.run_frame_marked(program, &frame, 1, ifx.unwrap_or(0), mark)?;
            if act != TC_ACT_OK {
                if xdp && !wire.fragment.is_some_and(|f| f.is_later()) {
                    self.xdp_tally.missed += 1;
                }
                return Ok(false);
            }
            mark = m;
        }
        Ok(true)
    }

    /// Empties connection tracking.
    pub fn clear_conntrack(&mut self) -> Result<(), EbpfError> {
        for k in self
            .maps
            .keys(mn::CONNTRACK, size_of::<sgfw_common::CtKey>())?
        {
            self.maps.delete(mn::CONNTRACK, &k)?;
        }
        Ok(())
    }

    /// Number of conntrack entries.
    pub fn conntrack_len(&mut self) -> Result<usize, EbpfError> {
        Ok(self
            .maps
            .keys(mn::CONNTRACK, size_of::<sgfw_common::CtKey>())?
            .len())
    }

    /// Raw map access (benchmarks fill conntrack directly).
    pub fn maps(&mut self) -> &mut KernelMaps {
        &mut self.maps
    }

    /// Runs the no-op floor program (of the test object, loaded on first use).
    pub fn run_noop(&mut self, frame: &[u8], repeat: u32) -> Result<u64, EbpfError> {
        if self.floor.is_none() {
            self.floor = Some(load_test_object(&BTreeMap::new())?);
        }
        let Some(floor) = self.floor.as_mut() else {
            return Err(EbpfError::NotBuilt);
        };
        Ok(test_run(floor, pn::NOOP, frame, repeat, 0, 0)?.1)
    }

    /// Runs the XDP no-op floor program (of the test object, as
    /// [`TestDataplane::run_noop`]); returns mean ns per run.
    pub fn run_xdp_noop(&mut self, frame: &[u8], repeat: u32) -> Result<u64, EbpfError> {
        if self.floor.is_none() {
            self.floor = Some(load_test_object(&BTreeMap::new())?);
        }
        let Some(floor) = self.floor.as_mut() else {
            return Err(EbpfError::NotBuilt);
        };
        Ok(xdp_test_run(floor, pn::XDP_NOOP, frame, repeat, 0)?.1)
    }
}

/// One BPF_PROG_TEST_RUN of the XDP `program` of `ebpf` on `frame`, as if
/// received on `ifindex` (queue 0): (XDP action, ns per run).
fn xdp_test_run(
    ebpf: &mut Ebpf,
    program: &str,
    frame: &[u8],
    repeat: u32,
    ifindex: u32,
) -> Result<(u32, u64), EbpfError> {
    let prog = super::loader::xdp_program(ebpf, program)?;
    // `struct xdp_md`: data 0, data_end = the frame's length, data_meta 0,
    // ingress_ifindex, rx_queue_index 0, egress_ifindex 0.
    let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&len.to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = [0u8; 24];
    let mut data_out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut data_out);
    opts.ctx_in = Some(&ctx);
    opts.ctx_out = Some(&mut out);
    opts.repeat = repeat;
    let r = prog
        .test_run(opts)
        .map_err(|e| prog_err(format!("BPF_PROG_TEST_RUN of {program}"), e))?;
    Ok((r.return_value, r.duration.as_nanos() as u64))
}

/// One BPF_PROG_TEST_RUN of `program` of `ebpf` on `frame`, as if at the
/// port `ifindex` with `skb->mark` = `mark`: (verdict, ns per run, mark left).
fn test_run(
    ebpf: &mut Ebpf,
    program: &str,
    frame: &[u8],
    repeat: u32,
    ifindex: u32,
    mark: u32,
) -> Result<(u32, u64, u32), EbpfError> {
    let prog = super::classifier(ebpf, program)?;
    // `struct __sk_buff` up to and including `ifindex` (offset 40), with
    // `mark` at offset 8; the kernel zero-fills the rest.
    let mut ctx = [0u8; 44];
    ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    // The kernel writes the whole `__sk_buff` back (ENOSPC if shorter).
    let mut out = [0u8; 512];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.ctx_in = Some(&ctx);
    opts.ctx_out = Some(&mut out);
    opts.repeat = repeat;
    let r = prog
        .test_run(opts)
        .map_err(|e| prog_err(format!("BPF_PROG_TEST_RUN of {program}"), e))?;
    let mark_out = u32::from_ne_bytes([out[8], out[9], out[10], out[11]]);
    Ok((r.return_value, r.duration.as_nanos() as u64, mark_out))
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn l4_bytes(pkt: &Packet) -> (u8, Vec<u8>) {
    match &pkt.l4 {
        L4::Tcp {
            sport,
            dport,
            flags,
        } => {
            let mut b = vec![0u8; 20];
            b[0..2].copy_from_slice(&sport.to_be_bytes());
            b[2..4].copy_from_slice(&dport.to_be_bytes());
            b[12] = 5 << 4;
            let mut f = 0u8;
            if flags.fin {
                f |= 0x01;
            }
            if flags.syn {
                f |= 0x02;
            }
            if flags.rst {
                f |= 0x04;
            }
            if flags.ack {
                f |= 0x10;
            }
            b[13] = f;
            (6, b)
        }
        L4::Udp { sport, dport } => {
            let mut b = vec![0u8; 8];
            b[0..2].copy_from_slice(&sport.to_be_bytes());
            b[2..4].copy_from_slice(&dport.to_be_bytes());
            b[4..6].copy_from_slice(&8u16.to_be_bytes());
            (17, b)
        }
        L4::Icmp {
            icmp_type,
            code,
            id,
            quoted,
        } => {
            let mut b = vec![0u8; 8];
            b[0] = *icmp_type;
            b[1] = *code;
            b[4..6].copy_from_slice(&id.to_be_bytes());
            if let Some(inner) = quoted {
                let inner_frame = ip_packet(inner);
                // The quote: IP header and the first 8 bytes of L4.
                let hdr = if inner.is_v6() { 40 } else { 20 };
                let n = (hdr + 8).min(inner_frame.len());
                b.extend_from_slice(&inner_frame[..n]);
            }
            (if pkt.is_v6() { 58 } else { 1 }, b)
        }
        L4::Other { proto } => (*proto, vec![0u8; 8]),
    }
}

/// The IP packet (no Ethernet header) for `pkt`.
pub fn ip_packet(pkt: &Packet) -> Vec<u8> {
    let (proto, l4) = l4_bytes(pkt);
    match (pkt.src, pkt.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = vec![0u8; 20];
            h[0] = 0x45;
            let total = (20 + l4.len()) as u16;
            h[2..4].copy_from_slice(&total.to_be_bytes());
            h[8] = 64;
            h[9] = proto;
            h[12..16].copy_from_slice(&s.octets());
            h[16..20].copy_from_slice(&d.octets());
            let sum: u32 = h
                .chunks(2)
                .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
                .sum();
            let c = csum_fold(sum);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            h.extend_from_slice(&l4);
            h
        }
        (s, d) => {
            let to16 = |a: IpAddr| match a {
                IpAddr::V6(v) => v.octets(),
                IpAddr::V4(v) => v.to_ipv6_mapped().octets(),
            };
            let mut h = vec![0u8; 40];
            h[0] = 0x60;
            h[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
            h[6] = proto;
            h[7] = 64;
            h[8..24].copy_from_slice(&to16(s));
            h[24..40].copy_from_slice(&to16(d));
            h.extend_from_slice(&l4);
            h
        }
    }
}

/// The Ethernet frame for `pkt`.
pub fn frame(pkt: &Packet) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    f.extend_from_slice(&(if pkt.is_v6() { 0x86ddu16 } else { 0x0800u16 }).to_be_bytes());
    f.extend_from_slice(&ip_packet(pkt));
    // Pad to the Ethernet minimum like a real NIC would.
    while f.len() < 60 {
        f.push(0);
    }
    f
}

/// The Ethernet frame for a packet on the wire: an 802.1Q tag (VID 0) when
/// `vlan`; for a fragment, the IPv4 flags and offset or an IPv6 fragment
/// header, and for a later fragment 8 bytes of payload instead of the L4
/// header.
pub fn wire_frame(wire: &Wire) -> Vec<u8> {
    let pkt = &wire.packet;
    let mut ip = ip_packet(pkt);
    if let Some(f) = wire.fragment {
        let v6 = pkt.is_v6();
        let hdr = if v6 { 40 } else { 20 };
        if f.is_later() {
            // Payload of a later fragment: not an L4 header.
            ip.truncate(hdr);
            ip.extend_from_slice(&[0xa5; 8]);
        }
        if v6 {
            let proto = ip[6];
            let mut fh = vec![proto, 0, 0, 0, 0, 0, 0, 0];
            let off = (f.offset << 3) | u16::from(f.more);
            fh[2..4].copy_from_slice(&off.to_be_bytes());
            fh[4..8].copy_from_slice(&f.id.to_be_bytes());
            ip[6] = 44;
            ip.splice(40..40, fh);
            let plen = (ip.len() - 40) as u16;
            ip[4..6].copy_from_slice(&plen.to_be_bytes());
        } else {
            let total = ip.len() as u16;
            ip[2..4].copy_from_slice(&total.to_be_bytes());
            ip[4..6].copy_from_slice(&(f.id as u16).to_be_bytes());
            let flags = (f.offset & 0x1fff) | if f.more { 0x2000 } else { 0 };
            ip[6..8].copy_from_slice(&flags.to_be_bytes());
            ip[10..12].copy_from_slice(&[0, 0]);
            let sum: u32 = ip[..20]
                .chunks(2)
                .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
                .sum();
            let c = csum_fold(sum);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
        }
    }
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    if wire.vlan {
        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x00]);
    }
    f.extend_from_slice(&(if pkt.is_v6() { 0x86ddu16 } else { 0x0800u16 }).to_be_bytes());
    f.extend_from_slice(&ip);
    while f.len() < 60 {
        f.push(0);
    }
    f
}

/// Creates `n` veth devices (the kernel may lack `dummy`) in a network namespace of the calling thread's
/// own (it unshares its network namespace first), for
/// [`TestDataplane::set_ports`]: `BPF_PROG_TEST_RUN` looks a context's
/// ifindex up in the caller's namespace. Call it on a thread of its own;
/// the namespace and its devices go when the thread ends. Returns their
/// ifindexes.
pub fn private_ports(n: usize) -> Result<Vec<u32>, EbpfError> {
    let err = |what: String| EbpfError::Program {
        what,
        source: Box::new(std::io::Error::last_os_error()),
    };
    // SAFETY: unshare only changes this thread's namespace membership.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(err("unshare(CLONE_NEWNET)".into()));
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("tport{i}");
        let status = std::process::Command::new("ip")
            .args([
                "link",
                "add",
                &name,
                "type",
                "veth",
                "peer",
                "name",
                &format!("tpeer{i}"),
            ])
            .status()
            .map_err(|e| EbpfError::Program {
                what: format!("ip link add {name}"),
                source: Box::new(e),
            })?;
        if !status.success() {
            return Err(err(format!("ip link add {name}: {status}")));
        }
        let c = std::ffi::CString::new(name.clone()).map_err(|_| err(name.clone()))?;
        // SAFETY: a valid NUL-terminated name.
        let ifx = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if ifx == 0 {
            return Err(err(format!("if_nametoindex({name})")));
        }
        out.push(ifx);
    }
    Ok(out)
}
