//! Packet parsing with direct packet access.
//!
//! Owns the one bounds-checked accessor ([`at`]) through which every header
//! read passes, and turns a frame into a [`Pkt`]: addresses, protocol, the
//! 16-bit "port" that rules match on, conntrack ports, TCP flags, and for ICMP
//! errors the quoted inner flow. It never looks at a map.

use aya_ebpf::programs::{TcContext, XdpContext};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};
use sgfw_common::{
    Reason,
    limits::{AF_INET, AF_INET6},
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;
/// 802.1Q, 802.1ad and the old QinQ type: a tag the kernel did not strip.
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const ETH_P_QINQ1: u16 = 0x9100;

/// [`Pkt::frag`]: not a fragment.
pub const FRAG_NONE: u8 = 0;
/// [`Pkt::frag`]: the first fragment (offset 0, more fragments follow).
pub const FRAG_FIRST: u8 = 1;
/// [`Pkt::frag`]: a later fragment: no L4 header.
pub const FRAG_LATER: u8 = 2;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Most IPv6 extension headers walked before the packet counts as malformed.
const MAX_EXT_HEADERS: usize = 6;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;

/// The frame under a hook's context: TC's `__sk_buff` or XDP's `xdp_md`.
/// The parser reads only through [`at`], so both hooks parse the same way.
pub trait PacketCtx {
    /// Start of the frame's linear data.
    fn data(&self) -> usize;
    /// One past its end.
    fn data_end(&self) -> usize;
}

impl PacketCtx for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
}

impl PacketCtx for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
}

/// The one bounds-checked accessor: a pointer to a `T` at `off` bytes into the
/// frame, or `DropMalformed` when the frame is too short.
#[inline(always)]
pub fn at<T, C: PacketCtx>(ctx: &C, off: usize) -> Result<*const T, Reason> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return Err(Reason::DropMalformed);
    }
    Ok((start + off) as *const T)
}

#[inline(always)]
fn read<T: Copy, C: PacketCtx>(ctx: &C, off: usize) -> Result<T, Reason> {
    let p = at::<T, C>(ctx, off)?;
    // SAFETY: `at` checked that size_of::<T>() bytes at `p` are in the frame;
    // read_unaligned because headers are not aligned.
    Ok(unsafe { p.read_unaligned() })
}

/// An address as four 32-bit words holding the bytes in network order
/// (IPv4 in the first word, the rest zero). Word-sized and 8-byte aligned,
/// so copies and compares compile to a few loads and stores instead of the
/// byte loops BPF gets for unaligned `[u8; 16]` copies.
pub type Addr = [u32; 4];

/// The flow an ICMP error quotes, as the original sender saw it.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Inner {
    pub src: Addr,
    pub dst: Addr,
    /// TCP/UDP source port, or for ICMP the identifier.
    pub sport: u16,
    /// TCP/UDP destination port, or for ICMP the query's request type.
    pub dport: u16,
    pub proto: u8,
    /// Whether the quoted ICMP is a query (echo etc.), keyed by id/type.
    pub icmp_query: bool,
    /// The quoted query is a request (not a reply).
    pub icmp_request_sent: bool,
    /// The quoted ICMP is itself an error: it relates to no flow.
    pub icmp_error: bool,
    /// Quoted non-query ICMP: type and code.
    pub icmp_type: u8,
    pub icmp_code: u8,
}

/// What the classifier needs to know about one IP packet.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Pkt {
    pub src: Addr,
    pub dst: Addr,
    pub inner: Inner,
    /// TCP/UDP ports (host order); zero otherwise.
    pub sport: u16,
    pub dport: u16,
    /// ICMP query identifier.
    pub icmp_id: u16,
    pub family: u8,
    pub proto: u8,
    /// ICMP type and code.
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// `TCP_*` flags of interest.
    pub tcp_flags: u8,
    /// ICMP query (echo, timestamp, ...): the request type it pairs with.
    pub icmp_request: u8,
    pub is_icmp_query: bool,
    pub is_icmp_error: bool,
    pub has_inner: bool,
    /// `FRAG_*`.
    pub frag: u8,
    /// The fragment's protocol (IPv6: the fragment header's next header).
    pub frag_proto: u8,
    /// The fragment's IP identification.
    pub frag_id: u32,
}

impl Pkt {
    /// Every field zero: one aligned fill of the scratch slot.
    pub const ZERO: Pkt = Pkt {
        src: [0; 4],
        dst: [0; 4],
        inner: Inner {
            src: [0; 4],
            dst: [0; 4],
            sport: 0,
            dport: 0,
            proto: 0,
            icmp_query: false,
            icmp_request_sent: false,
            icmp_error: false,
            icmp_type: 0,
            icmp_code: 0,
        },
        sport: 0,
        dport: 0,
        icmp_id: 0,
        family: 0,
        proto: 0,
        icmp_type: 0,
        icmp_code: 0,
        tcp_flags: 0,
        icmp_request: 0,
        is_icmp_query: false,
        is_icmp_error: false,
        has_inner: false,
        frag: FRAG_NONE,
        frag_proto: 0,
        frag_id: 0,
    };
}

/// A header of the frame, read in place through the one pointer that was
/// bounds-checked (the verifier tracks a checked range per pointer, so
/// fields must be read through the pointer the check was made on).
#[inline(always)]
fn hdr<'a, T, C: PacketCtx>(ctx: &'a C, off: usize) -> Result<&'a T, Reason> {
    let p = at::<T, C>(ctx, off)?;
    // SAFETY: `at` checked that the whole `T` is inside the frame; the
    // network-types headers have alignment 1.
    Ok(unsafe { &*p })
}

/// An IPv4 address field as an [`Addr`].
#[inline(always)]
fn addr4(b: &[u8; 4]) -> Addr {
    [u32::from_ne_bytes(*b), 0, 0, 0]
}

/// An IPv6 address field as an [`Addr`].
#[inline(always)]
fn addr6(b: &[u8; 16]) -> Addr {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

impl Pkt {
    /// The 16-bit value rules match on: the destination port for TCP/UDP,
    /// `type << 8 | code` for ICMP, zero otherwise.
    #[inline(always)]
    pub fn match_port(&self) -> u16 {
        match self.proto {
            IPPROTO_TCP | IPPROTO_UDP => self.dport,
            IPPROTO_ICMP | IPPROTO_ICMPV6 if self.is_icmp_proto() => {
                ((self.icmp_type as u16) << 8) | self.icmp_code as u16
            }
            _ => 0,
        }
    }

    #[inline(always)]
    pub fn is_icmp_proto(&self) -> bool {
        (self.family == AF_INET && self.proto == IPPROTO_ICMP)
            || (self.family == AF_INET6 && self.proto == IPPROTO_ICMPV6)
    }
}

/// What a frame is, once parsed into the scratch [`Pkt`].
pub enum Frame {
    Arp,
    Ip,
    /// A later fragment: addresses, protocol and identification only.
    LaterFragment,
}

/// Query types and the request type they pair with (IPv4: echo, timestamp,
/// information, address mask; IPv6: echo).
#[inline(always)]
fn icmp_query_request(family: u8, t: u8) -> Option<u8> {
    if family == AF_INET {
        match t {
            8 | 0 => Some(8),
            13 | 14 => Some(13),
            15 | 16 => Some(15),
            17 | 18 => Some(17),
            _ => None,
        }
    } else {
        match t {
            128 | 129 => Some(128),
            _ => None,
        }
    }
}

#[inline(always)]
fn icmp_is_error(family: u8, t: u8) -> bool {
    if family == AF_INET {
        matches!(t, 3 | 11 | 12)
    } else {
        matches!(t, 1..=4)
    }
}

/// Parses the frame into `p` (a per-CPU scratch slot: the BPF stack is too
/// small for a packet and its quoted inner flow). Every field is rewritten.
#[inline(always)]
pub fn parse<C: PacketCtx>(ctx: &C, p: &mut Pkt) -> Result<Frame, Reason> {
    let ethertype = u16::from_be_bytes(read::<[u8; 2], C>(ctx, 12)?);
    *p = Pkt::ZERO;
    let l4_off = match ethertype {
        ETH_P_ARP => return Ok(Frame::Arp),
        ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ1 => return Err(Reason::DropVlan),
        ETH_P_IP => {
            let ip: &Ipv4Hdr = hdr(ctx, EthHdr::LEN)?;
            let ihl = ((ip.vihl & 0x0f) as usize) * 4;
            if ihl < Ipv4Hdr::LEN {
                return Err(Reason::DropMalformed);
            }
            p.family = AF_INET;
            p.proto = ip.proto;
            p.src = addr4(&ip.src_addr);
            p.dst = addr4(&ip.dst_addr);
            let frags = u16::from_be_bytes(ip.frags);
            if frags & 0x3fff != 0 {
                p.frag_proto = ip.proto;
                p.frag_id = u16::from_be_bytes(ip.id) as u32;
                // Offset set: a later fragment has no L4 header to match on.
                if frags & 0x1fff != 0 {
                    p.frag = FRAG_LATER;
                    return Ok(Frame::LaterFragment);
                }
                p.frag = FRAG_FIRST;
            }
            EthHdr::LEN + ihl
        }
        ETH_P_IPV6 => {
            let ip: &Ipv6Hdr = hdr(ctx, EthHdr::LEN)?;
            p.family = AF_INET6;
            p.src = addr6(&ip.src_addr);
            p.dst = addr6(&ip.dst_addr);
            let mut next = ip.next_hdr;
            let mut off = EthHdr::LEN + Ipv6Hdr::LEN;
            let mut done = false;
            for _ in 0..MAX_EXT_HEADERS {
                match next {
                    // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
                    0 | 43 | 60 => {
                        let h: [u8; 2] = read(ctx, off)?;
                        next = h[0];
                        off += (h[1] as usize + 1) * 8;
                    }
                    // Fragment header: 8 bytes; a later fragment has no L4 header.
                    44 => {
                        let h: [u8; 8] = read(ctx, off)?;
                        p.frag_proto = h[0];
                        p.frag_id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                        if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                            p.frag = FRAG_LATER;
                            p.proto = h[0];
                            return Ok(Frame::LaterFragment);
                        }
                        // An atomic fragment (offset 0, M clear) is a whole datagram.
                        if h[3] & 1 != 0 {
                            p.frag = FRAG_FIRST;
                        }
                        next = h[0];
                        off += 8;
                    }
                    // Authentication header: (len + 2) * 4 bytes.
                    51 => {
                        let h: [u8; 2] = read(ctx, off)?;
                        next = h[0];
                        off += (h[1] as usize + 2) * 4;
                    }
                    _ => {
                        done = true;
                        break;
                    }
                }
            }
            if !done {
                return Err(Reason::DropMalformed);
            }
            p.proto = next;
            off
        }
        _ => return Err(Reason::DropNonIp),
    };
    // Keep the offset provably small for the verifier.
    if l4_off > 512 {
        return Err(Reason::DropMalformed);
    }
    match p.proto {
        IPPROTO_TCP => {
            let t: &TcpHdr = hdr(ctx, l4_off)?;
            p.sport = u16::from_be_bytes(t.source);
            p.dport = u16::from_be_bytes(t.dest);
            let mut f = 0;
            if t.fin() != 0 {
                f |= TCP_FIN;
            }
            if t.rst() != 0 {
                f |= TCP_RST;
            }
            p.tcp_flags = f;
        }
        IPPROTO_UDP => {
            let u: &UdpHdr = hdr(ctx, l4_off)?;
            p.sport = u16::from_be_bytes(u.src);
            p.dport = u16::from_be_bytes(u.dst);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 if p.is_icmp_proto() => {
            let h: [u8; 8] = read(ctx, l4_off)?;
            p.icmp_type = h[0];
            p.icmp_code = h[1];
            if let Some(req) = icmp_query_request(p.family, h[0]) {
                p.is_icmp_query = true;
                p.icmp_request = req;
                p.icmp_id = u16::from_be_bytes([h[4], h[5]]);
            } else if icmp_is_error(p.family, h[0]) {
                p.is_icmp_error = true;
                p.has_inner = parse_inner(ctx, l4_off + 8, p.family, &mut p.inner).is_ok();
            }
        }
        _ => {}
    }
    Ok(Frame::Ip)
}

/// The packet quoted by an ICMP error: its IP header and the first 8 bytes of
/// its L4 header (a shorter quote is incomplete: `Err`, and the error relates
/// to no flow). IPv6 extension headers in the quote are not walked: such a
/// quote relates to no flow and the error is judged by the rules alone.
#[inline(always)]
fn parse_inner<C: PacketCtx>(
    ctx: &C,
    off: usize,
    family: u8,
    inner: &mut Inner,
) -> Result<(), Reason> {
    let l4 = if family == AF_INET {
        let ip: &Ipv4Hdr = hdr(ctx, off)?;
        let ihl = ((ip.vihl & 0x0f) as usize) * 4;
        if ihl < Ipv4Hdr::LEN {
            return Err(Reason::DropMalformed);
        }
        // A quoted later fragment has no L4 header: it names no flow.
        if u16::from_be_bytes(ip.frags) & 0x1fff != 0 {
            return Err(Reason::DropFragment);
        }
        inner.proto = ip.proto;
        inner.src = addr4(&ip.src_addr);
        inner.dst = addr4(&ip.dst_addr);
        off + ihl
    } else {
        let ip: &Ipv6Hdr = hdr(ctx, off)?;
        inner.proto = ip.next_hdr;
        inner.src = addr6(&ip.src_addr);
        inner.dst = addr6(&ip.dst_addr);
        off + Ipv6Hdr::LEN
    };
    if l4 > 600 {
        return Err(Reason::DropMalformed);
    }
    match inner.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let h: [u8; 8] = read(ctx, l4)?;
            inner.sport = u16::from_be_bytes([h[0], h[1]]);
            inner.dport = u16::from_be_bytes([h[2], h[3]]);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6
            if (family == AF_INET && inner.proto == IPPROTO_ICMP)
                || (family == AF_INET6 && inner.proto == IPPROTO_ICMPV6) =>
        {
            let h: [u8; 8] = read(ctx, l4)?;
            if let Some(req) = icmp_query_request(family, h[0]) {
                inner.icmp_query = true;
                inner.icmp_request_sent = h[0] == req;
                inner.sport = u16::from_be_bytes([h[4], h[5]]);
                inner.dport = req as u16;
            } else if icmp_is_error(family, h[0]) {
                inner.icmp_error = true;
            } else {
                inner.icmp_type = h[0];
                inner.icmp_code = h[1];
            }
        }
        _ => {
            let _: [u8; 8] = read(ctx, l4)?;
        }
    }
    Ok(())
}
