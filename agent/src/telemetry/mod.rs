//! Logs, counters and traces.

pub mod access;
pub mod access_output;
pub mod allocations;
pub mod connections;
pub mod logging;
pub mod metrics;
pub mod otlp;
pub mod report;
pub mod trace;
