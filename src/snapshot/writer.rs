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
//! another CPU (`sys::cpu`), and writes each window as soon as the loop's thread has read it; by
//! the time the old instance is stopped and state.json written, the copy is done (BENCHMARKS.md,
//! fifth session). The thread ends with the staging buffer, after a while without reloads.
//!
//! The two threads share the one staging buffer without a lock. The reader publishes how far
//! the buffer is filled (`ready`, a release store after the bytes are in place); the writer only
//! reads bytes below `ready` (an acquire load), the reader only writes at or above it, and the
//! buffer is neither moved nor freed before the writer has said it is done with it
//! ([`Writer::stop`], also on drop). That is the whole safety argument of the `unsafe` below.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};

/// The thread's stack: it only loops over `pwrite`.
const STACK_SIZE: usize = 64 << 10;

/// The thread that writes staged builds, waiting for the next one in between.
pub(super) struct WriterThread {
    jobs: Option<Sender<Job>>,
    handle: Option<JoinHandle<()>>,
}

/// One build for the thread to write.
struct Job {
    file: File,
    buf: Shared,
    progress: Arc<Progress>,
}

/// The loop thread's side of one [`Job`]: publish, then collect what was written.
pub(super) struct Writer {
    progress: Arc<Progress>,
    /// What the thread reported, once it has (and `None` again once taken by `written`).
    result: Option<io::Result<usize>>,
    /// The thread has reported: it no longer touches the buffer.
    reported: bool,
}

/// What the two threads tell each other about one job.
#[derive(Default)]
struct Progress {
    /// Bytes at the start of the buffer that are read and will not change.
    ready: AtomicUsize,
    /// No more bytes will be published: write what is ready and report.
    closed: AtomicBool,
    /// The thread's report: bytes written from offset 0, or why it stopped. Once it is here the
    /// thread no longer touches the buffer.
    report: Mutex<Option<io::Result<usize>>>,
    reported: Condvar,
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
        let (jobs, queue) = mpsc::channel();
        let handle = thread::Builder::new()
            .name("snapshot-write".into())
            .stack_size(STACK_SIZE)
            .spawn(move || serve(&queue))
            .ok()?;
        Some(WriterThread {
            jobs: Some(jobs),
            handle: Some(handle),
        })
    }

    /// Have the thread write the `len` bytes at `buf` to `file` from offset 0, as far as
    /// [`Writer::publish`] says they are ready, on a CPU other than the caller's. `None` when the
    /// thread is gone or the file cannot be shared with it: the caller then writes the bytes.
    ///
    /// # Safety
    ///
    /// `buf` must be valid for reads of `len` bytes until [`Writer::stop`] returns (or the
    /// writer is dropped): not moved, resized or freed meanwhile, and no byte below the last
    /// published length written again.
    pub(super) unsafe fn write(&self, file: &File, buf: *const u8, len: usize) -> Option<Writer> {
        let (jobs, handle) = (self.jobs.as_ref()?, self.handle.as_ref()?);
        let file = file.try_clone().ok()?;
        let progress = Arc::new(Progress::default());
        // While it waits, moving it costs nothing; once woken it would wait on this busy CPU.
        crate::sys::cpu::move_thread_off_this_cpu(handle);
        let job = Job {
            file,
            buf: Shared { ptr: buf, len },
            progress: Arc::clone(&progress),
        };
        jobs.send(job).ok()?;
        Some(Writer {
            progress,
            result: None,
            reported: false,
        })
    }
}

impl Drop for WriterThread {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has reported its last job.
        drop(self.jobs.take());
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// The thread: one job after the other until the queue is closed.
fn serve(queue: &Receiver<Job>) {
    while let Ok(job) = queue.recv() {
        let report = ReportOnDrop {
            progress: &job.progress,
            result: None,
        };
        run(job.file, &job.buf, report);
    }
}

fn run(file: File, buf: &Shared, mut report: ReportOnDrop<'_>) {
    report.result = Some(write_as_ready(&file, buf, report.progress));
}

/// Posts the job's result when dropped, and an error if the write panicked: the loop's thread
/// waits for a report, and must never wait forever.
struct ReportOnDrop<'a> {
    progress: &'a Progress,
    result: Option<io::Result<usize>>,
}

impl Drop for ReportOnDrop<'_> {
    fn drop(&mut self) {
        let result = self
            .result
            .take()
            .unwrap_or_else(|| Err(io::Error::other("the snapshot write thread panicked")));
        let mut report = self
            .progress
            .report
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *report = Some(result);
        self.progress.reported.notify_all();
    }
}

/// Write whatever is ready, until closed and all of it is written.
fn write_as_ready(file: &File, buf: &Shared, progress: &Progress) -> io::Result<usize> {
    let mut written = 0;
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
        } else if closed {
            return Ok(written);
        } else {
            // The reader is at most a few hundred microseconds ahead of this.
            std::hint::spin_loop();
            thread::yield_now();
        }
    }
}

impl Writer {
    /// The first `ready` bytes of the buffer are in place and will not change.
    pub(super) fn publish(&self, ready: usize) {
        self.progress.ready.store(ready, Ordering::Release);
    }

    /// Nothing more will be published: the writer ends once what is ready is written.
    pub(super) fn close(&self) {
        self.progress.closed.store(true, Ordering::Release);
    }

    /// Let the writer finish what is published, and wait for its report: the buffer is the
    /// caller's again.
    pub(super) fn stop(&mut self) {
        if self.reported {
            return;
        }
        self.close();
        let mut report = self
            .progress
            .report
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(result) = report.take() {
                self.result = Some(result);
                self.reported = true;
                return;
            }
            report = self
                .progress
                .reported
                .wait(report)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// [`Writer::stop`], then how many bytes it wrote from offset 0, or its write error.
    pub(super) fn written(mut self) -> io::Result<usize> {
        self.stop();
        self.result.take().unwrap_or(Ok(0))
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

    fn patterned(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn the_writer_writes_what_is_published_and_stops_at_close() {
        let t = TestDir::new("writer-publish");
        let path = t.join("copy");
        let file = File::create(&path).unwrap();
        let buf = patterned(1 << 20);
        let thread = WriterThread::start().unwrap();
        // SAFETY: `buf` is not touched until `written` has the report.
        let writer = unsafe { thread.write(&file, buf.as_ptr(), buf.len()) }.unwrap();
        for ready in (0..buf.len()).step_by(100_000) {
            writer.publish(ready);
        }
        writer.publish(700_001);
        assert_eq!(writer.written().unwrap(), 700_001);
        assert_eq!(fs::read(&path).unwrap(), buf[..700_001]);
    }

    #[test]
    fn one_thread_writes_one_job_after_the_other() {
        let t = TestDir::new("writer-jobs");
        let thread = WriterThread::start().unwrap();
        for round in 0..3u8 {
            let path = t.join(&format!("copy-{round}"));
            let file = File::create(&path).unwrap();
            let buf = vec![round; 300_000];
            // SAFETY: `buf` is not touched until `written` has the report.
            let writer = unsafe { thread.write(&file, buf.as_ptr(), buf.len()) }.unwrap();
            writer.publish(buf.len());
            assert_eq!(writer.written().unwrap(), buf.len());
            assert_eq!(fs::read(&path).unwrap(), buf);
        }
    }

    #[test]
    fn a_writer_dropped_before_anything_is_ready_writes_nothing() {
        let t = TestDir::new("writer-empty");
        let path = t.join("copy");
        let file = File::create(&path).unwrap();
        let buf = vec![7u8; 4096];
        let thread = WriterThread::start().unwrap();
        // SAFETY: `buf` outlives the writer, which waits for the report on drop.
        let writer = unsafe { thread.write(&file, buf.as_ptr(), buf.len()) }.unwrap();
        drop(writer);
        drop(thread);
        assert_eq!(fs::metadata(&path).unwrap().len(), 0);
    }

    #[test]
    fn a_write_error_is_reported_not_lost() {
        let t = TestDir::new("writer-error");
        let path = t.join("copy");
        fs::write(&path, b"").unwrap();
        // Read-only: every pwrite fails with EBADF.
        let file = File::open(&path).unwrap();
        let buf = vec![1u8; 4096];
        let thread = WriterThread::start().unwrap();
        // SAFETY: `buf` outlives the writer, which `written` waits for.
        let writer = unsafe { thread.write(&file, buf.as_ptr(), buf.len()) }.unwrap();
        writer.publish(4096);
        assert!(writer.written().is_err());
        // The thread takes the next job after a failed one.
        let ok = File::create(t.join("next")).unwrap();
        // SAFETY: as above.
        let writer = unsafe { thread.write(&ok, buf.as_ptr(), buf.len()) }.unwrap();
        writer.publish(4096);
        assert_eq!(writer.written().unwrap(), 4096);
    }
}
