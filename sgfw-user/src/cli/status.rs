//! `sgfw status`: the backend and why, subnets, bridges and attached ports,
//! instances and their rule counts, per-stage counters, conntrack use.

use std::process::ExitCode;

use clap::Args;
use sgfw::backend::EnforcementMode;

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

/// Runs `sgfw status`.
pub fn run(a: &StatusArgs) -> Result<ExitCode, Failure> {
    let mode = super::applied_mode().unwrap_or(EnforcementMode::Disabled);
    let st = sgfw::backend::backend_for(mode)
        .status()
        .map_err(|e| Failure::Runtime(anyhow::Error::new(e).context("reading the status")))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("backend: {} ({})", st.backend, st.reason);
    if let Some(g) = st.generation {
        println!("generation: {g}");
    }
    if let Some(d) = &st.dataplane {
        println!("dataplane: {d}");
    }
    if let Some(n) = st.conntrack_entries {
        match (st.conntrack_capacity, st.conntrack_bytes) {
            (Some(cap), Some(b)) => println!(
                "tracked flows: {n} of {cap} ({:.1} MiB of kernel memory)",
                b as f64 / 1_048_576.0
            ),
            _ => println!("tracked flows: {n}"),
        }
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
