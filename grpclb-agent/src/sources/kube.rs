//! `--source kube`: Services and EndpointSlices of all namespaces, watched
//! through the Kubernetes API with reflector stores, translated by the same
//! [`translate`] as the file source and published as complete
//! [`DesiredState`]s.
//!
//! - The agent's own Node is read once at start for its zone (topology
//!   hints); `--node-zone` overrides it.
//!
//! - Nothing is published until both kinds have completed their first list,
//!   so a restarted agent never prunes live services from a partial view.
//! - Errors are retried with exponential backoff; the stores (and so the
//!   maps) keep their last state meanwhile.
//! - An expired watch (410 Gone) relists; the reflector swaps in the new list
//!   only when it is complete, so services that still exist never vanish.
//! - Bursts of events are coalesced ([`Coalescer`]): one translate and one
//!   publish for many events.

use std::collections::BTreeSet;
use std::path::Path;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::Resource as _;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Config, Resource, ResourceExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::observe::metrics::{Metrics, Watched};
use crate::state::model::DesiredState;
use crate::state::topology::NodeTopology;
use crate::state::translate::{report_not_balanced, translate};

/// Publish after this long without further events.
pub const QUIET: Duration = Duration::from_millis(100);
/// ... but no later than this after the first unpublished change, so a
/// steady trickle of events cannot postpone publishing forever.
pub const MAX_DELAY: Duration = Duration::from_secs(1);

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
        // Its own Node, for the zone label.
        (Node::GROUP, Node::URL_PATH_SEGMENT, &["get"]),
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

/// How a watcher event changes the store it feeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreChange {
    /// A (re)list started; the store keeps its contents until it completes.
    ListStarted,
    /// Listed objects are buffered, not yet in the store.
    Buffered,
    /// The store now holds a complete list.
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

/// Decides when the stores are translated and published: never before both
/// kinds are listed; then once events pause for `quiet`, or `max_delay`
/// after the first unpublished change, whichever comes first.
#[derive(Clone, Debug)]
pub struct Coalescer {
    quiet: Duration,
    max_delay: Duration,
    services_listed: bool,
    slices_listed: bool,
    first_unpublished: Option<Instant>,
    last_change: Option<Instant>,
}

impl Coalescer {
    pub fn new(quiet: Duration, max_delay: Duration) -> Self {
        Coalescer {
            quiet,
            max_delay,
            services_listed: false,
            slices_listed: false,
            first_unpublished: None,
            last_change: None,
        }
    }

    pub fn observe(&mut self, kind: Watched, change: StoreChange, now: Instant) {
        match change {
            StoreChange::ListStarted | StoreChange::Buffered => return,
            StoreChange::Listed => match kind {
                Watched::Services => self.services_listed = true,
                Watched::EndpointSlices => self.slices_listed = true,
            },
            StoreChange::Changed => {}
        }
        self.first_unpublished.get_or_insert(now);
        self.last_change = Some(now);
    }

    /// Both kinds have been listed once: the stores are a complete view.
    pub fn complete(&self) -> bool {
        self.services_listed && self.slices_listed
    }

    /// When to publish; `None` while there is nothing (allowed) to publish.
    pub fn deadline(&self) -> Option<Instant> {
        if !self.complete() {
            return None;
        }
        let first = self.first_unpublished?;
        let last = self.last_change?;
        Some((last + self.quiet).min(first + self.max_delay))
    }

    pub fn published(&mut self) {
        self.first_unpublished = None;
        self.last_change = None;
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
        let (services, services_writer) = reflector::store::<Service>();
        let (slices, slices_writer) = reflector::store::<EndpointSlice>();
        let mut services_events = pin!(reflector::reflector(
            services_writer,
            watcher(
                Api::<Service>::all(self.client.clone()),
                watcher::Config::default()
            )
            .modify(|s| s.managed_fields_mut().clear())
            .default_backoff(),
        ));
        let mut slices_events = pin!(reflector::reflector(
            slices_writer,
            watcher(
                Api::<EndpointSlice>::all(self.client.clone()),
                watcher::Config::default()
            )
            .modify(|s| s.managed_fields_mut().clear())
            .default_backoff(),
        ));
        let mut coalescer = Coalescer::new(QUIET, MAX_DELAY);
        let mut reported = BTreeSet::new();
        let mut not_balanced = Default::default();
        tracing::info!(
            "watching Services and EndpointSlices in all namespaces; \
             the maps are not changed until both are listed"
        );
        loop {
            let deadline = coalescer.deadline();
            tokio::select! {
                event = services_events.next() => {
                    let Some(event) = event else { bail!("the Service watch ended") };
                    self.observe(Watched::Services, event, &services, &mut coalescer);
                }
                event = slices_events.next() => {
                    let Some(event) = event else { bail!("the EndpointSlice watch ended") };
                    self.observe(Watched::EndpointSlices, event, &slices, &mut coalescer);
                }
                () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    coalescer.published();
                    self.publish(&services, &slices, &states, &mut reported, &mut not_balanced);
                }
            }
        }
    }

    fn observe<K>(
        &self,
        kind: Watched,
        event: Result<watcher::Event<K>, watcher::Error>,
        store: &Store<K>,
        coalescer: &mut Coalescer,
    ) where
        K: Resource + Clone + 'static,
        K::DynamicType: Eq + std::hash::Hash + Clone,
    {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                self.metrics.record_watch_error(kind);
                tracing::warn!(
                    "watching {} failed, retrying with backoff; the maps keep their last state: {e}",
                    kind.label()
                );
                return;
            }
        };
        let change = store_change(&event);
        match change {
            StoreChange::Listed => {
                self.metrics.record_list(kind, store.len());
                tracing::info!("listed {} {}", store.len(), kind.label());
            }
            StoreChange::ListStarted => tracing::debug!("listing {}", kind.label()),
            StoreChange::Changed => self.metrics.record_objects(kind, store.len()),
            StoreChange::Buffered => {}
        }
        coalescer.observe(kind, change, Instant::now());
    }

    fn publish(
        &self,
        services: &Store<Service>,
        slices: &Store<EndpointSlice>,
        states: &watch::Sender<Option<DesiredState>>,
        reported: &mut BTreeSet<String>,
        not_balanced: &mut std::collections::BTreeMap<String, String>,
    ) {
        let services: Vec<Service> = services.state().iter().map(|s| (**s).clone()).collect();
        let slices: Vec<EndpointSlice> = slices.state().iter().map(|s| (**s).clone()).collect();
        let translation = translate(&services, &slices, &self.node);
        for problem in new_problems(reported, &translation.problems) {
            tracing::warn!("ignoring: {problem}");
        }
        *reported = translation.problems.into_iter().collect();
        let state = translation.state;
        report_not_balanced(not_balanced, &state);
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

#[cfg(test)]
mod tests {
    use super::*;

    const Q: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(1);

    fn ms(start: Instant, n: u64) -> Instant {
        start + Duration::from_millis(n)
    }

    #[test]
    fn nothing_is_published_until_both_kinds_are_listed() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(Q, MAX);
        c.observe(Watched::Services, StoreChange::ListStarted, t0);
        c.observe(Watched::Services, StoreChange::Buffered, t0);
        c.observe(Watched::Services, StoreChange::Listed, ms(t0, 5));
        assert_eq!(c.deadline(), None, "slices not listed yet");
        c.observe(Watched::Services, StoreChange::Changed, ms(t0, 500));
        assert_eq!(c.deadline(), None);
        c.observe(Watched::EndpointSlices, StoreChange::Listed, ms(t0, 2000));
        assert!(c.complete());
        // The first unpublished change was at 5 ms: its max delay has passed.
        assert_eq!(c.deadline(), Some(ms(t0, 1005)));
    }

    #[test]
    fn a_burst_is_published_once_after_it_pauses() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(Q, MAX);
        c.observe(Watched::Services, StoreChange::Listed, t0);
        c.observe(Watched::EndpointSlices, StoreChange::Listed, t0);
        assert_eq!(c.deadline(), Some(ms(t0, 100)));
        c.published();
        assert_eq!(c.deadline(), None, "nothing new");
        for i in 0..5 {
            c.observe(
                Watched::EndpointSlices,
                StoreChange::Changed,
                ms(t0, 1000 + i * 20),
            );
        }
        assert_eq!(c.deadline(), Some(ms(t0, 1180)));
        c.published();
        assert_eq!(c.deadline(), None);
    }

    #[test]
    fn a_steady_trickle_is_published_at_the_max_delay() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(Q, MAX);
        c.observe(Watched::Services, StoreChange::Listed, t0);
        c.observe(Watched::EndpointSlices, StoreChange::Listed, t0);
        c.published();
        for i in 0..30 {
            c.observe(
                Watched::Services,
                StoreChange::Changed,
                ms(t0, 5000 + i * 50),
            );
        }
        assert_eq!(c.deadline(), Some(ms(t0, 6000)));
    }

    #[test]
    fn a_relist_changes_nothing_until_it_completes() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(Q, MAX);
        c.observe(Watched::Services, StoreChange::Listed, t0);
        c.observe(Watched::EndpointSlices, StoreChange::Listed, t0);
        c.published();
        c.observe(Watched::Services, StoreChange::ListStarted, ms(t0, 10));
        c.observe(Watched::Services, StoreChange::Buffered, ms(t0, 11));
        assert_eq!(c.deadline(), None);
        c.observe(Watched::Services, StoreChange::Listed, ms(t0, 12));
        assert_eq!(c.deadline(), Some(ms(t0, 112)));
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
