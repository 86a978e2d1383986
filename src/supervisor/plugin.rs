//! One supervised plugin: what runs, what is being done to it, and what it has been through.
//!
//! The lifecycle is split in two so each half stays small: the *instance* (the process we are
//! running, if any, and whether it is starting, up or being stopped) and the *job* (the reload,
//! start, restart or rollback in progress, if any, with its attempt count and waiters). The state
//! name users see (`missing`, `starting`, `running`, `stopping`, `reloading`, `backoff`, `failed`,
//! `stopped`) is derived from those two, never stored, so it cannot drift from the truth.

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
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Watch => "watch",
            Trigger::Manual => "manual",
            Trigger::Enable => "enable",
            Trigger::Rescan => "rescan",
            Trigger::Config => "config",
        }
    }
}

/// Someone waiting for a job's outcome (`trigger` with wait, `install --wait`).
#[derive(Debug, Clone)]
pub struct Waiter {
    pub client: ClientId,
    pub request_id: Option<Value>,
}

/// A running (or starting, or stopping) process.
#[derive(Debug)]
pub struct Instance {
    pub seq: u64,
    pub pid: Pid,
    pub pidfd: Option<OwnedFd>,
    pub version: String,
    pub started_wall: String,
    pub started: Instant,
    /// Startup grace (ready = "exec") or readiness timeout (ready = "notify") while unverified.
    pub verify_timer: Option<TimerId>,
    pub verified: bool,
    /// Deadline for the next WATCHDOG=1 (watchdog_ms > 0, once verified).
    pub watchdog_timer: Option<TimerId>,
    pub stop: Option<Stop>,
    pub pipes: Vec<Token>,
    /// The leader has been reaped but members of its group may still live.
    pub reaped: bool,
    /// Killed by the daemon for failing verification: its exit fails the job's attempt.
    pub failure: Option<String>,
    /// The plugin sent STOPPING=1: its exit is expected, not a crash.
    pub stopping_announced: bool,
    /// Its cgroup, if any, and the leader's start time (containment).
    pub scope: super::contain::Scope,
}

/// Which of a plugin's (at most two) instances: the current one, or the one a `start-stop`
/// reload is replacing, which keeps serving until the new one is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Current,
    Retiring,
}

/// A stop in progress: SIGTERM sent, SIGKILL armed.
#[derive(Debug)]
pub struct Stop {
    pub kill_timer: Option<TimerId>,
    pub killed: bool,
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
}

/// Where a plugin rests when nothing runs and nothing is scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rest {
    Missing,
    Stopped,
    Failed,
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
    /// What state.json holds, as far as we know (None: unknown, write next time).
    pub written: Option<Written>,
    pub status_text: Option<String>,
    pub debounce: Option<TimerId>,
    pub pending_files: BTreeSet<String>,
    /// Files changed while hot reload was disabled (`enable` reloads these plugins).
    pub changed_while_disabled: bool,
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
            written: None,
            status_text: None,
            debounce: None,
            pending_files: BTreeSet::new(),
            changed_while_disabled: false,
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
        if let Some(inst) = &self.instance {
            if inst.stop.is_some() {
                return if reloading { "reloading" } else { "stopping" };
            }
            if reloading {
                return "reloading";
            }
            return if inst.verified { "running" } else { "starting" };
        }
        match &self.job {
            Some(job) => match job.phase {
                JobPhase::Backoff { .. } => "backoff",
                _ if reloading => "reloading",
                _ => "starting",
            },
            None => match self.rest {
                Rest::Missing => "missing",
                Rest::Stopped => "stopped",
                Rest::Failed => "failed",
            },
        }
    }

    pub fn is_running(&self) -> bool {
        self.instance
            .as_ref()
            .is_some_and(|i| i.verified && i.stop.is_none())
    }

    pub fn push_history(&mut self, entry: HistoryEntry) {
        self.history.push_front(entry);
        self.history.truncate(HISTORY_LEN);
    }

    /// The `list` entry of SPEC §6.
    pub fn list_entry(&self) -> PluginInfo {
        let inst = self.instance.as_ref().filter(|i| !i.reaped);
        PluginInfo {
            // The supervisor adds the process figures (`Supervisor::list_entry`).
            cpu_usage_ms: None,
            memory_bytes: None,
            tasks: 0,
            exec: self.exec_path().to_string_lossy().into_owned(),
            failed_reloads: self.failed_reloads,
            id: self.id.clone(),
            last_error: self.last_error.clone(),
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
