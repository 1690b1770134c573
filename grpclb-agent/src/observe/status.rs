//! `grpclb-agent status`: what the pinned maps hold, with the rule that
//! chose each frontend's endpoints and the Services left to another proxy,
//! which only the running agent knows. By default a line per Service; with
//! `--service` that Service's backends. The running agent builds the
//! [`Report`] (from its data plane owner's snapshot) and serves it as JSON
//! on `/status` of its metrics address; `status` reads the maps itself only
//! when no agent for those maps answers there. Both go through [`build`],
//! and the table is rendered from the report alone ([`render`]), so the
//! output is the same either way.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use anyhow::{Context, Result};
use grpclb_common::{
    Addr, Backend, BackendSlotKey, MoveWaiting, ServiceEntry, ServiceKey, TrackedConnection,
};
use serde::{Deserialize, Serialize};

use crate::dataplane::snapshot::Tables;
use crate::dataplane::tables::ServiceTables;
use crate::observe::metrics::server::BPFFS_HEADER;
use crate::observe::readiness::AgentState;
use crate::state::model::DesiredState;

/// What the running agent decided beyond the maps' contents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Frontend `VIP:port` → the rule that chose its endpoints.
    pub rules: BTreeMap<String, String>,
    /// Frontend `VIP:port` → the serving endpoints the source lists for it
    /// (ready, standby or terminating; the maps hold only those chosen).
    pub endpoints: BTreeMap<String, u64>,
    /// `namespace/name` → why grpclb leaves the Service alone.
    pub not_balanced: BTreeMap<String, String>,
}

impl Selection {
    pub fn of(state: &DesiredState) -> Selection {
        let mut selection = Selection {
            not_balanced: state.not_balanced.clone(),
            ..Selection::default()
        };
        for (key, s) in &state.services {
            let frontend = socket_label(&key.addr, key.port);
            selection
                .endpoints
                .insert(frontend.clone(), s.endpoints.len() as u64);
            selection.rules.insert(frontend, s.rule.to_string());
        }
        selection
    }

    /// One tab-separated line per entry: `rule VIP:port RULE`,
    /// `endpoints VIP:port N` or `not-balanced SERVICE REASON` (no field
    /// holds a tab or newline).
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for (frontend, rule) in &self.rules {
            let _ = writeln!(out, "rule\t{frontend}\t{rule}");
        }
        for (frontend, count) in &self.endpoints {
            let _ = writeln!(out, "endpoints\t{frontend}\t{count}");
        }
        for (service, reason) in &self.not_balanced {
            let _ = writeln!(out, "not-balanced\t{service}\t{reason}");
        }
        out
    }

    pub fn parse(text: &str) -> Result<Selection> {
        let mut selection = Selection::default();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let fields: Vec<&str> = line.splitn(3, '\t').collect();
            match fields.as_slice() {
                ["rule", frontend, rule] => {
                    selection
                        .rules
                        .insert(frontend.to_string(), rule.to_string());
                }
                ["endpoints", frontend, count] => {
                    let count = count
                        .parse()
                        .with_context(|| format!("a count of endpoints in {line:?}"))?;
                    selection.endpoints.insert(frontend.to_string(), count);
                }
                ["not-balanced", service, reason] => {
                    selection
                        .not_balanced
                        .insert(service.to_string(), reason.to_string());
                }
                _ => anyhow::bail!("unexpected line in the agent's /selection: {line:?}"),
            }
        }
        Ok(selection)
    }
}

/// `GET /selection` from the agent's metrics address.
pub fn fetch_selection(addr: std::net::SocketAddr) -> Result<Selection> {
    let (code, answer) = get(addr, "/selection")?;
    if code != 200 {
        anyhow::bail!("the agent at {addr} answered /selection with {code}");
    }
    Selection::parse(&answer.body)
}

/// The agent's answer to `GET /status`: the pin directory of the maps it
/// shows and its report, or why it has none for the Service asked about.
#[derive(Debug)]
pub struct Fetched {
    pub bpffs: String,
    pub report: std::result::Result<Report, UnknownService>,
}

/// `GET /status[?service=NS/NAME]` from the agent's metrics address.
pub fn fetch_status(addr: std::net::SocketAddr, service: Option<&ServiceName>) -> Result<Fetched> {
    let path = status_path(service);
    let (code, answer) = get(addr, &path)?;
    let report = match code {
        200 => {
            let report: Report = serde_json::from_str(&answer.body)
                .with_context(|| format!("parsing the agent's {path} answer as JSON"))?;
            if report.schema_version != SCHEMA_VERSION {
                anyhow::bail!(
                    "the agent at {addr} serves status schema {}, this grpclb-agent reads {}: \
                     run the `status` of the agent's own version (for example with `kubectl exec` \
                     into its pod)",
                    report.schema_version,
                    SCHEMA_VERSION
                );
            }
            Ok(report)
        }
        404 if service.is_some() => Err(UnknownService(answer.body.trim_end().to_string())),
        _ => anyhow::bail!(
            "the agent at {addr} answered {path} with {code}: {}",
            answer.body.trim_end()
        ),
    };
    Ok(Fetched {
        bpffs: answer.bpffs,
        report,
    })
}

/// The path [`fetch_status`] asks for; [`ServiceName`] holds no character
/// a query needs escaped.
fn status_path(service: Option<&ServiceName>) -> String {
    match service {
        Some(service) => format!("/status?service={service}"),
        None => "/status".into(),
    }
}

/// The Service a `/status` query asks about (`?service=NS/NAME`), if any.
pub fn parse_status_query(query: Option<&str>) -> std::result::Result<Option<ServiceName>, String> {
    let mut service = None;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("service", value)) => service = Some(value.parse()?),
            _ => {
                return Err(format!(
                    "unknown query {pair:?}; /status takes service=NS/NAME"
                ))
            }
        }
    }
    Ok(service)
}

struct Answer {
    bpffs: String,
    body: String,
}

/// The status code and body of a GET, and the pin directory it names
/// (empty: none).
fn get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, Answer)> {
    use std::io::{Read as _, Write as _};
    // Plain HTTP/1.0, so `status` needs no runtime.
    let timeout = std::time::Duration::from_secs(2);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to the agent at {addr}"))?;
    // A large cluster's report takes the agent a moment to build.
    stream.set_read_timeout(Some(timeout * 5))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("reading {path} from {addr}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("the agent's {path} answer has no body"))?;
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default();
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("the agent at {addr} answered {path} with {status:?}"))?;
    let bpffs = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case(BPFFS_HEADER))
        .map(|(_, value)| value.trim().to_string())
        .unwrap_or_default();
    Ok((
        code,
        Answer {
            bpffs,
            body: body.to_string(),
        },
    ))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendStatus {
    /// From `SERVICE_NAMES`; empty when the name is missing.
    pub name: String,
    pub key: ServiceKey,
    pub entry: ServiceEntry,
    /// The active slot, with each backend's live connection count on this
    /// node (`None`: no load entry, so its connections are not counted).
    pub backends: Vec<(Backend, Option<u64>)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// Sorted by name, then frontend.
    pub frontends: Vec<FrontendStatus>,
    /// Backends in no active set that still have open connections.
    pub draining: Vec<(Backend, u64)>,
    /// `BACKEND_VIEW`: the Service-wide load of a backend while its view
    /// is fresh, `None` once expired (the hook ignores it).
    pub views: BTreeMap<Backend, Option<u32>>,
}

pub fn collect<T: ServiceTables>(tables: &T) -> Result<Status> {
    let loads = tables.loads().context("reading BACKEND_LOAD")?;
    collect_with(tables, &loads)
}

/// [`collect`] with `BACKEND_LOAD` already read (the snapshot reads it once
/// for the table and the gauges).
pub fn collect_with<T: ServiceTables>(tables: &T, loads: &[(Backend, u64)]) -> Result<Status> {
    let names: BTreeMap<ServiceKey, String> = tables
        .names()
        .context("reading SERVICE_NAMES")?
        .into_iter()
        .map(|(k, n)| (k, n.as_str().to_string()))
        .collect();
    let loads: BTreeMap<Backend, u64> = loads.iter().copied().collect();
    let mut frontends = Vec::new();
    let mut active = BTreeSet::new();
    for (key, entry) in tables.frontends().context("reading FRONTENDS")? {
        let mut backends = Vec::with_capacity(entry.backend_count as usize);
        for index in 0..entry.backend_count {
            let slot = BackendSlotKey {
                service: key,
                slot: entry.slot(),
                index,
            };
            // The agent may be swapping this set right now; show what is there.
            if let Some(backend) = tables.slot(&slot).context("reading BACKEND_SLOTS")? {
                active.insert(backend);
                backends.push((backend, loads.get(&backend).copied()));
            }
        }
        frontends.push(FrontendStatus {
            name: names.get(&key).cloned().unwrap_or_default(),
            key,
            entry,
            backends,
        });
    }
    frontends.sort_by(|a, b| (&a.name, a.key).cmp(&(&b.name, b.key)));
    let draining = loads
        .into_iter()
        .filter(|(b, count)| *count > 0 && !active.contains(b))
        .collect();
    let now_ns = crate::dataplane::view::monotonic_ns();
    let views = tables
        .views()
        .context("reading BACKEND_VIEW")?
        .into_iter()
        .map(|(b, v)| (b, v.is_fresh(now_ns).then_some(v.load)))
        .collect();
    Ok(Status {
        frontends,
        draining,
        views,
    })
}

/// `a.b.c.d:port` for IPv4(-mapped) addresses, `[v6]:port` otherwise.
pub fn socket_label(addr: &Addr, port: u16) -> String {
    if addr.is_v4() {
        let b = addr.0;
        format!("{}:{port}", Ipv4Addr::new(b[12], b[13], b[14], b[15]))
    } else {
        format!("[{}]:{port}", Ipv6Addr::from(addr.0))
    }
}

/// A move the running agent keeps trying (`MOVES_WAITING`), with its
/// connection's addresses from `TRACKED`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitingMove {
    pub backend: Backend,
    pub client: Backend,
    pub reason: &'static str,
    pub cause: &'static str,
    pub waiting_s: u64,
}

/// The waiting moves whose connections are still tracked, longest first.
pub fn collect_waiting(
    waiting: &[(u64, MoveWaiting)],
    tracked: &[(u64, TrackedConnection)],
    now_unix_ms: u64,
) -> Vec<WaitingMove> {
    let tracked: BTreeMap<u64, &TrackedConnection> = tracked.iter().map(|(k, c)| (*k, c)).collect();
    let mut moves: Vec<WaitingMove> = waiting
        .iter()
        .filter_map(|(cookie, w)| {
            let c = tracked.get(cookie)?;
            Some(WaitingMove {
                backend: c.backend,
                client: c.client,
                reason: w.reason_label(),
                cause: w.cause_label(),
                waiting_s: now_unix_ms.saturating_sub(w.since_unix_ms) / 1000,
            })
        })
        .collect();
    moves.sort_by(|a, b| {
        (b.waiting_s, a.backend, a.client).cmp(&(a.waiting_s, b.backend, b.client))
    });
    moves
}

/// Version of the JSON document (`status --output json`, `/status`): raised
/// when a field changes meaning or goes away; fields may be added within a
/// version. docs/status.md describes it.
pub const SCHEMA_VERSION: u32 = 1;

/// `--service`'s value: a Service as `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceName(String);

impl FromStr for ServiceName {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        const FORM: &str = "expected a Service as NAMESPACE/NAME, such as default/echo";
        // Kubernetes names: lowercase letters, digits, '-' and '.'.
        let name_like = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.'))
        };
        match text.split_once('/') {
            Some((namespace, name)) if name_like(namespace) && name_like(name) => {
                Ok(ServiceName(text.to_string()))
            }
            Some((namespace, name))
                if name_like(namespace)
                    && name.split_once(':').is_some_and(|(n, _)| name_like(n)) =>
            {
                Err(format!(
                    "{FORM}, without the port: {namespace}/{}, not {text}",
                    name.split_once(':').map_or(name, |(n, _)| n)
                ))
            }
            _ => Err(format!(
                "{FORM} (lowercase letters, digits, '-' and '.'), got {text:?}"
            )),
        }
    }
}

impl std::fmt::Display for ServiceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `--service` names no balanced Service; the message says what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownService(pub String);

impl std::fmt::Display for UnknownService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UnknownService {}

/// Whether the agent of these maps runs and balances everything it was
/// asked to (`/readyz`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentCondition {
    Ready,
    NotReady,
    /// It recorded its state, then exited: the attached programs keep
    /// balancing with the maps as they were.
    NotRunning,
    /// No agent ever recorded its state under these pins.
    NeverRan,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    pub state: AgentCondition,
    /// The agent's process (the last one, when not running).
    pub pid: Option<u32>,
    /// Why it is not ready; `None` when ready.
    pub reason: Option<String>,
}

impl AgentReport {
    /// From the recorded state, and whether its process still runs.
    pub fn of(state: Option<&AgentState>, running: bool) -> AgentReport {
        let Some(s) = state else {
            return AgentReport {
                state: AgentCondition::NeverRan,
                pid: None,
                reason: None,
            };
        };
        let (state, reason) = match (running, s.readiness.ready) {
            (false, _) => (AgentCondition::NotRunning, None),
            (true, true) => (AgentCondition::Ready, None),
            (true, false) => (AgentCondition::NotReady, Some(s.readiness.reason.clone())),
        };
        AgentReport {
            state,
            pid: Some(s.pid),
            reason,
        }
    }

    /// The first line of the table.
    pub fn line(&self) -> String {
        let pid = self.pid.unwrap_or_default();
        match self.state {
            AgentCondition::NeverRan => {
                "agent: not running (it never recorded its state here)".into()
            }
            AgentCondition::NotRunning => format!(
                "agent: not running (pid {pid} is gone); the attached programs keep balancing \
                 with the maps below"
            ),
            AgentCondition::Ready => format!("agent: ready (pid {pid})"),
            AgentCondition::NotReady => format!(
                "agent: not ready (pid {pid}): {}",
                self.reason.as_deref().unwrap_or_default()
            ),
        }
    }

    /// Why `status` exits with [`EXIT_NOT_READY`] and what to do, for
    /// stderr; `None` when ready.
    pub fn advice(&self, bpffs: &str) -> Option<String> {
        let pid = self.pid.unwrap_or_default();
        match self.state {
            AgentCondition::Ready => None,
            AgentCondition::NotReady => Some(format!(
                "the agent (pid {pid}) is not ready: {}; it turns ready by itself once that \
                 is fixed; its log and /readyz say more",
                self.reason.as_deref().unwrap_or_default()
            )),
            AgentCondition::NotRunning => Some(format!(
                "no agent runs for the pins under {bpffs} (pid {pid} exited): the attached \
                 programs balance with maps nothing updates; start `grpclb-agent run` (in a \
                 cluster: check the grpclb-agent pod of this node)"
            )),
            AgentCondition::NeverRan => Some(format!(
                "no agent ever ran with the pins under {bpffs}: start `grpclb-agent run`, or \
                 pass the --bpffs the agent uses"
            )),
        }
    }
}

/// `status`' exit codes (docs/status.md): 0 ready, [`EXIT_NOT_READY`]
/// when the agent is not ready or not running (or the maps cannot be
/// read), [`EXIT_USAGE`] for a bad command line or an unknown Service.
pub const EXIT_NOT_READY: u8 = 1;
pub const EXIT_USAGE: u8 = 2;

/// The exit code of a report: 0 when the agent is ready.
pub fn exit_code(report: &Report) -> u8 {
    match report.agent.state {
        AgentCondition::Ready => 0,
        _ => EXIT_NOT_READY,
    }
}

/// How a set of per-backend numbers spreads: max/mean is 1 when they are
/// even (the figure the balancer works towards).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub max: u64,
    pub mean: f64,
    /// `None` when the mean is 0.
    pub max_over_mean: Option<f64>,
}

impl Spread {
    fn of(values: &[u64]) -> Option<Spread> {
        let max = *values.iter().max()?;
        let mean = values.iter().sum::<u64>() as f64 / values.len() as f64;
        Some(Spread {
            max,
            mean,
            max_over_mean: (mean > 0.0).then(|| max as f64 / mean),
        })
    }
}

/// One Service: its balanced frontends together.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceSummary {
    /// `namespace/name`; `(unnamed)` for a frontend without a name in the
    /// maps (one summary each).
    pub service: String,
    /// Its balanced ports' names (numbers for unnamed ports), sorted.
    pub ports: Vec<String>,
    /// Its frontends, `VIP:port`.
    pub frontends: Vec<String>,
    /// The distinct rules that chose its frontends' endpoints; empty when
    /// no agent answered (see `selection_unknown`).
    pub rules: Vec<String>,
    /// Serving endpoints the source lists, summed over its frontends;
    /// `None` when no agent answered.
    pub backends: Option<u64>,
    /// Backends taking this node's new connections (the active sets the
    /// rules chose), summed over its frontends.
    pub ready: u64,
    /// Live connections from this node to its ready backends.
    pub connections: u64,
    /// Of the ready backends' live connections from this node; `None`
    /// when none of them is counted.
    pub connections_per_ready_backend: Option<Spread>,
    /// Of the Service-wide loads (from the load exchange) of the ready
    /// backends with a fresh view; `None` when none has one.
    pub view_load: Option<Spread>,
}

/// A ready backend's Service-wide load, as the connect hook sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ViewLoad {
    /// No view: this node's count alone.
    None,
    Fresh {
        load: u32,
    },
    /// Too old: the hook ignores it.
    Expired,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendReport {
    /// `pod IP:port`.
    pub backend: String,
    /// Live connections from this node; `None`: not counted (no entry).
    pub connections: Option<u64>,
    pub view: ViewLoad,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FrontendReport {
    /// `namespace/name:port`, as the maps name it (empty: no name).
    pub name: String,
    /// `VIP:port`.
    pub frontend: String,
    /// `None` when no agent answered.
    pub rule: Option<String>,
    /// Bumped by each change of the active set.
    pub generation: u32,
    /// Its ready backends; none: connections are refused.
    pub backends: Vec<BackendReport>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Draining {
    /// Backends in no active set that still have live connections.
    pub backends: u64,
    pub connections: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotBalanced {
    pub service: String,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingMoveReport {
    pub backend: String,
    pub client: String,
    pub reason: String,
    /// What the gate said when it last refused.
    pub cause: String,
    pub waiting_s: u64,
}

/// What `status` shows, and its JSON document (`--output json`, `/status`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema_version: u32,
    pub agent: AgentReport,
    /// Every balanced Service, sorted by name; with `--service`, that one.
    pub services: Vec<ServiceSummary>,
    /// With `--service`: its frontends and their backends; absent without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frontends: Option<Vec<FrontendReport>>,
    /// This node's, whatever `--service` says (as the fields below).
    pub draining: Draining,
    /// Services with balanced ports left to another proxy, and why.
    pub not_balanced: Vec<NotBalanced>,
    /// Why the rules, the endpoint counts and `not_balanced` are unknown
    /// (no agent answered); `None` when known.
    pub selection_unknown: Option<String>,
    /// Moves the rebalancer keeps trying, longest waiting first.
    pub waiting_moves: Vec<WaitingMoveReport>,
}

/// What a report is built from.
pub struct ReportInput<'a> {
    pub agent: AgentReport,
    pub tables: &'a Tables,
    pub tracked: &'a [(u64, TrackedConnection)],
    /// From the running agent, or why not.
    pub selection: std::result::Result<&'a Selection, &'a str>,
    pub now_unix_ms: u64,
}

/// The Service a frontend name (`namespace/name:port`) belongs to, and
/// the port.
fn split_name(name: &str) -> Option<(&str, &str)> {
    name.rsplit_once(':')
}

/// The report for every Service, or (`service`) for one and its backends.
pub fn build(
    input: &ReportInput,
    service: Option<&ServiceName>,
) -> std::result::Result<Report, UnknownService> {
    let status = &input.tables.status;
    let selection = input.selection.ok();
    // (Service, frontend for unnamed ones) → its frontends, in the maps'
    // order (by name, then frontend): stable.
    let mut groups: BTreeMap<(&str, String), Vec<&FrontendStatus>> = BTreeMap::new();
    for f in &status.frontends {
        let key = match split_name(&f.name) {
            Some((service, _)) => (service, String::new()),
            None => ("(unnamed)", socket_label(&f.key.addr, f.key.port)),
        };
        groups.entry(key).or_default().push(f);
    }
    let (services, frontends) = match service {
        None => (
            groups
                .values()
                .map(|fs| summarize(fs, status, selection))
                .collect(),
            None,
        ),
        Some(wanted) => {
            let Some(fs) = groups.get(&(wanted.0.as_str(), String::new())) else {
                return Err(unknown_service(wanted, input.selection));
            };
            (
                vec![summarize(fs, status, selection)],
                Some(fs.iter().map(|f| detail(f, status, selection)).collect()),
            )
        }
    };
    let draining = Draining {
        backends: status.draining.len() as u64,
        connections: status.draining.iter().map(|(_, c)| c).sum(),
    };
    Ok(Report {
        schema_version: SCHEMA_VERSION,
        agent: input.agent.clone(),
        services,
        frontends,
        draining,
        not_balanced: selection
            .map(|s| {
                s.not_balanced
                    .iter()
                    .map(|(service, reason)| NotBalanced {
                        service: service.clone(),
                        reason: reason.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        selection_unknown: input.selection.err().map(str::to_string),
        waiting_moves: collect_waiting(&input.tables.waiting, input.tracked, input.now_unix_ms)
            .into_iter()
            .map(|m| WaitingMoveReport {
                backend: socket_label(&m.backend.addr, m.backend.port),
                client: socket_label(&m.client.addr, m.client.port),
                reason: m.reason.into(),
                cause: m.cause.into(),
                waiting_s: m.waiting_s,
            })
            .collect(),
    })
}

fn unknown_service(
    wanted: &ServiceName,
    selection: std::result::Result<&Selection, &str>,
) -> UnknownService {
    UnknownService(
        match selection.ok().and_then(|s| s.not_balanced.get(&wanted.0)) {
            Some(reason) => format!("grpclb does not balance Service {wanted}: {reason}"),
            None => format!(
                "no balanced Service {wanted} on this node (none of its ports is balanced, or it \
             does not exist); `grpclb-agent status` lists the balanced Services"
            ),
        },
    )
}

fn view_of(status: &Status, backend: &Backend) -> ViewLoad {
    match status.views.get(backend) {
        Some(Some(load)) => ViewLoad::Fresh { load: *load },
        Some(None) => ViewLoad::Expired,
        None => ViewLoad::None,
    }
}

fn summarize(
    frontends: &[&FrontendStatus],
    status: &Status,
    selection: Option<&Selection>,
) -> ServiceSummary {
    let labels: Vec<String> = frontends
        .iter()
        .map(|f| socket_label(&f.key.addr, f.key.port))
        .collect();
    let service = split_name(&frontends[0].name).map_or("(unnamed)", |(s, _)| s);
    let ports: BTreeSet<String> = frontends
        .iter()
        .map(|f| match split_name(&f.name) {
            Some((_, port)) => port.to_string(),
            None => f.key.port.to_string(),
        })
        .collect();
    let rules: BTreeSet<String> = selection
        .map(|s| {
            labels
                .iter()
                .filter_map(|l| s.rules.get(l).cloned())
                .collect()
        })
        .unwrap_or_default();
    let backends = selection.and_then(|s| {
        labels
            .iter()
            .map(|l| s.endpoints.get(l).copied())
            .sum::<Option<u64>>()
    });
    let active = frontends.iter().flat_map(|f| &f.backends);
    let counted: Vec<u64> = active.clone().filter_map(|(_, load)| *load).collect();
    let views: Vec<u64> = active
        .clone()
        .filter_map(|(b, _)| match view_of(status, b) {
            ViewLoad::Fresh { load } => Some(u64::from(load)),
            _ => None,
        })
        .collect();
    ServiceSummary {
        service: service.to_string(),
        ports: ports.into_iter().collect(),
        frontends: labels,
        rules: rules.into_iter().collect(),
        backends,
        ready: active.count() as u64,
        connections: counted.iter().sum(),
        connections_per_ready_backend: Spread::of(&counted),
        view_load: Spread::of(&views),
    }
}

fn detail(f: &FrontendStatus, status: &Status, selection: Option<&Selection>) -> FrontendReport {
    let frontend = socket_label(&f.key.addr, f.key.port);
    FrontendReport {
        name: f.name.clone(),
        rule: selection.and_then(|s| s.rules.get(&frontend).cloned()),
        frontend,
        generation: f.entry.generation,
        backends: f
            .backends
            .iter()
            .map(|(b, load)| BackendReport {
                backend: socket_label(&b.addr, b.port),
                connections: *load,
                view: view_of(status, b),
            })
            .collect(),
    }
}

/// The table people read: the agent line, then a line per Service (or,
/// with `--service`, that Service's line and its backends), draining
/// backends, the Services left alone and the waiting moves.
pub fn render(report: &Report) -> String {
    let mut out = format!("{}\n\n", report.agent.line());
    if report.services.is_empty() {
        out.push_str("no balanced frontends\n");
    } else {
        out.push_str(&summary_table(&report.services));
    }
    if let Some(frontends) = &report.frontends {
        out.push('\n');
        out.push_str(&backend_table(frontends));
        return out;
    }
    let d = &report.draining;
    if d.backends > 0 {
        let _ = writeln!(
            out,
            "\ndraining: {} backends in no active set hold {} connections from this node",
            d.backends, d.connections
        );
    }
    if !report.not_balanced.is_empty() {
        out.push_str("\nnot balanced:\n");
        for n in &report.not_balanced {
            let _ = writeln!(out, "  {}: {}", n.service, n.reason);
        }
    }
    if let Some(why) = &report.selection_unknown {
        let _ = writeln!(out, "\nrules and Services left alone unknown: {why}");
    }
    out.push_str(&waiting_table(&report.waiting_moves));
    out
}

fn ratio(spread: &Option<Spread>) -> String {
    match spread {
        Some(Spread {
            max_over_mean: Some(r),
            ..
        }) => format!("{r:.2}"),
        _ => "-".into(),
    }
}

/// A VIEW MAX/MEAN column once any Service has a fresh view.
fn summary_table(services: &[ServiceSummary]) -> String {
    let with_views = services.iter().any(|s| s.view_load.is_some());
    let mut rows = vec![[
        "SERVICE",
        "PORTS",
        "RULE",
        "BACKENDS",
        "READY",
        "CONNECTIONS",
        "MAX",
        "MEAN",
        "MAX/MEAN",
        "VIEW MAX/MEAN",
    ]
    .map(String::from)];
    for s in services {
        let spread = &s.connections_per_ready_backend;
        rows.push([
            s.service.clone(),
            s.ports.join(","),
            if s.rules.is_empty() {
                "?".into()
            } else {
                s.rules.join(", ")
            },
            s.backends.map_or("?".into(), |b| b.to_string()),
            s.ready.to_string(),
            s.connections.to_string(),
            spread.as_ref().map_or("-".into(), |s| s.max.to_string()),
            spread
                .as_ref()
                .map_or("-".into(), |s| format!("{:.1}", s.mean)),
            ratio(spread),
            ratio(&s.view_load),
        ]);
    }
    align(
        &rows,
        if with_views { 10 } else { 9 },
        &[3, 4, 5, 6, 7, 8, 9],
    )
}

/// The CONNECTIONS column and, once the exchange wrote any view, a VIEW
/// column: the Service-wide load the connect hook uses for the backend
/// (`expired`: ignored; empty: none, this node's count alone).
fn backend_table(frontends: &[FrontendReport]) -> String {
    let with_views = frontends
        .iter()
        .flat_map(|f| &f.backends)
        .any(|b| b.view != ViewLoad::None);
    let mut rows = vec![[
        "SERVICE",
        "FRONTEND",
        "RULE",
        "GENERATION",
        "BACKEND",
        "CONNECTIONS",
        "VIEW",
    ]
    .map(String::from)];
    for f in frontends {
        let name = if f.name.is_empty() {
            "(unnamed)".to_string()
        } else {
            f.name.clone()
        };
        let rule = f.rule.clone().unwrap_or_else(|| "?".into());
        let head = [name, f.frontend.clone(), rule, f.generation.to_string()];
        if f.backends.is_empty() {
            let [a, b, c, d] = head;
            let none = "(none: connections refused)".to_string();
            rows.push([a, b, c, d, none, String::new(), String::new()]);
            continue;
        }
        for (i, backend) in f.backends.iter().enumerate() {
            let [a, b, c, d] = if i == 0 {
                head.clone()
            } else {
                Default::default()
            };
            let count = backend
                .connections
                .map_or("(not counted)".to_string(), |l| l.to_string());
            let view = match backend.view {
                ViewLoad::Fresh { load } => load.to_string(),
                ViewLoad::Expired => "expired".into(),
                ViewLoad::None => String::new(),
            };
            rows.push([a, b, c, d, backend.backend.clone(), count, view]);
        }
    }
    align(&rows, if with_views { 7 } else { 6 }, &[3, 5, 6])
}

/// A second table under the first; nothing when no move waits.
fn waiting_table(moves: &[WaitingMoveReport]) -> String {
    if moves.is_empty() {
        return String::new();
    }
    let mut rows =
        vec![["WAITING MOVE", "CLIENT", "REASON", "WAITING", "GATE SAYS"].map(String::from)];
    for m in moves {
        rows.push([
            m.backend.clone(),
            m.client.clone(),
            m.reason.clone(),
            format!("{} s", m.waiting_s),
            m.cause.clone(),
        ]);
    }
    format!("\n{}", align(&rows, 5, &[3]))
}

/// The first `columns` cells of each row, padded to the widest cell, the
/// `right` ones (numbers) right-aligned.
fn align<const N: usize>(rows: &[[String; N]], columns: usize, right: &[usize]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).take(columns).enumerate() {
            if right.contains(&i) {
                let _ = write!(line, "{cell:>w$}  ");
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::sync::apply;
    use crate::dataplane::tables::MemoryTables;
    use crate::observe::readiness::Readiness;
    use crate::state::model::{DesiredService, DesiredState, Endpoint, EndpointCondition};
    use crate::state::topology::Rule;

    fn v6(s: &str) -> Addr {
        Addr(s.parse::<Ipv6Addr>().unwrap().octets())
    }

    #[test]
    fn socket_labels_bracket_v6_only() {
        assert_eq!(
            socket_label(&Addr::from_v4([10, 96, 0, 1]), 80),
            "10.96.0.1:80"
        );
        assert_eq!(socket_label(&v6("fd00::1"), 443), "[fd00::1]:443");
    }

    fn endpoint(addr: Addr, port: u16, condition: EndpointCondition) -> Endpoint {
        Endpoint {
            backend: Backend::new(addr, port),
            node_name: None,
            condition,
        }
    }

    fn ready(addr: Addr, port: u16) -> Endpoint {
        endpoint(addr, port, EndpointCondition::Ready)
    }

    fn pod(n: u8) -> Backend {
        Backend::new(Addr::from_v4([10, 244, 1, n]), 8443)
    }

    fn ready_agent() -> AgentReport {
        AgentReport {
            state: AgentCondition::Ready,
            pid: Some(42),
            reason: None,
        }
    }

    /// apps/echo: port grpc (two ready pods and a terminating one) and port
    /// admin (one pod); apps/dual: a v6 frontend without endpoints;
    /// apps/sticky left to kube-proxy; a draining pod with 2 connections.
    fn fixture() -> (DesiredState, MemoryTables) {
        let mut desired = DesiredState::default();
        let service = |name: &str, endpoints, rule| {
            DesiredService {
                name: name.into(),
                endpoints,
                track_frames: false,
                rule,
            }
            .into()
        };
        desired.services.insert(
            ServiceKey::new(Addr::from_v4([10, 96, 0, 10]), 50051),
            service(
                "apps/echo:grpc",
                vec![
                    ready(pod(1).addr, 8443),
                    ready(pod(2).addr, 8443),
                    endpoint(pod(3).addr, 8443, EndpointCondition::Draining),
                ],
                Rule::Ready,
            ),
        );
        desired.services.insert(
            ServiceKey::new(Addr::from_v4([10, 96, 0, 10]), 9000),
            service(
                "apps/echo:admin",
                vec![ready(pod(1).addr, 9000)],
                Rule::Ready,
            ),
        );
        desired.services.insert(
            ServiceKey::new(v6("fd00:10:96::20"), 8080),
            service("apps/dual:8080", vec![], Rule::LocalOnly),
        );
        desired.not_balanced.insert(
            "apps/sticky".into(),
            "sessionAffinity: ClientIP: left to kube-proxy".into(),
        );
        let mut t = MemoryTables::default();
        apply(&mut t, &desired).unwrap();
        *t.loads.get_mut(&pod(1)).unwrap() = 4;
        *t.loads.get_mut(&pod(2)).unwrap() = 2;
        *t.loads.get_mut(&Backend::new(pod(1).addr, 9000)).unwrap() = 1;
        t.loads.insert(pod(9), 2);
        t.loads.insert(pod(8), 0);
        (desired, t)
    }

    fn tables_of(t: &MemoryTables) -> Tables {
        Tables::read(t, Vec::new()).unwrap()
    }

    fn report_of(
        tables: &Tables,
        selection: std::result::Result<&Selection, &str>,
        service: Option<&str>,
    ) -> std::result::Result<Report, UnknownService> {
        let input = ReportInput {
            agent: ready_agent(),
            tables,
            tracked: &[],
            selection,
            now_unix_ms: 0,
        };
        build(&input, service.map(|s| s.parse().unwrap()).as_ref())
    }

    #[test]
    fn the_summary_is_a_line_per_service_sorted_by_name() {
        let (desired, t) = fixture();
        let tables = tables_of(&t);
        // As the agent serves it and `status` reads it back.
        let selection = Selection::parse(&Selection::of(&desired).to_text()).unwrap();
        assert_eq!(selection, Selection::of(&desired));
        let report = report_of(&tables, Ok(&selection), None).unwrap();
        assert_eq!(
            render(&report),
            "\
agent: ready (pid 42)

SERVICE    PORTS       RULE        BACKENDS  READY  CONNECTIONS  MAX  MEAN  MAX/MEAN
apps/dual  8080        local-only         0      0            0    -     -         -
apps/echo  admin,grpc  ready              4      3            7    4   2.3      1.71

draining: 1 backends in no active set hold 2 connections from this node

not balanced:
  apps/sticky: sessionAffinity: ClientIP: left to kube-proxy
"
        );
        let without_agent = render(
            &report_of(
                &tables,
                Err("connecting to the agent at 127.0.0.1:9925"),
                None,
            )
            .unwrap(),
        );
        assert!(
            without_agent.contains("apps/echo  admin,grpc  ?            ?      3"),
            "{without_agent}"
        );
        assert!(
            without_agent.ends_with(
                "\nrules and Services left alone unknown: connecting to the agent at 127.0.0.1:9925\n"
            ),
            "{without_agent}"
        );
    }

    #[test]
    fn one_service_shows_its_line_and_every_backend() {
        let (desired, t) = fixture();
        let tables = tables_of(&t);
        let selection = Selection::of(&desired);
        let report = report_of(&tables, Ok(&selection), Some("apps/echo")).unwrap();
        assert_eq!(
            render(&report),
            "\
agent: ready (pid 42)

SERVICE    PORTS       RULE   BACKENDS  READY  CONNECTIONS  MAX  MEAN  MAX/MEAN
apps/echo  admin,grpc  ready         4      3            7    4   2.3      1.71

SERVICE          FRONTEND          RULE   GENERATION  BACKEND          CONNECTIONS
apps/echo:admin  10.96.0.10:9000   ready           1  10.244.1.1:9000            1
apps/echo:grpc   10.96.0.10:50051  ready           1  10.244.1.1:8443            4
                                                      10.244.1.2:8443            2
"
        );
    }

    #[test]
    fn an_unknown_service_says_how_to_list_them_or_why_it_is_left_alone() {
        let (desired, t) = fixture();
        let tables = tables_of(&t);
        let selection = Selection::of(&desired);
        let e = report_of(&tables, Ok(&selection), Some("apps/nope")).unwrap_err();
        assert!(
            e.0.starts_with("no balanced Service apps/nope on this node")
                && e.0
                    .ends_with("`grpclb-agent status` lists the balanced Services"),
            "{e}"
        );
        let e = report_of(&tables, Ok(&selection), Some("apps/sticky")).unwrap_err();
        assert_eq!(
            e.0,
            "grpclb does not balance Service apps/sticky: sessionAffinity: ClientIP: left to kube-proxy"
        );
    }

    /// The JSON document scripts read (docs/status.md): a change here is
    /// a change of the schema, and of SCHEMA_VERSION when a field changes
    /// meaning or goes away.
    #[test]
    fn the_json_schema_is_pinned() {
        let (desired, mut t) = fixture();
        t.views.insert(
            pod(1),
            grpclb_common::BackendView {
                load: 12,
                baseline: 0,
                expires_ns: u64::MAX,
            },
        );
        t.views.insert(
            pod(2),
            grpclb_common::BackendView {
                load: 30,
                baseline: 0,
                expires_ns: 0,
            },
        );
        let tables = tables_of(&t);
        let selection = Selection::of(&desired);
        let mut report = report_of(&tables, Ok(&selection), Some("apps/echo")).unwrap();
        report.agent = AgentReport {
            state: AgentCondition::NotReady,
            pid: Some(42),
            reason: Some("FRONTENDS is full".into()),
        };
        report.waiting_moves.push(WaitingMoveReport {
            backend: "10.244.1.1:8443".into(),
            client: "10.244.0.2:40001".into(),
            reason: "drain".into(),
            cause: "send_queue_busy".into(),
            waiting_s: 5,
        });
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "schema_version": 1,
                "agent": {"state": "not_ready", "pid": 42, "reason": "FRONTENDS is full"},
                "services": [{
                    "service": "apps/echo",
                    "ports": ["admin", "grpc"],
                    "frontends": ["10.96.0.10:9000", "10.96.0.10:50051"],
                    "rules": ["ready"],
                    "backends": 4,
                    "ready": 3,
                    "connections": 7,
                    "connections_per_ready_backend": {
                        "max": 4, "mean": 7.0 / 3.0, "max_over_mean": 4.0 / (7.0 / 3.0)
                    },
                    "view_load": {"max": 12, "mean": 12.0, "max_over_mean": 1.0},
                }],
                "frontends": [
                    {
                        "name": "apps/echo:admin",
                        "frontend": "10.96.0.10:9000",
                        "rule": "ready",
                        "generation": 1,
                        "backends": [{
                            "backend": "10.244.1.1:9000",
                            "connections": 1,
                            "view": {"state": "none"},
                        }],
                    },
                    {
                        "name": "apps/echo:grpc",
                        "frontend": "10.96.0.10:50051",
                        "rule": "ready",
                        "generation": 1,
                        "backends": [
                            {
                                "backend": "10.244.1.1:8443",
                                "connections": 4,
                                "view": {"state": "fresh", "load": 12},
                            },
                            {
                                "backend": "10.244.1.2:8443",
                                "connections": 2,
                                "view": {"state": "expired"},
                            },
                        ],
                    },
                ],
                "draining": {"backends": 1, "connections": 2},
                "not_balanced": [{
                    "service": "apps/sticky",
                    "reason": "sessionAffinity: ClientIP: left to kube-proxy",
                }],
                "selection_unknown": null,
                "waiting_moves": [{
                    "backend": "10.244.1.1:8443",
                    "client": "10.244.0.2:40001",
                    "reason": "drain",
                    "cause": "send_queue_busy",
                    "waiting_s": 5,
                }],
            })
        );
        let back: Report = serde_json::from_value(json).unwrap();
        assert_eq!(back, report, "what the agent serves, `status` reads");
        let summary = report_of(&tables, Ok(&selection), None).unwrap();
        let json = serde_json::to_value(&summary).unwrap();
        assert!(json.get("frontends").is_none(), "only with --service");
        assert_eq!(json["services"][0]["service"], "apps/dual");
        assert_eq!(
            json["services"][0]["connections_per_ready_backend"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn view_columns_show_the_service_wide_loads_once_any_is_written() {
        let mut desired = DesiredState::default();
        desired.services.insert(
            ServiceKey::new(Addr::from_v4([10, 96, 0, 10]), 50051),
            DesiredService {
                name: "apps/echo:grpc".into(),
                endpoints: (1..=3).map(|n| ready(pod(n).addr, 8443)).collect(),
                track_frames: false,
                rule: Rule::Ready,
            }
            .into(),
        );
        let mut t = MemoryTables::default();
        apply(&mut t, &desired).unwrap();
        let render_of = |t: &MemoryTables, service| {
            render(&report_of(&tables_of(t), Err("no agent"), service).unwrap())
        };
        assert!(!render_of(&t, None).contains("VIEW"));
        assert!(!render_of(&t, Some("apps/echo")).contains("VIEW"));
        let view = |load, expires_ns| grpclb_common::BackendView {
            load,
            baseline: 0,
            expires_ns,
        };
        t.views.insert(pod(1), view(12, u64::MAX));
        t.views.insert(pod(2), view(30, 0));
        t.views.insert(pod(3), view(6, u64::MAX));
        let summary = render_of(&t, None);
        let lines: Vec<&str> = summary.lines().collect();
        assert!(lines[2].ends_with("MAX/MEAN  VIEW MAX/MEAN"), "{summary}");
        assert!(lines[3].ends_with("1.33"), "12 / mean(12, 6): {summary}");
        let table = render_of(&t, Some("apps/echo"));
        let last = |n: u8| {
            table
                .lines()
                .find(|l| l.contains(&format!("10.244.1.{n}:8443")))
                .unwrap()
                .split_whitespace()
                .last()
                .unwrap()
                .to_string()
        };
        assert!(table.lines().nth(5).unwrap().ends_with("VIEW"), "{table}");
        assert_eq!(last(1), "12");
        assert_eq!(last(2), "expired");
        assert_eq!(last(3), "6");
    }

    #[test]
    fn selection_text_rejects_what_it_does_not_know() {
        assert!(Selection::parse("rule\tonly-two-fields").is_err());
        assert!(Selection::parse("other\ta\tb").is_err());
        assert!(Selection::parse("endpoints\t10.96.0.1:80\tmany").is_err());
        assert_eq!(Selection::parse("").unwrap(), Selection::default());
    }

    #[test]
    fn empty_maps_say_so() {
        let tables = tables_of(&MemoryTables::default());
        let report = report_of(&tables, Ok(&Selection::default()), None).unwrap();
        assert_eq!(
            render(&report),
            "agent: ready (pid 42)\n\nno balanced frontends\n"
        );
    }

    #[test]
    fn unnamed_frontends_and_uncounted_backends_are_marked() {
        let mut t = MemoryTables::default();
        let key = ServiceKey::new(Addr::from_v4([10, 96, 0, 1]), 80);
        t.frontends.insert(
            key,
            ServiceEntry {
                generation: 2,
                backend_count: 1,
            },
        );
        t.slots.insert(
            BackendSlotKey {
                service: key,
                slot: 0,
                index: 0,
            },
            Backend::new(Addr::from_v4([10, 0, 0, 1]), 81),
        );
        let tables = tables_of(&t);
        let report = report_of(&tables, Ok(&Selection::default()), None).unwrap();
        let s = &report.services[0];
        assert_eq!(
            (s.service.as_str(), &s.ports[..], s.ready, s.backends),
            ("(unnamed)", &["80".to_string()][..], 1, None),
            "no endpoint count for a frontend the agent did not name"
        );
        assert_eq!(s.connections_per_ready_backend, None, "not counted");
        let input = ReportInput {
            agent: ready_agent(),
            tables: &tables,
            tracked: &[],
            selection: Ok(&Selection::default()),
            now_unix_ms: 0,
        };
        let mut status = tables.status.clone();
        status.frontends[0].name = "apps/x:80".into();
        let named = Tables {
            status,
            ..tables.clone()
        };
        let detail = build(
            &ReportInput {
                tables: &named,
                ..input
            },
            Some(&"apps/x".parse().unwrap()),
        )
        .unwrap();
        assert!(
            render(&detail).contains("10.0.0.1:81  (not counted)"),
            "{}",
            render(&detail)
        );
    }

    #[test]
    fn waiting_moves_show_with_their_connection_longest_first() {
        let pod = Backend::new(Addr::from_v4([10, 244, 0, 10]), 50072);
        let connection = |port| TrackedConnection {
            backend: pod,
            client: Backend::new(Addr::from_v4([10, 244, 0, 2]), port),
            ..crate::testing::answered(pod, 0)
        };
        let waiting = |since_unix_ms, cause| MoveWaiting {
            since_unix_ms,
            reason: 0,
            cause,
        };
        let tables = Tables {
            waiting: vec![
                (1, waiting(95_000, 0)),
                (2, waiting(88_000, 2)),
                (3, waiting(50_000, 0)),
            ],
            ..Tables::default()
        };
        let input = ReportInput {
            agent: ready_agent(),
            tables: &tables,
            // Connection 3 closed meanwhile.
            tracked: &[(1, connection(40001)), (2, connection(40002))],
            selection: Ok(&Selection::default()),
            now_unix_ms: 100_000,
        };
        assert_eq!(
            render(&build(&input, None).unwrap()),
            "agent: ready (pid 42)

no balanced frontends

WAITING MOVE       CLIENT            REASON  WAITING  GATE SAYS
10.244.0.10:50072  10.244.0.2:40002  drain      12 s  send_buffer_full
10.244.0.10:50072  10.244.0.2:40001  drain       5 s  send_queue_busy
"
        );
    }

    #[test]
    fn service_names_are_namespace_slash_name_and_a_query_takes_one() {
        assert_eq!(
            "apps/echo-2.v1".parse::<ServiceName>().unwrap().to_string(),
            "apps/echo-2.v1"
        );
        for bad in [
            "echo",
            "apps/",
            "/echo",
            "apps/echo/x",
            "Apps/echo",
            "apps/echo&x=1",
        ] {
            let e = bad.parse::<ServiceName>().unwrap_err();
            assert!(
                e.contains("expected a Service as NAMESPACE/NAME"),
                "{bad}: {e}"
            );
        }
        assert_eq!(
            "apps/echo:grpc".parse::<ServiceName>().unwrap_err(),
            "expected a Service as NAMESPACE/NAME, such as default/echo, without the port: \
             apps/echo, not apps/echo:grpc"
        );
        let apps_echo: ServiceName = "apps/echo".parse().unwrap();
        assert_eq!(parse_status_query(None), Ok(None));
        let path = status_path(Some(&apps_echo));
        assert_eq!(path, "/status?service=apps/echo");
        assert_eq!(
            parse_status_query(path.split_once('?').map(|(_, q)| q)),
            Ok(Some(apps_echo))
        );
        assert!(parse_status_query(Some("service=echo")).is_err());
        assert!(parse_status_query(Some("output=json")).is_err());
    }

    #[test]
    fn the_agent_line_exit_code_and_advice_follow_the_agent_state() {
        let mut state = AgentState {
            pid: 12,
            start_time: 1,
            readiness: Readiness::ready(),
        };
        let report = |state: Option<&AgentState>, running| {
            let agent = AgentReport::of(state, running);
            let tables = Tables::default();
            let input = ReportInput {
                agent: agent.clone(),
                tables: &tables,
                tracked: &[],
                selection: Ok(&Selection::default()),
                now_unix_ms: 0,
            };
            (agent, exit_code(&build(&input, None).unwrap()))
        };
        let (ready, code) = report(Some(&state), true);
        assert_eq!((ready.line().as_str(), code), ("agent: ready (pid 12)", 0));
        assert_eq!(ready.advice("/sys/fs/bpf/grpclb"), None);

        state.readiness = Readiness::not_ready("waiting for the first complete state");
        let (not_ready, code) = report(Some(&state), true);
        assert_eq!(
            not_ready.line(),
            "agent: not ready (pid 12): waiting for the first complete state"
        );
        assert_eq!(code, EXIT_NOT_READY);
        assert!(not_ready
            .advice("/sys/fs/bpf/grpclb")
            .unwrap()
            .starts_with("the agent (pid 12) is not ready: waiting for the first complete state;"));

        let (gone, code) = report(Some(&state), false);
        assert_eq!(gone.state, AgentCondition::NotRunning);
        assert!(gone
            .line()
            .starts_with("agent: not running (pid 12 is gone)"));
        assert_eq!(code, EXIT_NOT_READY);
        assert!(gone
            .advice("/sys/fs/bpf/grpclb")
            .unwrap()
            .contains("start `grpclb-agent run`"));

        let (never, code) = report(None, false);
        assert!(never.line().starts_with("agent: not running"));
        assert_eq!(code, EXIT_NOT_READY);
        assert!(never
            .advice("/sys/fs/bpf/x")
            .unwrap()
            .starts_with("no agent ever ran with the pins under /sys/fs/bpf/x"));
    }
}
