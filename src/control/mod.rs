//! The control socket server (SPEC §6): a Unix stream listener and its clients, driven by the
//! daemon's single-threaded mio loop.
//!
//! The server owns the socket file, the lock that keeps a second daemon away from it, and every
//! client's buffers. It parses requests, enforces who may run mutating commands, keeps answers in
//! request order and delivers events to subscribers; it never executes a command itself. It hands
//! each complete request to the daemon ([`ControlServer::next_request`]), and the daemon answers
//! it ([`ControlServer::reply`], [`ControlServer::subscribe`]) at once or, after
//! [`ControlServer::defer`], later. A client with a request outstanding reads no further request
//! until it is answered, so pipelined requests are answered in order; other clients are
//! unaffected. The server never calls the daemon, so each side is tested without the other.
//!
//! Nothing here may stall the loop or grow without bound because of a client:
//! - sockets are non-blocking and registered once, edge-triggered, for reading and writing;
//! - a client gets at most [`LINES_PER_TURN`] requests served per loop turn, then waits for the
//!   next turn (re-armed readiness), so one pipelining client cannot starve the others;
//! - input is bounded by `max_line_bytes` plus one read chunk, output by `max_out_bytes` (a
//!   client that does not read its answers stops being served until it does; a subscriber that
//!   does not read loses events and is told how many with a `lagged` event);
//! - an event is serialised once and shared by all subscribers, and dropping one costs O(1).
//!
//! Binding follows linux-pitfalls §6.1: a lock file, a connect probe to tell a live daemon from
//! a stale socket file, and a socket created owner-only at a temporary name, given its mode
//! and group, then renamed into place, so it is never reachable with wider permissions.

mod conn;

/// The wire format, shared with the daemon and `hotreloadctl`.
pub use crate::protocol;

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, getsockopt, listen, socket,
    sockopt::PeerCredentials,
};
use nix::sys::stat::{Mode, fchmod};
use nix::unistd::{Gid, Group};

use crate::sys::socket_file::{self, FileId, Occupant, Removal, SocketFile};
use conn::{Conn, NextLine};
use protocol::{ErrorCode, Request};

/// The group the socket file gets by default (SPEC §3 `control.group`). Its absence is normal
/// (e.g. a `--user` daemon), so it is only logged at debug level; another, explicitly configured
/// group that does not exist is a warning.
pub const DEFAULT_GROUP: &str = "hotreload";

/// Requests served for one client per loop turn before the others get their turn.
pub const LINES_PER_TURN: usize = 128;

/// How many mio tokens the server owns, starting at `token_base`: the listener and its clients.
const TOKEN_SPAN: u64 = 1 << 32;

/// Resource limits for the control socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connected clients at most; the next one gets `too_many_clients` and is closed.
    pub max_clients: usize,
    /// Longest request line, without its newline.
    pub max_line_bytes: usize,
    /// Output queued for one client beyond which requests wait and events are dropped.
    pub max_out_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_clients: 256,
            max_line_bytes: 65536,
            max_out_bytes: 1 << 20,
        }
    }
}

/// Credentials of a connected client, read once at accept (`SO_PEERCRED`, `SO_PEERGROUPS`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    /// Supplementary groups; empty when the kernel cannot tell (`SO_PEERGROUPS` needs 4.13).
    pub groups: Vec<u32>,
}

/// Identifies a client for the daemon's whole lifetime: ids are never reused, so a late
/// [`ControlServer::reply`] can never reach a newer client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientId(u64);

#[cfg(test)]
impl ClientId {
    /// A client id for tests that play the daemon's side without a server.
    pub fn for_tests(n: u64) -> ClientId {
        ClientId(n)
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A complete, permitted request read from a client, for the daemon to execute. The client
/// reads no further request until this one is answered.
#[derive(Clone, Debug, PartialEq)]
pub struct Incoming {
    pub client: ClientId,
    /// Who sent it (already checked against [`AuthPolicy`] for mutating commands).
    pub peer: Peer,
    pub request: Request,
}

/// Which events a subscriber receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscribeFilter {
    /// Only events of this plugin (plus `lagged`).
    pub plugin: Option<String>,
    /// Also the events meant for verbose subscribers (`change_ignored`).
    pub verbose: bool,
}

impl SubscribeFilter {
    pub fn accepts(&self, event: &EventRecord) -> bool {
        if event.verbose_only && !self.verbose {
            return false;
        }
        match &self.plugin {
            None => true,
            Some(wanted) => event.plugin.as_deref() == Some(wanted.as_str()),
        }
    }
}

/// One event line for subscribers, serialised once and shared by all of them.
#[derive(Clone, Debug)]
pub struct EventRecord {
    pub plugin: Option<String>,
    pub verbose_only: bool,
    /// The JSON object and its `\n`.
    pub line: Rc<[u8]>,
}

impl EventRecord {
    /// Serialises `event` (a JSON object with `"event"`, `"time"`, ...) into a record.
    pub fn from_json(
        plugin: Option<String>,
        verbose_only: bool,
        event: &serde_json::Value,
    ) -> Self {
        let mut line = event.to_string().into_bytes();
        line.push(b'\n');
        EventRecord {
            plugin,
            verbose_only,
            line: Rc::from(line),
        }
    }
}

/// Who may run mutating commands (SPEC §6): root, the daemon's own user, and members of the
/// socket file's group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthPolicy {
    pub daemon_euid: u32,
    /// The group of the socket file, when known.
    pub socket_gid: Option<u32>,
}

/// Whether `peer` may run mutating commands under `policy`.
pub fn is_authorized(peer: &Peer, policy: &AuthPolicy) -> bool {
    peer.uid == 0
        || peer.uid == policy.daemon_euid
        || policy
            .socket_gid
            .is_some_and(|gid| peer.gid == gid || peer.groups.contains(&gid))
}

/// A failure to set up the control socket.
#[derive(Debug)]
pub struct ControlError {
    path: PathBuf,
    kind: ControlErrorKind,
}

#[derive(Debug)]
enum ControlErrorKind {
    /// Another process answers on the socket (`pid` from `SO_PEERCRED` when the probe connected);
    /// `daemon`: it holds the lock too, so it is another hotreloadd.
    AddressInUse { pid: Option<i32>, daemon: bool },
    /// Something other than a socket sits at the socket path.
    NotASocket,
    Io {
        action: &'static str,
        source: io::Error,
    },
}

impl ControlError {
    fn io(path: &Path, action: &'static str, source: io::Error) -> Self {
        ControlError {
            path: path.to_owned(),
            kind: ControlErrorKind::Io { action, source },
        }
    }

    fn in_use(path: &Path, pid: Option<i32>, daemon: bool) -> Self {
        ControlError {
            path: path.to_owned(),
            kind: ControlErrorKind::AddressInUse { pid, daemon },
        }
    }

    /// Another hotreloadd is already listening on the path (the daemon exits 71).
    pub fn is_address_in_use(&self) -> bool {
        match &self.kind {
            ControlErrorKind::AddressInUse { .. } => true,
            ControlErrorKind::Io { source, .. } => source.kind() == io::ErrorKind::AddrInUse,
            ControlErrorKind::NotASocket => false,
        }
    }

    /// The path is in use, but the process that listens on it is gone (or none listens while
    /// the lock is held): its descriptors live on in a child of its for a moment.
    fn held_by_no_live_process(&self) -> bool {
        match &self.kind {
            ControlErrorKind::AddressInUse { pid: Some(pid), .. } => !process_alive(*pid),
            ControlErrorKind::AddressInUse { pid: None, daemon } => *daemon,
            _ => false,
        }
    }

    /// The socket path the error is about.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match &self.kind {
            ControlErrorKind::AddressInUse { pid, daemon } => {
                let who = if *daemon {
                    "another hotreloadd"
                } else {
                    "another process"
                };
                match pid {
                    Some(pid) => write!(f, "{who} (pid {pid}) is already listening on {path}")?,
                    None if *daemon => {
                        write!(f, "{who} is already using {path} (it holds {path}.lock)")?
                    }
                    None => write!(f, "{who} is already listening on {path}")?,
                }
                f.write_str(": stop it or choose another --socket")
            }
            ControlErrorKind::NotASocket => write!(
                f,
                "{path} exists and is not a socket; remove it or choose another control socket \
                 path (control.socket, --socket)"
            ),
            ControlErrorKind::Io { action, source } => {
                write!(f, "failed to {action} {path}: {source}")
            }
        }
    }
}

impl std::error::Error for ControlError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ControlErrorKind::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The rules every request is checked against.
#[derive(Debug)]
struct Rules {
    limits: Limits,
    auth: AuthPolicy,
}

/// Why serving a client stopped.
#[derive(Debug, PartialEq, Eq)]
enum Served {
    /// Nothing more to do until the next readiness event or answer.
    Idle,
    /// The client used its turn's budget and may have more requests queued.
    Budget,
}

/// The control socket: listener, clients, and the socket file's lifetime.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    path: Option<PathBuf>,
    /// Set when we created the socket file, so only then do we remove it (and only while it is
    /// still ours). Declared before `lock`: it goes first when the server is dropped.
    created: Option<SocketFile>,
    /// Held for the server's lifetime: a second daemon on the same path fails to take it.
    lock: Option<Flock<File>>,
    /// Mode and group the socket file was created with (to create it again if it is deleted).
    mode: u32,
    gid: Option<Gid>,
    rules: Rules,
    token_base: usize,
    conns: HashMap<Token, Conn>,
    /// Requests read and not yet taken by the daemon, in the order they were read.
    incoming: VecDeque<Incoming>,
    /// Clients answered since their output was last written: written in one go when the
    /// daemon has taken every request, so a pipelining client costs one write per batch.
    answered: Vec<Token>,
    last_client: u64,
    /// Accepting failed for lack of file descriptors (or another transient error); retried on
    /// every later server event and whenever a client leaves.
    accept_paused: bool,
    /// Clients are being turned away at `max_clients`; warned once per episode.
    rejecting: bool,
    shut_down: bool,
}

impl ControlServer {
    /// Binds the control socket at `path` with file mode `mode` and, when it exists and we may,
    /// group `group`. `token_base`: the server owns mio tokens `[token_base, token_base + 2^32)`.
    pub fn bind(
        path: &Path,
        mode: u32,
        group: Option<&str>,
        limits: Limits,
        token_base: usize,
    ) -> Result<Self, ControlError> {
        create_parent_dir(path)?;
        let lock = wait_for_dead_holder(path, lock_socket_path)?;
        wait_for_dead_holder(path, remove_stale_socket)?;
        let gid = group.and_then(group_to_chown);
        let listener = create_socket(path, mode & 0o777, gid)?;
        let meta = fs::symlink_metadata(path)
            .map_err(|e| ControlError::io(path, "inspect the new control socket", e))?;
        debug!(
            "control socket listening on {} (mode {:04o}, gid {})",
            path.display(),
            meta.mode() & 0o7777,
            meta.gid()
        );
        let auth = AuthPolicy {
            daemon_euid: nix::unistd::geteuid().as_raw(),
            socket_gid: Some(meta.gid()),
        };
        let mut server = Self::new(listener, limits, auth, token_base);
        server.path = Some(path.to_owned());
        server.created = Some(SocketFile::with_id(path, FileId::from(&meta)));
        server.lock = Some(lock);
        server.mode = mode & 0o777;
        server.gid = gid;
        Ok(server)
    }

    /// Put the socket file back if someone deleted it while we ran (a `rm -rf` of the runtime
    /// dir, a cleanup script): without it no client can reach the daemon. Connected clients are
    /// unaffected. Only a socket we created is restored, and only when nothing else took its
    /// path. Returns whether it was restored.
    pub fn restore_socket_file(&mut self, registry: &Registry) -> Result<bool, ControlError> {
        let (Some(path), Some(created)) = (self.path.clone(), self.created.as_ref()) else {
            return Ok(false);
        };
        if created.is_ours() {
            return Ok(false);
        }
        if fs::symlink_metadata(&path).is_ok() {
            warn!(
                "control socket {} was replaced by another file; leaving it alone",
                path.display()
            );
            return Ok(false);
        }
        create_parent_dir(&path)?;
        let mut listener = create_socket(&path, self.mode, self.gid)?;
        let meta = fs::symlink_metadata(&path)
            .map_err(|e| ControlError::io(&path, "inspect the new control socket", e))?;
        let token = self.listener_token();
        let _ = registry.deregister(&mut self.listener);
        registry
            .register(&mut listener, token, Interest::READABLE)
            .map_err(|e| ControlError::io(&path, "poll the control socket", e))?;
        self.listener = listener;
        self.created = Some(SocketFile::with_id(&path, FileId::from(&meta)));
        warn!(
            "control socket {} had been deleted: created it again",
            path.display()
        );
        Ok(true)
    }

    /// Uses an already-listening socket passed by systemd (socket activation). Its path, if
    /// any, is never unlinked: systemd owns it.
    pub fn from_listener(
        listener: std::os::unix::net::UnixListener,
        limits: Limits,
        token_base: usize,
    ) -> Result<Self, ControlError> {
        let path = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_owned));
        let shown = path
            .clone()
            .unwrap_or_else(|| PathBuf::from("<inherited control socket>"));
        listener.set_nonblocking(true).map_err(|e| {
            ControlError::io(&shown, "set non-blocking mode on the control socket", e)
        })?;
        nix::fcntl::fcntl(
            &listener,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(|e| {
            ControlError::io(&shown, "set close-on-exec on the control socket", e.into())
        })?;
        let socket_gid = path
            .as_deref()
            .and_then(|p| fs::metadata(p).ok())
            .map(|m| m.gid());
        let auth = AuthPolicy {
            daemon_euid: nix::unistd::geteuid().as_raw(),
            socket_gid,
        };
        let mut server = Self::new(UnixListener::from_std(listener), limits, auth, token_base);
        server.path = path;
        Ok(server)
    }

    fn new(listener: UnixListener, limits: Limits, auth: AuthPolicy, token_base: usize) -> Self {
        ControlServer {
            listener,
            path: None,
            created: None,
            lock: None,
            mode: 0o660,
            gid: None,
            rules: Rules { limits, auth },
            token_base,
            conns: HashMap::new(),
            incoming: VecDeque::new(),
            answered: Vec::new(),
            last_client: 0,
            accept_paused: false,
            rejecting: false,
            shut_down: false,
        }
    }

    /// Registers the listener; clients are registered as they are accepted.
    pub fn register(&mut self, registry: &Registry) -> io::Result<()> {
        let token = self.listener_token();
        registry.register(&mut self.listener, token, Interest::READABLE)
    }

    /// Whether `token` belongs to this server (its listener or one of its clients).
    pub fn owns(&self, token: Token) -> bool {
        (token.0.wrapping_sub(self.token_base) as u64) < TOKEN_SPAN
    }

    /// Handles a readiness event for one of the server's tokens. The requests it completes
    /// wait in [`ControlServer::next_request`].
    pub fn handle_event(&mut self, registry: &Registry, event: &mio::event::Event) {
        if self.shut_down {
            return;
        }
        let token = event.token();
        if token == self.listener_token() || self.accept_paused {
            self.accept_all(registry);
        }
        let Some(conn) = self.conns.get_mut(&token) else {
            // The listener, or a client closed earlier in this batch of events.
            return;
        };
        if event.is_readable() || event.is_read_closed() {
            conn.read_ready = true;
        }
        // The peer is gone for good: what it sent is still served (a request followed by an
        // immediate close still happens), but nothing can be delivered any more.
        if event.is_write_closed() || event.is_error() {
            conn.hung_up = true;
        }
        // A new turn for this client.
        conn.budget = LINES_PER_TURN;
        self.service(registry, token);
    }

    /// The next request to execute, oldest first. Each must be answered with
    /// [`reply`](Self::reply), [`subscribe`](Self::subscribe) or [`defer`](Self::defer); an
    /// answer may let its client's next pipelined request through, so take requests until
    /// this returns `None`. Before it does, the answers given are written out.
    pub fn next_request(&mut self, registry: &Registry) -> Option<Incoming> {
        if self.incoming.is_empty() {
            self.write_answers(registry);
        }
        self.incoming.pop_front()
    }

    /// Answers `client`'s outstanding request with `line`. A no-op when the client has left.
    pub fn reply(&mut self, client: ClientId, line: Vec<u8>) {
        self.answer(client, line, None);
    }

    /// Answers `client`'s `subscribe` with `line`; from then on it gets the events `filter`
    /// accepts.
    pub fn subscribe(&mut self, client: ClientId, filter: SubscribeFilter, line: Vec<u8>) {
        self.answer(client, line, Some(filter));
    }

    /// Notes that `client`'s outstanding request is answered later with [`reply`](Self::reply)
    /// (a `trigger` that waits for the reload). Until then its following pipelined requests
    /// wait; other clients are unaffected. A client that has hung up is closed now: the answer
    /// has nowhere to go.
    pub fn defer(&mut self, registry: &Registry, client: ClientId) {
        let token = self.token_of(client);
        let Some(conn) = self.conns.get_mut(&token).filter(|c| c.id == client) else {
            return;
        };
        conn.deferred = true;
        if conn.hung_up {
            self.close(registry, token, None);
        }
    }

    fn answer(&mut self, client: ClientId, line: Vec<u8>, filter: Option<SubscribeFilter>) {
        let token = self.token_of(client);
        let Some(conn) = self.conns.get_mut(&token).filter(|c| c.id == client) else {
            debug!("control client {client} left before its answer");
            return;
        };
        if !conn.awaiting {
            warn!("control client {client} got an answer it was not waiting for");
        }
        conn.awaiting = false;
        conn.deferred = false;
        conn.queue_reply(line);
        if filter.is_some() {
            conn.subscription = filter;
        }
        // Its next pipelined request, if any, is read now; the answer is written with the
        // others in `write_answers`.
        // A read error shows again when the client is serviced in `write_answers`.
        let _ = serve_lines(conn, &self.rules, &mut self.incoming);
        self.answered.push(token);
    }

    /// Writes out the answers given since the last call, closing the clients that are done.
    fn write_answers(&mut self, registry: &Registry) {
        let mut answered = std::mem::take(&mut self.answered);
        answered.sort_unstable();
        answered.dedup();
        for token in answered.drain(..) {
            self.service(registry, token);
        }
        // Keep the allocation for the next batch.
        self.answered = answered;
    }

    /// Delivers an event to every subscriber whose filter accepts it.
    pub fn publish(&mut self, registry: &Registry, event: &EventRecord) {
        if event.line.last() != Some(&b'\n') {
            // A line without its newline would glue two events together; fix it once here
            // rather than per subscriber.
            let mut line = event.line.to_vec();
            line.push(b'\n');
            let fixed = EventRecord {
                line: Rc::from(line),
                ..event.clone()
            };
            return self.publish(registry, &fixed);
        }
        let max_out = self.rules.limits.max_out_bytes;
        let mut failed = Vec::new();
        for (token, conn) in &mut self.conns {
            if !conn.subscription.as_ref().is_some_and(|f| f.accepts(event)) {
                continue;
            }
            if conn.dropped > 0 {
                // Still lagging: drop until the client has caught up with its buffer.
                conn.dropped += 1;
                continue;
            }
            let was_empty = conn.output.is_empty();
            if !was_empty && conn.output.len() + event.line.len() > max_out {
                conn.dropped = 1;
                continue;
            }
            conn.output.push_shared(Rc::clone(&event.line));
            // A non-empty buffer is waiting for a writable edge; writing now would only get
            // EAGAIN, so a stuck subscriber costs no system call.
            if was_empty && let Err(e) = flush(conn) {
                failed.push((*token, e));
            }
        }
        for (token, e) in failed {
            self.close(registry, token, Some(e));
        }
    }

    /// Connected clients.
    pub fn client_count(&self) -> usize {
        self.conns.len()
    }

    /// Connected clients that subscribed to events.
    pub fn subscriber_count(&self) -> usize {
        self.conns
            .values()
            .filter(|c| c.subscription.is_some())
            .count()
    }

    /// Whether any subscriber asked for verbose events (`change_ignored`), so the watcher only
    /// explains filtered changes when someone will read the explanation.
    pub fn has_verbose_subscriber(&self) -> bool {
        self.conns
            .values()
            .any(|c| c.subscription.as_ref().is_some_and(|f| f.verbose))
    }

    /// The socket's path, when it has one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Who may run mutating commands.
    pub fn auth_policy(&self) -> &AuthPolicy {
        &self.rules.auth
    }

    /// Closes every client (after a best-effort flush) and removes the socket file if we
    /// created it and it is still ours (never a file another daemon put there since).
    pub fn shutdown(&mut self, registry: &Registry) {
        self.shut_down = true;
        self.incoming.clear();
        self.answered.clear();
        for (_, mut conn) in self.conns.drain() {
            let _ = conn.flush();
            let _ = registry.deregister(&mut conn.stream);
        }
        let _ = registry.deregister(&mut self.listener);
        if let Some(created) = self.created.take() {
            let path = created.path().display().to_string();
            match created.remove_if_ours() {
                Removal::Removed => {}
                Removal::NotOurs => {
                    debug!("{path} was replaced by another file; leaving it in place")
                }
                Removal::Failed(e) => warn!("failed to remove the control socket {path}: {e}"),
            }
        }
        // The lock goes last, so the next daemon never sees our socket file.
        self.lock = None;
    }

    fn listener_token(&self) -> Token {
        Token(self.token_base)
    }

    /// The token of a client: derived from its id, so an answer finds it in O(1).
    fn token_of(&self, client: ClientId) -> Token {
        let offset = 1 + (client.0.wrapping_sub(1) % (TOKEN_SPAN - 1));
        Token(self.token_base.wrapping_add(offset as usize))
    }

    fn next_client(&mut self) -> (ClientId, Token) {
        loop {
            self.last_client += 1;
            let id = ClientId(self.last_client);
            let token = self.token_of(id);
            // After 2^32 clients the tokens wrap; skip one still held by a long-lived client.
            if !self.conns.contains_key(&token) {
                return (id, token);
            }
        }
    }

    /// Accepts until the backlog is empty (the listener is edge-triggered).
    fn accept_all(&mut self, registry: &Registry) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(registry, stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.accept_paused = false;
                    return;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    if !self.accept_paused {
                        warn!(
                            "failed to accept a control connection on {}: {e}; retrying when a client leaves",
                            self.shown_path()
                        );
                    }
                    self.accept_paused = true;
                    return;
                }
            }
        }
    }

    fn admit(&mut self, registry: &Registry, mut stream: UnixStream) {
        if self.conns.len() >= self.rules.limits.max_clients {
            self.turn_away(&stream);
            return;
        }
        self.rejecting = false;
        let peer = match peer_of(&stream) {
            Ok(peer) => peer,
            Err(e) => {
                warn!("failed to read the credentials of a control client: {e}; closing it");
                return;
            }
        };
        let (id, token) = self.next_client();
        if let Err(e) =
            registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
        {
            warn!("failed to register control client {id}: {e}; closing it");
            return;
        }
        debug!(
            "control client {id} connected (pid {}, uid {}, gid {})",
            peer.pid, peer.uid, peer.gid
        );
        self.conns.insert(token, Conn::new(id, stream, peer));
    }

    /// Tells a client over the limit why it is closed, without waiting for it.
    fn turn_away(&mut self, mut stream: &UnixStream) {
        if !self.rejecting {
            warn!(
                "control socket {} has {} clients (control.max_clients); turning new ones away",
                self.shown_path(),
                self.conns.len()
            );
            self.rejecting = true;
        }
        let message = format!(
            "too many clients (limit {}); try again later",
            self.rules.limits.max_clients
        );
        let _ = stream.write(&protocol::error_line(
            None,
            ErrorCode::TooManyClients,
            &message,
        ));
    }

    /// Serves one client: its queued output, then its requests, then closes it when done.
    fn service(&mut self, registry: &Registry, token: Token) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let mut error = None;
        match serve(conn, &self.rules, &mut self.incoming) {
            Ok(Served::Idle) => {}
            Ok(Served::Budget) => {
                // Re-arming an edge-triggered registration reports the socket again on the next
                // poll if it is still ready: this client continues next turn, after the others.
                if let Err(e) = registry.reregister(
                    &mut conn.stream,
                    token,
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    error = Some(e);
                }
            }
            Err(e) => error = Some(e),
        }
        // A hung-up client is served while the daemon is executing a request of it; an answer
        // that comes later has nowhere to go.
        let hung_up = conn.hung_up && (!conn.awaiting || conn.deferred);
        if error.is_some() || hung_up || conn.is_finished() {
            self.close(registry, token, error);
        }
    }

    fn close(&mut self, registry: &Registry, token: Token, error: Option<io::Error>) {
        let Some(mut conn) = self.conns.remove(&token) else {
            return;
        };
        if conn.closing {
            conn.discard_input();
        }
        let _ = registry.deregister(&mut conn.stream);
        match error {
            Some(e) if !is_disconnect(&e) => {
                warn!("control client {} failed: {e}; disconnected it", conn.id);
            }
            _ => debug!("control client {} disconnected", conn.id),
        }
        if self.accept_paused {
            self.accept_all(registry);
        }
    }

    fn shown_path(&self) -> String {
        self.path
            .as_deref()
            .map_or_else(|| "<inherited>".to_owned(), |p| p.display().to_string())
    }

    /// The largest input buffer of any client, to check that it stays bounded.
    #[cfg(test)]
    fn max_buffered_input(&self) -> usize {
        self.conns
            .values()
            .map(|c| c.input.pending_len())
            .max()
            .unwrap_or(0)
    }

    /// The largest output buffer of any client, to check that it stays bounded.
    #[cfg(test)]
    fn max_buffered_output(&self) -> usize {
        self.conns
            .values()
            .map(|c| c.output.len())
            .max()
            .unwrap_or(0)
    }
}

/// Serves `conn` until it is idle or has used its turn: flushes, runs complete request lines,
/// reads more, flushes again.
fn serve(conn: &mut Conn, rules: &Rules, incoming: &mut VecDeque<Incoming>) -> io::Result<Served> {
    flush(conn)?;
    loop {
        let stop = serve_lines(conn, rules, incoming)?;
        flush(conn)?;
        match stop {
            // The output drained below the limit while flushing: more requests can run.
            Stop::Backpressure if !is_backlogged(conn, rules) => {}
            Stop::Budget => return Ok(Served::Budget),
            Stop::Backpressure | Stop::Idle => return Ok(Served::Idle),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Stop {
    Idle,
    Backpressure,
    Budget,
}

/// Takes the client's complete lines, reading as needed, until it must wait: for the daemon to
/// answer a request, for its output to drain, for more input or for its next turn.
fn serve_lines(
    conn: &mut Conn,
    rules: &Rules,
    incoming: &mut VecDeque<Incoming>,
) -> io::Result<Stop> {
    let max_line = rules.limits.max_line_bytes;
    loop {
        if conn.closing || conn.awaiting {
            return Ok(Stop::Idle);
        }
        if is_backlogged(conn, rules) {
            return Ok(Stop::Backpressure);
        }
        if conn.budget == 0 {
            return Ok(Stop::Budget);
        }
        let (start, end) = match conn.input.next_line(max_line) {
            NextLine::Line { start, end } => (start, end),
            NextLine::TooLong => {
                reject_long_line(conn, max_line);
                return Ok(Stop::Idle);
            }
            NextLine::Partial if conn.read_closed => {
                reject_unterminated_line(conn);
                return Ok(Stop::Idle);
            }
            NextLine::Partial => {
                if !conn.read_ready {
                    return Ok(Stop::Idle);
                }
                read_some(conn)?;
                continue;
            }
        };
        conn.budget -= 1;
        let parsed = protocol::parse_line(conn.input.slice(start, end));
        if let Some(request) = admit_request(conn, parsed, &rules.auth) {
            conn.awaiting = true;
            incoming.push_back(request);
        }
    }
}

/// Whether the client has so much unread output that its requests must wait. An empty buffer
/// never counts, so even a limit of 0 lets requests through one at a time.
fn is_backlogged(conn: &Conn, rules: &Rules) -> bool {
    !conn.output.is_empty() && conn.output.len() >= rules.limits.max_out_bytes
}

/// Reads one chunk into the client's input; notes end of file and `WouldBlock`.
fn read_some(conn: &mut Conn) -> io::Result<()> {
    match conn.input.read_from(&mut conn.stream) {
        Ok(0) => {
            conn.read_closed = true;
            conn.read_ready = false;
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => conn.read_ready = false,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
        Err(e) => return Err(e),
    }
    Ok(())
}

fn reject_long_line(conn: &mut Conn, max_line: usize) {
    let message = format!(
        "request line longer than {max_line} bytes (control.max_line_bytes); closing the connection"
    );
    conn.queue_reply(protocol::error_line(None, ErrorCode::LineTooLong, &message));
    conn.input.clear();
    conn.closing = true;
}

/// Refuses what follows the last newline at end of file: a client that died mid-write must not
/// get a truncated request (`trigger foo` for `trigger foobar`) executed.
fn reject_unterminated_line(conn: &mut Conn) {
    if conn.input.pending_len() == 0 {
        return;
    }
    conn.input.clear();
    let message = "request not terminated by a newline at end of input; not executed";
    conn.queue_reply(protocol::error_line(None, ErrorCode::BadRequest, message));
}

/// The request for the daemon to execute, or `None` when the server answered the line itself:
/// a blank line, a request that does not parse, or one the peer may not make.
fn admit_request(
    conn: &mut Conn,
    parsed: Result<Option<Request>, protocol::RequestError>,
    auth: &AuthPolicy,
) -> Option<Incoming> {
    let request = match parsed {
        Ok(Some(request)) => request,
        Ok(None) => return None,
        Err(e) => {
            conn.queue_reply(e.to_line());
            return None;
        }
    };
    if request.command.is_mutating() && !is_authorized(&conn.peer, auth) {
        let message = format!(
            "\"{}\" is allowed only for root, the daemon's user and members of the control socket's group (you are uid {})",
            request.command.name(),
            conn.peer.uid
        );
        conn.queue_reply(protocol::error_line(
            request.id.as_ref(),
            ErrorCode::PermissionDenied,
            &message,
        ));
        return None;
    }
    Some(Incoming {
        client: conn.id,
        peer: conn.peer.clone(),
        request,
    })
}

/// Writes the client's output; once a lagging subscriber has drained it, tells it how many
/// events it missed.
fn flush(conn: &mut Conn) -> io::Result<()> {
    let drained = conn.flush()?;
    if drained && conn.dropped > 0 {
        conn.queue_reply(lagged_line(conn.dropped));
        conn.dropped = 0;
        conn.flush()?;
    }
    Ok(())
}

fn lagged_line(dropped: u64) -> Vec<u8> {
    crate::protocol::Event::daemon(crate::protocol::EventKind::Lagged { dropped }).to_line()
}

/// A client that went away: not worth a warning.
fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    )
}

fn peer_of(stream: &UnixStream) -> io::Result<Peer> {
    let cred = getsockopt(stream, PeerCredentials).map_err(io::Error::from)?;
    let groups = match peer_groups(stream) {
        Ok(groups) => groups,
        Err(e) => {
            debug!("SO_PEERGROUPS unavailable ({e}); only the primary group counts");
            Vec::new()
        }
    };
    Ok(Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
        groups,
    })
}

/// The peer's supplementary groups at connect time.
fn peer_groups(stream: &UnixStream) -> io::Result<Vec<u32>> {
    crate::sys::socket::peer_groups(stream.as_fd())
}

/// Creates the socket's directory (mode 0700) when it is missing; an existing one is left as is.
fn create_parent_dir(path: &Path) -> Result<(), ControlError> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    if dir.exists() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| ControlError::io(dir, "create the control socket's directory", e))
}

/// How long [`wait_for_dead_holder`] waits for a dead daemon's lock and socket to be let go.
const DEAD_HOLDER_WAIT: Duration = Duration::from_secs(2);

/// `claim(path)`, tried again for up to [`DEAD_HOLDER_WAIT`] while the path is in use by no
/// live process: a daemon killed (SIGKILL, the OOM killer) while it was starting a plugin
/// leaves that child, between `clone` and `exec`, with copies of the daemon's descriptors, so
/// the lock and the listening socket outlive the daemon until the child execs or exits
/// (microseconds, or milliseconds on a loaded machine). A restart in that window must wait, not
/// report "another hotreloadd (pid N)" for a pid that is gone. A live holder (another daemon
/// really listening) is reported at once.
fn wait_for_dead_holder<T>(
    path: &Path,
    claim: impl Fn(&Path) -> Result<T, ControlError>,
) -> Result<T, ControlError> {
    let deadline = Instant::now() + DEAD_HOLDER_WAIT;
    loop {
        match claim(path) {
            Err(e) if e.held_by_no_live_process() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

/// `<path>.lock`, held with an exclusive `flock` for the server's lifetime. The file itself is
/// never removed: unlinking a lock file while others may have it open lets two holders coexist.
fn lock_socket_path(path: &Path) -> Result<Flock<File>, ControlError> {
    let mut lock_path = OsString::from(path.as_os_str());
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| ControlError::io(&lock_path, "open the control socket's lock file", e))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            ControlError::in_use(path, listener_pid(path), true)
        } else {
            ControlError::io(&lock_path, "lock", errno.into())
        }
    })
}

/// The pid of the process listening on `path`, to name it when it keeps us from binding: a
/// probe connection's `SO_PEERCRED` holds the listener's credentials. Non-blocking, so a full
/// backlog gives `None` rather than a wait.
fn listener_pid(path: &Path) -> Option<i32> {
    UnixStream::connect(path)
        .ok()
        .and_then(|probe| peer_pid(&probe))
}

/// Whether `pid` is a process that still runs (a zombie does not: it holds no descriptors).
fn process_alive(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may contain any byte.
    stat.rfind(") ")
        .and_then(|end| stat[end + 2..].chars().next())
        .is_some_and(|state| state != 'Z' && state != 'X')
}

fn peer_pid(stream: &UnixStream) -> Option<i32> {
    let cred = getsockopt(stream, PeerCredentials).ok()?;
    (cred.pid() > 0).then_some(cred.pid())
}

/// Removes a socket file left by a dead daemon; a live one (it accepts connections) is an
/// address-in-use error, and anything but a socket is refused.
fn remove_stale_socket(path: &Path) -> Result<(), ControlError> {
    match socket_file::probe(path).map_err(|e| ControlError::io(path, "inspect", e))? {
        Occupant::Nothing => Ok(()),
        Occupant::NotASocket => Err(ControlError {
            path: path.to_owned(),
            kind: ControlErrorKind::NotASocket,
        }),
        Occupant::Live(pid) => Err(ControlError::in_use(path, pid, false)),
        Occupant::Unknown(e) => Err(ControlError::io(
            path,
            "probe the existing control socket",
            e,
        )),
        Occupant::Stale => {
            info!(
                "removing stale control socket {} left by a daemon that is gone",
                path.display()
            );
            socket_file::remove_socket(path)
                .map_err(|e| ControlError::io(path, "remove the stale control socket", e))
        }
    }
}

/// The group to give the socket file, when it exists and we may give it.
fn group_to_chown(name: &str) -> Option<Gid> {
    let complain = |message: String| {
        if name == DEFAULT_GROUP {
            debug!("{message}");
        } else {
            warn!("{message}");
        }
    };
    let group = match Group::from_name(name) {
        Ok(Some(group)) => group,
        Ok(None) => {
            complain(format!(
                "group {name} does not exist; the control socket keeps the daemon's group (control.group)"
            ));
            return None;
        }
        Err(e) => {
            complain(format!(
                "failed to look up group {name}: {e}; the control socket keeps the daemon's group"
            ));
            return None;
        }
    };
    let may_chown = nix::unistd::geteuid().is_root()
        || nix::unistd::getegid() == group.gid
        || nix::unistd::getgroups().is_ok_and(|groups| groups.contains(&group.gid));
    if !may_chown {
        complain(format!(
            "not a member of group {name}; the control socket keeps the daemon's group (add the daemon's user to {name})"
        ));
        return None;
    }
    Some(group.gid)
}

/// Binds and listens at `path` so that the socket is never reachable with wider permissions
/// than `mode`: bound owner-only at a temporary name, given its mode and group, then renamed
/// into place.
fn create_socket(path: &Path, mode: u32, gid: Option<Gid>) -> Result<UnixListener, ControlError> {
    let temp = temp_name(path);
    let target = temp.as_deref().unwrap_or(path);
    if let Some(temp) = &temp {
        // Only a crashed daemon with our pid could have left it; we hold the lock.
        let _ = fs::remove_file(temp);
    }
    let listener = bind_owner_only(target)
        .map_err(|e| ControlError::io(path, "bind the control socket", e))?;
    let published = publish_socket(path, target, mode, gid);
    if published.is_err() && temp.is_some() {
        let _ = fs::remove_file(target);
    }
    published?;
    listener
        .set_nonblocking(true)
        .map_err(|e| ControlError::io(path, "set non-blocking mode on the control socket", e))?;
    Ok(UnixListener::from_std(listener))
}

/// A listening socket bound at `path` whose file is created with mode 0600 (less the umask).
///
/// Linux creates a socket file with the mode of the socket's own inode masked by the umask, so
/// an `fchmod` before `bind` closes the window in which a plain bind would leave the file 0777 &
/// ~umask, without touching the process-wide umask (which other threads, tests included, see).
fn bind_owner_only(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    let socket = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    fchmod(&socket, Mode::from_bits_truncate(0o600))?;
    bind(socket.as_raw_fd(), &UnixAddr::new(path)?)?;
    listen(&socket, Backlog::MAXCONN)?;
    Ok(std::os::unix::net::UnixListener::from(socket))
}

/// Gives the bound socket its mode and group, then moves it to `path`.
fn publish_socket(
    path: &Path,
    bound: &Path,
    mode: u32,
    gid: Option<Gid>,
) -> Result<(), ControlError> {
    fs::set_permissions(bound, fs::Permissions::from_mode(mode))
        .map_err(|e| ControlError::io(path, "set the mode of the control socket", e))?;
    if let Some(gid) = gid
        && let Err(e) = std::os::unix::fs::chown(bound, None, Some(gid.as_raw()))
    {
        warn!(
            "failed to give the control socket {} group {gid}: {e}",
            path.display()
        );
    }
    if bound != path {
        fs::rename(bound, path)
            .map_err(|e| ControlError::io(path, "move the new control socket to", e))?;
    }
    Ok(())
}

/// `<dir>/.<name>.<pid>.tmp`, or `None` when that would not fit in a socket address (the
/// socket is then bound at its final name, still owner-only until it is given its mode).
fn temp_name(path: &Path) -> Option<PathBuf> {
    /// `sun_path` holds 108 bytes including the terminating NUL.
    const SUN_PATH_MAX: usize = 107;
    let name = path.file_name()?;
    let mut temp_name = OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".{}.tmp", std::process::id()));
    let temp = path.with_file_name(temp_name);
    (temp.as_os_str().len() <= SUN_PATH_MAX).then_some(temp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll};
    use protocol::Command;
    use serde_json::{Map, Value, json};
    use std::io::Read;
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::net::{UnixListener as StdListener, UnixStream as StdStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    const BASE: usize = 1000;

    /// A directory under the system temp dir, removed when the test ends.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("hrctl-{}-{n}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn sock(&self) -> PathBuf {
            self.0.join("control.sock")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Plays the daemon: answers `{"echo": CMD}`, defers `trigger` (with wait) and accepts
    /// subscriptions.
    #[derive(Default)]
    struct EchoHandler {
        deferred: Vec<(ClientId, Option<Value>)>,
        handled: usize,
    }

    fn body(key: &str, value: Value) -> Map<String, Value> {
        let mut map = Map::new();
        map.insert(key.to_owned(), value);
        map
    }

    impl EchoHandler {
        /// Executes every request the server has, as the daemon does after each event.
        fn run(&mut self, server: &mut ControlServer, registry: &Registry) {
            while let Some(incoming) = server.next_request(registry) {
                self.handle(server, registry, incoming);
            }
        }

        fn handle(&mut self, server: &mut ControlServer, registry: &Registry, incoming: Incoming) {
            self.handled += 1;
            let Incoming {
                client, request, ..
            } = incoming;
            let id = request.id;
            match request.command {
                Command::Trigger { wait: true, .. } => {
                    self.deferred.push((client, id));
                    server.defer(registry, client);
                }
                Command::Subscribe { plugin, verbose } => server.subscribe(
                    client,
                    SubscribeFilter { plugin, verbose },
                    protocol::success(id.as_ref(), &body("subscribed", json!(true))),
                ),
                command => server.reply(
                    client,
                    protocol::success(id.as_ref(), &body("echo", json!(command.name()))),
                ),
            }
        }
    }

    /// A test client on a non-blocking std socket.
    struct Client {
        stream: StdStream,
        received: Vec<u8>,
        closed: bool,
    }

    impl Client {
        fn connect(path: &Path) -> Client {
            let stream = StdStream::connect(path).unwrap();
            stream.set_nonblocking(true).unwrap();
            Client {
                stream,
                received: Vec::new(),
                closed: false,
            }
        }

        /// Reads whatever has arrived; notes end of file (or a reset, which a server closing
        /// with unread input may cause).
        fn receive(&mut self) {
            let mut buf = vec![0u8; 64 * 1024];
            while !self.closed {
                match self.stream.read(&mut buf) {
                    Ok(0) => self.closed = true,
                    Ok(n) => self.received.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => self.closed = true,
                    Err(e) => panic!("client read failed: {e}"),
                }
            }
        }

        fn line_count(&mut self) -> usize {
            self.receive();
            self.received.iter().filter(|b| **b == b'\n').count()
        }

        fn lines(&self) -> Vec<Value> {
            self.received
                .split(|b| *b == b'\n')
                .filter(|line| !line.is_empty())
                .map(|line| serde_json::from_slice(line).unwrap())
                .collect()
        }
    }

    struct Harness {
        poll: Poll,
        events: Events,
        server: ControlServer,
        handler: EchoHandler,
        /// Whether each turn ends with the handler executing the requests, as the daemon does.
        execute: bool,
        dir: TempDir,
    }

    impl Harness {
        fn new(name: &str, limits: Limits) -> Self {
            let dir = TempDir::new(name);
            let server = ControlServer::bind(&dir.sock(), 0o600, None, limits, BASE).unwrap();
            Self::with_server(dir, server)
        }

        fn with_server(dir: TempDir, mut server: ControlServer) -> Self {
            let poll = Poll::new().unwrap();
            server.register(poll.registry()).unwrap();
            Harness {
                poll,
                events: Events::with_capacity(256),
                server,
                handler: EchoHandler::default(),
                execute: true,
                dir,
            }
        }

        /// One turn of the event loop, as the daemon runs it.
        fn turn(&mut self) {
            match self
                .poll
                .poll(&mut self.events, Some(Duration::from_millis(5)))
            {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
                result => result.unwrap(),
            }
            for event in self.events.iter() {
                assert!(
                    self.server.owns(event.token()),
                    "stray token {:?}",
                    event.token()
                );
                self.server.handle_event(self.poll.registry(), event);
            }
            if self.execute {
                self.handler.run(&mut self.server, self.poll.registry());
            }
            let limits = self.server.rules.limits;
            assert!(self.server.max_buffered_input() <= limits.max_line_bytes + conn::READ_CHUNK);
            // Requests stop once the output reaches the limit, so it exceeds it by one reply at most.
            assert!(self.server.max_buffered_output() <= limits.max_out_bytes + 1024);
        }

        /// Turns the loop until `done` holds, failing after a generous deadline.
        #[track_caller]
        fn run_until(&mut self, what: &str, mut done: impl FnMut(&mut Harness) -> bool) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !done(self) {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                self.turn();
            }
        }

        /// Turns the loop a few times, for checks that something does *not* happen.
        fn idle_turns(&mut self) {
            for _ in 0..10 {
                self.turn();
            }
        }

        fn connect(&mut self) -> Client {
            Client::connect(&self.dir.sock())
        }

        /// Writes all of `bytes`, turning the loop whenever the client's socket is full.
        #[track_caller]
        fn send(&mut self, client: &mut Client, bytes: &[u8]) {
            let mut rest = bytes;
            self.run_until("the request to be sent", |_| {
                match client.stream.write(rest) {
                    Ok(n) => rest = &rest[n..],
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("client write failed: {e}"),
                }
                rest.is_empty()
            });
        }

        fn publish(&mut self, plugin: Option<&str>, verbose_only: bool, event: Value) {
            let record = EventRecord::from_json(plugin.map(str::to_owned), verbose_only, &event);
            self.server.publish(self.poll.registry(), &record);
        }

        fn complete(&mut self, client: ClientId, reply: Vec<u8>) {
            self.server.reply(client, reply);
            self.handler.run(&mut self.server, self.poll.registry());
        }
    }

    #[test]
    fn answers_bare_and_json_requests() {
        let mut h = Harness::new("basic", Limits::default());
        let mut c = h.connect();
        h.send(
            &mut c,
            b"status\r\n\n{\"cmd\":\"list\",\"id\":null}\n{\"cmd\":\"help\",\"id\":{\"n\":[1]}}\n",
        );
        h.run_until("three answers", |_| c.line_count() >= 3);
        assert_eq!(
            c.lines(),
            [
                json!({"status": "success", "echo": "status"}),
                json!({"status": "success", "id": null, "echo": "list"}),
                json!({"status": "success", "id": {"n": [1]}, "echo": "help"}),
            ]
        );
        assert_eq!(h.server.client_count(), 1);
        assert!(!c.closed);
    }

    #[test]
    fn pipelined_requests_are_answered_in_order() {
        let mut h = Harness::new("pipeline", Limits::default());
        let mut c = h.connect();
        let requests: String = (0..1000)
            .map(|i| format!("{{\"cmd\":\"status\",\"id\":{i}}}\n"))
            .collect();
        h.send(&mut c, requests.as_bytes());
        h.run_until("1000 answers", |_| c.line_count() >= 1000);
        let ids: Vec<Value> = c.lines().iter().map(|l| l["id"].clone()).collect();
        assert_eq!(ids, (0..1000).map(Value::from).collect::<Vec<_>>());
    }

    #[test]
    fn a_pipelining_client_does_not_starve_another() {
        let mut h = Harness::new("fairness", Limits::default());
        let mut greedy = h.connect();
        let mut polite = h.connect();
        h.run_until("both clients", |h| h.server.client_count() == 2);
        h.send(
            &mut greedy,
            "status\n".repeat(5 * LINES_PER_TURN).as_bytes(),
        );
        h.send(&mut polite, b"status\n");
        h.run_until("the polite client's answer", |_| polite.line_count() == 1);
        assert!(
            greedy.line_count() < 5 * LINES_PER_TURN,
            "served in turns, not all at once"
        );
        h.run_until("every greedy answer", |_| {
            greedy.line_count() == 5 * LINES_PER_TURN
        });
    }

    #[test]
    fn a_client_that_does_not_read_its_answers_stops_being_served() {
        const REQUESTS: usize = 20_000;
        let limits = Limits {
            max_out_bytes: 4096,
            ..Limits::default()
        };
        let mut h = Harness::new("backpressure", limits);
        let mut c = h.connect();
        let requests = "status\n".repeat(REQUESTS);
        let mut sent = 0;
        let mut write_some = |c: &mut Client| match c.stream.write(&requests.as_bytes()[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("client write failed: {e}"),
        };
        for _ in 0..50 {
            write_some(&mut c);
            h.turn();
        }
        // 20 000 answers are far more than the socket buffers and `max_out_bytes` hold.
        assert!(
            h.handler.handled < REQUESTS,
            "{} requests served to a client that reads nothing",
            h.handler.handled
        );
        h.run_until("every answer once the client reads", |_| {
            write_some(&mut c);
            c.line_count() == REQUESTS
        });
    }

    #[test]
    fn a_request_split_across_three_writes_is_answered_once_complete() {
        let mut h = Harness::new("split", Limits::default());
        let mut c = h.connect();
        h.send(&mut c, b"{\"cmd\":");
        h.run_until("the first part to be read", |h| {
            h.server.max_buffered_input() == 7
        });
        h.send(&mut c, b"\"status\",\"id\"");
        h.run_until("the second part to be read", |h| {
            h.server.max_buffered_input() == 20
        });
        assert_eq!(c.line_count(), 0);
        assert_eq!(h.handler.handled, 0);
        h.send(&mut c, b":1}\n");
        h.run_until("the answer", |_| c.line_count() >= 1);
        assert_eq!(
            c.lines(),
            [json!({"status": "success", "id": 1, "echo": "status"})]
        );
    }

    #[test]
    fn an_overlong_line_is_refused_and_closed_without_affecting_others() {
        let mut h = Harness::new("long", Limits::default());
        let mut other = h.connect();
        let mut big = h.connect();
        let line = vec![b'a'; 1 << 20];
        let mut sent = 0;
        h.run_until("the long line to be refused", |_| {
            if sent < line.len() {
                match big.stream.write(&line[sent..]) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The server closed the connection while we were still writing.
                    Err(_) => sent = line.len(),
                }
            }
            big.receive();
            big.closed
        });
        let lines = big.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["code"], "line_too_long");
        assert!(lines[0]["error"].as_str().unwrap().contains("65536"));
        h.send(&mut other, b"status\n");
        h.run_until("the other client's answer", |_| other.line_count() >= 1);
        assert_eq!(other.lines()[0]["status"], "success");
        assert_eq!(h.server.client_count(), 1);
    }

    #[test]
    fn garbage_gets_error_lines_and_the_connection_stays() {
        let mut h = Harness::new("garbage", Limits::default());
        let mut c = h.connect();
        h.send(
            &mut c,
            b"\xff\xfe\x80\n\0\0\n{]\n[1,2]\n{\"id\":9}\nbogus words\nstatus\n",
        );
        h.run_until("seven answers", |_| c.line_count() >= 7);
        let codes: Vec<Value> = c.lines().iter().map(|l| l["code"].clone()).collect();
        assert_eq!(
            codes,
            [
                json!("bad_request"),
                json!("bad_request"),
                json!("bad_request"),
                json!("bad_request"),
                json!("bad_request"),
                json!("unknown_command"),
                Value::Null
            ]
        );
        assert_eq!(c.lines()[4]["id"], 9);
        assert_eq!(c.lines()[6]["echo"], "status");
        assert!(!c.closed);
        assert_eq!(h.server.client_count(), 1);
    }

    #[test]
    fn a_client_leaving_mid_line_is_closed_quietly() {
        let mut h = Harness::new("midline", Limits::default());
        let mut c = h.connect();
        h.send(&mut c, b"status\ntrigger fo");
        h.run_until("the partial line to be read", |h| {
            h.server.max_buffered_input() == 10
        });
        drop(c);
        h.run_until("the client to be closed", |h| h.server.client_count() == 0);
        assert_eq!(
            h.handler.handled, 1,
            "a truncated request is never executed"
        );
    }

    #[test]
    fn a_half_closed_client_gets_its_answers_then_eof() {
        let mut h = Harness::new("halfclose", Limits::default());
        let mut c = h.connect();
        h.send(&mut c, b"status\nlist");
        c.stream.shutdown(std::net::Shutdown::Write).unwrap();
        h.run_until("end of file", |_| {
            c.receive();
            c.closed
        });
        let lines = c.lines();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0]["echo"], "status");
        assert_eq!(
            lines[1]["code"], "bad_request",
            "the unterminated line is refused"
        );
        h.run_until("the server to forget the client", |h| {
            h.server.client_count() == 0
        });
    }

    #[test]
    fn clients_over_the_limit_are_told_and_closed() {
        let limits = Limits {
            max_clients: 2,
            ..Limits::default()
        };
        let mut h = Harness::new("maxclients", limits);
        let mut a = h.connect();
        let _b = h.connect();
        h.run_until("two clients", |h| h.server.client_count() == 2);
        let mut c = h.connect();
        h.run_until("the third client to be closed", |_| {
            c.receive();
            c.closed
        });
        assert_eq!(c.lines().len(), 1);
        assert_eq!(c.lines()[0]["code"], "too_many_clients");
        assert_eq!(h.server.client_count(), 2);
        h.send(&mut a, b"status\n");
        h.run_until("the first client's answer", |_| a.line_count() >= 1);
        drop(a);
        h.run_until("a free slot", |h| h.server.client_count() == 1);
        let mut d = h.connect();
        h.send(&mut d, b"status\n");
        h.run_until("the new client's answer", |_| d.line_count() >= 1);
        assert_eq!(d.lines()[0]["status"], "success");
    }

    #[test]
    fn a_deferred_request_holds_back_the_next_answer_until_complete() {
        let mut h = Harness::new("deferred", Limits::default());
        let mut c = h.connect();
        let mut other = h.connect();
        h.send(
            &mut c,
            b"{\"cmd\":\"trigger\",\"plugin\":\"p\",\"id\":1}\n{\"cmd\":\"status\",\"id\":2}\n",
        );
        h.run_until("the trigger to be deferred", |h| {
            h.handler.deferred.len() == 1
        });
        h.send(&mut other, b"status\n");
        h.run_until("the other client's answer", |_| other.line_count() >= 1);
        h.idle_turns();
        assert_eq!(c.line_count(), 0);
        assert_eq!(
            h.handler.handled, 2,
            "the pipelined status waits behind the trigger"
        );
        let (client, id) = h.handler.deferred.pop().unwrap();
        h.complete(
            client,
            protocol::success(id.as_ref(), &body("result", json!({"ok": true}))),
        );
        h.run_until("both answers", |_| c.line_count() >= 2);
        assert_eq!(
            c.lines(),
            [
                json!({"status": "success", "id": 1, "result": {"ok": true}}),
                json!({"status": "success", "id": 2, "echo": "status"}),
            ]
        );
    }

    /// Takes the requests the server has, as the daemon would, without answering them.
    fn take_requests(h: &mut Harness) -> Vec<Incoming> {
        std::iter::from_fn(|| h.server.next_request(h.poll.registry())).collect()
    }

    fn ids(requests: &[Incoming]) -> Vec<(ClientId, Option<Value>)> {
        requests
            .iter()
            .map(|r| (r.client, r.request.id.clone()))
            .collect()
    }

    #[test]
    fn requests_are_handed_over_one_per_client_until_answered_in_order() {
        let mut h = Harness::new("handover", Limits::default());
        h.execute = false;
        let mut c = h.connect();
        let mut other = h.connect();
        h.send(
            &mut c,
            b"{\"cmd\":\"status\",\"id\":1}\n{\"cmd\":\"list\",\"id\":2}\nplugin p\n",
        );
        h.send(&mut other, b"{\"cmd\":\"help\",\"id\":\"o\"}\n");
        let mut first = Vec::new();
        h.run_until("a request from each client", |h| {
            first.extend(take_requests(h));
            first.len() >= 2
        });
        h.idle_turns();
        assert!(
            take_requests(&mut h).is_empty(),
            "a client's next request waits for the answer to its last"
        );
        first.sort_by_key(|r| r.request.id == Some(json!("o")));
        let (mine, theirs) = (&first[0], &first[1]);
        assert_eq!(mine.request.command, Command::Status);
        assert_eq!(mine.request.id, Some(json!(1)));
        assert_eq!(mine.peer.uid, nix::unistd::getuid().as_raw());
        assert_eq!(mine.peer.pid, std::process::id() as i32);
        assert_eq!(theirs.request.command, Command::Help);
        assert_ne!(mine.client, theirs.client);
        assert_eq!(c.line_count() + other.line_count(), 0);

        // Answering lets exactly the next request of that client through.
        let client = mine.client;
        h.server
            .reply(client, protocol::success(Some(&json!(1)), &Map::new()));
        let second = take_requests(&mut h);
        assert_eq!(ids(&second), [(client, Some(json!(2)))]);
        h.server
            .reply(client, protocol::success(Some(&json!(2)), &Map::new()));
        let third = take_requests(&mut h);
        assert_eq!(ids(&third), [(client, None)]);
        assert_eq!(third[0].request.command, Command::Plugin { id: "p".into() });
        h.server
            .reply(client, protocol::success(Some(&json!(3)), &Map::new()));
        assert!(take_requests(&mut h).is_empty());
        h.run_until("the three answers", |_| c.line_count() >= 3);
        let answered: Vec<Value> = c.lines().iter().map(|l| l["id"].clone()).collect();
        assert_eq!(answered, [json!(1), json!(2), json!(3)]);
        assert_eq!(other.line_count(), 0, "the other client is still waiting");
        h.server
            .reply(theirs.client, protocol::success(None, &Map::new()));
        assert!(take_requests(&mut h).is_empty());
        h.run_until("the other client's answer", |_| other.line_count() >= 1);
    }

    #[test]
    fn a_hung_up_client_is_served_while_the_daemon_executes_its_request() {
        let mut h = Harness::new("hungup", Limits::default());
        h.execute = false;
        let mut c = h.connect();
        h.send(&mut c, b"status\nlist\n");
        drop(c);
        let mut first = Vec::new();
        h.run_until("the first request", |h| {
            first.extend(take_requests(h));
            !first.is_empty()
        });
        h.idle_turns();
        assert_eq!(h.server.client_count(), 1, "kept while its request runs");
        h.server
            .reply(first[0].client, protocol::success(None, &Map::new()));
        let second = take_requests(&mut h);
        assert_eq!(second.len(), 1, "what it sent is still served");
        assert_eq!(second[0].request.command, Command::List);
        h.server
            .reply(second[0].client, protocol::success(None, &Map::new()));
        assert!(take_requests(&mut h).is_empty());
        h.run_until("the client to be closed", |h| h.server.client_count() == 0);
    }

    #[test]
    fn completing_for_a_vanished_client_is_a_no_op() {
        let mut h = Harness::new("vanished", Limits::default());
        let mut c = h.connect();
        h.send(&mut c, b"trigger p\n");
        h.run_until("the trigger to be deferred", |h| {
            h.handler.deferred.len() == 1
        });
        drop(c);
        h.run_until("the client to be closed", |h| h.server.client_count() == 0);
        let mut newer = h.connect();
        h.run_until("a newer client", |h| h.server.client_count() == 1);
        let (client, id) = h.handler.deferred.pop().unwrap();
        h.complete(client, protocol::success(id.as_ref(), &Map::new()));
        h.idle_turns();
        assert_eq!(
            newer.line_count(),
            0,
            "the answer must not reach another client"
        );
        assert_eq!(h.server.client_count(), 1);
    }

    #[test]
    fn a_stuck_subscriber_costs_little_and_learns_how_much_it_missed() {
        const EVENTS: u64 = 100_000;
        let mut h = Harness::new("stuck", Limits::default());
        let mut sub = h.connect();
        let mut other = h.connect();
        h.send(&mut sub, b"subscribe\n");
        h.run_until("the subscription", |_| sub.line_count() >= 1);
        let records: Vec<EventRecord> = (0..=EVENTS)
            .map(|n| {
                let event = json!({"event": "plugin_output", "plugin": "p", "stream": "stdout", "n": n,
                                   "line": "some output line that makes the event a realistic size"});
                EventRecord::from_json(Some("p".into()), false, &event)
            })
            .collect();

        let started = Instant::now();
        for record in &records[..EVENTS as usize] {
            h.server.publish(h.poll.registry(), record);
        }
        let elapsed = started.elapsed();
        eprintln!("published {EVENTS} events to a stuck subscriber in {elapsed:?}");
        assert!(
            elapsed < Duration::from_secs(5),
            "publishing took {elapsed:?}"
        );

        h.send(&mut other, b"status\n");
        h.run_until("the other client's answer", |_| other.line_count() >= 1);
        assert_eq!(other.lines()[0]["echo"], "status");

        h.run_until("the lagged event", |_| {
            sub.receive();
            sub.received.windows(8).any(|w| w == b"\"lagged\"")
        });
        h.server
            .publish(h.poll.registry(), &records[EVENTS as usize]);
        let last = format!("\"n\":{EVENTS},");
        h.run_until("the next event", |_| {
            sub.receive();
            sub.received
                .windows(last.len())
                .any(|w| w == last.as_bytes())
        });

        let lines = sub.lines();
        let lagged = lines.iter().position(|l| l["event"] == "lagged").unwrap();
        let delivered: Vec<u64> = lines[1..lagged]
            .iter()
            .map(|l| l["n"].as_u64().unwrap())
            .collect();
        assert_eq!(
            delivered,
            (0..delivered.len() as u64).collect::<Vec<_>>(),
            "events arrive in order"
        );
        assert!(!delivered.is_empty());
        assert_eq!(lines[lagged]["dropped"], EVENTS - delivered.len() as u64);
        assert!(lines[lagged]["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(lines.len(), lagged + 2);
        assert_eq!(lines[lagged + 1]["n"], EVENTS);
    }

    #[test]
    fn subscribers_get_only_the_events_their_filter_accepts() {
        let mut h = Harness::new("filters", Limits::default());
        let mut all = h.connect();
        let mut only_a = h.connect();
        let mut verbose = h.connect();
        h.send(&mut all, b"subscribe\n");
        h.send(&mut only_a, b"subscribe a\n");
        h.send(&mut verbose, b"{\"cmd\":\"subscribe\",\"verbose\":true}\n");
        h.run_until("three subscriptions", |h| h.server.subscriber_count() == 3);
        h.publish(
            Some("a"),
            false,
            json!({"event": "plugin_started", "plugin": "a"}),
        );
        h.publish(
            Some("b"),
            false,
            json!({"event": "plugin_started", "plugin": "b"}),
        );
        h.publish(
            Some("a"),
            true,
            json!({"event": "change_ignored", "plugin": "a"}),
        );
        h.publish(None, false, json!({"event": "config_reloaded"}));
        h.send(&mut all, b"status\n");
        h.run_until("every delivery", |_| {
            all.line_count() >= 5 && only_a.line_count() >= 2 && verbose.line_count() >= 5
        });
        h.idle_turns();
        let names = |c: &mut Client| -> Vec<String> {
            c.receive();
            c.lines()
                .iter()
                .skip(1)
                .map(|l| {
                    format!(
                        "{}{}",
                        l["event"].as_str().unwrap_or("reply"),
                        l["plugin"].as_str().unwrap_or("")
                    )
                })
                .collect()
        };
        assert_eq!(
            names(&mut all),
            [
                "plugin_starteda",
                "plugin_startedb",
                "config_reloaded",
                "reply"
            ]
        );
        assert_eq!(names(&mut only_a), ["plugin_starteda"]);
        assert_eq!(
            names(&mut verbose),
            [
                "plugin_starteda",
                "plugin_startedb",
                "change_ignoreda",
                "config_reloaded"
            ]
        );
    }

    #[test]
    fn a_subscriber_that_hangs_up_is_removed() {
        let mut h = Harness::new("subhangup", Limits::default());
        let mut sub = h.connect();
        h.send(&mut sub, b"subscribe\n");
        h.run_until("the subscription", |h| h.server.subscriber_count() == 1);
        drop(sub);
        h.run_until("the subscriber to be removed", |h| {
            h.server.client_count() == 0
        });
        h.publish(None, false, json!({"event": "config_reloaded"}));
        assert_eq!(h.server.subscriber_count(), 0);
    }

    #[test]
    fn a_half_closed_subscriber_keeps_receiving_events() {
        let mut h = Harness::new("subhalf", Limits::default());
        let mut sub = h.connect();
        h.send(&mut sub, b"subscribe\n");
        sub.stream.shutdown(std::net::Shutdown::Write).unwrap();
        h.run_until("the subscription", |_| sub.line_count() >= 1);
        h.idle_turns();
        h.publish(None, false, json!({"event": "config_reloaded"}));
        h.run_until("the event", |_| sub.line_count() >= 2);
        assert!(!sub.closed);
    }

    fn nobody() -> Peer {
        Peer {
            uid: 65534,
            gid: 65534,
            pid: 1,
            groups: vec![65534],
        }
    }

    #[test]
    fn mutating_commands_need_an_authorized_peer() {
        let mut h = Harness::new("denied", Limits::default());
        let mut c = h.connect();
        h.run_until("the client", |h| h.server.client_count() == 1);
        h.server.rules.auth = AuthPolicy {
            daemon_euid: 4242,
            socket_gid: Some(4343),
        };
        for conn in h.server.conns.values_mut() {
            conn.peer = nobody();
        }
        h.send(
            &mut c,
            b"{\"cmd\":\"disable\",\"id\":\"d\"}\nstatus\ntrigger x\nsubscribe\n",
        );
        h.run_until("four answers", |_| c.line_count() >= 4);
        let lines = c.lines();
        assert_eq!(lines[0]["code"], "permission_denied");
        assert_eq!(lines[0]["id"], "d");
        assert!(lines[0]["error"].as_str().unwrap().contains("uid 65534"));
        assert_eq!(lines[1]["echo"], "status");
        assert_eq!(lines[2]["code"], "permission_denied");
        assert_eq!(lines[3]["subscribed"], true);
        assert_eq!(
            h.handler.handled, 2,
            "denied requests never reach the handler"
        );
    }

    #[test]
    fn authorization_follows_uid_and_socket_group() {
        let policy = AuthPolicy {
            daemon_euid: 1000,
            socket_gid: Some(990),
        };
        let peer = |uid, gid, groups: &[u32]| Peer {
            uid,
            gid,
            pid: 7,
            groups: groups.to_vec(),
        };
        assert!(is_authorized(&peer(0, 0, &[]), &policy), "root");
        assert!(
            is_authorized(&peer(1000, 1000, &[]), &policy),
            "the daemon's user"
        );
        assert!(
            is_authorized(&peer(1001, 990, &[]), &policy),
            "primary group"
        );
        assert!(
            is_authorized(&peer(1001, 1001, &[27, 990]), &policy),
            "supplementary group"
        );
        assert!(
            !is_authorized(&peer(1001, 1001, &[27]), &policy),
            "someone else"
        );
        assert!(!is_authorized(&nobody(), &policy));
        let no_group = AuthPolicy {
            daemon_euid: 1000,
            socket_gid: None,
        };
        assert!(!is_authorized(&peer(1001, 990, &[990]), &no_group));
        assert!(is_authorized(&peer(1000, 5, &[]), &no_group));
    }

    #[test]
    fn peers_are_read_from_the_kernel() {
        let mut h = Harness::new("peercred", Limits::default());
        let _c = h.connect();
        h.run_until("the client", |h| h.server.client_count() == 1);
        let peer = &h.server.conns.values().next().unwrap().peer;
        assert_eq!(peer.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(peer.gid, nix::unistd::getegid().as_raw());
        assert_eq!(peer.pid, std::process::id() as i32);
        let mut ours: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .iter()
            .map(|g| g.as_raw())
            .collect();
        let mut theirs = peer.groups.clone();
        ours.sort_unstable();
        theirs.sort_unstable();
        if !theirs.is_empty() {
            assert_eq!(theirs, ours);
        }
    }

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn the_socket_has_exactly_the_configured_mode() {
        for mode in [0o600, 0o660, 0o666] {
            let dir = TempDir::new("mode");
            let mut server =
                ControlServer::bind(&dir.sock(), mode, None, Limits::default(), BASE).unwrap();
            assert_eq!(mode_of(&dir.sock()), mode, "{mode:o}");
            assert!(
                fs::symlink_metadata(dir.sock())
                    .unwrap()
                    .file_type()
                    .is_socket()
            );
            let mut names: Vec<String> = fs::read_dir(&dir.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            assert_eq!(
                names,
                ["control.sock", "control.sock.lock"],
                "no temporary name left behind"
            );
            server.shutdown(Poll::new().unwrap().registry());
        }
    }

    #[test]
    fn a_missing_parent_directory_is_created_private() {
        let dir = TempDir::new("parent");
        let path = dir.0.join("run/hotreload/control.sock");
        let _server = ControlServer::bind(&path, 0o660, None, Limits::default(), BASE).unwrap();
        assert_eq!(mode_of(path.parent().unwrap()), 0o700);
        assert_eq!(mode_of(&path), 0o660);
    }

    #[test]
    fn a_missing_group_keeps_the_daemons_group() {
        let dir = TempDir::new("group");
        let server = ControlServer::bind(
            &dir.sock(),
            0o660,
            Some("no-such-group-hr"),
            Limits::default(),
            BASE,
        )
        .unwrap();
        assert_eq!(
            fs::metadata(dir.sock()).unwrap().gid(),
            nix::unistd::getegid().as_raw()
        );
        assert_eq!(
            server.auth_policy().socket_gid,
            Some(nix::unistd::getegid().as_raw())
        );
    }

    #[test]
    fn a_stale_socket_is_replaced() {
        let dir = TempDir::new("stale");
        drop(StdListener::bind(dir.sock()).unwrap());
        assert!(
            dir.sock().exists(),
            "the dead listener leaves its file behind"
        );
        let server =
            ControlServer::bind(&dir.sock(), 0o600, None, Limits::default(), BASE).unwrap();
        let mut h = Harness::with_server(dir, server);
        let mut c = h.connect();
        h.send(&mut c, b"status\n");
        h.run_until("the answer", |_| c.line_count() >= 1);
    }

    #[test]
    fn a_live_socket_is_address_in_use() {
        let dir = TempDir::new("live");
        let _live = StdListener::bind(dir.sock()).unwrap();
        let before = FileId::of(&dir.sock()).ok();
        let error =
            ControlServer::bind(&dir.sock(), 0o600, None, Limits::default(), BASE).unwrap_err();
        assert!(error.is_address_in_use(), "{error}");
        assert_eq!(
            error.to_string(),
            format!(
                "another process (pid {}) is already listening on {}: stop it or choose another \
                 --socket",
                std::process::id(),
                dir.sock().display()
            )
        );
        assert_eq!(
            FileId::of(&dir.sock()).ok(),
            before,
            "the live socket is untouched"
        );
    }

    #[test]
    fn a_second_server_on_the_same_path_is_refused() {
        let mut h = Harness::new("second", Limits::default());
        let error =
            ControlServer::bind(&h.dir.sock(), 0o600, None, Limits::default(), BASE).unwrap_err();
        assert!(error.is_address_in_use(), "{error}");
        assert_eq!(
            error.to_string(),
            format!(
                "another hotreloadd (pid {}) is already listening on {}: stop it or choose \
                 another --socket",
                std::process::id(),
                h.dir.sock().display()
            )
        );
        let mut c = h.connect();
        h.send(&mut c, b"status\n");
        h.run_until("the first server's answer", |_| c.line_count() >= 1);
    }

    #[test]
    fn a_regular_file_at_the_socket_path_is_refused() {
        let dir = TempDir::new("regular");
        fs::write(dir.sock(), "precious").unwrap();
        let error =
            ControlServer::bind(&dir.sock(), 0o600, None, Limits::default(), BASE).unwrap_err();
        assert!(!error.is_address_in_use());
        assert!(
            error.to_string().starts_with(&format!(
                "{} exists and is not a socket",
                dir.sock().display()
            )),
            "{error}"
        );
        assert_eq!(fs::read_to_string(dir.sock()).unwrap(), "precious");
    }

    #[test]
    fn shutdown_closes_clients_and_removes_the_socket() {
        let mut h = Harness::new("shutdown", Limits::default());
        let mut c = h.connect();
        h.run_until("the client", |h| h.server.client_count() == 1);
        h.server.shutdown(h.poll.registry());
        assert!(!h.dir.sock().exists());
        assert_eq!(h.server.client_count(), 0);
        h.run_until("end of file", |_| {
            c.receive();
            c.closed
        });
        let again = ControlServer::bind(&h.dir.sock(), 0o600, None, Limits::default(), BASE);
        assert!(again.is_ok(), "the lock was released");
    }

    #[test]
    fn shutdown_leaves_a_file_that_replaced_our_socket() {
        let dir = TempDir::new("replaced");
        let mut server =
            ControlServer::bind(&dir.sock(), 0o600, None, Limits::default(), BASE).unwrap();
        fs::remove_file(dir.sock()).unwrap();
        fs::write(dir.sock(), "not ours").unwrap();
        server.shutdown(Poll::new().unwrap().registry());
        assert_eq!(fs::read_to_string(dir.sock()).unwrap(), "not ours");
    }

    #[test]
    fn an_inherited_listener_is_served_and_never_unlinked() {
        let dir = TempDir::new("inherited");
        let listener = StdListener::bind(dir.sock()).unwrap();
        let server = ControlServer::from_listener(listener, Limits::default(), BASE).unwrap();
        assert_eq!(server.path(), Some(dir.sock().as_path()));
        let mut h = Harness::with_server(dir, server);
        let mut c = h.connect();
        h.send(&mut c, b"status\n");
        h.run_until("the answer", |_| c.line_count() >= 1);
        h.server.shutdown(h.poll.registry());
        assert!(h.dir.sock().exists());
    }

    #[test]
    fn client_tokens_stay_in_the_servers_range() {
        let dir = TempDir::new("tokens");
        let server =
            ControlServer::bind(&dir.sock(), 0o600, None, Limits::default(), BASE).unwrap();
        let listener = server.listener_token();
        assert!(server.owns(listener));
        assert!(!server.owns(Token(BASE - 1)));
        assert!(!server.owns(Token(BASE + (1 << 32))));
        for id in [1, 2, (1 << 32) - 1, 1 << 32, (1 << 32) + 1, u64::MAX] {
            let token = server.token_of(ClientId(id));
            assert!(server.owns(token), "{id}");
            assert_ne!(token, listener, "{id}");
        }
        assert_eq!(
            server.token_of(ClientId(1)),
            server.token_of(ClientId(1 << 32))
        );
    }
}
