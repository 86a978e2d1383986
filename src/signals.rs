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

pub struct SignalSource {
    signals: Signals,
}

impl SignalSource {
    pub fn new(registry: &Registry) -> io::Result<SignalSource> {
        let mut signals = Signals::new([SIGCHLD, SIGTERM, SIGINT, SIGHUP])?;
        registry.register(&mut signals, token::SIGNALS, Interest::READABLE)?;
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
