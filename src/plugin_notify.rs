//! The daemon side of systemd's sd_notify protocol, offered to plugins (SPEC §4, `NOTIFY_SOCKET`).
//!
//! Each plugin instance gets its own `AF_UNIX` datagram socket, so a message's socket already says
//! which plugin it is about; the sender's kernel-attested credentials (`SCM_CREDENTIALS`, attached
//! by the kernel because the socket has `SO_PASSCRED` on) then let the supervisor check that it
//! came from that plugin's process group ([`sender_in_group`]). This module owns the sockets, the
//! receiving and the parsing; what a message *means* for a plugin (readiness, watchdog, the fd
//! store and its `fdstore_max` bound) is the supervisor's policy.
//!
//! Receiving follows systemd's own `notify_recv()`: a datagram is dropped, and every file
//! descriptor that came with it closed, when its payload is larger than [`MAX_DATAGRAM`], its
//! control data was truncated (more than [`MAX_FDS_PER_MESSAGE`] fds), it carries no valid
//! credentials, or its payload is empty, contains a NUL byte or is not UTF-8. Plugins are not
//! trusted to behave, so drops are logged with a per-socket rate limit and never returned.
//! Descriptors that arrive on a message without `FDSTORE=1` are closed at once, as systemd does;
//! that also makes `BARRIER=1` (`sd_notify_barrier`) work: the client waits for the daemon to
//! close the pipe end it sent.
//!
//! Two kernel facts shape the receive path (both checked on Linux 6.18):
//! * Received descriptors are installed in our process *before* we see the message, including
//!   the ones that still fit when the control buffer overflows (`MSG_CTRUNC`). nix's `recvmsg`
//!   refuses to walk control messages once `MSG_CTRUNC` is set, which would leak those fds, so
//!   the control buffer is walked with libc's `CMSG_*` helpers (in `sys::socket::recv_raw`).
//!   `MSG_CMSG_CLOEXEC` keeps them out of plugins spawned meanwhile.
//! * A datagram socket queues at most `net.unix.max_dgram_qlen` + 1 messages (10 + 1 by default)
//!   from unconnected senders, whatever `SO_RCVBUF` says (the memory is charged to the sender),
//!   so the receive buffer is left alone; a plugin that sends faster than the daemon drains
//!   blocks in `sendto` (or gets `EAGAIN`). Mio is edge-triggered, so [`NotifySocket::recv_all`]
//!   drains until `WouldBlock`.

use std::fmt;
use std::fs;
use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr, sockopt};
use nix::unistd::{Pid, getpgid};

use crate::sys::socket::{ControlBuffer, RawDatagram, recv_raw};
use crate::sys::socket_file::SocketFile;

/// Largest payload accepted, in bytes (systemd's `NOTIFY_BUFFER_MAX` is the same page size);
/// anything larger is dropped whole, as a cut-off message could change meaning.
pub const MAX_DATAGRAM: usize = 4096;

/// Most file descriptors accepted with one message: the default `fdstore_max`. A message with
/// more is dropped and every fd that came with it closed; a plugin with a larger `fdstore_max`
/// parks its fds over several messages.
pub const MAX_FDS_PER_MESSAGE: usize = 16;

/// `STATUS=` text longer than this many bytes is cut (on a character boundary): it is a one-line
/// summary shown by `hotreloadctl`, not a log channel.
pub const MAX_STATUS_BYTES: usize = 256;

/// Longest valid `FDNAME=` (systemd's `FDNAME_MAX`).
pub const MAX_FDNAME_BYTES: usize = 255;

/// At most this many warnings per socket per [`WARN_WINDOW`]; the rest are counted and the count
/// is reported with the next warning that gets through.
const WARN_BURST: u32 = 5;
const WARN_WINDOW: Duration = Duration::from_secs(1);

/// A logged field value is cut to this many characters: it comes from an untrusted plugin.
const MAX_LOGGED_VALUE_CHARS: usize = 64;

/// One plugin's notify socket: an `AF_UNIX` `SOCK_DGRAM` socket bound at a path, non-blocking and
/// close-on-exec, with `SO_PASSCRED` on so that the kernel attaches the sender's credentials even
/// when the sender did not. The socket file is mode 0600; it is meant to live in a directory the
/// daemon made 0700, which is what keeps other users from sending to it.
///
/// Register it with mio directly (it implements [`mio::event::Source`]) or through
/// `SourceFd(&socket.fd())`; readiness is edge-triggered, so call [`NotifySocket::recv_all`] on
/// every readable event.
#[derive(Debug)]
pub struct NotifySocket {
    fd: OwnedFd,
    path: PathBuf,
    /// The socket file we bound: dropping us never unlinks a socket that a newer instance has
    /// since bound at the same path. Held only for its `Drop`.
    #[allow(dead_code)]
    bound_file: SocketFile,
    payload: Box<[u8]>,
    control: ControlBuffer,
    warnings: WarnLimiter,
    dropped: u64,
}

/// A message accepted from a plugin, with the sender's kernel-attested credentials.
#[derive(Debug)]
pub struct Datagram {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    pub message: Message,
    /// The fds sent with `SCM_RIGHTS`; never empty unless `message.fdstore` is set. Each is
    /// close-on-exec.
    pub fds: Vec<OwnedFd>,
    /// Fds that came with a message without FDSTORE=1 (systemd's `BARRIER=1`): closed when the
    /// datagram is dropped, i.e. after the caller has attributed the batch. A sender blocked on a
    /// barrier (`systemd-notify --ready`) thus stays alive, and attributable by its process group,
    /// until its earlier messages have been checked.
    pub held: Vec<OwnedFd>,
}

/// The assignments of one sd_notify message that the daemon understands; unknown keys are
/// ignored, as sd_notify(3) asks. Flags are set when any line is `KEY=1`; a valued key counts at
/// its first occurrence, and an invalid value leaves the field unset (see
/// [`parse_message_with_issues`] to learn why).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    /// `READY=1`.
    pub ready: bool,
    /// `RELOADING=1`.
    pub reloading: bool,
    /// `STOPPING=1`.
    pub stopping: bool,
    /// `WATCHDOG=1`.
    pub watchdog: bool,
    /// `WATCHDOG=trigger`: act as if the watchdog expired.
    pub watchdog_trigger: bool,
    /// `STATUS=`: at most [`MAX_STATUS_BYTES`], control characters replaced by U+FFFD (the text
    /// ends up on terminals). `Some("")` asks to clear the status.
    pub status: Option<String>,
    /// `EXTEND_TIMEOUT_USEC=`: decimal digits only.
    pub extend_timeout_usec: Option<u64>,
    /// `FDSTORE=1`.
    pub fdstore: bool,
    /// `FDSTOREREMOVE=1`.
    pub fdstore_remove: bool,
    /// `FDNAME=`: 1 to [`MAX_FDNAME_BYTES`] printable ASCII characters (space included), no `:`.
    pub fdname: Option<String>,
    /// `FDPOLL=0` / `FDPOLL=1`.
    pub fdpoll: Option<bool>,
    /// `ERRNO=`: a non-negative decimal.
    pub errno: Option<i32>,
    /// `MAINPID=`: a positive decimal.
    pub mainpid: Option<i32>,
}

/// Why a payload is not an sd_notify message at all; such a datagram is dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParseError {
    Empty,
    EmbeddedNul {
        offset: usize,
    },
    InvalidUtf8 {
        offset: usize,
    },
    /// Not one line of the form `KEY=VALUE`.
    NoAssignment,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Empty => write!(f, "empty message"),
            ParseError::EmbeddedNul { offset } => write!(f, "NUL byte at offset {offset}"),
            ParseError::InvalidUtf8 { offset } => write!(f, "invalid UTF-8 at offset {offset}"),
            ParseError::NoAssignment => write!(f, "no KEY=VALUE assignment in message"),
        }
    }
}

impl std::error::Error for ParseError {}

/// A known key whose value was invalid and therefore ignored; the rest of the message stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldIssue {
    pub key: &'static str,
    /// The value as sent, cut to a loggable length.
    pub value: String,
    /// What a valid value looks like.
    pub expected: &'static str,
}

impl fmt::Display for FieldIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ignoring {}={:?}: expected {}",
            self.key, self.value, self.expected
        )
    }
}

/// Parse an sd_notify payload: newline-separated `KEY=VALUE` lines, trailing newline optional.
/// Pure. Invalid values of known keys are dropped silently here; use
/// [`parse_message_with_issues`] to report them.
pub fn parse_message(bytes: &[u8]) -> Result<Message, ParseError> {
    parse_message_with_issues(bytes).map(|(message, _)| message)
}

/// [`parse_message`], also returning the known keys whose values were ignored. This follows
/// systemd, which applies the rest of a message when one field is invalid.
pub fn parse_message_with_issues(bytes: &[u8]) -> Result<(Message, Vec<FieldIssue>), ParseError> {
    let text = payload_text(bytes)?;
    let mut parser = Parser::default();
    let mut any_assignment = false;
    for line in text.split('\n') {
        if let Some((key, value)) = line.split_once('=')
            && !key.is_empty()
        {
            any_assignment = true;
            parser.assign(key, value);
        }
    }
    if !any_assignment {
        return Err(ParseError::NoAssignment);
    }
    Ok((parser.message, parser.issues))
}

/// Whether `pid` is alive and in process group `pgid`. False for a process that is gone, so a
/// message whose sender exited before it was read cannot be attributed (as with systemd). A pid
/// can be reused, but only after the sender was reaped, and within one drain that window is
/// small; pidfds would close it.
pub fn sender_in_group(pid: i32, pgid: i32) -> bool {
    // getpgid(0) means "the caller", which must never vouch for a sender.
    if pid <= 0 || pgid <= 0 {
        return false;
    }
    getpgid(Some(Pid::from_raw(pid))) == Ok(Pid::from_raw(pgid))
}

impl NotifySocket {
    /// Bind a notify socket at `path`, replacing a stale socket file left there by an earlier
    /// run. Anything at `path` that is not a socket is left alone and is an error.
    pub fn bind(path: &Path) -> io::Result<NotifySocket> {
        remove_stale_socket(path)?;
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| path_error(path, "create notify socket for", e.into()))?;
        socket::setsockopt(&fd, sockopt::PassCred, &true)
            .map_err(|e| path_error(path, "enable SO_PASSCRED on notify socket", e.into()))?;
        let addr = UnixAddr::new(path).map_err(|e| bind_error(path, e))?;
        socket::bind(fd.as_raw_fd(), &addr).map_err(|e| bind_error(path, e))?;
        let bound_file = restrict_socket_file(path).inspect_err(|_| {
            let _ = fs::remove_file(path);
        })?;
        Ok(NotifySocket {
            fd,
            path: path.to_path_buf(),
            bound_file,
            payload: vec![0; MAX_DATAGRAM].into_boxed_slice(),
            control: ControlBuffer::new(MAX_FDS_PER_MESSAGE),
            warnings: WarnLimiter::default(),
            dropped: 0,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Datagrams dropped so far (oversized, truncated control data, no credentials, malformed).
    pub fn dropped_count(&self) -> u64 {
        self.dropped
    }

    /// Receive every queued datagram, until the socket would block. Malformed ones are dropped
    /// here with a rate-limited warning and never returned; so are their fds.
    pub fn recv_all(&mut self) -> Vec<Datagram> {
        let mut accepted = Vec::new();
        loop {
            let raw = match recv_raw(&self.fd, &mut self.payload, &mut self.control) {
                Ok(raw) => raw,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.warn(format_args!("receive failed: {e}"));
                    break;
                }
            };
            let pid = raw.creds.map(|c| c.pid);
            match accept(raw, &self.payload) {
                Ok((datagram, issues)) => {
                    for issue in &issues {
                        self.warn(format_args!("message from pid {}: {issue}", datagram.pid));
                    }
                    accepted.push(datagram);
                }
                Err(reason) => {
                    self.dropped += 1;
                    match pid {
                        Some(pid) => {
                            self.warn(format_args!("dropped datagram from pid {pid}: {reason}"))
                        }
                        None => self.warn(format_args!("dropped datagram: {reason}")),
                    }
                }
            }
        }
        accepted
    }

    fn warn(&mut self, what: fmt::Arguments<'_>) {
        if let WarnVerdict::Log { suppressed } = self.warnings.check(Instant::now()) {
            let path = self.path.display();
            if suppressed == 0 {
                log::warn!("notify socket `{path}`: {what}");
            } else {
                log::warn!(
                    "notify socket `{path}`: {what} ({suppressed} similar warnings suppressed)"
                );
            }
        }
    }
}

impl AsFd for NotifySocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for NotifySocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl mio::event::Source for NotifySocket {
    fn register(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        mio::unix::SourceFd(&self.fd.as_raw_fd()).register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        mio::unix::SourceFd(&self.fd.as_raw_fd()).reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &mio::Registry) -> io::Result<()> {
        mio::unix::SourceFd(&self.fd.as_raw_fd()).deregister(registry)
    }
}

fn path_error(path: &Path, action: &str, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("failed to {action} `{}`: {e}", path.display()),
    )
}

fn bind_error(path: &Path, errno: nix::errno::Errno) -> io::Error {
    if errno == nix::errno::Errno::ENAMETOOLONG {
        let limit =
            mem::size_of::<libc::sockaddr_un>() - mem::offset_of!(libc::sockaddr_un, sun_path) - 1;
        return io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "failed to bind notify socket `{}`: path longer than {limit} bytes; use a shorter runtime directory",
                path.display()
            ),
        );
    }
    path_error(path, "bind notify socket", errno.into())
}

/// Remove a socket file left by an earlier run, so that `bind` does not fail with `EADDRINUSE`.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            fs::remove_file(path).map_err(|e| path_error(path, "remove stale notify socket", e))
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "notify socket path `{}` exists and is not a socket; remove it",
                path.display()
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(path_error(path, "inspect notify socket path", e)),
    }
}

/// Make the freshly bound socket file 0600 and return its identity. `bind` creates it with the
/// umask's mode; the 0700 directory keeps others out during that window.
fn restrict_socket_file(path: &Path) -> io::Result<SocketFile> {
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(|e| path_error(path, "set mode 0600 on notify socket", e))?;
    SocketFile::claim(path).map_err(|e| path_error(path, "inspect notify socket", e))
}

/// Why a received datagram was dropped.
#[derive(Debug, PartialEq, Eq)]
enum DropReason {
    Oversized,
    ControlTruncated,
    NoCredentials,
    Malformed(ParseError),
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DropReason::Oversized => write!(f, "larger than {MAX_DATAGRAM} bytes"),
            DropReason::ControlTruncated => write!(
                f,
                "control data truncated (more than {MAX_FDS_PER_MESSAGE} file descriptors?); closed its fds"
            ),
            DropReason::NoCredentials => write!(f, "no valid sender credentials (SCM_CREDENTIALS)"),
            DropReason::Malformed(e) => write!(f, "not an sd_notify message: {e}"),
        }
    }
}

/// Apply systemd's `notify_recv()` rules to a received datagram whose payload is
/// `payload[..raw.len]`.
fn accept(raw: RawDatagram, payload: &[u8]) -> Result<(Datagram, Vec<FieldIssue>), DropReason> {
    if raw.flags & libc::MSG_TRUNC != 0 {
        return Err(DropReason::Oversized);
    }
    if raw.flags & libc::MSG_CTRUNC != 0 {
        return Err(DropReason::ControlTruncated);
    }
    // The kernel reports pid 0 for a sender outside our pid namespace: not attributable.
    let creds = raw
        .creds
        .filter(|c| c.pid > 0)
        .ok_or(DropReason::NoCredentials)?;
    let (message, issues) =
        parse_message_with_issues(&payload[..raw.len]).map_err(DropReason::Malformed)?;
    let (fds, held) = if message.fdstore {
        (raw.fds, Vec::new())
    } else {
        (Vec::new(), raw.fds)
    };
    let datagram = Datagram {
        held,
        pid: creds.pid,
        uid: creds.uid,
        gid: creds.gid,
        message,
        fds,
    };
    Ok((datagram, issues))
}

/// The payload as text, or why it is not an sd_notify message.
fn payload_text(bytes: &[u8]) -> Result<&str, ParseError> {
    if bytes.is_empty() {
        return Err(ParseError::Empty);
    }
    if let Some(offset) = bytes.iter().position(|&b| b == 0) {
        return Err(ParseError::EmbeddedNul { offset });
    }
    std::str::from_utf8(bytes).map_err(|e| ParseError::InvalidUtf8 {
        offset: e.valid_up_to(),
    })
}

/// Accumulates one message's assignments.
#[derive(Default)]
struct Parser {
    message: Message,
    issues: Vec<FieldIssue>,
    /// Valued keys already met: only a key's first occurrence counts, as in systemd.
    seen: Vec<&'static str>,
}

impl Parser {
    fn assign(&mut self, key: &str, value: &str) {
        match key {
            "READY" => self.message.ready |= self.flag("READY", value),
            "RELOADING" => self.message.reloading |= self.flag("RELOADING", value),
            "STOPPING" => self.message.stopping |= self.flag("STOPPING", value),
            "FDSTORE" => self.message.fdstore |= self.flag("FDSTORE", value),
            "FDSTOREREMOVE" => self.message.fdstore_remove |= self.flag("FDSTOREREMOVE", value),
            "WATCHDOG" => match value {
                "1" => self.message.watchdog = true,
                "trigger" => self.message.watchdog_trigger = true,
                _ => self.issue("WATCHDOG", value, "1 or trigger"),
            },
            "STATUS" if self.first("STATUS") => self.message.status = Some(status_text(value)),
            "EXTEND_TIMEOUT_USEC" if self.first("EXTEND_TIMEOUT_USEC") => {
                self.message.extend_timeout_usec = self.value(
                    "EXTEND_TIMEOUT_USEC",
                    value,
                    parse_decimal,
                    "microseconds as decimal digits",
                )
            }
            "FDNAME" if self.first("FDNAME") => {
                self.message.fdname = self.value(
                    "FDNAME",
                    value,
                    |v| fdname_is_valid(v).then(|| v.to_owned()),
                    "1 to 255 printable ASCII characters without ':'",
                )
            }
            "FDPOLL" if self.first("FDPOLL") => {
                self.message.fdpoll = self.value("FDPOLL", value, parse_bool_digit, "0 or 1")
            }
            "ERRNO" if self.first("ERRNO") => {
                self.message.errno =
                    self.value("ERRNO", value, parse_decimal, "a non-negative errno number")
            }
            "MAINPID" if self.first("MAINPID") => {
                let positive = |v: &str| parse_decimal::<i32>(v).filter(|&pid| pid > 0);
                self.message.mainpid = self.value("MAINPID", value, positive, "a positive pid")
            }
            _ => {}
        }
    }

    /// True for `KEY=1`; anything else (`READY=0` is undefined in sd_notify(3)) is an issue.
    fn flag(&mut self, key: &'static str, value: &str) -> bool {
        if value == "1" {
            return true;
        }
        self.issue(key, value, "1");
        false
    }

    fn first(&mut self, key: &'static str) -> bool {
        if self.seen.contains(&key) {
            return false;
        }
        self.seen.push(key);
        true
    }

    fn value<T>(
        &mut self,
        key: &'static str,
        value: &str,
        parse: impl FnOnce(&str) -> Option<T>,
        expected: &'static str,
    ) -> Option<T> {
        let parsed = parse(value);
        if parsed.is_none() {
            self.issue(key, value, expected);
        }
        parsed
    }

    fn issue(&mut self, key: &'static str, value: &str, expected: &'static str) {
        let value = value.chars().take(MAX_LOGGED_VALUE_CHARS).collect();
        self.issues.push(FieldIssue {
            key,
            value,
            expected,
        });
    }
}

/// Strict unsigned decimal: digits only (no sign, no spaces), no overflow.
fn parse_decimal<T: std::str::FromStr>(value: &str) -> Option<T> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

fn parse_bool_digit(value: &str) -> Option<bool> {
    match value {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

/// systemd's rule for names that end up in `LISTEN_FDNAMES` (colon-separated), minus the empty
/// name, which could not be told apart from "unnamed" there.
fn fdname_is_valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_FDNAME_BYTES
        && name
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b':')
}

/// The status as shown: control characters replaced (the text is printed on terminals, where an
/// escape sequence from a plugin must not act), cut to [`MAX_STATUS_BYTES`] on a char boundary.
fn status_text(value: &str) -> String {
    let mut text = String::with_capacity(value.len().min(MAX_STATUS_BYTES));
    for c in value.chars() {
        let c = if c.is_control() {
            char::REPLACEMENT_CHARACTER
        } else {
            c
        };
        if text.len() + c.len_utf8() > MAX_STATUS_BYTES {
            break;
        }
        text.push(c);
    }
    text
}

/// Per-socket warning budget: [`WARN_BURST`] per [`WARN_WINDOW`], so a misbehaving plugin cannot
/// flood the log. Pure: the caller passes the time.
#[derive(Debug, Default)]
struct WarnLimiter {
    window_start: Option<Instant>,
    logged_in_window: u32,
    suppressed: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum WarnVerdict {
    /// Log it, mentioning how many were suppressed since the last one logged.
    Log {
        suppressed: u64,
    },
    Suppress,
}

impl WarnLimiter {
    fn check(&mut self, now: Instant) -> WarnVerdict {
        let expired = self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= WARN_WINDOW);
        if expired {
            self.window_start = Some(now);
            self.logged_in_window = 0;
        }
        if self.logged_in_window >= WARN_BURST {
            self.suppressed += 1;
            return WarnVerdict::Suppress;
        }
        self.logged_in_window += 1;
        WarnVerdict::Log {
            suppressed: mem::take(&mut self.suppressed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::TestDir;
    use nix::sys::memfd::{MFdFlags, memfd_create};
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use nix::unistd::{getpgrp, getpid, getuid, pipe, read, write};
    use std::io::IoSlice;
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::net::UnixDatagram;

    // ---- parsing ----

    fn parsed(text: &str) -> Message {
        parse_message(text.as_bytes()).unwrap()
    }

    fn issues(text: &str) -> Vec<FieldIssue> {
        parse_message_with_issues(text.as_bytes()).unwrap().1
    }

    #[test]
    fn every_key_is_understood() {
        let cases: Vec<(&str, Message)> = vec![
            (
                "READY=1",
                Message {
                    ready: true,
                    ..Default::default()
                },
            ),
            (
                "RELOADING=1",
                Message {
                    reloading: true,
                    ..Default::default()
                },
            ),
            (
                "STOPPING=1",
                Message {
                    stopping: true,
                    ..Default::default()
                },
            ),
            (
                "WATCHDOG=1",
                Message {
                    watchdog: true,
                    ..Default::default()
                },
            ),
            (
                "WATCHDOG=trigger",
                Message {
                    watchdog_trigger: true,
                    ..Default::default()
                },
            ),
            (
                "STATUS=3 jobs",
                Message {
                    status: Some("3 jobs".into()),
                    ..Default::default()
                },
            ),
            (
                "STATUS=",
                Message {
                    status: Some(String::new()),
                    ..Default::default()
                },
            ),
            (
                "EXTEND_TIMEOUT_USEC=5000000",
                Message {
                    extend_timeout_usec: Some(5_000_000),
                    ..Default::default()
                },
            ),
            (
                "FDSTORE=1",
                Message {
                    fdstore: true,
                    ..Default::default()
                },
            ),
            (
                "FDSTOREREMOVE=1",
                Message {
                    fdstore_remove: true,
                    ..Default::default()
                },
            ),
            (
                "FDNAME=state",
                Message {
                    fdname: Some("state".into()),
                    ..Default::default()
                },
            ),
            (
                "FDPOLL=0",
                Message {
                    fdpoll: Some(false),
                    ..Default::default()
                },
            ),
            (
                "FDPOLL=1",
                Message {
                    fdpoll: Some(true),
                    ..Default::default()
                },
            ),
            (
                "ERRNO=2",
                Message {
                    errno: Some(2),
                    ..Default::default()
                },
            ),
            (
                "MAINPID=4242",
                Message {
                    mainpid: Some(4242),
                    ..Default::default()
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parsed(text), want, "{text}");
            assert_eq!(issues(text), vec![], "{text}");
        }
    }

    #[test]
    fn several_keys_trailing_newline_and_unknown_keys() {
        let want = Message {
            ready: true,
            status: Some("up".into()),
            fdstore: true,
            fdname: Some("conn 1".into()),
            ..Default::default()
        };
        assert_eq!(parsed("READY=1\nSTATUS=up\nFDSTORE=1\nFDNAME=conn 1"), want);
        assert_eq!(
            parsed("READY=1\nSTATUS=up\nFDSTORE=1\nFDNAME=conn 1\n"),
            want
        );
        assert_eq!(
            parsed(
                "X_PLUGIN_JOBS=3\nREADY=1\n\nMONOTONIC_USEC=12\nnot an assignment\nSTATUS=up\nFDSTORE=1\nFDNAME=conn 1\n"
            ),
            want
        );
        assert_eq!(parsed("X_ONLY=1"), Message::default());
    }

    #[test]
    fn keys_are_case_sensitive_and_values_exact() {
        assert_eq!(parsed("ready=1"), Message::default());
        assert_eq!(parsed("READY=1\r"), Message::default());
        assert_eq!(parsed("READY= 1"), Message::default());
    }

    #[test]
    fn valued_keys_count_at_first_occurrence_and_flags_anywhere() {
        assert_eq!(parsed("STATUS=a\nSTATUS=b").status.as_deref(), Some("a"));
        let m = parsed("EXTEND_TIMEOUT_USEC=x\nEXTEND_TIMEOUT_USEC=5");
        assert_eq!(m.extend_timeout_usec, None);
        assert!(parsed("READY=0\nREADY=1").ready);
        let m = parsed("WATCHDOG=1\nWATCHDOG=trigger");
        assert!(m.watchdog && m.watchdog_trigger);
    }

    #[test]
    fn garbage_is_a_parse_error() {
        assert_eq!(parse_message(b""), Err(ParseError::Empty));
        assert_eq!(
            parse_message(b"READY=1\0"),
            Err(ParseError::EmbeddedNul { offset: 7 })
        );
        assert_eq!(
            parse_message(b"STATUS=\xff"),
            Err(ParseError::InvalidUtf8 { offset: 7 })
        );
        assert_eq!(parse_message(b"hello world"), Err(ParseError::NoAssignment));
        assert_eq!(parse_message(b"\n\n"), Err(ParseError::NoAssignment));
        assert_eq!(parse_message(b"=1"), Err(ParseError::NoAssignment));
    }

    #[test]
    fn long_status_is_cut_on_a_char_boundary() {
        // 255 ASCII bytes then a 2-byte char: the char would cross the cap and must not be split.
        let text = format!("STATUS={}é tail", "a".repeat(MAX_STATUS_BYTES - 1));
        let status = parsed(&text).status.unwrap();
        assert_eq!(status, "a".repeat(MAX_STATUS_BYTES - 1));
        let status = parsed(&format!("STATUS={}", "é".repeat(400)))
            .status
            .unwrap();
        assert_eq!(status.len(), MAX_STATUS_BYTES);
    }

    #[test]
    fn control_characters_in_status_are_replaced() {
        let status = parsed("STATUS=\x1b[2Jred\tx").status.unwrap();
        assert_eq!(status, "\u{fffd}[2Jred\u{fffd}x");
    }

    #[test]
    fn bad_values_are_ignored_and_reported() {
        let cases = [
            ("EXTEND_TIMEOUT_USEC=abc", "EXTEND_TIMEOUT_USEC"),
            ("EXTEND_TIMEOUT_USEC=-1", "EXTEND_TIMEOUT_USEC"),
            ("EXTEND_TIMEOUT_USEC=+5", "EXTEND_TIMEOUT_USEC"),
            ("EXTEND_TIMEOUT_USEC=", "EXTEND_TIMEOUT_USEC"),
            (
                "EXTEND_TIMEOUT_USEC=18446744073709551616",
                "EXTEND_TIMEOUT_USEC",
            ),
            ("ERRNO=-1", "ERRNO"),
            ("ERRNO=2147483648", "ERRNO"),
            ("MAINPID=0", "MAINPID"),
            ("MAINPID=12x", "MAINPID"),
            ("FDPOLL=2", "FDPOLL"),
            ("FDNAME=a:b", "FDNAME"),
            ("FDNAME=", "FDNAME"),
            ("FDNAME=tab\there", "FDNAME"),
            ("FDNAME=café", "FDNAME"),
            ("READY=0", "READY"),
            ("STOPPING=yes", "STOPPING"),
            ("WATCHDOG=2", "WATCHDOG"),
        ];
        for (text, key) in cases {
            let (message, found) =
                parse_message_with_issues(format!("{text}\nSTATUS=ok").as_bytes()).unwrap();
            assert_eq!(
                message,
                Message {
                    status: Some("ok".into()),
                    ..Default::default()
                },
                "{text}"
            );
            assert_eq!(found.len(), 1, "{text}");
            assert_eq!(found[0].key, key, "{text}");
        }
        assert_eq!(
            parsed("EXTEND_TIMEOUT_USEC=18446744073709551615").extend_timeout_usec,
            Some(u64::MAX)
        );
    }

    #[test]
    fn fdname_length_limit() {
        let longest = "n".repeat(MAX_FDNAME_BYTES);
        assert_eq!(
            parsed(&format!("FDNAME={longest}")).fdname,
            Some(longest.clone())
        );
        assert_eq!(parsed(&format!("FDNAME={longest}n")).fdname, None);
        assert_eq!(parsed("FDNAME=~ !").fdname.as_deref(), Some("~ !"));
    }

    #[test]
    fn issue_values_are_cut_for_logging() {
        let found = issues(&format!("FDNAME={}", ":".repeat(1000)));
        assert_eq!(found[0].value.chars().count(), MAX_LOGGED_VALUE_CHARS);
        assert_eq!(
            found[0].to_string(),
            format!(
                "ignoring FDNAME={:?}: expected 1 to 255 printable ASCII characters without ':'",
                found[0].value
            )
        );
    }

    // ---- receive rules without a socket ----

    fn creds() -> libc::ucred {
        libc::ucred {
            pid: 42,
            uid: 1000,
            gid: 1000,
        }
    }

    fn raw(payload: &[u8], creds: Option<libc::ucred>, flags: libc::c_int) -> RawDatagram {
        RawDatagram {
            len: payload.len(),
            flags,
            creds,
            fds: Vec::new(),
        }
    }

    #[test]
    fn accept_applies_notify_recv_rules() {
        let ok = accept(raw(b"READY=1", Some(creds()), 0), b"READY=1")
            .unwrap()
            .0;
        assert_eq!(
            (ok.pid, ok.uid, ok.gid, ok.message.ready),
            (42, 1000, 1000, true)
        );
        let reason = |r: RawDatagram, p: &[u8]| accept(r, p).err();
        assert_eq!(
            reason(raw(b"READY=1", None, 0), b"READY=1"),
            Some(DropReason::NoCredentials)
        );
        let pid0 = libc::ucred { pid: 0, ..creds() };
        assert_eq!(
            reason(raw(b"READY=1", Some(pid0), 0), b"READY=1"),
            Some(DropReason::NoCredentials)
        );
        assert_eq!(
            reason(raw(b"READY=1", Some(creds()), libc::MSG_TRUNC), b"READY=1"),
            Some(DropReason::Oversized)
        );
        assert_eq!(
            reason(raw(b"READY=1", Some(creds()), libc::MSG_CTRUNC), b"READY=1"),
            Some(DropReason::ControlTruncated)
        );
        assert_eq!(
            reason(raw(b"", Some(creds()), 0), b""),
            Some(DropReason::Malformed(ParseError::Empty))
        );
    }

    #[test]
    fn warn_limiter_allows_a_burst_per_window_and_counts_the_rest() {
        let mut limiter = WarnLimiter::default();
        let t0 = Instant::now();
        for _ in 0..WARN_BURST {
            assert_eq!(limiter.check(t0), WarnVerdict::Log { suppressed: 0 });
        }
        for _ in 0..7 {
            assert_eq!(
                limiter.check(t0 + Duration::from_millis(500)),
                WarnVerdict::Suppress
            );
        }
        assert_eq!(
            limiter.check(t0 + WARN_WINDOW),
            WarnVerdict::Log { suppressed: 7 }
        );
        assert_eq!(
            limiter.check(t0 + WARN_WINDOW),
            WarnVerdict::Log { suppressed: 0 }
        );
    }

    // ---- real sockets ----

    fn bound(t: &TestDir) -> NotifySocket {
        NotifySocket::bind(&t.join("notify.sock")).unwrap()
    }

    fn sender() -> UnixDatagram {
        UnixDatagram::unbound().unwrap()
    }

    fn send_with_fds(to: &Path, payload: &[u8], fds: &[RawFd]) {
        let sock = sender();
        let addr = UnixAddr::new(to).unwrap();
        let cmsgs = [ControlMessage::ScmRights(fds)];
        let iov = [IoSlice::new(payload)];
        sendmsg(
            sock.as_raw_fd(),
            &iov,
            &cmsgs,
            MsgFlags::empty(),
            Some(&addr),
        )
        .unwrap();
    }

    /// Whether the read end of a pipe sees end-of-file within 10 s, i.e. every copy of the write
    /// end is closed (a process-wide fd count would race with the other tests' fds).
    fn pipe_reaches_eof(read_end: &OwnedFd) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut byte = [0u8; 1];
        nix::fcntl::fcntl(
            read_end,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .unwrap();
        while Instant::now() < deadline {
            match read(read_end, &mut byte) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(nix::errno::Errno::EAGAIN) => std::thread::yield_now(),
                Err(e) => panic!("read: {e}"),
            }
        }
        false
    }

    #[test]
    fn bind_makes_a_private_socket_and_drop_removes_it() {
        let t = TestDir::new("pnotify-bind");
        let path = t.join("notify.sock");
        let socket = NotifySocket::bind(&path).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(socket.path(), path);
        let flags = nix::fcntl::fcntl(&socket, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_ne!(flags & libc::O_NONBLOCK, 0);
        let fd_flags = nix::fcntl::fcntl(&socket, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(fd_flags & libc::FD_CLOEXEC, 0);
        assert!(socket::getsockopt(&socket, sockopt::PassCred).unwrap());
        drop(socket);
        assert!(!path.exists());
    }

    #[test]
    fn bind_replaces_a_stale_socket_but_not_other_files() {
        let t = TestDir::new("pnotify-stale");
        let path = t.join("notify.sock");
        let stale = UnixDatagram::bind(&path).unwrap();
        drop(stale);
        let socket = NotifySocket::bind(&path).unwrap();
        drop(socket);

        fs::write(&path, b"data").unwrap();
        let err = NotifySocket::bind(&path).unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"data");
    }

    #[test]
    fn drop_leaves_a_socket_bound_later_at_the_same_path() {
        let t = TestDir::new("pnotify-replaced");
        let path = t.join("notify.sock");
        let old = NotifySocket::bind(&path).unwrap();
        let new = NotifySocket::bind(&path).unwrap();
        drop(old);
        assert!(path.exists());
        sender().send_to(b"READY=1", &path).unwrap();
        assert_eq!(new.fd(), new.as_raw_fd());
        let mut new = new;
        assert_eq!(new.recv_all().len(), 1);
    }

    #[test]
    fn bind_errors_name_the_path() {
        let t = TestDir::new("pnotify-errors");
        let missing = t.join("no-such-dir/notify.sock");
        let err = NotifySocket::bind(&missing).unwrap_err();
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );

        let long = t.join(&"x".repeat(120));
        let err = NotifySocket::bind(&long).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(
            err.to_string().contains("path longer than 107 bytes"),
            "{err}"
        );
        assert!(
            err.to_string().contains(&long.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn receives_a_message_with_the_senders_credentials() {
        let t = TestDir::new("pnotify-recv");
        let mut socket = bound(&t);
        assert!(socket.recv_all().is_empty());
        sender()
            .send_to(b"READY=1\nSTATUS=serving", socket.path())
            .unwrap();
        let got = socket.recv_all();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].pid, getpid().as_raw());
        assert_eq!(got[0].uid, getuid().as_raw());
        assert_eq!(got[0].gid, nix::unistd::getgid().as_raw());
        assert_eq!(
            got[0].message,
            Message {
                ready: true,
                status: Some("serving".into()),
                ..Default::default()
            }
        );
        assert!(got[0].fds.is_empty());
    }

    #[test]
    fn oversized_and_garbage_datagrams_are_dropped_and_the_next_one_received() {
        let t = TestDir::new("pnotify-oversized");
        let mut socket = bound(&t);
        let tx = sender();
        let mut huge = b"STATUS=".to_vec();
        huge.resize(64 * 1024, b'a');
        tx.send_to(&huge, socket.path()).unwrap();
        let mut just_over = b"STATUS=".to_vec();
        just_over.resize(MAX_DATAGRAM + 1, b'a');
        tx.send_to(&just_over, socket.path()).unwrap();
        tx.send_to(b"READY=1\xff", socket.path()).unwrap();
        tx.send_to(b"", socket.path()).unwrap();
        let mut largest = b"STATUS=".to_vec();
        largest.resize(MAX_DATAGRAM, b'b');
        tx.send_to(&largest, socket.path()).unwrap();
        tx.send_to(b"STOPPING=1", socket.path()).unwrap();
        let got = socket.recv_all();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].message.status, Some("b".repeat(MAX_STATUS_BYTES)));
        assert!(got[1].message.stopping);
        assert_eq!(socket.dropped_count(), 4);
    }

    #[test]
    fn fds_sent_with_fdstore_come_back_usable() {
        let t = TestDir::new("pnotify-fdstore");
        let mut socket = bound(&t);
        let memfd = memfd_create("plugin-state", MFdFlags::MFD_CLOEXEC).unwrap();
        write(&memfd, b"jobs=3").unwrap();
        let (read_end, write_end) = pipe().unwrap();
        send_with_fds(
            socket.path(),
            b"FDSTORE=1\nFDNAME=state",
            &[memfd.as_raw_fd(), write_end.as_raw_fd()],
        );
        drop(write_end);
        let mut got = socket.recv_all();
        assert_eq!(got.len(), 1);
        let datagram = got.remove(0);
        assert!(datagram.message.fdstore);
        assert_eq!(datagram.message.fdname.as_deref(), Some("state"));
        assert_eq!(datagram.fds.len(), 2);
        for fd in &datagram.fds {
            let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(
                flags & libc::FD_CLOEXEC,
                0,
                "received fds must be close-on-exec"
            );
        }

        let mut state = [0u8; 16];
        let n = nix::sys::uio::pread(&datagram.fds[0], &mut state, 0).unwrap();
        assert_eq!(&state[..n], b"jobs=3");
        write(&datagram.fds[1], b"x").unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(read(&read_end, &mut byte).unwrap(), 1);
        assert_eq!(&byte, b"x");
        drop(datagram);
        assert!(pipe_reaches_eof(&read_end));
    }

    #[test]
    fn fds_sent_without_fdstore_are_closed() {
        let t = TestDir::new("pnotify-nofdstore");
        let mut socket = bound(&t);
        let (read_end, write_end) = pipe().unwrap();
        send_with_fds(socket.path(), b"BARRIER=1", &[write_end.as_raw_fd()]);
        drop(write_end);
        let got = socket.recv_all();
        assert_eq!(got.len(), 1);
        assert!(got[0].fds.is_empty());
        assert_eq!(got[0].held.len(), 1, "held until the datagram is dropped");
        drop(got);
        assert!(pipe_reaches_eof(&read_end));
    }

    #[test]
    fn too_many_fds_drop_the_message_and_close_the_ones_that_arrived() {
        let t = TestDir::new("pnotify-ctrunc");
        let mut socket = bound(&t);
        let (read_end, write_end) = pipe().unwrap();
        let copies = vec![write_end.as_raw_fd(); MAX_FDS_PER_MESSAGE + 1];
        send_with_fds(socket.path(), b"FDSTORE=1", &copies);
        drop(write_end);
        assert!(socket.recv_all().is_empty());
        assert_eq!(socket.dropped_count(), 1);
        assert!(pipe_reaches_eof(&read_end));

        // Exactly the maximum is fine.
        let (_read_end, write_end) = pipe().unwrap();
        send_with_fds(
            socket.path(),
            b"FDSTORE=1",
            &[write_end.as_raw_fd(); MAX_FDS_PER_MESSAGE],
        );
        let got = socket.recv_all();
        assert_eq!(got[0].fds.len(), MAX_FDS_PER_MESSAGE);
    }

    #[test]
    fn fds_on_a_malformed_message_are_closed() {
        let t = TestDir::new("pnotify-badfds");
        let mut socket = bound(&t);
        let (read_end, write_end) = pipe().unwrap();
        send_with_fds(socket.path(), b"FDSTORE=1\0", &[write_end.as_raw_fd()]);
        drop(write_end);
        assert!(socket.recv_all().is_empty());
        assert!(pipe_reaches_eof(&read_end));
    }

    #[test]
    fn one_recv_all_drains_a_full_queue() {
        let t = TestDir::new("pnotify-drain");
        let mut socket = bound(&t);
        let tx = sender();
        tx.set_nonblocking(true).unwrap();
        // The kernel caps the queue at net.unix.max_dgram_qlen + 1; fill it to the brim.
        let mut queued = 0;
        loop {
            match tx.send_to(format!("STATUS={queued}").as_bytes(), socket.path()) {
                Ok(_) => queued += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("send: {e}"),
            }
            assert!(queued < 100_000, "queue never filled");
        }
        assert!(queued > 1);
        let got = socket.recv_all();
        assert_eq!(got.len(), queued);
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d.message.status, Some(i.to_string()));
        }
        assert!(socket.recv_all().is_empty());
    }

    #[test]
    fn a_thousand_datagrams_arrive_through_mio_in_order() {
        const TOTAL: usize = 1000;
        let t = TestDir::new("pnotify-mio");
        let mut socket = bound(&t);
        let mut poll = mio::Poll::new().unwrap();
        let mut events = mio::Events::with_capacity(8);
        poll.registry()
            .register(&mut socket, mio::Token(7), mio::Interest::READABLE)
            .unwrap();
        let path = socket.path().to_path_buf();
        // Blocking sends: the sender waits whenever the small kernel queue is full.
        let sending = std::thread::spawn(move || {
            let tx = sender();
            for i in 0..TOTAL {
                tx.send_to(format!("WATCHDOG=1\nSTATUS={i}").as_bytes(), &path)
                    .unwrap();
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut got = Vec::new();
        while got.len() < TOTAL && Instant::now() < deadline {
            poll.poll(&mut events, Some(Duration::from_millis(100)))
                .unwrap();
            for event in events.iter() {
                assert_eq!(event.token(), mio::Token(7));
                got.extend(socket.recv_all());
            }
        }
        sending.join().unwrap();
        assert_eq!(got.len(), TOTAL);
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d.message.status, Some(i.to_string()));
            assert!(d.message.watchdog);
        }
        poll.registry().deregister(&mut socket).unwrap();
    }

    #[test]
    fn sender_in_group_checks_the_process_group() {
        let me = getpid().as_raw();
        let group = getpgrp().as_raw();
        assert!(sender_in_group(me, group));
        assert!(!sender_in_group(me, group + 1));
        assert!(!sender_in_group(i32::MAX, group)); // beyond any pid_max
        assert!(!sender_in_group(0, group));
        assert!(!sender_in_group(-1, group));
        assert!(!sender_in_group(me, 0));
    }
}
