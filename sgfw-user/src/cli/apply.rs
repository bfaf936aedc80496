//! `sgfw apply`: validate, compile and enforce a model, then exit with
//! enforcement left in place. Running it again with a changed model updates
//! the policy in place, atomically.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;

use super::{BackendArg, Failure, load_model};

/// Validate, compile and enforce a model; exits with enforcement in place.
///
/// Example: `sgfw apply -f vpc.json --backend ebpf`
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  sgfw apply -f vpc.json --backend ebpf\n  sgfw apply -f - < vpc.json"
)]
pub struct ApplyArgs {
    /// The model (EC2 JSON); `-` reads standard input.
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Which dataplane enforces it.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub backend: BackendArg,
    /// Connection-tracking capacity (eBPF, first apply only). Default: from
    /// the model, 2,048 entries per instance rounded up to a power of two,
    /// at least 65,536 and at most 1,048,576 (about 150 bytes of kernel
    /// memory each; `sgfw status` shows the capacity and its memory).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub conntrack_max: Option<u32>,
    /// Where instance ports judge what they send (eBPF): `tc`, or `xdp` for
    /// an XDP pre-filter in front of TC that drops denied packets before
    /// the bridge sees them (on veth ports it costs more than TC alone: see
    /// the README).
    #[arg(long, default_value = "tc")]
    pub dataplane: sgfw::ebpf::Dataplane,
}

/// Runs `sgfw apply`.
pub fn run(a: &ApplyArgs) -> Result<ExitCode, Failure> {
    let t = Instant::now();
    let (_, flat) = load_model(&a.file)?;
    let mode = super::choose(a.backend)?;
    let summary = super::apply_with(
        mode,
        &flat,
        &super::apply_options(a.conntrack_max, a.dataplane),
    )?;
    println!(
        "applied {} ({} subnets, {} instances) with the {} backend in {:.0} ms{}",
        a.file.display(),
        flat.subnets.len(),
        flat.instances.len(),
        mode,
        t.elapsed().as_secs_f64() * 1000.0,
        summary
    );
    Ok(ExitCode::SUCCESS)
}
