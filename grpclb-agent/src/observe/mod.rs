//! What the agent tells the world: readiness (`readiness`), Prometheus
//! metrics (`metrics`) and the `status` command (`status`).

pub mod metrics;
pub mod readiness;
pub mod status;
