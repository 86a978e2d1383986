//! Staged snapshots: what a reload needs between reading a build and writing its copy.
//!
//! A reload must know a build's version (is it new?) and check it (pre-flight) before it may
//! stop the running instance; it needs the copy on disk only to start the new one. So
//! [`Snapshotter::stage`] reserves the copy's blocks (`fallocate`: a full disk fails here, while
//! nothing has been stopped), and reads and hashes the build into memory together with the
//! writer thread (`writer.rs`), 128 KiB windows each, which then writes the copy; the pre-flight
//! check runs on the bytes in memory. [`Snapshotter::finish`] writes what the writer has not
//! yet (the two then share the rest) and gives the copy its version name. The snapshot on disk
//! is exactly the bytes that were hashed and checked, and the build is read once.
//!
//! A static split of the read (half each) gained nothing on a 2-core VM (issue 14): the helper
//! starts ~140 µs after it is woken and is slower there (cold caches). Windows claimed one at a
//! time let each thread take what it can, and the writer no longer creates the copy's file on
//! the reload's path (it prepares an unnamed one after each reload), so it joins the read early.
//! Above 3 MiB the copy on two CPUs (`take`) is faster, so larger builds go there.
//!
//! The buffer stays allocated between reloads (its pages already faulted in, which on a VM
//! costs as much as the copy) until [`Snapshotter::release`].

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blake3::hazmat::{
    ChainingValue, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};

use super::writer::{Leaf, LeafHash, Temp, Writer, WriterThread};
use super::{
    BUF_SIZE, Snapshot, SnapshotError, Summary, create_snapshot_dir, install, open_regular,
    reserved_temp, reusable, snapshot_mode, take_open, temp_name, version_from_hash,
};
use crate::fsutil;

/// Builds up to this size are staged in memory; a larger one is copied at once, by `take`, on
/// two CPUs. With the write on the writer thread, staging is the faster of the two up to 3 MiB
/// and the slower at 4 MiB (interleaved reloads, BENCHMARKS.md fifth session: 2 MiB 1.70
/// against 1.83 ms, 3 MiB 2.21 against 2.37, 4 MiB 2.90 against 2.66).
pub(super) const STAGE_MAX: u64 = 3 << 20;

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
    copy: Copy,
    len: usize,
    /// The size `fallocate` gave the temp file.
    reserved: u64,
    mode: u32,
}

/// A staged snapshot's temp file, and who writes it.
enum Copy {
    /// The writer thread, since the read began (`writer.rs`), to a named temp file or to a
    /// spare with no name yet.
    Writing { temp: Temp, writer: Writer },
    /// [`Snapshotter::finish`], when no thread could be had.
    Own { temp: PathBuf, file: File },
}

impl Copy {
    /// The temp file's name, if it has one.
    fn temp(&self) -> Option<&Path> {
        match self {
            Copy::Writing {
                temp: Temp::Named(temp),
                ..
            }
            | Copy::Own { temp, .. } => Some(temp),
            Copy::Writing {
                temp: Temp::Unnamed,
                ..
            } => None,
        }
    }

    /// Drop the copy: its writer has stopped (it no longer reads the buffer) and its temp file
    /// is gone when this returns.
    fn abandon(self) {
        let temp = self.temp().map(Path::to_path_buf);
        // A writer stops before its temp file goes; an unnamed one goes with its descriptor.
        drop(self);
        if let Some(temp) = temp {
            let _ = fs::remove_file(temp);
        }
    }
}

/// Why a staged read failed: the build could not be read, or its copy not created.
enum Failure {
    Read(io::Error),
    Write(io::Error),
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

    /// Like [`super::take`], but a build of up to 3 MiB is only read, hashed and given its
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
        let mode = snapshot_mode(&meta);
        let (summary, copy) =
            self.read_and_copy(&input, dir, meta.len(), mode)
                .map_err(|failure| match failure {
                    Failure::Read(e) => SnapshotError::Read {
                        path: source.to_path_buf(),
                        source: e,
                    },
                    Failure::Write(e) => SnapshotError::Write {
                        path: source.to_path_buf(),
                        dir: dir.to_path_buf(),
                        source: e,
                    },
                })?;
        let path = dir.join(&summary.version);
        let snapshot = Snapshot {
            version: summary.version.clone(),
            path: path.clone(),
            len: summary.len,
        };
        if reusable(&path, &summary, mode) {
            copy.abandon();
            return Ok(snapshot);
        }
        self.pending = Some(Pending {
            source: source.to_path_buf(),
            dir: dir.to_path_buf(),
            path,
            copy,
            len: usize::try_from(summary.len).unwrap_or(usize::MAX),
            reserved: meta.len(),
            mode,
        });
        Ok(snapshot)
    }

    /// Read and hash `input` into the buffer, helped by the writer thread, which also creates
    /// the copy's temp file in `dir` (`expected` bytes of blocks, `mode`) and writes the bytes
    /// to it once read. A file that grew since its size was taken stops the writer (the buffer
    /// must grow) and is read to its end here, one that shrank is read again from its start;
    /// [`Snapshotter::finish`] writes what the writer did not. Without a writer thread, the
    /// temp file is made here and written by `finish`.
    fn read_and_copy(
        &mut self,
        input: &File,
        dir: &Path,
        expected: u64,
        mode: u32,
    ) -> Result<(Summary, Copy), Failure> {
        size_for(&mut self.buf, expected);
        let len = usize::try_from(expected).unwrap_or(usize::MAX);
        let base = self.buf.as_mut_ptr();
        if self.thread.is_none() {
            self.thread = WriterThread::start();
        }
        // SAFETY: the buffer (`len` + 1 bytes, `size_for`) is neither moved, resized nor freed
        // while the writer has it: it is stopped below before the buffer may grow, and
        // `Pending` (which then owns it) stops it, waiting for its report, before anything
        // touches the buffer again (`discard`, on every `stage` and on drop; `release` only
        // with nothing pending). Until then the buffer's first `len` bytes are accessed only
        // through the writer (`read_windows`).
        let writer = self
            .thread
            .as_ref()
            .and_then(|thread| unsafe { thread.write(dir, expected, mode, input, base, len) });
        let Some(mut writer) = writer else {
            let (temp, file) = reserved_temp(dir, expected, mode).map_err(Failure::Write)?;
            let mut hasher = blake3::Hasher::new();
            return match read_rest(input, &mut self.buf, 0, &mut hasher) {
                Ok(filled) => Ok((summary_of(hasher, filled), Copy::Own { temp, file })),
                Err(e) => {
                    let _ = fs::remove_file(&temp);
                    Err(Failure::Read(e))
                }
            };
        };
        let leaves = writer.read_windows(input, base);
        let read = match root_of(leaves, len) {
            Err(e) => Err(e),
            Ok(Some(root)) => match read_past(input, len) {
                Ok(false) => Ok(Summary {
                    version: version_from_hash(&root),
                    len: len as u64,
                }),
                Ok(true) => {
                    // The file grew: hash what is read again as one piece, and read on with
                    // the buffer to ourselves.
                    writer.stop();
                    let mut hasher = blake3::Hasher::new();
                    hasher.update(&self.buf[..len]);
                    read_rest(input, &mut self.buf, len, &mut hasher)
                        .map(|filled| summary_of(hasher, filled))
                }
                Err(e) => Err(e),
            },
            Ok(None) => {
                // The file shrank while read: its windows may be from before and after. Read
                // it again, whole, and have `finish` write all of it.
                writer.stop_and_discard();
                let mut hasher = blake3::Hasher::new();
                read_rest(input, &mut self.buf, 0, &mut hasher)
                    .map(|filled| summary_of(hasher, filled))
            }
        };
        writer.close();
        // Created and given its blocks by the writer meanwhile; before the stop, a full runtime
        // dir fails the reload here.
        let temp = writer.temp();
        let summary = match read {
            Ok(summary) => summary,
            Err(e) => {
                drop(writer);
                if let Ok(Temp::Named(temp)) = temp {
                    let _ = fs::remove_file(temp);
                }
                return Err(Failure::Read(e));
            }
        };
        let temp = temp.map_err(Failure::Write)?;
        Ok((summary, Copy::Writing { temp, writer }))
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
                let Pending {
                    source,
                    dir,
                    path,
                    copy,
                    len,
                    reserved,
                    mode,
                } = pending;
                let temp = copy.temp().map(Path::to_path_buf);
                let unlinkable = || {
                    if let Some(thread) = &self.thread {
                        thread.stop_spares();
                    }
                };
                let target = Target {
                    dir: &dir,
                    path: &path,
                    unlinkable: &unlinkable,
                };
                let written = write_staged(copy, &self.buf[..len], reserved, mode, &target);
                if let (Err(_), Some(temp)) = (&written, temp) {
                    let _ = fs::remove_file(temp);
                }
                written.map_err(|e| {
                    self.failed = Some(Failed {
                        path,
                        source: source.clone(),
                        dir: dir.clone(),
                        error: e.to_string(),
                    });
                    SnapshotError::Write {
                        path: source,
                        dir,
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
            // The writer stops before the buffer is used again.
            pending.copy.abandon();
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

/// Where a staged snapshot goes: its version name `path` in `dir`, and what to do when an
/// unnamed copy cannot be linked there (no more spares: the next copies are named files again).
struct Target<'a> {
    dir: &'a Path,
    path: &'a Path,
    unlinkable: &'a dyn Fn(),
}

/// Finish writing a staged snapshot's bytes to its temp file (whatever its writer did not), and
/// give it its version name.
fn write_staged(
    copy: Copy,
    bytes: &[u8],
    reserved: u64,
    mode: u32,
    target: &Target<'_>,
) -> io::Result<()> {
    let (file, done, temp) = match copy {
        Copy::Writing { writer, temp } => {
            writer.help_write(bytes.as_ptr());
            let (file, done) = writer.written()?;
            (file, done, temp)
        }
        Copy::Own { file, temp } => (Arc::new(file), 0, Temp::Named(temp)),
    };
    if let Some(rest) = bytes.get(done..).filter(|rest| !rest.is_empty()) {
        file.write_all_at(rest, done as u64)?;
    }
    let len = bytes.len() as u64;
    let summary = Summary {
        version: String::new(),
        len,
    };
    match temp {
        Temp::Named(temp) => {
            if len != reserved {
                file.set_len(len)?;
            }
            install(&temp, target.path, &summary, mode)
        }
        Temp::Unnamed => {
            // A spare has the size of whatever it was made for (usually this build's: the
            // `fstat` is cheaper than a truncate to the same size).
            if file.metadata()?.len() != len {
                file.set_len(len)?;
            }
            name_unnamed(&file, bytes, mode, target, &summary)
        }
    }
}

/// Give the unnamed copy `file` of `bytes` its version name, unless an identical snapshot is
/// there already. Where it cannot be linked (no CAP_DAC_READ_SEARCH and no `/proc`, a security
/// module that says no), the bytes are copied to a named temp file instead, and no more spares
/// are made.
fn name_unnamed(
    file: &File,
    bytes: &[u8],
    mode: u32,
    target: &Target<'_>,
    summary: &Summary,
) -> io::Result<()> {
    let (dir, path) = (target.dir, target.path);
    if reusable(path, summary, mode) {
        return Ok(());
    }
    let linked = match crate::sys::fs::link_unnamed(file, path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // Not this content, mode or owner (`reusable`): replaced atomically, as a rename
            // of a named temp file would.
            fsutil::link_as_temp(file, dir, temp_name).and_then(|temp| {
                let renamed = fs::rename(&temp, path);
                if renamed.is_err() {
                    let _ = fs::remove_file(&temp);
                }
                renamed
            })
        }
        linked => linked,
    };
    if linked.is_ok() {
        return linked;
    }
    (target.unlinkable)();
    let (temp, copy) = reserved_temp(dir, summary.len, mode)?;
    let written = copy
        .write_all_at(bytes, 0)
        .and_then(|()| install(&temp, path, summary, mode));
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

fn summary_of(hasher: blake3::Hasher, len: usize) -> Summary {
    Summary {
        version: version_from_hash(&hasher.finalize()),
        len: len as u64,
    }
}

/// Read `input` to its end into the start of `buf`, hashing each window as soon as it is read,
/// while it is still in the CPU's cache (hashing the whole buffer afterwards reads it from memory
/// again), expecting about `expected` bytes. `buf` only grows.
#[cfg(test)]
pub(super) fn read_whole(input: &File, buf: &mut Vec<u8>, expected: u64) -> io::Result<Summary> {
    size_for(buf, expected);
    let mut hasher = blake3::Hasher::new();
    let filled = read_rest(input, buf, 0, &mut hasher)?;
    Ok(summary_of(hasher, filled))
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

/// The BLAKE3 hash of a build of `len` bytes from the leaves of its windows (each
/// [`BUF_SIZE`] long but the last), joined the way BLAKE3's tree joins them. `None` when a
/// window came up short: the file shrank while it was read.
fn root_of(leaves: Vec<io::Result<Leaf>>, len: usize) -> io::Result<Option<blake3::Hash>> {
    let mut subtrees = Vec::with_capacity(leaves.len());
    for (i, leaf) in leaves.into_iter().enumerate() {
        let leaf = leaf?;
        if leaf.read < len.min((i + 1) * BUF_SIZE) - i * BUF_SIZE {
            return Ok(None);
        }
        match leaf.hash {
            LeafHash::Root(root) => return Ok(Some(root)),
            LeafHash::Subtree(cv) => subtrees.push(cv),
            LeafHash::Empty => return Ok(None),
        }
    }
    if subtrees.len() < 2 {
        // No window: an empty build.
        return Ok(Some(blake3::hash(&[])));
    }
    let left = left_subtree_len(len as u64);
    let split = usize::try_from(left).unwrap_or(usize::MAX) / BUF_SIZE;
    Ok(Some(merge_subtrees_root(
        &subtree(&subtrees[..split], left),
        &subtree(&subtrees[split..], len as u64 - left),
        Mode::Hash,
    )))
}

/// The chaining value of the `len` bytes whose windows' chaining values are `leaves`.
fn subtree(leaves: &[ChainingValue], len: u64) -> ChainingValue {
    if leaves.len() == 1 {
        return leaves[0];
    }
    // Every left subtree of more than one window is a power of two of windows.
    let left = left_subtree_len(len);
    let split = usize::try_from(left).unwrap_or(usize::MAX) / BUF_SIZE;
    merge_subtrees_non_root(
        &subtree(&leaves[..split], left),
        &subtree(&leaves[split..], len - left),
        Mode::Hash,
    )
}

/// Whether `input` has a byte at `len` (it grew after its size was taken). Read into a byte of
/// its own: the writer may still be reading the buffer.
fn read_past(input: &File, len: usize) -> io::Result<bool> {
    let mut byte = [0u8; 1];
    loop {
        match input.read_at(&mut byte, len as u64) {
            Ok(n) => return Ok(n > 0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
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
    fn a_smaller_build_copied_into_a_larger_spare_is_cut_to_its_size() {
        let t = TestDir::new("stage-spare-smaller");
        let snaps = t.join("snaps");
        let build = t.join("build");
        let mut snapshotter = Snapshotter::new();
        let big: Vec<u8> = (0..3 * BUF_SIZE).map(|i| (i % 241) as u8).collect();
        crate::snapshot::tests::write_exec(&build, &big);
        let first = snapshotter.stage(&build, &snaps).unwrap();
        snapshotter.finish(&first.path).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !snapshotter
            .thread
            .as_ref()
            .is_some_and(WriterThread::has_spare)
        {
            assert!(std::time::Instant::now() < deadline, "no spare was made");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let small: Vec<u8> = (0..BUF_SIZE + 5).map(|i| (i % 239) as u8).collect();
        crate::snapshot::tests::write_exec(&build, &small);
        let second = snapshotter.stage(&build, &snaps).unwrap();
        snapshotter.finish(&second.path).unwrap();

        assert_eq!(fs::read(&second.path).unwrap(), small);
        assert_eq!(fs::read(&first.path).unwrap(), big);
        let mut names: Vec<_> = fs::read_dir(&snaps)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        let mut expected: Vec<std::ffi::OsString> =
            vec![first.version.clone().into(), second.version.clone().into()];
        expected.sort();
        assert_eq!(names, expected, "no temp file left beside the snapshots");
    }

    #[test]
    fn a_build_that_grows_while_it_is_staged_and_copied_is_copied_whole() {
        let t = TestDir::new("stage-grow-copy");
        let content: Vec<u8> = (0..(BUF_SIZE * 5 + 11)).map(|i| (i % 253) as u8).collect();
        fs::write(t.join("build"), &content).unwrap();
        let input = File::open(t.join("build")).unwrap();
        let mut snapshotter = Snapshotter::new();

        // Expecting a third of the bytes, as when the build grew after its fstat: the writer
        // copies what fits the buffer, then stops while the rest is read.
        let expected = content.len() / 3;
        let (summary, copy) = match snapshotter.read_and_copy(&input, &t.0, expected as u64, 0o700)
        {
            Ok(read) => read,
            Err(Failure::Read(e) | Failure::Write(e)) => panic!("{e}"),
        };
        let Copy::Writing {
            temp: Temp::Named(temp),
            writer,
        } = copy
        else {
            panic!("no writer thread, or a spare on a first job");
        };
        let (file, done) = writer.written().unwrap();

        assert_eq!(summary.len, content.len() as u64);
        assert_eq!(summary.version, version_from_hash(&blake3::hash(&content)));
        assert!(
            done <= expected + 1,
            "the writer stopped at the buffer's end: {done}"
        );
        file.write_all_at(&snapshotter.buf[done..content.len()], done as u64)
            .unwrap();
        assert_eq!(fs::read(temp).unwrap(), content);
    }
}
