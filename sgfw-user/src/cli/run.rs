//! `sgfw run`: the foreground daemon. Applies the model, re-applies it when
//! the file changes (debounced; a change that fails validation is reported
//! and the running policy stays), attaches bridge ports as they appear,
//! re-binds instances whose interface appears later, and tears everything
//! down on SIGINT/SIGTERM unless `--keep`.
//!
//! Ports, bridges and instance interfaces are followed through the kernel's
//! link events ([`sgfw::watch`]): each batch of netlink `RTM_NEWLINK` /
//! `RTM_DELLINK` messages attaches what is new (and binds a re-created
//! instance interface) at once. The model file is polled every 250 ms.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Args;
use sgfw::backend::{EnforcementMode, Enforcer};
use sgfw::watch::{LinkEvent, LinkEvents, WatchError};
use tokio::signal::unix::{SignalKind, signal};

use super::{BackendArg, Failure, load_model};

/// Apply, then follow the model file and new bridge ports until stopped.
///
/// Example: `RUST_LOG=info sgfw run -f vpc.json --backend ebpf`
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  RUST_LOG=info sgfw run -f vpc.json --backend ebpf")]
pub struct RunArgs {
    /// The model (EC2 JSON).
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Which dataplane enforces it.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub backend: BackendArg,
    /// Leave enforcement in place on exit.
    #[arg(long)]
    pub keep: bool,
    /// Connection-tracking capacity (eBPF, first apply only).
    #[arg(long, default_value_t = 262_144)]
    pub conntrack_max: u32,
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Runs `sgfw run`.
pub fn run(a: &RunArgs) -> Result<ExitCode, Failure> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(daemon(a))
}

async fn daemon(a: &RunArgs) -> Result<ExitCode, Failure> {
    let (_, flat) = load_model(&a.file)?;
    let mode = super::choose(a.backend)?;
    let summary = super::apply_with(mode, &flat, a.conntrack_max)?;
    tracing::info!(
        "applied {} with the {mode} backend{summary}",
        a.file.display()
    );
    let mut seen = mtime(&a.file);
    let mut pending: Option<(SystemTime, u8)> = None;
    // Subscribed before the first catch-up attach, so no port is missed.
    let mut links = match mode {
        EnforcementMode::Ebpf => {
            Some(LinkEvents::subscribe().map_err(|e| Failure::Runtime(e.into()))?)
        }
        _ => None,
    };
    let enforcer = Enforcer::with_mode(mode);
    if links.is_some() {
        attach_round(&enforcer);
    }
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            e = next_link(&mut links) => {
                match e {
                    Ok(_) => {
                        if let Some(l) = links.as_mut() {
                            l.drain();
                        }
                        attach_round(&enforcer);
                    }
                    Err(e) => {
                        // Without events, fall back to attaching on every tick.
                        tracing::error!(
                            "{}; attaching on every tick instead",
                            super::chain(&anyhow::Error::new(e))
                        );
                        links = None;
                    }
                }
                continue;
            }
            _ = tick.tick() => {}
        }
        if mode == EnforcementMode::Ebpf && links.is_none() {
            attach_round(&enforcer);
        }
        // Model file: re-apply once its mtime has been stable for one tick.
        let now = mtime(&a.file);
        if now != seen {
            match pending {
                Some((t, n)) if Some(t) == now => {
                    if n >= 1 {
                        seen = now;
                        pending = None;
                        match load_model(&a.file) {
                            Ok((_, f)) => match super::apply_with(mode, &f, a.conntrack_max) {
                                Ok(s) => tracing::info!("model changed: re-applied{s}"),
                                Err(e) => tracing::error!(
                                    "re-apply failed, the previous policy stays: {}",
                                    describe(&e)
                                ),
                            },
                            Err(e) => tracing::error!(
                                "model change rejected, the previous policy stays: {}",
                                describe(&e)
                            ),
                        }
                    } else {
                        pending = Some((t, n + 1));
                    }
                }
                _ => pending = now.map(|t| (t, 0)),
            }
        }
    }
    if a.keep {
        tracing::info!("stopping; enforcement stays in place (--keep)");
    } else {
        tracing::info!("stopping; tearing down");
        super::teardown_all()?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The next link event, or never when there is no subscription.
async fn next_link(links: &mut Option<LinkEvents>) -> Result<LinkEvent, WatchError> {
    match links {
        Some(l) => l.next().await,
        None => std::future::pending().await,
    }
}

/// Attaches what is new and logs it.
fn attach_round(enforcer: &Enforcer) {
    match enforcer.attach_new_ports() {
        Ok(new) => {
            for p in new {
                tracing::info!("attached {p}");
            }
        }
        Err(e) => tracing::warn!(
            "attaching new ports: {}",
            super::chain(&anyhow::Error::new(e))
        ),
    }
}

fn describe(f: &Failure) -> String {
    match f {
        Failure::BadInput(e) | Failure::Runtime(e) => super::chain(e),
    }
}
