//! Time as the daemon sees it: one monotonic millisecond timeline for every timer, and wall-clock
//! stamps only for what humans and files read.
//!
//! Timers (debounce, backoff, SIGKILL escalation, startup grace, watchdog) run on CLOCK_MONOTONIC
//! via `Instant`, so a wall-clock jump (NTP, a suspended laptop's RTC fix-up) never fires or stalls
//! one. Wall time appears only in events, state files and `list` output, always as RFC 3339 UTC with
//! milliseconds.

use std::time::{Duration, Instant, SystemTime};

/// Monotonic milliseconds since the clock was created (the timer wheel's timeline).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            origin: Instant::now(),
        }
    }

    /// Milliseconds on the monotonic timeline, rounded down.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Exact elapsed time since `since_ms` on this timeline (for durations in events).
    pub fn elapsed_since(&self, since: Instant) -> Duration {
        since.elapsed()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Poll timeout until `deadline_ms`, rounded *up* to whole milliseconds so the loop never wakes a
/// hair early and spins (mio's sub-millisecond lesson).
pub fn timeout_until(deadline_ms: u64, now_ms: u64) -> Duration {
    Duration::from_millis(deadline_ms.saturating_sub(now_ms))
}

/// The current wall time as RFC 3339 with milliseconds, UTC (`2026-11-27T22:30:45.123Z`).
pub fn wall_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Duration in whole milliseconds, saturating (for `duration_ms` fields).
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_has_millis_and_z() {
        let s = rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(1_234));
        assert_eq!(s, "1970-01-01T00:00:01.234Z");
    }

    #[test]
    fn timeout_never_negative() {
        assert_eq!(timeout_until(5, 10), Duration::ZERO);
        assert_eq!(timeout_until(15, 10), Duration::from_millis(5));
    }
}
