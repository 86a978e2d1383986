//! Starting plugin processes: the only place that forks, and the only `unsafe` in the supervisor.
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
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::unistd::Pid;

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
    /// The `cgroup.procs` of the instance's cgroup (containment): the child writes itself into
    /// it before anything else, so not even its first fork can start outside.
    pub cgroup_procs: Option<RawFd>,
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
    // SAFETY: getpid has no preconditions and cannot fail.
    unsafe { libc::getpid() }
}

pub fn spawn(spec: &SpawnSpec<'_>) -> Result<Spawned, SpawnError> {
    let fail = |source: io::Error| SpawnError {
        program: spec.program.to_path_buf(),
        source,
    };
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
    let cgroup_procs = spec.cgroup_procs;
    let mut plan = if spec.pass_fds.is_empty() && spec.pid_vars.is_empty() {
        None
    } else {
        Some(ExecPlan::new(spec).map_err(fail)?)
    };
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (write, setsid, prctl, getppid, signal, close_range, fcntl, dup2, execve) and writes
    // into memory it owns; it allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = cgroup_procs {
                join_cgroup(fd)?;
            }
            prepare_child(daemon, inherited_nofile)?;
            match plan.as_mut() {
                Some(plan) => Err(plan.exec_in_child()),
                None => Ok(()),
            }
        });
    }
    let mut child = cmd.spawn().map_err(fail)?;
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
            libc::syscall(
                libc::SYS_close_range,
                first_free as u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
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

/// In the child: move into the instance's cgroup ("0" is the writing process itself).
fn join_cgroup(procs: RawFd) -> io::Result<()> {
    // SAFETY: write(2) from a static buffer to a descriptor the parent opened for us.
    let n = unsafe { libc::write(procs, b"0".as_ptr().cast(), 1) };
    if n != 1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs in the child between fork and exec. Async-signal-safe calls only.
fn prepare_child(daemon: libc::pid_t, nofile_soft: u64) -> io::Result<()> {
    // SAFETY (whole function): plain system calls on integers; no memory is shared with the parent
    // beyond the copied stack, and none of these can corrupt the child's state.
    unsafe {
        // The daemon raised its own descriptor limit; plugins get the one it was started with
        // (select()-based code breaks above 1024).
        if nofile_soft != 0 {
            let mut lim: libc::rlimit = std::mem::zeroed();
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur = nofile_soft.min(lim.rlim_max);
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) < 0
        {
            return Err(io::Error::last_os_error());
        }
        // The daemon may have died before PDEATHSIG was armed: then nobody would ever kill us.
        if libc::getppid() != daemon {
            libc::_exit(1);
        }
        // Ignored dispositions and the signal mask survive exec (an ignored SIGCHLD would break
        // the plugin's own waitpid, a blocked SIGTERM would make it unstoppable); caught ones are
        // reset by exec anyway.
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        // Descriptors the daemon inherited without CLOEXEC must not reach plugins. Failure
        // (kernel < 5.11) is tolerable: everything the daemon opens itself is CLOEXEC already.
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
    }
    Ok(())
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; F_GETFL/F_SETFL have no memory effects.
    unsafe {
        let flags = libc::fcntl(raw, libc::F_GETFL);
        if flags < 0 || libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `pidfd_open(2)`: None on kernels without it (the reaper's bookkeeping still keeps us from
/// signalling a recycled pid: a child's pid cannot be reused until we reap it).
fn pidfd_open(pid: Pid) -> Option<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: the syscall returns a new descriptor or -1; we take ownership only of a valid one.
    unsafe {
        let fd = libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0);
        if fd < 0 {
            None
        } else {
            Some(OwnedFd::from_raw_fd(fd as libc::c_int))
        }
    }
}

/// Signal one process through its pidfd when we have one, else by pid (still unreaped, so safe).
pub fn signal_process(pid: Pid, pidfd: Option<&OwnedFd>, sig: libc::c_int) -> io::Result<()> {
    let rc = match pidfd {
        // SAFETY: pidfd is a live descriptor we own; a null siginfo is allowed.
        Some(fd) => unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            ) as libc::c_int
        },
        // SAFETY: kill has no memory effects.
        None => unsafe { libc::kill(pid.as_raw(), sig) },
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Signal a whole process group. Only called for groups whose leader we spawned; while any member
/// lives the kernel will not hand that number to a new process or group.
pub fn signal_group(pgid: Pid, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill has no memory effects.
    let rc = unsafe { libc::kill(-pgid.as_raw(), sig) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
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
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let original = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(io::Error::last_os_error());
            }
            INHERITED_NOFILE.store(original, std::sync::atomic::Ordering::Relaxed);
        }
    }
    Ok(lim.rlim_cur)
}

/// Become the reaper of orphaned descendants, so a plugin's double-forked grandchildren are
/// re-parented to us (and reaped by us) instead of escaping to init.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
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
