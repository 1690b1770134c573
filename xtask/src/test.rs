//! `cargo xtask test`: everything CI runs, from a fresh machine.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{build_ebpf, setup};

/// `extra` is passed to `cargo test` (a name filter, `--nocapture`, ...).
pub fn test(extra: &[String]) -> Result<()> {
    setup::require_root("cargo xtask test")?;
    setup::ensure_prerequisites()?;
    build_ebpf::build_ebpf()?;

    cargo(&["build", "--workspace", "--bins"])?;
    // The grpc-go test client, next to the test binaries.
    let target = crate::simulation::target_dir()?;
    crate::bench::compare::peers::install()?;
    crate::bench::compare::peers::build_load_client(&target.join("debug"))?;
    let mut args = vec!["test", "--workspace", "--no-fail-fast"];
    args.extend(extra.iter().map(String::as_str));
    cargo(&args)
}

fn cargo(args: &[&str]) -> Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .status()
        .with_context(|| format!("starting cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed: {status}", args.join(" "));
    }
    Ok(())
}
