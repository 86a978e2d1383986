//! One plugin's lifecycle commands (SPEC §5 "Per-plugin lifecycle") and its own hot reload
//! switch (per-plugin `enable ID` / `disable ID`, the `hot_reload` setting).
//!
//! `stop ID` puts the plugin in [`Wanted::Stopping`] and stops its instances; once the last one
//! is gone it is [`Wanted::Down`]: nothing starts it on its own (a new build, `reload-config`, a
//! crash restart, a global `enable`, a daemon restart), because every automatic start goes
//! through `Core::request`, which refuses while the stop holds. `start ID` and
//! `restart ID` lift the stop first and then ask like anyone else, with a trigger that makes the
//! job start the newest good build (`Trigger::wants_newest_good`). What holds survives a daemon
//! restart in the plugin's state file ([`ControlRecord`]).

use super::job;
use super::plugin::{JobPhase, Plugin, ReloadSwitch, Wanted};
use super::state::{DirSync, emit_state_warning};
use super::{Core, Ctx, Supervisor, Trigger, Waiter, cancel_timer};
use crate::protocol::TriggerResult;
use crate::protocol::{Event, EventKind};
use crate::state_file::ControlRecord;

/// Why a job or queued reload ended without an outcome of its own.
const STOPPED: &str = "stopped by request (stop)";

impl Plugin {
    /// What the state file said about the control commands, at the plugin's arrival.
    pub(super) fn apply_control_record(&mut self, record: &ControlRecord) {
        if let Some(since) = &record.stopped_by_request {
            log::info!(
                "[{}] stopped by request since {since}: not started until `start {}`",
                self.id,
                self.id
            );
            self.wanted = Wanted::Down {
                since: since.clone(),
            };
        }
        self.switch = match record.hot_reload {
            None => ReloadSwitch::Configured,
            Some(on) => ReloadSwitch::set(on, self.settings.hot_reload),
        };
    }
}

impl Plugin {
    /// A stop in progress whose instances are all gone is done: the plugin is `Down`.
    pub(super) fn settle_stop(&mut self, ctx: &mut Ctx<'_>) {
        if self.has_processes() || !matches!(self.wanted, Wanted::Stopping { .. }) {
            return;
        }
        let Wanted::Stopping { since, waiters } = std::mem::replace(&mut self.wanted, Wanted::Up)
        else {
            return;
        };
        self.wanted = Wanted::Down { since };
        let id = &self.id;
        let version = self.current.as_ref().map(|s| s.version.clone());
        log::info!("[{id}] stopped by request; `start {id}` starts it again");
        let stopped = EventKind::PluginStopped {
            version: version.clone(),
        };
        ctx.emit(Event::plugin(id, stopped));
        answer(ctx, id, &waiters, true, version, None);
    }
}

/// The parts of the commands that touch one plugin and its state file.
impl Core {
    /// `start` or `restart` (`action`) was asked for: the plugin is wanted up again.
    fn lift_stop(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin, action: &str) {
        let id = p.id.clone();
        let id = id.as_str();
        let held = std::mem::replace(&mut p.wanted, Wanted::Up);
        if let Wanted::Stopping { waiters, .. } = &held {
            let why = format!("a {action} request came before the plugin was down");
            job::answer_failure(ctx, id, waiters, &why);
        }
        if held.is_held_down() {
            log::info!("[{id}] {action} requested: the stop no longer holds");
            self.record_control(ctx, p);
        } else {
            log::info!("[{id}] {action} requested");
        }
        let action = action.to_owned();
        ctx.emit(Event::plugin(
            id,
            EventKind::PluginStartRequested { action },
        ));
    }

    /// `[plugins.ID] hot_reload` changed in a reloaded configuration: it is the newest word, so
    /// an `enable ID` / `disable ID` made before no longer overrides it.
    pub(super) fn hot_reload_setting_changed(
        &mut self,
        ctx: &mut Ctx<'_>,
        p: &mut Plugin,
        on: bool,
    ) {
        p.settings.hot_reload = on;
        p.switch = ReloadSwitch::Configured;
        self.record_control(ctx, p);
    }

    /// The control record of a state file not read for its runtime data (`preserve_state =
    /// false`): a stop or a switch outlives a daemon restart whatever that setting says.
    pub(super) fn control_record_on_disk(&self, id: &str) -> ControlRecord {
        match self.host.read_state(&self.state_path(id)) {
            Ok(Some(state)) => state.control,
            _ => ControlRecord::default(),
        }
    }

    /// Writes the plugin's state file when what the control commands decided changed.
    fn record_control(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin) {
        let version = p
            .instance
            .as_ref()
            .map(|i| i.version.clone())
            .or_else(|| p.current.as_ref().map(|s| s.version.clone()))
            .or_else(|| p.written.as_ref().map(|w| w.version.clone()))
            .unwrap_or_default();
        let status = p.state_name();
        if let Err(e) = self.write_state_file(p, &version, status, DirSync::Now) {
            let id = p.id.as_str();
            let path = self.state_path(id);
            log::warn!("[{id}] cannot record the request in the state file: {e}");
            emit_state_warning(ctx, id, format!("cannot write state file: {e}"), &path);
        }
    }
}

impl Supervisor {
    /// `stop ID`: stop the plugin and keep it down until `start` or `restart`. `waiter` is
    /// answered once every instance is gone (at once when none runs).
    pub fn stop(&mut self, ctx: &mut Ctx<'_>, id: &str, waiter: Option<Waiter>) {
        let Some((core, p)) = self.split(id) else {
            return;
        };
        let since = core.host.wall();
        let now = core.host.now();
        let waiters: Vec<Waiter> = waiter.into_iter().collect();
        if p.removing {
            job::answer_failure(ctx, id, &waiters, "plugin directory removed");
            return;
        }
        // Whatever would start it next is called off.
        cancel_timer(ctx, &mut p.debounce);
        p.pending_files.clear();
        if let Some(q) = p.queued.take() {
            job::answer_failure(ctx, id, &q.waiters, STOPPED);
        }
        if let Some(job) = p.job.take() {
            job::cancel_job_timer(ctx, &job);
            job::answer_waiters(ctx, id, &job, false, Some(STOPPED.into()), now);
        }
        p.wanted = match std::mem::replace(&mut p.wanted, Wanted::Up) {
            Wanted::Up => {
                log::info!("[{id}] stopping by request (stop)");
                Wanted::Stopping { since, waiters }
            }
            Wanted::Stopping {
                since,
                waiters: mut earlier,
            } => {
                earlier.extend(waiters);
                Wanted::Stopping {
                    since,
                    waiters: earlier,
                }
            }
            Wanted::Down { since } => {
                // Already down: that is what was asked for.
                let version = p.current.as_ref().map(|s| s.version.clone());
                answer(ctx, id, &waiters, true, version, None);
                Wanted::Down { since }
            }
        };
        core.record_control(ctx, p);
        core.stop_all_instances(ctx, p);
        p.settle_stop(ctx);
        self.forget_pending(ctx);
    }

    /// `start ID`: lift a stop, and start the newest good build unless the plugin is up or on
    /// its way up already. `waiter` is answered when it runs or finally failed to start.
    pub fn start(&mut self, ctx: &mut Ctx<'_>, id: &str, waiter: Option<Waiter>) {
        let Some((core, p)) = self.split(id) else {
            return;
        };
        core.lift_stop(ctx, p, "start");
        let mut waiters: Vec<Waiter> = waiter.into_iter().collect();
        let job_busy = p
            .job
            .as_ref()
            .is_some_and(|j| !matches!(j.phase, JobPhase::Backoff { .. }));
        let serving = p.instance.as_ref().is_some_and(|i| !i.phase.is_leaving());
        if let Some(job) = p.job.as_mut().filter(|_| job_busy) {
            // Starting or reloading: its outcome is the answer.
            job.waiters.append(&mut waiters);
            return;
        }
        if serving && p.job.is_none() {
            let version = p.instance.as_ref().map(|i| i.version.clone());
            answer(ctx, id, &waiters, true, version, None);
            return;
        }
        core.request(ctx, p, Trigger::Start, Vec::new(), waiters);
        self.forget_pending(ctx);
    }

    /// `restart ID`: lift a stop, then stop and start the plugin with its newest good build,
    /// whatever its version and state (a `trigger` that also works on a stopped or failed one).
    pub fn restart(&mut self, ctx: &mut Ctx<'_>, id: &str, waiter: Option<Waiter>) {
        if let Some((core, p)) = self.split(id) {
            core.lift_stop(ctx, p, "restart");
            let waiters = waiter.into_iter().collect();
            core.request(ctx, p, Trigger::Restart, Vec::new(), waiters);
        }
        self.forget_pending(ctx);
    }

    /// `enable ID` / `disable ID`: the plugin's own hot reload switch. Switching it on reloads
    /// the plugin when its build changed meanwhile (and the global switch is on). Returns the
    /// plugin's switch as it now is.
    pub fn set_hot_reload(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: &str,
        on: bool,
        global_enabled: bool,
    ) -> bool {
        let Some(p) = self.plugins.get_mut(id) else {
            return false;
        };
        let was_on = p.hot_reload_on();
        p.switch = ReloadSwitch::set(on, p.settings.hot_reload);
        if was_on != on {
            let (word, event) = if on {
                ("enabled", EventKind::HotReloadEnabled)
            } else {
                ("disabled", EventKind::HotReloadDisabled)
            };
            log::info!("[{id}] hot reload {word} for this plugin");
            ctx.emit(Event::plugin(id, event));
        }
        let changed = on && global_enabled && std::mem::take(&mut p.changed_while_disabled);
        let exec = p.exec_path().to_string_lossy().into_owned();
        self.core.record_control(ctx, p);
        if changed {
            self.core
                .request(ctx, p, Trigger::Enable, vec![exec], Vec::new());
            self.forget_pending(ctx);
        }
        on
    }
}

/// The plugin's directory went while a stop waited for its instances: they are told.
pub(super) fn answer_stop_waiters(ctx: &mut Ctx<'_>, id: &str, p: &mut Plugin, why: &str) {
    if let Wanted::Stopping { waiters, .. } = &mut p.wanted {
        let waiters = std::mem::take(waiters);
        job::answer_failure(ctx, id, &waiters, why);
    }
}

/// Answers lifecycle waiters: the daemon adds the state the plugin is in when it replies.
fn answer(
    ctx: &mut Ctx<'_>,
    id: &str,
    waiters: &[Waiter],
    ok: bool,
    version: Option<String>,
    error: Option<String>,
) {
    let result = TriggerResult {
        duration_ms: 0,
        error,
        new_version: version,
        ok,
        old_version: None,
        plugin: id.to_owned(),
    };
    for w in waiters {
        ctx.out.replies.push((w.clone(), result.clone()));
    }
}
