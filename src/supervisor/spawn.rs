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
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
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
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (setsid, prctl, getppid, kill, sigaction, close_range); it allocates nothing
    // and touches no lock.
    unsafe {
        cmd.pre_exec(move || prepare_child(daemon));
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

/// Runs in the child between fork and exec. Async-signal-safe calls only.
fn prepare_child(daemon: libc::pid_t) -> io::Result<()> {
    // SAFETY (whole function): plain system calls on integers; no memory is shared with the parent
    // beyond the copied stack, and none of these can corrupt the child's state.
    unsafe {
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
        // Ignored dispositions survive exec (an ignored SIGCHLD would break the plugin's own
        // waitpid); caught ones are reset by exec anyway. std already clears the signal mask.
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
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
