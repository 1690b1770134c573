//! Byte for byte: a raw HTTP/2 writer in a pod of the node (non-blocking,
//! hundreds of partial writes, a slow reader on the other end) while this
//! test, as the injector, tries to write a GOAWAY through the kernel gate
//! every few hundred microseconds. What the client receives must be the
//! script plus exactly one well-formed GOAWAY at a frame boundary where one
//! may go, or the script alone when none may go. Never anything else.

#[allow(dead_code)]
mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;
use common::*;
use grpclb_agent::dataplane::pinned::PinnedTables;
use grpclb_agent::rebalance::inject::{Attempt, Injector};
use grpclb_common::frame::Phase;
use grpclb_common::TrackedConnection;
use grpclb_tests::h2script::Script;
use grpclb_tests::{
    spawn, testpod_bin, wait_until, ScriptReadReport, ScriptWriteReport, ServiceDef,
};

const PORT: u16 = 50081;
const ATTEMPT_INTERVAL: Duration = Duration::from_micros(300);

struct Case {
    script: Script,
    frames: u32,
    frame_bytes: u32,
    flush_every: u32,
    /// After flushes at boundaries where a GOAWAY may go, and elsewhere.
    pause_ms: u64,
    pause_elsewhere_ms: u64,
    /// The client's sleep after each read of at most 16 KiB.
    read_delay_us: u64,
    /// The injector starts once the server has sent this many bytes.
    attempts_from: u64,
}

struct Outcome {
    written: ScriptWriteReport,
    read: ScriptReadReport,
    /// Attempts by result, before and after the first GOAWAY went in.
    attempts_before: BTreeMap<&'static str, u64>,
    attempts_after: BTreeMap<&'static str, u64>,
    connection: TrackedConnection,
    /// The server's unsent bytes just before the attempt that went in.
    unsent_before_goaway: Option<i32>,
}

fn script_args(case: &Case) -> Vec<String> {
    let script = match case.script {
        Script::Data => "data",
        Script::Continuation => "continuation",
        Script::ServerGoaway => "server-goaway",
        Script::Tls => "tls",
    };
    [
        "--script",
        script,
        "--frames",
        &case.frames.to_string(),
        "--frame-bytes",
        &case.frame_bytes.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

fn run(name: &str, case: Case) -> Result<Outcome> {
    let mut cluster = TestCluster::new(name, 1)?;
    let node_name = cluster.node.name().to_string();
    let mut server_cmd = Command::new(testpod_bin());
    server_cmd
        .args(["h2-script-server", "--listen", &format!("[::]:{PORT}")])
        .args(script_args(&case))
        .args(["--flush-every", &case.flush_every.to_string()])
        .args(["--pause-ms", &case.pause_ms.to_string()])
        .args(["--pause-elsewhere-ms", &case.pause_elsewhere_ms.to_string()]);
    let mut server = spawn(&cluster.backends[0], Some(&cluster.node), server_cmd)?;
    server.expect_line("ready", Duration::from_secs(10))?;
    let pod_ip = cluster.v4s(&[0])[0];
    let pod = SocketAddr::new(pod_ip, PORT);
    // Rebalancing off: this test is the only writer of GOAWAYs.
    cluster.start_agent_with(
        &[ServiceDef::grpc(name, v4_vip(130), 80, PORT)
            .backend_on(pod_ip, &node_name)
            .tracking_frames()],
        &["--no-rebalance"],
    )?;

    let mut client_cmd = Command::new(testpod_bin());
    client_cmd
        .args(["h2-script-client", "--to", &pod.to_string()])
        .args(["--read-delay-us", &case.read_delay_us.to_string()])
        .args(script_args(&case));
    let mut client = spawn(&cluster.client, None, client_cmd)?;

    let tables = PinnedTables::open(cluster.bpffs.path())?;
    let want = backend(pod);
    let (cookie, connection) =
        wait_until("the tracked connection", Duration::from_secs(10), || {
            Ok(tables
                .tracked_connections()?
                .into_iter()
                .find(|(_, c)| c.backend == want))
        })?;
    let mut injector = Injector::open(cluster.bpffs.path(), cluster.node.path())?;
    // Until the server accepts it, the socket is in no process's fd table.
    let socket = wait_until(
        "the server's socket in the node's processes",
        Duration::from_secs(5),
        || injector.locate(cookie, &connection),
    )?;
    wait_until(
        "the server's first bytes out",
        Duration::from_secs(30),
        || {
            let sent = tables
                .tracked_connections()?
                .into_iter()
                .any(|(c, t)| c == cookie && t.tracker.next_offset() >= case.attempts_from);
            Ok(sent.then_some(()))
        },
    )?;
    let mut unsent_before_goaway = None;
    let mut attempts_before = BTreeMap::new();
    let mut attempts_after = BTreeMap::new();
    let mut sent = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.try_wait().is_none() && Instant::now() < deadline {
        if server.try_wait().is_some() {
            anyhow::bail!("the script server exited early: {}", server.stderr_so_far());
        }
        let unsent = unsent_bytes(&socket);
        let attempt = injector.write(cookie, &connection, &socket)?;
        if attempt == Attempt::Sent {
            unsent_before_goaway = unsent;
        }
        let tally = if sent {
            &mut attempts_after
        } else {
            &mut attempts_before
        };
        *tally.entry(attempt.label()).or_insert(0) += 1;
        sent |= attempt == Attempt::Sent;
        if attempt == Attempt::SocketGone {
            break;
        }
        std::thread::sleep(ATTEMPT_INTERVAL);
    }
    let connection = tables
        .tracked_connections()?
        .into_iter()
        .find(|(c, _)| *c == cookie)
        .map(|(_, c)| c)
        .unwrap_or(connection);
    let read: ScriptReadReport = serde_json::from_str(&client.read_line(Duration::from_secs(60))?)?;
    let written: ScriptWriteReport =
        serde_json::from_str(&server.read_line(Duration::from_secs(30))?)?;
    eprintln!(
        "{name}: {written:?}\n{name}: {read:?}\n{name}: attempts before the GOAWAY {attempts_before:?}, after {attempts_after:?}"
    );
    Ok(Outcome {
        written,
        read,
        attempts_before,
        attempts_after,
        connection,
        unsent_before_goaway,
    })
}

/// SIOCOUTQNSD on a duplicate of the pod's socket: bytes written, not sent.
fn unsent_bytes(socket: &grpclb_agent::rebalance::inject::SocketHandle) -> Option<i32> {
    use std::os::fd::AsRawFd;
    const SIOCOUTQNSD: libc::c_ulong = 0x894b;
    let fd = grpclb_agent::rebalance::inject::duplicate(socket.pid, socket.fd).ok()?;
    let mut unsent: libc::c_int = 0;
    // SAFETY: the ioctl writes one int.
    (unsafe { libc::ioctl(fd.as_raw_fd(), SIOCOUTQNSD, &mut unsent) } == 0).then_some(unsent)
}

/// One GOAWAY went in, at an allowed boundary, and every later attempt was
/// refused.
fn assert_one_goaway(outcome: &Outcome) {
    assert_eq!(outcome.read.error, None, "{:?}", outcome.read);
    assert!(outcome.read.goaway_at.is_some(), "{:?}", outcome.read);
    assert_eq!(outcome.attempts_before.get("sent"), Some(&1));
    assert_eq!(outcome.attempts_after.get("sent"), None);
    assert!(
        outcome.connection.tracker.goaway_seen() || outcome.connection.tracker.injected(),
        "{:?}",
        outcome.connection
    );
}

fn assert_many_partial_writes(outcome: &Outcome) {
    let w = &outcome.written;
    assert!(
        w.partial_writes + w.would_block >= 100,
        "too few partial writes to mean anything: {w:?}"
    );
}

#[test]
fn one_mib_frames_under_backpressure_get_exactly_one_goaway_at_a_boundary() -> Result<()> {
    let outcome = run(
        "gate1m",
        Case {
            script: Script::Data,
            frames: 24,
            frame_bytes: 1 << 20,
            flush_every: 4,
            pause_ms: 5,
            pause_elsewhere_ms: 0,
            read_delay_us: 1000,
            attempts_from: 0,
        },
    )?;
    assert_one_goaway(&outcome);
    assert_many_partial_writes(&outcome);
    assert!(
        outcome.attempts_before.contains_key("not_at_boundary"),
        "the gate was never asked mid-frame: {:?}",
        outcome.attempts_before
    );
    Ok(())
}

/// The writer never waits for its queue to drain and the reader takes
/// 16 KiB per 20 ms, so once the first MiB is out (the injector starts then)
/// the queue is never empty before the end. Whenever the writer has finished
/// a 1 MiB frame and waits, the unsent bytes are the rest of that frame (the
/// send buffer holds far less than a frame): the gate knows where it ends
/// and lets the GOAWAY in right after it, long before the end.
#[test]
fn a_goaway_goes_after_the_rest_of_the_frame_being_sent_while_the_queue_never_empties() -> Result<()>
{
    const FRAMES: u64 = 8;
    let outcome = run(
        "gatetail",
        Case {
            script: Script::Data,
            frames: FRAMES as u32,
            frame_bytes: 1 << 20,
            flush_every: 0,
            pause_ms: 5,
            pause_elsewhere_ms: 0,
            read_delay_us: 20_000,
            attempts_from: 1 << 20,
        },
    )?;
    assert_one_goaway(&outcome);
    let at = outcome.read.goaway_at.expect("checked above");
    assert!(
        at > 1 << 20 && at < (FRAMES - 1) << 20,
        "the GOAWAY went in at {at}: before the attempts began, or only once the queue \
         drained at the end"
    );
    // Bytes were unsent a moment before the gate passed the GOAWAY. The
    // writer was paused at the frame's end (it writes nothing then), and the
    // reader opens its window once per 20 ms, so the queue did not drain in
    // the microseconds between: the gate passed with the frame's tail unsent.
    let unsent = outcome.unsent_before_goaway.unwrap_or(0);
    eprintln!("gatetail: {unsent} bytes unsent just before the GOAWAY went in");
    assert!(unsent > 0, "the queue was empty: {:?}", outcome.read);
    Ok(())
}

#[test]
fn four_mib_frames_under_backpressure_get_exactly_one_goaway_at_a_boundary() -> Result<()> {
    let outcome = run(
        "gate4m",
        Case {
            script: Script::Data,
            frames: 8,
            frame_bytes: 4 << 20,
            flush_every: 2,
            pause_ms: 10,
            pause_elsewhere_ms: 0,
            read_delay_us: 1000,
            attempts_from: 0,
        },
    )?;
    assert_one_goaway(&outcome);
    assert_many_partial_writes(&outcome);
    Ok(())
}

#[test]
fn never_inside_a_headers_continuation_block() -> Result<()> {
    // Every frame is flushed on its own; the writer lingers inside header
    // blocks and hurries past boundaries, so most attempts meet a header
    // block, and the last boundary (before the close) lingers for the one
    // that is allowed.
    let outcome = run(
        "gatecont",
        Case {
            script: Script::Continuation,
            frames: 40,
            frame_bytes: 32 << 10,
            flush_every: 1,
            pause_ms: 0,
            pause_elsewhere_ms: 3,
            read_delay_us: 1000,
            attempts_from: 0,
        },
    )?;
    assert_one_goaway(&outcome);
    assert!(
        outcome.attempts_before.contains_key("not_at_boundary"),
        "the gate was never asked inside a header block: {:?}",
        outcome.attempts_before
    );
    Ok(())
}

/// A script where no GOAWAY may go, asked at every frame: the stream
/// arrives untouched.
fn never_injected(name: &str, script: Script) -> Result<Outcome> {
    let outcome = run(
        name,
        Case {
            script,
            frames: 16,
            frame_bytes: 256 << 10,
            flush_every: 1,
            pause_ms: 2,
            pause_elsewhere_ms: 2,
            read_delay_us: 1000,
            attempts_from: 0,
        },
    )?;
    assert_eq!(outcome.read.error, None, "{:?}", outcome.read);
    assert_eq!(outcome.read.goaway_at, None);
    assert_eq!(outcome.attempts_before.get("sent"), None);
    Ok(outcome)
}

#[test]
fn never_after_the_servers_own_goaway() -> Result<()> {
    let outcome = never_injected("gategoaway", Script::ServerGoaway)?;
    assert!(outcome.connection.tracker.goaway_seen());
    assert_eq!(outcome.connection.tracker.phase(), Phase::Frames);
    Ok(())
}

#[test]
fn never_into_tls() -> Result<()> {
    let outcome = never_injected("gatetls", Script::Tls)?;
    assert_eq!(outcome.connection.tracker.phase(), Phase::Untracked);
    Ok(())
}
