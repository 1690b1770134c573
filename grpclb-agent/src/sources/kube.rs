//! `--source kube`: Services and EndpointSlices of all namespaces, watched
//! through the Kubernetes API, each object reduced to its compact form as it
//! arrives and kept in a [`Cluster`], which translates the Services that
//! changed and publishes the next [`DesiredState`].
//!
//! - The agent's own Node is read once at start for its zone (topology
//!   hints); `--node-zone` overrides it.
//! - Every Node is watched for its InternalIP (the load exchange's peers);
//!   only the name and the address are kept. States are published without
//!   waiting for the Nodes' list: the maps do not depend on it.
//! - Lists are paged ([`PAGE_SIZE`]); no full object is kept.
//! - Nothing is published until both kinds have completed their first list,
//!   so a restarted agent never prunes live services from a partial view.
//! - Errors are retried with a backoff capped at a few seconds
//!   ([`backoff`]); the maps keep their last state meanwhile.
//! - An expired watch (410 Gone) relists; nothing is published while a
//!   relist runs, and objects missing from it are deleted when it completes,
//!   so services that still exist never vanish.
//! - A change after a quiet spell is published at once; a burst is published
//!   at most every [`BATCH`] ([`Coalescer`]).
//! - An object with a field of the wrong type is named with the field and
//!   ignored (its last good version stays), instead of failing the watch.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::marker::PhantomData;
use std::path::Path;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::Resource as _;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Config};
use serde::Deserialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::observe::metrics::{Metrics, Watched};
use crate::state::model::DesiredState;
use crate::state::objects::{decode_json, NodeObject, ObjectWire, ServiceObject, SliceObject};
use crate::state::topology::NodeTopology;
use crate::state::translate::{report_not_balanced, Cluster};

/// A change after a quiet spell is published at once; later ones wait until
/// this long after the last publish, so a burst costs one publish per
/// `BATCH`.
pub const BATCH: Duration = Duration::from_millis(100);
/// Objects per list request: bounds what a relist holds in memory at once.
pub const PAGE_SIZE: u32 = 500;
/// Retry delays after a watch error grow from this ...
const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// ... to this, plus a random jitter of up to as much again (so agents of a
/// cluster do not retry in step after an API server outage).
const BACKOFF_MAX: Duration = Duration::from_millis(1500);

/// (API group, resource, verbs) of every kind the source reads. The
/// ClusterRole in `deploy/` grants exactly these.
pub fn read_resources() -> [(&'static str, &'static str, &'static [&'static str]); 3] {
    [
        (Service::GROUP, Service::URL_PATH_SEGMENT, &WATCH_VERBS),
        (
            EndpointSlice::GROUP,
            EndpointSlice::URL_PATH_SEGMENT,
            &WATCH_VERBS,
        ),
        // Every Node's InternalIP (the load exchange), its own Node's zone.
        (Node::GROUP, Node::URL_PATH_SEGMENT, &WATCH_VERBS),
    ]
}

/// The watcher lists and watches; `get` is granted for reads of one object
/// (kubectl, debugging with the agent's account).
pub const WATCH_VERBS: [&str; 3] = ["get", "list", "watch"];

/// This node's topology: `--node-zone`, else its Node's zone label. A Node
/// that cannot be read leaves the zone unknown (zone hints are then
/// ignored, as kube-proxy ignores them on a node without the label).
pub async fn node_topology(client: &Client, name: &str, zone_flag: Option<&str>) -> NodeTopology {
    if zone_flag.is_some() {
        return NodeTopology::new(name, zone_flag, None);
    }
    match Api::<Node>::all(client.clone()).get(name).await {
        Ok(node) => {
            let topology = NodeTopology::new(name, None, node.metadata.labels.as_ref());
            tracing::info!(node = name, zone = ?topology.zone, "read this node's zone");
            topology
        }
        Err(e) => {
            tracing::warn!(
                "reading Node {name} for its zone label failed ({e}); zone hints are ignored \
                 (grant get on nodes, or pass --node-zone)"
            );
            NodeTopology::new(name, None, None)
        }
    }
}

/// A client from `kubeconfig`, or from the pod's service account when
/// running in a cluster.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using the kubeconfig {}", path.display()))?
        }
        None => Config::incluster().context(
            "loading the in-cluster configuration (not running in a pod? pass --kubeconfig)",
        )?,
    };
    let url = config.cluster_url.clone();
    Client::try_from(config).with_context(|| format!("creating a Kubernetes client for {url}"))
}

/// How a watcher event changes the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreChange {
    /// A (re)list started: nothing is published until it completes.
    ListStarted,
    /// A listed object.
    Buffered,
    /// The list is complete; objects it did not have are deleted.
    Listed,
    /// An object was added, changed or deleted.
    Changed,
}

pub fn store_change<K>(event: &watcher::Event<K>) -> StoreChange {
    match event {
        watcher::Event::Init => StoreChange::ListStarted,
        watcher::Event::InitApply(_) => StoreChange::Buffered,
        watcher::Event::InitDone => StoreChange::Listed,
        watcher::Event::Apply(_) | watcher::Event::Delete(_) => StoreChange::Changed,
    }
}

/// The retry delays of a watch: 250 ms doubling to 1.5 s, each plus up to
/// as much again of jitter, so a watch is back within 3 s of the API server.
pub fn backoff() -> watcher::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(BACKOFF_MIN)
        .with_max_delay(BACKOFF_MAX)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
}

/// Decides when the cluster is published: never before both kinds are
/// listed nor while a relist runs; then at once after a quiet spell, or
/// [`BATCH`] after the last publish.
#[derive(Clone, Debug)]
pub struct Coalescer {
    batch: Duration,
    /// Services, EndpointSlices, Nodes.
    listed: [bool; 3],
    relisting: [bool; 3],
    /// The first change not yet published.
    pending: Option<Instant>,
    last_publish: Option<Instant>,
}

fn index(kind: Watched) -> usize {
    match kind {
        Watched::Services => 0,
        Watched::EndpointSlices => 1,
        Watched::Nodes => 2,
    }
}

impl Coalescer {
    pub fn new(batch: Duration) -> Self {
        Coalescer {
            batch,
            listed: [false; 3],
            relisting: [false; 3],
            pending: None,
            last_publish: None,
        }
    }

    pub fn observe(&mut self, kind: Watched, change: StoreChange, now: Instant) {
        match change {
            StoreChange::ListStarted => {
                self.relisting[index(kind)] = true;
                return;
            }
            StoreChange::Buffered => {}
            StoreChange::Listed => {
                self.relisting[index(kind)] = false;
                self.listed[index(kind)] = true;
            }
            StoreChange::Changed => {}
        }
        self.pending.get_or_insert(now);
    }

    /// Services and EndpointSlices have been listed once: the cluster is a
    /// complete view for the maps (Nodes only feed the load exchange, which
    /// follows them as they come).
    pub fn complete(&self) -> bool {
        self.listed[..2].iter().all(|l| *l)
    }

    /// When to publish; `None` while there is nothing (allowed) to publish.
    pub fn deadline(&self) -> Option<Instant> {
        if !self.complete() || self.relisting[..2].iter().any(|r| *r) {
            return None;
        }
        let first = self.pending?;
        Some(match self.last_publish {
            Some(last) => first.max(last + self.batch),
            None => first,
        })
    }

    pub fn published(&mut self, now: Instant) {
        self.pending = None;
        self.last_publish = Some(now);
    }
}

/// Problems in `current` that were not reported last time: a persistent
/// problem is logged once, not at every publish.
pub fn new_problems<'a>(reported: &BTreeSet<String>, current: &'a [String]) -> Vec<&'a str> {
    current
        .iter()
        .filter(|p| !reported.contains(*p))
        .map(String::as_str)
        .collect()
}

/// A watched object decoded by the source rather than by the watcher: kube
/// turns an object it cannot decode into an error that says nothing (an
/// `ApiError` with an empty status) and restarts the watch, where the source
/// names the object and field and goes on. Kube delivers each object as
/// JSON; its fields are read into the wire form at once and the JSON is
/// dropped.
#[derive(Clone, Debug)]
pub struct Raw<K> {
    /// Name, namespace and resourceVersion (the watcher needs the last).
    metadata: ObjectMeta,
    wire: Result<ObjectWire, String>,
    kind: PhantomData<fn() -> K>,
}

impl<'de, K> Deserialize<'de> for Raw<K> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Watch events come through serde's buffered content (the event is
        // an adjacently tagged enum), so the text itself is not at hand.
        let value = serde_json::Value::deserialize(d)?;
        let meta = value.get("metadata");
        let field = |name: &str| {
            meta.and_then(|m| m.get(name))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        let metadata = ObjectMeta {
            name: field("name"),
            namespace: field("namespace"),
            resource_version: field("resourceVersion"),
            ..ObjectMeta::default()
        };
        Ok(Raw {
            metadata,
            wire: decode_json(value),
            kind: PhantomData,
        })
    }
}

impl<K: k8s_openapi::Resource> k8s_openapi::Resource for Raw<K> {
    const API_VERSION: &'static str = K::API_VERSION;
    const GROUP: &'static str = K::GROUP;
    const KIND: &'static str = K::KIND;
    const VERSION: &'static str = K::VERSION;
    const URL_PATH_SEGMENT: &'static str = K::URL_PATH_SEGMENT;
    type Scope = K::Scope;
}

impl<K: k8s_openapi::Resource> k8s_openapi::Metadata for Raw<K> {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl<K: k8s_openapi::Resource> Raw<K> {
    /// `namespace/name`; `name` for cluster-scoped objects (Nodes).
    fn id(&self) -> String {
        let name = self.metadata.name.as_deref().unwrap_or_default();
        match &self.metadata.namespace {
            Some(namespace) => format!("{namespace}/{name}"),
            None => name.to_string(),
        }
    }

    /// The object's wire form, or what is wrong with it, naming the object,
    /// the field and what to do.
    fn decode(self) -> Result<ObjectWire, String> {
        let id = self.id();
        self.wire.map_err(|e| {
            format!(
                "{} {id}: {e}; the object is ignored (its last good version, if any, stays) \
                 until it is fixed",
                K::KIND,
            )
        })
    }
}

/// A watch error with its causes, which kube's messages leave out (a
/// refused connection shows as `client error (Connect)` otherwise).
pub fn describe(e: &watcher::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The cluster as the watches have shown it, and what was logged of it.
pub struct KubeState {
    cluster: Cluster,
    /// Objects seen by the running relist of each kind.
    relisted: [Option<HashSet<String>>; 3],
    /// Undecodable objects, as logged.
    bad_objects: BTreeMap<String, String>,
    reported: BTreeSet<String>,
    not_balanced: BTreeMap<String, String>,
    /// The first state is published even when empty: it tells the agent
    /// the source has a complete view.
    published: bool,
}

impl KubeState {
    pub fn new(node: NodeTopology) -> KubeState {
        KubeState {
            cluster: Cluster::new(node),
            relisted: [None, None, None],
            bad_objects: BTreeMap::new(),
            reported: BTreeSet::new(),
            not_balanced: BTreeMap::new(),
            published: false,
        }
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Applies one watcher event of Services.
    pub fn on_service(&mut self, event: watcher::Event<Raw<Service>>) {
        self.on_event(Watched::Services, event, |cluster, raw| {
            let object = raw.decode().and_then(ServiceObject::from_wire)?;
            cluster.apply_service(object);
            Ok(())
        });
    }

    /// Applies one watcher event of Nodes: only the InternalIP is kept (a
    /// bad one is logged and the last good one stays).
    pub fn on_node(&mut self, event: watcher::Event<Raw<Node>>) {
        self.on_event(Watched::Nodes, event, |cluster, raw| {
            let node = NodeObject::from_wire(&raw.decode()?)?;
            cluster.set_node_address(&node.name, node.internal_ip);
            Ok(())
        });
    }

    /// Applies one watcher event of EndpointSlices.
    pub fn on_slice(&mut self, event: watcher::Event<Raw<EndpointSlice>>) {
        self.on_event(Watched::EndpointSlices, event, |cluster, raw| {
            let object = raw.decode().and_then(SliceObject::from_wire)?;
            cluster.apply_slice(object);
            Ok(())
        });
    }

    fn on_event<K: k8s_openapi::Resource>(
        &mut self,
        kind: Watched,
        event: watcher::Event<Raw<K>>,
        apply: impl Fn(&mut Cluster, Raw<K>) -> Result<(), String>,
    ) {
        let relisted = &mut self.relisted[index(kind)];
        match event {
            watcher::Event::Init => *relisted = Some(HashSet::new()),
            watcher::Event::InitApply(raw) | watcher::Event::Apply(raw) => {
                let id = raw.id();
                if let Some(seen) = relisted {
                    seen.insert(id.clone());
                }
                let key = format!("{} {id}", K::KIND);
                match apply(&mut self.cluster, raw) {
                    Ok(()) => {
                        self.bad_objects.remove(&key);
                    }
                    Err(problem) => {
                        if self.bad_objects.get(&key) != Some(&problem) {
                            tracing::warn!("{problem}");
                            self.bad_objects.insert(key, problem);
                        }
                    }
                }
            }
            watcher::Event::Delete(raw) => {
                let id = raw.id();
                self.bad_objects.remove(&format!("{} {id}", K::KIND));
                match kind {
                    Watched::Services => self.cluster.delete_service(&id),
                    Watched::EndpointSlices => self.cluster.delete_slice(&id),
                    Watched::Nodes => self.cluster.set_node_address(&id, None),
                };
            }
            watcher::Event::InitDone => {
                let seen = relisted.take().unwrap_or_default();
                let held: Box<dyn Iterator<Item = &str>> = match kind {
                    Watched::Services => Box::new(self.cluster.service_ids().map(String::as_str)),
                    Watched::EndpointSlices => {
                        Box::new(self.cluster.slice_ids().map(String::as_str))
                    }
                    Watched::Nodes => Box::new(self.cluster.node_ids().map(|n| &**n)),
                };
                let gone: Vec<String> = held
                    .filter(|id| !seen.contains(*id))
                    .map(str::to_string)
                    .collect();
                for id in gone {
                    match kind {
                        Watched::Services => self.cluster.delete_service(&id),
                        Watched::EndpointSlices => self.cluster.delete_slice(&id),
                        Watched::Nodes => self.cluster.set_node_address(&id, None),
                    };
                }
            }
        }
    }

    /// Translates what changed; the new state when it differs.
    pub fn publish(&mut self) -> Option<DesiredState> {
        let changed = self.cluster.update();
        let problems = self.cluster.problems();
        for problem in new_problems(&self.reported, &problems) {
            tracing::warn!("ignoring: {problem}");
        }
        self.reported = problems.into_iter().collect();
        let state = self.cluster.state();
        report_not_balanced(&mut self.not_balanced, state);
        let first = !std::mem::replace(&mut self.published, true);
        (changed || first).then(|| state.clone())
    }
}

pub struct KubeSource {
    client: Client,
    metrics: Arc<Metrics>,
    node: NodeTopology,
}

impl KubeSource {
    pub fn new(client: Client, metrics: Arc<Metrics>, node: NodeTopology) -> Self {
        KubeSource {
            client,
            metrics,
            node,
        }
    }

    /// Watches until the task is dropped, publishing every changed state.
    pub async fn watch(self, states: watch::Sender<Option<DesiredState>>) -> Result<()> {
        let config = watcher::Config::default().page_size(PAGE_SIZE);
        let mut services_events = pin!(watcher(
            Api::<Raw<Service>>::all(self.client.clone()),
            config.clone()
        )
        .backoff(backoff()));
        let mut slices_events = pin!(watcher(
            Api::<Raw<EndpointSlice>>::all(self.client.clone()),
            config.clone()
        )
        .backoff(backoff()));
        let mut nodes_events =
            pin!(watcher(Api::<Raw<Node>>::all(self.client.clone()), config).backoff(backoff()));
        let mut coalescer = Coalescer::new(BATCH);
        let mut kube = KubeState::new(self.node.clone());
        let mut counts = [0usize; 3];
        tracing::info!(
            "watching Services and EndpointSlices in all namespaces, and Nodes; \
             the maps are not changed until Services and EndpointSlices are listed"
        );
        loop {
            let deadline = coalescer.deadline();
            tokio::select! {
                event = services_events.next() => {
                    let Some(event) = event else { bail!("the Service watch ended") };
                    if let Some(event) = self.observe(Watched::Services, event, &mut coalescer, &mut counts) {
                        kube.on_service(event);
                    }
                }
                event = slices_events.next() => {
                    let Some(event) = event else { bail!("the EndpointSlice watch ended") };
                    if let Some(event) = self.observe(Watched::EndpointSlices, event, &mut coalescer, &mut counts) {
                        kube.on_slice(event);
                    }
                }
                event = nodes_events.next() => {
                    let Some(event) = event else { bail!("the Node watch ended") };
                    if let Some(event) = self.observe(Watched::Nodes, event, &mut coalescer, &mut counts) {
                        kube.on_node(event);
                    }
                }
                () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    coalescer.published(Instant::now());
                    if let Some(state) = kube.publish() {
                        let changed = states.send_if_modified(|current| {
                            if current.as_ref() == Some(&state) {
                                return false;
                            }
                            *current = Some(state);
                            true
                        });
                        if changed {
                            self.metrics.record_publish();
                        }
                    }
                }
            }
        }
    }

    /// Counts and logs an event; the event itself when there is one.
    fn observe<K>(
        &self,
        kind: Watched,
        event: Result<watcher::Event<K>, watcher::Error>,
        coalescer: &mut Coalescer,
        counts: &mut [usize; 3],
    ) -> Option<watcher::Event<K>> {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                self.metrics.record_watch_error(kind);
                tracing::warn!(
                    "watching {} failed, retrying with backoff (within 3 s); the maps keep \
                     their last state: {}",
                    kind.label(),
                    describe(&e)
                );
                return None;
            }
        };
        let change = store_change(&event);
        let count = &mut counts[index(kind)];
        match &event {
            watcher::Event::Init => {
                *count = 0;
                tracing::debug!("listing {}", kind.label());
            }
            watcher::Event::InitApply(_) => *count += 1,
            watcher::Event::InitDone => {
                self.metrics.record_list(kind, *count);
                tracing::info!("listed {} {}", *count, kind.label());
            }
            watcher::Event::Apply(_) => {}
            watcher::Event::Delete(_) => *count = count.saturating_sub(1),
        }
        if change == StoreChange::Changed {
            self.metrics.record_objects(kind, *count);
        }
        coalescer.observe(kind, change, Instant::now());
        Some(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Duration = Duration::from_millis(100);

    fn ms(start: Instant, n: u64) -> Instant {
        start + Duration::from_millis(n)
    }

    fn listed(c: &mut Coalescer, at: Instant) {
        c.observe(Watched::Services, StoreChange::Listed, at);
        c.observe(Watched::EndpointSlices, StoreChange::Listed, at);
    }

    #[test]
    fn nothing_is_published_until_both_kinds_are_listed() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(B);
        c.observe(Watched::Services, StoreChange::ListStarted, t0);
        c.observe(Watched::Services, StoreChange::Buffered, t0);
        c.observe(Watched::Services, StoreChange::Listed, ms(t0, 5));
        assert_eq!(c.deadline(), None, "slices not listed yet");
        c.observe(Watched::Services, StoreChange::Changed, ms(t0, 500));
        assert_eq!(c.deadline(), None);
        c.observe(Watched::EndpointSlices, StoreChange::Listed, ms(t0, 2000));
        assert!(c.complete());
        // Nothing was published yet: at once.
        assert_eq!(c.deadline(), Some(t0));
    }

    #[test]
    fn a_change_after_a_quiet_spell_is_published_at_once_and_a_burst_every_batch() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(B);
        listed(&mut c, t0);
        c.published(t0);
        assert_eq!(c.deadline(), None, "nothing new");
        c.observe(Watched::EndpointSlices, StoreChange::Changed, ms(t0, 1000));
        assert_eq!(c.deadline(), Some(ms(t0, 1000)), "leading edge");
        c.published(ms(t0, 1000));
        for i in 1..5 {
            c.observe(
                Watched::EndpointSlices,
                StoreChange::Changed,
                ms(t0, 1000 + i * 20),
            );
        }
        assert_eq!(c.deadline(), Some(ms(t0, 1100)), "one batch later");
        c.published(ms(t0, 1100));
        assert_eq!(c.deadline(), None);
    }

    #[test]
    fn a_relist_publishes_nothing_until_it_completes() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(B);
        listed(&mut c, t0);
        c.published(t0);
        c.observe(Watched::Services, StoreChange::ListStarted, ms(t0, 500));
        c.observe(Watched::EndpointSlices, StoreChange::Changed, ms(t0, 501));
        c.observe(Watched::Services, StoreChange::Buffered, ms(t0, 502));
        assert_eq!(c.deadline(), None);
        c.observe(Watched::Services, StoreChange::Listed, ms(t0, 503));
        assert_eq!(c.deadline(), Some(ms(t0, 501)));
    }

    #[test]
    fn retries_come_within_three_seconds_and_are_jittered() {
        let delays: Vec<Duration> = backoff().take(20).collect();
        assert!(delays.iter().all(|d| *d <= 2 * BACKOFF_MAX), "{delays:?}");
        assert!(delays[0] < Duration::from_millis(600), "{delays:?}");
        let again: Vec<Duration> = backoff().take(20).collect();
        assert_ne!(delays, again, "jitter");
    }

    fn raw<K>(object: serde_json::Value) -> Raw<K> {
        serde_json::from_str(&object.to_string()).unwrap()
    }

    fn svc(name: &str, port: serde_json::Value) -> Raw<Service> {
        raw(serde_json::json!({
            "metadata": {"name": name, "namespace": "apps", "resourceVersion": "1"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "grpc", "port": port, "appProtocol": "grpc"}]}
        }))
    }

    fn node() -> NodeTopology {
        NodeTopology::new("n1", None, None)
    }

    #[test]
    fn an_object_with_a_wrong_field_is_named_and_its_last_good_version_stays() {
        let mut kube = KubeState::new(node());
        assert_eq!(kube.publish(), Some(DesiredState::default()), "first");
        assert_eq!(kube.publish(), None, "unchanged");
        kube.on_service(watcher::Event::Apply(svc("echo", 50051.into())));
        assert_eq!(kube.publish().unwrap().services.len(), 1);
        let bad = svc("echo", "fifty".into());
        let problem = bad.clone().decode().unwrap_err();
        assert_eq!(
            problem,
            "Service apps/echo: spec.ports[0].port: invalid type: string \"fifty\", expected i32; \
             the object is ignored (its last good version, if any, stays) until it is fixed"
        );
        kube.on_service(watcher::Event::Apply(bad));
        assert_eq!(kube.publish(), None, "unchanged");
        assert_eq!(kube.cluster().state().services.len(), 1);
    }

    #[test]
    fn a_relist_deletes_what_it_no_longer_has_when_it_completes() {
        let mut kube = KubeState::new(node());
        kube.on_service(watcher::Event::Apply(svc("a", 1.into())));
        let mut b = svc("b", 2.into());
        b.metadata.name = Some("b".into());
        kube.on_service(watcher::Event::Apply(b));
        kube.publish();
        kube.on_service(watcher::Event::Init);
        kube.on_service(watcher::Event::InitApply(svc("a", 1.into())));
        assert_eq!(
            kube.cluster().service_ids().count(),
            2,
            "b stays mid-relist"
        );
        kube.on_service(watcher::Event::InitDone);
        let ids: Vec<&String> = kube.cluster().service_ids().collect();
        assert_eq!(ids, ["apps/a"]);
    }

    fn node_object(name: &str, ip: &str) -> Raw<Node> {
        raw(serde_json::json!({
            "metadata": {"name": name, "resourceVersion": "1"},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}], "images": [{"names": ["x"]}]}
        }))
    }

    #[test]
    fn nodes_publish_their_internal_ip_and_a_relist_drops_the_ones_gone() {
        let mut kube = KubeState::new(node());
        kube.publish();
        kube.on_node(watcher::Event::Apply(node_object("n1", "127.0.1.1")));
        kube.on_node(watcher::Event::Apply(node_object("n2", "fd00::2")));
        let state = kube.publish().expect("a new node is a change");
        assert_eq!(state.nodes.len(), 2);
        assert_eq!(
            state.nodes["n2"],
            "fd00::2".parse::<std::net::IpAddr>().unwrap()
        );
        // A bad address is reported and the last good one stays.
        let problem =
            NodeObject::from_wire(&node_object("n1", "n1.example").decode().unwrap()).unwrap_err();
        assert!(
            problem.starts_with("Node n1: status.addresses[0].address"),
            "{problem}"
        );
        kube.on_node(watcher::Event::Apply(node_object("n1", "n1.example")));
        assert_eq!(kube.publish(), None);
        kube.on_node(watcher::Event::Init);
        kube.on_node(watcher::Event::InitApply(node_object("n1", "127.0.1.1")));
        kube.on_node(watcher::Event::InitDone);
        let state = kube.publish().unwrap();
        assert_eq!(state.nodes.keys().map(|n| &**n).collect::<Vec<_>>(), ["n1"]);
        kube.on_node(watcher::Event::Delete(node_object("n1", "127.0.1.1")));
        assert!(kube.publish().unwrap().nodes.is_empty());
    }

    #[test]
    fn nodes_do_not_hold_back_the_first_publish() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(B);
        c.observe(Watched::Nodes, StoreChange::ListStarted, t0);
        listed(&mut c, t0);
        assert_eq!(c.deadline(), Some(t0));
    }

    #[test]
    fn events_map_to_store_changes() {
        let svc = Service::default();
        assert_eq!(
            store_change::<Service>(&watcher::Event::Init),
            StoreChange::ListStarted
        );
        assert_eq!(
            store_change(&watcher::Event::InitApply(svc.clone())),
            StoreChange::Buffered
        );
        assert_eq!(
            store_change::<Service>(&watcher::Event::InitDone),
            StoreChange::Listed
        );
        assert_eq!(
            store_change(&watcher::Event::Apply(svc.clone())),
            StoreChange::Changed
        );
        assert_eq!(
            store_change(&watcher::Event::Delete(svc)),
            StoreChange::Changed
        );
    }

    #[test]
    fn problems_are_reported_once() {
        let mut reported = BTreeSet::new();
        let first = vec!["a".to_string(), "b".to_string()];
        assert_eq!(new_problems(&reported, &first), vec!["a", "b"]);
        reported = first.into_iter().collect();
        let second = vec!["b".to_string(), "c".to_string()];
        assert_eq!(new_problems(&reported, &second), vec!["c"]);
    }

    #[tokio::test]
    async fn in_cluster_config_is_refused_outside_a_pod_with_a_hint() {
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
            return;
        }
        let Err(e) = client(None).await else {
            panic!("an in-cluster client outside a pod")
        };
        assert!(format!("{e:#}").contains("pass --kubeconfig"), "{e:#}");
    }

    #[tokio::test]
    async fn a_missing_kubeconfig_is_named_in_the_error() {
        let Err(e) = client(Some(Path::new("/nonexistent/kubeconfig"))).await else {
            panic!("a client from a missing kubeconfig")
        };
        assert!(
            format!("{e:#}").contains("/nonexistent/kubeconfig"),
            "{e:#}"
        );
    }

    #[tokio::test]
    async fn an_https_kubeconfig_builds_a_client() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             clusters: [{name: k, cluster: {server: 'https://127.0.0.1:6443', insecure-skip-tls-verify: true}}]\n\
             contexts: [{name: c, context: {cluster: k, user: u}}]\n\
             users: [{name: u, user: {token: t}}]\n",
        )
        .unwrap();
        if let Err(e) = client(Some(&path)).await {
            panic!("{e:#}")
        }
    }
}
