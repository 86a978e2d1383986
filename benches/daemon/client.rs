//! Talking to the daemon's control socket (SPEC §6): request/response on one connection, and an
//! event subscription read by its own thread.
//!
//! Events are stamped with the instant their line was read, in a thread that does nothing but
//! block in `read`, so an event's arrival time is not delayed by whatever the benchmark's main
//! thread is busy with (writing a 50 MB build, say), and a subscriber that reads continuously
//! never makes the daemon drop events (`lagged`).

use std::io::{BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, Receiver};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::Outcome;

/// How long any single reply may take before the benchmark gives up on the daemon.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection used for request/response.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: String,
}

impl Client {
    pub fn connect(socket: &Path) -> Outcome<Client> {
        let stream = UnixStream::connect(socket).map_err(|e| {
            format!(
                "cannot connect to control socket `{}`: {e}",
                socket.display()
            )
        })?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(|e| format!("failed to set a read timeout on the control socket: {e}"))?;
        let writer = stream
            .try_clone()
            .map_err(|e| format!("failed to clone the control socket: {e}"))?;
        Ok(Client {
            reader: BufReader::new(stream),
            writer,
            line: String::new(),
        })
    }

    /// Sends one JSON request and returns the daemon's reply, whatever its `status`.
    pub fn request(&mut self, request: &Value) -> Outcome<Value> {
        self.send(&request.to_string())?;
        let reply = self.read_line()?;
        serde_json::from_str(reply).map_err(|e| format!("reply {reply:?} is not JSON: {e}"))
    }

    /// Sends `{"cmd": CMD}` and returns the reply, or an error naming the daemon's error code.
    pub fn command(&mut self, cmd: &str) -> Outcome<Value> {
        let reply = self.request(&json!({"cmd": cmd}))?;
        match reply["status"].as_str() {
            Some("success") => Ok(reply),
            _ => Err(format!("`{cmd}` was answered with {reply}")),
        }
    }

    /// Sends one request line; `line` has no newline.
    pub fn send(&mut self, line: &str) -> Outcome<()> {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        self.writer
            .write_all(&bytes)
            .map_err(|e| format!("failed to send {line} to the daemon: {e}"))
    }

    /// Reads one line (without its newline); an error at end of stream or after `REPLY_TIMEOUT`.
    pub fn read_line(&mut self) -> Outcome<&str> {
        self.line.clear();
        match self.reader.read_line(&mut self.line) {
            Ok(0) => Err("the daemon closed the control connection".into()),
            Ok(_) => Ok(self.line.trim_end_matches('\n')),
            Err(e) => Err(format!("no reply from the daemon: {e}")),
        }
    }

    /// The write half, for benchmarks that pipeline requests from another thread.
    pub fn try_clone_writer(&self) -> Outcome<UnixStream> {
        self.writer
            .try_clone()
            .map_err(|e| format!("failed to clone the control socket: {e}"))
    }
}

/// One event line and the instant it was read.
#[derive(Debug)]
pub struct Event {
    pub at: Instant,
    pub body: Value,
}

impl Event {
    /// The event's `event` member, or `""`.
    pub fn name(&self) -> &str {
        self.text("event")
    }

    /// The event's `plugin` member, or `""`.
    pub fn plugin(&self) -> &str {
        self.text("plugin")
    }

    /// A string member of the event, or `""`.
    pub fn text(&self, key: &str) -> &str {
        self.body[key].as_str().unwrap_or("")
    }
}

/// A `subscribe` connection whose lines a background thread forwards, stamped, to a channel.
pub struct EventStream {
    events: Receiver<Event>,
    stream: UnixStream,
    reader: Option<JoinHandle<()>>,
}

impl EventStream {
    pub fn subscribe(socket: &Path) -> Outcome<EventStream> {
        let mut client = Client::connect(socket)?;
        let ack = client.command("subscribe")?;
        if ack["subscribed"] != json!(true) {
            return Err(format!("`subscribe` was answered with {ack}"));
        }
        let stream = client.try_clone_writer()?;
        stream
            .set_read_timeout(None)
            .map_err(|e| format!("failed to clear the read timeout of a subscriber: {e}"))?;
        let (sender, events) = mpsc::channel();
        let mut lines = client.reader;
        let reader = std::thread::spawn(move || {
            let mut line = String::new();
            loop {
                line.clear();
                match lines.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let at = Instant::now();
                let Ok(body) = serde_json::from_str(&line) else {
                    continue;
                };
                if sender.send(Event { at, body }).is_err() {
                    return;
                }
            }
        });
        Ok(EventStream {
            events,
            stream,
            reader: Some(reader),
        })
    }

    /// The next event, or `None` once `deadline` has passed without one.
    pub fn next_before(&self, deadline: Instant) -> Option<Event> {
        let wait = deadline.saturating_duration_since(Instant::now());
        // Timeout or the reader thread gone (daemon closed the connection): no event either way.
        self.events.recv_timeout(wait).ok()
    }

    /// The first event satisfying `wanted` before `deadline`; other events are passed to `seen`.
    pub fn wait_for(
        &self,
        deadline: Instant,
        what: &str,
        mut wanted: impl FnMut(&Event) -> bool,
        mut seen: impl FnMut(&Event),
    ) -> Outcome<Event> {
        while let Some(event) = self.next_before(deadline) {
            if wanted(&event) {
                return Ok(event);
            }
            seen(&event);
        }
        Err(format!("timed out waiting for {what}"))
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        // Unblocks the reader thread's `read` so it can be joined.
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}
