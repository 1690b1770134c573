//! Peer processes the tests run inside pods: a tonic gRPC server, a plain TCP
//! "whoami" server, a raw connect() client and a gRPC load generator.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV6, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use grpclb_tests::grpc_stream::{self, StreamRequest};
use grpclb_tests::h2script::{expected, pieces, verify, Script};
use grpclb_tests::{
    ChurnKind, ChurnReport, ConnectAttempt, ConnectReport, LoadReport, ScriptReadReport,
    ScriptWriteReport,
};
use tonic::transport::{Channel, Endpoint, Server};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Response header naming the pod that answered an RPC.
const POD_HEADER: &str = "x-pod";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const RPC_TIMEOUT: Duration = Duration::from_secs(5);
/// RFC 9113 6.9.2: the initial flow-control window.
const HTTP2_DEFAULT_WINDOW: u32 = 65_535;
/// How many failure messages a load report keeps.
const ERRORS_KEPT: usize = 10;
/// How long `grpc-server` drains after SIGTERM before it exits anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(about = "grpclb test peer: servers and clients that run inside test pods")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// gRPC server (grpc.health.v1, and the server-streaming
    /// grpclb.test.Stream/Download of `grpc_stream`) whose responses carry
    /// `x-pod: NAME`; prints "ready" once listening. SIGTERM drains it
    /// gracefully (GOAWAY).
    GrpcServer {
        #[arg(long)]
        name: String,
        #[arg(long)]
        listen: SocketAddr,
    },
    /// TCP server that writes `NAME\n` on accept and keeps the connection
    /// until the peer closes it; prints "ready" once listening.
    Whoami {
        #[arg(long)]
        name: String,
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Opens connections one after another, reads each whoami line, prints
    /// one JSON `ConnectReport` line, then holds the open connections.
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// Keep the connections open this long after printing the report.
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        /// Use an AF_INET6 socket to `::ffff:a.b.c.d` (as gRPC C-core does).
        #[arg(long)]
        v6_mapped: bool,
        /// Close each connection after reading its line instead of holding it.
        #[arg(long)]
        close_each: bool,
        /// Keep connecting (at least `count` times) until this file exists.
        #[arg(long)]
        until_file: Option<PathBuf>,
        /// Pause between connects (a long loop would otherwise run out of
        /// ephemeral ports to TIME_WAIT).
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
    },
    /// Opens and closes connections as fast as it can from several threads,
    /// every kind of `ChurnKind` in turn: graceful closes, resets, closes
    /// racing the handshake, refused connects. Prints one JSON `ChurnReport`,
    /// then holds the connections it kept until killed.
    Churn {
        /// Frontends that accept connections, used in turn.
        #[arg(long, required = true)]
        to: Vec<SocketAddr>,
        /// A frontend whose backends refuse connections.
        #[arg(long)]
        refused: SocketAddr,
        #[arg(long)]
        connections: u64,
        #[arg(long, default_value_t = 4)]
        threads: u64,
        /// Keep every Nth connection that read its whoami line open (0: none).
        #[arg(long, default_value_t = 0)]
        hold_every: u64,
    },
    /// K tonic channels (connected one after another), R unary health checks
    /// on each, and with `--stream-messages` server-streaming Download calls
    /// alongside; prints one JSON `LoadReport` line.
    GrpcLoad {
        #[arg(long)]
        to: String,
        #[arg(long, default_value_t = 1)]
        connections: u64,
        #[arg(long, default_value_t = 1)]
        rpcs: u64,
        /// Keep the connections open this long after printing the report.
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        /// Keep calling (at least `rpcs` times per channel) until this file
        /// exists.
        #[arg(long)]
        until_file: Option<PathBuf>,
        /// Also count successes per pod in buckets of this many milliseconds
        /// (the report's `timeline`).
        #[arg(long, default_value_t = 0)]
        timeline_ms: u64,
        #[command(flatten)]
        streams: StreamArgs,
    },
    /// Writes a scripted server byte stream (see `h2script`) to one client
    /// through a non-blocking socket in chunks of random size, so many writes
    /// are partial; after every `--flush-every` pieces waits until nothing is
    /// left unsent (0: only at the end). Prints "ready", then one JSON `ScriptWriteReport`.
    H2ScriptServer {
        #[arg(long)]
        listen: SocketAddr,
        #[command(flatten)]
        script: ScriptArgs,
        #[arg(long, default_value_t = 1)]
        flush_every: u32,
        /// Pause after each flush at a boundary where a GOAWAY may go.
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
        /// Pause after each flush anywhere else (inside header blocks).
        #[arg(long, default_value_t = 0)]
        pause_elsewhere_ms: u64,
    },
    /// Reads a scripted stream slowly to its end and checks it byte for byte:
    /// prints one JSON `ScriptReadReport`.
    H2ScriptClient {
        #[arg(long)]
        to: SocketAddr,
        #[command(flatten)]
        script: ScriptArgs,
        /// Sleep after every read of at most 16 KiB.
        #[arg(long, default_value_t = 1000)]
        read_delay_us: u64,
    },
    /// HTTP/2 (h2c) server that answers every request with `--mib` MiB of
    /// body; prints "ready" once listening.
    H2BulkServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 256)]
        mib: u64,
        /// Sent as the `x-pod` response header.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Sends `--requests` requests one after another over one HTTP/2
    /// connection and reads every body; prints one JSON `DownloadReport`.
    H2Download {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        requests: u64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::GrpcServer { name, listen } => runtime()?.block_on(grpc_server(name, listen)),
        Cmd::Whoami { name, listen } => whoami(&name, listen),
        Cmd::Connect {
            to,
            count,
            hold_ms,
            v6_mapped,
            close_each,
            until_file,
            interval_ms,
        } => {
            let target = if v6_mapped { v6_mapped_addr(to)? } else { to };
            let mut held = Vec::new();
            let mut report = ConnectReport::default();
            while (report.attempts.len() as u64) < count
                || until_file.as_ref().is_some_and(|f| !f.exists())
            {
                let (attempt, stream) = connect_once(target);
                report.attempts.push(attempt);
                if let (Some(stream), false) = (stream, close_each) {
                    held.push(stream);
                }
                std::thread::sleep(Duration::from_millis(interval_ms));
            }
            print_line(&serde_json::to_string(&report)?)?;
            std::thread::sleep(Duration::from_millis(hold_ms));
            Ok(())
        }
        Cmd::Churn {
            to,
            refused,
            connections,
            threads,
            hold_every,
        } => {
            let plan = ChurnPlan {
                to,
                refused,
                threads: threads.max(1),
                connections,
                hold_every,
            };
            let (report, _held) = churn(&plan);
            print_line(&serde_json::to_string(&report)?)?;
            // Until killed: the test counts the held connections first.
            loop {
                std::thread::park();
            }
        }
        Cmd::GrpcLoad {
            to,
            connections,
            rpcs,
            hold_ms,
            until_file,
            timeline_ms,
            streams,
        } => {
            let runtime = runtime()?;
            let plan = LoadPlan {
                connections,
                rpcs,
                until_file,
                timeline_ms,
                unary: !streams.no_unary,
                streams: streams.plan()?,
            };
            let (report, _held) = runtime.block_on(grpc_load(to, plan))?;
            print_line(&serde_json::to_string(&report)?)?;
            std::thread::sleep(Duration::from_millis(hold_ms));
            Ok(())
        }
        Cmd::H2ScriptServer {
            listen,
            script,
            flush_every,
            pause_ms,
            pause_elsewhere_ms,
        } => h2_script_server(listen, &script, flush_every, [pause_ms, pause_elsewhere_ms]),
        Cmd::H2ScriptClient {
            to,
            script,
            read_delay_us,
        } => h2_script_client(to, &script, read_delay_us),
        Cmd::H2BulkServer { listen, mib, name } => {
            runtime()?.block_on(h2_bulk_server(listen, mib, name))
        }
        Cmd::H2Download { to, requests } => {
            let report = runtime()?.block_on(h2_download(to, requests))?;
            print_line(&serde_json::to_string(&report)?)
        }
    }
}

/// Server-streaming calls of `grpc-load`, beside (or instead of) its unary
/// ones.
#[derive(clap::Args)]
struct StreamArgs {
    /// On each channel, also make Download calls (grpclb.test.Stream, see
    /// `grpc_stream`) one after another, of this many messages each.
    #[arg(long, default_value_t = 0)]
    stream_messages: u32,
    #[arg(long, default_value_t = 1024)]
    stream_message_bytes: u32,
    /// The server's pause between two messages.
    #[arg(long, default_value_t = 0)]
    stream_interval_ms: u32,
    /// Sleep after reading each message: a slow reader.
    #[arg(long, default_value_t = 0)]
    stream_read_delay_us: u64,
    /// HTTP/2 initial stream and connection windows (0: hyper's, or RFC
    /// 9113's 64 KiB with --stream-read-delay-us).
    #[arg(long, default_value_t = 0)]
    stream_window_bytes: u32,
    /// Read each connection's socket at most this many bytes per second (0:
    /// as fast as it comes): a slow network or a slow client, as the server
    /// sees it.
    #[arg(long, default_value_t = 0)]
    read_bytes_per_second: u64,
    /// Make only the streaming calls.
    #[arg(long)]
    no_unary: bool,
}

impl StreamArgs {
    fn plan(&self) -> Result<Option<StreamPlan>> {
        if self.stream_messages == 0 {
            ensure!(!self.no_unary, "--no-unary needs --stream-messages");
            return Ok(None);
        }
        let asked = StreamRequest {
            messages: self.stream_messages,
            message_bytes: self.stream_message_bytes,
            interval_ms: self.stream_interval_ms,
        };
        // The server would refuse it; say so before connecting.
        asked.check_bounds()?;
        Ok(Some(StreamPlan {
            asked,
            read_delay: Duration::from_micros(self.stream_read_delay_us),
            window: (self.stream_window_bytes > 0).then_some(self.stream_window_bytes),
            read_rate: (self.read_bytes_per_second > 0).then_some(self.read_bytes_per_second),
        }))
    }
}

#[derive(clap::Args)]
struct ScriptArgs {
    #[arg(long, value_enum)]
    script: Script,
    #[arg(long, default_value_t = 16)]
    frames: u32,
    #[arg(long, default_value_t = 1 << 20)]
    frame_bytes: u32,
}

/// Lingering at the end, at the last boundary, before closing.
const SCRIPT_LINGER: Duration = Duration::from_millis(100);

/// `pauses`: after flushes at allowed boundaries, and elsewhere.
fn h2_script_server(
    listen: SocketAddr,
    args: &ScriptArgs,
    flush_every: u32,
    pauses: [u64; 2],
) -> Result<()> {
    use std::os::fd::AsRawFd;
    let listener = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    print_line("ready")?;
    let (mut stream, _) = listener.accept().context("accepting")?;
    // A small send buffer: most writes are partial or refused.
    nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::SndBuf, &(64 << 10))
        .context("setting SO_SNDBUF")?;
    stream.set_nonblocking(true)?;
    let fd = stream.as_raw_fd();
    let mut report = ScriptWriteReport::default();
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    for (i, piece) in pieces(args.script, args.frames, args.frame_bytes)
        .iter()
        .enumerate()
    {
        let mut rest = &piece.bytes[..];
        while !rest.is_empty() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let want = rest.len().min(1 + (rng % (64 << 10)) as usize);
            match stream.write(&rest[..want]) {
                Ok(n) => {
                    report.writes += 1;
                    report.partial_writes += u64::from(n < want);
                    report.bytes += n as u64;
                    rest = &rest[n..];
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    report.would_block += 1;
                    wait_writable(fd)?;
                }
                Err(e) => return Err(e).context("writing the script"),
            }
        }
        // 0: the queue drains only at the end; pause after every piece.
        let flushed = flush_every > 0 && (i as u32 + 1).is_multiple_of(flush_every);
        if flushed {
            flush(fd)?;
            report.flushes += 1;
        }
        if flushed || flush_every == 0 {
            let pause = if piece.boundary_after {
                pauses[0]
            } else {
                pauses[1]
            };
            std::thread::sleep(Duration::from_millis(pause));
        }
    }
    flush(fd)?;
    std::thread::sleep(SCRIPT_LINGER);
    stream.shutdown(Shutdown::Write)?;
    stream.set_nonblocking(false)?;
    // Until the client closes: it has read everything by then.
    let _ = stream.read_to_end(&mut Vec::new());
    print_line(&serde_json::to_string(&report)?)
}

/// Until nothing is left unsent.
fn flush(fd: i32) -> Result<()> {
    while unsent_bytes(fd)? > 0 {
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

fn wait_writable(fd: i32) -> Result<()> {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&mut poll, 1, 10_000) } < 0 {
        return Err(std::io::Error::last_os_error()).context("poll");
    }
    Ok(())
}

/// Bytes queued on the socket and not yet sent (SIOCOUTQNSD).
fn unsent_bytes(fd: i32) -> Result<i32> {
    const SIOCOUTQNSD: libc::c_ulong = 0x894b;
    let mut unsent: libc::c_int = 0;
    // SAFETY: the ioctl writes one int.
    if unsafe { libc::ioctl(fd, SIOCOUTQNSD, &mut unsent) } < 0 {
        return Err(std::io::Error::last_os_error()).context("ioctl SIOCOUTQNSD");
    }
    Ok(unsent)
}

fn h2_script_client(to: SocketAddr, args: &ScriptArgs, read_delay_us: u64) -> Result<()> {
    let mut stream = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT)
        .with_context(|| format!("connecting to {to}"))?;
    let mut received = Vec::new();
    let mut buf = vec![0u8; 16 << 10];
    let mut reads = 0u64;
    loop {
        let n = stream.read(&mut buf).context("reading")?;
        if n == 0 {
            break;
        }
        reads += 1;
        received.extend_from_slice(&buf[..n]);
        std::thread::sleep(Duration::from_micros(read_delay_us));
    }
    let (expected, allowed) = expected(args.script, args.frames, args.frame_bytes);
    let (goaway_at, error) = match verify(&expected, &allowed, &received) {
        Ok(at) => (at, None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let report = ScriptReadReport {
        received: received.len() as u64,
        reads,
        goaway_at: goaway_at.map(|at| at as u64),
        error,
    };
    print_line(&serde_json::to_string(&report)?)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")
}

fn print_line(line: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush().context("flushing stdout")
}

fn v6_mapped_addr(to: SocketAddr) -> Result<SocketAddr> {
    match to {
        SocketAddr::V4(v4) => Ok(SocketAddr::V6(SocketAddrV6::new(
            v4.ip().to_ipv6_mapped(),
            v4.port(),
            0,
            0,
        ))),
        SocketAddr::V6(_) => bail!("--v6-mapped needs an IPv4 --to, got {to}"),
    }
}

async fn grpc_server(name: String, listen: SocketAddr) -> Result<()> {
    let pod = http::HeaderValue::from_str(&name).context("--name must be a valid header value")?;
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    print_line("ready")?;
    let add_pod_header = tower::util::MapResponseLayer::new(
        move |mut response: http::Response<tonic::body::Body>| {
            response.headers_mut().insert(POD_HEADER, pod.clone());
            response
        },
    );
    // SIGTERM is a pod's graceful termination: stop accepting, send GOAWAY,
    // finish the calls in flight, then exit; SIGKILL (the kubelet's, once the
    // grace period is over) is modelled by DRAIN_TIMEOUT.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("handling SIGTERM")?;
    let terminating = std::sync::Arc::new(tokio::sync::Notify::new());
    let shutdown = {
        let terminating = terminating.clone();
        async move {
            terminate.recv().await;
            terminating.notify_one();
        }
    };
    let server = Server::builder()
        .layer(add_pod_header)
        .add_service(health)
        .add_service(StreamService)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown,
        );
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => return served.context("serving gRPC"),
        () = terminating.notified() => {}
    }
    match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
        Ok(served) => served.context("serving gRPC while draining"),
        // Clients that keep their connections past the grace period lose them.
        Err(_) => Ok(()),
    }
}

fn whoami(name: &str, listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    print_line("ready")?;
    let greeting = format!("{name}\n");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let greeting = greeting.clone();
        std::thread::spawn(move || {
            if stream.write_all(greeting.as_bytes()).is_ok() {
                // Holding the connection until the client closes keeps it
                // counted as live on the client's node.
                let _ = std::io::copy(&mut stream, &mut std::io::sink());
            }
        });
    }
    Ok(())
}

/// One connect(), then getpeername and the whoami line.
fn connect_once(target: SocketAddr) -> (ConnectAttempt, Option<TcpStream>) {
    let started = Instant::now();
    let result = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT);
    let elapsed_us = started.elapsed().as_micros() as u64;
    let failed = |error: String| ConnectAttempt {
        pod: None,
        peer: None,
        error: Some(error),
        elapsed_us,
    };
    let mut stream = match result {
        Ok(stream) => stream,
        Err(e) => return (failed(errno_name(&e)), None),
    };
    let peer = stream.peer_addr().ok();
    match read_name(&mut stream) {
        Ok(pod) => (
            ConnectAttempt {
                pod: Some(pod),
                peer,
                error: None,
                elapsed_us,
            },
            Some(stream),
        ),
        Err(e) => {
            let _ = stream.shutdown(Shutdown::Both);
            (
                ConnectAttempt {
                    peer,
                    ..failed(format!("reading the whoami line: {e:#}"))
                },
                None,
            )
        }
    }
}

struct ChurnPlan {
    to: Vec<SocketAddr>,
    refused: SocketAddr,
    threads: u64,
    connections: u64,
    hold_every: u64,
}

/// Thread `t` of `n` makes attempts `t, t+n, t+2n, ...`.
fn churn(plan: &ChurnPlan) -> (ChurnReport, Vec<TcpStream>) {
    let started = Instant::now();
    let (mut report, mut held) = (ChurnReport::default(), Vec::new());
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..plan.threads)
            .map(|first| scope.spawn(move || churn_thread(plan, first)))
            .collect();
        for worker in workers {
            let (part, streams) = worker.join().expect("churn thread panicked");
            report.merge(part);
            held.extend(streams);
        }
    });
    report.seconds = started.elapsed().as_secs_f64();
    (report, held)
}

fn churn_thread(plan: &ChurnPlan, first: u64) -> (ChurnReport, Vec<TcpStream>) {
    let (mut report, mut held) = (ChurnReport::default(), Vec::new());
    let mut kept = 0u64;
    for n in (first..plan.connections).step_by(plan.threads as usize) {
        let kind = ChurnKind::of_attempt(n);
        let to = match kind {
            ChurnKind::Refused | ChurnKind::RefusedAbandoned => plan.refused,
            _ => plan.to[(n / ChurnKind::ALL.len() as u64) as usize % plan.to.len()],
        };
        let (outcome, stream) = churn_once(kind, to);
        report.attempts += 1;
        *report
            .outcomes
            .entry(kind)
            .or_default()
            .entry(outcome)
            .or_default() += 1;
        if let Some((pod, stream)) = stream {
            kept += 1;
            if plan.hold_every > 0 && kept.is_multiple_of(plan.hold_every) {
                *report.held.entry(pod).or_default() += 1;
                held.push(stream);
            }
        }
    }
    (report, held)
}

/// One attempt of `kind`; returns how its connect() ended, and the
/// connection with its whoami name when it got that far and is still open.
fn churn_once(kind: ChurnKind, to: SocketAddr) -> (String, Option<(String, TcpStream)>) {
    match kind {
        ChurnKind::Graceful | ChurnKind::Reset | ChurnKind::Refused => {
            let mut stream = match TcpStream::connect_timeout(&to, CONNECT_TIMEOUT) {
                Ok(stream) => stream,
                Err(e) => return (errno_name(&e), None),
            };
            let name = match read_name(&mut stream) {
                Ok(name) => name,
                Err(e) => return (format!("connected, no whoami line: {e:#}"), None),
            };
            if kind == ChurnKind::Reset {
                // The stream drops right here, with a RST instead of a FIN.
                return (reset_on_close(&stream), None);
            }
            ("connected".into(), Some((name, stream)))
        }
        ChurnKind::Abandoned | ChurnKind::RefusedAbandoned => (connect_and_abandon(to), None),
    }
}

/// `SO_LINGER` {on, 0}: close() sends a RST and frees the socket at once.
fn reset_on_close(stream: &TcpStream) -> String {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized option value.
    let set = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if set == 0 {
        "connected".into()
    } else {
        format!(
            "SO_LINGER: {}",
            errno_name(&std::io::Error::last_os_error())
        )
    }
}

/// A non-blocking connect() whose socket is closed as soon as it returns.
fn connect_and_abandon(to: SocketAddr) -> String {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, SockaddrStorage};
    let family = if to.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let socket = match socket(family, SockType::Stream, SockFlag::SOCK_NONBLOCK, None) {
        Ok(socket) => socket,
        Err(e) => return format!("socket: {e:?}"),
    };
    let outcome = match connect(
        std::os::fd::AsRawFd::as_raw_fd(&socket),
        &SockaddrStorage::from(to),
    ) {
        Ok(()) => "connected".into(),
        Err(nix::errno::Errno::EINPROGRESS) => "in-progress".into(),
        Err(e) => format!("{e:?}"),
    };
    drop(socket);
    outcome
}

fn read_name(stream: &mut TcpStream) -> Result<String> {
    stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(Read::by_ref(stream).take(256))
        .read_line(&mut line)
        .context("reading")?;
    match line.strip_suffix('\n') {
        Some(name) => Ok(name.to_string()),
        None => bail!("connection closed before a full line: {line:?}"),
    }
}

/// `grpclb.test.Stream`, written out by hand as tonic-build would generate it
/// (there is no protoc here and the messages are raw bytes).
#[derive(Clone)]
struct StreamService;

impl tonic::server::NamedService for StreamService {
    const NAME: &'static str = grpc_stream::SERVICE_NAME;
}

impl tower::Service<http::Request<tonic::body::Body>> for StreamService {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() != grpc_stream::DOWNLOAD_PATH {
            return Box::pin(async { Ok(tonic::Status::unimplemented("").into_http()) });
        }
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(grpc_stream::RawCodec);
            Ok(grpc.server_streaming(Download, request).await)
        })
    }
}

struct Download;

type MessageStream = futures::stream::BoxStream<'static, Result<bytes::Bytes, tonic::Status>>;

impl tonic::server::ServerStreamingService<bytes::Bytes> for Download {
    type Response = bytes::Bytes;
    type ResponseStream = MessageStream;
    type Future =
        futures::future::BoxFuture<'static, Result<tonic::Response<MessageStream>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<bytes::Bytes>) -> Self::Future {
        Box::pin(async move {
            let asked = StreamRequest::decode(request.get_ref())
                .map_err(|e| tonic::Status::invalid_argument(format!("{e:#}")))?;
            let interval = Duration::from_millis(asked.interval_ms.into());
            let messages = futures::stream::unfold(0, move |index| async move {
                if index == asked.messages {
                    return None;
                }
                if index > 0 {
                    tokio::time::sleep(interval).await;
                }
                Some((Ok(asked.message(index)), index + 1))
            });
            Ok(tonic::Response::new(Box::pin(messages) as MessageStream))
        })
    }
}

fn errno_name(error: &std::io::Error) -> String {
    match error.raw_os_error() {
        Some(code) => format!("{:?}", nix::errno::Errno::from_raw(code)),
        None => error.to_string(),
    }
}

/// The report, and the channels (still connected) for the caller to hold.
struct LoadPlan {
    connections: u64,
    /// Per channel, at least.
    rpcs: u64,
    until_file: Option<PathBuf>,
    timeline_ms: u64,
    unary: bool,
    streams: Option<StreamPlan>,
}

#[derive(Clone, Copy)]
struct StreamPlan {
    asked: StreamRequest,
    read_delay: Duration,
    window: Option<u32>,
    read_rate: Option<u64>,
}

async fn grpc_load(to: String, plan: LoadPlan) -> Result<(LoadReport, Vec<Channel>)> {
    let mut endpoint = Endpoint::from_shared(to.clone())
        .with_context(|| format!("bad --to {to}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(RPC_TIMEOUT);
    let window = plan.streams.and_then(|s| {
        // HTTP/2's default windows, not hyper's larger ones: a slow reader
        // then holds the server back through flow control, as over a
        // slow network, instead of being buffered in memory.
        s.window
            .or((!s.read_delay.is_zero()).then_some(HTTP2_DEFAULT_WINDOW))
    });
    if let Some(window) = window {
        endpoint = endpoint
            .initial_stream_window_size(Some(window))
            .initial_connection_window_size(Some(window));
    }
    let read_rate = plan.streams.and_then(|s| s.read_rate);
    let mut report = LoadReport::default();
    let started = Instant::now();
    let mut channels = Vec::new();
    // One after another, so each connection is established (and counted by
    // the balancer) before the next connect() chooses a backend.
    for _ in 0..plan.connections {
        let connected = match read_rate {
            Some(rate) => {
                endpoint
                    .connect_with_connector(throttled_connector(rate))
                    .await
            }
            None => endpoint.connect().await,
        };
        match connected {
            Ok(channel) => channels.push(channel),
            Err(e) => record_failure(&mut report, format!("connecting to {to}: {e:?}")),
        }
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(
        plan.until_file.is_none(),
    ));
    if let Some(file) = plan.until_file {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !file.exists() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }
    let retried = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut unary_tasks = Vec::new();
    let mut stream_tasks = Vec::new();
    for channel in &channels {
        if plan.unary {
            let channel = channel.clone();
            unary_tasks.push(tokio::spawn(call_until_stopped(
                "health check",
                plan.rpcs,
                stop.clone(),
                started,
                retried.clone(),
                move || check_health(channel.clone()),
            )));
        }
        if let Some(streams) = plan.streams {
            let channel = channel.clone();
            stream_tasks.push(tokio::spawn(call_until_stopped(
                "download",
                1,
                stop.clone(),
                started,
                retried.clone(),
                move || download(channel.clone(), streams.asked, streams.read_delay),
            )));
        }
    }
    for task in stream_tasks {
        for (_, answer) in task.await.context("download task panicked")? {
            match answer {
                Ok(pod) => *report.streams_per_pod.entry(pod).or_insert(0) += 1,
                Err(e) => record_failure(&mut report, e),
            }
        }
    }
    for task in unary_tasks {
        let answers = task.await.context("load task panicked")?;
        let mut pods = BTreeSet::new();
        for (at, answer) in answers {
            match answer {
                Ok(pod) => {
                    report.ok += 1;
                    *report.per_pod.entry(pod.clone()).or_insert(0) += 1;
                    if let Some(bucket) = (at.as_millis() as u64).checked_div(plan.timeline_ms) {
                        let bucket = bucket as usize;
                        if report.timeline.len() <= bucket {
                            report.timeline.resize(bucket + 1, Default::default());
                        }
                        *report.timeline[bucket].entry(pod.clone()).or_insert(0) += 1;
                    }
                    pods.insert(pod);
                }
                Err(e) => record_failure(&mut report, e),
            }
        }
        if pods.len() > 1 {
            report.mixed_channels += 1;
        }
        if let Some(pod) = pods.into_iter().next() {
            *report.channels_per_pod.entry(pod).or_insert(0) += 1;
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.retried_unsent = retried.load(std::sync::atomic::Ordering::Relaxed);
    Ok((report, channels))
}

/// Connects as tonic would, then reads the socket at most `rate` bytes per
/// second.
fn throttled_connector(
    rate: u64,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<Throttled>,
    Error = std::io::Error,
    Future = impl Send,
> + Send
       + 'static {
    tower::service_fn(move |uri: http::Uri| async move {
        let authority = uri
            .authority()
            .ok_or_else(|| std::io::Error::other(format!("no host:port in {uri}")))?
            .to_string();
        let stream = tokio::net::TcpStream::connect(authority).await?;
        stream.set_nodelay(true)?;
        Ok(hyper_util::rt::TokioIo::new(Throttled::new(stream, rate)))
    })
}

/// A socket read at most `rate` bytes per second, in reads of at most 10 ms
/// worth; writes go through unchanged.
struct Throttled {
    inner: tokio::net::TcpStream,
    rate: u64,
    next_read: tokio::time::Instant,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Throttled {
    fn new(inner: tokio::net::TcpStream, rate: u64) -> Throttled {
        let now = tokio::time::Instant::now();
        Throttled {
            inner,
            rate,
            next_read: now,
            sleep: Box::pin(tokio::time::sleep_until(now)),
        }
    }
}

impl tokio::io::AsyncRead for Throttled {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future;
        use std::task::Poll;
        let this = self.get_mut();
        if tokio::time::Instant::now() < this.next_read {
            this.sleep.as_mut().reset(this.next_read);
            if this.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        let most = (this.rate / 100).max(1) as usize;
        let mut limited = buf.take(most);
        match std::pin::Pin::new(&mut this.inner).poll_read(cx, &mut limited) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        let n = limited.filled().len();
        // SAFETY: the inner read initialised these `n` bytes of `buf`.
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        let start = this.next_read.max(tokio::time::Instant::now());
        this.next_read = start + Duration::from_secs_f64(n as f64 / this.rate as f64);
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Throttled {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Body chunks of the bulk server: gRPC's default 16 KiB DATA frames split
/// each into many frames, as a streaming response would be.
const BULK_CHUNK: usize = 1 << 20;

async fn h2_bulk_server(listen: SocketAddr, mib: u64, name: String) -> Result<()> {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    print_line("ready")?;
    let chunk = bytes::Bytes::from(vec![0x5a; BULK_CHUNK]);
    loop {
        let (stream, _) = listener.accept().await.context("accepting")?;
        let chunk = chunk.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_request| {
                let chunk = chunk.clone();
                let name = name.clone();
                async move {
                    let frames = futures::stream::iter((0..mib).map(move |_| {
                        Ok::<_, std::convert::Infallible>(Frame::data(chunk.clone()))
                    }));
                    let mut response = http::Response::new(StreamBody::new(frames));
                    if let Ok(value) = http::HeaderValue::from_str(&name) {
                        response.headers_mut().insert(POD_HEADER, value);
                    }
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn h2_download(to: SocketAddr, requests: u64) -> Result<grpclb_tests::DownloadReport> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect(to)
        .await
        .with_context(|| format!("connecting to {to}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            // Bulk-friendly windows: the sender, not flow control, sets the pace.
            .initial_stream_window_size(16 << 20)
            .initial_connection_window_size(32 << 20)
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .context("HTTP/2 handshake")?;
    tokio::spawn(connection);
    let started = Instant::now();
    let mut bytes = 0u64;
    for _ in 0..requests {
        let request = http::Request::get(format!("http://{to}/"))
            .body(Empty::<bytes::Bytes>::new())
            .context("building the request")?;
        let mut body = sender
            .send_request(request)
            .await
            .context("sending the request")?
            .into_body();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.context("reading the body")?.into_data() {
                bytes += data.len() as u64;
            }
        }
    }
    Ok(grpclb_tests::DownloadReport {
        bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn record_failure(report: &mut LoadReport, error: String) {
    report.failures += 1;
    if report.errors.len() < ERRORS_KEPT {
        report.errors.push(error);
    }
}

/// The server never saw the request: hyper cancels a request it had not
/// written yet when its connection closes ("connection closed"), and h2
/// refuses a request made after the server's GOAWAY came in (GoAway
/// NO_ERROR: the call picked the connection just before the client read
/// the GOAWAY). Streams opened before the GOAWAY go on; a connection that
/// closes under them fails them with a broken pipe, which is not retried.
fn never_sent(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(error) = source {
        if error
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return true;
        }
        if error.downcast_ref::<h2::Error>().is_some_and(|e| {
            e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR)
        }) {
            return true;
        }
        source = error.source();
    }
    false
}

/// Calls one after another: at least `at_least`, and until `stop` is set;
/// each answer is the responding pod (or what went wrong, prefixed with
/// `what`), with when it came (since `started`).
async fn call_until_stopped<F, Fut>(
    what: &'static str,
    at_least: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    started: Instant,
    retried: std::sync::Arc<std::sync::atomic::AtomicU64>,
    mut call: F,
) -> Vec<(Duration, Result<String, String>)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<String, tonic::Status>>,
{
    let mut answers = Vec::new();
    while (answers.len() as u64) < at_least || !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let mut result = call().await;
        // gRPC's transparent retry, which tonic lacks: a call that never left
        // the client (its connection closed after a GOAWAY before the call
        // was written) is tried again, once, as grpc-go, C-core and Java do.
        if result.as_ref().is_err_and(never_sent) {
            retried.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            result = call().await;
        }
        let answer = result.map_err(|status| format!("{what}: {status}"));
        answers.push((started.elapsed(), answer));
    }
    answers
}

fn pod_of(metadata: &tonic::metadata::MetadataMap) -> Result<String, tonic::Status> {
    metadata
        .get(POD_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .ok_or_else(|| tonic::Status::internal(format!("response without {POD_HEADER}")))
}

/// One unary grpc.health.v1 Check; the answering pod.
async fn check_health(channel: Channel) -> Result<String, tonic::Status> {
    let request = HealthCheckRequest {
        service: String::new(),
    };
    let response = HealthClient::new(channel).check(request).await?;
    pod_of(response.metadata())
}

/// One server-streaming Download, every message read (after `read_delay`
/// each) and checked; the answering pod.
async fn download(
    channel: Channel,
    asked: StreamRequest,
    read_delay: Duration,
) -> Result<String, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("channel not ready: {e}")))?;
    let path = http::uri::PathAndQuery::from_static(grpc_stream::DOWNLOAD_PATH);
    let response = grpc
        .server_streaming(
            tonic::Request::new(asked.encode()),
            path,
            grpc_stream::RawCodec,
        )
        .await?;
    let pod = pod_of(response.metadata())?;
    let mut messages = response.into_inner();
    let mut received = 0;
    while let Some(message) = messages.message().await? {
        asked
            .check(received, &message)
            .map_err(|e| tonic::Status::data_loss(format!("{e:#} (from {pod})")))?;
        received += 1;
        if !read_delay.is_zero() {
            tokio::time::sleep(read_delay).await;
        }
    }
    if received != asked.messages {
        return Err(tonic::Status::data_loss(format!(
            "{received} of {} messages (from {pod})",
            asked.messages
        )));
    }
    Ok(pod)
}
