//! Starting plugin processes: the only place in the supervisor that forks, and the only
//! `unsafe` outside `sys` (the code between fork and exec cannot go through `sys`' allocating
//! wrappers). Raw system calls are `sys`'; the child reset is `sys::child`, shared with hooks.
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
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::unistd::Pid;

use crate::sys::{self, child::ChildReset, creds::ChildCreds};

/// What to run and how.
#[derive(Debug)]
pub struct SpawnSpec<'a> {
    pub program: &'a Path,
    /// argv[0] the plugin sees: its name in the plugin dir, not the snapshot's hash name.
    pub arg0: &'a str,
    pub args: &'a [String],
    pub cwd: &'a Path,
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
    pub creds: Option<&'a ChildCreds>,
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

pub fn spawn(spec: &SpawnSpec<'_>) -> Result<Spawned, SpawnError> {
    let fail = |source: io::Error| SpawnError {
        program: spec.program.to_path_buf(),
        source,
    };
    let mut join = None;
    if let Some(dir) = spec.cgroup {
        if !CLONE3_REFUSED.load(std::sync::atomic::Ordering::Relaxed) {
            match spawn_into_cgroup(spec, dir).map_err(fail)? {
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
        join = Some(open_procs_at(dir).map_err(fail)?);
    }
    let mut cmd = Command::new(spec.program);
    cmd.arg0(spec.arg0)
        .args(spec.args)
        .current_dir(spec.cwd)
        .env_clear()
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let daemon = parent_pid();
    let inherited_nofile = INHERITED_NOFILE.load(std::sync::atomic::Ordering::Relaxed);
    let cgroup_procs = join.as_ref().map(AsRawFd::as_raw_fd);
    let mut plan = if spec.pass_fds.is_empty() && spec.pid_vars.is_empty() {
        None
    } else {
        Some(ExecPlan::new(spec).map_err(fail)?)
    };
    let creds = spec.creds.cloned();
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (write, setgroups, setresgid, setresuid, setsid, prctl, getppid, signal,
    // close_range, fcntl, dup2, execve) and writes into memory it owns; it allocates nothing and
    // touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = cgroup_procs {
                join_cgroup(fd)?;
            }
            switch_user(creds.as_ref())?;
            prepare_child(daemon, inherited_nofile)?;
            match plan.as_mut() {
                Some(plan) => Err(plan.exec_in_child()),
                None => Ok(()),
            }
        });
    }
    let mut child = cmd.spawn().map_err(fail)?;
    drop(join);
    let pid = Pid::from_raw(child.id() as libc::pid_t);
    let stdout = child.stdout.take().map(OwnedFd::from);
    let stderr = child.stderr.take().map(OwnedFd::from);
    // The std handle is dropped without waiting: the reaper owns the exit status.
    drop(child);
    let (Some(stdout), Some(stderr)) = (stdout, stderr) else {
        return Err(fail(io::Error::other("child pipes missing")));
    };
    set_nonblocking(&stdout).map_err(fail)?;
    set_nonblocking(&stderr).map_err(fail)?;
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
    fn new(spec: &SpawnSpec<'_>) -> io::Result<ExecPlan> {
        let cstr = |b: &[u8]| {
            CString::new(b).map_err(|_| io::Error::other("NUL byte in argument or environment"))
        };
        let path = cstr(spec.program.as_os_str().as_bytes())?;
        let mut argv = vec![cstr(spec.arg0.as_bytes())?];
        for a in spec.args {
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
        // SAFETY: getpid cannot fail.
        let pid = unsafe { libc::getpid() };
        for &(index, offset) in &self.pid_slots {
            write_decimal(&mut self.env_bufs[index][offset..], pid);
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
            sys::child::mark_inherited_fds_cloexec(first_free as libc::c_uint);
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
fn spawn_into_cgroup(spec: &SpawnSpec<'_>, cgroup: RawFd) -> io::Result<Option<Spawned>> {
    let mut plan = ExecPlan::new(spec)?;
    let cwd = CString::new(spec.cwd.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("NUL byte in the working directory"))?;
    let devnull = high_fd(std::fs::File::open("/dev/null")?.into())?;
    let (out_r, out_w) = sys::fd::pipe()?;
    let (err_r, err_w) = sys::fd::pipe()?;
    let (status_r, status_w) = sys::fd::pipe()?;
    let (out_w, err_w) = (high_fd(out_w)?, high_fd(err_w)?);
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
                [devnull.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()],
                &cwd,
                spec.creds,
                daemon,
                nofile,
                &mut plan,
            );
            let bytes = errno.to_ne_bytes();
            libc::write(status_w.as_raw_fd(), bytes.as_ptr().cast(), bytes.len());
            libc::_exit(127);
        }
    }
    let pid = Pid::from_raw(pid);
    drop((devnull, out_w, err_w, status_w));
    // The status pipe closes at exec (success) or carries the child's errno (failure).
    let mut buf = [0u8; 4];
    let n = sys::fd::read_full(status_r.as_fd(), &mut buf);
    if n == 4 {
        let _ = nix::sys::wait::waitpid(pid, None);
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(buf)));
    }
    set_nonblocking(&out_r)?;
    set_nonblocking(&err_r)?;
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

    #[test]
    fn decimal_formatting_fills_the_slot() {
        let mut slot = [7u8; PID_ROOM];
        write_decimal(&mut slot, 4_194_304);
        assert_eq!(&slot[..8], b"4194304\0");
        write_decimal(&mut slot, 1);
        assert_eq!(&slot[..2], b"1\0");
    }
}
