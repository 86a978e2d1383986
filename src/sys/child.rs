//! The one reset every child of the daemon gets between fork and exec: plugins
//! (`supervisor::spawn`) and hooks (`hooks`).
//!
//! The daemon may have been started in any state (under `nohup`, from a shell with signals
//! blocked, with stray descriptors inherited from its parent). Ignored dispositions and the
//! signal mask survive `execve` (an ignored SIGCHLD breaks the child's own `waitpid`, a blocked
//! SIGTERM makes it unstoppable), so both are reset here; so are descriptors a library opened
//! without `O_CLOEXEC`. Everything here runs in the forked child: async-signal-safe system calls
//! only, no allocation, no lock. Plugins start with `clone(CLONE_VM | CLONE_VFORK)`
//! (`supervisor::spawn`): the child then shares the daemon's memory until exec, so it must also
//! not touch any state of glibc's that assumes it is the daemon's thread (no `setuid()`-style
//! wrappers that signal "all threads": use the raw system calls).

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::OnceLock;

/// What a child needs besides the common reset.
#[derive(Clone, Copy, Debug)]
pub struct ChildReset {
    /// The daemon's pid, taken in the parent: the child arms `PR_SET_PDEATHSIG` (SIGKILL) and
    /// then checks that its parent is still this pid (the daemon may have died before the
    /// death signal was armed, and then nobody would ever kill the child).
    pub parent: libc::pid_t,
    /// Start a new session (`setsid`): plugins do, so one `kill(-pgid)` reaches their whole
    /// tree; hooks get their own process group from `Command::process_group` instead.
    pub new_session: bool,
    /// The soft `RLIMIT_NOFILE` to restore (the daemon raised its own); 0 leaves it.
    pub nofile_soft: u64,
    /// The signals to give back their default disposition: [`non_default_signals`], read in
    /// the parent.
    pub signals: SignalSet,
}

/// Classic signals (1-31) as bits.
pub type SignalSet = u32;

static NON_DEFAULT: OnceLock<SignalSet> = OnceLock::new();

/// The classic signals whose disposition in the daemon is not `SIG_DFL`: those it catches
/// (signal-hook's, Rust's stack-overflow handler) or ignores (SIGPIPE, anything inherited
/// ignored). Read once, at the first spawn: the daemon sets its dispositions at start-up and
/// never again. A child resets only these (the rest already are default), which spares a plugin
/// start some 25 system calls on the path of every reload.
pub fn non_default_signals() -> SignalSet {
    *NON_DEFAULT.get_or_init(|| {
        (1..32)
            .filter(|&signal| signal != libc::SIGKILL && signal != libc::SIGSTOP)
            .filter(|&signal| !has_default_disposition(signal))
            .fold(0, |set, signal| set | (1 << signal))
    })
}

/// [`non_default_signals`] as read already, for a child (which must not run the one-time
/// initialisation in memory it shares with the daemon); every classic signal if it was not.
pub fn non_default_signals_read() -> SignalSet {
    NON_DEFAULT.get().copied().unwrap_or(SignalSet::MAX)
}

/// False also when the disposition cannot be read: resetting it costs one system call.
fn has_default_disposition(signal: libc::c_int) -> bool {
    // SAFETY: a zeroed sigaction is valid storage for the old action; no new action is set.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_DFL
    }
}

impl ChildReset {
    /// Applies the reset in the forked child. An error (ESRCH when the daemon already died) is
    /// the child's reason not to exec.
    pub fn apply(&self) -> io::Result<()> {
        if self.nofile_soft != 0 {
            restore_nofile(self.nofile_soft);
        }
        if self.new_session {
            // SAFETY: setsid takes no arguments.
            syscall!(setsid())?;
        }
        // CREDENTIALS STEP (plugin `user`/`group`): setgroups, setgid, setuid from values the
        // parent resolved, as raw system calls (SYS_setgroups, SYS_setresgid, SYS_setresuid:
        // glibc's wrappers broadcast to the daemon's threads, wrong in a CLONE_VM child). Here:
        // after setsid and the rlimit, and before PR_SET_PDEATHSIG, which a credential change
        // clears.
        // SAFETY: prctl with integer arguments only.
        syscall!(prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        ))?;
        // SAFETY: getppid has no preconditions and cannot fail.
        if unsafe { libc::getppid() } != self.parent {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        reset_signals(self.signals);
        mark_inherited_fds_cloexec(3);
        Ok(())
    }
}

/// Makes `command`'s child apply `reset` between fork and exec.
pub fn reset_before_exec(command: &mut Command, reset: ChildReset) {
    // SAFETY: `ChildReset::apply` makes only async-signal-safe system calls (setrlimit, setsid,
    // prctl, getppid, signal, sigprocmask, close_range); it neither allocates nor takes locks.
    unsafe {
        command.pre_exec(move || reset.apply());
    }
}

/// Default dispositions for the classic signals in `signals` and an empty signal mask. Caught
/// signals are reset by `execve` too, but not before the mask is emptied here: a signal
/// arriving then must not run the daemon's handler in a child that shares its memory. 32 and up
/// are glibc-internal or real-time.
fn reset_signals(signals: SignalSet) {
    for signal in 1..32 {
        if signals & (1 << signal) != 0 {
            // SAFETY: SIG_DFL installs no handler code; `signal` is async-signal-safe.
            unsafe { libc::signal(signal, libc::SIG_DFL) };
        }
    }
    // SAFETY: a zeroed sigset_t is valid storage for sigemptyset, which initialises it; the
    // old-mask pointer may be null.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
}

/// Lower the soft descriptor limit back to what the daemon was started with (select()-based
/// code breaks above 1024); a failure leaves the raised one.
fn restore_nofile(soft: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the local struct; setrlimit reads it.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = soft.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Mark every descriptor from `first` up close-on-exec: belt and braces against descriptors
/// inherited or opened without `O_CLOEXEC`. Close-on-exec (not close) keeps std's own
/// exec-error pipe working. Kernels before 5.11 lack the flag (the call then fails and is
/// ignored: the daemon's own descriptors are close-on-exec already). The raw system call avoids
/// needing glibc 2.34's wrapper.
pub fn mark_inherited_fds_cloexec(first: libc::c_uint) {
    // SAFETY: close_range takes only integers and changes descriptor flags; it touches no memory.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
    }
}
