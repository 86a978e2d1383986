//! Per-plugin listening sockets (`sockets = ["tcp:127.0.0.1:9000", "unix:/run/x.sock"]`).
//!
//! Zero-downtime reloads need the listening socket to outlive every plugin instance: the daemon
//! binds each socket once, keeps the [`ListenSocket`] for as long as the plugin is configured,
//! and hands a duplicate to every instance at fd 3 onward with `LISTEN_FDS`, `LISTEN_PID` and
//! `LISTEN_FDNAMES` (systemd's socket-activation convention; [`ListenSocket::name`] is the
//! FDNAME). Connections arriving while one instance stops and the next starts wait in the
//! kernel's accept queue instead of being refused, hence the large backlog.
//!
//! The sockets are close-on-exec (so they reach only the children the spawner gives them to,
//! via `dup2`) and left in blocking mode: the daemon never accepts on them, and plugins expect
//! an ordinary listening socket.
//!
//! Hostnames are never resolved (a blocking DNS query has no place in the event loop, and an
//! address that changes with DNS is no fixed listening address); only `localhost` is accepted,
//! as 127.0.0.1. Port 0 is accepted: the kernel then picks a port once, when the daemon binds,
//! and it stays fixed across reloads (mostly useful to tests, see [`ListenSocket::local_port`]).
//!
//! The spec is the [`SocketSpec`] configuration parsed (`PluginSettings::sockets`), so whatever
//! configuration accepts binds here. A Unix socket's file (stale probe, removal only while it is
//! still ours) is `sys::socket_file`'s.

use std::fs::{self, DirBuilder, Permissions};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

/// The accept queue length requested: as deep as the kernel allows, to hold the connections that
/// arrive while a plugin restarts. Linux silently caps it at `net.core.somaxconn` (4096 by
/// default since 5.4), so this asks for exactly that limit.
pub const BACKLOG: libc::c_int = libc::c_int::MAX;

/// systemd's limit on an FDNAME.
const MAX_FD_NAME_BYTES: usize = 255;

/// Mode of a Unix socket file: owner and group may connect.
const UNIX_SOCKET_MODE: u32 = 0o660;

/// Mode of directories created to hold a Unix socket: clients must be able to traverse them.
const PARENT_DIR_MODE: u32 = 0o755;

pub use crate::config::SocketSpec;
use crate::sys::socket_file::{self, Occupant, SocketFile};

/// A bound, listening socket, kept open by the daemon across plugin reloads.
#[derive(Debug)]
pub struct ListenSocket {
    pub spec: SocketSpec,
    /// Close-on-exec and blocking; the spawner `dup2`s it into place.
    pub fd: OwnedFd,
    /// The `LISTEN_FDNAMES` entry: `tcp-127.0.0.1-9000`, `tcp-[__1]-9000` (`:` is the list
    /// separator, so IPv6 colons become `_`), or the Unix socket's file name.
    pub name: String,
    /// The port actually bound (differs from the spec's when that is 0).
    local_port: Option<u16>,
    /// The socket file we created, removed on drop unless someone else put a file at the same
    /// path since. Held only for its `Drop`.
    #[allow(dead_code)]
    unix_file: Option<SocketFile>,
}

impl ListenSocket {
    /// The TCP port the socket listens on (`None` for Unix sockets).
    pub fn local_port(&self) -> Option<u16> {
        self.local_port
    }
}

/// Bind and listen on `spec`. For a Unix socket, first create a missing parent directory and
/// remove a stale socket file (one nobody listens on); anything else at the path is an error.
pub fn bind(spec: &SocketSpec) -> Result<ListenSocket, String> {
    match spec {
        SocketSpec::Tcp(addr) => bind_tcp(spec, *addr),
        SocketSpec::Unix(path) => bind_unix(spec, path),
    }
}

fn bind_tcp(spec: &SocketSpec, addr: SocketAddr) -> Result<ListenSocket, String> {
    // std sets SO_REUSEADDR (a restarted daemon can rebind despite TIME_WAIT connections) and
    // SOCK_CLOEXEC.
    let listener = TcpListener::bind(addr).map_err(|error| bind_error(spec, &error))?;
    let local = listener
        .local_addr()
        .map_err(|error| format!("cannot read the address of socket {spec}: {error}"))?;
    let fd = OwnedFd::from(listener);
    raise_backlog(&fd, spec)?;
    Ok(ListenSocket {
        spec: spec.clone(),
        fd,
        name: tcp_fd_name(local),
        local_port: Some(local.port()),
        unix_file: None,
    })
}

fn bind_unix(spec: &SocketSpec, path: &Path) -> Result<ListenSocket, String> {
    create_parent_dir(spec, path)?;
    remove_stale_socket(spec, path)?;
    let listener = UnixListener::bind(path).map_err(|error| bind_error(spec, &error))?;
    let fd = OwnedFd::from(listener);
    let unix_file = SocketFile::claim(path).map_err(|error| {
        format!(
            "cannot inspect socket file {} just bound: {error}",
            path.display()
        )
    })?;
    // From here on, dropping `socket` on an error removes the file again.
    let socket = ListenSocket {
        spec: spec.clone(),
        fd,
        name: unix_fd_name(path),
        local_port: None,
        unix_file: Some(unix_file),
    };
    fs::set_permissions(path, Permissions::from_mode(UNIX_SOCKET_MODE)).map_err(|error| {
        format!(
            "cannot set mode {UNIX_SOCKET_MODE:o} on socket file {}: {error}",
            path.display()
        )
    })?;
    raise_backlog(&socket.fd, spec)?;
    Ok(socket)
}

fn bind_error(spec: &SocketSpec, error: &io::Error) -> String {
    let remedy = match (error.kind(), spec) {
        (io::ErrorKind::AddrInUse, SocketSpec::Tcp(_)) => {
            "; another process listens there (see `ss -ltnp`)"
        }
        (io::ErrorKind::AddrNotAvailable, _) => "; that address is not configured on this host",
        (io::ErrorKind::PermissionDenied, SocketSpec::Tcp(_)) => {
            "; ports below 1024 need root or CAP_NET_BIND_SERVICE"
        }
        (io::ErrorKind::PermissionDenied, SocketSpec::Unix(_)) => {
            "; the daemon needs write access to the directory"
        }
        _ => "",
    };
    format!("cannot bind socket {spec}: {error}{remedy}")
}

/// std's backlog depends on its version (128 in older releases, `SOMAXCONN` in recent ones);
/// calling `listen` again on a listening socket just sets the queue length to ours.
fn raise_backlog(fd: &OwnedFd, spec: &SocketSpec) -> Result<(), String> {
    crate::sys::fd::listen(fd.as_fd(), BACKLOG)
        .map_err(|error| format!("cannot set the backlog of socket {spec}: {error}"))
}

fn create_parent_dir(spec: &SocketSpec, path: &Path) -> Result<(), String> {
    let Some(parent) = path.parent() else {
        return Ok(());
    };
    DirBuilder::new()
        .recursive(true)
        .mode(PARENT_DIR_MODE)
        .create(parent)
        .map_err(|error| {
            format!(
                "cannot create directory {} for socket {spec}: {error}",
                parent.display()
            )
        })
}

/// Remove a socket file left behind by a dead process, so the bind can succeed. A file that
/// is not a socket (or a symlink) may be anyone's data and is never touched; a socket someone
/// still listens on belongs to a running process and is not stolen.
fn remove_stale_socket(spec: &SocketSpec, path: &Path) -> Result<(), String> {
    let shown = path.display();
    let occupant = socket_file::probe(path)
        .map_err(|error| format!("cannot inspect {shown} for socket {spec}: {error}"))?;
    match occupant {
        Occupant::Nothing => Ok(()),
        Occupant::NotASocket => Err(format!(
            "cannot bind socket {spec}: {shown} exists and is not a socket; remove it or choose another path"
        )),
        Occupant::Live(_) => Err(format!(
            "cannot bind socket {spec}: a running process listens on {shown}; stop it or choose another path"
        )),
        Occupant::Unknown(error) => Err(format!(
            "cannot bind socket {spec}: cannot tell whether {shown} is in use ({error}); remove it if it is stale"
        )),
        Occupant::Stale => socket_file::remove_socket(path)
            .map_err(|error| format!("cannot remove stale socket file {shown}: {error}")),
    }
}

fn tcp_fd_name(local: SocketAddr) -> String {
    match local {
        SocketAddr::V4(v4) => format!("tcp-{}-{}", v4.ip(), v4.port()),
        SocketAddr::V6(v6) => format!(
            "tcp-[{}]-{}",
            v6.ip().to_string().replace(':', "_"),
            v6.port()
        ),
    }
}

/// The socket's file name with anything systemd refuses in an FDNAME (non-ASCII, control
/// characters, the `:` separator) replaced by `_`.
fn unix_fd_name(path: &Path) -> String {
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy())
        .unwrap_or_default();
    let mut name: String = file_name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != ':' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    name.truncate(MAX_FD_NAME_BYTES);
    if name.is_empty() {
        name.push_str("unix");
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::TestDir;
    use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    use nix::sys::socket::{getsockopt, sockopt};
    use std::net::{Ipv4Addr, Ipv6Addr, TcpStream};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::os::unix::net::UnixStream;

    fn tcp(addr: &str) -> SocketSpec {
        SocketSpec::Tcp(addr.parse().unwrap())
    }

    #[test]
    fn fd_names_follow_systemd_rules() {
        assert_eq!(
            tcp_fd_name("127.0.0.1:9000".parse().unwrap()),
            "tcp-127.0.0.1-9000"
        );
        assert_eq!(
            tcp_fd_name(SocketAddr::from((Ipv6Addr::LOCALHOST, 80))),
            "tcp-[__1]-80"
        );
        assert_eq!(unix_fd_name(Path::new("/run/x.sock")), "x.sock");
        assert_eq!(
            unix_fd_name(Path::new("/run/a:b\u{e9}\n.sock")),
            "a_b__.sock"
        );
    }

    fn assert_cloexec_and_blocking(fd: &OwnedFd) {
        let fd_flags = FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD).unwrap());
        assert!(fd_flags.contains(FdFlag::FD_CLOEXEC));
        let status = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).unwrap());
        assert!(!status.contains(OFlag::O_NONBLOCK));
        assert!(getsockopt(fd, sockopt::AcceptConn).unwrap());
    }

    #[test]
    fn binds_tcp_on_port_zero_and_accepts_connections() {
        let socket = bind(&tcp("127.0.0.1:0")).unwrap();
        let port = socket.local_port().unwrap();
        assert_ne!(port, 0);
        assert_eq!(socket.name, format!("tcp-127.0.0.1-{port}"));
        assert_cloexec_and_blocking(&socket.fd);
        assert!(getsockopt(&socket.fd, sockopt::ReuseAddr).unwrap());

        let _client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let listener = TcpListener::from(socket.fd.try_clone().unwrap());
        let (_server, peer) = listener.accept().unwrap();
        assert!(peer.ip().is_loopback());
    }

    #[test]
    fn tcp_address_in_use_is_an_error_naming_it() {
        let first = bind(&tcp("127.0.0.1:0")).unwrap();
        let spec = SocketSpec::Tcp(SocketAddr::from((
            Ipv4Addr::LOCALHOST,
            first.local_port().unwrap(),
        )));
        let error = bind(&spec).unwrap_err();
        assert!(error.contains(&spec.to_string()), "{error}");
        assert!(error.contains("ss -ltnp"), "{error}");
    }

    #[test]
    fn binds_unix_creating_the_parent_dir() {
        let dir = TestDir::new("listen-unix");
        let path = dir.join("sub/dir/app.sock");
        let socket = bind(&SocketSpec::Unix(path.clone())).unwrap();
        assert_eq!(socket.name, "app.sock");
        assert_eq!(socket.local_port(), None);
        assert_cloexec_and_blocking(&socket.fd);
        let metadata = fs::symlink_metadata(&path).unwrap();
        assert!(metadata.file_type().is_socket());
        assert_eq!(metadata.mode() & 0o777, 0o660);

        let mut client = UnixStream::connect(&path).unwrap();
        let listener = UnixListener::from(socket.fd.try_clone().unwrap());
        let (mut server, _) = listener.accept().unwrap();
        io::Write::write_all(&mut client, b"x").unwrap();
        let mut byte = [0u8; 1];
        io::Read::read_exact(&mut server, &mut byte).unwrap();
        assert_eq!(&byte, b"x");
    }

    #[test]
    fn stale_unix_socket_is_replaced() {
        let dir = TestDir::new("listen-stale");
        let path = dir.join("stale.sock");
        drop(UnixListener::bind(&path).unwrap()); // std leaves the file behind
        assert!(UnixStream::connect(&path).is_err(), "not stale");

        let _socket = bind(&SocketSpec::Unix(path.clone())).unwrap();
        UnixStream::connect(&path).unwrap();
    }

    #[test]
    fn live_unix_socket_is_not_stolen() {
        let dir = TestDir::new("listen-live");
        let path = dir.join("live.sock");
        let _owner = UnixListener::bind(&path).unwrap();
        let before = crate::sys::socket_file::FileId::of(&path).unwrap();

        let error = bind(&SocketSpec::Unix(path.clone())).unwrap_err();
        assert!(error.contains("running process"), "{error}");
        assert_eq!(crate::sys::socket_file::FileId::of(&path).unwrap(), before);
    }

    #[test]
    fn regular_file_at_unix_path_is_an_error() {
        let dir = TestDir::new("listen-file");
        let path = dir.join("data.sock");
        fs::write(&path, "precious").unwrap();

        let error = bind(&SocketSpec::Unix(path.clone())).unwrap_err();
        assert!(error.contains(&path.display().to_string()), "{error}");
        assert!(error.contains("not a socket"), "{error}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "precious");
    }

    #[test]
    fn drop_removes_only_our_own_socket_file() {
        let dir = TestDir::new("listen-drop");
        let path = dir.join("x.sock");
        drop(bind(&SocketSpec::Unix(path.clone())).unwrap());
        assert!(
            fs::symlink_metadata(&path).is_err(),
            "socket file left behind"
        );

        let socket = bind(&SocketSpec::Unix(path.clone())).unwrap();
        fs::remove_file(&path).unwrap();
        fs::write(&path, "someone else's").unwrap();
        drop(socket);
        assert_eq!(fs::read_to_string(&path).unwrap(), "someone else's");
    }

    #[test]
    fn backlog_is_deeper_than_128() {
        let somaxconn: usize = fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0);
        if somaxconn < 400 {
            return; // the kernel caps the backlog below what this test needs to see
        }
        let dir = TestDir::new("listen-backlog");
        let path = dir.join("deep.sock");
        let _socket = bind(&SocketSpec::Unix(path.clone())).unwrap();
        let address = UnixAddr::new(&path).unwrap();
        // A Unix listener refuses (EAGAIN) a non-blocking connect once its queue is full.
        let mut clients = Vec::new();
        for n in 0..300 {
            let client = socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                None,
            )
            .unwrap();
            connect(client.as_raw_fd(), &address)
                .unwrap_or_else(|errno| panic!("connection {n} not queued: {errno}"));
            clients.push(client);
        }
    }
}
