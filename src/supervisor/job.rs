//! Jobs: a reload, first start, crash restart or rollback, from snapshot to success or giving up.
//!
//! A job owns the attempt count and the waiters (`trigger` with wait, `install --wait`). Its
//! phase says what it waits for: the old instance to exit (`StoppingOld`), the new one to prove
//! itself (`Verifying`), or the next attempt (`Backoff`). Instances are the business of
//! `instance.rs`; this file decides what to do with them.
//!
//! Every step is a `Core` method taking the job's `&mut Plugin`, lent once by the `Supervisor`
//! entry point that started the chain (a timer, a reap, a request): the no-op check, keeping a
//! retiring instance, announcing a reload, ending a failed job and its hooks, as well as the
//! steps that go on to stop or start instances (`prepare`, `attempt`, `succeed`,
//! `fail_attempt`, `give_up_at`, `run_queued`, `schedule_restart`). None touches another
//! plugin.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::host::Host;
use super::plugin::{HistoryEntry, Instance, Job, JobKind, JobPhase, Plugin, Rest, Slot, Snap};
use super::start_limit::LimitHit;
use super::{Core, Ctx, Timer, Trigger, Waiter, retry_delay};
use crate::config::Strategy;
use crate::hooks::{HookContext, HookKind};
use crate::protocol::TriggerResult;
use crate::protocol::{Event, EventKind};
use crate::{clock, preflight, snapshot};

/// Why a start attempt did not work out.
pub(super) type AttemptError = String;

/// The job steps that go on to stop or start instances: each takes the plugin lent with the
/// core, and never another plugin.
impl Core {
    /// A reload or first start of the plugin's current build: see [`Core::prepare`].
    pub(super) fn begin(
        &mut self,
        ctx: &mut Ctx<'_>,
        p: &mut Plugin,
        kind: JobKind,
        trigger: Trigger,
        files: Vec<String>,
        waiters: Vec<Waiter>,
    ) {
        let old_version = p.current.as_ref().map(|s| s.version.clone());
        let max_attempts = ctx.config.hot_reload.max_retries.saturating_add(1);
        let job = new_job(
            self.host.as_ref(),
            kind,
            trigger,
            files,
            empty_snap(),
            old_version,
            max_attempts,
            waiters,
        );
        self.prepare(ctx, p, job);
    }

    /// Snapshot, no-op check and pre-flight of the job's build; then stop the old instance
    /// (stop-start), or start the new one beside it (start-stop), or go straight to the first
    /// attempt.
    fn prepare(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin, job: Job) {
        if self.shutting_down {
            answer_failure(ctx, &p.id, &job.waiters, "the daemon is shutting down");
            return;
        }
        // With an instance to stop first, the copy is only staged (its helper thread writes it
        // meanwhile) and finished once the stop is asked for (`settle_staged_snapshot`): the
        // version and the pre-flight check, which must come before the stop, need the bytes,
        // not the file.
        let staged = p.instance.is_some();
        self.snapshot_and_go(ctx, p, job, staged);
        if staged {
            self.prepare_next_start(p);
            self.settle_staged_snapshot(p);
        }
    }

    /// [`Core::prepare`] once the daemon may go on: the snapshot, the checks, the stop or start.
    fn snapshot_and_go(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin, mut job: Job, staged: bool) {
        let id = p.id.clone();
        let id = id.as_str();
        let exec = p.exec_path();
        let snap_dir = self.snapshot_dir(id);
        let taken = if staged {
            self.note_staging(ctx);
            self.host.stage_snapshot(&exec, &snap_dir)
        } else {
            self.host.snapshot(&exec, &snap_dir)
        };
        match taken {
            Ok(s) => {
                job.target = Snap {
                    version: s.version,
                    path: s.path,
                };
            }
            Err(e) if newest_good_instead(self.host.as_ref(), p, &job).is_some() => {
                // `start`/`restart`: the newest build that can run is the last good one.
                if let Some(good) = newest_good_instead(self.host.as_ref(), p, &job) {
                    log::warn!(
                        "[{id}] {e}: starting the last good version {}",
                        good.version
                    );
                    job.target = good;
                }
            }
            Err(e) if job.kind == JobKind::Start && !copy_failed(&e) => {
                // No build yet: that is what `missing` means, not an error. A first start
                // still retrying the copy of an earlier build ends with it.
                let reason = missing_reason(&exec, &e);
                log::info!("[{id}] waiting for a build: {reason}");
                take_over_copy_retry(ctx, p, &mut job);
                p.rest = Rest::Missing;
                // `list` and `plugin` say why the plugin is `missing` (SPEC §5).
                p.last_error = Some(reason.clone());
                answer_not_started(ctx, id, &job.waiters, None, reason);
                return;
            }
            Err(e) => {
                let error = format!("cannot snapshot the build: {e}");
                self.snapshot_failed(ctx, p, job, error);
                return;
            }
        }
        take_over_copy_retry(ctx, p, &mut job);
        match self.build_unchanged(ctx, p, &exec, &job) {
            Unchanged::No => {}
            Unchanged::Ignored => return,
            Unchanged::KeptRetiring => {
                // The reload it ended may have had one queued behind it.
                self.run_queued(ctx, p);
                return;
            }
        }
        if let Err(e) = self.host.preflight(&job.target.path) {
            // Name the file the user wrote, not the daemon's private copy.
            let error = format!("{}: {}", preflight::FAILED_PREFIX, e.about_build(&exec));
            let good = newest_good_instead(self.host.as_ref(), p, &job);
            let Some(good) = good.filter(|good| *good != job.target) else {
                self.refuse_build(ctx, p, job, error);
                return;
            };
            log::warn!(
                "[{id}] {error}: starting the last good version {}",
                good.version
            );
            job.target = good;
        }
        // The newest build supersedes a job waiting in backoff: it takes over its waiters.
        if let Some(old) = p.job.take() {
            cancel_job_timer(ctx, &old);
            job.waiters.extend(old.waiters);
        }
        if job.kind == JobKind::Reload && !job.announced {
            self.announce_reload(ctx, id, &mut job);
        }
        p.job = Some(job);
        let overlap = p.settings.strategy == Strategy::StartStop;
        let old_running = p.instance.as_ref().is_some_and(|i| !i.phase.is_leaving());
        if old_running && overlap && p.retiring.is_none() {
            // start-stop: the old instance keeps serving until the new one is ready.
            p.retiring = p.instance.take();
            self.attempt(ctx, p);
        } else if p.instance.is_some() {
            self.stop_and_continue(ctx, p, Slot::Current);
        } else {
            self.attempt(ctx, p);
        }
    }

    /// After the stop was asked for, or the build refused: finish the staged copy the job still
    /// needs while the old instance exits (a failure is remembered by the host and fails the
    /// attempt to start it, `try_start`), or drop one that nothing needs any more.
    fn settle_staged_snapshot(&mut self, p: &Plugin) {
        let Some(job) = p.job.as_ref() else {
            self.host.discard_snapshot();
            return;
        };
        if let Err(e) = self.host.finish_snapshot(&job.target.path) {
            log::debug!("[{}] {e}", p.id);
        }
    }

    /// The build could not be copied (the runtime dir full, the file gone between the event and
    /// the copy). Nothing was stopped, so whatever runs keeps running, and the copy is retried
    /// with the reload backoff (SPEC §5). When a job whose build did copy is already waiting in
    /// backoff, that one goes on and this change is just refused.
    fn snapshot_failed(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin, mut job: Job, error: String) {
        let id = p.id.clone();
        let id = id.as_str();
        if p.job.as_ref().is_some_and(|j| !awaiting_snapshot(j)) {
            self.refuse_build(ctx, p, job, error);
            return;
        }
        // A newer change restarts the count (it is a newer build).
        take_over_copy_retry(ctx, p, &mut job);
        if job.kind != JobKind::Start && !job.announced {
            self.announce_reload(ctx, id, &mut job);
        }
        p.job = Some(job);
        self.fail_attempt(ctx, p, error);
    }

    /// A build that failed pre-flight (or could not be copied while another job waits): nothing
    /// was stopped, nothing to retry (the same bytes would fail again).
    fn refuse_build(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin, mut job: Job, error: String) {
        let id = p.id.clone();
        let id = id.as_str();
        let snap_dir = self.snapshot_dir(id);
        p.last_error = Some(error.clone());
        let new_version = (!awaiting_snapshot(&job)).then(|| job.target.version.clone());
        // The refused snapshot is useless: keep only what runs and the last good one.
        if job.kind == JobKind::Start {
            log::warn!("[{id}] cannot start: {error}");
            p.rest = Rest::Missing;
            answer_not_started(ctx, id, &job.waiters, new_version, error);
            prune_snapshots(self.host.as_mut(), &snap_dir, p);
            return;
        }
        prune_snapshots(self.host.as_mut(), &snap_dir, p);
        if !job.announced {
            self.announce_reload(ctx, id, &mut job);
        }
        log::warn!("[{id}] hot reload failed: {error}");
        emit_reload_failed(ctx, id, &error, job.attempt, None);
        self.end_failed_job(ctx, p, &job, &error, new_version.as_deref());
        self.run_queued(ctx, p);
    }

    /// One start of the job's target. While an instance is still on its way out (a killed
    /// failed attempt), the start waits for its reap.
    pub(super) fn attempt(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin) {
        if p.instance.is_some() {
            if let Some(job) = p.job.as_mut() {
                job.phase = JobPhase::StoppingOld;
            }
            return;
        }
        if let Err(error) = self.try_start(ctx, p) {
            self.fail_attempt(ctx, p, error);
        }
    }

    fn try_start(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin) -> Result<(), AttemptError> {
        let target = p.job.as_ref().ok_or("no job")?.target.clone();
        self.host
            .finish_snapshot(&target.path)
            .map_err(|e| format!("cannot snapshot the build: {e}"))?;
        self.prepare_state(ctx, p, &target.version)?;
        let seq = self.spawn_instance(ctx, p, &target)?;
        if let Some(job) = p.job.as_mut() {
            job.phase = JobPhase::Verifying { seq };
        }
        p.current = Some(target);
        Ok(())
    }

    /// The new instance proved itself: record, answer, retire the old one, run what queued.
    pub(super) fn succeed(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin) {
        let id = p.id.clone();
        let id = id.as_str();
        let snap_dir = self.snapshot_dir(id);
        let Some(job) = p.job.take() else { return };
        let duration_ms = clock::millis(self.host.now().saturating_duration_since(job.started));
        p.last_good = Some(job.target.clone());
        p.rest = Rest::Stopped;
        match job.kind {
            JobKind::Reload => {
                p.reload_count += 1;
                p.last_error = None;
                self.totals.reload_count += 1;
                let now = self.host.wall();
                self.totals.last_reload = Some(now.clone());
                p.push_history(HistoryEntry::of_reload(&job, now, duration_ms, None));
                log::info!(
                    "[{id}] hot reload completed: {} -> {} in {duration_ms} ms",
                    job.old_version.as_deref().unwrap_or("none"),
                    job.target.version
                );
                ctx.emit(Event::plugin(
                    id,
                    EventKind::ReloadSucceeded {
                        old_version: job.old_version.clone(),
                        new_version: job.target.version.clone(),
                        duration_ms,
                    },
                ));
            }
            JobKind::Rollback => {
                log::warn!("[{id}] rolled back to version {}", job.target.version);
                ctx.emit(Event::plugin(
                    id,
                    EventKind::RolledBack {
                        version: job.target.version.clone(),
                    },
                ));
            }
            // A good build runs: an earlier refusal (pre-flight) or a copy that failed for lack
            // of space is over.
            JobKind::Start => p.last_error = None,
            JobKind::Restart => {}
        }
        // A rollback's waiters are those of a `start` or `restart` it carried on.
        answer_waiters(ctx, id, &job, true, None, self.host.now());
        prune_snapshots(self.host.as_mut(), &snap_dir, p);
        if p.retiring.is_some() {
            self.stop_and_continue(ctx, p, Slot::Retiring);
        }
        if job.kind == JobKind::Reload {
            let new_version = Some(job.target.version.as_str());
            let kind = HookKind::ReloadSuccess;
            self.run_job_hook(ctx, id, kind, &job, new_version, None);
        }
        self.run_queued(ctx, p);
    }

    /// An attempt failed: retry after backoff, or give up (rollback, then `failed`).
    pub(super) fn fail_attempt(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin, error: AttemptError) {
        let id = p.id.clone();
        let id = id.as_str();
        // Another try is a start the daemon makes on its own: the start limit may forbid it
        // (a copy that failed starts nothing, so its retry is not limited).
        let retry = p
            .job
            .as_ref()
            .filter(|job| job.attempt < job.max_attempts && !awaiting_snapshot(job))
            .map(|job| job.kind);
        let limit = retry.and_then(|_| p.start_limit_reached(ctx));
        // A restart after a crash backs off like the crash restarts before it.
        let restart_delay =
            (retry == Some(JobKind::Restart) && limit.is_none()).then(|| p.restart_delay(ctx));
        let Some(job) = p.job.as_mut() else { return };
        p.last_error = Some(error.clone());
        job.last_error = Some(error.clone());
        let attempt = job.attempt;
        let kind = job.kind;
        // A first start whose build cannot be copied has nothing to fall back to (see below).
        let endless = kind == JobKind::Start && awaiting_snapshot(job);
        let last = (attempt >= job.max_attempts && !endless) || limit.is_some();
        let delay = restart_delay
            .unwrap_or_else(|| retry_delay(ctx.config.hot_reload.retry_delay_ms, attempt - 1));
        if matches!(kind, JobKind::Reload | JobKind::Rollback) {
            log::warn!("[{id}] hot reload failed (attempt {attempt}): {error}");
        } else {
            log::warn!("[{id}] start failed (attempt {attempt}): {error}");
        }
        if kind == JobKind::Reload {
            emit_reload_failed(ctx, id, &error, attempt, (!last).then_some(delay));
        }
        if let Some(hit) = limit {
            self.give_up_at(ctx, p, error, Some(hit));
            return;
        }
        if endless && attempt == job.max_attempts {
            // A first start whose build cannot be copied has nothing to fall back to: it goes
            // on trying with the capped backoff, so that freeing space starts the plugin with no
            // command (SPEC §5). Whoever waits for it is not kept waiting meanwhile.
            let waiters = std::mem::take(&mut job.waiters);
            answer_not_started(ctx, id, &waiters, None, error.clone());
        }
        if !last {
            job.attempt = job.attempt.saturating_add(1);
            let timer = ctx.arm(delay, Timer::Backoff(id.to_string()));
            job.phase = JobPhase::Backoff {
                timer,
                due_ms: ctx.now_ms + delay,
            };
            return;
        }
        self.give_up(ctx, p, error);
    }

    /// The last attempt failed: record it, answer waiters, fall back if there is somewhere to go.
    fn give_up(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin, error: String) {
        self.give_up_at(ctx, p, error, None);
    }

    /// [`Core::give_up`], or, with `limited`, giving up because the start limit forbids
    /// another attempt. A rollback is a start of its own, so the limit may forbid it too.
    fn give_up_at(
        &mut self,
        ctx: &mut Ctx<'_>,
        p: &mut Plugin,
        error: String,
        limited: Option<LimitHit>,
    ) {
        let id = p.id.clone();
        let id = id.as_str();
        let limit = limited.or_else(|| p.start_limit_reached(ctx));
        let Some(mut job) = p.job.take() else { return };
        // `start`/`restart` ask for the newest *good* build: who waits for them follows a
        // rollback to the last good one and hears how that went.
        let mut carried = Vec::new();
        if job.trigger.wants_newest_good() {
            std::mem::swap(&mut carried, &mut job.waiters);
        }
        // A rollback's waiters are those it carried.
        let hook_version = Some(job.target.version.as_str());
        self.end_failed_job(ctx, p, &job, &error, hook_version);
        let mut no_rollback = |ctx: &mut Ctx<'_>, job: &mut Job, now| {
            job.waiters = std::mem::take(&mut carried);
            answer_waiters(ctx, id, job, false, Some(error.clone()), now);
        };
        if awaiting_snapshot(&job) {
            // The build never copied, so this reload stopped nothing: whatever runs stays, and
            // a plugin that is down stays down (its own restart policy decided that).
            log::warn!("[{id}] giving up on the build that cannot be copied: {error}");
            no_rollback(ctx, &mut job, self.host.now());
            self.run_queued(ctx, p);
            return;
        }
        // start-stop: the old instance never stopped, so "rolling back" is keeping it.
        if p.instance.is_none() && p.retiring.as_ref().is_some_and(|r| !r.phase.is_stopping()) {
            if let Some(old) = p.retiring.take() {
                let version = old.version.clone();
                p.current = p.last_good.clone();
                p.instance = Some(old);
                log::warn!("[{id}] keeping the running version {version}");
                ctx.emit(Event::plugin(
                    id,
                    EventKind::RolledBack {
                        version: version.to_string(),
                    },
                ));
                no_rollback(ctx, &mut job, self.host.now());
                self.run_queued(ctx, p);
                return;
            }
        }
        let nothing_runs = p.instance.is_none();
        let host = &self.host;
        let rollback_to = p.last_good.clone().filter(|good| {
            nothing_runs
                && (job.kind == JobKind::Reload || job.trigger == Trigger::Start)
                && *good != job.target
                && host.snapshot_exists(&good.path)
        });
        let rollback_forbidden = rollback_to.is_some() && limit.is_some();
        if let Some(good) = rollback_to.filter(|_| limit.is_none()) {
            p.current = p.last_good.clone();
            log::warn!("[{id}] rolling back to last good version {}", good.version);
            p.job = Some(new_job(
                self.host.as_ref(),
                JobKind::Rollback,
                Trigger::Watch,
                Vec::new(),
                good,
                None,
                1,
                carried,
            ));
            self.attempt(ctx, p);
            return;
        }
        no_rollback(ctx, &mut job, self.host.now());
        p.rest = Rest::Failed;
        log::error!("[{id}] failed: {error}");
        if let Some(hit) = limit.filter(|_| limited.is_some() || rollback_forbidden) {
            p.announce_start_limit(ctx, hit);
        }
        self.run_queued(ctx, p);
    }

    /// Ends a reload waiting to retry the copy of its build as failed, with no further attempt:
    /// the running instance it would have replaced exited on its own meanwhile.
    pub(super) fn abandon_snapshot_retry(
        &mut self,
        ctx: &mut Ctx<'_>,
        p: &mut Plugin,
        error: String,
    ) {
        let id = p.id.clone();
        let id = id.as_str();
        let Some(job) = p.job.as_ref().filter(|job| awaiting_snapshot(job)) else {
            return;
        };
        cancel_job_timer(ctx, job);
        let attempt = job.attempt;
        p.last_error = Some(error.clone());
        log::warn!("[{id}] hot reload failed (attempt {attempt}): {error}");
        emit_reload_failed(ctx, id, &error, attempt, None);
        self.give_up(ctx, p, error);
    }

    pub(super) fn on_backoff(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin) {
        let Some(job) = p.job.as_mut() else { return };
        if !matches!(job.phase, JobPhase::Backoff { .. }) {
            return;
        }
        job.phase = JobPhase::StoppingOld;
        if awaiting_snapshot(job) {
            if let Some(job) = p.job.take() {
                self.prepare(ctx, p, job);
            }
            return;
        }
        self.attempt(ctx, p);
    }

    /// Start the reload that was asked for while the last job ran.
    pub(super) fn run_queued(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin) {
        if p.removing || self.shutting_down || p.job.is_some() {
            return;
        }
        let Some(q) = p.queued.take() else { return };
        let trigger = q.trigger.unwrap_or(Trigger::Watch);
        self.request(ctx, p, trigger, q.files.into_iter().collect(), q.waiters);
    }

    /// An unexpected exit of a verified instance: restart per policy after a delay that doubles
    /// per restart, unless the start limit says the plugin has been restarted enough.
    pub(super) fn schedule_restart(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin, why: String) {
        let id = p.id.clone();
        let id = id.as_str();
        let limit = p.start_limit_reached(ctx);
        let Some(target) = p.current.clone() else {
            p.rest = Rest::Failed;
            return;
        };
        if let Some(hit) = limit {
            log::warn!("[{id}] {why}: not restarted");
            self.fail_at_start_limit(ctx, p, &target.version, hit);
            return;
        }
        let delay = p.restart_delay(ctx);
        p.restarts += 1;
        p.last_error = Some(why.clone());
        let timer = ctx.arm(delay, Timer::Backoff(id.to_string()));
        log::warn!("[{id}] {why}: restarting in {delay} ms");
        let max_attempts = ctx.config.hot_reload.max_retries.saturating_add(1);
        let old = Some(target.version.clone());
        let mut job = new_job(
            self.host.as_ref(),
            JobKind::Restart,
            Trigger::Watch,
            Vec::new(),
            target,
            old,
            max_attempts,
            Vec::new(),
        );
        job.phase = JobPhase::Backoff {
            timer,
            due_ms: ctx.now_ms + delay,
        };
        p.job = Some(job);
    }
}

/// What [`Core::build_unchanged`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unchanged {
    /// A new build (or an explicit request): the job goes on.
    No,
    /// Nothing to do; the job's waiters are answered.
    Ignored,
    /// The build still serving from the retiring slot stays; the reload waiting to retry ended
    /// (what queued behind it may run now).
    KeptRetiring,
}

/// The parts of a job that touch one plugin and the host, and never another plugin.
impl Core {
    /// No-op detection: only the executable changed and its content is what already runs (or
    /// already failed, with nothing new to try instead). Answers the job's waiters when so.
    fn build_unchanged(
        &mut self,
        ctx: &mut Ctx<'_>,
        p: &mut Plugin,
        exec: &Path,
        job: &Job,
    ) -> Unchanged {
        let exec_str = exec.to_string_lossy();
        let only_exec = !job.files.is_empty() && job.files.iter().all(|f| *f == exec_str);
        let version = job.target.version.as_str();
        let alive = |i: &&Instance| !i.phase.is_leaving();
        // start-stop: while a failed attempt of a newer build waits to retry, the old instance
        // is the one serving, from the retiring slot.
        let serving = match &p.instance {
            Some(inst) => Some(inst).filter(alive),
            None => p.retiring.as_ref().filter(alive),
        };
        let running = serving.map(|i| i.version.as_str());
        let keeps_retiring = p.instance.is_none() && running == Some(version);
        let failed_same = p.instance.is_none()
            && p.rest == Rest::Failed
            && job.old_version.as_deref() == Some(version);
        // Down after a crash and waiting to restart this very build: the restart (and the start
        // limit counting it) goes on; the same bytes landing again are not a new build.
        let restarting_same = p.instance.is_none()
            && p.job
                .as_ref()
                .is_some_and(|j| j.kind == JobKind::Restart && j.target.version == version);
        let unchanged = running == Some(version) || failed_same || restarting_same;
        let implicit = matches!(job.trigger, Trigger::Rescan | Trigger::Enable);
        if !(unchanged && (only_exec || implicit)) {
            return Unchanged::No;
        }
        let id = p.id.clone();
        log::debug!("[{id}] build unchanged ({version}), nothing to reload");
        if keeps_retiring {
            self.keep_retiring(ctx, p, &job.target);
        }
        for f in &job.files {
            ctx.emit(Event::plugin(
                &id,
                EventKind::ChangeIgnored {
                    path: f.clone(),
                    reason: format!("unchanged version {version}"),
                },
            ));
        }
        let new = Some(version.to_owned());
        let duration_ms = clock::millis(self.host.now().saturating_duration_since(job.started));
        if job.announced {
            // Announced when an earlier copy of the build failed: it gets its outcome too.
            ctx.emit(Event::plugin(
                &id,
                EventKind::ReloadSucceeded {
                    old_version: job.old_version.clone(),
                    new_version: version.to_string(),
                    duration_ms,
                },
            ));
            let entry = HistoryEntry::of_reload(job, self.host.wall(), duration_ms, None);
            p.push_history(entry);
        }
        let old = job.old_version.clone();
        answer_list(ctx, &id, &job.waiters, true, old, new, None, duration_ms);
        if keeps_retiring {
            Unchanged::KeptRetiring
        } else {
            Unchanged::Ignored
        }
    }

    /// start-stop: the build installed while a newer one waits to retry is the one still
    /// serving from the retiring slot, which simply stays, as after the last failed attempt
    /// (SPEC §5 "No-op, always"). The reload waiting to retry ends there: a final
    /// `reload_failed`, its waiters answered with it, the failure hook run.
    fn keep_retiring(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin, build: &Snap) {
        let snap_dir = self.snapshot_dir(&p.id);
        let superseded = p.job.take();
        p.instance = p.retiring.take();
        p.current = Some(build.clone());
        prune_snapshots(self.host.as_mut(), &snap_dir, p);
        let Some(job) = superseded else { return };
        cancel_job_timer(ctx, &job);
        let error = format!(
            "superseded: version {}, which is still running, was installed again",
            build.version
        );
        let id = &p.id;
        log::warn!("[{id}] hot reload to {} ended: {error}", job.target.version);
        if job.kind == JobKind::Reload && job.announced {
            let attempts = job.attempt.saturating_sub(1).max(1);
            emit_reload_failed(ctx, id, &error, attempts, None);
        }
        let hook_version = Some(job.target.version.as_str());
        self.end_failed_job(ctx, p, &job, &error, hook_version);
    }

    /// A job that ended failed, whichever way: a reload's failure counted and kept in the
    /// history, the job's waiters answered, a reload's failure hook run (towards
    /// `hook_version`). What leads there (events, fallbacks) is the caller's.
    fn end_failed_job(
        &mut self,
        ctx: &mut Ctx<'_>,
        p: &mut Plugin,
        job: &Job,
        error: &str,
        hook_version: Option<&str>,
    ) {
        let now = self.host.now();
        if job.kind == JobKind::Reload {
            let duration_ms = clock::millis(now.saturating_duration_since(job.started));
            p.failed_reloads += 1;
            self.totals.failed_reloads += 1;
            let time = self.host.wall();
            let entry = HistoryEntry::of_reload(job, time, duration_ms, Some(error.into()));
            p.push_history(entry);
        }
        answer_waiters(ctx, &p.id, job, false, Some(error.to_owned()), now);
        if job.kind == JobKind::Reload {
            self.run_job_hook(
                ctx,
                &p.id,
                HookKind::ReloadFailure,
                job,
                hook_version,
                Some(error),
            );
        }
    }

    /// `hot reload started`: the log line, the `reload_started` event and the start hook.
    fn announce_reload(&mut self, ctx: &mut Ctx<'_>, id: &str, job: &mut Job) {
        job.announced = true;
        let new_version = (!awaiting_snapshot(job)).then_some(job.target.version.as_str());
        log::info!(
            "[{id}] hot reload started ({}): {} -> {}",
            job.trigger.as_str(),
            job.old_version.as_deref().unwrap_or("none"),
            new_version.unwrap_or("(not copied yet)")
        );
        ctx.emit(Event::plugin(
            id,
            EventKind::ReloadStarted {
                trigger: job.trigger.as_str().to_owned(),
                files: job.files.clone(),
            },
        ));
        self.run_job_hook(ctx, id, HookKind::ReloadStart, job, new_version, None);
    }

    /// Runs the `kind` hook for reload `job` towards `new_version` (SPEC §3 `[hooks]`), with the
    /// error of a failure.
    fn run_job_hook(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: &str,
        kind: HookKind,
        job: &Job,
        new_version: Option<&str>,
        error: Option<&str>,
    ) {
        let hook = HookContext {
            plugin: id,
            old_version: job.old_version.as_deref(),
            new_version,
            error,
        };
        self.run_hook(ctx, kind, &hook);
    }
}

#[allow(clippy::too_many_arguments)]
fn new_job(
    host: &dyn Host,
    kind: JobKind,
    trigger: Trigger,
    files: Vec<String>,
    target: Snap,
    old_version: Option<String>,
    max_attempts: u32,
    waiters: Vec<Waiter>,
) -> Job {
    Job {
        kind,
        trigger,
        files,
        target,
        old_version,
        attempt: 1,
        max_attempts,
        started: host.now(),
        started_wall: host.wall(),
        phase: JobPhase::StoppingOld,
        waiters,
        last_error: None,
        announced: false,
        prepared: None,
    }
}

/// The last good build, for a job that starts the newest good one (`start`, `restart`) when its
/// newest build cannot be copied or fails the pre-flight check.
fn newest_good_instead(host: &dyn Host, p: &Plugin, job: &Job) -> Option<Snap> {
    if !job.trigger.wants_newest_good() {
        return None;
    }
    p.last_good
        .clone()
        .filter(|good| host.snapshot_exists(&good.path))
}

/// A job still waiting to retry the copy of an older build would only copy the current one:
/// `job` takes it over (its waiters, and the `reload_started` it already sent) and answers for
/// both, whatever its outcome.
fn take_over_copy_retry(ctx: &mut Ctx<'_>, p: &mut Plugin, job: &mut Job) {
    if p.job.as_ref().is_some_and(awaiting_snapshot)
        && let Some(old) = p.job.take()
    {
        cancel_job_timer(ctx, &old);
        job.waiters.extend(old.waiters);
        job.announced |= old.announced;
    }
}

/// `reload_failed` for `attempt`, with the delay before the next one (`None`: no retry).
fn emit_reload_failed(
    ctx: &mut Ctx<'_>,
    id: &str,
    error: &str,
    attempt: u32,
    retry_in_ms: Option<u64>,
) {
    ctx.emit(Event::plugin(
        id,
        EventKind::ReloadFailed {
            error: error.to_owned(),
            attempt,
            retry_in_ms,
        },
    ));
}

/// Whether a snapshot failed on the daemon's side (the runtime dir full or failing, the build
/// unreadable for an I/O error) rather than for lack of a build: worth retrying (SPEC §5).
fn copy_failed(error: &snapshot::SnapshotError) -> bool {
    use snapshot::SnapshotError as E;
    matches!(
        error,
        E::Write { .. } | E::CreateDir { .. } | E::Read { .. }
    )
}

/// Names shown at most when a plugin dir without its executable says what it holds instead.
const MISSING_LISTED_NAMES: usize = 8;
/// Entries read at most from such a dir: a huge one must not stall the loop.
const MISSING_READ_ENTRIES: usize = 1024;

/// Why a plugin with no usable build is `missing`: the snapshot error, and for an executable
/// that is not there, which files its dir holds instead (a build named differently, a typo).
fn missing_reason(exec: &Path, error: &snapshot::SnapshotError) -> String {
    let snapshot::SnapshotError::NotFound {
        dangling_symlink: false,
        ..
    } = error
    else {
        return error.to_string();
    };
    let Some(dir) = exec.parent() else {
        return error.to_string();
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => return format!("no executable `{}` ({e})", exec.display()),
    };
    let mut names: Vec<String> = entries
        .take(MISSING_READ_ENTRIES)
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with(".hotreload-"))
        .collect();
    if names.is_empty() {
        return format!("no executable `{}`; the directory is empty", exec.display());
    }
    names.sort();
    let more = names.len().saturating_sub(MISSING_LISTED_NAMES);
    names.truncate(MISSING_LISTED_NAMES);
    let mut listed = names.join(", ");
    if more > 0 {
        listed.push_str(&format!(" and {more} more"));
    }
    format!(
        "no executable `{}`; the directory holds: {listed}",
        exec.display()
    )
}

/// A job whose build has not been copied yet (its snapshot failed and waits for a retry).
pub(super) fn awaiting_snapshot(job: &Job) -> bool {
    job.target.path.as_os_str().is_empty()
}

fn empty_snap() -> Snap {
    Snap {
        version: String::new(),
        path: PathBuf::new(),
    }
}

pub(super) fn cancel_job_timer(ctx: &mut Ctx<'_>, job: &Job) {
    if let JobPhase::Backoff { timer, .. } = job.phase {
        ctx.wheel.cancel(timer);
    }
}

pub(super) fn answer_waiters(
    ctx: &mut Ctx<'_>,
    id: &str,
    job: &Job,
    ok: bool,
    error: Option<String>,
    now: Instant,
) {
    let new_version = (!job.target.version.is_empty()).then(|| job.target.version.clone());
    let duration_ms = clock::millis(now.saturating_duration_since(job.started));
    answer_list(
        ctx,
        id,
        &job.waiters,
        ok,
        job.old_version.clone(),
        new_version,
        error,
        duration_ms,
    );
}

/// Answer the waiters of a first start that found no usable build (`version`: the refused one).
fn answer_not_started(
    ctx: &mut Ctx<'_>,
    id: &str,
    waiters: &[Waiter],
    version: Option<String>,
    error: String,
) {
    answer_list(ctx, id, waiters, false, None, version, Some(error), 0);
}

/// Answer waiters whose reload will not happen at all.
pub(super) fn answer_failure(ctx: &mut Ctx<'_>, id: &str, waiters: &[Waiter], why: &str) {
    answer_list(
        ctx,
        id,
        waiters,
        false,
        None,
        None,
        Some(why.to_string()),
        0,
    );
}

/// A finished reload is a successful *request* whatever its outcome: `result.ok` says how it went.
#[allow(clippy::too_many_arguments)]
fn answer_list(
    ctx: &mut Ctx<'_>,
    id: &str,
    waiters: &[Waiter],
    ok: bool,
    old_version: Option<String>,
    new_version: Option<String>,
    error: Option<String>,
    duration_ms: u64,
) {
    let result = TriggerResult {
        duration_ms,
        error,
        new_version,
        ok,
        old_version,
        plugin: id.to_owned(),
    };
    for w in waiters {
        ctx.out.replies.push((w.clone(), result.clone()));
    }
}

/// Keep only the running, retiring, current and last-good snapshots of a plugin.
pub(super) fn prune_snapshots(host: &mut dyn Host, dir: &Path, p: &Plugin) {
    let mut keep: Vec<&str> = Vec::new();
    for inst in [&p.instance, &p.retiring].into_iter().flatten() {
        keep.push(&inst.version);
    }
    for snap in [&p.last_good, &p.current].into_iter().flatten() {
        keep.push(&snap.version);
    }
    if let Some(job) = &p.job {
        keep.push(&job.target.version);
    }
    if let Err(e) = host.prune_snapshots(dir, &keep) {
        log::debug!("[{}] pruning snapshots in {}: {e}", p.id, dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::TestDir;
    use std::fs;

    fn not_found(exec: &Path) -> snapshot::SnapshotError {
        snapshot::SnapshotError::NotFound {
            path: exec.to_path_buf(),
            dangling_symlink: false,
        }
    }

    #[test]
    fn missing_reason_lists_what_the_dir_holds_instead_bounded() {
        let t = TestDir::new("missing-reason");
        let exec = t.join("foo");
        assert_eq!(
            missing_reason(&exec, &not_found(&exec)),
            format!("no executable `{}`; the directory is empty", exec.display())
        );
        for n in 0..10 {
            fs::write(t.join(&format!("f{n}")), b"").unwrap();
        }
        fs::write(t.join(".hotreload-1234"), b"").unwrap();
        assert_eq!(
            missing_reason(&exec, &not_found(&exec)),
            format!(
                "no executable `{}`; the directory holds: f0, f1, f2, f3, f4, f5, f6, f7 and 2 more",
                exec.display()
            )
        );
    }

    #[test]
    fn missing_reason_of_other_errors_is_the_error() {
        let exec = Path::new("/nonexistent-dir/foo");
        let dangling = snapshot::SnapshotError::NotFound {
            path: exec.to_path_buf(),
            dangling_symlink: true,
        };
        assert_eq!(missing_reason(exec, &dangling), dangling.to_string());
    }
}
