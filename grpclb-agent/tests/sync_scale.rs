//! A measurement, not a check: one incremental apply of one changed Service
//! into the real (pinned, kernel) maps holding 10,000 Services x 10
//! endpoints, with its wall time and the CPU time of the applying thread.
//! Needs root; prints, asserts nothing about time:
//!
//!     cargo test --release -p grpclb-agent --test sync_scale -- --ignored --nocapture
//!
//! It mounts its own bpf filesystem under /tmp and makes its own cgroup
//! (the programs are loaded, never attached), and removes both.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpclb_agent::dataplane::loader::{Capacities, Dataplane, DataplaneOptions};
use grpclb_agent::dataplane::sync::Syncer;
use grpclb_agent::state::model::{DesiredService, DesiredState, Endpoint, EndpointCondition};
use grpclb_agent::state::topology::Rule;
use grpclb_common::{capacity, Addr, Backend, ServiceKey};

const SERVICES: u32 = 10_000;
const ENDPOINTS: u32 = 10;

fn service(n: u32, first_pod: u32) -> DesiredService {
    DesiredService {
        name: format!("bench/svc-{n}:grpc"),
        endpoints: (0..ENDPOINTS)
            .map(|i| {
                let pod = first_pod + i;
                Endpoint {
                    backend: Backend::new(
                        Addr::from_v4([10, 200 + (pod >> 16) as u8, (pod >> 8) as u8, pod as u8]),
                        8080,
                    ),
                    node_name: None,
                    condition: EndpointCondition::Ready,
                }
            })
            .collect(),
        track_frames: false,
        rule: Rule::Ready,
    }
}

fn key(n: u32) -> ServiceKey {
    ServiceKey::new(Addr::from_v4([10, 96, (n >> 8) as u8, n as u8]), 50051)
}

/// CPU time (user + system) of the calling thread.
fn thread_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec into `t`.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

struct Cleanup {
    bpffs: std::path::PathBuf,
    cgroup: std::path::PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = grpclb_agent::dataplane::loader::uninstall(&self.bpffs);
        let _ = Command::new("umount").arg(&self.bpffs).status();
        let _ = std::fs::remove_dir(&self.bpffs);
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

#[test]
#[ignore = "a measurement: needs root, run with --ignored --nocapture"]
fn one_changed_service_at_10k_services() {
    let id = std::process::id();
    let bpffs = std::path::PathBuf::from(format!("/tmp/grpclb-test-bpffs-syncscale-{id}"));
    let cgroup = grpclb_agent::dataplane::cgroup::cgroup2_root()
        .unwrap()
        .join(format!("grpclb-test-syncscale-{id}"));
    std::fs::create_dir_all(&bpffs).unwrap();
    std::fs::create_dir_all(&cgroup).unwrap();
    let _cleanup = Cleanup {
        bpffs: bpffs.clone(),
        cgroup: cgroup.clone(),
    };
    assert!(Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(&bpffs)
        .status()
        .unwrap()
        .success());
    let mut dataplane = Dataplane::prepare(&DataplaneOptions {
        cgroup,
        bpffs: bpffs.clone(),
        capacities: Capacities {
            frontends: capacity::FRONTENDS,
            backend_slots: capacity::BACKEND_SLOTS,
            backend_load: capacity::BACKEND_LOAD,
            local_backends: capacity::LOCAL_BACKENDS,
            tracked: capacity::TRACKED,
        },
        bpf_log: false,
    })
    .unwrap();
    let tables = dataplane.tables();

    let mut desired = DesiredState {
        services: (0..SERVICES)
            .map(|n| (key(n), Arc::new(service(n, n * ENDPOINTS))))
            .collect(),
        not_balanced: BTreeMap::new(),
        nodes: Arc::default(),
    };
    let mut syncer = Syncer::default();
    let (wall, cpu) = (Instant::now(), thread_cpu());
    let report = syncer.apply(tables, &desired).unwrap();
    assert!(report.complete(), "{report}: {:?}", report.problem());
    println!(
        "first (full) apply of {SERVICES} Services x {ENDPOINTS} endpoints: {:.1} ms, {:.1} ms CPU",
        wall.elapsed().as_secs_f64() * 1e3,
        (thread_cpu() - cpu).as_secs_f64() * 1e3
    );

    let mut walls = Vec::new();
    let mut cpus = Vec::new();
    for round in 0..20u32 {
        // One endpoint of one Service replaced by a new pod.
        let n = (round * 997) % SERVICES;
        let mut changed = service(n, n * ENDPOINTS);
        changed.endpoints[0].backend = Backend::new(Addr::from_v4([10, 250, round as u8, 1]), 8080);
        desired.services.insert(key(n), Arc::new(changed));
        let (wall, cpu) = (Instant::now(), thread_cpu());
        let report = syncer.apply(tables, &desired).unwrap();
        walls.push(wall.elapsed());
        cpus.push(thread_cpu() - cpu);
        assert_eq!(report.updated.len(), 1, "{report}");
    }
    walls.sort();
    cpus.sort();
    println!(
        "one changed Service (20 rounds): median {:.3} ms wall, {:.3} ms CPU; max {:.3} ms wall, {:.3} ms CPU",
        walls[10].as_secs_f64() * 1e3,
        cpus[10].as_secs_f64() * 1e3,
        walls[19].as_secs_f64() * 1e3,
        cpus[19].as_secs_f64() * 1e3,
    );
    let (wall, cpu) = (Instant::now(), thread_cpu());
    let report = syncer.apply(tables, &desired).unwrap();
    println!(
        "the same state again: {:.3} ms wall, {:.3} ms CPU ({report})",
        wall.elapsed().as_secs_f64() * 1e3,
        (thread_cpu() - cpu).as_secs_f64() * 1e3
    );
}
