//! Connection tracking as the reference evaluator keeps it: flow keys from
//! the owning instance's point of view, entries with their states and
//! timeouts, the fragment records, and the flow an ICMP error quotes. It
//! owns the state; the decisions that read it are [`super::evaluate`]'s.
//! It must never track an ICMP error itself.

use super::*;

/// Key of a tracked flow, from the owning instance's point of view, so
/// that both directions of a flow find the same entry.
///
/// TCP/UDP: the ports on each side. ICMP queries (echo, timestamp,
/// information, address mask): `local_port` = identifier, `remote_port` = the
/// request type or-ed with 0x100 when the instance asked, 0x200 when the peer
/// did (only the asker's requests and the other side's replies continue a
/// query). Other ICMP: type and code (below 0x100). ICMP errors: no key.
/// Other protocols: 0 and 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FlowKey {
    /// The instance's address.
    pub local: IpAddr,
    /// The peer's address.
    pub remote: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// Local port, or ICMP identifier / type.
    pub local_port: u16,
    /// Remote port, or ICMP request type / code.
    pub remote_port: u16,
}

/// Where a tracked flow stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum FlowState {
    /// Only the originating direction has been seen.
    New,
    /// Both directions seen (TCP established, UDP stream).
    Established,
    /// A TCP FIN or RST was seen.
    Closing,
}

/// A tracked flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowEntry {
    /// The instance that owns the entry.
    pub instance: String,
    /// State.
    pub state: FlowState,
    /// Direction of the packet that created it.
    pub origin: Direction,
    /// Creation time, ns.
    pub created_ns: u64,
    /// Time of the last packet that refreshed it, ns.
    pub last_seen_ns: u64,
    /// Packets that created or refreshed it.
    pub packets: u64,
}

impl FlowEntry {
    /// How long the entry lives after its last packet, ns.
    pub fn timeout_ns(&self, proto: u8, t: &ConntrackTimeouts) -> u64 {
        let secs = match (proto, self.state) {
            (PROTO_TCP, FlowState::New) => t.tcp_new,
            (PROTO_TCP, FlowState::Established) => t.tcp_established,
            (PROTO_TCP, FlowState::Closing) => t.tcp_closing,
            (PROTO_UDP, FlowState::New) => t.udp,
            (PROTO_UDP, _) => t.udp_stream,
            (PROTO_ICMP | PROTO_ICMPV6, _) => t.icmp,
            _ => t.other,
        };
        u64::from(secs) * 1_000_000_000
    }

    /// Whether the entry has expired at `now_ns`.
    pub fn is_expired(&self, proto: u8, t: &ConntrackTimeouts, now_ns: u64) -> bool {
        now_ns >= self.last_seen_ns.saturating_add(self.timeout_ns(proto, t))
    }
}

/// Connection-tracking state of every instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conntrack {
    pub(super) flows: BTreeMap<FlowKey, FlowEntry>,
    /// First-fragment verdicts: (hook, datagram) → (allowed, expires at ns).
    pub(super) frags: BTreeMap<FragRecord, (bool, u64)>,
}

/// One fragmented datagram at one hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct FragRecord {
    pub(super) port: usize,
    pub(super) dir: Direction,
    pub(super) src: IpAddr,
    pub(super) dst: IpAddr,
    pub(super) proto: u8,
    pub(super) id: u32,
}

impl Conntrack {
    /// No tracked flows.
    pub fn new() -> Conntrack {
        Conntrack::default()
    }

    /// Number of entries (expired ones included until looked up or [`Conntrack::expire`]d).
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&FlowKey, &FlowEntry)> {
        self.flows.iter()
    }

    /// The entry for a key.
    pub fn get(&self, key: &FlowKey) -> Option<&FlowEntry> {
        self.flows.get(key)
    }

    /// Removes every entry that has expired at `now_ns`.
    pub fn expire(&mut self, t: &ConntrackTimeouts, now_ns: u64) {
        self.flows.retain(|k, e| !e.is_expired(k.proto, t, now_ns));
    }

    /// Whether a live entry of `instance` exists; an expired one is removed
    /// and counts as absent. Another instance's entry under the same key
    /// (link-scoped addresses) does not count.
    pub(super) fn is_live(
        &mut self,
        key: &FlowKey,
        instance: &str,
        t: &ConntrackTimeouts,
        now_ns: u64,
    ) -> bool {
        match self.flows.get(key) {
            Some(e) if e.is_expired(key.proto, t, now_ns) => {
                self.flows.remove(key);
                false
            }
            Some(e) => e.instance == instance,
            None => false,
        }
    }
}

/// The conntrack key of `pkt` from the view of the instance on the `dir` side
/// (egress: the sender, ingress: the receiver). `None` for ICMP errors, which
/// are never tracked.
pub fn flow_key(pkt: &Packet, dir: Direction) -> Option<FlowKey> {
    let (local, remote) = match dir {
        Direction::Egress => (pkt.src, pkt.dst),
        Direction::Ingress => (pkt.dst, pkt.src),
    };
    let (local_port, remote_port) = match &pkt.l4 {
        L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => match dir {
            Direction::Egress => (*sport, *dport),
            Direction::Ingress => (*dport, *sport),
        },
        L4::Icmp {
            icmp_type,
            code,
            id,
            ..
        } => {
            let v6 = pkt.is_v6();
            if is_icmp_error(v6, *icmp_type) {
                return None;
            }
            match query_request_type(v6, *icmp_type) {
                Some(request) => {
                    let asks = (*icmp_type == request) == (dir == Direction::Egress);
                    let asker = if asks {
                        sgfw_common::CT_ICMP_QUERY_LOCAL
                    } else {
                        sgfw_common::CT_ICMP_QUERY_REMOTE
                    };
                    (*id, asker | u16::from(request))
                }
                None => (u16::from(*icmp_type), u16::from(*code)),
            }
        }
        L4::Other { .. } => (0, 0),
    };
    Some(FlowKey {
        local,
        remote,
        proto: pkt.proto(),
        local_port,
        remote_port,
    })
}

/// For an ICMP error, the key of the flow it quotes, from the view of the
/// instance whose address is `local` in the error packet.
pub(super) fn related_key(pkt: &Packet, local: IpAddr) -> Option<FlowKey> {
    let L4::Icmp {
        icmp_type,
        quoted: Some(inner),
        ..
    } = &pkt.l4
    else {
        return None;
    };
    if !is_icmp_error(pkt.is_v6(), *icmp_type) {
        return None;
    }
    if inner.src == local {
        flow_key(inner, Direction::Egress)
    } else if inner.dst == local {
        flow_key(inner, Direction::Ingress)
    } else {
        None
    }
}
