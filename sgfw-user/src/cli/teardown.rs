//! `sgfw teardown`: remove every trace of sgfw from this host (links,
//! programs, maps, pins, nft table, state).

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use sgfw::ebpf::EbpfBackend;

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
    let _lock = sgfw::hostlock::HostLock::acquire().context("taking the host lock")?;
    let be = EbpfBackend::default();
    let was = be.is_applied();
    be.teardown().context("removing the eBPF dataplane")?;
    let nft = super::teardown_nft()?;
    println!(
        "sgfw removed ({}{})",
        if was {
            "eBPF programs, links and maps"
        } else {
            "no eBPF dataplane"
        },
        if nft { ", nft table inet sgfw" } else { "" }
    );
    Ok(ExitCode::SUCCESS)
}
