//! An echo server that is reloaded without refusing a single connection.
//!
//! The trick is that the plugin does not own its listening socket: `hotreloadd` binds it once
//! (`sockets = ["tcp:127.0.0.1:9000"]` in `hotreload.toml`) and passes the same socket to every
//! instance as fd 3, announced by `LISTEN_FDS`/`LISTEN_PID` (the systemd socket activation
//! protocol, so `systemd-socket-activate` and a `.socket` unit work too). Connections that
//! arrive while no instance is accepting wait in the kernel's backlog instead of being refused.
//!
//! The plugin's part of the bargain:
//!
//! - send `READY=1` once it is ready to accept (use `ready = "notify"`), so that with
//!   `strategy = "start-stop"` the old instance is stopped only when the new one accepts;
//! - on SIGTERM stop accepting at once, but never `shutdown()` the listening socket: it is shared
//!   with the daemon and the next instance, and a shutdown would reset their queued connections.
//!   Finish the connections already accepted (for at most [`DRAIN_TIMEOUT`]) and exit.
//!
//! Each connection is served on its own thread; every line received is sent back, prefixed with
//! `$ECHO_PREFIX` when that is set (`{version}` in it becomes `$HOTRELOAD_VERSION`, so you can
//! see which build answered). Run without a passed socket, it binds `127.0.0.1:9000` (or the
//! address given as its first argument) itself. Try it without the daemon:
//!
//! ```sh
//! systemd-socket-activate -l 127.0.0.1:9000 -E ECHO_PREFIX='{version}: ' \
//!     target/debug/examples/echo_server
//! echo hi | socat - TCP:127.0.0.1:9000
//! ```

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{AddressFamily, SockaddrLike, SockaddrStorage, getsockname};
use sd_notify::NotifyState;
use signal_hook::consts::{SIGINT, SIGTERM};

/// Where to listen when no socket is passed in.
const FALLBACK_ADDR: &str = "127.0.0.1:9000";

/// At most one `STATUS=` update per this interval.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// How long to wait, after SIGTERM, for accepted connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("echo_server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> io::Result<()> {
    let version = std::env::var("HOTRELOAD_VERSION").unwrap_or_else(|_| "dev".to_owned());
    let prefix = std::env::var("ECHO_PREFIX").unwrap_or_default();
    let server = Arc::new(Server {
        prefix: prefix.replace("{version}", &version),
        open: Mutex::new(0),
        closed: Condvar::new(),
    });

    let listener = Listener::from_environment()?;
    // Readiness is polled, and accept() must then not block: a connection may have been taken
    // by the other instance in the meantime. O_NONBLOCK is shared by every copy of the socket
    // (it belongs to the open file description), so every instance has to expect it, as any
    // event-loop based server does.
    listener.set_nonblocking(true)?;
    let stop = stop_requests()?;

    println!("echo_server {version} listening on {}", listener.describe());
    let _ = sd_notify::notify(&[
        NotifyState::Ready,
        NotifyState::Status("serving (connections 0)"),
    ]);

    let mut accepted = 0u64;
    let mut status_sent = Instant::now();
    while !wait_for_connection_or_stop(&listener, &stop)? {
        accepted += listener.accept_pending(&server)?;
        // STATUS is for people reading `hotreloadctl list`: a burst of connections must not
        // become a burst of datagrams to the service manager.
        if status_sent.elapsed() >= STATUS_INTERVAL {
            let status = format!("serving (connections {accepted})");
            let _ = sd_notify::notify(&[NotifyState::Status(&status)]);
            status_sent = Instant::now();
        }
    }

    // From here on nobody calls accept() in this process: new connections wait in the backlog
    // for the next instance. The listening fd is simply left open until exit; closing our copy
    // would be harmless too, but shutdown() would not be.
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
    let unfinished = server.wait_until_idle(DRAIN_TIMEOUT);
    println!("echo_server {version} stopping (connections {accepted}, cut off {unfinished})");
    Ok(())
}

/// The listening socket: TCP or Unix, as configured in `sockets = [...]`.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Take the first socket passed by the service manager, or bind one ourselves.
    fn from_environment() -> io::Result<Listener> {
        if let Some(fd) = sd_notify::listen_fds()?.next() {
            // SAFETY: listen_fds() checked that LISTEN_PID is our pid, so fd 3 was passed to
            // this process for it to own, and nothing else in the program has used it.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            return Listener::from_fd(fd);
        }
        let addr = std::env::args()
            .nth(1)
            .unwrap_or_else(|| FALLBACK_ADDR.to_owned());
        eprintln!("echo_server: {}; binding {addr} myself", why_no_socket());
        eprintln!(
            "echo_server: to keep connections across reloads, let hotreloadd pass the socket: \
             sockets = [\"tcp:{addr}\"] under [plugins.echo_server] in hotreload.toml"
        );
        TcpListener::bind(&addr)
            .map(Listener::Tcp)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
    }

    fn from_fd(fd: OwnedFd) -> io::Result<Listener> {
        let address = getsockname::<SockaddrStorage>(fd.as_raw_fd())?;
        Ok(match address.family() {
            Some(AddressFamily::Unix) => Listener::Unix(UnixListener::from(fd)),
            _ => Listener::Tcp(TcpListener::from(fd)),
        })
    }

    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match self {
            Listener::Tcp(listener) => listener.set_nonblocking(nonblocking),
            Listener::Unix(listener) => listener.set_nonblocking(nonblocking),
        }
    }

    fn describe(&self) -> String {
        let address = match self {
            Listener::Tcp(listener) => listener.local_addr().map(|a| format!("tcp:{a}")),
            Listener::Unix(listener) => listener.local_addr().map(|a| format!("unix:{a:?}")),
        };
        address.unwrap_or_else(|e| format!("an unknown address ({e})"))
    }

    /// Accept every connection waiting now, each served on a new thread; returns how many.
    fn accept_pending(&self, server: &Arc<Server>) -> io::Result<u64> {
        let mut count = 0;
        loop {
            // Accepted sockets are blocking, as the connection threads want them: on Linux they
            // do not inherit the listener's O_NONBLOCK (accept(2)).
            let accepted = match self {
                Listener::Tcp(listener) => listener
                    .accept()
                    .map(|(stream, _)| server.spawn_connection(stream)),
                Listener::Unix(listener) => listener
                    .accept()
                    .map(|(stream, _)| server.spawn_connection(stream)),
            };
            match accepted {
                Ok(()) => count += 1,
                // Drained, or another instance took the connection first.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(count),
                // The client gave up before we accepted: nothing to serve.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => return Err(io::Error::new(e.kind(), format!("accept failed: {e}"))),
            }
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(listener) => listener.as_fd(),
            Listener::Unix(listener) => listener.as_fd(),
        }
    }
}

/// Why [`sd_notify::listen_fds`] found nothing, in words a user can act on.
fn why_no_socket() -> String {
    match (std::env::var("LISTEN_FDS"), std::env::var("LISTEN_PID")) {
        (Err(_), _) => "no socket passed (LISTEN_FDS is not set)".to_owned(),
        (Ok(_), Err(_)) => "LISTEN_FDS is set but LISTEN_PID is not: ignoring it".to_owned(),
        (Ok(_), Ok(pid)) => format!(
            "LISTEN_FDS is meant for pid {pid}, not for this process ({}): ignoring it",
            std::process::id()
        ),
    }
}

/// A socket that becomes readable when SIGTERM or SIGINT arrives (the self-pipe trick: the signal
/// handler writes a byte), so one poll() can wait for a connection and a stop request together.
fn stop_requests() -> io::Result<UnixStream> {
    let (read_end, write_end) = UnixStream::pair()?;
    signal_hook::low_level::pipe::register(SIGTERM, write_end.try_clone()?)?;
    signal_hook::low_level::pipe::register(SIGINT, write_end)?;
    Ok(read_end)
}

/// Block until a connection is waiting (`false`) or a stop was requested (`true`).
fn wait_for_connection_or_stop(listener: &Listener, stop: &UnixStream) -> io::Result<bool> {
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            // A signal handler ran on this thread; its byte is in the pipe for the next poll.
            Err(Errno::EINTR) => continue,
            Err(e) => {
                let e = io::Error::from(e);
                return Err(io::Error::new(e.kind(), format!("poll failed: {e}")));
            }
        }
        if fds[1].any().unwrap_or(false) {
            return Ok(true);
        }
        if fds[0].any().unwrap_or(false) {
            return Ok(false);
        }
    }
}

/// What connection threads share with the accepting thread.
struct Server {
    /// Put in front of every echoed line.
    prefix: String,
    /// Connections being served now.
    open: Mutex<usize>,
    /// Signalled whenever a connection ends.
    closed: Condvar,
}

impl Server {
    /// Serve `stream` on a new thread, counted in [`Server::open`] until it ends.
    fn spawn_connection<S>(self: &Arc<Self>, stream: S)
    where
        S: Send + 'static,
        for<'a> &'a S: Read + Write,
    {
        *self.lock_open() += 1;
        let server = Arc::clone(self);
        thread::spawn(move || {
            if let Err(e) = echo_lines(&stream, &server.prefix) {
                eprintln!("echo_server: connection failed: {e}");
            }
            *server.lock_open() -= 1;
            server.closed.notify_all();
        });
    }

    /// Wait at most `timeout` for all connections to end; returns how many are still open.
    fn wait_until_idle(&self, timeout: Duration) -> usize {
        let open = self.lock_open();
        let (open, _) = self
            .closed
            .wait_timeout_while(open, timeout, |open| *open > 0)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *open
    }

    fn lock_open(&self) -> std::sync::MutexGuard<'_, usize> {
        // The counter stays meaningful even if a thread panicked while holding the lock.
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Send every line received on `stream` back, after `prefix`, until the client closes.
fn echo_lines<S>(stream: &S, prefix: &str) -> io::Result<()>
where
    for<'a> &'a S: Read + Write,
{
    let mut reader = BufReader::new(stream);
    let mut writer = stream;
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        // One write per line, so the prefix and the line travel in one segment.
        writer.write_all(&[prefix.as_bytes(), &line].concat())?;
    }
}
