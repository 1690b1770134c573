//! What `testpod connect` and `testpod grpc-load` print (one JSON line each),
//! shared by the binary and the tests that parse it.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One `connect()` attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectAttempt {
    /// The name the whoami server sent, when connected.
    pub pod: Option<String>,
    /// `getpeername()` on the client socket.
    pub peer: Option<SocketAddr>,
    /// errno name (`ECONNREFUSED`) or another failure description.
    pub error: Option<String>,
    /// Duration of the `connect()` call.
    pub elapsed_us: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectReport {
    pub attempts: Vec<ConnectAttempt>,
}

impl ConnectReport {
    pub fn parse(line: &str) -> Result<Self> {
        serde_json::from_str(line).with_context(|| format!("parsing connect report {line:?}"))
    }

    /// Connections per whoami name.
    pub fn per_pod(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for pod in self.attempts.iter().filter_map(|a| a.pod.as_ref()) {
            *counts.entry(pod.clone()).or_insert(0) += 1;
        }
        counts
    }

    pub fn failures(&self) -> Vec<&ConnectAttempt> {
        self.attempts.iter().filter(|a| a.error.is_some()).collect()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Successful RPCs per `x-pod` response header.
    pub per_pod: BTreeMap<String, u64>,
    /// Channels (one HTTP/2 connection each) per pod that answered them.
    pub channels_per_pod: BTreeMap<String, u64>,
    /// Channels whose RPCs were answered by more than one pod.
    pub mixed_channels: u64,
    pub ok: u64,
    pub failures: u64,
    /// The first few failure messages.
    pub errors: Vec<String>,
    /// From the first connect to the last answer.
    #[serde(default)]
    pub seconds: f64,
    /// Calls retried because they never left the client (see `testpod`).
    #[serde(default)]
    pub retried_unsent: u64,
    /// Successes per pod in consecutive time buckets (`--timeline-ms`).
    #[serde(default)]
    pub timeline: Vec<BTreeMap<String, u64>>,
    /// Server-streaming calls (`grpc_stream`) that delivered every message
    /// whole, per pod; their failures count in `failures`.
    #[serde(default)]
    pub streams_per_pod: BTreeMap<String, u64>,
}

impl LoadReport {
    pub fn streams_ok(&self) -> u64 {
        self.streams_per_pod.values().sum()
    }
}

/// What `testpod h2-script-server` did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ScriptWriteReport {
    pub bytes: u64,
    pub writes: u64,
    /// Writes that took fewer bytes than offered.
    pub partial_writes: u64,
    /// Writes refused with EAGAIN (the send buffer was full).
    pub would_block: u64,
    /// Waits until nothing was left unsent.
    pub flushes: u64,
}

/// What `testpod h2-script-client` received.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ScriptReadReport {
    pub received: u64,
    pub reads: u64,
    /// Where a GOAWAY was found, at an allowed boundary.
    pub goaway_at: Option<u64>,
    /// Why the stream is not the script plus at most one well-placed GOAWAY.
    pub error: Option<String>,
}

/// What `testpod h2-download` measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DownloadReport {
    pub bytes: u64,
    pub seconds: f64,
}

impl DownloadReport {
    pub fn parse(line: &str) -> Result<Self> {
        serde_json::from_str(line).with_context(|| format!("parsing download report {line:?}"))
    }
}

impl LoadReport {
    pub fn parse(line: &str) -> Result<Self> {
        serde_json::from_str(line).with_context(|| format!("parsing load report {line:?}"))
    }
}

/// What `testpod churn` does with one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChurnKind {
    /// Connect, read the whoami line, close (FIN).
    Graceful,
    /// Connect, read the whoami line, close with `SO_LINGER` 0 (RST).
    Reset,
    /// Non-blocking connect, closed at once: the close races the handshake.
    Abandoned,
    /// Connect to the refusing frontend: its backend answers with a RST.
    Refused,
    /// Non-blocking connect to the refusing frontend, closed at once.
    RefusedAbandoned,
}

impl ChurnKind {
    pub const ALL: [ChurnKind; 5] = [
        ChurnKind::Graceful,
        ChurnKind::Reset,
        ChurnKind::Abandoned,
        ChurnKind::Refused,
        ChurnKind::RefusedAbandoned,
    ];

    /// The kind of attempt number `n`: the kinds take turns, so every
    /// thread and every phase of a run sees all of them.
    pub fn of_attempt(n: u64) -> ChurnKind {
        Self::ALL[(n % Self::ALL.len() as u64) as usize]
    }
}

/// What `testpod churn` did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChurnReport {
    pub attempts: u64,
    /// Per kind, how its `connect()` ended: `connected`, `in-progress`
    /// (non-blocking), or an errno name.
    pub outcomes: BTreeMap<ChurnKind, BTreeMap<String, u64>>,
    /// Connections left open (every `--hold-every`th that read its whoami
    /// line), per whoami name.
    pub held: BTreeMap<String, u64>,
    pub seconds: f64,
}

impl ChurnReport {
    pub fn parse(line: &str) -> Result<Self> {
        serde_json::from_str(line).with_context(|| format!("parsing churn report {line:?}"))
    }

    /// Attempts of `kind` that ended as `outcome`.
    pub fn count(&self, kind: ChurnKind, outcome: &str) -> u64 {
        self.outcomes
            .get(&kind)
            .and_then(|o| o.get(outcome))
            .copied()
            .unwrap_or(0)
    }

    /// Adds the attempts of another thread.
    pub fn merge(&mut self, other: ChurnReport) {
        self.attempts += other.attempts;
        for (kind, outcomes) in other.outcomes {
            let mine = self.outcomes.entry(kind).or_default();
            for (outcome, n) in outcomes {
                *mine.entry(outcome).or_default() += n;
            }
        }
        for (pod, n) in other.held {
            *self.held.entry(pod).or_default() += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_takes_its_turn() {
        let kinds: Vec<ChurnKind> = (0..10).map(ChurnKind::of_attempt).collect();
        assert_eq!(&kinds[..5], &ChurnKind::ALL);
        assert_eq!(&kinds[5..], &ChurnKind::ALL);
    }

    #[test]
    fn merged_reports_add_up_and_round_trip() {
        let mut a = ChurnReport {
            attempts: 2,
            ..ChurnReport::default()
        };
        a.outcomes
            .entry(ChurnKind::Reset)
            .or_default()
            .insert("connected".into(), 2);
        a.held.insert("b0".into(), 1);
        let mut b = a.clone();
        b.outcomes
            .entry(ChurnKind::Refused)
            .or_default()
            .insert("ECONNREFUSED".into(), 3);
        a.merge(b);
        assert_eq!(a.attempts, 4);
        assert_eq!(a.count(ChurnKind::Reset, "connected"), 4);
        assert_eq!(a.count(ChurnKind::Refused, "ECONNREFUSED"), 3);
        assert_eq!(a.count(ChurnKind::Abandoned, "connected"), 0);
        assert_eq!(a.held["b0"], 2);
        let line = serde_json::to_string(&a).unwrap();
        assert_eq!(ChurnReport::parse(&line).unwrap(), a);
    }
}
