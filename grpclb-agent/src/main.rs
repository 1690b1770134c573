//! `grpclb-agent`: the shell around the library: parses the command line,
//! wires a source to the sync task, and talks to the pinned data plane.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

use grpclb_agent::cli::{Cli, Command, Output, RunArgs, SourceSpec, StatusArgs};
use grpclb_agent::dataplane::loader::{self, Capacities, Dataplane, DataplaneOptions};
use grpclb_agent::dataplane::owner::{self, Owner};
use grpclb_agent::dataplane::pinned::{self, PinnedTables};
use grpclb_agent::dataplane::snapshot::{Snapshot, Tables};
use grpclb_agent::dataplane::{cgroup, sync};
use grpclb_agent::exchange;
use grpclb_agent::observe::metrics::{
    self, GaugeReader, MapCapacities, Metrics, MetricsDetail, StatusPage, StatusReader, TableGauges,
};
use grpclb_agent::observe::readiness::{self, AgentState, Readiness, Recorder, StateMap};
use grpclb_agent::observe::status::{self, AgentReport, Report, ReportInput};
use grpclb_agent::rebalance::inject::Injector;
use grpclb_agent::rebalance::mover;
use grpclb_agent::rebalance::planner::PlannerConfig;
use grpclb_agent::sources::file::{FileSource, NodeIdentity};
use grpclb_agent::sources::kube::{self as kube_source, KubeSource};
use grpclb_agent::state::model::DesiredState;

fn main() -> ExitCode {
    grpclb_agent::memory::limit_arenas();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args).map(|()| ExitCode::SUCCESS),
        Command::Status(args) => print_status(&args),
        Command::Uninstall { bpffs } => uninstall(&bpffs).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
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
    let exchange = args.exchange.settings(&node_name);
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
            exchange,
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
    exchange: Option<exchange::Settings>,
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
    // Set once the data plane owner runs (after the first sync); until
    // then /metrics serves the counters alone and /status is unavailable.
    let owner_handle = Arc::new(std::sync::OnceLock::<owner::Handle>::new());
    let owned = owner_handle.clone();
    let gauges: GaugeReader = Arc::new(move || {
        let owner = owned.get().cloned();
        Box::pin(async move {
            let snapshot = owner
                .context("the first sync has not run")?
                .full(owner::FULL_MAX_AGE)
                .await?;
            TableGauges::of(&snapshot, capacities).context("a full snapshot without its tables")
        })
    });
    let owned = owner_handle.clone();
    let status_metrics = metrics.clone();
    let bpffs_label = options.bpffs.display().to_string();
    let status_page: StatusReader = Arc::new(move |service| {
        let owner = owned.get().cloned();
        let metrics = status_metrics.clone();
        let bpffs = bpffs_label.clone();
        Box::pin(async move {
            // Fresh: what the maps hold now, as `status` read them before.
            let snapshot = owner
                .context("the first sync has not run")?
                .full(Duration::ZERO)
                .await?;
            let tables = snapshot
                .tables
                .as_ref()
                .context("a full snapshot without its tables")?;
            let agent = AgentState::of_this_process(metrics.readiness())?;
            let input = ReportInput {
                agent: AgentReport::of(Some(&agent), true),
                tables,
                tracked: &snapshot.tracked,
                selection: Ok(&metrics.selection()),
                now_unix_ms: unix_ms(),
            };
            Ok(StatusPage {
                bpffs,
                report: status::build(&input, service.as_ref()),
            })
        })
    });
    tokio::spawn(metrics::serve(
        metrics_listener,
        metrics.clone(),
        (gauges, status_page),
        metrics_detail,
    ));
    metrics.follow_states(latest.clone());
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

    // The load exchange (issue 12) publishes the Service-wide loads and the
    // cluster view here; while it is off or knows nothing they stay empty,
    // and the hook and the planner go by this node's own counts.
    let (exchange_out, exchange_view) = exchange::channels();
    let placements = exchange_view.placement.clone();
    // From here on the data plane owner alone touches the maps, on its own
    // thread: no blocking bpf(2) call on the async workers.
    let owner = Owner {
        tables: dataplane.tables().reopen(&options.bpffs)?,
        syncer,
        node: node.name.clone(),
        waiting_map: pinned::open_moves_waiting(&options.bpffs)
            .inspect_err(|e| tracing::warn!("waiting moves will not show in `status`: {e:#}"))
            .ok(),
        retry: sync::RETRY_INTERVAL,
        placements,
    };
    let (handle, owner_stopped) = start_owner(owner, latest.clone(), readiness, metrics.clone())?;
    let _ = owner_handle.set(handle.clone());
    match exchange {
        Some(settings) => {
            let task = exchange::run(
                settings,
                metrics.clone(),
                latest.clone(),
                handle.local_loads(),
                exchange_out,
            );
            // A failed exchange leaves placement to this node's own counts;
            // the agent goes on balancing.
            tokio::spawn(async move {
                if let Err(e) = task.await {
                    tracing::error!(
                        "load exchange stopped: {e:#}; placement uses this node's own counts"
                    );
                }
            });
        }
        None => tracing::info!(
            "load exchange off (--exchange-port 0): placement uses this node's own counts"
        ),
    }

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
                handle,
                injector,
                latest.clone(),
                exchange_view.cluster.clone(),
                metrics.clone(),
            );
            // Its own thread (and timer): its socket writes and the
            // injector's syscalls never hold up the async workers that
            // serve /metrics and follow the source. It ends with the process.
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
    tokio::select! {
        _ = owner_stopped => bail!("the source stopped publishing"),
        ended = &mut source_task => source_ended(ended),
        signal = shutdown_signal() => {
            let name = signal?;
            tracing::info!("{name}: exiting; the pinned programs keep balancing with the last synced maps");
            source_task.abort();
            Ok(())
        }
    }
}

/// Starts the data plane owner on its thread (`dataplane`); the receiver
/// completes when it stops (the source stopped publishing).
fn start_owner(
    owner: Owner<PinnedTables>,
    states: watch::Receiver<Option<DesiredState>>,
    mut readiness: Recorder,
    metrics: Arc<Metrics>,
) -> Result<(owner::Handle, tokio::sync::oneshot::Receiver<()>)> {
    let (handles, handle) = std::sync::mpsc::sync_channel(1);
    let (stopped, owner_stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("dataplane".into())
        .spawn(move || {
            let _stopped = stopped;
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => return tracing::error!("starting the data plane's runtime: {e}"),
            };
            let (handle, run) = owner.start(states, |elapsed, outcome| {
                metrics.record_sync(elapsed, outcome);
                if let Err(e) = readiness.set(Readiness::after_sync(outcome)) {
                    tracing::warn!("recording readiness: {e:#}");
                }
            });
            if handles.send(handle).is_ok() {
                runtime.block_on(run);
            }
        })
        .context("starting the data plane thread")?;
    let handle = handle
        .recv()
        .context("the data plane thread failed to start")?;
    Ok((handle, owner_stopped))
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

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

/// What the running agent of these maps serves on `/status`, or the same
/// report from the maps read here when none answers; exit status as
/// `status --help` gives it.
fn print_status(args: &StatusArgs) -> Result<ExitCode> {
    let report = match report_for(args)? {
        Ok(report) => report,
        Err(unknown) => {
            eprintln!("error: {unknown}");
            return Ok(ExitCode::from(status::EXIT_USAGE));
        }
    };
    match args.output {
        Output::Table => print!("{}", status::render(&report)),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).context("encoding the report")?
        ),
    }
    if let Some(advice) = report.agent.advice(&args.bpffs.display().to_string()) {
        eprintln!("{advice}");
    }
    Ok(ExitCode::from(status::exit_code(&report)))
}

fn report_for(args: &StatusArgs) -> Result<Result<Report, status::UnknownService>> {
    let (bpffs, metrics_addr) = (args.bpffs.as_path(), args.metrics_addr);
    match status::fetch_status(metrics_addr, args.service.as_ref()) {
        Ok(page) if same_dir(Path::new(&page.bpffs), bpffs) => return Ok(page.report),
        Ok(page) => tracing::debug!(
            "the agent at {metrics_addr} shows the maps under {}, not {}",
            page.bpffs,
            bpffs.display()
        ),
        Err(e) => tracing::debug!("no agent answers /status at {metrics_addr}: {e:#}"),
    }
    let tables = PinnedTables::open(bpffs).with_context(|| {
        format!(
            "opening the maps pinned under {} (is the agent installed? pass the --bpffs \
             the agent runs with)",
            bpffs.display()
        )
    })?;
    let agent = readiness::read(&loader::maps_dir(bpffs))?;
    let running = agent.as_ref().is_some_and(AgentState::running);
    // An agent from before MOVES_WAITING existed has none to show.
    let waiting = match pinned::open_moves_waiting(bpffs) {
        Ok(waiting) => waiting
            .iter()
            .collect::<Result<_, _>>()
            .context("reading MOVES_WAITING")?,
        Err(_) => Vec::new(),
    };
    let snapshot = Snapshot::next(
        None,
        0,
        tables.tracked_connections()?,
        Some(Tables::read(&tables, waiting)?),
    );
    let selection = status::fetch_selection(metrics_addr).map_err(|e| format!("{e:#}"));
    let input = ReportInput {
        agent: AgentReport::of(agent.as_ref(), running),
        tables: snapshot.tables.as_ref().expect("read above"),
        tracked: &snapshot.tracked,
        selection: selection.as_ref().map_err(String::as_str),
        now_unix_ms: unix_ms(),
    };
    Ok(status::build(&input, args.service.as_ref()))
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
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
