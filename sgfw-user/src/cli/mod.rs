//! Command-line parsing, shared helpers, and dispatch to one module per
//! subcommand. Errors carry their whole cause chain in one line; bad input
//! (a model that does not load or validate, bad arguments) exits 2,
//! everything else that fails exits 1.

pub mod apply;
#[cfg(feature = "bench")]
pub mod bench;
pub mod demo;
pub mod explain;
pub mod export;
pub mod flows;
pub mod import;
pub mod render;
pub mod run;
pub mod status;
pub mod teardown;
pub mod validate;

use std::path::Path;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sgfw::flat::FlatModel;

/// Why a command failed, which decides the exit code.
#[derive(Debug)]
pub enum Failure {
    /// Bad input or usage: exit 2.
    BadInput(anyhow::Error),
    /// Anything else: exit 1.
    Runtime(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Runtime(e.into())
    }
}

/// The error and its causes, on one line.
pub fn chain(e: &anyhow::Error) -> String {
    let mut s = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
    }
    s
}

/// Enforce AWS VPC security groups and network ACLs on this Linux host.
///
/// sgfw reads a VPC model in EC2's own JSON shapes (Subnets, Instances,
/// SecurityGroups, NetworkAcls) and enforces it in the kernel: eBPF TC
/// classifiers on every port of each subnet's bridge, or nftables where BPF
/// cannot be loaded.
#[derive(Debug, Parser)]
#[command(name = "sgfw", version, propagate_version = true)]
pub struct Cli {
    /// More log output (also RUST_LOG=debug).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Check a model; exit 0 when valid (warnings on stderr), 2 with every error when not.
    Validate(validate::ValidateArgs),
    /// Build a model from AWS CLI JSON (describe-subnets, describe-instances, ...).
    Import(import::ImportArgs),
    /// Export the model (Kubernetes NetworkPolicy and AdminNetworkPolicy).
    Export(export::ExportArgs),
    /// The verdict for the first packet of a new flow, stage by stage.
    Explain(explain::ExplainArgs),
    /// Validate, compile and enforce a model; exits with enforcement in place.
    Apply(apply::ApplyArgs),
    /// Remove every trace of sgfw from this host.
    Teardown(teardown::TeardownArgs),
    /// Show the backend, subnets, ports, instances and counters.
    Status(status::StatusArgs),
    /// Stream dataplane decisions as AWS VPC Flow Log (v2) lines.
    Flows(flows::FlowsArgs),
    /// Print what a backend would write, without privileges.
    Render(render::RenderArgs),
    /// Apply, then follow the model file and new bridge ports until stopped.
    Run(run::RunArgs),
    /// Build a small VPC in network namespaces, enforce it, probe it, tear it down.
    Demo(demo::DemoArgs),
    /// Benchmarks (root): per-packet cost, real traffic, control plane, conntrack scale.
    #[cfg(feature = "bench")]
    Bench(bench::BenchArgs),
}

/// Sets up tracing from RUST_LOG (default: info, warn when `quiet`, debug with -v).
pub fn init_tracing(verbose: bool, quiet: bool) {
    let default = if verbose {
        "debug"
    } else if quiet {
        "warn"
    } else {
        "info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only for a terminal: logs in files and CI stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .without_time()
        .try_init();
}

/// A model or AWS document's text: the file, or standard input for `-`.
pub fn read_input(path: &Path) -> std::io::Result<String> {
    if path.as_os_str() == "-" {
        let mut t = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut t)?;
        Ok(t)
    } else {
        std::fs::read_to_string(path)
    }
}

/// What [`read_input`]'s failure says: `reading standard input: …` or `reading PATH: …`.
pub fn input_error(path: &Path, e: &std::io::Error) -> anyhow::Error {
    if path.as_os_str() == "-" {
        anyhow::anyhow!("reading standard input: {e}")
    } else {
        anyhow::anyhow!("reading {}: {e}", path.display())
    }
}

/// How the subcommands import an AWS document: bridges discovered on this host.
pub fn import_options() -> sgfw::import::ImportOptions {
    sgfw::import::ImportOptions {
        host_bridges: sgfw::sys::Host::bridge_addresses(&RealHost).unwrap_or_default(),
        ..Default::default()
    }
}

/// Loads (`-` = stdin), validates and flattens a model. Warnings go to
/// stderr; any error is bad input.
pub fn load_model(path: &Path) -> Result<(sgfw::validate::ValidModel, FlatModel), Failure> {
    let valid = load_valid(path)?;
    let flat = valid.flatten();
    Ok((valid, flat))
}

/// Reads, imports and validates a model file (warnings on stderr), without
/// flattening it.
pub fn load_valid(path: &Path) -> Result<sgfw::validate::ValidModel, Failure> {
    let text = read_input(path).map_err(|e| Failure::BadInput(input_error(path, &e)))?;
    // A model, or an unambiguous AWS CLI document (a Reservations[] one,
    // say) imported as `sgfw import` would, bridges discovered.
    let imported = sgfw::import::load_document(&text, &import_options()).map_err(|e| {
        Failure::BadInput(anyhow::Error::new(e).context(format!("{}", path.display())))
    })?;
    for w in &imported.warnings {
        eprintln!("warning: {w}");
    }
    let model = imported.model;
    let (valid, warnings) = sgfw::validate::validate(&model).map_err(|e| {
        Failure::BadInput(anyhow::anyhow!(
            "{} is not a valid model:\n{e}",
            path.display()
        ))
    })?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    Ok(valid)
}

/// Runs the chosen subcommand.
pub fn dispatch(cli: Cli) -> Result<ExitCode, Failure> {
    match cli.cmd {
        Cmd::Validate(a) => Ok(validate::run(&a)?),
        Cmd::Explain(a) => Ok(explain::run(&a)?),
        Cmd::Apply(a) => apply::run(&a),
        Cmd::Teardown(a) => teardown::run(&a),
        Cmd::Import(a) => import::run(&a),
        Cmd::Export(a) => export::run(&a),
        Cmd::Status(a) => status::run(&a),
        Cmd::Flows(a) => flows::run(&a),
        Cmd::Render(a) => render::run(&a),
        Cmd::Run(a) => run::run(&a),
        Cmd::Demo(a) => demo::run(&a),
        #[cfg(feature = "bench")]
        Cmd::Bench(a) => bench::run(&a),
    }
}

/// `--backend` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    /// eBPF when it can be loaded and attached, else nftables.
    Auto,
    /// TC classifiers on every bridge port.
    Ebpf,
    /// One `inet sgfw` nftables table.
    Nftables,
}

impl From<BackendArg> for BackendChoice {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Auto => BackendChoice::Auto,
            BackendArg::Ebpf => BackendChoice::Ebpf,
            BackendArg::Nftables => BackendChoice::Nftables,
        }
    }
}

use sgfw::backend::{BackendChoice, EnforcementMode, Enforcer, Probes};
use sgfw::sys::RealHost;

/// The backend in force on this host, if any ([`sgfw::backend::applied_mode`]).
pub fn applied_mode() -> Option<EnforcementMode> {
    sgfw::backend::applied_mode()
}

/// Picks the backend: the one already in force for `auto`, else the probes.
pub fn choose(arg: BackendArg) -> Result<EnforcementMode, Failure> {
    if arg == BackendArg::Auto
        && let Some(m) = applied_mode()
    {
        tracing::info!("backend: {m} (already in force on this host)");
        return Ok(m);
    }
    let probes = Probes {
        ebpf: if matches!(arg, BackendArg::Nftables) {
            Err("not probed".into())
        } else {
            sgfw::ebpf::probe()
        },
        nftables: if matches!(arg, BackendArg::Ebpf) {
            Err("not probed".into())
        } else {
            sgfw::nft::probe_nftables(&RealHost)
        },
        // The operator names the bridges; the library's daemon check is its own.
        containers: Ok(()),
    };
    let (mode, why) =
        sgfw::backend::select(arg.into(), &probes).map_err(|e| Failure::Runtime(e.into()))?;
    tracing::info!("backend: {mode} ({why})");
    Ok(mode)
}

/// The apply options of `apply` and `run`.
pub fn apply_options(
    conntrack_max: Option<u32>,
    dataplane: sgfw::ebpf::Dataplane,
) -> sgfw::ebpf::ApplyOptions {
    sgfw::ebpf::ApplyOptions {
        conntrack_max: conntrack_max.unwrap_or(0),
        emit_accepts: false,
        dataplane,
    }
}

/// Applies with the chosen backend through the library's [`Enforcer`] (the
/// one place a backend switch happens), under the host-wide lock; returns a
/// summary suffix for the user.
pub fn apply_with(
    mode: EnforcementMode,
    flat: &FlatModel,
    opts: &sgfw::ebpf::ApplyOptions,
) -> Result<String, Failure> {
    let applied = Enforcer::with_mode(mode)
        .with_options(opts.clone())
        .apply(flat)
        .map_err(|e| {
            anyhow::Error::new(e).context(format!(
                "{mode} apply failed; the previous policy (if any) stays in force"
            ))
        })?;
    for n in &applied.notes {
        eprintln!("note: {n}");
    }
    Ok(applied.summary())
}

/// Removes every backend's traces under the host-wide lock; the modes that
/// were applied.
pub fn teardown_all() -> Result<Vec<EnforcementMode>, Failure> {
    let _lock = sgfw::hostlock::HostLock::acquire().map_err(|e| Failure::Runtime(e.into()))?;
    Enforcer::with_mode(EnforcementMode::Disabled)
        .teardown_all_locked()
        .map_err(|e| Failure::Runtime(anyhow::Error::new(e).context("removing sgfw")))
}
