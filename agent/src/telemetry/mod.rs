//! Logs and counters.

pub mod connections;
pub mod logging;
