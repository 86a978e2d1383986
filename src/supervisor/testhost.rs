//! A recording fake [`Host`] for the lifecycle's unit tests (watchexec's `TestChild` is the
//! model): no process, no file, no sleep.
//!
//! The test holds the same [`World`] as the host (`Rc<RefCell<_>>`): it installs builds, makes
//! copies, pre-flight checks or spawns fail, moves the clock, and reads back every call the
//! supervisor made (`calls`) and every state.json it wrote. Pids start above the kernel's
//! largest (`pid_max` is at most 2^22), so they can never name a real process.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use serde_json::Value;

use super::contain::{NewScope, Scope, Usage};
use super::host::{Durability, Host, Procs};
use super::plugin::{Instance, Plugin};
use super::spawn::{Prepared, SpawnError, SpawnSpec, Spawned};
use crate::hooks::{HookContext, HookError, HookKind, HookRun};
use crate::preflight::PreflightError;
use crate::snapshot::{Snapshot, SnapshotError};
use crate::state_file::{PluginState, RuntimeRead, StateError};

/// The first pid the fake hands out: above any real pid.
pub const FIRST_PID: i32 = 5_000_000;

/// One thing the supervisor asked the host to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Snapshot(PathBuf),
    /// The staged copy of this version was written.
    SnapshotWritten(String),
    Preflight(String),
    Spawn {
        pid: i32,
        version: String,
    },
    Signal {
        pid: i32,
        sig: i32,
    },
    SignalGroup {
        pgid: i32,
        sig: i32,
    },
    /// The CPU handed to the instance just spawned.
    Yield,
    /// The instance about to be stopped may exit on another CPU.
    ExitElsewhere(i32),
    KillMembers(String),
    SignalEscapees(String),
    WriteState {
        version: String,
        status: String,
    },
    /// The directory fsync owed by a write whose rename was not synced.
    SyncDir,
    RemoveRuntime,
    Hook(&'static str),
    KillHook(i32),
}

/// What the fake machine holds, shared by the test and the host.
#[derive(Debug)]
pub struct World {
    pub calls: Vec<Call>,
    base: Instant,
    pub elapsed_ms: u64,
    /// Executable path → version of the build installed there.
    pub builds: HashMap<PathBuf, String>,
    /// The next this many copies fail (the runtime dir full).
    pub copy_failures: u32,
    /// Writes of a staged snapshot that fail (EIO) before one works.
    pub write_failures: u32,
    /// The snapshot staged and not yet written, and the one whose write failed.
    pub staged: Option<PathBuf>,
    pub failed_write: Option<PathBuf>,
    /// Whether staging memory is held (stage_snapshot sets it, release clears it).
    pub buffer_held: bool,
    /// Versions the pre-flight check refuses.
    pub refused: HashSet<String>,
    /// Versions whose spawn fails (exec error).
    pub unspawnable: HashSet<String>,
    /// Leaders whose other processes still live after them.
    pub members_alive: HashSet<i32>,
    /// What the plugin left in runtime.json.
    pub runtime: Option<Value>,
    /// How often runtime.json was read.
    pub runtime_reads: u32,
    /// The versions whose start was made ready (`prepare_spawn`), in order.
    pub prepared: Vec<String>,
    /// state.json writes fail (read-only state dir).
    pub state_writes_fail: bool,
    /// The deferred fsyncs of state.json fail (EIO), once each.
    pub state_syncs_fail: bool,
    /// The last state.json written, by path.
    pub states: BTreeMap<PathBuf, PluginState>,
    next_pid: i32,
}

impl World {
    pub fn new() -> World {
        World {
            calls: Vec::new(),
            runtime_reads: 0,
            prepared: Vec::new(),
            base: Instant::now(),
            elapsed_ms: 0,
            builds: HashMap::new(),
            copy_failures: 0,
            write_failures: 0,
            staged: None,
            failed_write: None,
            buffer_held: false,
            refused: HashSet::new(),
            unspawnable: HashSet::new(),
            members_alive: HashSet::new(),
            runtime: None,
            state_writes_fail: false,
            state_syncs_fail: false,
            states: BTreeMap::new(),
            next_pid: FIRST_PID,
        }
    }

    /// The pids spawned so far, in order, with their versions.
    pub fn spawned(&self) -> Vec<(i32, String)> {
        self.calls
            .iter()
            .filter_map(|c| match c {
                Call::Spawn { pid, version } => Some((*pid, version.clone())),
                _ => None,
            })
            .collect()
    }
}

/// The host over a shared [`World`].
pub struct FakeHost(pub Rc<RefCell<World>>);

impl FakeHost {
    fn record(&self, call: Call) {
        self.0.borrow_mut().calls.push(call);
    }
}

impl Host for FakeHost {
    fn now(&self) -> Instant {
        let w = self.0.borrow();
        w.base + Duration::from_millis(w.elapsed_ms)
    }

    fn wall(&self) -> String {
        format!(
            "2026-12-07T00:00:00.{:03}Z",
            self.0.borrow().elapsed_ms % 1000
        )
    }

    fn snapshot(&mut self, exec: &Path, dir: &Path) -> Result<Snapshot, SnapshotError> {
        self.record(Call::Snapshot(exec.to_path_buf()));
        let mut w = self.0.borrow_mut();
        let Some(version) = w.builds.get(exec).cloned() else {
            return Err(SnapshotError::NotFound {
                path: exec.to_path_buf(),
                dangling_symlink: false,
            });
        };
        if w.copy_failures > 0 {
            w.copy_failures -= 1;
            return Err(SnapshotError::Write {
                path: exec.to_path_buf(),
                dir: dir.to_path_buf(),
                source: io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        Ok(Snapshot {
            path: dir.join(&version),
            version,
            len: 1,
        })
    }

    fn stage_snapshot(&mut self, exec: &Path, dir: &Path) -> Result<Snapshot, SnapshotError> {
        let snapshot = self.snapshot(exec, dir)?;
        let mut w = self.0.borrow_mut();
        w.buffer_held = true;
        w.staged = Some(snapshot.path.clone());
        w.failed_write = None;
        Ok(snapshot)
    }

    fn finish_snapshot(&mut self, path: &Path) -> Result<(), SnapshotError> {
        let mut w = self.0.borrow_mut();
        let eio = || SnapshotError::Write {
            path: path.to_path_buf(),
            dir: path.parent().unwrap_or(path).to_path_buf(),
            source: io::Error::from_raw_os_error(libc::EIO),
        };
        match w.staged.take() {
            Some(staged) if staged == path => {
                if w.write_failures > 0 {
                    w.write_failures -= 1;
                    w.failed_write = Some(staged);
                    return Err(eio());
                }
                let version = staged
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                w.calls.push(Call::SnapshotWritten(version));
                Ok(())
            }
            _ if w.failed_write.as_deref() == Some(path) => Err(eio()),
            _ => Ok(()),
        }
    }

    fn discard_snapshot(&mut self) {
        self.0.borrow_mut().staged = None;
    }

    fn release_snapshot_buffer(&mut self) {
        self.0.borrow_mut().buffer_held = false;
    }

    fn version_of(&self, exec: &Path) -> Result<String, SnapshotError> {
        self.0
            .borrow()
            .builds
            .get(exec)
            .cloned()
            .ok_or_else(|| SnapshotError::NotFound {
                path: exec.to_path_buf(),
                dangling_symlink: false,
            })
    }

    fn prune_snapshots(&mut self, _dir: &Path, _keep: &[&str]) -> io::Result<()> {
        Ok(())
    }

    fn remove_snapshots(&mut self, _dir: &Path) {}

    fn snapshot_exists(&self, _path: &Path) -> bool {
        true
    }

    fn preflight(&mut self, build: &Path) -> Result<(), PreflightError> {
        let version = build
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.record(Call::Preflight(version.clone()));
        if self.0.borrow().refused.contains(&version) {
            // The real check of a file that is not there: a refusal without a process.
            return crate::preflight::check(Path::new("/dev/null/hotreload-fake-refused"));
        }
        Ok(())
    }

    fn write_state(
        &mut self,
        path: &Path,
        state: &PluginState,
        durability: Durability,
    ) -> Result<(), StateError> {
        self.record(Call::WriteState {
            version: state.version.clone(),
            status: state.status.clone(),
        });
        if durability == Durability::Synced {
            // The write syncs its directory itself.
            self.record(Call::SyncDir);
        }
        let mut w = self.0.borrow_mut();
        if w.state_writes_fail {
            // A state dir that is not there is the write error the tests need.
            drop(w);
            return crate::state_file::write_state(Path::new("/dev/null/hr/state.json"), state);
        }
        w.states.insert(path.to_path_buf(), state.clone());
        Ok(())
    }

    fn sync_state(&mut self, _path: &Path) -> Result<(), StateError> {
        self.record(Call::SyncDir);
        if std::mem::take(&mut self.0.borrow_mut().state_syncs_fail) {
            // fsync of a directory that is not there: the I/O error the tests need.
            return crate::state_file::sync_written(Path::new("/dev/null/hr/state.json"));
        }
        Ok(())
    }

    fn read_state(&self, path: &Path) -> Result<Option<PluginState>, StateError> {
        Ok(self.0.borrow().states.get(path).cloned())
    }

    fn set_aside_state(&mut self, path: &Path) -> io::Result<PathBuf> {
        Ok(path.with_extension("aside"))
    }

    fn remove_stale_temps(&mut self, _dir: &Path) -> io::Result<usize> {
        Ok(0)
    }

    fn read_runtime(&self, _path: &Path, _max_bytes: u64) -> RuntimeRead {
        self.0.borrow_mut().runtime_reads += 1;
        match &self.0.borrow().runtime {
            Some(v) => RuntimeRead::Valid(v.clone()),
            None => RuntimeRead::Missing,
        }
    }

    fn remove_runtime(&mut self, _path: &Path) -> io::Result<()> {
        self.record(Call::RemoveRuntime);
        self.0.borrow_mut().runtime = None;
        Ok(())
    }

    fn prepare_spawn(&mut self, spec: SpawnSpec) -> Result<Prepared, SpawnError> {
        let version = spec
            .program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.0.borrow_mut().prepared.push(version);
        Ok(Prepared::unmade(spec))
    }

    fn spawn(
        &mut self,
        prepared: Prepared,
        _cgroup: Option<std::os::fd::RawFd>,
    ) -> Result<Spawned, SpawnError> {
        let spec = prepared.spec();
        let version = spec
            .program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if self.0.borrow().unspawnable.contains(&version) {
            return Err(SpawnError {
                program: spec.program.to_path_buf(),
                source: io::Error::from_raw_os_error(libc::ENOEXEC),
            });
        }
        let pid = {
            let mut w = self.0.borrow_mut();
            w.next_pid += 1;
            w.next_pid
        };
        self.record(Call::Spawn { pid, version });
        // The output pipes: a socket pair each, whose other end closes at once (no process).
        let (stdout, _) = UnixStream::pair().map_err(|source| SpawnError {
            program: spec.program.to_path_buf(),
            source,
        })?;
        let (stderr, _) = UnixStream::pair().map_err(|source| SpawnError {
            program: spec.program.to_path_buf(),
            source,
        })?;
        Ok(Spawned {
            pid: Pid::from_raw(pid),
            pidfd: None,
            stdout: OwnedFd::from(stdout),
            stderr: OwnedFd::from(stderr),
        })
    }

    fn give_to_user(
        &mut self,
        _run_as: Option<&crate::config::RunAs>,
        _paths: &super::credentials::PluginPaths<'_>,
    ) -> io::Result<()> {
        Ok(())
    }

    fn let_new_instance_run(&mut self) {
        self.record(Call::Yield);
    }

    fn let_exit_run_elsewhere(&mut self, pid: Pid) {
        self.record(Call::ExitElsewhere(pid.as_raw()));
    }

    fn signal_group(&mut self, pgid: Pid, sig: libc::c_int) -> io::Result<()> {
        self.record(Call::SignalGroup {
            pgid: pgid.as_raw(),
            sig,
        });
        Ok(())
    }

    fn signal_process(
        &mut self,
        pid: Pid,
        _pidfd: Option<&OwnedFd>,
        sig: libc::c_int,
    ) -> io::Result<()> {
        self.record(Call::Signal {
            pid: pid.as_raw(),
            sig,
        });
        Ok(())
    }

    fn new_scope(&mut self, _id: &str) -> Result<NewScope, String> {
        Ok(NewScope::default())
    }

    fn abandon_scope(&mut self, _scope: NewScope) {}

    fn scope_started(&mut self, _seq: u64, _id: &str, _pid: Pid, _scope: NewScope) -> Scope {
        Scope::default()
    }

    fn leader_reaped(&mut self, _seq: u64) {}

    fn scope_ended(&mut self, _seq: u64, _scope: &Scope) {}

    fn members_alive(&mut self, _w: &Procs<'_>, _id: &str, inst: &Instance) -> bool {
        self.0.borrow().members_alive.contains(&inst.pid.as_raw())
    }

    fn kill_members(&mut self, _w: &Procs<'_>, id: &str, _inst: &Instance) {
        self.record(Call::KillMembers(id.to_string()));
    }

    fn signal_escapees(
        &mut self,
        _w: &Procs<'_>,
        id: &str,
        _inst: &Instance,
        _sigs: &[libc::c_int],
    ) {
        self.record(Call::SignalEscapees(id.to_string()));
    }

    fn usage(&self, _w: &Procs<'_>, _p: &Plugin) -> Usage {
        Usage::default()
    }

    fn kill_strays(&mut self, _w: &Procs<'_>) {}

    fn prepare_containment(&mut self) {}

    fn flush_record(&mut self, _plugins: &mut BTreeMap<String, Plugin>) {}

    fn remove_emptied_cgroups(&mut self) {}

    fn spawn_hook(
        &mut self,
        _argv: &[String],
        kind: HookKind,
        hook: &HookContext<'_>,
    ) -> Result<HookRun, HookError> {
        self.record(Call::Hook(kind.as_str()));
        let pid = {
            let mut w = self.0.borrow_mut();
            w.next_pid += 1;
            w.next_pid
        };
        Ok(HookRun {
            pid: Pid::from_raw(pid),
            kind,
            plugin: hook.plugin.to_string(),
            started: self.now(),
        })
    }

    fn kill_hook(&mut self, run: &HookRun) {
        self.record(Call::KillHook(run.pid.as_raw()));
    }
}
