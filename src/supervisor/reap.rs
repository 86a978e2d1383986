//! Reaping: the daemon is the only caller of `waitpid`, always `waitpid(-1, WNOHANG)` in a loop.
//!
//! SIGCHLD coalesces (200 exits can arrive as one signal), so every wake-up drains until the
//! kernel says no child has changed state. Nothing else may wait on a child: a status taken by
//! anyone else would be lost to the supervisor.

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    Code(i32),
    Signal(i32),
}

impl ExitKind {
    pub fn is_success(self) -> bool {
        self == ExitKind::Code(0)
    }
}

impl std::fmt::Display for ExitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitKind::Code(c) => write!(f, "exit code {c}"),
            ExitKind::Signal(s) => {
                let name = nix::sys::signal::Signal::try_from(*s)
                    .map(|s| s.as_str())
                    .unwrap_or("unknown signal");
                write!(f, "signal {s} ({name})")
            }
        }
    }
}

/// Collect every exited child. Stopped/continued notifications are not requested.
pub fn reap_all() -> Vec<(Pid, ExitKind)> {
    let mut out = Vec::new();
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => out.push((pid, ExitKind::Code(code))),
            Ok(WaitStatus::Signaled(pid, sig, _)) => out.push((pid, ExitKind::Signal(sig as i32))),
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                log::warn!("waitpid failed: {e}");
                break;
            }
        }
    }
    out
}
