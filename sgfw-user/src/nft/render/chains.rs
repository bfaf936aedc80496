//! The chains of the ruleset: the bridge table's port checks, the inet
//! table's entry chain, legs and SG stage chains, the per-subnet NACL
//! chains, the per-instance SG chains (a jump per group) and the per-group
//! rule chains, and the matchers they are written with. It must
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

pub(super) fn counter_name(kind: Stage, key: &str, allowed: bool) -> String {
    format!(
        "{}_{key}_{}",
        kind.prefix(),
        if allowed { "allow" } else { "drop" }
    )
}

pub(super) fn log_drop(kind: Stage, key: &str, rule: Option<u16>) -> String {
    let rule = rule.map_or_else(|| "*".to_string(), |n| format!("r{n}"));
    format!(
        "log prefix \"sgfw drop {} {}{key} {rule} \" group {NFLOG_GROUP}",
        kind.name(),
        kind.who()
    )
}

/// The verdict-map dispatch to the chains of one stage, both families.
pub(super) fn dispatch(c: &mut Obj, kind: Stage) {
    for f in Family::ALL {
        c.rule(format!(
            "{} {} vmap @{}_{}",
            f.l3(),
            kind.key_side().word(),
            kind.prefix(),
            f.suffix()
        ));
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
pub(super) fn render_bridge_table(ix: &Index<'_>, ports: &[String]) -> Result<Table, RenderError> {
    let model = ix.model;
    let mut bound = Vec::new();
    for (i, inst) in model.instances.iter().enumerate() {
        if let Some(name) = &inst.interface {
            if !ifname_ok(name) {
                return Err(RenderError::Interface {
                    instance: inst.id.clone(),
                    name: name.clone(),
                });
            }
            bound.push((ix.inst_key[i].as_str(), name.as_str(), inst));
        }
    }
    let mut all_ports: BTreeSet<&str> = bound.iter().map(|(_, n, _)| *n).collect();
    for p in ports {
        if !ifname_ok(p) {
            return Err(RenderError::Port { name: p.clone() });
        }
        all_ports.insert(p);
    }
    let mut t = Table::new(BRIDGE_TABLE);
    for reason in BRIDGE_DROPS {
        t.push(counter(
            format!("drop_{}", reason.replace('-', "_")),
            reason,
        ));
    }
    let quoted: Vec<String> = all_ports.iter().map(|n| format!("\"{n}\"")).collect();
    t.push(declare(Kind::Set, "ports", &["type ifname"], quoted));
    for (map, chain) in [
        ("bound_from", "source_check"),
        ("bound_to", "receive_check"),
    ] {
        let elems: Vec<String> = bound
            .iter()
            .map(|(key, name, _)| format!("\"{name}\" : jump {chain}_{key}"))
            .collect();
        t.push(declare(Kind::Map, map, &["type ifname : verdict"], elems));
    }
    for (hook, side, chain) in [
        ("prerouting", "iifname", "from_port"),
        ("forward", "oifname", "to_port"),
        ("output", "oifname", "to_port"),
    ] {
        let mut c = Obj::chain(hook);
        c.decl.push(format!(
            "type filter hook {hook} priority {HOOK_PRIORITY}; policy accept;"
        ));
        c.rule(format!("{side} @ports jump {chain}"));
        t.push(c);
    }
    for (chain, side, map, what) in [
        ("from_port", "iifname", "bound_from", "What a port sends"),
        ("to_port", "oifname", "bound_to", "What a port is handed"),
    ] {
        let mut c = Obj::chain(chain);
        c.rule(format!(
            "# {what}: VLAN-tagged frames drop, ARP and IP pass, other frames drop."
        ));
        c.rule(format!(
            "ether type {{ 8021q, 8021ad }} {}",
            drop_as("vlan", "-")
        ));
        c.rule(format!(
            "ether type != {{ ip, ip6, arp }} {}",
            drop_as("non-ip", "-")
        ));
        c.rule(format!("{side} vmap @{map}"));
        t.push(c);
    }
    let broadcasts: Vec<IpNet> = model
        .subnets
        .iter()
        .map(|s| IpNet::V4(Ipv4Net::from(s.cidr_v4.broadcast())))
        .collect();
    for (key, name, inst) in &bound {
        let own = |f: Family| -> Vec<String> {
            inst.addrs
                .iter()
                .filter(|a| Family::of_addr(a) == f)
                .map(ToString::to_string)
                .collect()
        };
        let mut c = Obj::chain(format!("source_check_{key}"));
        c.rule(format!(
            "# What {name} sends: only from the instance's addresses (before any passthrough class)."
        ));
        c.rule("ether type arp return");
        let v4 = own(Family::V4);
        if !v4.is_empty() {
            c.rule(format!("ip saddr {} return", set_text(&v4)));
        }
        let mut v6 = own(Family::V6);
        v6.push(LINK_LOCAL_V6.to_string());
        c.rule(format!("ip6 saddr {} return", set_text(&v6)));
        c.rule(format!(
            "ip saddr {} udp sport {DHCP_CLIENT_PORT} udp dport {DHCP_SERVER_PORT} return",
            Ipv4Addr::UNSPECIFIED
        ));
        c.rule(format!(
            "ip6 saddr {} icmpv6 type {}-{} return",
            Ipv6Addr::UNSPECIFIED,
            NDP_TYPES.0,
            NDP_TYPES.1
        ));
        c.rule(drop_as("source-check", &format!("i{key}")));
        t.push(c);
        let mut c = Obj::chain(format!("receive_check_{key}"));
        c.rule(format!(
            "# What {name} is handed: only to the instance's addresses, or to a group or broadcast address."
        ));
        c.rule("ether type arp return");
        let mut v4: Vec<IpNet> = inst
            .addrs
            .iter()
            .filter(|a| a.is_ipv4())
            .map(|a| IpNet::from(*a))
            .collect();
        v4.extend([IpNet::V4(GROUP_V4), IpNet::from(IpAddr::V4(BROADCAST_V4))]);
        v4.extend(broadcasts.iter().copied());
        let v4: Vec<String> = aggregate(Family::V4, &v4).iter().map(net_text).collect();
        c.rule(format!("ip daddr {} return", set_text(&v4)));
        let mut v6: Vec<IpNet> = inst
            .addrs
            .iter()
            .filter(|a| a.is_ipv6())
            .map(|a| IpNet::from(*a))
            .collect();
        v6.extend([IpNet::V6(LINK_LOCAL_V6), IpNet::V6(GROUP_V6)]);
        let v6: Vec<String> = aggregate(Family::V6, &v6).iter().map(net_text).collect();
        c.rule(format!("ip6 daddr {} return", set_text(&v6)));
        c.rule(drop_as("not-for-instance", &format!("i{key}")));
        t.push(c);
    }
    Ok(t)
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
}

/// The stages of `legs` up to the SG stages, in the order of
/// docs/semantics.md: not carried (broadcast and multicast destinations on
/// the model's bridges), the NACLs (every packet, before any conntrack
/// shortcut), the tracked-flow shortcut. The caller goes on to the SG stages.
pub(super) fn render_legs(c: &mut Obj, legs: &[Direction]) {
    c.rule("# Not carried: a broadcast or multicast destination to or from a port of the model's bridges.");
    for leg in legs {
        for f in Family::ALL {
            c.rule(format!(
                "{} @bridges {} daddr @not_carried_{} {}",
                leg.ifname(),
                f.l3(),
                f.suffix(),
                drop_as("not-carried", "-")
            ));
        }
    }
    c.rule("# NACLs are stateless: every packet, before any conntrack shortcut.");
    for leg in legs {
        dispatch(c, leg.nacl());
    }
    c.rule("# A flow the kernel tracks passed its SG legs when it began: skip the SG rules.");
    c.rule("ct state established,related counter name \"tracked\" accept");
    c.rule("ct status confirmed counter name \"tracked\" accept");
}

/// Base chains, the shared decision chain and the SG stage chains.
///
/// The SG stages are a chain of `goto`s, so a group's match can end one
/// instance's leg without ending the packet's judgement (an `accept` would
/// skip the other instance's leg; a `return` could not leave the
/// instance's chain): `decide` → `sg_out_<instance>` (by the sender's
/// address; it jumps to each of its groups' `grp_out_<group>` chains, then
/// drops) → on a group's match `sg_out_pass` (counts the sender's allow) →
/// `sg_ingress` → `sg_in_<instance>` (by the receiver's address) → on a
/// match `sg_in_pass` → `sg_done` (the timeouts of a new flow) → `accept`.
/// A packet whose sender (receiver) is no instance skips that leg's vmap.
/// Every chain on this path ends in a verdict or a `goto`, so no path can
/// fall back into an instance's chain and none can end in the base chain's
/// policy without passing both legs.
pub(super) fn render_entry(t: &mut Table) {
    for hook in ["forward", "input", "output"] {
        let mut c = Obj::chain(hook);
        c.decl.push(format!(
            "type filter hook {hook} priority {HOOK_PRIORITY}; policy accept;"
        ));
        c.rule("jump decide");
        t.push(c);
    }
    let pass = "counter name \"passthrough\" accept";
    let mut c = Obj::chain("decide");
    c.rule("# 1. Passthrough, either leg: NDP (not redirects), the service addresses, the subnet's DNS.");
    c.rule(format!(
        "icmpv6 type {}-{} {pass}",
        NDP_TYPES.0, NDP_TYPES.1
    ));
    let v4: Vec<String> = SERVICES.iter().map(|(_, a, _)| a.to_string()).collect();
    let v6: Vec<String> = SERVICES.iter().map(|(_, _, a)| a.to_string()).collect();
    for (f, addrs) in [(Family::V4, &v4), (Family::V6, &v6)] {
        for side in [Side::Daddr, Side::Saddr] {
            c.rule(format!(
                "{} {} {} {pass}",
                f.l3(),
                side.word(),
                set_text(addrs)
            ));
        }
    }
    for f in Family::ALL {
        c.rule(format!(
            "{l3} saddr . {l3} daddr @dns_pairs_{} {pass}",
            f.suffix(),
            l3 = f.l3()
        ));
    }
    c.rule("# 2. Not carried: ICMPv6 redirects to or from a port of the model's bridges.");
    for leg in [Direction::Egress, Direction::Ingress] {
        c.rule(format!(
            "{} @bridges icmpv6 type {ICMPV6_REDIRECT} {}",
            leg.ifname(),
            drop_as("not-carried", "-")
        ));
    }
    c.rule("# 3. DHCP in its client shape, with a peer that is no instance, is passthrough for one leg: the other leg still judges it.");
    c.rule(format!(
        "meta nfproto ipv4 udp sport {DHCP_CLIENT_PORT} udp dport {DHCP_SERVER_PORT} ip daddr != @instances_v4 goto leg_in"
    ));
    c.rule(format!(
        "meta nfproto ipv4 udp sport {DHCP_SERVER_PORT} udp dport {DHCP_CLIENT_PORT} ip saddr != @instances_v4 goto leg_out"
    ));
    c.rule("# 4. Both legs.");
    render_legs(&mut c, &[Direction::Egress, Direction::Ingress]);
    c.rule("# SG egress of the sender (its chain goes on to SG ingress on a match), then SG ingress of the receiver.");
    dispatch(&mut c, Stage::SgEgress);
    c.rule("goto sg_ingress");
    t.push(c);
    // DHCP 67->68 from an address of no instance: passthrough where it is
    // delivered; the sender's leg judges it (its SG egress vmap cannot
    // match: the sender is no instance).
    let mut c = Obj::chain("leg_out");
    c.rule("# DHCP 67->68: passthrough where it is delivered; the sender's leg judges it.");
    render_legs(&mut c, &[Direction::Egress]);
    c.rule("goto sg_done");
    t.push(c);
    let mut c = Obj::chain("leg_in");
    c.rule("# DHCP 68->67: passthrough where it is sent; the receiver's leg judges it.");
    render_legs(&mut c, &[Direction::Ingress]);
    c.rule("goto sg_ingress");
    t.push(c);
    let mut c = Obj::chain("sg_out_pass");
    c.rule("# The sender's SG egress allowed it: count, then the receiver's SG ingress.");
    count_by_address(&mut c, Stage::SgEgress, true);
    c.rule("goto sg_ingress");
    t.push(c);
    let mut c = Obj::chain("sg_ingress");
    dispatch(&mut c, Stage::SgIngress);
    c.rule("goto sg_done");
    t.push(c);
    let mut c = Obj::chain("sg_in_pass");
    c.rule("# The receiver's SG ingress allowed it: count, then done.");
    count_by_address(&mut c, Stage::SgIngress, true);
    c.rule("goto sg_done");
    t.push(c);
    let mut c = Obj::chain("sg_done");
    c.rule("# A new flow allowed by every stage: the SEMANTICS timeouts.");
    for f in Family::ALL {
        for side in [Side::Saddr, Side::Daddr] {
            c.rule(format!(
                "{} {} @instances_{} goto ct_new",
                f.l3(),
                side.word(),
                f.suffix()
            ));
        }
    }
    c.rule("accept");
    t.push(c);
    let mut c = Obj::chain("ct_new");
    for f in Family::ALL {
        for proto in ["tcp", "udp"] {
            c.rule(format!(
                "meta nfproto {} meta l4proto {proto} ct timeout set \"{proto}_{}\"",
                f.nfproto(),
                f.suffix()
            ));
        }
    }
    c.rule("accept");
    t.push(c);
}

/// One subnet's NACL in one direction: same-subnet traffic returns at once;
/// then the entries in rule-number order, first match decides; then deny.
pub(super) fn render_nacl_chain(
    ix: &Index<'_>,
    kind: Stage,
    subnet: usize,
    entries: &[NaclEntry],
) -> Result<Obj, RenderError> {
    let side = kind.remote_side();
    let key = &ix.subnet_key[subnet];
    let mut c = Obj::chain(format!("{}_{key}", kind.prefix()));
    c.rule("# Two instances of one subnet never see its NACL.");
    for f in Family::ALL {
        if ix.subnet_addrs.contains_key(&(f, subnet)) {
            c.rule(format!(
                "{} {} @subnet_{key}_{} return",
                f.l3(),
                side.word(),
                f.suffix()
            ));
        }
    }
    let allow = counter_name(kind, key, true);
    let drop = counter_name(kind, key, false);
    for e in entries {
        let f = Family::of_net(&e.cidr);
        let Some(proto) = proto_match(f, &e.matcher)? else {
            c.rule(format!(
                "# rule {}: cannot match this family",
                e.rule_number
            ));
            continue;
        };
        let addr = addr_match(f, side, &[e.cidr]);
        let verdict = match e.action {
            RuleAction::Allow => format!("counter name \"{allow}\" return"),
            RuleAction::Deny => format!(
                "counter name \"{drop}\" {} drop",
                log_drop(kind, key, Some(e.rule_number))
            ),
        };
        c.rule(format!(
            "{} # rule {}",
            join_nonempty(&[&addr, &proto, &verdict]),
            e.rule_number
        ));
    }
    c.rule(format!(
        "counter name \"{drop}\" {} drop # rule *",
        log_drop(kind, key, None)
    ));
    Ok(c)
}

/// One group list's SG chain in one direction, shared by the instances
/// with that list: a jump to the chain of each group (a group's chain
/// leaves by `goto` on a match, and returns here when nothing in it
/// matched), then the instance's drop counter (by its address), then
/// `drop`.
pub(super) fn render_sg_chain(kind: Stage, lkey: &str, groups: &[&str], ix: &Index<'_>) -> Obj {
    let dir = kind.direction();
    let mut c = Obj::chain(format!("{}_{lkey}", kind.prefix()));
    let names: Vec<String> = groups.iter().map(|g| sanitize(g)).collect();
    c.rule(format!("# {}: {}", dir.name(), names.join(" ")));
    for g in groups {
        if let Some(gk) = ix.group_key.get(g) {
            c.rule(format!("jump {}_{gk}", group_prefix(dir)));
        }
    }
    count_by_address(&mut c, kind, false);
    // The drop is logged without a who: the list is no instance's (the
    // packet's address names the instance).
    c.rule(format!(
        "log prefix \"sgfw drop {} - * \" group {NFLOG_GROUP} drop",
        kind.name()
    ));
    c
}

/// Counts a packet for the instance whose address picked the SG stage's
/// chain (the sender's for egress, the receiver's for ingress): a match on
/// the stage's counter set of each family, no verdict.
fn count_by_address(c: &mut Obj, kind: Stage, allowed: bool) {
    for f in Family::ALL {
        c.rule(format!(
            "{} {} @{}",
            f.l3(),
            kind.key_side().word(),
            sg_counter_set(kind, allowed, f)
        ));
    }
}

/// `grp_in` / `grp_out`: the chains of one group's rules.
pub(super) const fn group_prefix(dir: Direction) -> &'static str {
    match dir {
        Direction::Ingress => "grp_in",
        Direction::Egress => "grp_out",
    }
}

/// TCP/UDP rules that share a CIDR set: (family, protocol, aggregated CIDRs).
pub(super) type PortGroup = (Family, u8, Vec<IpNet>);

/// One group's SG rules in one direction, shared by every instance in the
/// group. Rules are a union, so their order does not matter: they are
/// grouped into as few rules as possible (one per protocol matcher, CIDRs as
/// one set; TCP/UDP ports with the same CIDR set merged into one port set).
/// A match goes on to the next stage (`goto sg_out_pass` / `sg_in_pass`);
/// no match falls back to the instance's chain, which tries its next group
/// and ends in `drop`.
pub(super) fn render_group_chain(
    dir: Direction,
    group: &str,
    gkey: &str,
    rules: &GroupRules,
) -> Result<Obj, RenderError> {
    let kind = match dir {
        Direction::Ingress => Stage::SgIngress,
        Direction::Egress => Stage::SgEgress,
    };
    let side = kind.remote_side();
    let next = format!("goto {}_pass", kind.prefix());
    let mut c = Obj::chain(format!("{}_{gkey}", group_prefix(dir)));
    c.rule(format!("# {} {}", sanitize(group), dir.name()));
    // Port rules with the same CIDR set share one rule: (family, proto, cidrs) → ranges.
    let mut ports: BTreeMap<PortGroup, Vec<(u16, u16)>> = BTreeMap::new();
    for ((f, m), nets) in rules {
        let nets: Vec<IpNet> = nets.iter().copied().collect();
        let nets = aggregate(*f, &nets);
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
        c.rule(join_nonempty(&[&addr, &proto, &next]));
    }
    for ((f, proto, nets), ranges) in ports {
        let addr = addr_match(f, side, &nets);
        let items: Vec<String> = merge_ports(ranges).into_iter().map(port_text).collect();
        let name = l4_name(proto).unwrap_or("th");
        c.rule(format!("{addr} {name} dport {} {next}", set_text(&items)));
    }
    Ok(c)
}
