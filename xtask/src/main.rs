//! Project tasks: `cargo xtask <task>`. Each task lives in its own module.

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "grpclb project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF object (nightly, -Z build-std=core, bpf-linker).
    BuildEbpf,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::BuildEbpf => todo!("build-ebpf"),
    }
}
