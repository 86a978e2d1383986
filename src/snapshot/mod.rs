//! Content-addressed snapshots of plugin executables.
//!
//! The daemon never executes the file in a plugin directory: it copies it to
//! `<runtime_dir>/snapshots/<id>/<version>` and executes the copy. A build may then overwrite the
//! original in place (no `ETXTBSY` for the builder), and the last good version stays on disk for a
//! rollback. `version` is the first 16 hex digits of the BLAKE3 hash of the content, exactly what
//! `b3sum` prints, computed in the one pass that reads the build.
//!
//! Two ways to take one, both measured on a 2-core VM (issue 14):
//! - [`Snapshotter::stage`], for a reload with an instance to stop and a build of up to
//!   3 MiB: reserve the copy's blocks, read and hash the build into memory, so the version
//!   and the pre-flight check are known before the stop, with a thread on another CPU that
//!   reads and hashes part of it and then writes the copy from those bytes (`writer.rs`); it
//!   is named once the old instance is stopped.
//! - [`take`], for everything else: copy and hash in one pass; from 1.5 MiB a helper thread on
//!   another CPU copies with `copy_file_range` while this one hashes what is already copied.
//!   Measured with interleaved reloads (BENCHMARKS.md, fourth session): 2 MiB 2.26 against
//!   2.50 ms staged, 4 MiB 2.55 against 3.56, 8 MiB 4.2 against 7.1, 50 MiB 15-19 ms; at
//!   1 MiB staging is 0.16 ms faster (the helper's CPU takes that long to wake), and at 1.5 MiB
//!   the two are even. Since staging hands its write to a thread of its own (fifth session),
//!   it is the faster up to 3 MiB for a reload; a first start (nothing to stop) still copies on
//!   two CPUs from 1.5 MiB.
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
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::fsutil::{self, RemovalWords, create_private_dir_for};
use crate::private_dir::UnsafeDir;

mod stage;
mod writer;

pub use stage::Snapshotter;
#[cfg(test)]
use stage::{STAGE_MAX, read_whole};

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
    let (input, meta) = open_regular(source, 0).map_err(|e| SnapshotError::from_open(source, e))?;
    take_open(input, &meta, source, dir)
}

/// [`take`] of a source already opened and checked by `open_regular`.
fn take_open(
    mut input: File,
    meta: &Metadata,
    source: &Path,
    dir: &Path,
) -> Result<Snapshot, SnapshotError> {
    create_snapshot_dir(dir)?;
    let write_error = |e: io::Error| SnapshotError::Write {
        path: source.to_path_buf(),
        dir: dir.to_path_buf(),
        source: e,
    };
    let (temp_path, mut output) = create_temp(dir).map_err(write_error)?;
    let copied = if meta.len() >= PARALLEL_MIN {
        copy_parallel(&input, &output, &temp_path, source, dir, meta.len())
    } else {
        copy_and_hash(&mut input, source, Some(&mut output), dir)
    };
    let copied = copied.and_then(|summary| {
        output
            .set_permissions(Permissions::from_mode(snapshot_mode(meta)))
            .map_err(write_error)?;
        drop(output);
        let path = dir.join(&summary.version);
        install(&temp_path, &path, &summary, snapshot_mode(meta)).map_err(write_error)?;
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

/// Give the copy its blocks before anything is stopped: `ENOSPC` and `EDQUOT` surface here. A
/// file system without `fallocate` just skips it (the write then reports a full disk).
fn reserve(file: &File, len: u64) -> io::Result<()> {
    let Ok(len) = i64::try_from(len) else {
        return Ok(());
    };
    if len == 0 {
        return Ok(());
    }
    match nix::fcntl::fallocate(file, nix::fcntl::FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::ENOSYS) => Ok(()),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Create the snapshot dir `dir` if missing; refuse one that is not ours alone.
fn create_snapshot_dir(dir: &Path) -> Result<(), SnapshotError> {
    create_private_dir_for("snapshot directory", dir).map_err(|source| SnapshotError::CreateDir {
        dir: dir.to_path_buf(),
        source,
    })
}

/// From this size [`take`] copies with `copy_file_range` on a helper thread while the calling
/// thread hashes what is already copied; below it one thread copying and hashing is faster (the
/// helper's CPU takes longer to wake than the half it would take over). Reloads stage builds
/// up to [`stage::STAGE_MAX`] instead (module documentation).
const PARALLEL_MIN: u64 = 1536 << 10;

/// How much the helper copies between two reports of progress: small enough that the hasher
/// starts early on a 2 MiB build (256 KiB: 2 MiB 2.28 against 2.58 ms with 1 MiB, 8 MiB 4.2
/// against 4.5; 50 MiB the same).
const PARALLEL_CHUNK: usize = 256 << 10;

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
    input: &mut impl Read,
    source: &Path,
    mut output: Option<&mut dyn Write>,
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
    fsutil::create_temp(dir, temp_name)
}

/// `.tmp.<pid>.<n>`: the name of a snapshot's temp file (`prune` removes leftovers).
fn temp_name(pid: u32, n: u64) -> OsString {
    OsString::from(format!(".tmp.{pid}.{n}"))
}

/// A fresh temp file in `dir` with blocks for `len` bytes and `mode` (none left on failure): a
/// staged snapshot's copy, made by its writer thread or, without one, by the loop's thread.
fn reserved_temp(dir: &Path, len: u64, mode: u32) -> io::Result<(PathBuf, File)> {
    let (temp, file) = create_temp(dir)?;
    let ready =
        reserve(&file, len).and_then(|()| file.set_permissions(Permissions::from_mode(mode)));
    if let Err(e) = ready {
        let _ = fs::remove_file(&temp);
        return Err(e);
    }
    Ok((temp, file))
}

/// Move the finished temp file to its version name, or drop it if an identical snapshot is
/// already there (keeping the inode of a snapshot that may be running).
fn install(temp: &Path, path: &Path, summary: &Summary, mode: u32) -> io::Result<()> {
    if reusable(path, summary, mode) {
        fs::remove_file(temp)
    } else {
        fs::rename(temp, path)
    }
}

/// True when `path` already holds this content: a regular file of ours (`lstat`: a symlink is
/// replaced, never followed) of the same size and mode. Its name is the content's hash.
fn reusable(path: &Path, summary: &Summary, mode: u32) -> bool {
    let euid = nix::unistd::geteuid().as_raw();
    fs::symlink_metadata(path).is_ok_and(|existing| {
        existing.is_file()
            && existing.uid() == euid
            && existing.len() == summary.len
            && existing.permissions().mode() & 0o777 == mode
    })
}

/// Copy `input` into `output` (the temp file at `temp`) with `copy_file_range` on a helper
/// thread, while this thread hashes each range as soon as it is in the copy, read back from the
/// copy itself: the version names exactly the bytes on disk even if the build changes meanwhile.
/// The two threads are kept on different CPUs (`sys::cpu`); a 50 MiB reload then takes about
/// what one plain copy of the build does (BENCHMARKS.md, fourth session).
fn copy_parallel(
    input: &File,
    output: &File,
    temp: &Path,
    source: &Path,
    dir: &Path,
    expected: u64,
) -> Result<Summary, SnapshotError> {
    let write_error = |e: io::Error| SnapshotError::Write {
        path: source.to_path_buf(),
        dir: dir.to_path_buf(),
        source: e,
    };
    reserve(output, expected).map_err(write_error)?;
    let readback = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(temp)
        .map_err(write_error)?;
    let copied = AtomicU64::new(0);
    let finished = AtomicBool::new(false);
    let hashing = std::thread::current();
    // Copier and hasher on different CPUs, or the scheduler has them take turns on one
    // (`sys::cpu`); the hashing thread gets its mask back below.
    let pinned = crate::sys::cpu::pin_to_this_cpu();
    let copier_cpus = pinned.as_ref().and_then(crate::sys::cpu::Pinned::others);
    let summary = std::thread::scope(|scope| {
        let copier = std::thread::Builder::new()
            .name("snapshot-copy".into())
            .spawn_scoped(scope, || {
                if let Some(cpus) = &copier_cpus {
                    crate::sys::cpu::run_on(cpus);
                }
                let result = copy_ranges(input, output, &copied, &hashing);
                finished.store(true, Ordering::Release);
                hashing.unpark();
                result
            });
        let Ok(copier) = copier else {
            // No thread to be had (EAGAIN): copy and hash here.
            let mut output = output;
            return copy_and_hash(&mut &*input, source, Some(&mut output), dir);
        };
        let hashed = hash_as_copied(&readback, &copied, &finished);
        let copy_result = copier
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the snapshot copy thread panicked")));
        let len = copy_result.map_err(write_error)?;
        let summary = hashed.map_err(write_error)?;
        debug_assert_eq!(summary.len, len);
        Ok(summary)
    });
    if let Some(pinned) = pinned {
        pinned.release();
    }
    summary
}

/// The helper's half of [`copy_parallel`]: copy to the end, publishing progress in `copied`.
/// Where the kernel cannot copy between these files, read and write instead.
fn copy_ranges(
    input: &File,
    output: &File,
    copied: &AtomicU64,
    hashing: &std::thread::Thread,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut buf = Vec::new();
    loop {
        let n = if buf.is_empty() {
            match nix::fcntl::copy_file_range(input, None, output, None, PARALLEL_CHUNK) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(
                    nix::errno::Errno::EXDEV
                    | nix::errno::Errno::EINVAL
                    | nix::errno::Errno::EOPNOTSUPP
                    | nix::errno::Errno::ENOSYS,
                ) if total == 0 => {
                    buf = vec![0u8; BUF_SIZE];
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            let n = match (&mut &*input).read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            (&mut &*output).write_all(&buf[..n])?;
            n
        };
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
        copied.store(total, Ordering::Release);
        hashing.unpark();
    }
}

/// The hashing half of [`copy_parallel`]: hash `copy` up to what `copied` says is there, until
/// the copier has `finished`.
fn hash_as_copied(copy: &File, copied: &AtomicU64, finished: &AtomicBool) -> io::Result<Summary> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; BUF_SIZE];
    let mut hashed = 0u64;
    loop {
        // Read `finished` first: progress published before it is then seen below.
        let done = finished.load(Ordering::Acquire);
        let available = copied.load(Ordering::Acquire);
        if hashed < available {
            let want = usize::try_from(available - hashed)
                .unwrap_or(BUF_SIZE)
                .min(BUF_SIZE);
            let n = copy.read_at(&mut buf[..want], hashed)?;
            if n == 0 {
                return Err(io::Error::other(
                    "the snapshot copy shrank while being hashed",
                ));
            }
            hasher.update(&buf[..n]);
            hashed += n as u64;
        } else if done {
            return Ok(Summary {
                version: version_from_hash(&hasher.finalize()),
                len: hashed,
            });
        } else {
            std::thread::park();
        }
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

    pub(crate) fn write_exec(path: &Path, content: &[u8]) {
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

    /// A build of `len` bytes whose every window differs (so a misplaced window changes the hash).
    fn patterned(len: usize, seed: u32) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed).to_le_bytes()[1])
            .collect()
    }

    #[test]
    fn a_staged_snapshot_takes_its_name_only_at_finish() {
        let t = TestDir::new("snap-stage");
        let content = patterned(300_000, 1);
        write_exec(&t.join("plugin"), &content);
        let snaps = t.join("snaps");
        let mut snapshotter = Snapshotter::new();

        let staged = snapshotter.stage(&t.join("plugin"), &snaps).unwrap();

        assert_eq!(staged.version, expected_version(&content));
        assert_eq!(staged.len, content.len() as u64);
        assert!(!staged.path.exists(), "not written before finish");
        let (bytes, mode) = snapshotter.staged(&staged.path).unwrap();
        assert_eq!((bytes, mode), (&content[..], 0o700));
        // The build may change now: the snapshot is what was hashed.
        write_exec(&t.join("plugin"), b"a newer build");

        snapshotter.finish(&staged.path).unwrap();

        assert_eq!(fs::read(&staged.path).unwrap(), content);
        let mode = fs::metadata(&staged.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(sorted_names(&snaps), vec![staged.version.clone()]);
        assert!(snapshotter.staged(&staged.path).is_none());
        assert!(
            snapshotter.held() >= content.len(),
            "the buffer is kept warm"
        );
        snapshotter.release();
        assert_eq!(snapshotter.held(), 0);
    }

    #[test]
    fn a_staged_build_is_copied_while_it_is_read_not_at_finish() {
        let t = TestDir::new("snap-stage-early");
        let content = patterned(1 << 20, 3);
        write_exec(&t.join("plugin"), &content);
        let snaps = t.join("snaps");
        let mut snapshotter = Snapshotter::new();

        let staged = snapshotter.stage(&t.join("plugin"), &snaps).unwrap();

        // The temp file fills up by itself: the writer thread copies the bytes as they are read.
        let temps = || -> Vec<PathBuf> {
            fs::read_dir(&snaps)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(".tmp."))
                })
                .collect()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let filled = temps()
                .first()
                .is_some_and(|temp| fs::read(temp).is_ok_and(|bytes| bytes == content));
            if filled {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the copy was not written before finish"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!staged.path.exists());
        snapshotter.finish(&staged.path).unwrap();
        assert_eq!(fs::read(&staged.path).unwrap(), content);
        assert!(temps().is_empty());
    }

    #[test]
    fn staging_a_snapshot_that_exists_leaves_nothing_to_write() {
        let t = TestDir::new("snap-stage-existing");
        write_exec(&t.join("plugin"), b"same bytes");
        let snaps = t.join("snaps");
        let taken = take(&t.join("plugin"), &snaps).unwrap();
        let mut snapshotter = Snapshotter::new();

        let staged = snapshotter.stage(&t.join("plugin"), &snaps).unwrap();

        assert_eq!(staged, taken);
        assert!(snapshotter.staged(&staged.path).is_none());
        assert_eq!(sorted_names(&snaps), vec![taken.version]);
    }

    #[test]
    fn a_staged_snapshot_not_finished_leaves_no_temp() {
        let t = TestDir::new("snap-stage-drop");
        write_exec(&t.join("a"), b"build a");
        write_exec(&t.join("b"), b"build b");
        let snaps = t.join("snaps");
        let mut snapshotter = Snapshotter::new();
        let a = snapshotter.stage(&t.join("a"), &snaps).unwrap();

        // Another build is staged: a's bytes are dropped, and finishing a writes nothing.
        let b = snapshotter.stage(&t.join("b"), &snaps).unwrap();
        snapshotter.finish(&a.path).unwrap();
        assert_eq!(sorted_names(&snaps), Vec::<String>::new());
        assert!(snapshotter.staged(&b.path).is_none(), "finishing a drops b");

        let c = snapshotter.stage(&t.join("a"), &snaps).unwrap();
        snapshotter.discard();
        assert!(sorted_names(&snaps).is_empty());
        drop(snapshotter);
        assert!(!c.path.exists());
    }

    #[test]
    fn a_failed_write_of_a_staged_snapshot_is_reported_until_the_next_stage() {
        let t = TestDir::new("snap-stage-fail");
        write_exec(&t.join("plugin"), b"build");
        let snaps = t.join("snaps");
        let mut snapshotter = Snapshotter::new();
        let staged = snapshotter.stage(&t.join("plugin"), &snaps).unwrap();
        // The dir goes between stage and finish: the rename of the temp fails.
        fs::remove_dir_all(&snaps).unwrap();

        let error = snapshotter.finish(&staged.path).unwrap_err().to_string();
        let again = snapshotter.finish(&staged.path).unwrap_err().to_string();

        assert!(
            error.contains(&t.join("plugin").display().to_string()),
            "{error}"
        );
        assert_eq!(again, error);
        snapshotter.stage(&t.join("plugin"), &snaps).unwrap();
        snapshotter.finish(&staged.path).unwrap();
        assert_eq!(fs::read(&staged.path).unwrap(), b"build");
    }

    #[test]
    fn a_build_that_grows_while_staged_is_read_to_its_end() {
        let t = TestDir::new("snap-grow");
        let content = patterned(BUF_SIZE * 3 + 7, 2);
        write_exec(&t.join("plugin"), &content);
        let file = File::open(t.join("plugin")).unwrap();
        let mut buf = Vec::new();

        // Expecting fewer bytes than there are, as when the file grows after fstat.
        let summary = read_whole(&file, &mut buf, 10).unwrap();

        assert_eq!(summary.len, content.len() as u64);
        assert_eq!(summary.version, expected_version(&content));
        assert_eq!(&buf[..content.len()], &content[..]);
    }

    #[test]
    fn a_large_build_is_copied_and_hashed_in_parallel_exactly() {
        let t = TestDir::new("snap-large");
        let content = patterned(PARALLEL_MIN as usize + 3 * PARALLEL_CHUNK + 12_345, 3);
        write_exec(&t.join("plugin"), &content);
        let snaps = t.join("snaps");

        let snap = take(&t.join("plugin"), &snaps).unwrap();

        assert_eq!(snap.version, expected_version(&content));
        assert_eq!(snap.len, content.len() as u64);
        assert!(
            fs::read(&snap.path).unwrap() == content,
            "the copy is the build"
        );
        assert_eq!(sorted_names(&snaps), vec![snap.version.clone()]);
        // Staging a build over STAGE_MAX takes it at once.
        let mut snapshotter = Snapshotter::new();
        let big = patterned(STAGE_MAX as usize + 1, 4);
        write_exec(&t.join("plugin"), &big);
        let staged = snapshotter.stage(&t.join("plugin"), &snaps).unwrap();
        assert!(staged.path.exists(), "written at once");
        assert_eq!(staged.version, expected_version(&big));
        assert_eq!(snapshotter.held(), 0, "no memory held for it");
    }

    #[test]
    fn a_large_copy_gives_the_daemons_thread_its_cpus_back() {
        let t = TestDir::new("snap-cpus");
        let content = patterned(PARALLEL_MIN as usize + PARALLEL_CHUNK, 5);
        write_exec(&t.join("plugin"), &content);
        let before = crate::sys::cpu::affinity(0).unwrap();

        let snap = take(&t.join("plugin"), &t.join("snaps")).unwrap();

        assert_eq!(snap.version, expected_version(&content));
        let after = crate::sys::cpu::affinity(0).unwrap();
        assert_eq!(
            crate::sys::cpu::count(&after),
            crate::sys::cpu::count(&before),
            "the hashing thread stayed pinned after the copy"
        );
    }

    #[test]
    fn staged_versions_are_the_blake3_of_the_whole_build() {
        let t = TestDir::new("snap-split");
        let snaps = t.join("snaps");
        let mut snapshotter = Snapshotter::new();
        let sizes = [
            256 << 10,
            (256 << 10) + 1,
            1 << 20,
            (1 << 20) + 1,
            (3 << 20) - 5,
            (1 << 20) - 1,
        ];
        for (n, size) in sizes.into_iter().enumerate() {
            let content = patterned(size, n as u32);
            write_exec(&t.join("plugin"), &content);
            let staged = snapshotter.stage(&t.join("plugin"), &snaps).unwrap();
            assert_eq!(staged.version, expected_version(&content), "{size} bytes");
            snapshotter.finish(&staged.path).unwrap();
            assert!(
                fs::read(&staged.path).unwrap() == content,
                "{size} bytes written"
            );
        }
    }
}
