//! `--source file:PATH`: Services and EndpointSlices from a YAML file as
//! `kubectl get svc,endpointslices -A -o yaml` prints it (a `v1` `List`), or
//! as multi-document YAML of the objects themselves. Nodes may be listed
//! too: this node's Node gives its zone (`topology.kubernetes.io/zone`)
//! unless `--node-zone` does. The file is polled; a
//! valid change is published, an invalid one is reported and ignored so the
//! last good state stays applied.
//!
//! Parsing takes two passes over the text: the first reads every object's
//! `apiVersion`/`kind`, the second deserializes each object straight from the
//! text into its k8s-openapi type, so every error carries serde_yaml's line
//! and column.

use std::cell::Cell;
use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::{DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use tokio::sync::watch;

use crate::state::model::DesiredState;
use crate::state::topology::NodeTopology;
use crate::state::translate::{report_not_balanced, translate};

/// How often the file is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// The content is re-read and hashed at least this often even when size and
/// mtime look unchanged, since a same-size rewrite can land in the same
/// mtime tick.
const FORCED_REREAD: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
}

/// The node the agent balances for, as the command line gives it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeIdentity {
    pub name: String,
    /// `--node-zone`
    pub zone: Option<String>,
}

/// Parses the file's text; `origin` (the path) prefixes every error.
pub fn parse_objects(text: &str, origin: &str) -> Result<Objects> {
    let documents = read_headers(text).map_err(|e| located(origin, &e, None))?;
    let mut objects = Objects::default();
    let failing_item = Cell::new(None);
    for (document, shape) in serde_yaml::Deserializer::from_str(text).zip(&documents) {
        let parsed = match shape {
            Document::Empty => IgnoredAny::deserialize(document).map(|_| Vec::new()),
            Document::Object(header) => ObjectSeed(header).deserialize(document).map(|o| vec![o]),
            Document::List(items) => ListSeed {
                items,
                failing_item: &failing_item,
            }
            .deserialize(document),
        };
        match parsed {
            Ok(parsed) => {
                for object in parsed {
                    match object {
                        KubeObject::Service(s) => objects.services.push(*s),
                        KubeObject::EndpointSlice(s) => objects.slices.push(*s),
                        KubeObject::Node(n) => objects.nodes.push(*n),
                    }
                }
            }
            Err(e) => {
                let object = match shape {
                    Document::List(items) => failing_item.get().map(|i| &items[i]),
                    Document::Object(header) => Some(header),
                    Document::Empty => None,
                };
                return Err(located(origin, &e, object));
            }
        }
    }
    Ok(objects)
}

/// Problems listed in an error; each costs a parse to find its line.
const PROBLEMS_SHOWN: usize = 20;

/// Parses and translates the file's text. Any translation problem makes the
/// whole file invalid: a file is written by hand or by a script, and a
/// half-applied file would hide the mistake.
fn load_text(text: &str, path: &Path, node: &NodeIdentity) -> Result<DesiredState> {
    let origin = path.display().to_string();
    let objects = parse_objects(text, &origin)?;
    let labels = objects
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node.name.as_str()))
        .and_then(|n| n.metadata.labels.as_ref());
    let topology = NodeTopology::new(&node.name, node.zone.as_deref(), labels);
    let translation = translate(&objects.services, &objects.slices, &topology);
    let problems = &translation.problems;
    if problems.is_empty() {
        return Ok(translation.state);
    }
    let mut lines: Vec<String> = problems
        .iter()
        .take(PROBLEMS_SHOWN)
        .map(|p| match object_line(text, p) {
            Some(line) => format!("  {origin}:{line}: {p}"),
            None => format!("  {origin}: {p}"),
        })
        .collect();
    if problems.len() > PROBLEMS_SHOWN {
        lines.push(format!(
            "  and {} more problems",
            problems.len() - PROBLEMS_SHOWN
        ));
    }
    bail!("{origin} is not valid:\n{}", lines.join("\n"))
}

/// The file being followed, and what was last read from it.
pub struct FileSource {
    path: PathBuf,
    node: NodeIdentity,
    last: FileStamp,
    /// Services left to another proxy, as last logged.
    not_balanced: std::collections::BTreeMap<String, String>,
}

impl FileSource {
    /// Reads the file once; an unreadable or invalid file at start-up is an
    /// error, so a typo in `--source` fails before anything is touched.
    pub fn open(path: &Path, node: &NodeIdentity) -> Result<(FileSource, DesiredState)> {
        let mut last = FileStamp::read(path)?;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        last.content = Some(content_hash(&text));
        let state = load_text(&text, path, node)?;
        let mut not_balanced = Default::default();
        report_not_balanced(&mut not_balanced, &state);
        Ok((
            FileSource {
                path: path.to_path_buf(),
                node: node.clone(),
                last,
                not_balanced,
            },
            state,
        ))
    }

    /// Polls the file and publishes each valid new content; returns when
    /// nobody listens any more.
    pub async fn watch(mut self, states: watch::Sender<Option<DesiredState>>) -> Result<()> {
        let mut last_reported_error = None;
        let mut ticker = tokio::time::interval(POLL_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let outcome = match self.poll().await? {
                Poll::Unchanged => continue,
                Poll::Changed(state) => {
                    report_not_balanced(&mut self.not_balanced, &state);
                    tracing::info!(
                        file = %self.path.display(),
                        frontends = state.services.len(),
                        "file changed; applying it"
                    );
                    if states.send(Some(state)).is_err() {
                        return Ok(());
                    }
                    None
                }
                Poll::Invalid(message) => Some(message),
            };
            // Each distinct problem is logged once, not every poll.
            if outcome != last_reported_error {
                if let Some(message) = &outcome {
                    tracing::error!("{message}\nkeeping the last applied state");
                }
                last_reported_error = outcome;
            }
        }
    }

    async fn poll(&mut self) -> Result<Poll> {
        let stamp = match FileStamp::read(&self.path) {
            Ok(stamp) => stamp,
            // Editors replace files by rename: a moment without the file is
            // normal, and the last good state simply stays.
            Err(e) => return Ok(Poll::Invalid(format!("{e:#}"))),
        };
        if !self.last.differs(&stamp) {
            return Ok(Poll::Unchanged);
        }
        let path = self.path.clone();
        let node = self.node.clone();
        let previous = self.last.content;
        let (stamp, poll) = tokio::task::spawn_blocking(move || {
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) => {
                    return (
                        stamp,
                        Poll::Invalid(format!("reading {}: {e}", path.display())),
                    )
                }
            };
            let stamp = FileStamp {
                content: Some(content_hash(&text)),
                ..stamp
            };
            if stamp.content == previous {
                return (stamp, Poll::Unchanged);
            }
            let poll = match load_text(&text, &path, &node) {
                Ok(state) => Poll::Changed(state),
                Err(e) => Poll::Invalid(format!("{e:#}")),
            };
            (stamp, poll)
        })
        .await
        .context("file parser task failed")?;
        self.last = stamp;
        Ok(poll)
    }
}

enum Poll {
    Unchanged,
    Changed(DesiredState),
    Invalid(String),
}

/// What tells whether the file may have changed.
#[derive(Clone, Debug, PartialEq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
    checked_at: std::time::Instant,
    /// Hash of the content, once read.
    content: Option<u64>,
}

impl FileStamp {
    fn read(path: &Path) -> Result<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let meta =
            std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(FileStamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode: meta.ino(),
            checked_at: std::time::Instant::now(),
            content: None,
        })
    }

    /// `newer` is a fresh stat; true when the content needs reading.
    fn differs(&self, newer: &FileStamp) -> bool {
        self.modified != newer.modified
            || self.len != newer.len
            || self.inode != newer.inode
            || newer.checked_at.duration_since(self.checked_at) >= FORCED_REREAD
    }
}

fn content_hash(text: &str) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// The kind and identity of one object, known before it is deserialized.
#[derive(Debug)]
struct Header {
    api_version: String,
    kind: String,
    /// `namespace/name` when the object has a name.
    id: Option<String>,
}

impl fmt::Display for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.api_version, self.kind)?;
        if let Some(id) = &self.id {
            write!(f, " {id}")?;
        }
        Ok(())
    }
}

enum Document {
    Empty,
    Object(Header),
    List(Vec<Header>),
}

fn read_headers(text: &str) -> std::result::Result<Vec<Document>, serde_yaml::Error> {
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(document)?;
        let header = header_of(&value);
        documents.push(if value.is_null() {
            Document::Empty
        } else if header.api_version == "v1" && header.kind == "List" {
            let items = value.get("items").and_then(|i| i.as_sequence());
            Document::List(items.into_iter().flatten().map(header_of).collect())
        } else {
            Document::Object(header)
        });
    }
    Ok(documents)
}

fn header_of(value: &serde_yaml::Value) -> Header {
    let field = |v: Option<&serde_yaml::Value>| v.and_then(|v| v.as_str()).map(str::to_string);
    let meta = value.get("metadata");
    let name = field(meta.and_then(|m| m.get("name")));
    let namespace = field(meta.and_then(|m| m.get("namespace")));
    Header {
        api_version: field(value.get("apiVersion")).unwrap_or_default(),
        kind: field(value.get("kind")).unwrap_or_default(),
        id: name.map(|n| format!("{}/{n}", namespace.as_deref().unwrap_or("default"))),
    }
}

enum KubeObject {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<Node>),
}

struct ObjectSeed<'a>(&'a Header);

impl<'de> DeserializeSeed<'de> for ObjectSeed<'_> {
    type Value = KubeObject;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<KubeObject, D::Error> {
        match (self.0.api_version.as_str(), self.0.kind.as_str()) {
            ("v1", "Service") => Service::deserialize(d).map(|s| KubeObject::Service(Box::new(s))),
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                EndpointSlice::deserialize(d).map(|s| KubeObject::EndpointSlice(Box::new(s)))
            }
            ("v1", "Node") => Node::deserialize(d).map(|n| KubeObject::Node(Box::new(n))),
            ("", _) | (_, "") => d.deserialize_any(Reject(
                "not a Kubernetes object: apiVersion and kind are required".to_string(),
            )),
            _ => d.deserialize_any(Reject(
                "unsupported apiVersion/kind: only v1 Service, discovery.k8s.io/v1 \
                 EndpointSlice and v1 Node (as documents or in a v1 List) are understood"
                    .to_string(),
            )),
        }
    }
}

/// Fails at the value's position: serde_yaml attaches the line and column of
/// the node being visited to a custom error.
struct Reject(String);

impl<'de> Visitor<'de> for Reject {
    type Value = KubeObject;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<KubeObject, A::Error> {
        Err(serde::de::Error::custom(self.0))
    }
}

/// A `v1` `List`: every field but `items` is ignored.
struct ListSeed<'a> {
    items: &'a [Header],
    /// Index of the item being deserialized, left set when it fails.
    failing_item: &'a Cell<Option<usize>>,
}

impl<'de> DeserializeSeed<'de> for ListSeed<'_> {
    type Value = Vec<KubeObject>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Vec<KubeObject>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ListSeed<'_> {
    type Value = Vec<KubeObject>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a List")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<KubeObject>, A::Error> {
        let mut objects = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == "items" {
                objects = map.next_value_seed(ItemsSeed {
                    items: self.items,
                    failing_item: self.failing_item,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(objects)
    }
}

struct ItemsSeed<'a> {
    items: &'a [Header],
    failing_item: &'a Cell<Option<usize>>,
}

impl<'de> DeserializeSeed<'de> for ItemsSeed<'_> {
    type Value = Vec<KubeObject>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Vec<KubeObject>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ItemsSeed<'_> {
    type Value = Vec<KubeObject>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence of objects")
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Vec<KubeObject>, E> {
        Ok(Vec::new())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<KubeObject>, A::Error> {
        let mut objects = Vec::with_capacity(self.items.len());
        for (index, header) in self.items.iter().enumerate() {
            self.failing_item.set(Some(index));
            match seq.next_element_seed(ObjectSeed(header))? {
                Some(object) => objects.push(object),
                None => break,
            }
        }
        self.failing_item.set(None);
        Ok(objects)
    }
}

/// `origin:line:column: [apiVersion kind namespace/name: ]message`; the
/// message starts with serde_yaml's path, such as `items[3].spec.ports[0]`.
fn located(origin: &str, e: &serde_yaml::Error, object: Option<&Header>) -> anyhow::Error {
    let message = e.to_string();
    let (position, message) = match e.location() {
        Some(l) => (
            format!("{origin}:{}:{}", l.line(), l.column()),
            // serde_yaml appends the position it already gave us.
            message
                .rsplit_once(" at line ")
                .map_or(message.clone(), |(m, _)| m.to_string()),
        ),
        None => (origin.to_string(), message),
    };
    match object {
        Some(header) if !header.kind.is_empty() => anyhow!("{position}: {header}: {message}"),
        _ => anyhow!("{position}: {message}"),
    }
}

/// The line where the object a translation problem names starts: problems
/// begin with `Service ns/name` or `EndpointSlice ns/name`.
fn object_line(text: &str, problem: &str) -> Option<usize> {
    let documents = read_headers(text).ok()?;
    let mut target = None;
    'find: for (doc_index, document) in documents.iter().enumerate() {
        let headers: Vec<(Option<usize>, &Header)> = match document {
            Document::Empty => Vec::new(),
            Document::Object(h) => vec![(None, h)],
            Document::List(items) => items
                .iter()
                .enumerate()
                .map(|(i, h)| (Some(i), h))
                .collect(),
        };
        for (item, header) in headers {
            let Some(id) = &header.id else { continue };
            let named = format!("{} {id}", header.kind);
            if problem
                .strip_prefix(&named)
                .is_some_and(|rest| rest.starts_with(':') || rest.starts_with(' '))
            {
                target = Some((doc_index, item));
                break 'find;
            }
        }
    }
    let (doc_index, item) = target?;
    // Deserializing the object with a visitor that always fails makes
    // serde_yaml report where the object starts.
    let document = serde_yaml::Deserializer::from_str(text).nth(doc_index)?;
    let result = match item {
        None => document.deserialize_any(Reject(String::new())).map(|_| ()),
        Some(index) => document.deserialize_map(LocateItem(index)).map(|_| ()),
    };
    result.err()?.location().map(|l| l.line())
}

/// Skips to item `.0` of a List's `items` and fails there.
struct LocateItem(usize);

impl<'de> Visitor<'de> for LocateItem {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a List")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            if key == "items" {
                return map.next_value_seed(self);
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        for _ in 0..self.0 {
            seq.next_element::<IgnoredAny>()?;
        }
        seq.next_element_seed(ObjectSeed(&Header {
            api_version: String::new(),
            kind: String::new(),
            id: None,
        }))?;
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for LocateItem {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::model::EndpointCondition;
    use grpclb_common::{Addr, Backend, ServiceKey};
    use std::net::Ipv6Addr;

    const LIST: &str = include_str!("../../tests/fixtures/kubectl-list.yaml");
    const MULTI: &str = include_str!("../../tests/fixtures/multi-document.yaml");

    fn node() -> NodeIdentity {
        NodeIdentity {
            name: "n1".into(),
            zone: None,
        }
    }

    fn key4(a: [u8; 4], port: u16) -> ServiceKey {
        ServiceKey::new(Addr::from_v4(a), port)
    }

    fn err(text: &str) -> String {
        format!(
            "{:#}",
            load_text(text, Path::new("svc.yaml"), &node()).unwrap_err()
        )
    }

    #[test]
    fn kubectl_list_output_loads() {
        let state = load_text(LIST, Path::new("list.yaml"), &node()).unwrap();
        let names: Vec<(&ServiceKey, &str)> = state
            .services
            .iter()
            .map(|(k, s)| (k, s.name.as_str()))
            .collect();
        let v6 = ServiceKey::new(
            Addr("fd00:10:96::20".parse::<Ipv6Addr>().unwrap().octets()),
            8080,
        );
        assert_eq!(
            names,
            vec![
                (&key4([10, 96, 0, 10], 50051), "apps/echo:grpc"),
                (&key4([10, 96, 0, 20], 8080), "apps/dual:8080"),
                (&v6, "apps/dual:8080"),
            ]
        );
        let echo = &state.services[&key4([10, 96, 0, 10], 50051)];
        let got: Vec<(Backend, EndpointCondition, Option<&str>)> = echo
            .endpoints
            .iter()
            .map(|e| (e.backend, e.condition, e.node_name.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    Backend::new(Addr::from_v4([10, 244, 1, 5]), 8443),
                    EndpointCondition::Ready,
                    Some("node-a")
                ),
                (
                    Backend::new(Addr::from_v4([10, 244, 2, 7]), 8443),
                    EndpointCondition::Ready,
                    Some("node-b")
                ),
                (
                    Backend::new(Addr::from_v4([10, 244, 2, 9]), 8443),
                    EndpointCondition::Draining,
                    Some("node-b")
                ),
            ]
        );
        let dual6 = &state.services[&v6];
        assert_eq!(
            dual6.eligible(),
            vec![Backend::new(
                Addr("fd00:10:244:1::8".parse::<Ipv6Addr>().unwrap().octets()),
                8080
            )]
        );
    }

    #[test]
    fn multi_document_yaml_means_the_same_as_the_list() {
        let list = parse_objects(LIST, "list.yaml").unwrap();
        let multi = parse_objects(MULTI, "multi.yaml").unwrap();
        assert_eq!(list.services.len(), 3);
        assert_eq!(list.slices.len(), 4);
        assert_eq!(list, multi);
    }

    #[test]
    fn empty_documents_and_empty_lists_are_fine() {
        assert_eq!(parse_objects("", "f").unwrap(), Objects::default());
        assert_eq!(
            parse_objects("---\n---\n", "f").unwrap(),
            Objects::default()
        );
        let empty_list =
            "apiVersion: v1\nkind: List\nitems: []\nmetadata:\n  resourceVersion: \"\"\n";
        assert_eq!(parse_objects(empty_list, "f").unwrap(), Objects::default());
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let e = err("apiVersion: v1\nkind: Service\nmetadata:\n  name: [oops\n");
        assert!(e.starts_with("svc.yaml:5:"), "{e}");
    }

    #[test]
    fn bad_field_in_a_list_item_names_line_item_and_object() {
        let text = LIST.replacen("port: 50051", "port: fifty", 1);
        let e = err(&text);
        let line = LIST
            .lines()
            .position(|l| l.contains("port: 50051"))
            .unwrap()
            + 1;
        assert!(
            e.starts_with(&format!("svc.yaml:{line}:")),
            "expected line {line}: {e}"
        );
        assert!(
            e.contains("v1 Service apps/echo: items[0].spec.ports[0].port:"),
            "{e}"
        );
        assert!(e.contains("invalid type: string \"fifty\""), "{e}");
        assert!(!e.contains(" at line "), "position given twice: {e}");
    }

    #[test]
    fn unknown_kind_in_a_list_is_named_with_its_line() {
        let text = LIST.replacen(
            "- addressType: IPv4\n  apiVersion: discovery.k8s.io/v1",
            "- apiVersion: v1\n  kind: ConfigMap\n  metadata:\n    name: cfg\n    namespace: apps\n- addressType: IPv4\n  apiVersion: discovery.k8s.io/v1",
            1,
        );
        let line = text
            .lines()
            .position(|l| l.contains("kind: ConfigMap"))
            .unwrap();
        let e = err(&text);
        assert!(
            e.starts_with(&format!("svc.yaml:{line}:")),
            "expected line {line}: {e}"
        );
        assert!(
            e.contains("v1 ConfigMap apps/cfg: items[3]: unsupported apiVersion/kind"),
            "{e}"
        );
    }

    #[test]
    fn unknown_api_version_in_a_document_is_named() {
        let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n---\napiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata:\n  name: b\n  namespace: x\n";
        let e = err(text);
        assert!(e.starts_with("svc.yaml:6:"), "{e}");
        assert!(
            e.contains("discovery.k8s.io/v1beta1 EndpointSlice x/b: unsupported apiVersion/kind"),
            "{e}"
        );
    }

    #[test]
    fn a_document_that_is_not_an_object_is_an_error() {
        let e = err("apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n---\njust text\n");
        assert!(e.starts_with("svc.yaml:6:"), "{e}");
        assert!(e.contains("apiVersion and kind are required"), "{e}");
    }

    #[test]
    fn wrong_family_address_is_an_error_at_the_slices_line() {
        let text = LIST.replacen("- 10.244.2.7", "- fd00::7", 1);
        let e = err(&text);
        let line = text
            .lines()
            .position(|l| l.contains("- addressType: IPv4"))
            .unwrap()
            + 1;
        let slice_start = format!(
            "svc.yaml:{}: EndpointSlice apps/echo-x7k2p: address fd00::7",
            line
        );
        // The object starts at its first key, on the `- ` line.
        assert!(e.contains(&slice_start), "{e}");
        assert!(e.starts_with("svc.yaml is not valid:"), "{e}");
    }

    #[test]
    fn problems_in_separate_documents_carry_their_line() {
        let text = MULTI.replacen("- 10.244.1.8", "- not-an-ip", 1);
        let e = err(&text);
        let doc_line = text
            .lines()
            .enumerate()
            .filter(|(_, l)| *l == "addressType: IPv4")
            .map(|(i, _)| i + 1)
            .nth(1)
            .unwrap();
        assert!(
            e.contains(&format!(
                "svc.yaml:{doc_line}: EndpointSlice apps/dual-4qv9s: address \"not-an-ip\""
            )),
            "{e}"
        );
    }

    #[test]
    fn long_problem_lists_are_cut_short() {
        let bad: Vec<String> = (0..25).map(|i| format!("    - 10.0.{i}.x")).collect();
        let text = LIST.replacen("    - 10.244.2.7", &bad.join("\n"), 1);
        let e = err(&text);
        assert_eq!(
            e.matches("is not an IP address").count(),
            PROBLEMS_SHOWN,
            "{e}"
        );
        assert!(e.ends_with("and 5 more problems"), "{e}");
    }

    #[tokio::test]
    async fn watch_applies_changes_and_keeps_the_last_good_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("services.yaml");
        std::fs::write(&path, LIST).unwrap();
        let (source, initial) = FileSource::open(&path, &node()).unwrap();
        assert_eq!(initial.services.len(), 3);
        let (tx, mut rx) = watch::channel(Some(initial));
        let task = tokio::spawn(source.watch(tx));

        // Rename-replace, as editors do, moving the echo Service away from
        // its slice.
        let without_echo = LIST.replacen(
            "name: echo\n    namespace: apps",
            "name: echo\n    namespace: other",
            1,
        );
        let tmp = dir.path().join(".services.yaml.swp");
        std::fs::write(&tmp, &without_echo).unwrap();
        let written = std::time::Instant::now();
        std::fs::rename(&tmp, &path).unwrap();
        tokio::time::timeout(Duration::from_secs(1), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert!(written.elapsed() < Duration::from_secs(1));
        let state = rx.borrow_and_update().clone().unwrap();
        let echo = &state.services[&key4([10, 96, 0, 10], 50051)];
        assert_eq!(echo.name, "other/echo:grpc");
        assert!(
            echo.endpoints.is_empty(),
            "the slice in apps no longer joins it"
        );

        // An invalid file publishes nothing.
        std::fs::write(&path, "apiVersion: v1\nkind: Service\nmetadata: [\n").unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(700), rx.changed())
                .await
                .is_err()
        );

        // Restoring a valid file publishes again.
        std::fs::write(&path, LIST).unwrap();
        tokio::time::timeout(Duration::from_secs(1), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow_and_update().as_ref().unwrap().services.len(), 3);

        drop(rx);
        task.abort();
    }

    #[test]
    fn open_fails_on_an_invalid_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, "kind: Pod\napiVersion: v1\n").unwrap();
        let e = format!("{:#}", FileSource::open(&path, &node()).err().unwrap());
        assert!(
            e.contains("bad.yaml:1:1: v1 Pod: unsupported apiVersion/kind"),
            "{e}"
        );
        let missing = format!(
            "{:#}",
            FileSource::open(&dir.path().join("nope.yaml"), &node())
                .err()
                .unwrap()
        );
        assert!(missing.contains("nope.yaml"), "{missing}");
    }

    #[test]
    fn this_nodes_zone_comes_from_its_node_item_unless_the_flag_gives_one() {
        let text = r#"
apiVersion: v1
kind: Node
metadata: {name: n1, labels: {topology.kubernetes.io/zone: z1}}
---
apiVersion: v1
kind: Node
metadata: {name: n2, labels: {topology.kubernetes.io/zone: z2}}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: apps}
spec:
  clusterIP: 10.96.0.10
  trafficDistribution: PreferSameZone
  ports: [{name: grpc, port: 50051, appProtocol: grpc}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo-1, namespace: apps, labels: {kubernetes.io/service-name: echo}}
addressType: IPv4
ports: [{name: grpc, port: 8443}]
endpoints:
- {addresses: [10.0.0.1], nodeName: n1, zone: z1, hints: {forZones: [{name: z1}]}}
- {addresses: [10.0.0.2], nodeName: n2, zone: z2, hints: {forZones: [{name: z2}]}}
"#;
        let rule = |node: NodeIdentity| {
            let state = load_text(text, Path::new("zones.yaml"), &node).unwrap();
            state.services[&key4([10, 96, 0, 10], 50051)]
                .rule
                .to_string()
        };
        assert_eq!(rule(node()), "zone hints z1");
        let flagged = NodeIdentity {
            zone: Some("z2".into()),
            ..node()
        };
        assert_eq!(rule(flagged), "zone hints z2");
        let unlisted = NodeIdentity {
            name: "n9".into(),
            zone: None,
        };
        assert_eq!(rule(unlisted), "ready");
    }
}
