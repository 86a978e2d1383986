//! Instances: starting a plugin process, verifying it, stopping it, and accounting for its exit.
//!
//! A plugin has at most two instances: `Current`, and during a `start-stop` reload the
//! `Retiring` one that keeps serving until the new one is ready. Every instance has a sequence
//! number; timers and reaped pids carry it, so a timer or exit that belongs to an instance that
//! is already gone is recognised and ignored.
//!
//! The `Supervisor` methods here are entry points (a verify or kill timer, a reap, stragglers):
//! each lends its plugin with `split` once, calls the `Core` method taking `&mut Plugin`, and
//! then forgets a removed plugin whose last instance went (`forget_pending`). What follows an
//! instance being gone (`Core::instance_gone`, `continue_after_instance`, `unexpected_exit`)
//! chains into the job steps of `job.rs` on the same plugin.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::path::Path;

use mio::{Interest, unix::SourceFd};
use nix::unistd::Pid;

use super::credentials::{self, PluginPaths};
use super::output::{LineReader, Stream};
use super::plugin::{
    Instance, JobPhase, Leader, Phase, Plugin, PreparedStart, Rest, Slot, Snap, StartKey,
};
use super::reap::ExitKind;
use super::state::DirSync;
use super::{Core, Ctx, Pipe, Supervisor, Timer, cancel_timer, spawn};
use crate::config::{ReadyMode, RestartPolicy, RunAs};
use crate::protocol::{Event, EventKind};

impl Supervisor {
    /// Grace passed (exec: verified) or readiness timed out (notify: failed).
    pub(super) fn on_verify_timer(&mut self, ctx: &mut Ctx<'_>, id: &str, seq: u64) {
        if let Some((core, p)) = self.split(id) {
            core.on_verify_timer(ctx, p, seq);
        }
        self.forget_pending(ctx);
    }

    /// The instance counts as started (grace survived, or READY=1 received).
    pub(super) fn mark_verified(&mut self, ctx: &mut Ctx<'_>, id: &str, seq: u64) {
        if let Some((core, p)) = self.split(id) {
            core.mark_verified(ctx, p, seq);
        }
        self.forget_pending(ctx);
    }

    pub(super) fn on_kill_timer(&mut self, ctx: &mut Ctx<'_>, id: &str, seq: u64) {
        let Some((core, p)) = self.split(id) else {
            return;
        };
        if let Some(slot) = core.kill_stopping(p, seq) {
            core.instance_gone(ctx, p, slot);
        }
        self.forget_pending(ctx);
    }

    /// Reaped children from the daemon's waitpid loop.
    pub fn on_exit(&mut self, ctx: &mut Ctx<'_>, pid: Pid, status: ExitKind) {
        if self.on_hook_exit(ctx, pid, status) {
            return;
        }
        let Some((id, seq)) = self.core.pids.remove(&pid) else {
            log::debug!("reaped pid {pid} ({status}), not a plugin leader");
            return;
        };
        let Some((core, p)) = self.split(&id) else {
            return;
        };
        core.on_leader_reaped(ctx, p, seq, status);
        self.forget_pending(ctx);
    }

    /// After any reap: a stopped instance whose leader is gone may have been waiting only for
    /// members of its group (now reaped by us as subreaper, or exited on their own).
    pub fn check_stragglers(&mut self, ctx: &mut Ctx<'_>) {
        self.remove_emptied_cgroups();
        let mut leaving = Vec::new();
        for p in self.plugins.values() {
            for slot in [Slot::Current, Slot::Retiring] {
                if p.slot(slot)
                    .is_some_and(|i| i.leader.is_reaped() && i.phase.is_leaving())
                {
                    leaving.push((p.id.clone(), slot));
                }
            }
        }
        // All looked at before any is acted on (acting may start the next instance).
        let Supervisor { plugins, core } = self;
        leaving.retain(|(id, slot)| {
            let inst = plugins.get(id).and_then(|p| p.slot(*slot));
            inst.is_none_or(|inst| !core.members_alive(id, inst))
        });
        for (id, slot) in leaving {
            if let Some((core, p)) = self.split(&id) {
                core.instance_gone(ctx, p, slot);
            }
            self.forget_pending(ctx);
        }
    }
}

/// What follows an instance's start, stop or exit, for the plugin lent with the core: the
/// next job step, a crash restart, the end of a `stop ID`. None of it touches another plugin;
/// a removed plugin whose last instance went is only recorded in `to_forget`, for the
/// `Supervisor` entry point to forget once it has the plugin back (`forget_pending`).
impl Core {
    /// Grace passed (exec: verified) or readiness timed out (notify: failed).
    fn on_verify_timer(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin, seq: u64) {
        let Some(inst) = p.instance.as_mut().filter(|i| i.seq == seq) else {
            return;
        };
        if let Phase::Starting { verify_timer } = &mut inst.phase {
            *verify_timer = None;
        }
        match p.settings.ready {
            ReadyMode::Exec => self.mark_verified(ctx, p, seq),
            ReadyMode::Notify => {
                let ms = p.settings.ready_timeout_ms;
                self.abort_and_continue(
                    ctx,
                    p,
                    format!("no READY=1 within ready_timeout_ms ({ms} ms)"),
                );
            }
        }
    }

    /// The instance counts as started (grace survived, or READY=1 received).
    fn mark_verified(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin, seq: u64) {
        let id = p.id.clone();
        let id = id.as_str();
        let watchdog_ms = p.settings.watchdog_ms;
        let Some(inst) = p.instance.as_mut().filter(|i| i.seq == seq) else {
            return;
        };
        if !matches!(inst.phase, Phase::Starting { .. }) {
            return;
        }
        cancel_timer(ctx, &mut inst.phase.take_timer());
        let watchdog_timer = (watchdog_ms > 0)
            .then(|| ctx.arm(watchdog_ms, Timer::PluginWatchdog(id.to_string(), seq)));
        inst.phase = Phase::Running { watchdog_timer };
        ctx.emit(Event::plugin(
            id,
            EventKind::PluginReady {
                pid: inst.pid.as_raw(),
            },
        ));
        let verifying = matches!(
            p.job.as_ref().map(|j| &j.phase),
            Some(JobPhase::Verifying { seq: s }) if *s == seq
        );
        if verifying {
            self.succeed(ctx, p);
        }
    }

    /// Kill an instance that failed verification; its reaped exit fails the job's attempt.
    fn abort_and_continue(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin, why: String) {
        if self.abort_instance(ctx, p, why) {
            self.instance_gone(ctx, p, Slot::Current);
        }
    }

    /// Stop every instance of a plugin (shutdown, removal).
    pub(super) fn stop_all_instances(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin) {
        for slot in [Slot::Retiring, Slot::Current] {
            self.stop_and_continue(ctx, p, slot);
        }
    }

    /// Stop instance `slot` of `p` (`Core::stop_instance`), and continue at once when nothing
    /// of it was left to wait for.
    pub(super) fn stop_and_continue(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin, slot: Slot) {
        if self.stop_instance(ctx, p, slot) {
            self.instance_gone(ctx, p, slot);
        }
    }

    /// The leader of instance `seq` of `p` was reaped.
    fn on_leader_reaped(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin, seq: u64, status: ExitKind) {
        let id = p.id.clone();
        let Some(slot) = p.slot_of(seq) else { return };
        let Some(inst) = p.slot_mut(slot) else { return };
        // Its pidfd is closed with it.
        inst.leader = Leader::Reaped;
        let expected = inst.phase.is_leaving() || inst.stopping_announced;
        let pid_raw = inst.pid.as_raw();
        let suffix = if expected { "" } else { " (unexpected)" };
        log::info!("[{id}] pid {pid_raw} exited with {status}{suffix}");
        let (code, signal) = match status {
            ExitKind::Code(c) => (Some(c), None),
            ExitKind::Signal(s) => (None, Some(s)),
        };
        ctx.emit(Event::plugin(
            &id,
            EventKind::PluginExited {
                pid: pid_raw,
                code,
                signal,
                expected,
            },
        ));
        if inst.phase.is_leaving() {
            // Other processes of the instance may outlive the leader: the kill timer sweeps them.
            let killed = inst.phase.killed();
            if !killed && self.members_alive(&id, inst) {
                log::debug!("[{id}] leader exited, other processes of the instance remain");
                self.host.leader_reaped(seq);
                return;
            }
            self.instance_gone(ctx, p, slot);
        } else {
            // Anything the plugin left behind goes with it, in its group or not.
            self.kill_members(&id, inst);
            self.host.scope_ended(inst.seq, &inst.scope);
            self.unexpected_exit(ctx, p, slot, status);
        }
    }

    /// A stopped (or aborted) instance and its group are gone: continue whatever asked for it,
    /// and finish a `stop ID` once it was the last one.
    pub(super) fn instance_gone(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin, slot: Slot) {
        self.continue_after_instance(ctx, p, slot);
        if self.to_forget.contains(&p.id) {
            // A removed plugin with nothing left goes from the table (once the entry point has
            // it back); no stop to settle.
            return;
        }
        p.settle_stop(ctx);
    }

    fn continue_after_instance(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin, slot: Slot) {
        let id = p.id.clone();
        let id = id.as_str();
        let Some(mut inst) = p.take_slot(slot) else {
            return;
        };
        self.forget_live(inst.seq);
        self.host.scope_ended(inst.seq, &inst.scope);
        cancel_timer(ctx, &mut inst.phase.take_timer());
        let overlapping = p.has_processes();
        // A job about to start the next instance writes the state file itself, right away.
        let next_start = inst.phase.failure().is_none()
            && matches!(
                p.job.as_ref().map(|j| &j.phase),
                Some(JobPhase::StoppingOld)
            );
        if !overlapping {
            // The last instance is gone: what it left in runtime.json is the state to keep.
            self.fold_runtime(ctx, p);
            p.runtime_read_after_exit = true;
            if !next_start {
                if let Err(e) = self.write_state(ctx, p, &inst.version, "stopped") {
                    log::warn!("[{id}] cannot write state file: {e}");
                }
            }
        }
        if !overlapping && self.shutting_down {
            self.take_back_files(id);
        }
        if p.removing {
            if !p.has_processes() {
                self.to_forget.push(id.to_string());
            }
            return;
        }
        if let Some(why) = inst.phase.take_failure() {
            if slot == Slot::Current {
                self.fail_attempt(ctx, p, why);
            }
            return;
        }
        if slot == Slot::Retiring {
            // A reload asked for while the old instance was still leaving can go now.
            self.run_queued(ctx, p);
            return;
        }
        let waiting_for_stop = matches!(
            p.job.as_ref().map(|j| &j.phase),
            Some(JobPhase::StoppingOld)
        );
        if waiting_for_stop {
            self.attempt(ctx, p);
        } else if p.job.is_none() {
            p.rest = Rest::Stopped;
            self.run_queued(ctx, p);
        }
    }

    fn unexpected_exit(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin, slot: Slot, status: ExitKind) {
        let id = p.id.clone();
        let id = id.as_str();
        let Some(mut inst) = p.take_slot(slot) else {
            return;
        };
        self.forget_live(inst.seq);
        cancel_timer(ctx, &mut inst.phase.take_timer());
        let seq = inst.seq;
        let announced = inst.stopping_announced;
        if !p.has_processes() {
            self.fold_runtime(ctx, p);
        }
        if slot == Slot::Retiring {
            log::warn!("[{id}] the instance being replaced exited on its own with {status}");
            return;
        }
        let verifying = matches!(
            p.job.as_ref().map(|j| &j.phase),
            Some(JobPhase::Verifying { seq: s }) if *s == seq
        );
        if verifying {
            let why = match p.settings.ready {
                ReadyMode::Exec => format!(
                    "exited during the {} ms startup grace with {status}",
                    p.settings.startup_grace_ms
                ),
                ReadyMode::Notify => format!("exited before sending READY=1, with {status}"),
            };
            self.fail_attempt(ctx, p, why);
            return;
        }
        if self.shutting_down || p.removing {
            return;
        }
        if announced {
            // It said STOPPING=1 first: a deliberate exit, not a crash.
            p.rest = Rest::Stopped;
            self.save_final_state(ctx, p, &inst.version);
            return;
        }
        if p.job.as_ref().is_some_and(super::job::awaiting_snapshot) {
            // That reload stopped nothing, so this exit is the instance's own: the reload ends
            // (its next try is the next change of the build) and the restart policy decides.
            let why = format!(
                "the running instance exited with {status} before the new build could be copied"
            );
            self.abandon_snapshot_retry(ctx, p, why);
        }
        if p.job.is_some() {
            // A job is in flight (e.g. waiting in backoff with nothing running): it decides.
            return;
        }
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
            self.save_final_state(ctx, p, &inst.version);
            return;
        }
        self.schedule_restart(ctx, p, format!("exited unexpectedly with {status}"));
    }

    /// A plugin left down: what it left in runtime.json is written to its state file.
    fn save_final_state(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin, version: &str) {
        if let Err(e) = self.write_state(ctx, p, version, "stopped") {
            log::warn!("[{}] cannot write state file: {e}", p.id);
        }
    }
}

impl Plugin {
    /// The version a stop-start job starts once the instance in `slot` is gone, if any.
    fn version_started_after_stop(&self, slot: Slot) -> Option<String> {
        let job = self.job.as_ref()?;
        let waits_for_this_stop = slot == Slot::Current
            && matches!(job.phase, JobPhase::StoppingOld)
            && !super::job::awaiting_snapshot(job);
        waits_for_this_stop.then(|| job.target.version.clone())
    }
}

/// Starting a process and giving back its files: the plugin and the host, nothing else.
/// Stopping and killing one instance. Each returns whether the instance is already gone (its
/// leader reaped and no member left): what follows is `Core::instance_gone`.
impl Core {
    /// Kill the current instance of `p`, which failed verification. True when it is gone.
    pub(super) fn abort_instance(
        &mut self,
        ctx: &mut Ctx<'_>,
        p: &mut Plugin,
        why: String,
    ) -> bool {
        let id = p.id.as_str();
        let Some(inst) = p.instance.as_mut() else {
            return false;
        };
        if inst.phase.failure().is_some() {
            return false;
        }
        log::warn!("[{id}] pid {}: {why}; killing it", inst.pid);
        match &mut inst.phase {
            // Being stopped already (its stop timer stays): the exit fails the attempt too.
            Phase::Stopping { failure, .. } => *failure = Some(why),
            phase => {
                cancel_timer(ctx, &mut phase.take_timer());
                *phase = Phase::Aborting { why };
            }
        }
        self.kill_leader(inst);
        let reaped = inst.leader.is_reaped();
        self.kill_members(id, inst);
        reaped && !self.members_alive(id, inst)
    }

    /// The plugin's `stop_signal` (SIGTERM unless configured) to the instance's group and to
    /// its processes outside the group, SIGKILL after the stop timeout. Every stop goes through
    /// here: a reload's, a `start-stop` retirement, removal, shutdown. True when the instance
    /// is already gone.
    pub(super) fn stop_instance(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin, slot: Slot) -> bool {
        let (version, already) = match p.slot(slot) {
            Some(inst) => (inst.version.clone(), inst.phase.is_stopping()),
            None => return false,
        };
        if already {
            return false;
        }
        // The old instance's latest runtime data, saved before it is asked to go. When it has
        // not changed since the state file was written, the file already preserves it, and the
        // reload's critical path is spared a durable write.
        let next_version = p.version_started_after_stop(slot);
        if slot == Slot::Current {
            let before = p.runtime_data.clone();
            self.fold_runtime(ctx, p);
            // With a reload to follow, the write below (after SIGTERM) saves the same data.
            if before != p.runtime_data && next_version.is_none() {
                if let Err(e) = self.write_state(ctx, p, &version, "stopping") {
                    log::warn!("[{}] cannot write state file before stopping: {e}", p.id);
                }
            }
        }
        let timeout = p.settings.stop_timeout_ms;
        let stop_signal = p.settings.stop_signal;
        let id = p.id.clone();
        let id = id.as_str();
        let Some(inst) = p.slot_mut(slot) else {
            return false;
        };
        cancel_timer(ctx, &mut inst.phase.take_timer());
        log::info!("[{id}] stopping pid {} ({stop_signal})", inst.pid);
        self.host.let_exit_run_elsewhere(inst.pid);
        if let Err(e) = self.host.signal_group(inst.pid, stop_signal.number()) {
            log::debug!("[{id}] {stop_signal} to group {}: {e}", inst.pid);
        }
        let _ = self.host.signal_group(inst.pid, libc::SIGCONT);
        let kill_timer = ctx.arm(timeout, Timer::Kill(id.to_string(), inst.seq));
        inst.phase = Phase::Stopping {
            kill_timer: Some(kill_timer),
            killed: false,
            failure: inst.phase.take_failure(),
        };
        let reaped = inst.leader.is_reaped();
        // Processes that left the group (setsid, double fork) are asked to stop too.
        self.signal_escapees(id, inst, &[stop_signal.number(), libc::SIGCONT]);
        if reaped && !self.members_alive(id, inst) {
            return true;
        }
        // A stop-start reload: state.json gets the new version while the old instance exits,
        // so the durable write overlaps the exit instead of sitting between the reap and the
        // spawn. After the reap, only what the old instance saved on its way out is written.
        if let Some(version) = next_version
            && let Err(e) = self.write_state_with(ctx, p, &version, "starting", DirSync::AfterStop)
        {
            // prepare_state tries again, and reports, once the old instance is gone.
            log::debug!("[{}] cannot write state file while stopping: {e}", p.id);
        }
        false
    }

    /// The stop timeout of instance `seq` of `p` expired: SIGKILL to it all. The instance's
    /// slot when it is gone.
    pub(super) fn kill_stopping(&mut self, p: &mut Plugin, seq: u64) -> Option<Slot> {
        let id = p.id.clone();
        let id = id.as_str();
        let slot = p.slot_of(seq)?;
        let inst = p.slot_mut(slot)?;
        let Phase::Stopping {
            kill_timer, killed, ..
        } = &mut inst.phase
        else {
            return None;
        };
        *kill_timer = None;
        *killed = true;
        log::warn!(
            "[{id}] pid {} did not exit within the stop timeout: sending SIGKILL to its process group",
            inst.pid
        );
        self.kill_leader(inst);
        let reaped = inst.leader.is_reaped();
        // The group, and every process that left it (cgroup.kill under cgroups).
        self.kill_members(id, inst);
        // Only stragglers were left, and SIGKILL cannot be ignored.
        reaped.then_some(slot)
    }
}

impl Core {
    /// SIGKILL to the instance's leader while it lives (through its pidfd when there is one:
    /// the pid of a reaped leader may belong to someone else already).
    fn kill_leader(&mut self, inst: &Instance) {
        if let Leader::Alive { pidfd } = &inst.leader {
            let _ = self
                .host
                .signal_process(inst.pid, pidfd.as_ref(), libc::SIGKILL);
        }
    }

    /// WATCHDOG=1 did not arrive in time: kill the plugin; its exit is handled like a crash.
    pub(super) fn on_plugin_watchdog(&mut self, ctx: &mut Ctx<'_>, p: &mut Plugin, seq: u64) {
        let id = p.id.clone();
        let id = id.as_str();
        let ms = p.settings.watchdog_ms;
        let Some(slot) = p.slot_of(seq) else { return };
        let Some(inst) = p.slot_mut(slot) else { return };
        match &mut inst.phase {
            Phase::Running { watchdog_timer } => *watchdog_timer = None,
            Phase::Stopping { .. } => return,
            // WATCHDOG=trigger before it is verified, or while it is being aborted.
            Phase::Starting { .. } | Phase::Aborting { .. } => {}
        }
        log::warn!(
            "[{id}] watchdog timeout: no WATCHDOG=1 for {ms} ms; killing pid {}",
            inst.pid
        );
        ctx.emit(Event::plugin(
            id,
            EventKind::PluginWatchdog {
                pid: inst.pid.as_raw(),
                watchdog_ms: ms,
            },
        ));
        let pidfd = inst.leader.pidfd();
        let _ = self.host.signal_process(inst.pid, pidfd, libc::SIGABRT);
        let _ = self.host.signal_group(inst.pid, libc::SIGKILL);
    }

    /// Spawn `target` into the Current slot with its pipes, sockets and environment.
    pub(super) fn spawn_instance(
        &mut self,
        ctx: &mut Ctx<'_>,
        p: &mut Plugin,
        target: &Snap,
    ) -> Result<u64, String> {
        p.runtime_read_after_exit = false;
        let key = self.start_key(p, target);
        let notify_socket = key.notify_socket.clone();
        let made_ahead = p.job.as_mut().and_then(|job| job.prepared.take());
        let prepared = match made_ahead {
            Some(made) if made.key == key => made.spawn,
            _ => self.prepare_start(p, target, key)?.spawn,
        };
        let id = p.id.as_str();
        let state_path = self.state_path(id);
        let paths = PluginPaths {
            state_dir: state_path.parent().unwrap_or(&state_path),
            snapshot: &target.path,
            notify_socket: notify_socket.as_deref(),
        };
        self.host
            .give_to_user(p.settings.run_as.as_ref(), &paths)
            .map_err(|e| e.to_string())?;
        let scope = self.host.new_scope(id)?;
        let spawned = match self.host.spawn(prepared, scope.dir_fd()) {
            Ok(s) => s,
            Err(e) => {
                self.host.abandon_scope(scope);
                return Err(e.to_string());
            }
        };
        if !self.spawned_this_turn {
            // The kernel ends the vfork wait in the middle of the child's exec (when the child
            // lets go of our memory, before it has loaded the program), and the woken daemon
            // preempts it on this CPU until the end of the turn (fsyncs, the instance record):
            // ~200 µs of a 1 MiB reload on a 2-core VM (issue 14). So the first start of a turn
            // hands the CPU back and runs now; later ones in the same turn (a rebuild of many
            // plugins at once) do not, so that the daemon's throughput stays what it was.
            self.spawned_this_turn = true;
            self.host.let_new_instance_run();
        }
        p.record_start(ctx);
        let id = p.id.as_str();
        self.next_seq += 1;
        let seq = self.next_seq;
        let scope = self.host.scope_started(seq, id, spawned.pid, scope);
        let mut pipes = Vec::new();
        for (fd, stream) in [
            (spawned.stdout, Stream::Stdout),
            (spawned.stderr, Stream::Stderr),
        ] {
            let token = self.new_token();
            let reader = LineReader::new(fd);
            let raw = reader.fd().as_raw_fd();
            if let Err(e) = ctx
                .registry
                .register(&mut SourceFd(&raw), token, Interest::READABLE)
            {
                log::warn!("[{id}] cannot poll the plugin's {}: {e}", stream.as_str());
                continue;
            }
            let pipe = Pipe {
                plugin: id.to_string(),
                stream,
                reader,
            };
            self.pipes.insert(token, pipe);
            // Output may already be waiting (edge-triggered: read once now).
            self.backlog.push(token);
            pipes.push(token);
        }
        let pid = spawned.pid;
        self.pids.insert(pid, (id.to_string(), seq));
        let live = super::host::Live {
            plugin: id.to_string(),
            leader: pid.as_raw(),
            version: target.version.clone(),
            start_ticks: scope.start_ticks,
        };
        self.live.insert(seq, live);
        let verify_ms = match p.settings.ready {
            ReadyMode::Exec => p.settings.startup_grace_ms,
            ReadyMode::Notify => p.settings.ready_timeout_ms,
        };
        p.status_text = None;
        p.instance = Some(Instance {
            seq,
            pid,
            leader: Leader::Alive {
                pidfd: spawned.pidfd,
            },
            version: target.version.clone(),
            started_wall: self.host.wall(),
            started: self.host.now(),
            phase: Phase::Starting {
                verify_timer: Some(ctx.arm(verify_ms, Timer::Verify(id.to_string(), seq))),
            },
            pipes,
            stopping_announced: false,
            scope,
        });
        log::info!("[{id}] started pid {} version {}", pid, target.version);
        ctx.emit(Event::plugin(
            id,
            EventKind::PluginStarted {
                pid: pid.as_raw(),
                version: target.version.clone(),
            },
        ));
        Ok(seq)
    }

    /// The start of `target` made ready (see `spawn::Prepared`): the plugin's environment,
    /// arguments and descriptors, as C strings and an exec plan, and the child's stdio.
    fn prepare_start(
        &mut self,
        p: &Plugin,
        target: &Snap,
        key: StartKey,
    ) -> Result<PreparedStart, String> {
        let id = p.id.as_str();
        let state_path = self.state_path(id);
        let runtime_path = self.runtime_path(id);
        let mut env = plugin_env(p, &target.version, &state_path, &runtime_path);
        let mut pid_vars = Vec::new();
        if let Some(path) = &key.notify_socket {
            env.insert("NOTIFY_SOCKET".into(), path.clone().into_os_string());
        }
        if !key.fds.is_empty() {
            env.insert("LISTEN_FDS".into(), key.fds.len().to_string().into());
            env.insert("LISTEN_FDNAMES".into(), key.fd_names.join(":").into());
            pid_vars.push("LISTEN_PID");
        }
        if p.settings.watchdog_ms > 0 {
            let usec = p.settings.watchdog_ms.saturating_mul(1000);
            env.insert("WATCHDOG_USEC".into(), usec.to_string().into());
            pid_vars.push("WATCHDOG_PID");
        }
        if let Some(run_as) = &p.settings.run_as {
            account_env(&mut env, run_as, &p.settings.env);
        }
        let spec = spawn::SpawnSpec {
            program: target.path.clone(),
            arg0: p.settings.exec.to_string_lossy().into_owned(),
            args: p.settings.args.clone(),
            cwd: p.dir.clone(),
            env,
            pass_fds: key.fds.clone(),
            pid_vars,
            cgroup: None,
            creds: p.settings.run_as.as_ref().map(credentials::child_creds),
        };
        let spawn = self.host.prepare_spawn(spec).map_err(|e| e.to_string())?;
        Ok(PreparedStart { key, spawn })
    }

    /// What a start made ahead depends on besides the plugin's settings (a config reload
    /// drops it, `apply_config`): the build, the notify socket, the descriptors handed over
    /// (the old instance may store more on its way out, `FDSTORE=1`).
    fn start_key(&self, p: &Plugin, target: &Snap) -> StartKey {
        let (fds, fd_names) = passed_fds(p);
        StartKey {
            program: target.path.clone(),
            notify_socket: self.notify_path_of(&p.id),
            fds,
            fd_names,
        }
    }

    /// A stop-start reload has asked the old instance to go: its successor's start is made
    /// ready now, beside the snapshot's copy and the old instance's exit, so that only the
    /// clone follows the reap. A failure here is not the start's: it is made again then.
    pub(super) fn prepare_next_start(&mut self, p: &mut Plugin) {
        let Some(job) = p.job.as_ref() else {
            return;
        };
        let stopping_old = matches!(job.phase, JobPhase::StoppingOld);
        if !stopping_old || job.prepared.is_some() || p.instance.is_none() {
            return;
        }
        let target = job.target.clone();
        let key = self.start_key(p, &target);
        match self.prepare_start(p, &target, key) {
            Ok(prepared) => {
                if let Some(job) = p.job.as_mut() {
                    job.prepared = Some(prepared);
                }
            }
            Err(e) => log::debug!("[{}] start not made ready ahead: {e}", p.id),
        }
    }

    /// What the plugin's `user` was given becomes the daemon's again (the plugin is removed or
    /// the daemon stops): the next daemon may run with a configuration without that `user`.
    pub(super) fn take_back_files(&mut self, id: &str) {
        let state_path = self.state_path(id);
        let snapshot_dir = self.snapshot_dir(id);
        let notify_path = self.notify_path_of(id);
        let paths = PluginPaths {
            state_dir: state_path.parent().unwrap_or(&state_path),
            // Only its directory counts when taking back.
            snapshot: &snapshot_dir.join("-"),
            notify_socket: notify_path.as_deref(),
        };
        if let Err(e) = self.host.give_to_user(None, &paths) {
            log::warn!("[{id}] {e}");
        }
    }
}

/// Sockets the daemon holds for the plugin, then the fds it parked: fd 3, 4, ... in that order.
fn passed_fds(p: &Plugin) -> (Vec<i32>, Vec<String>) {
    let mut fds = Vec::new();
    let mut names = Vec::new();
    for s in &p.listen {
        fds.push(s.fd.as_raw_fd());
        names.push(s.name.clone());
    }
    for (name, fd) in &p.fdstore {
        fds.push(fd.as_raw_fd());
        names.push(name.clone());
    }
    (fds, names)
}

/// The plugin's environment (SPEC §4): ours minus the service-manager variables, plus the
/// plugin's `env`, plus the HOTRELOAD_* contract.
/// `USER`, `LOGNAME` and `HOME` of the plugin's account (as `su` and systemd's `User=` set
/// them), unless the plugin's `env` sets them.
fn account_env(
    env: &mut BTreeMap<OsString, OsString>,
    run_as: &RunAs,
    own: &BTreeMap<String, String>,
) {
    let home = run_as.home.as_ref().map(|home| home.as_os_str().to_owned());
    let vars = [
        ("USER", Some(OsString::from(&run_as.user))),
        ("LOGNAME", Some(OsString::from(&run_as.user))),
        ("HOME", home),
    ];
    for (name, value) in vars {
        if let Some(value) = value
            && !own.contains_key(name)
        {
            env.insert(name.into(), value);
        }
    }
}

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
