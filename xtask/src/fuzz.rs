//! `cargo xtask fuzz`: runs the frame tracker's fuzz target (`fuzz/`, cargo
//! fuzz with libFuzzer, nightly) for a while; a crash fails the task and
//! leaves the input under fuzz/artifacts/.

use anyhow::{bail, Context, Result};

use crate::{build_ebpf, setup};

const TARGET: &str = "frame_tracker";

pub fn fuzz(seconds: u64) -> Result<()> {
    setup::ensure_fuzz_prerequisites()?;
    let dir = grpclb_tests::workspace_root().join("fuzz");
    let max_time = format!("-max_total_time={seconds}");
    let status = build_ebpf::nightly_cargo(&dir, &["fuzz", "run", TARGET, "--", &max_time])
        .status()
        .context("starting `cargo fuzz run` (cargo-fuzz)")?;
    if !status.success() {
        bail!(
            "fuzzing {TARGET} failed ({status}): the failing input is under {}; \
             reproduce with `cd fuzz && cargo +nightly fuzz run {TARGET} <that file>`",
            dir.join("artifacts").join(TARGET).display()
        );
    }
    println!("fuzz: {TARGET} ran {seconds} s without a failure");
    Ok(())
}
