//! Talking to the service manager: sd_notify readiness/status/watchdog, and socket activation.
//!
//! Everything is a no-op without `NOTIFY_SOCKET`, so the same binary runs under systemd, under a
//! `--user` unit and from a terminal. The datagrams are sent here rather than by
//! `sd_notify::notify`, which takes `@name` for a file path: systemd passes abstract-namespace
//! sockets that way (user managers, containers). The watchdog interval is read once at start (half of
//! `WATCHDOG_USEC`, only when `WATCHDOG_PID` is unset or ours); the pings themselves are driven by
//! the daemon's timer wheel, so a wedged loop stops pinging and systemd notices. None of these
//! variables reach plugins (the supervisor strips them from every child's environment).

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};

use sd_notify::NotifyState;

#[derive(Debug, Default)]
pub struct Notifier {
    /// Where `NOTIFY_SOCKET` points; None when unset or unusable.
    target: Option<SocketAddr>,
    watchdog_usec: Option<u64>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET")
            .filter(|v| !v.is_empty())
            .and_then(|v| match notify_address(&v) {
                Ok(addr) => Some(addr),
                Err(e) => {
                    log::warn!("ignoring NOTIFY_SOCKET={}: {e}", v.to_string_lossy());
                    None
                }
            });
        Notifier {
            target,
            watchdog_usec: sd_notify::watchdog_enabled()
                .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
        }
    }

    /// Whether a service manager listens (NOTIFY_SOCKET was usable).
    pub fn is_active(&self) -> bool {
        self.target.is_some()
    }

    /// Ping interval: half the watchdog timeout, in milliseconds (at least 1).
    pub fn watchdog_interval_ms(&self) -> Option<u64> {
        self.watchdog_usec.map(|usec| (usec / 2 / 1000).max(1))
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        let Some(target) = &self.target else {
            return;
        };
        let message: String = states.iter().map(|s| format!("{s}\n")).collect();
        let sent = UnixDatagram::unbound().and_then(|s| s.send_to_addr(message.as_bytes(), target));
        if let Err(e) = sent {
            log::debug!("sd_notify to {target:?} failed: {e}");
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

/// The socket address `NOTIFY_SOCKET` names: an absolute path, or `@name` in the abstract
/// namespace.
fn notify_address(value: &OsStr) -> io::Result<SocketAddr> {
    let bytes = value.as_bytes();
    match bytes.first() {
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
        Some(b'/') => SocketAddr::from_pathname(value),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "expected an absolute socket path or @abstract-name",
        )),
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
    Some(UnixListener::from(crate::sys::fd::adopt_passed(chosen)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_address_takes_paths_and_abstract_names() {
        let path = notify_address(OsStr::new("/run/systemd/notify")).unwrap();
        assert_eq!(
            path.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        let abstract_addr = notify_address(OsStr::new("@/org/x/notify")).unwrap();
        assert_eq!(
            abstract_addr.as_abstract_name(),
            Some(&b"/org/x/notify"[..])
        );
        assert!(notify_address(OsStr::new("relative/sock")).is_err());
    }

    #[test]
    fn sends_one_datagram_to_an_abstract_socket() {
        let name = format!("hotreload-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&addr).unwrap();
        let notifier = Notifier {
            target: Some(addr),
            watchdog_usec: None,
        };
        notifier.ready("all good");
        let mut buf = [0u8; 256];
        receiver
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=all good\n");
    }
}
