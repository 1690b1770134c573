//! What the maps should hold: Kubernetes objects translated (`translate`)
//! into the desired state (`model`), with kube-proxy's endpoint selection
//! (`topology`).

pub mod model;
pub mod topology;
pub mod translate;
