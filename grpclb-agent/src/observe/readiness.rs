//! Whether the running agent balances everything it was asked to: served on
//! `/readyz`, and recorded in a pinned one-entry map (`maps/AGENT_STATE`, the
//! bpf filesystem holds no plain files) so `grpclb-agent status` and the test
//! harness can tell without knowing the metrics address.
//!
//! Ready means: the programs are attached and the last sync put the whole
//! desired state into the maps. A fresh agent syncs its first complete state
//! before it attaches, so a connect is never balanced from empty maps.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use aya::maps::{Array, Map, MapData};
use aya::Pod;

use crate::dataplane::sync::SyncReport;
use crate::observe::metrics::Metrics;

/// The map's pin name, next to the balancer's maps.
pub const AGENT_STATE: &str = "AGENT_STATE";

const REASON_MAX: usize = 1004;

/// The map's value. Its size is a multiple of 8: no implicit padding.
#[repr(C)]
#[derive(Clone, Copy)]
struct Record {
    pid: u32,
    ready: u32,
    start_time: u64,
    reason_len: u32,
    reason: [u8; REASON_MAX],
}

// SAFETY: #[repr(C)], Copy, integers and a byte array without implicit
// padding: every bit pattern is valid.
unsafe impl Pod for Record {}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    /// Why not, when not ready.
    pub reason: String,
}

impl Readiness {
    pub fn ready() -> Readiness {
        Readiness {
            ready: true,
            reason: String::new(),
        }
    }

    pub fn not_ready(reason: impl Into<String>) -> Readiness {
        Readiness {
            ready: false,
            reason: reason.into(),
        }
    }

    /// After a sync, with the programs attached.
    pub fn after_sync(outcome: Result<&SyncReport, &anyhow::Error>) -> Readiness {
        match outcome {
            Ok(report) => report
                .problem()
                .map_or_else(Readiness::ready, Readiness::not_ready),
            Err(e) => Readiness::not_ready(format!("the last sync failed: {e:#}")),
        }
    }
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness::not_ready("starting")
    }
}

/// What an agent process recorded about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentState {
    pub pid: u32,
    /// The process's start time (clock ticks after boot), so a recycled pid
    /// is not taken for the agent.
    pub start_time: u64,
    pub readiness: Readiness,
}

impl AgentState {
    pub fn of_this_process(readiness: Readiness) -> Result<AgentState> {
        let pid = std::process::id();
        let start_time = process_start_time(pid)
            .with_context(|| format!("reading the start time of this process ({pid})"))?;
        Ok(AgentState {
            pid,
            start_time,
            readiness,
        })
    }

    /// Whether the process that wrote this state still runs.
    pub fn running(&self) -> bool {
        process_start_time(self.pid) == Some(self.start_time)
    }

    fn encode(&self) -> Record {
        let reason = &self.readiness.reason;
        let mut end = reason.len().min(REASON_MAX);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0u8; REASON_MAX];
        bytes[..end].copy_from_slice(&reason.as_bytes()[..end]);
        Record {
            pid: self.pid,
            ready: u32::from(self.readiness.ready),
            start_time: self.start_time,
            reason_len: end as u32,
            reason: bytes,
        }
    }

    fn decode(record: &Record) -> AgentState {
        let len = (record.reason_len as usize).min(REASON_MAX);
        AgentState {
            pid: record.pid,
            start_time: record.start_time,
            readiness: Readiness {
                ready: record.ready != 0,
                reason: String::from_utf8_lossy(&record.reason[..len]).into_owned(),
            },
        }
    }
}

/// The pinned `AGENT_STATE` map.
pub struct StateMap {
    map: Array<MapData, Record>,
}

impl StateMap {
    /// Opens the map pinned in `maps_dir`, creating and pinning it first if
    /// there is none (or one of another layout, from another version).
    pub fn create_or_open(maps_dir: &Path) -> Result<StateMap> {
        let path = maps_dir.join(AGENT_STATE);
        if let Ok(Some(map)) = StateMap::open(maps_dir) {
            return Ok(map);
        }
        if path.exists() {
            std::fs::remove_file(&path)
                .with_context(|| format!("removing {} (another layout)", path.display()))?;
        }
        Array::<MapData, Record>::create(1, 0)
            .with_context(|| format!("creating the {AGENT_STATE} map"))?
            .pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
        StateMap::open(maps_dir)?.with_context(|| format!("reopening {}", path.display()))
    }

    /// The pinned map, or `None` when nothing is pinned.
    pub fn open(maps_dir: &Path) -> Result<Option<StateMap>> {
        let path = maps_dir.join(AGENT_STATE);
        if !path.exists() {
            return Ok(None);
        }
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening the pinned map {}", path.display()))?;
        let map = Array::try_from(Map::Array(data))
            .with_context(|| format!("{} is not the expected array", path.display()))?;
        Ok(Some(StateMap { map }))
    }

    pub fn write(&mut self, state: &AgentState) -> Result<()> {
        self.map
            .set(0, state.encode(), 0)
            .with_context(|| format!("writing {AGENT_STATE}"))
    }

    /// The recorded state; `None` before any agent wrote one.
    pub fn read(&self) -> Result<Option<AgentState>> {
        let record = self
            .map
            .get(&0, 0)
            .with_context(|| format!("reading {AGENT_STATE}"))?;
        Ok((record.pid != 0).then(|| AgentState::decode(&record)))
    }
}

/// Publishes this agent's readiness on `/readyz` (through [`Metrics`]) and
/// in the pinned map, logging each change.
pub struct Recorder {
    map: StateMap,
    metrics: Arc<Metrics>,
    /// What was last published; `None` before the first [`Recorder::set`].
    published: Option<AgentState>,
}

impl Recorder {
    pub fn new(map: StateMap, metrics: Arc<Metrics>) -> Result<Recorder> {
        Ok(Recorder {
            map,
            metrics,
            published: None,
        })
    }

    /// Publishes `readiness` unless it is what was published last.
    pub fn set(&mut self, readiness: Readiness) -> Result<()> {
        if self.published.as_ref().map(|s| &s.readiness) == Some(&readiness) {
            return Ok(());
        }
        if readiness.ready {
            tracing::info!("ready");
        } else {
            tracing::warn!("not ready: {}", readiness.reason);
        }
        let state = AgentState::of_this_process(readiness)?;
        self.metrics.set_readiness(state.readiness.clone());
        self.map.write(&state)?;
        self.published = Some(state);
        Ok(())
    }
}

/// The agent state recorded under `maps_dir`, if any.
pub fn read(maps_dir: &Path) -> Result<Option<AgentState>> {
    match StateMap::open(maps_dir)? {
        Some(map) => map.read(),
        None => Ok(None),
    }
}

fn process_start_time(pid: u32) -> Option<u64> {
    parse_start_time(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Field 22 of `/proc/PID/stat`; the command name (field 2, in parentheses)
/// may hold spaces and parentheses, so fields are counted after its last `)`.
fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::sync::{FullMap, ServiceFailure};

    #[test]
    fn start_time_is_field_22_whatever_the_command_name() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 \
                    987654 1000000 200 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("4242 (x) S 1"), None);
    }

    #[test]
    fn this_process_is_running_and_a_recycled_pid_is_not() {
        let me = AgentState::of_this_process(Readiness::ready()).unwrap();
        assert!(me.running());
        let other = AgentState {
            start_time: me.start_time + 1,
            ..me.clone()
        };
        assert!(!other.running());
    }

    #[test]
    fn records_round_trip_and_long_reasons_are_cut_at_a_char_boundary() {
        let state = AgentState {
            pid: 7,
            start_time: 99,
            readiness: Readiness::not_ready("é".repeat(REASON_MAX)),
        };
        let back = AgentState::decode(&state.encode());
        assert_eq!((back.pid, back.start_time), (7, 99));
        assert!(!back.readiness.ready);
        assert_eq!(back.readiness.reason, "é".repeat(REASON_MAX / 2));
        assert_eq!(std::mem::size_of::<Record>() % 8, 0);
    }

    #[test]
    fn a_full_map_makes_the_agent_not_ready_and_says_which() {
        let mut report = SyncReport::default();
        assert_eq!(
            Readiness::after_sync(Ok(&report)),
            Readiness::ready(),
            "complete"
        );
        report.failed.push(ServiceFailure {
            name: "ns/b:grpc".into(),
            error: "FRONTENDS is 1 entry short".into(),
        });
        report.full.insert(
            "FRONTENDS",
            FullMap {
                map: "FRONTENDS",
                needed: 3,
                capacity: 2,
                services: vec!["ns/b:grpc".into()],
                short: 1,
            },
        );
        let readiness = Readiness::after_sync(Ok(&report));
        assert!(!readiness.ready);
        assert!(
            readiness.reason.starts_with(
                "FRONTENDS is full (2 entries): 1 short for ns/b:grpc; the desired state \
                 needs 3 (raise --max-frontends"
            ),
            "{}",
            readiness.reason
        );
        let failed = Readiness::after_sync(Err(&anyhow::anyhow!("reading FRONTENDS")));
        assert_eq!(failed.reason, "the last sync failed: reading FRONTENDS");
    }
}
