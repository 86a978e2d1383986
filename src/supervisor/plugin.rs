//! One supervised plugin: what runs, what is being done to it, and what it has been through.
//!
//! The lifecycle is split in two so each half stays small: the *instance* (the process we are
//! running, if any, its [`Phase`]: starting, running, aborting or stopping, each with the
//! timer that ends it, and its [`Leader`]: alive with its pidfd, or reaped while the rest of
//! its group may remain) and the *job* (the reload, start, restart or rollback in progress, if any,
//! with its attempt count, waiters and [`JobPhase`]). When neither runs, [`Rest`] says where the
//! plugin rests. The state name users see (`missing`, `starting`, `running`, `stopping`,
//! `reloading`, `backoff`, `failed`, `stopped`) is a `match` on those, never stored, so it cannot
//! drift from the truth.

use std::collections::{BTreeSet, VecDeque};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Instant;

use mio::Token;
use nix::unistd::Pid;
use serde_json::Value;

use crate::config::PluginSettings;
use crate::control::ClientId;
use crate::protocol::{PluginInfo, ReloadRecord};
use crate::wheel::TimerId;

/// Reload history kept per plugin (SPEC §6: the last 20).
pub const HISTORY_LEN: usize = 20;

/// A snapshot we can start: content version and the copy in the runtime dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snap {
    pub version: String,
    pub path: PathBuf,
}

/// What set a reload off (the `trigger` field of events and history).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Watch,
    Manual,
    Enable,
    Rescan,
    /// A changed `[plugins.ID]` table (SIGHUP / `reload-config`).
    Config,
    /// `start ID`: a start of the newest good build (never announced as a reload).
    Start,
    /// `restart ID`: the newest good build, whatever the version and the state.
    Restart,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Watch => "watch",
            Trigger::Manual => "manual",
            Trigger::Enable => "enable",
            Trigger::Rescan => "rescan",
            Trigger::Config => "config",
            Trigger::Start => "start",
            Trigger::Restart => "restart",
        }
    }

    /// Someone asked for this very plugin to run (`start`, `restart`): its newest good build
    /// starts, the last good one when the newest cannot.
    pub fn wants_newest_good(self) -> bool {
        matches!(self, Trigger::Start | Trigger::Restart)
    }
}

/// Someone waiting for a job's outcome (`trigger` with wait, `install --wait`) or for a
/// `stop`, `start` or `restart` to be done.
#[derive(Debug, Clone)]
pub struct Waiter {
    pub client: ClientId,
    pub request_id: Option<Value>,
    pub reply: Reply,
}

/// The answer a [`Waiter`] gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// `trigger`'s: how the reload went (versions, duration).
    Reload,
    /// `stop`'s, `start`'s, `restart`'s: the state the plugin reached and its version.
    Lifecycle,
}

/// A running (or starting, or stopping) process.
#[derive(Debug)]
pub struct Instance {
    pub seq: u64,
    pub pid: Pid,
    /// Its leader process: alive, or reaped while members of its group may remain.
    pub leader: Leader,
    pub version: String,
    pub started_wall: String,
    pub started: Instant,
    /// Where it is in its life, with the timer that ends that phase.
    pub phase: Phase,
    pub pipes: Vec<Token>,
    /// The plugin sent STOPPING=1: its exit is expected, not a crash.
    pub stopping_announced: bool,
    /// Its cgroup, if any, and the leader's start time (containment).
    pub scope: super::contain::Scope,
}

/// The life of an instance's leader process, which its `Phase` does not tell: a leaving
/// instance is done only when its leader is reaped *and* the rest of its group is gone.
#[derive(Debug)]
pub enum Leader {
    /// Not reaped yet; signals go through its pidfd when the kernel gave one, so they cannot
    /// reach a process that reused its pid.
    Alive { pidfd: Option<OwnedFd> },
    /// Reaped, while members of its group may still live (only while the instance is leaving:
    /// an exit of one that is not is handled at once). Its pid may be reused from now on.
    Reaped,
}

impl Leader {
    pub const fn is_reaped(&self) -> bool {
        matches!(self, Leader::Reaped)
    }

    pub fn pidfd(&self) -> Option<&OwnedFd> {
        match self {
            Leader::Alive { pidfd } => pidfd.as_ref(),
            Leader::Reaped => None,
        }
    }
}

/// An instance's life: starting → running → stopping, or starting → aborting (killed for
/// failing verification). Each phase holds the timer that ends it, so that leaving the phase
/// is where the timer is cancelled (watchexec's `CommandState`).
#[derive(Debug)]
pub enum Phase {
    /// Not verified yet: the startup grace (ready = "exec") or the readiness timeout
    /// (ready = "notify") runs.
    Starting { verify_timer: Option<TimerId> },
    /// Verified; with watchdog_ms > 0, the deadline of the next WATCHDOG=1.
    Running { watchdog_timer: Option<TimerId> },
    /// Killed by the daemon for failing verification: its exit fails the job's attempt.
    Aborting { why: String },
    /// SIGTERM sent, SIGKILL armed (`killed`: sent). `failure`: it was aborting when the stop
    /// came (a shutdown), and its exit still fails the attempt.
    Stopping {
        kill_timer: Option<TimerId>,
        killed: bool,
        failure: Option<String>,
    },
}

impl Phase {
    /// Verified and not leaving.
    pub const fn is_running(&self) -> bool {
        matches!(self, Phase::Running { .. })
    }

    pub const fn is_stopping(&self) -> bool {
        matches!(self, Phase::Stopping { .. })
    }

    /// On its way out, stopped or aborted: its exit is expected and ends it.
    pub const fn is_leaving(&self) -> bool {
        matches!(self, Phase::Stopping { .. } | Phase::Aborting { .. })
    }

    /// Why the daemon killed it, when it did for failing verification.
    pub fn failure(&self) -> Option<&str> {
        match self {
            Phase::Aborting { why } => Some(why),
            Phase::Stopping { failure, .. } => failure.as_deref(),
            _ => None,
        }
    }

    /// SIGKILL went to it already (aborted, or a stop that ran out of time).
    pub fn killed(&self) -> bool {
        self.failure().is_some() || matches!(self, Phase::Stopping { killed: true, .. })
    }

    /// The timer ending this phase, taken out (to cancel it).
    pub fn take_timer(&mut self) -> Option<TimerId> {
        match self {
            Phase::Starting { verify_timer: t }
            | Phase::Running { watchdog_timer: t }
            | Phase::Stopping { kill_timer: t, .. } => t.take(),
            Phase::Aborting { .. } => None,
        }
    }

    /// The failure, taken out, for the phase that follows.
    pub fn take_failure(&mut self) -> Option<String> {
        match self {
            Phase::Aborting { why } => Some(std::mem::take(why)),
            Phase::Stopping { failure, .. } => failure.take(),
            _ => None,
        }
    }
}

/// Which of a plugin's (at most two) instances: the current one, or the one a `start-stop`
/// reload is replacing, which keeps serving until the new one is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Current,
    Retiring,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// First start of a build (plugin added, daemon start, autostart=false plugin triggered).
    Start,
    /// A new build replacing the running one (or a failed one).
    Reload,
    /// Restarting the same build after an unexpected exit.
    Restart,
    /// Going back to the last good build after a reload finally failed.
    Rollback,
}

#[derive(Debug)]
pub enum JobPhase {
    /// Waiting for the old instance to exit.
    StoppingOld,
    /// New instance `seq` started, waiting for it to prove itself.
    Verifying { seq: u64 },
    /// Waiting before the next attempt.
    Backoff { timer: TimerId, due_ms: u64 },
}

#[derive(Debug)]
pub struct Job {
    pub kind: JobKind,
    pub trigger: Trigger,
    pub files: Vec<String>,
    pub target: Snap,
    pub old_version: Option<String>,
    /// 1-based attempt number of the current/next start.
    pub attempt: u32,
    pub max_attempts: u32,
    pub started: Instant,
    pub started_wall: String,
    pub phase: JobPhase,
    pub waiters: Vec<Waiter>,
    pub last_error: Option<String>,
    /// `reload_started` was emitted for it (or for the job it took over), so it owes an outcome.
    pub announced: bool,
    /// The target's start, made ready while the old instance exits (`prepare_next_start`).
    pub prepared: Option<PreparedStart>,
}

/// A start made ready ahead, and what it was made for.
#[derive(Debug)]
pub struct PreparedStart {
    pub key: StartKey,
    pub spawn: super::spawn::Prepared,
}

/// What a start made ahead depends on that may change before the start, besides settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartKey {
    pub program: PathBuf,
    pub notify_socket: Option<PathBuf>,
    pub fds: Vec<std::os::fd::RawFd>,
    pub fd_names: Vec<String>,
}

/// A reload asked for while another job runs: exactly one is kept, merged.
#[derive(Debug, Default)]
pub struct Queued {
    pub trigger: Option<Trigger>,
    pub files: BTreeSet<String>,
    pub waiters: Vec<Waiter>,
}

/// What the daemon last wrote to a plugin's state.json (the parts a plugin reads).
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub version: String,
    pub configuration: Value,
    pub runtime_data: Value,
    /// What the control commands decided (`stop ID`, `disable ID`).
    pub control: crate::state_file::ControlRecord,
}

/// Where a plugin rests when nothing runs and nothing is scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rest {
    Missing,
    Stopped,
    Failed,
}

/// Whether the plugin is to run, as far as the per-plugin lifecycle commands go (SPEC §5):
/// `stop ID` keeps it down, whatever happens, until `start ID` or `restart ID`.
#[derive(Debug)]
pub enum Wanted {
    /// Supervised as usual: started when it has a good build, reloaded, restarted after a crash.
    Up,
    /// `stop ID` at `since` (RFC 3339), its instances still on their way out; `waiters` are the
    /// stop requests waiting for them to be gone.
    Stopping { since: String, waiters: Vec<Waiter> },
    /// Stopped by `stop ID` at `since`: nothing starts it on its own, not even a daemon restart
    /// (its state file records the stop).
    Down { since: String },
}

impl Wanted {
    /// `stop ID` holds the plugin down (or is bringing it down).
    pub fn is_held_down(&self) -> bool {
        !matches!(self, Wanted::Up)
    }

    /// When `stop ID` was asked for, while it holds.
    pub fn stopped_since(&self) -> Option<&str> {
        match self {
            Wanted::Up => None,
            Wanted::Stopping { since, .. } | Wanted::Down { since } => Some(since),
        }
    }
}

/// The plugin's own hot reload switch (SPEC §5 per-plugin enable/disable): whether a change of
/// its files reloads it, the global switch aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadSwitch {
    /// As `[plugins.ID] hot_reload` says.
    Configured,
    /// `enable ID` on a plugin whose configuration says `hot_reload = false`.
    On,
    /// `disable ID` on a plugin whose configuration says `hot_reload = true`.
    Off,
}

impl ReloadSwitch {
    /// The switch that makes the plugin's hot reload `on`, given its configured value: the
    /// configuration itself when they agree, so a command never leaves a redundant override.
    pub fn set(on: bool, configured: bool) -> ReloadSwitch {
        match (on, configured) {
            (true, true) | (false, false) => ReloadSwitch::Configured,
            (true, false) => ReloadSwitch::On,
            (false, true) => ReloadSwitch::Off,
        }
    }

    pub fn is_on(self, configured: bool) -> bool {
        match self {
            ReloadSwitch::Configured => configured,
            ReloadSwitch::On => true,
            ReloadSwitch::Off => false,
        }
    }

    /// What the state file records: the command's choice, when it overrides the configuration.
    pub fn recorded(self) -> Option<bool> {
        match self {
            ReloadSwitch::Configured => None,
            ReloadSwitch::On => Some(true),
            ReloadSwitch::Off => Some(false),
        }
    }
}

#[derive(Debug, Clone)]
pub struct HistoryEntry {
    pub time: String,
    pub trigger: Trigger,
    pub old_version: Option<String>,
    /// `None` for a build that could not even be copied (it has no version).
    pub new_version: Option<String>,
    pub ok: bool,
    pub duration_ms: u64,
    pub error: Option<String>,
}

impl HistoryEntry {
    /// The entry for reload `job` finishing at `time`: a success unless there is an `error`.
    pub fn of_reload(
        job: &Job,
        time: String,
        duration_ms: u64,
        error: Option<String>,
    ) -> HistoryEntry {
        HistoryEntry {
            time,
            trigger: job.trigger,
            old_version: job.old_version.clone(),
            new_version: (!job.target.path.as_os_str().is_empty())
                .then(|| job.target.version.clone()),
            ok: error.is_none(),
            duration_ms,
            error,
        }
    }

    /// The entry of the `plugin` command's `history`.
    pub fn to_record(&self) -> ReloadRecord {
        ReloadRecord {
            duration_ms: self.duration_ms,
            error: self.error.clone(),
            new_version: self.new_version.clone(),
            ok: self.ok,
            old_version: self.old_version.clone(),
            time: self.time.clone(),
            trigger: self.trigger.as_str().to_owned(),
        }
    }
}

#[derive(Debug)]
pub struct Plugin {
    pub id: String,
    pub dir: PathBuf,
    pub settings: PluginSettings,
    pub instance: Option<Instance>,
    /// The old instance during a `start-stop` reload.
    pub retiring: Option<Instance>,
    pub job: Option<Job>,
    pub queued: Option<Queued>,
    pub rest: Rest,
    /// The build last started (running or not): what "unchanged version" compares against.
    pub current: Option<Snap>,
    pub last_good: Option<Snap>,
    pub restarts: u64,
    pub reload_count: u64,
    pub failed_reloads: u64,
    pub last_error: Option<String>,
    pub history: VecDeque<HistoryEntry>,
    /// Last valid JSON the plugin left in runtime.json.
    pub runtime_data: Value,
    /// runtime.json was read after the plugin's last process ended and no start came since:
    /// the start that follows the reap needs not read it again (`prepare_state`).
    pub runtime_read_after_exit: bool,
    /// What state.json holds, as far as we know (None: unknown, write next time).
    pub written: Option<Written>,
    pub status_text: Option<String>,
    pub debounce: Option<TimerId>,
    pub pending_files: BTreeSet<String>,
    /// Files changed while hot reload was disabled (`enable` reloads these plugins).
    pub changed_while_disabled: bool,
    /// `stop ID` keeps it down (SPEC §5 "Per-plugin lifecycle").
    pub wanted: Wanted,
    /// Its own hot reload switch (`hot_reload`, `enable ID`, `disable ID`).
    pub switch: ReloadSwitch,
    /// Directory gone: stop, then forget.
    pub removing: bool,
    /// Descriptors the plugin parked with FDSTORE=1 (name, fd), handed to its next instance.
    pub fdstore: Vec<(String, OwnedFd)>,
    /// Listening sockets bound once by the daemon and passed to every instance.
    pub listen: Vec<crate::listen::ListenSocket>,
    /// Recent starts and the crash streak (SPEC §5 "Start limit").
    pub start_limit: super::start_limit::StartLimit,
}

impl Plugin {
    pub fn new(id: &str, dir: PathBuf, settings: PluginSettings) -> Plugin {
        Plugin {
            id: id.to_string(),
            dir,
            settings,
            instance: None,
            retiring: None,
            job: None,
            queued: None,
            rest: Rest::Missing,
            current: None,
            last_good: None,
            restarts: 0,
            reload_count: 0,
            failed_reloads: 0,
            last_error: None,
            history: VecDeque::new(),
            runtime_data: Value::Null,
            runtime_read_after_exit: false,
            written: None,
            status_text: None,
            debounce: None,
            pending_files: BTreeSet::new(),
            changed_while_disabled: false,
            wanted: Wanted::Up,
            switch: ReloadSwitch::Configured,
            removing: false,
            fdstore: Vec::new(),
            listen: Vec::new(),
            start_limit: super::start_limit::StartLimit::default(),
        }
    }

    pub fn slot(&self, slot: Slot) -> Option<&Instance> {
        match slot {
            Slot::Current => self.instance.as_ref(),
            Slot::Retiring => self.retiring.as_ref(),
        }
    }

    pub fn slot_mut(&mut self, slot: Slot) -> Option<&mut Instance> {
        match slot {
            Slot::Current => self.instance.as_mut(),
            Slot::Retiring => self.retiring.as_mut(),
        }
    }

    pub fn take_slot(&mut self, slot: Slot) -> Option<Instance> {
        match slot {
            Slot::Current => self.instance.take(),
            Slot::Retiring => self.retiring.take(),
        }
    }

    /// Which slot holds instance `seq`, if any.
    pub fn slot_of(&self, seq: u64) -> Option<Slot> {
        if self.instance.as_ref().is_some_and(|i| i.seq == seq) {
            Some(Slot::Current)
        } else if self.retiring.as_ref().is_some_and(|i| i.seq == seq) {
            Some(Slot::Retiring)
        } else {
            None
        }
    }

    pub fn has_processes(&self) -> bool {
        self.instance.is_some() || self.retiring.is_some()
    }

    pub fn exec_path(&self) -> PathBuf {
        self.dir.join(&self.settings.exec)
    }

    /// The state name of SPEC §5, derived from instance and job.
    pub fn state_name(&self) -> &'static str {
        let reloading = self.retiring.is_some()
            || matches!(
                self.job.as_ref().map(|j| j.kind),
                Some(JobKind::Reload | JobKind::Rollback)
            );
        match (&self.instance, &self.job) {
            (Some(inst), _) => match inst.phase {
                _ if reloading => "reloading",
                Phase::Stopping { .. } => "stopping",
                Phase::Running { .. } => "running",
                Phase::Starting { .. } | Phase::Aborting { .. } => "starting",
            },
            (None, Some(job)) => match job.phase {
                JobPhase::Backoff { .. } => "backoff",
                _ if reloading => "reloading",
                JobPhase::StoppingOld | JobPhase::Verifying { .. } => "starting",
            },
            (None, None) if self.wanted.is_held_down() => "stopped",
            (None, None) => match self.rest {
                Rest::Missing => "missing",
                Rest::Stopped => "stopped",
                Rest::Failed => "failed",
            },
        }
    }

    pub fn is_running(&self) -> bool {
        self.instance.as_ref().is_some_and(|i| i.phase.is_running())
    }

    /// Whether a change of its files reloads it, as far as the plugin's own switch goes.
    pub fn hot_reload_on(&self) -> bool {
        self.switch.is_on(self.settings.hot_reload)
    }

    /// What its state file must record about the control commands.
    pub fn control_record(&self) -> crate::state_file::ControlRecord {
        crate::state_file::ControlRecord {
            stopped_by_request: self.wanted.stopped_since().map(str::to_owned),
            hot_reload: self.switch.recorded(),
        }
    }

    /// `last_error` as `list` shows it: while `stop ID` holds the plugin down, why it is down.
    fn shown_error(&self) -> Option<String> {
        match &self.wanted {
            Wanted::Down { since } if self.instance.is_none() && self.job.is_none() => {
                Some(format!(
                    "stopped by request (stop) at {since}; `start {}` starts it",
                    self.id
                ))
            }
            _ => self.last_error.clone(),
        }
    }

    pub fn push_history(&mut self, entry: HistoryEntry) {
        self.history.push_front(entry);
        self.history.truncate(HISTORY_LEN);
    }

    /// The `list` entry of SPEC §6.
    pub fn list_entry(&self) -> PluginInfo {
        let inst = self.instance.as_ref().filter(|i| !i.leader.is_reaped());
        PluginInfo {
            // The supervisor adds the process figures (`Supervisor::list_entry`).
            cpu_usage_ms: None,
            memory_bytes: None,
            tasks: 0,
            exec: self.exec_path().to_string_lossy().into_owned(),
            failed_reloads: self.failed_reloads,
            hot_reload: self.hot_reload_on(),
            id: self.id.clone(),
            last_error: self.shown_error(),
            last_good_version: self.last_good.as_ref().map(|s| s.version.clone()),
            pid: inst.map(|i| i.pid.as_raw()),
            reload_count: self.reload_count,
            restarts: self.restarts,
            started_at: inst.map(|i| i.started_wall.clone()),
            state: self.state_name().to_owned(),
            status_text: self.status_text.clone(),
            version: inst
                .map(|i| i.version.clone())
                .or_else(|| self.current.as_ref().map(|s| s.version.clone())),
        }
    }
}
