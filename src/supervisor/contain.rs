//! Containment: which processes belong to a plugin instance, and making sure none of them
//! outlives its stop, whatever it does to its process group or session (`setsid`, double fork).
//!
//! With a delegated cgroup v2 subtree (`cgroup.rs`) each instance runs in its own cgroup, which
//! no process can leave without write access to the cgroup tree: its members are its cgroup's
//! processes, and a stop ends with `cgroup.kill`.
//!
//! Without one, the daemon uses what it has. It is a child subreaper, so every process a plugin
//! starts stays a descendant of the daemon for as long as the daemon lives: whatever is orphaned
//! comes back to the daemon as a direct child. An instance's members are then its leader's
//! subtree, plus the subtrees of the orphans it left: an orphan still in the leader's process
//! group or session belongs to it (those numbers cannot be reused while in use), otherwise its
//! `HOTRELOAD_STATE_FILE` names the plugin (and its `HOTRELOAD_VERSION` or start time the
//! instance, when a `start-stop` reload runs two). What cannot be attributed (an orphan that
//! replaced its environment and left the group and session) is stopped with the daemon.
//! Attribution reads the supervisor's index of live instances (`host::Live`: plugin, leader,
//! version, start time, by seq), not its plugin table, so an instance is stopped and killed
//! while only its own plugin is lent out.
//!
//! The instance record (`record.rs`) lets the next daemon stop what a killed one left behind
//! (`stop_leftovers`), before it starts anything.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::protocol::PluginInfo;
use nix::unistd::Pid;

use super::cgroup::{self, Cgroups};
use super::host::{Live, Procs};
use super::plugin::{Instance, Plugin, Slot};
use super::procs::{self, Tree};
use super::record::{self, Entry, Record};
use super::{Supervisor, spawn};

/// How long the daemon waits at start for the processes a dead daemon left to be gone.
const LEFTOVER_WAIT: Duration = Duration::from_secs(5);
/// SIGKILL rounds per kill: a process may fork between our look and our signal.
const KILL_ROUNDS: usize = 4;

/// The daemon's means of containment and its instance record.
#[derive(Debug)]
pub struct Containment {
    cgroups: Option<Cgroups>,
    record: Record,
    runtime_dir: PathBuf,
    /// `<state_dir>/plugins`: `HOTRELOAD_STATE_FILE` of our plugins is `<this>/<id>/state.json`.
    plugins_state: PathBuf,
    daemon_pid: i32,
    next_cgroup: u64,
    /// Instance cgroups killed but not yet empty: removed once they are.
    doomed: Vec<PathBuf>,
    /// Instances started this turn whose leader's start time is still to be read: (id, seq).
    unstamped: Vec<(String, u64)>,
}

/// Where one instance lives.
#[derive(Debug, Default)]
pub struct Scope {
    pub cgroup: Option<PathBuf>,
    /// The leader's start time (`/proc` stat field 22).
    pub start_ticks: u64,
}

/// A scope being prepared for a spawn: the cgroup, and its directory opened for the child to
/// be created in.
#[derive(Debug, Default)]
pub struct NewScope {
    cgroup: Option<PathBuf>,
    dir: Option<OwnedFd>,
}

impl NewScope {
    pub fn dir_fd(&self) -> Option<RawFd> {
        self.dir.as_ref().map(AsRawFd::as_raw_fd)
    }
}

impl Containment {
    pub fn new(runtime_dir: &Path, plugins_state: &Path) -> Containment {
        let me = crate::sys::process::pid();
        let start = procs::stat(me).map_or(0, |s| s.start_ticks);
        Containment {
            cgroups: None,
            record: Record::new(runtime_dir, me, start),
            runtime_dir: runtime_dir.to_path_buf(),
            plugins_state: plugins_state.to_path_buf(),
            daemon_pid: me,
            next_cgroup: 0,
            doomed: Vec::new(),
            unstamped: Vec::new(),
        }
    }

    /// At daemon start, before any plugin starts: find a delegated cgroup, stop what a killed
    /// predecessor left behind, and write a fresh record.
    pub fn prepare(&mut self) {
        let mut cgroups = match Cgroups::detect() {
            Ok(c) => Some(c),
            Err(why) => {
                log::info!(
                    "containment without cgroups ({why}): plugins are tracked through their \
                     process groups, the daemon's role as child subreaper and /proc"
                );
                None
            }
        };
        stop_leftovers(
            &self.runtime_dir,
            &self.plugins_state,
            cgroups.as_ref(),
            self.daemon_pid,
        );
        if let Some(c) = cgroups.as_mut() {
            match c.setup() {
                Ok(()) => {
                    c.remove_leftovers();
                    log::info!(
                        "each plugin instance runs in its own cgroup below {}",
                        c.own().display()
                    );
                }
                Err(e) => {
                    log::warn!(
                        "cannot use the delegated cgroup {} ({e}); falling back to process \
                         groups and /proc",
                        c.own().display()
                    );
                    cgroups = None;
                }
            }
        }
        self.cgroups = cgroups;
        self.record.save();
    }

    /// A cgroup for the next instance of `id`, when the daemon has cgroups.
    pub fn new_scope(&mut self, id: &str) -> Result<NewScope, String> {
        let Some(c) = &self.cgroups else {
            return Ok(NewScope::default());
        };
        self.next_cgroup += 1;
        let started = Instant::now();
        let dir = c
            .create(id, self.next_cgroup)
            .map_err(|e| format!("cannot create a cgroup for the plugin: {e}"))?;
        let fd = match cgroup::open_dir(&dir) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = cgroup::remove(&dir);
                return Err(format!("cannot open the plugin's cgroup: {e}"));
            }
        };
        log::debug!(
            "[{id}] cgroup {} ready in {} us",
            dir.display(),
            started.elapsed().as_micros()
        );
        Ok(NewScope {
            cgroup: Some(dir),
            dir: Some(fd),
        })
    }

    /// The spawn failed: the cgroup goes.
    pub fn abandon(&mut self, scope: NewScope) {
        if let Some(dir) = scope.cgroup {
            let _ = cgroup::remove(&dir);
        }
    }

    /// Instance `seq` of `id` started as `pid`: record it (its start time follows at the end of
    /// the turn, see `flush_record`).
    pub fn started(&mut self, seq: u64, id: &str, pid: Pid, scope: NewScope) -> Scope {
        let start_ticks = 0;
        self.unstamped.push((id.to_string(), seq));
        self.record.insert(
            seq,
            Entry {
                plugin: id.to_string(),
                pid: pid.as_raw(),
                start_ticks,
                reaped: false,
                cgroup: scope.cgroup.clone(),
            },
        );
        Scope {
            cgroup: scope.cgroup,
            start_ticks,
        }
    }

    /// The leader was reaped while other processes of the instance remain.
    pub fn leader_reaped(&mut self, seq: u64) {
        self.record.mark_reaped(seq);
    }

    /// The instance is over: forget it, remove its cgroup (later, if still in use).
    pub fn ended(&mut self, seq: u64, scope: &Scope) {
        self.record.remove(seq);
        if let Some(dir) = &scope.cgroup {
            if cgroup::populated(dir) || cgroup::remove(dir).is_err() {
                self.doomed.push(dir.clone());
            }
        }
    }

    /// Remove killed instance cgroups that have emptied since.
    pub fn remove_emptied(&mut self) {
        self.doomed
            .retain(|dir| cgroup::populated(dir) || cgroup::remove(dir).is_err());
    }

    /// A clean stop: no record is left for the next daemon.
    pub fn discard_record(&mut self) {
        self.remove_emptied();
        for dir in &self.doomed {
            log::warn!("cgroup {} is still in use at exit", dir.display());
        }
        self.record.discard();
    }

    pub fn memory_bytes(&self, scope: &Scope) -> Option<u64> {
        self.cgroups.as_ref()?.memory_bytes(scope.cgroup.as_ref()?)
    }

    pub fn cpu_usage_ms(&self, scope: &Scope) -> Option<u64> {
        self.cgroups.as_ref()?.cpu_usage_ms(scope.cgroup.as_ref()?)
    }
}

impl Containment {
    /// Every process of `inst` (zombies included).
    pub(super) fn members(&self, w: &Procs<'_>, inst: &Instance) -> Vec<i32> {
        if let Some(dir) = &inst.scope.cgroup {
            return cgroup::procs(dir);
        }
        let tree = Tree::new();
        let mut roots = Vec::new();
        if !inst.leader.is_reaped() {
            roots.push(inst.pid.as_raw());
        }
        for orphan in self.orphans(w, &tree) {
            if self.owner_of_orphan(w, orphan) == Some(inst.seq) {
                roots.push(orphan);
            }
        }
        tree.subtree(&roots)
    }

    /// The daemon's children that are neither a plugin leader nor a hook: orphans of plugins.
    fn orphans(&self, w: &Procs<'_>, tree: &Tree) -> Vec<i32> {
        let me = self.daemon_pid;
        procs::own_children(me)
            .unwrap_or_else(|| tree.children(me))
            .into_iter()
            .filter(|&pid| {
                let pid = Pid::from_raw(pid);
                !w.pids.contains_key(&pid) && !w.hooks.contains_key(&pid)
            })
            .collect()
    }

    /// Which instance (by seq) an orphan belongs to (see the module documentation).
    fn owner_of_orphan(&self, w: &Procs<'_>, pid: i32) -> Option<u64> {
        let stat = procs::stat(pid)?;
        // Leader pids of live instances differ, but a reaped leader's number may have been
        // given to another plugin's leader once its group emptied: the first plugin by id, its
        // current (newer) instance first, as when the plugin table was walked.
        let by_group = w
            .live
            .iter()
            .filter(|(_, l)| stat.pgid == l.leader || stat.sid == l.leader)
            .min_by(|(a_seq, a), (b_seq, b)| a.plugin.cmp(&b.plugin).then(b_seq.cmp(a_seq)))
            .map(|(&seq, _)| seq);
        if by_group.is_some() {
            return by_group;
        }
        let file = procs::environ_var(pid, "HOTRELOAD_STATE_FILE")?;
        let id = procs::plugin_of(&file, &self.plugins_state)?;
        instance_of(w, &id, pid, stat.start_ticks)
    }

    /// Send `sigs` to every process of the instance outside its leader's process group (the
    /// group gets its signals with one `kill(-pgid)`; nobody should get one twice).
    pub(super) fn signal_escapees(
        &self,
        w: &Procs<'_>,
        id: &str,
        inst: &Instance,
        sigs: &[libc::c_int],
    ) {
        let leader = inst.pid.as_raw();
        let mut sent = Vec::new();
        for pid in self.members(w, inst) {
            // The leader leads its group (and session) for life: the group signal reached it.
            if pid != leader && procs::stat(pid).is_some_and(|s| s.pgid != leader && !s.exited()) {
                for &sig in sigs {
                    procs::signal(pid, sig);
                }
                sent.push(pid);
            }
        }
        if !sent.is_empty() {
            log::debug!("[{id}] stop signal to processes outside its group: {sent:?}");
        }
    }

    /// SIGKILL to every process of the instance: `cgroup.kill`, or a few rounds over its
    /// members (a process may fork between the look and the kill).
    pub(super) fn kill_members(&self, w: &Procs<'_>, inst: &Instance) {
        let _ = spawn::signal_group(inst.pid, libc::SIGKILL);
        if let Some(dir) = &inst.scope.cgroup {
            cgroup::kill(dir);
            return;
        }
        let mut killed: Vec<i32> = Vec::new();
        for _ in 0..KILL_ROUNDS {
            let fresh: Vec<i32> = self
                .members(w, inst)
                .into_iter()
                .filter(|pid| !killed.contains(pid))
                .filter(|&pid| procs::stat(pid).is_some_and(|s| !s.exited()))
                .collect();
            if fresh.is_empty() {
                break;
            }
            for &pid in &fresh {
                procs::signal(pid, libc::SIGKILL);
            }
            killed.extend(fresh);
        }
    }

    /// True while any process of the instance (its leader aside) lives.
    pub(super) fn members_alive(&self, w: &Procs<'_>, inst: &Instance) -> bool {
        if let Some(dir) = &inst.scope.cgroup {
            return cgroup::populated(dir);
        }
        spawn::group_alive(inst.pid)
            || self
                .members(w, inst)
                .into_iter()
                .any(|pid| procs::stat(pid).is_some_and(|s| !s.exited()))
    }

    /// `tasks`, `memory_bytes`, `cpu_usage_ms` for `list` and `plugin`.
    pub fn usage(&self, w: &Procs<'_>, p: &Plugin) -> Usage {
        let mut tasks = 0usize;
        let mut memory: Option<u64> = None;
        let mut cpu: Option<u64> = None;
        for slot in [Slot::Current, Slot::Retiring] {
            let Some(inst) = p.slot(slot) else { continue };
            tasks += self
                .members(w, inst)
                .into_iter()
                .filter(|&pid| procs::stat(pid).is_some_and(|s| !s.exited()))
                .count();
            if let Some(m) = self.memory_bytes(&inst.scope) {
                memory = Some(memory.unwrap_or(0) + m);
            }
            if let Some(c) = self.cpu_usage_ms(&inst.scope) {
                cpu = Some(cpu.unwrap_or(0) + c);
            }
        }
        Usage {
            tasks,
            memory_bytes: memory,
            cpu_usage_ms: cpu,
        }
    }
}

/// What `list` and `plugin` show of a plugin's processes (SPEC §4): how many there are now and,
/// where the controllers are delegated, their memory and CPU time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub tasks: usize,
    pub memory_bytes: Option<u64>,
    pub cpu_usage_ms: Option<u64>,
}

impl Supervisor {
    /// `tasks`, `memory_bytes`, `cpu_usage_ms` for `list` and `plugin`.
    pub fn usage(&self, p: &Plugin) -> Usage {
        self.core.host.usage(&self.core.procs(), p)
    }

    /// The `list` entry of a plugin with its process figures.
    pub fn list_entry(&self, p: &Plugin) -> PluginInfo {
        let Usage {
            tasks,
            memory_bytes,
            cpu_usage_ms,
        } = self.usage(p);
        PluginInfo {
            tasks,
            memory_bytes,
            cpu_usage_ms,
            ..p.list_entry()
        }
    }
}

impl Containment {
    /// After the last plugin stopped: whatever the daemon still has below it that no plugin
    /// claimed (an orphan that replaced its environment and left its group and session) is
    /// killed, so that the daemon's stop leaves nothing behind. Hooks are left to their timeout.
    pub fn kill_strays(&mut self, w: &Procs<'_>) {
        let tree = Tree::new();
        let orphans = self.orphans(w, &tree);
        let strays: Vec<i32> = tree
            .subtree(&orphans)
            .into_iter()
            .filter(|&pid| procs::stat(pid).is_some_and(|s| !s.exited()))
            .collect();
        if !strays.is_empty() {
            log::warn!(
                "killing processes no plugin claims, left below the daemon: {}",
                join_pids(&strays)
            );
            for pid in strays {
                procs::signal(pid, libc::SIGKILL);
            }
        }
        self.discard_record();
    }

    /// Write the instance record if this turn changed it, with the start times of the leaders
    /// this turn started.
    pub(super) fn flush_record(&mut self, plugins: &mut BTreeMap<String, Plugin>) {
        for (id, seq) in std::mem::take(&mut self.unstamped) {
            let Some(p) = plugins.get_mut(&id) else {
                continue;
            };
            let Some(inst) = p.slot_of(seq).and_then(|slot| p.slot_mut(slot)) else {
                continue;
            };
            if let Some(stat) = procs::stat(inst.pid.as_raw()).filter(|_| !inst.leader.is_reaped())
            {
                inst.scope.start_ticks = stat.start_ticks;
                self.record.set_start_ticks(seq, stat.start_ticks);
            }
        }
        self.record.flush();
    }
}

/// The instance (by seq) of plugin `id` an orphan started at `start_ticks` belongs to: the only
/// one; or, during a `start-stop` reload, the one whose version it was given, else the latest
/// one started before it, else the retiring (older) one.
fn instance_of(w: &Procs<'_>, id: &str, pid: i32, start_ticks: u64) -> Option<u64> {
    let present: Vec<(u64, &Live)> = w
        .live
        .iter()
        .filter(|(_, l)| l.plugin == id)
        .map(|(&seq, l)| (seq, l))
        .collect();
    match present.as_slice() {
        [] => None,
        [(seq, _)] => Some(*seq),
        _ => {
            if let Some(version) = procs::environ_var(pid, "HOTRELOAD_VERSION") {
                let same: Vec<u64> = present
                    .iter()
                    .filter(|(_, l)| l.version.as_bytes() == version.as_slice())
                    .map(|(seq, _)| *seq)
                    .collect();
                if let [only] = same.as_slice() {
                    return Some(*only);
                }
            }
            // Both slots taken: the retiring instance is the older one (lower seq).
            present
                .iter()
                .filter(|(_, l)| l.start_ticks <= start_ticks)
                .max_by_key(|(_, l)| l.start_ticks)
                .map(|(seq, _)| *seq)
                .or_else(|| present.iter().map(|(seq, _)| *seq).min())
        }
    }
}

/// At start, before anything runs: stop every process a daemon that did not stop cleanly left
/// behind (the cgroups below ours; the leaders in its record, the groups and sessions of its
/// unreaped leaders, and every process whose `HOTRELOAD_STATE_FILE` is under our state dir),
/// and wait (bounded) until they are gone.
fn stop_leftovers(runtime_dir: &Path, plugins_state: &Path, cgroups: Option<&Cgroups>, me: i32) {
    let mut killed: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    if let Some(c) = cgroups {
        for (name, pids) in c.kill_leftovers() {
            let id = Cgroups::plugin_of(&name).unwrap_or(&name).to_string();
            killed.entry(id).or_default().extend(pids);
        }
    }
    let previous = match record::read(runtime_dir) {
        Ok(r) => r,
        Err(e) => {
            log::warn!("{e}; looking for leftover plugin processes by their environment");
            None
        }
    };
    let found_record = previous.is_some();
    // Pids, start times and cgroups of another boot name nothing of ours.
    let previous = previous.filter(|p| !p.boot_id.is_empty() && p.boot_id == record::boot_id());
    if let Some(prev) = &previous {
        if prev.daemon_pid != me && procs::is_running(prev.daemon_pid, prev.daemon_start_ticks) {
            log::warn!(
                "another hotreloadd (pid {}) still uses runtime dir {}: not touching its plugins",
                prev.daemon_pid,
                runtime_dir.display()
            );
            return;
        }
        for entry in prev.instances.values() {
            if let Some(dir) = &entry.cgroup {
                let pids = cgroup::procs(dir);
                if !pids.is_empty() {
                    cgroup::kill(dir);
                    killed.entry(entry.plugin.clone()).or_default().extend(pids);
                }
            }
        }
    }
    if found_record {
        for (pid, id) in leftover_processes(previous.as_ref(), plugins_state, me) {
            if procs::signal(pid, libc::SIGKILL) {
                killed.entry(id).or_default().push(pid);
            }
        }
    }
    if killed.is_empty() {
        return;
    }
    let who = previous
        .as_ref()
        .map_or(String::new(), |p| format!(" (pid {})", p.daemon_pid));
    for (id, pids) in &mut killed {
        pids.sort_unstable();
        pids.dedup();
        log::warn!(
            "[{id}] killed processes left behind by a previous hotreloadd{who} that did not stop \
             cleanly: {}",
            join_pids(pids)
        );
    }
    let all: Vec<i32> = killed.values().flatten().copied().collect();
    let deadline = Instant::now() + LEFTOVER_WAIT;
    loop {
        let alive: Vec<i32> = all
            .iter()
            .copied()
            .filter(|&pid| procs::stat(pid).is_some_and(|s| !s.exited()))
            .collect();
        if alive.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            log::warn!(
                "processes left by a previous hotreloadd are still there after SIGKILL: {}",
                join_pids(&alive)
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The processes (and their plugin ids) a dead daemon with this record left behind.
fn leftover_processes(
    previous: Option<&record::Contents>,
    plugins_state: &Path,
    me: i32,
) -> Vec<(i32, String)> {
    let mut out: Vec<(i32, String)> = Vec::new();
    for stat in procs::all_stats() {
        if stat.pid == me || stat.pid <= 1 || stat.exited() {
            continue;
        }
        let by_record = previous.and_then(|prev| {
            prev.instances.values().find(|e| {
                let leader = e.pid == stat.pid && e.start_ticks == stat.start_ticks;
                // The group and session numbers of an unreaped leader were in use when the
                // record was written, so a process in them that started before is that
                // plugin's, never a stranger that got a recycled number.
                let group = !e.reaped
                    && (stat.pgid == e.pid || stat.sid == e.pid)
                    && stat.start_ticks < prev.written_ticks;
                leader || group
            })
        });
        if let Some(e) = by_record {
            out.push((stat.pid, e.plugin.clone()));
            continue;
        }
        if let Some(file) = procs::environ_var(stat.pid, "HOTRELOAD_STATE_FILE") {
            if let Some(id) = procs::plugin_of(&file, plugins_state) {
                out.push((stat.pid, id));
            }
        }
    }
    out
}

fn join_pids(pids: &[i32]) -> String {
    pids.iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
