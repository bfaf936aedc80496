//! `cargo xtask`: the two commands that do everything (`run`, `test`), plus
//! `build`, `setup` and `bench`.
//!
//! This crate owns the build chain: it installs what a fresh machine lacks
//! (rust-src for nightly, bpf-linker linked against nightly's own LLVM, the
//! Debian packages the tests use), builds the BPF object with nightly, and
//! embeds it into the release `sgfw` binary. It never changes the host's
//! network state itself; tests and the demo clean up after themselves.

mod setup;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, run, test and benchmark sgfw")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (rust-src, bpf-linker, Debian test packages).
    Setup,
    /// Build the BPF object and the release `sgfw` binary (target/release/sgfw).
    Build,
    /// Build and run `sgfw` (default: `sgfw demo`); `cargo xtask run -- ARGS`.
    Run {
        /// Arguments for `sgfw`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Every check: fmt, clippy, unit, property and privileged integration tests.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The long differential run (root): 1,000,000 packets over 200 models.
    TestLong,
    /// Benchmarks (root): writes target/bench/report.md and charts.
    Bench {
        /// Arguments for `sgfw bench`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.cmd {
        Cmd::Setup => setup::ensure_all(&root),
        Cmd::Build => {
            setup::ensure_all(&root)?;
            build(&root)
        }
        Cmd::Run { args } => {
            setup::ensure_all(&root)?;
            build(&root)?;
            let args = if args.is_empty() {
                vec!["demo".to_string()]
            } else {
                args
            };
            let status = Command::new(root.join("target/release/sgfw"))
                .args(&args)
                .status()
                .context("running target/release/sgfw")?;
            exit_like(status)
        }
        Cmd::Test { args } => test(&root, &args),
        Cmd::TestLong => {
            setup::ensure_all(&root)?;
            build_ebpf(&root)?;
            run(Command::new("cargo")
                .current_dir(&root)
                .env("SGFW_BPF_OBJECT", bpf_object(&root))
                .env("SGFW_BPF_TEST_OBJECT", bpf_test_object(&root))
                .env("SGFW_DIFF_PACKETS", "1000000")
                .env("SGFW_DIFF_PER_MODEL", "5000")
                .args([
                    "test",
                    "--release",
                    "-p",
                    "sgfw-tests",
                    "--test",
                    "differential",
                    "--",
                    "--nocapture",
                ]))
        }
        Cmd::Bench { args } => {
            setup::ensure_all(&root)?;
            build(&root)?;
            let status = Command::new(root.join("target/release/sgfw"))
                .arg("bench")
                .arg("--out")
                .arg(root.join("target/bench"))
                .args(&args)
                .status()
                .context("running sgfw bench")?;
            exit_like(status)
        }
    }
}

fn exit_like(status: ExitStatus) -> Result<()> {
    if status.success() {
        Ok(())
    } else {
        std::process::exit(status.code().unwrap_or(1))
    }
}

fn workspace_root() -> Result<PathBuf> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

/// Where the BPF object lands; `sgfw-user/build.rs` looks here too.
pub fn bpf_object(root: &Path) -> PathBuf {
    root.join("target/bpf/bpfel-unknown-none/release/sgfw")
}

/// The test object: the production programs plus the benchmark floor
/// (`sgfw_noop`) and the port-count programs (feature `test-programs`).
/// Never loaded by an apply; the lab and the benchmarks load it.
pub fn bpf_test_object(root: &Path) -> PathBuf {
    root.join("target/bpf/sgfw-test.o")
}

/// Runs a command, echoing it, failing with its name when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: $ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", show(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", show(cmd));
    }
    Ok(())
}

fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn build_ebpf(root: &Path) -> Result<()> {
    let t = Instant::now();
    eprintln!("xtask: building the BPF objects (nightly, bpfel-unknown-none)");
    // The test object first, then the production one, in one target dir:
    // `core` is built once, only sgfw-ebpf is rebuilt for the feature.
    cargo_bpf(root, &["--features", "test-programs"])?;
    std::fs::copy(bpf_object(root), bpf_test_object(root))
        .with_context(|| format!("copying to {}", bpf_test_object(root).display()))?;
    cargo_bpf(root, &[])?;
    eprintln!(
        "xtask: BPF objects at {} and {} ({:.1}s)",
        bpf_object(root).display(),
        bpf_test_object(root).display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn cargo_bpf(root: &Path, extra: &[&str]) -> Result<()> {
    run(Command::new("cargo")
        .current_dir(root)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env(
            "CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS",
            // bpf-linker asks LLVM to keep memcpy "in order" for old JITs,
            // which turns every memset/memmove into a byte-loop call; the
            // kernels sgfw targets need no such care, so let LLVM inline them.
            "-C debuginfo=2 -C link-arg=--btf -C link-arg=--llvm-args=-bpf-expand-memcpy-in-order=0",
        )
        .args([
            "+nightly",
            "build",
            "--release",
            "-p",
            "sgfw-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .args(extra)
        .arg("--target-dir")
        .arg(root.join("target/bpf")))
}

fn build(root: &Path) -> Result<()> {
    build_ebpf(root)?;
    run(Command::new("cargo")
        .current_dir(root)
        .env("SGFW_BPF_OBJECT", bpf_object(root))
        .env("SGFW_BPF_TEST_OBJECT", bpf_test_object(root))
        .args(["build", "--release", "-p", "sgfw-user", "--bin", "sgfw"]))?;
    eprintln!(
        "xtask: built {}",
        root.join("target/release/sgfw").display()
    );
    Ok(())
}

/// Crates the library an emulator embeds must not pull in (without
/// features; tokio only with `watch`).
const NOT_IN_LEAN_LIBRARY: &[&str] = &[
    "clap",
    "plotters",
    "ctrlc",
    "tracing-subscriber",
    "tokio",
    "anyhow",
    "aws-sdk-ec2",
    "aws-config",
];

/// The lean library: `sgfw-user --lib --no-default-features` passes clippy
/// and its normal dependencies hold none of [`NOT_IN_LEAN_LIBRARY`].
fn lean_library(root: &Path) -> Result<()> {
    run(Command::new("cargo")
        .current_dir(root)
        .env("SGFW_BPF_OBJECT", bpf_object(root))
        .env("SGFW_BPF_TEST_OBJECT", bpf_test_object(root))
        .args([
            "clippy",
            "-p",
            "sgfw-user",
            "--lib",
            "--no-default-features",
            "--",
            "-D",
            "warnings",
        ]))?;
    let out = Command::new("cargo")
        .current_dir(root)
        .args([
            "tree",
            "-p",
            "sgfw-user",
            "--no-default-features",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .output()
        .context("running cargo tree")?;
    if !out.status.success() {
        bail!(
            "cargo tree failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tree = String::from_utf8_lossy(&out.stdout);
    let crates: std::collections::BTreeSet<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let found: Vec<&&str> = NOT_IN_LEAN_LIBRARY
        .iter()
        .filter(|c| crates.contains(**c))
        .collect();
    if !found.is_empty() {
        bail!("the lean library (sgfw-user --no-default-features) depends on {found:?}");
    }
    eprintln!(
        "xtask: the lean library depends on {} crates, none of {NOT_IN_LEAN_LIBRARY:?}",
        crates.len()
    );
    Ok(())
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    let t = Instant::now();
    setup::ensure_all(root)?;
    // The crafted-packet test (tests/tests/crafted.rs) sends frames with scapy.
    let python = setup::ensure_scapy()?;
    build_ebpf(root)?;
    run(Command::new("cargo")
        .current_dir(root)
        .args(["fmt", "--all", "--check"]))?;
    run(Command::new("cargo")
        .current_dir(root)
        .env("SGFW_BPF_OBJECT", bpf_object(root))
        .env("SGFW_BPF_TEST_OBJECT", bpf_test_object(root))
        .args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    lean_library(root)?;
    // Property tests: at least 10,000 cases each unless the caller says otherwise.
    let cases = std::env::var("PROPTEST_CASES").unwrap_or_else(|_| "10000".to_string());
    // The release binary is what the integration tests drive as a user would.
    run(Command::new("cargo")
        .current_dir(root)
        .env("SGFW_BPF_OBJECT", bpf_object(root))
        .env("SGFW_BPF_TEST_OBJECT", bpf_test_object(root))
        .args(["build", "--release", "-p", "sgfw-user", "--bin", "sgfw"]))?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root)
        .env("SGFW_BPF_OBJECT", bpf_object(root))
        .env("SGFW_BPF_TEST_OBJECT", bpf_test_object(root))
        .env("SGFW_BIN", root.join("target/release/sgfw"))
        .env("SGFW_PYTHON", python)
        .env("PROPTEST_CASES", cases)
        .args(["test", "--release", "--workspace", "--exclude", "sgfw-ebpf"])
        .args(extra);
    run(&mut cmd)?;
    eprintln!(
        "xtask: all checks passed in {:.0}s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
