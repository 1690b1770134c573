//! Moving connections: the planner chooses which connections should get a
//! GOAWAY (`planner`), the mover carries the plan out over time (`mover`)
//! through the injector (`inject`).

pub mod inject;
pub mod mover;
pub mod planner;
