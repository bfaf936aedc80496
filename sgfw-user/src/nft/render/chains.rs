//! The chains of the ruleset: the bridge table's port checks, the inet
//! table's entry chain and legs, the per-subnet NACL chains and the
//! per-instance SG chains, and the matchers they are written with. It must
//! never widen a matcher: one it cannot write exactly is an error.

use super::*;

/// Merges inclusive port ranges (overlapping or adjacent), sorted.
pub(super) fn merge_ports(mut ranges: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    ranges.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::new();
    for (from, to) in ranges {
        match out.last_mut() {
            Some(last) if u32::from(from) <= u32::from(last.1) + 1 => last.1 = last.1.max(to),
            _ => out.push((from, to)),
        }
    }
    out
}

pub(super) fn port_text((from, to): (u16, u16)) -> String {
    if from == to {
        from.to_string()
    } else {
        format!("{from}-{to}")
    }
}

pub(super) fn l4_name(proto: u8) -> Option<&'static str> {
    match proto {
        PROTO_TCP => Some("tcp"),
        PROTO_UDP => Some("udp"),
        _ => None,
    }
}

/// The protocol part of a rule for a packet of `family`. `Ok(None)`: the
/// matcher can never match a packet of this family (an ICMP matcher of the
/// other family), so the rule is left out — leaving out a rule that cannot
/// match changes nothing. `Ok(Some(""))`: every protocol.
pub(super) fn proto_match(family: Family, m: &Match) -> Result<Option<String>, RenderError> {
    Ok(Some(match *m {
        Match::All => String::new(),
        Match::Proto(p) => format!("meta l4proto {p}"),
        Match::Ports { proto, from, to } => {
            let name = l4_name(proto).ok_or(RenderError::Matcher { matcher: *m })?;
            format!("{name} dport {}", port_text((from, to)))
        }
        Match::Icmp {
            proto,
            icmp_type,
            code,
        } => {
            let word = match (proto, family) {
                (PROTO_ICMP, Family::V4) => "icmp",
                (PROTO_ICMPV6, Family::V6) => "icmpv6",
                (PROTO_ICMP | PROTO_ICMPV6, _) => return Ok(None),
                _ => return Err(RenderError::Matcher { matcher: *m }),
            };
            let mut s = format!("meta l4proto {proto}");
            if let Some(t) = icmp_type {
                s.push_str(&format!(" {word} type {t}"));
            }
            if let Some(c) = code {
                s.push_str(&format!(" {word} code {c}"));
            }
            s
        }
    }))
}

pub(super) fn join_nonempty(parts: &[&str]) -> String {
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

pub(super) fn counter_name(kind: Stage, index: usize, allowed: bool) -> String {
    format!(
        "{}_{index}_{}",
        kind.prefix(),
        if allowed { "allow" } else { "drop" }
    )
}

pub(super) fn log_drop(kind: Stage, index: usize, rule: Option<u16>) -> String {
    let rule = rule.map_or_else(|| "*".to_string(), |n| format!("r{n}"));
    format!(
        "log prefix \"sgfw drop {} {}{index} {rule} \" group {NFLOG_GROUP}",
        kind.name(),
        kind.who()
    )
}

/// The verdict-map jumps to the chains of one stage, both families.
pub(super) fn dispatch(out: &mut Out, kind: Stage) {
    for f in Family::ALL {
        out.line(
            2,
            format!(
                "{} {} vmap @{}_{}",
                f.l3(),
                kind.key_side().word(),
                kind.prefix(),
                f.suffix()
            ),
        );
    }
}

/// A drop statement with its named counter and NFLOG line:
/// `counter name "drop_<reason>" log prefix "sgfw drop <reason> <who> * " ... drop`.
pub(super) fn drop_as(reason: &str, who: &str) -> String {
    format!(
        "counter name \"drop_{}\" log prefix \"sgfw drop {reason} {who} * \" group {NFLOG_GROUP} drop",
        reason.replace('-', "_")
    )
}

/// The reasons `table bridge sgfw` drops for, in counter order.
pub(super) const BRIDGE_DROPS: [&str; 4] = ["vlan", "non-ip", "source-check", "not-for-instance"];

/// The reasons `table inet sgfw` drops for besides the NACL and SG stages.
pub(super) const INET_DROPS: [&str; 1] = ["not-carried"];

/// `table bridge sgfw`: the checks that need the port a frame comes from or
/// goes to, which the inet hooks (via br_netfilter) do not see, and the
/// frames br_netfilter never hands to them (VLAN-tagged, non-IP). Hooks:
/// `prerouting` (what a port sends), `forward` and `output` (what a port is
/// handed, from another port or from the host), all at priority
/// `filter - 10`, before br_netfilter (0) and so before the inet chains.
/// At every port of the model's bridges: a VLAN-tagged frame (802.1Q,
/// 802.1ad, also a priority tag with VID 0: nft rebuilds a tag the kernel
/// moved into the skb's metadata, so `ether type` sees it) drops, ARP passes,
/// any other non-IP frame drops. At a bound port, in the order of
/// docs/semantics.md — before any passthrough class: the source check of
/// what it sends (the instance's addresses, fe80::/10, and 0.0.0.0 / :: only
/// in a DHCP-client or NDP packet) and the destination check of what it is
/// handed (the instance's addresses, fe80::/10, or a group or broadcast
/// address, which `table inet sgfw` then judges as not carried).
pub(super) fn render_bridge_table(
    out: &mut Out,
    model: &FlatModel,
    ports: &[String],
) -> Result<(), RenderError> {
    let mut bound = Vec::new();
    for (i, inst) in model.instances.iter().enumerate() {
        if let Some(name) = &inst.interface {
            if !ifname_ok(name) {
                return Err(RenderError::Interface {
                    instance: inst.id.clone(),
                    name: name.clone(),
                });
            }
            bound.push((i, name.as_str(), inst));
        }
    }
    let mut all_ports: BTreeSet<&str> = bound.iter().map(|(_, n, _)| *n).collect();
    for p in ports {
        if !ifname_ok(p) {
            return Err(RenderError::Port { name: p.clone() });
        }
        all_ports.insert(p);
    }
    out.line(0, format!("table {BRIDGE_TABLE} {{"));
    for reason in BRIDGE_DROPS {
        out.line(
            1,
            format!(
                "counter drop_{} {{ comment \"{reason}\"; }}",
                reason.replace('-', "_")
            ),
        );
    }
    out.blank();
    let quoted: Vec<String> = all_ports.iter().map(|n| format!("\"{n}\"")).collect();
    declare(out, "set", "ports", "ifname", &quoted);
    for (map, chain) in [
        ("bound_from", "source_check"),
        ("bound_to", "receive_check"),
    ] {
        let elems: Vec<String> = bound
            .iter()
            .map(|(i, name, _)| format!("\"{name}\" : jump {chain}_{i}"))
            .collect();
        declare(out, "map", map, "ifname : verdict", &elems);
    }
    for (hook, side, chain) in [
        ("prerouting", "iifname", "from_port"),
        ("forward", "oifname", "to_port"),
        ("output", "oifname", "to_port"),
    ] {
        out.blank();
        out.line(1, format!("chain {hook} {{"));
        out.line(
            2,
            format!("type filter hook {hook} priority {HOOK_PRIORITY}; policy accept;"),
        );
        out.line(2, format!("{side} @ports jump {chain}"));
        out.line(1, "}");
    }
    for (chain, side, map, what) in [
        ("from_port", "iifname", "bound_from", "What a port sends"),
        ("to_port", "oifname", "bound_to", "What a port is handed"),
    ] {
        out.blank();
        out.line(1, format!("chain {chain} {{"));
        out.line(
            2,
            format!("# {what}: VLAN-tagged frames drop, ARP and IP pass, other frames drop."),
        );
        out.line(
            2,
            format!("ether type {{ 8021q, 8021ad }} {}", drop_as("vlan", "-")),
        );
        out.line(
            2,
            format!(
                "ether type != {{ ip, ip6, arp }} {}",
                drop_as("non-ip", "-")
            ),
        );
        out.line(2, format!("{side} vmap @{map}"));
        out.line(1, "}");
    }
    let broadcasts: Vec<IpNet> = model
        .subnets
        .iter()
        .map(|s| IpNet::V4(Ipv4Net::from(s.cidr_v4.broadcast())))
        .collect();
    for (i, name, inst) in &bound {
        let own = |f: Family| -> Vec<String> {
            inst.addrs
                .iter()
                .filter(|a| Family::of_addr(a) == f)
                .map(ToString::to_string)
                .collect()
        };
        out.blank();
        out.line(1, format!("chain source_check_{i} {{"));
        out.line(
            2,
            format!("# What {name} sends: only from the instance's addresses (before any passthrough class)."),
        );
        out.line(2, "ether type arp return");
        let v4 = own(Family::V4);
        if !v4.is_empty() {
            out.line(2, format!("ip saddr {} return", set_text(&v4)));
        }
        let mut v6 = own(Family::V6);
        v6.push(LINK_LOCAL_V6.to_string());
        out.line(2, format!("ip6 saddr {} return", set_text(&v6)));
        out.line(
            2,
            format!(
                "ip saddr {} udp sport {DHCP_CLIENT_PORT} udp dport {DHCP_SERVER_PORT} return",
                Ipv4Addr::UNSPECIFIED
            ),
        );
        out.line(
            2,
            format!(
                "ip6 saddr {} icmpv6 type {}-{} return",
                Ipv6Addr::UNSPECIFIED,
                NDP_TYPES.0,
                NDP_TYPES.1
            ),
        );
        out.line(2, drop_as("source-check", &format!("i{i}")));
        out.line(1, "}");
        out.blank();
        out.line(1, format!("chain receive_check_{i} {{"));
        out.line(
            2,
            format!("# What {name} is handed: only to the instance's addresses, or to a group or broadcast address."),
        );
        out.line(2, "ether type arp return");
        let mut v4: Vec<IpNet> = inst
            .addrs
            .iter()
            .filter(|a| a.is_ipv4())
            .map(|a| IpNet::from(*a))
            .collect();
        v4.extend([IpNet::V4(GROUP_V4), IpNet::from(IpAddr::V4(BROADCAST_V4))]);
        v4.extend(broadcasts.iter().copied());
        let v4: Vec<String> = aggregate(Family::V4, &v4).iter().map(net_text).collect();
        out.line(2, format!("ip daddr {} return", set_text(&v4)));
        let mut v6: Vec<IpNet> = inst
            .addrs
            .iter()
            .filter(|a| a.is_ipv6())
            .map(|a| IpNet::from(*a))
            .collect();
        v6.extend([IpNet::V6(LINK_LOCAL_V6), IpNet::V6(GROUP_V6)]);
        let v6: Vec<String> = aggregate(Family::V6, &v6).iter().map(net_text).collect();
        out.line(2, format!("ip6 daddr {} return", set_text(&v6)));
        out.line(2, drop_as("not-for-instance", &format!("i{i}")));
        out.line(1, "}");
    }
    out.line(0, "}");
    Ok(())
}

/// A leg of a packet: the sender's (what an instance sends: SG egress, the
/// outbound NACL) or the receiver's (what is delivered to it: the inbound
/// NACL, SG ingress).
/// ([`Direction`] is the one type; this is what the inet hooks need of it.)
trait NftLeg {
    /// The inet hook's interface on the leg's side: a packet from a port of
    /// one of the model's bridges came in on the bridge (br_netfilter names
    /// the bridge, not the port), one to a port goes out on it.
    fn ifname(self) -> &'static str;
    /// The leg's NACL stage.
    fn nacl(self) -> Stage;
    /// The leg's security-group stage.
    fn sg(self) -> Stage;
}

impl NftLeg for Direction {
    fn ifname(self) -> &'static str {
        match self {
            Direction::Egress => "iifname",
            Direction::Ingress => "oifname",
        }
    }
    fn nacl(self) -> Stage {
        match self {
            Direction::Egress => Stage::NaclOut,
            Direction::Ingress => Stage::NaclIn,
        }
    }
    fn sg(self) -> Stage {
        match self {
            Direction::Egress => Stage::SgEgress,
            Direction::Ingress => Stage::SgIngress,
        }
    }
}

/// The stages of `legs`, in the order of docs/semantics.md: not carried
/// (broadcast and multicast destinations on the model's bridges), the NACLs
/// (every packet, before any conntrack shortcut), the tracked-flow shortcut,
/// the SG chains (sender's egress before receiver's ingress), then the
/// timeouts of a new flow.
pub(super) fn render_legs(out: &mut Out, legs: &[Direction]) {
    out.line(
        2,
        "# Not carried: a broadcast or multicast destination to or from a port of the model's bridges.",
    );
    for leg in legs {
        for f in Family::ALL {
            out.line(
                2,
                format!(
                    "{} @bridges {} daddr @not_carried_{} {}",
                    leg.ifname(),
                    f.l3(),
                    f.suffix(),
                    drop_as("not-carried", "-")
                ),
            );
        }
    }
    out.line(
        2,
        "# NACLs are stateless: every packet, before any conntrack shortcut.",
    );
    for leg in legs {
        dispatch(out, leg.nacl());
    }
    out.line(
        2,
        "# A flow the kernel tracks passed its SG legs when it began: skip the SG rules.",
    );
    out.line(
        2,
        "ct state established,related counter name \"tracked\" accept",
    );
    out.line(2, "ct status confirmed counter name \"tracked\" accept");
    out.line(
        2,
        match legs {
            [_, _] => "# SG egress of the sender, then SG ingress of the receiver (chains return on allow).",
            _ => "# The leg's SG chain (returns on allow).",
        },
    );
    for leg in legs {
        dispatch(out, leg.sg());
    }
    out.line(
        2,
        "# A new flow allowed by every stage: the SEMANTICS timeouts.",
    );
    for f in Family::ALL {
        for side in [Side::Saddr, Side::Daddr] {
            out.line(
                2,
                format!(
                    "{} {} @instances_{} goto ct_new",
                    f.l3(),
                    side.word(),
                    f.suffix()
                ),
            );
        }
    }
}

/// Base chains and the shared decision chain.
pub(super) fn render_entry(out: &mut Out) {
    for hook in ["forward", "input", "output"] {
        out.line(1, format!("chain {hook} {{"));
        out.line(
            2,
            format!("type filter hook {hook} priority {HOOK_PRIORITY}; policy accept;"),
        );
        out.line(2, "jump decide");
        out.line(1, "}");
        out.blank();
    }
    let pass = "counter name \"passthrough\" accept";
    out.line(1, "chain decide {");
    out.line(
        2,
        "# 1. Passthrough, either leg: NDP (not redirects), the service addresses, the subnet's DNS.",
    );
    out.line(
        2,
        format!("icmpv6 type {}-{} {pass}", NDP_TYPES.0, NDP_TYPES.1),
    );
    let v4: Vec<String> = SERVICES.iter().map(|(_, a, _)| a.to_string()).collect();
    let v6: Vec<String> = SERVICES.iter().map(|(_, _, a)| a.to_string()).collect();
    for (f, addrs) in [(Family::V4, &v4), (Family::V6, &v6)] {
        for side in [Side::Daddr, Side::Saddr] {
            out.line(
                2,
                format!("{} {} {} {pass}", f.l3(), side.word(), set_text(addrs)),
            );
        }
    }
    for f in Family::ALL {
        out.line(
            2,
            format!(
                "{l3} saddr . {l3} daddr @dns_pairs_{} {pass}",
                f.suffix(),
                l3 = f.l3()
            ),
        );
    }
    out.line(
        2,
        "# 2. Not carried: ICMPv6 redirects to or from a port of the model's bridges.",
    );
    for leg in [Direction::Egress, Direction::Ingress] {
        out.line(
            2,
            format!(
                "{} @bridges icmpv6 type {ICMPV6_REDIRECT} {}",
                leg.ifname(),
                drop_as("not-carried", "-")
            ),
        );
    }
    out.line(
        2,
        "# 3. DHCP in its client shape, with a peer that is no instance, is passthrough for one leg: the other leg still judges it.",
    );
    out.line(
        2,
        format!(
            "meta nfproto ipv4 udp sport {DHCP_CLIENT_PORT} udp dport {DHCP_SERVER_PORT} ip daddr != @instances_v4 goto leg_in"
        ),
    );
    out.line(
        2,
        format!(
            "meta nfproto ipv4 udp sport {DHCP_SERVER_PORT} udp dport {DHCP_CLIENT_PORT} ip saddr != @instances_v4 goto leg_out"
        ),
    );
    out.line(2, "# 4. Both legs.");
    render_legs(out, &[Direction::Egress, Direction::Ingress]);
    out.line(1, "}");
    for (name, leg, what) in [
        (
            "leg_out",
            Direction::Egress,
            "DHCP 67->68: passthrough where it is delivered; the sender's leg judges it",
        ),
        (
            "leg_in",
            Direction::Ingress,
            "DHCP 68->67: passthrough where it is sent; the receiver's leg judges it",
        ),
    ] {
        out.blank();
        out.line(1, format!("chain {name} {{"));
        out.line(2, format!("# {what}."));
        render_legs(out, &[leg]);
        out.line(1, "}");
    }
    out.blank();
    out.line(1, "chain ct_new {");
    for f in Family::ALL {
        for proto in ["tcp", "udp"] {
            out.line(
                2,
                format!(
                    "meta nfproto {} meta l4proto {proto} ct timeout set \"{proto}_{}\"",
                    f.nfproto(),
                    f.suffix()
                ),
            );
        }
    }
    out.line(1, "}");
}

/// One subnet's NACL in one direction: same-subnet traffic returns at once;
/// then the entries in rule-number order, first match decides; then deny.
pub(super) fn render_nacl_chain(
    out: &mut Out,
    ix: &Index<'_>,
    kind: Stage,
    subnet: usize,
    entries: &[NaclEntry],
) -> Result<(), RenderError> {
    let side = kind.remote_side();
    out.line(1, format!("chain {}_{subnet} {{", kind.prefix()));
    out.line(2, "# Two instances of one subnet never see its NACL.");
    for f in Family::ALL {
        if ix.subnet_addrs.contains_key(&(f, subnet)) {
            out.line(
                2,
                format!(
                    "{} {} @subnet_{subnet}_{} return",
                    f.l3(),
                    side.word(),
                    f.suffix()
                ),
            );
        }
    }
    let allow = counter_name(kind, subnet, true);
    let drop = counter_name(kind, subnet, false);
    for e in entries {
        let f = Family::of_net(&e.cidr);
        let Some(proto) = proto_match(f, &e.matcher)? else {
            out.line(
                2,
                format!("# rule {}: cannot match this family", e.rule_number),
            );
            continue;
        };
        let addr = addr_match(f, side, &[e.cidr]);
        let verdict = match e.action {
            RuleAction::Allow => format!("counter name \"{allow}\" return"),
            RuleAction::Deny => format!(
                "counter name \"{drop}\" {} drop",
                log_drop(kind, subnet, Some(e.rule_number))
            ),
        };
        out.line(
            2,
            format!(
                "{} # rule {}",
                join_nonempty(&[&addr, &proto, &verdict]),
                e.rule_number
            ),
        );
    }
    out.line(
        2,
        format!(
            "counter name \"{drop}\" {} drop # rule *",
            log_drop(kind, subnet, None)
        ),
    );
    out.line(1, "}");
    Ok(())
}

/// TCP/UDP rules that share a CIDR set: (family, protocol, aggregated CIDRs).
pub(super) type PortGroup = (Family, u8, Vec<IpNet>);

/// One instance's SG rules in one direction. Rules are a union, so their
/// order does not matter: they are grouped into as few rules as possible
/// (one per protocol matcher, CIDRs as one set; TCP/UDP ports with the same
/// CIDR set merged into one port set). Each match `return`s — never
/// `accept`, which would skip the other instance's leg — and the chain ends
/// in `drop`.
pub(super) fn render_sg_chain(
    out: &mut Out,
    kind: Stage,
    inst: usize,
    rules: &[FirewallRule],
) -> Result<(), RenderError> {
    let side = kind.remote_side();
    out.line(1, format!("chain {}_{inst} {{", kind.prefix()));
    // (family, matcher) → remotes.
    let mut by_match: BTreeMap<(Family, Match), Vec<IpNet>> = BTreeMap::new();
    for r in rules {
        by_match
            .entry((Family::of_net(&r.remote), r.matcher))
            .or_default()
            .push(r.remote);
    }
    // Port rules with the same CIDR set share one rule: (family, proto, cidrs) → ranges.
    let mut ports: BTreeMap<PortGroup, Vec<(u16, u16)>> = BTreeMap::new();
    let allow = counter_name(kind, inst, true);
    for ((f, m), nets) in &by_match {
        let nets = aggregate(*f, nets);
        if let Match::Ports { proto, from, to } = *m {
            if l4_name(proto).is_none() {
                return Err(RenderError::Matcher { matcher: *m });
            }
            ports.entry((*f, proto, nets)).or_default().push((from, to));
            continue;
        }
        let Some(proto) = proto_match(*f, m)? else {
            continue;
        };
        let addr = addr_match(*f, side, &nets);
        out.line(
            2,
            join_nonempty(&[&addr, &proto, &format!("counter name \"{allow}\" return")]),
        );
    }
    for ((f, proto, nets), ranges) in ports {
        let addr = addr_match(f, side, &nets);
        let items: Vec<String> = merge_ports(ranges).into_iter().map(port_text).collect();
        let name = l4_name(proto).unwrap_or("th");
        out.line(
            2,
            format!(
                "{addr} {name} dport {} counter name \"{allow}\" return",
                set_text(&items)
            ),
        );
    }
    out.line(
        2,
        format!(
            "counter name \"{}\" {} drop",
            counter_name(kind, inst, false),
            log_drop(kind, inst, None)
        ),
    );
    out.line(1, "}");
    Ok(())
}
