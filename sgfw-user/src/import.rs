//! Import: from what the AWS CLI and the EC2 API print to a [`Model`].
//!
//! This module owns reading the documents of `describe-vpcs`,
//! `describe-subnets`, `describe-instances`, `describe-security-groups` (or
//! `describe-security-group-rules`), `describe-network-acls`,
//! `describe-managed-prefix-lists` and `get-managed-prefix-list-entries`,
//! given as separate documents or merged into one, and turning them into a
//! model: EC2 instances' network interfaces into model instances, subnets'
//! IPv6 associations into their IPv6 CIDR, each subnet onto a host bridge.
//!
//! It must never drop anything silently: a field whose meaning sgfw cannot
//! enforce is an error naming it ([`ImportError`]); a field AWS semantics
//! let sgfw ignore (tags, owners, descriptions, states) is a warning naming
//! it. It never judges values: [`crate::validate`] does that afterwards.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde_json::{Map, Value};

use crate::model::{
    ConnectionTracking, Instance, IpPermission, IpRange, Ipv6Range, Model, NetworkAcl, PrefixList,
    PrefixListEntry, PrefixListRef, SecurityGroup, Subnet, UserIdGroupPair,
};

/// Why documents cannot be imported. Each names the object and field.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A document or object is not of the shape the AWS CLI prints.
    #[error("{path}: {message}")]
    Shape {
        /// Where, e.g. `Reservations[0].Instances[1].NetworkInterfaces`.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A field holds something sgfw cannot enforce as EC2 would.
    #[error("{path}: {value} cannot be expressed: {why}")]
    Unexpressible {
        /// Where.
        path: String,
        /// The offending value.
        value: String,
        /// Why, and what sgfw does instead (nothing: the import fails).
        why: String,
    },
    /// A subnet has no bridge: none given and none discovered.
    #[error(
        "Subnets[{subnet}]: no bridge for {cidr}: pass --bridge {subnet}=BRIDGE, or give a host bridge an address inside the subnet"
    )]
    NoBridge {
        /// Subnet id.
        subnet: String,
        /// Its IPv4 CIDR.
        cidr: String,
    },
    /// The document is not JSON, or not a model.
    #[error("not a model or an AWS CLI document")]
    Model(#[source] crate::model::ModelError),
    /// Two documents give the same object differently.
    #[error("{kind} {id} is given twice, differently")]
    Conflict {
        /// Object kind.
        kind: &'static str,
        /// Its id.
        id: String,
    },
}

/// How to import.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Subnet id → host bridge, given by the operator.
    pub bridges: BTreeMap<String, String>,
    /// The host's bridges and their addresses, for discovery: the bridge with
    /// an address inside a subnet's IPv4 CIDR carries that subnet.
    pub host_bridges: Vec<(String, Vec<IpNet>)>,
    /// Only this VPC's objects (the only one, when the documents hold one).
    pub vpc: Option<String>,
}

/// A model and what was ignored on the way.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The model.
    pub model: Model,
    /// One line per ignored field or skipped object, naming it.
    pub warnings: Vec<String>,
}

/// An EC2 object and where it was found (`document 2.Subnets[0]`).
type Located = (String, Map<String, Value>);
/// The same, borrowed.
type LocatedRef<'a> = (String, &'a Map<String, Value>);

/// The EC2 objects of one or more documents, merged by kind.
#[derive(Debug, Default)]
struct Collected {
    vpcs: Vec<Located>,
    subnets: Vec<Located>,
    instances: Vec<Located>,
    groups: Vec<Located>,
    group_rules: Vec<Located>,
    nacls: Vec<Located>,
    prefix_lists: Vec<Located>,
    /// Prefix-list id → entries (from `get-managed-prefix-list-entries`).
    prefix_entries: BTreeMap<String, Vec<Located>>,
}

/// Whether `doc` is, unambiguously, an AWS CLI document rather than a model:
/// it has `Reservations`, `Vpcs` or `SecurityGroupRules` (a model's
/// `PrefixLists` key is shared with `describe-managed-prefix-lists`), or a
/// `Subnets`/`Instances` item in EC2's shape (no `Bridge`, or `NetworkInterfaces`).
pub fn is_aws_document(doc: &Value) -> bool {
    let Some(o) = doc.as_object() else {
        return false;
    };
    if ["Reservations", "Vpcs", "SecurityGroupRules"]
        .iter()
        .any(|k| o.contains_key(*k))
    {
        return true;
    }
    let items = |k: &str| {
        o.get(k)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    items("Subnets")
        .iter()
        .any(|s| s.get("Bridge").is_none() && s.get("VpcId").is_some())
        || items("Instances")
            .iter()
            .any(|i| i.get("NetworkInterfaces").is_some())
}

/// One document as a model file holds it: a model, or (when
/// [`is_aws_document`] says so) an AWS CLI document, imported with `opts`.
///
/// # Errors
///
/// [`ImportError::Model`] for text that is neither, else the import's error.
pub fn load_document(text: &str, opts: &ImportOptions) -> Result<Imported, ImportError> {
    let doc: Value = serde_json::from_str(text)
        .map_err(|e| ImportError::Model(crate::model::ModelError::Json(e)))?;
    if is_aws_document(&doc) {
        return import(&[doc], opts);
    }
    let model = serde_json::from_value(doc)
        .map_err(|e| ImportError::Model(crate::model::ModelError::Json(e)))?;
    Ok(Imported {
        model,
        warnings: Vec::new(),
    })
}

/// Imports `docs` (each a parsed AWS CLI document, or one merged document).
///
/// # Errors
///
/// The first [`ImportError`]; nothing is returned half-imported.
pub fn import(docs: &[Value], opts: &ImportOptions) -> Result<Imported, ImportError> {
    let mut c = Collected::default();
    let mut warnings = Vec::new();
    for (d, doc) in docs.iter().enumerate() {
        collect(&mut c, doc, &format!("document {}", d + 1), &mut warnings)?;
    }
    let vpc = pick_vpc(&c, opts)?;
    let in_vpc = |o: &Map<String, Value>| match (&vpc, o.get("VpcId").and_then(Value::as_str)) {
        (Some(v), Some(x)) => v == x,
        _ => true,
    };

    let mut model = Model::default();
    // Amazon DNS: the VPC's base address + 2, when the VPC is known.
    let dns = c
        .vpcs
        .iter()
        .find(|(_, o)| in_vpc(o))
        .and_then(|(_, o)| o.get("CidrBlock").and_then(Value::as_str))
        .and_then(|s| s.parse::<ipnet::Ipv4Net>().ok())
        .map(|n| std::net::Ipv4Addr::from(u32::from(n.network()).wrapping_add(2)));

    for (path, s) in &c.subnets {
        if !in_vpc(s) {
            warnings.push(format!("{path}: in another VPC, skipped"));
            continue;
        }
        model
            .subnets
            .push(subnet(path, s, opts, dns, &mut warnings)?);
    }
    let subnet_ids: BTreeSet<String> = model.subnets.iter().map(|s| s.subnet_id.clone()).collect();

    let mut timeouts: Option<(String, ConnectionTracking)> = None;
    for (path, i) in &c.instances {
        if !in_vpc(i) {
            warnings.push(format!("{path}: in another VPC, skipped"));
            continue;
        }
        for (inst, ct, ct_path) in instance(path, i, &subnet_ids, &mut warnings)? {
            if let Some(ct) = ct {
                match &timeouts {
                    Some((_, prev)) if *prev != ct => {
                        return Err(ImportError::Unexpressible {
                            path: ct_path,
                            value: format!("{ct:?}"),
                            why: format!(
                                "sgfw applies one set of connection-tracking timeouts to the whole model, and {} gives another",
                                timeouts.as_ref().map_or("", |t| t.0.as_str())
                            ),
                        });
                    }
                    Some(_) => {}
                    None => timeouts = Some((ct_path, ct)),
                }
            }
            model.instances.push(inst);
        }
    }
    model.connection_tracking = timeouts.map(|t| t.1);

    let mut groups: BTreeMap<String, SecurityGroup> = BTreeMap::new();
    for (path, g) in &c.groups {
        if !in_vpc(g) {
            warnings.push(format!("{path}: in another VPC, skipped"));
            continue;
        }
        let sg = group(path, g, &mut warnings)?;
        if let Some(prev) = groups.get(&sg.group_id) {
            if *prev != sg {
                return Err(ImportError::Conflict {
                    kind: "security group",
                    id: sg.group_id,
                });
            }
            continue;
        }
        groups.insert(sg.group_id.clone(), sg);
    }
    group_rules(&c, &mut groups, &mut warnings)?;
    model.security_groups = groups.into_values().collect();

    for (path, n) in &c.nacls {
        if !in_vpc(n) {
            warnings.push(format!("{path}: in another VPC, skipped"));
            continue;
        }
        model.network_acls.push(nacl(path, n, &mut warnings)?);
    }

    model.prefix_lists = prefix_lists(&c, &mut warnings)?;
    Ok(Imported {
        model,
        warnings: summarize(warnings),
    })
}

/// One line per ignored field kind (`Subnets[].AvailabilityZone: ignored
/// in 2 objects ...`) instead of one per object; other warnings as they are.
fn summarize(warnings: Vec<String>) -> Vec<String> {
    const IGNORED: &str = ": ignored (no effect on filtering)";
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for w in warnings {
        let Some(path) = w.strip_suffix(IGNORED) else {
            out.push(w);
            continue;
        };
        // `document 2.Subnets[1].Tags` -> `Subnets[].Tags`.
        let path = path.split_once('.').map_or(path, |(_, rest)| rest);
        let mut key = String::new();
        let mut skipping = false;
        for ch in path.chars() {
            match ch {
                '[' => {
                    skipping = true;
                    key.push('[');
                }
                ']' => {
                    skipping = false;
                    key.push(']');
                }
                _ if skipping => {}
                _ => key.push(ch),
            }
        }
        *counts.entry(key).or_default() += 1;
    }
    for (key, n) in counts {
        out.push(format!(
            "{key}: ignored in {n} object{} (no effect on filtering)",
            if n == 1 { "" } else { "s" }
        ));
    }
    out
}

fn shape(path: &str, message: impl Into<String>) -> ImportError {
    ImportError::Shape {
        path: path.to_string(),
        message: message.into(),
    }
}

fn obj<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, ImportError> {
    v.as_object()
        .ok_or_else(|| shape(path, "expected an object"))
}

fn items<'a>(
    o: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Vec<LocatedRef<'a>>, ImportError> {
    let Some(v) = o.get(key) else {
        return Ok(Vec::new());
    };
    let arr = v
        .as_array()
        .ok_or_else(|| shape(&format!("{path}.{key}"), "expected a list"))?;
    arr.iter()
        .enumerate()
        .map(|(i, x)| {
            let p = format!("{path}.{key}[{i}]");
            obj(x, &p).map(|o| (p, o))
        })
        .collect()
}

fn string(o: &Map<String, Value>, key: &str, path: &str) -> Result<String, ImportError> {
    o.get(key)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| shape(&format!("{path}.{key}"), "missing (a string)"))
}

fn opt_string(o: &Map<String, Value>, key: &str) -> Option<String> {
    o.get(key).and_then(Value::as_str).map(str::to_string)
}

/// Every key of `o` must be in `used` or `ignorable` (warned about).
fn check_keys(
    o: &Map<String, Value>,
    path: &str,
    used: &[&str],
    ignorable: &[&str],
    warnings: &mut Vec<String>,
) -> Result<(), ImportError> {
    for k in o.keys() {
        if used.contains(&k.as_str()) {
            continue;
        }
        if ignorable.contains(&k.as_str()) || ALWAYS_IGNORABLE.contains(&k.as_str()) {
            let empty = match &o[k] {
                Value::Null => true,
                Value::Array(a) => a.is_empty(),
                Value::String(s) => s.is_empty(),
                Value::Object(m) => m.is_empty(),
                _ => false,
            };
            if !empty && !QUIET.contains(&k.as_str()) {
                warnings.push(format!("{path}.{k}: ignored (no effect on filtering)"));
            }
            continue;
        }
        return Err(ImportError::Unexpressible {
            path: format!("{path}.{k}"),
            value: o[k].to_string(),
            why: "sgfw does not know this field, so it cannot enforce what it may mean".into(),
        });
    }
    Ok(())
}

/// Fields any EC2 object may carry that never change a filtering decision.
const ALWAYS_IGNORABLE: &[&str] = &[
    "Tags",
    "OwnerId",
    "Description",
    "VpcId",
    "State",
    "Arn",
    "ResponseMetadata",
];

/// Of those, the ones not worth a warning (bookkeeping, not policy).
const QUIET: &[&str] = &["OwnerId", "VpcId", "ResponseMetadata", "State", "Arn"];

fn collect(
    c: &mut Collected,
    doc: &Value,
    path: &str,
    warnings: &mut Vec<String>,
) -> Result<(), ImportError> {
    let o = obj(doc, path)?;
    for (k, v) in o {
        match k.as_str() {
            "Vpcs" => c.vpcs.extend(owned(items(o, k, path)?)),
            "Subnets" => c.subnets.extend(owned(items(o, k, path)?)),
            "Reservations" => {
                for (rp, r) in items(o, k, path)? {
                    c.instances.extend(owned(items(r, "Instances", &rp)?));
                }
            }
            "Instances" => c.instances.extend(owned(items(o, k, path)?)),
            "SecurityGroups" => c.groups.extend(owned(items(o, k, path)?)),
            "SecurityGroupRules" => c.group_rules.extend(owned(items(o, k, path)?)),
            "NetworkAcls" => c.nacls.extend(owned(items(o, k, path)?)),
            "PrefixLists" => c.prefix_lists.extend(owned(items(o, k, path)?)),
            // get-managed-prefix-list-entries prints no id: a document with
            // `PrefixListId` beside `Entries`, or a merged
            // `PrefixListEntries: {id: {Entries: [...]}}`.
            "Entries" => {
                let id = o.get("PrefixListId").and_then(Value::as_str).ok_or_else(|| {
                    shape(
                        &format!("{path}.Entries"),
                        "prefix-list entries without a PrefixListId beside them (add \"PrefixListId\": \"pl-…\" to the document)",
                    )
                })?;
                c.prefix_entries
                    .entry(id.to_string())
                    .or_default()
                    .extend(owned(items(o, k, path)?));
            }
            "PrefixListId" => {}
            "PrefixListEntries" => {
                let m = obj(v, &format!("{path}.{k}"))?;
                for (id, e) in m {
                    let p = format!("{path}.{k}.{id}");
                    let eo = obj(e, &p)?;
                    c.prefix_entries
                        .entry(id.clone())
                        .or_default()
                        .extend(owned(items(eo, "Entries", &p)?));
                }
            }
            "ResponseMetadata" | "NextToken" => {}
            other => warnings.push(format!("{path}.{other}: not an EC2 object list, ignored")),
        }
    }
    Ok(())
}

fn owned(v: Vec<LocatedRef<'_>>) -> Vec<Located> {
    v.into_iter().map(|(p, o)| (p, o.clone())).collect()
}

fn pick_vpc(c: &Collected, opts: &ImportOptions) -> Result<Option<String>, ImportError> {
    if let Some(v) = &opts.vpc {
        return Ok(Some(v.clone()));
    }
    let mut seen = BTreeSet::new();
    for (_, o) in c.vpcs.iter().chain(&c.subnets) {
        if let Some(v) = o.get("VpcId").and_then(Value::as_str) {
            seen.insert(v.to_string());
        }
    }
    match seen.len() {
        0 => Ok(None),
        1 => Ok(seen.into_iter().next()),
        _ => Err(shape(
            "Vpcs",
            format!(
                "the documents hold {} VPCs ({}); choose one with --vpc",
                seen.len(),
                seen.into_iter().collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

fn subnet(
    path: &str,
    s: &Map<String, Value>,
    opts: &ImportOptions,
    dns: Option<std::net::Ipv4Addr>,
    warnings: &mut Vec<String>,
) -> Result<Subnet, ImportError> {
    check_keys(
        s,
        path,
        &[
            "SubnetId",
            "CidrBlock",
            "Ipv6CidrBlockAssociationSet",
            "Bridge",
            "DnsAddress",
            "Ipv6CidrBlock",
        ],
        &[
            "AvailabilityZone",
            "AvailabilityZoneId",
            "AvailableIpAddressCount",
            "DefaultForAz",
            "MapPublicIpOnLaunch",
            "MapCustomerOwnedIpOnLaunch",
            "AssignIpv6AddressOnCreation",
            "SubnetArn",
            "EnableDns64",
            "Ipv6Native",
            "PrivateDnsNameOptionsOnLaunch",
            "EnableLniAtDeviceIndex",
            "BlockPublicAccessStates",
            "Type",
        ],
        warnings,
    )?;
    let id = string(s, "SubnetId", path)?;
    let cidr = string(s, "CidrBlock", path)?;
    let mut v6: Option<String> = opt_string(s, "Ipv6CidrBlock");
    for (ap, a) in items(s, "Ipv6CidrBlockAssociationSet", path)? {
        let state = a
            .get("Ipv6CidrBlockState")
            .and_then(|x| x.get("State"))
            .and_then(Value::as_str)
            .unwrap_or("associated");
        if matches!(
            state,
            "disassociating" | "disassociated" | "failing" | "failed"
        ) {
            warnings.push(format!("{ap}: state {state}, not used"));
            continue;
        }
        if state != "associated" {
            warnings.push(format!("{ap}: state {state:?} taken as associated"));
        }
        let block = string(a, "Ipv6CidrBlock", &ap)?;
        if let Some(prev) = &v6
            && *prev != block
        {
            return Err(ImportError::Unexpressible {
                path: ap,
                value: block,
                why: format!(
                    "a second IPv6 CIDR (sgfw models one per subnet; {prev} is the first)"
                ),
            });
        }
        v6 = Some(block);
    }
    let bridge = match opt_string(s, "Bridge").or_else(|| opts.bridges.get(&id).cloned()) {
        Some(b) => b,
        None => discover(&cidr, &opts.host_bridges).ok_or_else(|| ImportError::NoBridge {
            subnet: id.clone(),
            cidr: cidr.clone(),
        })?,
    };
    let mut dns_address: Vec<String> = match s.get("DnsAddress") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    if dns_address.is_empty()
        && let Some(d) = dns
    {
        dns_address.push(d.to_string());
    }
    Ok(Subnet {
        subnet_id: id,
        cidr_block: cidr,
        ipv6_cidr_block: v6,
        bridge,
        dns_address,
    })
}

/// The host bridge with an address inside `cidr` (IPv4).
fn discover(cidr: &str, host: &[(String, Vec<IpNet>)]) -> Option<String> {
    let net: IpNet = cidr.parse().ok()?;
    host.iter()
        .find(|(_, addrs)| addrs.iter().any(|a| net.contains(&a.addr())))
        .map(|(b, _)| b.clone())
}

type InstanceOut = (Instance, Option<ConnectionTracking>, String);

fn instance(
    path: &str,
    i: &Map<String, Value>,
    subnets: &BTreeSet<String>,
    warnings: &mut Vec<String>,
) -> Result<Vec<InstanceOut>, ImportError> {
    let id = string(i, "InstanceId", path)?;
    let state = i
        .get("State")
        .and_then(|s| s.get("Name"))
        .and_then(Value::as_str)
        .unwrap_or("running");
    if matches!(state, "terminated" | "shutting-down") {
        warnings.push(format!("{path} ({id}): {state}, skipped"));
        return Ok(Vec::new());
    }
    // Everything an instance carries beside its interfaces is about the
    // machine, not its network filtering; the interfaces say the rest.
    let mut enis = items(i, "NetworkInterfaces", path)?;
    if enis.is_empty() {
        // A model-shaped instance or a describe-instances item without
        // interfaces: the top-level fields are the primary interface's.
        enis.push((path.to_string(), i));
    }
    enis.sort_by_key(|(_, e)| {
        e.get("Attachment")
            .and_then(|a| a.get("DeviceIndex"))
            .and_then(Value::as_i64)
            .unwrap_or(0)
    });
    let from_interfaces = i.contains_key("NetworkInterfaces");
    let mut out = Vec::new();
    for (n, (ep, e)) in enis.into_iter().enumerate() {
        if from_interfaces {
            check_keys(
                e,
                &ep,
                &[
                    "NetworkInterfaceId",
                    "SubnetId",
                    "PrivateIpAddress",
                    "PrivateIpAddresses",
                    "Ipv6Addresses",
                    "Groups",
                    "SourceDestCheck",
                    "ConnectionTrackingConfiguration",
                    "Ipv4Prefixes",
                    "Ipv6Prefixes",
                    "Attachment",
                ],
                &[
                    "Association",
                    "MacAddress",
                    "PrivateDnsName",
                    "PublicDnsName",
                    "PublicIpAddress",
                    "Status",
                    "InterfaceType",
                    "Operator",
                    "RequesterManaged",
                    "RequesterId",
                    "EnaSrdSpecification",
                    "Ipv6Native",
                    "AvailabilityZone",
                    "TagSet",
                ],
                warnings,
            )?;
        }
        let name = if n == 0 {
            id.clone()
        } else {
            format!("{id}.{}", string(e, "NetworkInterfaceId", &ep)?)
        };
        if e.get("SourceDestCheck").and_then(Value::as_bool) == Some(false) {
            return Err(ImportError::Unexpressible {
                path: format!("{ep}.SourceDestCheck"),
                value: "false".into(),
                why: "sgfw always checks the source of what a bound port sends (an instance that routes for others cannot be enforced)".into(),
            });
        }
        let subnet_id = string(e, "SubnetId", &ep).or_else(|_| string(i, "SubnetId", path))?;
        if !subnets.contains(&subnet_id) {
            return Err(shape(
                &format!("{ep}.SubnetId"),
                format!("{subnet_id} is not among the imported subnets (add describe-subnets)"),
            ));
        }
        let mut primary = None;
        let mut secondary = Vec::new();
        for (pp, p) in items(e, "PrivateIpAddresses", &ep)? {
            let a = string(p, "PrivateIpAddress", &pp)?;
            if p.get("Primary").and_then(Value::as_bool) == Some(true) && primary.is_none() {
                primary = Some(a);
            } else {
                secondary.push(a);
            }
        }
        let primary = match primary.or_else(|| opt_string(e, "PrivateIpAddress")) {
            Some(p) => p,
            None => return Err(shape(&ep, "no private IPv4 address")),
        };
        secondary.retain(|a| *a != primary);
        let mut v6 = Vec::new();
        for (vp, v) in items(e, "Ipv6Addresses", &ep)? {
            v6.push(string(v, "Ipv6Address", &vp)?);
        }
        let mut groups = Vec::new();
        for (gp, g) in items(e, "Groups", &ep)? {
            groups.push(string(g, "GroupId", &gp)?);
        }
        if groups.is_empty() {
            groups = i
                .get("SecurityGroupIds")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
        }
        let ct_path = format!("{ep}.ConnectionTrackingConfiguration");
        let ct = e
            .get("ConnectionTrackingConfiguration")
            .map(|c| {
                let o = obj(c, &ct_path)?;
                check_keys(
                    o,
                    &ct_path,
                    &["TcpEstablishedTimeout", "UdpStreamTimeout", "UdpTimeout"],
                    &[],
                    warnings,
                )?;
                let t = |k: &str| o.get(k).and_then(Value::as_i64);
                Ok::<_, ImportError>(ConnectionTracking {
                    tcp_established_timeout: t("TcpEstablishedTimeout"),
                    udp_stream_timeout: t("UdpStreamTimeout"),
                    udp_timeout: t("UdpTimeout"),
                })
            })
            .transpose()?;
        for unknown in ["Ipv4Prefixes", "Ipv6Prefixes"] {
            if e.get(unknown)
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty())
            {
                return Err(ImportError::Unexpressible {
                    path: format!("{ep}.{unknown}"),
                    value: e[unknown].to_string(),
                    why: "prefix delegation to an interface is not modelled".into(),
                });
            }
        }
        out.push((
            Instance {
                instance_id: name,
                subnet_id,
                private_ip_address: primary,
                secondary_private_ip_addresses: secondary,
                ipv6_addresses: v6,
                security_group_ids: groups,
                interface: opt_string(i, "Interface").filter(|_| n == 0),
            },
            ct,
            ct_path,
        ));
    }
    Ok(out)
}

fn group(
    path: &str,
    g: &Map<String, Value>,
    warnings: &mut Vec<String>,
) -> Result<SecurityGroup, ImportError> {
    check_keys(
        g,
        path,
        &[
            "GroupId",
            "GroupName",
            "IpPermissions",
            "IpPermissionsEgress",
        ],
        &["SecurityGroupArn"],
        warnings,
    )?;
    let id = string(g, "GroupId", path)?;
    let mut perms = |key: &str| -> Result<Vec<IpPermission>, ImportError> {
        items(g, key, path)?
            .into_iter()
            .map(|(pp, p)| permission(&pp, p, warnings))
            .collect()
    };
    let ip_permissions = perms("IpPermissions")?;
    let ip_permissions_egress = perms("IpPermissionsEgress")?;
    Ok(SecurityGroup {
        group_id: id,
        group_name: opt_string(g, "GroupName"),
        ip_permissions,
        ip_permissions_egress,
    })
}

fn permission(
    path: &str,
    p: &Map<String, Value>,
    warnings: &mut Vec<String>,
) -> Result<IpPermission, ImportError> {
    check_keys(
        p,
        path,
        &[
            "IpProtocol",
            "FromPort",
            "ToPort",
            "IpRanges",
            "Ipv6Ranges",
            "UserIdGroupPairs",
            "PrefixListIds",
        ],
        &[],
        warnings,
    )?;
    for (gp, g) in items(p, "UserIdGroupPairs", path)? {
        for cross in ["VpcPeeringConnectionId", "PeeringStatus"] {
            if let Some(v) = g.get(cross) {
                return Err(ImportError::Unexpressible {
                    path: format!("{gp}.{cross}"),
                    value: v.to_string(),
                    why: "a group in a peered VPC: its members are not in this model".into(),
                });
            }
        }
        if let Some(v) = g.get("VpcId").and_then(Value::as_str) {
            warnings.push(format!(
                "{gp}.VpcId: {v} ignored (the group's members are resolved in this model)"
            ));
        }
    }
    // The item is EC2's own shape, which the model reads as it is.
    serde_json::from_value(Value::Object(p.clone()))
        .map_err(|e| shape(path, format!("not a permission: {e}")))
}

/// `describe-security-group-rules`: one rule each, into the groups'
/// permission lists (in rule-id order, so the result is deterministic).
fn group_rules(
    c: &Collected,
    groups: &mut BTreeMap<String, SecurityGroup>,
    warnings: &mut Vec<String>,
) -> Result<(), ImportError> {
    let mut rules: Vec<&Located> = c.group_rules.iter().collect();
    rules.sort_by_key(|(_, r)| opt_string(r, "SecurityGroupRuleId"));
    let from_rules: BTreeSet<String> = rules
        .iter()
        .filter_map(|(_, r)| opt_string(r, "GroupId"))
        .collect();
    // A group given by both shapes: the rules are the whole truth.
    for id in &from_rules {
        if let Some(g) = groups.get_mut(id) {
            g.ip_permissions.clear();
            g.ip_permissions_egress.clear();
        }
    }
    for (path, r) in rules {
        check_keys(
            r,
            path,
            &[
                "SecurityGroupRuleId",
                "GroupId",
                "IsEgress",
                "IpProtocol",
                "FromPort",
                "ToPort",
                "CidrIpv4",
                "CidrIpv6",
                "PrefixListId",
                "ReferencedGroupInfo",
            ],
            &["GroupOwnerId", "SecurityGroupRuleArn"],
            warnings,
        )?;
        let gid = string(r, "GroupId", path)?;
        let egress = r
            .get("IsEgress")
            .and_then(Value::as_bool)
            .ok_or_else(|| shape(&format!("{path}.IsEgress"), "missing (true or false)"))?;
        let port = |k: &str| r.get(k).and_then(Value::as_i64);
        let mut perm = IpPermission {
            ip_protocol: match r.get("IpProtocol") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => return Err(shape(&format!("{path}.IpProtocol"), "missing")),
            },
            from_port: port("FromPort"),
            to_port: port("ToPort"),
            ..IpPermission::default()
        };
        let description = opt_string(r, "Description");
        if let Some(c4) = opt_string(r, "CidrIpv4") {
            perm.ip_ranges.push(IpRange {
                cidr_ip: c4,
                description,
            });
        } else if let Some(c6) = opt_string(r, "CidrIpv6") {
            perm.ipv6_ranges.push(Ipv6Range {
                cidr_ipv6: c6,
                description,
            });
        } else if let Some(pl) = opt_string(r, "PrefixListId") {
            perm.prefix_list_ids.push(PrefixListRef {
                prefix_list_id: pl,
                description,
            });
        } else if let Some(rg) = r.get("ReferencedGroupInfo") {
            let rp = format!("{path}.ReferencedGroupInfo");
            let ro = obj(rg, &rp)?;
            if let Some(v) = ro.get("VpcPeeringConnectionId") {
                return Err(ImportError::Unexpressible {
                    path: format!("{rp}.VpcPeeringConnectionId"),
                    value: v.to_string(),
                    why: "a group in a peered VPC: its members are not in this model".into(),
                });
            }
            perm.user_id_group_pairs.push(UserIdGroupPair {
                group_id: string(ro, "GroupId", &rp)?,
                user_id: opt_string(ro, "UserId"),
                description,
            });
        } else {
            return Err(shape(
                path,
                "no remote (CidrIpv4, CidrIpv6, PrefixListId or ReferencedGroupInfo)",
            ));
        }
        let g = groups.entry(gid.clone()).or_insert_with(|| SecurityGroup {
            group_id: gid,
            ..SecurityGroup::default()
        });
        if egress {
            g.ip_permissions_egress.push(perm);
        } else {
            g.ip_permissions.push(perm);
        }
    }
    Ok(())
}

fn nacl(
    path: &str,
    n: &Map<String, Value>,
    warnings: &mut Vec<String>,
) -> Result<NetworkAcl, ImportError> {
    check_keys(
        n,
        path,
        &["NetworkAclId", "IsDefault", "Associations", "Entries"],
        &[],
        warnings,
    )?;
    for (ep, e) in items(n, "Entries", path)? {
        check_keys(
            e,
            &ep,
            &[
                "RuleNumber",
                "Protocol",
                "RuleAction",
                "Egress",
                "CidrBlock",
                "Ipv6CidrBlock",
                "PortRange",
                "IcmpTypeCode",
            ],
            &[],
            warnings,
        )?;
    }
    serde_json::from_value(Value::Object(n.clone()))
        .map_err(|e| shape(path, format!("not a network ACL: {e}")))
}

fn prefix_lists(c: &Collected, warnings: &mut Vec<String>) -> Result<Vec<PrefixList>, ImportError> {
    let mut out: BTreeMap<String, PrefixList> = BTreeMap::new();
    for (path, p) in &c.prefix_lists {
        let id = string(p, "PrefixListId", path)?;
        out.entry(id.clone()).or_insert(PrefixList {
            prefix_list_id: id.clone(),
            entries: Vec::new(),
        });
        if !c.prefix_entries.contains_key(&id) {
            warnings.push(format!(
                "{path} ({id}): no entries given (get-managed-prefix-list-entries); rules naming it match nothing"
            ));
        }
    }
    for (id, entries) in &c.prefix_entries {
        let pl = out.entry(id.clone()).or_insert(PrefixList {
            prefix_list_id: id.clone(),
            entries: Vec::new(),
        });
        for (ep, e) in entries {
            pl.entries.push(PrefixListEntry {
                cidr: string(e, "Cidr", ep)?,
                description: opt_string(e, "Description"),
            });
        }
    }
    Ok(out.into_values().collect())
}

#[cfg(test)]
mod tests {
    //! The detection and the translation on small documents; the round
    //! trip through a real EC2 implementation is tests/tests/moto.rs.
    use std::path::Path;

    use super::*;

    /// No model file is taken for an AWS document: every example and
    /// golden model loads as the model it is.
    #[test]
    fn models_are_never_taken_for_aws_documents() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut n = 0;
        for dir in [root.join("../examples"), root.join("tests/golden/nft")] {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                if e.path().extension().is_none_or(|x| x != "json") {
                    continue;
                }
                let text = std::fs::read_to_string(e.path()).unwrap();
                let doc: Value = serde_json::from_str(&text).unwrap();
                assert!(!is_aws_document(&doc), "{}", e.path().display());
                let via = load_document(&text, &ImportOptions::default()).unwrap();
                assert_eq!(via.model, Model::from_json(&text).unwrap());
                n += 1;
            }
        }
        assert!(n >= 5);
    }

    const INSTANCES: &str = r#"{"Reservations": [{"Instances": [{
        "InstanceId": "i-1", "State": {"Name": "running"}, "VpcId": "vpc-1",
        "NetworkInterfaces": [
          {"NetworkInterfaceId": "eni-2", "SubnetId": "subnet-1", "Attachment": {"DeviceIndex": 1},
           "PrivateIpAddresses": [{"PrivateIpAddress": "10.0.1.6", "Primary": true}],
           "Groups": [{"GroupId": "sg-b"}], "SourceDestCheck": true},
          {"NetworkInterfaceId": "eni-1", "SubnetId": "subnet-1", "Attachment": {"DeviceIndex": 0},
           "PrivateIpAddresses": [{"PrivateIpAddress": "10.0.1.5", "Primary": true},
                                  {"PrivateIpAddress": "10.0.1.7", "Primary": false}],
           "Ipv6Addresses": [{"Ipv6Address": "fd00:1::5"}],
           "Groups": [{"GroupId": "sg-a"}], "SourceDestCheck": true,
           "ConnectionTrackingConfiguration": {"TcpEstablishedTimeout": 3600}}]}]}]}"#;
    const SUBNETS: &str = r#"{"Subnets": [{"SubnetId": "subnet-1", "VpcId": "vpc-1", "CidrBlock": "10.0.1.0/24",
        "Tags": [{"Key": "Name", "Value": "a"}],
        "Ipv6CidrBlockAssociationSet": [{"Ipv6CidrBlock": "fd00:1::/64", "Ipv6CidrBlockState": {"State": "associated"}}]}]}"#;

    fn docs(texts: &[&str]) -> Vec<Value> {
        texts
            .iter()
            .map(|t| serde_json::from_str(t).unwrap())
            .collect()
    }

    #[test]
    fn interfaces_become_instances_in_device_order() {
        let opts = ImportOptions {
            host_bridges: vec![("br-x".into(), vec!["10.0.1.1/24".parse().unwrap()])],
            ..ImportOptions::default()
        };
        let got = import(&docs(&[SUBNETS, INSTANCES]), &opts).unwrap();
        let m = &got.model;
        assert_eq!(m.subnets[0].bridge, "br-x", "discovered by address");
        assert_eq!(m.subnets[0].ipv6_cidr_block.as_deref(), Some("fd00:1::/64"));
        let ids: Vec<&str> = m.instances.iter().map(|i| i.instance_id.as_str()).collect();
        assert_eq!(ids, ["i-1", "i-1.eni-2"]);
        assert_eq!(m.instances[0].private_ip_address, "10.0.1.5");
        assert_eq!(m.instances[0].secondary_private_ip_addresses, ["10.0.1.7"]);
        assert_eq!(m.instances[0].ipv6_addresses, ["fd00:1::5"]);
        assert_eq!(m.instances[1].security_group_ids, ["sg-b"]);
        assert_eq!(
            m.connection_tracking
                .as_ref()
                .and_then(|c| c.tcp_established_timeout),
            Some(3600)
        );
        assert!(
            got.warnings.iter().any(|w| w.starts_with("Subnets[].Tags")),
            "{:?}",
            got.warnings
        );
    }

    #[test]
    fn what_cannot_be_enforced_is_an_error_naming_it() {
        let no_bridge = import(&docs(&[SUBNETS]), &ImportOptions::default()).unwrap_err();
        assert!(no_bridge.to_string().contains("subnet-1"), "{no_bridge}");
        let opts = ImportOptions {
            bridges: BTreeMap::from([("subnet-1".into(), "br-a".into())]),
            ..ImportOptions::default()
        };
        for (from, to, field) in [
            (
                r#""SourceDestCheck": true,
           "ConnectionTracking"#,
                r#""SourceDestCheck": false,
           "ConnectionTracking"#,
                "SourceDestCheck",
            ),
            (
                r#""Attachment": {"DeviceIndex": 1},"#,
                r#""Attachment": {"DeviceIndex": 1}, "Ipv4Prefixes": [{"Ipv4Prefix": "10.0.1.16/28"}],"#,
                "Ipv4Prefixes",
            ),
            (
                r#""TcpEstablishedTimeout": 3600"#,
                r#""TcpEstablishedTimeout": 3600}, "x": {"#,
                "x",
            ),
        ] {
            let text = INSTANCES.replace(from, to);
            assert_ne!(text, INSTANCES, "{field}");
            let mut d = docs(&[SUBNETS]);
            match serde_json::from_str::<Value>(&text) {
                Ok(v) => d.push(v),
                Err(_) => continue,
            }
            let e = import(&d, &opts).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
        let sg = r#"{"SecurityGroups": [{"GroupId": "sg-a", "IpPermissions": [{"IpProtocol": "-1",
            "UserIdGroupPairs": [{"GroupId": "sg-peer", "VpcPeeringConnectionId": "pcx-1"}]}]}]}"#;
        let e = import(&docs(&[sg]), &opts).unwrap_err().to_string();
        assert!(
            e.contains("VpcPeeringConnectionId") && e.contains("pcx-1"),
            "{e}"
        );
        let unknown = r#"{"SecurityGroups": [{"GroupId": "sg-a", "Frobnicate": true}]}"#;
        let e = import(&docs(&[unknown]), &opts).unwrap_err().to_string();
        assert!(e.contains("Frobnicate"), "{e}");
    }

    #[test]
    fn security_group_rules_become_permissions() {
        let rules = r#"{"SecurityGroupRules": [
          {"SecurityGroupRuleId": "sgr-2", "GroupId": "sg-a", "IsEgress": false, "IpProtocol": "tcp",
           "FromPort": 22, "ToPort": 22, "ReferencedGroupInfo": {"GroupId": "sg-b"}},
          {"SecurityGroupRuleId": "sgr-1", "GroupId": "sg-a", "IsEgress": true, "IpProtocol": "-1",
           "FromPort": -1, "ToPort": -1, "CidrIpv6": "::/0"}]}"#;
        let m = import(&docs(&[rules]), &ImportOptions::default())
            .unwrap()
            .model;
        let g = &m.security_groups[0];
        assert_eq!(g.ip_permissions[0].user_id_group_pairs[0].group_id, "sg-b");
        assert_eq!(g.ip_permissions_egress[0].ipv6_ranges[0].cidr_ipv6, "::/0");
    }
}
