//! Test fixtures shared by the agent's unit tests.

use std::collections::BTreeMap;

use grpclb_common::frame::FrameTracker;
use grpclb_common::{Addr, Backend, ServiceKey, TrackedConnection};

use crate::state::model::{DesiredService, DesiredState, Endpoint, EndpointCondition};
use crate::state::topology::Rule;

/// The frontend of [`one_service`].
pub const SERVICE: ServiceKey = ServiceKey::new(Addr::from_v4([10, 96, 0, 1]), 50051);

/// A Service port `name` whose endpoints are `backends`, all ready, on
/// `node` (or no node name).
pub fn ready_service(
    name: &str,
    backends: impl IntoIterator<Item = Backend>,
    node: Option<&str>,
    track_frames: bool,
) -> DesiredService {
    DesiredService {
        name: name.into(),
        endpoints: backends
            .into_iter()
            .map(|backend| Endpoint {
                backend,
                node_name: node.map(Into::into),
                condition: EndpointCondition::Ready,
            })
            .collect(),
        track_frames,
        rule: Rule::Ready,
    }
}

/// One frontend, [`SERVICE`] (`ns/svc:grpc`), whose ready endpoints are
/// `backends`, all on node-a.
pub fn one_service(
    backends: impl IntoIterator<Item = Backend>,
    track_frames: bool,
) -> DesiredState {
    let service = ready_service("ns/svc:grpc", backends, Some("node-a"), track_frames);
    DesiredState {
        services: BTreeMap::from([(SERVICE, service.into())]),
        ..DesiredState::default()
    }
}

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
