//! Starting `testpod` servers and clients inside pods.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::agent::require_binary;
use crate::grpc_stream::StreamRequest;
use crate::{run_in, spawn, testpod_bin, ChildGuard, ConnectReport, LoadReport, Node, Pod};

/// How long a server may take to print "ready".
const READY_TIMEOUT: Duration = Duration::from_secs(10);

fn testpod(args: &[&str]) -> Result<Command> {
    require_binary(&testpod_bin())?;
    let mut cmd = Command::new(testpod_bin());
    cmd.args(args);
    Ok(cmd)
}

/// `testpod whoami` on `[::]:port` (IPv4 and IPv6) in `pod`, named after it.
pub fn start_whoami(pod: &Pod, port: u16) -> Result<ChildGuard> {
    start_server(pod, None, "whoami", port)
}

/// `testpod grpc-server` on `[::]:port` (IPv4 and IPv6) in `pod`, named after it.
pub fn start_grpc_server(pod: &Pod, port: u16) -> Result<ChildGuard> {
    start_server(pod, None, "grpc-server", port)
}

/// A server of `kind` (`grpc-server`, `whoami`) in `pod` and in `node`'s
/// cgroup, as a pod of that node is: the node's programs see its sockets.
pub fn start_server_on_node(pod: &Pod, node: &Node, kind: &str, port: u16) -> Result<ChildGuard> {
    start_server(pod, Some(node), kind, port)
}

fn start_server(pod: &Pod, node: Option<&Node>, kind: &str, port: u16) -> Result<ChildGuard> {
    let listen = format!("[::]:{port}");
    let cmd = testpod(&[kind, "--name", &pod.name, "--listen", &listen])?;
    let mut server = spawn(pod, node, cmd)?;
    server
        .expect_line("ready", READY_TIMEOUT)
        .with_context(|| format!("testpod {kind} in pod {}", pod.name))?;
    Ok(server)
}

/// Options of `testpod connect` beyond the target and count.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    pub v6_mapped: bool,
    pub close_each: bool,
    /// Pause between connects, in milliseconds.
    pub interval_ms: u64,
}

/// Runs `testpod connect` to completion: `count` connections, closed when
/// it exits.
pub fn connect(
    pod: &Pod,
    node: Option<&Node>,
    to: SocketAddr,
    count: u64,
    options: &ConnectOptions,
) -> Result<ConnectReport> {
    let output = run_in(pod, node, connect_command(to, count, options, &[])?)?;
    if !output.status.success() {
        bail!(
            "testpod connect to {to} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    ConnectReport::parse(String::from_utf8_lossy(&output.stdout).trim())
}

/// Opens `count` connections and keeps them open until the returned guard
/// is dropped.
pub fn connect_and_hold(
    pod: &Pod,
    node: Option<&Node>,
    to: SocketAddr,
    count: u64,
    options: &ConnectOptions,
) -> Result<(ConnectReport, ChildGuard)> {
    // Longer than any test; the guard kills it.
    let cmd = connect_command(to, count, options, &["--hold-ms", "600000"])?;
    let mut client = spawn(pod, node, cmd)?;
    let report = ConnectReport::parse(&client.read_line(Duration::from_secs(60))?)?;
    Ok((report, client))
}

/// Starts `testpod connect --until-file`: connects in a loop until `stop`
/// exists; read the report with [`ChildGuard::read_line`].
pub fn start_connect_loop(
    pod: &Pod,
    node: Option<&Node>,
    to: SocketAddr,
    stop: &std::path::Path,
    options: &ConnectOptions,
) -> Result<ChildGuard> {
    let stop = stop.to_str().context("stop file path is not UTF-8")?;
    spawn(
        pod,
        node,
        connect_command(to, 1, options, &["--until-file", stop])?,
    )
}

fn connect_command(
    to: SocketAddr,
    count: u64,
    options: &ConnectOptions,
    extra: &[&str],
) -> Result<Command> {
    let (to, count) = (to.to_string(), count.to_string());
    let mut cmd = testpod(&["connect", "--to", &to, "--count", &count])?;
    if options.v6_mapped {
        cmd.arg("--v6-mapped");
    }
    if options.close_each {
        cmd.arg("--close-each");
    }
    if options.interval_ms > 0 {
        cmd.args(["--interval-ms", &options.interval_ms.to_string()]);
    }
    cmd.args(extra);
    Ok(cmd)
}

/// Starts `testpod grpc-load` and returns its report once the RPCs are done,
/// with the process still holding its connections open (until dropped).
pub fn grpc_load_and_hold(
    pod: &Pod,
    node: Option<&Node>,
    to: SocketAddr,
    connections: u64,
    rpcs: u64,
) -> Result<(LoadReport, ChildGuard)> {
    // Longer than any test; the guard kills it.
    let cmd = grpc_load_command(to, connections, rpcs, &["--hold-ms", "600000"])?;
    let mut client = spawn(pod, node, cmd)?;
    let report = LoadReport::parse(&client.read_line(Duration::from_secs(60))?)?;
    Ok((report, client))
}

fn grpc_load_command(
    to: SocketAddr,
    connections: u64,
    rpcs: u64,
    extra: &[&str],
) -> Result<Command> {
    let (connections, rpcs) = (connections.to_string(), rpcs.to_string());
    let uri = format!("http://{to}");
    let mut cmd = testpod(&[
        "grpc-load",
        "--to",
        &uri,
        "--connections",
        &connections,
        "--rpcs",
        &rpcs,
    ])?;
    cmd.args(extra);
    Ok(cmd)
}

/// Which gRPC implementation a load client uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrpcClient {
    /// tonic (Rust): `testpod grpc-load`.
    Tonic,
    /// gRPC C-core through Debian's python3-grpcio: `peers/grpcio_load.py`.
    Grpcio,
    /// grpc-js (Node) from npm: `peers/grpc-js/load.js` (`cargo xtask test`
    /// installs its node_modules).
    GrpcJs,
    /// grpc-go (Debian's golang-google-grpc-dev): `grpc-rate-client`, one
    /// process per connection, each calling at a fixed rate.
    GrpcGo,
}

/// The interpreter Debian's python3-grpcio is installed for.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// What a load client does on each of its connections.
#[derive(Clone, Copy, Debug)]
pub struct LoadShape {
    pub connections: u64,
    /// Unary answers per pod are counted in buckets this wide.
    pub timeline_ms: u64,
    /// Server-streaming Download calls ([`crate::grpc_stream`]) one after
    /// another alongside the unary calls, each asking for this.
    pub streams: Option<StreamRequest>,
}

impl LoadShape {
    /// The `--stream-*` flags every client takes.
    fn stream_args(&self) -> Vec<String> {
        let Some(asked) = self.streams else {
            return Vec::new();
        };
        [
            ("--stream-messages", asked.messages),
            ("--stream-message-bytes", asked.message_bytes),
            ("--stream-interval-ms", asked.interval_ms),
        ]
        .into_iter()
        .flat_map(|(flag, n)| [flag.to_string(), n.to_string()])
        .collect()
    }
}

/// Starts a load client of `kind` calling as `shape` says until `stop`
/// exists; create `stop`, then read the report with [`LoadRun::finish`].
pub fn start_load_until(
    kind: GrpcClient,
    pod: &Pod,
    node: Option<&Node>,
    to: SocketAddr,
    shape: &LoadShape,
    stop: &std::path::Path,
) -> Result<LoadRun> {
    let (connections, timeline_ms) = (shape.connections, shape.timeline_ms);
    match kind {
        GrpcClient::Tonic => {
            let stop_arg = stop.to_str().context("stop file path is not UTF-8")?;
            let timeline = timeline_ms.to_string();
            let mut cmd = grpc_load_command(
                to,
                connections,
                1,
                &["--until-file", stop_arg, "--timeline-ms", &timeline],
            )?;
            cmd.args(shape.stream_args());
            Ok(LoadRun::new(spawn(pod, node, cmd)?, stop))
        }
        GrpcClient::GrpcGo => {
            require_binary(&go_client_bin())?;
            let start_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis()
                + 1000;
            let mut clients = Vec::new();
            for _ in 0..connections {
                let mut cmd = Command::new(go_client_bin());
                cmd.args(["--target", &to.to_string()])
                    .args(["--rate", &GO_CLIENT_RATE.to_string()])
                    .args(["--start-unix-ms", &start_ms.to_string()])
                    .args(["--bucket-ms", &timeline_ms.to_string()])
                    .arg("--until-file")
                    .arg(stop)
                    .args(shape.stream_args());
                clients.push(spawn(pod, node, cmd)?);
            }
            Ok(LoadRun {
                clients,
                go: true,
                stop: stop.to_path_buf(),
            })
        }
        GrpcClient::Grpcio | GrpcClient::GrpcJs => {
            let (interpreter, script, install, rate) = match kind {
                GrpcClient::Grpcio => (
                    SYSTEM_PYTHON,
                    concat!(env!("CARGO_MANIFEST_DIR"), "/peers/grpcio_load.py"),
                    "apt-get install python3-grpcio",
                    GRPCIO_CLIENT_RATE,
                ),
                _ => (
                    "node",
                    concat!(env!("CARGO_MANIFEST_DIR"), "/peers/grpc-js/load.js"),
                    "npm install in tests/peers/grpc-js",
                    GRPC_JS_CLIENT_RATE,
                ),
            };
            let mut cmd = Command::new(interpreter);
            cmd.arg(script)
                .args(["--to", &to.to_string()])
                .args(["--connections", &connections.to_string()])
                .arg("--until-file")
                .arg(stop)
                .args(["--timeline-ms", &timeline_ms.to_string()])
                .args(["--rate", &rate.to_string()])
                .args(shape.stream_args());
            let client = spawn(pod, node, cmd)
                .with_context(|| format!("starting the {kind:?} client ({install})"))?;
            Ok(LoadRun::new(client, stop))
        }
    }
}

/// How a slow stream reader reads.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReaderPace {
    /// Sleep after each message (the application reads slowly).
    pub read_delay: Duration,
    /// HTTP/2 initial stream and connection windows; `None`: RFC 9113's
    /// 64 KiB.
    pub window_bytes: Option<u32>,
    /// The client's sockets are read at most this fast (a slow network or a
    /// slow client, as the server sees it).
    pub read_bytes_per_second: Option<u64>,
}

/// Starts `testpod grpc-load` making only server-streaming calls on
/// `connections` connections, each asking for `asked` and reading as `pace`
/// says (a slow reader), until `stop` exists.
pub fn start_slow_stream_readers(
    pod: &Pod,
    node: Option<&Node>,
    to: SocketAddr,
    connections: u64,
    asked: StreamRequest,
    pace: ReaderPace,
    stop: &std::path::Path,
) -> Result<LoadRun> {
    let shape = LoadShape {
        connections,
        timeline_ms: 0,
        streams: Some(asked),
    };
    let stop_arg = stop.to_str().context("stop file path is not UTF-8")?;
    let mut cmd = grpc_load_command(
        to,
        connections,
        1,
        &["--no-unary", "--until-file", stop_arg],
    )?;
    let window = pace.window_bytes.unwrap_or(HTTP2_DEFAULT_WINDOW);
    cmd.args(shape.stream_args()).args([
        "--stream-read-delay-us".to_string(),
        pace.read_delay.as_micros().to_string(),
        "--stream-window-bytes".to_string(),
        window.to_string(),
    ]);
    if let Some(rate) = pace.read_bytes_per_second {
        cmd.args(["--read-bytes-per-second", &rate.to_string()]);
    }
    Ok(LoadRun::new(spawn(pod, node, cmd)?, stop))
}

/// RFC 9113 6.9.2: the initial flow-control window.
const HTTP2_DEFAULT_WINDOW: u32 = 65_535;

/// Load clients running until their stop file exists.
pub struct LoadRun {
    /// One process printing a `LoadReport`, or grpc-go processes (one
    /// channel each) printing a `GoClientReport` each.
    clients: Vec<ChildGuard>,
    go: bool,
    stop: std::path::PathBuf,
}

impl LoadRun {
    /// A client that stops when `stop` exists and then prints its report.
    pub fn new(client: ChildGuard, stop: &std::path::Path) -> LoadRun {
        LoadRun {
            clients: vec![client],
            go: false,
            stop: stop.to_path_buf(),
        }
    }

    /// Stops the calls and returns the report (of all clients together).
    pub fn finish(mut self) -> Result<LoadReport> {
        std::fs::write(&self.stop, b"")
            .with_context(|| format!("creating {}", self.stop.display()))?;
        let mut total = LoadReport::default();
        for client in &mut self.clients {
            let line = client.read_line(Duration::from_secs(30))?;
            if !self.go {
                return LoadReport::parse(&line);
            }
            let report: GoClientReport = serde_json::from_str(&line)
                .with_context(|| format!("parsing grpc-go report {line:?}"))?;
            report.add_to(&mut total);
        }
        Ok(total)
    }
}

/// What `grpc-rate-client` (grpc-go, xtask/peers) prints.
#[derive(serde::Deserialize)]
struct GoClientReport {
    buckets: Vec<std::collections::BTreeMap<String, u64>>,
    ok: u64,
    failures: u64,
    errors: Vec<String>,
    streams_per_pod: std::collections::BTreeMap<String, u64>,
}

impl GoClientReport {
    fn add_to(self, total: &mut LoadReport) {
        total.ok += self.ok;
        total.failures += self.failures;
        total.errors.extend(self.errors);
        total.errors.truncate(10);
        for (pod, n) in self.streams_per_pod {
            *total.streams_per_pod.entry(pod).or_insert(0) += n;
        }
        if total.timeline.len() < self.buckets.len() {
            total
                .timeline
                .resize(self.buckets.len(), Default::default());
        }
        for (sum, bucket) in total.timeline.iter_mut().zip(self.buckets) {
            for (pod, n) in bucket {
                *total.per_pod.entry(pod.clone()).or_insert(0) += n;
                *sum.entry(pod).or_insert(0) += n;
            }
        }
    }
}

/// Calls per second of each grpc-go client (open loop: a fixed rate).
const GO_CLIENT_RATE: u32 = 250;

/// Calls per second of each connection of the interpreted clients: rates
/// they keep up on two shared cores, so every connection carries the same
/// load and per-pod rates show where connections are, not how the CPU was
/// shared (as fast as they can, Python processes differ by ±30 %).
const GRPCIO_CLIENT_RATE: u32 = 200;
const GRPC_JS_CLIENT_RATE: u32 = 100;

/// `grpc-rate-client` next to the test binaries; `cargo xtask test` builds it.
pub fn go_client_bin() -> std::path::PathBuf {
    crate::agent::sibling_binary("grpc-rate-client")
}

/// Runs `testpod grpc-load` to completion.
pub fn grpc_load(
    pod: &Pod,
    node: Option<&Node>,
    to: SocketAddr,
    connections: u64,
    rpcs: u64,
) -> Result<LoadReport> {
    let uri = format!("http://{to}");
    let cmd = grpc_load_command(to, connections, rpcs, &[])?;
    let output = run_in(pod, node, cmd)?;
    if !output.status.success() {
        bail!(
            "testpod grpc-load to {uri} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    LoadReport::parse(String::from_utf8_lossy(&output.stdout).trim())
}

/// What `testpod churn` is asked to do.
#[derive(Clone, Debug)]
pub struct ChurnOptions {
    /// Frontends that accept connections.
    pub to: Vec<SocketAddr>,
    /// A frontend whose backends refuse connections.
    pub refused: SocketAddr,
    pub connections: u64,
    pub threads: u64,
    /// Keep every Nth connection that read its whoami line open.
    pub hold_every: u64,
}

/// Starts `testpod churn`; its report is its first stdout line, and it
/// holds the connections it kept until the guard is dropped.
pub fn start_churn(pod: &Pod, node: Option<&Node>, options: &ChurnOptions) -> Result<ChildGuard> {
    let mut cmd = testpod(&["churn"])?;
    for to in &options.to {
        cmd.args(["--to", &to.to_string()]);
    }
    cmd.args(["--refused", &options.refused.to_string()]);
    cmd.args(["--connections", &options.connections.to_string()]);
    cmd.args(["--threads", &options.threads.to_string()]);
    cmd.args(["--hold-every", &options.hold_every.to_string()]);
    spawn(pod, node, cmd)
}
