//! The supervisor: every plugin's processes, reloads, retries, rollbacks and crash restarts.
//!
//! It never polls: the daemon hands it inputs (a debounced change, a trigger, a reaped exit, an
//! expired timer, a readable fd) together with a `Ctx` carrying the loop's time (which timers
//! are armed against), the timer wheel and an outbox, and it answers by arming timers and
//! queueing events and replies. What it does to the machine (spawn, signal, snapshot,
//! pre-flight, state files, hooks, containment) and the clocks it reads for durations and
//! timestamps go through its [`Host`] (`host.rs`): the real one, or a recording fake in the
//! unit tests (`tests.rs`).
//!
//! `Supervisor` is two halves: the plugin table, and `Core`: the host and what all plugins
//! share (the pid → plugin index, the index of live instances containment attributes orphans
//! with, output pipes, notify sockets, reload hooks in flight, the sequence and token
//! counters, the deferred fsyncs, `shutting_down`, the totals). An entry point (a timer, a
//! reap, a control request, a watch change) looks its plugin up once and lends both halves
//! with `split(id)`; the logic that concerns that one plugin is a `Core` method taking
//! `&mut Plugin`, or a `Plugin` method. That includes stopping, aborting and killing an
//! instance (`Core::stop_instance`, `abort_instance`, `kill_stopping`, containment's
//! `kill_members`, `members_alive`, `signal_escapees`), each saying whether the instance is
//! already gone, and the whole loop that follows: what follows an instance being gone
//! (`instance_gone`, `continue_after_instance`, `unexpected_exit`) and the job steps that chain
//! into it (begin, prepare, attempt, success, failing an attempt, giving up, a queued reload,
//! a crash restart, `request`, `fail_at_start_limit`, `stop_all_instances`). None of them takes
//! a plugin out of the table, which they cannot see: a removed plugin whose last instance went
//! is recorded in `Core::to_forget` (`instance_gone` settles no stop for it), and the entry
//! point forgets it with `forget_pending` once it has the plugin back; a removed plugin never
//! has a job, so nothing after that point acts on it. `Supervisor::request` stays for the
//! daemon's `trigger` and the tests.
//!
//! The code is split by concern:
//!
//! | file | owns |
//! | --- | --- |
//! | `mod.rs` | `Supervisor` and `Core`; plugins coming and going, changes, triggers, timers, shutdown |
//! | `plugin.rs` | the data: `Plugin`, `Instance` with its `Phase` and `Leader`, `Job` and its `JobPhase`, `Rest`, `Wanted`; `state_name` |
//! | `job.rs` | a reload/start/restart/rollback from snapshot to success or giving up |
//! | `state.rs` | the plugin's state.json and runtime.json: loading, folding, writing, setting aside |
//! | `lifecycle.rs` | `stop`, `start`, `restart` of one plugin; its own hot reload switch |
//! | `instance.rs` | starting, verifying, stopping and reaping processes |
//! | `start_limit.rs` | the start limit and the crash restart delay |
//! | `protocol.rs` | what plugins say on their notify socket; listening sockets; reload hooks |
//! | `host.rs` | the `Host` trait (every effect on the machine, and the clocks) and `OsHost` |
//! | `contain.rs`, `cgroup.rs`, `procs.rs`, `record.rs` | containment: which processes an instance has, killing them all, the instance record |
//! | `spawn.rs`, `reap.rs`, `output.rs` | fork/exec, waitpid, output pipes (used through `OsHost`) |
//! | `credentials.rs` | what a plugin with `user`/`group` is given of the daemon's files |
//! | `testhost.rs`, `tests.rs` | the recording fake host and the lifecycle's unit tests |
//!
//! # A job's life
//!
//! ```text
//! begin: snapshot → pre-flight ──(fails: reload_failed, old instance untouched)
//!   │ stop-start: old instance running? → write state, SIGTERM group, arm SIGKILL → reaped ─┐
//!   │ start-stop: the old instance keeps serving in the `Retiring` slot                    │
//!   ▼                                                                                     ◄─┘
//! attempt: fold runtime.json → write state.json → spawn → verify (grace or READY=1)
//!   │ exits / misses readiness / exec fails → attempt failed → backoff (doubling) → attempt
//!   │        ... last attempt failed → rollback to last good (or keep the retiring one) → failed
//!   ▼
//! succeeded: last good = this build; retiring instance stopped; the queued reload begins
//! ```

mod cgroup;
mod contain;
mod credentials;
pub mod host;
mod instance;
mod job;
mod lifecycle;
pub mod output;
pub mod plugin;
mod procs;
mod protocol;
pub mod reap;
mod record;
pub mod spawn;
mod start_limit;
mod state;
#[cfg(test)]
mod testhost;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};

use mio::{Registry, Token, unix::SourceFd};
use nix::unistd::Pid;
use serde_json::Value;

use crate::config::{self, Config};
use crate::hooks::HookRun;
use crate::plugin_notify::NotifySocket;
use crate::protocol::{Event, EventKind};
use crate::token;
use crate::wheel::{TimerId, TimerWheel};

use host::Procs;
pub use host::{Host, OsHost};

use output::{LineReader, PipeStatus, Stream};
use plugin::{Instance, JobPhase, Queued};
pub use plugin::{Plugin, Reply, Trigger, Waiter};

/// Largest runtime.json the daemon will read (a plugin writing more gets a warning, not an OOM).
pub const MAX_RUNTIME_BYTES: u64 = 16 * 1024 * 1024;
/// Backoff never waits longer than this (SPEC §3).
pub const MAX_RETRY_DELAY_MS: u64 = 60_000;

/// Timers the supervisor arms; the daemon routes them back when they expire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Timer {
    Debounce(String),
    Backoff(String),
    /// Startup grace (exec) or readiness timeout (notify) of instance `seq`.
    Verify(String, u64),
    /// SIGKILL escalation for instance `seq`.
    Kill(String, u64),
    /// Instance `seq` missed its WATCHDOG=1 deadline.
    PluginWatchdog(String, u64),
    /// A reload hook (by pid) ran past hooks.timeout_ms.
    HookTimeout(i32),
    /// The daemon's own systemd watchdog ping (not a plugin timer; routed by the daemon).
    Watchdog,
    /// Look again for a missing plugins dir (not a plugin timer; routed by the daemon).
    PluginsDir,
    /// Free the memory that stages snapshots, if no reload used it for a while.
    ReleaseSnapshotBuffer,
}

/// What the supervisor produced for the outside world during one call.
#[derive(Debug, Default)]
pub struct Outbox {
    pub events: Vec<Event>,
    /// Answers to deferred control requests: who waits, and how the reload went.
    pub replies: Vec<(Waiter, crate::protocol::TriggerResult)>,
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
    /// Everything but the plugins, lent with one of them (`split`).
    core: Core,
}

/// What the lifecycle logic needs besides the plugin it works on: the host, the bookkeeping
/// shared by all plugins (leader pids, pipes, notify sockets, hooks, counters) and the paths.
/// Kept apart from the plugin table so that an entry point looks a plugin up once and lends
/// both (`Supervisor::split`).
pub(super) struct Core {
    /// Leader pid → (plugin, instance seq).
    pids: HashMap<Pid, (String, u64)>,
    /// Every instance in a plugin's slot, by seq, from its spawn until it leaves the slot:
    /// what containment needs to attribute an orphan without the plugin table (`host::Live`).
    live: BTreeMap<u64, host::Live>,
    pipes: HashMap<Token, Pipe>,
    /// Notify sockets by token → plugin id.
    notify: HashMap<Token, (String, NotifySocket)>,
    /// Reload hooks running, by pid, with their timeout timer.
    hooks: HashMap<Pid, (HookRun, TimerId)>,
    /// Pipes whose read budget ran out: read again next turn.
    backlog: Vec<Token>,
    /// Pipes read to their end this turn, closed at its end (`close_ended_pipes`): an old
    /// instance's pipes end as it exits, and their close would otherwise sit between its reap
    /// and its successor's start.
    ended_pipes: Vec<Pipe>,
    /// Plugins found at start (or added) waiting for their first start.
    pending_starts: VecDeque<String>,
    /// State files renamed into place (plugin id, path) whose fsyncs are still due
    /// (`sync_state_dirs`).
    dir_syncs: Vec<(String, PathBuf)>,
    /// The same, for state files written while the plugin's old instance stops: due once no
    /// reload waits for that stop any more (its new instance spawned, or the reload ended).
    dir_syncs_after_stop: Vec<(String, PathBuf)>,
    /// Removed plugins whose last instance is gone: taken out of the table (`forget_pending`)
    /// by the `Supervisor` entry point that lent the plugin out, once it has it back.
    to_forget: Vec<String>,
    next_token: usize,
    next_seq: u64,
    totals: Totals,
    shutting_down: bool,
    /// When a reload last staged a snapshot in memory, and the timer that frees that memory
    /// once none has for `SNAPSHOT_BUFFER_KEEP_MS` (armed only while memory is held, so an
    /// idle daemon has no timer for it).
    last_staged_ms: u64,
    release_timer: Option<TimerId>,
    /// An instance was spawned in this turn of the event loop (`spawn_instance`).
    spawned_this_turn: bool,
    snapshots_dir: PathBuf,
    notify_dir: PathBuf,
    state_dir: PathBuf,
    /// Everything done to the machine: processes, builds, state files, hooks, containment.
    host: Box<dyn Host>,
}

/// How long the memory that stages snapshots is kept after the last reload that used it: a
/// build loop reloads every few seconds, and faulting the buffer in again costs as much as
/// copying into it.
const SNAPSHOT_BUFFER_KEEP_MS: u64 = 30_000;

impl Core {
    fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.snapshots_dir.join(id)
    }

    /// A reload stages a snapshot: keep the buffer for a while, and arm the timer that frees it.
    fn note_staging(&mut self, ctx: &mut Ctx<'_>) {
        self.last_staged_ms = ctx.now_ms;
        if self.release_timer.is_none() {
            let timer = ctx.arm(SNAPSHOT_BUFFER_KEEP_MS, Timer::ReleaseSnapshotBuffer);
            self.release_timer = Some(timer);
        }
    }

    fn on_release_timer(&mut self, ctx: &mut Ctx<'_>) {
        self.release_timer = None;
        let idle = ctx.now_ms.saturating_sub(self.last_staged_ms);
        if idle < SNAPSHOT_BUFFER_KEEP_MS {
            let timer = ctx.arm(SNAPSHOT_BUFFER_KEEP_MS - idle, Timer::ReleaseSnapshotBuffer);
            self.release_timer = Some(timer);
        } else {
            self.host.release_snapshot_buffer();
        }
    }

    fn new_token(&mut self) -> Token {
        let t = Token(token::PIPES_BASE + self.next_token);
        self.next_token += 1;
        t
    }
}

impl Supervisor {
    pub fn new(runtime_dir: &Path, state_dir: &Path) -> Supervisor {
        let host = OsHost::new(runtime_dir, &state_dir.join("plugins"));
        Supervisor::with_host(runtime_dir, state_dir, Box::new(host))
    }

    /// A supervisor acting through `host` (a fake one in unit tests).
    pub fn with_host(runtime_dir: &Path, state_dir: &Path, host: Box<dyn Host>) -> Supervisor {
        let core = Core {
            pids: HashMap::new(),
            live: BTreeMap::new(),
            pipes: HashMap::new(),
            notify: HashMap::new(),
            hooks: HashMap::new(),
            backlog: Vec::new(),
            ended_pipes: Vec::new(),
            pending_starts: VecDeque::new(),
            dir_syncs: Vec::new(),
            dir_syncs_after_stop: Vec::new(),
            to_forget: Vec::new(),
            next_token: 0,
            next_seq: 0,
            totals: Totals::default(),
            shutting_down: false,
            last_staged_ms: 0,
            release_timer: None,
            spawned_this_turn: false,
            snapshots_dir: runtime_dir.join("snapshots"),
            notify_dir: runtime_dir.join("notify"),
            state_dir: state_dir.join("plugins"),
            host,
        };
        Supervisor {
            plugins: BTreeMap::new(),
            core,
        }
    }

    /// The plugin `id` and the rest of the supervisor, lent together: the one lookup an entry
    /// point makes before handing both to the lifecycle logic.
    fn split(&mut self, id: &str) -> Option<(&mut Core, &mut Plugin)> {
        let p = self.plugins.get_mut(id)?;
        Some((&mut self.core, p))
    }

    /// Totals across plugins for `status`.
    pub fn totals(&self) -> &Totals {
        &self.core.totals
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
        self.core.state_path(id)
    }

    pub fn runtime_path(&self, id: &str) -> PathBuf {
        self.core.runtime_path(id)
    }

    // ---------------------------------------------------------------------------------------
    // Plugins coming and going

    /// A plugin directory exists: start knowing it, and start it when it has a good build.
    pub fn add_plugin(&mut self, ctx: &mut Ctx<'_>, id: &str, dir: PathBuf) {
        if let Some(p) = self.plugins.get_mut(id) {
            if p.removing {
                // Came back while its old instance was being stopped: start it again once that
                // one is gone.
                p.removing = false;
                p.queued.get_or_insert_with(Queued::default).trigger = Some(Trigger::Rescan);
            }
            return;
        }
        // Temp files of state writes cut short by a crash (ours or the machine's).
        if let Err(e) = self
            .core
            .host
            .remove_stale_temps(&self.core.state_dir.join(id))
        {
            log::warn!("[{id}] {e}");
        }
        let settings = ctx.config.plugin(id);
        let mut plugin = Plugin::new(id, dir, settings);
        let (runtime_data, written) = self.core.load_preserved_state(ctx, id);
        plugin.runtime_data = runtime_data;
        let control = match &written {
            Some(w) => w.control.clone(),
            None => self.core.control_record_on_disk(id),
        };
        plugin.written = written;
        plugin.apply_control_record(&control);
        let autostart = plugin.settings.autostart && !plugin.wanted.is_held_down();
        self.plugins.insert(id.to_string(), plugin);
        self.open_plugin_sockets(ctx, id);
        log::info!("[{id}] plugin added");
        ctx.emit(Event::plugin(id, EventKind::PluginAdded));
        if autostart && !self.core.shutting_down {
            // Started from the loop a few at a time, so that a daemon with a thousand plugins
            // answers its socket while it brings them up.
            self.core.pending_starts.push_back(id.to_string());
        }
    }

    /// Begin up to `max` queued first starts; true while more are waiting.
    pub fn start_pending(&mut self, ctx: &mut Ctx<'_>, max: usize) -> bool {
        for _ in 0..max {
            let Some(id) = self.core.pending_starts.pop_front() else {
                break;
            };
            let idle = self.plugins.get(&id).is_some_and(|p| {
                !p.removing && p.job.is_none() && !p.has_processes() && !p.wanted.is_held_down()
            });
            if idle && let Some((core, p)) = self.split(&id) {
                let kind = plugin::JobKind::Start;
                core.begin(ctx, p, kind, Trigger::Rescan, Vec::new(), Vec::new());
                self.forget_pending(ctx);
            }
        }
        !self.core.pending_starts.is_empty()
    }

    /// Make the state files written before this turn's starts durable (the file's fsync, then
    /// its directory's), once the new instances run: off a reload's critical path, still within
    /// the same turn. Until then a crash of the daemon loses nothing (the file is whole and in
    /// place in the page cache); only a power loss in that window could (hotreloadd(8)).
    pub fn sync_state_dirs(&mut self) {
        self.core.spawned_this_turn = false;
        // The instance record too: once per turn, however many instances came and went.
        self.flush_record();
        let plugins = &self.plugins;
        let waits_for_stop = |id: &str| {
            plugins
                .get(id)
                .and_then(|p| p.job.as_ref())
                .is_some_and(|job| matches!(job.phase, JobPhase::StoppingOld))
        };
        let (later, due): (Vec<_>, Vec<_>) = std::mem::take(&mut self.core.dir_syncs_after_stop)
            .into_iter()
            .partition(|(id, _)| waits_for_stop(id));
        self.core.dir_syncs_after_stop = later;
        self.core.dir_syncs.extend(due);
        for (id, path) in std::mem::take(&mut self.core.dir_syncs) {
            if let Err(e) = self.core.host.sync_state(&path) {
                log::warn!("[{id}] {e}; writing it again");
                if let Some((core, p)) = self.split(&id) {
                    core.rewrite_state(p);
                }
            }
        }
    }

    pub fn has_pending_starts(&self) -> bool {
        !self.core.pending_starts.is_empty()
    }

    /// The plugin directory is gone: stop the plugin, then forget it.
    pub fn remove_plugin(&mut self, ctx: &mut Ctx<'_>, id: &str) {
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        p.removing = true;
        cancel_timer(ctx, &mut p.debounce);
        lifecycle::answer_stop_waiters(ctx, id, p, "plugin directory removed");
        if let Some(q) = p.queued.take() {
            job::answer_failure(ctx, id, &q.waiters, "plugin directory removed");
        }
        if let Some(job) = p.job.take() {
            job::cancel_job_timer(ctx, &job);
            job::answer_waiters(
                ctx,
                id,
                &job,
                false,
                Some("plugin directory removed".into()),
                self.core.host.now(),
            );
        }
        if p.has_processes() {
            self.core.stop_all_instances(ctx, p);
            self.forget_pending(ctx);
        } else {
            self.forget(ctx, id);
        }
    }

    /// Forget the removed plugins whose last instance went (`Core::to_forget`).
    fn forget_pending(&mut self, ctx: &mut Ctx<'_>) {
        for id in std::mem::take(&mut self.core.to_forget) {
            self.forget(ctx, &id);
        }
    }

    fn forget(&mut self, ctx: &mut Ctx<'_>, id: &str) {
        if self.plugins.contains_key(id) {
            self.core.take_back_files(id);
        }
        if self.plugins.remove(id).is_some() {
            self.core.live.retain(|_, l| l.plugin != id);
            self.close_notify_socket(ctx, id);
            let dir = self.core.snapshot_dir(id);
            self.core.host.remove_snapshots(&dir);
            log::info!("[{id}] plugin removed");
            ctx.emit(Event::plugin(id, EventKind::PluginRemoved));
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
        let ignored = if p.wanted.is_held_down() {
            // `start ID` takes the newest build then: nothing to remember but that it exists.
            Some(format!(
                "plugin stopped by request (stop); `start {id}` starts its newest build"
            ))
        } else if !enabled {
            p.changed_while_disabled = true;
            Some("hot reload disabled".to_owned())
        } else if !p.hot_reload_on() && (p.current.is_some() || p.instance.is_some()) {
            // A first build still starts a plugin that has none: that is no reload.
            p.changed_while_disabled = true;
            Some(format!(
                "hot reload disabled for this plugin (hot_reload = false or `disable {id}`)"
            ))
        } else {
            None
        };
        if let Some(reason) = ignored {
            ctx.emit(Event::plugin(
                id,
                EventKind::ChangeIgnored {
                    path: name.to_string(),
                    reason,
                },
            ));
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
        self.core.request(ctx, p, Trigger::Watch, files, Vec::new());
        self.forget_pending(ctx);
    }

    /// Ask for a reload (or first start) of `id`: see [`Core::request`].
    pub fn request(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: &str,
        trigger: Trigger,
        files: Vec<String>,
        waiters: Vec<Waiter>,
    ) {
        if let Some((core, p)) = self.split(id) {
            core.request(ctx, p, trigger, files, waiters);
        }
        self.forget_pending(ctx);
    }

    /// `enable`: reload every plugin whose build changed while hot reload was off.
    pub fn on_enable(&mut self, ctx: &mut Ctx<'_>) {
        let ids: Vec<String> = self
            .plugins
            .values()
            // A plugin switched off on its own stays off (SPEC §5): `enable ID` reloads it.
            .filter(|p| p.changed_while_disabled && p.hot_reload_on())
            .map(|p| p.id.clone())
            .collect();
        for id in ids {
            if let Some((core, p)) = self.split(&id) {
                p.changed_while_disabled = false;
                let exec = p.exec_path().to_string_lossy().into_owned();
                core.request(ctx, p, Trigger::Enable, vec![exec], Vec::new());
                self.forget_pending(ctx);
            }
        }
    }

    /// After lost events: reload every plugin whose executable's version differs from what runs,
    /// and start plugins that have no instance yet but now have a build.
    pub fn rescan_versions(&mut self, ctx: &mut Ctx<'_>) {
        let ids: Vec<String> = self.plugins.keys().cloned().collect();
        for id in ids {
            self.rescan_version(ctx, &id);
        }
    }

    /// `rescan_versions` for one plugin (its directory was replaced or re-pointed).
    pub fn rescan_version(&mut self, ctx: &mut Ctx<'_>, id: &str) {
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        if p.removing || p.job.is_some() {
            return;
        }
        if !p.hot_reload_on() && p.current.is_some() {
            // Switched off on its own: `enable ID` looks again.
            p.changed_while_disabled = true;
            return;
        }
        let exec = p.exec_path();
        let Ok(version) = self.core.host.version_of(&exec) else {
            return;
        };
        let current = p.current.as_ref().map(|s| s.version.as_str());
        if current != Some(version.as_str()) {
            let files = vec![exec.to_string_lossy().into_owned()];
            self.core
                .request(ctx, p, Trigger::Rescan, files, Vec::new());
            self.forget_pending(ctx);
        }
    }

    // ---------------------------------------------------------------------------------------
    // Timers, fds, config, shutdown

    pub fn on_timer(&mut self, ctx: &mut Ctx<'_>, timer: Timer) {
        match timer {
            Timer::Debounce(id) => self.on_debounce(ctx, &id),
            Timer::Backoff(id) => {
                if let Some((core, p)) = self.split(&id) {
                    core.on_backoff(ctx, p);
                }
                self.forget_pending(ctx);
            }
            Timer::Verify(id, seq) => self.on_verify_timer(ctx, &id, seq),
            Timer::Kill(id, seq) => self.on_kill_timer(ctx, &id, seq),
            Timer::PluginWatchdog(id, seq) => {
                if let Some((core, p)) = self.split(&id) {
                    core.on_plugin_watchdog(ctx, p, seq);
                }
            }
            Timer::HookTimeout(pid) => self.on_hook_timeout(ctx, Pid::from_raw(pid)),
            Timer::ReleaseSnapshotBuffer => self.core.on_release_timer(ctx),
            Timer::Watchdog | Timer::PluginsDir => {}
        }
    }

    /// A readable plugin pipe or notify socket.
    pub fn on_fd(&mut self, ctx: &mut Ctx<'_>, token: Token) {
        if self.core.notify.contains_key(&token) {
            self.on_notify(ctx, token);
        } else {
            self.on_pipe(ctx, token);
        }
    }

    /// Read a plugin's output pipe: each line to the log and to subscribers.
    fn on_pipe(&mut self, ctx: &mut Ctx<'_>, token: Token) {
        let Some(pipe) = self.core.pipes.get_mut(&token) else {
            return;
        };
        let id = pipe.plugin.clone();
        let stream = pipe.stream;
        let events = &mut ctx.out.events;
        let status = pipe.reader.read_lines(|line| {
            log::info!("[{id}] {line}");
            events.push(Event::plugin(
                &id,
                EventKind::PluginOutput {
                    stream: stream.as_str().to_owned(),
                    line: line.to_string(),
                },
            ));
        });
        match status {
            PipeStatus::Idle => {}
            PipeStatus::MoreLater => self.core.backlog.push(token),
            PipeStatus::Closed => {
                if let Some(pipe) = self.core.pipes.remove(&token) {
                    self.core.ended_pipes.push(pipe);
                }
            }
        }
    }

    /// Close the pipes that ended this turn (see `Core::ended_pipes`).
    pub fn close_ended_pipes(&mut self, registry: &mio::Registry) {
        for pipe in self.core.ended_pipes.drain(..) {
            let raw = std::os::fd::AsRawFd::as_raw_fd(pipe.reader.fd());
            let _ = registry.deregister(&mut SourceFd(&raw));
        }
    }

    /// Pipes to read again this turn (budget ran out, or freshly spawned).
    pub fn take_backlog(&mut self) -> Vec<Token> {
        std::mem::take(&mut self.core.backlog)
    }

    pub fn has_backlog(&self) -> bool {
        !self.core.backlog.is_empty()
    }

    /// Settings changed by a config reload: restart plugins whose effective settings differ.
    pub fn apply_config(&mut self, ctx: &mut Ctx<'_>) {
        let ids: Vec<String> = self.plugins.keys().cloned().collect();
        for id in ids {
            let settings = ctx.config.plugin(&id);
            let Some((core, p)) = self.split(&id) else {
                continue;
            };
            // A start made ready ahead was made with the old settings.
            if let Some(job) = p.job.as_mut() {
                job.prepared = None;
            }
            if p.settings.hot_reload != settings.hot_reload {
                core.hot_reload_setting_changed(ctx, p, settings.hot_reload);
            }
            // The switch alone restarts nothing: it decides what later changes do.
            let restart_settings = config::PluginSettings {
                hot_reload: p.settings.hot_reload,
                ..settings.clone()
            };
            if p.settings == restart_settings {
                p.settings = settings;
                continue;
            }
            log::info!("[{id}] settings changed: restarting");
            let sockets_changed = p.settings.sockets != settings.sockets;
            p.settings = settings;
            if sockets_changed {
                self.open_listen_sockets(&id);
            }
            let Some((core, p)) = self.split(&id) else {
                continue;
            };
            let exec = p.exec_path().to_string_lossy().into_owned();
            if p.instance.is_some() || p.current.is_some() {
                let files = vec![exec, "hotreload.toml".into()];
                core.request(ctx, p, Trigger::Config, files, Vec::new());
                self.forget_pending(ctx);
            }
        }
    }

    /// SIGTERM/SIGINT: stop every plugin in parallel, preserving state.
    pub fn begin_shutdown(&mut self, ctx: &mut Ctx<'_>) {
        self.core.shutting_down = true;
        self.core.pending_starts.clear();
        let ids: Vec<String> = self.plugins.keys().cloned().collect();
        for id in ids {
            let Some(p) = self.plugins.get_mut(&id) else {
                continue;
            };
            cancel_timer(ctx, &mut p.debounce);
            if let Some(q) = p.queued.take() {
                job::answer_failure(ctx, &id, &q.waiters, "the daemon is shutting down");
            }
            if let Some(job) = p.job.take() {
                job::cancel_job_timer(ctx, &job);
                let error = Some("the daemon is shutting down".to_string());
                job::answer_waiters(ctx, &id, &job, false, error, self.core.host.now());
            }
            self.core.stop_all_instances(ctx, p);
            self.forget_pending(ctx);
            if self.plugins.get(&id).is_some_and(|p| !p.has_processes()) {
                self.core.take_back_files(&id);
            }
        }
    }

    pub fn all_stopped(&self) -> bool {
        self.plugins.values().all(|p| !p.has_processes())
    }

    /// A plugin's last-known PluginState as written on disk (for the `plugin` command).
    pub fn state_file_json(&self, id: &str) -> Value {
        match self.core.host.read_state(&self.state_path(id)) {
            Ok(Some(state)) => serde_json::to_value(state).unwrap_or(Value::Null),
            _ => Value::Null,
        }
    }
}

/// Asking for a job: the start of the job loop (`job.rs`).
impl Core {
    /// Ask for a reload (or first start) of `p`: now if idle, queued if a job runs. A pending
    /// retry is superseded: the newest build restarts the attempt count.
    pub(super) fn request(
        &mut self,
        ctx: &mut Ctx<'_>,
        p: &mut Plugin,
        trigger: Trigger,
        files: Vec<String>,
        waiters: Vec<Waiter>,
    ) {
        let id = p.id.clone();
        let id = id.as_str();
        if self.shutting_down || p.removing {
            let why = if p.removing {
                "plugin directory removed"
            } else {
                "the daemon is shutting down"
            };
            job::answer_failure(ctx, id, &waiters, why);
            return;
        }
        if p.wanted.is_held_down() {
            // Nothing starts a plugin stopped by `stop ID` but `start` and `restart`, which
            // lift the stop before they ask.
            let why =
                format!("plugin {id} is stopped (stop); `start {id}` or `restart {id}` starts it");
            log::debug!("[{id}] {} not carried out: {why}", trigger.as_str());
            job::answer_failure(ctx, id, &waiters, &why);
            return;
        }
        let in_backoff = matches!(
            p.job.as_ref().map(|j| &j.phase),
            Some(JobPhase::Backoff { .. })
        );
        // An instance on its way out (stopping, or killed for failing) must be gone before the
        // next build starts, or two instances would run where the strategy allows one.
        let leaving = |i: &plugin::Instance| i.phase.is_leaving();
        let busy_instance =
            p.instance.as_ref().is_some_and(leaving) || p.retiring.as_ref().is_some_and(leaving);
        if (p.job.is_some() && !in_backoff) || busy_instance {
            let q = p.queued.get_or_insert_with(Queued::default);
            // A `start`/`restart` waiting is not turned into a reload that may be a no-op.
            if !q.trigger.is_some_and(Trigger::wants_newest_good) {
                q.trigger = Some(trigger);
            }
            q.files.extend(files);
            q.waiters.extend(waiters);
            log::debug!("[{id}] reload queued behind the one in progress");
            return;
        }
        // A job waiting in backoff is superseded by the newest build, but only once that build
        // has passed snapshot and pre-flight (`begin` takes it over then).
        let kind = if trigger != Trigger::Start && (p.current.is_some() || p.instance.is_some()) {
            plugin::JobKind::Reload
        } else {
            plugin::JobKind::Start
        };
        self.begin(ctx, p, kind, trigger, files, waiters);
    }
}

// -------------------------------------------------------------------------------------------
// Containment, through the host

impl Core {
    /// What containment sees of the supervisor: `Core`'s own bookkeeping, not the plugins.
    pub(super) fn procs(&self) -> Procs<'_> {
        Procs {
            live: &self.live,
            pids: &self.pids,
            hooks: &self.hooks,
        }
    }

    /// True while any process of `inst` of `id` (its leader aside) lives.
    pub(super) fn members_alive(&mut self, id: &str, inst: &Instance) -> bool {
        let w = Procs {
            live: &self.live,
            pids: &self.pids,
            hooks: &self.hooks,
        };
        self.host.members_alive(&w, id, inst)
    }

    /// SIGKILL to every process of `inst` of `id`.
    pub(super) fn kill_members(&mut self, id: &str, inst: &Instance) {
        let w = Procs {
            live: &self.live,
            pids: &self.pids,
            hooks: &self.hooks,
        };
        self.host.kill_members(&w, id, inst);
    }

    /// `sigs` to every process of `inst` of `id` outside its leader's group.
    pub(super) fn signal_escapees(&mut self, id: &str, inst: &Instance, sigs: &[libc::c_int]) {
        let w = Procs {
            live: &self.live,
            pids: &self.pids,
            hooks: &self.hooks,
        };
        self.host.signal_escapees(&w, id, inst, sigs);
    }

    /// Instance `seq` left its plugin's slot: containment no longer attributes orphans to it.
    pub(super) fn forget_live(&mut self, seq: u64) {
        self.live.remove(&seq);
    }
}

impl Supervisor {
    /// After the last plugin stopped: whatever the daemon still has below it that no plugin
    /// claimed is killed, so that the daemon's stop leaves nothing behind.
    pub fn kill_strays(&mut self) {
        let w = Procs {
            live: &self.core.live,
            pids: &self.core.pids,
            hooks: &self.core.hooks,
        };
        self.core.host.kill_strays(&w);
    }

    /// The daemon's start-up containment work (see `Containment::prepare`).
    pub fn prepare_containment(&mut self) {
        self.core.host.prepare_containment();
    }

    /// Write the instance record if this turn changed it.
    fn flush_record(&mut self) {
        self.core.host.flush_record(&mut self.plugins);
        // The start times just read, for orphan attribution (`host::Live`); an instance no
        // longer in its slot is dropped (the slots are the truth, the index their copy).
        let plugins = &self.plugins;
        self.core.live.retain(|seq, live| {
            let inst = plugins.get(&live.plugin).and_then(|p| {
                let slot = p.slot_of(*seq)?;
                p.slot(slot)
            });
            if let Some(inst) = inst {
                live.start_ticks = inst.scope.start_ticks;
            }
            inst.is_some()
        });
    }

    /// Retry removing cgroups of killed instances.
    fn remove_emptied_cgroups(&mut self) {
        self.core.host.remove_emptied_cgroups();
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
