//! The thread that helps the event loop's thread read and hash a staged build, and writes the
//! build's copy to its snapshot's temp file.
//!
//! A staged reload (`stage.rs`) reads a build into memory and hashes it, and only then knows
//! the version and may run the pre-flight check and stop the old instance; the copy on disk is
//! needed later, at the start. So the read and hash are the reload's path and the write is not.
//! A halted CPU takes ~0.15 ms to wake and a thread started per reload cost the loop ~0.13 ms,
//! so one thread waits for work between reloads ([`WriterThread`]) and is woken *before* the
//! read, on another CPU (`sys::cpu`). It takes the copy's file, made with its blocks reserved
//! and zeros written over them 2 ms after the last job ([`Spare`]: no name until the copy is
//! complete; the copy then overwrites pages the page cache holds already), or creates one (a
//! full disk fails the reload before anything is stopped), then takes its share of the read:
//! the build is cut into 128 KiB windows, and each thread claims the next unread window, reads
//! it into its place in the staging buffer and hashes it as a BLAKE3 subtree; the loop's thread
//! joins the subtrees into the root hash, which is exactly `b3sum`'s. Once no window is left to
//! claim, the writer writes the windows to the copy in order, while the loop's thread goes on
//! to stop the old instance (BENCHMARKS.md, sixth session). The thread ends with the staging
//! buffer, after a while without reloads.
//!
//! The two threads share the one staging buffer without a lock. A window is claimed by exactly
//! one thread (an atomic counter), which alone writes its bytes and then marks it read (a
//! release store); the other thread reads those bytes only after it has seen the mark (an
//! acquire load), and nobody writes them again. The buffer is neither moved nor freed before
//! the writer has said it is done with it ([`Writer::stop`], also on drop). That is the whole
//! safety argument of the `unsafe` below.

use std::fs::File;
use std::fs::Permissions;
use std::io;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use blake3::hazmat::{ChainingValue, HasherExt};

use super::BUF_SIZE;

/// The thread's stack: it only reads, hashes and writes.
const STACK_SIZE: usize = 256 << 10;

/// How long either thread spins for the other's next window before it sleeps until woken. A
/// window takes ~50 µs to read and hash; spinning costs the other thread nothing, waking a
/// sleeper costs it a system call (and on a VM an interrupt to a halted CPU). A thread that
/// would spin longer (the other stalled, or the build is refused after the read) sleeps instead
/// of burning a CPU.
const SPIN: Duration = Duration::from_micros(100);

/// The thread that helps stage builds, waiting for the next one in between.
pub(super) struct WriterThread {
    queue: Arc<Queue>,
    handle: Option<JoinHandle<()>>,
    /// Where the thread was last allowed to run (`sys::cpu::move_thread_off_this_cpu`).
    placed: crate::sys::cpu::LastMove,
}

/// Where the loop's thread leaves a job for the writer thread: one at a time (a reload stages
/// one build, and waits for its copy before it stages another).
#[derive(Default)]
struct Queue {
    state: Mutex<Waiting>,
    wake: Condvar,
    /// The next job's copy, made ahead of time ([`SPARE_AFTER`]).
    spare: Mutex<Option<Spare>>,
    /// An unnamed copy could not be linked to its name: make no more spares.
    no_spares: AtomicBool,
}

/// A file with no name (`O_TMPFILE`) in a snapshot dir, with blocks for `reserved` bytes: the
/// next copy, so that a reload does not wait for a file to be created (~0.1-0.2 ms on ext4,
/// which the writer would otherwise spend before it can help read). Invisible in the dir, gone
/// with the thread (or a crash) unless a copy in it is given its version name.
struct Spare {
    file: File,
    reserved: u64,
    /// Where it was made: a job in another dir (another plugin's) does not use it, so that a
    /// copy is never linked across file systems.
    dir: PathBuf,
}

/// Where a job's copy was written: a temp file by that name, or a spare with no name yet.
#[derive(Clone, Debug)]
pub(super) enum Temp {
    Named(PathBuf),
    Unnamed,
}

/// How long after a job the thread makes the next job's spare, unless a job comes first: by
/// then the reload that job served has started its new instance, and the spare's file system
/// work no longer competes with it.
const SPARE_AFTER: Duration = Duration::from_millis(2);

#[derive(Default)]
struct Waiting {
    job: Option<Job>,
    /// The thread is to end.
    closed: bool,
}

/// One build for the thread to help read and to copy.
struct Job {
    /// The snapshot dir, checked by the caller, where the copy's temp file goes.
    dir: PathBuf,
    /// Blocks to reserve for it, and its mode.
    reserve: u64,
    mode: u32,
    /// The build (a descriptor of the thread's own).
    input: File,
    buf: Shared,
    progress: Arc<Progress>,
}

/// What became of a job's copy: its file and how many bytes are in it from offset 0.
pub(super) type Written = (Arc<File>, usize);

/// The loop thread's side of one [`Job`]: read windows, collect their hashes, then what was
/// written.
pub(super) struct Writer {
    progress: Arc<Progress>,
    /// What the thread reported at the end, once it has (and `None` again once taken by
    /// `written`).
    result: Option<io::Result<Arc<File>>>,
    /// The thread has reported the end: it no longer touches the buffer.
    reported: bool,
    /// What the thread wrote is not the staged bytes any more (they were read again).
    discarded: bool,
}

/// One window as read: how many bytes (fewer than the window's size at the end of the file),
/// and their hash.
#[derive(Clone, Copy, Debug)]
pub(super) struct Leaf {
    pub(super) read: usize,
    pub(super) hash: LeafHash,
}

/// A window's hash: the root when it is the build's only window, else its subtree's chaining
/// value (none for a window found empty: the build shrank).
#[derive(Clone, Copy, Debug)]
pub(super) enum LeafHash {
    Root(blake3::Hash),
    Subtree(ChainingValue),
    Empty,
}

/// The windows of one build: `len` bytes (its size when opened) cut at every [`BUF_SIZE`].
struct Windows {
    len: usize,
    /// The next window nobody has claimed.
    next: AtomicUsize,
    /// Window `i` is read and hashed: its bytes will not change and `leaves[i]` is set.
    read: Box<[AtomicBool]>,
    leaves: Box<[Mutex<Option<io::Result<Leaf>>>]>,
    /// The next window nobody has claimed to write to the copy.
    next_write: AtomicUsize,
    /// Window `i` is in the copy.
    copied: Box<[AtomicBool]>,
}

/// What the two threads tell each other about one job.
struct Progress {
    windows: Windows,
    /// The copy, once it has its blocks: for the loop's thread to help write.
    file: Mutex<Option<Arc<File>>>,
    /// No more windows will be read: write what is read and report.
    closed: AtomicBool,
    /// The writer waits on `more` (it spun for [`SPIN`] without news): a window read must wake
    /// it.
    napping: AtomicBool,
    nap: Mutex<()>,
    more: Condvar,
    report: Mutex<Reports>,
    /// Signalled with each report, and each window the writer reads.
    reported: Condvar,
}

/// The thread's two reports on a job.
#[derive(Default)]
struct Reports {
    /// The copy's temp file, created with its blocks reserved, or why it could not be.
    temp: Option<io::Result<Temp>>,
    /// The end: the copy and the bytes written, or why it stopped. Once it is here the thread no
    /// longer touches the buffer.
    done: Option<io::Result<Arc<File>>>,
}

/// The buffer as both threads see it: an address and a length, valid until the job is
/// reported.
struct Shared {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: each window of the buffer is written by the one thread that claimed it, and read by
// the other only once marked read; the owner keeps the buffer alive and unmoved until the job
// is reported (module documentation).
unsafe impl Send for Shared {}
// SAFETY: as for `Send`: shared references only hand out windows under the claim protocol.
unsafe impl Sync for Shared {}

impl WriterThread {
    /// Start the thread; `None` when no thread can be had (the caller does it all itself).
    pub(super) fn start() -> Option<WriterThread> {
        let queue = Arc::new(Queue::default());
        let theirs = Arc::clone(&queue);
        let handle = thread::Builder::new()
            .name("snapshot-write".into())
            .stack_size(STACK_SIZE)
            .spawn(move || serve(&theirs))
            .ok()?;
        Some(WriterThread {
            queue,
            handle: Some(handle),
            placed: crate::sys::cpu::LastMove::default(),
        })
    }

    /// Have the thread create a temp file in `dir` with `reserve` bytes of blocks and `mode`
    /// ([`Writer::temp`] says which, or why not), help read and hash the first `len` bytes of
    /// `input` into the buffer at `buf` (windows claimed by [`Writer::read_windows`] are the
    /// caller's), and write them to the temp file from offset 0, on a CPU other than the
    /// caller's. `None` when the thread is gone: the caller then does it all itself.
    ///
    /// # Safety
    ///
    /// `buf` must be valid for reads and writes of `len` bytes until [`Writer::stop`] returns
    /// (or the writer is dropped): not moved, resized, freed or otherwise accessed meanwhile,
    /// except through the [`Writer`].
    /// An unnamed copy could not be given its name: make no more spares (every copy is a named
    /// temp file from now on).
    pub(super) fn stop_spares(&self) {
        self.queue.no_spares.store(true, Ordering::Relaxed);
        drop(
            self.queue
                .spare
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
    }

    pub(super) unsafe fn write(
        &self,
        dir: &Path,
        reserve: u64,
        mode: u32,
        input: &File,
        buf: *mut u8,
        len: usize,
    ) -> Option<Writer> {
        let handle = self.handle.as_ref()?;
        let input = input.try_clone().ok()?;
        let progress = Arc::new(Progress::new(len));
        // While it waits, moving it costs nothing; once woken it would wait on this busy CPU.
        crate::sys::cpu::move_thread_off_this_cpu(handle, &self.placed);
        let job = Job {
            dir: dir.to_path_buf(),
            reserve,
            mode,
            input,
            buf: Shared { ptr: buf, len },
            progress: Arc::clone(&progress),
        };
        let mut waiting = self
            .queue
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if waiting.job.is_some() || handle.is_finished() {
            // A job nobody took (the thread died): do not stack another on it.
            return None;
        }
        waiting.job = Some(job);
        self.queue.wake.notify_one();
        Some(Writer {
            progress,
            result: None,
            reported: false,
            discarded: false,
        })
    }
}

#[cfg(test)]
impl WriterThread {
    /// Whether the next job's spare is made.
    pub(super) fn has_spare(&self) -> bool {
        self.queue
            .spare
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }
}

impl Drop for WriterThread {
    fn drop(&mut self) {
        // The thread ends once it has reported its last job.
        self.queue
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .closed = true;
        self.queue.wake.notify_one();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// The thread: one job after the other until the queue is closed.
fn serve(queue: &Queue) {
    let mut spare_for = None;
    while let Some(job) = next_job(queue, &mut spare_for) {
        let mut report = ReportOnDrop {
            progress: &job.progress,
            done: None,
        };
        // A panic is reported as an error (a reload fails) and the thread goes on serving: a
        // job left in the queue of a dead thread would be waited for forever.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(&job, report.progress, queue)
        }));
        report.done = outcome.ok();
        drop(report);
        spare_for = Some((job.dir.clone(), job.reserve));
    }
}

/// Wait for the next job; `None` once the queue is closed. With `spare_for` (the dir and size
/// of the last job), make a spare in that dir once [`SPARE_AFTER`] has passed without a job.
fn next_job(queue: &Queue, spare_for: &mut Option<(PathBuf, u64)>) -> Option<Job> {
    let mut waiting = queue.state.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        if let Some(job) = waiting.job.take() {
            return Some(job);
        }
        if waiting.closed {
            return None;
        }
        let Some((dir, reserve)) = spare_for.as_ref() else {
            waiting = queue
                .wake
                .wait(waiting)
                .unwrap_or_else(PoisonError::into_inner);
            continue;
        };
        let (still, timeout) = queue
            .wake
            .wait_timeout(waiting, SPARE_AFTER)
            .unwrap_or_else(PoisonError::into_inner);
        waiting = still;
        if timeout.timed_out() && waiting.job.is_none() && !waiting.closed {
            drop(waiting);
            queue.make_spare(dir, *reserve);
            *spare_for = None;
            waiting = queue.state.lock().unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Queue {
    /// A spare in `dir` with blocks for `reserve` bytes, unless there is one. Where the file
    /// system has no unnamed files or no room, there is none: the next job names its copy.
    fn make_spare(&self, dir: &Path, reserve: u64) {
        {
            let mut spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
            if spare.as_ref().is_some_and(|spare| spare.dir == dir)
                || self.no_spares.load(Ordering::Relaxed)
            {
                return;
            }
            // One spare at a time: the one for another dir goes.
            *spare = None;
        }
        let made = crate::sys::fs::create_unnamed(dir)
            .and_then(|file| super::reserve(&file, reserve).map(|()| file));
        let Ok(file) = made else {
            return;
        };
        self.fill_with_zeros(&file, reserve);
        let mut spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
        // `stop_spares` may have come meanwhile.
        if !self.no_spares.load(Ordering::Relaxed) {
            *spare = Some(Spare {
                file,
                reserved: reserve,
                dir: dir.to_path_buf(),
            });
        }
    }

    /// Write zeros over the spare's first `len` bytes: the copy into it then overwrites pages
    /// the page cache holds already instead of adding each one (measured on ext4: ~110 µs a
    /// MiB instead of ~190, on the path from the stop signal to the start). Given up as soon
    /// as a job waits; a spare filled in part or not at all serves all the same.
    fn fill_with_zeros(&self, file: &File, len: u64) {
        static ZEROS: [u8; super::BUF_SIZE] = [0; super::BUF_SIZE];
        let mut offset = 0u64;
        while offset < len {
            let waiting = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if waiting.job.is_some() || waiting.closed {
                return;
            }
            drop(waiting);
            let n = (len - offset).min(super::BUF_SIZE as u64) as usize;
            if file.write_all_at(&ZEROS[..n], offset).is_err() {
                return;
            }
            offset += n as u64;
        }
    }

    /// The spare, when it was made in `dir`.
    fn take_spare(&self, dir: &Path) -> Option<Spare> {
        let mut spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
        if spare.as_ref().is_some_and(|spare| spare.dir == dir) {
            spare.take()
        } else {
            None
        }
    }
}

/// One job: the copy's file (reported at once when it has its blocks: the loop's thread
/// waits for it before the stop), then windows to read while any is left, then the bytes to
/// the copy.
fn run(job: &Job, progress: &Progress, queue: &Queue) -> io::Result<Arc<File>> {
    let mode = Permissions::from_mode(job.mode);
    let spare = queue
        .take_spare(&job.dir)
        .filter(|spare| spare.file.set_permissions(mode).is_ok());
    let (file, named, reserve_later) = match spare {
        Some(spare) => (spare.file, false, spare.reserved < job.reserve),
        None => match super::reserved_temp(&job.dir, job.reserve, job.mode) {
            Ok((temp, file)) => {
                progress.post(|reports| reports.temp = Some(Ok(Temp::Named(temp))));
                (file, true, false)
            }
            Err(e) => return Err(report_no_temp(progress, e)),
        },
    };
    if !named && !reserve_later {
        progress.post(|reports| reports.temp = Some(Ok(Temp::Unnamed)));
    }
    help_read(job, progress);
    if reserve_later {
        // After the read: the loop's thread needs the blocks only before the stop.
        if let Err(e) = super::reserve(&file, job.reserve) {
            return Err(report_no_temp(progress, e));
        }
        progress.post(|reports| reports.temp = Some(Ok(Temp::Unnamed)));
    }
    let file = Arc::new(file);
    *progress.file.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&file));
    write_in_order(&file, &job.buf, progress)?;
    Ok(file)
}

/// Report that the copy has no file (`e`), and return the error for the job's end.
fn report_no_temp(progress: &Progress, e: io::Error) -> io::Error {
    let error = io::Error::new(e.kind(), e.to_string());
    progress.post(|reports| reports.temp = Some(Err(e)));
    error
}

/// Claim, read and hash windows until none is left.
fn help_read(job: &Job, progress: &Progress) {
    while !progress.closed.load(Ordering::Acquire) {
        let Some(i) = progress.windows.claim() else {
            break;
        };
        progress.windows.fill(i, &job.input, &job.buf);
        // The loop's thread may be waiting for this window's hash.
        progress.post(|_| {});
    }
}

impl Windows {
    fn new(len: usize) -> Windows {
        let count = len.div_ceil(BUF_SIZE);
        Windows {
            len,
            next: AtomicUsize::new(0),
            read: (0..count).map(|_| AtomicBool::new(false)).collect(),
            leaves: (0..count).map(|_| Mutex::new(None)).collect(),
            next_write: AtomicUsize::new(0),
            copied: (0..count).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    fn count(&self) -> usize {
        self.read.len()
    }

    /// The bytes of window `i`.
    fn range(&self, i: usize) -> std::ops::Range<usize> {
        let start = i * BUF_SIZE;
        start..self.len.min(start + BUF_SIZE)
    }

    /// The next window nobody has claimed, now the caller's alone.
    fn claim(&self) -> Option<usize> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        (i < self.count()).then_some(i)
    }

    /// The next window nobody has claimed to write, now the caller's to write.
    fn claim_write(&self) -> Option<usize> {
        let i = self.next_write.fetch_add(1, Ordering::Relaxed);
        (i < self.count()).then_some(i)
    }

    /// How many bytes window `i` holds, once read without error.
    fn bytes_read(&self, i: usize) -> Option<usize> {
        match *self.leaves[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            Some(Ok(leaf)) => Some(leaf.read),
            _ => None,
        }
    }

    /// Write window `i` (read, and claimed to write by the caller) to `file`. False when it
    /// was the last (short: the end of the file) or failed to read.
    fn write(&self, i: usize, file: &File, buf: &Shared) -> io::Result<bool> {
        let Some(read) = self.bytes_read(i) else {
            return Ok(false);
        };
        let range = self.range(i);
        // SAFETY: window `i` lies within the buffer and is marked read: nobody writes it again,
        // and the owner keeps it alive until the job is reported (`WriterThread::write`).
        let bytes = unsafe { std::slice::from_raw_parts(buf.ptr.add(range.start), read) };
        file.write_all_at(bytes, range.start as u64)?;
        self.copied[i].store(true, Ordering::Release);
        Ok(read == range.len())
    }

    /// The bytes from offset 0 that are in the copy: the windows written, up to the first
    /// that is not.
    fn copied_prefix(&self) -> usize {
        let mut prefix = 0;
        for i in 0..self.count() {
            if !self.copied[i].load(Ordering::Acquire) {
                break;
            }
            let read = self.bytes_read(i).unwrap_or(0);
            prefix += read;
            if read < self.range(i).len() {
                break;
            }
        }
        prefix
    }

    /// Read window `i` (claimed by the caller) of `input` into its place in `buf` and hash it.
    fn fill(&self, i: usize, input: &File, buf: &Shared) {
        let range = self.range(i);
        debug_assert!(range.end <= buf.len);
        // SAFETY: the window lies within the buffer, valid until the job is reported
        // (`WriterThread::write`'s contract), and is the caller's alone: claimed once, and not
        // read by the other thread before it is marked read below; this borrow ends before.
        let window =
            unsafe { std::slice::from_raw_parts_mut(buf.ptr.add(range.start), range.len()) };
        let leaf = read_full(input, window, range.start as u64).map(|read| Leaf {
            read,
            hash: self.hash(&window[..read], range.start),
        });
        *self.leaves[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(leaf);
        // SeqCst, not just Release: paired with the SeqCst load of `napping` that follows in
        // `wake_writer` and the writer's SeqCst store of it, so a sleeping writer is never
        // missed.
        self.read[i].store(true, Ordering::SeqCst);
    }

    /// The hash of `bytes`, window `start / BUF_SIZE` of the build.
    fn hash(&self, bytes: &[u8], start: usize) -> LeafHash {
        if self.count() == 1 {
            LeafHash::Root(blake3::hash(bytes))
        } else if bytes.is_empty() {
            LeafHash::Empty
        } else {
            let mut hasher = blake3::Hasher::new();
            hasher.set_input_offset(start as u64);
            hasher.update(bytes);
            LeafHash::Subtree(hasher.finalize_non_root())
        }
    }

    fn is_read(&self, i: usize) -> bool {
        self.read[i].load(Ordering::Acquire)
    }

    fn all_read(&self) -> bool {
        (0..self.count()).all(|i| self.is_read(i))
    }
}

/// Read `window.len()` bytes at `offset`, or up to the end of the file.
fn read_full(input: &File, window: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut filled = 0;
    while filled < window.len() {
        match input.read_at(&mut window[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

impl Progress {
    fn new(len: usize) -> Progress {
        Progress {
            windows: Windows::new(len),
            file: Mutex::new(None),
            closed: AtomicBool::new(false),
            napping: AtomicBool::new(false),
            nap: Mutex::new(()),
            more: Condvar::new(),
            report: Mutex::new(Reports::default()),
            reported: Condvar::new(),
        }
    }

    fn post(&self, update: impl FnOnce(&mut Reports)) {
        let mut reports = self.report.lock().unwrap_or_else(PoisonError::into_inner);
        update(&mut reports);
        self.reported.notify_all();
    }

    /// Wait until `take` finds what it looks for in the reports.
    fn wait_for<T>(&self, mut take: impl FnMut(&mut Reports) -> Option<T>) -> T {
        let mut reports = self.report.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(found) = take(&mut reports) {
                return found;
            }
            reports = self
                .reported
                .wait(reports)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Posts the job's end when dropped (and a missing temp report), an error if the job panicked:
/// the loop's thread waits for the reports, and must never wait forever.
struct ReportOnDrop<'a> {
    progress: &'a Progress,
    done: Option<io::Result<Arc<File>>>,
}

impl Drop for ReportOnDrop<'_> {
    fn drop(&mut self) {
        // The loop's thread executes the copy soon after the report: no descriptor open for
        // writing may be left here by then (`ETXTBSY`), only the one in the report.
        drop(
            self.progress
                .file
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let panicked = || io::Error::other("the snapshot write thread panicked");
        let done = self.done.take().unwrap_or_else(|| Err(panicked()));
        self.progress.post(|reports| {
            if reports.temp.is_none() {
                reports.temp = Some(Err(panicked()));
            }
            reports.done = Some(done);
        });
    }
}

/// Write the windows to `file` in order as they are read (the loop's thread may take some of
/// the last ones, [`Writer::help_write`]), until one is short (the end of the file) or failed,
/// or the job is closed with the next one unread.
fn write_in_order(file: &File, buf: &Shared, progress: &Progress) -> io::Result<()> {
    let windows = &progress.windows;
    while let Some(i) = windows.claim_write() {
        if !progress.wait_until_read(i) || !windows.write(i, file, buf)? {
            break;
        }
        // The loop's thread has usually stopped the old instance by now, which must exit on
        // this CPU (`sys::cpu`): let it run first (measured: otherwise its exit waited for the
        // whole write, ~0.3 ms). A yield with nothing else to run costs a system call.
        thread::yield_now();
    }
    Ok(())
}

impl Progress {
    /// Wait until window `i` is read; false when the job was closed before it was.
    fn wait_until_read(&self, i: usize) -> bool {
        let mut idle_since: Option<Instant> = None;
        loop {
            // `closed` first: once it is seen, a window not read after it never will be.
            let closed = self.closed.load(Ordering::Acquire);
            if self.windows.is_read(i) {
                return true;
            }
            if closed {
                return false;
            }
            if idle_since.get_or_insert_with(Instant::now).elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                self.nap_unless_read(i);
                idle_since = None;
            }
        }
    }

    /// Sleep until window `i` is read or the job closed, unless it already is.
    fn nap_unless_read(&self, i: usize) {
        let guard = self.nap.lock().unwrap_or_else(PoisonError::into_inner);
        // SeqCst on both sides: either the reader's next load of `napping` sees it set (and
        // wakes this thread), or the loads below see what the reader stored.
        self.napping.store(true, Ordering::SeqCst);
        let news =
            self.windows.read[i].load(Ordering::SeqCst) || self.closed.load(Ordering::SeqCst);
        if !news {
            // A spurious wake-up only costs one more look.
            drop(
                self.more
                    .wait(guard)
                    .unwrap_or_else(PoisonError::into_inner),
            );
        }
        self.napping.store(false, Ordering::SeqCst);
    }

    /// After a window read by the loop's thread, or the close: wake the writer if it sleeps.
    fn wake_writer(&self) {
        if self.napping.load(Ordering::SeqCst) {
            // Taking the lock waits until the writer is inside `wait`, or has decided not to.
            let _guard = self.nap.lock().unwrap_or_else(PoisonError::into_inner);
            self.more.notify_one();
        }
    }
}

impl Writer {
    /// Claim, read and hash windows of the build until none is left to claim (the writer
    /// thread takes some too), then wait for the ones the writer is still reading. Each
    /// window's leaf, in order.
    pub(super) fn read_windows(&self, input: &File, buf: *mut u8) -> Vec<io::Result<Leaf>> {
        let windows = &self.progress.windows;
        let shared = Shared {
            ptr: buf,
            len: windows.len,
        };
        while let Some(i) = windows.claim() {
            windows.fill(i, input, &shared);
            // The writer may be asleep waiting for this window.
            self.progress.wake_writer();
        }
        self.wait_until_all_read();
        windows
            .leaves
            .iter()
            .map(|leaf| {
                // Copied, not taken: the writer reads how much of each window to write.
                match &*leaf.lock().unwrap_or_else(PoisonError::into_inner) {
                    Some(Ok(leaf)) => Ok(*leaf),
                    Some(Err(e)) => Err(io::Error::new(e.kind(), e.to_string())),
                    None => Err(io::Error::other("a window of the build was not read")),
                }
            })
            .collect()
    }

    /// The writer reads its last windows: spin a while (it is running on another CPU, one
    /// window takes ~50 µs), then sleep until it reports each.
    fn wait_until_all_read(&self) {
        let windows = &self.progress.windows;
        let start = Instant::now();
        while start.elapsed() < SPIN * 4 {
            if windows.all_read() {
                return;
            }
            std::hint::spin_loop();
        }
        self.progress
            .wait_for(|reports| (windows.all_read() || reports.done.is_some()).then_some(()));
    }

    /// Nothing more will be read: the writer ends once what is read is written.
    pub(super) fn close(&self) {
        self.progress.closed.store(true, Ordering::SeqCst);
        self.progress.wake_writer();
    }

    /// The copy's temp file, once the thread has created it and reserved its blocks, or why it
    /// could not (that error is given once).
    pub(super) fn temp(&self) -> io::Result<Temp> {
        self.progress.wait_for(|reports| match &reports.temp {
            Some(Ok(temp)) => Some(Ok(temp.clone())),
            Some(Err(_)) => reports.temp.take(),
            None => None,
        })
    }

    /// Let the writer finish what is read, and wait for its report: the buffer is the
    /// caller's again.
    pub(super) fn stop(&mut self) {
        if self.reported {
            return;
        }
        self.close();
        self.result = Some(self.progress.wait_for(|reports| reports.done.take()));
        self.reported = true;
    }

    /// [`Writer::stop`], and count nothing the writer wrote: the buffer's bytes are read again.
    pub(super) fn stop_and_discard(&mut self) {
        self.stop();
        self.discarded = true;
    }

    /// Write windows to the copy alongside the writer while any is left to claim: at the
    /// start, the copy is all the reload waits for. `buf` as given to [`WriterThread::write`].
    pub(super) fn help_write(&self, buf: *const u8) {
        if self.reported {
            // Stopped early (the build grew or shrank while read): `finish` writes the rest.
            return;
        }
        let file = self
            .progress
            .file
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(file) = file else { return };
        let windows = &self.progress.windows;
        // Only read through (`Windows::write`): every window is read by now.
        let shared = Shared {
            ptr: buf.cast_mut(),
            len: windows.len,
        };
        while let Some(i) = windows.claim_write() {
            // Every window is read before the copy is waited for; one that is not ends it.
            if !windows.is_read(i) || !matches!(windows.write(i, &file, &shared), Ok(true)) {
                break;
            }
        }
    }

    /// [`Writer::stop`], then the copy and how many bytes are in it from offset 0, or why not.
    pub(super) fn written(mut self) -> io::Result<Written> {
        self.stop();
        let prefix = if self.discarded {
            0
        } else {
            self.progress.windows.copied_prefix()
        };
        self.result
            .take()
            .unwrap_or_else(|| Err(io::Error::other("the snapshot write was already collected")))
            .map(|file| (file, prefix))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Never leave the thread reading a buffer its owner may free next.
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::TestDir;
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    fn patterned(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// A build of `content` in `t`, opened.
    fn build(t: &TestDir, content: &[u8]) -> File {
        fs::write(t.join("build"), content).unwrap();
        File::open(t.join("build")).unwrap()
    }

    /// What the copy holds, whether it has a name or not.
    fn copied(temp: &Temp, file: &File) -> Vec<u8> {
        match temp {
            Temp::Named(path) => fs::read(path).unwrap(),
            Temp::Unnamed => {
                let mut bytes = vec![0u8; file.metadata().unwrap().len() as usize];
                file.read_exact_at(&mut bytes, 0).unwrap();
                bytes
            }
        }
    }

    /// What one whole job made of `input` (`len` bytes, copied into `dir`), with the loop's
    /// thread reading its share: the windows' leaves, the copy and how much of it is written.
    struct Done {
        leaves: Vec<io::Result<Leaf>>,
        temp: Temp,
        file: Arc<File>,
        written: usize,
    }

    fn run_job(thread: &WriterThread, dir: &Path, mode: u32, input: &File, len: usize) -> Done {
        let mut buf = vec![0u8; len + 1];
        // SAFETY: `buf` is only touched through the writer until `written` has the report.
        let writer =
            unsafe { thread.write(dir, len as u64, mode, input, buf.as_mut_ptr(), len) }.unwrap();
        let leaves = writer.read_windows(input, buf.as_mut_ptr());
        let temp = writer.temp().unwrap();
        let (file, written) = writer.written().unwrap();
        Done {
            leaves,
            temp,
            file,
            written,
        }
    }

    /// How many of `file`'s first `len` bytes' pages are in the page cache (mincore(2)).
    fn resident_pages(file: &File, len: usize) -> usize {
        use std::os::fd::AsRawFd;
        // SAFETY: a shared read-only mapping of a file we hold open, unmapped below; mincore
        // writes one byte per page into a vector of that many.
        unsafe {
            let addr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(addr, libc::MAP_FAILED);
            let page = libc::sysconf(libc::_SC_PAGESIZE) as usize;
            let mut pages = vec![0u8; len.div_ceil(page)];
            assert_eq!(libc::mincore(addr, len, pages.as_mut_ptr()), 0);
            libc::munmap(addr, len);
            pages.iter().filter(|&&p| p & 1 == 1).count()
        }
    }

    #[test]
    fn a_spare_is_filled_with_zeros_in_the_page_cache_unless_a_job_waits() {
        let t = TestDir::new("writer-fill");
        let len = 3 * BUF_SIZE + 4096;
        let queue = Queue::default();
        queue.make_spare(&t.0, len as u64);
        let filled = queue.take_spare(&t.0).expect("a spare");
        assert_eq!(filled.file.metadata().unwrap().len(), len as u64);
        let mut bytes = vec![1u8; len];
        filled.file.read_exact_at(&mut bytes, 0).unwrap();
        assert!(bytes.iter().all(|&b| b == 0), "zeros");
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        assert_eq!(resident_pages(&filled.file, len), len.div_ceil(page));

        // The thread has something else to do (here: to end): the blocks are reserved, the
        // pages are left for the copy to add.
        queue.state.lock().unwrap().closed = true;
        queue.make_spare(&t.0, len as u64);
        let unfilled = queue.take_spare(&t.0).expect("a spare all the same");
        assert_eq!(resident_pages(&unfilled.file, len), 0);
        assert!(unfilled.file.metadata().unwrap().blocks() * 512 >= len as u64);
    }

    /// Waits until the thread has made the next job's spare.
    fn wait_for_spare(thread: &WriterThread) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !thread.has_spare() {
            assert!(Instant::now() < deadline, "no spare was made");
            thread::sleep(SPARE_AFTER);
        }
    }

    fn subtree_hash(leaf: &io::Result<Leaf>) -> ChainingValue {
        match leaf.as_ref().unwrap().hash {
            LeafHash::Subtree(cv) => cv,
            other => panic!("not a subtree: {other:?}"),
        }
    }

    #[test]
    fn the_thread_reads_windows_nobody_claimed_and_writes_them_all_in_order() {
        let t = TestDir::new("writer-steal");
        let content = patterned(3 * BUF_SIZE + 100);
        let input = build(&t, &content);
        let mut buf = vec![0u8; content.len() + 1];
        let thread = WriterThread::start().unwrap();
        // SAFETY: `buf` is only touched through the writer until `written` has the report.
        let writer = unsafe {
            thread.write(
                &t.0,
                1 << 20,
                0o700,
                &input,
                buf.as_mut_ptr(),
                content.len(),
            )
        }
        .unwrap();
        // The loop's thread claims nothing here: every window is the writer's.
        writer.wait_until_all_read();
        let leaves = writer.read_windows(&input, buf.as_mut_ptr());
        let temp = writer.temp().unwrap();
        let (file, written) = writer.written().unwrap();

        assert_eq!(leaves.len(), 4);
        assert_eq!(leaves[3].as_ref().unwrap().read, 100);
        let mut expected = blake3::Hasher::new();
        expected.set_input_offset(BUF_SIZE as u64);
        expected.update(&content[BUF_SIZE..2 * BUF_SIZE]);
        assert_eq!(subtree_hash(&leaves[1]), expected.finalize_non_root());
        assert_eq!(written, content.len());
        assert_eq!(buf[..content.len()], content[..]);
        let meta = file.metadata().unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700);
        assert!(
            meta.blocks() * 512 >= 1 << 20,
            "blocks reserved: {}",
            meta.blocks()
        );
        assert_eq!(copied(&temp, &file)[..content.len()], content[..]);
    }

    #[test]
    fn the_only_window_of_a_small_build_has_the_root_hash() {
        let t = TestDir::new("writer-root");
        let content = patterned(5000);
        let input = build(&t, &content);
        let thread = WriterThread::start().unwrap();
        let done = run_job(&thread, &t.0, 0o600, &input, content.len());
        match done.leaves[0].as_ref().unwrap().hash {
            LeafHash::Root(root) => assert_eq!(root, blake3::hash(&content)),
            other => panic!("not the root: {other:?}"),
        }
        assert_eq!(done.written, content.len());
    }

    #[test]
    fn a_writer_asleep_for_want_of_windows_is_woken_by_the_next_one_read() {
        let t = TestDir::new("writer-nap");
        let content = patterned(3 * BUF_SIZE);
        let input = build(&t, &content);
        let mut buf = vec![0u8; content.len() + 1];
        let thread = WriterThread::start().unwrap();
        // SAFETY: as above.
        let writer =
            unsafe { thread.write(&t.0, 0, 0o600, &input, buf.as_mut_ptr(), content.len()) }
                .unwrap();
        // Every window claimed here before the writer can take one: it must wait for them.
        let windows = &writer.progress.windows;
        let claimed: Vec<usize> = std::iter::from_fn(|| windows.claim()).collect();
        assert_eq!(claimed, [0, 1, 2]);
        let temp = writer.temp().unwrap();
        let shared = Shared {
            ptr: buf.as_mut_ptr(),
            len: content.len(),
        };
        // Once the writer sleeps, only a wake-up gets it the window (a lost one hangs
        // `written` below).
        for i in claimed {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !writer.progress.napping.load(Ordering::SeqCst) {
                assert!(Instant::now() < deadline, "the writer never went to sleep");
                thread::sleep(SPIN);
            }
            windows.fill(i, &input, &shared);
            writer.progress.wake_writer();
        }
        let (file, written) = writer.written().unwrap();
        assert_eq!(written, content.len());
        assert_eq!(copied(&temp, &file)[..content.len()], content[..]);
    }

    #[test]
    fn one_thread_helps_with_one_job_after_the_other() {
        let t = TestDir::new("writer-jobs");
        let thread = WriterThread::start().unwrap();
        for round in 0..3u8 {
            let content = vec![round; 300_000];
            let input = build(&t, &content);
            let done = run_job(&thread, &t.0, 0o600, &input, content.len());
            assert!(done.leaves.iter().all(|leaf| leaf.is_ok()));
            assert_eq!(done.written, content.len());
            assert_eq!(copied(&done.temp, &done.file)[..content.len()], content[..]);
        }
    }

    #[test]
    fn a_writer_stopped_before_the_windows_are_read_leaves_the_buffer_alone() {
        let t = TestDir::new("writer-stop");
        let content = patterned(8 * BUF_SIZE);
        let input = build(&t, &content);
        let mut buf = vec![0u8; content.len() + 1];
        let thread = WriterThread::start().unwrap();
        // SAFETY: `buf` outlives the writer, which waits for the report on drop.
        let writer =
            unsafe { thread.write(&t.0, 0, 0o600, &input, buf.as_mut_ptr(), content.len()) }
                .unwrap();
        writer.temp().unwrap();
        let mut writer = writer;
        writer.stop_and_discard();
        // After the report the writer touches nothing. (How many windows it read by then is up
        // to the scheduler: on a busy machine, all of them.)
        buf.fill(0);
        assert_eq!(writer.written().unwrap().1, 0, "discarded");
    }

    #[test]
    fn the_next_job_copies_into_a_spare_made_after_the_last_and_nothing_shows_in_the_dir() {
        let t = TestDir::new("writer-spare");
        let snaps = t.join("snaps");
        fs::create_dir(&snaps).unwrap();
        let content = patterned(2 * BUF_SIZE);
        let input = build(&t, &content);
        let thread = WriterThread::start().unwrap();
        let first = run_job(&thread, &snaps, 0o700, &input, content.len());
        let Temp::Named(first) = first.temp else {
            panic!("no spare yet: {:?}", first.temp);
        };
        fs::remove_file(first).unwrap();
        wait_for_spare(&thread);
        let second = run_job(&thread, &snaps, 0o700, &input, content.len());

        assert!(matches!(second.temp, Temp::Unnamed), "{:?}", second.temp);
        assert_eq!(second.written, content.len());
        assert_eq!(
            copied(&second.temp, &second.file)[..content.len()],
            content[..]
        );
        assert_eq!(second.file.metadata().unwrap().mode() & 0o777, 0o700);
        assert_eq!(fs::read_dir(&snaps).unwrap().count(), 0);
    }

    #[test]
    fn the_loops_thread_may_write_windows_alongside_and_the_copy_is_whole() {
        let t = TestDir::new("writer-help");
        let content = patterned(6 * BUF_SIZE + 7);
        let input = build(&t, &content);
        let mut buf = vec![0u8; content.len() + 1];
        let thread = WriterThread::start().unwrap();
        // SAFETY: `buf` is only touched through the writer until `written` has the report.
        let writer = unsafe {
            thread.write(
                &t.0,
                1 << 20,
                0o600,
                &input,
                buf.as_mut_ptr(),
                content.len(),
            )
        }
        .unwrap();
        let leaves = writer.read_windows(&input, buf.as_mut_ptr());
        assert!(leaves.iter().all(|leaf| leaf.is_ok()));
        let temp = writer.temp().unwrap();
        writer.help_write(buf.as_ptr());
        let (file, written) = writer.written().unwrap();
        assert_eq!(written, content.len());
        assert_eq!(copied(&temp, &file)[..content.len()], content[..]);
    }

    #[test]
    fn a_spare_is_only_used_by_a_job_in_the_dir_it_was_made_in() {
        let t = TestDir::new("writer-spare-dir");
        let (a, b) = (t.join("a"), t.join("b"));
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        let content = patterned(BUF_SIZE + 1);
        let input = build(&t, &content);
        let thread = WriterThread::start().unwrap();
        run_job(&thread, &a, 0o600, &input, content.len());
        wait_for_spare(&thread);
        let other = run_job(&thread, &b, 0o600, &input, content.len());
        assert!(
            matches!(other.temp, Temp::Named(_)),
            "a spare made in a/ used for b/"
        );
    }

    #[test]
    fn a_copy_that_cannot_be_created_is_reported_and_the_thread_goes_on() {
        let t = TestDir::new("writer-error");
        let content = patterned(4096);
        let input = build(&t, &content);
        let mut buf = vec![0u8; content.len() + 1];
        let thread = WriterThread::start().unwrap();
        let missing = t.join("no-such-dir");
        // SAFETY: `buf` outlives the writer, which `written` waits for.
        let writer =
            unsafe { thread.write(&missing, 4096, 0o600, &input, buf.as_mut_ptr(), 4096) }.unwrap();
        let leaves = writer.read_windows(&input, buf.as_mut_ptr());
        assert!(
            leaves[0].is_ok(),
            "the loop's thread read the window itself"
        );
        let error = writer.temp().unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert!(writer.written().is_err());
        // The thread takes the next job after a failed one.
        // SAFETY: as above.
        let writer =
            unsafe { thread.write(&t.0, 4096, 0o600, &input, buf.as_mut_ptr(), 4096) }.unwrap();
        let _ = writer.read_windows(&input, buf.as_mut_ptr());
        assert_eq!(writer.written().unwrap().1, 4096);
    }
}
