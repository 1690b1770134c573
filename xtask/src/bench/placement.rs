//! `cargo xtask bench placement`: where new connections land on a simulated
//! cluster of many nodes, each node with its own agent (issue 12). Client
//! nodes open their connections one after another, 1.5 s apart (in the
//! last case all at once), to a Service whose pods sit on other nodes; the
//! figure is connections per pod
//! max/mean averaged over many trials (the `multinode` tests run a few).
//!
//! `--agent-args` measures other agent settings on the same scenarios,
//! e.g. `--exchange-port=0` for placement by each node's own counts only.

use std::time::Duration;

use anyhow::{Context, Result};
use grpclb_tests::multinode::{mean_max_over_mean, Placement, PlacementSpec};
use serde::Serialize;

use crate::simulation;

/// How far apart client nodes connect: the cluster-wide view must show
/// every node a new connection within 1 s.
const NODE_SPACING: Duration = Duration::from_millis(1500);

#[derive(Serialize)]
struct Scenario {
    name: String,
    nodes: usize,
    pods: usize,
    clients: usize,
    connections_per_client: u64,
    /// Connections per pod, per trial.
    trials: Vec<Vec<u64>>,
    max_over_mean_per_trial: Vec<f64>,
    mean_max_over_mean: f64,
}

#[derive(Serialize)]
struct ReportJson {
    kernel: String,
    agent_args: Vec<String>,
    scenarios: Vec<Scenario>,
}

pub fn run(trials: usize, agent_args: Vec<String>) -> Result<()> {
    let out_dir = simulation::prepare("cargo xtask bench placement", "bench")?;
    // The last case is the view's limit: every node decides at once from
    // the same view, so placement can only be as good as random ties (8
    // connections on 8 pods uniformly at random: max/mean 2.60 on average).
    let cases = [
        ("one connection per client node", 1, 1, NODE_SPACING),
        ("2 clients per node x 2 connections", 2, 2, NODE_SPACING),
        (
            "one connection per client node, all at once",
            1,
            1,
            Duration::ZERO,
        ),
    ];
    let mut scenarios = Vec::new();
    for (name, clients_per_node, connections, spacing) in cases {
        let spec = PlacementSpec {
            nodes: 12,
            server_nodes: 4,
            pods_per_server_node: 2,
            clients_per_node,
            trials,
            agent_args: agent_args.clone(),
        };
        let placement = Placement::new("bench-placement", &spec)?;
        let spreads = placement.run(name, connections, spacing)?;
        simulation::check_interrupted()?;
        scenarios.push(Scenario {
            name: name.into(),
            nodes: spec.nodes,
            pods: spec.server_nodes * spec.pods_per_server_node,
            clients: (spec.nodes - spec.server_nodes) * clients_per_node,
            connections_per_client: connections,
            trials: spreads
                .iter()
                .map(|s| s.per_pod.values().copied().collect())
                .collect(),
            max_over_mean_per_trial: spreads.iter().map(|s| s.max_over_mean()).collect(),
            mean_max_over_mean: mean_max_over_mean(&spreads),
        });
    }
    println!();
    for s in &scenarios {
        println!(
            "{} ({} clients, {} pods, {} nodes): connections per pod max/mean {:.2} averaged over {trials} trials",
            s.name, s.clients, s.pods, s.nodes, s.mean_max_over_mean
        );
    }
    let json = ReportJson {
        kernel: simulation::kernel_release(),
        agent_args,
        scenarios,
    };
    let path = out_dir.join("placement.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("report: {}", path.display());
    Ok(())
}
