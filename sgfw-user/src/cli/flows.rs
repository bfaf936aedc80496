//! `sgfw flows`: a live stream of dataplane decisions, one line each in the
//! AWS VPC Flow Logs version-2 field order, plus the deciding stage and rule.

use std::io::Write as _;
use std::net::IpAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use sgfw::ebpf::EbpfBackend;
use sgfw_common::{CONFIG_EMIT_ACCEPTS, Event, Reason};

use super::Failure;

/// Stream dataplane decisions as AWS VPC Flow Log (v2) lines.
///
/// Fields: version account-id interface-id srcaddr dstaddr srcport dstport
/// protocol packets bytes start end action log-status, then the deciding
/// stage and rule. interface-id is the instance id; for ICMP, srcport and
/// dstport carry the ICMP type and code. Drops only, unless --accepts.
///
/// Example: `sgfw flows --accepts --count 10`
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  sgfw flows\n  sgfw flows --accepts --json --count 10")]
pub struct FlowsArgs {
    /// One JSON object per line instead of flow-log text.
    #[arg(long)]
    pub json: bool,
    /// Also show accepted new flows (connection-tracking entries created).
    #[arg(long)]
    pub accepts: bool,
    /// Exit after this many lines.
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit after this many seconds.
    #[arg(long)]
    pub timeout: Option<f64>,
}

/// One decision, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct FlowRecord {
    /// Always 2.
    pub version: u8,
    /// Not known on a host: "-".
    pub account_id: String,
    /// The instance the decision was made for ("-" when none).
    pub interface_id: String,
    /// Source address.
    pub srcaddr: String,
    /// Destination address.
    pub dstaddr: String,
    /// Source port (ICMP: type).
    pub srcport: u16,
    /// Destination port (ICMP: code).
    pub dstport: u16,
    /// IP protocol number.
    pub protocol: u8,
    /// Packets (1 per record).
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
    /// Unix seconds.
    pub start: u64,
    /// Unix seconds.
    pub end: u64,
    /// ACCEPT or REJECT.
    pub action: String,
    /// OK.
    pub log_status: String,
    /// Deciding stage (sg-egress, nacl-out, nacl-in, sg-ingress, tracked, source-check, ...).
    pub stage: String,
    /// The SG rule or NACL rule number that decided ("-" when none).
    pub rule: String,
    /// Direction at the instance: egress (it sent) or ingress (delivered to it).
    pub direction: String,
}

fn addr(family: u8, b: &[u8; 16]) -> IpAddr {
    sgfw::policy::Family::addr_of_key(family, b)
}

fn clock(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; the clocks used always exist.
    unsafe { libc::clock_gettime(id, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

fn set_accepts(on: bool) -> Result<(), Failure> {
    EbpfBackend::default().update_config(|cfg| {
        if on {
            cfg.flags |= CONFIG_EMIT_ACCEPTS;
        } else {
            cfg.flags &= !CONFIG_EMIT_ACCEPTS;
        }
    })?;
    Ok(())
}

/// Runs `sgfw flows`.
pub fn run(a: &FlowsArgs) -> Result<ExitCode, Failure> {
    let Some(mode) = super::applied_mode() else {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "sgfw is not applied on this host"
        )));
    };
    let mut events = sgfw::backend::backend_for(mode).flows().map_err(|e| {
        Failure::Runtime(
            anyhow::Error::new(e).context(format!("the {mode} backend cannot stream flows")),
        )
    })?;
    if a.accepts {
        set_accepts(true)?;
    }
    let offset = clock(libc::CLOCK_REALTIME).saturating_sub(clock(libc::CLOCK_MONOTONIC));
    let started = Instant::now();
    let mut printed = 0u64;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let s = stop.clone();
        let _ = ctrlc::set_handler(move || s.store(true, std::sync::atomic::Ordering::SeqCst));
    }
    let result = (|| -> Result<(), Failure> {
        loop {
            while let Some(ev) = events.next_event() {
                let rec = record(&ev, events.state(), offset);
                let line = if a.json {
                    serde_json::to_string(&rec)?
                } else {
                    format!(
                        "{} {} {} {} {} {} {} {} {} {} {} {} {} {} {} {}",
                        rec.version,
                        rec.account_id,
                        rec.interface_id,
                        rec.srcaddr,
                        rec.dstaddr,
                        rec.srcport,
                        rec.dstport,
                        rec.protocol,
                        rec.packets,
                        rec.bytes,
                        rec.start,
                        rec.end,
                        rec.action,
                        rec.log_status,
                        rec.stage,
                        rec.rule
                    )
                };
                // A closed pipe (`sgfw flows | head`) ends the stream quietly.
                let mut out = std::io::stdout().lock();
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return Ok(());
                }
                printed += 1;
                if a.count.is_some_and(|c| printed >= c) {
                    return Ok(());
                }
            }
            if stop.load(std::sync::atomic::Ordering::SeqCst)
                || a.timeout
                    .is_some_and(|t| started.elapsed() >= Duration::from_secs_f64(t))
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })();
    if a.accepts {
        set_accepts(false)?;
    }
    result?;
    Ok(ExitCode::SUCCESS)
}

fn record(ev: &Event, state: &sgfw::ebpf::State, offset: u64) -> FlowRecord {
    let reason = Reason::from_u8(ev.reason).unwrap_or(Reason::DropNoPolicy);
    let secs = (ev.ts_ns.saturating_add(offset)) / 1_000_000_000;
    let rule = match reason {
        Reason::AllowSgEgress | Reason::AllowSgIngress => state
            .rule_refs
            .get(&ev.rule)
            .cloned()
            .unwrap_or_else(|| "-".into()),
        Reason::DropNaclIn | Reason::DropNaclOut => {
            if ev.rule >= 32767 {
                "nacl-rule *".into()
            } else {
                format!("nacl-rule {}", ev.rule)
            }
        }
        Reason::DropSgEgress | Reason::DropSgIngress => "no-matching-rule".into(),
        _ => "-".into(),
    };
    FlowRecord {
        version: 2,
        account_id: "-".into(),
        interface_id: state
            .instance_ids
            .get(&ev.instance)
            .cloned()
            .unwrap_or_else(|| "-".into()),
        srcaddr: addr(ev.family, &ev.src).to_string(),
        dstaddr: addr(ev.family, &ev.dst).to_string(),
        srcport: ev.sport,
        dstport: ev.dport,
        protocol: ev.proto,
        packets: 1,
        bytes: u64::from(ev.len),
        start: secs,
        end: secs,
        action: if reason.is_drop() {
            "REJECT".into()
        } else {
            "ACCEPT".into()
        },
        log_status: "OK".into(),
        stage: reason.name().into(),
        rule,
        direction: if ev.direction == 0 {
            "egress".into()
        } else {
            "ingress".into()
        },
    }
}
