//! Polling a condition until it holds, with a deadline.

use std::{
    thread,
    time::{Duration, Instant},
};

use crate::error::{Result, TestbedError};

/// How often `wait_until` re-checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `cond` every 20 ms until it returns `Ok(true)`; errors from `cond` count as "not yet"
/// and the last one is reported if `timeout` passes first (the error names `what`).
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match cond() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(error) => last_error = Some(error.to_string()),
        }
        if Instant::now() >= deadline {
            return Err(TestbedError::Timeout {
                what: what.to_owned(),
                timeout,
                last_error,
            });
        }
        thread::sleep(POLL_INTERVAL);
    }
}
