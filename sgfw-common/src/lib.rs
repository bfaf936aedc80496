//! Types shared by the sgfw BPF programs and user space.
//!
//! This crate owns the byte layout of every map key and value, the map names,
//! the capacity limits the BPF side is compiled for, and the one enum of
//! decision reasons ([`Reason`]) that the dataplane counts and reports and that
//! the CLI prints. It must never contain logic that depends on `std`.
//!
//! Every struct is `#[repr(C)]` with explicit `_pad` fields and derives
//! `bytemuck::Pod`, which refuses to compile a struct with hidden padding; a
//! `const` assertion next to each pins its size so that a layout change is a
//! deliberate act on both sides.
//!
//! Multi-byte identifiers inside LPM-trie keys are stored as big-endian byte
//! arrays: the trie compares key bits from the first byte's most significant
//! bit, so a prefix over "(table id, address)" only works in network order.
#![no_std]
#![deny(missing_docs)]

use bytemuck::{Pod, Zeroable};

/// Names of the maps in the BPF object, shared so user space cannot misspell one.
pub mod map_names {
    /// [`crate::AddrKey`] → [`crate::AddrInfo`]: which instance owns an address.
    pub const ADDRS: &str = "SGFW_ADDRS";
    /// instance index (`u32`) → [`crate::InstancePolicy`].
    pub const INSTANCES: &str = "SGFW_INSTANCES";
    /// subnet index (`u32`) → [`crate::SubnetPolicy`].
    pub const SUBNETS: &str = "SGFW_SUBNETS";
    /// port ifindex (`u32`) → instance index (`u32`) for ports bound to an instance.
    pub const PORTS: &str = "SGFW_PORTS";
    /// LPM [`crate::CidrKeyV4`] → port-set id (`u32`): SG remote prefixes, IPv4.
    pub const SG_CIDR_V4: &str = "SGFW_SG_CIDR_V4";
    /// LPM [`crate::CidrKeyV6`] → port-set id (`u32`): SG remote prefixes, IPv6.
    pub const SG_CIDR_V6: &str = "SGFW_SG_CIDR_V6";
    /// LPM [`crate::PortKey`] → SG rule reference (`u32`).
    pub const SG_PORTS: &str = "SGFW_SG_PORTS";
    /// LPM [`crate::CidrKeyV4`] → [`crate::NaclBits`]: NACL CIDRs, IPv4.
    pub const NACL_CIDR_V4: &str = "SGFW_NACL_CIDR_V4";
    /// LPM [`crate::CidrKeyV6`] → [`crate::NaclBits`]: NACL CIDRs, IPv6.
    pub const NACL_CIDR_V6: &str = "SGFW_NACL_CIDR_V6";
    /// LPM [`crate::PortKey`] → entry bitmask (`u64`): NACL protocol/port matches.
    pub const NACL_PORTS: &str = "SGFW_NACL_PORTS";
    /// NACL table id (`u32`) → [`crate::NaclMeta`].
    pub const NACL_META: &str = "SGFW_NACL_META";
    /// [`crate::CtKey`] → [`crate::CtEntry`]: per-instance connection tracking.
    pub const CONNTRACK: &str = "SGFW_CONNTRACK";
    /// Single-element array of [`crate::Config`].
    pub const CONFIG: &str = "SGFW_CONFIG";
    /// Per-CPU array of `u64`: index [`crate::counter_index`].
    pub const COUNTERS: &str = "SGFW_COUNTERS";
    /// Ring buffer of [`crate::Event`].
    pub const EVENTS: &str = "SGFW_EVENTS";
    /// Per-CPU `[window start ns, events]`: the event rate limiter.
    pub const EVENT_RATE: &str = "SGFW_EVENT_RATE";
    /// Per-CPU scratch slot for the packet being classified.
    pub const SCRATCH: &str = "SGFW_SCRATCH";
    /// Per-CPU hash [`crate::PortCountKey`] → packets (`u64`), for the port-count programs.
    pub const PORT_COUNTS: &str = "SGFW_PORT_COUNTS";
    /// address identity (`u32`, from `skb->mark`) → [`crate::AddrKey`]: the
    /// sender's own address, whatever NAT made of the packet's source.
    pub const IDENTITIES: &str = "SGFW_IDENTITIES";
    /// LRU [`crate::FragKey`] → [`crate::FragEntry`]: the verdict of a
    /// datagram's first fragment at one hook, for its later fragments.
    pub const FRAGS: &str = "SGFW_FRAGS";
}

/// Names of the programs in the BPF object.
pub mod program_names {
    /// TC ingress on an instance port: what the instance sends (its SG egress).
    pub const FROM_INSTANCE: &str = "sgfw_from_instance";
    /// TC egress on an instance port: what is delivered to the instance (its SG ingress).
    pub const TO_INSTANCE: &str = "sgfw_to_instance";
    /// TC ingress: counts packets per port and direction; never drops.
    pub const PORT_COUNT_INGRESS: &str = "sgfw_port_count_ingress";
    /// TC egress: counts packets per port and direction; never drops.
    pub const PORT_COUNT_EGRESS: &str = "sgfw_port_count_egress";
    /// Does one array read and passes: the floor that benchmarks compare against.
    pub const NOOP: &str = "sgfw_noop";
    /// TC ingress on a subnet's bridge device (what its ports hand up to the
    /// host): the fence for ports not attached yet — a frame that no port
    /// hook of sgfw's stamped drops.
    pub const BRIDGE_UP: &str = "sgfw_bridge_up";
    /// TC egress on a subnet's bridge device (what the host hands to the
    /// bridge): stamps [`crate::STAMP_HOST`] on a frame with no stamp.
    pub const BRIDGE_DOWN: &str = "sgfw_bridge_down";
    /// XDP on an instance port (the `xdp` dataplane): judges what the
    /// instance sends as [`FROM_INSTANCE`] does, without side effects, and
    /// drops what that leg denies before the host builds an skb for it.
    /// What it passes still goes through [`FROM_INSTANCE`].
    pub const XDP_FROM_INSTANCE: &str = "sgfw_xdp_from_instance";
    /// XDP: does one array read and passes (the XDP benchmark floor).
    pub const XDP_NOOP: &str = "sgfw_xdp_noop";
}

/// Capacity limits the BPF programs are built for. User space checks a model
/// against these before it writes anything.
pub mod limits {
    /// NACL entries per direction per address family: one bit each in a `u64`.
    pub const NACL_ENTRIES: usize = 64;
    /// Address-family tag for IPv4 in keys.
    pub const AF_INET: u8 = 4;
    /// Address-family tag for IPv6 in keys.
    pub const AF_INET6: u8 = 6;
}

/// The traffic classes SEMANTICS (docs/semantics.md, "Passthrough") leaves
/// unfiltered, defined once for the BPF programs, the reference evaluator and
/// the nftables renderer. Addresses are in network byte order.
pub mod passthrough {
    /// Service addresses, IPv4: metadata, Time Sync, Amazon DNS.
    pub const SERVICES_V4: [[u8; 4]; 3] = [
        [169, 254, 169, 254],
        [169, 254, 169, 123],
        [169, 254, 169, 253],
    ];
    /// Service addresses, IPv6: fd00:ec2::254, fd00:ec2::123, fd00:ec2::253.
    pub const SERVICES_V6: [[u8; 16]; 3] = [
        [
            0xfd, 0, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x54,
        ],
        [
            0xfd, 0, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x23,
        ],
        [
            0xfd, 0, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x53,
        ],
    ];
    /// What each service address is, in [`SERVICES_V4`] / [`SERVICES_V6`] order.
    pub const SERVICE_NAMES: [&str; 3] = ["metadata", "time-sync", "amazon-dns"];
    /// DHCP client port: an instance sends 68 -> 67 ...
    pub const DHCP_CLIENT_PORT: u16 = 68;
    /// ... and is answered 67 -> 68.
    pub const DHCP_SERVER_PORT: u16 = 67;
    /// ICMPv6 router solicitation/advertisement, neighbour solicitation/advertisement.
    pub const NDP_TYPES: core::ops::RangeInclusive<u8> = 133..=136;
    /// ICMPv6 redirect: never delivered.
    pub const ICMPV6_REDIRECT: u8 = 137;
}

/// [`AddrInfo::instance`] of the entries that mark a subnet's broadcast
/// address: a destination a VPC does not carry.
pub const BROADCAST_OWNER: u32 = u32::MAX;

/// [`CtKey::remote_port`] of an ICMP query flow that the local instance
/// started: this bit, or-ed with the request type.
pub const CT_ICMP_QUERY_LOCAL: u16 = 0x100;
/// [`CtKey::remote_port`] of an ICMP query flow that the peer started.
pub const CT_ICMP_QUERY_REMOTE: u16 = 0x200;

/// How long the verdict of a datagram's first fragment stands for its later
/// fragments (the kernel's IPv4 reassembly timeout).
pub const FRAGMENT_TIMEOUT_NS: u64 = 30_000_000_000;

/// Key of [`map_names::FRAGS`]: one datagram at one hook.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FragKey {
    /// Source address (IPv4 in the first 4 bytes).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// IP identification (16 bits for IPv4, 32 for IPv6).
    pub id: u32,
    /// Ifindex of the port.
    pub ifindex: u32,
    /// IP protocol (IPv6: the fragment header's next header).
    pub proto: u8,
    /// [`limits::AF_INET`] or [`limits::AF_INET6`].
    pub family: u8,
    /// [`Direction`] of the hook.
    pub direction: u8,
    /// Always zero.
    pub _pad: u8,
}
const _: () = assert!(size_of::<FragKey>() == 44);

/// Value of [`map_names::FRAGS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FragEntry {
    /// Dataplane clock (ns) after which the record no longer stands.
    pub expires_ns: u64,
    /// 1: the first fragment was allowed at this hook; 0: denied.
    pub allowed: u8,
    /// Always zero.
    pub _pad: [u8; 7],
}
const _: () = assert!(size_of::<FragEntry>() == 16);

/// Where a packet was seen, from the instance's point of view.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(
    feature = "user",
    derive(serde::Serialize),
    serde(rename_all = "lowercase")
)]
pub enum Direction {
    /// The instance sends (TC ingress of its bridge port).
    Egress = 0,
    /// The packet is delivered to the instance (TC egress of its bridge port).
    Ingress = 1,
}

impl Direction {
    /// `egress` / `ingress`: the permission list, flow-log and message name.
    pub const fn name(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        }
    }

    /// The classifier that judges this direction at an instance's port.
    pub const fn program(self) -> &'static str {
        match self {
            Direction::Egress => program_names::FROM_INSTANCE,
            Direction::Ingress => program_names::TO_INSTANCE,
        }
    }
}

/// Why the dataplane let a packet through or dropped it. One enum for the BPF
/// side, the counters, the event stream and the CLI.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// A security-group egress rule allowed a new flow.
    AllowSgEgress = 0,
    /// A security-group ingress rule allowed a new flow.
    AllowSgIngress = 1,
    /// The flow is tracked for this instance (stateful return path).
    AllowTracked = 2,
    /// An ICMP error quoting a tracked flow.
    AllowRelated = 3,
    /// ARP, NDP, DHCP, metadata or the subnet's DNS address: never filtered.
    AllowPassthrough = 4,
    /// No modelled instance at this port's end of the packet: not ours to judge.
    AllowUnmanaged = 5,
    /// No security-group egress rule matched.
    DropSgEgress = 6,
    /// The source subnet's outbound NACL denied it.
    DropNaclOut = 7,
    /// The destination subnet's inbound NACL denied it.
    DropNaclIn = 8,
    /// No security-group ingress rule matched.
    DropSgIngress = 9,
    /// A bound port sent a packet whose source is not its instance's address.
    DropSourceCheck = 10,
    /// A bound port was handed a packet for an address that is not its instance's.
    DropNotForInstance = 11,
    /// A non-first IP fragment whose first fragment was not seen at this hook,
    /// was denied, or is too long ago.
    DropFragment = 12,
    /// A truncated or malformed header, or too many IPv6 extension headers.
    DropMalformed = 13,
    /// An Ethernet type other than IPv4, IPv6 or ARP.
    DropNonIp = 14,
    /// The policy maps are inconsistent (an id with no entry), or an
    /// identity names no address: fail closed.
    DropNoPolicy = 15,
    /// A later fragment of a datagram whose first fragment was allowed at this hook.
    AllowFragment = 16,
    /// A VLAN-tagged frame (802.1Q, 802.1ad, priority tags with VID 0).
    DropVlan = 17,
    /// Traffic a VPC does not carry: a broadcast or multicast destination,
    /// or an ICMPv6 redirect.
    DropNotCarried = 18,
    /// A frame no hook of sgfw's stamped ([`STAMP_NONE`]: straight from a
    /// bridge port sgfw has not attached yet), or a packet from an
    /// instance's address that did not pass that instance's hook (no
    /// identity in `skb->mark`: through the host from such a port, or
    /// forged by the host).
    DropUnattached = 19,
}

impl Reason {
    /// Number of reasons; counters are laid out with this stride.
    pub const COUNT: usize = 20;

    /// All reasons in numeric order.
    pub const ALL: [Reason; Self::COUNT] = [
        Reason::AllowSgEgress,
        Reason::AllowSgIngress,
        Reason::AllowTracked,
        Reason::AllowRelated,
        Reason::AllowPassthrough,
        Reason::AllowUnmanaged,
        Reason::DropSgEgress,
        Reason::DropNaclOut,
        Reason::DropNaclIn,
        Reason::DropSgIngress,
        Reason::DropSourceCheck,
        Reason::DropNotForInstance,
        Reason::DropFragment,
        Reason::DropMalformed,
        Reason::DropNonIp,
        Reason::DropNoPolicy,
        Reason::AllowFragment,
        Reason::DropVlan,
        Reason::DropNotCarried,
        Reason::DropUnattached,
    ];

    /// The reason with this numeric value.
    pub fn from_u8(v: u8) -> Option<Reason> {
        Self::ALL.get(v as usize).copied()
    }

    /// Whether the packet was dropped.
    pub const fn is_drop(self) -> bool {
        !matches!(
            self,
            Reason::AllowSgEgress
                | Reason::AllowSgIngress
                | Reason::AllowTracked
                | Reason::AllowRelated
                | Reason::AllowPassthrough
                | Reason::AllowUnmanaged
                | Reason::AllowFragment
        )
    }

    /// Short stable name, as printed by the CLI and flow logs.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::AllowSgEgress => "sg-egress",
            Reason::AllowSgIngress => "sg-ingress",
            Reason::AllowTracked => "tracked",
            Reason::AllowRelated => "related",
            Reason::AllowPassthrough => "passthrough",
            Reason::AllowUnmanaged => "unmanaged",
            Reason::DropSgEgress => "sg-egress",
            Reason::DropNaclOut => "nacl-out",
            Reason::DropNaclIn => "nacl-in",
            Reason::DropSgIngress => "sg-ingress",
            Reason::DropSourceCheck => "source-check",
            Reason::DropNotForInstance => "not-for-instance",
            Reason::DropFragment => "fragment",
            Reason::DropMalformed => "malformed",
            Reason::DropNonIp => "non-ip",
            Reason::DropNoPolicy => "no-policy",
            Reason::AllowFragment => "fragment",
            Reason::DropVlan => "vlan",
            Reason::DropNotCarried => "not-carried",
            Reason::DropUnattached => "unattached",
        }
    }
}

/// Index into [`map_names::COUNTERS`] for an instance and a reason.
pub const fn counter_index(instance: u32, reason: Reason) -> u32 {
    instance * Reason::COUNT as u32 + reason as u32
}

/// Key of [`map_names::ADDRS`]: an address of either family (IPv4 in the first 4 bytes).
///
/// Word-aligned (like [`CtKey`]) so the BPF side fills it with word stores.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct AddrKey {
    /// [`limits::AF_INET`] or [`limits::AF_INET6`].
    pub family: u8,
    /// The half of `ADDRS` the key is in ([`Config::slot`]); 0 elsewhere.
    pub slot: u8,
    /// Always zero.
    pub _pad: [u8; 2],
    /// Address bytes in network order; IPv4 uses the first 4, the rest zero.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<AddrKey>() == 20);

/// Value of [`map_names::ADDRS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct AddrInfo {
    /// Instance index (key of [`map_names::INSTANCES`]).
    pub instance: u32,
    /// Subnet index (key of [`map_names::SUBNETS`]).
    pub subnet: u32,
    /// The address's identity (key of [`map_names::IDENTITIES`],
    /// 1..=[`IDENTITY_MAX`];
    /// 0: none), carried in `skb->mark` from the sender's hook to the
    /// receiver's.
    pub identity: u32,
}
const _: () = assert!(size_of::<AddrInfo>() == 12);

/// The `skb->mark` bits sgfw owns: the sender's address identity, written by
/// the sending instance's hook, read by the receiving instance's hook. The
/// host's forwarding and NAT keep the mark; a veth's crossing into another
/// network namespace scrubs it, so an instance cannot forge one. The low 16
/// bits (netavark's 0x2000, kube-proxy's 0x4000/0x8000) are never touched.
pub const MARK_IDENTITY_SHIFT: u32 = 16;
/// Mask of [`MARK_IDENTITY_SHIFT`]'s bits.
pub const MARK_IDENTITY_MASK: u32 = 0xffff_0000;

/// The key of an instance, subnet or identity in slot `slot` of its map
/// ([`Config::slot`]): indices and identities stay below 2^31.
pub const fn slotted(index: u32, slot: u32) -> u32 {
    index | ((slot & 1) << 31)
}

/// The slot bit of a stamp: which half of the maps the sender's hook read
/// its identity from, so the receiver resolves it in the same half even
/// when an apply switches halves while the packet is in flight.
pub const STAMP_SLOT: u32 = 0x8000;

/// The stamp (the identity bits of `skb->mark`) of a frame no hook of sgfw's
/// has seen: it came straight from a bridge port sgfw has not attached yet
/// (a container that just started). The receiving port's hook and the
/// bridge device's own ingress hook drop it (the fence).
pub const STAMP_NONE: u32 = 0;
/// The stamp of a frame that passed an attached port's hook while its
/// sender spoke as no instance (an unbound port; an instance's link-local
/// or unspecified source).
pub const STAMP_PORT: u32 = 0x7fff;
/// The stamp of a frame the host handed to a subnet's bridge (routed from
/// elsewhere, or the host's own), written by the bridge device's egress hook.
pub const STAMP_HOST: u32 = 0x7ffe;
/// The largest address identity: the stamps above are not identities.
pub const IDENTITY_MAX: u32 = 0x7ffd;

/// The key in `IDENTITIES` of the identity a stamp names (its slot bit
/// included: [`slotted`]), or 0 for [`STAMP_PORT`] and [`STAMP_HOST`] (and
/// for [`STAMP_NONE`], which the fence has dropped before).
pub const fn stamp_identity(stamp: u32) -> u32 {
    let id = stamp & !STAMP_SLOT;
    if id == 0 || id > IDENTITY_MAX {
        0
    } else {
        slotted(id, (stamp & STAMP_SLOT != 0) as u32)
    }
}

/// The stamp of identity `id` (1..=[`IDENTITY_MAX`]) read from `slot`.
pub const fn identity_stamp(id: u32, slot: u32) -> u32 {
    id | if slot & 1 != 0 { STAMP_SLOT } else { 0 }
}

/// Value of [`map_names::INSTANCES`]: which compiled policies apply. Replacing
/// this one hash entry switches the instance to a new policy atomically.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct InstancePolicy {
    /// Subnet index.
    pub subnet: u32,
    /// SG policy id for traffic delivered to the instance.
    pub policy_ingress: u32,
    /// SG policy id for traffic the instance sends.
    pub policy_egress: u32,
    /// Reserved, zero.
    pub _pad: u32,
}
const _: () = assert!(size_of::<InstancePolicy>() == 16);

/// [`SubnetPolicy::flags`]: `dns_v4` is set.
pub const SUBNET_HAS_DNS_V4: u32 = 1;
/// [`SubnetPolicy::flags`]: `dns_v6` is set.
pub const SUBNET_HAS_DNS_V6: u32 = 2;

/// Value of [`map_names::SUBNETS`]: the subnet's NACL tables and DNS address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SubnetPolicy {
    /// NACL table id, inbound, IPv4.
    pub nacl_in_v4: u32,
    /// NACL table id, outbound, IPv4.
    pub nacl_out_v4: u32,
    /// NACL table id, inbound, IPv6.
    pub nacl_in_v6: u32,
    /// NACL table id, outbound, IPv6.
    pub nacl_out_v6: u32,
    /// `SUBNET_HAS_*` flags.
    pub flags: u32,
    /// The subnet's DNS address, IPv4.
    pub dns_v4: [u8; 4],
    /// The subnet's DNS address, IPv6.
    pub dns_v6: [u8; 16],
    /// The subnet's IPv4 prefix (network address) ...
    pub net_v4: [u8; 4],
    /// ... and its mask: a remote outside it is never an instance of this
    /// subnet, so no owner lookup is needed to know the packet crosses.
    pub mask_v4: [u8; 4],
    /// The subnet's IPv6 prefix (all zero when it has none) ...
    pub net_v6: [u8; 16],
    /// ... and its mask (all zero when it has none: every address may be local).
    pub mask_v6: [u8; 16],
}
const _: () = assert!(size_of::<SubnetPolicy>() == 80);

/// LPM key data: a table id and an IPv4 address (both big-endian).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct CidrKeyV4 {
    /// SG policy id or NACL table id, big-endian.
    pub table: [u8; 4],
    /// IPv4 address, network order.
    pub addr: [u8; 4],
}
const _: () = assert!(size_of::<CidrKeyV4>() == 8);

/// LPM key data: a table id and an IPv6 address (both big-endian).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct CidrKeyV6 {
    /// SG policy id or NACL table id, big-endian.
    pub table: [u8; 4],
    /// IPv6 address, network order.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<CidrKeyV6>() == 20);

/// LPM key data for protocol/port matching: a set id, a protocol number and
/// a 16-bit "port" (TCP/UDP destination-side port, or ICMP `type << 8 | code`).
///
/// Prefix length 32 matches every protocol of the set, 40 one protocol with
/// any port, 40 + k a port prefix of length k.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct PortKey {
    /// Port-set id (SG) or NACL table id, big-endian.
    pub set: [u8; 4],
    /// IP protocol number.
    pub proto: u8,
    /// Port or ICMP type/code, big-endian.
    pub port: [u8; 2],
}
const _: () = assert!(size_of::<PortKey>() == 7);

/// Prefix length of a full [`PortKey`] (set + protocol + port).
pub const PORT_KEY_BITS: u32 = (size_of::<PortKey>() * 8) as u32;
/// Prefix length of a full [`CidrKeyV4`].
pub const CIDR_V4_KEY_BITS: u32 = (size_of::<CidrKeyV4>() * 8) as u32;
/// Prefix length of a full [`CidrKeyV6`].
pub const CIDR_V6_KEY_BITS: u32 = (size_of::<CidrKeyV6>() * 8) as u32;

/// Value of the NACL CIDR tries: the entries whose CIDR contains the
/// address, and (repeated from [`NaclMeta`], so an allow needs no third
/// lookup) which entries of the table allow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct NaclBits {
    /// Bit i: entry i's CIDR contains the address.
    pub entries: u64,
    /// Bit i: entry i allows.
    pub allow_mask: u64,
}
const _: () = assert!(size_of::<NaclBits>() == 16);

/// Value of [`map_names::NACL_META`]: how to turn a match bitmask into a decision.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct NaclMeta {
    /// Bit i set: entry i (in rule-number order) allows.
    pub allow_mask: u64,
    /// Rule number of entry i.
    pub rule_numbers: [u16; limits::NACL_ENTRIES],
}
const _: () = assert!(size_of::<NaclMeta>() == 136);

/// Key of [`map_names::CONNTRACK`], from the local instance's point of view,
/// so both directions of a flow find the same entry.
///
/// TCP/UDP: ports. ICMP queries: `local_port` = identifier, `remote_port` =
/// the request type or-ed with [`CT_ICMP_QUERY_LOCAL`] or
/// [`CT_ICMP_QUERY_REMOTE`] (who asked), so only the asker's requests and the
/// other side's replies continue a query flow. Other non-error ICMP: type and
/// code (below 0x100, so never a query's key). ICMP errors have no key.
/// Other protocols: zero.
///
/// 8-byte aligned: BPF has no unaligned loads, so an align-1 copy of the
/// addresses would become a byte loop on every packet.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct CtKey {
    /// The instance's address.
    pub local: [u8; 16],
    /// The peer's address.
    pub remote: [u8; 16],
    /// Local port (or ICMP id).
    pub local_port: u16,
    /// Remote port (or ICMP request type).
    pub remote_port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// [`limits::AF_INET`] or [`limits::AF_INET6`].
    pub family: u8,
    /// Always zero.
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<CtKey>() == 40);

/// [`CtEntry::state`]: only the originating direction has been seen.
pub const CT_NEW: u8 = 0;
/// [`CtEntry::state`]: both directions seen (TCP established, UDP stream).
pub const CT_ESTABLISHED: u8 = 1;
/// [`CtEntry::state`]: a TCP FIN or RST was seen.
pub const CT_CLOSING: u8 = 2;

/// [`CtEntry::nacl_ok`]: packets the instance sends passed its NACL stage
/// under [`CtEntry::generation`].
pub const CT_NACL_OK_EGRESS: u8 = 1;
/// [`CtEntry::nacl_ok`]: packets delivered to the instance passed its NACL
/// stage under [`CtEntry::generation`].
pub const CT_NACL_OK_INGRESS: u8 = 2;

/// Value of [`map_names::CONNTRACK`].
///
/// Besides the flow's state it caches, for the policy generation it was last
/// checked under, that this flow's packets passed the stateless checks
/// (passthrough class, source check, NACL) at its port, so an established
/// packet costs one lookup. Any apply bumps [`Config::generation`], which
/// invalidates every cache at once: a NACL change still cuts flows at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct CtEntry {
    /// Time of the last packet, in the dataplane clock (ns).
    pub last_seen_ns: u64,
    /// Time the flow was created (ns).
    pub created_ns: u64,
    /// Packets seen (approximate under concurrency).
    pub packets: u64,
    /// [`Config::generation`] the cached checks are valid for.
    pub generation: u32,
    /// Instance index that owns the entry.
    pub instance: u32,
    /// Ifindex of the port the cached checks were made at.
    pub ifindex: u32,
    /// `CT_*` state.
    pub state: u8,
    /// [`Direction`] of the packet that created the entry.
    pub origin: u8,
    /// `CT_NACL_OK_*` bits.
    pub nacl_ok: u8,
    /// 1: the flow was created for a peer that is an instance (it came with
    /// an identity, or from an instance's address); at the receiver's hook
    /// such a flow's packets without an identity take the slow path.
    pub peer_instance: u8,
    /// Identity of the key's local address ([`AddrInfo::identity`]), written
    /// into `skb->mark` on the fast path of packets the instance sends.
    pub local_identity: u32,
    /// Always zero.
    pub _pad2: u32,
}
const _: () = assert!(size_of::<CtEntry>() == 48);

/// [`Config::flags`]: also send accepted new flows to the event ring.
pub const CONFIG_EMIT_ACCEPTS: u32 = 1;

/// The single [`map_names::CONFIG`] element.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Config {
    /// When non-zero, the dataplane clock reads this instead of the kernel's
    /// (tests drive timeouts with it).
    pub time_override_ns: u64,
    /// TCP established timeout, ns.
    pub tcp_established_ns: u64,
    /// TCP before the first reply, ns.
    pub tcp_new_ns: u64,
    /// TCP after FIN/RST, ns.
    pub tcp_closing_ns: u64,
    /// UDP, one direction seen, ns.
    pub udp_ns: u64,
    /// UDP stream (both directions seen), ns.
    pub udp_stream_ns: u64,
    /// ICMP, ns.
    pub icmp_ns: u64,
    /// Any other protocol, ns.
    pub other_ns: u64,
    /// `CONFIG_*` flags.
    pub flags: u32,
    /// Most events per second per CPU sent to the ring buffer.
    pub events_per_sec: u32,
    /// Bumped by every apply; conntrack caches of older generations are stale.
    pub generation: u32,
    /// Which half of the switched maps (`ADDRS`, `IDENTITIES`, `INSTANCES`,
    /// `SUBNETS`: see [`slotted`]) is in force, 0 or 1. An apply writes the
    /// other half, then switches every instance, subnet and address at once
    /// with this one array write.
    pub slot: u32,
}
const _: () = assert!(size_of::<Config>() == 80);

/// One decision sent to user space through [`map_names::EVENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Event {
    /// Dataplane clock, ns.
    pub ts_ns: u64,
    /// Source address (IPv4 in the first 4 bytes).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Instance index the decision was made for (`u32::MAX`: none).
    pub instance: u32,
    /// SG rule reference or NACL rule number that decided (`u32::MAX`: none).
    pub rule: u32,
    /// Ifindex of the port.
    pub ifindex: u32,
    /// Packet length in bytes.
    pub len: u32,
    /// Source port or ICMP type.
    pub sport: u16,
    /// Destination port or ICMP code.
    pub dport: u16,
    /// [`Reason`] as `u8`.
    pub reason: u8,
    /// [`Direction`] as `u8`.
    pub direction: u8,
    /// IP protocol number.
    pub proto: u8,
    /// [`limits::AF_INET`] or [`limits::AF_INET6`].
    pub family: u8,
}
const _: () = assert!(size_of::<Event>() == 64);

/// Key of [`map_names::PORT_COUNTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct PortCountKey {
    /// The port's ifindex.
    pub ifindex: u32,
    /// [`Direction`] as `u32`.
    pub direction: u32,
}
const _: () = assert!(size_of::<PortCountKey>() == 8);

#[cfg(feature = "user")]
mod user {
    //! aya's `Pod` marker for the map types (aya has its own trait).
    use super::*;

    macro_rules! aya_pod {
        ($($t:ty),*) => { $(
            // SAFETY: each type derives bytemuck::Pod, which proves it has no
            // padding and every bit pattern is valid.
            unsafe impl aya::Pod for $t {}
        )* };
    }
    aya_pod!(
        AddrKey,
        AddrInfo,
        InstancePolicy,
        SubnetPolicy,
        CidrKeyV4,
        CidrKeyV6,
        PortKey,
        NaclMeta,
        NaclBits,
        CtKey,
        CtEntry,
        Config,
        Event,
        PortCountKey
    );
}
