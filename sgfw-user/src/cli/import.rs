//! `sgfw import`: a model from what the AWS CLI prints
//! (`describe-vpcs`, `describe-subnets`, `describe-instances`,
//! `describe-security-groups` or `describe-security-group-rules`,
//! `describe-network-acls`, `describe-managed-prefix-lists`,
//! `get-managed-prefix-list-entries`). Owns the arguments and the output;
//! the translation is [`sgfw::import`]. The result is validated before it is
//! written: a document sgfw cannot enforce is refused, never half-imported.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use sgfw::import::{ImportOptions, import};

use super::Failure;

/// Build a model from AWS CLI JSON (one file per describe call, or one merged).
///
/// Each subnet is put on the bridge `--bridge SUBNET=BRIDGE` names, else on
/// the host bridge with an address inside the subnet's CIDR.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  aws ec2 describe-subnets > subnets.json; aws ec2 describe-instances > instances.json\n  aws ec2 describe-security-groups > sgs.json; aws ec2 describe-network-acls > acls.json\n  sgfw import subnets.json instances.json sgs.json acls.json --bridge subnet-0a1b=br-a -o vpc.json"
)]
pub struct ImportArgs {
    /// The documents (`-` reads one from standard input).
    #[arg(
        required_unless_present = "ec2_endpoint",
        conflicts_with = "ec2_endpoint",
        value_name = "JSON"
    )]
    pub files: Vec<PathBuf>,
    /// Read the VPC from this EC2 API endpoint instead (`aws`: AWS itself),
    /// as `sgfw run --ec2-endpoint` would; credentials and region from the
    /// usual AWS environment.
    #[arg(long, value_name = "URL")]
    pub ec2_endpoint: Option<String>,
    /// Put subnet SUBNET on host bridge BRIDGE (repeatable).
    #[arg(long = "bridge", value_name = "SUBNET=BRIDGE", value_parser = parse_bridge)]
    pub bridges: Vec<(String, String)>,
    /// Only this VPC's objects (needed when the documents hold several).
    #[arg(long)]
    pub vpc: Option<String>,
    /// Write the model here instead of standard output.
    #[arg(short = 'o', long = "output", value_name = "MODEL")]
    pub output: Option<PathBuf>,
}

pub(super) fn parse_bridge(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.to_string(), b.to_string())),
        _ => Err(format!("--bridge {s:?}: expected SUBNET=BRIDGE")),
    }
}

/// Runs `sgfw import`.
pub fn run(a: &ImportArgs) -> Result<ExitCode, Failure> {
    let mut docs = Vec::new();
    if let Some(url) = &a.ec2_endpoint {
        docs.push(super::run::describe_endpoint(url, a.vpc.clone())?);
    }
    for f in &a.files {
        let text =
            super::read_input(f).map_err(|e| Failure::BadInput(super::input_error(f, &e)))?;
        let doc: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Failure::BadInput(anyhow::anyhow!("{}: not JSON: {e}", f.display())))?;
        docs.push(doc);
    }
    let opts = ImportOptions {
        bridges: a.bridges.iter().cloned().collect(),
        vpc: a.vpc.clone(),
        ..super::import_options()
    };
    let imported = import(&docs, &opts).map_err(|e| Failure::BadInput(e.into()))?;
    for w in &imported.warnings {
        eprintln!("warning: {w}");
    }
    let (_, vwarn) = sgfw::validate::validate(&imported.model).map_err(|e| {
        Failure::BadInput(anyhow::anyhow!(
            "the imported model is not valid; nothing written:\n{e}"
        ))
    })?;
    for w in &vwarn {
        eprintln!("warning: {w}");
    }
    let json = imported
        .model
        .to_json()
        .map_err(|e| Failure::Runtime(e.into()))?;
    match &a.output {
        Some(p) => std::fs::write(p, json + "\n")
            .map_err(|e| Failure::Runtime(anyhow::anyhow!("writing {}: {e}", p.display())))?,
        None => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{json}");
        }
    }
    eprintln!(
        "imported {} subnets, {} instances, {} security groups, {} network ACLs, {} prefix lists",
        imported.model.subnets.len(),
        imported.model.instances.len(),
        imported.model.security_groups.len(),
        imported.model.network_acls.len(),
        imported.model.prefix_lists.len()
    );
    Ok(ExitCode::SUCCESS)
}
