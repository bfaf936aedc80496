//! Which backend enforces: eBPF, nftables, or none (metadata only).
//!
//! This module owns the decision only. Whether BPF can be loaded and
//! attached and whether `nft` runs with the needed rights are probed
//! elsewhere ([`crate::nft::probe_nftables`] for nftables) and come in as
//! [`Probes`], so every branch is tested without privileges. It must never
//! probe anything itself, and never turn a failed probe into a mode that
//! claims to enforce.
//!
//! - The CLI ([`select`]): `--backend auto|ebpf|nftables|off`; `auto` takes
//!   eBPF when it works, else nftables, else fails with both reasons.
//! - The library ([`select_for_library`]): opt-in through `SGFW_ENFORCEMENT`
//!   (unset or `off` = disabled, silently); anything that cannot be honoured
//!   degrades to [`EnforcementMode::Disabled`] with exactly one warning that
//!   says why and what would fix it.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

mod dataplane;
pub use dataplane::{
    Applied, Backend, Counters, Disabled, InstanceStatus, Status, SubnetStatus, applied_mode,
    apply_switching, backend_for,
};

/// The environment variable through which the library opts in to enforcement.
pub const ENFORCEMENT_ENV: &str = "SGFW_ENFORCEMENT";

/// What enforces the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum EnforcementMode {
    /// TC classifiers on the bridge ports ([`crate::ebpf`]).
    Ebpf,
    /// `table inet sgfw` ([`crate::nft`]).
    Nftables,
    /// Nothing is enforced: the model is metadata only.
    Disabled,
}

impl fmt::Display for EnforcementMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EnforcementMode::Ebpf => "ebpf",
            EnforcementMode::Nftables => "nftables",
            EnforcementMode::Disabled => "disabled",
        })
    }
}

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub enum BackendChoice {
    /// The best backend that works here.
    #[default]
    Auto,
    /// eBPF or nothing.
    Ebpf,
    /// nftables or nothing.
    Nftables,
    /// No enforcement.
    Off,
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Ebpf => "ebpf",
            BackendChoice::Nftables => "nftables",
            BackendChoice::Off => "off",
        })
    }
}

/// A backend name that is not `auto`, `ebpf`, `nftables` or `off`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown backend {0:?}: expected auto, ebpf, nftables or off")]
pub struct ParseChoiceError(pub String);

impl FromStr for BackendChoice {
    type Err = ParseChoiceError;

    /// `auto`, `ebpf`, `nftables` or `off`, ASCII case-insensitive, surrounding
    /// whitespace ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            // `1` and `true` meant "enforce" in the seed emulator's variable.
            "auto" | "1" | "true" => Ok(BackendChoice::Auto),
            "ebpf" => Ok(BackendChoice::Ebpf),
            "nftables" => Ok(BackendChoice::Nftables),
            "off" | "0" | "false" => Ok(BackendChoice::Off),
            _ => Err(ParseChoiceError(s.to_string())),
        }
    }
}

/// The results of the two capability probes, each `Err(why)` when that
/// backend cannot work here (the reason should name the fix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probes {
    /// Can the BPF object be loaded and attached here.
    pub ebpf: Result<(), String>,
    /// Can `nft` run with the needed rights ([`crate::nft::probe_nftables`]).
    pub nftables: Result<(), String>,
    /// Does the container daemon share this host's network namespace
    /// ([`crate::sys::container_daemon_netns`]); the library enforces nothing
    /// when it does not (Docker Desktop, podman machine).
    pub containers: Result<(), String>,
}

/// Why the CLI cannot enforce what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// `--backend ebpf`, and eBPF does not work here.
    #[error("the eBPF backend cannot run here: {0}")]
    Ebpf(String),
    /// `--backend nftables`, and nftables does not work here.
    #[error("the nftables backend cannot run here: {0}")]
    Nftables(String),
    /// `--backend auto`, and neither works.
    #[error("no enforcement backend can run here: eBPF: {ebpf}; nftables: {nftables}")]
    Neither {
        /// Why eBPF does not work.
        ebpf: String,
        /// Why nftables does not work.
        nftables: String,
    },
}

/// The CLI's choice: the mode and a one-line reason for it.
///
/// # Errors
///
/// [`SelectError`] when the requested backend (or, for `auto`, both) cannot
/// run, with the probes' reasons.
pub fn select(
    choice: BackendChoice,
    probes: &Probes,
) -> Result<(EnforcementMode, String), SelectError> {
    match choice {
        BackendChoice::Off => Ok((
            EnforcementMode::Disabled,
            "enforcement is off (--backend off)".into(),
        )),
        BackendChoice::Ebpf => match &probes.ebpf {
            Ok(()) => Ok((EnforcementMode::Ebpf, "eBPF requested and available".into())),
            Err(why) => Err(SelectError::Ebpf(why.clone())),
        },
        BackendChoice::Nftables => match &probes.nftables {
            Ok(()) => Ok((
                EnforcementMode::Nftables,
                "nftables requested and available".into(),
            )),
            Err(why) => Err(SelectError::Nftables(why.clone())),
        },
        BackendChoice::Auto => match (&probes.ebpf, &probes.nftables) {
            (Ok(()), _) => Ok((EnforcementMode::Ebpf, "auto: eBPF is available".into())),
            (Err(ebpf), Ok(())) => Ok((
                EnforcementMode::Nftables,
                format!("auto: eBPF is not available ({ebpf}); using nftables"),
            )),
            (Err(ebpf), Err(nftables)) => Err(SelectError::Neither {
                ebpf: ebpf.clone(),
                nftables: nftables.clone(),
            }),
        },
    }
}

/// The library's choice from `SGFW_ENFORCEMENT` (passed in, `None` = unset)
/// and the probes: the mode, and at most one warning to show once.
///
/// - unset, empty or `off`: [`EnforcementMode::Disabled`], no warning;
/// - `auto`: the best backend that works, else disabled with a warning;
/// - `ebpf` / `nftables`: that backend, else disabled with a warning naming
///   the cause and the fix;
/// - anything else: disabled with a warning naming the value.
pub fn select_for_library(env: Option<&str>, probes: &Probes) -> (EnforcementMode, Option<String>) {
    let Some(raw) = env.filter(|v| !v.trim().is_empty()) else {
        return (EnforcementMode::Disabled, None);
    };
    let choice = match raw.parse::<BackendChoice>() {
        Ok(c) => c,
        Err(_) => {
            return (
                EnforcementMode::Disabled,
                Some(format!(
                    "sgfw: {ENFORCEMENT_ENV}={raw:?} is not one of auto (or 1, true), ebpf, nftables, off (or 0, false); enforcement is disabled (the model is metadata only): set {ENFORCEMENT_ENV} to one of those values"
                )),
            );
        }
    };
    if choice == BackendChoice::Off {
        return (EnforcementMode::Disabled, None);
    }
    if let Err(why) = &probes.containers {
        return (
            EnforcementMode::Disabled,
            Some(format!(
                "sgfw: {ENFORCEMENT_ENV}={choice}, but {why}; enforcement is disabled (the model is metadata only)"
            )),
        );
    }
    match select(choice, probes) {
        Ok((mode, _)) => (mode, None),
        Err(e) => (
            EnforcementMode::Disabled,
            Some(format!(
                "sgfw: {ENFORCEMENT_ENV}={choice}, but {e}; enforcement is disabled (the model is metadata only) until that is fixed"
            )),
        ),
    }
}

/// Errors of [`Enforcer`].
#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    /// The eBPF backend failed; the previous policy stays in force.
    #[error("eBPF backend")]
    Ebpf(#[from] crate::ebpf::EbpfError),
    /// The nftables backend failed; the previous ruleset stays in force.
    #[error("nftables backend")]
    Nft(#[from] crate::nft::NftError),
    /// The host-wide lock could not be taken.
    #[error("host lock")]
    Lock(#[from] crate::hostlock::HostLockError),
    /// The backend cannot do this.
    #[error("{what}: {why}")]
    Unsupported {
        /// What was asked.
        what: &'static str,
        /// Why not, and what to use instead.
        why: String,
    },
}

/// What an embedding AWS emulator holds: the chosen mode and the backend
/// behind it. `apply` with a new model whenever security groups, NACLs,
/// subnets or instances change; `attach_new_ports` after an instance joined a
/// bridge; `teardown` on shutdown. In [`EnforcementMode::Disabled`] every
/// call succeeds and changes nothing (the model is metadata only).
///
/// ```no_run
/// # fn model() -> sgfw::flat::FlatModel { unimplemented!() }
/// let (enforcer, warning) = sgfw::backend::Enforcer::from_env();
/// if let Some(w) = warning {
///     eprintln!("{w}"); // exactly one warning when enforcement had to be disabled
/// }
/// enforcer.apply(&model())?;
/// # Ok::<(), sgfw::backend::EnforceError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Enforcer {
    mode: EnforcementMode,
    ebpf: crate::ebpf::EbpfBackend,
    opts: crate::ebpf::ApplyOptions,
    /// What the nftables backend's last render left for the next (shared
    /// by clones).
    nft_memo: std::sync::Arc<std::sync::Mutex<crate::nft::RenderMemo>>,
}

impl Enforcer {
    /// An enforcer in `mode` (the eBPF backend at its default pin paths).
    pub fn with_mode(mode: EnforcementMode) -> Enforcer {
        Enforcer {
            mode,
            ebpf: crate::ebpf::EbpfBackend::default(),
            opts: crate::ebpf::ApplyOptions::default(),
            nft_memo: std::sync::Arc::default(),
        }
    }

    /// The mode from `SGFW_ENFORCEMENT` and the probes (see
    /// [`select_for_library`]), with the one warning to show when a
    /// requested backend cannot run. The warning is also logged once with
    /// `tracing::warn!`.
    pub fn from_env_and_probes(env: Option<&str>, probes: &Probes) -> (Enforcer, Option<String>) {
        let (mode, warning) = select_for_library(env, probes);
        if let Some(w) = &warning {
            tracing::warn!("{w}");
        }
        (Enforcer::with_mode(mode), warning)
    }

    /// [`Enforcer::from_env_and_probes`] with the real environment and
    /// probes; a backend is probed only when the setting could choose it.
    pub fn from_env() -> (Enforcer, Option<String>) {
        let env = std::env::var(ENFORCEMENT_ENV).ok();
        let choice = env.as_deref().and_then(|v| v.parse::<BackendChoice>().ok());
        let host = crate::sys::RealHost;
        let wants =
            |b: BackendChoice| matches!(choice, Some(c) if c == b || c == BackendChoice::Auto);
        let probes = Probes {
            ebpf: if wants(BackendChoice::Ebpf) {
                crate::ebpf::probe()
            } else {
                Err("not requested".into())
            },
            nftables: if wants(BackendChoice::Nftables) {
                crate::nft::probe_nftables(&host)
            } else {
                Err("not requested".into())
            },
            containers: if choice.is_some_and(|c| c != BackendChoice::Off) {
                crate::sys::container_daemon_netns()
            } else {
                Ok(())
            },
        };
        Enforcer::from_env_and_probes(env.as_deref(), &probes)
    }

    /// The mode in force.
    pub fn mode(&self) -> EnforcementMode {
        self.mode
    }

    /// Options for the next applies (conntrack capacity, accept events).
    pub fn with_options(mut self, opts: crate::ebpf::ApplyOptions) -> Enforcer {
        self.opts = opts;
        self
    }

    /// The eBPF backend at other pin and state paths (tests, benchmarks,
    /// several emulators on one host).
    pub fn with_ebpf(mut self, ebpf: crate::ebpf::EbpfBackend) -> Enforcer {
        self.ebpf = ebpf;
        self
    }

    /// The backend in force, as a [`Backend`].
    pub fn backend(&self) -> Box<dyn Backend> {
        match self.mode {
            EnforcementMode::Ebpf => Box::new(self.ebpf.clone()),
            m => backend_for(m),
        }
    }

    /// Enforces `model` (atomically; on error the previous policy stays),
    /// then removes the other backend if it was enforcing (a switch,
    /// [`apply_switching`]), all under the host-wide lock ([`crate::hostlock`]).
    ///
    /// # Errors
    ///
    /// The backend's error, with its cause chain.
    pub fn apply(&self, model: &crate::flat::FlatModel) -> Result<Applied, EnforceError> {
        let _lock = crate::hostlock::HostLock::acquire()?;
        let target = self.backend();
        if self.mode == EnforcementMode::Disabled {
            return target.enforce(model, &self.opts);
        }
        let nft = crate::nft::NftBackend::new(&crate::sys::RealHost).with_memo(&self.nft_memo);
        let others: [&dyn Backend; 2] = [&self.ebpf, &nft];
        let target: &dyn Backend = match self.mode {
            EnforcementMode::Nftables => &nft,
            _ => target.as_ref(),
        };
        apply_switching(target, &others, model, &self.opts)
    }

    /// Enforces a changed model on the backend this enforcer already applied
    /// with [`Enforcer::apply`] (atomically, under the host-wide lock), without
    /// looking for another backend to remove: the path of
    /// [`crate::vpc::Vpc`]'s deltas.
    ///
    /// # Errors
    ///
    /// The backend's error, with its cause chain.
    pub fn update(&self, model: &crate::flat::FlatModel) -> Result<Applied, EnforceError> {
        let _lock = crate::hostlock::HostLock::acquire()?;
        match self.mode {
            // A handle applies again soon: its objects' keys are recorded
            // when it is let go of ([`crate::ebpf::EbpfBackend::apply_deferred`]).
            EnforcementMode::Ebpf => Ok(dataplane::applied_of(self.ebpf.apply_deferred(
                model,
                &crate::sys::RealHost,
                &self.opts,
            )?)),
            EnforcementMode::Nftables => crate::nft::NftBackend::new(&crate::sys::RealHost)
                .with_memo(&self.nft_memo)
                .enforce(model, &self.opts),
            EnforcementMode::Disabled => self.backend().enforce(model, &self.opts),
        }
    }

    /// Attaches the eBPF classifiers to bridge ports that appeared since the
    /// last apply (instances started later); returns their names. Nothing to
    /// do for the other modes (nftables rules follow addresses).
    ///
    /// # Errors
    ///
    /// The eBPF backend's error.
    pub fn attach_new_ports(&self) -> Result<Vec<String>, EnforceError> {
        self.backend().attach()
    }

    /// Removes every trace of the backend in force.
    ///
    /// # Errors
    ///
    /// The backend's error.
    pub fn teardown(&self) -> Result<(), EnforceError> {
        let _lock = crate::hostlock::HostLock::acquire()?;
        self.backend().remove()
    }

    /// Removes every trace of every backend (`sgfw teardown`); the modes
    /// that were applied. The caller holds the host lock.
    ///
    /// # Errors
    ///
    /// The first backend error.
    pub fn teardown_all_locked(&self) -> Result<Vec<EnforcementMode>, EnforceError> {
        let nft = crate::nft::NftBackend::new(&crate::sys::RealHost);
        let all: [&dyn Backend; 2] = [&self.ebpf, &nft];
        let mut was = Vec::new();
        for b in all {
            if b.applied() {
                was.push(b.mode());
            }
        }
        // The eBPF teardown runs even when nothing is applied: it is
        // idempotent and also removes what a crashed apply left (links,
        // pins, the bridge fence table) without the pins that mark it applied.
        self.ebpf.remove()?;
        if nft.probe().is_ok() && was.contains(&EnforcementMode::Nftables) {
            Backend::remove(&nft)?;
        }
        Ok(was)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_and_true_mean_auto_zero_and_false_mean_off() {
        for v in ["1", "true", "TRUE", " auto "] {
            assert_eq!(v.parse::<BackendChoice>(), Ok(BackendChoice::Auto), "{v}");
        }
        for v in ["0", "false", "off"] {
            assert_eq!(v.parse::<BackendChoice>(), Ok(BackendChoice::Off), "{v}");
        }
        assert!("yes please".parse::<BackendChoice>().is_err());
        let (mode, warning) = select_for_library(Some("true"), &probes(false, true));
        assert_eq!((mode, warning), (EnforcementMode::Nftables, None));
    }

    /// A daemon in a VM (Docker Desktop, podman machine): its containers'
    /// traffic never crosses this host, so the library enforces nothing and
    /// says why, once.
    #[test]
    fn a_container_daemon_elsewhere_disables_with_one_warning() {
        let mut p = probes(true, true);
        p.containers =
            Err("DOCKER_HOST=tcp://vm:2375: the container daemon runs on another machine".into());
        let (e, w) = Enforcer::from_env_and_probes(Some("auto"), &p);
        assert_eq!(e.mode(), EnforcementMode::Disabled);
        assert!(w.is_some_and(|w| w.contains("DOCKER_HOST=tcp://vm:2375")));
        let (_, none) = select_for_library(Some("off"), &p);
        assert_eq!(none, None, "off stays silent");
    }

    fn probes(ebpf: bool, nft: bool) -> Probes {
        Probes {
            ebpf: if ebpf {
                Ok(())
            } else {
                Err("BPF_PROG_LOAD: EPERM; run as root or grant CAP_BPF".into())
            },
            nftables: if nft {
                Ok(())
            } else {
                Err("br_netfilter is not loaded; modprobe br_netfilter".into())
            },
            containers: Ok(()),
        }
    }

    #[test]
    fn choice_parses_the_four_names_only() {
        assert_eq!("auto".parse(), Ok(BackendChoice::Auto));
        assert_eq!("ebpf".parse(), Ok(BackendChoice::Ebpf));
        assert_eq!(" NFTables ".parse(), Ok(BackendChoice::Nftables));
        assert_eq!("off".parse(), Ok(BackendChoice::Off));
        assert_eq!(
            "iptables".parse::<BackendChoice>(),
            Err(ParseChoiceError("iptables".into()))
        );
        assert!("".parse::<BackendChoice>().is_err());
        for c in [
            BackendChoice::Auto,
            BackendChoice::Ebpf,
            BackendChoice::Nftables,
            BackendChoice::Off,
        ] {
            assert_eq!(c.to_string().parse(), Ok(c));
        }
    }

    #[test]
    fn cli_auto_prefers_ebpf_then_nftables_then_fails_with_both_reasons() {
        assert_eq!(
            select(BackendChoice::Auto, &probes(true, true)).unwrap().0,
            EnforcementMode::Ebpf
        );
        assert_eq!(
            select(BackendChoice::Auto, &probes(true, false)).unwrap().0,
            EnforcementMode::Ebpf
        );
        let (mode, why) = select(BackendChoice::Auto, &probes(false, true)).unwrap();
        assert_eq!(mode, EnforcementMode::Nftables);
        assert!(why.contains("CAP_BPF"), "{why}");
        let e = select(BackendChoice::Auto, &probes(false, false)).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("CAP_BPF") && msg.contains("modprobe br_netfilter"),
            "{msg}"
        );
    }

    #[test]
    fn cli_explicit_backend_is_that_backend_or_an_error() {
        assert_eq!(
            select(BackendChoice::Ebpf, &probes(true, false)).unwrap().0,
            EnforcementMode::Ebpf
        );
        assert_eq!(
            select(BackendChoice::Ebpf, &probes(false, true)),
            Err(SelectError::Ebpf(probes(false, true).ebpf.unwrap_err()))
        );
        assert_eq!(
            select(BackendChoice::Nftables, &probes(false, true))
                .unwrap()
                .0,
            EnforcementMode::Nftables
        );
        assert!(matches!(
            select(BackendChoice::Nftables, &probes(true, false)),
            Err(SelectError::Nftables(_))
        ));
        assert_eq!(
            select(BackendChoice::Off, &probes(false, false)).unwrap().0,
            EnforcementMode::Disabled
        );
    }

    #[test]
    fn library_unset_empty_or_off_is_disabled_silently() {
        for env in [None, Some(""), Some("  "), Some("off"), Some("OFF")] {
            assert_eq!(
                select_for_library(env, &probes(true, true)),
                (EnforcementMode::Disabled, None),
                "{env:?}"
            );
        }
    }

    #[test]
    fn library_auto_takes_the_best_or_warns_once() {
        assert_eq!(
            select_for_library(Some("auto"), &probes(true, true)),
            (EnforcementMode::Ebpf, None)
        );
        assert_eq!(
            select_for_library(Some("auto"), &probes(false, true)),
            (EnforcementMode::Nftables, None)
        );
        let (mode, warning) = select_for_library(Some("auto"), &probes(false, false));
        assert_eq!(mode, EnforcementMode::Disabled);
        let w = warning.unwrap();
        assert!(
            w.contains("CAP_BPF")
                && w.contains("modprobe br_netfilter")
                && w.contains("metadata only"),
            "{w}"
        );
    }

    #[test]
    fn library_requested_backend_unavailable_warns_with_cause_and_fix() {
        assert_eq!(
            select_for_library(Some("ebpf"), &probes(true, false)),
            (EnforcementMode::Ebpf, None)
        );
        assert_eq!(
            select_for_library(Some("nftables"), &probes(false, true)),
            (EnforcementMode::Nftables, None)
        );
        let (mode, w) = select_for_library(Some("ebpf"), &probes(false, true));
        assert_eq!(mode, EnforcementMode::Disabled);
        let w = w.unwrap();
        assert!(
            w.contains("SGFW_ENFORCEMENT=ebpf") && w.contains("CAP_BPF"),
            "{w}"
        );
        let (mode, w) = select_for_library(Some("nftables"), &probes(true, false));
        assert_eq!(mode, EnforcementMode::Disabled);
        assert!(w.unwrap().contains("modprobe br_netfilter"));
    }

    #[test]
    fn library_invalid_value_warns_naming_it() {
        let (mode, w) = select_for_library(Some("iptables"), &probes(true, true));
        assert_eq!(mode, EnforcementMode::Disabled);
        let w = w.unwrap();
        assert!(
            w.contains("\"iptables\"")
                && w.contains("auto (or 1, true), ebpf, nftables, off (or 0, false)"),
            "{w}"
        );
    }

    #[test]
    fn enforcer_in_disabled_mode_changes_nothing_and_warns_once() {
        let (e, w) = Enforcer::from_env_and_probes(Some("ebpf"), &probes(false, true));
        assert_eq!(e.mode(), EnforcementMode::Disabled);
        let w = w.expect("a warning");
        assert!(w.contains("CAP_BPF"), "{w}");
        // Metadata only: every call succeeds without touching the host.
        let flat = crate::flat::FlatModel {
            subnets: vec![],
            instances: vec![],
            timeouts: Default::default(),
        };
        assert!(e.apply(&flat).is_ok());
        assert!(e.attach_new_ports().is_ok_and(|p| p.is_empty()));
        assert!(e.teardown().is_ok());
        let (e, w) = Enforcer::from_env_and_probes(None, &probes(true, true));
        assert_eq!((e.mode(), w), (EnforcementMode::Disabled, None));
        let (e, w) = Enforcer::from_env_and_probes(Some("auto"), &probes(false, true));
        assert_eq!((e.mode(), w), (EnforcementMode::Nftables, None));
    }
}
