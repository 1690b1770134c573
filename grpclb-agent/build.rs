//! Embeds the eBPF object that `cargo xtask build-ebpf` builds.

use std::path::Path;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the agent crate lives one level below the workspace root");
    // The same path as xtask's build_ebpf::OBJECT.
    let object = root.join("target/ebpf/bpfel-unknown-none/release/grpclb-ebpf");
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        eprintln!(
            "error: the eBPF object {} is missing; build it first with `cargo xtask build-ebpf` \
             (or run `cargo xtask test`, which builds everything)",
            object.display()
        );
        std::process::exit(1);
    }
    println!("cargo:rustc-env=GRPCLB_EBPF_OBJECT={}", object.display());
}
