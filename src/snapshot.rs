//! Content-addressed snapshots of plugin executables.
//!
//! The daemon never executes the file in a plugin directory: it copies it to
//! `<runtime_dir>/snapshots/<id>/<version>` and executes the copy. A build may then overwrite the
//! original in place (no `ETXTBSY` for the builder), and the last good version stays on disk for a
//! rollback. `version` is the first 16 hex digits of the BLAKE3 hash of the content, exactly what
//! `b3sum` prints, computed in the same pass as the copy so a reload reads the build only once.
//! (Writing each window on a helper thread while hashing it was measured, issue 14: no gain in
//! the daemon, where each snapshot starts cold, for 1 MiB or 50 MiB builds; not kept.)
//!
//! Why a copy and not a hard link, even of a build that was renamed in: a link shares the inode
//! with the file in the plugin dir, so the next in-place build (`cp new plugins/foo/foo`, which
//! SPEC §4 allows) would fail with `ETXTBSY` while it runs, or rewrite the last-good snapshot
//! when it does not; the file would also stay owned by whoever wrote the build (the snapshot
//! must be the daemon's own, see below), and a link cannot cross file systems. Nothing the
//! daemon can check at snapshot time rules out a later writer, so it always copies.
//!
//! Sources are opened with `O_NONBLOCK` and checked with `fstat` on the open descriptor: a FIFO
//! dropped where a build should be must never hang the single-threaded daemon, and checking the
//! open fd (not the path) leaves no window for the file to be swapped between check and read.
//!
//! What is executed is what the daemon wrote (SPEC §2). The supervisor runs a snapshot with
//! `execve` of its path, not `fexecve`: the kernel hands a `#!` script's interpreter the path
//! `/dev/fd/N`, which a close-on-exec descriptor no longer names, and one without close-on-exec
//! would leak into every plugin. The path is safe instead: every directory on it from the runtime
//! dir down is verified to be a real directory of the daemon's user that nobody else may write
//! (`private_dir`; the runtime dir when the daemon starts, `<dir>` on every [`take`]), and the
//! file itself is created `O_EXCL | O_NOFOLLOW`, owner-only, and renamed into place there. So
//! no other user can create, replace or redirect any component between the write and a later
//! exec, restarts included. The pre-flight check opens the snapshot `O_NOFOLLOW` as well.
//!
//! Nothing here calls `fsync`: the runtime dir is scratch space that is rebuilt after a reboot,
//! and a reload should cost well under a millisecond per megabyte of build.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File, FileType, Metadata, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::fsutil::{self, RemovalWords, create_private_dir_for};
use crate::private_dir::UnsafeDir;

/// Copy buffer: large enough for BLAKE3's SIMD paths to run at full speed and for few syscalls,
/// small enough to stay in L2.
const BUF_SIZE: usize = 128 * 1024;

/// Hex digits of the BLAKE3 hash kept as the version (64 bits: collisions are not a concern for
/// the handful of builds a plugin has on disk at once).
const VERSION_HEX_DIGITS: usize = 16;

/// A copy of a plugin executable, named after its content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// First 16 hex digits of the BLAKE3 hash of the content, as `b3sum` prints them.
    pub version: String,
    /// `<dir>/<version>`.
    pub path: PathBuf,
    /// Size of the content in bytes.
    pub len: u64,
}

/// Why a snapshot (or a version) could not be taken.
#[derive(Debug)]
pub enum SnapshotError {
    /// The source does not exist (or is a symlink whose target does not exist): typically it was
    /// deleted or replaced between the change event and the snapshot.
    NotFound {
        path: PathBuf,
        dangling_symlink: bool,
    },
    /// The source is a directory, FIFO, socket or device.
    NotRegular { path: PathBuf, what: &'static str },
    /// The daemon's user may not read the source.
    PermissionDenied { path: PathBuf },
    /// Opening or reading the source failed otherwise.
    Read { path: PathBuf, source: io::Error },
    /// The snapshot directory could not be created.
    CreateDir { dir: PathBuf, source: io::Error },
    /// Creating, writing or renaming the copy inside the snapshot directory failed.
    Write {
        path: PathBuf,
        dir: PathBuf,
        source: io::Error,
    },
}

impl SnapshotError {
    /// True when the source was not there (`ENOENT`): the caller can tell "deleted between the
    /// event and the snapshot" apart from a real failure.
    pub fn source_vanished(&self) -> bool {
        matches!(self, SnapshotError::NotFound { .. })
    }

    fn from_open(path: &Path, failure: OpenFailure) -> SnapshotError {
        let path = path.to_path_buf();
        match failure {
            OpenFailure::NotRegular(what) => SnapshotError::NotRegular { path, what },
            OpenFailure::Io(e) if e.kind() == io::ErrorKind::NotFound => {
                let dangling_symlink = fs::symlink_metadata(&path)
                    .map(|m| m.file_type().is_symlink())
                    .unwrap_or(false);
                SnapshotError::NotFound {
                    path,
                    dangling_symlink,
                }
            }
            OpenFailure::Io(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                SnapshotError::PermissionDenied { path }
            }
            OpenFailure::Io(source) => SnapshotError::Read { path, source },
        }
    }
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotError::NotFound {
                path,
                dangling_symlink: false,
            } => write!(f, "`{}` not found", path.display()),
            SnapshotError::NotFound {
                path,
                dangling_symlink: true,
            } => write!(
                f,
                "`{}` is a dangling symlink (its target does not exist)",
                path.display()
            ),
            SnapshotError::NotRegular { path, what } => {
                write!(f, "`{}` is {what}, not a regular file", path.display())
            }
            SnapshotError::PermissionDenied { path } => write!(
                f,
                "permission denied reading `{}`: make it readable by the daemon's user",
                path.display()
            ),
            SnapshotError::Read { path, source } => {
                write!(f, "i/o error reading `{}`: {source}", path.display())
            }
            SnapshotError::CreateDir { source, .. } if is_unsafe_dir(source) => {
                write!(f, "{source}")
            }
            SnapshotError::CreateDir { dir, source } => write!(
                f,
                "cannot create snapshot directory `{}`: {source}",
                dir.display()
            ),
            SnapshotError::Write { path, dir, source } => write!(
                f,
                "i/o error while copying `{}` into `{}`: {source}",
                path.display(),
                dir.display()
            ),
        }
    }
}

impl std::error::Error for SnapshotError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SnapshotError::Read { source, .. }
            | SnapshotError::CreateDir { source, .. }
            | SnapshotError::Write { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Whether `e` is a private directory refused as unsafe (its message says everything).
fn is_unsafe_dir(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<UnsafeDir>())
}

/// Copy `source` (following symlinks) into `dir` as `<dir>/<version>`, hashing in the same pass.
///
/// `dir` is created (mode 0700) if missing, and refused when it exists but is not a directory of
/// ours that nobody else may write into: the daemon executes what is in it (SPEC §2). The copy is written under a temp name and renamed, so
/// `<dir>/<version>` is always complete; when it already exists the content is identical and the
/// existing file (which may be running) is kept. The snapshot is mode 0700 when the source has any
/// execute bit and 0600 otherwise, so the pre-flight check of the snapshot still sees a build that
/// was written but not yet `chmod +x`ed.
pub fn take(source: &Path, dir: &Path) -> Result<Snapshot, SnapshotError> {
    let (mut input, meta) =
        open_regular(source, 0).map_err(|e| SnapshotError::from_open(source, e))?;
    create_private_dir_for("snapshot directory", dir).map_err(|source| {
        SnapshotError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        }
    })?;
    let write_error = |e: io::Error| SnapshotError::Write {
        path: source.to_path_buf(),
        dir: dir.to_path_buf(),
        source: e,
    };
    let (temp_path, mut output) = create_temp(dir).map_err(write_error)?;
    let copied = copy_and_hash(&mut input, source, Some(&mut output), dir).and_then(|summary| {
        output
            .set_permissions(Permissions::from_mode(snapshot_mode(&meta)))
            .map_err(write_error)?;
        drop(output);
        let path = dir.join(&summary.version);
        install(&temp_path, &path, &summary, snapshot_mode(&meta)).map_err(write_error)?;
        Ok(Snapshot {
            version: summary.version,
            path,
            len: summary.len,
        })
    });
    if copied.is_err() {
        // Best effort: prune() removes any temp this leaves behind.
        let _ = fs::remove_file(&temp_path);
    }
    copied
}

/// Hash `path` with the same rules as [`take`] without copying it: for no-op detection and rescans.
pub fn version_of(path: &Path) -> Result<String, SnapshotError> {
    let (mut input, _) = open_regular(path, 0).map_err(|e| SnapshotError::from_open(path, e))?;
    copy_and_hash(&mut input, path, None, Path::new("")).map(|summary| summary.version)
}

/// Remove every file in `dir` whose name is not in `keep`: stale snapshots and leftover temps.
///
/// A missing `dir` is not an error. Subdirectories are left alone (the daemon never creates any).
pub fn prune(dir: &Path, keep: &[&str]) -> io::Result<()> {
    let words = RemovalWords {
        listing: "cannot list snapshot directory",
        removing: "cannot remove stale snapshot",
    };
    let stale = |name: &OsStr| !keep.iter().any(|k| OsStr::new(k) == name);
    fsutil::remove_files_in(dir, stale, &words).map(|_removed| ())
}

/// Why [`open_regular`] failed.
#[derive(Debug)]
pub(crate) enum OpenFailure {
    /// `open` or `fstat` failed.
    Io(io::Error),
    /// The file exists but is not a regular file; the text names what it is ("a directory").
    NotRegular(&'static str),
}

/// Open `path` read-only without blocking and make sure, on the open descriptor, that it is a
/// regular file.
///
/// `O_NONBLOCK` makes opening a FIFO return at once (then `fstat` rejects it) and `O_NOCTTY` keeps
/// a terminal device from becoming our controlling terminal. std adds `O_CLOEXEC` itself.
/// `extra_flags` are or-ed in (e.g. `O_NOFOLLOW`).
pub(crate) fn open_regular(
    path: &Path,
    extra_flags: libc::c_int,
) -> Result<(File, Metadata), OpenFailure> {
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | extra_flags)
        .open(path);
    let file = match opened {
        Ok(file) => file,
        // A UNIX socket (or a device without a driver) cannot be opened at all: say what it is.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
            return Err(match fs::metadata(path) {
                Ok(meta) if !meta.is_file() => OpenFailure::NotRegular(describe(meta.file_type())),
                _ => OpenFailure::Io(e),
            });
        }
        Err(e) => return Err(OpenFailure::Io(e)),
    };
    let meta = file.metadata().map_err(OpenFailure::Io)?;
    if !meta.is_file() {
        return Err(OpenFailure::NotRegular(describe(meta.file_type())));
    }
    Ok((file, meta))
}

/// What a non-regular file is, for error messages ("`x` is a fifo, not a regular file").
pub(crate) fn describe(file_type: FileType) -> &'static str {
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a fifo"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_symlink() {
        "a symlink"
    } else if file_type.is_file() {
        "a regular file"
    } else {
        "an unknown kind of file"
    }
}

/// Version and size of the content that went through [`copy_and_hash`].
struct Summary {
    version: String,
    len: u64,
}

/// Read `input` to the end, hashing it and writing it to `output` when given.
fn copy_and_hash(
    input: &mut File,
    source: &Path,
    mut output: Option<&mut File>,
    dir: &Path,
) -> Result<Summary, SnapshotError> {
    let mut buf = vec![0u8; BUF_SIZE];
    let mut hasher = blake3::Hasher::new();
    let mut len = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(SnapshotError::Read {
                    path: source.to_path_buf(),
                    source: e,
                });
            }
        };
        let chunk = &buf[..n];
        hasher.update(chunk);
        if let Some(out) = output.as_deref_mut() {
            out.write_all(chunk).map_err(|e| SnapshotError::Write {
                path: source.to_path_buf(),
                dir: dir.to_path_buf(),
                source: e,
            })?;
        }
        len += n as u64;
    }
    Ok(Summary {
        version: version_from_hash(&hasher.finalize()),
        len,
    })
}

/// The version string of a BLAKE3 hash: its first 16 hex digits.
fn version_from_hash(hash: &blake3::Hash) -> String {
    hash.to_hex()[..VERSION_HEX_DIGITS].to_string()
}

/// Mode of a snapshot: owner-only, executable when the source has any execute bit.
fn snapshot_mode(source: &Metadata) -> u32 {
    if source.permissions().mode() & 0o111 != 0 {
        0o700
    } else {
        0o600
    }
}

/// Create a fresh temp file `<dir>/.tmp.<pid>.<n>` that nobody else can have opened.
fn create_temp(dir: &Path) -> io::Result<(PathBuf, File)> {
    fsutil::create_temp(dir, |pid, n| OsString::from(format!(".tmp.{pid}.{n}")))
}

/// Move the finished temp file to its version name, or drop it if an identical snapshot is
/// already there (keeping the inode of a snapshot that may be running). Only a regular file of
/// ours is kept (`lstat`: a symlink is replaced, never followed).
fn install(temp: &Path, path: &Path, summary: &Summary, mode: u32) -> io::Result<()> {
    let euid = nix::unistd::geteuid().as_raw();
    let reusable = fs::symlink_metadata(path).is_ok_and(|existing| {
        existing.is_file()
            && existing.uid() == euid
            && existing.len() == summary.len
            && existing.permissions().mode() & 0o777 == mode
    });
    if reusable {
        fs::remove_file(temp)
    } else {
        fs::rename(temp, path)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::fsutil::tests::sorted_names;
    use nix::sys::stat::Mode;
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    /// A unique temp directory removed on drop; shared with the other file-system modules' tests.
    pub(crate) struct TestDir(pub(crate) PathBuf);

    impl TestDir {
        pub(crate) fn new(name: &str) -> TestDir {
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir()
                .join(format!("hotreload-unit-{name}-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            TestDir(path)
        }

        pub(crate) fn join(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Run `f` on another thread and fail the test if it does not return within 10 s: proves a
    /// call does not block (a hang would otherwise stall the whole test run).
    pub(crate) fn within_deadline<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("call blocked for 10 s")
    }

    fn expected_version(content: &[u8]) -> String {
        blake3::hash(content).to_hex()[..16].to_string()
    }

    fn write_exec(path: &Path, content: &[u8]) {
        fs::write(path, content).unwrap();
        fs::set_permissions(path, Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn version_is_the_blake3_prefix() {
        let t = TestDir::new("snap-version");
        let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        write_exec(&t.join("plugin"), &content);

        let snap = take(&t.join("plugin"), &t.join("snaps")).unwrap();

        assert_eq!(snap.version, expected_version(&content));
        assert_eq!(snap.version.len(), 16);
        assert_eq!(snap.path, t.join("snaps").join(&snap.version));
        assert_eq!(snap.len, content.len() as u64);
        assert_eq!(fs::read(&snap.path).unwrap(), content);
        assert_eq!(version_of(&t.join("plugin")).unwrap(), snap.version);
    }

    #[test]
    fn snapshot_of_empty_file_has_the_empty_hash() {
        let t = TestDir::new("snap-empty");
        write_exec(&t.join("plugin"), b"");
        let snap = take(&t.join("plugin"), &t.join("snaps")).unwrap();
        assert_eq!(snap.version, expected_version(b""));
        assert_eq!(snap.len, 0);
    }

    #[test]
    fn snapshot_dir_and_file_are_private() {
        let t = TestDir::new("snap-mode");
        write_exec(&t.join("plugin"), b"#!/bin/sh\n");
        let snap = take(&t.join("plugin"), &t.join("a/b")).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&snap.path), 0o700);
        assert_eq!(mode(&t.join("a/b")), 0o700);
        assert_eq!(mode(&t.join("a")), 0o700);
    }

    #[test]
    fn non_executable_source_gives_non_executable_snapshot() {
        let t = TestDir::new("snap-noexec");
        fs::write(t.join("plugin"), b"data").unwrap();
        fs::set_permissions(t.join("plugin"), Permissions::from_mode(0o644)).unwrap();
        let snap = take(&t.join("plugin"), &t.join("snaps")).unwrap();
        let mode = fs::metadata(&snap.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // `chmod +x` afterwards: same version, and the snapshot becomes executable.
        fs::set_permissions(t.join("plugin"), Permissions::from_mode(0o755)).unwrap();
        let again = take(&t.join("plugin"), &t.join("snaps")).unwrap();
        assert_eq!(again.path, snap.path);
        let mode = fs::metadata(&again.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(sorted_names(&t.join("snaps")), vec![snap.version]);
    }

    #[test]
    fn same_content_twice_gives_same_path_and_no_temp() {
        let t = TestDir::new("snap-twice");
        write_exec(&t.join("plugin"), b"same bytes");
        let snaps = t.join("snaps");
        let first = take(&t.join("plugin"), &snaps).unwrap();
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
        let first_inode = inode(&first.path);

        let second = take(&t.join("plugin"), &snaps).unwrap();

        assert_eq!(first, second);
        assert_eq!(inode(&second.path), first_inode, "existing snapshot kept");
        assert_eq!(sorted_names(&snaps), vec![first.version]);
    }

    #[test]
    fn different_content_gives_a_new_version() {
        let t = TestDir::new("snap-new");
        let snaps = t.join("snaps");
        write_exec(&t.join("plugin"), b"one");
        let one = take(&t.join("plugin"), &snaps).unwrap();
        write_exec(&t.join("plugin"), b"two");
        let two = take(&t.join("plugin"), &snaps).unwrap();
        assert_ne!(one.version, two.version);
        assert_eq!(fs::read(&one.path).unwrap(), b"one");
        assert_eq!(fs::read(&two.path).unwrap(), b"two");
    }

    #[test]
    fn symlink_is_followed() {
        let t = TestDir::new("snap-symlink");
        write_exec(&t.join("real"), b"target content");
        symlink(t.join("real"), t.join("plugin")).unwrap();
        let snap = take(&t.join("plugin"), &t.join("snaps")).unwrap();
        assert_eq!(snap.version, expected_version(b"target content"));
        assert!(fs::symlink_metadata(&snap.path).unwrap().is_file());
    }

    #[test]
    fn missing_file_is_source_vanished() {
        let t = TestDir::new("snap-missing");
        let err = take(&t.join("nope"), &t.join("snaps")).unwrap_err();
        assert!(err.source_vanished(), "{err:?}");
        assert!(err.to_string().contains("nope"), "{err}");
        assert!(err.to_string().contains("not found"), "{err}");
        assert!(version_of(&t.join("nope")).unwrap_err().source_vanished());
    }

    #[test]
    fn dangling_symlink_is_named_as_such() {
        let t = TestDir::new("snap-dangling");
        symlink(t.join("gone"), t.join("plugin")).unwrap();
        let err = take(&t.join("plugin"), &t.join("snaps")).unwrap_err();
        assert!(err.source_vanished());
        assert!(err.to_string().contains("dangling symlink"), "{err}");
    }

    #[test]
    fn directory_is_refused() {
        let t = TestDir::new("snap-dir");
        fs::create_dir(t.join("plugin")).unwrap();
        let err = take(&t.join("plugin"), &t.join("snaps")).unwrap_err();
        assert!(!err.source_vanished());
        assert_eq!(
            err.to_string(),
            format!(
                "`{}` is a directory, not a regular file",
                t.join("plugin").display()
            )
        );
    }

    #[test]
    fn fifo_is_refused_without_blocking() {
        let t = TestDir::new("snap-fifo");
        let fifo = t.join("plugin");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o700)).unwrap();
        let snaps = t.join("snaps");
        let err = within_deadline(move || take(&fifo, &snaps)).unwrap_err();
        assert!(err.to_string().contains("is a fifo"), "{err}");
        let fifo = t.join("plugin");
        let err = within_deadline(move || version_of(&fifo)).unwrap_err();
        assert!(err.to_string().contains("is a fifo"), "{err}");
    }

    #[test]
    fn socket_is_refused() {
        let t = TestDir::new("snap-socket");
        let _listener = std::os::unix::net::UnixListener::bind(t.join("plugin")).unwrap();
        let err = take(&t.join("plugin"), &t.join("snaps")).unwrap_err();
        assert!(err.to_string().contains("is a socket"), "{err}");
    }

    #[test]
    fn failed_copy_leaves_no_temp() {
        let t = TestDir::new("snap-fail");
        fs::create_dir(t.join("plugin")).unwrap();
        fs::create_dir(t.join("snaps")).unwrap();
        assert!(take(&t.join("plugin"), &t.join("snaps")).is_err());
        assert!(sorted_names(&t.join("snaps")).is_empty());
    }

    #[test]
    fn snapshot_dir_that_is_a_file_is_a_create_dir_error() {
        let t = TestDir::new("snap-dirfile");
        write_exec(&t.join("plugin"), b"x");
        fs::write(t.join("snaps"), b"").unwrap();
        let err = take(&t.join("plugin"), &t.join("snaps")).unwrap_err();
        assert!(matches!(err, SnapshotError::CreateDir { .. }), "{err:?}");
        assert!(err.to_string().contains("snaps"), "{err}");
    }

    #[test]
    fn an_unsafe_snapshot_dir_is_refused_and_left_untouched() {
        let t = TestDir::new("snap-unsafe");
        write_exec(&t.join("plugin"), b"build");
        fs::create_dir(t.join("elsewhere")).unwrap();
        symlink(t.join("elsewhere"), t.join("linked")).unwrap();
        fs::create_dir(t.join("open")).unwrap();
        fs::set_permissions(t.join("open"), Permissions::from_mode(0o777)).unwrap();
        for (dir, says) in [("linked", "is a symlink to"), ("open", "mode 0777")] {
            let err = take(&t.join("plugin"), &t.join(dir)).unwrap_err();
            let text = err.to_string();
            assert!(
                text.starts_with(&format!(
                    "refusing to use snapshot directory {}: ",
                    t.join(dir).display()
                )) && text.contains(says),
                "{text}"
            );
        }
        assert!(sorted_names(&t.join("elsewhere")).is_empty());
        assert!(sorted_names(&t.join("open")).is_empty());
    }

    #[test]
    fn prune_keeps_only_named_files() {
        let t = TestDir::new("snap-prune");
        let snaps = t.join("snaps");
        write_exec(&t.join("plugin"), b"one");
        let one = take(&t.join("plugin"), &snaps).unwrap();
        write_exec(&t.join("plugin"), b"two");
        let two = take(&t.join("plugin"), &snaps).unwrap();
        write_exec(&t.join("plugin"), b"three");
        let three = take(&t.join("plugin"), &snaps).unwrap();
        fs::write(snaps.join(".tmp.1.2"), b"leftover").unwrap();

        prune(&snaps, &[&one.version, &three.version]).unwrap();

        let mut expected = vec![one.version, three.version];
        expected.sort();
        assert_eq!(sorted_names(&snaps), expected);
        assert!(!two.path.exists());
    }

    #[test]
    fn prune_of_missing_dir_is_ok() {
        let t = TestDir::new("snap-prune-missing");
        prune(&t.join("nothing"), &[]).unwrap();
    }
}
