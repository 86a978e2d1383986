//! The supervisor: every plugin's processes, reloads, retries, rollbacks and crash restarts.
//!
//! It owns the plugin table, the pid → plugin index and the plugins' output pipes. It never polls
//! and never reads a clock: the daemon hands it inputs (a debounced change, a trigger, a reaped
//! exit, an expired timer, readable pipes) together with a `Ctx` carrying the current time, the
//! timer wheel and an outbox, and it answers by arming timers, sending signals, spawning processes
//! and queueing events and replies.
//!
//! # A job's life (stop-start)
//!
//! ```text
//! begin: snapshot → pre-flight ──(fails: reload_failed, old instance untouched)
//!   │ old instance running?  ── yes → write state, SIGTERM group, arm SIGKILL ─┐
//!   │                                                          reaped ←─────────┘
//!   ▼
//! attempt: fold runtime.json → write state.json → spawn → startup grace
//!   │ exits during grace / exec fails → attempt failed → backoff (doubling) → attempt
//!   │                                   ... last attempt failed → rollback to last good → failed
//!   ▼
//! succeeded: last good = this build; the queued reload (if any) begins
//! ```

pub mod output;
pub mod plugin;
pub mod reap;
pub mod spawn;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Instant;

use mio::{Interest, Registry, Token, unix::SourceFd};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::clock;
use crate::config::{Config, RestartPolicy};
use crate::control::protocol;
use crate::events::Event;
use crate::wheel::{TimerId, TimerWheel};
use crate::{preflight, snapshot, state_file, token};

use output::{LineReader, PipeStatus, Stream};
use plugin::{HistoryEntry, Instance, Job, JobKind, JobPhase, Queued, Rest, Snap, Stop};
pub use plugin::{Plugin, Trigger, Waiter};
use reap::ExitKind;

/// Largest runtime.json the daemon will read (a plugin writing more gets a warning, not an OOM).
pub const MAX_RUNTIME_BYTES: u64 = 16 * 1024 * 1024;
/// Backoff never waits longer than this (SPEC §3).
pub const MAX_RETRY_DELAY_MS: u64 = 60_000;

/// Timers the supervisor arms; the daemon routes them back when they expire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Timer {
    Debounce(String),
    Backoff(String),
    Grace(String, u64),
    Kill(String, u64),
    /// The daemon's own systemd watchdog ping (not a plugin timer; routed by the daemon).
    Watchdog,
}

/// What the supervisor produced for the outside world during one call.
#[derive(Debug, Default)]
pub struct Outbox {
    pub events: Vec<Event>,
    /// Answers to deferred control requests: (client, full response line).
    pub replies: Vec<(crate::control::ClientId, Vec<u8>)>,
}

pub struct Ctx<'a> {
    pub now_ms: u64,
    pub wheel: &'a mut TimerWheel<Timer>,
    pub registry: &'a Registry,
    pub out: &'a mut Outbox,
    pub config: &'a Config,
}

impl Ctx<'_> {
    fn arm(&mut self, after_ms: u64, timer: Timer) -> TimerId {
        self.wheel
            .insert(self.now_ms.saturating_add(after_ms), timer)
    }

    fn emit(&mut self, event: Event) {
        self.out.events.push(event);
    }
}

struct Pipe {
    plugin: String,
    stream: Stream,
    reader: LineReader,
}

/// Totals across plugins for `status`.
#[derive(Debug, Default)]
pub struct Totals {
    pub reload_count: u64,
    pub failed_reloads: u64,
    pub last_reload: Option<String>,
}

pub struct Supervisor {
    plugins: BTreeMap<String, Plugin>,
    pids: HashMap<Pid, (String, u64)>,
    pipes: HashMap<Token, Pipe>,
    /// Pipes whose read budget ran out: read again next turn.
    backlog: Vec<Token>,
    next_pipe: usize,
    next_seq: u64,
    pub totals: Totals,
    shutting_down: bool,
    snapshots_dir: PathBuf,
    state_dir: PathBuf,
}

/// Why a start attempt did not work out.
type AttemptError = String;

impl Supervisor {
    pub fn new(runtime_dir: &Path, state_dir: &Path) -> Supervisor {
        Supervisor {
            plugins: BTreeMap::new(),
            pids: HashMap::new(),
            pipes: HashMap::new(),
            backlog: Vec::new(),
            next_pipe: 0,
            next_seq: 0,
            totals: Totals::default(),
            shutting_down: false,
            snapshots_dir: runtime_dir.join("snapshots"),
            state_dir: state_dir.join("plugins"),
        }
    }

    pub fn plugins(&self) -> impl Iterator<Item = &Plugin> {
        self.plugins.values()
    }

    pub fn get(&self, id: &str) -> Option<&Plugin> {
        self.plugins.get(id)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.plugins.contains_key(id)
    }

    pub fn running_count(&self) -> usize {
        self.plugins.values().filter(|p| p.is_running()).count()
    }

    pub fn state_path(&self, id: &str) -> PathBuf {
        self.state_dir.join(id).join("state.json")
    }

    pub fn runtime_path(&self, id: &str) -> PathBuf {
        self.state_dir.join(id).join("runtime.json")
    }

    fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.snapshots_dir.join(id)
    }

    // ---------------------------------------------------------------------------------------
    // Plugins coming and going

    /// A plugin directory exists: start knowing it, and start it when it has a good build.
    pub fn add_plugin(&mut self, ctx: &mut Ctx<'_>, id: &str, dir: PathBuf) {
        if let Some(p) = self.plugins.get_mut(id) {
            // Came back while we were stopping the old one: keep it.
            p.removing = false;
            return;
        }
        let settings = ctx.config.plugin(id);
        let mut plugin = Plugin::new(id, dir, settings);
        plugin.runtime_data = self.load_preserved_runtime(ctx, id);
        let autostart = plugin.settings.autostart;
        self.plugins.insert(id.to_string(), plugin);
        log::info!("[{id}] plugin added");
        ctx.emit(Event::new("plugin_added", Some(id)));
        if autostart {
            self.begin(
                ctx,
                id,
                JobKind::Start,
                Trigger::Rescan,
                Vec::new(),
                Vec::new(),
            );
        }
    }

    /// The previous run's runtime_data, so state survives a daemon restart too.
    fn load_preserved_runtime(&self, ctx: &mut Ctx<'_>, id: &str) -> Value {
        if !ctx.config.hot_reload.preserve_state {
            return Value::Null;
        }
        match state_file::read_state(&self.state_path(id)) {
            Ok(Some(state)) => state.runtime_data,
            Ok(None) => Value::Null,
            Err(e) => {
                log::warn!("[{id}] ignoring unreadable state file: {e}");
                Value::Null
            }
        }
    }

    /// The plugin directory is gone: stop the plugin, then forget it.
    pub fn remove_plugin(&mut self, ctx: &mut Ctx<'_>, id: &str) {
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        p.removing = true;
        cancel_timer(ctx, &mut p.debounce);
        p.queued = None;
        if let Some(job) = p.job.take() {
            cancel_job_timer(ctx, &job);
            answer_waiters(
                ctx,
                id,
                &job,
                false,
                Some("plugin directory removed".into()),
            );
        }
        if p.instance.is_some() {
            self.stop_instance(ctx, id);
        } else {
            self.forget(ctx, id);
        }
    }

    fn forget(&mut self, ctx: &mut Ctx<'_>, id: &str) {
        if self.plugins.remove(id).is_some() {
            let _ = std::fs::remove_dir_all(self.snapshot_dir(id));
            log::info!("[{id}] plugin removed");
            ctx.emit(Event::new("plugin_removed", Some(id)));
        }
    }

    // ---------------------------------------------------------------------------------------
    // Changes and triggers

    /// A counted file change: (re)arm the plugin's debounce timer.
    pub fn on_change(&mut self, ctx: &mut Ctx<'_>, id: &str, path: &Path, enabled: bool) {
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        if p.removing {
            return;
        }
        let name = path.to_string_lossy().into_owned();
        if !enabled {
            p.changed_while_disabled = true;
            ctx.emit(
                Event::new("change_ignored", Some(id))
                    .with("path", name)
                    .with("reason", "hot reload disabled"),
            );
            return;
        }
        p.pending_files.insert(name);
        cancel_timer(ctx, &mut p.debounce);
        let delay = ctx.config.hot_reload.debounce_delay_ms;
        p.debounce = Some(ctx.arm(delay, Timer::Debounce(id.to_string())));
    }

    fn on_debounce(&mut self, ctx: &mut Ctx<'_>, id: &str) {
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        p.debounce = None;
        let files: Vec<String> = std::mem::take(&mut p.pending_files).into_iter().collect();
        self.request(ctx, id, Trigger::Watch, files, Vec::new());
    }

    /// Ask for a reload (or first start) of `id`: now if idle, queued if a job runs. A pending
    /// retry is superseded: the newest build restarts the attempt count.
    pub fn request(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: &str,
        trigger: Trigger,
        files: Vec<String>,
        waiters: Vec<Waiter>,
    ) {
        if self.shutting_down {
            return;
        }
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        let in_backoff = matches!(
            p.job.as_ref().map(|j| &j.phase),
            Some(JobPhase::Backoff { .. })
        );
        if p.job.is_some() && !in_backoff {
            let q = p.queued.get_or_insert_with(Queued::default);
            q.trigger = Some(trigger);
            q.files.extend(files);
            q.waiters.extend(waiters);
            log::debug!("[{id}] reload queued behind the one in progress");
            return;
        }
        let mut inherited = Vec::new();
        if let Some(job) = p.job.take() {
            cancel_job_timer(ctx, &job);
            inherited = job.waiters;
        }
        inherited.extend(waiters);
        let kind = if p.current.is_some() || p.instance.is_some() {
            JobKind::Reload
        } else {
            JobKind::Start
        };
        self.begin(ctx, id, kind, trigger, files, inherited);
    }

    /// `enable`: reload every plugin whose build changed while hot reload was off.
    pub fn on_enable(&mut self, ctx: &mut Ctx<'_>) {
        let ids: Vec<String> = self
            .plugins
            .values()
            .filter(|p| p.changed_while_disabled)
            .map(|p| p.id.clone())
            .collect();
        for id in ids {
            if let Some(p) = self.plugins.get_mut(&id) {
                p.changed_while_disabled = false;
                let exec = p.exec_path().to_string_lossy().into_owned();
                self.request(ctx, &id, Trigger::Enable, vec![exec], Vec::new());
            }
        }
    }

    /// After lost events: reload every plugin whose executable's version differs from what runs,
    /// and start plugins that have no instance yet but now have a build.
    pub fn rescan_versions(&mut self, ctx: &mut Ctx<'_>) {
        let ids: Vec<String> = self.plugins.keys().cloned().collect();
        for id in ids {
            let Some(p) = self.plugins.get(&id) else {
                continue;
            };
            if p.removing || p.job.is_some() {
                continue;
            }
            let exec = p.exec_path();
            let Ok(version) = snapshot::version_of(&exec) else {
                continue;
            };
            let current = p.current.as_ref().map(|s| s.version.as_str());
            if current != Some(version.as_str()) {
                let files = vec![exec.to_string_lossy().into_owned()];
                self.request(ctx, &id, Trigger::Rescan, files, Vec::new());
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Jobs

    /// Snapshot, pre-flight and no-op check; then stop the old instance or go straight to the
    /// first attempt.
    fn begin(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: &str,
        kind: JobKind,
        trigger: Trigger,
        files: Vec<String>,
        waiters: Vec<Waiter>,
    ) {
        let snap_dir = self.snapshot_dir(id);
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        let exec = p.exec_path();
        let old_version = p.current.as_ref().map(|s| s.version.clone());
        let started = Instant::now();
        let target = match snapshot::take(&exec, &snap_dir) {
            Ok(s) => Snap {
                version: s.version,
                path: s.path,
            },
            Err(e) => {
                let error = e.to_string();
                if kind == JobKind::Start {
                    // No build yet: that is what `missing` means, not an error.
                    log::info!("[{id}] waiting for a build: {error}");
                    p.rest = Rest::Missing;
                    answer_waiters_list(ctx, id, &waiters, false, None, None, Some(error));
                    return;
                }
                let job = Job {
                    kind,
                    trigger,
                    files,
                    target: Snap {
                        version: String::new(),
                        path: PathBuf::new(),
                    },
                    old_version,
                    attempt: 1,
                    max_attempts: 1,
                    started,
                    started_wall: clock::wall_rfc3339(),
                    phase: JobPhase::StoppingOld,
                    waiters,
                    last_error: None,
                };
                p.job = Some(job);
                self.fail_attempt(ctx, id, format!("cannot snapshot the build: {error}"));
                return;
            }
        };
        // No-op: only the executable changed and its content is what already runs.
        let exec_str = exec.to_string_lossy();
        let only_exec = !files.is_empty() && files.iter().all(|f| *f == exec_str);
        let unchanged = old_version.as_deref() == Some(target.version.as_str());
        if unchanged && (only_exec || trigger == Trigger::Rescan || trigger == Trigger::Enable) {
            log::debug!(
                "[{id}] build unchanged ({}), nothing to reload",
                target.version
            );
            for f in &files {
                ctx.emit(
                    Event::new("change_ignored", Some(id))
                        .with("path", f.as_str())
                        .with("reason", format!("unchanged version {}", target.version)),
                );
            }
            answer_waiters_list(
                ctx,
                id,
                &waiters,
                true,
                old_version.clone(),
                Some(target.version.clone()),
                None,
            );
            return;
        }
        if let Err(e) = preflight::check(&target.path) {
            let error = format!("pre-flight check failed: {e}");
            self.refuse_build(
                ctx,
                id,
                kind,
                trigger,
                files,
                old_version,
                &target,
                waiters,
                error,
                started,
            );
            return;
        }
        let max_attempts = if kind == JobKind::Rollback {
            1
        } else {
            1 + ctx.config.hot_reload.max_retries
        };
        let p = self
            .plugins
            .get_mut(id)
            .expect("plugin present: checked above");
        if kind == JobKind::Reload {
            log::info!(
                "[{id}] hot reload started ({}): {} -> {}",
                trigger.as_str(),
                old_version.as_deref().unwrap_or("none"),
                target.version
            );
            ctx.emit(
                Event::new("reload_started", Some(id))
                    .with("trigger", trigger.as_str())
                    .with("files", files.clone()),
            );
        }
        p.job = Some(Job {
            kind,
            trigger,
            files,
            target,
            old_version,
            attempt: 1,
            max_attempts,
            started,
            started_wall: clock::wall_rfc3339(),
            phase: JobPhase::StoppingOld,
            waiters,
            last_error: None,
        });
        if p.instance.is_some() {
            self.stop_instance(ctx, id);
        } else {
            self.attempt(ctx, id);
        }
    }

    /// A build that failed pre-flight: nothing was stopped, nothing to retry (the same bytes
    /// would fail again).
    #[allow(clippy::too_many_arguments)]
    fn refuse_build(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: &str,
        kind: JobKind,
        trigger: Trigger,
        files: Vec<String>,
        old_version: Option<String>,
        target: &Snap,
        waiters: Vec<Waiter>,
        error: String,
        started: Instant,
    ) {
        let snap_dir = self.snapshot_dir(id);
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        log::warn!("[{id}] hot reload failed: {error}");
        p.last_error = Some(error.clone());
        // The refused snapshot is useless: keep only what runs and the last good one.
        prune_snapshots(&snap_dir, p);
        if kind == JobKind::Start {
            p.rest = Rest::Missing;
            answer_waiters_list(
                ctx,
                id,
                &waiters,
                false,
                None,
                Some(target.version.clone()),
                Some(error),
            );
            return;
        }
        p.failed_reloads += 1;
        self.totals.failed_reloads += 1;
        let duration_ms = clock::millis(started.elapsed());
        p.push_history(HistoryEntry {
            time: clock::wall_rfc3339(),
            trigger,
            old_version: old_version.clone(),
            new_version: target.version.clone(),
            ok: false,
            duration_ms,
            error: Some(error.clone()),
        });
        ctx.emit(
            Event::new("reload_started", Some(id))
                .with("trigger", trigger.as_str())
                .with("files", files),
        );
        ctx.emit(
            Event::new("reload_failed", Some(id))
                .with("error", error.as_str())
                .with("attempt", 1)
                .with("retry_in_ms", Value::Null),
        );
        answer_waiters_list(
            ctx,
            id,
            &waiters,
            false,
            old_version,
            Some(target.version.clone()),
            Some(error),
        );
        self.run_queued(ctx, id);
    }

    /// One start of the job's target: fold state, spawn, arm the startup grace.
    fn attempt(&mut self, ctx: &mut Ctx<'_>, id: &str) {
        if let Err(error) = self.try_start(ctx, id) {
            self.fail_attempt(ctx, id, error);
        }
    }

    fn try_start(&mut self, ctx: &mut Ctx<'_>, id: &str) -> Result<(), AttemptError> {
        let (target, version) = {
            let p = self.plugins.get(id).ok_or("plugin vanished")?;
            let job = p.job.as_ref().ok_or("no job")?;
            (job.target.clone(), job.target.version.clone())
        };
        self.prepare_state(ctx, id, &version)?;
        let seq = self.spawn_instance(ctx, id, &target)?;
        let grace = ctx.config.plugin(id).startup_grace_ms;
        let p = self.plugins.get_mut(id).ok_or("plugin vanished")?;
        if let Some(job) = p.job.as_mut() {
            job.phase = JobPhase::Verifying { seq };
        }
        p.current = Some(target);
        if let Some(inst) = p.instance.as_mut() {
            inst.grace = Some(ctx.arm(grace, Timer::Grace(id.to_string(), seq)));
        }
        Ok(())
    }

    /// Carry runtime.json into state.json (or wipe both without preserve_state) before a start.
    fn prepare_state(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: &str,
        version: &str,
    ) -> Result<(), AttemptError> {
        let state_path = self.state_path(id);
        let runtime_path = self.runtime_path(id);
        if !ctx.config.hot_reload.preserve_state {
            for path in [&state_path, &runtime_path] {
                state_file::remove_if_exists(path)
                    .map_err(|e| format!("cannot remove {}: {e}", path.display()))?;
            }
            if let Some(p) = self.plugins.get_mut(id) {
                p.runtime_data = Value::Null;
            }
        } else {
            self.fold_runtime(ctx, id);
        }
        self.write_state(ctx, id, version, "starting")
            .map_err(|e| format!("cannot write state file: {e}"))
    }

    /// Read runtime.json into runtime_data; an invalid file keeps the previous value (warned).
    fn fold_runtime(&mut self, ctx: &mut Ctx<'_>, id: &str) {
        let path = self.runtime_path(id);
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        match state_file::read_runtime(&path, MAX_RUNTIME_BYTES) {
            state_file::RuntimeRead::Missing => {}
            state_file::RuntimeRead::Valid(v) => p.runtime_data = v,
            state_file::RuntimeRead::Invalid(reason) => {
                log::warn!("[{id}] keeping the previous runtime_data: {reason}");
                ctx.emit(
                    Event::new("state_warning", Some(id))
                        .with("error", reason.as_str())
                        .with("path", path.to_string_lossy()),
                );
            }
        }
    }

    fn write_state(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: &str,
        version: &str,
        status: &str,
    ) -> Result<(), String> {
        if !ctx.config.hot_reload.preserve_state && status != "starting" {
            return Ok(());
        }
        let path = self.state_path(id);
        let Some(p) = self.plugins.get(id) else {
            return Ok(());
        };
        let state = state_file::PluginState {
            plugin_id: id.to_string(),
            configuration: p.settings.config.clone(),
            runtime_data: p.runtime_data.clone(),
            last_activity: clock::wall_rfc3339(),
            version: version.to_string(),
            status: status.to_string(),
        };
        state_file::write_state(&path, &state).map_err(|e| e.to_string())
    }

    fn spawn_instance(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: &str,
        target: &Snap,
    ) -> Result<u64, AttemptError> {
        let state_path = self.state_path(id);
        let runtime_path = self.runtime_path(id);
        let p = self.plugins.get(id).ok_or("plugin vanished")?;
        let env = plugin_env(p, &target.version, &state_path, &runtime_path);
        let arg0 = p.settings.exec.to_string_lossy().into_owned();
        let spec = spawn::SpawnSpec {
            program: &target.path,
            arg0: &arg0,
            args: &p.settings.args,
            cwd: &p.dir,
            env,
        };
        let spawned = spawn::spawn(&spec).map_err(|e| e.to_string())?;
        self.next_seq += 1;
        let seq = self.next_seq;
        let mut pipes = Vec::new();
        for (fd, stream) in [
            (spawned.stdout, Stream::Stdout),
            (spawned.stderr, Stream::Stderr),
        ] {
            let token = Token(token::PIPES_BASE + self.next_pipe);
            self.next_pipe += 1;
            let reader = LineReader::new(fd);
            let raw = std::os::fd::AsRawFd::as_raw_fd(reader.fd());
            if let Err(e) = ctx
                .registry
                .register(&mut SourceFd(&raw), token, Interest::READABLE)
            {
                log::warn!("[{id}] cannot poll the plugin's {}: {e}", stream.as_str());
                continue;
            }
            self.pipes.insert(
                token,
                Pipe {
                    plugin: id.to_string(),
                    stream,
                    reader,
                },
            );
            // Output may already be waiting (edge-triggered: read once now).
            self.backlog.push(token);
            pipes.push(token);
        }
        let pid = spawned.pid;
        self.pids.insert(pid, (id.to_string(), seq));
        let p = self.plugins.get_mut(id).ok_or("plugin vanished")?;
        p.instance = Some(Instance {
            seq,
            pid,
            pidfd: spawned.pidfd,
            version: target.version.clone(),
            started_wall: clock::wall_rfc3339(),
            started: Instant::now(),
            grace: None,
            verified: false,
            stop: None,
            pipes,
            reaped: false,
        });
        log::info!("[{id}] started pid {} version {}", pid, target.version);
        ctx.emit(
            Event::new("plugin_started", Some(id))
                .with("pid", pid.as_raw())
                .with("version", target.version.as_str()),
        );
        Ok(seq)
    }

    /// The startup grace passed with the instance alive: it counts as started.
    fn on_grace(&mut self, ctx: &mut Ctx<'_>, id: &str, seq: u64) {
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        let Some(inst) = p.instance.as_mut().filter(|i| i.seq == seq) else {
            return;
        };
        inst.grace = None;
        inst.verified = true;
        ctx.emit(Event::new("plugin_ready", Some(id)));
        let verifying = matches!(
            p.job.as_ref().map(|j| &j.phase),
            Some(JobPhase::Verifying { seq: s }) if *s == seq
        );
        if verifying {
            self.succeed(ctx, id);
        }
    }

    fn succeed(&mut self, ctx: &mut Ctx<'_>, id: &str) {
        let snap_dir = self.snapshot_dir(id);
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        let Some(job) = p.job.take() else { return };
        let duration_ms = clock::millis(job.started.elapsed());
        p.last_good = Some(job.target.clone());
        p.rest = Rest::Stopped;
        match job.kind {
            JobKind::Reload => {
                p.reload_count += 1;
                p.last_error = None;
                self.totals.reload_count += 1;
                let now = clock::wall_rfc3339();
                self.totals.last_reload = Some(now.clone());
                p.push_history(HistoryEntry {
                    time: now,
                    trigger: job.trigger,
                    old_version: job.old_version.clone(),
                    new_version: job.target.version.clone(),
                    ok: true,
                    duration_ms,
                    error: None,
                });
                log::info!(
                    "[{id}] hot reload completed: {} -> {} in {duration_ms} ms",
                    job.old_version.as_deref().unwrap_or("none"),
                    job.target.version
                );
                ctx.emit(
                    Event::new("reload_succeeded", Some(id))
                        .with("old_version", job.old_version.clone())
                        .with("new_version", job.target.version.as_str())
                        .with("duration_ms", duration_ms),
                );
            }
            JobKind::Rollback => {
                log::warn!("[{id}] rolled back to version {}", job.target.version);
                ctx.emit(
                    Event::new("rolled_back", Some(id))
                        .with("version", job.target.version.as_str()),
                );
            }
            JobKind::Start | JobKind::Restart => {}
        }
        if job.kind != JobKind::Rollback {
            answer_waiters(ctx, id, &job, true, None);
        }
        prune_snapshots(&snap_dir, p);
        let version = job.target.version.clone();
        let _ = self.write_state(ctx, id, &version, "running");
        self.run_queued(ctx, id);
    }

    /// An attempt failed: retry after backoff, or give up (rollback, then `failed`).
    fn fail_attempt(&mut self, ctx: &mut Ctx<'_>, id: &str, error: AttemptError) {
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        let Some(job) = p.job.as_mut() else { return };
        p.last_error = Some(error.clone());
        job.last_error = Some(error.clone());
        let attempt = job.attempt;
        let last = attempt >= job.max_attempts;
        let kind = job.kind;
        // A restart after a crash already waited one base delay before its first attempt.
        let exponent = attempt - 1 + u32::from(kind == JobKind::Restart);
        let delay = retry_delay(ctx.config.hot_reload.retry_delay_ms, exponent);
        if kind == JobKind::Reload || kind == JobKind::Rollback {
            log::warn!("[{id}] hot reload failed (attempt {attempt}): {error}");
        } else {
            log::warn!("[{id}] start failed (attempt {attempt}): {error}");
        }
        if kind == JobKind::Reload {
            ctx.emit(
                Event::new("reload_failed", Some(id))
                    .with("error", error.as_str())
                    .with("attempt", attempt)
                    .with(
                        "retry_in_ms",
                        if last {
                            Value::Null
                        } else {
                            Value::from(delay)
                        },
                    ),
            );
        }
        if !last {
            job.attempt += 1;
            let timer = ctx.arm(delay, Timer::Backoff(id.to_string()));
            job.phase = JobPhase::Backoff {
                timer,
                due_ms: ctx.now_ms + delay,
            };
            return;
        }
        self.give_up(ctx, id, error);
    }

    /// The last attempt failed: record it, answer waiters, roll back if there is somewhere to go.
    fn give_up(&mut self, ctx: &mut Ctx<'_>, id: &str, error: String) {
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        let Some(job) = p.job.take() else { return };
        let duration_ms = clock::millis(job.started.elapsed());
        if job.kind == JobKind::Reload {
            p.failed_reloads += 1;
            self.totals.failed_reloads += 1;
            p.push_history(HistoryEntry {
                time: clock::wall_rfc3339(),
                trigger: job.trigger,
                old_version: job.old_version.clone(),
                new_version: job.target.version.clone(),
                ok: false,
                duration_ms,
                error: Some(error.clone()),
            });
        }
        if job.kind != JobKind::Rollback {
            answer_waiters(ctx, id, &job, false, Some(error.clone()));
        }
        let rollback_to = p.last_good.clone().filter(|good| {
            job.kind == JobKind::Reload && *good != job.target && good.path.exists()
        });
        if let Some(good) = rollback_to {
            p.current = p.last_good.clone();
            log::warn!("[{id}] rolling back to last good version {}", good.version);
            self.begin_rollback(ctx, id, good);
            return;
        }
        p.rest = Rest::Failed;
        log::error!("[{id}] failed: {error}");
        self.run_queued(ctx, id);
    }

    fn begin_rollback(&mut self, ctx: &mut Ctx<'_>, id: &str, good: Snap) {
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        p.job = Some(Job {
            kind: JobKind::Rollback,
            trigger: Trigger::Watch,
            files: Vec::new(),
            old_version: None,
            target: good,
            attempt: 1,
            max_attempts: 1,
            started: Instant::now(),
            started_wall: clock::wall_rfc3339(),
            phase: JobPhase::StoppingOld,
            waiters: Vec::new(),
            last_error: None,
        });
        self.attempt(ctx, id);
    }

    fn on_backoff(&mut self, ctx: &mut Ctx<'_>, id: &str) {
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        let Some(job) = p.job.as_mut() else { return };
        if !matches!(job.phase, JobPhase::Backoff { .. }) {
            return;
        }
        job.phase = JobPhase::StoppingOld;
        self.attempt(ctx, id);
    }

    /// Start the reload that was asked for while the last job ran.
    fn run_queued(&mut self, ctx: &mut Ctx<'_>, id: &str) {
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        if p.removing || self.shutting_down {
            return;
        }
        let Some(q) = p.queued.take() else { return };
        let trigger = q.trigger.unwrap_or(Trigger::Watch);
        self.request(ctx, id, trigger, q.files.into_iter().collect(), q.waiters);
    }

    // ---------------------------------------------------------------------------------------
    // Stopping and exits

    /// SIGTERM to the instance's group, SIGKILL after the stop timeout.
    fn stop_instance(&mut self, ctx: &mut Ctx<'_>, id: &str) {
        let preserve = ctx.config.hot_reload.preserve_state;
        if preserve {
            self.fold_runtime(ctx, id);
            let version = self
                .plugins
                .get(id)
                .and_then(|p| p.instance.as_ref())
                .map(|i| i.version.clone());
            if let Some(version) = version {
                if let Err(e) = self.write_state(ctx, id, &version, "stopping") {
                    log::warn!("[{id}] cannot write state file before stopping: {e}");
                }
            }
        }
        let timeout = ctx.config.plugin(id).stop_timeout_ms;
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        let Some(inst) = p.instance.as_mut() else {
            return;
        };
        if inst.stop.is_some() {
            return;
        }
        cancel_timer(ctx, &mut inst.grace);
        log::info!("[{id}] stopping pid {}", inst.pid);
        if let Err(e) = spawn::signal_group(inst.pid, libc::SIGTERM) {
            log::debug!("[{id}] SIGTERM to group {}: {e}", inst.pid);
        }
        let _ = spawn::signal_group(inst.pid, libc::SIGCONT);
        let seq = inst.seq;
        inst.stop = Some(Stop {
            kill_timer: Some(ctx.arm(timeout, Timer::Kill(id.to_string(), seq))),
            killed: false,
        });
    }

    fn on_kill_timer(&mut self, ctx: &mut Ctx<'_>, id: &str, seq: u64) {
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        let Some(inst) = p.instance.as_mut().filter(|i| i.seq == seq) else {
            return;
        };
        let Some(stop) = inst.stop.as_mut() else {
            return;
        };
        stop.kill_timer = None;
        stop.killed = true;
        log::warn!(
            "[{id}] pid {} did not exit within the stop timeout: sending SIGKILL to its process group",
            inst.pid
        );
        if !inst.reaped {
            let _ = spawn::signal_process(inst.pid, inst.pidfd.as_ref(), libc::SIGKILL);
        }
        let _ = spawn::signal_group(inst.pid, libc::SIGKILL);
        if inst.reaped {
            // Only stragglers of the group were left: the leader is gone already.
            self.instance_gone(ctx, id);
        }
    }

    /// Reaped children from the daemon's waitpid loop.
    pub fn on_exit(&mut self, ctx: &mut Ctx<'_>, pid: Pid, status: ExitKind) {
        let Some((id, seq)) = self.pids.remove(&pid) else {
            log::debug!("reaped pid {pid} ({status}), not a plugin leader");
            return;
        };
        let Some(p) = self.plugins.get_mut(&id) else {
            return;
        };
        let Some(inst) = p.instance.as_mut().filter(|i| i.seq == seq) else {
            return;
        };
        inst.reaped = true;
        inst.pidfd = None;
        let expected = inst.stop.is_some();
        let pid_raw = inst.pid.as_raw();
        log::info!(
            "[{id}] pid {pid_raw} exited with {status}{}",
            if expected { "" } else { " (unexpected)" }
        );
        let mut ev = Event::new("plugin_exited", Some(&id))
            .with("pid", pid_raw)
            .with("expected", expected);
        ev = match status {
            ExitKind::Code(c) => ev.with("code", c),
            ExitKind::Signal(s) => ev.with("signal", s),
        };
        ctx.emit(ev);
        if expected {
            // Members of the group may outlive the leader: wait for the kill timer to sweep
            // them, unless none is left.
            let group_left = spawn::group_alive(inst.pid);
            let killed = inst.stop.as_ref().is_some_and(|s| s.killed);
            if group_left && !killed {
                log::debug!("[{id}] leader exited, members of its process group remain");
                return;
            }
            self.instance_gone(ctx, &id);
        } else {
            // Anything the plugin left behind in its group goes with it.
            let _ = spawn::signal_group(inst.pid, libc::SIGKILL);
            self.unexpected_exit(ctx, &id, status);
        }
    }

    /// After any reap: a stopped instance whose leader is gone may have been waiting only for
    /// members of its group (now reaped by us as subreaper, or exited on their own).
    pub fn check_stragglers(&mut self, ctx: &mut Ctx<'_>) {
        let done: Vec<String> = self
            .plugins
            .values()
            .filter(|p| {
                p.instance
                    .as_ref()
                    .is_some_and(|i| i.reaped && i.stop.is_some() && !spawn::group_alive(i.pid))
            })
            .map(|p| p.id.clone())
            .collect();
        for id in done {
            self.instance_gone(ctx, &id);
        }
    }

    /// The stopped instance and its group are gone: continue whatever asked for the stop.
    fn instance_gone(&mut self, ctx: &mut Ctx<'_>, id: &str) {
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        let Some(mut inst) = p.instance.take() else {
            return;
        };
        if let Some(stop) = inst.stop.as_mut() {
            cancel_timer(ctx, &mut stop.kill_timer);
        }
        cancel_timer(ctx, &mut inst.grace);
        let version = inst.version.clone();
        if ctx.config.hot_reload.preserve_state {
            self.fold_runtime(ctx, id);
            if let Err(e) = self.write_state(ctx, id, &version, "stopped") {
                log::warn!("[{id}] cannot write state file: {e}");
            }
        }
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        if p.removing {
            self.forget(ctx, id);
            return;
        }
        if p.job.is_some() {
            self.attempt(ctx, id);
        } else {
            p.rest = Rest::Stopped;
        }
    }

    fn unexpected_exit(&mut self, ctx: &mut Ctx<'_>, id: &str, status: ExitKind) {
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        let Some(inst) = p.instance.take() else {
            return;
        };
        let mut inst = inst;
        cancel_timer(ctx, &mut inst.grace);
        let was_verified = inst.verified;
        let seq = inst.seq;
        if ctx.config.hot_reload.preserve_state {
            self.fold_runtime(ctx, id);
        }
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        let verifying = matches!(
            p.job.as_ref().map(|j| &j.phase),
            Some(JobPhase::Verifying { seq: s }) if *s == seq
        );
        if verifying {
            let grace = p.settings.startup_grace_ms;
            self.fail_attempt(
                ctx,
                id,
                format!("exited during the {grace} ms startup grace with {status}"),
            );
            return;
        }
        if self.shutting_down || p.removing {
            return;
        }
        let _ = was_verified;
        let restart = match p.settings.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !status.is_success(),
            RestartPolicy::Never => false,
        };
        if !restart {
            p.rest = if status.is_success() {
                Rest::Stopped
            } else {
                Rest::Failed
            };
            if !status.is_success() {
                p.last_error = Some(format!("exited with {status}"));
            }
            return;
        }
        let Some(target) = p.current.clone() else {
            p.rest = Rest::Failed;
            return;
        };
        p.restarts += 1;
        p.last_error = Some(format!("exited with {status}"));
        let delay = retry_delay(ctx.config.hot_reload.retry_delay_ms, 0);
        let timer = ctx.arm(delay, Timer::Backoff(id.to_string()));
        log::warn!("[{id}] exited unexpectedly with {status}: restarting in {delay} ms");
        p.job = Some(Job {
            kind: JobKind::Restart,
            trigger: Trigger::Watch,
            files: Vec::new(),
            old_version: Some(target.version.clone()),
            target,
            attempt: 1,
            max_attempts: 1 + ctx.config.hot_reload.max_retries,
            started: Instant::now(),
            started_wall: clock::wall_rfc3339(),
            phase: JobPhase::Backoff {
                timer,
                due_ms: ctx.now_ms + delay,
            },
            waiters: Vec::new(),
            last_error: None,
        });
    }

    // ---------------------------------------------------------------------------------------
    // Timers, pipes, shutdown

    pub fn on_timer(&mut self, ctx: &mut Ctx<'_>, timer: Timer) {
        match timer {
            Timer::Debounce(id) => self.on_debounce(ctx, &id),
            Timer::Backoff(id) => self.on_backoff(ctx, &id),
            Timer::Grace(id, seq) => self.on_grace(ctx, &id, seq),
            Timer::Kill(id, seq) => self.on_kill_timer(ctx, &id, seq),
            Timer::Watchdog => {}
        }
    }

    pub fn owns_pipe(&self, token: Token) -> bool {
        self.pipes.contains_key(&token)
    }

    /// Read a plugin's output pipe: each line to the log and to subscribers.
    pub fn on_pipe(&mut self, ctx: &mut Ctx<'_>, token: Token) {
        let Some(pipe) = self.pipes.get_mut(&token) else {
            return;
        };
        let id = pipe.plugin.clone();
        let stream = pipe.stream;
        let events = &mut ctx.out.events;
        let status = pipe.reader.read_lines(|line| {
            log::info!("[{id}] {line}");
            events.push(
                Event::new("plugin_output", Some(&id))
                    .with("stream", stream.as_str())
                    .with("line", line),
            );
        });
        match status {
            PipeStatus::Idle => {}
            PipeStatus::MoreLater => self.backlog.push(token),
            PipeStatus::Closed => {
                if let Some(pipe) = self.pipes.remove(&token) {
                    let raw = std::os::fd::AsRawFd::as_raw_fd(pipe.reader.fd());
                    let _ = ctx.registry.deregister(&mut SourceFd(&raw));
                }
            }
        }
    }

    /// Pipes to read again this turn (budget ran out, or freshly spawned).
    pub fn take_backlog(&mut self) -> Vec<Token> {
        std::mem::take(&mut self.backlog)
    }

    pub fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Settings changed by a config reload: restart plugins whose effective settings differ.
    pub fn apply_config(&mut self, ctx: &mut Ctx<'_>) {
        let ids: Vec<String> = self.plugins.keys().cloned().collect();
        for id in ids {
            let settings = ctx.config.plugin(&id);
            let Some(p) = self.plugins.get_mut(&id) else {
                continue;
            };
            if p.settings == settings {
                continue;
            }
            log::info!("[{id}] settings changed: restarting");
            p.settings = settings;
            let exec = p.exec_path().to_string_lossy().into_owned();
            if p.instance.is_some() || p.current.is_some() {
                self.request(
                    ctx,
                    &id,
                    Trigger::Config,
                    vec![exec, "hotreload.toml".into()],
                    Vec::new(),
                );
            }
        }
    }

    /// SIGTERM/SIGINT: stop every plugin in parallel, preserving state. Returns when it is done.
    pub fn begin_shutdown(&mut self, ctx: &mut Ctx<'_>) {
        self.shutting_down = true;
        let ids: Vec<String> = self.plugins.keys().cloned().collect();
        for id in ids {
            let Some(p) = self.plugins.get_mut(&id) else {
                continue;
            };
            cancel_timer(ctx, &mut p.debounce);
            p.queued = None;
            if let Some(job) = p.job.take() {
                cancel_job_timer(ctx, &job);
                answer_waiters(
                    ctx,
                    &id,
                    &job,
                    false,
                    Some("the daemon is shutting down".into()),
                );
            }
            if p.instance.is_some() {
                self.stop_instance(ctx, &id);
            }
        }
    }

    pub fn all_stopped(&self) -> bool {
        self.plugins.values().all(|p| p.instance.is_none())
    }

    /// A plugin's last-known PluginState as written on disk (for the `plugin` command).
    pub fn state_file_json(&self, id: &str) -> Value {
        match state_file::read_state(&self.state_path(id)) {
            Ok(Some(state)) => serde_json::to_value(state).unwrap_or(Value::Null),
            _ => Value::Null,
        }
    }
}

fn retry_delay(base_ms: u64, exponent: u32) -> u64 {
    let factor = 1u64.checked_shl(exponent.min(32)).unwrap_or(u64::MAX);
    base_ms.saturating_mul(factor).min(MAX_RETRY_DELAY_MS)
}

fn cancel_timer(ctx: &mut Ctx<'_>, timer: &mut Option<TimerId>) {
    if let Some(t) = timer.take() {
        ctx.wheel.cancel(t);
    }
}

fn cancel_job_timer(ctx: &mut Ctx<'_>, job: &Job) {
    if let JobPhase::Backoff { timer, .. } = job.phase {
        ctx.wheel.cancel(timer);
    }
}

fn answer_waiters(ctx: &mut Ctx<'_>, id: &str, job: &Job, ok: bool, error: Option<String>) {
    let new_version = (!job.target.version.is_empty()).then(|| job.target.version.clone());
    let duration_ms = clock::millis(job.started.elapsed());
    for w in &job.waiters {
        let result = json!({
            "plugin": id, "ok": ok, "old_version": job.old_version, "new_version": new_version,
            "duration_ms": duration_ms, "error": error,
        });
        reply_result(ctx, w, result);
    }
}

fn answer_waiters_list(
    ctx: &mut Ctx<'_>,
    id: &str,
    waiters: &[Waiter],
    ok: bool,
    old_version: Option<String>,
    new_version: Option<String>,
    error: Option<String>,
) {
    for w in waiters {
        let result = json!({
            "plugin": id, "ok": ok, "old_version": old_version, "new_version": new_version,
            "duration_ms": 0, "error": error,
        });
        reply_result(ctx, w, result);
    }
}

/// A finished reload is a successful *request* whatever its outcome: `result.ok` says how it went.
fn reply_result(ctx: &mut Ctx<'_>, w: &Waiter, result: Value) {
    let mut body = serde_json::Map::new();
    body.insert("result".into(), result);
    ctx.out
        .replies
        .push((w.client, protocol::success(w.request_id.as_ref(), body)));
}

/// Keep only the running and the last-good snapshot of a plugin.
fn prune_snapshots(dir: &Path, p: &Plugin) {
    let mut keep: Vec<&str> = Vec::new();
    if let Some(i) = &p.instance {
        keep.push(&i.version);
    }
    if let Some(g) = &p.last_good {
        keep.push(&g.version);
    }
    if let Some(c) = &p.current {
        keep.push(&c.version);
    }
    if let Err(e) = snapshot::prune(dir, &keep) {
        log::debug!("[{}] pruning snapshots in {}: {e}", p.id, dir.display());
    }
}

/// The plugin's environment (SPEC §4): ours minus the service-manager variables, plus the
/// plugin's `env`, plus the HOTRELOAD_* contract.
fn plugin_env(
    p: &Plugin,
    version: &str,
    state_path: &Path,
    runtime_path: &Path,
) -> BTreeMap<OsString, OsString> {
    let mut env: BTreeMap<OsString, OsString> = std::env::vars_os()
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            !(k == "NOTIFY_SOCKET" || k.starts_with("LISTEN_") || k.starts_with("WATCHDOG_"))
        })
        .collect();
    for (k, v) in &p.settings.env {
        env.insert(k.into(), v.into());
    }
    let vars: [(&str, OsString); 5] = [
        ("HOTRELOAD_PLUGIN_ID", p.id.clone().into()),
        ("HOTRELOAD_PLUGIN_DIR", p.dir.clone().into_os_string()),
        ("HOTRELOAD_VERSION", version.into()),
        ("HOTRELOAD_STATE_FILE", state_path.as_os_str().to_owned()),
        (
            "HOTRELOAD_RUNTIME_FILE",
            runtime_path.as_os_str().to_owned(),
        ),
    ];
    for (k, v) in vars {
        env.insert(k.into(), v);
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_and_caps() {
        assert_eq!(retry_delay(50, 0), 50);
        assert_eq!(retry_delay(50, 1), 100);
        assert_eq!(retry_delay(50, 2), 200);
        assert_eq!(retry_delay(1000, 10), MAX_RETRY_DELAY_MS);
        assert_eq!(retry_delay(u64::MAX, 40), MAX_RETRY_DELAY_MS);
    }
}
