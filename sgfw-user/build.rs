//! Embeds the BPF objects built by `cargo xtask build` (nightly, bpfel) into
//! the library: the production object (`SGFW_BPF_OBJECT`), and, with the
//! `lab` feature, the test object with the benchmark and port-count programs
//! (`SGFW_BPF_TEST_OBJECT`). Without them the crate still builds, so
//! unprivileged tests run with stable alone; loading then fails with a
//! message saying how to build them.
use std::path::{Path, PathBuf};

fn embed(var: &str, default: &Path, name: &str) {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join(name);
    println!("cargo:rerun-if-env-changed={var}");
    let src = std::env::var_os(var).map_or_else(|| default.to_path_buf(), PathBuf::from);
    println!("cargo:rerun-if-changed={}", src.display());
    let bytes = std::fs::read(&src).unwrap_or_default();
    if let Err(e) = std::fs::write(&out, bytes) {
        println!("cargo:warning=could not write {}: {e}", out.display());
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let bpf = manifest.join("../target/bpf");
    embed(
        "SGFW_BPF_OBJECT",
        &bpf.join("bpfel-unknown-none/release/sgfw"),
        "sgfw.bpf.o",
    );
    if std::env::var_os("CARGO_FEATURE_LAB").is_some() {
        embed(
            "SGFW_BPF_TEST_OBJECT",
            &bpf.join("sgfw-test.o"),
            "sgfw-test.bpf.o",
        );
    } else {
        // Not embedded without the lab.
        let out =
            PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join("sgfw-test.bpf.o");
        if let Err(e) = std::fs::write(&out, b"") {
            println!("cargo:warning=could not write {}: {e}", out.display());
        }
    }
}
