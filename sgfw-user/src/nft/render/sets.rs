//! The named objects of the ruleset: the checked address index, the object
//! names of subnets, instances and groups, the sets and maps keyed by
//! instance and subnet addresses, the named counters and the conntrack
//! timeout objects. It owns how an address or a prefix is written and
//! merged, and how an id becomes a name; it must never write a rule.

use std::sync::Arc;

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

/// The name an id gives its objects (`sg_in_<key>`, `nacl_out_<key>`,
/// `grp_in_<key>`): the id itself when it is 1-64 of `[A-Za-z0-9._-]` and
/// begins with a letter or digit — so names stay readable and do not move
/// when other instances come and go — else `h` and 16 hex digits of its
/// xxh3 hash. A hostile id never reaches a name.
pub(super) fn key_of(id: &str) -> String {
    let plain = (1..=64).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if plain {
        id.to_string()
    } else {
        format!("h{:016x}", xxhash_rust::xxh3::xxh3_64(id.as_bytes()))
    }
}

/// Keys of a list of ids, checked to be distinct.
fn keys_of<'i>(
    what: &'static str,
    ids: impl Iterator<Item = &'i str>,
) -> Result<Vec<String>, RenderError> {
    let mut seen = BTreeMap::new();
    let mut keys = Vec::new();
    for id in ids {
        let k = key_of(id);
        if let Some(other) = seen.insert(k.clone(), id)
            && other != id
        {
            return Err(RenderError::Name {
                what,
                id: id.to_string(),
                other: other.to_string(),
            });
        }
        keys.push(k);
    }
    Ok(keys)
}

/// The security-group rules of one group and direction: (family, matcher)
/// → remotes.
pub(super) type GroupRules = BTreeMap<(Family, Match), BTreeSet<IpNet>>;

/// A rule list's rules by the group they come from, as a [`ListSplit`].
fn split_by_group(rules: &Arc<[FirewallRule]>) -> ListSplit {
    // Group id → (index of its first rule, its rules).
    let mut by: BTreeMap<&str, (usize, GroupRules)> = BTreeMap::new();
    for (i, r) in rules.iter().enumerate() {
        by.entry(r.origin.group_id.as_str())
            .or_insert_with(|| (i, GroupRules::new()))
            .1
            .entry((Family::of_net(&r.remote), r.matcher))
            .or_default()
            .insert(r.remote);
    }
    let firsts = by.values().map(|(i, _)| *i).collect();
    ListSplit {
        rules: Arc::clone(rules),
        shares: by
            .into_iter()
            .map(|(g, (_, m))| (g.to_string(), m))
            .collect(),
        firsts,
    }
}

/// Per-subnet and per-instance indices, from the one checked
/// [`Ownership`] index; object names; and the rules by group.
pub(super) struct Index<'a> {
    pub(super) model: &'a FlatModel,
    /// (family) → subnet → its instances' addresses.
    pub(super) subnet_addrs: BTreeMap<(Family, usize), BTreeSet<IpAddr>>,
    /// Every instance address → its owner.
    pub(super) owner: Ownership,
    /// Object names of the subnets, by index.
    pub(super) subnet_key: Vec<String>,
    /// Object names of the instances, by index.
    pub(super) inst_key: Vec<String>,
    /// (direction, group id) → the group's chain: its rules in that
    /// direction, each one a rule the flattened model gives that group
    /// (origin) in some list, so the union over an instance's groups is
    /// exactly its rules.
    pub(super) group_chains: BTreeMap<(Direction, &'a str), Obj>,
    /// Object names of the groups.
    pub(super) group_key: BTreeMap<&'a str, String>,
    /// Per instance, per direction ([ingress, egress]): the object name of
    /// its group list (the groups its rules come from, sorted).
    pub(super) list_key: Vec<[String; 2]>,
    /// (direction, list name) → the groups of the list.
    pub(super) lists: BTreeMap<(Direction, String), Vec<&'a str>>,
}

/// The object name of a group list: `l` and 16 hex digits of the xxh3 hash
/// of its ids (a list is a set: the ids are sorted).
fn list_key_of(groups: &[&str]) -> String {
    format!(
        "l{:016x}",
        xxhash_rust::xxh3::xxh3_64(groups.join("\n").as_bytes())
    )
}

/// Where [`Index::inst_groups`] keeps a direction.
pub(super) const fn dir_slot(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

/// What one render remembers for the next in the same process (kept by the
/// nftables backend's caller: `backend::Enforcer`), so that a change
/// renders the chains of the groups it can reach and not every group's.
///
/// Rule lists are `Arc<[FirewallRule]>` shared across renders by
/// [`crate::flat::reflatten`]: a list the memo holds (its allocation kept
/// alive, so its address cannot name another list) is split by group again
/// only when it is new. A group's chain is rendered again only when the
/// lists its rules are gathered from are not exactly the ones it was
/// rendered from (the same allocations, so the same contents) or its name
/// changed. What a chain covers is exactly those inputs.
#[derive(Debug, Default)]
pub struct RenderMemo {
    /// (direction, list address) → the list's rules by group.
    lists: std::collections::HashMap<(Direction, usize), ListSplit>,
    /// (direction, group id) → its chain and what it was rendered from.
    groups: std::collections::HashMap<(Direction, String), GroupChain>,
    /// Group chains the last render took from here.
    hits: usize,
}

impl RenderMemo {
    /// How many group chains the last render took from the memo.
    pub fn hits(&self) -> usize {
        self.hits
    }
}

/// One rule list's rules by the group they come from.
#[derive(Debug)]
struct ListSplit {
    /// The list: keeps its allocation, and so its address, its own.
    rules: Arc<[FirewallRule]>,
    /// Group id → its rules in this list.
    shares: BTreeMap<String, GroupRules>,
    /// Per group, in id order: the index of one of its rules (whose
    /// `group_id` the model's own string is borrowed from).
    firsts: Vec<usize>,
}

/// A group's rendered chain and its inputs.
#[derive(Debug)]
struct GroupChain {
    /// The lists it was gathered from, by address.
    from: Vec<Arc<[FirewallRule]>>,
    /// Its object name.
    key: String,
    chain: Obj,
}

impl<'a> Index<'a> {
    /// The index of `model`, with the group chains from `memo` where their
    /// inputs are unchanged; `memo` then holds what this render used.
    pub(super) fn new_with(
        model: &'a FlatModel,
        memo: &mut RenderMemo,
    ) -> Result<Index<'a>, RenderError> {
        let owner = model.ownership()?;
        let mut subnet_addrs: BTreeMap<(Family, usize), BTreeSet<IpAddr>> = BTreeMap::new();
        for (addr, o) in owner.iter() {
            subnet_addrs
                .entry((Family::of_addr(addr), o.subnet))
                .or_default()
                .insert(*addr);
        }
        let subnet_key = keys_of("subnet", model.subnets.iter().map(|s| s.id.as_str()))?;
        let inst_key = keys_of("instance", model.instances.iter().map(|i| i.id.as_str()))?;
        // Rule lists are shared between instances with the same group list
        // (flatten's memo): each distinct list is split by origin once, and
        // a list the last render split is not split again.
        let mut lists_now: std::collections::HashMap<(Direction, usize), ListSplit> =
            std::collections::HashMap::new();
        // (direction, group) → the lists its rules come from.
        let mut sources: BTreeMap<(Direction, &'a str), Vec<&'a Arc<[FirewallRule]>>> =
            BTreeMap::new();
        let mut split: BTreeMap<(Direction, usize), Vec<&'a str>> = BTreeMap::new();
        let mut inst_groups = Vec::with_capacity(model.instances.len());
        for inst in &model.instances {
            let mut per_dir: [Vec<&'a str>; 2] = [Vec::new(), Vec::new()];
            for (dir, rules) in [
                (Direction::Ingress, &inst.ingress),
                (Direction::Egress, &inst.egress),
            ] {
                let at = (dir, rules.as_ptr() as usize);
                let groups = split.entry(at).or_insert_with(|| {
                    let known = memo
                        .lists
                        .remove(&at)
                        .filter(|l| Arc::ptr_eq(&l.rules, rules));
                    let share = known.unwrap_or_else(|| split_by_group(rules));
                    // The group ids as the model spells them (borrowed
                    // from the rules, which live as long as the model).
                    let groups: Vec<&'a str> = share
                        .firsts
                        .iter()
                        .filter_map(|i| rules.get(*i))
                        .map(|r| r.origin.group_id.as_str())
                        .collect();
                    lists_now.insert(at, share);
                    for g in &groups {
                        sources.entry((dir, g)).or_default().push(rules);
                    }
                    groups
                });
                per_dir[dir_slot(dir)] = groups.clone();
            }
            inst_groups.push(per_dir);
        }
        let mut lists: BTreeMap<(Direction, String), Vec<&'a str>> = BTreeMap::new();
        let mut list_key = Vec::with_capacity(inst_groups.len());
        for per_dir in &inst_groups {
            let mut keys: [String; 2] = [String::new(), String::new()];
            for dir in [Direction::Ingress, Direction::Egress] {
                let groups = &per_dir[dir_slot(dir)];
                let k = list_key_of(groups);
                match lists.get(&(dir, k.clone())) {
                    Some(other) if other != groups => {
                        return Err(RenderError::Name {
                            what: "security-group list",
                            id: groups.join(","),
                            other: other.join(","),
                        });
                    }
                    Some(_) => {}
                    None => {
                        lists.insert((dir, k.clone()), groups.clone());
                    }
                }
                keys[dir_slot(dir)] = k;
            }
            list_key.push(keys);
        }
        let ids: BTreeSet<&str> = sources.keys().map(|(_, g)| *g).collect();
        let keys = keys_of("security group", ids.iter().copied())?;
        let group_key: BTreeMap<&'a str, String> = ids.into_iter().zip(keys).collect();
        let mut group_chains = BTreeMap::new();
        let mut groups_now = std::collections::HashMap::new();
        let mut hits = 0;
        for ((dir, group), mut from) in sources {
            let Some(gkey) = group_key.get(group) else {
                continue;
            };
            from.sort_by_key(|l| l.as_ptr() as usize);
            let id = (dir, group.to_string());
            let same = |g: &GroupChain| {
                g.key == *gkey
                    && g.from.len() == from.len()
                    && g.from.iter().zip(&from).all(|(a, b)| Arc::ptr_eq(a, b))
            };
            let chain = match memo.groups.remove(&id).filter(same) {
                Some(g) => {
                    hits += 1;
                    g
                }
                None => {
                    // The union of the group's rules over the lists that hold it.
                    let mut rules = GroupRules::new();
                    for l in &from {
                        let share = lists_now
                            .get(&(dir, l.as_ptr() as usize))
                            .and_then(|s| s.shares.get(group));
                        for (k, nets) in share.into_iter().flatten() {
                            rules.entry(*k).or_default().extend(nets.iter().copied());
                        }
                    }
                    GroupChain {
                        from: from.iter().map(|l| Arc::clone(l)).collect(),
                        key: gkey.clone(),
                        chain: render_group_chain(dir, group, gkey, &rules)?,
                    }
                }
            };
            group_chains.insert((dir, group), chain.chain.clone());
            groups_now.insert(id, chain);
        }
        *memo = RenderMemo {
            lists: lists_now,
            groups: groups_now,
            hits,
        };
        Ok(Index {
            model,
            subnet_addrs,
            owner,
            subnet_key,
            inst_key,
            group_chains,
            group_key,
            list_key,
            lists,
        })
    }

    pub(super) fn addrs_of(&self, family: Family) -> impl Iterator<Item = (&IpAddr, &Owner)> {
        self.owner
            .iter()
            .filter(move |(a, _)| Family::of_addr(a) == family)
    }

    /// The object name of the chain a stage's verdict map picks for an
    /// address: its subnet's (NACL stages) or its instance's group list's
    /// (SG stages).
    pub(super) fn key(&self, kind: Stage, o: &Owner) -> &str {
        if kind.is_nacl() {
            &self.subnet_key[o.subnet]
        } else {
            &self.list_key[o.instance][dir_slot(kind.direction())]
        }
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

/// A named set or map with its elements.
pub(super) fn declare(kind: Kind, name: &str, decl: &[&str], elements: Vec<String>) -> Obj {
    Obj {
        kind,
        name: name.to_string(),
        decl: decl.iter().map(ToString::to_string).collect(),
        items: elements,
    }
}

fn one_liner(kind: Kind, name: String, body: String) -> Obj {
    Obj {
        kind,
        name,
        decl: vec![body],
        items: Vec::new(),
    }
}

/// A named counter with its comment.
pub(super) fn counter(name: String, comment: &str) -> Obj {
    one_liner(Kind::Counter, name, format!("comment \"{comment}\";"))
}

pub(super) fn render_timeouts(t: &mut Table, model: &FlatModel) {
    let to = model.timeouts;
    for f in Family::ALL {
        t.push(one_liner(
            Kind::Timeout,
            format!("tcp_{}", f.suffix()),
            format!(
                "protocol tcp; l3proto {}; policy = {{ established: {}, syn_sent: {n}, syn_recv: {n}, fin_wait: {c}, close_wait: {c}, last_ack: {c}, time_wait: {c}, close: {c} }};",
                f.l3proto(),
                to.tcp_established,
                n = to.tcp_new,
                c = to.tcp_closing,
            ),
        ));
        t.push(one_liner(
            Kind::Timeout,
            format!("udp_{}", f.suffix()),
            format!(
                "protocol udp; l3proto {}; policy = {{ unreplied: {}, replied: {} }};",
                f.l3proto(),
                to.udp,
                to.udp_stream
            ),
        ));
    }
}

pub(super) fn render_counters(t: &mut Table, ix: &Index<'_>) {
    t.push(counter("passthrough".into(), "passthrough"));
    t.push(counter("tracked".into(), "tracked"));
    for reason in INET_DROPS {
        t.push(counter(
            format!("drop_{}", reason.replace('-', "_")),
            reason,
        ));
    }
    for kind in [Stage::NaclOut, Stage::NaclIn] {
        for (sub, key) in ix.model.subnets.iter().zip(&ix.subnet_key) {
            for allowed in [true, false] {
                t.push(counter(
                    counter_name(kind, key, allowed),
                    &sanitize(&sub.id),
                ));
            }
        }
    }
}

/// An instance address as nft text, its owner, and its instance's id as a
/// comment.
type AddrText<'i> = (String, &'i Owner, String);

pub(super) fn render_sets(t: &mut Table, ix: &Index<'_>) {
    let bridges: BTreeSet<&str> = ix.model.subnets.iter().map(|s| s.bridge.as_str()).collect();
    let quoted: Vec<String> = bridges.iter().map(|b| format!("\"{b}\"")).collect();
    t.push(declare(Kind::Set, "bridges", &["type ifname"], quoted));
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
        let ty = format!("type {}", f.addr_type());
        t.push(declare(
            Kind::Set,
            &format!("not_carried_{}", f.suffix()),
            &[&ty, "flags interval"],
            elems,
        ));
    }
    // Every instance address written once (a model's thousands appear in
    // a dozen sets and maps), with its owner and its instance's id as a
    // comment.
    let texts: Vec<(Family, Vec<AddrText<'_>>)> = Family::ALL
        .into_iter()
        .map(|f| {
            let v = ix
                .addrs_of(f)
                .map(|(a, o)| {
                    let id = ix
                        .model
                        .instances
                        .get(o.instance)
                        .map_or("", |i| i.id.as_str());
                    (a.to_string(), o, sanitize(id))
                })
                .collect();
            (f, v)
        })
        .collect();
    let texts_of = |f: Family| {
        texts
            .iter()
            .find(|(g, _)| *g == f)
            .map_or(&[][..], |(_, v)| v.as_slice())
    };
    for f in Family::ALL {
        let all: Vec<String> = texts_of(f).iter().map(|(a, _, _)| a.clone()).collect();
        let ty = format!("type {}", f.addr_type());
        t.push(declare(
            Kind::Set,
            &format!("instances_{}", f.suffix()),
            &[&ty],
            all,
        ));
    }
    for (s, key) in ix.subnet_key.iter().enumerate() {
        for f in Family::ALL {
            let addrs: Vec<String> = ix
                .subnet_addrs
                .get(&(f, s))
                .into_iter()
                .flatten()
                .map(ToString::to_string)
                .collect();
            let ty = format!("type {}", f.addr_type());
            t.push(declare(
                Kind::Set,
                &format!("subnet_{key}_{}", f.suffix()),
                &[&ty],
                addrs,
            ));
        }
    }
    for f in Family::ALL {
        let pairs: Vec<String> = ix
            .dns_pairs(f)
            .iter()
            .map(|(a, b)| format!("{a} . {b}"))
            .collect();
        let ty = format!("type {t} . {t}", t = f.addr_type());
        t.push(declare(
            Kind::Set,
            &format!("dns_pairs_{}", f.suffix()),
            &[&ty],
            pairs,
        ));
    }
    // Verdict maps to the stage chains: NACL chains are jumped to (they
    // return on allow); an instance's SG chain is gone to (it ends in a
    // verdict: its groups' chains go on to the next stage on a match).
    for kind in CHAIN_ORDER {
        let how = if kind.is_nacl() { "jump" } else { "goto" };
        for f in Family::ALL {
            let elems: Vec<String> = texts_of(f)
                .iter()
                .map(|(a, o, _)| {
                    let (prefix, key) = (kind.prefix(), ix.key(kind, o));
                    let mut e =
                        String::with_capacity(a.len() + how.len() + prefix.len() + key.len() + 5);
                    for part in [a.as_str(), " : ", how, " ", prefix, "_", key] {
                        e.push_str(part);
                    }
                    e
                })
                .collect();
            let ty = format!("type {} : verdict", f.addr_type());
            t.push(declare(
                Kind::Map,
                &format!("{}_{}", kind.prefix(), f.suffix()),
                &[&ty],
                elems,
            ));
        }
    }
    // The SG stages' counters of each instance: a set per stage, verdict
    // and family with a counter per element (an instance's address, its id
    // as the element's comment), matched after a group's match (allow) or
    // before its list chain's drop. Elements, not named counters: nft reads
    // every named object of the table into its cache before it adds a rule,
    // and thousands of them would make every in-place update slower.
    for kind in [Stage::SgEgress, Stage::SgIngress] {
        for allowed in [true, false] {
            for f in Family::ALL {
                let elems: Vec<String> = texts_of(f)
                    .iter()
                    .map(|(a, _, id)| {
                        let mut e = String::with_capacity(a.len() + id.len() + 11);
                        for part in [a.as_str(), " comment \"", id, "\""] {
                            e.push_str(part);
                        }
                        e
                    })
                    .collect();
                let ty = format!("type {}", f.addr_type());
                t.push(declare(
                    Kind::Set,
                    &sg_counter_set(kind, allowed, f),
                    &[&ty, "counter"],
                    elems,
                ));
            }
        }
    }
}

/// `sg_in_allow_v4`, `sg_out_drop_v6`, ...: the per-instance counters of an
/// SG stage (set elements with a counter each).
pub(crate) fn sg_counter_set(kind: Stage, allowed: bool, f: Family) -> String {
    format!(
        "{}_{}_{}",
        kind.prefix(),
        if allowed { "allow" } else { "drop" },
        f.suffix()
    )
}
