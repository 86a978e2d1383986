//! Plugin stdout/stderr: non-blocking pipes split into lines for the log and for subscribers.
//!
//! A plugin may print nothing, close its pipes early, or flood a gigabyte: the reader never blocks,
//! bounds its memory (a line over `MAX_LINE` bytes is emitted in pieces), and reads at most a
//! budget per loop turn so one chatty plugin cannot starve the rest of the loop. When the budget
//! runs out before `WouldBlock`, the caller must come back on the next turn (edge-triggered
//! readiness will not fire again for data already waiting).

use std::io::{self, Read};
use std::os::fd::OwnedFd;

/// Lines longer than this are split (SPEC §4: "lines over 8 KiB split").
pub const MAX_LINE: usize = 8 * 1024;
/// Bytes read from one pipe per loop turn before yielding to other work.
pub const READ_BUDGET: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// What a read pass found besides the lines.
#[derive(Debug, PartialEq, Eq)]
pub enum PipeStatus {
    /// Drained to WouldBlock: wait for the next readiness event.
    Idle,
    /// Budget used up with data possibly left: read again next loop turn.
    MoreLater,
    /// The plugin closed its end (or it broke): deregister and drop.
    Closed,
}

#[derive(Debug)]
pub struct LineReader {
    file: std::fs::File,
    partial: Vec<u8>,
}

impl LineReader {
    pub fn new(fd: OwnedFd) -> LineReader {
        LineReader {
            file: std::fs::File::from(fd),
            partial: Vec::new(),
        }
    }

    pub fn fd(&self) -> &std::fs::File {
        &self.file
    }

    /// Read what is available (up to the budget) and hand every complete line to `emit`.
    pub fn read_lines(&mut self, mut emit: impl FnMut(String)) -> PipeStatus {
        let mut buf = [0u8; 16 * 1024];
        let mut total = 0;
        loop {
            if total >= READ_BUDGET {
                return PipeStatus::MoreLater;
            }
            match self.file.read(&mut buf) {
                Ok(0) => {
                    self.flush_partial(&mut emit);
                    return PipeStatus::Closed;
                }
                Ok(n) => {
                    total += n;
                    self.split(&buf[..n], &mut emit);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return PipeStatus::Idle,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("plugin output pipe error: {e}");
                    self.flush_partial(&mut emit);
                    return PipeStatus::Closed;
                }
            }
        }
    }

    fn split(&mut self, mut data: &[u8], emit: &mut impl FnMut(String)) {
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            let (line, rest) = data.split_at(pos);
            self.push_bounded(line, emit);
            let mut whole = std::mem::take(&mut self.partial);
            if whole.last() == Some(&b'\r') {
                whole.pop();
            }
            emit(String::from_utf8_lossy(&whole).into_owned());
            data = &rest[1..];
        }
        self.push_bounded(data, emit);
    }

    /// Append to the partial line, emitting full MAX_LINE chunks as they fill.
    fn push_bounded(&mut self, mut data: &[u8], emit: &mut impl FnMut(String)) {
        while self.partial.len() + data.len() > MAX_LINE {
            let room = MAX_LINE - self.partial.len();
            self.partial.extend_from_slice(&data[..room]);
            data = &data[room..];
            let chunk = std::mem::take(&mut self.partial);
            emit(String::from_utf8_lossy(&chunk).into_owned());
        }
        self.partial.extend_from_slice(data);
    }

    fn flush_partial(&mut self, emit: &mut impl FnMut(String)) {
        if !self.partial.is_empty() {
            let chunk = std::mem::take(&mut self.partial);
            emit(String::from_utf8_lossy(&chunk).into_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    /// Reads until the writer's end is gone. A test running beside this one may fork (to spawn a
    /// child) while `w` is open: until that child execs, it holds a copy of the writing end, so
    /// the end of file can come a moment after `drop(w)`.
    fn read_until_closed(r: &mut LineReader, got: &mut Vec<String>) -> PipeStatus {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let status = r.read_lines(|l| got.push(l));
            if status != PipeStatus::Idle || std::time::Instant::now() > deadline {
                return status;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    fn reader_pair() -> (LineReader, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (LineReader::new(OwnedFd::from(a)), b)
    }

    #[test]
    fn splits_lines_across_writes() {
        let (mut r, mut w) = reader_pair();
        w.write_all(b"hel").unwrap();
        let mut got = Vec::new();
        assert_eq!(r.read_lines(|l| got.push(l)), PipeStatus::Idle);
        assert!(got.is_empty());
        w.write_all(b"lo\r\nworld\nx").unwrap();
        r.read_lines(|l| got.push(l));
        assert_eq!(got, vec!["hello", "world"]);
        drop(w);
        assert_eq!(read_until_closed(&mut r, &mut got), PipeStatus::Closed);
        assert_eq!(got.last().map(String::as_str), Some("x"));
    }

    #[test]
    fn long_lines_are_split_at_max_line() {
        let (mut r, mut w) = reader_pair();
        let line = vec![b'a'; MAX_LINE * 2 + 10];
        w.write_all(&line).unwrap();
        w.write_all(b"\n").unwrap();
        let mut got = Vec::new();
        r.read_lines(|l| got.push(l.len()));
        assert_eq!(got, vec![MAX_LINE, MAX_LINE, 10]);
    }

    #[test]
    fn budget_yields_before_draining_a_flood() {
        // A regular file never says WouldBlock, so only the budget can stop the first pass.
        let path = std::env::temp_dir().join(format!("hr-output-budget-{}", std::process::id()));
        std::fs::write(&path, vec![b'x'; READ_BUDGET + 4096]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let mut r = LineReader::new(OwnedFd::from(file));
        let mut n = 0usize;
        assert_eq!(r.read_lines(|l| n += l.len()), PipeStatus::MoreLater);
        assert_eq!(r.read_lines(|l| n += l.len()), PipeStatus::Closed);
        assert_eq!(n, READ_BUDGET + 4096);
    }
}
