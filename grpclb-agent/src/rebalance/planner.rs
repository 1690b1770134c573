//! Which server-side connections of this node's pods should be asked to move
//! (get a GOAWAY), and when. A pure function of the endpoints, per-connection
//! load and the time; the caller carries [`PlannerState`] from one plan to the
//! next ([`crate::rebalance::mover`] runs it; docs/rebalancing.md).
//!
//! Policies, in priority order, each off-switchable:
//! - drain: every connection to an endpoint that is terminating or gone;
//! - scale-up: when a Service's ready endpoints grow from N to N', each old
//!   local pod sheds about (N'−N)/N' of its RPS, spread over a window;
//! - hotspot: a local pod above (1+ε)× the mean calls per second of all of
//!   its Service's pods, on every node (the cluster view), and at least
//!   [`PlannerConfig::hotspot_min_excess`] connections' worth above the
//!   Service's lightest pod, sheds its excess until back under half of both
//!   (hysteresis); only once the
//!   Service has settled (see [`SETTLE_MS`]), and never a connection younger
//!   than [`HOTSPOT_MIN_AGE_MS`];
//! - max age: a connection older than the limit ±10 % (per-connection jitter).
//!
//! Every policy goes through one per-pod rate limit (GOAWAYs per second), and
//! no connection is chosen twice.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use grpclb_common::{Backend, ServiceKey};

use crate::exchange::model::ClusterView;
use crate::state::model::{DesiredState, EndpointCondition};

/// The hotspot policy leaves a Service alone for this long after any of its
/// connections moved or opened: a new connection's RPS is still ramping up
/// and a moved one's replacement may not be there yet, so the Service's
/// loads would look uneven when they are not.
pub const SETTLE_MS: u64 = 2_000;

/// The hotspot policy never moves a connection younger than this: the
/// replacement of a connection it moved is placed by the same view, so
/// moving it again would only make one client bounce. Twice the view's
/// worst-case freshness at 5,000 nodes (2 s, docs/exchange.md) plus
/// [`SETTLE_MS`]: by then every node has seen the connection, so one that
/// is still on a hot pod was placed there by two nodes choosing at once
/// (a collision no view can prevent), and moving it evens the Service.
/// (10 s left such a collision after a scale-up in place for 14 s.)
pub const HOTSPOT_MIN_AGE_MS: u64 = 6_000;

/// The hot pods of a Service take turns of this length, and one connection
/// moves per turn: long enough for the view on every node to show where the
/// previous one landed (2 s at 5,000 nodes, docs/exchange.md), so the next
/// reconnect is placed knowing it.
pub const HOTSPOT_TURN_MS: u64 = 2_000;

/// A pod sheds as a hotspot only once it has been hot this long: a client
/// that stalled and then catches up (a paced client after a reconnect, or
/// one starved of CPU) doubles its measured rate for a second or two, and
/// its pod would shed a connection it should keep.
pub const HOTSPOT_SUSTAIN_MS: u64 = 3_000;

#[derive(Clone, Debug, PartialEq)]
pub struct PlannerConfig {
    pub drain: bool,
    /// Spread a scale-up's moves over this many milliseconds; `None` is off.
    pub scale_up_window_ms: Option<u64>,
    /// ε of the hotspot policy; `None` is off.
    pub hotspot_epsilon: Option<f64>,
    /// How far above the mean a hotspot is at least, in connections: the
    /// Service's mean calls per second per connection times this. Below
    /// two, moving one connection from a pod with one too many makes
    /// another pod the one with one too many.
    pub hotspot_min_excess: f64,
    /// Maximum connection age in milliseconds (±10 % jitter); `None` is off.
    pub max_age_ms: Option<u64>,
    /// GOAWAYs per pod per second, across all policies.
    pub max_moves_per_pod_per_second: u32,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig {
            drain: true,
            scale_up_window_ms: Some(5_000),
            hotspot_epsilon: Some(0.25),
            hotspot_min_excess: 1.5,
            max_age_ms: None,
            max_moves_per_pod_per_second: 20,
        }
    }
}

/// A tracked server-side connection of a local pod.
#[derive(Clone, Debug, PartialEq)]
pub struct Connection {
    pub id: u64,
    pub service: ServiceKey,
    pub backend: Backend,
    pub opened_ms: u64,
    /// Completed RPCs per second, recently.
    pub rps: f64,
    /// Uniform in 0..=u32::MAX, fixed per connection: spreads age limits.
    pub jitter: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    Drain,
    ScaleUp,
    Hotspot,
    MaxAge,
}

impl Reason {
    pub const ALL: [Reason; 4] = [
        Reason::Drain,
        Reason::ScaleUp,
        Reason::Hotspot,
        Reason::MaxAge,
    ];

    /// Its `reason` label in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Drain => "drain",
            Reason::ScaleUp => "scale_up",
            Reason::Hotspot => "hotspot",
            Reason::MaxAge => "max_age",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Move {
    pub connection: u64,
    pub service: ServiceKey,
    pub backend: Backend,
    pub reason: Reason,
    /// The connection's recent RPS: the load that moves with it.
    pub rps: f64,
}

/// What the planner remembers between plans.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlannerState {
    /// Ready endpoint count per Service at the last plan.
    ready: BTreeMap<ServiceKey, usize>,
    scale_ups: BTreeMap<ServiceKey, ScaleUp>,
    /// Times (ms) of recent moves per pod, for the rate limit.
    recent: BTreeMap<Backend, VecDeque<u64>>,
    /// Connections already asked to move.
    moved: BTreeSet<u64>,
    /// Pods found hot, on any node, and since when (ms).
    hot: BTreeMap<Backend, u64>,
    /// When a connection of each Service last moved.
    last_move_ms: BTreeMap<ServiceKey, u64>,
    /// The hotspot turn (see [`HOTSPOT_TURN_MS`]) in which each Service's
    /// pod on this node last shed a connection.
    hotspot_turns: BTreeMap<ServiceKey, u64>,
    /// Wall-clock time (Unix ms) minus the plan's `now_ms`, which counts
    /// from this agent's start: hotspot turns go by the wall clock, which
    /// the nodes share, so every node agrees on whose turn it is.
    wall_offset_ms: u64,
}

#[derive(Clone, Debug, PartialEq)]
struct ScaleUp {
    started_ms: u64,
    /// RPS each old pod is to shed by the end of the window, and has shed.
    pods: BTreeMap<Backend, (f64, f64)>,
}

impl PlannerState {
    /// Ties the plans' `now_ms` to the wall clock (`unix_ms` at `now_ms`).
    pub fn set_wall_clock(&mut self, now_ms: u64, unix_ms: u64) {
        self.wall_offset_ms = unix_ms.saturating_sub(now_ms);
    }

    /// A move called off: the connection may be chosen again.
    pub fn forget(&mut self, connection: u64) {
        self.moved.remove(&connection);
    }
}

/// This node's connections that should get a GOAWAY now, and the state for
/// the next plan. `view` holds the loads of the Services' pods on other
/// nodes (empty: this node's pods are compared with each other only).
pub fn plan(
    config: &PlannerConfig,
    state: &PlannerState,
    desired: &DesiredState,
    view: &ClusterView,
    connections: &[Connection],
    now_ms: u64,
) -> (Vec<Move>, PlannerState) {
    let mut next = state.clone();
    let live: BTreeSet<u64> = connections.iter().map(|c| c.id).collect();
    next.moved.retain(|id| live.contains(id));
    for times in next.recent.values_mut() {
        while times.front().is_some_and(|&t| t + 1000 <= now_ms) {
            times.pop_front();
        }
    }
    next.recent.retain(|_, times| !times.is_empty());
    next.last_move_ms
        .retain(|key, at| desired.services.contains_key(key) && *at + SETTLE_MS > now_ms);

    let mut moves = Vec::new();
    let mut candidates: Vec<(Reason, &Connection)> = Vec::new();
    if config.drain {
        candidates.extend(draining(desired, connections).map(|c| (Reason::Drain, c)));
    }
    if let Some(window) = config.scale_up_window_ms {
        candidates.extend(scale_up(&mut next, desired, connections, now_ms, window));
    } else {
        next.scale_ups.clear();
    }
    if let Some(epsilon) = config.hotspot_epsilon {
        let settled: BTreeSet<ServiceKey> = desired
            .services
            .keys()
            .filter(|key| settled(&next, connections, key, now_ms))
            .copied()
            .collect();
        let hotspot = Hotspot {
            epsilon,
            min_excess: config.hotspot_min_excess,
            now_ms,
        };
        candidates.extend(hotspot.candidates(&mut next, desired, view, connections, &settled));
    }
    if let Some(max_age) = config.max_age_ms {
        candidates.extend(
            connections
                .iter()
                .filter(|c| too_old(c, max_age, now_ms))
                .map(|c| (Reason::MaxAge, c)),
        );
    }
    candidates.sort_by_key(|(reason, c)| (*reason, c.id));
    for (reason, c) in candidates {
        let sent = next.recent.entry(c.backend).or_default();
        if next.moved.contains(&c.id) || sent.len() >= config.max_moves_per_pod_per_second as usize
        {
            continue;
        }
        sent.push_back(now_ms);
        next.moved.insert(c.id);
        next.last_move_ms.insert(c.service, now_ms);
        if reason == Reason::ScaleUp {
            if let Some(shed) = next
                .scale_ups
                .get_mut(&c.service)
                .and_then(|s| s.pods.get_mut(&c.backend))
            {
                shed.1 += c.rps;
            }
        }
        moves.push(Move {
            connection: c.id,
            service: c.service,
            backend: c.backend,
            reason,
            rps: c.rps,
        });
    }
    (moves, next)
}

/// Connections to endpoints that are terminating (and not serving as the
/// fallback) or no longer listed. Endpoints on standby (ready, but topology
/// sends this node's clients elsewhere) keep theirs: they serve other
/// nodes' clients.
fn draining<'a>(
    desired: &'a DesiredState,
    connections: &'a [Connection],
) -> impl Iterator<Item = &'a Connection> {
    connections
        .iter()
        .filter(move |c| drains(desired, &c.service, &c.backend))
}

/// Whether `backend`'s connections of `service` drain: the endpoint is
/// terminating (and not serving as the fallback) or no longer listed.
/// Standby endpoints (ready, but this node's clients are sent elsewhere)
/// keep their connections.
pub fn drains(desired: &DesiredState, service: &ServiceKey, backend: &Backend) -> bool {
    let serving = desired.services.get(service).is_some_and(|s| {
        s.endpoints
            .iter()
            .any(|e| e.backend == *backend && e.condition != EndpointCondition::Draining)
    });
    !serving
}

/// Starts a scale-up plan when a Service's ready count grew, and returns the
/// connections each old pod should shed by now: its share grows linearly
/// over the window.
fn scale_up<'a>(
    state: &mut PlannerState,
    desired: &DesiredState,
    connections: &'a [Connection],
    now_ms: u64,
    window_ms: u64,
) -> Vec<(Reason, &'a Connection)> {
    let mut chosen = Vec::new();
    for (key, service) in &desired.services {
        let ready = service.eligible();
        let before = state.ready.insert(*key, ready.len()).unwrap_or(ready.len());
        if before > 0 && ready.len() > before {
            let share = (ready.len() - before) as f64 / ready.len() as f64;
            let pods = pod_rps(connections, key)
                .into_iter()
                .filter(|(pod, _)| ready.contains(pod))
                .map(|(pod, rps)| (pod, (rps * share, 0.0)))
                .collect();
            state.scale_ups.insert(
                *key,
                ScaleUp {
                    started_ms: now_ms,
                    pods,
                },
            );
        }
    }
    state
        .ready
        .retain(|key, _| desired.services.contains_key(key));
    state.scale_ups.retain(|key, s| {
        desired.services.contains_key(key) && now_ms < s.started_ms + 2 * window_ms
    });
    let mut finished = Vec::new();
    for (key, plan) in &state.scale_ups {
        let progress = ((now_ms - plan.started_ms) as f64 / window_ms.max(1) as f64).min(1.0);
        let chosen_before = chosen.len();
        for (pod, &(target, shed)) in &plan.pods {
            let mut owed = target * progress - shed;
            // A connection without a measured rate sheds nothing: moving one
            // (a client that just reconnected, say) only makes it bounce.
            let mut pod_connections: Vec<&Connection> = connections
                .iter()
                .filter(|c| {
                    c.service == *key
                        && c.backend == *pod
                        && c.rps > 0.0
                        && !state.moved.contains(&c.id)
                })
                .collect();
            // Lightest first: many small moves overshoot less than one big one.
            pod_connections.sort_by(|a, b| a.rps.total_cmp(&b.rps).then(a.id.cmp(&b.id)));
            for c in pod_connections {
                // A move brings what the pod has shed nearer its share: the
                // connection is lighter than twice what is still owed. (A
                // tolerance of a tenth of the share made a pod of equally
                // loaded connections move one only if its rate had not risen
                // by 10 % since the scale-up began: often never.)
                if c.rps >= 2.0 * owed {
                    break;
                }
                owed -= c.rps;
                chosen.push((Reason::ScaleUp, c));
            }
        }
        // Past its window with nothing left to move: over, so the hotspot
        // policy may look at the Service again.
        if progress >= 1.0 && chosen.len() == chosen_before {
            finished.push(*key);
        }
    }
    for key in finished {
        state.scale_ups.remove(&key);
    }
    chosen
}

/// Whether a Service's loads can be compared: no scale-up of it under way
/// (that plan is moving its load), and no connection of it moved or opened
/// within [`SETTLE_MS`].
fn settled(
    state: &PlannerState,
    connections: &[Connection],
    key: &ServiceKey,
    now_ms: u64,
) -> bool {
    let scaling = state.scale_ups.contains_key(key);
    let recently_moved = state
        .last_move_ms
        .get(key)
        .is_some_and(|&at| now_ms < at + SETTLE_MS);
    let young = connections
        .iter()
        .any(|c| c.service == *key && now_ms < c.opened_ms + SETTLE_MS);
    !(scaling || recently_moved || young)
}

/// The hotspot policy's thresholds, for one plan.
struct Hotspot {
    epsilon: f64,
    /// In connections' worth of calls per second.
    min_excess: f64,
    now_ms: u64,
}

impl Hotspot {
    /// Whether a pod with `load` sheds, given its Service's `mean` load, its
    /// `lightest` pod's load and the mean load per connection. A pod already
    /// shedding goes on until under half of both thresholds, so a pod near
    /// the line does not flap.
    ///
    /// The minimum excess is measured from the lightest pod, not from the
    /// mean: with 8 connections on 8 pods, one pod holding 2 while another
    /// holds none is only one connection above the mean, yet moving one of
    /// its two evens the Service; a pod only one connection above the
    /// lightest would only hand its extra connection to another pod.
    fn is_hot(
        &self,
        load: f64,
        (mean, lightest): (f64, f64),
        per_connection: f64,
        shedding: bool,
    ) -> bool {
        let scale = if shedding { 0.5 } else { 1.0 };
        mean > 0.0
            && load > (1.0 + self.epsilon * scale) * mean
            && load - lightest >= self.min_excess * scale * per_connection
    }

    /// Pods hot against their Service-wide mean shed the excess. A
    /// connection moves only if that lowers the spread: it is lighter than
    /// twice the pod's excess (the pod ends nearer the mean) and than the gap
    /// to the lightest pod, where the connect hook places its client's
    /// reconnect (that pod ends lighter than this one was). Each move
    /// strictly lowers the sum of squared pod loads, so with steady rates
    /// moves cannot go round in circles, and a single heavy connection stays
    /// where it is.
    fn candidates<'a>(
        &self,
        state: &mut PlannerState,
        desired: &DesiredState,
        view: &ClusterView,
        connections: &'a [Connection],
        settled: &BTreeSet<ServiceKey>,
    ) -> Vec<(Reason, &'a Connection)> {
        let mut chosen = Vec::new();
        let mut still_hot = BTreeMap::new();
        for (key, service) in &desired.services {
            let loads = service_loads(&service.eligible(), key, view, connections);
            if loads.len() < 2 {
                continue;
            }
            let (calls, conns) = loads
                .values()
                .fold((0.0, 0.0), |(a, b), l| (a + l.calls, b + l.connections));
            let mean = calls / loads.len() as f64;
            let lightest = loads
                .values()
                .map(|l| l.calls)
                .fold(f64::INFINITY, f64::min);
            let per_connection = if conns > 0.0 { calls / conns } else { 0.0 };
            // Every pod of the Service hot for HOTSPOT_SUSTAIN_MS, on any
            // node, in the same order on every node (by address).
            let mut hot = Vec::new();
            for (pod, l) in &loads {
                let since = state.hot.get(pod).copied();
                let shedding = since.is_some();
                if self.is_hot(l.calls, (mean, lightest), per_connection, shedding) {
                    let since = since.unwrap_or(self.now_ms);
                    still_hot.insert(*pod, since);
                    if since + HOTSPOT_SUSTAIN_MS <= self.now_ms {
                        hot.push(*pod);
                    }
                }
            }
            if !settled.contains(key) || hot.is_empty() {
                continue;
            }
            // Hot pods take turns, one move per turn for the whole Service:
            // the turn's pod is the same on every node (same view, same
            // wall clock), so only its node moves, and the next turn comes once
            // every node's view shows where that client landed. Nodes moving
            // at once would send their clients to the same empty-looking pod.
            let turn = (self.now_ms + state.wall_offset_ms) / HOTSPOT_TURN_MS;
            let pod = hot[(turn % hot.len() as u64) as usize];
            if !loads[&pod].local || state.hotspot_turns.get(key) == Some(&turn) {
                continue;
            }
            let mut pod_connections: Vec<&Connection> = connections
                .iter()
                .filter(|c| {
                    c.service == *key
                        && c.backend == pod
                        && !state.moved.contains(&c.id)
                        && c.opened_ms + HOTSPOT_MIN_AGE_MS <= self.now_ms
                })
                .collect();
            pod_connections.sort_by(|a, b| b.rps.total_cmp(&a.rps).then(a.id.cmp(&b.id)));
            let load = loads[&pod].calls;
            let lightest_other = loads
                .iter()
                .filter(|(other, _)| **other != pod)
                .map(|(_, l)| l.calls)
                .fold(f64::INFINITY, f64::min);
            if let Some(c) = pod_connections.into_iter().find(|c| {
                c.rps > 0.0 && c.rps < 2.0 * (load - mean) && c.rps < load - lightest_other
            }) {
                state.hotspot_turns.insert(*key, turn);
                chosen.push((Reason::Hotspot, c));
            }
        }
        state.hot = still_hot;
        chosen
    }
}

/// One pod's load as the hotspot policy compares it.
#[derive(Clone, Copy, Debug, PartialEq)]
struct PodCalls {
    calls: f64,
    connections: f64,
    /// On this node: its connections can be moved from here.
    local: bool,
}

/// The calls per second and connections of each of a Service's `eligible`
/// pods: this node's own from their tracked connections (the freshest
/// measure), the others' from the cluster view. A pod whose load is known
/// neither way is left out; a pod the view knows with no calls counts as
/// idle, so an idle pod pulls the mean down as it should.
fn service_loads(
    eligible: &[Backend],
    key: &ServiceKey,
    view: &ClusterView,
    connections: &[Connection],
) -> BTreeMap<Backend, PodCalls> {
    let mut loads: BTreeMap<Backend, PodCalls> = BTreeMap::new();
    for c in connections.iter().filter(|c| c.service == *key) {
        let load = loads.entry(c.backend).or_insert(PodCalls {
            calls: 0.0,
            connections: 0.0,
            local: true,
        });
        load.calls += c.rps;
        load.connections += 1.0;
    }
    loads.retain(|pod, _| eligible.contains(pod));
    for pod in eligible {
        if let (false, Some(seen)) = (loads.contains_key(pod), view.get(pod)) {
            loads.insert(
                *pod,
                PodCalls {
                    calls: f64::from(seen.calls_per_second.unwrap_or(0.0)),
                    connections: f64::from(seen.connections),
                    local: false,
                },
            );
        }
    }
    loads
}

fn too_old(c: &Connection, max_age_ms: u64, now_ms: u64) -> bool {
    // 0.9 .. 1.1 of the limit, fixed per connection.
    let factor = 0.9 + 0.2 * (f64::from(c.jitter) / f64::from(u32::MAX));
    now_ms.saturating_sub(c.opened_ms) as f64 > max_age_ms as f64 * factor
}

/// Total RPS per pod of one Service.
fn pod_rps(connections: &[Connection], service: &ServiceKey) -> BTreeMap<Backend, f64> {
    let mut rps = BTreeMap::new();
    for c in connections.iter().filter(|c| c.service == *service) {
        *rps.entry(c.backend).or_insert(0.0) += c.rps;
    }
    rps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::model::PodLoad;
    use crate::state::model::{DesiredService, Endpoint};
    use crate::state::topology::Rule;
    use grpclb_common::Addr;
    use proptest::prelude::*;

    const SVC: ServiceKey = ServiceKey::new(Addr::from_v4([10, 96, 0, 1]), 50051);

    fn pod(n: u8) -> Backend {
        Backend::new(Addr::from_v4([10, 244, 0, n]), 8080)
    }

    fn state_with(pods: &[(u8, EndpointCondition)]) -> DesiredState {
        let endpoints = pods
            .iter()
            .map(|&(n, condition)| Endpoint {
                backend: pod(n),
                node_name: Some("node-a".into()),
                condition,
            })
            .collect();
        let service = DesiredService {
            name: "ns/svc:grpc".into(),
            endpoints,
            track_frames: false,
            rule: Rule::Ready,
        };
        DesiredState {
            services: BTreeMap::from([(SVC, service.into())]),
            ..DesiredState::default()
        }
    }

    fn ready(pods: &[u8]) -> DesiredState {
        state_with(
            &pods
                .iter()
                .map(|&n| (n, EndpointCondition::Ready))
                .collect::<Vec<_>>(),
        )
    }

    /// `per_pod` connections of `rps` each on every listed pod.
    fn connections(pods: &[u8], per_pod: u64, rps: f64) -> Vec<Connection> {
        pods.iter()
            .flat_map(|&n| {
                (0..per_pod).map(move |i| Connection {
                    id: u64::from(n) * 1000 + i,
                    service: SVC,
                    backend: pod(n),
                    opened_ms: 0,
                    rps,
                    jitter: (i as u32).wrapping_mul(2_654_435_761),
                })
            })
            .collect()
    }

    /// Long after the test connections opened.
    const SETTLED: u64 = 60_000;

    fn only(policy: PlannerConfig) -> PlannerConfig {
        PlannerConfig {
            max_moves_per_pod_per_second: 1000,
            ..policy
        }
    }

    /// The first plan of a node that knows nothing of other nodes, at time 0.
    fn plan_first(
        config: &PlannerConfig,
        desired: &DesiredState,
        conns: &[Connection],
    ) -> (Vec<Move>, PlannerState) {
        plan(
            config,
            &PlannerState::default(),
            desired,
            &ClusterView::new(),
            conns,
            0,
        )
    }

    fn off() -> PlannerConfig {
        PlannerConfig {
            drain: false,
            scale_up_window_ms: None,
            hotspot_epsilon: None,
            hotspot_min_excess: 2.0,
            max_age_ms: None,
            max_moves_per_pod_per_second: 1000,
        }
    }

    #[test]
    fn a_terminating_pod_loses_every_connection_and_nothing_else_moves() {
        let conns = connections(&[1, 2], 5, 10.0);
        let desired = state_with(&[
            (1, EndpointCondition::Ready),
            (2, EndpointCondition::Draining),
        ]);
        let config = only(PlannerConfig {
            drain: true,
            ..off()
        });
        let (moves, _) = plan_first(&config, &desired, &conns);
        assert_eq!(moves.len(), 5);
        assert!(moves
            .iter()
            .all(|m| m.backend == pod(2) && m.reason == Reason::Drain));
        // A pod no longer listed at all drains too.
        let (moves, _) = plan_first(&config, &ready(&[1]), &conns);
        assert_eq!(moves.len(), 5);
    }

    #[test]
    fn standby_endpoints_keep_their_connections() {
        let conns = connections(&[1, 2], 5, 10.0);
        let desired = state_with(&[
            (1, EndpointCondition::Ready),
            (2, EndpointCondition::Standby),
        ]);
        let config = only(PlannerConfig {
            drain: true,
            ..off()
        });
        let (moves, _) = plan_first(&config, &desired, &conns);
        assert_eq!(moves, vec![]);
    }

    /// A rollout where every pod is terminating and none is ready yet: the
    /// terminating pods take the new connections (KEP-1669), so draining
    /// them would only send the clients back to them.
    #[test]
    fn terminating_pods_serving_as_the_fallback_are_not_drained() {
        let service: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "svc", "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "grpc", "port": 50051, "appProtocol": "grpc"}]}
        }))
        .unwrap();
        // (pod, ready); every pod not ready is serving and terminating.
        let slice = |pods: &[(u8, bool)]| -> k8s_openapi::api::discovery::v1::EndpointSlice {
            let endpoints: Vec<_> = pods
                .iter()
                .map(|&(n, ready)| {
                    serde_json::json!({
                        "addresses": [format!("10.244.0.{n}")], "nodeName": "node-a",
                        "conditions": {"ready": ready, "serving": true, "terminating": !ready}
                    })
                })
                .collect();
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "svc-1", "namespace": "ns", "labels": {"kubernetes.io/service-name": "svc"}},
                "addressType": "IPv4", "ports": [{"name": "grpc", "port": 8080}],
                "endpoints": endpoints
            }))
            .unwrap()
        };
        let node = crate::state::topology::NodeTopology {
            name: "node-a".into(),
            zone: None,
        };
        let translated = |pods: &[(u8, bool)]| {
            let translation = crate::state::translate::translate(
                std::slice::from_ref(&service),
                &[slice(pods)],
                &node,
            );
            // Re-key to the planner tests' frontend.
            let svc = translation.state.services.into_values().next().unwrap();
            DesiredState {
                services: BTreeMap::from([(SVC, svc)]),
                ..DesiredState::default()
            }
        };
        let conns = connections(&[1, 2], 5, 10.0);
        let config = only(PlannerConfig {
            drain: true,
            ..off()
        });
        let all_terminating = translated(&[(1, false), (2, false)]);
        assert_eq!(
            all_terminating.services[&SVC].rule,
            Rule::TerminatingFallback
        );
        let (moves, _) = plan_first(&config, &all_terminating, &conns);
        assert_eq!(
            moves,
            vec![],
            "nothing is ready: the terminating pods serve"
        );
        // Once a pod is ready, the terminating one drains.
        let one_ready = translated(&[(1, true), (2, false)]);
        let (moves, _) = plan_first(&config, &one_ready, &conns);
        assert_eq!(moves.len(), 5);
        assert!(moves.iter().all(|m| m.backend == pod(2)));
    }

    #[test]
    fn a_drain_called_off_can_be_planned_again() {
        let conns = connections(&[2], 1, 1.0);
        let draining = state_with(&[
            (1, EndpointCondition::Ready),
            (2, EndpointCondition::Draining),
        ]);
        assert!(drains(&draining, &SVC, &pod(2)));
        assert!(!drains(&draining, &SVC, &pod(1)));
        let config = only(PlannerConfig {
            drain: true,
            ..off()
        });
        let (first, mut state) = plan_first(&config, &draining, &conns);
        assert_eq!(first.len(), 1);
        let (again, _) = plan(
            &config,
            &state,
            &draining,
            &ClusterView::new(),
            &conns,
            2000,
        );
        assert!(again.is_empty(), "chosen once");
        // The pod was ready again meanwhile; now it drains for good.
        state.forget(first[0].connection);
        let (again, _) = plan(
            &config,
            &state,
            &draining,
            &ClusterView::new(),
            &conns,
            4000,
        );
        assert_eq!(again, first);
    }

    #[test]
    fn the_rate_limit_spreads_a_drain_over_seconds() {
        let conns = connections(&[2], 50, 1.0);
        let desired = state_with(&[
            (1, EndpointCondition::Ready),
            (2, EndpointCondition::Draining),
        ]);
        let config = PlannerConfig {
            max_moves_per_pod_per_second: 20,
            ..off()
        };
        let config = PlannerConfig {
            drain: true,
            ..config
        };
        let (first, state) = plan_first(&config, &desired, &conns);
        assert_eq!(first.len(), 20);
        let (same_second, state) =
            plan(&config, &state, &desired, &ClusterView::new(), &conns, 500);
        assert!(same_second.is_empty(), "{same_second:?}");
        let (next_second, _) = plan(&config, &state, &desired, &ClusterView::new(), &conns, 1000);
        assert_eq!(next_second.len(), 20);
        let firsts: BTreeSet<u64> = first.iter().map(|m| m.connection).collect();
        assert!(
            next_second.iter().all(|m| !firsts.contains(&m.connection)),
            "moved twice"
        );
    }

    #[test]
    fn scale_up_two_to_four_sheds_half_of_each_old_pod_over_the_window() {
        let config = only(PlannerConfig {
            scale_up_window_ms: Some(4000),
            ..off()
        });
        let conns = connections(&[1, 2], 20, 5.0);
        let (none, state) = plan_first(&config, &ready(&[1, 2]), &conns);
        assert!(none.is_empty());
        let grown = ready(&[1, 2, 3, 4]);
        let mut state = state;
        let mut moved = BTreeMap::<Backend, usize>::new();
        for t in (1000..=8000).step_by(500) {
            let (moves, next) = plan(&config, &state, &grown, &ClusterView::new(), &conns, t);
            state = next;
            if t <= 1000 + 2000 {
                // Halfway through the window, about a quarter has moved.
                let so_far: usize = moved.values().sum::<usize>() + moves.len();
                assert!(so_far <= 22, "too fast at {t}: {so_far}");
            }
            for m in moves {
                assert_eq!(m.reason, Reason::ScaleUp);
                *moved.entry(m.backend).or_default() += 1;
            }
        }
        assert_eq!(
            moved,
            BTreeMap::from([(pod(1), 10), (pod(2), 10)]),
            "half of 20 each"
        );
    }

    #[test]
    fn a_scale_up_moves_one_of_two_equal_connections_even_if_their_rates_rose() {
        let config = only(PlannerConfig {
            scale_up_window_ms: Some(5000),
            ..off()
        });
        let (_, mut state) = plan_first(&config, &ready(&[1, 2]), &connections(&[1, 2], 2, 4.0));
        let grown = ready(&[1, 2, 3, 4]);
        // The scale-up starts from 8/s per pod: each is to shed 4/s.
        let (none, next) = plan(
            &config,
            &state,
            &grown,
            &ClusterView::new(),
            &connections(&[1, 2], 2, 4.0),
            500,
        );
        assert!(none.is_empty(), "{none:?}");
        state = next;
        // Then every connection carries 6/s: moving one still comes nearer
        // the share than moving none.
        let busier = connections(&[1, 2], 2, 6.0);
        let mut moved = BTreeMap::<Backend, usize>::new();
        for t in (1000..=10_000).step_by(500) {
            let (moves, next) = plan(&config, &state, &grown, &ClusterView::new(), &busier, t);
            state = next;
            for m in moves {
                *moved.entry(m.backend).or_default() += 1;
            }
        }
        assert_eq!(moved, BTreeMap::from([(pod(1), 1), (pod(2), 1)]));
        // Connections without a rate yet (clients that just reconnected)
        // shed nothing: they stay.
        let mut fresh = connections(&[1, 2], 2, 6.0);
        fresh.extend(
            connections(&[1, 2], 3, 0.0)
                .into_iter()
                .map(|c| Connection {
                    id: c.id + 500,
                    ..c
                }),
        );
        let (_, mut again) = plan_first(&config, &ready(&[1, 2]), &connections(&[1, 2], 2, 4.0));
        let mut moved = Vec::new();
        for t in (500..=10_000).step_by(500) {
            let (moves, next) = plan(&config, &again, &grown, &ClusterView::new(), &fresh, t);
            again = next;
            moved.extend(moves.iter().map(|m| m.rps));
        }
        assert_eq!(moved, vec![6.0, 6.0], "one loaded connection per pod");
        // A pod's only connection stays: moving it overshoots more than
        // staying falls short.
        let (_, state) = plan_first(&config, &ready(&[1, 2]), &connections(&[1, 2], 1, 4.0));
        let mut state = state;
        for t in (500..=10_000).step_by(500) {
            let (moves, next) = plan(
                &config,
                &state,
                &grown,
                &ClusterView::new(),
                &connections(&[1, 2], 1, 4.0),
                t,
            );
            assert!(moves.is_empty(), "at {t}: {moves:?}");
            state = next;
        }
    }

    #[test]
    fn a_hotspot_sheds_its_excess_and_stops_inside_the_hysteresis_band() {
        let config = only(PlannerConfig {
            hotspot_epsilon: Some(0.2),
            ..off()
        });
        let mut conns = connections(&[1, 2], 10, 10.0);
        conns.extend(connections(&[3], 20, 10.0));
        let desired = ready(&[1, 2, 3]);
        // Pod 3: 200 RPS against a mean of 133: sheds its excess, one
        // connection per turn, each landing on the lightest pod, until the
        // next move would leave it under the pod that took the last one.
        let (_, state) = plan_settled(&config, &desired, &ClusterView::new(), &conns);
        let moves = shed_in_turns(&config, &desired, &mut conns, 20);
        assert_eq!(moves.len(), 6, "{moves:?}");
        assert!(moves
            .iter()
            .all(|m| m.backend == pod(3) && m.reason == Reason::Hotspot));
        assert_eq!(
            moves.iter().map(|m| m.turn).collect::<Vec<_>>(),
            (0..6).collect::<Vec<_>>(),
            "one move per turn"
        );
        // 1.125× the mean: still shedding (hot until under 1.1×) ...
        let mut warm = connections(&[1, 2], 10, 10.0);
        warm.extend(connections(&[3], 12, 10.0));
        let later = SETTLED + HOTSPOT_TURN_MS;
        let (moves, _) = plan(&config, &state, &desired, &ClusterView::new(), &warm, later);
        assert!(!moves.is_empty() && moves.iter().all(|m| m.backend == pod(3)));
        // ... but a pod that was not hot is left alone at 1.125×.
        let (_, cold) = plan(
            &config,
            &PlannerState::default(),
            &desired,
            &ClusterView::new(),
            &warm,
            later - HOTSPOT_SUSTAIN_MS,
        );
        let (moves, _) = plan(&config, &cold, &desired, &ClusterView::new(), &warm, later);
        assert!(moves.is_empty(), "{moves:?}");
    }

    /// A pod one connection above the lightest keeps it (moving it would
    /// only make another pod the one with one too many); 8 connections of
    /// uneven clients on 4 pods as 1/2/2/3 move one, from pod 4 to the
    /// lightest, which evens them; a minimum excess of 3 connections keeps
    /// even that one.
    #[test]
    fn a_pod_sheds_only_from_one_and_a_half_connections_above_the_lightest() {
        let moves = |conns: &[Connection], min_excess| {
            let config = only(PlannerConfig {
                hotspot_min_excess: min_excess,
                ..PlannerConfig::default()
            });
            plan_settled(&config, &ready(&[1, 2, 3, 4]), &ClusterView::new(), conns).0
        };
        let mut one_extra = connections(&[1, 2, 3], 1, 100.0);
        one_extra.extend(connections(&[4], 2, 100.0));
        assert_eq!(moves(&one_extra, 1.5), vec![], "one connection above");
        let mut uneven = connections(&[1], 1, 447.0);
        uneven.extend(connections(&[2], 2, 415.0));
        uneven.extend(connections(&[3], 2, 445.0));
        uneven.extend(connections(&[4], 3, 374.0));
        let evened = moves(&uneven, 1.5);
        assert_eq!(evened.len(), 1, "{evened:?}");
        assert_eq!(evened[0].backend, pod(4));
        assert_eq!(moves(&uneven, 3.0), vec![], "at a minimum excess of 3");
    }

    /// A hotspot move and the turn (from the first) it was made in.
    #[derive(Debug)]
    struct TurnMove {
        backend: Backend,
        reason: Reason,
        turn: u64,
    }

    /// Plans once per hotspot turn for `turns` turns, all pods on this
    /// node: a moved connection's client reconnects to the lightest pod
    /// (as the connect hook places it), at the same rate.
    fn shed_in_turns(
        config: &PlannerConfig,
        desired: &DesiredState,
        conns: &mut Vec<Connection>,
        turns: u64,
    ) -> Vec<TurnMove> {
        let mut state = warmed(config, desired, &ClusterView::new(), conns);
        let mut moved = Vec::new();
        for turn in 0..turns {
            let now = SETTLED + turn * HOTSPOT_TURN_MS;
            let (moves, next) = plan(config, &state, desired, &ClusterView::new(), conns, now);
            state = next;
            for m in moves {
                let gone = conns.iter().position(|c| c.id == m.connection).unwrap();
                let client = conns.remove(gone);
                let lightest = desired.services[&SVC]
                    .eligible()
                    .into_iter()
                    .min_by(|a, b| {
                        let calls = |p: &Backend| -> f64 {
                            conns
                                .iter()
                                .filter(|c| c.backend == *p)
                                .map(|c| c.rps)
                                .sum()
                        };
                        calls(a).total_cmp(&calls(b))
                    })
                    .unwrap();
                conns.push(Connection {
                    id: 1_000_000 + client.id,
                    backend: lightest,
                    opened_ms: now,
                    ..client
                });
                moved.push(TurnMove {
                    backend: m.backend,
                    reason: m.reason,
                    turn,
                });
            }
        }
        moved
    }

    /// The state after a plan [`HOTSPOT_SUSTAIN_MS`] before `SETTLED`, so
    /// pods hot then and at `SETTLED` have been hot long enough to shed.
    fn warmed(
        config: &PlannerConfig,
        desired: &DesiredState,
        view: &ClusterView,
        conns: &[Connection],
    ) -> PlannerState {
        let (moves, state) = plan(
            config,
            &PlannerState::default(),
            desired,
            view,
            conns,
            SETTLED - HOTSPOT_SUSTAIN_MS,
        );
        assert!(
            moves.iter().all(|m| m.reason != Reason::Hotspot),
            "a pod just found hot sheds nothing: {moves:?}"
        );
        state
    }

    /// A plan at `SETTLED` after [`warmed`].
    fn plan_settled(
        config: &PlannerConfig,
        desired: &DesiredState,
        view: &ClusterView,
        conns: &[Connection],
    ) -> (Vec<Move>, PlannerState) {
        let state = warmed(config, desired, view, conns);
        plan(config, &state, desired, view, conns, SETTLED)
    }

    fn seen(connections: u32, calls: f32) -> PodLoad {
        PodLoad {
            connections,
            calls_per_second: Some(calls),
        }
    }

    /// Pod 1 is this node's only pod of the Service: alone it has nothing to
    /// be compared with; the view of pods 2 and 3 on other nodes makes it
    /// twice the Service's mean, and it sheds one connection to each of
    /// them (the connect hook places each on the lightest pod).
    #[test]
    fn a_local_pod_is_compared_with_the_service_wide_mean() {
        let config = only(PlannerConfig::default());
        let conns = connections(&[1], 4, 10.0);
        let desired = ready(&[1, 2, 3]);
        let (alone, _) = plan_settled(&config, &desired, &ClusterView::new(), &conns);
        assert_eq!(alone, vec![]);
        let view = ClusterView::from([(pod(2), seen(1, 10.0)), (pod(3), seen(1, 10.0))]);
        let (moves, state) = plan_settled(&config, &desired, &view, &conns);
        assert_eq!(moves.len(), 1, "one move per turn: {moves:?}");
        assert_eq!(
            (moves[0].backend, moves[0].reason),
            (pod(1), Reason::Hotspot)
        );
        // Not again in the same turn; in the next one, another connection.
        let after = SETTLED + SETTLE_MS;
        let (same_turn, _) = plan(&config, &state, &desired, &view, &conns, after - 1);
        assert_eq!(same_turn, vec![]);
        let (next, _) = plan(&config, &state, &desired, &view, &conns, after);
        assert_eq!(next.len(), 1, "{next:?}");
        assert_ne!(next[0].connection, moves[0].connection);
    }

    /// 8 equal connections on 8 pods across nodes, placed 2/0/1/1/1/1/1/1:
    /// the local pod 1 is only one connection above the mean, but two above
    /// the idle pod 2, so it sheds exactly one and the Service is even.
    #[test]
    fn a_pod_two_connections_above_an_idle_one_sheds_one() {
        let config = only(PlannerConfig::default());
        let conns = connections(&[1], 2, 100.0);
        let desired = ready(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut view = ClusterView::from([(pod(2), seen(0, 0.0))]);
        view.extend((3..=8).map(|n| (pod(n), seen(1, 100.0))));
        let (moves, _) = plan_settled(&config, &desired, &view, &conns);
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_eq!(
            (moves[0].backend, moves[0].reason),
            (pod(1), Reason::Hotspot)
        );
    }

    /// A pod with no connection counts in the mean (it is the light pod the
    /// moved client lands on); a pod on another node is never moved from
    /// here, however hot.
    #[test]
    fn an_idle_pod_pulls_the_mean_down_and_remote_pods_are_left_to_their_nodes() {
        let config = only(PlannerConfig::default());
        let conns = connections(&[1], 4, 30.0);
        let desired = ready(&[1, 2, 3]);
        let view = ClusterView::from([(pod(2), seen(0, 0.0)), (pod(3), seen(9, 500.0))]);
        let (moves, _) = plan_settled(&config, &desired, &view, &conns);
        assert_eq!(moves, vec![], "pod 3 is the hotspot, on another node");
        let view = ClusterView::from([(pod(2), seen(0, 0.0)), (pod(3), seen(0, 0.0))]);
        let (moves, _) = plan_settled(&config, &desired, &view, &conns);
        assert!(moves.len() == 1 && moves[0].backend == pod(1), "{moves:?}");
    }

    /// Pods 1 and 2 are hot, on two nodes whose agents started 2 s apart:
    /// by the wall clock they share, exactly one of them has the turn.
    #[test]
    fn nodes_whose_agents_started_apart_agree_on_the_turn() {
        let config = only(PlannerConfig::default());
        let desired = ready(&[1, 2, 3]);
        let node = |local: u8, other: u8, started_ms: u64, wall_ms: u64| {
            let conns = connections(&[local], 4, 30.0);
            let view = ClusterView::from([(pod(other), seen(4, 120.0)), (pod(3), seen(0, 0.0))]);
            let now = wall_ms - started_ms;
            let mut state = PlannerState::default();
            state.set_wall_clock(now - HOTSPOT_SUSTAIN_MS, wall_ms - HOTSPOT_SUSTAIN_MS);
            let (_, mut state) = plan(
                &config,
                &state,
                &desired,
                &view,
                &conns,
                now - HOTSPOT_SUSTAIN_MS,
            );
            state.set_wall_clock(now, wall_ms);
            plan(&config, &state, &desired, &view, &conns, now).0.len()
        };
        for wall_ms in (0..4).map(|t| 1_700_000_000_000 + t * HOTSPOT_TURN_MS) {
            let moves =
                node(1, 2, wall_ms - 100_000, wall_ms) + node(2, 1, wall_ms - 102_000, wall_ms);
            assert_eq!(moves, 1, "at {wall_ms}");
        }
    }

    /// A pod sheds only once it has been hot for [`HOTSPOT_SUSTAIN_MS`]: a
    /// burst of a second or two (a client catching up) moves nothing.
    #[test]
    fn a_hotspot_sheds_only_once_it_has_been_hot_for_a_while() {
        let config = only(PlannerConfig::default());
        let conns = connections(&[1], 4, 30.0);
        let desired = ready(&[1, 2]);
        let view = ClusterView::from([(pod(2), seen(0, 0.0))]);
        let at = |state: &PlannerState, now| plan(&config, state, &desired, &view, &conns, now);
        let (first, state) = at(&PlannerState::default(), SETTLED);
        assert_eq!(first, vec![], "just found hot");
        let (early, _) = at(&state, SETTLED + HOTSPOT_SUSTAIN_MS - 1);
        assert_eq!(early, vec![], "not hot for long enough");
        let (moves, _) = at(&state, SETTLED + HOTSPOT_SUSTAIN_MS);
        assert_eq!(moves.len(), 1, "{moves:?}");
        // Cooling down in between starts the wait again.
        let even = ClusterView::from([(pod(2), seen(4, 120.0))]);
        let (_, cooled) = plan(&config, &state, &desired, &even, &conns, SETTLED + 1_000);
        let (moves, _) = at(&cooled, SETTLED + HOTSPOT_SUSTAIN_MS);
        assert_eq!(moves, vec![], "hot again only since {}", SETTLED + 1_000);
    }

    /// A connection placed less than [`HOTSPOT_MIN_AGE_MS`] ago (a client a
    /// move just sent here, say) stays, however hot its pod.
    #[test]
    fn a_hotspot_never_moves_a_young_connection() {
        let config = only(PlannerConfig::default());
        let mut conns = connections(&[1], 4, 30.0);
        let desired = ready(&[1, 2]);
        let view = ClusterView::from([(pod(2), seen(0, 0.0))]);
        for c in &mut conns {
            c.opened_ms = SETTLED - HOTSPOT_MIN_AGE_MS + 1;
        }
        conns[0].opened_ms = SETTLED - HOTSPOT_MIN_AGE_MS;
        let (moves, _) = plan_settled(&config, &desired, &view, &conns);
        assert_eq!(
            moves.iter().map(|m| m.connection).collect::<Vec<_>>(),
            vec![conns[0].id]
        );
    }

    #[test]
    fn a_hotspot_waits_until_its_service_has_settled() {
        let config = only(PlannerConfig {
            hotspot_epsilon: Some(0.2),
            hotspot_min_excess: 1.0,
            scale_up_window_ms: Some(5_000),
            ..off()
        });
        let mut conns = connections(&[1], 1, 10.0);
        conns.extend(connections(&[2], 4, 10.0));
        let hot_moves_in =
            |desired: &DesiredState, state: &PlannerState, conns: &[Connection], now| {
                let (moves, next) = plan(&config, state, desired, &ClusterView::new(), conns, now);
                let hot = moves.iter().filter(|m| m.reason == Reason::Hotspot).count();
                (hot, next)
            };
        let desired = ready(&[1, 2]);
        let hot_moves = |state: &PlannerState, conns: &[Connection], now| {
            hot_moves_in(&desired, state, conns, now)
        };
        // A connection opened a moment ago: its rate is still ramping up.
        let mut young = conns.clone();
        young[0].opened_ms = SETTLED - 100;
        let warm = warmed(&config, &desired, &ClusterView::new(), &young);
        assert_eq!(hot_moves(&warm, &young, SETTLED).0, 0);
        // Inside a scale-up's window (1 → 2 pods), the scale-up moves the load.
        let (_, one_pod) = hot_moves_in(&ready(&[1]), &PlannerState::default(), &conns, SETTLED);
        let (hot, scaling) = hot_moves(&one_pod, &conns, SETTLED + 500);
        assert_eq!(hot, 0, "as the scale-up starts");
        let (hot, _) = hot_moves(&scaling, &conns, SETTLED + 4_500);
        assert_eq!(hot, 0, "during the scale-up window");
        // Settled: pod 2 sheds; then nothing until SETTLE_MS after that.
        let warm = warmed(&config, &desired, &ClusterView::new(), &conns);
        let (hot, after_move) = hot_moves(&warm, &conns, SETTLED);
        assert_eq!(hot, 1);
        let (hot, _) = hot_moves(&after_move, &conns, SETTLED + SETTLE_MS - 1);
        assert_eq!(hot, 0, "right after a move");
        let (hot, _) = hot_moves(&after_move, &conns, SETTLED + SETTLE_MS);
        assert_eq!(hot, 1, "settled again");
    }

    #[test]
    fn a_single_heavy_connection_does_not_bounce() {
        let config = only(PlannerConfig {
            hotspot_epsilon: Some(0.2),
            ..off()
        });
        let mut conns = connections(&[1, 2], 1, 10.0);
        conns.extend(connections(&[3], 1, 100.0));
        let (moves, _) = plan_settled(&config, &ready(&[1, 2, 3]), &ClusterView::new(), &conns);
        assert!(
            moves.is_empty(),
            "moving it makes another pod the hotspot: {moves:?}"
        );
    }

    /// The scale-up's last move falls shortly before its window ends; the
    /// hotspot policy, which would move another connection of the same pod
    /// once the window is over, waits until the moved load has settled.
    #[test]
    fn a_scale_up_and_a_hotspot_never_shed_the_same_load_twice() {
        let config = only(PlannerConfig {
            hotspot_epsilon: Some(0.2),
            scale_up_window_ms: Some(4_500),
            ..off()
        });
        // Pod 1 sheds 2 of its 4 connections (lightest first), each once
        // moving it comes nearer the share than not: a quarter and three
        // quarters into the window; the hotspot policy would pick the heaviest.
        let mut conns = connections(&[1], 4, 10.0);
        conns[3].rps = 10.4;
        conns.extend(connections(&[2], 1, 10.0));
        let (_, mut state) = plan_settled(&config, &ready(&[1]), &ClusterView::new(), &conns);
        let grown = ready(&[1, 2]);
        let mut last_scale_up = None;
        let mut hotspot_at = Vec::new();
        let mut gone = BTreeSet::new();
        for now in (SETTLED + 500..SETTLED + 12_000).step_by(500) {
            // A moved connection is no longer offered (its GOAWAY is out).
            let movable: Vec<Connection> = conns
                .iter()
                .filter(|c| !gone.contains(&c.id))
                .cloned()
                .collect();
            let (moves, next) = plan(&config, &state, &grown, &ClusterView::new(), &movable, now);
            state = next;
            for m in moves {
                gone.insert(m.connection);
                match m.reason {
                    Reason::ScaleUp => last_scale_up = Some(now),
                    _ => hotspot_at.push(now),
                }
            }
        }
        let last_scale_up = last_scale_up.expect("the scale-up moved connections");
        assert_eq!(last_scale_up, SETTLED + 4_000, "three quarters into it");
        assert!(
            hotspot_at.iter().all(|&t| t >= last_scale_up + SETTLE_MS),
            "hotspot moves at {hotspot_at:?}, the last scale-up move at {last_scale_up}"
        );
    }

    #[test]
    fn max_age_is_jittered_within_ten_percent() {
        let config = only(PlannerConfig {
            max_age_ms: Some(10_000),
            ..off()
        });
        let conns = connections(&[1], 100, 1.0);
        let desired = ready(&[1]);
        let (early, _) = plan(
            &config,
            &PlannerState::default(),
            &desired,
            &ClusterView::new(),
            &conns,
            8_999,
        );
        assert!(early.is_empty());
        let (middle, _) = plan(
            &config,
            &PlannerState::default(),
            &desired,
            &ClusterView::new(),
            &conns,
            10_000,
        );
        assert!(
            !middle.is_empty() && middle.len() < 100,
            "{} of 100",
            middle.len()
        );
        let (late, _) = plan(
            &config,
            &PlannerState::default(),
            &desired,
            &ClusterView::new(),
            &conns,
            11_001,
        );
        assert_eq!(late.len(), 100);
    }

    #[test]
    fn drain_comes_before_other_policies_under_the_rate_limit() {
        let config = PlannerConfig {
            max_moves_per_pod_per_second: 3,
            max_age_ms: Some(1),
            ..PlannerConfig::default()
        };
        let conns = connections(&[2], 10, 1.0);
        let desired = state_with(&[
            (1, EndpointCondition::Ready),
            (2, EndpointCondition::Draining),
        ]);
        let (moves, _) = plan(
            &config,
            &PlannerState::default(),
            &desired,
            &ClusterView::new(),
            &conns,
            10_000,
        );
        assert_eq!(moves.len(), 3);
        assert!(moves.iter().all(|m| m.reason == Reason::Drain));
    }

    proptest! {
        #[test]
        fn never_above_the_rate_limit_and_never_twice(
            pods in proptest::collection::vec((1u8..6, 1u64..30, 0.0f64..50.0, any::<bool>()), 1..5),
            limit in 1u32..10,
            steps in proptest::collection::vec(0u64..700, 1..12),
        ) {
            let mut conns = Vec::new();
            let mut endpoints = Vec::new();
            for (n, count, rps, draining) in &pods {
                conns.extend(connections(&[*n], *count, *rps));
                let condition = if *draining { EndpointCondition::Draining } else { EndpointCondition::Ready };
                endpoints.push((*n, condition));
            }
            endpoints.sort();
            endpoints.dedup_by_key(|(n, _)| *n);
            let desired = state_with(&endpoints);
            let config = PlannerConfig { max_moves_per_pod_per_second: limit, max_age_ms: Some(1000), ..PlannerConfig::default() };
            let mut state = PlannerState::default();
            let mut now = 0;
            let mut history: Vec<(u64, Move)> = Vec::new();
            for step in steps {
                now += step;
                let (moves, next) = plan(&config, &state, &desired, &ClusterView::new(), &conns, now);
                state = next;
                history.extend(moves.into_iter().map(|m| (now, m)));
            }
            let ids: BTreeSet<u64> = history.iter().map(|(_, m)| m.connection).collect();
            prop_assert_eq!(ids.len(), history.len(), "a connection moved twice");
            for (t, m) in &history {
                let in_window = history
                    .iter()
                    .filter(|(u, n)| n.backend == m.backend && *u <= *t && *u + 1000 > *t)
                    .count();
                prop_assert!(in_window <= limit as usize, "{} moves within a second", in_window);
            }
        }
    }
}
