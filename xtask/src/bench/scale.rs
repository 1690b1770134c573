//! `cargo xtask bench scale`: the release agent at cluster scale, on one
//! simulated node: N Services × 10 ready endpoints, from a multi-document
//! YAML file (the file source) and from the in-test API server over real
//! list/watch (the kube source). For each: time to ready, peak and steady
//! RSS, idle CPU, how long and how much CPU one endpoint turning not ready
//! takes to reach the pinned maps, and the size of `/metrics`.
//!
//! The bench watches the maps itself (raw bpf(2) lookups of the pinned
//! FRONTENDS and BACKEND_SLOTS every millisecond), so "reached the maps"
//! means what the connect hook sees, not what the agent says.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use grpclb_common::sys::BpfObject;
use grpclb_common::{names, Addr, Backend, BackendSlotKey, ServiceEntry, ServiceKey};
use grpclb_tests::apiserver::ApiServer;
use grpclb_tests::{http_get, Agent, BpffsDir, Node, ServiceDef};
use serde::Serialize;

use crate::simulation::{self, check_interrupted};

pub const ENDPOINTS_PER_SERVICE: usize = 10;
const SERVICE_PORT: u16 = 80;
const POD_PORT: u16 = 50051;
/// Nodes the endpoints are spread over (none of them the agent's).
const NODES: usize = 100;
/// Time after ready before the idle window: start-up work that ends with
/// readiness is not idleness.
const SETTLE: Duration = Duration::from_secs(2);
/// How long a change may take to reach the maps before it counts as lost.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// After a change reached the maps: the window whose CPU is "change + settle".
const CHANGE_SETTLE: Duration = Duration::from_secs(1);
const MAP_POLL: Duration = Duration::from_millis(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    File,
    Kube,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::Kube => "kube",
        }
    }
}

pub struct Options {
    pub services: Vec<usize>,
    pub sources: Vec<Source>,
    pub idle_seconds: u64,
    pub changes: usize,
    pub ready_timeout: Duration,
    pub agent_args: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
struct ChangeSummary {
    /// Changes that reached the maps (of those made).
    reached: usize,
    made: usize,
    median_ms: f64,
    max_ms: f64,
    /// Agent CPU from the change until the maps held it.
    median_cpu_ms: f64,
    /// Agent CPU from the change until [`CHANGE_SETTLE`] after that.
    median_cpu_settled_ms: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
struct Case {
    source: Source,
    services: usize,
    endpoints: usize,
    /// Spawn to `/readyz` 200; `None`: not ready within the timeout.
    ready_s: Option<f64>,
    /// What `/readyz` last said when the agent did not get ready.
    not_ready: Option<String>,
    peak_rss_at_ready_mb: f64,
    peak_rss_mb: f64,
    steady_rss_mb: Option<f64>,
    idle_cpu_percent: Option<f64>,
    change: Option<ChangeSummary>,
    metrics_bytes: Option<usize>,
    metrics_series: Option<usize>,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    benchmark: &'static str,
    kernel: String,
    cpus: usize,
    agent_args: &'a [String],
    idle_seconds: u64,
    cases: &'a [Case],
    wall_seconds: f64,
}

pub fn run(options: Options) -> Result<()> {
    if options.services.contains(&0) || options.services.is_empty() {
        bail!("--services needs one or more counts above 0, e.g. --services 1000,10000");
    }
    if options.sources.is_empty() {
        bail!("--sources needs file, kube or both");
    }
    let out_dir = simulation::prepare("cargo xtask bench scale", "bench")?;
    let agent = build_release_agent()?;
    // The builds are not the bench.
    let started = Instant::now();
    let mut cases = Vec::new();
    for &services in &options.services {
        let defs: Vec<ServiceDef> = (0..services).map(scale_service).collect();
        for &source in &options.sources {
            println!(
                "bench scale: {services} Services × {ENDPOINTS_PER_SERVICE} endpoints, {} source",
                source.label()
            );
            let case = measure(&agent, source, &defs, &options, &out_dir)?;
            println!("{}", case_line(&case));
            cases.push(case);
        }
    }
    let wall_seconds = started.elapsed().as_secs_f64();
    let table = render_table(&cases, &options.agent_args);
    println!();
    print!("{table}");
    println!("bench wall time (after the builds): {wall_seconds:.0} s");
    let report = Report {
        benchmark: "agent at scale (1 simulated node)",
        kernel: simulation::kernel_release(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        agent_args: &options.agent_args,
        idle_seconds: options.idle_seconds,
        cases: &cases,
        wall_seconds,
    };
    let json_path = out_dir.join("scale.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    let md_path = out_dir.join("scale.md");
    std::fs::write(&md_path, markdown(&report, &table))
        .with_context(|| format!("writing {}", md_path.display()))?;
    println!("written: {}, {}", json_path.display(), md_path.display());
    Ok(())
}

/// What is measured is the release agent, whatever profile this xtask is.
fn build_release_agent() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--release", "--package", "grpclb-agent"])
        .status()
        .with_context(|| format!("starting {cargo} build --release"))?;
    if !status.success() {
        bail!("cargo build --release --package grpclb-agent failed: {status}");
    }
    Ok(simulation::target_dir()?.join("release/grpclb-agent"))
}

/// Service `i` of the bench: `default/svc-NNNNN`, ClusterIP 10.96.0.0 + i
/// (10.96.0.0/12 holds a million), endpoints 10.128.0.0 + 10 i + j (pods
/// spread over [`NODES`] other nodes), all ready.
pub fn scale_service(i: usize) -> ServiceDef {
    let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i as u32);
    (0..ENDPOINTS_PER_SERVICE).fold(
        ServiceDef::grpc(&format!("svc-{i:05}"), vip, SERVICE_PORT, POD_PORT),
        |def, j| {
            let k = i * ENDPOINTS_PER_SERVICE + j;
            let pod = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + k as u32);
            def.backend_on(pod, &format!("node-{:03}", k % NODES))
        },
    )
}

/// Which Services the changes hit: spread over the cluster, distinct.
fn changed_services(services: usize, changes: usize) -> Vec<usize> {
    (1..=changes)
        .map(|c| c * services / (changes + 1))
        .collect()
}

/// Where the agent's Services come from, and how one Service changes.
enum Feed {
    File {
        path: PathBuf,
        /// Each Service's documents, so a change re-renders one Service.
        documents: Vec<String>,
    },
    Kube {
        server: ApiServer,
        _dir: tempfile::TempDir,
    },
}

impl Feed {
    fn new(source: Source, defs: &[ServiceDef], out_dir: &Path) -> Result<(Feed, Vec<OsString>)> {
        match source {
            Source::File => {
                let path = out_dir.join("scale-services.yaml");
                let documents: Vec<String> = defs.iter().map(ServiceDef::documents_yaml).collect();
                grpclb_tests::write_atomically(&path, &documents.concat())?;
                let arg = OsString::from(format!("--source=file:{}", path.display()));
                Ok((Feed::File { path, documents }, vec![arg]))
            }
            Source::Kube => {
                let server = ApiServer::start_new()?;
                server.apply_all(defs.iter().flat_map(ServiceDef::objects))?;
                let dir = tempfile::tempdir().context("creating a kubeconfig directory")?;
                let kubeconfig = server.write_kubeconfig(dir.path())?;
                let args = vec![
                    OsString::from("--source=kube"),
                    OsString::from("--kubeconfig"),
                    kubeconfig.into_os_string(),
                ];
                Ok((Feed::Kube { server, _dir: dir }, args))
            }
        }
    }

    /// Prepares Service `index` becoming `def`; the returned closure makes
    /// the change visible to the agent in one step (a rename, one apply),
    /// so the clock starts right before it.
    fn prepare(
        &mut self,
        index: usize,
        def: &ServiceDef,
    ) -> Result<Box<dyn FnOnce() -> Result<()> + '_>> {
        match self {
            Feed::File { path, documents } => {
                documents[index] = def.documents_yaml();
                let temporary = path.with_extension("yaml.next");
                std::fs::write(&temporary, documents.concat())
                    .with_context(|| format!("writing {}", temporary.display()))?;
                let path = path.clone();
                Ok(Box::new(move || {
                    std::fs::rename(&temporary, &path)
                        .with_context(|| format!("replacing {}", path.display()))
                }))
            }
            Feed::Kube { server, .. } => {
                // The Service is unchanged: only its slices are updated.
                let slices: Vec<_> = def.objects().into_iter().skip(1).collect();
                Ok(Box::new(move || server.apply_all(slices)))
            }
        }
    }
}

fn measure(
    agent_bin: &Path,
    source: Source,
    defs: &[ServiceDef],
    options: &Options,
    out_dir: &Path,
) -> Result<Case> {
    let (mut feed, mut args) = Feed::new(source, defs, out_dir)?;
    args.extend(options.agent_args.iter().map(OsString::from));
    let node = Node::new("scale")?;
    let bpffs = BpffsDir::new()?;
    let spawned = Instant::now();
    let mut agent = Agent::spawn_binary(agent_bin, &node, bpffs.path(), &args)?;
    let pid = agent.pid();
    let readiness = wait_ready(&mut agent, spawned, options.ready_timeout)?;
    let mut case = Case {
        source,
        services: defs.len(),
        endpoints: defs.len() * ENDPOINTS_PER_SERVICE,
        ready_s: None,
        not_ready: None,
        peak_rss_at_ready_mb: memory_mb(pid, "VmHWM")?,
        peak_rss_mb: 0.0,
        steady_rss_mb: None,
        idle_cpu_percent: None,
        change: None,
        metrics_bytes: None,
        metrics_series: None,
    };
    let addr = match readiness {
        Ready::Ready(addr, after) => {
            case.ready_s = Some(after.as_secs_f64());
            addr
        }
        Ready::NotReady(reason) => {
            println!("  not ready after {:?}: {reason}", options.ready_timeout);
            case.not_ready = Some(reason);
            case.peak_rss_mb = memory_mb(pid, "VmHWM")?;
            return Ok(case);
        }
    };
    println!(
        "  ready in {:.2} s, peak RSS {:.0} MB",
        case.ready_s.unwrap_or_default(),
        case.peak_rss_at_ready_mb
    );

    simulation::sleep(SETTLE)?;
    let idle = Duration::from_secs(options.idle_seconds);
    let before = cpu_time(pid)?;
    simulation::sleep(idle)?;
    let idle_cpu = cpu_time(pid)? - before;
    case.idle_cpu_percent = Some(100.0 * idle_cpu.as_secs_f64() / idle.as_secs_f64());
    case.steady_rss_mb = Some(memory_mb(pid, "VmRSS")?);
    println!(
        "  idle CPU {:.2} % of a core over {} s, steady RSS {:.0} MB (heap and stacks {:.0}, mapped files {:.0})",
        case.idle_cpu_percent.unwrap_or_default(),
        options.idle_seconds,
        case.steady_rss_mb.unwrap_or_default(),
        memory_mb(pid, "RssAnon")?,
        memory_mb(pid, "RssFile")?
    );

    if options.changes > 0 {
        let maps = PinnedMaps::open(bpffs.path())?;
        let mut samples = Vec::new();
        for index in changed_services(defs.len(), options.changes) {
            let sample = one_change(&mut feed, &maps, pid, index, &defs[index])?;
            match &sample {
                Some(s) => println!(
                    "  change of svc-{index:05}: {:.1} ms to the maps, {:.0} ms CPU ({:.0} ms with settle), {} major page faults",
                    s.wall.as_secs_f64() * 1e3,
                    s.cpu.as_secs_f64() * 1e3,
                    s.cpu_settled.as_secs_f64() * 1e3,
                    s.major_faults
                ),
                None => println!(
                    "  change of svc-{index:05}: not in the maps after {CHANGE_TIMEOUT:?}"
                ),
            }
            samples.push(sample);
        }
        case.change = summarize_changes(&samples);
    }

    let (code, body) = http_get(addr, "/metrics").context("scraping /metrics")?;
    if code != 200 {
        bail!(
            "/metrics answered {code}: {}",
            body.lines().next().unwrap_or("")
        );
    }
    let (bytes, series) = metrics_size(&body);
    case.metrics_bytes = Some(bytes);
    case.metrics_series = Some(series);
    case.peak_rss_mb = memory_mb(pid, "VmHWM")?;
    Ok(case)
}

enum Ready {
    Ready(SocketAddr, Duration),
    NotReady(String),
}

/// Polls `/readyz` every 5 ms until 200, or gives what it last said after
/// `timeout`; fails if the agent exits.
fn wait_ready(agent: &mut Agent, spawned: Instant, timeout: Duration) -> Result<Ready> {
    let mut addr = None;
    let mut last = "no answer on /readyz yet".to_string();
    loop {
        check_interrupted()?;
        if let Some(exit) = agent.exited() {
            let log = agent.log();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            bail!(
                "the agent exited ({exit}); the end of its log:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if addr.is_none() {
            addr = agent.logged_metrics_addr();
        }
        if let Some(addr) = addr {
            if let Ok((code, body)) = http_get(addr, "/readyz") {
                if code == 200 {
                    return Ok(Ready::Ready(addr, spawned.elapsed()));
                }
                last = format!("{code} {}", body.trim());
            }
        }
        if spawned.elapsed() >= timeout {
            return Ok(Ready::NotReady(last));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct ChangeSample {
    wall: Duration,
    cpu: Duration,
    cpu_settled: Duration,
    /// Until the maps held it.
    major_faults: u64,
}

/// Marks the first endpoint of Service `index` not ready and times it until
/// the maps no longer hold it; `None` if they still do after
/// [`CHANGE_TIMEOUT`].
fn one_change(
    feed: &mut Feed,
    maps: &PinnedMaps,
    pid: i32,
    index: usize,
    def: &ServiceDef,
) -> Result<Option<ChangeSample>> {
    let (service, backend) = first_backend(def);
    if !maps.holds(service, backend)? {
        bail!(
            "before the change, the maps do not hold {} as a backend of {}: the agent lost it",
            def.endpoints[0].addr,
            def.name
        );
    }
    let changed = def.clone().not_ready(def.endpoints[0].addr);
    let apply = feed.prepare(index, &changed)?;
    let cpu_before = cpu_time(pid)?;
    let faults_before = major_faults(pid)?;
    let started = Instant::now();
    apply()?;
    let wall = loop {
        if !maps.holds(service, backend)? {
            break started.elapsed();
        }
        if started.elapsed() >= CHANGE_TIMEOUT {
            return Ok(None);
        }
        check_interrupted()?;
        std::thread::sleep(MAP_POLL);
    };
    let cpu = cpu_time(pid)? - cpu_before;
    let major_faults = major_faults(pid)? - faults_before;
    simulation::sleep(CHANGE_SETTLE)?;
    let cpu_settled = cpu_time(pid)? - cpu_before;
    Ok(Some(ChangeSample {
        wall,
        cpu,
        cpu_settled,
        major_faults,
    }))
}

/// The frontend of a bench Service and its first endpoint, as map keys.
fn first_backend(def: &ServiceDef) -> (ServiceKey, Backend) {
    let v4 = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V4(v4) => Addr::from_v4(v4.octets()),
        std::net::IpAddr::V6(v6) => Addr(v6.octets()),
    };
    (
        ServiceKey::new(v4(def.cluster_ip), def.port),
        Backend::new(v4(def.endpoints[0].addr), def.endpoint_port),
    )
}

/// The pinned FRONTENDS and BACKEND_SLOTS, read as the connect hook reads them.
struct PinnedMaps {
    frontends: BpfObject,
    slots: BpfObject,
}

impl PinnedMaps {
    fn open(bpffs: &Path) -> Result<PinnedMaps> {
        let maps = bpffs.join("maps");
        Ok(PinnedMaps {
            frontends: BpfObject::open_pinned(&maps.join(names::FRONTENDS))?,
            slots: BpfObject::open_pinned(&maps.join(names::BACKEND_SLOTS))?,
        })
    }

    /// Whether the live slot of `service` holds `backend`. A scan that saw
    /// the generation change (the agent swapped slots meanwhile) is repeated.
    fn holds(&self, service: ServiceKey, backend: Backend) -> Result<bool> {
        loop {
            let Some(entry) = self.frontends.lookup::<_, ServiceEntry>(&service)? else {
                return Ok(false);
            };
            let mut found = false;
            for index in 0..entry.backend_count {
                let key = BackendSlotKey {
                    service,
                    slot: entry.slot(),
                    index,
                };
                if self.slots.lookup::<_, Backend>(&key)? == Some(backend) {
                    found = true;
                    break;
                }
            }
            let again = self.frontends.lookup::<_, ServiceEntry>(&service)?;
            if again.map(|e| e.generation) == Some(entry.generation) {
                return Ok(found);
            }
        }
    }
}

fn summarize_changes(samples: &[Option<ChangeSample>]) -> Option<ChangeSummary> {
    let reached: Vec<&ChangeSample> = samples.iter().flatten().collect();
    if samples.is_empty() {
        return None;
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let walls: Vec<f64> = reached.iter().map(|s| ms(s.wall)).collect();
    Some(ChangeSummary {
        reached: reached.len(),
        made: samples.len(),
        median_ms: median(&walls),
        max_ms: walls.iter().copied().fold(0.0, f64::max),
        median_cpu_ms: median(&reached.iter().map(|s| ms(s.cpu)).collect::<Vec<_>>()),
        median_cpu_settled_ms: median(
            &reached
                .iter()
                .map(|s| ms(s.cpu_settled))
                .collect::<Vec<_>>(),
        ),
    })
}

/// The middle value (the mean of the two middle ones for an even count); 0
/// for none.
fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// utime + stime of all the process's threads, live and exited.
fn cpu_time(pid: i32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = cpu_ticks(&text).with_context(|| format!("no utime/stime in {path}: {text}"))?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / per_second))
}

/// Page faults that had to read from disk (field 12 of /proc/PID/stat): a
/// change that costs more CPU than its like shows whether the agent's code
/// or the file had been evicted while it idled.
fn major_faults(pid: i32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    stat_field(&text, 12).with_context(|| format!("no majflt in {path}: {text}"))
}

/// Field `n` (1-based, as proc(5) numbers them) of a /proc/PID/stat line,
/// for fields after the command name.
fn stat_field(stat: &str, n: usize) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // after_comm starts at field 3 (state).
    after_comm
        .split_whitespace()
        .nth(n.checked_sub(3)?)?
        .parse()
        .ok()
}

/// utime + stime (fields 14 and 15) of a /proc/PID/stat line. The command
/// name (field 2) may hold spaces and parentheses, so fields count from the
/// last `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    Some(stat_field(stat, 14)? + stat_field(stat, 15)?)
}

/// A `/proc/PID/status` memory line (`VmHWM`, `VmRSS`) in MB (10^6 bytes).
fn memory_mb(pid: i32, field: &str) -> Result<f64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kb = status_kb(&text, field).with_context(|| format!("no {field} in {path}"))?;
    Ok(kb as f64 * 1024.0 / 1e6)
}

fn status_kb(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// The size of a Prometheus text exposition: bytes and series (sample lines).
fn metrics_size(body: &str) -> (usize, usize) {
    let series = body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    (body.len(), series)
}

fn fmt_opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or("-".into(), |v| format!("{v:.decimals$}"))
}

fn case_line(case: &Case) -> String {
    match &case.not_ready {
        Some(reason) => format!(
            "  => NOT READY ({} source, {} Services): {reason}",
            case.source.label(),
            case.services
        ),
        None => format!(
            "  => ready {} s, peak {:.0} MB, steady {} MB, idle {} %",
            fmt_opt(case.ready_s, 2),
            case.peak_rss_mb,
            fmt_opt(case.steady_rss_mb, 0),
            fmt_opt(case.idle_cpu_percent, 2)
        ),
    }
}

/// The results as a Markdown table, notes for the cases that did not get
/// ready below it.
fn render_table(cases: &[Case], agent_args: &[String]) -> String {
    let mut out = String::from(
        "| source | Services | endpoints | ready s | peak RSS MB (at ready) | steady RSS MB | idle CPU % | change → maps ms (median, max) | change CPU ms (+ settle) | /metrics KB | series |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for case in cases {
        let change = case.change.as_ref().map_or("-".into(), |c| {
            let lost = if c.reached < c.made {
                format!(", {} of {} lost", c.made - c.reached, c.made)
            } else {
                String::new()
            };
            format!("{:.1}, {:.1}{lost}", c.median_ms, c.max_ms)
        });
        let cpu = case.change.as_ref().map_or("-".into(), |c| {
            format!("{:.0} ({:.0})", c.median_cpu_ms, c.median_cpu_settled_ms)
        });
        let ready = match case.ready_s {
            Some(s) => format!("{s:.2}"),
            None => "not ready".into(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {ready} | {:.0} ({:.0}) | {} | {} | {change} | {cpu} | {} | {} |\n",
            case.source.label(),
            case.services,
            case.endpoints,
            case.peak_rss_mb,
            case.peak_rss_at_ready_mb,
            fmt_opt(case.steady_rss_mb, 0),
            fmt_opt(case.idle_cpu_percent, 2),
            case.metrics_bytes
                .map_or("-".into(), |b| format!("{:.0}", b as f64 / 1e3)),
            case.metrics_series.map_or("-".into(), |s| s.to_string()),
        ));
    }
    for case in cases {
        if let Some(reason) = &case.not_ready {
            out.push_str(&format!(
                "\n{} source, {} Services: not ready; /readyz said: {reason}\n",
                case.source.label(),
                case.services
            ));
        }
    }
    let flags = if agent_args.is_empty() {
        "default flags".to_string()
    } else {
        format!("agent flags: {}", agent_args.join(" "))
    };
    out.push_str(&format!(
        "\nMeasured on 1 simulated node (release agent, {flags}).\n"
    ));
    out
}

fn markdown(report: &Report, table: &str) -> String {
    format!(
        "<!-- Produced by `cargo xtask bench scale`. -->\n\n# grpclb agent at scale\n\n\
         Kernel {}, {} CPUs; {} endpoints per Service, spread over {NODES} other nodes; \
         idle CPU over {} s with nothing changing; one change = one endpoint marked not ready, \
         timed until the pinned maps no longer hold it. Bench wall time (after the builds) {:.0} s.\n\n{table}",
        report.kernel, report.cpus, ENDPOINTS_PER_SERVICE, report.idle_seconds, report.wall_seconds
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::net::IpAddr;

    #[test]
    fn ten_thousand_services_have_distinct_addresses_in_their_ranges() {
        let defs: Vec<ServiceDef> = (0..10_000).map(scale_service).collect();
        let vips: BTreeSet<IpAddr> = defs.iter().map(|d| d.cluster_ip).collect();
        assert_eq!(vips.len(), 10_000);
        let pods: BTreeSet<IpAddr> = defs
            .iter()
            .flat_map(|d| d.endpoints.iter().map(|e| e.addr))
            .collect();
        assert_eq!(pods.len(), 100_000);
        assert_eq!(defs[9_999].cluster_ip, IpAddr::from([10, 96, 39, 15]));
        assert_eq!(
            defs[9_999].endpoints[9].addr,
            IpAddr::from([10, 129, 134, 159])
        );
        assert!(defs.iter().flat_map(|d| &d.endpoints).all(|e| e.ready
            && e.node_name
                .as_deref()
                .is_some_and(|n| n.starts_with("node-"))));
    }

    #[test]
    fn changes_hit_distinct_services_inside_the_cluster() {
        assert_eq!(changed_services(1_000, 3), vec![250, 500, 750]);
        let many = changed_services(10, 20);
        assert!(many.iter().all(|&i| i < 10));
        assert!(changed_services(1_000, 0).is_empty());
    }

    #[test]
    fn cpu_ticks_count_from_the_last_parenthesis() {
        let stat =
            "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 2000 0 0 0 125 37 0 0 20 0 9 0 100 0 0";
        assert_eq!(cpu_ticks(stat), Some(162));
        assert_eq!(cpu_ticks("4242 (short) S 1"), None);
        // minflt, majflt
        assert_eq!(stat_field(stat, 10), Some(2000));
        assert_eq!(stat_field(stat, 12), Some(0));
    }

    #[test]
    fn status_lines_give_kilobytes() {
        let status = "Name:\tgrpclb-agent\nVmHWM:\t  567000 kB\nVmRSS:\t   64000 kB\n";
        assert_eq!(status_kb(status, "VmHWM"), Some(567_000));
        assert_eq!(status_kb(status, "VmRSS"), Some(64_000));
        assert_eq!(status_kb(status, "VmSwap"), None);
    }

    #[test]
    fn metrics_series_are_the_sample_lines() {
        let body = "# HELP a x\n# TYPE a counter\na_total 1\nb{x=\"1\"} 2\n\n# EOF\n";
        assert_eq!(metrics_size(body), (body.len(), 2));
    }

    #[test]
    fn medians_of_odd_even_and_no_values() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn the_table_says_which_cases_were_not_ready_and_why() {
        let ready = Case {
            source: Source::File,
            services: 1_000,
            endpoints: 10_000,
            ready_s: Some(0.25),
            not_ready: None,
            peak_rss_at_ready_mb: 60.0,
            peak_rss_mb: 70.0,
            steady_rss_mb: Some(40.0),
            idle_cpu_percent: Some(0.1),
            change: Some(ChangeSummary {
                reached: 2,
                made: 3,
                median_ms: 12.5,
                max_ms: 20.0,
                median_cpu_ms: 10.0,
                median_cpu_settled_ms: 12.0,
            }),
            metrics_bytes: Some(12_345),
            metrics_series: Some(100),
        };
        let not_ready = Case {
            source: Source::Kube,
            services: 10_000,
            ready_s: None,
            not_ready: Some("503 not ready: BACKEND_LOAD is full".into()),
            steady_rss_mb: None,
            idle_cpu_percent: None,
            change: None,
            metrics_bytes: None,
            metrics_series: None,
            ..ready.clone()
        };
        let table = render_table(&[ready, not_ready], &[]);
        assert!(table.contains(
            "| file | 1000 | 10000 | 0.25 | 70 (60) | 40 | 0.10 | 12.5, 20.0, 1 of 3 lost | 10 (12) | 12 | 100 |"
        ), "{table}");
        assert!(
            table.contains("| kube | 10000 | 10000 | not ready |"),
            "{table}"
        );
        assert!(table.contains("kube source, 10000 Services: not ready; /readyz said: 503 not ready: BACKEND_LOAD is full"));
        assert!(table.contains("Measured on 1 simulated node (release agent, default flags)."));
    }
}
