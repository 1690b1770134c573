//! What the maps should hold: Kubernetes objects reduced to compact forms
//! (`objects`), translated incrementally (`translate`) into the desired
//! state (`model`), with kube-proxy's endpoint selection (`topology`).

pub mod model;
pub mod objects;
pub mod topology;
pub mod translate;
