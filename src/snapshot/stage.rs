//! Staged snapshots: what a reload needs between reading a build and writing its copy.
//!
//! A reload must know a build's version (is it new?) and check it (pre-flight) before it may
//! stop the running instance; it needs the copy on disk only to start the new one. So
//! [`Snapshotter::stage`] reserves the copy's blocks (`fallocate`: a full disk fails here, while
//! nothing has been stopped), reads and hashes the build into memory while the writer thread
//! (`writer.rs`) copies each part read into the reserved file, and the pre-flight check runs on
//! the bytes in memory; [`Snapshotter::finish`] waits for the writer (long done by then: the old
//! instance was stopped and state.json written meanwhile) and gives the copy its version name.
//! The snapshot on disk is exactly the bytes that were hashed and checked, and the build is read
//! once.
//!
//! The read and hash stay on the event loop's thread. Splitting them with a helper on the other
//! CPU was measured (issue 14, BENCHMARKS.md) and gained nothing on a 2-core VM: the helper
//! starts ~140 µs after it is woken and its half takes longer there (cold caches). The write has
//! all that time to spare, so it is the part handed over. From 1.5 MiB the copy on two CPUs
//! (`take`) is faster, so larger builds go there.
//!
//! The buffer stays allocated between reloads (its pages already faulted in, which on a VM
//! costs as much as the copy) until [`Snapshotter::release`].

use std::fmt;
use std::fs::{self, File, Permissions};
use std::io;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::writer::{Writer, WriterThread};
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
    /// Writes staged bytes while they are read (`writer.rs`); started at the first stage, ended
    /// with the buffer by [`Snapshotter::release`].
    thread: Option<WriterThread>,
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
    /// Writing the bytes to `file` since the read began (`writer.rs`); `None` when no thread
    /// could be had, and [`Snapshotter::finish`] writes them all.
    writer: Option<Writer>,
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
        // The copy's file and blocks come first, so that its writer can start with the read.
        let (temp, file) = reserved_temp(dir, meta.len()).map_err(|e| SnapshotError::Write {
            path: source.to_path_buf(),
            dir: dir.to_path_buf(),
            source: e,
        })?;
        let (summary, writer) = match self.read_while_writing(&input, &file, meta.len()) {
            Ok(read) => read,
            Err(e) => {
                let _ = fs::remove_file(&temp);
                return Err(SnapshotError::Read {
                    path: source.to_path_buf(),
                    source: e,
                });
            }
        };
        let mode = snapshot_mode(&meta);
        let path = dir.join(&summary.version);
        let snapshot = Snapshot {
            version: summary.version.clone(),
            path: path.clone(),
            len: summary.len,
        };
        if reusable(&path, &summary, mode) {
            drop(writer);
            let _ = fs::remove_file(&temp);
            return Ok(snapshot);
        }
        self.pending = Some(Pending {
            source: source.to_path_buf(),
            dir: dir.to_path_buf(),
            path,
            temp,
            file,
            len: usize::try_from(summary.len).unwrap_or(usize::MAX),
            reserved: meta.len(),
            mode,
            writer,
        });
        Ok(snapshot)
    }

    /// Read and hash `input` into the buffer while a [`Writer`] copies each window to `output`
    /// as soon as it is read. A file that grew since its size was taken stops the writer (the
    /// buffer must grow) and is read to its end here; [`Snapshotter::finish`] writes the rest.
    fn read_while_writing(
        &mut self,
        input: &File,
        output: &File,
        expected: u64,
    ) -> io::Result<(Summary, Option<Writer>)> {
        size_for(&mut self.buf, expected);
        let len = self.buf.len();
        let base = self.buf.as_mut_ptr();
        if self.thread.is_none() {
            self.thread = WriterThread::start();
        }
        // SAFETY: the buffer is neither moved, resized nor freed while the writer has it: it is
        // stopped below before the buffer may grow, and `Pending` (which then owns it) drops
        // it, waiting for its report, before anything touches the buffer again (`discard`, on
        // every `stage` and on drop; `release` only with nothing pending). `read_shared` writes
        // only at or above the published length.
        let mut writer = self
            .thread
            .as_ref()
            .and_then(|thread| unsafe { thread.write(output, base, len) });
        let mut hasher = blake3::Hasher::new();
        let mut filled = 0;
        if let Some(writer) = &writer {
            filled = read_shared(input, base, len, writer, &mut hasher)?;
            writer.close();
        }
        if filled == len {
            // The file grew, or there is no writer: read on with the buffer to ourselves.
            if let Some(writer) = writer.as_mut() {
                writer.stop();
            }
            filled = read_rest(input, &mut self.buf, filled, &mut hasher)?;
        }
        let summary = Summary {
            version: version_from_hash(&hasher.finalize()),
            len: filled as u64,
        };
        Ok((summary, writer))
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
            Some(mut pending) if pending.path == path => {
                let len = pending.len;
                let written = write_staged(&mut pending, &self.buf[..len]);
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
        if let Some(mut pending) = self.pending.take() {
            // Joined before the buffer is used again.
            drop(pending.writer.take());
            let _ = fs::remove_file(&pending.temp);
        }
    }

    /// Free the buffer (after a while without reloads): the next stage faults it in again.
    pub fn release(&mut self) {
        if self.pending.is_none() {
            self.buf = Vec::new();
            self.thread = None;
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

/// Finish writing a staged snapshot's bytes to its reserved temp file (whatever its writer did
/// not) and move it to its version name.
fn write_staged(pending: &mut Pending, bytes: &[u8]) -> io::Result<()> {
    let done = match pending.writer.take() {
        Some(writer) => writer.written()?,
        None => 0,
    };
    if let Some(rest) = bytes.get(done..).filter(|rest| !rest.is_empty()) {
        pending.file.write_all_at(rest, done as u64)?;
    }
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
#[cfg(test)]
pub(super) fn read_whole(input: &File, buf: &mut Vec<u8>, expected: u64) -> io::Result<Summary> {
    size_for(buf, expected);
    let mut hasher = blake3::Hasher::new();
    let filled = read_rest(input, buf, 0, &mut hasher)?;
    Ok(Summary {
        version: version_from_hash(&hasher.finalize()),
        len: filled as u64,
    })
}

/// Grow `buf` to one byte more than `expected`: reading a file that did not grow then needs no
/// growth, and finds its end without a second pass.
fn size_for(buf: &mut Vec<u8>, expected: u64) {
    let want = usize::try_from(expected)
        .unwrap_or(usize::MAX)
        .saturating_add(1);
    if buf.len() < want {
        buf.resize(want, 0);
    }
}

/// Read the `len` bytes' buffer at `base` full from `input`, or to its end, publishing each
/// window to `writer` as soon as it is read, then hashing it. How many bytes were read.
fn read_shared(
    input: &File,
    base: *mut u8,
    len: usize,
    writer: &Writer,
    hasher: &mut blake3::Hasher,
) -> io::Result<usize> {
    let mut filled = 0;
    while filled < len {
        let end = len.min(filled + BUF_SIZE);
        // SAFETY: `filled..end` lies within the buffer (valid for `len` bytes, see
        // `read_while_writing`) and at or above the published length, which the writer never
        // reads; nothing else refers to it.
        let window = unsafe { std::slice::from_raw_parts_mut(base.add(filled), end - filled) };
        let n = match input.read_at(window, filled as u64) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        writer.publish(filled + n);
        hasher.update(&window[..n]);
        filled += n;
    }
    Ok(filled)
}

/// Read `input` from `filled` to its end into `buf`, growing it as needed, hashing each window
/// as soon as it is read. How many bytes `buf` then holds.
fn read_rest(
    input: &File,
    buf: &mut Vec<u8>,
    mut filled: usize,
    hasher: &mut blake3::Hasher,
) -> io::Result<usize> {
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
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::TestDir;

    #[test]
    fn a_build_that_grows_while_it_is_staged_and_copied_is_copied_whole() {
        let t = TestDir::new("stage-grow-copy");
        let content: Vec<u8> = (0..(BUF_SIZE * 5 + 11)).map(|i| (i % 253) as u8).collect();
        fs::write(t.join("build"), &content).unwrap();
        let input = File::open(t.join("build")).unwrap();
        let output = File::create(t.join("copy")).unwrap();
        let mut snapshotter = Snapshotter::new();

        // Expecting a third of the bytes, as when the build grew after its fstat: the writer
        // copies what fits the buffer, then stops while the rest is read.
        let expected = content.len() / 3;
        let (summary, writer) = snapshotter
            .read_while_writing(&input, &output, expected as u64)
            .unwrap();
        let done = writer.map_or(Ok(0), Writer::written).unwrap();

        assert_eq!(summary.len, content.len() as u64);
        assert_eq!(summary.version, version_from_hash(&blake3::hash(&content)));
        assert!(
            done <= expected + 1,
            "the writer stopped at the buffer's end: {done}"
        );
        output
            .write_all_at(&snapshotter.buf[done..content.len()], done as u64)
            .unwrap();
        assert_eq!(fs::read(t.join("copy")).unwrap(), content);
    }
}
