//! `sgfw teardown`: remove every trace of sgfw from this host (links,
//! programs, maps, pins, nft table, state).

use std::process::ExitCode;

use clap::Args;
use sgfw::backend::EnforcementMode;

use super::Failure;

/// Remove every trace of sgfw from this host.
///
/// Example: `sgfw teardown`
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  sgfw teardown")]
pub struct TeardownArgs {}

/// Runs `sgfw teardown`.
pub fn run(_a: &TeardownArgs) -> Result<ExitCode, Failure> {
    // Under the host-wide lock: an apply racing this teardown finishes
    // before it or starts after it.
    let was = super::teardown_all()?;
    println!(
        "sgfw removed ({}{})",
        if was.contains(&EnforcementMode::Ebpf) {
            "eBPF programs, links and maps"
        } else {
            "no eBPF dataplane"
        },
        if was.contains(&EnforcementMode::Nftables) {
            ", nft table inet sgfw"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}
