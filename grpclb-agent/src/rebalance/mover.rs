//! The rebalancing loop: at every snapshot of the tracked connections the
//! data plane owner publishes (with each connection's call rate), it
//! attributes connections to Services ([`Loads`]), asks the planner which connections should move, and keeps trying to write
//! a GOAWAY into each until the gate lets it in or the move is given up.
//! A drain is never given up while its connection and the drain last: a
//! reader slower than its pod keeps the pod's send queue from emptying, and
//! the GOAWAY then goes at the first moment it does (between responses, at
//! the end of a stream). Such a wait is reported once per connection (log,
//! `grpclb_moves_waiting`, `MOVES_WAITING` for `grpclb-agent status`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpclb_common::frame::Phase;
use grpclb_common::{ServiceKey, TrackedConnection};
use tokio::sync::watch;

use crate::dataplane::owner;
use crate::dataplane::snapshot::Snapshot;
use crate::exchange::model::ClusterView;
use crate::observe::metrics::Metrics;
use crate::observe::status::socket_label;
use crate::rebalance::inject::{Attempt, Injector, SocketHandle};
use crate::rebalance::planner::{self, Connection, PlannerConfig, PlannerState, Reason};
use crate::state::model::DesiredState;
use grpclb_common::{InjectionOutcome, MoveWaiting};

/// How often a pending move is tried again while the gate says "not now".
const RETRY_INTERVAL: Duration = Duration::from_millis(10);
/// At most this many attempts per retry round, the others wait for the next
/// (round robin): many stuck drains cost at most 6400 attempts per second.
const ATTEMPTS_PER_ROUND: usize = 64;
/// A move other than a drain the gate keeps refusing for this long is given
/// up; the planner may choose another connection.
const MOVE_DEADLINE: Duration = Duration::from_secs(10);
/// A drain that has waited this long is reported as waiting.
pub const REPORT_AFTER: Duration = Duration::from_secs(5);
/// Which Service each connection belongs to, kept while the connection is
/// open: the rates come from the owner's [`Snapshot`]s, computed there once.
#[derive(Debug, Default)]
pub struct Loads {
    seen: BTreeMap<u64, ServiceKey>,
}

impl Loads {
    /// Calls per second by (backend, client) `ip:port` of the connections
    /// of tracked Services, for the metrics.
    pub fn rates(&self, snapshot: &Snapshot) -> BTreeMap<(String, String), f64> {
        snapshot
            .tracked
            .iter()
            .filter(|(cookie, _)| self.seen.contains_key(cookie))
            .filter_map(|(cookie, c)| {
                let rate = snapshot.rates.get(cookie)?;
                let label = |b: &grpclb_common::Backend| socket_label(&b.addr, b.port);
                Some(((label(&c.backend), label(&c.client)), rate.rps))
            })
            .collect()
    }

    /// The planner's view of the connections that can still move: tracked,
    /// no GOAWAY in the stream yet, and belonging to a tracked Service
    /// (the first, if a pod backs several).
    pub fn observe(&mut self, desired: &DesiredState, snapshot: &Snapshot) -> Vec<Connection> {
        let mut next = BTreeMap::new();
        let mut movable = Vec::new();
        for (cookie, c) in &snapshot.tracked {
            let service = desired
                .services
                .iter()
                .find(|(_, s)| s.track_frames && s.endpoints.iter().any(|e| e.backend == c.backend))
                .map(|(key, _)| *key)
                .or_else(|| self.seen.get(cookie).copied());
            let Some(service) = service else { continue };
            let Some(rate) = snapshot.rates.get(cookie) else {
                continue;
            };
            let can_move = c.tracker.phase() == Phase::Frames
                && !c.tracker.goaway_seen()
                && !c.tracker.injected();
            if can_move {
                movable.push(Connection {
                    id: *cookie,
                    service,
                    backend: c.backend,
                    opened_ms: rate.first_seen_ms,
                    rps: rate.rps,
                    jitter: jitter(*cookie),
                });
            }
            next.insert(*cookie, service);
        }
        self.seen = next;
        movable
    }
}

/// A fixed spread per connection (splitmix64 of the cookie).
fn jitter(cookie: u64) -> u32 {
    let mut z = cookie.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as u32
}

fn reason_index(reason: Reason) -> u32 {
    match reason {
        Reason::Drain => 0,
        Reason::ScaleUp => 1,
        Reason::Hotspot => 2,
        Reason::MaxAge => 3,
    }
}

/// A refusal that can pass later, as `MoveWaiting::CAUSES` numbers it.
fn cause_index(attempt: Attempt) -> Option<u32> {
    match attempt {
        Attempt::Refused(InjectionOutcome::SendQueueBusy) => Some(0),
        Attempt::Refused(InjectionOutcome::NotAtBoundary) => Some(1),
        Attempt::WouldBlock => Some(2),
        _ => None,
    }
}

/// What the log says a waiting move waits for.
fn explain(cause: u32) -> &'static str {
    match cause {
        0 => {
            "the pod's send queue was never empty at an attempt: its reader takes data slower \
             than the pod writes it, and HTTP/2 flow-control windows larger than the socket \
             buffers let the pod keep the queue full"
        }
        1 => "the stream was never at a frame boundary at an attempt",
        _ => "the socket's send buffer was full at every attempt",
    }
}

/// What follows a refusal that can pass later: a drain goes on as long as
/// its connection and the drain last, other moves stop at the deadline.
fn keep_trying(reason: Reason, waited: Duration) -> bool {
    reason == Reason::Drain || waited < MOVE_DEADLINE
}

/// Whether a refused move is now due to be reported (once).
fn due_for_report(reason: Reason, waited: Duration, reported: bool) -> bool {
    reason == Reason::Drain && !reported && waited >= REPORT_AFTER
}

struct PendingMove {
    cookie: u64,
    service: ServiceKey,
    backend: grpclb_common::Backend,
    reason: Reason,
    rps: f64,
    since: Instant,
    since_unix_ms: u64,
    /// Where the pod keeps the socket, found once.
    socket: Option<SocketHandle>,
    last: Option<Attempt>,
    /// Reported as waiting (log, metric, `MOVES_WAITING`).
    reported: bool,
    /// The cause `MOVES_WAITING` shows.
    shown: Option<u32>,
}

/// Shows a reported move in `MOVES_WAITING` (for `status`), through the owner.
fn show(owner: &owner::Handle, m: &PendingMove, cause: u32) {
    let entry = MoveWaiting {
        since_unix_ms: m.since_unix_ms,
        reason: reason_index(m.reason),
        cause,
    };
    owner.show_waiting(m.cookie, entry);
}

fn clear(owner: &owner::Handle, m: &PendingMove) {
    if m.reported {
        owner.clear_waiting(m.cookie);
    }
}

/// Runs until the task is dropped or the owner stops. Plans once per
/// snapshot the owner publishes (every [`owner::SNAPSHOT_INTERVAL`] while
/// a Service tracks frames); retries pending moves every
/// [`RETRY_INTERVAL`] with fresh `TRACKED` entries of just those
/// connections. An error reading them is logged and the round skipped.
pub async fn run(
    config: PlannerConfig,
    owner: owner::Handle,
    mut injector: Injector,
    mut latest: watch::Receiver<Option<DesiredState>>,
    view: watch::Receiver<Arc<ClusterView>>,
    metrics: Arc<Metrics>,
) {
    let mut snapshots = owner.snapshots();
    let mut loads = Loads::default();
    let mut state = PlannerState::default();
    let mut pending: Vec<PendingMove> = Vec::new();
    let mut tracked = tracked_services(&loads, latest.borrow_and_update().as_ref());
    // A snapshot arrived while the loop waited (`changed` marks it seen).
    let mut arrived = false;
    loop {
        if tracked.services.is_empty() && pending.is_empty() {
            // Nothing to plan or move: sleep until a Service tracks frames.
            loads = Loads::default();
            metrics.record_call_rates(BTreeMap::new());
            metrics.record_moves_waiting(BTreeMap::new());
            if latest.changed().await.is_err() {
                return;
            }
            tracked = tracked_services(&loads, latest.borrow_and_update().as_ref());
            // Plan from the owner's next snapshot, not one from before.
            snapshots.borrow_and_update();
            continue;
        }
        if latest.has_changed().unwrap_or(false) {
            tracked = tracked_services(&loads, latest.borrow_and_update().as_ref());
        }
        if std::mem::take(&mut arrived) || snapshots.has_changed().unwrap_or(false) {
            let snapshot = snapshots.borrow_and_update().clone();
            let desired = &tracked;
            let movable = loads.observe(desired, &snapshot);
            metrics.record_call_rates(loads.rates(&snapshot));
            let view = view.borrow().clone();
            state.set_wall_clock(snapshot.taken_ms, unix_ms());
            let (moves, next) =
                planner::plan(&config, &state, desired, &view, &movable, snapshot.taken_ms);
            state = next;
            // A pod ready again keeps its connections.
            pending.retain(|m| {
                let over =
                    m.reason == Reason::Drain && !planner::drains(desired, &m.service, &m.backend);
                if over {
                    tracing::info!(
                        cookie = m.cookie,
                        backend = %socket_label(&m.backend.addr, m.backend.port),
                        "drain called off: the endpoint is ready again"
                    );
                    state.forget(m.cookie);
                    clear(&owner, m);
                }
                !over
            });
            for m in moves {
                tracing::debug!(cookie = m.connection, reason = ?m.reason, "planned a move");
                pending.push(PendingMove {
                    cookie: m.connection,
                    service: m.service,
                    backend: m.backend,
                    reason: m.reason,
                    rps: m.rps,
                    since: Instant::now(),
                    since_unix_ms: unix_ms(),
                    socket: None,
                    last: None,
                    reported: false,
                    shown: None,
                });
            }
        }
        if !pending.is_empty() {
            let n = pending.len().min(ATTEMPTS_PER_ROUND);
            let cookies = pending[..n].iter().map(|m| m.cookie).collect();
            match owner.tracked(cookies).await {
                Ok(by_cookie) => {
                    let mut round: Vec<PendingMove> = pending.drain(..n).collect();
                    round.retain_mut(|m| {
                        let over = attempt(&mut injector, m, by_cookie.get(&m.cookie), &metrics);
                        if over {
                            clear(&owner, m);
                        } else if let Some(cause) = m.last.and_then(cause_index) {
                            if due_for_report(m.reason, m.since.elapsed(), m.reported) {
                                report_waiting(m, by_cookie.get(&m.cookie), cause);
                                m.reported = true;
                            }
                            if m.reported && m.shown != Some(cause) {
                                show(&owner, m, cause);
                                m.shown = Some(cause);
                            }
                        }
                        !over
                    });
                    // Those not tried this round go first next round.
                    pending.extend(round);
                }
                Err(e) => tracing::warn!("reading tracked connections: {e:#}"),
            }
        }
        metrics.record_moves_waiting(waiting_gauge(&pending));
        if pending.is_empty() {
            tokio::select! {
                next = snapshots.changed() => {
                    if next.is_err() { return }
                    arrived = true;
                }
                next = latest.changed() => {
                    if next.is_err() { return }
                    tracked = tracked_services(&loads, latest.borrow_and_update().as_ref());
                }
            }
        } else {
            tokio::time::sleep(RETRY_INTERVAL).await;
        }
    }
}

/// The Services of `desired` the planner and the RPS sampling look at, so
/// their work follows the tracked connections, not the size of the
/// cluster: those that track frames, and those that stopped but still have
/// connections `loads` follows (as when they were all looked at: a
/// Service's connections drain only when it goes, not when it stops
/// tracking). Computed once per published state.
fn tracked_services(loads: &Loads, desired: Option<&DesiredState>) -> DesiredState {
    let followed: BTreeSet<ServiceKey> = loads.seen.values().copied().collect();
    DesiredState {
        services: desired
            .into_iter()
            .flat_map(|d| &d.services)
            .filter(|(key, s)| s.track_frames || followed.contains(key))
            .map(|(key, s)| (*key, s.clone()))
            .collect(),
        not_balanced: BTreeMap::new(),
        nodes: Arc::default(),
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Reported waiting moves per (backend, cause), for `grpclb_moves_waiting`:
/// as many series as local pods times causes, at most.
fn waiting_gauge(pending: &[PendingMove]) -> BTreeMap<(String, &'static str), u64> {
    let mut gauge = BTreeMap::new();
    for m in pending.iter().filter(|m| m.reported) {
        let Some(cause) = m.last.and_then(cause_index) else {
            continue;
        };
        let backend = socket_label(&m.backend.addr, m.backend.port);
        *gauge
            .entry((backend, MoveWaiting::CAUSES[cause as usize]))
            .or_default() += 1;
    }
    gauge
}

fn report_waiting(m: &PendingMove, connection: Option<&TrackedConnection>, cause: u32) {
    let client =
        connection.map_or_else(String::new, |c| socket_label(&c.client.addr, c.client.port));
    tracing::warn!(
        backend = %socket_label(&m.backend.addr, m.backend.port),
        %client,
        reason = m.reason.label(),
        waited_s = m.since.elapsed().as_secs(),
        cause = MoveWaiting::CAUSES[cause as usize],
        "move waiting: {}; the GOAWAY goes the first time the gate can prove a frame \
         boundary (the queue empties: between responses, when the stream ends), tried every \
         {} ms for as long as the connection and the drain last",
        explain(cause),
        RETRY_INTERVAL.as_millis()
    );
}

/// One try at a pending move; true when the move is over (done or given up).
fn attempt(
    injector: &mut Injector,
    m: &mut PendingMove,
    connection: Option<&TrackedConnection>,
    metrics: &Metrics,
) -> bool {
    let reason = m.reason.label();
    let Some(connection) = connection else {
        tracing::debug!(
            cookie = m.cookie,
            reason,
            "the connection closed before it moved"
        );
        return true;
    };
    if connection.tracker.phase() != Phase::Frames
        || connection.tracker.goaway_seen()
        || connection.tracker.injected()
    {
        tracing::debug!(
            cookie = m.cookie,
            reason,
            "the connection carries a GOAWAY already or is no longer tracked"
        );
        return true;
    }
    if m.socket.is_none() {
        match injector.locate(m.cookie, connection) {
            Ok(Some(socket)) => m.socket = Some(socket),
            Ok(None) => {
                metrics.record_move_abandoned("socket_not_found");
                tracing::warn!(
                    cookie = m.cookie,
                    reason,
                    "no process of the cgroup holds the socket"
                );
                return true;
            }
            Err(e) => {
                metrics.record_move_abandoned("error");
                tracing::warn!(cookie = m.cookie, reason, "finding the socket: {e:#}");
                return true;
            }
        }
    }
    let handle = m.socket.expect("located above");
    let result = injector.write(m.cookie, connection, &handle);
    let client = socket_label(&connection.client.addr, connection.client.port);
    let backend = socket_label(&connection.backend.addr, connection.backend.port);
    match result {
        Ok(Attempt::Sent) => {
            metrics.record_goaway(reason);
            tracing::info!(
                %backend,
                %client,
                reason,
                calls_per_second = format!("{:.0}", m.rps),
                waited_ms = m.since.elapsed().as_millis() as u64,
                "GOAWAY sent"
            );
            true
        }
        Ok(a) if a.is_transient() && keep_trying(m.reason, m.since.elapsed()) => {
            tracing::trace!(
                cookie = m.cookie,
                refused = a.label(),
                "the gate said not now"
            );
            m.last = Some(a);
            false
        }
        Ok(Attempt::Busy) => {
            metrics.record_move_abandoned(Attempt::Busy.label());
            tracing::warn!(
                %backend,
                %client,
                reason,
                "move given up: another program's sockmap holds this socket (EBUSY), so the \
                 GOAWAY gate cannot; the connection stays where it is"
            );
            true
        }
        Ok(a) => {
            metrics.record_move_abandoned(a.label());
            tracing::info!(%backend, %client, reason, last = ?m.last.unwrap_or(a), "move given up");
            true
        }
        Err(e) => {
            metrics.record_move_abandoned("error");
            tracing::warn!(%backend, %client, reason, "writing the GOAWAY: {e:#}");
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use grpclb_common::{Addr, Backend};

    const SVC: ServiceKey = crate::testing::SERVICE;

    fn pod(n: u8) -> Backend {
        Backend::new(Addr::from_v4([10, 244, 0, n]), 8080)
    }

    fn desired(pods: &[u8], track_frames: bool) -> DesiredState {
        crate::testing::one_service(pods.iter().map(|&n| pod(n)), track_frames)
    }

    fn connection(n: u8, responses: usize) -> TrackedConnection {
        crate::testing::answered(pod(n), responses)
    }

    /// Loads fed snapshots as the owner takes them, one after the other.
    #[derive(Default)]
    struct Feed {
        loads: Loads,
        last: Option<Snapshot>,
    }

    impl Feed {
        fn observe(
            &mut self,
            desired: &DesiredState,
            connections: &[(u64, TrackedConnection)],
            now_ms: u64,
        ) -> Vec<Connection> {
            let snapshot = Snapshot::next(self.last.as_ref(), now_ms, connections.to_vec(), None);
            let movable = self.loads.observe(desired, &snapshot);
            self.last = Some(snapshot);
            movable
        }
    }

    #[test]
    fn connections_carry_the_snapshots_rate_and_first_sighting() {
        let mut loads = Feed::default();
        let d = desired(&[1], true);
        let first = loads.observe(&d, &[(7, connection(1, 10))], 0);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].rps, 0.0, "no rate from a single sample");
        let second = loads.observe(&d, &[(7, connection(1, 110))], 500);
        assert_eq!(second[0].rps, 100.0, "half of 200/s");
        assert_eq!(second[0].opened_ms, 0);
        assert_eq!(second[0].service, SVC);
        let with_stranger = Snapshot::next(
            loads.last.as_ref(),
            1000,
            vec![(7, connection(1, 210)), (8, connection(1, 5))],
            None,
        );
        assert_eq!(
            loads.loads.rates(&with_stranger),
            BTreeMap::from([(
                (
                    "10.244.0.1:8080".to_string(),
                    "10.244.1.9:40000".to_string()
                ),
                150.0
            )]),
            "connections the loop has not seen yet have no rate"
        );
    }

    #[test]
    fn services_without_tracking_and_closed_connections_are_left_out() {
        let mut loads = Feed::default();
        assert!(loads
            .observe(&desired(&[1], false), &[(7, connection(1, 1))], 0)
            .is_empty());
        let mut loads = Feed::default();
        loads.observe(&desired(&[1], true), &[(7, connection(1, 1))], 0);
        assert!(loads.observe(&desired(&[1], true), &[], 500).is_empty());
        assert!(loads.loads.seen.is_empty());
    }

    #[test]
    fn a_connection_keeps_its_service_when_its_endpoint_disappears() {
        let mut loads = Feed::default();
        loads.observe(&desired(&[1, 2], true), &[(7, connection(1, 1))], 0);
        let after = loads.observe(&desired(&[2], true), &[(7, connection(1, 5))], 500);
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].service, SVC);
    }

    #[test]
    fn connections_with_a_goaway_or_untracked_cannot_move() {
        let mut loads = Feed::default();
        let mut goaway = connection(1, 1);
        let at = goaway.tracker.next_offset();
        goaway.tracker.observe(at, &grpclb_common::frame::GOAWAY);
        let mut untracked = connection(1, 1);
        let at = untracked.tracker.next_offset() + 5;
        untracked.tracker.observe(at, &[0; 9]);
        assert_eq!(untracked.tracker.phase(), Phase::Untracked);
        let movable = loads.observe(
            &desired(&[1], true),
            &[(1, goaway), (2, untracked), (3, connection(1, 1))],
            0,
        );
        assert_eq!(movable.iter().map(|c| c.id).collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn drains_wait_for_good_and_are_reported_once_other_moves_give_up() {
        let long = MOVE_DEADLINE * 100;
        assert!(keep_trying(Reason::Drain, long));
        for reason in [Reason::ScaleUp, Reason::Hotspot, Reason::MaxAge] {
            assert!(keep_trying(
                reason,
                MOVE_DEADLINE - Duration::from_millis(1)
            ));
            assert!(!keep_trying(reason, MOVE_DEADLINE));
            assert!(!due_for_report(reason, long, false));
        }
        assert!(!due_for_report(Reason::Drain, REPORT_AFTER / 2, false));
        assert!(due_for_report(Reason::Drain, REPORT_AFTER, false));
        assert!(!due_for_report(Reason::Drain, long, true), "once");
    }

    #[test]
    fn only_refusals_that_can_pass_later_have_a_cause() {
        for (attempt, label) in [
            (
                Attempt::Refused(InjectionOutcome::SendQueueBusy),
                "send_queue_busy",
            ),
            (
                Attempt::Refused(InjectionOutcome::NotAtBoundary),
                "not_at_boundary",
            ),
            (Attempt::WouldBlock, "send_buffer_full"),
        ] {
            assert!(attempt.is_transient());
            let cause = cause_index(attempt).unwrap();
            assert_eq!(MoveWaiting::CAUSES[cause as usize], label);
            assert_eq!(
                attempt.label(),
                label,
                "the same name as the abandoned counter's"
            );
        }
        for attempt in [Attempt::Sent, Attempt::Busy, Attempt::SocketGone] {
            assert_eq!(cause_index(attempt), None);
        }
        for reason in [
            Reason::Drain,
            Reason::ScaleUp,
            Reason::Hotspot,
            Reason::MaxAge,
        ] {
            let w = MoveWaiting {
                reason: reason_index(reason),
                ..Default::default()
            };
            assert_eq!(w.reason_label(), reason.label());
        }
    }

    #[test]
    fn the_gauge_counts_reported_moves_per_pod_and_cause() {
        let pending = |cookie, n: u8, reported, last| PendingMove {
            cookie,
            service: SVC,
            backend: pod(n),
            reason: Reason::Drain,
            rps: 0.0,
            since: Instant::now(),
            since_unix_ms: 0,
            socket: None,
            last,
            reported,
            shown: None,
        };
        let busy = Some(Attempt::Refused(InjectionOutcome::SendQueueBusy));
        let gauge = waiting_gauge(&[
            pending(1, 1, true, busy),
            pending(2, 1, true, busy),
            pending(3, 1, false, busy),
            pending(4, 2, true, Some(Attempt::WouldBlock)),
        ]);
        assert_eq!(
            gauge,
            BTreeMap::from([
                (("10.244.0.1:8080".to_string(), "send_queue_busy"), 2),
                (("10.244.0.2:8080".to_string(), "send_buffer_full"), 1),
            ])
        );
    }

    #[test]
    fn the_planner_sees_only_services_that_track_frames_or_have_followed_connections() {
        let mut loads = Feed::default();
        assert!(tracked_services(&loads.loads, Some(&desired(&[1], false)))
            .services
            .is_empty());
        assert!(tracked_services(&loads.loads, None).services.is_empty());
        let tracking = desired(&[1], true);
        assert_eq!(
            tracked_services(&loads.loads, Some(&tracking))
                .services
                .len(),
            1
        );
        // It stops tracking while a connection is followed: still planned
        // for (its connections do not drain for that).
        loads.observe(&tracking, &[(7, connection(1, 1))], 0);
        let stopped = desired(&[1], false);
        assert_eq!(
            tracked_services(&loads.loads, Some(&stopped))
                .services
                .keys()
                .collect::<Vec<_>>(),
            vec![&SVC]
        );
    }

    #[test]
    fn jitter_spreads_and_is_stable() {
        assert_eq!(jitter(42), jitter(42));
        let values: std::collections::BTreeSet<u32> = (0..100).map(jitter).collect();
        assert_eq!(values.len(), 100);
    }
}
