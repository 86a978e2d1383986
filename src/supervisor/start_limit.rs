//! The start limit of SPEC §5: how often the daemon may start a plugin on its own.
//!
//! A plugin that keeps dying after it started (it got ready and crashed, a watchdog kill,
//! `restart = "always"` with a program that exits) must neither be restarted at a flat delay
//! forever nor, with zero delays, thousands of times a second. So every start is recorded, and a
//! start the daemon makes on its own (a restart after a crash, a retry, a rollback) needs room:
//! at most `start_limit_burst + 1` starts may fall inside any `start_limit_interval_ms`. Once
//! there is none, the plugin is `failed` ("start limit hit") until someone acts: a new build,
//! `trigger`, `start` or `restart`. Such a start clears the record, which is why reloads for new
//! builds never count. Restarts after crashes back off, doubling per restart, from a floor.
//!
//! [`StartLimit`] is the pure bookkeeping (it takes the time, it has no clock); the `Plugin`
//! methods below apply it to a plugin (recording a start, the limit, the restart delay, saying
//! that it was hit), and `Core::fail_at_start_limit` leaves a crashed plugin `failed`.

use std::collections::VecDeque;

use super::plugin::{Job, JobKind, Plugin, Rest};
use super::{Core, Ctx, MAX_RETRY_DELAY_MS, retry_delay};
use crate::protocol::{Event, EventKind};

/// The shortest wait before a restart after a crash, whatever `retry_delay_ms` says: with
/// `retry_delay_ms = 0` a plugin that exits at once would make the daemon a busy loop, and with
/// `start_limit_interval_ms = 0` nothing else would stop it.
pub const MIN_RESTART_DELAY_MS: u64 = 100;

/// Without a window (`start_limit_interval_ms = 0`), a run at least this long counts as healthy:
/// the next crash restarts after the base delay again.
const HEALTHY_RUN_WITHOUT_WINDOW_MS: u64 = MAX_RETRY_DELAY_MS;

/// A plugin's effective start-limit settings and restart base delay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Automatic restarts allowed inside the window (`start_limit_burst`).
    pub burst: u32,
    /// The window (`start_limit_interval_ms`); 0 = no limit.
    pub interval_ms: u64,
    /// The first restart's delay (`retry_delay_ms`, raised to [`MIN_RESTART_DELAY_MS`]).
    pub base_delay_ms: u64,
}

/// The limit was reached: what `start_limit_hit` and `last_error` report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitHit {
    /// Restarts inside the window (the starts in it after the first).
    pub restarts: u32,
    pub interval_ms: u64,
}

impl LimitHit {
    /// `last_error` of a plugin the limit stopped (SPEC §5).
    pub fn message(&self) -> String {
        format!(
            "start limit hit: {} restarts in {} ms",
            self.restarts, self.interval_ms
        )
    }
}

/// A plugin's recent starts and crash streak.
#[derive(Debug, Default)]
pub struct StartLimit {
    /// When the latest starts happened (`now_ms`), oldest first; only the last `burst + 1`
    /// matter, so no more are kept.
    starts: VecDeque<u64>,
    /// Restarts since the plugin last ran longer than the window (or since someone started it):
    /// the exponent of the next restart's delay.
    streak: u32,
}

impl StartLimit {
    /// Someone asked for this start (a new build, `trigger`, `start`, `restart`): the record of
    /// earlier starts no longer holds it back.
    pub fn clear(&mut self) {
        self.starts.clear();
        self.streak = 0;
    }

    /// An instance was started at `now_ms`.
    pub fn record_start(&mut self, now_ms: u64, limits: &Limits) {
        self.starts.push_back(now_ms);
        let keep = usize::try_from(limits.burst)
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        while self.starts.len() > keep {
            self.starts.pop_front();
        }
    }

    /// Whether one more start at `now_ms` would exceed the limit: `Some` says by how much.
    pub fn reached(&self, now_ms: u64, limits: &Limits) -> Option<LimitHit> {
        if limits.interval_ms == 0 {
            return None;
        }
        let inside = self
            .starts
            .iter()
            .filter(|&&at| now_ms.saturating_sub(at) < limits.interval_ms)
            .count();
        let burst = usize::try_from(limits.burst).unwrap_or(usize::MAX);
        (inside > burst).then(|| LimitHit {
            restarts: u32::try_from(inside - 1).unwrap_or(u32::MAX),
            interval_ms: limits.interval_ms,
        })
    }

    /// The plugin went down at `now_ms` (a crash, or a failed start of a restart): the delay
    /// before restarting it, doubling per restart since the last healthy run, from the floor.
    pub fn next_restart_delay(&mut self, now_ms: u64, limits: &Limits) -> u64 {
        let healthy_run_ms = match limits.interval_ms {
            0 => HEALTHY_RUN_WITHOUT_WINDOW_MS,
            window => window,
        };
        if let Some(&started) = self.starts.back()
            && now_ms.saturating_sub(started) >= healthy_run_ms
        {
            self.streak = 0;
        }
        let base = limits.base_delay_ms.max(MIN_RESTART_DELAY_MS);
        let delay = retry_delay(base, self.streak);
        self.streak = self.streak.saturating_add(1);
        delay
    }
}

/// Whether the start of `job`'s current attempt is one someone asked for (the first attempt of
/// a first start or of a reload: a new build, `trigger`, `enable`, a changed config) rather than
/// one the daemon makes on its own (a restart, a retry, a rollback).
pub(super) fn asked_for(job: &Job) -> bool {
    job.attempt == 1 && matches!(job.kind, JobKind::Start | JobKind::Reload)
}

impl Plugin {
    /// The plugin's start limit settings.
    fn limits(&self, ctx: &Ctx<'_>) -> Limits {
        Limits {
            burst: self.settings.start_limit_burst,
            interval_ms: self.settings.start_limit_interval_ms,
            base_delay_ms: ctx.config.hot_reload.retry_delay_ms,
        }
    }

    /// Records a start happening now; a start someone asked for clears the record first.
    pub(super) fn record_start(&mut self, ctx: &Ctx<'_>) {
        let limits = self.limits(ctx);
        if self.job.as_ref().is_some_and(asked_for) {
            self.start_limit.clear();
        }
        self.start_limit.record_start(ctx.now_ms, &limits);
    }

    /// `Some` when the daemon may not start the plugin on its own now (SPEC §5 "Start limit").
    pub(super) fn start_limit_reached(&self, ctx: &Ctx<'_>) -> Option<LimitHit> {
        self.start_limit.reached(ctx.now_ms, &self.limits(ctx))
    }

    /// The delay before restarting the plugin after it went down now.
    pub(super) fn restart_delay(&mut self, ctx: &Ctx<'_>) -> u64 {
        let limits = self.limits(ctx);
        self.start_limit.next_restart_delay(ctx.now_ms, &limits)
    }

    /// Says that the limit stopped the plugin: its `last_error`, the log and `start_limit_hit`.
    pub(super) fn announce_start_limit(&mut self, ctx: &mut Ctx<'_>, hit: LimitHit) {
        let id = &self.id;
        let message = hit.message();
        log::error!(
            "[{id}] {message} (start_limit_burst = {}): left failed until a new build, trigger, start or restart",
            self.settings.start_limit_burst
        );
        self.last_error = Some(message);
        ctx.emit(Event::plugin(
            id,
            EventKind::StartLimitHit {
                restarts: hit.restarts,
                interval_ms: hit.interval_ms,
            },
        ));
    }
}

impl Core {
    /// A plugin that crashed with no job in flight and no room to restart: `failed`, with what
    /// it left in runtime.json saved.
    pub(super) fn fail_at_start_limit(
        &mut self,
        ctx: &mut Ctx<'_>,
        p: &mut Plugin,
        version: &str,
        hit: LimitHit,
    ) {
        p.announce_start_limit(ctx, hit);
        p.rest = Rest::Failed;
        if let Err(e) = self.write_state(ctx, p, version, "stopped") {
            log::warn!("[{}] cannot write state file: {e}", p.id);
        }
        self.run_queued(ctx, p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        burst: 3,
        interval_ms: 1000,
        base_delay_ms: 200,
    };

    fn started_at(times: &[u64], limits: &Limits) -> StartLimit {
        let mut limit = StartLimit::default();
        for &at in times {
            limit.record_start(at, limits);
        }
        limit
    }

    #[test]
    fn burst_plus_one_starts_fill_the_window() {
        let limit = started_at(&[0, 10, 20], &LIMITS);
        assert_eq!(limit.reached(30, &LIMITS), None);
        let limit = started_at(&[0, 10, 20, 30], &LIMITS);
        assert_eq!(
            limit.reached(40, &LIMITS),
            Some(LimitHit {
                restarts: 3,
                interval_ms: 1000
            })
        );
        assert_eq!(
            limit.reached(40, &LIMITS).map(|hit| hit.message()),
            Some("start limit hit: 3 restarts in 1000 ms".to_owned())
        );
    }

    #[test]
    fn the_window_slides_and_a_long_run_empties_it() {
        let limit = started_at(&[0, 10, 20, 30], &LIMITS);
        // The start at 0 is out of the window ending at 1000: room for one more.
        assert_eq!(limit.reached(999, &LIMITS).map(|h| h.restarts), Some(3));
        assert_eq!(limit.reached(1000, &LIMITS), None);
        // A run from 30 to 5000: nothing left inside the window.
        assert_eq!(limit.reached(5000, &LIMITS), None);
    }

    #[test]
    fn no_window_means_no_limit() {
        let limits = Limits {
            interval_ms: 0,
            ..LIMITS
        };
        let limit = started_at(&[0, 0, 0, 0, 0, 0, 0], &limits);
        assert_eq!(limit.reached(0, &limits), None);
    }

    #[test]
    fn a_burst_of_zero_allows_no_restart() {
        let limits = Limits { burst: 0, ..LIMITS };
        let limit = started_at(&[0], &limits);
        assert_eq!(
            limit.reached(5, &limits),
            Some(LimitHit {
                restarts: 0,
                interval_ms: 1000
            })
        );
    }

    #[test]
    fn only_the_last_burst_plus_one_starts_are_kept() {
        let limit = started_at(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], &LIMITS);
        assert_eq!(limit.starts, [6, 7, 8, 9]);
    }

    #[test]
    fn clearing_forgets_starts_and_streak() {
        let mut limit = started_at(&[0, 10, 20, 30], &LIMITS);
        assert_eq!(limit.next_restart_delay(35, &LIMITS), 200);
        limit.clear();
        assert_eq!(limit.reached(40, &LIMITS), None);
        assert_eq!(limit.next_restart_delay(40, &LIMITS), 200);
    }

    #[test]
    fn restart_delays_double_per_restart_and_cap() {
        let mut limit = StartLimit::default();
        let mut now = 0;
        let mut delays = Vec::new();
        for _ in 0..12 {
            limit.record_start(now, &LIMITS);
            // Each run is short: the plugin crashes 10 ms after its start.
            now += 10;
            let delay = limit.next_restart_delay(now, &LIMITS);
            delays.push(delay);
            now += delay;
        }
        assert_eq!(
            delays,
            [
                200, 400, 800, 1600, 3200, 6400, 12_800, 25_600, 51_200, 60_000, 60_000, 60_000
            ]
        );
    }

    #[test]
    fn a_run_as_long_as_the_window_resets_the_delay() {
        let mut limit = started_at(&[0], &LIMITS);
        assert_eq!(limit.next_restart_delay(10, &LIMITS), 200);
        limit.record_start(210, &LIMITS);
        assert_eq!(limit.next_restart_delay(220, &LIMITS), 400);
        limit.record_start(620, &LIMITS);
        assert_eq!(limit.next_restart_delay(1620, &LIMITS), 200);
    }

    #[test]
    fn without_a_window_a_minute_long_run_resets_the_delay() {
        let limits = Limits {
            interval_ms: 0,
            ..LIMITS
        };
        let mut limit = started_at(&[0], &limits);
        assert_eq!(limit.next_restart_delay(10, &limits), 200);
        limit.record_start(210, &limits);
        assert_eq!(limit.next_restart_delay(20_000, &limits), 400);
        limit.record_start(20_400, &limits);
        assert_eq!(limit.next_restart_delay(80_400, &limits), 200);
    }

    #[test]
    fn a_zero_retry_delay_still_waits_the_floor() {
        let limits = Limits {
            base_delay_ms: 0,
            interval_ms: 0,
            ..LIMITS
        };
        let mut limit = started_at(&[0], &limits);
        assert_eq!(limit.next_restart_delay(1, &limits), MIN_RESTART_DELAY_MS);
        assert_eq!(
            limit.next_restart_delay(2, &limits),
            2 * MIN_RESTART_DELAY_MS
        );
    }
}
