//! `cargo xtask build-ebpf`: the kernel programs, built with nightly for
//! bpfel-unknown-none (`-Z build-std=core`, linked by bpf-linker into one ELF
//! object with BTF). The agent's build script embeds the result.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use grpclb_tests::workspace_root;

/// Where the object lands; `grpclb-agent/build.rs` reads the same path.
pub const OBJECT: &str = "target/ebpf/bpfel-unknown-none/release/grpclb-ebpf";

/// `rustup run nightly cargo ARGS` in `dir`.
pub fn nightly_cargo(dir: &Path, args: &[&str]) -> Command {
    let mut cargo = Command::new("rustup");
    cargo
        .args(["run", "nightly", "cargo"])
        .args(args)
        .current_dir(dir);
    // `cargo xtask` runs under the stable cargo, which exports its own
    // toolchain, compiler and flags; a nightly build must not inherit them.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO")
            || name.starts_with("RUSTC")
            || name == "RUSTUP_TOOLCHAIN"
            || name == "RUSTFLAGS"
        {
            cargo.env_remove(name.as_ref());
        }
    }
    cargo
}

pub fn build_ebpf() -> Result<PathBuf> {
    let root = workspace_root();
    let mut cargo = nightly_cargo(
        &root.join("grpclb-ebpf"),
        &["build", "--release", "--locked"],
    );
    cargo
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(root.join("target/ebpf"));
    let status = cargo
        .status()
        .context("starting `rustup run nightly cargo build` (is rustup installed?)")?;
    if !status.success() {
        bail!("building the eBPF programs failed ({status}); see the compiler output above");
    }
    let object = root.join(OBJECT);
    if !object.is_file() {
        bail!(
            "the eBPF build succeeded but {} is missing",
            object.display()
        );
    }
    Ok(object)
}
