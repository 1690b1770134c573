//! Test fixtures shared by the agent's unit tests.

use grpclb_common::frame::FrameTracker;
use grpclb_common::{Addr, Backend, TrackedConnection};

/// A connection to `backend` whose tracker saw the server's SETTINGS and
/// `responses` trailers-only responses.
pub fn answered(backend: Backend, responses: usize) -> TrackedConnection {
    let mut tracker = FrameTracker::new();
    let mut stream = vec![0, 0, 0, 4, 0, 0, 0, 0, 0];
    for i in 0..responses {
        // HEADERS, END_STREAM | END_HEADERS, empty, on odd streams.
        stream.extend([0, 0, 0, 1, 0x5, 0, 0, 0, (1 + 2 * i) as u8]);
    }
    tracker.observe(0, &stream);
    assert_eq!(tracker.responses(), responses as u64);
    TrackedConnection {
        backend,
        client: Backend::new(Addr::from_v4([10, 244, 1, 9]), 40000),
        base_seq: 0,
        _pad: 0,
        tracker,
    }
}
