//! The named objects of the ruleset: the checked address index, the sets
//! and verdict maps keyed by instance and subnet addresses, the named
//! counters and the conntrack timeout objects. It owns how an address or a
//! prefix is written and merged; it must never write a rule.

use super::*;

/// An address for nft: plain for a host, `a/len` for a prefix.
pub(super) fn net_text(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

/// `{ a, b }`, or the single element without braces.
pub(super) fn set_text(items: &[String]) -> String {
    match items {
        [one] => one.clone(),
        many => format!("{{ {} }}", many.join(", ")),
    }
}

/// Minimal covering list of CIDRs (overlaps and neighbours merged), sorted.
pub(super) fn aggregate(family: Family, nets: &[IpNet]) -> Vec<IpNet> {
    match family {
        Family::V4 => {
            let v: Vec<Ipv4Net> = nets
                .iter()
                .filter_map(|n| match n {
                    IpNet::V4(n) => Some(*n),
                    IpNet::V6(_) => None,
                })
                .collect();
            Ipv4Net::aggregate(&v).into_iter().map(IpNet::V4).collect()
        }
        Family::V6 => {
            let v: Vec<Ipv6Net> = nets
                .iter()
                .filter_map(|n| match n {
                    IpNet::V6(n) => Some(*n),
                    IpNet::V4(_) => None,
                })
                .collect();
            Ipv6Net::aggregate(&v).into_iter().map(IpNet::V6).collect()
        }
    }
}

/// The address part of a rule: `ip daddr { ... }`, or only the family when
/// the set covers the whole family (`meta nfproto ipv4`).
pub(super) fn addr_match(family: Family, side: Side, nets: &[IpNet]) -> String {
    if nets.iter().any(|n| n.prefix_len() == 0) {
        return format!("meta nfproto {}", family.nfproto());
    }
    let items: Vec<String> = nets.iter().map(net_text).collect();
    format!("{} {} {}", family.l3(), side.word(), set_text(&items))
}

/// Per-subnet and per-instance indices, from the one checked
/// [`Ownership`] index.
pub(super) struct Index<'a> {
    pub(super) model: &'a FlatModel,
    /// (family) → subnet → its instances' addresses.
    pub(super) subnet_addrs: BTreeMap<(Family, usize), BTreeSet<IpAddr>>,
    /// Every instance address → its owner.
    pub(super) owner: Ownership,
}

impl<'a> Index<'a> {
    pub(super) fn new(model: &'a FlatModel) -> Result<Index<'a>, RenderError> {
        let owner = model.ownership()?;
        let mut subnet_addrs: BTreeMap<(Family, usize), BTreeSet<IpAddr>> = BTreeMap::new();
        for (addr, o) in owner.iter() {
            subnet_addrs
                .entry((Family::of_addr(addr), o.subnet))
                .or_default()
                .insert(*addr);
        }
        Ok(Index {
            model,
            subnet_addrs,
            owner,
        })
    }

    pub(super) fn addrs_of(&self, family: Family) -> impl Iterator<Item = (&IpAddr, &Owner)> {
        self.owner
            .iter()
            .filter(move |(a, _)| Family::of_addr(a) == family)
    }

    /// (instance address, DNS address of its subnet) pairs of one family.
    pub(super) fn dns_pairs(&self, family: Family) -> BTreeSet<(IpAddr, IpAddr)> {
        let mut pairs = BTreeSet::new();
        for (addr, o) in self.addrs_of(family) {
            let Some(s) = self.model.subnets.get(o.subnet) else {
                continue;
            };
            for dns in s.dns.iter().filter(|d| Family::of_addr(d) == family) {
                pairs.insert((*addr, *dns));
                pairs.insert((*dns, *addr));
            }
        }
        pairs
    }
}

/// Writes a named set or map declaration with its elements, one per line.
pub(super) fn declare(out: &mut Out, kind: &str, name: &str, ty: &str, elements: &[String]) {
    out.line(1, format!("{kind} {name} {{"));
    out.line(2, format!("type {ty}"));
    if !elements.is_empty() {
        out.line(2, "elements = {");
        let last = elements.len() - 1;
        for (i, e) in elements.iter().enumerate() {
            out.line(3, format!("{e}{}", if i == last { "" } else { "," }));
        }
        out.line(2, "}");
    }
    out.line(1, "}");
}

pub(super) fn render_timeouts(out: &mut Out, model: &FlatModel) {
    let t = model.timeouts;
    out.line(
        1,
        "# Conntrack timeouts of SEMANTICS.md, set on each new flow sgfw allowed (chain ct_new).",
    );
    out.line(
        1,
        "# ICMP and other protocols: kernel timeouts (nft cannot set them per flow here).",
    );
    for f in Family::ALL {
        out.line(
            1,
            format!(
                "ct timeout tcp_{} {{ protocol tcp; l3proto {}; policy = {{ established: {}, syn_sent: {n}, syn_recv: {n}, fin_wait: {c}, close_wait: {c}, last_ack: {c}, time_wait: {c}, close: {c} }}; }}",
                f.suffix(),
                f.l3proto(),
                t.tcp_established,
                n = t.tcp_new,
                c = t.tcp_closing,
            ),
        );
        out.line(
            1,
            format!(
                "ct timeout udp_{} {{ protocol udp; l3proto {}; policy = {{ unreplied: {}, replied: {} }}; }}",
                f.suffix(),
                f.l3proto(),
                t.udp,
                t.udp_stream
            ),
        );
    }
}

pub(super) fn render_counters(out: &mut Out, model: &FlatModel) {
    out.line(1, "counter passthrough { comment \"passthrough\"; }");
    out.line(1, "counter tracked { comment \"tracked\"; }");
    for reason in INET_DROPS {
        out.line(
            1,
            format!(
                "counter drop_{} {{ comment \"{reason}\"; }}",
                reason.replace('-', "_")
            ),
        );
    }
    for kind in CHAIN_ORDER {
        let ids: Vec<&str> = match kind {
            Stage::NaclOut | Stage::NaclIn => model.subnets.iter().map(|s| s.id.as_str()).collect(),
            Stage::SgEgress | Stage::SgIngress => {
                model.instances.iter().map(|i| i.id.as_str()).collect()
            }
        };
        for (i, id) in ids.iter().enumerate() {
            for allowed in [true, false] {
                out.line(
                    1,
                    format!(
                        "counter {} {{ comment \"{}\"; }}",
                        counter_name(kind, i, allowed),
                        sanitize(id)
                    ),
                );
            }
        }
    }
}

pub(super) fn render_sets(out: &mut Out, ix: &Index<'_>) {
    let bridges: BTreeSet<&str> = ix.model.subnets.iter().map(|s| s.bridge.as_str()).collect();
    let quoted: Vec<String> = bridges.iter().map(|b| format!("\"{b}\"")).collect();
    declare(out, "set", "bridges", "ifname", &quoted);
    // Destinations a VPC does not carry: IPv4 multicast, the limited
    // broadcast and every subnet's broadcast address; IPv6 multicast.
    let mut v4 = vec![IpNet::V4(GROUP_V4), IpNet::from(IpAddr::V4(BROADCAST_V4))];
    v4.extend(
        ix.model
            .subnets
            .iter()
            .map(|s| IpNet::V4(Ipv4Net::from(s.cidr_v4.broadcast()))),
    );
    for (f, nets) in [(Family::V4, v4), (Family::V6, vec![IpNet::V6(GROUP_V6)])] {
        let elems: Vec<String> = aggregate(f, &nets).iter().map(net_text).collect();
        out.line(1, format!("set not_carried_{} {{", f.suffix()));
        out.line(2, format!("type {}", f.addr_type()));
        out.line(2, "flags interval");
        out.line(2, "elements = {");
        let last = elems.len().saturating_sub(1);
        for (i, e) in elems.iter().enumerate() {
            out.line(3, format!("{e}{}", if i == last { "" } else { "," }));
        }
        out.line(2, "}");
        out.line(1, "}");
    }
    for f in Family::ALL {
        let all: Vec<String> = ix.addrs_of(f).map(|(a, _)| a.to_string()).collect();
        declare(
            out,
            "set",
            &format!("instances_{}", f.suffix()),
            f.addr_type(),
            &all,
        );
    }
    for (s, _) in ix.model.subnets.iter().enumerate() {
        for f in Family::ALL {
            let addrs: Vec<String> = ix
                .subnet_addrs
                .get(&(f, s))
                .into_iter()
                .flatten()
                .map(ToString::to_string)
                .collect();
            declare(
                out,
                "set",
                &format!("subnet_{s}_{}", f.suffix()),
                f.addr_type(),
                &addrs,
            );
        }
    }
    for f in Family::ALL {
        let pairs: Vec<String> = ix
            .dns_pairs(f)
            .iter()
            .map(|(a, b)| format!("{a} . {b}"))
            .collect();
        let ty = format!("{t} . {t}", t = f.addr_type());
        declare(
            out,
            "set",
            &format!("dns_pairs_{}", f.suffix()),
            &ty,
            &pairs,
        );
    }
    for kind in CHAIN_ORDER {
        for f in Family::ALL {
            let elems: Vec<String> = ix
                .addrs_of(f)
                .map(|(a, o)| {
                    let target = if kind.is_nacl() { o.subnet } else { o.instance };
                    format!("{a} : jump {}_{target}", kind.prefix())
                })
                .collect();
            let ty = format!("{} : verdict", f.addr_type());
            declare(
                out,
                "map",
                &format!("{}_{}", kind.prefix(), f.suffix()),
                &ty,
                &elems,
            );
        }
    }
}
