//! Processes: our own ids, signals by pid, group or pidfd, the child-subreaper flag, the
//! descriptor limit, `clone3` into a cgroup, the `CLONE_VM | CLONE_VFORK` clone plugins start
//! with, and the boot-time clock `/proc` start times use.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use libc::{c_int, c_void};

/// This process's pid.
pub fn pid() -> libc::pid_t {
    // SAFETY: getpid has no preconditions and cannot fail.
    unsafe { libc::getpid() }
}

/// This process's effective uid.
pub fn euid() -> libc::uid_t {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// `kill(2)`: `pid` may be negative (a process group) or `sig` 0 (an existence check).
pub fn kill(pid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill takes integers only and has no memory effects.
    syscall!(kill(pid, sig)).map(drop)
}

/// `pidfd_open(2)`: None on kernels without it.
pub fn pidfd_open(pid: libc::pid_t) -> Option<OwnedFd> {
    // SAFETY: the syscall takes integers and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a non-negative result is a fresh descriptor nobody else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// `pidfd_send_signal(2)` with no siginfo.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: pidfd is a live descriptor borrowed for the call; a null siginfo is allowed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `PR_SET_CHILD_SUBREAPER`: orphaned descendants are re-parented to us.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    syscall!(prctl(
        libc::PR_SET_CHILD_SUBREAPER,
        1 as libc::c_ulong,
        0 as libc::c_ulong,
        0 as libc::c_ulong,
        0 as libc::c_ulong,
    ))
    .map(drop)
}

/// The `RLIMIT_NOFILE` soft and hard limits.
pub fn nofile_limit() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the local struct.
    syscall!(getrlimit(libc::RLIMIT_NOFILE, &mut limit))?;
    Ok(limit)
}

/// Sets the `RLIMIT_NOFILE` limits.
pub fn set_nofile_limit(limit: &libc::rlimit) -> io::Result<()> {
    // SAFETY: setrlimit reads one rlimit from a live reference.
    syscall!(setrlimit(libc::RLIMIT_NOFILE, limit)).map(drop)
}

/// Clock ticks (`_SC_CLK_TCK`) since boot, suspend included: the unit of a `/proc/PID/stat`
/// start time (rounded down).
pub fn boottime_ticks() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the local struct.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let ns = ts.tv_sec.max(0) as u64 * 1_000_000_000 + ts.tv_nsec.max(0) as u64;
    ns / (1_000_000_000 / hz)
}

/// `struct clone_args` of clone3(2), up to `cgroup` (Linux 5.7).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `clone3` with `CLONE_INTO_CGROUP` and no other flag: a fork whose child starts in the
/// cgroup whose directory is `cgroup`. Returns 0 in the child and the child's pid in the parent.
///
/// # Safety
/// As for `fork(2)`: in a multi-threaded process the child may only make async-signal-safe
/// calls until it execs or `_exit`s, and must never return into code that assumes otherwise.
pub unsafe fn clone_into_cgroup(cgroup: RawFd) -> io::Result<libc::pid_t> {
    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM and without a stack behaves like fork(2); `args` is live
    // and its size is passed. The caller upholds the fork contract in the child.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(pid as libc::pid_t)
    }
}

/// `CLONE_PIDFD` (Linux 5.2): the kernel returns a pidfd for the child in the same call.
const CLONE_PIDFD: c_int = 0x1000;

/// `clone(2)` with `CLONE_VM | CLONE_VFORK`, posix_spawn's technique: `child(arg)` runs on
/// `stack` in our address space while this thread is suspended until the child has exec'd or
/// exited. Nothing is copied (no page tables, no copy-on-write faults in the daemon afterwards),
/// and when this returns the child's exec has either happened or failed, so the caller knows the
/// outcome without waiting on a pipe. Returns the child's pid and, where the kernel has
/// `CLONE_PIDFD`, a pidfd made in the same call.
///
/// # Safety
/// `child` runs with our memory (our heap, our thread-local storage, `errno` included) and with
/// the signal mask of the calling thread; the caller blocks every signal first, so no handler of
/// ours can run in it. It may only make async-signal-safe system calls on memory prepared before
/// the call, must never unwind or return into our code, and ends with `execve` or `_exit`. `arg`
/// must stay valid, and `stack` unused by anything else, until this returns.
pub unsafe fn clone_vfork(
    child: extern "C" fn(*mut c_void) -> c_int,
    arg: *mut c_void,
    stack: &mut [u8],
) -> io::Result<(libc::pid_t, Option<OwnedFd>)> {
    // The stack grows down on every architecture Linux runs this daemon on; 16-byte aligned.
    let top = stack.as_mut_ptr().wrapping_add(stack.len());
    let top = top.wrapping_sub(top as usize % 16).cast::<c_void>();
    let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD;
    let mut pidfd: c_int = -1;
    // SAFETY: the caller upholds the contract above; `top` is the aligned end of a live buffer;
    // with CLONE_PIDFD the kernel writes one int through the parent_tid pointer.
    let mut pid = unsafe {
        libc::clone(
            child,
            top,
            flags | CLONE_PIDFD,
            arg,
            &mut pidfd as *mut c_int,
        )
    };
    if pid < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // A kernel before 5.2: no pidfd from clone.
        pidfd = -1;
        // SAFETY: as above, without CLONE_PIDFD.
        pid = unsafe { libc::clone(child, top, flags, arg) };
    }
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a non-negative pidfd is a fresh descriptor the kernel made for us alone.
    let pidfd = (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd) });
    Ok((pid, pidfd))
}

/// Block every signal in the calling thread; returns the mask to restore with
/// [`restore_signal_mask`].
pub fn block_all_signals() -> libc::sigset_t {
    // SAFETY: zeroed sigset_t is valid storage that sigfillset/pthread_sigmask initialise.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        old
    }
}

/// Put back a mask saved by [`block_all_signals`].
pub fn restore_signal_mask(old: &libc::sigset_t) {
    // SAFETY: `old` is a mask pthread_sigmask filled in; the old-mask pointer may be null.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut());
    }
}
