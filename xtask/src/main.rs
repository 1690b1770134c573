//! Project tasks: `cargo xtask <task>`. Each task lives in its own module.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod build_ebpf;
mod charts;
mod demo;
mod fuzz;
mod kube_proxy;
mod setup;
mod simulation;
mod test;

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
    /// Install what is missing, build everything, run every test (needs root).
    Test {
        /// Passed on to `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_test_args: Vec<String>,
    },
    /// Build everything and compare kube-proxy iptables with grpclb on a
    /// throw-away simulated cluster; plot under target/demo/ (needs root).
    Demo {
        /// Also run Prometheus against the grpclb agents and print what
        /// the dashboard's queries (docs/prometheus.md) show of the run.
        #[arg(long)]
        prometheus: bool,
    },
    /// Fuzz the HTTP/2 frame tracker (cargo fuzz, nightly; installs
    /// cargo-fuzz when missing).
    Fuzz {
        /// How long to fuzz.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Benchmarks on a simulated cluster (needs root).
    Bench {
        #[command(subcommand)]
        what: bench::Bench,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Test { cargo_test_args } => test::test(&cargo_test_args),
        Task::Demo { prometheus } => demo::demo(prometheus),
        Task::Bench { what } => bench::bench(what),
        Task::Fuzz { seconds } => fuzz::fuzz(seconds),
        Task::BuildEbpf => {
            setup::ensure_build_prerequisites()?;
            let object = build_ebpf::build_ebpf()?;
            println!("built {}", object.display());
            Ok(())
        }
    }
}
