//! The thread that writes a staged build to its snapshot's temp file while the event loop's
//! thread is still reading and hashing it.
//!
//! A staged reload (`stage.rs`) reads a build into memory, hashing each window as it comes,
//! and only then knows the version and may run the pre-flight check and stop the old instance.
//! The copy on disk is needed later, at the start. Written by the loop's thread, the copy sat on
//! the reload's path (~0.25 ms of a 1 MiB reload, issue 14). Handed to a helper once read, it
//! gained nothing: a halted CPU takes ~0.15 ms to wake, and the loop then waited for the write.
//! A thread started per reload cost the loop ~0.13 ms to create and move to another CPU. So one
//! thread waits for work between reloads ([`WriterThread`]), is woken *before* the read, on
//! another CPU (`sys::cpu`), creates the copy's temp file and reserves its blocks there (another
//! ~0.1 ms off the loop's thread), and writes each window as soon as the loop's thread has read
//! it; by the time the old instance is stopped and state.json written, the copy is done
//! (BENCHMARKS.md, fifth session). The thread ends with the staging buffer, after a while
//! without reloads.
//!
//! The two threads share the one staging buffer without a lock. The reader publishes how far
//! the buffer is filled (`ready`, a release store after the bytes are in place); the writer only
//! reads bytes below `ready` (an acquire load), the reader only writes at or above it, and the
//! buffer is neither moved nor freed before the writer has said it is done with it
//! ([`Writer::stop`], also on drop). That is the whole safety argument of the `unsafe` below.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The thread's stack: it only loops over `pwrite`.
const STACK_SIZE: usize = 64 << 10;

/// How long the writer spins for the next window before it sleeps until woken. The reader
/// publishes one every ~50 µs while it reads; spinning costs the reader nothing, waking a
/// sleeper costs it a system call. A writer that would spin longer (the reader stalled, or the
/// build is refused after the read) sleeps instead of burning a CPU, or yielding it in a loop
/// to whatever else runs there (the context switches of a busy machine).
const SPIN: Duration = Duration::from_micros(100);

/// The thread that writes staged builds, waiting for the next one in between.
pub(super) struct WriterThread {
    queue: Arc<Queue>,
    handle: Option<JoinHandle<()>>,
}

/// Where the loop's thread leaves a job for the writer thread: one at a time (a reload stages
/// one build, and waits for its copy before it stages another).
#[derive(Default)]
struct Queue {
    state: Mutex<Waiting>,
    wake: Condvar,
}

#[derive(Default)]
struct Waiting {
    job: Option<Job>,
    /// The thread is to end.
    closed: bool,
}

/// One build for the thread to copy.
struct Job {
    /// The snapshot dir, checked by the caller, where the copy's temp file goes.
    dir: PathBuf,
    /// Blocks to reserve for it, and its mode.
    reserve: u64,
    mode: u32,
    buf: Shared,
    progress: Arc<Progress>,
}

/// What the thread made of a job: the copy's temp file and how many bytes it wrote there from
/// offset 0.
pub(super) type Written = (File, usize);

/// The loop thread's side of one [`Job`]: publish, then collect what was written.
pub(super) struct Writer {
    progress: Arc<Progress>,
    /// What the thread reported at the end, once it has (and `None` again once taken by
    /// `written`).
    result: Option<io::Result<Written>>,
    /// The thread has reported the end: it no longer touches the buffer.
    reported: bool,
}

/// What the two threads tell each other about one job.
#[derive(Default)]
struct Progress {
    /// Bytes at the start of the buffer that are read and will not change.
    ready: AtomicUsize,
    /// No more bytes will be published: write what is ready and report.
    closed: AtomicBool,
    /// The writer waits on `more` (it spun for [`SPIN`] without news): a publish must wake it.
    napping: AtomicBool,
    nap: Mutex<()>,
    more: Condvar,
    report: Mutex<Reports>,
    /// Signalled with each report.
    reported: Condvar,
}

/// The thread's two reports on a job.
#[derive(Default)]
struct Reports {
    /// The copy's temp file, created with its blocks reserved, or why it could not be.
    temp: Option<io::Result<PathBuf>>,
    /// The end: the copy and the bytes written, or why it stopped. Once it is here the thread no
    /// longer touches the buffer.
    done: Option<io::Result<Written>>,
}

/// The buffer as the writer sees it: an address and a length, valid until the job is reported.
struct Shared {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the writer only reads the bytes below `Progress::ready`, which the reading thread has
// finished writing and keeps alive and unmoved until the job is reported (module documentation).
unsafe impl Send for Shared {}

impl WriterThread {
    /// Start the thread; `None` when no thread can be had (the caller writes the bytes itself).
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
        })
    }

    /// Have the thread create a temp file in `dir` with `reserve` bytes of blocks and `mode`
    /// ([`Writer::temp`] says which, or why not), and write the `len` bytes at `buf` to it from
    /// offset 0 as far as [`Writer::publish`] says they are ready, on a CPU other than the
    /// caller's. `None` when the thread is gone: the caller then does it all itself.
    ///
    /// # Safety
    ///
    /// `buf` must be valid for reads of `len` bytes until [`Writer::stop`] returns (or the
    /// writer is dropped): not moved, resized or freed meanwhile, and no byte below the last
    /// published length written again.
    pub(super) unsafe fn write(
        &self,
        dir: &Path,
        reserve: u64,
        mode: u32,
        buf: *const u8,
        len: usize,
    ) -> Option<Writer> {
        let handle = self.handle.as_ref()?;
        let progress = Arc::new(Progress::default());
        // While it waits, moving it costs nothing; once woken it would wait on this busy CPU.
        crate::sys::cpu::move_thread_off_this_cpu(handle);
        let job = Job {
            dir: dir.to_path_buf(),
            reserve,
            mode,
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
        })
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
    while let Some(job) = next_job(queue) {
        let mut report = ReportOnDrop {
            progress: &job.progress,
            done: None,
        };
        // A panic is reported as an error (a reload fails) and the thread goes on serving: a
        // job left in the queue of a dead thread would be waited for forever.
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&job, report.progress)));
        report.done = outcome.ok();
    }
}

/// Wait for the next job; `None` once the queue is closed.
fn next_job(queue: &Queue) -> Option<Job> {
    let mut waiting = queue.state.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        if let Some(job) = waiting.job.take() {
            return Some(job);
        }
        if waiting.closed {
            return None;
        }
        waiting = queue
            .wake
            .wait(waiting)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

/// One job: the temp file (reported at once: the loop's thread waits for it before the stop),
/// then the bytes.
fn run(job: &Job, progress: &Progress) -> io::Result<Written> {
    let (temp, file) = match super::reserved_temp(&job.dir, job.reserve, job.mode) {
        Ok(opened) => opened,
        Err(e) => {
            let error = io::Error::new(e.kind(), e.to_string());
            progress.post(|reports| reports.temp = Some(Err(e)));
            return Err(error);
        }
    };
    progress.post(|reports| reports.temp = Some(Ok(temp)));
    let written = write_as_ready(&file, &job.buf, progress)?;
    Ok((file, written))
}

impl Progress {
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
    done: Option<io::Result<Written>>,
}

impl Drop for ReportOnDrop<'_> {
    fn drop(&mut self) {
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

/// Write whatever is ready, until closed and all of it is written.
fn write_as_ready(file: &File, buf: &Shared, progress: &Progress) -> io::Result<usize> {
    let mut written = 0;
    let mut idle_since: Option<Instant> = None;
    loop {
        // `closed` first: once it is seen, the `ready` read after it is final.
        let closed = progress.closed.load(Ordering::Acquire);
        let ready = progress.ready.load(Ordering::Acquire).min(buf.len);
        if ready > written {
            // SAFETY: `written..ready` lies within the buffer (`ready` is capped at its length)
            // and below the published length, which the reader no longer writes and keeps alive
            // until this job is reported (`WriterThread::write`'s contract).
            let bytes =
                unsafe { std::slice::from_raw_parts(buf.ptr.add(written), ready - written) };
            file.write_all_at(bytes, written as u64)?;
            written = ready;
            idle_since = None;
        } else if closed {
            return Ok(written);
        } else if idle_since.get_or_insert_with(Instant::now).elapsed() < SPIN {
            std::hint::spin_loop();
        } else {
            progress.nap_unless_news(written);
            idle_since = None;
        }
    }
}

impl Progress {
    /// Sleep until the reader publishes past `written` or closes, unless it already has.
    fn nap_unless_news(&self, written: usize) {
        let guard = self.nap.lock().unwrap_or_else(PoisonError::into_inner);
        // SeqCst on both sides: either the reader's next load of `napping` sees it set (and
        // wakes this thread), or the loads below see what the reader stored.
        self.napping.store(true, Ordering::SeqCst);
        let news =
            self.ready.load(Ordering::SeqCst) > written || self.closed.load(Ordering::SeqCst);
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

    /// After a publish or the close: wake the writer if it sleeps.
    fn wake_writer(&self) {
        if self.napping.load(Ordering::SeqCst) {
            // Taking the lock waits until the writer is inside `wait`, or has decided not to.
            let _guard = self.nap.lock().unwrap_or_else(PoisonError::into_inner);
            self.more.notify_one();
        }
    }
}

impl Writer {
    /// The first `ready` bytes of the buffer are in place and will not change.
    pub(super) fn publish(&self, ready: usize) {
        self.progress.ready.store(ready, Ordering::SeqCst);
        self.progress.wake_writer();
    }

    /// Nothing more will be published: the writer ends once what is ready is written.
    pub(super) fn close(&self) {
        self.progress.closed.store(true, Ordering::SeqCst);
        self.progress.wake_writer();
    }

    /// The copy's temp file, once the thread has created it and reserved its blocks, or why it
    /// could not (that error is given once).
    pub(super) fn temp(&self) -> io::Result<PathBuf> {
        self.progress.wait_for(|reports| match &reports.temp {
            Some(Ok(temp)) => Some(Ok(temp.clone())),
            Some(Err(_)) => reports.temp.take(),
            None => None,
        })
    }

    /// Let the writer finish what is published, and wait for its report: the buffer is the
    /// caller's again.
    pub(super) fn stop(&mut self) {
        if self.reported {
            return;
        }
        self.close();
        self.result = Some(self.progress.wait_for(|reports| reports.done.take()));
        self.reported = true;
    }

    /// [`Writer::stop`], then the copy and how many bytes were written to it from offset 0, or
    /// why not.
    pub(super) fn written(mut self) -> io::Result<Written> {
        self.stop();
        self.result
            .take()
            .unwrap_or_else(|| Err(io::Error::other("the snapshot write was already collected")))
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

    #[test]
    fn the_thread_creates_the_copy_and_writes_what_is_published_until_closed() {
        let t = TestDir::new("writer-publish");
        let buf = patterned(1 << 20);
        let thread = WriterThread::start().unwrap();
        // SAFETY: `buf` is not touched until `written` has the report.
        let writer =
            unsafe { thread.write(&t.0, 1 << 20, 0o700, buf.as_ptr(), buf.len()) }.unwrap();
        for ready in (0..buf.len()).step_by(100_000) {
            writer.publish(ready);
        }
        writer.publish(700_001);
        let temp = writer.temp().unwrap();
        let (file, written) = writer.written().unwrap();

        assert_eq!(written, 700_001);
        let meta = file.metadata().unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700);
        assert!(
            meta.blocks() * 512 >= 1 << 20,
            "blocks reserved: {}",
            meta.blocks()
        );
        assert_eq!(fs::read(&temp).unwrap()[..700_001], buf[..700_001]);
    }

    #[test]
    fn a_writer_asleep_for_want_of_bytes_is_woken_by_the_next_publish_and_the_close() {
        let t = TestDir::new("writer-nap");
        let buf = patterned(300_000);
        let thread = WriterThread::start().unwrap();
        // SAFETY: `buf` is not touched until `written` has the report.
        let writer =
            unsafe { thread.write(&t.0, 300_000, 0o600, buf.as_ptr(), buf.len()) }.unwrap();
        let temp = writer.temp().unwrap();
        // Once the writer sleeps, only a wake-up gets it the bytes (a lost one hangs `written`
        // below).
        let asleep = || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !writer.progress.napping.load(Ordering::SeqCst) {
                assert!(Instant::now() < deadline, "the writer never went to sleep");
                thread::sleep(SPIN);
            }
        };
        for ready in [100_000, 200_000, 300_000] {
            asleep();
            writer.publish(ready);
        }
        asleep();
        assert_eq!(writer.written().unwrap().1, 300_000);
        assert_eq!(fs::read(&temp).unwrap(), buf);
    }

    #[test]
    fn one_thread_copies_one_job_after_the_other() {
        let t = TestDir::new("writer-jobs");
        let thread = WriterThread::start().unwrap();
        for round in 0..3u8 {
            let buf = vec![round; 300_000];
            // SAFETY: `buf` is not touched until `written` has the report.
            let writer =
                unsafe { thread.write(&t.0, 300_000, 0o600, buf.as_ptr(), buf.len()) }.unwrap();
            writer.publish(buf.len());
            let temp = writer.temp().unwrap();
            assert_eq!(writer.written().unwrap().1, buf.len());
            assert_eq!(fs::read(&temp).unwrap(), buf);
        }
    }

    #[test]
    fn a_writer_dropped_before_anything_is_ready_writes_nothing() {
        let t = TestDir::new("writer-empty");
        let buf = vec![7u8; 4096];
        let thread = WriterThread::start().unwrap();
        // SAFETY: `buf` outlives the writer, which waits for the report on drop.
        let writer = unsafe { thread.write(&t.0, 0, 0o600, buf.as_ptr(), buf.len()) }.unwrap();
        let temp = writer.temp().unwrap();
        drop(writer);
        drop(thread);
        assert_eq!(fs::metadata(&temp).unwrap().len(), 0);
    }

    #[test]
    fn a_copy_that_cannot_be_created_is_reported_and_the_thread_goes_on() {
        let t = TestDir::new("writer-error");
        let buf = vec![1u8; 4096];
        let thread = WriterThread::start().unwrap();
        let missing = t.join("no-such-dir");
        // SAFETY: `buf` outlives the writer, which `written` waits for.
        let writer = unsafe { thread.write(&missing, 4096, 0o600, buf.as_ptr(), 4096) }.unwrap();
        writer.publish(4096);
        let error = writer.temp().unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert!(writer.written().is_err());
        // The thread takes the next job after a failed one.
        // SAFETY: as above.
        let writer = unsafe { thread.write(&t.0, 4096, 0o600, buf.as_ptr(), 4096) }.unwrap();
        writer.publish(4096);
        assert_eq!(writer.written().unwrap().1, 4096);
    }
}
