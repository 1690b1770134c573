//! One node's exchange, without I/O: whom to ask, what to make of the
//! answers, what to serve. The shell (`exchange::run`) does the HTTP and
//! the clock; tests drive many of these in rounds.
//!
//! - The subtree view is this node's own pods, then what its children (and
//!   the children of failing children) serve as theirs, live peers' entries
//!   before failing ones'. An entry is kept only if the node it names hosts the pod (per
//!   the EndpointSlices) and is in the answering peer's subtree.
//! - The cluster view is the subtree view, then what the parent (or, while
//!   it fails, the nearest live ancestor) serves as its cluster view, minus
//!   entries naming nodes of this node's subtree (this node knows those
//!   better).
//! - A peer's entries are dropped when it has not answered for the TTL.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use grpclb_common::Backend;
use tokio::time::Instant;

use crate::exchange::model::{ClusterView, Entries, Entry, LocalLoads};
use crate::exchange::tree::{Peer, Tree};
use crate::exchange::view::{Delta, PeerView, Versioned};
use crate::exchange::wire::{self, Reason};
use crate::state::model::DesiredState;

/// Default `--exchange-ttl`: a peer's pods are forgotten this long after
/// its last answer.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub fanout: usize,
    pub ttl: Duration,
}

/// The two views a node serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `GET /v1/subtree`: asked by the parent.
    Subtree,
    /// `GET /v1/cluster`: asked by the children.
    Cluster,
}

impl Kind {
    pub fn path(self) -> &'static str {
        match self {
            Kind::Subtree => "/v1/subtree",
            Kind::Cluster => "/v1/cluster",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::Subtree => "subtree",
            Kind::Cluster => "cluster",
        }
    }
}

/// One request of a round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub peer: Peer,
    pub kind: Kind,
    /// The peer's version this node has, if any.
    pub since: Option<u64>,
}

/// What an answer (or its absence) did, for the shell to log and count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The peer started failing with this: log once.
    pub failed: Option<Reason>,
    /// The peer failed again (counted, not logged).
    pub failing: Option<Reason>,
    /// The peer answers again after failing: log once.
    pub recovered: bool,
    /// Entries dropped as foreign.
    pub foreign: usize,
}

#[derive(Clone, Debug)]
struct Followed {
    kind: Kind,
    view: PeerView,
    last_answer: Instant,
}

pub struct Exchange {
    me: Arc<str>,
    config: Config,
    tree: Tree,
    /// EndpointSlice `nodeName` of every backend.
    hosts: HashMap<Backend, Arc<str>>,
    own: Arc<LocalLoads>,
    followed: HashMap<Arc<str>, Followed>,
    failing: BTreeMap<Arc<str>, Reason>,
    subtree: Versioned,
    cluster: Versioned,
    /// What the views derive from changed since the last refresh.
    changed: Changed,
}

/// What to recompute at the next refresh: recomputing both views costs
/// O(pods) (140 ms at 150,000), so a delta recomputes only the backends it
/// names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum Changed {
    #[default]
    Nothing,
    Backends(BTreeSet<Backend>),
    Everything,
}

impl Exchange {
    /// `start`: the first version served (see [`Versioned::new`]).
    pub fn new(me: Arc<str>, config: Config, start: u64) -> Exchange {
        Exchange {
            me,
            config,
            tree: Tree::default(),
            hosts: HashMap::new(),
            own: Arc::default(),
            followed: HashMap::new(),
            failing: BTreeMap::new(),
            subtree: Versioned::new(start),
            cluster: Versioned::new(start),
            changed: Changed::Everything,
        }
    }

    fn touch(&mut self, backends: impl IntoIterator<Item = Backend>) {
        match &mut self.changed {
            Changed::Everything => {}
            Changed::Backends(set) => set.extend(backends),
            nothing => {
                let set: BTreeSet<Backend> = backends.into_iter().collect();
                if !set.is_empty() {
                    *nothing = Changed::Backends(set);
                }
            }
        }
    }

    pub fn me(&self) -> &Arc<str> {
        &self.me
    }

    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    pub fn failing(&self) -> &BTreeMap<Arc<str>, Reason> {
        &self.failing
    }

    pub fn set_nodes(&mut self, nodes: &BTreeMap<Arc<str>, IpAddr>) {
        let tree = Tree::new(nodes, self.config.fanout);
        if tree != self.tree {
            self.tree = tree;
            self.changed = Changed::Everything;
        }
    }

    pub fn set_desired(&mut self, desired: &DesiredState) {
        let hosts: HashMap<Backend, Arc<str>> = desired
            .services
            .values()
            .flat_map(|s| &s.endpoints)
            .filter_map(|e| Some((e.backend, e.node_name.clone()?)))
            .collect();
        if hosts != self.hosts {
            let moved: Vec<Backend> = hosts
                .iter()
                .filter(|(b, node)| self.hosts.get(b) != Some(node))
                .map(|(b, _)| *b)
                .chain(
                    self.hosts
                        .keys()
                        .filter(|b| !hosts.contains_key(b))
                        .copied(),
                )
                .collect();
            self.hosts = hosts;
            self.touch(moved);
        }
    }

    pub fn set_own(&mut self, own: Arc<LocalLoads>) {
        if own != self.own {
            let differ: Vec<Backend> = own
                .iter()
                .filter(|(b, load)| self.own.get(b) != Some(load))
                .map(|(b, _)| *b)
                .chain(self.own.keys().filter(|b| !own.contains_key(b)).copied())
                .collect();
            self.own = own;
            self.touch(differ);
        }
    }

    /// This round's requests: the parent chain for cluster views, the
    /// children (and adopted grandchildren) for subtree views.
    pub fn plan(&self) -> Vec<Request> {
        let failing: BTreeSet<Arc<str>> = self.failing.keys().cloned().collect();
        let plan = self.tree.plan(&self.me, &failing);
        let request = |peer: Peer, kind: Kind| {
            let since = self
                .followed
                .get(&peer.name)
                .filter(|f| f.kind == kind)
                .map(|f| f.view.version);
            Request { peer, kind, since }
        };
        plan.parents
            .into_iter()
            .map(|p| request(p, Kind::Cluster))
            .chain(
                plan.children
                    .into_iter()
                    .chain(plan.others)
                    .map(|p| request(p, Kind::Subtree)),
            )
            .collect()
    }

    /// Takes `peer`'s answer to a `kind` request: `Ok(None)` is "unchanged
    /// since your version", `Ok(Some(body))` a JSON answer to check.
    pub fn on_answer(
        &mut self,
        peer: &Arc<str>,
        kind: Kind,
        answer: Result<Option<&[u8]>, Reason>,
        now: Instant,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        let decoded = answer.and_then(|body| {
            body.map(|body| {
                let (tree, hosts) = (&self.tree, &self.hosts);
                wire::decode(body, tree, |backend, node| {
                    let hosted = hosts.get(backend).is_none_or(|host| host == node);
                    let reachable = match kind {
                        Kind::Subtree => tree.in_subtree(peer, node),
                        // The parent relays the whole cluster, this node's
                        // own pods included: not a lie, so not counted as
                        // foreign; merging drops what it says of this
                        // node's subtree (this node knows that better).
                        Kind::Cluster => true,
                    };
                    hosted && reachable
                })
            })
            .transpose()
        });
        match decoded {
            Err(reason) => {
                if self.failing.insert(peer.clone(), reason).is_none() {
                    outcome.failed = Some(reason);
                    // Its entries now rank after live peers'.
                    self.changed = Changed::Everything;
                } else {
                    outcome.failing = Some(reason);
                }
            }
            Ok(delta) => {
                outcome.recovered = self.failing.remove(peer).is_some();
                if outcome.recovered {
                    self.changed = Changed::Everything;
                }
                let followed = self.followed.entry(peer.clone()).or_insert(Followed {
                    kind,
                    view: PeerView::default(),
                    last_answer: now,
                });
                let mut touched = Vec::new();
                if followed.kind != kind {
                    // The peer's role changed with the tree.
                    touched.extend(followed.view.entries.keys().copied());
                    *followed = Followed {
                        kind,
                        view: PeerView::default(),
                        last_answer: now,
                    };
                }
                followed.last_answer = now;
                if let Some((delta, foreign)) = delta {
                    outcome.foreign = foreign;
                    if delta.full {
                        touched.extend(followed.view.entries.keys().copied());
                    }
                    touched.extend(delta.changed.iter().map(|(b, _)| *b));
                    touched.extend(delta.removed.iter().copied());
                    followed.view.apply(delta);
                }
                self.touch(touched);
            }
        }
        outcome
    }

    /// Expires silent peers, forgets peers no longer asked and, when
    /// anything changed, recomputes both views; true when a view changed.
    pub fn refresh(&mut self, now: Instant) -> bool {
        let asked: BTreeSet<Arc<str>> = self.plan().into_iter().map(|r| r.peer.name).collect();
        let ttl = self.config.ttl;
        let dropped: Vec<Arc<str>> = self
            .followed
            .iter()
            .filter(|(name, f)| {
                !asked.contains(*name) || now.saturating_duration_since(f.last_answer) > ttl
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in dropped {
            if let Some(f) = self.followed.remove(&name) {
                self.touch(f.view.entries.into_keys());
            }
        }
        let before = self.failing.len();
        self.failing.retain(|name, _| asked.contains(name));
        if self.failing.len() != before {
            self.changed = Changed::Everything;
        }
        match std::mem::take(&mut self.changed) {
            Changed::Nothing => false,
            Changed::Everything => {
                let subtree = self.merge_subtree();
                let cluster = self.merge_cluster(&subtree);
                let a = self.subtree.replace(&subtree);
                let b = self.cluster.replace(&cluster);
                a || b
            }
            Changed::Backends(backends) => {
                let (mut subtree, mut cluster) = (Vec::new(), Vec::new());
                for backend in backends {
                    let mine = self.subtree_winner(&backend);
                    cluster.push((backend, self.cluster_winner(&backend, mine.as_ref())));
                    subtree.push((backend, mine));
                }
                let a = self.subtree.update(subtree);
                let b = self.cluster.update(cluster);
                a || b
            }
        }
    }

    /// Peers' views of `kind`, in the order their entries win: live peers
    /// before failing ones (a failing child's stale entries lose to its
    /// adopted children's, a failing parent's to the grandparent's), then
    /// by name. The order depends on nothing but the failing set, so a
    /// delta can be merged for the backends it names only.
    fn ranked(&self, kind: Kind) -> Vec<(&Arc<str>, &Followed)> {
        let mut views: Vec<_> = self
            .followed
            .iter()
            .filter(|(_, f)| f.kind == kind)
            .collect();
        views.sort_by_key(|(name, _)| (self.failing.contains_key(*name), *name));
        views
    }

    /// Who wins `backend` in the subtree view (as [`Self::merge_subtree`]).
    fn subtree_winner(&self, backend: &Backend) -> Option<Entry> {
        if let Some(load) = self.own.get(backend) {
            return Some(Entry {
                node: self.me.clone(),
                load: *load,
            });
        }
        self.ranked(Kind::Subtree)
            .into_iter()
            .filter(|(peer, _)| self.tree.in_subtree(&self.me, peer))
            .find_map(|(peer, f)| {
                let entry = f.view.entries.get(backend)?;
                (entry.node != self.me
                    && self.hosted(backend, entry)
                    && self.tree.in_subtree(peer, &entry.node))
                .then(|| entry.clone())
            })
    }

    /// Who wins `backend` in the cluster view (as [`Self::merge_cluster`]).
    fn cluster_winner(&self, backend: &Backend, subtree: Option<&Entry>) -> Option<Entry> {
        if let Some(entry) = subtree {
            return Some(entry.clone());
        }
        let others = self
            .ranked(Kind::Subtree)
            .into_iter()
            .filter(|(peer, _)| !self.tree.in_subtree(&self.me, peer))
            .find_map(|(peer, f)| {
                let entry = f.view.entries.get(backend)?;
                (self.hosted(backend, entry) && self.tree.in_subtree(peer, &entry.node))
                    .then(|| entry.clone())
            });
        others.or_else(|| {
            self.ranked(Kind::Cluster).into_iter().find_map(|(_, f)| {
                let entry = f.view.entries.get(backend)?;
                (self.hosted(backend, entry) && !self.tree.in_subtree(&self.me, &entry.node))
                    .then(|| entry.clone())
            })
        })
    }

    fn hosted(&self, backend: &Backend, entry: &Entry) -> bool {
        self.hosts.get(backend) == Some(&entry.node)
    }

    fn merge_subtree(&self) -> Entries {
        let mut merged: Entries = self
            .own
            .iter()
            .map(|(backend, load)| {
                let entry = Entry {
                    node: self.me.clone(),
                    load: *load,
                };
                (*backend, entry)
            })
            .collect();
        let below = self
            .ranked(Kind::Subtree)
            .into_iter()
            .filter(|(peer, _)| self.tree.in_subtree(&self.me, peer));
        for (peer, followed) in below {
            for (backend, entry) in &followed.view.entries {
                if entry.node != self.me
                    && self.hosted(backend, entry)
                    && self.tree.in_subtree(peer, &entry.node)
                {
                    merged.entry(*backend).or_insert_with(|| entry.clone());
                }
            }
        }
        merged
    }

    /// The subtree, then the other subtrees asked while every ancestor
    /// fails, then the ancestors' cluster views.
    fn merge_cluster(&self, subtree: &Entries) -> Entries {
        let mut merged = subtree.clone();
        let others = self
            .ranked(Kind::Subtree)
            .into_iter()
            .filter(|(peer, _)| !self.tree.in_subtree(&self.me, peer));
        for (peer, followed) in others {
            for (backend, entry) in &followed.view.entries {
                if self.hosted(backend, entry) && self.tree.in_subtree(peer, &entry.node) {
                    merged.entry(*backend).or_insert_with(|| entry.clone());
                }
            }
        }
        for (_, followed) in self.ranked(Kind::Cluster) {
            for (backend, entry) in &followed.view.entries {
                if self.hosted(backend, entry) && !self.tree.in_subtree(&self.me, &entry.node) {
                    merged.entry(*backend).or_insert_with(|| entry.clone());
                }
            }
        }
        merged
    }

    /// The answer to a peer's request; `None`: unchanged since `since`.
    pub fn serve(&self, kind: Kind, since: Option<u64>) -> Option<Delta> {
        match kind {
            Kind::Subtree => self.subtree.delta(since),
            Kind::Cluster => self.cluster.delta(since),
        }
    }

    pub fn cluster_view(&self) -> ClusterView {
        self.cluster
            .entries()
            .map(|(backend, entry)| (*backend, entry.load))
            .collect()
    }

    /// The oldest answer the views still use.
    pub fn oldest_answer(&self) -> Option<Instant> {
        self.followed.values().map(|f| f.last_answer).min()
    }

    /// Whether the served views are what a full recomputation gives (the
    /// incremental refresh's invariant), for tests.
    #[cfg(test)]
    fn consistent(&self) -> bool {
        let subtree = self.merge_subtree();
        let cluster = self.merge_cluster(&subtree);
        let held =
            |v: &Versioned| -> Entries { v.entries().map(|(b, e)| (*b, e.clone())).collect() };
        held(&self.subtree) == subtree && held(&self.cluster) == cluster
    }

    /// (subtree, cluster) entries.
    pub fn sizes(&self) -> (usize, usize) {
        (self.subtree.len(), self.cluster.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::model::PodLoad;
    use crate::exchange::tree::DEFAULT_FANOUT;
    use crate::state::model::{DesiredService, Endpoint, EndpointCondition};
    use crate::state::topology::Rule;
    use grpclb_common::{Addr, ServiceKey};
    use std::net::Ipv4Addr;

    /// A simulated cluster: `n` nodes, each hosting two pods of one Service.
    struct Sim {
        nodes: Vec<Exchange>,
        /// Nodes that do not answer.
        down: BTreeSet<usize>,
        /// Nodes that answer this instead of their view.
        liars: BTreeMap<usize, Vec<u8>>,
        now: Instant,
        requests: Vec<usize>,
    }

    fn name(i: usize) -> Arc<str> {
        Arc::from(format!("node-{i}"))
    }

    fn pod(node: usize, k: u8) -> Backend {
        Backend::new(
            Addr::from_v4([10, (node / 250) as u8, (node % 250) as u8, k]),
            50051,
        )
    }

    fn load(connections: u32) -> PodLoad {
        PodLoad {
            connections,
            calls_per_second: None,
        }
    }

    impl Sim {
        fn new(n: usize, fanout: usize) -> Sim {
            let nodes_map: BTreeMap<Arc<str>, IpAddr> = (0..n)
                .map(|i| {
                    (
                        name(i),
                        IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250) as u8)),
                    )
                })
                .collect();
            let endpoints = (0..n)
                .flat_map(|i| {
                    (1..=2).map(move |k| Endpoint {
                        backend: pod(i, k),
                        node_name: Some(name(i)),
                        condition: EndpointCondition::Ready,
                    })
                })
                .collect();
            let service = DesiredService {
                name: "ns/svc:grpc".into(),
                endpoints,
                track_frames: false,
                rule: Rule::Ready,
            };
            let desired = DesiredState {
                services: [(
                    ServiceKey::new(Addr::from_v4([10, 96, 0, 1]), 50051),
                    Arc::new(service),
                )]
                .into(),
                ..DesiredState::default()
            };
            let config = Config {
                fanout,
                ttl: DEFAULT_TTL,
            };
            let nodes = (0..n)
                .map(|i| {
                    let mut x = Exchange::new(name(i), config, 1000);
                    x.set_nodes(&nodes_map);
                    x.set_desired(&desired);
                    x.set_own(Arc::new(
                        [(pod(i, 1), load(1)), (pod(i, 2), load(1))].into(),
                    ));
                    x
                })
                .collect();
            Sim {
                nodes,
                down: BTreeSet::new(),
                liars: BTreeMap::new(),
                now: Instant::now(),
                requests: vec![0; n],
            }
        }

        fn index(&self, peer: &str) -> usize {
            peer.strip_prefix("node-").unwrap().parse().unwrap()
        }

        /// One interval: every node asks its peers (answers computed from
        /// the peers' views at the start of the round), then refreshes.
        fn round(&mut self) -> Vec<Vec<Outcome>> {
            self.now += Duration::from_millis(250);
            let mut answers = Vec::new();
            for (i, node) in self.nodes.iter().enumerate() {
                if self.down.contains(&i) {
                    answers.push(Vec::new());
                    continue;
                }
                let mut mine = Vec::new();
                for request in node.plan() {
                    self.requests[i] += 1;
                    let j = self.index(&request.peer.name);
                    let answer = if self.down.contains(&j) {
                        Err(Reason::Timeout)
                    } else if let Some(lie) = self.liars.get(&j) {
                        Ok(Some(lie.clone()))
                    } else {
                        Ok(self.nodes[j]
                            .serve(request.kind, request.since)
                            .map(|d| wire::encode(&d)))
                    };
                    mine.push((request.peer.name, request.kind, answer));
                }
                answers.push(mine);
            }
            let now = self.now;
            let mut outcomes = Vec::new();
            for (node, answers) in self.nodes.iter_mut().zip(answers) {
                let mut mine = Vec::new();
                for (peer, kind, answer) in answers {
                    mine.push(node.on_answer(
                        &peer,
                        kind,
                        answer.as_ref().map(|b| b.as_deref()).map_err(|r| *r),
                        now,
                    ));
                }
                node.refresh(now);
                assert!(
                    node.consistent(),
                    "{}: incremental refresh differs",
                    node.me()
                );
                outcomes.push(mine);
            }
            outcomes
        }

        fn sees(&self, i: usize, backend: Backend, connections: u32) -> bool {
            self.nodes[i]
                .cluster_view()
                .get(&backend)
                .map(|l| l.connections)
                == Some(connections)
        }
    }

    #[test]
    fn a_change_reaches_every_node_within_twice_the_depth_in_rounds_and_requests_stay_flat() {
        let mut per_round = Vec::new();
        for n in [12, 24, 48, 96] {
            let mut sim = Sim::new(n, DEFAULT_FANOUT);
            let depth = sim.nodes[0].tree().depth();
            // Converge, then change one pod on the deepest node. Honest
            // peers are never counted as foreign: a parent's cluster view
            // holds the asking node's own pods too.
            for _ in 0..2 * depth + 1 {
                let outcomes = sim.round();
                assert!(
                    outcomes.iter().flatten().all(|o| o.foreign == 0),
                    "{n} nodes: honest peers counted as foreign"
                );
            }
            assert!(
                (0..n).all(|i| sim.nodes[i].cluster_view().len() == 2 * n),
                "{n} nodes converged"
            );
            let deep = (0..n)
                .max_by_key(|i| {
                    let t = sim.nodes[0].tree();
                    let mut d = 0;
                    let mut at = name(*i);
                    while let Some(p) = t.parent(&at) {
                        at = p.name.clone();
                        d += 1;
                    }
                    d
                })
                .unwrap();
            let mut own: LocalLoads = [(pod(deep, 1), load(7)), (pod(deep, 2), load(1))].into();
            sim.nodes[deep].set_own(Arc::new(std::mem::take(&mut own)));
            sim.nodes[deep].refresh(sim.now);
            sim.requests = vec![0; n];
            let mut rounds = 0;
            while !(0..n).all(|i| sim.sees(i, pod(deep, 1), 7)) {
                sim.round();
                rounds += 1;
                assert!(
                    rounds <= 2 * depth,
                    "{n} nodes: not everywhere after {rounds} rounds"
                );
            }
            let max = sim.requests.iter().max().unwrap();
            let total: usize = sim.requests.iter().sum();
            per_round.push((
                n,
                *max as f64 / rounds as f64,
                total as f64 / (n * rounds) as f64,
            ));
            assert!(
                *max <= rounds * (DEFAULT_FANOUT + 1),
                "{n} nodes: {max} requests in {rounds} rounds"
            );
        }
        // Per node and round: at most F + 1 for the busiest, 2 on average
        // (each tree edge is asked both ways), whatever the node count.
        for (n, busiest, mean) in &per_round {
            assert!(
                *busiest <= (DEFAULT_FANOUT + 1) as f64,
                "{n} nodes: {per_round:?}"
            );
            assert!(*mean <= 2.0, "{n} nodes: {per_round:?}");
        }
    }

    #[test]
    fn a_dead_peer_is_walked_around_reported_once_and_its_pods_expire() {
        let n = 40;
        let mut sim = Sim::new(n, 4);
        for _ in 0..8 {
            sim.round();
        }
        // An inner node with children and a parent.
        let tree = sim.nodes[0].tree().clone();
        let dead = (0..n)
            .find(|i| tree.parent(&name(*i)).is_some() && !tree.children(&name(*i)).is_empty())
            .unwrap();
        sim.down.insert(dead);
        let child = sim.index(&tree.children(&name(dead))[0].name);
        let parent = sim.index(&tree.parent(&name(dead)).unwrap().name);
        let mut failures = 0;
        let mut later = 0;
        let start = sim.now;
        // A change on the dead node's child still reaches the far side of the
        // tree, through the adoption and the walk-up.
        sim.nodes[child].set_own(Arc::new(
            [(pod(child, 1), load(9)), (pod(child, 2), load(1))].into(),
        ));
        while sim.now.duration_since(start) <= DEFAULT_TTL + Duration::from_secs(2) {
            let outcomes = sim.round();
            failures += outcomes
                .iter()
                .flatten()
                .filter(|o| o.failed.is_some())
                .count();
            later += outcomes
                .iter()
                .flatten()
                .filter(|o| o.failing.is_some())
                .count();
        }
        // Reported once by each node that asks it (its parent and children).
        assert_eq!(failures, 1 + tree.children(&name(dead)).len());
        assert!(later > 0);
        for i in (0..n).filter(|i| *i != dead) {
            assert!(sim.sees(i, pod(child, 1), 9), "node {i} sees the change");
            assert!(
                !sim.nodes[i].cluster_view().contains_key(&pod(dead, 1)),
                "node {i}: expired"
            );
        }
        // It comes back: reported recovered, its pods return.
        sim.down.clear();
        let mut recovered = 0;
        for _ in 0..10 {
            recovered += sim.round().iter().flatten().filter(|o| o.recovered).count();
        }
        assert_eq!(recovered, 1 + tree.children(&name(dead)).len());
        assert!(sim.sees(parent, pod(dead, 1), 1));
        assert!((0..n).all(|i| sim.sees(i, pod(dead, 1), 1)));
    }

    #[test]
    fn with_the_root_dead_the_other_subtrees_ask_each_other() {
        let n = 40;
        let mut sim = Sim::new(n, 4);
        for _ in 0..8 {
            sim.round();
        }
        let tree = sim.nodes[0].tree().clone();
        let root = (0..n).find(|i| tree.parent(&name(*i)).is_none()).unwrap();
        sim.down.insert(root);
        let far = (0..n).rev().find(|i| *i != root).unwrap();
        sim.nodes[far].set_own(Arc::new(
            [(pod(far, 1), load(5)), (pod(far, 2), load(1))].into(),
        ));
        let start = sim.now;
        while sim.now.duration_since(start) <= DEFAULT_TTL + Duration::from_secs(2) {
            sim.round();
        }
        for i in (0..n).filter(|i| *i != root) {
            assert!(sim.sees(i, pod(far, 1), 5), "node {i} sees the change");
            let view = sim.nodes[i].cluster_view();
            assert_eq!(
                view.len(),
                2 * (n - 1),
                "node {i}: everything but the root's pods"
            );
        }
    }

    #[test]
    fn a_liar_can_report_only_its_own_subtree_and_garbage_is_ignored() {
        let n = 12;
        let mut sim = Sim::new(n, 4);
        for _ in 0..6 {
            sim.round();
        }
        let tree = sim.nodes[0].tree().clone();
        let liar = (0..n)
            .find(|i| tree.parent(&name(*i)).is_some() && tree.children(&name(*i)).is_empty())
            .unwrap();
        let victim = (0..n)
            .find(|i| *i != liar && !tree.in_subtree(&name(liar), &name(*i)))
            .unwrap();
        // Claims a pod of another node, and that its own pod is idle while
        // listing it under another node's name.
        let lie = format!(
            r#"{{"v":99999999,"full":true,"n":["node-{victim}","node-{liar}"],"e":[["{}",0,0,null],["{}",1,500,null]],"r":[]}}"#,
            crate::exchange::model::backend_addr(&pod(victim, 1)),
            crate::exchange::model::backend_addr(&pod(liar, 1)),
        );
        sim.liars.insert(liar, lie.into_bytes());
        let mut foreign = 0;
        for _ in 0..6 {
            foreign += sim
                .round()
                .iter()
                .flatten()
                .map(|o| o.foreign)
                .sum::<usize>();
        }
        assert!(foreign > 0);
        // The forged entry for the victim's pod was dropped; the liar's own
        // pod takes what it says (first-hand), its other pod is gone.
        for i in 0..n {
            assert!(sim.sees(i, pod(victim, 1), 1), "node {i}");
            if i != liar {
                assert!(sim.sees(i, pod(liar, 1), 500), "node {i}");
                assert!(!sim.nodes[i].cluster_view().contains_key(&pod(liar, 2)));
            }
        }
        // Garbage: ignored, reported once, the old entries kept until the TTL.
        sim.liars.insert(liar, b"{\"v\": \"garbage".to_vec());
        let outcomes: Vec<Outcome> = (0..4)
            .flat_map(|_| sim.round().into_iter().flatten())
            .collect();
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| o.failed == Some(Reason::Json))
                .count(),
            1
        );
        let parent = sim.index(&tree.parent(&name(liar)).unwrap().name);
        assert!(sim.sees(parent, pod(liar, 1), 500));
    }
}
