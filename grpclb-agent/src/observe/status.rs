//! `grpclb-agent status`: what the pinned maps hold, as a table, with the
//! rule that chose each frontend's endpoints and the Services left to
//! another proxy, which only the running agent knows. The running agent
//! serves the whole text ([`report`], from its data plane owner's
//! snapshot) on `/status` of its metrics address; `status` reads the maps
//! itself only when no agent for those maps answers there.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};
use grpclb_common::{
    Addr, Backend, BackendSlotKey, MoveWaiting, ServiceEntry, ServiceKey, TrackedConnection,
};

use crate::dataplane::snapshot::Tables;
use crate::dataplane::tables::ServiceTables;
use crate::observe::metrics::server::{StatusPage, BPFFS_HEADER};
use crate::state::model::DesiredState;

/// What the running agent decided beyond the maps' contents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Frontend `VIP:port` → the rule that chose its endpoints.
    pub rules: BTreeMap<String, String>,
    /// `namespace/name` → why grpclb leaves the Service alone.
    pub not_balanced: BTreeMap<String, String>,
}

impl Selection {
    pub fn of(state: &DesiredState) -> Selection {
        Selection {
            rules: state
                .services
                .iter()
                .map(|(key, s)| (socket_label(&key.addr, key.port), s.rule.to_string()))
                .collect(),
            not_balanced: state.not_balanced.clone(),
        }
    }

    /// One tab-separated line per entry: `rule VIP:port RULE` or
    /// `not-balanced SERVICE REASON` (no field holds a tab or newline).
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for (frontend, rule) in &self.rules {
            let _ = writeln!(out, "rule\t{frontend}\t{rule}");
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
    Selection::parse(&get(addr, "/selection")?.text)
}

/// `GET /status` from the agent's metrics address: what it prints.
pub fn fetch_status(addr: std::net::SocketAddr) -> Result<StatusPage> {
    get(addr, "/status")
}

/// A 200 answer's body, and the pin directory it names (empty: none).
fn get(addr: std::net::SocketAddr, path: &str) -> Result<StatusPage> {
    use std::io::{Read as _, Write as _};
    // Plain HTTP/1.0, so `status` needs no runtime.
    let timeout = std::time::Duration::from_secs(2);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to the agent at {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
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
    if !status.contains(" 200 ") {
        anyhow::bail!("the agent at {addr} answered {path} with {status:?}");
    }
    let bpffs = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case(BPFFS_HEADER))
        .map(|(_, value)| value.trim().to_string())
        .unwrap_or_default();
    Ok(StatusPage {
        bpffs,
        text: body.to_string(),
    })
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

/// The table; with `selection` (from the running agent) a RULE column and
/// the Services left alone, without it a note saying why they are missing.
pub fn render(status: &Status, selection: std::result::Result<&Selection, &str>) -> String {
    let mut out = String::new();
    if status.frontends.is_empty() && status.draining.is_empty() {
        out.push_str("no balanced frontends\n");
    } else {
        out.push_str(&table(status, selection.ok()));
    }
    match selection {
        Ok(selection) if !selection.not_balanced.is_empty() => {
            out.push_str("\nnot balanced:\n");
            for (service, reason) in &selection.not_balanced {
                let _ = writeln!(out, "  {service}: {reason}");
            }
        }
        Ok(_) => {}
        Err(why) => {
            let _ = writeln!(out, "\nrules and Services left alone unknown: {why}");
        }
    }
    out
}

/// The CONNECTIONS column and, once the exchange wrote any view, a VIEW
/// column: the Service-wide load the connect hook uses for the backend
/// (`expired`: ignored; empty: none, this node's count alone).
fn table(status: &Status, selection: Option<&Selection>) -> String {
    let with_views = !status.views.is_empty();
    let view = |backend: &Backend| match status.views.get(backend) {
        Some(Some(load)) => load.to_string(),
        Some(None) => "expired".into(),
        None => String::new(),
    };
    let mut rows: Vec<[String; 7]> = vec![[
        "SERVICE".into(),
        "FRONTEND".into(),
        "RULE".into(),
        "GENERATION".into(),
        "BACKEND".into(),
        "CONNECTIONS".into(),
        "VIEW".into(),
    ]];
    for f in &status.frontends {
        let name = if f.name.is_empty() {
            "(unnamed)".to_string()
        } else {
            f.name.clone()
        };
        let frontend = socket_label(&f.key.addr, f.key.port);
        let rule = selection
            .and_then(|s| s.rules.get(&frontend))
            .cloned()
            .unwrap_or_else(|| "?".into());
        let head = [name, frontend, rule, f.entry.generation.to_string()];
        if f.backends.is_empty() {
            let [a, b, c, d] = head;
            rows.push([
                a,
                b,
                c,
                d,
                "(none: connections refused)".into(),
                String::new(),
                String::new(),
            ]);
            continue;
        }
        for (i, (backend, load)) in f.backends.iter().enumerate() {
            let [a, b, c, d] = if i == 0 {
                head.clone()
            } else {
                Default::default()
            };
            let count = load.map_or("(not counted)".to_string(), |l| l.to_string());
            rows.push([
                a,
                b,
                c,
                d,
                socket_label(&backend.addr, backend.port),
                count,
                view(backend),
            ]);
        }
    }
    for (backend, count) in &status.draining {
        rows.push([
            "(draining)".into(),
            String::new(),
            String::new(),
            String::new(),
            socket_label(&backend.addr, backend.port),
            count.to_string(),
            view(backend),
        ]);
    }
    let columns = if with_views { 7 } else { 6 };
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).take(columns).enumerate() {
            match i {
                // Numbers right-aligned.
                3 | 5 | 6 => write!(line, "{cell:>w$}  ").unwrap(),
                _ => write!(line, "{cell:<w$}  ").unwrap(),
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
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

/// Everything `grpclb-agent status` prints: the agent line, the table (it
/// ends at its first blank line), the Services left alone and the waiting
/// moves. The running agent serves it on `/status`; `status` builds it
/// from the maps itself only when no agent answers.
pub fn report(
    agent: &str,
    tables: &Tables,
    tracked: &[(u64, TrackedConnection)],
    selection: std::result::Result<&Selection, &str>,
    now_unix_ms: u64,
) -> String {
    let waiting = collect_waiting(&tables.waiting, tracked, now_unix_ms);
    format!(
        "{agent}\n\n{}{}",
        render(&tables.status, selection),
        render_waiting(&waiting)
    )
}

/// A second table under [`render`]'s; nothing when no move waits.
pub fn render_waiting(moves: &[WaitingMove]) -> String {
    if moves.is_empty() {
        return String::new();
    }
    let mut rows: Vec<[String; 5]> = vec![[
        "WAITING MOVE".into(),
        "CLIENT".into(),
        "REASON".into(),
        "WAITING".into(),
        "GATE SAYS".into(),
    ]];
    for m in moves {
        rows.push([
            socket_label(&m.backend.addr, m.backend.port),
            socket_label(&m.client.addr, m.client.port),
            m.reason.into(),
            format!("{} s", m.waiting_s),
            m.cause.into(),
        ]);
    }
    let mut widths = [0usize; 5];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::from("\n");
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            match i {
                3 => write!(line, "{cell:>w$}  ").unwrap(),
                _ => write!(line, "{cell:<w$}  ").unwrap(),
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

    fn ready(addr: Addr, port: u16) -> Endpoint {
        Endpoint {
            backend: Backend::new(addr, port),
            node_name: None,
            condition: EndpointCondition::Ready,
        }
    }

    #[test]
    fn table_shows_frontends_backends_counts_and_draining() {
        let mut desired = DesiredState::default();
        desired.services.insert(
            ServiceKey::new(Addr::from_v4([10, 96, 0, 10]), 50051),
            DesiredService {
                name: "apps/echo:grpc".into(),
                endpoints: vec![
                    ready(Addr::from_v4([10, 244, 1, 5]), 8443),
                    ready(Addr::from_v4([10, 244, 2, 7]), 8443),
                ],
                track_frames: false,
                rule: Rule::Ready,
            }
            .into(),
        );
        desired.services.insert(
            ServiceKey::new(v6("fd00:10:96::20"), 8080),
            DesiredService {
                name: "apps/dual:8080".into(),
                endpoints: vec![],
                track_frames: false,
                rule: Rule::LocalOnly,
            }
            .into(),
        );
        desired.not_balanced.insert(
            "apps/sticky".into(),
            "sessionAffinity: ClientIP: left to kube-proxy".into(),
        );
        let mut t = MemoryTables::default();
        apply(&mut t, &desired).unwrap();
        *t.loads
            .get_mut(&Backend::new(Addr::from_v4([10, 244, 1, 5]), 8443))
            .unwrap() = 4;
        t.loads
            .insert(Backend::new(Addr::from_v4([10, 244, 9, 9]), 8443), 2);
        t.loads
            .insert(Backend::new(Addr::from_v4([10, 244, 9, 8]), 8443), 0);

        let status = collect(&t).unwrap();
        // As the agent serves it and `status` reads it back.
        let selection = Selection::parse(&Selection::of(&desired).to_text()).unwrap();
        assert_eq!(selection, Selection::of(&desired));
        assert_eq!(
            render(&status, Ok(&selection)),
            "\
SERVICE         FRONTEND               RULE        GENERATION  BACKEND                      CONNECTIONS
apps/dual:8080  [fd00:10:96::20]:8080  local-only           1  (none: connections refused)
apps/echo:grpc  10.96.0.10:50051       ready                1  10.244.1.5:8443                        4
                                                               10.244.2.7:8443                        0
(draining)                                                     10.244.9.9:8443                        2

not balanced:
  apps/sticky: sessionAffinity: ClientIP: left to kube-proxy
"
        );
        let without_agent = render(&status, Err("connecting to the agent at 127.0.0.1:9925"));
        assert!(
            without_agent.contains("10.96.0.10:50051       ?"),
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
    fn the_report_is_the_agent_line_a_blank_line_the_table_and_the_waiting_moves() {
        let backend = Backend::new(Addr::from_v4([10, 244, 0, 1]), 8080);
        let mut connection = crate::testing::answered(backend, 0);
        connection.client = Backend::new(Addr::from_v4([10, 244, 1, 9]), 40000);
        let waiting = MoveWaiting {
            since_unix_ms: 1_000,
            reason: 0,
            cause: 0,
        };
        let tables = Tables {
            waiting: vec![(7, waiting), (8, waiting)],
            ..Tables::default()
        };
        let report = report(
            "agent: ready (pid 42)",
            &tables,
            &[(7, connection)],
            Ok(&Selection::default()),
            31_000,
        );
        let waiting = render_waiting(&collect_waiting(
            &tables.waiting,
            &[(7, connection)],
            31_000,
        ));
        assert!(waiting.contains("30 s"), "{waiting}");
        assert_eq!(
            report,
            format!("agent: ready (pid 42)\n\nno balanced frontends\n{waiting}"),
            "connection 8 closed: not shown"
        );
    }

    #[test]
    fn selection_text_rejects_what_it_does_not_know() {
        assert!(Selection::parse("rule\tonly-two-fields").is_err());
        assert!(Selection::parse("other\ta\tb").is_err());
        assert_eq!(Selection::parse("").unwrap(), Selection::default());
    }

    #[test]
    fn a_view_column_shows_the_service_wide_loads_once_any_is_written() {
        let pod = |n| Backend::new(Addr::from_v4([10, 244, 1, n]), 8443);
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
        let without = render(&collect(&t).unwrap(), Err("no agent"));
        assert!(!without.contains("VIEW"), "{without}");
        let view = |load, expires_ns| grpclb_common::BackendView {
            load,
            baseline: 0,
            expires_ns,
        };
        t.views.insert(pod(1), view(12, u64::MAX));
        t.views.insert(pod(2), view(30, 0));
        let status = collect(&t).unwrap();
        assert_eq!(status.views[&pod(1)], Some(12));
        assert_eq!(status.views[&pod(2)], None, "expired");
        let table = render(&status, Err("no agent"));
        let line = |n: u8| {
            table
                .lines()
                .find(|l| l.contains(&format!("10.244.1.{n}:8443")))
                .unwrap()
                .split_whitespace()
                .last()
                .unwrap()
                .to_string()
        };
        assert!(table.lines().next().unwrap().ends_with("VIEW"), "{table}");
        assert_eq!(line(1), "12");
        assert_eq!(line(2), "expired");
        assert_eq!(
            line(3),
            "0",
            "no view: the CONNECTIONS column ends the line"
        );
    }

    #[test]
    fn empty_maps_say_so() {
        let status = collect(&MemoryTables::default()).unwrap();
        assert_eq!(
            render(&status, Ok(&Selection::default())),
            "no balanced frontends\n"
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
        let out = render(&collect(&t).unwrap(), Ok(&Selection::default()));
        assert!(out.contains("(unnamed)"), "{out}");
        assert!(out.contains("10.0.0.1:81  (not counted)"), "{out}");
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
        let moves = collect_waiting(
            &[
                (1, waiting(95_000, 0)),
                (2, waiting(88_000, 2)),
                (3, waiting(50_000, 0)),
            ],
            // Connection 3 closed meanwhile.
            &[(1, connection(40001)), (2, connection(40002))],
            100_000,
        );
        assert_eq!(
            render_waiting(&moves),
            "
WAITING MOVE       CLIENT            REASON  WAITING  GATE SAYS
10.244.0.10:50072  10.244.0.2:40002  drain      12 s  send_buffer_full
10.244.0.10:50072  10.244.0.2:40001  drain       5 s  send_queue_busy
"
        );
        assert_eq!(render_waiting(&[]), "");
    }
}
