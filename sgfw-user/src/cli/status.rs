//! `sgfw status`: the backend and why, subnets, bridges and attached ports,
//! instances and their rule counts, per-stage counters, conntrack use.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::Args;
use serde::Serialize;
use sgfw::backend::EnforcementMode;
use sgfw::ebpf::EbpfBackend;
use sgfw::nft::NftBackend;
use sgfw::sys::RealHost;

use super::Failure;

/// Show the backend, subnets, ports, instances and counters.
///
/// Example: `sgfw status --json`
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  sgfw status\n  sgfw status --json | jq .instances")]
pub struct StatusArgs {
    /// Print one JSON document (stable field names, see README).
    #[arg(long)]
    pub json: bool,
}

/// `sgfw status --json`.
#[derive(Debug, Serialize)]
pub struct Status {
    /// `ebpf`, `nftables` or `none`.
    pub backend: String,
    /// Why that backend.
    pub reason: String,
    /// Policy generation (eBPF).
    pub generation: Option<u32>,
    /// Subnets.
    pub subnets: Vec<SubnetStatus>,
    /// Instances.
    pub instances: Vec<InstanceStatus>,
    /// Connection-tracking entries in use (eBPF).
    pub conntrack_entries: Option<usize>,
    /// Counters not tied to an instance: reason → packets.
    pub unattributed: BTreeMap<String, u64>,
}

/// One subnet.
#[derive(Debug, Serialize)]
pub struct SubnetStatus {
    /// Subnet id.
    pub id: String,
    /// Bridge.
    pub bridge: String,
    /// NACL in force.
    pub nacl: String,
    /// Ports with the classifiers attached.
    pub ports: Vec<String>,
}

/// One instance.
#[derive(Debug, Serialize)]
pub struct InstanceStatus {
    /// Instance id.
    pub id: String,
    /// Bound interface.
    pub interface: Option<String>,
    /// Resolved ingress rules.
    pub ingress_rules: usize,
    /// Resolved egress rules.
    pub egress_rules: usize,
    /// reason → packets (`allow:sg-egress`, `drop:nacl-in`, ...).
    pub counters: BTreeMap<String, u64>,
}

/// Runs `sgfw status`.
pub fn run(a: &StatusArgs) -> Result<ExitCode, Failure> {
    let st = match super::applied_mode() {
        Some(EnforcementMode::Ebpf) => ebpf_status()?,
        Some(EnforcementMode::Nftables) => nft_status()?,
        _ => Status {
            backend: "none".into(),
            reason: "sgfw is not applied on this host (sgfw apply -f MODEL)".into(),
            generation: None,
            subnets: vec![],
            instances: vec![],
            conntrack_entries: None,
            unattributed: BTreeMap::new(),
        },
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("backend: {} ({})", st.backend, st.reason);
    if let Some(g) = st.generation {
        println!("generation: {g}");
    }
    if let Some(n) = st.conntrack_entries {
        println!("tracked flows: {n}");
    }
    for s in &st.subnets {
        println!(
            "subnet {} bridge {} nacl {} ports [{}]",
            s.id,
            s.bridge,
            s.nacl,
            s.ports.join(" ")
        );
    }
    for i in &st.instances {
        let c: Vec<String> = i.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "instance {}{} rules in/out {}/{}  {}",
            i.id,
            i.interface
                .as_ref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default(),
            i.ingress_rules,
            i.egress_rules,
            c.join(" ")
        );
    }
    if !st.unattributed.is_empty() {
        let c: Vec<String> = st
            .unattributed
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("no instance: {}", c.join(" "));
    }
    Ok(ExitCode::SUCCESS)
}

fn ebpf_status() -> Result<Status, Failure> {
    let be = EbpfBackend::default();
    let state = be.state()?.unwrap_or_default();
    let counters = be.counters()?;
    let ports = be.attached_ports();
    let host = RealHost;
    let subnets = state
        .bridges
        .iter()
        .map(|(id, br)| {
            let on_bridge: Vec<String> = sgfw::sys::Host::bridge_ports(&host, br)
                .unwrap_or_default()
                .into_iter()
                .map(|p| p.name)
                .collect();
            SubnetStatus {
                id: id.clone(),
                bridge: br.clone(),
                nacl: state.nacls.get(id).cloned().unwrap_or_default(),
                ports: ports
                    .iter()
                    .filter(|(n, _)| on_bridge.contains(n))
                    .map(|(n, _)| n.clone())
                    .collect(),
            }
        })
        .collect();
    let label = |r: sgfw_common::Reason| {
        format!(
            "{}:{}",
            if r.is_drop() { "drop" } else { "allow" },
            r.name()
        )
    };
    let instances = state
        .instance_ids
        .iter()
        .map(|(idx, id)| {
            let (i, e) = state.rule_counts.get(id).copied().unwrap_or_default();
            InstanceStatus {
                id: id.clone(),
                interface: state.interfaces.get(id).cloned(),
                ingress_rules: i,
                egress_rules: e,
                counters: counters
                    .iter()
                    .filter(|((ix, _), _)| ix == idx)
                    .map(|((_, r), v)| (label(*r), *v))
                    .collect(),
            }
        })
        .collect();
    Ok(Status {
        backend: "ebpf".into(),
        reason: "TC classifiers pinned under /sys/fs/bpf/sgfw".into(),
        generation: Some(state.generation),
        subnets,
        instances,
        conntrack_entries: be.conntrack_len().ok(),
        unattributed: counters
            .iter()
            .filter(|((ix, _), _)| *ix == 0)
            .map(|((_, r), v)| (label(*r), *v))
            .collect(),
    })
}

fn nft_status() -> Result<Status, Failure> {
    let nft = NftBackend::new(&RealHost);
    let mut unattributed = BTreeMap::new();
    let mut per: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for c in nft.counters()? {
        match c.kind {
            sgfw::nft::CounterKind::Passthrough => {
                unattributed.insert("allow:passthrough".into(), c.packets);
            }
            sgfw::nft::CounterKind::Tracked => {
                unattributed.insert("allow:tracked".into(), c.packets);
            }
            sgfw::nft::CounterKind::Dropped { reason } => {
                *unattributed.entry(format!("drop:{reason}")).or_default() += c.packets;
            }
            sgfw::nft::CounterKind::Stage { stage, allowed, .. } => {
                let key = format!("{}:{stage}", if allowed { "allow" } else { "drop" });
                *per.entry(c.label.clone())
                    .or_default()
                    .entry(key)
                    .or_default() += c.packets;
            }
        }
    }
    let instances = per
        .into_iter()
        .map(|(id, counters)| InstanceStatus {
            id,
            interface: None,
            ingress_rules: 0,
            egress_rules: 0,
            counters,
        })
        .collect();
    Ok(Status {
        backend: "nftables".into(),
        reason: "table inet sgfw (counters per subnet and instance)".into(),
        generation: None,
        subnets: vec![],
        instances,
        conntrack_entries: None,
        unattributed,
    })
}
