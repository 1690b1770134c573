//! Installs what building and testing grpclb needs, when it is missing.
//!
//! Every check is cheap, so the README's commands run this first on every
//! invocation; on a prepared machine it does nothing.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Debian packages bpf-linker builds against (LLVM 22).
const BUILD_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libclang-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
];

/// Debian packages the tests, demo and benchmarks drive: netns/veth/bridge,
/// iptables rules, bpftool inspection, a gRPC C-core client (grpcio), and
/// Prometheus with promtool (the Prometheus test scrapes the agents with it;
/// promtool checks and unit-tests the alert rules).
const RUN_PACKAGES: &[&str] = &[
    "iproute2",
    "iptables",
    "bpftool",
    "python3-grpcio",
    "prometheus",
];

/// The bpf-linker release known to work with LLVM 22 and aya 0.14.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-fuzz for `cargo xtask fuzz` (nightly; libFuzzer).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The grpc-js test client's package directory (its package.json pins the
/// version).
const GRPC_JS_DIR: &str = "tests/peers/grpc-js";

/// Everything the tests, the demo and the benchmarks need.
pub fn ensure_prerequisites() -> Result<()> {
    ensure_apt_packages(RUN_PACKAGES)?;
    ensure_grpc_js()?;
    ensure_build_prerequisites()
}

/// `npm install` for the grpc-js client, once.
fn ensure_grpc_js() -> Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(GRPC_JS_DIR);
    if dir.join("node_modules/@grpc/grpc-js/package.json").exists() {
        return Ok(());
    }
    eprintln!("installing grpc-js for the tests (npm install in {GRPC_JS_DIR})");
    run(Command::new("npm")
        .args(["install", "--no-audit", "--no-fund"])
        .current_dir(&dir))
    .context("npm install for the grpc-js test client (needs Node.js and npm)")
}

/// What building the eBPF object needs (also inside the image build).
pub fn ensure_build_prerequisites() -> Result<()> {
    ensure_apt_packages(BUILD_PACKAGES)?;
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()
}

/// Fails with a message naming `what` unless running as root.
pub fn require_root(what: &str) -> Result<()> {
    if !is_root()? {
        bail!("{what} needs root (it loads eBPF programs, creates cgroups and network namespaces): run it as root, e.g. with sudo");
    }
    Ok(())
}

fn is_root() -> Result<bool> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    Ok(effective_uid(&status) == Some(0))
}

/// The effective uid from /proc/self/status (`Uid: real effective saved fs`).
fn effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|uid| uid.parse().ok())
}

/// Installs those of `packages` that dpkg does not list as installed.
pub fn ensure_apt_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root()? {
        bail!(
            "missing Debian packages {}; install them as root: apt-get install -y {}",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("install ok installed")
        })
        .unwrap_or(false)
}

fn ensure_nightly_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]));
    match installed {
        Ok(list) if list.lines().any(|l| l.starts_with("rust-src")) => Ok(()),
        Ok(_) => {
            eprintln!("setup: adding rust-src to the nightly toolchain");
            run(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))
        }
        Err(_) => {
            eprintln!("setup: installing the nightly toolchain with rust-src");
            run(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))
        }
    }
}

/// Nightly and cargo-fuzz, for `cargo xtask fuzz`.
pub fn ensure_fuzz_prerequisites() -> Result<()> {
    ensure_nightly_rust_src()?;
    if succeeds(Command::new("cargo").args(["fuzz", "--version"])) {
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    run(Command::new("cargo")
        .args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ])
        .env_remove("RUSTUP_TOOLCHAIN"))
}

fn ensure_bpf_linker() -> Result<()> {
    if succeeds(Command::new("bpf-linker").arg("--version")) {
        return Ok(());
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes, once)"
    );
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .env_remove("RUSTUP_TOOLCHAIN"))
}

/// Whether `cmd` runs and exits with success (a tool is installed).
fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_effective_uid() {
        let status = "Name:\tcat\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Name:\tcat\n"), None);
    }
}
