//! What machinery tells the outside about itself: trace context carried across the broker ([`trace`]),
//! and counters, histograms and gauges through the `metrics` facade ([`metrics`]).
//!
//! Every task runs in a `tracing` span named `task` (fields `task.name`, `task.uuid`, `task.retry`,
//! `queue`, `outcome`), and every send in a span named `send` (`task.name`, `task.uuid`, `queue`).

pub mod metrics;
pub mod trace;
