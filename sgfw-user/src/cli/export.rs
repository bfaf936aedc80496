//! `sgfw export networkpolicy`: the model's security groups as Kubernetes
//! NetworkPolicies and its NACLs as AdminNetworkPolicies, one JSON `List`
//! that `kubectl apply -f` takes. Owns the arguments and the output; the
//! mapping is [`sgfw::export`]. What cannot be carried over is said on
//! stderr, one line each.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use sgfw::export::{ExportOptions, export};

use super::{Failure, load_model};

/// Export the model to other policy languages.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// What to export to.
    #[command(subcommand)]
    pub to: ExportTo,
}

/// The targets.
#[derive(Debug, Subcommand)]
pub enum ExportTo {
    /// Kubernetes NetworkPolicy (per instance) and AdminNetworkPolicy (per subnet).
    #[command(
        name = "networkpolicy",
        after_help = "Example:\n  sgfw export networkpolicy -f vpc.json | kubectl apply -f -"
    )]
    NetworkPolicy(NetworkPolicyArgs),
}

/// `sgfw export networkpolicy`.
#[derive(Debug, Args)]
pub struct NetworkPolicyArgs {
    /// The model (`-` reads standard input).
    #[arg(short = 'f', long = "file", value_name = "MODEL")]
    pub file: PathBuf,
    /// Pod label carrying the instance id.
    #[arg(long, default_value = "sgfw.io/instance")]
    pub instance_label: String,
    /// Prefix of the per-group pod labels (`<prefix><group-id>: "true"`).
    #[arg(long, default_value = "sg.sgfw.io/")]
    pub group_label_prefix: String,
    /// Pod label carrying the subnet id.
    #[arg(long, default_value = "sgfw.io/subnet")]
    pub subnet_label: String,
    /// Namespace of the NetworkPolicies.
    #[arg(long, default_value = "default")]
    pub namespace: String,
}

/// Runs `sgfw export`.
pub fn run(a: &ExportArgs) -> Result<ExitCode, Failure> {
    let ExportTo::NetworkPolicy(n) = &a.to;
    let (valid, _) = load_model(&n.file)?;
    let opts = ExportOptions {
        instance_label: n.instance_label.clone(),
        group_label_prefix: n.group_label_prefix.clone(),
        subnet_label: n.subnet_label.clone(),
        namespace: n.namespace.clone(),
    };
    let e = export(&valid, &opts);
    for w in &e.warnings {
        eprintln!("warning: {w}");
    }
    let text = serde_json::to_string_pretty(&e.to_list())?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    Ok(ExitCode::SUCCESS)
}
