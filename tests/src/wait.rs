//! Polling a condition until it holds, with a deadline.

use std::{
    thread,
    time::{Duration, Instant},
};

use crate::error::{Result, TestbedError};

/// How often `wait_until` re-checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// `bound` stretched by `NODEMESH_TEST_TIME_SCALE` (default 1). A test's responsiveness
/// bound (un-enrolment within 1 s, a refusal well under 2 s) holds for the machine the
/// product runs on; under CPU emulation (`cargo xtask vm-test` without hardware
/// virtualisation, several times slower) the VM runner sets the scale so that the bound
/// still tells a slow path from a hang, not the emulator's speed.
pub fn scaled(bound: Duration) -> Duration {
    let scale = std::env::var("NODEMESH_TEST_TIME_SCALE")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .filter(|s| *s >= 1)
        .unwrap_or(1);
    bound * scale
}

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
