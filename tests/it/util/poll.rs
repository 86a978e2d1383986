//! Polling with a deadline: how every test waits for something to happen (`poll_until`,
//! `wait_until`), and the one bounded wait that proves something does not (`quiet_period`).

use std::thread;
use std::time::{Duration, Instant};

/// How often a condition is polled.
pub(super) const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The bounded wait used only to prove a non-event: 3 × debounce + 500 ms.
pub fn quiet_period(debounce_ms: u64) -> Duration {
    Duration::from_millis(3 * debounce_ms + 500)
}

/// Polls `probe` until it returns `Some` or `timeout` passes; `None` on timeout.
pub fn poll_until<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Polls `probe` until it returns `Some`; fails the test after `timeout`.
#[track_caller]
pub fn wait_until<T>(timeout: Duration, what: &str, probe: impl FnMut() -> Option<T>) -> T {
    match poll_until(timeout, probe) {
        Some(value) => value,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}
