//! `--source file:PATH`: Services and EndpointSlices from a YAML file as
//! `kubectl get svc,endpointslices -A -o yaml` prints it (a `v1` `List`), or
//! as multi-document YAML of the objects themselves. Nodes may be listed
//! too: this node's Node gives its zone (`topology.kubernetes.io/zone`)
//! unless `--node-zone` does. A valid change is published, an invalid one is
//! reported and ignored so the last good state stays applied.
//!
//! - The file's directory is watched (inotify), so writes, editors'
//!   rename-replace and ConfigMap symlink swaps are seen at once; a stat
//!   every [`STAT_INTERVAL`] catches anything missed. Nothing is read while
//!   nothing changes.
//! - A changed file is split into its YAML documents (`---` lines), and only
//!   documents not seen before are parsed; the objects of documents that
//!   went are removed. Rewriting a large multi-document file with one object
//!   changed costs a read and hash of the file and one document's parse. A
//!   `v1` `List` is one document, parsed whole when anything in it changes.
//! - Each object is deserialized once, straight from the text into the
//!   fields grpclb reads ([`ObjectWire`]), so every error carries the line,
//!   column and field path of the mistake.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context, Result};
use serde::Deserialize;
use serde_saphyr::Spanned;
use tokio::sync::{mpsc, watch};
use xxhash_rust::xxh3::xxh3_64;

use crate::state::model::DesiredState;
use crate::state::objects::{
    EndpointWire, MetaWire, NodeObject, NodeStatusWire, ObjectWire, ServiceObject, ServiceSpecWire,
    SliceObject, SlicePortWire,
};
use crate::state::topology::NodeTopology;
use crate::state::translate::{report_not_balanced, Cluster};

/// How often the file is stat-ed in case a change notification was missed
/// (or inotify is unavailable): a stat only, the file is read when its
/// size, mtime or inode changed.
pub const STAT_INTERVAL: Duration = Duration::from_secs(5);
/// A write seen half-done is retried when another change follows within
/// this long, before it is reported as invalid.
const SETTLE: Duration = Duration::from_millis(100);

/// The node the agent balances for, as the command line gives it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeIdentity {
    pub name: String,
    /// `--node-zone`
    pub zone: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }
}

/// One object of a document: what identifies it, and where it starts.
#[derive(Clone, Debug)]
struct Placed {
    kind: Kind,
    /// `namespace/name` (Nodes: name).
    id: Arc<str>,
    /// Line in the document.
    line: u32,
}

/// A parsed object, before it goes into the cluster.
enum Parsed {
    Service(ServiceObject),
    Slice(SliceObject),
    Node(NodeObject),
}

/// What a document held, by its content hash.
#[derive(Debug, Default)]
struct DocumentEntry {
    /// Boxed slices: kept for as long as the document is in the file, so
    /// without spare room (most documents hold one object and no Node).
    objects: Box<[Placed]>,
    nodes: Box<[NodeObject]>,
}

/// A document of the file: where it is, and the hash of its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Document {
    start: usize,
    end: usize,
    hash: u64,
}

/// A document's text with its first line in the file, to parse.
struct DocumentText<'a> {
    text: &'a str,
    first_line: usize,
}

/// Splits the file at `---` lines; documents with nothing but blanks and
/// comments are dropped.
///
/// Runs over the whole file on every change, so it looks only where a
/// separator can start (the file's start and after each `\n---`, found by
/// a SIMD substring search), counts no lines (only the documents parsed
/// need their line: [`Lines`]) and hashes with xxh3: at 100,000 endpoints,
/// about 3 ms, most of it the hash.
fn documents(text: &[u8]) -> Vec<Document> {
    let mut documents = Vec::new();
    let mut push = |start: usize, end: usize| {
        let bytes = &text[start..end];
        let has_content = bytes.split(|&b| b == b'\n').any(|l| {
            let l = l.trim_ascii();
            !l.is_empty() && !l.starts_with(b"#") && l != b"..."
        });
        if has_content {
            documents.push(Document {
                start,
                end,
                hash: xxh3_64(bytes),
            });
        }
    };
    let line_starts = text
        .starts_with(b"---")
        .then_some(0)
        .into_iter()
        .chain(memchr::memmem::find_iter(text, b"\n---").map(|at| at + 1));
    // The document being read starts at `start`.
    let mut start = 0;
    for at in line_starts {
        let line_end = memchr::memchr(b'\n', &text[at..]).map_or(text.len(), |n| at + n);
        let bare = text[at..line_end].trim_ascii_end();
        if bare != b"---" && !bare.starts_with(b"--- ") {
            continue;
        }
        push(start, at);
        start = (line_end + 1).min(text.len());
    }
    push(start, text.len());
    documents
}

/// Line numbers of byte offsets, for offsets asked in increasing order:
/// one pass over the file at most, and none past the last offset asked.
struct Lines<'a> {
    text: &'a [u8],
    at: usize,
    line: usize,
}

impl<'a> Lines<'a> {
    fn new(text: &'a [u8]) -> Lines<'a> {
        Lines {
            text,
            at: 0,
            line: 1,
        }
    }

    /// The 1-based line of `offset`; counts from the start again if asked
    /// for an earlier one.
    fn line_at(&mut self, offset: usize) -> usize {
        if offset < self.at {
            *self = Lines::new(self.text);
        }
        self.line += count_newlines(&self.text[self.at..offset]);
        self.at = offset;
        self.line
    }
}

/// Counts in bytes, 255 at a time, so the compiler keeps a byte per lane
/// (16 or 32 per step) instead of widening each to a usize.
fn count_newlines(bytes: &[u8]) -> usize {
    bytes
        .chunks(255)
        .map(|chunk| usize::from(chunk.iter().fold(0u8, |n, &b| n + u8::from(b == b'\n'))))
        .sum()
}

/// A map keyed by document hashes, which are xxh3 already: hashing them
/// again (SipHash) cost milliseconds per change over 20,000 documents.
type ByHash<V> = HashMap<u64, V, std::hash::BuildHasherDefault<HashIsKey>>;

/// The hasher of [`ByHash`]: the key, an xxh3 hash, is the hash.
#[derive(Default)]
struct HashIsKey(u64);

impl std::hash::Hasher for HashIsKey {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed (write_u64); anything else still spreads.
        self.0 = xxh3_64(bytes);
    }

    fn write_u64(&mut self, key: u64) {
        self.0 = key;
    }
}

/// A document as written: one object, or a `v1` `List` of them.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DocumentWire {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<MetaWire>,
    spec: Option<ServiceSpecWire>,
    address_type: Option<String>,
    endpoints: Option<Vec<EndpointWire>>,
    ports: Option<Vec<SlicePortWire>>,
    status: Option<NodeStatusWire>,
    items: Option<Vec<Spanned<ObjectWire>>>,
}

impl DocumentWire {
    fn is_list(&self) -> bool {
        self.api_version.as_deref() == Some("v1") && self.kind.as_deref() == Some("List")
    }

    fn into_object(self) -> ObjectWire {
        ObjectWire {
            api_version: self.api_version,
            kind: self.kind,
            metadata: self.metadata,
            spec: self.spec,
            address_type: self.address_type,
            endpoints: self.endpoints,
            ports: self.ports,
            status: self.status,
        }
    }
}

/// Just what names the objects of a document, for errors in the rest.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HeaderWire {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<NameWire>,
    items: Option<Vec<Spanned<HeaderItemWire>>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HeaderItemWire {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<NameWire>,
}

#[derive(Deserialize)]
struct NameWire {
    name: Option<String>,
    namespace: Option<String>,
}

/// `apiVersion kind [namespace/name]`, as errors name an object.
fn header(api_version: Option<&str>, kind: Option<&str>, meta: Option<&NameWire>) -> String {
    let mut header = format!("{} {}", api_version.unwrap_or(""), kind.unwrap_or(""));
    if let Some(name) = meta.and_then(|m| m.name.as_deref()) {
        let namespace = meta.and_then(|m| m.namespace.as_deref());
        header.push_str(&format!(" {}/{name}", namespace.unwrap_or("default")));
    }
    header
}

const UNSUPPORTED: &str = "unsupported apiVersion/kind: only v1 Service, discovery.k8s.io/v1 \
     EndpointSlice and v1 Node (as documents or in a v1 List) are understood";
const NOT_AN_OBJECT: &str = "not a Kubernetes object: apiVersion and kind are required";

fn saphyr_options() -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    options.with_snippet = false;
    // The parser's default budget is for untrusted input: it refuses a
    // document of more than 250,000 nodes, which a `kubectl get -o yaml`
    // List of a few thousand Services already is. The file is the
    // operator's and is in memory whole, so size is no attack; the limits
    // on aliases and anchors (expansion bombs) stay.
    let mut budget = serde_saphyr::budget::Budget::default();
    budget.max_events = usize::MAX;
    budget.max_nodes = usize::MAX;
    budget.max_total_scalar_bytes = usize::MAX;
    options.budget = Some(budget);
    options
}

/// Parses one document; errors are `line:column: [object: ][path: ]message`
/// with lines of the file.
fn parse_document(doc: &DocumentText) -> std::result::Result<(DocumentEntry, Vec<Parsed>), String> {
    let mut path = String::new();
    let parsed =
        serde_saphyr::with_deserializer_from_str_with_options(doc.text, saphyr_options(), |de| {
            serde_path_to_error::deserialize::<_, DocumentWire>(de).map_err(|e| {
                path = e.path().to_string();
                e.into_inner()
            })
        });
    let wire = match parsed {
        Ok(wire) => wire,
        Err(e) => return Err(document_error(doc, &e, &path)),
    };
    let line_of = |rel: usize| doc.first_line + rel.saturating_sub(1);
    let mut entry = EntryParts::default();
    let mut parsed = Vec::new();
    if wire.is_list() {
        for (index, item) in wire.items.into_iter().flatten().enumerate() {
            let (line, column) = (
                item.referenced.line() as usize,
                item.referenced.column() as usize,
            );
            let object = item.value;
            let named = header(
                object.api_version.as_deref(),
                object.kind.as_deref(),
                object
                    .metadata
                    .as_ref()
                    .map(|m| NameWire {
                        name: m.name.clone(),
                        namespace: m.namespace.clone(),
                    })
                    .as_ref(),
            );
            add_object(object, line, &mut entry, &mut parsed).map_err(|message| {
                format!(
                    "{}:{column}: {named}: items[{index}]: {message}",
                    line_of(line)
                )
            })?;
        }
    } else {
        let line = doc
            .text
            .lines()
            .position(|l| {
                let l = l.trim_start();
                !l.is_empty() && !l.starts_with('#')
            })
            .unwrap_or(0)
            + 1;
        let object = wire.into_object();
        let named = header(
            object.api_version.as_deref(),
            object.kind.as_deref(),
            object
                .metadata
                .as_ref()
                .map(|m| NameWire {
                    name: m.name.clone(),
                    namespace: m.namespace.clone(),
                })
                .as_ref(),
        );
        add_object(object, line, &mut entry, &mut parsed)
            .map_err(|message| format!("{}:1: {named}: {message}", line_of(line)))?;
    }
    let entry = DocumentEntry {
        objects: entry.objects.into(),
        nodes: entry.nodes.into(),
    };
    Ok((entry, parsed))
}

/// A [`DocumentEntry`] being filled.
#[derive(Default)]
struct EntryParts {
    objects: Vec<Placed>,
    nodes: Vec<NodeObject>,
}

/// Turns one object into its compact form; the error is the message only.
fn add_object(
    object: ObjectWire,
    line: usize,
    entry: &mut EntryParts,
    parsed: &mut Vec<Parsed>,
) -> std::result::Result<(), String> {
    let (kind, item) = match (object.api_version.as_deref(), object.kind.as_deref()) {
        (Some("v1"), Some("Service")) => (
            Kind::Service,
            Parsed::Service(ServiceObject::from_wire(object)?),
        ),
        (Some("discovery.k8s.io/v1"), Some("EndpointSlice")) => (
            Kind::EndpointSlice,
            Parsed::Slice(SliceObject::from_wire(object)?),
        ),
        (Some("v1"), Some("Node")) => (Kind::Node, Parsed::Node(NodeObject::from_wire(&object)?)),
        (None | Some(""), _) | (_, None | Some("")) => return Err(NOT_AN_OBJECT.to_string()),
        _ => return Err(UNSUPPORTED.to_string()),
    };
    let id: Arc<str> = match &item {
        Parsed::Service(s) => s.id.as_str().into(),
        Parsed::Slice(s) => s.id.as_str().into(),
        Parsed::Node(node) => {
            entry.nodes.push(node.clone());
            node.name.as_str().into()
        }
    };
    let line = u32::try_from(line).unwrap_or(u32::MAX);
    entry.objects.push(Placed { kind, id, line });
    parsed.push(item);
    Ok(())
}

/// A parse error of a document, naming the object it is in (read again
/// leniently for its name) and the field path.
fn document_error(doc: &DocumentText, e: &serde_saphyr::Error, path: &str) -> String {
    let e = e.without_snippet();
    let (line, column) = e
        .location()
        .map_or((1, 1), |l| (l.line() as usize, l.column() as usize));
    let position = format!("{}:{column}", doc.first_line + line.saturating_sub(1));
    let message = plain_message(e);
    if path.is_empty() || path == "." {
        // The document itself is not a mapping.
        if message.contains("invalid type") || message.contains("expected mapping") {
            return format!("{position}: {NOT_AN_OBJECT}");
        }
        return format!("{position}: {message}");
    }
    let named = serde_saphyr::from_str_with_options::<HeaderWire>(doc.text, saphyr_options())
        .ok()
        .map(|h| {
            let in_list =
                h.api_version.as_deref() == Some("v1") && h.kind.as_deref() == Some("List");
            match h.items.filter(|_| in_list) {
                // The item the error is in: the last one starting before it.
                Some(items) => items
                    .iter()
                    .rev()
                    .find(|i| (i.referenced.line() as usize) <= line)
                    .map(|i| {
                        header(
                            i.value.api_version.as_deref(),
                            i.value.kind.as_deref(),
                            i.value.metadata.as_ref(),
                        )
                    })
                    .unwrap_or_default(),
                None => header(
                    h.api_version.as_deref(),
                    h.kind.as_deref(),
                    h.metadata.as_ref(),
                ),
            }
        })
        .filter(|h| !h.trim().is_empty());
    // Items of a List are read through `Spanned`, which adds `.value`.
    let path = path.replace("].value", "]");
    match named {
        Some(named) => format!("{position}: {named}: {path}: {message}"),
        None => format!("{position}: {path}: {message}"),
    }
}

/// The error's message without the position it also gives.
fn plain_message(e: &serde_saphyr::Error) -> String {
    let message = e.to_string();
    message
        .rsplit_once(" at line ")
        .map_or(message.clone(), |(m, _)| m.to_string())
}

/// The file's objects in a [`Cluster`], by the documents they came from.
pub struct FileState {
    node: NodeIdentity,
    cluster: Cluster,
    /// Documents of the last valid content, by hash.
    documents: ByHash<DocumentEntry>,
    /// Their hashes in file order.
    order: Vec<u64>,
    /// How many documents hold each object (more than one is an error).
    holders: HashMap<(Kind, Arc<str>), u32>,
}

impl FileState {
    pub fn new(node: &NodeIdentity) -> FileState {
        FileState {
            node: node.clone(),
            cluster: Cluster::new(NodeTopology::new(&node.name, node.zone.as_deref(), None)),
            documents: ByHash::default(),
            order: Vec::new(),
            holders: HashMap::new(),
        }
    }

    pub fn state(&self) -> &DesiredState {
        self.cluster.state()
    }

    /// Applies the file's new text: parses the documents not seen before,
    /// removes the objects of documents that went, translates the Services
    /// touched; true when the state changed. Any problem leaves everything
    /// as it was.
    pub fn load(&mut self, text: impl AsRef<[u8]>, origin: &str) -> Result<bool> {
        let text = text.as_ref();
        let docs = documents(text);
        let mut lines = Lines::new(text);
        let mut fresh: ByHash<(DocumentEntry, Vec<Parsed>)> = ByHash::default();
        for doc in &docs {
            if self.documents.contains_key(&doc.hash) || fresh.contains_key(&doc.hash) {
                continue;
            }
            let first_line = lines.line_at(doc.start);
            let bytes = &text[doc.start..doc.end];
            // Only the documents parsed are checked: the others are
            // byte for byte a document that was.
            let doc_text = std::str::from_utf8(bytes).map_err(|e| {
                let line = first_line + count_newlines(&bytes[..e.valid_up_to()]);
                anyhow!("{origin}:{line}: not UTF-8 text ({e})")
            })?;
            let doc_text = DocumentText {
                text: doc_text,
                first_line,
            };
            let parsed = parse_document(&doc_text).map_err(|e| anyhow!("{origin}:{e}"))?;
            fresh.insert(doc.hash, parsed);
        }
        let order: Vec<u64> = docs.iter().map(|d| d.hash).collect();
        let count = |order: &[u64]| {
            let mut counts: ByHash<i64> = ByHash::default();
            counts.reserve(order.len());
            for hash in order {
                *counts.entry(*hash).or_default() += 1;
            }
            counts
        };
        let (before, after) = (count(&self.order), count(&order));
        // (hash, +n documents added or -n gone)
        let mut deltas: Vec<(u64, i64)> = Vec::new();
        for (hash, n) in &after {
            let d = n - before.get(hash).copied().unwrap_or(0);
            if d != 0 {
                deltas.push((*hash, d));
            }
        }
        for (hash, n) in &before {
            if !after.contains_key(hash) {
                deltas.push((*hash, -n));
            }
        }
        let objects_of = |hash: &u64| -> &[Placed] {
            match self.documents.get(hash).or(fresh.get(hash).map(|(e, _)| e)) {
                Some(entry) => &entry.objects,
                None => &[],
            }
        };
        let mut holders_delta: HashMap<(Kind, Arc<str>), i64> = HashMap::new();
        for (hash, d) in &deltas {
            for placed in objects_of(hash) {
                *holders_delta
                    .entry((placed.kind, placed.id.clone()))
                    .or_default() += d;
            }
        }
        let holders_after = |key: &(Kind, Arc<str>)| {
            i64::from(self.holders.get(key).copied().unwrap_or(0))
                + holders_delta.get(key).copied().unwrap_or(0)
        };
        let mut problems: Vec<(Kind, Arc<str>, String)> = holders_delta
            .keys()
            .filter(|key| holders_after(key) > 1)
            .map(|(kind, id)| {
                (
                    *kind,
                    id.clone(),
                    format!("{} {id} appears more than once", kind.name()),
                )
            })
            .collect();
        problems.sort();
        // Into the cluster: what is gone, then what is new; the old objects
        // are kept to undo it all should the result have problems.
        let mut undo: Vec<Undo> = Vec::new();
        for (key, _) in holders_delta.iter().filter(|(k, _)| holders_after(k) == 0) {
            match key.0 {
                Kind::Service => {
                    if let Some(old) = self.cluster.service(&key.1).cloned() {
                        self.cluster.delete_service(&key.1);
                        undo.push(Undo::Service(key.1.clone(), Some(old)));
                    }
                }
                Kind::EndpointSlice => {
                    if let Some(old) = self.cluster.slice(&key.1).cloned() {
                        self.cluster.delete_slice(&key.1);
                        undo.push(Undo::Slice(key.1.clone(), Some(old)));
                    }
                }
                Kind::Node => {}
            }
        }
        for (_, parsed) in fresh.values_mut() {
            for object in std::mem::take(parsed) {
                match object {
                    Parsed::Service(s) => {
                        let old = self.cluster.service(&s.id).cloned();
                        undo.push(Undo::Service(s.id.as_str().into(), old));
                        self.cluster.apply_service(s);
                    }
                    Parsed::Slice(s) => {
                        let old = self.cluster.slice(&s.id).cloned();
                        undo.push(Undo::Slice(s.id.as_str().into(), old));
                        self.cluster.apply_slice(s);
                    }
                    Parsed::Node(..) => {}
                }
            }
        }
        let old_node = self.cluster.node().clone();
        let old_nodes = self.cluster.state().nodes.clone();
        let nodes: Vec<&NodeObject> = order
            .iter()
            .filter_map(|hash| self.documents.get(hash).or(fresh.get(hash).map(|(e, _)| e)))
            .flat_map(|entry| &entry.nodes)
            .collect();
        let labels = nodes
            .iter()
            .find(|node| node.name == self.node.name)
            .and_then(|node| node.zone.clone())
            .map(|zone| BTreeMap::from([(crate::state::translate::ZONE_LABEL.to_string(), zone)]));
        let addresses: BTreeMap<&str, IpAddr> = nodes
            .iter()
            .filter_map(|node| Some((node.name.as_str(), node.internal_ip?)))
            .collect();
        set_node_addresses(&mut self.cluster, &addresses);
        self.cluster.set_node(NodeTopology::new(
            &self.node.name,
            self.node.zone.as_deref(),
            labels.as_ref(),
        ));
        let changed = self.cluster.update();
        for problem in self.cluster.problems() {
            let (kind, id) = named_object(&problem);
            problems.push((kind, id, problem));
        }
        if !problems.is_empty() {
            let message = self.problems_message(&problems, text, &docs, &fresh, origin);
            for undo in undo.into_iter().rev() {
                match undo {
                    Undo::Service(_, Some(s)) => drop(self.cluster.apply_service(s)),
                    Undo::Service(id, None) => drop(self.cluster.delete_service(&id)),
                    Undo::Slice(_, Some(s)) => drop(self.cluster.apply_slice(s)),
                    Undo::Slice(id, None) => drop(self.cluster.delete_slice(&id)),
                }
            }
            self.cluster.set_node(old_node);
            let old: BTreeMap<&str, IpAddr> =
                old_nodes.iter().map(|(name, ip)| (&**name, *ip)).collect();
            set_node_addresses(&mut self.cluster, &old);
            self.cluster.update();
            return Err(anyhow!(message));
        }
        for (key, d) in holders_delta {
            let n = i64::from(self.holders.get(&key).copied().unwrap_or(0)) + d;
            if n <= 0 {
                self.holders.remove(&key);
            } else {
                self.holders.insert(key, n as u32);
            }
        }
        self.documents.retain(|hash, _| after.contains_key(hash));
        self.documents
            .extend(fresh.into_iter().map(|(hash, (entry, _))| (hash, entry)));
        self.order = order;
        Ok(changed)
    }

    /// `origin is not valid:` and each problem at the line of the object it
    /// names.
    fn problems_message(
        &self,
        problems: &[(Kind, Arc<str>, String)],
        text: &[u8],
        docs: &[Document],
        fresh: &ByHash<(DocumentEntry, Vec<Parsed>)>,
        origin: &str,
    ) -> String {
        let line_of = |kind: Kind, id: &str| -> Option<usize> {
            // The last holder: a duplicate is named where it appears again.
            docs.iter().rev().find_map(|doc| {
                let entry = self
                    .documents
                    .get(&doc.hash)
                    .or(fresh.get(&doc.hash).map(|(e, _)| e))?;
                let placed = entry
                    .objects
                    .iter()
                    .rev()
                    .find(|p| p.kind == kind && &*p.id == id)?;
                // An error's lines only: counted here, not on every change.
                let first = 1 + count_newlines(&text[..doc.start]);
                Some(first + placed.line as usize - 1)
            })
        };
        let mut lines: Vec<String> = problems
            .iter()
            .take(PROBLEMS_SHOWN)
            .map(|(kind, id, p)| match line_of(*kind, id) {
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
        format!("{origin} is not valid:\n{}", lines.join("\n"))
    }
}

/// Makes the cluster's Node addresses `addresses`.
fn set_node_addresses(cluster: &mut Cluster, addresses: &BTreeMap<&str, IpAddr>) {
    let gone: Vec<Arc<str>> = cluster
        .node_ids()
        .filter(|name| !addresses.contains_key(&***name))
        .cloned()
        .collect();
    for name in gone {
        cluster.set_node_address(&name, None);
    }
    for (name, ip) in addresses {
        cluster.set_node_address(name, Some(*ip));
    }
}

/// Problems listed in an error.
const PROBLEMS_SHOWN: usize = 20;

/// A cluster object as it was before a change, to put back.
enum Undo {
    Service(Arc<str>, Option<ServiceObject>),
    Slice(Arc<str>, Option<SliceObject>),
}

/// The object a translation problem names: problems begin with
/// `Service ns/name` or `EndpointSlice ns/name`.
fn named_object(problem: &str) -> (Kind, Arc<str>) {
    let mut words = problem.split([' ', ':']);
    let kind = match words.next() {
        Some("EndpointSlice") => Kind::EndpointSlice,
        _ => Kind::Service,
    };
    (kind, words.next().unwrap_or_default().into())
}

/// The file being followed.
pub struct FileSource {
    path: PathBuf,
    state: FileState,
    last: Option<FileStamp>,
    /// Services left to another proxy, as last logged.
    not_balanced: BTreeMap<String, String>,
}

impl FileSource {
    /// Reads the file once; an unreadable or invalid file at start-up is an
    /// error, so a typo in `--source` fails before anything is touched.
    pub fn open(path: &Path, node: &NodeIdentity) -> Result<(FileSource, DesiredState)> {
        let last = FileStamp::read(path)?;
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let mut state = FileState::new(node);
        state.load(&text, &path.display().to_string())?;
        let mut not_balanced = Default::default();
        report_not_balanced(&mut not_balanced, state.state());
        let initial = state.state().clone();
        Ok((
            FileSource {
                path: path.to_path_buf(),
                state,
                last: Some(last),
                not_balanced,
            },
            initial,
        ))
    }

    /// Follows the file and publishes each valid new content; returns when
    /// nobody listens any more.
    pub async fn watch(mut self, states: watch::Sender<Option<DesiredState>>) -> Result<()> {
        let (tx, mut changes) = mpsc::channel::<()>(1);
        // Kept alive while watching; None when inotify is unavailable (the
        // stat fallback then does the work).
        let _watcher = self.notifier(tx);
        let mut last_reported_error: Option<String> = None;
        let mut stat = tokio::time::interval(STAT_INTERVAL);
        stat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let notified = tokio::select! {
                _ = changes.recv() => true,
                _ = stat.tick() => false,
                () = states.closed() => return Ok(()),
            };
            let mut outcome = self.check(notified).await?;
            if let Check::Invalid(_) = outcome {
                // Possibly a write seen half-done: its end is another event.
                if let Ok(Some(())) = tokio::time::timeout(SETTLE, changes.recv()).await {
                    outcome = self.check(true).await?;
                }
            }
            let error = match outcome {
                Check::Unchanged => continue,
                Check::Changed => {
                    let state = self.state.state().clone();
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
                Check::Invalid(message) => Some(message),
            };
            // Each distinct problem is logged once.
            if error != last_reported_error {
                if let Some(message) = &error {
                    tracing::error!("{message}\nkeeping the last applied state");
                }
                last_reported_error = error;
            }
        }
    }

    /// Watches the file's directory: the file itself may be replaced by a
    /// rename, or be a symlink into a directory swapped as a whole (a
    /// mounted ConfigMap).
    fn notifier(&self, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
        use notify::Watcher as _;
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // Events for other files of the directory (an editor's or a
        // generator's temporary file) would each cost a read of this one.
        // A symlinked file (a ConfigMap mount) changes by a swap of
        // another entry, so for it every event counts.
        let name = self.path.file_name().map(|n| n.to_os_string());
        let symlink = std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.is_symlink());
        let concerns_file = move |e: &notify::Event| {
            symlink || e.paths.iter().any(|p| p.file_name() == name.as_deref())
        };
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| !e.kind.is_access() && concerns_file(&e)) {
                // A full channel already holds a wake-up.
                let _ = tx.try_send(());
            }
        })
        .and_then(|mut w| {
            w.watch(&dir, notify::RecursiveMode::NonRecursive)?;
            Ok(w)
        });
        match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(
                    "cannot watch {} for changes ({e}); checking it every {STAT_INTERVAL:?} instead",
                    dir.display()
                );
                None
            }
        }
    }

    /// Reads and applies the file when its stat changed (or, after a change
    /// notification, when its content hash did).
    async fn check(&mut self, notified: bool) -> Result<Check> {
        let stamp = match FileStamp::read(&self.path) {
            Ok(stamp) => stamp,
            // Editors replace files by rename: a moment without the file is
            // normal, and the last good state simply stays.
            Err(e) => return Ok(Check::Invalid(format!("{e:#}"))),
        };
        if !notified && self.last.as_ref() == Some(&stamp) {
            return Ok(Check::Unchanged);
        }
        let path = self.path.clone();
        let text = match tokio::fs::read(&path).await {
            Ok(text) => text,
            Err(e) => return Ok(Check::Invalid(format!("reading {}: {e}", path.display()))),
        };
        self.last = Some(stamp);
        let mut state =
            std::mem::replace(&mut self.state, FileState::new(&NodeIdentity::default()));
        let (state, result) = tokio::task::spawn_blocking(move || {
            let result = state.load(&text, &path.display().to_string());
            (state, result)
        })
        .await
        .context("file parser task failed")?;
        self.state = state;
        // The file's text and what was parsed of it are freed.
        crate::memory::release_freed();
        Ok(match result {
            Ok(false) => Check::Unchanged,
            Ok(true) => Check::Changed,
            Err(e) => Check::Invalid(format!("{e:#}")),
        })
    }
}

enum Check {
    Unchanged,
    Changed,
    Invalid(String),
}

/// What tells whether the file may have changed without reading it.
#[derive(Clone, Debug, PartialEq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
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
        })
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

    fn load_text(text: &str, path: &Path, node: &NodeIdentity) -> Result<DesiredState> {
        let mut state = FileState::new(node);
        state.load(text, &path.display().to_string())?;
        Ok(state.state().clone())
    }

    #[test]
    fn a_list_larger_than_the_parsers_default_budget_loads() {
        // 90 slices x 1,000 endpoints: at least 270,000 YAML nodes in one
        // document, over serde-saphyr's default cap of 250,000.
        let mut text = String::from(
            "apiVersion: v1\nkind: List\nitems:\n\
             - apiVersion: v1\n  kind: Service\n  metadata: {name: big, namespace: apps}\n  \
             spec:\n    clusterIP: 10.96.0.1\n    ports: [{name: grpc, port: 50051, appProtocol: grpc}]\n",
        );
        for slice in 0..90 {
            text.push_str(&format!(
                "- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  \
                 metadata: {{name: big-{slice}, namespace: apps, labels: {{kubernetes.io/service-name: big}}}}\n  \
                 addressType: IPv4\n  ports: [{{name: grpc, port: 8080}}]\n  endpoints:\n"
            ));
            for e in 0..1000 {
                text.push_str(&format!(
                    "  - addresses: [10.{slice}.{}.{}]\n",
                    e / 256,
                    e % 256
                ));
            }
        }
        let state = load_text(&text, Path::new("big.yaml"), &node()).unwrap();
        assert_eq!(state.services.len(), 1);
        assert_eq!(
            state.services.values().next().unwrap().endpoints.len(),
            90_000
        );
    }

    /// The 1-based number of the first line of `text` containing `needle`.
    fn line_of(text: &str, needle: &str) -> usize {
        text.lines().position(|l| l.contains(needle)).unwrap() + 1
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
        let list = load_text(LIST, Path::new("list.yaml"), &node()).unwrap();
        let multi = load_text(MULTI, Path::new("multi.yaml"), &node()).unwrap();
        assert_eq!(list.services.len(), 3);
        assert_eq!(list, multi);
    }

    #[test]
    fn empty_documents_and_empty_lists_are_fine() {
        let empty = |text: &str| load_text(text, Path::new("f"), &node()).unwrap();
        assert_eq!(empty(""), DesiredState::default());
        assert_eq!(empty("---\n# nothing\n---\n"), DesiredState::default());
        let empty_list =
            "apiVersion: v1\nkind: List\nitems: []\nmetadata:\n  resourceVersion: \"\"\n";
        assert_eq!(empty(empty_list), DesiredState::default());
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let e = err("apiVersion: v1\nkind: Service\nmetadata:\n  name: [oops\n");
        assert!(e.starts_with("svc.yaml:4:9: metadata.name: "), "{e}");
    }

    #[test]
    fn bad_field_in_a_list_item_names_line_item_and_object() {
        let text = LIST.replacen("port: 50051", "port: fifty", 1);
        let e = err(&text);
        let line = line_of(LIST, "port: 50051");
        assert!(
            e.starts_with(&format!("svc.yaml:{line}:")),
            "expected line {line}: {e}"
        );
        assert!(
            e.contains("v1 Service apps/echo: items[0].spec.ports[0].port:"),
            "{e}"
        );
        assert!(e.contains("port: invalid i32"), "{e}");
        assert!(!e.contains(" at line "), "position given twice: {e}");
    }

    #[test]
    fn unknown_kind_in_a_list_is_named_with_its_line() {
        let text = LIST.replacen(
            "- addressType: IPv4\n  apiVersion: discovery.k8s.io/v1",
            "- apiVersion: v1\n  kind: ConfigMap\n  metadata:\n    name: cfg\n    namespace: apps\n- addressType: IPv4\n  apiVersion: discovery.k8s.io/v1",
            1,
        );
        // The item starts the line before its kind.
        let line = line_of(&text, "kind: ConfigMap") - 1;
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
        let line = line_of(&text, "- addressType: IPv4");
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

    #[test]
    fn a_rewrite_reparses_only_changed_documents_and_drops_vanished_ones() {
        let mut state = FileState::new(&node());
        state.load(MULTI, "multi.yaml").unwrap();
        let before = state.state().clone();
        assert_eq!(state.documents.len(), 7);
        // One endpoint of the dual Service's IPv4 slice goes; echo's
        // documents are untouched and its frontend keeps its Arc.
        let changed = MULTI.replacen("- 10.244.1.8", "- 10.244.1.9", 1);
        state.load(&changed, "multi.yaml").unwrap();
        let after = state.state();
        let echo = key4([10, 96, 0, 10], 50051);
        assert!(Arc::ptr_eq(&before.services[&echo], &after.services[&echo]));
        assert_ne!(before, *after);
        assert_eq!(state.documents.len(), 7, "the old document is forgotten");
        // A document that goes takes its objects with it.
        let start = changed.find("---\n").unwrap();
        let end = start + 4 + changed[start + 4..].find("---\n").unwrap();
        assert!(changed[start..end].contains("name: echo\n"));
        let without_echo = format!("{}{}", &changed[..start], &changed[end..]);
        state.load(&without_echo, "multi.yaml").unwrap();
        assert!(!state.state().services.contains_key(&echo));
        // An invalid change leaves everything as it was.
        let kept = state.state().clone();
        let bad = without_echo.replacen("- 10.244.1.9", "- nonsense", 1);
        assert!(state.load(&bad, "multi.yaml").is_err());
        assert_eq!(*state.state(), kept);
        state.load(&without_echo, "multi.yaml").unwrap();
        assert_eq!(*state.state(), kept);
    }

    #[test]
    fn node_internal_ips_are_published_and_a_bad_one_names_node_field_and_fix() {
        let nodes = |a: &str| {
            format!(
                "apiVersion: v1\nkind: List\nitems:\n\
                 - apiVersion: v1\n  kind: Node\n  metadata: {{name: n1}}\n  \
                   status: {{addresses: [{{type: Hostname, address: n1}}, {{type: InternalIP, address: {a}}}]}}\n\
                 - apiVersion: v1\n  kind: Node\n  metadata: {{name: n2}}\n  \
                   status: {{addresses: [{{type: InternalIP, address: 'fd00::2'}}, {{type: InternalIP, address: 10.0.0.2}}]}}\n\
                 - apiVersion: v1\n  kind: Node\n  metadata: {{name: n3}}\n"
            )
        };
        let mut state = FileState::new(&node());
        assert!(state.load(nodes("127.0.1.1"), "nodes.yaml").unwrap());
        let expected: BTreeMap<Arc<str>, IpAddr> = [
            (Arc::from("n1"), "127.0.1.1".parse().unwrap()),
            // The first InternalIP; n3 has none and is left out.
            (Arc::from("n2"), "fd00::2".parse().unwrap()),
        ]
        .into();
        assert_eq!(*state.state().nodes, expected);
        assert!(!state.load(nodes("127.0.1.1"), "nodes.yaml").unwrap());
        let e = format!(
            "{:#}",
            state.load(nodes("node-one"), "nodes.yaml").unwrap_err()
        );
        assert!(
            e.contains(
                "Node n1: status.addresses[1].address \"node-one\" (type InternalIP) is not an \
                 IPv4 or IPv6 address; the load exchange reaches this node's agent there: set \
                 the node's InternalIP (kubelet --node-ip)"
            ),
            "{e}"
        );
        assert_eq!(*state.state().nodes, expected, "the last good state stays");
        // A Node that goes leaves the state.
        assert!(state
            .load(
                nodes("127.0.1.1").replace("name: n2", "name: n4"),
                "nodes.yaml"
            )
            .unwrap());
        assert!(state.state().nodes.contains_key("n4") && !state.state().nodes.contains_key("n2"));
    }
}
