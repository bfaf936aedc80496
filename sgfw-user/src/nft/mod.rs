//! The nftables backend: the fallback where BPF cannot be loaded.
//!
//! This module owns `table inet sgfw` and `table bridge sgfw` — and only
//! them: it never lists, flushes or deletes any other table. [`render`] turns
//! a [`FlatModel`] into the tables' objects and text; `ruleset` knows the
//! change between two rulesets; [`NftBackend`] applies it in one `nft -f -`
//! transaction (in place, or replacing both tables), tears it down, probes whether `nft` can run here
//! and reads the counters. Every `nft` run and every `/proc/sys` access goes
//! through [`Host`], so the backend is tested without privileges against a
//! fake host. What is enforced is docs/semantics.md; this is how.
//!
//! # Packet path
//!
//! **`table bridge sgfw`** sees each frame at the port it comes from or goes
//! to, which the inet hooks do not (br_netfilter names the bridge there), and
//! the frames br_netfilter never hands to them (VLAN-tagged, non-IP). Base
//! chains `prerouting` (what a port sends), `forward` (what a port is handed
//! by another port) and `output` (what the host hands a port), at priority
//! `filter - 10`, before br_netfilter (0) and so before the inet chains:
//! 1. at every port in the set `ports` — the model's bound interfaces and
//!    every port found on the model's bridges at apply time — a VLAN-tagged
//!    frame (802.1Q, 802.1ad, also a priority tag with VID 0) drops: the
//!    kernel moves a received tag into the skb's metadata, and nft's payload
//!    expression rebuilds it, so `ether type { 8021q, 8021ad }` matches it (a
//!    real priority-tagged frame is dropped in `tests/tests/nft_backend.rs`).
//!    ARP passes; any other non-IP frame drops;
//! 2. at a bound port, what it sends: the source check, before any
//!    passthrough class — the instance's addresses, fe80::/10, and 0.0.0.0 /
//!    :: only in a DHCP-client (UDP 68→67) or NDP (ICMPv6 133-136) packet;
//!    anything else drops, so an instance can never speak as the metadata
//!    service, the DNS address or another instance;
//! 3. at a bound port, what it is handed: the instance's addresses, fe80::/10,
//!    or a group or broadcast address (which `table inet sgfw` then judges).
//!
//! The kernel here (as some others) may lack `meta ibrname` (nft_meta_bridge),
//! so ports are named, not matched by their bridge: a bound interface is
//! checked from its first packet whenever it appears (its name is in the
//! model); an unbound port that joins a bridge after the apply gets the
//! frame checks at the ports it talks to (`forward`: frames handed to a known
//! port), and its own at the next apply. Everything below is keyed by bridge
//! name or address and covers every port from its first packet.
//!
//! **`table inet sgfw`**: three base chains — `forward` (routed between
//! subnets, and bridged inside a subnet through `br_netfilter`), `input` and
//! `output` (an instance talking to the host's own bridge address) — at
//! priority `filter - 10`, policy `accept`, all jump to one chain `decide`,
//! which follows docs/semantics.md. A packet has a *sender's leg* when it
//! comes from a port of one of the model's bridges (`iifname @bridges`) or
//! from an instance address, a *receiver's leg* when it goes to such a port
//! (`oifname @bridges`) or an instance address.
//! 1. Passthrough, either leg (`accept`, no state): NDP (ICMPv6 133-136; 137
//!    is not), the service addresses (metadata, Time Sync, Amazon DNS, IPv4
//!    and IPv6: [`SERVICES`]) as source or destination, and (instance, its
//!    subnet's DNS address) pairs in either direction. ARP never reaches inet
//!    hooks.
//! 2. Not carried: ICMPv6 redirects to or from the model's bridges drop.
//! 3. DHCP (IPv4) in its client shape, with a peer that is no instance (the
//!    VPC's DHCP server never is one), is passthrough for one leg only: UDP
//!    68→67 to an address of no instance `goto leg_in` (the sender's leg is
//!    passed; only the receiver's checks remain, i.e. not carried for the
//!    copies of a broadcast that other ports would get), 67→68 from an
//!    address of no instance `goto leg_out` (the receiver's leg is passed).
//!    A DHCP datagram between two instances, either way, is judged by both
//!    legs like any other.
//! 4. For each leg still to judge, in order (`decide`: both; `leg_in`,
//!    `leg_out`: one):
//!    - not carried: a destination in `not_carried_v4` (224.0.0.0/4,
//!      255.255.255.255, every subnet's broadcast address) or
//!      `not_carried_v6` (ff00::/8) drops at a leg on the model's bridges —
//!      between instances, and from outside to instances (a DHCP client's
//!      broadcast still reaches the host; a server's broadcast reply reaches
//!      the instances);
//!    - NACLs, stateless, on every packet, before any conntrack shortcut (so
//!      a NACL change cuts established flows): the sender's subnet's outbound
//!      chain and the receiver's subnet's inbound chain, reached through
//!      verdict maps keyed on instance addresses. Each chain `return`s at
//!      once when the peer is an instance of the same subnet, then walks the
//!      entries in rule-number order (allow = `return`, deny = `drop`), then
//!      `drop`s;
//!    - `ct state established,related` and `ct status confirmed`: accept. The
//!      kernel confirms a conntrack entry only when its first packet passed
//!      the whole ruleset, i.e. its SG legs, so a confirmed flow is one sgfw
//!      allowed: removing an SG rule keeps it, as in AWS. (`ct status
//!      confirmed` also covers a flow's later packets in the original
//!      direction before any reply, which the kernel calls `new`.)
//!    - SG egress of the sender, then SG ingress of the receiver, by
//!      `goto`s so that one instance's allow never skips the other's leg
//!      (an `accept` would): a verdict map keyed on the sender's address
//!      goes to the chain of its group list, `sg_out_l<hash>`, shared by
//!      every instance with that list, which jumps to the chain
//!      `grp_out_<group>` of each of its groups, then counts the drop for
//!      the sender's address and drops; a group's rule that matches goes on
//!      (`goto sg_out_pass`: the sender's allow counter, then `sg_ingress`),
//!      so a group chain never `return`s an allow and never `accept`s.
//!      `sg_ingress` does the same for the receiver (`sg_in_l<hash>`,
//!      `grp_in_<group>`, `sg_in_pass`), then `sg_done`. A leg whose
//!      address is no instance's skips its map. A group's rules are written
//!      once, whatever the number of its instances, and an instance owns no
//!      chain and no named object, only set and map elements: the
//!      1,000-instance benchmark model is 2.1 MiB of ruleset, where one
//!      chain per instance held about 1.2 M rules and did not load;
//!    - a new flow allowed by every stage gets the SEMANTICS timeouts.
//!
//! Traffic between two addresses that are not instances, and not broadcast or
//! multicast on the model's bridges, matches nothing and leaves through the
//! `accept` policy: it is not sgfw's to judge, and other tables still see it.
//! A frame the host itself injects through a packet socket on a bridge
//! skips the inet hooks (it gets only the bridge table's checks).
//!
//! # Fragments
//!
//! The inet chains judge whole datagrams. The `ct` expressions of `table
//! inet sgfw` make the kernel load and enable `nf_defrag_ipv4` /
//! `nf_defrag_ipv6` in the host's namespace, which reassemble at priority
//! -400, before any chain; br_netfilter hands bridged IP packets to those
//! same prerouting hooks, so a bridged datagram is reassembled too, judged
//! once, and refragmented by br_netfilter on its way out of the port (to its
//! original fragment size). So the fragments of an allowed datagram are
//! delivered, the fragments of a denied one never are, and a fragment whose
//! first fragment never came (or any incomplete datagram) is never
//! reassembled, is dropped when the reassembly timer expires and never
//! reaches a port. `tests/tests/nft_backend.rs` sends a 4000-byte UDP
//! datagram at MTU 1500 (IPv4 and IPv6) and an orphan fragment; without a
//! `ct` expression in the namespace the orphan would be delivered.
//!
//! `table bridge sgfw` runs before that reassembly and sees fragments one by
//! one; its checks read only the Ethernet and IP headers, which every
//! fragment carries, except the DHCP and NDP shapes of the source check
//! (0.0.0.0 / ::): a non-first fragment has no UDP or ICMPv6 header, so a
//! *fragmented* DHCP or NDP packet from the unspecified address drops (NDP
//! must never be fragmented, RFC 6980; DHCP messages fit one packet).
//!
//! # Where kernel conntrack differs from sgfw's per-instance tracking
//!
//! The kernel keeps one entry per flow, created only when a packet passed
//! *both* legs; sgfw (and the eBPF backend) track each instance's leg on its
//! own. So a flow whose first packet passed A's egress but was dropped at
//! B's ingress is tracked for A in sgfw, and not at all here: if B then
//! opens the reverse flow, it needs B's egress rules **and A's ingress
//! rules** here, where sgfw would let it in on A's tracking. Likewise an
//! ICMP error is `related` here when it quotes any tracked flow, not only
//! one tracked for the instance that receives it. Flows the kernel tracked
//! before sgfw was applied count as tracked.
//!
//! # Timeouts
//!
//! Set per flow through `ct timeout` objects (assigned to the flow's first
//! packet in chain `ct_new`): TCP established (the model's value, default
//! 432000 s), SYN sent/received 60 s, FIN/RST states (fin_wait, close_wait,
//! last_ack, time_wait, close) 10 s; UDP unreplied 30 s, replied 180 s.
//! Left at the kernel's values, because nft ≤ 1.0.6 has no timeout policy
//! for them: ICMP/ICMPv6 (`nf_conntrack_icmp_timeout`,
//! `nf_conntrack_icmpv6_timeout`, default 30 s = SEMANTICS) and other
//! protocols (`nf_conntrack_generic_timeout`, default 600 s = SEMANTICS; but
//! GRE, SCTP and DCCP have trackers and timeouts of their own); TCP's
//! `retrans`/`unacknowledged` states (300 s) also stay at the kernel's
//! values. The kernel's UDP "replied" state begins with the first reply,
//! where sgfw calls a flow a stream. An apply changes the tables in place
//! when they are the ones the last apply left ([`NftBackend::apply`]), so
//! the timeout objects and the counters stay; when the tables are replaced
//! (the first apply, new timeouts, tables changed behind sgfw's back),
//! flows already tracked fall back to the kernel's default timeouts and the
//! counters restart at zero.
//!
//! # Object names
//!
//! Chains, sets and counters are named by the id of their subnet or group
//! (`nacl_out_subnet-1`, `grp_in_sg-web`), or a hash of it when the id is
//! not plain (`render::key_of`), or by a hash of a group list
//! (`sg_in_l<hash>`), never by a position in the model: adding an instance
//! adds set and map elements (and a list chain, for a new list), nothing
//! else, and so an in-place update is as small as the change. Instances own
//! no named objects on purpose: nft reads every chain and named object of
//! the table into its cache before it adds a rule, so each one costs every
//! later update (2,000 instance chains and 4,000 counters made adding one
//! rule cost 45 ms at 1,000 instances; without them, 7 ms). Edits made to sgfw's tables by hand, in
//! place, are not noticed (the generation guard notices tables deleted or
//! replaced); `sgfw teardown` and a new apply write everything again.
//!
//! # Host requirements
//!
//! Bridged traffic reaches the inet `forward` hook only through
//! `br_netfilter` with `net.bridge.bridge-nf-call-iptables=1` (IPv4) and
//! `net.bridge.bridge-nf-call-ip6tables=1` (IPv6). [`NftBackend::apply`]
//! checks the module, sets the two sysctls to 1 when they are not (host-wide:
//! every bridge's traffic then passes the IP hooks), and fails with the fix
//! when it cannot. nf_tables for the bridge family (`NF_TABLES_BRIDGE`) is
//! needed for `table bridge sgfw`; `nf_conntrack_bridge` and
//! `nft_meta_bridge` are not used.
//!
//! # Flows
//!
//! Every drop is counted in a named counter per stage and subnet/instance,
//! or per reason (`drop_vlan`, `drop_non_ip`, `drop_source_check`,
//! `drop_not_for_instance`, `drop_not_carried`) ([`NftBackend::counters`])
//! and logged to NFLOG group [`NFLOG_GROUP`] with the prefix `sgfw drop
//! <stage> <s|i><name>|- <r<rule>|*> `. sgfw has no NFLOG
//! reader yet; see [`NftBackend::flows_supported`].

mod render;
mod ruleset;

pub use render::{
    BRIDGE_TABLE, HOOK_PRIORITY, NFLOG_GROUP, RenderError, RenderMemo, SERVICES, TABLE, ifname_ok,
    render, render_with_ports, ruleset, ruleset_with, sanitize,
};
pub use ruleset::Ruleset;
use ruleset::Snapshot;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::flat::FlatModel;
use crate::policy::Stage;
use crate::sys::{Host, SysError};
use render::{CHAIN_ORDER, NftStage};

/// `/proc/sys` key that exists only when `br_netfilter` is loaded.
pub const SYSCTL_CALL_IPTABLES: &str = "net/bridge/bridge-nf-call-iptables";
/// `/proc/sys` key for bridged IPv6 traffic through the ip6 hooks.
pub const SYSCTL_CALL_IP6TABLES: &str = "net/bridge/bridge-nf-call-ip6tables";

/// Errors of the nftables backend.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The model cannot be rendered; nothing was changed.
    #[error("the model cannot be rendered as an nftables ruleset")]
    Render(#[from] RenderError),
    /// An `nft` run failed; the previous ruleset is still in force.
    #[error("nft failed while {what}")]
    Nft {
        /// What was being done.
        what: &'static str,
        /// The cause (nft's stderr, or why it could not start).
        #[source]
        source: SysError,
    },
    /// `br_netfilter` is not loaded, so bridged traffic would not be filtered.
    #[error(
        "br_netfilter is not loaded (/proc/sys/{SYSCTL_CALL_IPTABLES} does not exist), so traffic bridged inside a subnet would bypass nftables; load it with `modprobe br_netfilter` (and list it in /etc/modules-load.d/ to keep it)"
    )]
    BrNetfilterMissing,
    /// A bridge sysctl is not 1 and could not be set.
    #[error(
        "/proc/sys/{key} is {value:?}, not 1, and setting it failed, so bridged traffic would bypass nftables; run `sysctl -w {dotted}=1` as root"
    )]
    Sysctl {
        /// The key under /proc/sys.
        key: &'static str,
        /// The same with dots, as `sysctl` spells it.
        dotted: String,
        /// Its current value.
        value: String,
        /// Why it could not be read or written.
        #[source]
        source: SysError,
    },
    /// The ports of the model's bridges could not be listed.
    #[error("cannot list the ports of bridge {bridge}")]
    Ports {
        /// The bridge.
        bridge: String,
        /// The cause.
        #[source]
        source: SysError,
    },
    /// `nft -j` printed something that is not the expected JSON.
    #[error("nft printed unexpected JSON while {what}")]
    Json {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// What an apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ApplyReport {
    /// Instances now enforced.
    pub instances: usize,
    /// Subnets now enforced.
    pub subnets: usize,
    /// Size of what this apply sent to `nft`, bytes: the whole ruleset
    /// when it replaced the tables, the change when it updated them.
    pub ruleset_bytes: usize,
    /// Whether it updated the applied tables in place (one transaction of
    /// the objects that changed) rather than replacing them.
    pub incremental: bool,
    /// Objects added, changed or deleted in place (0 when replaced).
    pub objects_changed: usize,
    /// Sysctls this apply had to set to 1.
    pub sysctls_set: Vec<String>,
    /// Things the operator should know (timeouts left at kernel values).
    pub notes: Vec<String>,
}

/// What a named counter counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum CounterKind {
    /// Packets let through as passthrough at both legs (NDP, the service
    /// addresses, the subnet's DNS; DHCP passes one leg uncounted).
    Passthrough,
    /// Packets of tracked flows that skipped the SG rules.
    Tracked,
    /// Packets dropped before any stage, for a reason of docs/semantics.md
    /// (`vlan`, `non-ip`, `source-check`, `not-for-instance`, `not-carried`).
    Dropped {
        /// The reason, as the flow logs name it.
        reason: String,
    },
    /// One stage of one subnet (NACL stages) or instance (SG stages).
    Stage {
        /// The stage.
        stage: Stage,
        /// The object name of the subnet or instance (its id, when the id
        /// is plain; see [`CounterValue::label`] for the id).
        key: String,
        /// Allowed (`true`) or dropped.
        allowed: bool,
    },
}

/// One named counter's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CounterValue {
    /// The counter's name in `table inet sgfw`.
    pub name: String,
    /// What it counts.
    pub kind: CounterKind,
    /// The subnet or instance id (sanitised) it was rendered with.
    pub label: String,
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

fn parse_counter_name(name: &str) -> Option<CounterKind> {
    match name {
        "passthrough" => return Some(CounterKind::Passthrough),
        "tracked" => return Some(CounterKind::Tracked),
        _ => {}
    }
    if let Some(reason) = name.strip_prefix("drop_") {
        return Some(CounterKind::Dropped {
            reason: reason.replace('_', "-"),
        });
    }
    let (rest, allowed) = if let Some(r) = name.strip_suffix("_allow") {
        (r, true)
    } else {
        (name.strip_suffix("_drop")?, false)
    };
    CHAIN_ORDER.into_iter().find_map(|stage| {
        let key = rest.strip_prefix(stage.prefix())?.strip_prefix('_')?;
        (!key.is_empty()).then(|| CounterKind::Stage {
            stage,
            key: key.to_string(),
            allowed,
        })
    })
}

/// Wraps a rendered table in the one transaction that replaces sgfw's table
/// atomically: `add` (so `delete` cannot fail on a first apply), `delete`,
/// then the whole new table. `nft -f` commits all of it or nothing.
pub fn transaction(ruleset: &str) -> String {
    format!(
        "add table {TABLE}\ndelete table {TABLE}\nadd table {BRIDGE_TABLE}\ndelete table {BRIDGE_TABLE}\n{ruleset}"
    )
}

/// A miniature of every kernel feature the ruleset uses (inet base chain,
/// conntrack state/status, ct timeout object, verdict map with jump,
/// concatenated set, named counter, NFLOG; the bridge family with an
/// interface-name set and verdict map, `ether type` and NFLOG), checked with
/// `nft -c`: nothing is created, but the kernel validates it and loads what
/// it needs.
const PROBE_RULESET: &str = "table inet sgfw {
\tct timeout probe_tcp { protocol tcp; l3proto ip; policy = { established: 432000 }; }
\tcounter probe_counter { comment \"probe\"; }
\tset probe_pairs { type ipv4_addr . ipv4_addr; elements = { 192.0.2.1 . 192.0.2.2 } }
\tmap probe_vmap { type ipv4_addr : verdict; elements = { 192.0.2.1 : jump probe_target } }
\tchain probe_target {
\t\tcounter name \"probe_counter\" log prefix \"sgfw probe \" group 3210 drop
\t}
\tchain probe_base {
\t\ttype filter hook forward priority filter - 10; policy accept;
\t\tip saddr . ip daddr @probe_pairs accept
\t\tct state established,related accept
\t\tct status confirmed accept
\t\tip saddr vmap @probe_vmap
\t\tmeta l4proto tcp ct timeout set \"probe_tcp\"
\t}
}
table bridge sgfw {
\tset probe_ports { type ifname; elements = { \"sgfw-probe\" } }
\tmap probe_bound { type ifname : verdict; elements = { \"sgfw-probe\" : jump probe_port } }
\tchain probe_port {
\t\tip saddr 192.0.2.1 return
\t\tether type != { ip, ip6, arp } counter log prefix \"sgfw probe \" group 3210 drop
\t}
\tchain probe_base {
\t\ttype filter hook prerouting priority filter - 10; policy accept;
\t\tether type { 8021q, 8021ad } drop
\t\tiifname @probe_ports iifname vmap @probe_bound
\t}
}
";

/// State file of the last applied ruleset ([`Snapshot`]).
const SAVED_RULESET: &str = "nft-ruleset.json";

/// A fresh generation token: random enough that two hosts' or two state
/// directories' tokens never meet (the std hasher's per-process random keys,
/// the time and the process id).
fn new_generation() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(now);
    h.write_u32(std::process::id());
    h.finish()
}

/// The commands that add (`add`) or check (`flush`: fails when it is
/// absent, and so fails the whole transaction) the generation guard chain
/// of both tables: an empty chain no rule jumps to. Both are cheap for nft
/// (neither needs the tables' contents in nft's cache, where `delete`
/// reads all of it: about 30 ms at 1,000 instances).
fn guard(verb: &str, generation: u64) -> String {
    let mut s = String::new();
    for table in [TABLE, BRIDGE_TABLE] {
        s.push_str(&format!(
            "{verb} chain {table} generation_{generation:016x}\n"
        ));
    }
    s
}

/// State file of the sysctl values an apply changed, `key=value` per line,
/// so teardown can restore them.
const SAVED_SYSCTLS: &str = "nft-sysctls";

fn remember_sysctl(host: &dyn Host, key: &str, value: &str) {
    let mut saved = host.load_state(SAVED_SYSCTLS).unwrap_or_default();
    if saved
        .lines()
        .any(|l| l.split_once('=').is_some_and(|(k, _)| k == key))
    {
        return;
    }
    saved.push_str(&format!("{key}={value}\n"));
    host.save_state(SAVED_SYSCTLS, &saved);
}

/// Whether the nftables backend can run here: `nft` is installed, runs with
/// the needed rights and the kernel has every feature the ruleset uses
/// (checked with `nft -c`, which changes nothing), and `br_netfilter` is
/// loaded. The error says what is missing and how to fix it.
pub fn probe_nftables(host: &dyn Host) -> Result<(), String> {
    if let Err(e) = host.nft(&["-c", "-f", "-"], Some(PROBE_RULESET)) {
        return Err(match e {
            SysError::Spawn { .. } => {
                "the `nft` program cannot be run: install nftables (Debian: `apt-get install nftables`)"
                    .to_string()
            }
            other => format!(
                "`nft -c` of a test table failed (needs root or CAP_NET_ADMIN and nf_tables with conntrack in the kernel): {}",
                error_chain(&other)
            ),
        });
    }
    match host.read_sysctl(SYSCTL_CALL_IPTABLES) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(NftError::BrNetfilterMissing.to_string()),
        Err(e) => Err(format!(
            "cannot check for br_netfilter: {}",
            error_chain(&e)
        )),
    }
}

/// An error and its sources, `: `-joined.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The nftables backend on one host.
#[derive(Clone, Copy)]
pub struct NftBackend<'h> {
    host: &'h dyn Host,
    memo: Option<&'h std::sync::Mutex<RenderMemo>>,
}

impl std::fmt::Debug for NftBackend<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NftBackend").finish_non_exhaustive()
    }
}

impl<'h> NftBackend<'h> {
    /// The backend on `host` (normally [`crate::sys::RealHost`]).
    pub fn new(host: &'h dyn Host) -> NftBackend<'h> {
        NftBackend { host, memo: None }
    }

    /// The backend rendering with `memo`: what the last render of this
    /// process left there (group chains whose inputs are unchanged) is not
    /// rendered again ([`RenderMemo`]).
    pub fn with_memo(self, memo: &'h std::sync::Mutex<RenderMemo>) -> NftBackend<'h> {
        NftBackend {
            memo: Some(memo),
            ..self
        }
    }

    /// [`probe_nftables`] on this backend's host.
    ///
    /// # Errors
    ///
    /// What is missing and how to fix it.
    pub fn probe(&self) -> Result<(), String> {
        probe_nftables(self.host)
    }

    /// Checks that bridged traffic passes the IP hooks: `br_netfilter`
    /// loaded, both `bridge-nf-call-ip*tables` sysctls 1 (set when not).
    /// Returns the sysctls it set.
    ///
    /// # Errors
    ///
    /// [`NftError::BrNetfilterMissing`] or [`NftError::Sysctl`], naming the fix.
    pub fn ensure_bridge_hooks(&self) -> Result<Vec<String>, NftError> {
        let mut set = Vec::new();
        for key in [SYSCTL_CALL_IPTABLES, SYSCTL_CALL_IP6TABLES] {
            let dotted = key.replace('/', ".");
            let value = match self.host.read_sysctl(key) {
                Ok(Some(v)) => v,
                Ok(None) => return Err(NftError::BrNetfilterMissing),
                Err(source) => {
                    return Err(NftError::Sysctl {
                        key,
                        dotted,
                        value: "unreadable".into(),
                        source,
                    });
                }
            };
            if value == "1" {
                continue;
            }
            if let Err(source) = self.host.write_sysctl(key, "1") {
                return Err(NftError::Sysctl {
                    key,
                    dotted,
                    value,
                    source,
                });
            }
            // Remember the host's own value so teardown can give it back.
            remember_sysctl(self.host, key, &value);
            set.push(dotted);
        }
        Ok(set)
    }

    /// Enforces `model`: renders it, makes sure bridged traffic reaches the
    /// hooks, then changes sgfw's tables in one `nft -f -` transaction: in
    /// place, when the tables are the ones this host's last apply left
    /// (only the objects that differ are added, refilled, changed element by
    /// element or deleted), else by replacing both tables whole. Any error
    /// leaves the previous ruleset (or none) in force.
    ///
    /// # The generation guard
    ///
    /// What was applied is remembered in the state file `nft-ruleset.json`
    /// with a random generation token, drawn anew each time the tables are
    /// replaced, and each table holds an empty chain `generation_<token>`.
    /// An in-place transaction begins by flushing the two chains of the
    /// remembered token: when the tables are not the ones the state
    /// describes (deleted, replaced by hand or by an sgfw with another
    /// state directory), a flush fails, nft commits nothing, and the apply
    /// replaces the tables instead. The state file is removed before any transaction and
    /// written after it succeeded, so a crash in between leaves no state and
    /// the next apply replaces the tables.
    ///
    /// # Errors
    ///
    /// [`NftError::Render`] (nothing touched), the bridge-hook errors of
    /// [`NftBackend::ensure_bridge_hooks`], or [`NftError::Nft`] with nft's
    /// message.
    pub fn apply(&self, model: &FlatModel) -> Result<ApplyReport, NftError> {
        let phase = std::cell::Cell::new(std::time::Instant::now());
        let lap = |what: &str| {
            tracing::debug!("nft apply: {what} {} us", phase.get().elapsed().as_micros());
            phase.set(std::time::Instant::now());
        };
        let ports = self.bridge_ports(model)?;
        lap("bridge ports");
        let rs = match self.memo {
            Some(m) => {
                let mut memo = m.lock().unwrap_or_else(|p| {
                    // A render that panicked may have left it half-made.
                    let mut g = p.into_inner();
                    *g = RenderMemo::default();
                    g
                });
                let rs = ruleset_with(model, &ports, &mut memo);
                tracing::debug!("nft render: {} group chains from the memo", memo.hits());
                rs?
            }
            None => ruleset(model, &ports)?,
        };
        lap("render");
        let sysctls_set = self.ensure_bridge_hooks()?;
        lap("bridge hooks");
        let remembered = self
            .host
            .load_state(SAVED_RULESET)
            .and_then(|text| serde_json::from_str::<Snapshot>(&text).ok());
        self.host.remove_state(SAVED_RULESET);
        lap("snapshot loaded");
        let mut done = None;
        if let Some(prev) = remembered
            && let Some(change) = prev.change_to(&rs)
        {
            let text = format!("{}{}", guard("flush", prev.generation), change.text);
            lap("change");
            if let Ok(p) = std::env::var("SGFW_DUMP_NFT") {
                let _ = std::fs::write(p, &text);
            }
            match self.host.nft(&["-f", "-"], Some(&text)) {
                Ok(_) => done = Some((text.len(), true, change.objects, prev.generation)),
                Err(e) => tracing::info!(
                    "nft: updating sgfw's tables in place failed, replacing them: {}",
                    error_chain(&e)
                ),
            }
        }
        let (ruleset_bytes, incremental, objects_changed, generation) = match done {
            Some(d) => d,
            None => {
                let next = new_generation();
                let text = format!("{}{}", transaction(&rs.text()), guard("add", next));
                self.host
                    .nft(&["-f", "-"], Some(&text))
                    .map_err(|source| NftError::Nft {
                        what: "applying the ruleset",
                        source,
                    })?;
                (text.len(), false, 0, next)
            }
        };
        lap("nft");
        if let Ok(json) = serde_json::to_string(&rs.snapshot(generation)) {
            self.host.save_state(SAVED_RULESET, &json);
        }
        lap("snapshot saved");
        let mut notes = Vec::new();
        let t = model.timeouts;
        if t.icmp != 30 {
            notes.push(format!(
                "ICMP timeout {} s is not enforced: the nftables backend leaves ICMP at the kernel's nf_conntrack_icmp(v6)_timeout",
                t.icmp
            ));
        }
        if t.other != 600 {
            notes.push(format!(
                "timeout for other protocols {} s is not enforced: the nftables backend leaves them at the kernel's nf_conntrack_generic_timeout",
                t.other
            ));
        }
        Ok(ApplyReport {
            instances: model.instances.len(),
            subnets: model.subnets.len(),
            ruleset_bytes,
            incremental,
            objects_changed,
            sysctls_set,
            notes,
        })
    }

    /// The names of the ports now on the model's bridges.
    ///
    /// # Errors
    ///
    /// [`NftError::Ports`] when a bridge's ports cannot be listed.
    pub fn bridge_ports(&self, model: &FlatModel) -> Result<Vec<String>, NftError> {
        let mut names = Vec::new();
        for s in &model.subnets {
            let ports = self
                .host
                .bridge_ports(&s.bridge)
                .map_err(|source| NftError::Ports {
                    bridge: s.bridge.clone(),
                    source,
                })?;
            names.extend(ports.into_iter().map(|p| p.name));
        }
        Ok(names)
    }

    /// Removes `table inet sgfw` (and nothing else). Succeeds when it is absent.
    ///
    /// # Errors
    ///
    /// [`NftError::Nft`] when nft cannot run or the kernel refuses.
    pub fn teardown(&self) -> Result<(), NftError> {
        self.host
            .nft(
                &["-f", "-"],
                Some(&format!(
                    "add table {TABLE}\ndelete table {TABLE}\nadd table {BRIDGE_TABLE}\ndelete table {BRIDGE_TABLE}\n"
                )),
            )
            .map_err(|source| NftError::Nft {
                what: "deleting table inet sgfw",
                source,
            })?;
        self.host.remove_state(SAVED_RULESET);
        // The host leaves as it came: sysctls an apply switched on go back.
        if let Some(saved) = self.host.load_state(SAVED_SYSCTLS) {
            for line in saved.lines() {
                if let Some((key, value)) = line.split_once('=') {
                    let _ = self.host.write_sysctl(key, value);
                }
            }
            self.host.remove_state(SAVED_SYSCTLS);
        }
        Ok(())
    }

    /// Whether `table inet sgfw` exists.
    ///
    /// # Errors
    ///
    /// [`NftError::Nft`] when nft fails for another reason than a missing table.
    pub fn is_applied(&self) -> Result<bool, NftError> {
        match self.host.nft(&["list", "table", "inet", "sgfw"], None) {
            Ok(_) => Ok(true),
            Err(SysError::Command { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                Ok(false)
            }
            Err(source) => Err(NftError::Nft {
                what: "listing table inet sgfw",
                source,
            }),
        }
    }

    /// Every counter of `table inet sgfw` and `table bridge sgfw`, in name
    /// order: passthrough, tracked, the drops before any stage, and
    /// allow/drop per NACL stage and subnet (named counters) and per SG
    /// stage and instance (the element counters of the `sg_<in|out>_<allow|
    /// drop>_<v4|v6>` sets, both families summed, named
    /// `sg_<in|out>_<instance>_<allow|drop>`) (for `sgfw status`).
    ///
    /// # Errors
    ///
    /// [`NftError::Nft`] (e.g. not applied) or [`NftError::Json`].
    pub fn counters(&self) -> Result<Vec<CounterValue>, NftError> {
        let mut all = Vec::new();
        for family in ["inet", "bridge"] {
            let text = self
                .host
                .nft(&["-j", "list", "counters", "table", family, "sgfw"], None)
                .map_err(|source| NftError::Nft {
                    what: "listing counters",
                    source,
                })?;
            all.extend(parse_counters(&text)?);
        }
        let mut per_instance: BTreeMap<(String, String), CounterValue> = BTreeMap::new();
        for stage in [Stage::SgEgress, Stage::SgIngress] {
            for allowed in [true, false] {
                for f in crate::policy::Family::ALL {
                    let set = render::sg_counter_set(stage, allowed, f);
                    let text = self
                        .host
                        .nft(&["-j", "list", "set", "inet", "sgfw", &set], None)
                        .map_err(|source| NftError::Nft {
                            what: "listing counters",
                            source,
                        })?;
                    for (label, packets, bytes) in parse_element_counters(&text)? {
                        let name = format!(
                            "{}_{label}_{}",
                            stage.prefix(),
                            if allowed { "allow" } else { "drop" }
                        );
                        let c = per_instance
                            .entry((name.clone(), label.clone()))
                            .or_insert_with(|| CounterValue {
                                name,
                                kind: CounterKind::Stage {
                                    stage,
                                    key: label.clone(),
                                    allowed,
                                },
                                label,
                                packets: 0,
                                bytes: 0,
                            });
                        c.packets += packets;
                        c.bytes += bytes;
                    }
                }
            }
        }
        all.extend(per_instance.into_values());
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    /// Whether `sgfw flows` can stream this backend's drops.
    ///
    /// # Errors
    ///
    /// Always, for now, with the reason and what to use instead.
    pub fn flows_supported() -> Result<(), &'static str> {
        Err(
            "the nftables backend logs each drop to NFLOG group 3210 (prefix `sgfw drop <stage> <s|i><name> <rule> `) but sgfw has no NFLOG reader yet: see drop counts with `sgfw status`, or watch the drops with `tcpdump -i nflog:3210`",
        )
    }
}

#[derive(serde::Deserialize)]
struct ListOutput {
    nftables: Vec<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct JsonCounter {
    name: String,
    table: String,
    #[serde(default)]
    comment: String,
    packets: u64,
    bytes: u64,
}

#[derive(serde::Deserialize, Default)]
struct JsonPackets {
    packets: u64,
    bytes: u64,
}

fn counters_json(source: serde_json::Error) -> NftError {
    NftError::Json {
        what: "listing counters",
        source,
    }
}

/// `nft -j list ...` output, for the counters.
fn list_output(text: &str) -> Result<ListOutput, NftError> {
    serde_json::from_str(text).map_err(counters_json)
}

/// The (comment, packets, bytes) of each element of a set with counters.
fn parse_element_counters(text: &str) -> Result<Vec<(String, u64, u64)>, NftError> {
    #[derive(serde::Deserialize)]
    struct Elem {
        #[serde(default)]
        comment: String,
        #[serde(default)]
        counter: JsonPackets,
    }
    let list = list_output(text)?;
    let mut out = Vec::new();
    for item in list.nftables {
        let Some(elems) = item.get("set").and_then(|s| s.get("elem")) else {
            continue;
        };
        let Some(elems) = elems.as_array() else {
            continue;
        };
        for e in elems {
            // An element with a counter or comment is `{"elem": {...}}`.
            let Some(inner) = e.get("elem") else {
                continue;
            };
            let e: Elem = serde_json::from_value(inner.clone()).map_err(counters_json)?;
            out.push((sanitize(&e.comment), e.counter.packets, e.counter.bytes));
        }
    }
    Ok(out)
}

fn parse_counters(text: &str) -> Result<Vec<CounterValue>, NftError> {
    let list = list_output(text)?;
    let mut out = Vec::new();
    for item in list.nftables {
        let Some(c) = item.get("counter") else {
            continue;
        };
        let c: JsonCounter = serde_json::from_value(c.clone()).map_err(counters_json)?;
        if c.table != "sgfw" {
            continue;
        }
        let Some(kind) = parse_counter_name(&c.name) else {
            continue;
        };
        out.push(CounterValue {
            name: c.name,
            kind,
            label: sanitize(&c.comment),
            packets: c.packets,
            bytes: c.bytes,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests;
