//! A Unix socket's file, the one lifecycle shared by the control socket (`control`), plugins'
//! listening `unix:` sockets (`listen`) and plugins' notify sockets (`plugin_notify`).
//!
//! - **Probe** what is at a path before binding there ([`probe`]): nothing, a stale file left
//!   by a process that is gone (connecting is refused), a live listener (it answers), or
//!   something that is not a socket at all (anyone's data: never touched).
//! - **Claim** the file just bound ([`SocketFile::claim`]): its device and inode are recorded.
//! - **Remove on drop only if still ours**: someone may have deleted the file and bound another
//!   socket (or put any file) at the same path since; comparing device and inode keeps us from
//!   removing theirs.
//!
//! Each user words its own errors (they name its config key or its remedy); this module returns
//! `io::Error`s and facts.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, UnixAddr, connect, getsockopt, socket, sockopt,
};

/// Which file a path names (device and inode), to recognise our own socket file later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The identity of the file at `path` itself (a symlink is not followed).
    pub fn of(path: &Path) -> io::Result<FileId> {
        fs::symlink_metadata(path).map(|meta| FileId::from(&meta))
    }
}

impl From<&fs::Metadata> for FileId {
    fn from(meta: &fs::Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// What is at a path where we mean to bind a socket.
#[derive(Debug)]
pub enum Occupant {
    /// Nothing: bind away.
    Nothing,
    /// A socket file nobody listens on any more (connecting is refused): safe to remove.
    Stale,
    /// A socket a process listens on; its pid when the probe connection learnt it
    /// (`SO_PEERCRED`); None when its accept queue was full.
    Live(Option<i32>),
    /// A file that is not a socket (or a symlink): anyone's data, never touched.
    NotASocket,
    /// A socket whose state the probe could not tell.
    Unknown(io::Error),
}

/// Probe the socket file at `path` by connecting a non-blocking stream socket to it.
/// `Err` only when `path` cannot be inspected at all.
pub fn probe(path: &Path) -> io::Result<Occupant> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => Ok(probe_socket(path)),
        Ok(_) => Ok(Occupant::NotASocket),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Occupant::Nothing),
        Err(e) => Err(e),
    }
}

fn probe_socket(path: &Path) -> Occupant {
    let attempt = || -> nix::Result<Option<i32>> {
        let address = UnixAddr::new(path)?;
        let probe = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        connect(probe.as_raw_fd(), &address)?;
        let pid = getsockopt(&probe, sockopt::PeerCredentials)
            .ok()
            .map(|cred| cred.pid())
            .filter(|&pid| pid > 0);
        Ok(pid)
    };
    match attempt() {
        Ok(pid) => Occupant::Live(pid),
        // EAGAIN: the accept queue is full, which only a live listener has.
        Err(Errno::EAGAIN) => Occupant::Live(None),
        Err(Errno::ECONNREFUSED) => Occupant::Stale,
        // Gone between the stat and the connect.
        Err(Errno::ENOENT) => Occupant::Nothing,
        Err(errno) => Occupant::Unknown(errno.into()),
    }
}

/// Remove the file at `path` if it is a socket (a missing file is fine); for a stale file
/// [`probe`] found, or where every socket at the path is known to be ours (a private
/// directory only we write).
pub fn remove_socket(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// What [`SocketFile::remove_if_ours`] found.
#[derive(Debug)]
pub enum Removal {
    /// It was ours and is gone now.
    Removed,
    /// Another file sits at the path since (or none does): left alone.
    NotOurs,
    /// It was ours but could not be removed.
    Failed(io::Error),
}

/// A socket file we bound: removed when dropped, but only while the path still names this very
/// file.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    id: FileId,
}

impl SocketFile {
    /// Claim the socket file just bound at `path`.
    pub fn claim(path: &Path) -> io::Result<SocketFile> {
        Ok(SocketFile::with_id(path, FileId::of(path)?))
    }

    /// Claim the socket file at `path` whose identity the caller already has.
    pub fn with_id(path: &Path, id: FileId) -> SocketFile {
        SocketFile {
            path: path.to_owned(),
            id,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the path still names the file we bound.
    pub fn is_ours(&self) -> bool {
        FileId::of(&self.path).is_ok_and(|id| id == self.id)
    }

    /// Removes the file now if it is still ours, and says what happened; dropping `self` then
    /// does nothing more.
    pub fn remove_if_ours(self) -> Removal {
        let removal = self.remove_now();
        std::mem::forget(self);
        removal
    }

    fn remove_now(&self) -> Removal {
        if !self.is_ours() {
            return Removal::NotOurs;
        }
        match fs::remove_file(&self.path) {
            Ok(()) => Removal::Removed,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Removal::NotOurs,
            Err(e) => Removal::Failed(e),
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match self.remove_now() {
            Removal::Removed => {}
            Removal::NotOurs => log::debug!(
                "socket file {} was replaced or removed since we bound it; leaving it",
                self.path.display()
            ),
            Removal::Failed(e) => {
                log::warn!("failed to remove socket file {}: {e}", self.path.display())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::TestDir;
    use std::os::unix::net::UnixListener;

    #[test]
    fn probe_tells_nothing_stale_live_and_other_files_apart() {
        let dir = TestDir::new("sockfile-probe");
        let path = dir.join("s");
        assert!(matches!(probe(&path).unwrap(), Occupant::Nothing));
        let listener = UnixListener::bind(&path).unwrap();
        let me = std::process::id() as i32;
        assert!(matches!(probe(&path).unwrap(), Occupant::Live(Some(pid)) if pid == me));
        drop(listener);
        // Another test thread's child, between its fork and its exec, may hold a copy of the
        // listener for a moment (the same thing a killed daemon's child does, see
        // `control::wait_for_dead_holder`): look again until a deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !matches!(probe(&path).unwrap(), Occupant::Stale)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(matches!(probe(&path).unwrap(), Occupant::Stale));
        fs::remove_file(&path).unwrap();
        fs::write(&path, b"data").unwrap();
        assert!(matches!(probe(&path).unwrap(), Occupant::NotASocket));
    }

    #[test]
    fn drop_removes_the_file_only_while_it_is_ours() {
        let dir = TestDir::new("sockfile-drop");
        let path = dir.join("s");
        let _first = UnixListener::bind(&path).unwrap();
        let ours = SocketFile::claim(&path).unwrap();
        fs::remove_file(&path).unwrap();
        let _theirs = UnixListener::bind(&path).unwrap();
        assert!(!ours.is_ours());
        drop(ours);
        assert!(
            path.exists(),
            "a socket bound later by someone else was removed"
        );
        let again = SocketFile::claim(&path).unwrap();
        assert!(matches!(again.remove_if_ours(), Removal::Removed));
        assert!(!path.exists());
    }
}
