//! The rendered ruleset as named objects, and the one transaction that takes
//! the kernel from the last applied ruleset to a new one.
//!
//! This module owns the shape of sgfw's two tables as data — each a list of
//! named counters, conntrack timeouts, sets, maps and chains — their text,
//! and the change between two of them: which objects to add, which chains to
//! flush and refill, which set and map elements to delete and add, which
//! objects to delete, and in which order nft accepts that in one `nft -f`
//! transaction. It knows nothing of security groups or NACLs (that is
//! [`super::render`]) and never runs `nft` (that is [`super::NftBackend`]).
//!
//! [`Snapshot`] is what the backend remembers of an applied ruleset: each
//! object's kind and declaration, a 128-bit digest of a chain's rules, a
//! set's or map's elements. A change that this cannot express in place — a
//! different declaration (set type or flags, a base chain's hook, a counter's
//! comment, a timeout policy) — is `None` from [`Snapshot::change_to`]: the
//! caller replaces both tables instead.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// What an object is, as nft names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) enum Kind {
    /// A named counter.
    Counter,
    /// A `ct timeout` object.
    Timeout,
    /// A named set.
    Set,
    /// A named map (verdicts or objects).
    Map,
    /// A chain (a base chain when its declaration has a hook).
    Chain,
}

impl Kind {
    /// The word nft declares and deletes it with.
    pub(crate) const fn word(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Timeout => "ct timeout",
            Kind::Set => "set",
            Kind::Map => "map",
            Kind::Chain => "chain",
        }
    }
}

/// One named object of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Obj {
    pub(crate) kind: Kind,
    pub(crate) name: String,
    /// Declaration: a counter's or timeout's body (one line), a set's type
    /// and flags, a base chain's hook line. Changing it replaces the tables.
    pub(crate) decl: Vec<String>,
    /// A set's or map's elements, a chain's rules (comment lines included).
    pub(crate) items: Vec<String>,
}

impl Obj {
    pub(crate) fn chain(name: impl Into<String>) -> Obj {
        Obj {
            kind: Kind::Chain,
            name: name.into(),
            decl: Vec::new(),
            items: Vec::new(),
        }
    }

    pub(crate) fn rule(&mut self, line: impl Into<String>) {
        self.items.push(line.into());
    }

    fn write(&self, out: &mut String) {
        match self.kind {
            Kind::Counter | Kind::Timeout => {
                push_line(
                    out,
                    1,
                    &format!(
                        "{} {} {{ {} }}",
                        self.kind.word(),
                        self.name,
                        self.decl.join(" ")
                    ),
                );
            }
            Kind::Set | Kind::Map => {
                push_line(out, 1, &format!("{} {} {{", self.kind.word(), self.name));
                for d in &self.decl {
                    push_line(out, 2, d);
                }
                if !self.items.is_empty() {
                    push_line(out, 2, "elements = {");
                    let last = self.items.len() - 1;
                    for (i, e) in self.items.iter().enumerate() {
                        push_line(out, 3, &format!("{e}{}", if i == last { "" } else { "," }));
                    }
                    push_line(out, 2, "}");
                }
                push_line(out, 1, "}");
            }
            Kind::Chain => {
                self.write_chain(out, true);
            }
        }
    }

    fn write_chain(&self, out: &mut String, with_rules: bool) {
        push_line(out, 1, &format!("chain {} {{", self.name));
        for d in &self.decl {
            push_line(out, 2, d);
        }
        if with_rules {
            for r in &self.items {
                push_line(out, 2, r);
            }
        }
        push_line(out, 1, "}");
    }

    /// An element's key, what `delete element` names: what precedes ` : `
    /// in a map, ` comment ` in a set.
    fn element_key(&self, e: &str) -> String {
        let sep = match self.kind {
            Kind::Map => " : ",
            _ => " comment ",
        };
        e.split_once(sep).map_or(e, |(k, _)| k).to_string()
    }
}

fn push_line(out: &mut String, depth: usize, s: &str) {
    for _ in 0..depth {
        out.push('\t');
    }
    out.push_str(s);
    out.push('\n');
}

/// One table: `inet sgfw` or `bridge sgfw`, and its objects in the order
/// they are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Table {
    pub(crate) name: &'static str,
    pub(crate) objects: Vec<Obj>,
}

impl Table {
    pub(crate) fn new(name: &'static str) -> Table {
        Table {
            name,
            objects: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, obj: Obj) {
        self.objects.push(obj);
    }

    fn write(&self, out: &mut String) {
        push_line(out, 0, &format!("table {} {{", self.name));
        let mut prev: Option<Kind> = None;
        for o in &self.objects {
            let compact = matches!(o.kind, Kind::Counter | Kind::Timeout);
            if prev.is_some_and(|p| !(compact && p == o.kind)) {
                out.push('\n');
            }
            o.write(out);
            prev = Some(o.kind);
        }
        push_line(out, 0, "}");
    }
}

/// sgfw's whole ruleset: `#` header lines, then its tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub(crate) header: Vec<String>,
    pub(crate) tables: Vec<Table>,
}

impl Ruleset {
    /// The ruleset as nft reads it (`nft -f`): deterministic, the same
    /// ruleset always gives byte-identical text.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for h in &self.header {
            push_line(&mut out, 0, h);
        }
        for t in &self.tables {
            t.write(&mut out);
        }
        out
    }

    /// What the backend remembers of it once applied as `generation`.
    pub(crate) fn snapshot(&self, generation: u64) -> Snapshot {
        Snapshot {
            generation,
            tables: self
                .tables
                .iter()
                .map(|t| {
                    let objects = t
                        .objects
                        .iter()
                        .map(|o| {
                            let body = match o.kind {
                                Kind::Set | Kind::Map => Body::Elements(o.items.clone()),
                                _ => Body::Digest(digest(&o.items)),
                            };
                            (
                                ObjKey(o.kind, o.name.clone()),
                                SnapObj {
                                    decl: digest(&o.decl),
                                    body,
                                },
                            )
                        })
                        .collect();
                    (t.name.to_string(), objects)
                })
                .collect(),
        }
    }
}

/// A stable 128-bit digest of some lines (xxh3: the same on every build, so
/// a snapshot stays valid across upgrades).
fn digest(lines: &[String]) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for l in lines {
        h.update(l.as_bytes());
        h.update(b"\n");
    }
    h.digest128()
}

/// An object's identity in a table: nft keeps counters, sets and chains in
/// separate namespaces.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct ObjKey(Kind, String);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Body {
    /// A chain's rules, counters' and timeouts' nothing: digested.
    Digest(u128),
    /// A set's or map's elements.
    Elements(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SnapObj {
    decl: u128,
    body: Body,
}

/// What the backend remembers of the ruleset it applied: its generation
/// (the token of the guard set each table holds, see
/// [`super::NftBackend::apply`]) and its objects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Snapshot {
    pub(crate) generation: u64,
    #[serde(with = "tables_serde")]
    tables: BTreeMap<String, BTreeMap<ObjKey, SnapObj>>,
}

/// JSON objects need string keys: a table's objects are stored as a list.
mod tables_serde {
    use super::*;
    use serde::{Deserializer, Serializer};

    type Tables = BTreeMap<String, BTreeMap<ObjKey, SnapObj>>;

    pub(super) fn serialize<S: Serializer>(t: &Tables, s: S) -> Result<S::Ok, S::Error> {
        let v: BTreeMap<&String, Vec<(&ObjKey, &SnapObj)>> =
            t.iter().map(|(k, o)| (k, o.iter().collect())).collect();
        v.serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Tables, D::Error> {
        let v: BTreeMap<String, Vec<(ObjKey, SnapObj)>> = BTreeMap::deserialize(d)?;
        Ok(v.into_iter()
            .map(|(k, o)| (k, o.into_iter().collect()))
            .collect())
    }
}

/// The in-place change from one ruleset to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    /// The transaction (`nft -f` input); empty when nothing changed.
    pub(crate) text: String,
    /// Objects added, changed (chains refilled, sets with element changes)
    /// and deleted.
    pub(crate) objects: usize,
}

impl Snapshot {
    /// The transaction that takes the tables this snapshot describes to
    /// `new`, or `None` when a declaration changed (or a table is new or
    /// gone) and the tables must be replaced instead.
    ///
    /// Order, so that nothing is referenced before it exists or deleted
    /// while referenced: new objects (chains empty); flush the changed
    /// chains; the rules of new and changed chains; element deletes, then
    /// adds; then the objects that are gone: their chains flushed, then
    /// chains, maps and sets, counters and timeouts deleted.
    pub(crate) fn change_to(&self, new: &Ruleset) -> Option<Change> {
        let mut adds = String::new();
        let mut flushes = String::new();
        let mut fills = String::new();
        let mut elements = String::new();
        let mut gone_flush = String::new();
        let mut gone = [String::new(), String::new(), String::new()];
        let mut objects = 0;
        if self.tables.len() != new.tables.len() {
            return None;
        }
        for table in &new.tables {
            let old = self.tables.get(table.name)?;
            let mut add_block = String::new();
            let mut fill_block = String::new();
            let mut seen = BTreeSet::new();
            for o in &table.objects {
                let key = ObjKey(o.kind, o.name.clone());
                let prev = old.get(&key);
                seen.insert(key);
                let Some(prev) = prev else {
                    objects += 1;
                    match o.kind {
                        Kind::Chain => {
                            let bare = Obj {
                                items: Vec::new(),
                                ..o.clone()
                            };
                            bare.write_chain(&mut add_block, false);
                            if !o.items.is_empty() {
                                o.write_chain(&mut fill_block, true);
                            }
                        }
                        Kind::Set | Kind::Map => {
                            let bare = Obj {
                                items: Vec::new(),
                                ..o.clone()
                            };
                            bare.write(&mut add_block);
                            element_line(&mut elements, "add", table.name, &o.name, &o.items);
                        }
                        Kind::Counter | Kind::Timeout => o.write(&mut add_block),
                    }
                    continue;
                };
                if prev.decl != digest(&o.decl) {
                    return None;
                }
                match (&prev.body, o.kind) {
                    (Body::Elements(was), Kind::Set | Kind::Map) => {
                        let now: BTreeSet<&String> = o.items.iter().collect();
                        let was_set: BTreeSet<&String> = was.iter().collect();
                        let removed: Vec<String> =
                            was_set.difference(&now).map(|e| o.element_key(e)).collect();
                        let added: Vec<String> =
                            now.difference(&was_set).map(|e| (*e).clone()).collect();
                        if !removed.is_empty() || !added.is_empty() {
                            objects += 1;
                        }
                        element_line(&mut elements, "delete", table.name, &o.name, &removed);
                        element_line(&mut elements, "add", table.name, &o.name, &added);
                    }
                    (Body::Digest(d), Kind::Chain) => {
                        if *d != digest(&o.items) {
                            objects += 1;
                            flushes.push_str(&format!("flush chain {} {}\n", table.name, o.name));
                            o.write_chain(&mut fill_block, true);
                        }
                    }
                    (Body::Digest(_), Kind::Counter | Kind::Timeout) => {}
                    _ => return None,
                }
            }
            for (key, _) in old.iter().filter(|(k, _)| !seen.contains(*k)) {
                let ObjKey(kind, name) = key;
                objects += 1;
                let slot = match kind {
                    Kind::Chain => {
                        gone_flush.push_str(&format!("flush chain {} {name}\n", table.name));
                        0
                    }
                    Kind::Set | Kind::Map => 1,
                    Kind::Counter | Kind::Timeout => 2,
                };
                gone[slot].push_str(&format!("delete {} {} {name}\n", kind.word(), table.name));
            }
            for (block, into) in [(add_block, &mut adds), (fill_block, &mut fills)] {
                if !block.is_empty() {
                    into.push_str(&format!("table {} {{\n{block}}}\n", table.name));
                }
            }
        }
        let mut text = adds;
        for part in [flushes, fills, elements, gone_flush] {
            text.push_str(&part);
        }
        for part in gone {
            text.push_str(&part);
        }
        Some(Change { text, objects })
    }
}

fn element_line(out: &mut String, verb: &str, table: &str, name: &str, items: &[String]) {
    if items.is_empty() {
        return;
    }
    out.push_str(&format!(
        "{verb} element {table} {name} {{ {} }}\n",
        items.join(", ")
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str, elems: &[&str]) -> Obj {
        Obj {
            kind: Kind::Map,
            name: name.into(),
            decl: vec!["type ipv4_addr : verdict".into()],
            items: elems.iter().map(ToString::to_string).collect(),
        }
    }

    fn chain(name: &str, rules: &[&str]) -> Obj {
        let mut c = Obj::chain(name);
        for r in rules {
            c.rule(*r);
        }
        c
    }

    fn ruleset(objects: Vec<Obj>) -> Ruleset {
        Ruleset {
            header: vec!["# test".into()],
            tables: vec![Table {
                name: "inet sgfw",
                objects,
            }],
        }
    }

    fn snap(r: &Ruleset) -> Snapshot {
        let s = r.snapshot(7);
        // What the backend stores is what it reads back.
        let json = serde_json::to_string(&s).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        back
    }

    #[test]
    fn nothing_changed_is_an_empty_transaction() {
        let r = ruleset(vec![
            set("m", &["10.0.0.1 : goto a"]),
            chain("a", &["drop"]),
        ]);
        let c = snap(&r).change_to(&r).unwrap();
        assert_eq!(c.text, "");
        assert_eq!(c.objects, 0);
    }

    #[test]
    fn change_orders_adds_fills_elements_and_deletes() {
        let old = ruleset(vec![
            set("m", &["10.0.0.1 : goto a", "10.0.0.2 : goto b"]),
            chain("a", &["drop"]),
            chain("b", &["jump a", "drop"]),
            chain("keep", &["accept"]),
        ]);
        let new = ruleset(vec![
            set("m", &["10.0.0.1 : goto c", "10.0.0.3 : goto a"]),
            chain("a", &["ip saddr 1.2.3.4 accept", "drop"]),
            chain("c", &["jump a", "drop"]),
            chain("keep", &["accept"]),
        ]);
        let c = snap(&old).change_to(&new).unwrap();
        assert_eq!(
            c.text,
            "table inet sgfw {\n\tchain c {\n\t}\n}\n\
             flush chain inet sgfw a\n\
             table inet sgfw {\n\tchain a {\n\t\tip saddr 1.2.3.4 accept\n\t\tdrop\n\t}\n\tchain c {\n\t\tjump a\n\t\tdrop\n\t}\n}\n\
             delete element inet sgfw m { 10.0.0.1, 10.0.0.2 }\n\
             add element inet sgfw m { 10.0.0.1 : goto c, 10.0.0.3 : goto a }\n\
             flush chain inet sgfw b\n\
             delete chain inet sgfw b\n"
        );
        // m's elements, a refilled, c new, b gone.
        assert_eq!(c.objects, 4);
    }

    #[test]
    fn a_changed_declaration_asks_for_a_replace() {
        let old = ruleset(vec![set("m", &[])]);
        let mut new = old.clone();
        new.tables[0].objects[0].decl = vec!["type ipv6_addr : verdict".into()];
        assert_eq!(snap(&old).change_to(&new), None);
        let mut other_table = old.clone();
        other_table.tables[0].name = "bridge sgfw";
        assert_eq!(snap(&old).change_to(&other_table), None);
    }

    #[test]
    fn gone_objects_are_deleted_chains_then_sets_then_counters() {
        let old = ruleset(vec![
            Obj {
                kind: Kind::Counter,
                name: "c1".into(),
                decl: vec!["comment \"x\";".into()],
                items: Vec::new(),
            },
            set("m", &[]),
            chain("a", &["counter name \"c1\" drop"]),
        ]);
        let new = ruleset(Vec::new());
        let c = snap(&old).change_to(&new).unwrap();
        assert_eq!(
            c.text,
            "flush chain inet sgfw a\ndelete chain inet sgfw a\ndelete map inet sgfw m\ndelete counter inet sgfw c1\n"
        );
    }
}
