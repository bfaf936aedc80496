//! `sgfw run`: the foreground daemon. Applies the model, re-applies it when
//! the file changes (debounced; a change that fails validation is reported
//! and the running policy stays), attaches bridge ports as they appear,
//! re-binds instances whose interface appears later, and tears everything
//! down on SIGINT/SIGTERM unless `--keep`.
//!
//! With `--ec2-endpoint URL` the model is not a file but the VPC an EC2 API
//! endpoint describes ([`sgfw::ec2`]): polled every `--poll-interval`,
//! imported as `sgfw import` would, and re-applied when the model it gives
//! differs from the one in force. A poll that fails, or gives a VPC that
//! cannot be enforced, is reported and the running policy stays.
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
use sgfw::flat::FlatModel;
use sgfw::model::Model;
use sgfw::watch::{LinkEvent, LinkEvents, WatchError};
use tokio::signal::unix::{SignalKind, signal};

use super::{BackendArg, Failure, load_valid};
use sgfw::vpc::Vpc;

/// Apply, then follow the model file and new bridge ports until stopped.
///
/// Example: `RUST_LOG=info sgfw run -f vpc.json --backend ebpf`
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  RUST_LOG=info sgfw run -f vpc.json --backend ebpf")]
pub struct RunArgs {
    /// The model (EC2 JSON).
    #[arg(
        short = 'f',
        long = "file",
        required_unless_present = "ec2_endpoint",
        conflicts_with = "ec2_endpoint"
    )]
    pub file: Option<PathBuf>,
    /// Follow the VPC this EC2 API endpoint describes instead of a file
    /// (moto, LocalStack, fakecloud; `aws` for AWS itself). Credentials
    /// and region come from the usual AWS environment.
    #[arg(long, value_name = "URL")]
    pub ec2_endpoint: Option<String>,
    /// The VPC to follow (needed when the endpoint holds several).
    #[arg(long, requires = "ec2_endpoint")]
    pub vpc: Option<String>,
    /// Put subnet SUBNET on host bridge BRIDGE (repeatable; else the host
    /// bridge with an address in the subnet).
    #[arg(long = "bridge", value_name = "SUBNET=BRIDGE", value_parser = super::import::parse_bridge, requires = "ec2_endpoint")]
    pub bridges: Vec<(String, String)>,
    /// Seconds between two polls of the endpoint.
    #[arg(
        long,
        default_value_t = 2.0,
        value_name = "SECONDS",
        requires = "ec2_endpoint"
    )]
    pub poll_interval: f64,
    /// Which dataplane enforces it.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub backend: BackendArg,
    /// Leave enforcement in place on exit.
    #[arg(long)]
    pub keep: bool,
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

/// Where the model comes from.
enum Source {
    /// A file, re-read when its mtime changes.
    File(PathBuf),
    /// An EC2 endpoint, polled; `last` is the model in force.
    Ec2 {
        src: sgfw::ec2::Ec2Source,
        opts: sgfw::import::ImportOptions,
        last: Box<Model>,
        every: Duration,
        due: tokio::time::Instant,
        /// The last poll failed (its error was logged once).
        failing: bool,
    },
}

async fn daemon(a: &RunArgs) -> Result<ExitCode, Failure> {
    let mode = super::choose(a.backend)?;
    let options = super::apply_options(a.conntrack_max, a.dataplane);
    // A model file is held in a Vpc: each change of the file is re-flattened
    // and re-compiled only where it differs (what an emulator's deltas do).
    let mut vpc: Option<Vpc> = None;
    let mut initial: Option<Model> = None;
    let (mut source, flat, what) = match (&a.file, &a.ec2_endpoint) {
        (Some(f), _) => {
            // Validated here (a bad file fails before anything is applied);
            // the Vpc below flattens it.
            initial = Some(load_valid(f)?.model().clone());
            (
                Source::File(f.clone()),
                FlatModel::default(),
                f.display().to_string(),
            )
        }
        (None, Some(url)) => {
            if !(a.poll_interval.is_finite() && a.poll_interval >= 0.05) {
                return Err(Failure::BadInput(anyhow::anyhow!(
                    "--poll-interval {}: must be at least 0.05 seconds",
                    a.poll_interval
                )));
            }
            let endpoint = (url != "aws").then_some(url.as_str());
            let src = sgfw::ec2::Ec2Source::connect(endpoint, a.vpc.clone()).await;
            let opts = sgfw::import::ImportOptions {
                bridges: a.bridges.iter().cloned().collect(),
                vpc: a.vpc.clone(),
                ..super::import_options()
            };
            let imported = src
                .snapshot(&opts)
                .await
                .map_err(|e| Failure::BadInput(e.into()))?;
            for w in &imported.warnings {
                eprintln!("warning: {w}");
            }
            let flat = flatten(&imported.model, url)?;
            let every = Duration::from_secs_f64(a.poll_interval);
            let source = Source::Ec2 {
                src,
                opts,
                last: Box::new(imported.model),
                every,
                due: tokio::time::Instant::now() + every,
                failing: false,
            };
            (source, flat, url.clone())
        }
        (None, None) => {
            return Err(Failure::BadInput(anyhow::anyhow!(
                "give a model with -f or an endpoint with --ec2-endpoint"
            )));
        }
    };
    let file = match &source {
        Source::File(f) => Some(f.clone()),
        Source::Ec2 { .. } => None,
    };
    let summary = match &initial {
        Some(m) => {
            let enforcer = Enforcer::with_mode(mode).with_options(options.clone());
            let (v, applied) = Vpc::new(m, enforcer).map_err(|e| {
                Failure::Runtime(anyhow::Error::new(e).context(format!(
                    "{mode} apply failed; the previous policy (if any) stays in force"
                )))
            })?;
            for n in &applied.notes {
                eprintln!("note: {n}");
            }
            vpc = Some(v);
            applied.summary()
        }
        None => super::apply_with(mode, &flat, &options)?,
    };
    drop((flat, initial));
    tracing::info!("applied {what} with the {mode} backend{summary}");
    let mut seen = file.as_deref().and_then(mtime);
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
        if let Source::Ec2 {
            src,
            opts,
            last,
            every,
            due,
            failing,
        } = &mut source
        {
            if tokio::time::Instant::now() >= *due {
                poll(
                    src,
                    opts,
                    last,
                    failing,
                    mode,
                    &super::apply_options(a.conntrack_max, a.dataplane),
                )
                .await;
                *due = tokio::time::Instant::now() + *every;
            }
            continue;
        }
        let Some(file) = file.as_deref() else {
            continue;
        };
        // Model file: re-apply once its mtime has been stable for one tick.
        let now = mtime(file);
        if now != seen {
            match pending {
                Some((t, n)) if Some(t) == now => {
                    if n >= 1 {
                        seen = now;
                        pending = None;
                        match load_valid(file) {
                            Ok(valid) => match vpc.as_mut().map(|v| v.replace_validated(valid)) {
                                Some(Ok(applied)) => {
                                    tracing::info!("model changed: re-applied{}", applied.summary())
                                }
                                Some(Err(e)) => tracing::error!(
                                    "re-apply failed, the previous policy stays: {}",
                                    super::chain(&anyhow::Error::new(e))
                                ),
                                None => {}
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

/// One poll of the endpoint: re-applies when the VPC changed; a failure is
/// logged (once per run of failures) and the policy in force stays.
async fn poll(
    src: &sgfw::ec2::Ec2Source,
    opts: &sgfw::import::ImportOptions,
    last: &mut Model,
    failing: &mut bool,
    mode: EnforcementMode,
    apply: &sgfw::ebpf::ApplyOptions,
) {
    let imported = match src.snapshot(opts).await {
        Ok(i) => i,
        Err(e) => {
            let e = super::chain(&anyhow::Error::new(e));
            if *failing {
                tracing::debug!("polling the EC2 endpoint failed again: {e}");
            } else {
                tracing::error!(
                    "polling the EC2 endpoint failed, the previous policy stays (logged once until a poll succeeds): {e}"
                );
            }
            *failing = true;
            return;
        }
    };
    if std::mem::take(failing) {
        tracing::info!("the EC2 endpoint answers again");
    }
    if imported.model == *last {
        return;
    }
    for w in &imported.warnings {
        tracing::warn!("{w}");
    }
    let applied = flatten(&imported.model, "the endpoint's VPC")
        .and_then(|f| super::apply_with(mode, &f, apply));
    match applied {
        Ok(s) => {
            tracing::info!("the VPC changed: re-applied{s}");
            *last = imported.model;
        }
        // `last` stays: the same change is tried again at the next poll.
        Err(e) => tracing::error!(
            "the VPC changed but cannot be applied, the previous policy stays: {}",
            describe(&e)
        ),
    }
}

/// What `url` (`aws`: the SDK's default endpoint) describes, as one AWS CLI
/// document (`sgfw import --ec2-endpoint`).
pub fn describe_endpoint(url: &str, vpc: Option<String>) -> Result<serde_json::Value, Failure> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let endpoint = (url != "aws").then_some(url);
        let src = sgfw::ec2::Ec2Source::connect(endpoint, vpc).await;
        src.describe().await.map_err(|e| Failure::Runtime(e.into()))
    })
}

/// Validates and flattens a model read from `what`; warnings to stderr.
fn flatten(model: &Model, what: &str) -> Result<FlatModel, Failure> {
    let (valid, warnings) = sgfw::validate::validate(model)
        .map_err(|e| Failure::BadInput(anyhow::anyhow!("{what} is not a valid model:\n{e}")))?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    Ok(valid.flatten())
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
