//! Logs and counters.

pub mod access;
pub mod connections;
pub mod logging;
pub mod metrics;
pub mod otlp;
pub mod report;
