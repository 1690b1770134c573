//! Where Services and EndpointSlices come from: a YAML file (`file`) or the
//! Kubernetes API (`kube`). Each publishes complete desired states.

pub mod file;
pub mod kube;
