//! Starting plugin processes: the only place in the supervisor that forks, and the only
//! `unsafe` outside `sys` (the code between fork and exec cannot go through `sys`' allocating
//! wrappers). Raw system calls are `sys`'; the child reset is `sys::child`, shared with hooks.
//!
//! A start is on every reload's critical path, so it is posix_spawn-shaped: `clone(CLONE_VM |
//! CLONE_VFORK)` (no copy of the daemon), every signal blocked across it, the child running only
//! prepared, allocation-free code, and the exec's outcome known when `clone` returns
//! ([`spawn_vfork`]). What the start needs that does not depend on its moment (the exec plan,
//! the child's stdio and stack) can be made ahead ([`Prepared`]): a stop-start reload makes it
//! while the old instance exits, so that only the clone follows the reap. Into a cgroup it is `clone3(CLONE_INTO_CGROUP)`, a fork-like clone (glibc has
//! no clone3 wrapper that runs a function on a new stack), with the same child code.
//!
//! Every plugin starts from a clean slate whatever state the daemon was started in (under `nohup`,
//! from a shell with signals blocked, with stray descriptors inherited from its parent):
//! its own session and process group (so one `kill(-pgid)` reaches its whole tree), default
//! signal dispositions and an empty mask, `PR_SET_PDEATHSIG` so it dies with the daemon, stdin on
//! `/dev/null`, stdout/stderr on pipes the daemon reads, and no other descriptor of ours.
//!
//! Reaping is *not* done here: the daemon owns `waitpid(-1)` exclusively (see `reap.rs`), so the
//! `std::process::Child` handle is dropped right away and never waited on.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use nix::unistd::Pid;

use crate::sys::{self, child::ChildReset, creds::ChildCreds};

/// What to run and how.
#[derive(Debug)]
pub struct SpawnSpec {
    pub program: PathBuf,
    /// argv[0] the plugin sees: its name in the plugin dir, not the snapshot's hash name.
    pub arg0: String,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    pub env: BTreeMap<OsString, OsString>,
    /// Descriptors to hand over as fd 3, 4, ... (systemd's `LISTEN_FDS` convention).
    pub pass_fds: Vec<RawFd>,
    /// Variables whose value must be the child's own pid (`LISTEN_PID`, `WATCHDOG_PID`): only the
    /// child knows it, so they are filled in between fork and exec.
    pub pid_vars: Vec<&'static str>,
    /// The directory of the instance's cgroup (containment): the child is created in it
    /// (`clone3` with `CLONE_INTO_CGROUP`), so not even its first fork can start outside.
    pub cgroup: Option<RawFd>,
    /// The plugin's `user`/`group`, switched to in the child (`sys::creds`); `None`: the
    /// daemon's.
    pub creds: Option<ChildCreds>,
}

/// A start made ready before its moment: the spec, its exec plan (argv and environment as C
/// strings) and the child's stdio (/dev/null, two pipes). A stop-start reload prepares it while
/// the old instance exits (`Core::prepare_next_start`), so that the reap is followed by the
/// clone alone instead of ~50 µs of allocations and descriptor set-up.
pub struct Prepared {
    spec: SpawnSpec,
    /// `None` until made (a host that starts nothing real makes none).
    setup: Option<ChildSetup>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("program", &self.spec.program)
            .field("made", &self.setup.is_some())
            .finish()
    }
}

impl Prepared {
    /// `spec` with nothing made yet: [`spawn_prepared`] makes it all at the start.
    pub fn unmade(spec: SpawnSpec) -> Prepared {
        Prepared { spec, setup: None }
    }

    pub fn spec(&self) -> &SpawnSpec {
        &self.spec
    }
}

/// Make everything of `spec`'s start that does not depend on its moment (see [`Prepared`]).
pub fn prepare(spec: SpawnSpec) -> Result<Prepared, SpawnError> {
    match ChildSetup::new(&spec) {
        Ok(setup) => Ok(Prepared {
            spec,
            setup: Some(setup),
        }),
        Err(source) => Err(SpawnError {
            program: spec.program,
            source,
        }),
    }
}

/// Start what `prepared` describes, in the cgroup whose directory is `cgroup` if any.
pub fn spawn_prepared(prepared: Prepared, cgroup: Option<RawFd>) -> Result<Spawned, SpawnError> {
    let Prepared { mut spec, setup } = prepared;
    spec.cgroup = cgroup;
    spawn_with(&spec, setup)
}

/// A freshly started plugin process.
#[derive(Debug)]
pub struct Spawned {
    pub pid: Pid,
    /// A pidfd for the child where the kernel has one (Linux 5.3+): signals sent through it can
    /// never hit a recycled pid.
    pub pidfd: Option<OwnedFd>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

#[derive(Debug)]
pub struct SpawnError {
    pub program: PathBuf,
    pub source: io::Error,
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot execute {}: {}",
            self.program.display(),
            self.source
        )
    }
}

impl std::error::Error for SpawnError {}

/// The daemon's pid, captured in the parent so the child can check `getppid()` after arming
/// PDEATHSIG (the parent may already have died between fork and prctl).
fn parent_pid() -> libc::pid_t {
    sys::process::pid()
}

pub fn spawn(spec: &SpawnSpec) -> Result<Spawned, SpawnError> {
    spawn_with(spec, None)
}

/// [`spawn`] with the stdio and exec plan made ahead, when they were.
fn spawn_with(spec: &SpawnSpec, setup: Option<ChildSetup>) -> Result<Spawned, SpawnError> {
    // Read in the parent: the child only looks the set up (`prepare_child`).
    sys::child::non_default_signals();
    let fail = |source: io::Error| SpawnError {
        program: spec.program.to_path_buf(),
        source,
    };
    let Some(dir) = spec.cgroup else {
        return spawn_vfork(spec, setup).map_err(fail);
    };
    if !CLONE3_REFUSED.load(std::sync::atomic::Ordering::Relaxed) {
        match spawn_into_cgroup(spec, setup, dir).map_err(fail)? {
            Some(spawned) => return Ok(spawned),
            None => {
                CLONE3_REFUSED.store(true, std::sync::atomic::Ordering::Relaxed);
                log::info!(
                    "clone3 is not allowed here (a seccomp filter such as systemd's \
                     RestrictNamespaces=): plugins join their cgroup after fork instead, \
                     which costs each start a cgroup migration"
                );
            }
        }
    }
    spawn_joining_cgroup(spec, dir).map_err(fail)
}

/// Stack of the `CLONE_VM` child: it runs only the short, non-recursive code of
/// `child_after_clone` (the kernel's execve needs none of it).
const CHILD_STACK: usize = 64 * 1024;

/// What the `CLONE_VM | CLONE_VFORK` child reads (everything prepared by the parent: the child
/// must not allocate) and the one thing it writes: why it could not exec.
struct VforkChild<'a> {
    stdio: [RawFd; 3],
    cwd: &'a CString,
    creds: Option<&'a ChildCreds>,
    daemon: libc::pid_t,
    nofile: u64,
    plan: &'a mut ExecPlan,
    /// 0 while the child runs and after a successful exec; the errno of the failed step when it
    /// gave up (written just before its `_exit`, read by the parent once `clone` returns).
    error: i32,
}

/// The plugin start without a cgroup (and the model of the others): posix_spawn-style
/// `clone(CLONE_VM | CLONE_VFORK)`. The daemon is suspended while the child sets itself up and
/// execs (the two would otherwise compete for the same cores anyway), and when `clone` returns
/// the outcome is known: exec'd, or an errno the child left in [`VforkChild::error`]. A full
/// fork would copy the daemon's page tables and make it take copy-on-write faults afterwards,
/// and std's `Command` then blocks on a status pipe until exec all the same.
fn spawn_vfork(spec: &SpawnSpec, setup: Option<ChildSetup>) -> io::Result<Spawned> {
    let mut setup = made_or_new(spec, setup)?;
    let mut stack = std::mem::take(&mut setup.stack);
    let mut child = VforkChild {
        stdio: setup.stdio(),
        cwd: &setup.cwd,
        creds: spec.creds.as_ref(),
        daemon: parent_pid(),
        nofile: INHERITED_NOFILE.load(std::sync::atomic::Ordering::Relaxed),
        plan: &mut setup.plan,
        error: 0,
    };
    // Every signal blocked across the clone: the child starts with this mask, so no handler of
    // the daemon's (signal-hook's, which would write into our memory and our self-pipe) can run
    // in it before `ChildReset` has set every disposition back to the default and unblocked.
    let mask = sys::process::block_all_signals();
    // SAFETY: `vfork_child` keeps the clone_vfork contract (see there); `child` and `stack`
    // outlive the call, which returns only once the child exec'd or exited.
    let cloned = unsafe {
        sys::process::clone_vfork(
            vfork_child,
            (&mut child as *mut VforkChild<'_>).cast(),
            &mut stack,
        )
    };
    sys::process::restore_signal_mask(&mask);
    let (pid, pidfd) = cloned?;
    // SAFETY: the child is gone from our memory (exec'd or exited): nothing writes it any more.
    let error = unsafe { std::ptr::read_volatile(&child.error) };
    let (out_r, err_r) = setup.into_readers();
    let pid = Pid::from_raw(pid);
    if error != 0 {
        // It exited with 127 before exec: reap it here, it never was a plugin.
        let _ = nix::sys::wait::waitpid(pid, None);
        return Err(io::Error::from_raw_os_error(error));
    }
    Ok(Spawned {
        pid,
        pidfd: pidfd.or_else(|| pidfd_open(pid)),
        stdout: out_r,
        stderr: err_r,
    })
}

/// What a clone-based start prepares in the daemon for its child: the exec plan, the working
/// directory as a C string, and the child's stdio: /dev/null in, the write ends of the two
/// output pipes out (all above fd 2, so that none of the child's `dup2`s clobbers another);
/// and the stack of a `CLONE_VM` child.
struct ChildSetup {
    plan: ExecPlan,
    stack: Vec<u8>,
    cwd: CString,
    devnull: OwnedFd,
    /// (read end, write end) of stdout's and stderr's pipes.
    out: (OwnedFd, OwnedFd),
    err: (OwnedFd, OwnedFd),
}

/// The set-up made ahead, or one made now.
fn made_or_new(spec: &SpawnSpec, made: Option<ChildSetup>) -> io::Result<ChildSetup> {
    match made {
        Some(setup) => Ok(setup),
        None => ChildSetup::new(spec),
    }
}

impl ChildSetup {
    fn new(spec: &SpawnSpec) -> io::Result<ChildSetup> {
        let plan = ExecPlan::new(spec)?;
        let cwd = CString::new(spec.cwd.as_os_str().as_bytes())
            .map_err(|_| io::Error::other("NUL byte in the working directory"))?;
        let devnull = high_fd(std::fs::File::open("/dev/null")?.into())?;
        let (out_r, out_w) = sys::fd::pipe()?;
        let (err_r, err_w) = sys::fd::pipe()?;
        // The daemon's ends only (the child's stay blocking): done here, not after the clone,
        // where it would delay the child (the daemon preempts it until its turn ends).
        set_nonblocking(&out_r)?;
        set_nonblocking(&err_r)?;
        Ok(ChildSetup {
            plan,
            stack: vec![0u8; CHILD_STACK],
            cwd,
            devnull,
            out: (out_r, high_fd(out_w)?),
            err: (err_r, high_fd(err_w)?),
        })
    }

    /// The child's fds 0, 1 and 2.
    fn stdio(&self) -> [RawFd; 3] {
        [
            self.devnull.as_raw_fd(),
            self.out.1.as_raw_fd(),
            self.err.1.as_raw_fd(),
        ]
    }

    /// Once the child has its copies: the daemon keeps the read ends and closes the rest, so
    /// that the pipes close when the plugin's last writer exits.
    fn into_readers(self) -> (OwnedFd, OwnedFd) {
        (self.out.0, self.err.0)
    }
}

/// The `CLONE_VM` child: set up, exec; on failure leave the errno and `_exit(127)`.
extern "C" fn vfork_child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `VforkChild`, alive and untouched while the parent is
    // suspended in clone; the calls below are the async-signal-safe ones of child_after_clone.
    unsafe {
        let child = &mut *arg.cast::<VforkChild<'_>>();
        let errno = child_after_clone(
            child.stdio,
            child.cwd,
            child.creds,
            child.daemon,
            child.nofile,
            child.plan,
        );
        std::ptr::write_volatile(&mut child.error, if errno == 0 { libc::EIO } else { errno });
        libc::_exit(127)
    }
}

/// The fallback where `clone3` is refused (seccomp): std's fork + exec, the child joining the
/// instance's cgroup by writing `cgroup.procs` (slow: a cgroup migration per start).
fn spawn_joining_cgroup(spec: &SpawnSpec, dir: RawFd) -> io::Result<Spawned> {
    let join = open_procs_at(dir)?;
    let mut cmd = Command::new(&spec.program);
    cmd.arg0(&spec.arg0)
        .args(&spec.args)
        .current_dir(&spec.cwd)
        .env_clear()
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let daemon = parent_pid();
    let inherited_nofile = INHERITED_NOFILE.load(std::sync::atomic::Ordering::Relaxed);
    let cgroup_procs = join.as_raw_fd();
    let mut plan = if spec.pass_fds.is_empty() && spec.pid_vars.is_empty() {
        None
    } else {
        Some(ExecPlan::new(spec)?)
    };
    let creds = spec.creds.clone();
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (write, setgroups, setresgid, setresuid, setsid, prctl, getppid, signal,
    // close_range, fcntl, dup2, execve) and writes into memory it owns; it allocates nothing and
    // touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            join_cgroup(cgroup_procs)?;
            switch_user(creds.as_ref())?;
            prepare_child(daemon, inherited_nofile)?;
            match plan.as_mut() {
                Some(plan) => Err(plan.exec_in_child()),
                None => Ok(()),
            }
        });
    }
    let mut child = cmd.spawn()?;
    drop(join);
    let pid = Pid::from_raw(child.id() as libc::pid_t);
    let stdout = child.stdout.take().map(OwnedFd::from);
    let stderr = child.stderr.take().map(OwnedFd::from);
    // The std handle is dropped without waiting: the reaper owns the exit status.
    drop(child);
    let (Some(stdout), Some(stderr)) = (stdout, stderr) else {
        return Err(io::Error::other("child pipes missing"));
    };
    set_nonblocking(&stdout)?;
    set_nonblocking(&stderr)?;
    Ok(Spawned {
        pid,
        pidfd: pidfd_open(pid),
        stdout,
        stderr,
    })
}

/// Everything needed to exec by hand in the child, prepared in the parent (allocation is not
/// allowed after fork): used when descriptors must be placed at fixed numbers or variables must
/// carry the child's pid. std then never reaches its own exec; it learns of success from its
/// close-on-exec status pipe as usual, and of failure from our error.
struct ExecPlan {
    path: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    env_bufs: Vec<Vec<u8>>,
    envp_ptrs: Vec<*const libc::c_char>,
    /// (index into env_bufs, offset where the pid's digits go)
    pid_slots: Vec<(usize, usize)>,
    pass_fds: Vec<RawFd>,
    /// Scratch space for the parked copies (allocated here: the child must not allocate).
    parked: Vec<libc::c_int>,
}

// SAFETY: the raw pointers point into buffers owned by the same struct; the plan is only used by
// the closure that owns it, in the forked child.
unsafe impl Send for ExecPlan {}
// SAFETY: as above; it is never shared between threads in practice.
unsafe impl Sync for ExecPlan {}

/// Room for a pid's decimal digits plus the terminating NUL.
const PID_ROOM: usize = 12;

impl ExecPlan {
    fn new(spec: &SpawnSpec) -> io::Result<ExecPlan> {
        let cstr = |b: &[u8]| {
            CString::new(b).map_err(|_| io::Error::other("NUL byte in argument or environment"))
        };
        let path = cstr(spec.program.as_os_str().as_bytes())?;
        let mut argv = vec![cstr(spec.arg0.as_bytes())?];
        for a in &spec.args {
            argv.push(cstr(a.as_bytes())?);
        }
        let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut env_bufs = Vec::new();
        let mut pid_slots = Vec::new();
        for (k, v) in &spec.env {
            if spec.pid_vars.iter().any(|p| k.as_bytes() == p.as_bytes()) {
                continue;
            }
            let mut buf = k.as_bytes().to_vec();
            buf.push(b'=');
            buf.extend_from_slice(v.as_bytes());
            if buf.contains(&0) {
                return Err(io::Error::other("NUL byte in environment"));
            }
            buf.push(0);
            env_bufs.push(buf);
        }
        for name in &spec.pid_vars {
            let mut buf = name.as_bytes().to_vec();
            buf.push(b'=');
            let offset = buf.len();
            buf.resize(offset + PID_ROOM, 0);
            pid_slots.push((env_bufs.len(), offset));
            env_bufs.push(buf);
        }
        let mut envp_ptrs: Vec<*const libc::c_char> =
            env_bufs.iter().map(|b| b.as_ptr().cast()).collect();
        envp_ptrs.push(std::ptr::null());
        Ok(ExecPlan {
            path,
            _argv: argv,
            argv_ptrs,
            env_bufs,
            envp_ptrs,
            pid_slots,
            pass_fds: spec.pass_fds.clone(),
            parked: vec![0; spec.pass_fds.len()],
        })
    }

    /// In the child: fill in the pid, move the descriptors to 3.., exec. Returns only on error.
    fn exec_in_child(&mut self) -> io::Error {
        if !self.pid_slots.is_empty() {
            // SAFETY: getpid cannot fail.
            let pid = unsafe { libc::getpid() };
            for &(index, offset) in &self.pid_slots {
                write_decimal(&mut self.env_bufs[index][offset..], pid);
            }
        }
        let n = self.pass_fds.len();
        let first_free = 3 + n as libc::c_int;
        // SAFETY: fcntl/dup2/close_range/execve on descriptors and buffers this process owns;
        // the pointer arrays are NUL-terminated and point into live buffers.
        unsafe {
            // Park every source above the target range first, so a source that already sits at a
            // target number cannot be clobbered by an earlier dup2.
            for (i, &fd) in self.pass_fds.iter().enumerate() {
                let tmp = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, first_free);
                if tmp < 0 {
                    return io::Error::last_os_error();
                }
                self.parked[i] = tmp;
            }
            for (i, &tmp) in self.parked.iter().enumerate() {
                // dup2 clears FD_CLOEXEC on the new descriptor: exactly what we want.
                if libc::dup2(tmp, 3 + i as libc::c_int) < 0 {
                    return io::Error::last_os_error();
                }
            }
            if n > 0 {
                // The common reset marked 3.. already; the parked copies came after it.
                sys::child::mark_inherited_fds_cloexec(first_free as libc::c_uint);
            }
            libc::execve(
                self.path.as_ptr(),
                self.argv_ptrs.as_ptr(),
                self.envp_ptrs.as_ptr(),
            );
        }
        io::Error::last_os_error()
    }
}

/// Async-signal-safe integer formatting into a NUL-padded slot.
fn write_decimal(slot: &mut [u8], value: libc::pid_t) {
    let mut digits = [0u8; PID_ROOM];
    let mut v = value.max(0) as u32;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 || len == digits.len() - 1 {
            break;
        }
    }
    for i in 0..len.min(slot.len() - 1) {
        slot[i] = digits[len - 1 - i];
    }
    slot[len.min(slot.len() - 1)] = 0;
}

/// `clone3` was refused once (seccomp): don't ask again.
static CLONE3_REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// For the cgroup cost measurement: take the join-after-fork path as if clone3 were refused.
#[cfg(test)]
pub fn refuse_clone3(refused: bool) {
    CLONE3_REFUSED.store(refused, std::sync::atomic::Ordering::Relaxed);
}

/// Start the plugin directly in the cgroup whose directory is `cgroup`: `clone3` with
/// `CLONE_INTO_CGROUP`. Moving a process into a cgroup after fork takes the kernel's cgroup
/// threadgroup lock for writing, which waits for an RCU grace period (milliseconds) when no
/// migration happened just before, i.e. at nearly every reload; creating it there costs
/// nothing extra. `None` when clone3 is refused (ENOSYS, EPERM: kernel < 5.7, or a seccomp
/// filter), so that the caller falls back.
fn spawn_into_cgroup(
    spec: &SpawnSpec,
    setup: Option<ChildSetup>,
    cgroup: RawFd,
) -> io::Result<Option<Spawned>> {
    let mut setup = made_or_new(spec, setup)?;
    let (status_r, status_w) = sys::fd::pipe()?;
    // Above fd 2 too: the child writes its errno there after its `dup2`s.
    let status_w = high_fd(status_w)?;
    let daemon = parent_pid();
    let nofile = INHERITED_NOFILE.load(std::sync::atomic::Ordering::Relaxed);
    // SAFETY: a fork-like clone: the child gets a copy of our memory. In the child, only
    // async-signal-safe calls follow (dup2, fcntl, chdir, the ones of prepare_child and
    // exec_in_child, write, _exit); it allocates nothing and never returns from the block below.
    let cloned = unsafe { sys::process::clone_into_cgroup(cgroup) };
    let pid = match cloned {
        Ok(pid) => pid,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => return Ok(None),
        Err(e) => return Err(e),
    };
    if pid == 0 {
        // SAFETY: see above; every descriptor used here is ours and open.
        unsafe {
            let errno = child_after_clone(
                setup.stdio(),
                &setup.cwd,
                spec.creds.as_ref(),
                daemon,
                nofile,
                &mut setup.plan,
            );
            let bytes = errno.to_ne_bytes();
            libc::write(status_w.as_raw_fd(), bytes.as_ptr().cast(), bytes.len());
            libc::_exit(127);
        }
    }
    let pid = Pid::from_raw(pid);
    let (out_r, err_r) = setup.into_readers();
    drop(status_w);
    // The status pipe closes at exec (success) or carries the child's errno (failure).
    let mut buf = [0u8; 4];
    let n = sys::fd::read_full(status_r.as_fd(), &mut buf);
    if n == 4 {
        let _ = nix::sys::wait::waitpid(pid, None);
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(buf)));
    }
    Ok(Some(Spawned {
        pid,
        pidfd: pidfd_open(pid),
        stdout: out_r,
        stderr: err_r,
    }))
}

/// The child's side of `spawn_into_cgroup`: returns only with the errno of what failed.
///
/// # Safety
/// Only in the child of a fork-like clone, before exec.
unsafe fn child_after_clone(
    stdio: [RawFd; 3],
    cwd: &CString,
    creds: Option<&ChildCreds>,
    daemon: libc::pid_t,
    nofile: u64,
    plan: &mut ExecPlan,
) -> i32 {
    let errno = || {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };
    // SAFETY: dup2 and chdir on our own descriptors and a NUL-terminated path; the sources
    // are all above 2, so no dup2 clobbers a later source.
    unsafe {
        for (target, source) in stdio.into_iter().enumerate() {
            if libc::dup2(source, target as libc::c_int) < 0 {
                return errno();
            }
        }
        if libc::chdir(cwd.as_ptr()) < 0 {
            return errno();
        }
    }
    if let Err(e) = switch_user(creds).and_then(|()| prepare_child(daemon, nofile)) {
        return e.raw_os_error().unwrap_or(libc::EIO);
    }
    plan.exec_in_child().raw_os_error().unwrap_or(libc::EIO)
}

/// `fd` moved above 2 (a daemon started with 0, 1 or 2 closed hands those numbers out), so the
/// child's dup2s onto 0..2 cannot clobber one another.
fn high_fd(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    sys::fd::dup_at_least(fd.as_fd(), 3)
}

/// `cgroup.procs` of the cgroup whose directory is `dir`, for the fallback join after fork.
fn open_procs_at(dir: RawFd) -> io::Result<OwnedFd> {
    sys::fd::open_at(dir, c"cgroup.procs", libc::O_WRONLY | libc::O_CLOEXEC)
}

/// In the child: move into the instance's cgroup ("0" is the writing process itself).
fn join_cgroup(procs: RawFd) -> io::Result<()> {
    // SAFETY: write(2) from a static buffer to a descriptor the parent opened for us.
    let n = unsafe { libc::write(procs, b"0".as_ptr().cast(), 1) };
    if n != 1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// In the child, after the working directory is set (as the daemon: a plugin dir the plugin's
/// user may not search still works) and *before* [`prepare_child`], whose parent-death signal a
/// credential change would clear: become the plugin's user. One separate step, so that it moves
/// with the rest onto any spawn path. Async-signal-safe (raw system calls only).
fn switch_user(creds: Option<&ChildCreds>) -> io::Result<()> {
    match creds {
        Some(creds) => creds.apply(),
        None => Ok(()),
    }
}

/// Runs in the child between fork and exec. Async-signal-safe calls only.
fn prepare_child(daemon: libc::pid_t, nofile_soft: u64) -> io::Result<()> {
    ChildReset {
        parent: daemon,
        new_session: true,
        nofile_soft,
        signals: sys::child::non_default_signals_read(),
    }
    .apply()
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    sys::fd::set_nonblocking(fd.as_fd())
}

/// `pidfd_open(2)`: None on kernels without it (the reaper's bookkeeping still keeps us from
/// signalling a recycled pid: a child's pid cannot be reused until we reap it).
fn pidfd_open(pid: Pid) -> Option<OwnedFd> {
    sys::process::pidfd_open(pid.as_raw())
}

/// Signal one process through its pidfd when we have one, else by pid (still unreaped, so safe).
pub fn signal_process(pid: Pid, pidfd: Option<&OwnedFd>, sig: libc::c_int) -> io::Result<()> {
    match pidfd {
        Some(fd) => sys::process::pidfd_send_signal(fd.as_fd(), sig),
        None => sys::process::kill(pid.as_raw(), sig),
    }
}

/// Signal a whole process group. Only called for groups whose leader we spawned; while any member
/// lives the kernel will not hand that number to a new process or group.
pub fn signal_group(pgid: Pid, sig: libc::c_int) -> io::Result<()> {
    sys::process::kill(-pgid.as_raw(), sig)
}

/// True while any process of the group is alive (zombies count until reaped).
pub fn group_alive(pgid: Pid) -> bool {
    signal_group(pgid, 0).is_ok()
}

/// The soft RLIMIT_NOFILE the daemon was started with (0: not raised), restored in plugins.
static INHERITED_NOFILE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Raise the daemon's soft descriptor limit to its hard limit: every plugin costs the daemon
/// three descriptors (two pipes and a notify socket), so a thousand plugins need more than the
/// usual 1024. Plugins still get the limit the daemon was started with.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut limit = sys::process::nofile_limit()?;
    if limit.rlim_cur < limit.rlim_max {
        let original = limit.rlim_cur;
        limit.rlim_cur = limit.rlim_max;
        sys::process::set_nofile_limit(&limit)?;
        INHERITED_NOFILE.store(original, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(limit.rlim_cur)
}

/// Become the reaper of orphaned descendants, so a plugin's double-forked grandchildren are
/// re-parented to us (and reaped by us) instead of escaping to init.
pub fn become_subreaper() -> io::Result<()> {
    sys::process::become_subreaper()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn decimal_formatting_fills_the_slot() {
        let mut slot = [7u8; PID_ROOM];
        write_decimal(&mut slot, 4_194_304);
        assert_eq!(&slot[..8], b"4194304\0");
        write_decimal(&mut slot, 1);
        assert_eq!(&slot[..2], b"1\0");
    }

    /// Everything the child printed on stdout, until it closed it.
    fn read_all(fd: OwnedFd) -> String {
        use std::io::Read;
        let mut file = std::fs::File::from(fd);
        // The daemon's side is non-blocking: make it blocking for the test.
        // SAFETY: F_SETFL on a descriptor we own has no memory effects.
        assert!(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) } == 0);
        let mut out = String::new();
        file.read_to_string(&mut out).unwrap();
        out
    }

    fn sh_spec(script: &[String], cwd: &Path) -> SpawnSpec {
        let mut env = BTreeMap::new();
        env.insert(OsString::from("GREETING"), OsString::from("hello"));
        SpawnSpec {
            program: PathBuf::from("/bin/sh"),
            arg0: "plugin-name".to_string(),
            args: script.to_vec(),
            cwd: cwd.to_path_buf(),
            env,
            pass_fds: Vec::new(),
            pid_vars: Vec::new(),
            cgroup: None,
            creds: None,
        }
    }

    #[test]
    fn a_vfork_start_runs_the_program_in_a_clean_child() {
        // The test harness ignores SIGPIPE (Rust does) and we block SIGUSR1 here: neither may
        // reach the plugin.
        let blocked = sys::process::block_all_signals();
        sys::process::restore_signal_mask(&blocked);
        let mut usr1 = nix::sys::signal::SigSet::empty();
        usr1.add(nix::sys::signal::Signal::SIGUSR1);
        usr1.thread_block().unwrap();
        let script = [
            "-c".to_string(),
            "echo $0 $GREETING $(pwd); grep -E '^(SigBlk|SigIgn)' /proc/self/status; \
             grep '^flags' /proc/$$/fdinfo/1; \
             [ $(ps -o sid= -p $$) = $$ ] && echo own-session"
                .to_string(),
        ];
        let spawned = spawn(&sh_spec(&script, Path::new("/tmp"))).unwrap();
        usr1.thread_unblock().unwrap();
        assert!(spawned.pidfd.is_some(), "a pidfd from clone");
        // SAFETY: F_GETFL on a descriptor we own.
        let ours = unsafe { libc::fcntl(spawned.stdout.as_raw_fd(), libc::F_GETFL) };
        assert!(
            ours & libc::O_NONBLOCK != 0,
            "the daemon's end never blocks the loop"
        );
        let out = read_all(spawned.stdout);
        let status = nix::sys::wait::waitpid(spawned.pid, None).unwrap();
        assert_eq!(
            status,
            nix::sys::wait::WaitStatus::Exited(spawned.pid, 0),
            "{out}"
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "plugin-name hello /tmp", "{out}");
        assert!(out.contains("SigBlk:\t0000000000000000"), "{out}");
        let flags = out
            .lines()
            .find_map(|l| l.strip_prefix("flags:\t"))
            .expect("the child's stdout flags");
        let flags = i32::from_str_radix(flags, 8).unwrap();
        assert_eq!(
            flags & libc::O_NONBLOCK,
            0,
            "the plugin's stdout blocks: {out}"
        );
        // The classic signals (1-31) are reset; real-time ones are left as inherited.
        let ignored = out
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:\t"))
            .unwrap();
        let ignored = u64::from_str_radix(ignored, 16).unwrap();
        assert_eq!(ignored & 0x7fff_ffff, 0, "{out}");
        if !out.contains("own-session") {
            // `ps` may be missing: the session is checked by the integration tests then.
            assert!(!Path::new("/bin/ps").exists(), "{out}");
        }
    }

    #[test]
    fn a_vfork_start_that_cannot_exec_reports_why_and_leaves_no_child() {
        let missing = Path::new("/nonexistent/hotreload-plugin");
        let spec = SpawnSpec {
            program: missing.to_path_buf(),
            ..sh_spec(&[], Path::new("/tmp"))
        };
        let error = spawn(&spec).unwrap_err();
        assert_eq!(error.source.raw_os_error(), Some(libc::ENOENT), "{error}");
        assert!(error.to_string().contains("/nonexistent/hotreload-plugin"));
        let bad_cwd = sh_spec(&[], Path::new("/nonexistent-dir"));
        let error = spawn(&bad_cwd).unwrap_err();
        assert_eq!(error.source.raw_os_error(), Some(libc::ENOENT), "{error}");
    }

    #[test]
    fn a_vfork_start_passes_descriptors_and_the_childs_own_pid() {
        let (keep_r, keep_w) = sys::fd::pipe().unwrap();
        let script = [
            "-c".to_string(),
            "echo $LISTEN_PID $$; [ -e /proc/self/fd/3 ] && echo fd3; \
             [ -e /proc/self/fd/4 ] || echo no-fd4"
                .to_string(),
        ];
        let mut spec = sh_spec(&script, Path::new("/"));
        spec.pass_fds = vec![keep_r.as_raw_fd()];
        spec.pid_vars = vec!["LISTEN_PID"];
        let spawned = spawn(&spec).unwrap();
        let out = read_all(spawned.stdout);
        nix::sys::wait::waitpid(spawned.pid, None).unwrap();
        let pid = spawned.pid.as_raw();
        assert_eq!(out, format!("{pid} {pid}\nfd3\nno-fd4\n"));
        drop((keep_r, keep_w));
    }
}
