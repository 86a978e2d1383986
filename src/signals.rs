//! Signals as an ordinary event source: signal-hook writes them to a pipe that the loop polls.
//!
//! Nothing runs in signal-handler context except signal-hook's own write to that pipe, so the
//! daemon reacts to SIGCHLD/SIGTERM/SIGINT/SIGHUP between other events, with no locks and no
//! async-signal-safety hazards.

use std::io;

use mio::{Interest, Registry};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::token;

/// What the daemon does with a delivered signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalEvent {
    /// A child changed state: reap.
    Child,
    /// SIGTERM or SIGINT: stop everything gracefully and exit.
    Terminate,
    /// SIGHUP: re-read the configuration.
    Reload,
}

/// The signals the daemon reacts to.
const HANDLED: [libc::c_int; 4] = [SIGCHLD, SIGTERM, SIGINT, SIGHUP];

/// A blocked signal mask is inherited across exec (a careless parent, a shell script, a service
/// manager bug): with SIGCHLD or SIGTERM blocked the handlers would never run, crashes would go
/// unnoticed and the daemon would not stop, and every plugin would inherit the mask too. The
/// daemon blocks nothing, so the whole mask is cleared. (Ignored dispositions need no reset: the
/// handlers replace them, and plugins get defaults in the spawn.)
fn clear_signal_mask() -> io::Result<()> {
    nix::sys::signal::SigSet::empty()
        .thread_set_mask()
        .map_err(io::Error::from)
}

/// The daemon takes a read lease for a few microseconds to learn whether a build is still open
/// for writing (`sys::fs::open_for_writing`); a writer opening the file in that window makes
/// the kernel send the lease holder SIGIO, whose default action would end the daemon. Plugins
/// get the default back in the spawn, like every disposition the daemon changes.
fn ignore_lease_breaks() -> io::Result<()> {
    // SAFETY: SIG_IGN installs no handler, so no code runs in signal context.
    unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGIO,
            nix::sys::signal::SigHandler::SigIgn,
        )
    }
    .map(drop)
    .map_err(io::Error::from)
}

pub struct SignalSource {
    signals: Signals,
}

impl SignalSource {
    pub fn new(registry: &Registry) -> io::Result<SignalSource> {
        let mut signals = Signals::new(HANDLED)?;
        registry.register(&mut signals, token::SIGNALS, Interest::READABLE)?;
        clear_signal_mask()?;
        ignore_lease_breaks()?;
        Ok(SignalSource { signals })
    }

    /// Everything delivered since the last call (coalesced: one Child may stand for many exits).
    pub fn pending(&mut self) -> Vec<SignalEvent> {
        let mut out = Vec::new();
        for sig in self.signals.pending() {
            let ev = match sig {
                SIGCHLD => SignalEvent::Child,
                SIGHUP => SignalEvent::Reload,
                _ => SignalEvent::Terminate,
            };
            if !out.contains(&ev) {
                out.push(ev);
            }
        }
        out
    }
}
