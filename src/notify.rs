//! Talking to the service manager: sd_notify readiness/status/watchdog, and socket activation.
//!
//! Everything is a no-op without `NOTIFY_SOCKET`, so the same binary runs under systemd, under a
//! `--user` unit and from a terminal. The watchdog interval is read once at start (half of
//! `WATCHDOG_USEC`, only when `WATCHDOG_PID` is unset or ours); the pings themselves are driven by
//! the daemon's timer wheel, so a wedged loop stops pinging and systemd notices. None of these
//! variables reach plugins (the supervisor strips them from every child's environment).

use std::os::fd::FromRawFd;
use std::os::unix::net::UnixListener;

use sd_notify::NotifyState;

#[derive(Debug, Default)]
pub struct Notifier {
    enabled: bool,
    watchdog_usec: Option<u64>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some_and(|v| !v.is_empty()),
            watchdog_usec: sd_notify::watchdog_enabled()
                .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
        }
    }

    /// Ping interval: half the watchdog timeout, in milliseconds (at least 1).
    pub fn watchdog_interval_ms(&self) -> Option<u64> {
        self.watchdog_usec.map(|usec| (usec / 2 / 1000).max(1))
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            log::debug!("sd_notify failed: {e}");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// `RELOADING=1` and `MONOTONIC_USEC=` in one datagram (systemd ≥ 253 requires both together).
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    pub fn stopping(&self) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping plugins"),
        ]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }
}

/// A listening socket passed by the service manager (`LISTEN_FDS`/`LISTEN_PID`), preferring the
/// one named `control` in `LISTEN_FDNAMES`. Returns None when nothing was passed.
pub fn take_activated_listener() -> Option<UnixListener> {
    let fds: Vec<(i32, String)> = match sd_notify::listen_fds_with_names() {
        Ok(fds) => fds.collect(),
        Err(e) => {
            log::warn!("ignoring invalid socket activation variables: {e}");
            return None;
        }
    };
    let chosen = fds
        .iter()
        .find(|(_, name)| name == "control")
        .or_else(|| fds.first())
        .map(|(fd, _)| *fd)?;
    for (fd, name) in &fds {
        if *fd != chosen {
            log::warn!("ignoring extra activated socket fd {fd} ({name})");
        }
    }
    // SAFETY: the service manager passed this descriptor to us and nothing else in the process
    // has taken ownership of it (listen_fds_with_names only marked it CLOEXEC).
    Some(unsafe { UnixListener::from_raw_fd(chosen) })
}
