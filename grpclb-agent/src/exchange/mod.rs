//! The cluster-wide view of each balanced Service's load (docs/exchange.md):
//! every agent measures the pods on its own node, serves those loads to its
//! peers on the node network, and learns the other pods' loads from them, so
//! the connect hook places a node's first connection to a Service by the
//! load of the whole Service, not by this node's own connections only.
//!
//! Pure parts: `tree` (who asks whom), `view` (versioned views and deltas),
//! `wire` (the JSON and its checks), `core` (one node's exchange, driven
//! by answers and a clock passed in), `placement` (view → loads). The
//! shell (`shell`) does the HTTP.

pub mod core;
pub mod model;
pub mod placement;
pub mod shell;
pub mod tree;
pub mod view;
pub mod wire;

pub use placement::placement_loads;
pub use shell::{channels, run, Outputs, Publishers, Settings};
