//! One control client's connection state: its socket, its bounded input and output buffers,
//! its peer credentials and its subscription.
//!
//! The buffers are what keep the single-threaded loop safe from clients: input never grows past
//! `max_line_bytes` plus one read chunk, and output is a queue of chunks where an event line
//! shared by every subscriber is an `Rc` (no copy), so queueing or dropping an event costs O(1)
//! whatever the client does. Nothing here blocks: reads and writes stop at `WouldBlock` and
//! resume on the next readiness edge.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::rc::Rc;

use mio::net::UnixStream;

use super::{ClientId, Peer, SubscribeFilter};

/// How much one `read` asks for.
pub(crate) const READ_CHUNK: usize = 16 * 1024;

/// How many queued chunks one `writev` sends at most.
const MAX_IOVECS: usize = 64;

/// Bytes received but not yet consumed as complete lines.
#[derive(Debug, Default)]
pub(crate) struct InBuf {
    bytes: Vec<u8>,
    /// Start of the first unconsumed line.
    start: usize,
    /// Bytes from `start` already searched for a newline, so a long line arriving in small
    /// pieces is scanned once, not once per piece.
    scanned: usize,
}

/// What the input buffer holds next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NextLine {
    /// A complete line at `bytes[start..end]` (without its newline).
    Line { start: usize, end: usize },
    /// No newline yet and the partial line is within the limit: read more.
    Partial,
    /// The current line is longer than the limit.
    TooLong,
}

impl InBuf {
    /// Finds the next line; a line is too long when it exceeds `max_line` bytes before its
    /// newline.
    pub(crate) fn next_line(&mut self, max_line: usize) -> NextLine {
        let pending = &self.bytes[self.start..];
        match pending[self.scanned..].iter().position(|b| *b == b'\n') {
            Some(offset) => {
                let len = self.scanned + offset;
                self.scanned = 0;
                let start = self.start;
                self.start += len + 1;
                if len > max_line {
                    NextLine::TooLong
                } else {
                    NextLine::Line {
                        start,
                        end: start + len,
                    }
                }
            }
            None => {
                self.scanned = pending.len();
                if pending.len() > max_line {
                    NextLine::TooLong
                } else {
                    NextLine::Partial
                }
            }
        }
    }

    pub(crate) fn slice(&self, start: usize, end: usize) -> &[u8] {
        &self.bytes[start..end]
    }

    /// Bytes of the unfinished line.
    pub(crate) fn pending_len(&self) -> usize {
        self.bytes.len() - self.start
    }

    /// Drops consumed lines so the buffer holds only the unfinished one.
    fn compact(&mut self) {
        if self.start > 0 {
            self.bytes.drain(..self.start);
            self.start = 0;
        }
    }

    pub(crate) fn clear(&mut self) {
        *self = InBuf::default();
    }

    /// Reads one chunk from `source`; `Ok(0)` is end of file.
    pub(crate) fn read_from(&mut self, source: &mut impl Read) -> io::Result<usize> {
        self.compact();
        let old_len = self.bytes.len();
        self.bytes.resize(old_len + READ_CHUNK, 0);
        let result = source.read(&mut self.bytes[old_len..]);
        let read = *result.as_ref().unwrap_or(&0);
        self.bytes.truncate(old_len + read);
        result
    }

    #[cfg(test)]
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.compact();
        self.bytes.extend_from_slice(bytes);
    }
}

/// One queued piece of output.
#[derive(Debug)]
enum Chunk {
    /// Replies, coalesced while they are small.
    Owned(Vec<u8>),
    /// An event line shared with every other subscriber.
    Shared(Rc<[u8]>),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Owned(bytes) => bytes,
            Chunk::Shared(bytes) => bytes,
        }
    }
}

/// Bytes waiting to be written to the client, as a queue of chunks.
#[derive(Debug, Default)]
pub(crate) struct OutBuf {
    chunks: VecDeque<Chunk>,
    /// Bytes of the front chunk already written.
    front_written: usize,
    /// Unwritten bytes in total.
    len: usize,
}

/// Replies shorter than this are appended to the last owned chunk instead of queued apart, so
/// a thousand pipelined answers go out in a few `writev` calls.
const COALESCE_LIMIT: usize = 16 * 1024;

impl OutBuf {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn push_owned(&mut self, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        self.len += bytes.len();
        if let Some(Chunk::Owned(last)) = self.chunks.back_mut()
            && last.len() + bytes.len() <= COALESCE_LIMIT
        {
            last.extend_from_slice(&bytes);
            return;
        }
        self.chunks.push_back(Chunk::Owned(bytes));
    }

    pub(crate) fn push_shared(&mut self, bytes: Rc<[u8]>) {
        if bytes.is_empty() {
            return;
        }
        self.len += bytes.len();
        self.chunks.push_back(Chunk::Shared(bytes));
    }

    /// Writes until the buffer is empty or the socket would block.
    ///
    /// Returns whether everything was written.
    pub(crate) fn write_to(&mut self, sink: &mut impl Write) -> io::Result<bool> {
        while !self.is_empty() {
            let written = {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let mut count = 0;
                for (i, chunk) in self.chunks.iter().take(MAX_IOVECS).enumerate() {
                    let skip = if i == 0 { self.front_written } else { 0 };
                    slices[i] = IoSlice::new(&chunk.bytes()[skip..]);
                    count += 1;
                }
                match sink.write_vectored(&slices[..count]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) => return Err(e),
                }
            };
            self.consume(written);
        }
        Ok(true)
    }

    fn consume(&mut self, mut written: usize) {
        self.len -= written;
        while let Some(front) = self.chunks.front() {
            let left = front.bytes().len() - self.front_written;
            if written < left {
                self.front_written += written;
                return;
            }
            written -= left;
            self.front_written = 0;
            self.chunks.pop_front();
        }
    }

    #[cfg(test)]
    fn chunk_count(&self) -> usize {
        self.chunks.len()
    }
}

/// One connected client.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) id: ClientId,
    pub(crate) stream: UnixStream,
    pub(crate) peer: Peer,
    pub(crate) input: InBuf,
    pub(crate) output: OutBuf,
    /// The socket may have more to read (no `WouldBlock` since the last readable edge).
    pub(crate) read_ready: bool,
    /// The client shut down its writing side (read returned 0).
    pub(crate) read_closed: bool,
    /// A request was handed to the daemon and is not answered yet; later lines wait for the
    /// answer, so answers stay in request order.
    pub(crate) awaiting: bool,
    /// The daemon answers the awaited request later (a `trigger` that waits).
    pub(crate) deferred: bool,
    /// The peer is gone for good: what it sent is still served, but it is closed as soon as
    /// no request of it is with the daemon.
    pub(crate) hung_up: bool,
    /// Requests this client may still have served before the others get their turn.
    pub(crate) budget: usize,
    /// Close once the output is flushed (after `line_too_long`); input is ignored.
    pub(crate) closing: bool,
    pub(crate) subscription: Option<SubscribeFilter>,
    /// Events dropped since the output went over its limit; reported as `lagged`.
    pub(crate) dropped: u64,
}

impl Conn {
    pub(crate) fn new(id: ClientId, stream: UnixStream, peer: Peer) -> Self {
        Conn {
            id,
            stream,
            peer,
            input: InBuf::default(),
            output: OutBuf::default(),
            read_ready: true,
            read_closed: false,
            awaiting: false,
            deferred: false,
            hung_up: false,
            budget: 0,
            closing: false,
            subscription: None,
            dropped: 0,
        }
    }

    /// Queues a reply, adding the newline a reply must end with if the handler forgot it.
    pub(crate) fn queue_reply(&mut self, mut reply: Vec<u8>) {
        if reply.last() != Some(&b'\n') {
            reply.push(b'\n');
        }
        self.output.push_owned(reply);
    }

    /// Writes what is queued; `Ok(true)` when the output is empty afterwards.
    pub(crate) fn flush(&mut self) -> io::Result<bool> {
        self.output.write_to(&mut self.stream)
    }

    /// Reads and discards what the client already sent, so that closing does not turn into a
    /// connection reset that could hide our last answer from it. Bounded: gives up after a few
    /// chunks of a client that keeps sending.
    pub(crate) fn discard_input(&mut self) {
        let mut sink = [0u8; READ_CHUNK];
        for _ in 0..16 {
            match self.stream.read(&mut sink) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// Whether there is nothing more to do for this client and it can be closed: everything
    /// answered and flushed, and either it asked to close or it will not send more.
    pub(crate) fn is_finished(&self) -> bool {
        if !self.output.is_empty() {
            return false;
        }
        if self.closing {
            return true;
        }
        self.read_closed
            && !self.awaiting
            && self.subscription.is_none()
            && self.input.pending_len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_across_pushes_and_limited() {
        let mut input = InBuf::default();
        input.push(b"sta");
        assert_eq!(input.next_line(10), NextLine::Partial);
        input.push(b"tus\nlist\r\nhe");
        let NextLine::Line { start, end } = input.next_line(10) else {
            panic!("want a line")
        };
        assert_eq!(input.slice(start, end), b"status");
        let NextLine::Line { start, end } = input.next_line(10) else {
            panic!("want a line")
        };
        assert_eq!(input.slice(start, end), b"list\r");
        assert_eq!(input.next_line(10), NextLine::Partial);
        assert_eq!(input.pending_len(), 2);
        input.push(b"lp-and-more-than-ten");
        assert_eq!(input.next_line(10), NextLine::TooLong);
    }

    #[test]
    fn a_complete_line_over_the_limit_is_too_long() {
        let mut input = InBuf::default();
        input.push(b"0123456789A\nok\n");
        assert_eq!(input.next_line(10), NextLine::TooLong);
        let mut exact = InBuf::default();
        exact.push(b"0123456789\n");
        assert_eq!(exact.next_line(10), NextLine::Line { start: 0, end: 10 });
    }

    /// A sink that accepts at most `budget` bytes, then would block.
    struct Limited {
        taken: Vec<u8>,
        budget: usize,
    }

    impl Write for Limited {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.budget);
            self.budget -= n;
            self.taken.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_keeps_order_across_partial_writes() {
        let mut out = OutBuf::default();
        out.push_owned(b"one\n".to_vec());
        out.push_shared(Rc::from(&b"event\n"[..]));
        out.push_owned(b"two\n".to_vec());
        assert_eq!(out.len(), 14);
        let mut sink = Limited {
            taken: Vec::new(),
            budget: 5,
        };
        assert!(!out.write_to(&mut sink).unwrap());
        assert_eq!(out.len(), 9);
        out.push_owned(b"three\n".to_vec());
        sink.budget = 100;
        assert!(out.write_to(&mut sink).unwrap());
        assert_eq!(sink.taken, b"one\nevent\ntwo\nthree\n");
        assert!(out.is_empty());
    }

    #[test]
    fn small_replies_are_coalesced() {
        let mut out = OutBuf::default();
        for _ in 0..1000 {
            out.push_owned(b"{\"status\":\"success\"}\n".to_vec());
        }
        assert!(out.chunk_count() < 5, "{} chunks", out.chunk_count());
    }
}
