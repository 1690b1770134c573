//! The one owner of the pinned maps while the agent runs. On its own OS
//! thread (`dataplane`, a current-thread runtime), so no blocking bpf(2)
//! call ever runs on the async workers, it
//! - applies the latest desired state (the sync, see [`Syncer`]) and
//!   records readiness after each apply (`AGENT_STATE`, `/readyz`);
//! - every [`SNAPSHOT_INTERVAL`], while some Service tracks frames (or
//!   connections it tracked are still open), takes a [`Snapshot`] of
//!   `TRACKED` (all the rebalancer needs: the planner looks at no load
//!   count) and publishes it on a watch channel the mover reads;
//! - every [`SNAPSHOT_INTERVAL`] while this node has a local backend,
//!   reads `LOCAL_LOAD` (one walk of a map of this node's pods) into
//!   [`LocalLoads`], with the calls per second of the last snapshot, and
//!   publishes them for the load exchange ([`Handle::local_loads`]);
//! - writes the exchange's [`PlacementLoads`] into `BACKEND_VIEW`, by
//!   difference, refreshing unchanged views before they expire
//!   ([`view::view_changes`]);
//! - on request, a full snapshot (every map `status` and the gauges show);
//!   one serves the scrapes of `/metrics` for [`FULL_MAX_AGE`] unless the
//!   sync changes the maps meanwhile, `/status` gets a fresh one;
//! - writes `MOVES_WAITING` for the mover, and answers its lookups of the
//!   few connections it is moving: a move is retried every 10 ms, a
//!   lookup per cookie costs one bpf(2) call where a snapshot reads the
//!   whole map.
//!
//! Every snapshot follows on from the one before, whichever kind: call
//! rates and response totals are computed once, in [`Snapshot::next`].
//! Requests wait while an apply runs; an apply never waits for a request.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use aya::maps::{HashMap, MapData};
use grpclb_common::{Backend, BackendView, MoveWaiting, TrackedConnection};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::snapshot::{Snapshot, Tables};
use super::sync::{self, SyncReport, Syncer};
use super::tables::{LocalBackendTable, ServiceTables, TrackedTable};
use super::view::{self, Baseline, ViewChange};
use crate::exchange::model::{LocalLoads, PlacementLoads};
use crate::state::model::DesiredState;

/// How often the rebalancer gets a snapshot of the tracked connections
/// (the planner's interval).
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_millis(500);
/// How long one full snapshot serves `/metrics`.
pub const FULL_MAX_AGE: Duration = Duration::from_secs(1);

enum Request {
    Full(Duration, oneshot::Sender<Result<Arc<Snapshot>>>),
    Tracked(
        Vec<u64>,
        oneshot::Sender<Result<BTreeMap<u64, TrackedConnection>>>,
    ),
    ShowWaiting(u64, MoveWaiting),
    ClearWaiting(u64),
}

/// The rest of the agent's way to the maps; cheap to clone.
#[derive(Clone)]
pub struct Handle {
    requests: mpsc::UnboundedSender<Request>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    local_loads: watch::Receiver<Arc<LocalLoads>>,
}

impl Handle {
    /// The snapshots taken for the rebalancer, newest first.
    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.clone()
    }

    /// The loads of this node's pods, read every [`SNAPSHOT_INTERVAL`]
    /// while there are any (sent only when they changed); empty before
    /// the first read and once no local backend is left.
    pub fn local_loads(&self) -> watch::Receiver<Arc<LocalLoads>> {
        self.local_loads.clone()
    }

    /// A snapshot with [`Snapshot::tables`] taken less than `max_age` ago
    /// and after the owner last changed the maps (`Duration::ZERO`: now).
    pub async fn full(&self, max_age: Duration) -> Result<Arc<Snapshot>> {
        let (tx, rx) = oneshot::channel();
        self.send(Request::Full(max_age, tx))?;
        rx.await.map_err(|_| gone())?
    }

    /// The tracked connections among `cookies` (the closed ones are missing).
    pub async fn tracked(&self, cookies: Vec<u64>) -> Result<BTreeMap<u64, TrackedConnection>> {
        let (tx, rx) = oneshot::channel();
        self.send(Request::Tracked(cookies, tx))?;
        rx.await.map_err(|_| gone())?
    }

    /// Shows a waiting move in `MOVES_WAITING` (for `status`).
    pub fn show_waiting(&self, cookie: u64, waiting: MoveWaiting) {
        let _ = self.send(Request::ShowWaiting(cookie, waiting));
    }

    pub fn clear_waiting(&self, cookie: u64) {
        let _ = self.send(Request::ClearWaiting(cookie));
    }

    fn send(&self, request: Request) -> Result<()> {
        self.requests.send(request).map_err(|_| gone())
    }
}

fn gone() -> anyhow::Error {
    anyhow!("the data plane owner has stopped")
}

/// What the owner holds besides the maps the sync writes.
pub struct Owner<T> {
    pub tables: T,
    pub syncer: Syncer,
    pub node: String,
    /// `MOVES_WAITING`; `None` when it could not be opened (then waiting
    /// moves do not show in `status`).
    pub waiting_map: Option<HashMap<MapData, u64, MoveWaiting>>,
    /// How long after an apply that left something to do it is retried.
    pub retry: Duration,
    /// The Service-wide loads the exchange computes, written into
    /// `BACKEND_VIEW`; an empty map (or a closed channel) leaves the
    /// connect hook on this node's own counts.
    pub placements: watch::Receiver<Arc<PlacementLoads>>,
}

fn label(backend: &Backend) -> String {
    crate::observe::status::socket_label(&backend.addr, backend.port)
}

/// Publishes `loads` unless they are what the receivers have.
fn publish_loads(tx: &watch::Sender<Arc<LocalLoads>>, loads: LocalLoads) {
    tx.send_if_modified(|current| {
        let changed = **current != loads;
        if changed {
            *current = Arc::new(loads);
        }
        changed
    });
}

impl<T: ServiceTables + LocalBackendTable + TrackedTable> Owner<T> {
    /// The handle, and the owner's loop: it runs until the source is gone
    /// (`states` closed). `observe` sees every apply (metrics, readiness).
    pub fn start(
        self,
        states: watch::Receiver<Option<DesiredState>>,
        observe: impl FnMut(Duration, Result<&SyncReport, &anyhow::Error>),
    ) -> (Handle, impl std::future::Future<Output = ()>) {
        let (requests, inbox) = mpsc::unbounded_channel();
        let (publish, snapshots) = watch::channel(Arc::new(Snapshot::default()));
        let (publish_loads, local_loads) = watch::channel(Arc::new(LocalLoads::new()));
        let handle = Handle {
            requests,
            snapshots,
            local_loads,
        };
        (
            handle,
            self.run(states, inbox, publish, publish_loads, observe),
        )
    }

    async fn run(
        mut self,
        mut states: watch::Receiver<Option<DesiredState>>,
        mut inbox: mpsc::UnboundedReceiver<Request>,
        publish: watch::Sender<Arc<Snapshot>>,
        loads: watch::Sender<Arc<LocalLoads>>,
        mut observe: impl FnMut(Duration, Result<&SyncReport, &anyhow::Error>),
    ) {
        let started = Instant::now();
        let mut waiting = self.clear_stale_waiting();
        let mut last: Option<Arc<Snapshot>> = None;
        let mut full: Option<(Instant, Arc<Snapshot>)> = None;
        let mut changed = true;
        let mut tracks_frames = false;
        // This node's backends and their LOCAL_BACKENDS flags, per state.
        let mut local = std::collections::BTreeMap::new();
        let mut retry_at = None;
        let mut next_snapshot = Instant::now();
        let mut placements = self.placements.clone();
        // A closed channel (no exchange any more) places nothing.
        let mut placements_open = true;
        let mut views = self.adopt_views();
        let mut views_due = true;
        // When the next unchanged view needs its refresh; worked out after
        // each write, not per loop turn (a pending move asks every 10 ms,
        // and there is a view per pod of the cluster).
        let mut refresh_at = None;
        loop {
            if changed || retry_at.is_some_and(|at| Instant::now() >= at) {
                let latest = states.borrow_and_update().clone();
                if let Some(desired) = latest {
                    self.syncer
                        .once(&mut self.tables, &desired, &self.node, &mut observe);
                    // Once per state, not per request: a pending move asks
                    // every 10 ms, and there are 10,000s of Services.
                    tracks_frames = desired.services.values().any(|s| s.track_frames);
                    local = sync::local_backends(&desired, &self.node);
                    if local.is_empty() {
                        publish_loads(&loads, LocalLoads::new());
                    }
                }
                // What the sync wrote shows at once.
                full = None;
                retry_at = self.syncer.pending().then(|| Instant::now() + self.retry);
                changed = false;
            }
            if views_due {
                let placement = if placements_open {
                    placements.borrow_and_update().clone()
                } else {
                    Arc::new(PlacementLoads::new())
                };
                self.write_views(&mut views, &placement);
                views_due = false;
                refresh_at = view::next_refresh_ns(&views).map(|at| {
                    Instant::now() + Duration::from_nanos(at.saturating_sub(view::monotonic_ns()))
                });
            }
            let tracking = tracks_frames || last.as_ref().is_some_and(|s| !s.tracked.is_empty());
            let counting = !local.is_empty();
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                next = states.changed() => {
                    if next.is_err() { return }
                    changed = true;
                }
                next = placements.changed(), if placements_open => {
                    placements_open = next.is_ok();
                    views_due = true;
                }
                () = tokio::time::sleep_until(refresh_at.unwrap_or(far)), if refresh_at.is_some() => {
                    views_due = true;
                }
                request = inbox.recv() => {
                    // The handle's owner (main) keeps one for the process's life.
                    let Some(request) = request else { return };
                    match request {
                        Request::Full(max_age, reply) => {
                            let fresh = full
                                .as_ref()
                                .filter(|(at, _)| at.elapsed() < max_age)
                                .map(|(_, s)| s.clone());
                            let snapshot = match fresh {
                                Some(s) => Ok(s),
                                None => self
                                    .take(started, last.as_deref(), Some(&waiting))
                                    .map(Arc::new)
                                    .inspect(|s| {
                                        full = Some((Instant::now(), s.clone()));
                                        // The tables stay only as long as the cache.
                                        last = Some(Arc::new(s.without_tables()));
                                    }),
                            };
                            let _ = reply.send(snapshot);
                        }
                        Request::Tracked(cookies, reply) => {
                            let _ = reply.send(self.lookup(&cookies));
                        }
                        Request::ShowWaiting(cookie, entry) => {
                            self.write_waiting(cookie, Some(entry));
                            waiting.insert(cookie, entry);
                        }
                        Request::ClearWaiting(cookie) => {
                            if waiting.remove(&cookie).is_some() {
                                self.write_waiting(cookie, None);
                            }
                        }
                    }
                }
                () = tokio::time::sleep_until(retry_at.unwrap_or(far)), if retry_at.is_some() => {}
                () = tokio::time::sleep_until(full.as_ref().map_or(far, |(at, _)| *at + FULL_MAX_AGE)), if full.is_some() => {
                    // Every map read whole, held for scrapes that did not
                    // come: at cluster scale tens of MB.
                    full = None;
                    crate::memory::release_freed();
                }
                () = tokio::time::sleep_until(next_snapshot), if tracking || counting => {
                    if tracking {
                        match self.take(started, last.as_deref(), None) {
                            Ok(snapshot) => {
                                let snapshot = Arc::new(snapshot);
                                last = Some(snapshot.clone());
                                publish.send_replace(snapshot);
                            }
                            Err(e) => tracing::warn!("no snapshot for the rebalancer this round: {e:#}"),
                        }
                    }
                    if counting {
                        match self.tables.local_loads() {
                            Ok(counts) => publish_loads(
                                &loads,
                                view::local_loads(&local, &counts, last.as_deref()),
                            ),
                            Err(e) => tracing::warn!("no local loads for the exchange this round: reading LOCAL_LOAD: {e:#}"),
                        }
                    }
                    next_snapshot = Instant::now() + SNAPSHOT_INTERVAL;
                }
            }
            if !tracking && !counting {
                // The first snapshot once a Service tracks frames (or a
                // local backend appears) is due at once.
                next_snapshot = Instant::now();
            }
        }
    }

    /// A snapshot now, following on from `last`; with the tables when
    /// `waiting` (the moves shown in `MOVES_WAITING`) is given.
    fn take(
        &self,
        started: Instant,
        last: Option<&Snapshot>,
        waiting: Option<&BTreeMap<u64, MoveWaiting>>,
    ) -> Result<Snapshot> {
        let tracked = self
            .tables
            .tracked_connections()
            .context("reading TRACKED")?;
        let tables = match waiting {
            Some(waiting) => Some(Tables::read(
                &self.tables,
                waiting.iter().map(|(k, v)| (*k, *v)).collect(),
            )?),
            None => None,
        };
        let taken_ms = started.elapsed().as_millis() as u64;
        Ok(Snapshot::next(last, taken_ms, tracked, tables))
    }

    fn lookup(&self, cookies: &[u64]) -> Result<BTreeMap<u64, TrackedConnection>> {
        let mut found = BTreeMap::new();
        for cookie in cookies {
            if let Some(c) = self
                .tables
                .tracked_connection(*cookie)
                .context("reading TRACKED")?
            {
                found.insert(*cookie, c);
            }
        }
        Ok(found)
    }

    /// What `BACKEND_VIEW` holds now, written by this agent or the one
    /// before: the first [`Owner::write_views`] updates or removes it all.
    fn adopt_views(&self) -> std::collections::BTreeMap<Backend, BackendView> {
        match self.tables.views() {
            Ok(views) => views.into_iter().collect(),
            Err(e) => {
                tracing::warn!("reading BACKEND_VIEW: {e:#}; views left by an earlier agent expire on their own");
                std::collections::BTreeMap::new()
            }
        }
    }

    /// Makes `BACKEND_VIEW` (as `views` says it holds) follow `placement`.
    /// A write or removal that fails is tried again with the next
    /// placement; one warning per round.
    fn write_views(
        &mut self,
        views: &mut std::collections::BTreeMap<Backend, BackendView>,
        placement: &PlacementLoads,
    ) {
        let now_ns = view::monotonic_ns();
        let expires_ns = now_ns.saturating_add(view::VIEW_TTL.as_nanos() as u64);
        let mut failed: Option<(usize, anyhow::Error)> = None;
        for change in view::view_changes(views, placement, now_ns) {
            let outcome = match change {
                ViewChange::Remove(backend) => self
                    .tables
                    .remove_view(&backend)
                    .map(|()| {
                        views.remove(&backend);
                    })
                    .with_context(|| format!("removing the view of {}", label(&backend))),
                ViewChange::Write {
                    backend,
                    load,
                    baseline,
                } => {
                    let baseline = match baseline {
                        Baseline::Keep(baseline) => Ok(baseline),
                        Baseline::Now => self
                            .tables
                            .load(&backend)
                            .map(|count| u32::try_from(count.unwrap_or(0)).unwrap_or(u32::MAX)),
                    };
                    let written = baseline.and_then(|baseline| {
                        let v = BackendView {
                            load,
                            baseline,
                            expires_ns,
                        };
                        self.tables.set_view(&backend, &v).map(|()| v)
                    });
                    match written {
                        Ok(v) => {
                            views.insert(backend, v);
                            Ok(())
                        }
                        Err(e) => {
                            // Unknown now: written again next time.
                            views.remove(&backend);
                            Err(e.context(format!("writing the view of {}", label(&backend))))
                        }
                    }
                }
            };
            if let Err(e) = outcome {
                match &mut failed {
                    Some((count, _)) => *count += 1,
                    None => failed = Some((1, e)),
                }
            }
        }
        if let Some((count, first)) = failed {
            tracing::warn!(
                failed = count,
                "BACKEND_VIEW not fully updated, the hook uses this node's counts where a view is missing: {first:#}"
            );
        }
    }

    /// Entries of an agent that ran before are stale: its moves are gone.
    fn clear_stale_waiting(&mut self) -> BTreeMap<u64, MoveWaiting> {
        if let Some(map) = self.waiting_map.as_mut() {
            let stale: Vec<u64> = map.keys().filter_map(|k| k.ok()).collect();
            for cookie in stale {
                let _ = map.remove(&cookie);
            }
        }
        BTreeMap::new()
    }

    fn write_waiting(&mut self, cookie: u64, entry: Option<MoveWaiting>) {
        let Some(map) = self.waiting_map.as_mut() else {
            return;
        };
        let written = match entry {
            Some(entry) => map.insert(cookie, entry, 0),
            None => map.remove(&cookie),
        };
        if let Err(e) = written {
            tracing::debug!(cookie, "writing MOVES_WAITING: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::tables::MemoryTables;

    use grpclb_common::{Addr, Backend};

    fn state(backends: &[u8], track_frames: bool) -> DesiredState {
        let backends = backends
            .iter()
            .map(|&n| Backend::new(Addr::from_v4([10, 0, 0, n]), 8080));
        crate::testing::one_service(backends, track_frames)
    }

    fn owner(retry: Duration) -> Owner<MemoryTables> {
        Owner {
            tables: MemoryTables::default(),
            syncer: Syncer::default(),
            node: "node-a".into(),
            waiting_map: None,
            retry,
            placements: watch::channel(Arc::new(PlacementLoads::new())).1,
        }
    }

    #[tokio::test]
    async fn applies_the_latest_state_serves_snapshots_and_stops_with_the_source() {
        let (tx, rx) = watch::channel(Some(state(&[1], false)));
        let mut applies = 0;
        let (handle, run) = owner(Duration::from_secs(3600)).start(rx, |_, outcome| {
            assert!(outcome.is_ok());
            applies += 1;
        });
        let client = async {
            let first = handle.full(FULL_MAX_AGE).await.unwrap();
            let tables = first.tables.as_ref().unwrap();
            assert_eq!(tables.status.frontends.len(), 1);
            assert_eq!(tables.loads.len(), 1);
            assert!(
                Arc::ptr_eq(&first, &handle.full(FULL_MAX_AGE).await.unwrap()),
                "one read serves for a while"
            );
            let fresh = handle.full(Duration::ZERO).await.unwrap();
            assert!(!Arc::ptr_eq(&first, &fresh));
            assert!(handle.tracked(vec![1, 2]).await.unwrap().is_empty());
            tx.send(Some(state(&[2, 3], false))).unwrap();
            drop(tx);
        };
        tokio::join!(run, client);
        assert!(applies >= 2, "{applies}");
        assert!(
            handle.full(FULL_MAX_AGE).await.is_err(),
            "gone with the source"
        );
    }

    #[tokio::test]
    async fn snapshots_for_the_rebalancer_only_while_a_service_tracks_frames() {
        let (tx, rx) = watch::channel(Some(state(&[1], false)));
        let (handle, run) = owner(Duration::from_secs(3600)).start(rx, |_, _| {});
        let mut snapshots = handle.snapshots();
        let client = async {
            tokio::time::sleep(SNAPSHOT_INTERVAL * 2).await;
            assert!(!snapshots.has_changed().unwrap(), "nothing tracks frames");
            tx.send(Some(state(&[1], true))).unwrap();
            snapshots.changed().await.unwrap();
            let first = snapshots.borrow_and_update().taken_ms;
            snapshots.changed().await.unwrap();
            let second = snapshots.borrow_and_update().taken_ms;
            assert!(second - first >= SNAPSHOT_INTERVAL.as_millis() as u64);
            assert!(snapshots.borrow().tables.is_none(), "TRACKED only");
            drop(tx);
        };
        tokio::join!(run, client);
    }

    #[tokio::test]
    async fn publishes_the_loads_of_local_backends_tracked_or_not() {
        let pod = Backend::new(Addr::from_v4([10, 0, 0, 1]), 8080);
        let (tx, rx) = watch::channel(Some(state(&[1], false)));
        let (handle, run) = owner(Duration::from_secs(3600)).start(rx, |_, _| {});
        let mut loads = handle.local_loads();
        let snapshots = handle.snapshots();
        let client = async {
            loads.changed().await.unwrap();
            let first = loads.borrow_and_update().clone();
            assert_eq!(
                *first,
                LocalLoads::from([(
                    pod,
                    crate::exchange::model::PodLoad {
                        connections: 0,
                        calls_per_second: None
                    }
                )]),
                "counted although its Service does not track frames"
            );
            assert!(
                !snapshots.has_changed().unwrap(),
                "no TRACKED snapshot for it"
            );
            // Its Service starts tracking frames: calls per second follow.
            tx.send(Some(state(&[1], true))).unwrap();
            loads.changed().await.unwrap();
            assert_eq!(loads.borrow_and_update()[&pod].calls_per_second, Some(0.0));
            // No local backend any more: the loads are empty.
            let mut elsewhere = state(&[1], true);
            for s in elsewhere.services.values_mut() {
                for e in &mut Arc::make_mut(s).endpoints {
                    e.node_name = Some("node-b".into());
                }
            }
            tx.send(Some(elsewhere)).unwrap();
            loads.changed().await.unwrap();
            assert!(loads.borrow_and_update().is_empty());
            drop(tx);
        };
        tokio::join!(run, client);
    }

    #[tokio::test]
    async fn writes_the_placement_into_backend_view_by_difference() {
        let pod = |n| Backend::new(Addr::from_v4([10, 0, 0, n]), 8080);
        let (tx, rx) = watch::channel(Some(state(&[1, 2], false)));
        let mut o = owner(Duration::from_secs(3600));
        // Left by an agent before: gone with the first (empty) placement.
        o.tables.views.insert(pod(9), BackendView::default());
        let (placement_tx, placements) = watch::channel(Arc::new(PlacementLoads::new()));
        o.placements = placements;
        let (handle, run) = o.start(rx, |_, _| {});
        let views =
            |snapshot: Arc<Snapshot>| snapshot.tables.as_ref().unwrap().status.views.clone();
        let client = async {
            assert!(views(handle.full(Duration::ZERO).await.unwrap()).is_empty());
            placement_tx
                .send(Arc::new(PlacementLoads::from([(pod(1), 7), (pod(2), 3)])))
                .unwrap();
            let mut seen = BTreeMap::new();
            while seen.len() < 2 {
                tokio::task::yield_now().await;
                seen = views(handle.full(Duration::ZERO).await.unwrap());
            }
            assert_eq!(seen, BTreeMap::from([(pod(1), Some(7)), (pod(2), Some(3))]));
            placement_tx
                .send(Arc::new(PlacementLoads::from([(pod(2), 4)])))
                .unwrap();
            while seen.len() != 1 {
                tokio::task::yield_now().await;
                seen = views(handle.full(Duration::ZERO).await.unwrap());
            }
            assert_eq!(seen, BTreeMap::from([(pod(2), Some(4))]));
            // The exchange is gone: nothing steers the hook any more.
            drop(placement_tx);
            while !seen.is_empty() {
                tokio::task::yield_now().await;
                seen = views(handle.full(Duration::ZERO).await.unwrap());
            }
            drop(tx);
        };
        tokio::join!(run, client);
    }

    #[tokio::test]
    async fn applies_again_only_while_something_is_left_to_do() {
        let (tx, rx) = watch::channel(Some(state(&[1], false)));
        let mut applies = 0;
        // With nothing left to do, a retry interval of 1 ms passes many
        // times over without an apply.
        let (_handle, run) = owner(Duration::from_millis(1)).start(rx.clone(), |_, _| applies += 1);
        let _ = tokio::time::timeout(Duration::from_millis(50), run).await;
        assert_eq!(applies, 1);
        // A load entry whose connection is open is looked at again.
        let mut o = owner(Duration::from_millis(1));
        o.tables
            .loads
            .insert(Backend::new(Addr::from_v4([10, 0, 0, 9]), 8080), 1);
        let mut applies = 0;
        let (_handle, run) = o.start(rx, |_, _| applies += 1);
        let _ = tokio::time::timeout(Duration::from_millis(50), run).await;
        assert!(applies > 1, "{applies}");
        drop(tx);
    }
}
