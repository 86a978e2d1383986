//! The host seam: every effect the supervisor's decisions have on the machine.
//!
//! The reload, restart and stop logic (`job.rs`, `instance.rs`, `protocol.rs`) decides; a
//! [`Host`] acts. Spawning and signalling processes, copying and checking a build, writing and
//! reading state files, running hooks, containment (cgroups or `/proc`) and the clocks all go
//! through this one trait, so that the lifecycle can be driven in unit tests with no process,
//! no file and no sleep (`testhost.rs`, youki's `Syscall` and watchexec's `TestChild` are the
//! models). [`OsHost`] is the real thing: it calls `spawn::spawn`, `snapshot::take`,
//! `preflight::check`, `state_file`, `hooks` and the containment module, and adds nothing to
//! them (the reload path is benchmarked; a virtual call is all this seam costs).
//!
//! What stays outside: the notify and listening sockets and the output pipes, which the
//! supervisor registers with the daemon's poll (a missing runtime dir only costs a warning).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::unistd::Pid;

use super::contain::{Containment, NewScope, Scope, Usage};
use super::credentials::{self, PluginPaths};
use super::plugin::{Instance, Plugin};
use super::spawn::{self, Prepared, SpawnError, SpawnSpec, Spawned};
use crate::clock;
use crate::config::RunAs;
use crate::hooks::{self, HookContext, HookError, HookKind, HookRun};
use crate::preflight::{self, PreflightError};
use crate::snapshot::{self, Snapshot, SnapshotError, Snapshotter};
use crate::state_file::{self, PluginState, RuntimeRead, StateError};
use crate::wheel::TimerId;

/// What containment needs to know about the supervisor to attribute processes: the instances
/// in the plugins' slots, the leaders it reaps and the hooks it runs. It borrows only `Core`,
/// so that an instance can be stopped while its plugin is lent out (`Supervisor::split`).
pub struct Procs<'a> {
    /// Every instance in a plugin's slot, by seq (`Core::live`).
    pub live: &'a BTreeMap<u64, Live>,
    pub pids: &'a HashMap<Pid, (String, u64)>,
    pub hooks: &'a HashMap<Pid, (HookRun, TimerId)>,
}

/// What orphan attribution needs of one instance in a plugin's slot (`contain.rs`): kept in
/// `Core` from its spawn until it leaves its slot, so that attributing an orphan does not need
/// the plugin table.
#[derive(Debug, Clone)]
pub struct Live {
    pub plugin: String,
    /// Its leader's pid: the number of its process group and session.
    pub leader: i32,
    pub version: String,
    /// The leader's start time, once read (`flush_record`); 0 until then.
    pub start_ticks: u64,
}

/// How durable a state.json write is before it returns (see `state::DirSync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Content and rename synced.
    Synced,
    /// Written whole and renamed into place (safe against a crash of the daemon: see
    /// `state_file`), with both fsyncs owed: [`Host::sync_state`] right after the spawn that
    /// needed the file, so no fsync sits on a reload's path to the new process.
    Deferred,
}

/// Every effect of the supervisor on the machine. See the module documentation.
pub trait Host {
    // -- clocks
    /// Monotonic now: job and instance start times, durations.
    fn now(&self) -> Instant;
    /// Wall-clock now as RFC 3339, for history, `started_at` and state files.
    fn wall(&self) -> String;

    // -- builds
    /// Copy the plugin's executable into its snapshot dir (`snapshot::take`).
    fn snapshot(&mut self, exec: &Path, dir: &Path) -> Result<Snapshot, SnapshotError>;
    /// Like [`Host::snapshot`], but the copy may be only staged: read and hashed into memory
    /// while a helper thread writes it to a temp file (`Snapshotter::stage`). [`Host::preflight`]
    /// checks those bytes, and the file has its version name once [`Host::finish_snapshot`] has
    /// collected the helper, after the stop signal.
    fn stage_snapshot(&mut self, exec: &Path, dir: &Path) -> Result<Snapshot, SnapshotError>;
    /// Finish the staged snapshot `path` and give it its name (dropping any other); an earlier
    /// failure to write it is reported again.
    fn finish_snapshot(&mut self, path: &Path) -> Result<(), SnapshotError>;
    /// Drop a staged snapshot nothing needs (its build was refused or unchanged).
    fn discard_snapshot(&mut self);
    /// Free the staging memory (after a while without reloads).
    fn release_snapshot_buffer(&mut self);
    /// The content version of the executable, without copying it.
    fn version_of(&self, exec: &Path) -> Result<String, SnapshotError>;
    /// Remove the snapshots of a plugin but those named in `keep`.
    fn prune_snapshots(&mut self, dir: &Path, keep: &[&str]) -> io::Result<()>;
    /// Remove a forgotten plugin's snapshot dir.
    fn remove_snapshots(&mut self, dir: &Path);
    /// Whether a snapshot (the last good build) is still there to roll back to.
    fn snapshot_exists(&self, path: &Path) -> bool;
    /// The pre-flight check of a copied build.
    fn preflight(&mut self, build: &Path) -> Result<(), PreflightError>;

    // -- state files
    fn write_state(
        &mut self,
        path: &Path,
        state: &PluginState,
        durability: Durability,
    ) -> Result<(), StateError>;
    /// The fsyncs owed by a [`Durability::Deferred`] write: the file, then its directory.
    fn sync_state(&mut self, path: &Path) -> Result<(), StateError>;
    fn read_state(&self, path: &Path) -> Result<Option<PluginState>, StateError>;
    fn set_aside_state(&mut self, path: &Path) -> io::Result<PathBuf>;
    fn remove_stale_temps(&mut self, dir: &Path) -> io::Result<usize>;
    fn read_runtime(&self, path: &Path, max_bytes: u64) -> RuntimeRead;
    fn remove_runtime(&mut self, path: &Path) -> io::Result<()>;

    // -- processes
    /// Before a start: give a plugin with `user`/`group` its state dir, snapshot and notify
    /// socket, or take them back for one that runs as the daemon (`credentials::prepare`).
    fn give_to_user(&mut self, run_as: Option<&RunAs>, paths: &PluginPaths<'_>) -> io::Result<()>;
    /// Make ready what a start of `spec` needs before its moment (`spawn::Prepared`).
    fn prepare_spawn(&mut self, spec: SpawnSpec) -> Result<Prepared, SpawnError>;
    /// Start `prepared`, in the cgroup whose directory is `cgroup` if any.
    fn spawn(&mut self, prepared: Prepared, cgroup: Option<RawFd>) -> Result<Spawned, SpawnError>;
    /// Give the CPU to the instance just spawned (`sched_yield`).
    fn let_new_instance_run(&mut self);
    /// Before its stop signal: let an instance exit on another CPU than the daemon's, beside
    /// the daemon's work instead of after it (`sys::cpu`).
    fn let_exit_run_elsewhere(&mut self, pid: Pid);
    fn signal_group(&mut self, pgid: Pid, sig: libc::c_int) -> io::Result<()>;
    fn signal_process(
        &mut self,
        pid: Pid,
        pidfd: Option<&OwnedFd>,
        sig: libc::c_int,
    ) -> io::Result<()>;

    // -- containment
    /// A cgroup (or nothing) for the next instance of `id`.
    fn new_scope(&mut self, id: &str) -> Result<NewScope, String>;
    /// The spawn failed: the scope goes.
    fn abandon_scope(&mut self, scope: NewScope);
    /// Instance `seq` of `id` started as `pid` in `scope`.
    fn scope_started(&mut self, seq: u64, id: &str, pid: Pid, scope: NewScope) -> Scope;
    /// The leader of `seq` was reaped while other processes of the instance remain.
    fn leader_reaped(&mut self, seq: u64);
    /// Instance `seq` is over.
    fn scope_ended(&mut self, seq: u64, scope: &Scope);
    /// True while any process of the instance (its leader aside) lives.
    fn members_alive(&mut self, w: &Procs<'_>, id: &str, inst: &Instance) -> bool;
    /// SIGKILL to every process of the instance.
    fn kill_members(&mut self, w: &Procs<'_>, id: &str, inst: &Instance);
    /// `sigs` to every process of the instance outside its leader's group.
    fn signal_escapees(&mut self, w: &Procs<'_>, id: &str, inst: &Instance, sigs: &[libc::c_int]);
    /// `tasks`, `memory_bytes`, `cpu_usage_ms` of a plugin.
    fn usage(&self, w: &Procs<'_>, p: &Plugin) -> Usage;
    /// After the last plugin stopped: kill what no plugin claims, drop the record.
    fn kill_strays(&mut self, w: &Procs<'_>);
    /// At daemon start: cgroups, a dead daemon's leftovers, a fresh record.
    fn prepare_containment(&mut self);
    /// Once per loop turn: the instance record, with the start times of new leaders.
    fn flush_record(&mut self, plugins: &mut BTreeMap<String, Plugin>);
    /// Retry removing cgroups of killed instances.
    fn remove_emptied_cgroups(&mut self);

    // -- hooks
    fn spawn_hook(
        &mut self,
        argv: &[String],
        kind: HookKind,
        hook: &HookContext<'_>,
    ) -> Result<HookRun, HookError>;
    fn kill_hook(&mut self, run: &HookRun);
}

/// The host that runs the real thing.
#[derive(Debug)]
pub struct OsHost {
    contain: Containment,
    snapshots: Snapshotter,
    /// Previous contents of state files exchanged out of the way by deferred writes, by state
    /// file: removed when its fsyncs are done (`sync_state`), off the reload's path.
    replaced: Vec<(PathBuf, PathBuf)>,
    /// The next deferred state write's temp file, made after the last (`state_file::Spare`).
    state_spare: Option<state_file::Spare>,
}

impl OsHost {
    pub fn new(runtime_dir: &Path, plugins_state: &Path) -> OsHost {
        OsHost {
            contain: Containment::new(runtime_dir, plugins_state),
            snapshots: Snapshotter::new(),
            replaced: Vec::new(),
            state_spare: None,
        }
    }
}

impl Host for OsHost {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall(&self) -> String {
        clock::wall_rfc3339()
    }

    fn snapshot(&mut self, exec: &Path, dir: &Path) -> Result<Snapshot, SnapshotError> {
        self.snapshots.discard();
        snapshot::take(exec, dir)
    }

    fn stage_snapshot(&mut self, exec: &Path, dir: &Path) -> Result<Snapshot, SnapshotError> {
        self.snapshots.stage(exec, dir)
    }

    fn finish_snapshot(&mut self, path: &Path) -> Result<(), SnapshotError> {
        self.snapshots.finish(path)
    }

    fn discard_snapshot(&mut self) {
        self.snapshots.discard();
    }

    fn release_snapshot_buffer(&mut self) {
        self.snapshots.release();
    }

    fn version_of(&self, exec: &Path) -> Result<String, SnapshotError> {
        snapshot::version_of(exec)
    }

    fn prune_snapshots(&mut self, dir: &Path, keep: &[&str]) -> io::Result<()> {
        snapshot::prune(dir, keep)
    }

    fn remove_snapshots(&mut self, dir: &Path) {
        let _ = std::fs::remove_dir_all(dir);
    }

    fn snapshot_exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn preflight(&mut self, build: &Path) -> Result<(), PreflightError> {
        if let Some((bytes, mode)) = self.snapshots.staged(build) {
            return preflight::check_staged(build, bytes, mode);
        }
        preflight::check(build)
    }

    fn write_state(
        &mut self,
        path: &Path,
        state: &PluginState,
        durability: Durability,
    ) -> Result<(), StateError> {
        match durability {
            Durability::Synced => state_file::write_state(path, state),
            Durability::Deferred => {
                let spare = self.state_spare.take();
                if let Some(old) = state_file::write_state_deferred(path, state, spare)? {
                    self.replaced.push((path.to_path_buf(), old));
                }
                Ok(())
            }
        }
    }

    fn sync_state(&mut self, path: &Path) -> Result<(), StateError> {
        // The replaced contents go first, so the directory fsync covers their removal too.
        self.replaced.retain(|(state, old)| {
            let due = state == path;
            if due {
                state_file::remove_replaced(old);
            }
            !due
        });
        let synced = state_file::sync_written(path);
        // After the start this write served: the next reload of this plugin finds its temp
        // file made (one spare, for the plugin reloaded last).
        if self
            .state_spare
            .as_ref()
            .is_none_or(|spare| !spare.serves(path))
        {
            self.state_spare = state_file::spare_for(path);
        }
        synced
    }

    fn read_state(&self, path: &Path) -> Result<Option<PluginState>, StateError> {
        state_file::read_state(path)
    }

    fn set_aside_state(&mut self, path: &Path) -> io::Result<PathBuf> {
        state_file::set_aside(path)
    }

    fn remove_stale_temps(&mut self, dir: &Path) -> io::Result<usize> {
        state_file::remove_stale_temps(dir)
    }

    fn read_runtime(&self, path: &Path, max_bytes: u64) -> RuntimeRead {
        state_file::read_runtime(path, max_bytes)
    }

    fn remove_runtime(&mut self, path: &Path) -> io::Result<()> {
        state_file::remove_if_exists(path)
    }

    fn give_to_user(&mut self, run_as: Option<&RunAs>, paths: &PluginPaths<'_>) -> io::Result<()> {
        credentials::prepare(run_as, paths)
    }

    fn prepare_spawn(&mut self, spec: SpawnSpec) -> Result<Prepared, SpawnError> {
        spawn::prepare(spec)
    }

    fn spawn(&mut self, prepared: Prepared, cgroup: Option<RawFd>) -> Result<Spawned, SpawnError> {
        spawn::spawn_prepared(prepared, cgroup)
    }

    fn let_new_instance_run(&mut self) {
        std::thread::yield_now();
    }

    fn let_exit_run_elsewhere(&mut self, pid: Pid) {
        crate::sys::cpu::move_off_this_cpu(pid);
    }

    fn signal_group(&mut self, pgid: Pid, sig: libc::c_int) -> io::Result<()> {
        spawn::signal_group(pgid, sig)
    }

    fn signal_process(
        &mut self,
        pid: Pid,
        pidfd: Option<&OwnedFd>,
        sig: libc::c_int,
    ) -> io::Result<()> {
        spawn::signal_process(pid, pidfd, sig)
    }

    fn new_scope(&mut self, id: &str) -> Result<NewScope, String> {
        self.contain.new_scope(id)
    }

    fn abandon_scope(&mut self, scope: NewScope) {
        self.contain.abandon(scope);
    }

    fn scope_started(&mut self, seq: u64, id: &str, pid: Pid, scope: NewScope) -> Scope {
        self.contain.started(seq, id, pid, scope)
    }

    fn leader_reaped(&mut self, seq: u64) {
        self.contain.leader_reaped(seq);
    }

    fn scope_ended(&mut self, seq: u64, scope: &Scope) {
        self.contain.ended(seq, scope);
    }

    fn members_alive(&mut self, w: &Procs<'_>, _id: &str, inst: &Instance) -> bool {
        self.contain.members_alive(w, inst)
    }

    fn kill_members(&mut self, w: &Procs<'_>, _id: &str, inst: &Instance) {
        self.contain.kill_members(w, inst);
    }

    fn signal_escapees(&mut self, w: &Procs<'_>, id: &str, inst: &Instance, sigs: &[libc::c_int]) {
        self.contain.signal_escapees(w, id, inst, sigs);
    }

    fn usage(&self, w: &Procs<'_>, p: &Plugin) -> Usage {
        self.contain.usage(w, p)
    }

    fn kill_strays(&mut self, w: &Procs<'_>) {
        self.contain.kill_strays(w);
    }

    fn prepare_containment(&mut self) {
        self.contain.prepare();
    }

    fn flush_record(&mut self, plugins: &mut BTreeMap<String, Plugin>) {
        self.contain.flush_record(plugins);
    }

    fn remove_emptied_cgroups(&mut self) {
        self.contain.remove_emptied();
    }

    fn spawn_hook(
        &mut self,
        argv: &[String],
        kind: HookKind,
        hook: &HookContext<'_>,
    ) -> Result<HookRun, HookError> {
        hooks::spawn_hook(argv, kind, hook)
    }

    fn kill_hook(&mut self, run: &HookRun) {
        hooks::kill_hook(run);
    }
}
