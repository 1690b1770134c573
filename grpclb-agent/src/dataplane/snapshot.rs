//! What the pinned maps held at one moment, with what follows from the
//! moment before: per-connection call rates and per-backend response
//! totals, computed once here for the rebalancer, `/metrics` and `status`.
//! Pure data and pure functions; the [`owner`](super::owner) reads the maps.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use grpclb_common::{Backend, MoveWaiting, TrackedConnection};

use super::tables::{LocalBackendTable, ServiceTables};
use crate::observe::status::{self, Status};

/// Weight of the newest sample in a connection's call rate.
const RPS_SMOOTHING: f64 = 0.5;

/// One connection's calls as followed across snapshots.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Responses (END_STREAM) the kernel counted on it so far.
    pub responses: u64,
    /// Smoothed calls per second; 0 until a second snapshot saw it.
    pub rps: f64,
    /// When a snapshot first saw it (ms on the owner's clock).
    pub first_seen_ms: u64,
}

/// The tables `status` and the gauges show; only in full snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    pub status: Status,
    /// Every `BACKEND_LOAD` entry: backend, live connections from this node.
    pub loads: Vec<(Backend, u64)>,
    pub slot_entries: u64,
    /// Every `LOCAL_LOAD` entry: a pod on this node, the connections it
    /// accepted from every node.
    pub local_loads: Vec<(Backend, u64)>,
    /// The moves the rebalancer reports as waiting (`MOVES_WAITING`).
    pub waiting: Vec<(u64, MoveWaiting)>,
}

impl Tables {
    pub fn read<T: ServiceTables + LocalBackendTable>(
        tables: &T,
        waiting: Vec<(u64, MoveWaiting)>,
    ) -> Result<Tables> {
        let loads = tables.loads().context("reading BACKEND_LOAD")?;
        Ok(Tables {
            status: status::collect_with(tables, &loads)?,
            slot_entries: tables.slot_entries().context("counting BACKEND_SLOTS")? as u64,
            local_loads: tables.local_loads().context("reading LOCAL_LOAD")?,
            loads,
            waiting,
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// When it was taken (ms on the owner's clock).
    pub taken_ms: u64,
    /// `TRACKED`: the connections of local pods whose frames the kernel
    /// follows, by socket cookie.
    pub tracked: Vec<(u64, TrackedConnection)>,
    /// By socket cookie, for every connection in `tracked`.
    pub rates: BTreeMap<u64, Rate>,
    /// Responses per local backend since the agent started: only grows
    /// (a connection's count is gone when it closes; what it answered
    /// since the snapshot before is not seen).
    pub responses: BTreeMap<Backend, u64>,
    /// `None` in the snapshots taken for the rebalancer alone.
    pub tables: Option<Tables>,
}

impl Snapshot {
    /// The same snapshot without its tables: what the next one follows
    /// on from.
    pub fn without_tables(&self) -> Snapshot {
        Snapshot {
            taken_ms: self.taken_ms,
            tracked: self.tracked.clone(),
            rates: self.rates.clone(),
            responses: self.responses.clone(),
            tables: None,
        }
    }

    /// The snapshot of `tracked` (and `tables`) at `taken_ms`, its rates
    /// and totals following on from `previous`.
    pub fn next(
        previous: Option<&Snapshot>,
        taken_ms: u64,
        tracked: Vec<(u64, TrackedConnection)>,
        tables: Option<Tables>,
    ) -> Snapshot {
        let empty = Snapshot::default();
        let previous = previous.unwrap_or(&empty);
        let mut responses = previous.responses.clone();
        let mut rates = BTreeMap::new();
        for (cookie, c) in &tracked {
            let now = c.tracker.responses();
            let before = previous.rates.get(cookie);
            let added = now.saturating_sub(before.map_or(0, |b| b.responses));
            *responses.entry(c.backend).or_insert(0) += added;
            rates.insert(*cookie, rate(before, now, previous.taken_ms, taken_ms));
        }
        Snapshot {
            taken_ms,
            tracked,
            rates,
            responses,
            tables,
        }
    }
}

/// A connection's rate at `now_ms` given what the snapshot at `before_ms`
/// saw of it (`None`: it was not there).
fn rate(before: Option<&Rate>, responses: u64, before_ms: u64, now_ms: u64) -> Rate {
    match before {
        Some(b) if now_ms > before_ms => {
            let elapsed = (now_ms - before_ms) as f64 / 1000.0;
            let sample = responses.saturating_sub(b.responses) as f64 / elapsed;
            Rate {
                responses,
                rps: RPS_SMOOTHING * sample + (1.0 - RPS_SMOOTHING) * b.rps,
                first_seen_ms: b.first_seen_ms,
            }
        }
        Some(b) => *b,
        None => Rate {
            responses,
            rps: 0.0,
            first_seen_ms: now_ms,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grpclb_common::Addr;

    fn pod(n: u8) -> Backend {
        Backend::new(Addr::from_v4([10, 244, 0, n]), 8080)
    }

    fn at(previous: Option<&Snapshot>, ms: u64, conns: &[(u64, u8, usize)]) -> Snapshot {
        let tracked = conns
            .iter()
            .map(|&(cookie, n, responses)| (cookie, crate::testing::answered(pod(n), responses)))
            .collect();
        Snapshot::next(previous, ms, tracked, None)
    }

    #[test]
    fn rates_are_smoothed_responses_per_second_from_the_snapshot_before() {
        let first = at(None, 0, &[(7, 1, 10)]);
        assert_eq!(first.rates[&7].rps, 0.0, "no rate from a single sample");
        let second = at(Some(&first), 500, &[(7, 1, 110)]);
        assert_eq!(second.rates[&7].rps, 100.0, "half of 200/s");
        let third = at(Some(&second), 1000, &[(7, 1, 210)]);
        assert_eq!(third.rates[&7].rps, 150.0);
        assert_eq!(third.rates[&7].first_seen_ms, 0);
        let same_ms = at(Some(&third), 1000, &[(7, 1, 300)]);
        assert_eq!(same_ms.rates[&7], third.rates[&7], "no time, no sample");
        let later = at(Some(&third), 1500, &[(8, 1, 5)]);
        assert_eq!(later.rates.len(), 1, "closed connections go");
        assert_eq!(later.rates[&8].first_seen_ms, 1500);
    }

    #[test]
    fn response_totals_only_grow_and_survive_closed_connections() {
        let first = at(None, 0, &[(1, 1, 3), (2, 1, 2), (3, 2, 0)]);
        assert_eq!(first.responses[&pod(1)], 5);
        assert_eq!(first.responses[&pod(2)], 0);
        // Connection 1 answered 4 more, then connection 2 closed.
        let second = at(Some(&first), 500, &[(1, 1, 7)]);
        assert_eq!(second.responses[&pod(1)], 9);
        // Every connection closed: the total stays.
        let third = at(Some(&second), 1000, &[]);
        assert_eq!(third.responses[&pod(1)], 9);
        assert_eq!(third.responses[&pod(2)], 0);
    }
}
