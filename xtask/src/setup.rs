//! Installs what a fresh machine lacks, and says what it is doing. A second
//! run finds everything in place and returns in well under a second.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::run;

/// Debian packages the tests, the demo and the benchmarks use, with the
/// command each provides (checked with `command -v`).
const DEBIAN: &[(&str, &str)] = &[
    ("nftables", "nft"),
    ("iputils-ping", "ping"),
    ("iperf3", "iperf3"),
    ("socat", "socat"),
    ("iproute2", "ip"),
    // The container-runtime tests (tests/tests/podman.rs): rootful podman with
    // netavark, runc (crun refuses hybrid cgroups), and a static busybox
    // from which the local image is made (no registry is reachable).
    ("podman", "podman"),
    ("runc", "runc"),
    ("busybox-static", "busybox"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn ensure_all(_root: &Path) -> Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_debian_packages()?;
    ensure_podman_image()?;
    Ok(())
}

/// The local image the podman tests run: busybox-static and the applet
/// links they use, imported as `localhost/sgfw-busybox:1`. No registry is
/// reachable, so it is made from the Debian package's binary.
pub const PODMAN_IMAGE: &str = "localhost/sgfw-busybox:1";

fn ensure_podman_image() -> Result<()> {
    let present = Command::new("podman")
        .args(["image", "exists", PODMAN_IMAGE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        // The podman tests are privileged; an unprivileged run skips them.
        return Ok(());
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .context("busybox-static is installed but /bin/busybox is missing")?;
    eprintln!(
        "xtask: building the podman image {PODMAN_IMAGE} from {}",
        busybox.display()
    );
    let dir = std::env::temp_dir().join(format!("sgfw-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    std::fs::copy(busybox, bin.join("busybox"))
        .with_context(|| format!("copying {}", busybox.display()))?;
    for applet in [
        "sh", "nc", "ping", "ping6", "ip", "cat", "sleep", "echo", "timeout", "ls", "true",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet))
            .with_context(|| format!("linking {applet}"))?;
    }
    for d in ["tmp", "proc", "sys", "dev", "etc"] {
        std::fs::create_dir_all(dir.join(d)).with_context(|| format!("creating {d}"))?;
    }
    let tar = dir.with_extension("tar");
    let made = run(Command::new("tar")
        .arg("-C")
        .arg(&dir)
        .arg("-cf")
        .arg(&tar)
        .arg("."))
    .and_then(|()| {
        run(Command::new("podman")
            .arg("import")
            .arg(&tar)
            .arg(PODMAN_IMAGE))
    });
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&tar);
    made
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!("{:?} failed: {}", cmd.get_program(), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ensure_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .context(
        "the nightly toolchain is needed for the BPF build (rustup toolchain install nightly)",
    )?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!(
        "xtask: installing rust-src for the nightly toolchain (BPF builds need core's source)"
    );
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// The nightly toolchain's LLVM: (major version, path of its shared library).
fn nightly_llvm() -> Result<(String, PathBuf)> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc +nightly -vV printed no LLVM version")?
        .trim()
        .to_string();
    let major = version
        .split('.')
        .next()
        .context("empty LLVM version")?
        .to_string();
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let prefix = format!("libLLVM.so.{major}");
    let found = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .with_context(|| format!("no {prefix}* in {}", lib.display()))?;
    Ok((major, found))
}

fn bpf_linker_works() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ensure_bpf_linker() -> Result<()> {
    if bpf_linker_works() {
        return Ok(());
    }
    let (major, lib) = nightly_llvm()?;
    let file = lib
        .file_name()
        .context("LLVM library has no file name")?
        .to_owned();
    // A stable place: bpf-linker gets an rpath to it and must find it later.
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = Path::new(&home)
        .join(".cache/sgfw")
        .join(format!("llvm-{}", file.to_string_lossy()));
    let libdir = prefix.join("lib");
    std::fs::create_dir_all(&libdir).with_context(|| format!("creating {}", libdir.display()))?;
    for name in [std::ffi::OsString::from("libLLVM.so"), file] {
        let link = libdir.join(&name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), lib.display()))?;
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {major} ({}); about a minute",
        lib.display()
    );
    run(Command::new("cargo")
        .env("LLVM_PREFIX", &prefix)
        .args([
            "+nightly",
            "install",
            "--locked",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}")))?;
    if !bpf_linker_works() {
        bail!("bpf-linker was installed but does not run; is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ensure_debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN
        .iter()
        .filter(|(_, cmd)| !have(cmd))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        bail!(
            "missing Debian packages: {}. Install them with: sudo apt-get update && sudo apt-get install -y {}",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq"])
        .args(&missing))
}

/// What the tests' Python environment holds: scapy for the crafted-packet
/// test, moto's EC2 server and boto3 for the EC2 import test
/// (tests/tests/moto.rs), pinned.
const PYTHON_PACKAGES: &[&str] = &["scapy==2.6.1", "moto[server]==5.2.5", "boto3==1.44.8"];

/// The modules that show the environment is complete.
const PYTHON_MODULES: &str = "scapy.all, moto.server, boto3";

fn python_imports(python: &Path, modules: &str) -> bool {
    Command::new(python)
        .args(["-c", &format!("import {modules}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A Python with scapy, moto and boto3 for the crafted-packet and EC2 import
/// tests: a virtual environment
/// under `~/.cache/sgfw/venv`, made with `python3 -m venv` (Debian's
/// `python3-venv` installed first when the base interpreter lacks it) and
/// scapy from PyPI. Returns the environment's interpreter, which `test`
/// hands to the tests as `SGFW_PYTHON`.
pub fn ensure_scapy() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let venv = Path::new(&home).join(".cache/sgfw/venv");
    let python = venv.join("bin/python3");
    if python_imports(&python, PYTHON_MODULES) {
        return Ok(python);
    }
    // Debian's interpreter first (what a fresh machine has), else PATH's.
    let base = [Path::new("/usr/bin/python3"), Path::new("python3")]
        .into_iter()
        .find(|p| python_imports(p, "sys"));
    let base = match base {
        Some(b) if python_imports(b, "venv, ensurepip") => b.to_path_buf(),
        _ => {
            // SAFETY: geteuid has no preconditions and cannot fail.
            if unsafe { libc::geteuid() } != 0 {
                bail!(
                    "python3 with venv is needed for the crafted-packet test. Install it with: sudo apt-get update && sudo apt-get install -y python3 python3-venv"
                );
            }
            eprintln!("xtask: installing Debian packages: python3 python3-venv");
            run(Command::new("apt-get").args(["update", "-qq"]))?;
            run(Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-qq", "python3", "python3-venv"]))?;
            PathBuf::from("/usr/bin/python3")
        }
    };
    eprintln!(
        "xtask: making a Python environment with {} at {}",
        PYTHON_PACKAGES.join(" "),
        venv.display()
    );
    // A broken or half-made environment is made anew.
    if venv.exists() {
        std::fs::remove_dir_all(&venv).with_context(|| format!("removing {}", venv.display()))?;
    }
    run(Command::new(&base).arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(PYTHON_PACKAGES))?;
    if !python_imports(&python, PYTHON_MODULES) {
        bail!(
            "{} were installed in {} but do not import",
            PYTHON_PACKAGES.join(" "),
            venv.display()
        );
    }
    Ok(python)
}
