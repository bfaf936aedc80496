//! One IP packet as the reference evaluator sees it.
//!
//! This module owns the abstract packet (addresses, protocol, ports, TCP
//! flags, ICMP type/code/id and the packet an ICMP error quotes) and nothing
//! else: no parsing of wire bytes, no policy. ARP is not an IP packet and so
//! is not a [`Packet`]; the dataplane lets it through before any policy.

use std::fmt;
use std::net::IpAddr;

use crate::policy::Match;
pub use crate::policy::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

/// The TCP flags that connection tracking looks at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TcpFlags {
    /// SYN.
    pub syn: bool,
    /// ACK.
    pub ack: bool,
    /// FIN.
    pub fin: bool,
    /// RST.
    pub rst: bool,
}

impl TcpFlags {
    /// Only SYN: the first packet of a connection.
    pub const SYN: TcpFlags = TcpFlags {
        syn: true,
        ack: false,
        fin: false,
        rst: false,
    };
    /// Only ACK: a data or bare acknowledgement segment.
    pub const ACK: TcpFlags = TcpFlags {
        syn: false,
        ack: true,
        fin: false,
        rst: false,
    };
}

/// The transport part of a packet.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum L4 {
    /// TCP segment.
    Tcp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
        /// Flags.
        flags: TcpFlags,
    },
    /// UDP datagram.
    Udp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
    },
    /// ICMP (protocol 1) when the addresses are IPv4, ICMPv6 (58) when IPv6.
    Icmp {
        /// ICMP type.
        icmp_type: u8,
        /// ICMP code.
        code: u8,
        /// Identifier (echo, timestamp, ...; 0 for other types).
        id: u16,
        /// For an ICMP error: the offending packet it quotes, as that packet was sent.
        quoted: Option<Box<Packet>>,
    },
    /// Any other protocol: only its number is looked at.
    Other {
        /// IP protocol number.
        proto: u8,
    },
}

/// An IP packet: the fields policy and connection tracking look at.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Packet {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Transport header.
    pub l4: L4,
}

impl Packet {
    /// A TCP packet with the given flags.
    pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: TcpFlags) -> Packet {
        Packet {
            src,
            dst,
            l4: L4::Tcp {
                sport,
                dport,
                flags,
            },
        }
    }

    /// A UDP packet.
    pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Packet {
        Packet {
            src,
            dst,
            l4: L4::Udp { sport, dport },
        }
    }

    /// An ICMP or ICMPv6 packet (family from the addresses) quoting nothing.
    pub fn icmp(src: IpAddr, dst: IpAddr, icmp_type: u8, code: u8, id: u16) -> Packet {
        Packet {
            src,
            dst,
            l4: L4::Icmp {
                icmp_type,
                code,
                id,
                quoted: None,
            },
        }
    }

    /// An echo request (type 8 for IPv4, 128 for IPv6).
    pub fn echo_request(src: IpAddr, dst: IpAddr, id: u16) -> Packet {
        let icmp_type = if src.is_ipv6() { 128 } else { 8 };
        Packet::icmp(src, dst, icmp_type, 0, id)
    }

    /// The IP protocol number: 6, 17, 1 (ICMP over IPv4), 58 (ICMP over IPv6) or the other number.
    pub fn proto(&self) -> u8 {
        match &self.l4 {
            L4::Tcp { .. } => PROTO_TCP,
            L4::Udp { .. } => PROTO_UDP,
            L4::Icmp { .. } if self.is_v6() => PROTO_ICMPV6,
            L4::Icmp { .. } => PROTO_ICMP,
            L4::Other { proto } => *proto,
        }
    }

    /// Whether this is an IPv6 packet (judged by its source address).
    pub fn is_v6(&self) -> bool {
        self.src.is_ipv6()
    }

    /// The destination port of a TCP or UDP packet.
    pub fn dport(&self) -> Option<u16> {
        match &self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => Some(*dport),
            _ => None,
        }
    }

    /// The reply the destination would send: addresses and ports swapped; a
    /// TCP SYN becomes SYN+ACK (other flags kept); ICMP query requests
    /// become their replies (echo, timestamp, information, address mask);
    /// an ICMP packet of another type keeps its type and drops any quote.
    pub fn reply(&self) -> Packet {
        let l4 = match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                let mut flags = *flags;
                if flags.syn {
                    flags.ack = true;
                }
                L4::Tcp {
                    sport: *dport,
                    dport: *sport,
                    flags,
                }
            }
            L4::Udp { sport, dport } => L4::Udp {
                sport: *dport,
                dport: *sport,
            },
            L4::Icmp {
                icmp_type,
                code,
                id,
                ..
            } => L4::Icmp {
                icmp_type: query_reply_type(self.is_v6(), *icmp_type).unwrap_or(*icmp_type),
                code: *code,
                id: *id,
                quoted: None,
            },
            L4::Other { proto } => L4::Other { proto: *proto },
        };
        Packet {
            src: self.dst,
            dst: self.src,
            l4,
        }
    }
}

/// The reply type of an ICMP query request type, if it is one.
pub fn query_reply_type(v6: bool, icmp_type: u8) -> Option<u8> {
    match (v6, icmp_type) {
        (false, 8) => Some(0),
        (false, 13) => Some(14),
        (false, 15) => Some(16),
        (false, 17) => Some(18),
        (true, 128) => Some(129),
        _ => None,
    }
}

/// For an ICMP query type (request or reply), the request type of its pair.
pub fn query_request_type(v6: bool, icmp_type: u8) -> Option<u8> {
    match (v6, icmp_type) {
        (false, 8 | 0) => Some(8),
        (false, 13 | 14) => Some(13),
        (false, 15 | 16) => Some(15),
        (false, 17 | 18) => Some(17),
        (true, 128 | 129) => Some(128),
        _ => None,
    }
}

/// Whether an ICMP type is an error that quotes the packet that caused it:
/// IPv4 destination unreachable (incl. fragmentation needed), time exceeded,
/// parameter problem; ICMPv6 destination unreachable, packet too big, time
/// exceeded, parameter problem.
pub fn is_icmp_error(v6: bool, icmp_type: u8) -> bool {
    if v6 {
        matches!(icmp_type, 1..=4)
    } else {
        matches!(icmp_type, 3 | 11 | 12)
    }
}

impl fmt::Display for Packet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                write!(f, "tcp {} :{} -> {} :{}", self.src, sport, self.dst, dport)?;
                let names = [
                    (flags.syn, "S"),
                    (flags.ack, "A"),
                    (flags.fin, "F"),
                    (flags.rst, "R"),
                ];
                let set: String = names
                    .iter()
                    .filter(|(on, _)| *on)
                    .map(|(_, n)| *n)
                    .collect();
                if !set.is_empty() {
                    write!(f, " [{set}]")?;
                }
                Ok(())
            }
            L4::Udp { sport, dport } => {
                write!(f, "udp {} :{} -> {} :{}", self.src, sport, self.dst, dport)
            }
            L4::Icmp {
                icmp_type,
                code,
                id,
                quoted,
            } => {
                let name = if self.is_v6() { "icmpv6" } else { "icmp" };
                write!(
                    f,
                    "{name} {} -> {} type {icmp_type} code {code} id {id}",
                    self.src, self.dst
                )?;
                if let Some(q) = quoted {
                    write!(f, " quoting ({q})")?;
                }
                Ok(())
            }
            L4::Other { proto } => write!(f, "proto {proto} {} -> {}", self.src, self.dst),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn proto_of_icmp_follows_the_address_family() {
        assert_eq!(
            Packet::echo_request(a("10.0.0.1"), a("10.0.0.2"), 1).proto(),
            1
        );
        assert_eq!(
            Packet::echo_request(a("fd00::1"), a("fd00::2"), 1).proto(),
            58
        );
        assert_eq!(
            Packet::tcp(a("10.0.0.1"), a("10.0.0.2"), 1, 2, TcpFlags::SYN).proto(),
            6
        );
        assert_eq!(Packet::udp(a("10.0.0.1"), a("10.0.0.2"), 1, 2).proto(), 17);
        assert_eq!(
            Packet {
                src: a("10.0.0.1"),
                dst: a("10.0.0.2"),
                l4: L4::Other { proto: 47 }
            }
            .proto(),
            47
        );
    }

    #[test]
    fn reply_swaps_and_turns_syn_into_syn_ack() {
        let p = Packet::tcp(a("10.0.0.1"), a("10.0.0.2"), 40000, 443, TcpFlags::SYN);
        let r = p.reply();
        assert_eq!(r.src, a("10.0.0.2"));
        assert_eq!(r.dst, a("10.0.0.1"));
        assert_eq!(
            r.l4,
            L4::Tcp {
                sport: 443,
                dport: 40000,
                flags: TcpFlags {
                    syn: true,
                    ack: true,
                    ..TcpFlags::default()
                }
            }
        );
        let ack = Packet::tcp(a("10.0.0.1"), a("10.0.0.2"), 1, 2, TcpFlags::ACK).reply();
        assert_eq!(
            ack.l4,
            L4::Tcp {
                sport: 2,
                dport: 1,
                flags: TcpFlags::ACK
            }
        );
    }

    #[test]
    fn reply_of_echo_is_echo_reply() {
        let r = Packet::echo_request(a("10.0.0.1"), a("10.0.0.2"), 7).reply();
        assert_eq!(
            r.l4,
            L4::Icmp {
                icmp_type: 0,
                code: 0,
                id: 7,
                quoted: None
            }
        );
        let r6 = Packet::echo_request(a("fd00::1"), a("fd00::2"), 7).reply();
        assert_eq!(
            r6.l4,
            L4::Icmp {
                icmp_type: 129,
                code: 0,
                id: 7,
                quoted: None
            }
        );
        let u = Packet::udp(a("10.0.0.1"), a("10.0.0.2"), 5, 6).reply();
        assert_eq!(u.l4, L4::Udp { sport: 6, dport: 5 });
    }

    #[test]
    fn icmp_error_types() {
        for t in [3, 11, 12] {
            assert!(is_icmp_error(false, t));
        }
        for t in [1, 2, 3, 4] {
            assert!(is_icmp_error(true, t));
        }
        assert!(!is_icmp_error(false, 8));
        assert!(!is_icmp_error(true, 128));
        assert_eq!(query_request_type(false, 0), Some(8));
        assert_eq!(query_request_type(true, 129), Some(128));
        assert_eq!(query_request_type(false, 3), None);
    }

    #[test]
    fn display_is_readable() {
        let p = Packet::tcp(a("10.0.0.1"), a("10.0.0.2"), 1, 2, TcpFlags::SYN);
        assert_eq!(p.to_string(), "tcp 10.0.0.1 :1 -> 10.0.0.2 :2 [S]");
    }
}

/// Where an IP fragment sits in its datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fragment {
    /// IP identification (16 bits for IPv4, 32 for IPv6).
    pub id: u32,
    /// Offset in 8-byte units; 0 for the first fragment, which carries the
    /// L4 header.
    pub offset: u16,
    /// More fragments follow.
    pub more: bool,
}

impl Fragment {
    /// The first fragment of a datagram that has more (offset 0, MF set).
    pub fn is_first(&self) -> bool {
        self.offset == 0 && self.more
    }

    /// A later fragment: no L4 header.
    pub fn is_later(&self) -> bool {
        self.offset != 0
    }
}

/// A packet as it travels between ports: the IP packet, the instance port
/// it was sent from (`None`: from the host or outside, no sender hook) and
/// the instance port it is handed to (`None`: leaves the subnets, no
/// receiver hook), and what the frame carries besides (a VLAN tag, a
/// fragment header). Ports are indices into [`crate::flat::FlatModel::instances`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Wire {
    /// The IP packet (for a later fragment: the datagram's addresses and
    /// protocol; its L4 fields are not on the wire).
    pub packet: Packet,
    /// The sending instance's port; `None`: the host hands the packet to
    /// the bridge (routed from elsewhere, or its own), unless `unattached`.
    pub from: Option<usize>,
    /// Sent straight from a bridge port sgfw has not attached yet (no hook
    /// of sgfw's saw it; `from` is `None`).
    pub unattached: bool,
    /// The receiving instance's port.
    pub to: Option<usize>,
    /// The frame carries an 802.1Q tag (VID 0 included).
    pub vlan: bool,
    /// The packet is a fragment.
    pub fragment: Option<Fragment>,
}

impl Match {
    /// Whether this matcher matches a packet: protocol, TCP/UDP destination
    /// port, ICMP type and code. ICMP matchers match only their own family.
    pub fn matches(&self, pkt: &Packet) -> bool {
        match *self {
            Match::All => true,
            Match::Proto(p) => pkt.proto() == p,
            Match::Ports { proto, from, to } => {
                pkt.proto() == proto && pkt.dport().is_some_and(|d| (from..=to).contains(&d))
            }
            Match::Icmp {
                proto,
                icmp_type,
                code,
            } => {
                let L4::Icmp {
                    icmp_type: t,
                    code: c,
                    ..
                } = &pkt.l4
                else {
                    return false;
                };
                let family_ok = if pkt.is_v6() {
                    proto == PROTO_ICMPV6
                } else {
                    proto == PROTO_ICMP
                };
                family_ok
                    && icmp_type.is_none_or(|want| want == *t)
                    && code.is_none_or(|want| want == *c)
            }
        }
    }
}
