//! `grpclb-agent`: the shell around the library: parses the command line,
//! wires a source to the sync task, and talks to the pinned data plane.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

use grpclb_agent::cli::{Cli, Command, RunArgs, SourceSpec};
use grpclb_agent::dataplane::loader::{self, Capacities, Dataplane, DataplaneOptions};
use grpclb_agent::dataplane::pinned::{self, PinnedTables};
use grpclb_agent::dataplane::{cgroup, sync};
use grpclb_agent::observe::metrics::{
    self, GaugeReader, MapCapacities, Metrics, MetricsDetail, ResponseTotals, TableGauges,
};
use grpclb_agent::observe::readiness::{self, AgentState, Readiness, Recorder, StateMap};
use grpclb_agent::observe::status;
use grpclb_agent::rebalance::inject::Injector;
use grpclb_agent::rebalance::mover;
use grpclb_agent::rebalance::planner::PlannerConfig;
use grpclb_agent::sources::file::{FileSource, NodeIdentity};
use grpclb_agent::sources::kube::{self as kube_source, KubeSource};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Status {
            bpffs,
            metrics_addr,
        } => print_status(&bpffs, metrics_addr),
        Command::Uninstall { bpffs } => uninstall(&bpffs),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> Result<()> {
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let source = args
        .source_or_default(in_cluster)
        .map_err(anyhow::Error::msg)?;
    let node_name = match args.node_name {
        Some(name) => name,
        None => hostname()?,
    };
    let cgroup = match args.cgroup {
        Some(path) => path,
        None => cgroup::cgroup2_root().context("finding the cgroup v2 root (or pass --cgroup)")?,
    };
    let options = DataplaneOptions {
        cgroup,
        bpffs: args.bpffs,
        capacities: Capacities {
            frontends: args.max_frontends,
            backend_slots: args.max_backend_slots,
            backend_load: args.max_backends,
            local_backends: args.max_local_backends,
            tracked: args.max_tracked_connections,
        },
        bpf_log: args.bpf_log,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(serve(
            options,
            source,
            args.kubeconfig,
            (args.metrics_addr, args.metrics_detail),
            NodeIdentity {
                name: node_name,
                zone: args.node_zone,
            },
            args.rebalance.planner_config(),
        ))
}

/// A source publishes complete states on a watch channel; the sync task
/// applies the latest. The source is opened before the data plane so a bad
/// `--source` changes nothing.
async fn serve(
    options: DataplaneOptions,
    source: SourceSpec,
    kubeconfig: Option<PathBuf>,
    (metrics_addr, metrics_detail): (SocketAddr, MetricsDetail),
    node: NodeIdentity,
    rebalancing: Option<PlannerConfig>,
) -> Result<()> {
    let (states, mut latest) = watch::channel(None);
    let metrics = Metrics::new();
    let metrics_listener = metrics::bind(metrics_addr).await?;
    // The bound address: differs from metrics_addr when its port is 0.
    let metrics_addr = metrics_listener
        .local_addr()
        .context("reading the metrics address")?;
    let mut source_task = match source {
        SourceSpec::File(path) => {
            let (file, initial) = FileSource::open(&path, &node)?;
            tracing::info!(
                file = %path.display(),
                frontends = initial.services.len(),
                "loaded the service file; watching it for changes"
            );
            states.send_replace(Some(initial));
            tokio::spawn(file.watch(states))
        }
        SourceSpec::Kube => {
            let client = kube_source::client(kubeconfig.as_deref()).await?;
            let topology =
                kube_source::node_topology(&client, &node.name, node.zone.as_deref()).await;
            tokio::spawn(KubeSource::new(client, metrics.clone(), topology).watch(states))
        }
    };
    let mut dataplane = Dataplane::prepare(&options).with_context(|| {
        format!(
            "loading the data plane (pins under {})",
            options.bpffs.display()
        )
    })?;
    let state_map = StateMap::create_or_open(&loader::maps_dir(&options.bpffs))?;
    let mut readiness = Recorder::new(state_map, metrics.clone())?;
    readiness.set(Readiness::not_ready(
        "waiting for the first complete state from the source",
    ))?;
    let capacities = MapCapacities {
        frontends: options.capacities.frontends,
        backend_slots: options.capacities.backend_slots,
        backend_load: options.capacities.backend_load,
    };
    let bpffs = options.bpffs.clone();
    let response_totals = std::sync::Mutex::new(ResponseTotals::default());
    let cached = std::sync::Mutex::new(None::<(std::time::Instant, TableGauges)>);
    let gauges: GaugeReader = Arc::new(move || {
        // One read of the maps (tens of thousands of bpf(2) calls at
        // cluster scale) serves every scrape within GAUGES_MAX_AGE, and
        // runs off the async workers' queue (block_in_place).
        let mut cached = cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, gauges)) = &*cached {
            if at.elapsed() < GAUGES_MAX_AGE {
                return Ok(gauges.clone());
            }
        }
        let gauges = tokio::task::block_in_place(|| -> Result<TableGauges> {
            let tables = PinnedTables::open(&bpffs)?;
            let mut gauges = TableGauges::collect(&tables, capacities)?;
            let connections = tables.tracked_connections()?;
            let mut totals = response_totals.lock().unwrap_or_else(|e| e.into_inner());
            gauges.local = totals.update(&connections);
            Ok(gauges)
        })?;
        grpclb_agent::memory::release_freed();
        *cached = Some((std::time::Instant::now(), gauges.clone()));
        Ok(gauges)
    });
    tokio::spawn(metrics::serve(
        metrics_listener,
        metrics.clone(),
        gauges,
        metrics_detail,
    ));
    let mut selections = latest.clone();
    let selection_metrics = metrics.clone();
    tokio::spawn(async move {
        loop {
            if let Some(state) = &*selections.borrow_and_update() {
                selection_metrics.record_selection(state);
            }
            if selections.changed().await.is_err() {
                break;
            }
        }
    });
    tracing::info!("metrics on http://{metrics_addr}/metrics, readiness on /readyz");

    // The first complete state goes into the maps before any program reads
    // them: a connect balanced from half-filled maps would not be rewritten.
    let first = tokio::select! {
        first = async { latest.wait_for(Option::is_some).await.map(|s| s.clone()) } => {
            first.context("the source closed before publishing a state")?
        }
        ended = &mut source_task => return source_ended(ended),
        signal = shutdown_signal() => {
            tracing::info!("{}: exiting before the first sync", signal?);
            return Ok(());
        }
    }
    .context("the source published no state")?;
    let mut first_readiness = Readiness::not_ready("the first sync did not run");
    let mut syncer = sync::Syncer::default();
    syncer.once(
        dataplane.tables(),
        &first,
        &node.name,
        &mut |elapsed, outcome| {
            metrics.record_sync(elapsed, outcome);
            first_readiness = Readiness::after_sync(outcome);
        },
    );
    // The first load's parsing and the maps' first read are done.
    grpclb_agent::memory::release_freed();
    dataplane.attach().with_context(|| {
        format!(
            "attaching the balancer to {} (pins under {})",
            options.cgroup.display(),
            options.bpffs.display()
        )
    })?;
    tracing::info!(
        node = %node.name,
        cgroup = %options.cgroup.display(),
        bpffs = %options.bpffs.display(),
        "balancer attached after the first sync"
    );
    readiness.set(first_readiness)?;

    match rebalancing.map(|config| {
        Injector::open(&options.bpffs, &options.cgroup).map(|injector| (config, injector))
    }) {
        Some(Ok((config, injector))) => {
            tracing::info!(
                ?config,
                "rebalancing connections of Services with grpclb.io/track-frames"
            );
            let task = mover::run(
                config,
                options.bpffs.clone(),
                injector,
                latest.clone(),
                metrics.clone(),
            );
            // Its own thread (and timer): its bpf(2) calls and socket
            // writes never hold up the async workers that serve /metrics
            // and follow the source. It ends with the process.
            std::thread::Builder::new()
                .name("rebalance".into())
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_time()
                        .build()
                    {
                        Ok(runtime) => runtime.block_on(task),
                        Err(e) => tracing::error!("rebalancing is off: starting its runtime: {e}"),
                    }
                })
                .context("starting the rebalancing thread")?;
        }
        Some(Err(e)) => tracing::warn!("rebalancing is off: {e:#}"),
        None => tracing::info!("rebalancing is off (--no-rebalance)"),
    }
    // The sync runs here, on the thread that started the runtime, not on
    // an async worker: its blocking bpf(2) calls hold up only the wait for
    // a signal.
    let synced = sync::follow(
        dataplane.tables(),
        syncer,
        &node.name,
        latest,
        sync::RETRY_INTERVAL,
        |elapsed, outcome| {
            metrics.record_sync(elapsed, outcome);
            if let Err(e) = readiness.set(Readiness::after_sync(outcome)) {
                tracing::warn!("recording readiness: {e:#}");
            }
        },
    );
    tokio::select! {
        () = synced => bail!("the source stopped publishing"),
        ended = &mut source_task => source_ended(ended),
        signal = shutdown_signal() => {
            let name = signal?;
            tracing::info!("{name}: exiting; the pinned programs keep balancing with the last synced maps");
            source_task.abort();
            Ok(())
        }
    }
}

/// How long one read of the maps serves `/metrics`.
const GAUGES_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

fn source_ended(ended: Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    match ended {
        Ok(Ok(())) => bail!("the source stopped"),
        Ok(Err(e)) => Err(e.context("the source failed")),
        Err(e) => Err(anyhow::Error::new(e).context("the source task failed")),
    }
}

async fn shutdown_signal() -> Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    Ok(tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    })
}

fn hostname() -> Result<String> {
    let path = "/proc/sys/kernel/hostname";
    let name = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let name = name.trim();
    if name.is_empty() {
        bail!("the hostname is empty; pass --node-name or set NODE_NAME");
    }
    Ok(name.to_string())
}

fn print_status(bpffs: &Path, metrics_addr: SocketAddr) -> Result<()> {
    let tables = PinnedTables::open(bpffs).with_context(|| {
        format!(
            "opening the maps pinned under {} (is the agent installed?)",
            bpffs.display()
        )
    })?;
    let agent = readiness::read(&loader::maps_dir(bpffs))?;
    let running = agent.as_ref().is_some_and(AgentState::running);
    println!("{}\n", readiness::describe(agent.as_ref(), running));
    let maps = status::collect(&tables)?;
    let selection = status::fetch_selection(metrics_addr).map_err(|e| format!("{e:#}"));
    print!(
        "{}",
        status::render(&maps, selection.as_ref().map_err(String::as_str))
    );
    // An agent from before MOVES_WAITING existed has none to show.
    if let Ok(waiting) = pinned::open_moves_waiting(bpffs) {
        let waiting: Vec<_> = waiting
            .iter()
            .collect::<Result<_, _>>()
            .context("reading MOVES_WAITING")?;
        let now_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64;
        let moves = status::collect_waiting(&waiting, &tables.tracked_connections()?, now_unix_ms);
        print!("{}", status::render_waiting(&moves));
    }
    Ok(())
}

fn uninstall(bpffs: &Path) -> Result<()> {
    let removed = loader::uninstall(bpffs)
        .with_context(|| format!("uninstalling from {}", bpffs.display()))?;
    if removed.is_empty() {
        println!("nothing was installed under {}", bpffs.display());
    }
    for path in removed {
        println!("removed {}", path.display());
    }
    Ok(())
}
