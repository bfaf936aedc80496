//! Embeds the BPF object built by `cargo xtask build` (nightly, bpfel) into
//! the library. Without it the crate still builds, so unprivileged tests run
//! with stable alone; loading then fails with a message saying how to build it.
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join("sgfw.bpf.o");
    println!("cargo:rerun-if-env-changed=SGFW_BPF_OBJECT");
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let default = manifest.join("../target/bpf/bpfel-unknown-none/release/sgfw");
    let src = std::env::var_os("SGFW_BPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or(default);
    println!("cargo:rerun-if-changed={}", src.display());
    let bytes = std::fs::read(&src).unwrap_or_default();
    if let Err(e) = std::fs::write(&out, bytes) {
        println!("cargo:warning=could not write {}: {e}", out.display());
    }
}
