//! The cluster-wide view of each balanced Service's load (docs/exchange.md):
//! every agent measures the pods on its own node, serves those loads to its
//! peers on the node network, and learns the other pods' loads from them, so
//! the connect hook places a node's first connection to a Service by the
//! load of the whole Service, not by this node's own connections only.

pub mod model;
