//! The JSON-lines client of the control socket (SPEC §6): requests and responses, and the
//! events of a subscription, kept so a test can wait for one and later look at all of them.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr, sockopt};
use serde_json::{Value, json};

use super::{REQUEST_TIMEOUT, TIMEOUT, is_event};

/// Outcome of reading one line.
pub enum Line {
    Text(Vec<u8>),
    Eof,
    Timeout,
}

/// A JSON-lines client of the control socket.
pub struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
    eof: bool,
    /// Events read so far, with whether `wait_event` already handed each one out.
    events: Vec<(Value, bool)>,
}

impl Client {
    pub fn connect(path: &Path) -> io::Result<Client> {
        Ok(Client::from_stream(UnixStream::connect(path)?))
    }

    /// Connects with a small receive buffer, so a client that does not read fills up quickly.
    pub fn connect_with_rcvbuf(path: &Path, bytes: usize) -> io::Result<Client> {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        socket::setsockopt(&fd, sockopt::RcvBuf, &bytes)?;
        socket::connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        Ok(Client::from_stream(UnixStream::from(fd)))
    }

    fn from_stream(stream: UnixStream) -> Client {
        Client {
            stream,
            buf: Vec::new(),
            eof: false,
            events: Vec::new(),
        }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn send(&mut self, request: &Value) {
        self.send_raw(format!("{request}\n").as_bytes());
    }

    /// One line without its newline, EOF, or a timeout; never fails.
    pub fn try_read_line(&mut self, timeout: Duration) -> Line {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.drain(..=pos).take(pos).collect();
                return Line::Text(line);
            }
            if self.eof {
                return match self.buf.is_empty() {
                    true => Line::Eof,
                    false => Line::Text(std::mem::take(&mut self.buf)),
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Line::Timeout;
            }
            self.fill(left);
        }
    }

    fn fill(&mut self, wait: Duration) {
        let mut chunk = [0u8; 65536];
        let _ = self
            .stream
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))));
        match self.stream.read(&mut chunk) {
            Ok(0) => self.eof = true,
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => self.eof = true,
        }
    }

    /// The next response line as a JSON object; fails on timeout, EOF or anything else.
    #[track_caller]
    pub fn read_json(&mut self, timeout: Duration) -> Value {
        match self.try_read_line(timeout) {
            Line::Text(line) => parse_object(&line),
            Line::Eof => panic!("contract (SPEC §6): one response per request; the daemon closed"),
            Line::Timeout => panic!(
                "no response line from the daemon within {timeout:?} (buffered: {:?})",
                String::from_utf8_lossy(&self.buf[..self.buf.len().min(200)])
            ),
        }
    }

    #[track_caller]
    pub fn request(&mut self, request: &Value) -> Value {
        self.send(request);
        self.read_json(REQUEST_TIMEOUT)
    }

    /// Sends `text` plus a newline (a bare-word command, as typed into socat).
    #[track_caller]
    pub fn request_line(&mut self, text: &str) -> Value {
        self.send_raw(format!("{text}\n").as_bytes());
        self.read_json(REQUEST_TIMEOUT)
    }

    /// True if nothing arrives within `wait` (proving a non-event).
    pub fn stays_silent(&mut self, wait: Duration) -> bool {
        matches!(self.try_read_line(wait), Line::Timeout)
    }

    /// True if the daemon closes the connection within `timeout` (any pending data is dropped).
    pub fn closed_by_peer(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.eof {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.buf.clear();
            self.fill(left);
        }
        true
    }

    /// Subscribes with extra request members (`{"plugin": ..., "verbose": true}` or `{}`).
    #[track_caller]
    pub fn subscribe(&mut self, extra: Value) {
        let mut request = json!({"cmd": "subscribe"});
        if let (Some(req), Some(more)) = (request.as_object_mut(), extra.as_object()) {
            req.extend(more.clone());
        }
        let resp = self.request(&request);
        assert!(
            resp["status"] == "success" && resp["subscribed"] == true,
            "contract (SPEC §6): subscribe answers success, subscribed true; saw {resp}"
        );
    }

    fn next_event(&mut self, timeout: Duration) -> Option<Value> {
        match self.try_read_line(timeout) {
            Line::Text(line) => Some(parse_object(&line)),
            Line::Eof | Line::Timeout => None,
        }
    }

    /// The first event not handed out yet that matches `pred`, reading more until `timeout`.
    #[track_caller]
    pub fn wait_event(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        if let Some((event, taken)) = self.events.iter_mut().find(|(e, taken)| !*taken && pred(e)) {
            *taken = true;
            return event.clone();
        }
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Some(event) = self.next_event(left) else {
                break;
            };
            let matched = pred(&event);
            self.events.push((event.clone(), matched));
            if matched {
                return event;
            }
        }
        let seen: Vec<&Value> = self
            .events
            .iter()
            .rev()
            .take(40)
            .map(|(e, _)| &e["event"])
            .collect();
        panic!(
            "timed out after {timeout:?} waiting for {what}; last events (newest first): {seen:?}"
        )
    }

    /// Waits for event `name` about `plugin`.
    #[track_caller]
    pub fn wait_named(&mut self, name: &str, plugin: &str) -> Value {
        self.wait_event(TIMEOUT, &format!("event {name} for {plugin}"), |e| {
            is_event(e, name, plugin)
        })
    }

    /// Reads events without keeping them until one matches (for floods of events).
    #[track_caller]
    pub fn skip_until(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        let mut skipped = 0u64;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.next_event(left) {
                Some(event) if pred(&event) => return event,
                Some(_) => skipped += 1,
                None => break,
            }
        }
        panic!("timed out after {timeout:?} waiting for {what} ({skipped} other events read)")
    }

    /// Reads every event arriving within `duration` (proving a non-event).
    pub fn collect_events(&mut self, duration: Duration) {
        let deadline = Instant::now() + duration;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Some(event) = self.next_event(left) else {
                break;
            };
            self.events.push((event, false));
        }
    }

    /// Every event read so far named `name`, whatever it is about.
    pub fn all_named(&self, name: &str) -> Vec<Value> {
        self.events
            .iter()
            .map(|(e, _)| e)
            .filter(|e| e["event"] == name)
            .cloned()
            .collect()
    }

    /// Every event read so far named `name` about `plugin`, in arrival order.
    pub fn named(&self, name: &str, plugin: &str) -> Vec<Value> {
        self.events
            .iter()
            .map(|(e, _)| e)
            .filter(|e| is_event(e, name, plugin))
            .cloned()
            .collect()
    }
}

#[track_caller]
fn parse_object(line: &[u8]) -> Value {
    let text = String::from_utf8_lossy(line);
    let value: Value = serde_json::from_slice(line).unwrap_or_else(|e| {
        panic!(
            "contract (SPEC §6): each response is one JSON object on one line ({e}); saw {text:?}"
        )
    });
    assert!(
        value.is_object(),
        "contract (SPEC §6): a response is a JSON object; saw {text}"
    );
    value
}
