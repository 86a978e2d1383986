//! Staged snapshots: what a reload needs between reading a build and writing its copy.
//!
//! A reload must know a build's version (is it new?) and check it (pre-flight) before it may
//! stop the running instance; it needs the copy on disk only to start the new one. So
//! [`Snapshotter::stage`] reads and hashes the build into memory and reserves the copy's
//! blocks (`fallocate`: a full disk fails here, while nothing has been stopped), the pre-flight
//! check runs on those bytes, and [`Snapshotter::finish`] writes them while the old instance
//! exits. The snapshot on disk is exactly the bytes that were hashed and checked, and the build
//! is read once.
//!
//! It all happens on the event loop's thread. Splitting the read and hash of a 1 MiB build with a
//! helper thread on the other CPU was measured (issue 14, BENCHMARKS.md) and gained nothing on a
//! 2-core VM: the helper starts ~140 µs after it is woken and its half takes longer there (cold
//! caches). From 1.5 MiB the copy on two CPUs (`take`) is faster, so larger builds go there.
//!
//! The buffer stays allocated between reloads (its pages already faulted in, which on a VM
//! costs as much as the copy) until [`Snapshotter::release`].

use std::fmt;
use std::fs::{self, File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{
    BUF_SIZE, Snapshot, SnapshotError, Summary, create_snapshot_dir, create_temp, install,
    open_regular, reserve, reusable, snapshot_mode, take_open, version_from_hash,
};

/// Builds up to this size are staged in memory; a larger one is copied at once, by `take`, on
/// two CPUs (where the two paths break even, see the `snapshot` module documentation).
pub(super) const STAGE_MAX: u64 = 1536 << 10;

/// Takes snapshots for reloads. See the module documentation.
#[derive(Default)]
pub struct Snapshotter {
    /// The staged build's bytes are its first `Pending::len`. The buffer only grows: its
    /// length is its capacity, so a reused buffer is neither zeroed nor faulted in again.
    buf: Vec<u8>,
    pending: Option<Pending>,
    /// The last write that failed: what [`Snapshotter::finish`] reports when it is asked for
    /// that snapshot again.
    failed: Option<Failed>,
}

/// A staged snapshot whose bytes are not written yet.
struct Pending {
    source: PathBuf,
    dir: PathBuf,
    path: PathBuf,
    temp: PathBuf,
    file: File,
    len: usize,
    /// The size `fallocate` gave the temp file.
    reserved: u64,
    mode: u32,
}

/// A staged snapshot whose write failed.
#[derive(Debug)]
struct Failed {
    path: PathBuf,
    source: PathBuf,
    dir: PathBuf,
    error: String,
}

impl Snapshotter {
    pub fn new() -> Snapshotter {
        Snapshotter::default()
    }

    /// Like [`super::take`], but a build of up to 1.5 MiB is only read, hashed and given its
    /// blocks: the returned snapshot's file exists once [`Snapshotter::finish`] has written it.
    /// A snapshot staged earlier and not finished is dropped.
    pub fn stage(&mut self, source: &Path, dir: &Path) -> Result<Snapshot, SnapshotError> {
        self.discard();
        self.failed = None;
        let (input, meta) =
            open_regular(source, 0).map_err(|e| SnapshotError::from_open(source, e))?;
        if meta.len() > STAGE_MAX {
            return take_open(input, &meta, source, dir);
        }
        create_snapshot_dir(dir)?;
        let summary =
            read_whole(&input, &mut self.buf, meta.len()).map_err(|e| SnapshotError::Read {
                path: source.to_path_buf(),
                source: e,
            })?;
        let mode = snapshot_mode(&meta);
        let path = dir.join(&summary.version);
        let snapshot = Snapshot {
            version: summary.version.clone(),
            path: path.clone(),
            len: summary.len,
        };
        if reusable(&path, &summary, mode) {
            return Ok(snapshot);
        }
        let (temp, file) = reserved_temp(dir, summary.len).map_err(|e| SnapshotError::Write {
            path: source.to_path_buf(),
            dir: dir.to_path_buf(),
            source: e,
        })?;
        self.pending = Some(Pending {
            source: source.to_path_buf(),
            dir: dir.to_path_buf(),
            path,
            temp,
            file,
            len: usize::try_from(summary.len).unwrap_or(usize::MAX),
            reserved: summary.len,
            mode,
        });
        Ok(snapshot)
    }

    /// The bytes and mode of the staged snapshot `path`, when it is staged and not yet written:
    /// what the pre-flight check reads instead of the file.
    pub fn staged(&self, path: &Path) -> Option<(&[u8], u32)> {
        self.pending
            .as_ref()
            .filter(|p| p.path == path)
            .map(|p| (&self.buf[..p.len], p.mode))
    }

    /// Make sure the snapshot `path` is on disk: write it if it is the staged one, else report
    /// the failure of its earlier write, if any. A different staged snapshot is dropped.
    pub fn finish(&mut self, path: &Path) -> Result<(), SnapshotError> {
        match self.pending.take() {
            Some(pending) if pending.path == path => {
                let written = write_staged(&pending, &self.buf[..pending.len]);
                if written.is_err() {
                    let _ = fs::remove_file(&pending.temp);
                }
                written.map_err(|e| {
                    self.failed = Some(Failed {
                        path: pending.path.clone(),
                        source: pending.source.clone(),
                        dir: pending.dir.clone(),
                        error: e.to_string(),
                    });
                    SnapshotError::Write {
                        path: pending.source,
                        dir: pending.dir,
                        source: e,
                    }
                })
            }
            other => {
                self.pending = other;
                self.discard();
                match &self.failed {
                    Some(failed) if failed.path == path => Err(SnapshotError::Write {
                        path: failed.source.clone(),
                        dir: failed.dir.clone(),
                        source: io::Error::other(failed.error.clone()),
                    }),
                    _ => Ok(()),
                }
            }
        }
    }

    /// Drop a staged snapshot that will not be written (its build was refused).
    pub fn discard(&mut self) {
        if let Some(pending) = self.pending.take() {
            let _ = fs::remove_file(&pending.temp);
        }
    }

    /// Free the buffer (after a while without reloads): the next stage faults it in again.
    pub fn release(&mut self) {
        if self.pending.is_none() {
            self.buf = Vec::new();
        }
    }

    /// Bytes held by the buffer (0 once released).
    pub fn held(&self) -> usize {
        self.buf.capacity()
    }
}

impl fmt::Debug for Snapshotter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshotter")
            .field("held", &self.held())
            .field("pending", &self.pending.as_ref().map(|p| &p.path))
            .field("failed", &self.failed)
            .finish()
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        self.discard();
    }
}

/// A fresh temp file in `dir` with blocks for `len` bytes (none left on failure).
fn reserved_temp(dir: &Path, len: u64) -> io::Result<(PathBuf, File)> {
    let (path, file) = create_temp(dir)?;
    if let Err(e) = reserve(&file, len) {
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok((path, file))
}

/// Write a staged snapshot's bytes to its reserved temp file and move it to its version name.
fn write_staged(pending: &Pending, bytes: &[u8]) -> io::Result<()> {
    (&pending.file).write_all(bytes)?;
    let len = bytes.len() as u64;
    if len != pending.reserved {
        pending.file.set_len(len)?;
    }
    pending
        .file
        .set_permissions(Permissions::from_mode(pending.mode))?;
    let summary = Summary {
        version: String::new(),
        len,
    };
    install(&pending.temp, &pending.path, &summary, pending.mode)
}

/// Read `input` to its end into the start of `buf`, hashing each window as soon as it is read,
/// while it is still in the CPU's cache (hashing the whole buffer afterwards reads it from memory
/// again), expecting about `expected` bytes. `buf` only grows.
pub(super) fn read_whole(input: &File, buf: &mut Vec<u8>, expected: u64) -> io::Result<Summary> {
    // One byte more than expected: reading a file that did not grow then needs no growth.
    let want = usize::try_from(expected)
        .unwrap_or(usize::MAX)
        .saturating_add(1);
    if buf.len() < want {
        buf.resize(want, 0);
    }
    let mut hasher = blake3::Hasher::new();
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            // The file grew while being read.
            let doubled = buf.len().saturating_mul(2);
            buf.resize(doubled, 0);
        }
        let end = buf.len().min(filled + BUF_SIZE);
        let n = match input.read_at(&mut buf[filled..end], filled as u64) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[filled..filled + n]);
        filled += n;
    }
    Ok(Summary {
        version: version_from_hash(&hasher.finalize()),
        len: filled as u64,
    })
}
