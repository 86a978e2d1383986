//! Shared harness of the black-box tests: a per-test `Daemon` fixture living in its own temp dir,
//! a JSON-lines control `Client`, POSIX `sh` test plugins (`Script`), build installers, process
//! probes and polling helpers.
//!
//! The tests talk to `hotreloadd` and `hotreloadctl` only through their contract (SPEC §2–§8):
//! command line, `hotreload.toml`, environment, files, the control socket, signals, processes.
//! Everything is per test (own dir, own socket, own daemon) so tests run in parallel, and nothing
//! sleeps to synchronise: waits poll a condition until a deadline. Only tests proving that
//! something does *not* happen wait a bounded quiet period (`Daemon::prove_quiet`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr, sockopt};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// Timing knobs of the default test config: small so the suite runs fast.
pub const DEBOUNCE_MS: u64 = 50;
pub const RETRY_DELAY_MS: u64 = 50;
pub const MAX_RETRIES: u64 = 2;
pub const STOP_TIMEOUT_MS: u64 = 1000;
pub const STARTUP_GRACE_MS: u64 = 150;
/// How long a wait for something that must happen may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// How long a single request may take to be answered.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Exit codes of SPEC §7 and §8 (sysexits).
pub const EX_USAGE: i32 = 64;
pub const EX_UNAVAILABLE: i32 = 69;
pub const EX_OSERR: i32 = 71;
pub const EX_CONFIG: i32 = 78;

const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Environment variable that keeps every test dir, failed or not.
const KEEP_ENV: &str = "HOTRELOAD_KEEP_TMP";

pub fn daemon_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hotreloadd")
}

pub fn ctl_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hotreloadctl")
}

// ------------------------------------------------------------------------------------------------
// Polling

/// The bounded wait used only to prove a non-event: 3 × debounce + 500 ms.
pub fn quiet_period(debounce_ms: u64) -> Duration {
    Duration::from_millis(3 * debounce_ms + 500)
}

/// Polls `probe` until it returns `Some` or `timeout` passes; `None` on timeout.
pub fn poll_until<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Polls `probe` until it returns `Some`; fails the test after `timeout`.
#[track_caller]
pub fn wait_until<T>(timeout: Duration, what: &str, probe: impl FnMut() -> Option<T>) -> T {
    match poll_until(timeout, probe) {
        Some(value) => value,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

// ------------------------------------------------------------------------------------------------
// Small pure helpers

/// A fresh random hex string (`2 * bytes` digits), unique per process, call and time.
pub fn random_hex(bytes: usize) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let seed = format!(
        "{}-{}-{nanos}-{:?}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        thread::current().id()
    );
    blake3::hash(seed.as_bytes()).to_hex()[..2 * bytes].to_string()
}

/// The version the daemon must report for an executable: first 16 hex digits of its BLAKE3.
pub fn expected_version(content: &[u8]) -> String {
    blake3::hash(content).to_hex()[..16].to_string()
}

/// Quotes a string for POSIX `sh`.
pub fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`: RFC 3339 with milliseconds, UTC (SPEC §6 event `time`).
pub fn is_rfc3339_millis_utc(text: &str) -> bool {
    let b = text.as_bytes();
    let digits = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 22];
    let punct = [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (23, b'Z'),
    ];
    b.len() == 24
        && digits.iter().all(|&i| b[i].is_ascii_digit())
        && punct.iter().all(|&(i, c)| b[i] == c)
}

/// True if `text` gives line `line` and column `column` in one of the usual notations.
pub fn mentions_line_and_column(text: &str, line: u32, column: u32) -> bool {
    let lower = text.to_lowercase();
    [
        format!(":{line}:{column}"),
        format!("line {line}, column {column}"),
        format!("line {line} column {column}"),
        format!("line {line}, col {column}"),
        format!("line {line}:{column}"),
    ]
    .iter()
    .any(|form| lower.contains(form.as_str()))
}

#[track_caller]
pub fn assert_success<'a>(resp: &'a Value, what: &str) -> &'a Value {
    assert_eq!(
        resp["status"], "success",
        "contract (SPEC §6): {what} answers status success; saw {resp}"
    );
    resp
}

#[track_caller]
pub fn assert_error<'a>(resp: &'a Value, code: &str, what: &str) -> &'a Value {
    assert!(
        resp["status"] == "error" && resp["code"] == code,
        "contract (SPEC §6): {what} answers status error, code {code:?}; saw {resp}"
    );
    assert!(
        resp["error"].as_str().is_some_and(|e| !e.is_empty()),
        "contract (SPEC §6): error responses carry a human message in 'error'; saw {resp}"
    );
    resp
}

/// True if the event is `name` about plugin `plugin`.
pub fn is_event(event: &Value, name: &str, plugin: &str) -> bool {
    event["event"] == name && event["plugin"] == plugin
}

// ------------------------------------------------------------------------------------------------
// Builds

/// Writes a temp file beside `path` (named `.hotreload-test-*`, so it never counts), fsyncs it,
/// sets `mode` and renames it over `path`: how a careful build tool installs.
pub fn install_atomic(path: &Path, content: &[u8], mode: u32) {
    let dir = path.parent().expect("an executable path has a parent dir");
    fs::create_dir_all(dir).unwrap();
    let tmp = dir.join(format!(".hotreload-test-{}", random_hex(6)));
    let mut file = File::create(&tmp).unwrap();
    file.write_all(content).unwrap();
    file.sync_all().unwrap();
    drop(file);
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// Truncates and rewrites the existing inode, as a compiler or linker may do. Fails the test with
/// the contract when the file is busy: the daemon must run a snapshot, never this file.
#[track_caller]
pub fn install_in_place(path: &Path, content: &[u8]) {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| {
            panic!(
                "contract (SPEC §4 snapshots): {} can be overwritten in place while its plugin \
                 runs (no ETXTBSY); saw {e}",
                path.display()
            )
        });
    file.write_all(content).unwrap();
}

/// What a test plugin does at start and on SIGTERM.
#[derive(Clone, Copy, Debug, PartialEq)]
enum OnTerm {
    /// Appends `stop <label> <pid>` to the log and exits 0.
    LogAndExit,
    /// Ignores SIGTERM (only SIGKILL ends it).
    Ignore,
}

/// How a test plugin ends once it is up.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ending {
    /// Waits for signals forever.
    Wait,
    /// Exits with `code` after `ms` milliseconds.
    ExitAfter { ms: u64, code: i32 },
    /// Replaces itself with `sleep`: one process, no children, no SIGTERM trap.
    ExecSleep,
}

/// A POSIX `sh` test plugin with a version label. It records what it was given in files of the
/// test dir (`env-`, `cwd-`, `fds-`, `stdin-`, `signals-`, `seen-state-` `<id>-<pid>`) and logs
/// `start <label> <pid>`, `ready <label> <pid>` and `stop <label> <pid>` to `log-<id>.txt`.
#[derive(Clone, Debug)]
pub struct Script {
    label: String,
    exit_now: Option<i32>,
    on_term: OnTerm,
    grandchild: bool,
    runtime_json: Option<String>,
    stdout: Vec<String>,
    stderr: Vec<String>,
    flood: u32,
    shell: Vec<String>,
    ending: Ending,
}

/// Records, before anything else, what the plugin was given: signal mask and ignored signals
/// (read with builtins only, so it is the plugin's own view), stdin, open fds (`ls` lists its own
/// inherited fds plus the one it opens on the directory), environment, cwd, state file.
const SCRIPT_PROLOGUE: &str = r#"LOG="$ROOT/log-$ID.txt"
while IFS= read -r line; do
  case "$line" in SigBlk:*|SigIgn:*) printf '%s\n' "$line" ;; esac
done </proc/$$/status >"$ROOT/signals-$ID-$$.txt"
readlink /proc/$$/fd/0 >"$ROOT/stdin-$ID-$$.txt"
ls -l /proc/self/fd >"$ROOT/fds-$ID-$$.txt"
env >"$ROOT/env-$ID-$$.txt"
pwd -P >"$ROOT/cwd-$ID-$$.txt"
if [ -n "$HOTRELOAD_STATE_FILE" ] && [ -f "$HOTRELOAD_STATE_FILE" ]; then
  cp "$HOTRELOAD_STATE_FILE" "$ROOT/seen-state-$ID-$$.json"
fi
"#;

impl Script {
    /// A well-behaved plugin: logs its life, stops on SIGTERM, otherwise runs forever.
    pub fn new(label: &str) -> Self {
        assert!(
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "test bug: labels are plain words"
        );
        Script {
            label: label.to_string(),
            exit_now: None,
            on_term: OnTerm::LogAndExit,
            grandchild: false,
            runtime_json: None,
            stdout: Vec::new(),
            stderr: Vec::new(),
            flood: 0,
            shell: Vec::new(),
            ending: Ending::Wait,
        }
    }

    /// Exits with `code` right after logging its start (a broken build or a crash loop).
    pub fn exit_now(mut self, code: i32) -> Self {
        self.exit_now = Some(code);
        self
    }

    /// A build that passes the pre-flight check but exits 3 at once.
    pub fn broken(self) -> Self {
        self.exit_now(3)
    }

    pub fn ignore_term(mut self) -> Self {
        self.on_term = OnTerm::Ignore;
        self
    }

    /// Forks a grandchild in its process group; its pid goes to `grandchild-<id>.pid`.
    pub fn grandchild(mut self) -> Self {
        self.grandchild = true;
        self
    }

    /// Writes `value` to `$HOTRELOAD_RUNTIME_FILE` at start.
    pub fn runtime_json(mut self, value: &Value) -> Self {
        self.runtime_json = Some(value.to_string());
        self
    }

    pub fn stdout(mut self, line: &str) -> Self {
        self.stdout.push(line.to_string());
        self
    }

    pub fn stderr(mut self, line: &str) -> Self {
        self.stderr.push(line.to_string());
        self
    }

    /// Prints `lines` numbered lines on stdout before it is ready.
    pub fn flood(mut self, lines: u32) -> Self {
        self.flood = lines;
        self
    }

    /// Runs `code` (POSIX `sh`, may use `$ROOT`, `$ID`, `$LOG`) after the output and before it
    /// logs `ready`.
    pub fn shell(mut self, code: &str) -> Self {
        self.shell.push(code.to_string());
        self
    }

    pub fn exit_after(mut self, ms: u64, code: i32) -> Self {
        self.ending = Ending::ExitAfter { ms, code };
        self
    }

    /// Ends as a single `sleep` process: nothing of it can outlive it.
    pub fn exec_sleep(mut self) -> Self {
        self.ending = Ending::ExecSleep;
        self
    }

    /// The script's bytes for plugin `id` of the test dir `root`; unique per call (nonce).
    pub fn render(&self, root: &Path, id: &str) -> Vec<u8> {
        let label = &self.label;
        let mut s = String::from("#!/bin/sh\n");
        let nonce = random_hex(4);
        writeln!(
            s,
            "# hotreload test plugin id={id} label={label} nonce={nonce}"
        )
        .unwrap();
        writeln!(
            s,
            "ROOT={}\nID={}",
            sh_quote(&root.to_string_lossy()),
            sh_quote(id)
        )
        .unwrap();
        s.push_str(SCRIPT_PROLOGUE);
        writeln!(s, "echo \"start {label} $$\" >>\"$LOG\"").unwrap();
        if let Some(code) = self.exit_now {
            writeln!(s, "exit {code}").unwrap();
            return s.into_bytes();
        }
        self.render_body(&mut s);
        s.into_bytes()
    }

    fn render_body(&self, s: &mut String) {
        let label = &self.label;
        match self.on_term {
            OnTerm::LogAndExit => {
                writeln!(s, "trap 'echo \"stop {label} $$\" >>\"$LOG\"; exit 0' TERM").unwrap();
            }
            OnTerm::Ignore => s.push_str("trap '' TERM\n"),
        }
        if let Some(json) = &self.runtime_json {
            let quoted = sh_quote(json);
            writeln!(s, "printf '%s' {quoted} >\"$HOTRELOAD_RUNTIME_FILE\"").unwrap();
        }
        for line in &self.stdout {
            writeln!(s, "echo {}", sh_quote(line)).unwrap();
        }
        for line in &self.stderr {
            writeln!(s, "echo {} >&2", sh_quote(line)).unwrap();
        }
        if self.flood > 0 {
            let n = self.flood;
            writeln!(
                s,
                "i=0; while [ $i -lt {n} ]; do echo \"flood line $i\"; i=$((i+1)); done"
            )
            .unwrap();
        }
        for code in &self.shell {
            writeln!(s, "{code}").unwrap();
        }
        if self.grandchild {
            s.push_str(
                "sh -c 'echo $$ >\"$0/grandchild-$1.pid\"; exec sleep 1000' \"$ROOT\" \"$ID\" &\n",
            );
        }
        writeln!(s, "echo \"ready {label} $$\" >>\"$LOG\"").unwrap();
        match self.ending {
            // `wait` returns as soon as a trapped signal arrives, so SIGTERM is handled at once.
            Ending::Wait => s.push_str("while :; do sleep 1000 & wait $!; done\n"),
            Ending::ExitAfter { ms, code } => {
                let secs = format!("{}.{:03}", ms / 1000, ms % 1000);
                writeln!(s, "sleep {secs} & wait $!\nexit {code}").unwrap();
            }
            Ending::ExecSleep => s.push_str("exec sleep 100000\n"),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Configuration

/// A `hotreload.toml` under construction; `Config::new()` is the fast test config.
#[derive(Clone, Debug)]
pub struct Config {
    table: toml::Table,
}

impl Config {
    /// Debounce 50 ms, retry 50 ms, max_retries 2, stop timeout 1 s, startup grace 150 ms.
    pub fn new() -> Self {
        Config {
            table: toml::Table::new(),
        }
        .set("hot_reload.debounce_delay_ms", json!(DEBOUNCE_MS))
        .set("hot_reload.retry_delay_ms", json!(RETRY_DELAY_MS))
        .set("hot_reload.max_retries", json!(MAX_RETRIES))
        .set("supervisor.stop_timeout_ms", json!(STOP_TIMEOUT_MS))
        .set("supervisor.startup_grace_ms", json!(STARTUP_GRACE_MS))
    }

    /// Sets a dotted key (`"plugins.p1.env"`) to a JSON-described value.
    pub fn set(mut self, dotted: &str, value: Value) -> Self {
        let mut keys: Vec<&str> = dotted.split('.').collect();
        let last = keys.pop().expect("a key has at least one part");
        let mut table = &mut self.table;
        for key in keys {
            let entry = table
                .entry(key.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry
                .as_table_mut()
                .expect("test bug: dotted key crosses a non-table");
        }
        let value = toml::Value::try_from(value).expect("test bug: value not expressible in TOML");
        table.insert(last.to_string(), value);
        self
    }

    pub fn debounce_ms(&self) -> u64 {
        self.table
            .get("hot_reload")
            .and_then(|t| t.get("debounce_delay_ms"))
            .and_then(toml::Value::as_integer)
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or(DEBOUNCE_MS)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(&self.table).expect("a toml::Table always serialises")
    }
}

// ------------------------------------------------------------------------------------------------
// Control client

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

// ------------------------------------------------------------------------------------------------
// Processes

/// The fields of `/proc/<pid>/stat` after the command name: state, ppid, pgrp, ...
pub fn proc_stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// True if `pid` exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    proc_stat_fields(pid).is_some_and(|f| f.first().is_some_and(|s| s != "Z" && s != "X"))
}

pub fn all_pids() -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Live processes whose environment contains `marker` (e.g. `HOTRELOAD_PLUGIN_DIR=<dir>/`).
pub fn processes_with_env(marker: &str) -> Vec<i32> {
    let needle = marker.as_bytes();
    let has_marker = |pid: i32| {
        fs::read(format!("/proc/{pid}/environ"))
            .is_ok_and(|env| env.windows(needle.len()).any(|w| w == needle))
    };
    all_pids()
        .into_iter()
        .filter(|&pid| has_marker(pid) && pid_alive(pid))
        .collect()
}

/// Live direct children of process `ppid`.
pub fn children_of(ppid: i32) -> Vec<i32> {
    let is_child = |pid: i32| {
        proc_stat_fields(pid).is_some_and(|f| f.get(1).is_some_and(|p| *p == ppid.to_string()))
    };
    all_pids()
        .into_iter()
        .filter(|&pid| is_child(pid) && pid_alive(pid))
        .collect()
}

/// Live members of process group `pgid`.
pub fn process_group_members(pgid: i32) -> Vec<i32> {
    let in_group = |pid: i32| {
        proc_stat_fields(pid).is_some_and(|f| f.get(2).is_some_and(|g| *g == pgid.to_string()))
    };
    all_pids()
        .into_iter()
        .filter(|&pid| in_group(pid) && pid_alive(pid))
        .collect()
}

pub fn send_signal(pid: i32, signal: Signal) {
    kill(Pid::from_raw(pid), signal).unwrap();
}

/// Finds `program` on `$PATH`.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Reloads `p1`, whose running build ignores SIGTERM, to a fresh `v2` build and checks the stop
/// escalated to SIGKILL only after `stop_timeout_ms`.
#[track_caller]
pub fn reload_past_the_stop_timeout(d: &mut Daemon) {
    let started = Instant::now();
    let v2 = d.install("p1", &Script::new("v2"));
    d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
    assert!(
        started.elapsed() >= Duration::from_millis(STOP_TIMEOUT_MS),
        "contract (SPEC §3 stop_timeout_ms): SIGKILL only after the stop timeout; took {:?}",
        started.elapsed()
    );
}

/// The real path of `python3` (a pyenv shim would add a shell and a fork to every start), for
/// the tests whose plugins are Python scripts.
pub fn python() -> &'static str {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output();
        let real = out
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|p| !p.is_empty());
        match real.or_else(|| find_program("python3").map(|p| p.display().to_string())) {
            Some(path) => path,
            None => panic!("these tests need python3 on PATH (CI machines have it)"),
        }
    })
}

/// A finished command's exit status and output.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// stdout and stderr together, for "the message names X" checks.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// A running command whose stdout lines are read as they come (`hotreloadctl events`).
pub struct Follow {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Follow {
    fn spawn(mut cmd: Command) -> Follow {
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().expect("stdout was piped");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Follow {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads lines until one matches `pred`; fails after `timeout`.
    #[track_caller]
    pub fn wait_line(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(line) = self.lines.recv_timeout(left) else {
                break;
            };
            self.seen.push(line.clone());
            if pred(&line) {
                return line;
            }
        }
        let status = self.child.try_wait().ok().flatten();
        panic!(
            "timed out after {timeout:?} waiting for {what}; exit {status:?}; lines {:?}",
            self.seen
        )
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------------------------------------
// The daemon fixture

/// How the daemon is launched.
#[derive(Debug)]
struct Launch {
    config_arg: bool,
    dir_args: bool,
    socket_arg: bool,
    cwd: PathBuf,
    /// A `sh -c` script that ends with `exec "$0" "$@"` (the daemon and its arguments).
    wrapper: Option<String>,
    /// A program and its arguments that run the daemon: `PROGRAM ARGS... hotreloadd ...`.
    via_program: Vec<OsString>,
    /// A descriptor handed to the launched process at fd 3 (socket activation), then closed here.
    fd3: Option<OwnedFd>,
    /// Start the daemon with every signal blocked and the usual ones ignored.
    signals_blocked: bool,
}

/// Tests that load the whole machine (a 1 GiB output flood, 200 plugins crashing at once) run
/// alone, so that the timing assertions of the others stay fair on 2 cores: every fixture holds
/// this lock shared for its lifetime, theirs (`Daemon::alone`) exclusively.
static MACHINE: RwLock<()> = RwLock::new(());

/// A fixture's hold on `MACHINE`, released after the daemon has stopped.
enum Turn {
    Shared {
        _guard: RwLockReadGuard<'static, ()>,
    },
    Exclusive {
        _guard: RwLockWriteGuard<'static, ()>,
    },
}

impl Turn {
    fn shared() -> Turn {
        Turn::Shared {
            _guard: MACHINE.read().unwrap_or_else(|e| e.into_inner()),
        }
    }

    fn exclusive() -> Turn {
        Turn::Exclusive {
            _guard: MACHINE.write().unwrap_or_else(|e| e.into_inner()),
        }
    }
}

/// One `hotreloadd` in its own temp dir: `plugins/`, `runtime/`, `state/`, `hotreload.toml`,
/// `control.sock`, `daemon.stderr`. Dropping it stops the daemon (SIGTERM, SIGKILL after 10 s)
/// and fails the test if any plugin process is left; the dir is removed unless the test failed.
pub struct Daemon {
    pub root: PathBuf,
    pub plugins: PathBuf,
    pub runtime: PathBuf,
    pub state: PathBuf,
    pub config_path: PathBuf,
    pub socket: PathBuf,
    pub stderr_path: PathBuf,
    debounce_ms: u64,
    env: BTreeMap<String, OsString>,
    launch: Launch,
    child: Option<Child>,
    /// Dropped after `Drop::drop` has stopped the daemon (fields drop last).
    _turn: Turn,
}

impl Daemon {
    /// A fixture with the fast test config (`Config::new()`).
    pub fn new() -> Daemon {
        Daemon::with_config(&Config::new())
    }

    pub fn with_config(config: &Config) -> Daemon {
        let mut d = Daemon::with_config_text(&config.to_toml());
        d.debounce_ms = config.debounce_ms();
        d
    }

    /// A fixture that runs while no other fixture exists (for tests that load the machine).
    pub fn alone(config: &Config) -> Daemon {
        let mut d = Daemon::with_turn(&config.to_toml(), Turn::exclusive());
        d.debounce_ms = config.debounce_ms();
        d
    }

    /// A fixture whose `hotreload.toml` is exactly `text` (valid or not).
    pub fn with_config_text(text: &str) -> Daemon {
        Daemon::with_turn(text, Turn::shared())
    }

    fn with_turn(text: &str, turn: Turn) -> Daemon {
        let root = make_test_root();
        let d = Daemon {
            plugins: root.join("plugins"),
            runtime: root.join("runtime"),
            state: root.join("state"),
            config_path: root.join("hotreload.toml"),
            socket: root.join("control.sock"),
            stderr_path: root.join("daemon.stderr"),
            debounce_ms: DEBOUNCE_MS,
            env: BTreeMap::new(),
            launch: Launch {
                config_arg: true,
                dir_args: true,
                socket_arg: true,
                cwd: root.clone(),
                wrapper: None,
                via_program: Vec::new(),
                fd3: None,
                signals_blocked: false,
            },
            child: None,
            _turn: turn,
            root,
        };
        for dir in [&d.plugins, &d.runtime, &d.state] {
            fs::create_dir_all(dir).unwrap();
        }
        d.write_config_text(text);
        d
    }

    // -- files

    pub fn write_config(&self, config: &Config) {
        self.write_config_text(&config.to_toml());
    }

    pub fn write_config_text(&self, text: &str) {
        fs::write(&self.config_path, text).unwrap();
    }

    pub fn plugin_dir(&self, id: &str) -> PathBuf {
        self.plugins.join(id)
    }

    pub fn exec_path(&self, id: &str) -> PathBuf {
        self.plugins.join(id).join(id)
    }

    pub fn state_file(&self, id: &str) -> PathBuf {
        self.state.join("plugins").join(id).join("state.json")
    }

    pub fn runtime_file(&self, id: &str) -> PathBuf {
        self.state.join("plugins").join(id).join("runtime.json")
    }

    /// Installs a build of `script` as plugin `id` (atomic rename, mode 0755); returns its bytes.
    pub fn install(&self, id: &str, script: &Script) -> Vec<u8> {
        self.install_mode(id, script, 0o755)
    }

    pub fn install_mode(&self, id: &str, script: &Script, mode: u32) -> Vec<u8> {
        let content = script.render(&self.root, id);
        install_atomic(&self.exec_path(id), &content, mode);
        content
    }

    /// Overwrites plugin `id`'s executable in place with a build of `script`.
    #[track_caller]
    pub fn install_in_place(&self, id: &str, script: &Script) -> Vec<u8> {
        let content = script.render(&self.root, id);
        install_in_place(&self.exec_path(id), &content);
        content
    }

    // -- what the plugins logged

    /// The words of each line of `log-<id>.txt`.
    pub fn log_lines(&self, id: &str) -> Vec<Vec<String>> {
        let text = fs::read_to_string(self.root.join(format!("log-{id}.txt"))).unwrap_or_default();
        text.lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .collect()
    }

    fn logged(&self, id: &str, what: &str, label: Option<&str>) -> Vec<i32> {
        let matches = |l: &Vec<String>| {
            l.len() == 3 && l[0] == what && label.is_none_or(|label| l[1] == label)
        };
        self.log_lines(id)
            .iter()
            .filter(|l| matches(l))
            .filter_map(|l| l[2].parse().ok())
            .collect()
    }

    /// Pids that logged `start` (of `label`, or of any build).
    pub fn starts(&self, id: &str, label: Option<&str>) -> Vec<i32> {
        self.logged(id, "start", label)
    }

    pub fn stops(&self, id: &str, label: Option<&str>) -> Vec<i32> {
        self.logged(id, "stop", label)
    }

    /// Waits until build `label` of `id` has started and reached its main loop; its pid.
    #[track_caller]
    pub fn wait_started(&self, id: &str, label: &str) -> i32 {
        self.wait_started_n(id, label, 1)
    }

    /// Like `wait_started`, for the `n`-th start of that build.
    #[track_caller]
    pub fn wait_started_n(&self, id: &str, label: &str, n: usize) -> i32 {
        let up = || {
            let pid = *self.starts(id, Some(label)).get(n - 1)?;
            self.logged(id, "ready", Some(label))
                .contains(&pid)
                .then_some(pid)
        };
        match poll_until(TIMEOUT, up) {
            Some(pid) => pid,
            None => panic!(
                "timed out waiting for start #{n} of {id} build {label}; log {:?}; list {}",
                self.log_lines(id),
                self.plugin_info(id).unwrap_or_default()
            ),
        }
    }

    /// A file the plugin `id` (process `pid`) wrote at start: `<kind>-<id>-<pid>.txt`.
    #[track_caller]
    pub fn plugin_record(&self, kind: &str, id: &str, pid: i32) -> String {
        let path = self.root.join(format!("{kind}-{id}-{pid}.txt"));
        wait_until(
            TIMEOUT,
            &format!("{} written by the plugin", path.display()),
            || fs::read_to_string(&path).ok(),
        )
    }

    /// The environment plugin process `pid` was started with.
    pub fn plugin_env(&self, id: &str, pid: i32) -> BTreeMap<String, String> {
        let text = self.plugin_record("env", id, pid);
        let pairs = text.lines().filter_map(|l| l.split_once('='));
        pairs.map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// The state file plugin process `pid` found at start, if any.
    pub fn seen_state(&self, id: &str, pid: i32) -> Option<Value> {
        let text =
            fs::read_to_string(self.root.join(format!("seen-state-{id}-{pid}.json"))).ok()?;
        Some(serde_json::from_str(&text).unwrap())
    }

    /// Pid of the grandchild forked by a `Script::grandchild` plugin.
    #[track_caller]
    pub fn grandchild_pid(&self, id: &str) -> i32 {
        let path = self.root.join(format!("grandchild-{id}.pid"));
        wait_until(TIMEOUT, "the grandchild's pid file", || {
            fs::read_to_string(&path).ok()?.trim().parse().ok()
        })
    }

    /// Proves a non-event: waits the quiet period of this daemon's debounce.
    pub fn prove_quiet(&self) {
        thread::sleep(self.quiet_period());
    }

    /// The quiet period of this daemon's debounce (see `quiet_period`).
    pub fn quiet_period(&self) -> Duration {
        quiet_period(self.debounce_ms)
    }

    // -- launching

    pub fn set_env(&mut self, key: &str, value: impl Into<OsString>) {
        self.env.insert(key.to_string(), value.into());
    }

    /// Runs the daemon with no `--config`, dir or `--socket` arguments, in `cwd`.
    pub fn launch_bare(&mut self, cwd: &Path) {
        self.launch.config_arg = false;
        self.launch.dir_args = false;
        self.launch.socket_arg = false;
        self.launch.cwd = cwd.to_path_buf();
    }

    /// Launches the daemon through `sh -c '<prelude>; exec "$0" "$@"'`.
    pub fn launch_via_shell(&mut self, prelude: &str) {
        self.launch.wrapper = Some(format!("{prelude}; exec \"$0\" \"$@\""));
    }

    /// Launches the daemon as `program args... hotreloadd <daemon args>` (e.g. through
    /// `systemd-socket-activate`), with the test environment.
    pub fn launch_via_program(&mut self, program: impl Into<OsString>, args: &[OsString]) {
        self.launch.via_program = std::iter::once(program.into())
            .chain(args.iter().cloned())
            .collect();
    }

    /// Hands `fd` to the next launched process at fd 3, as a service manager passes an activated
    /// socket; the test's own copy is closed once the process is started.
    pub fn pass_fd3(&mut self, fd: OwnedFd) {
        self.launch.fd3 = Some(fd);
    }

    /// Starts the daemon with every signal blocked and SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGPIPE
    /// ignored, as a careless parent (`nohup`, a shell script, a service manager bug) may.
    pub fn launch_with_signals_blocked(&mut self) {
        self.launch.signals_blocked = true;
    }

    /// The environment of every process the tests start: the test's own minus anything that
    /// would change the daemon's behaviour, XDG dirs inside the test dir, debug logs.
    pub fn environment(&self) -> Vec<(OsString, OsString)> {
        let stripped = |k: &str| {
            ["HOTRELOAD_", "LISTEN_", "WATCHDOG_"]
                .iter()
                .any(|p| k.starts_with(p))
                || [
                    "NOTIFY_SOCKET",
                    "RUNTIME_DIRECTORY",
                    "STATE_DIRECTORY",
                    "CONFIGURATION_DIRECTORY",
                    "JOURNAL_STREAM",
                    "RUST_LOG",
                ]
                .contains(&k)
        };
        let mut env: BTreeMap<OsString, OsString> = std::env::vars_os()
            .filter(|(k, _)| !stripped(&k.to_string_lossy()))
            .collect();
        for (key, dir) in [
            ("XDG_CONFIG_HOME", "xdg-config"),
            ("XDG_STATE_HOME", "xdg-state"),
        ] {
            env.insert(key.into(), self.root.join(dir).into());
        }
        env.insert(
            "XDG_RUNTIME_DIR".into(),
            self.root.join("xdg-runtime").into(),
        );
        env.insert("HOTRELOAD_LOG".into(), "debug".into());
        for (key, value) in &self.env {
            env.insert(key.into(), value.clone());
        }
        env.into_iter().collect()
    }

    /// `--config`, `--plugins-dir`, `--runtime-dir`, `--state-dir`, `--socket` as launched.
    pub fn daemon_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        if self.launch.config_arg {
            args.extend(["--config".into(), self.config_path.clone().into()]);
        }
        if self.launch.dir_args {
            args.extend(["--plugins-dir".into(), self.plugins.clone().into()]);
            args.extend(["--runtime-dir".into(), self.runtime.clone().into()]);
            args.extend(["--state-dir".into(), self.state.clone().into()]);
        }
        if self.launch.socket_arg {
            args.extend(["--socket".into(), self.socket.clone().into()]);
        }
        args
    }

    /// A command for `program` with the test environment, cwd = test dir, stdin `/dev/null`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .envs(self.environment())
            .current_dir(&self.root)
            .stdin(Stdio::null());
        cmd
    }

    /// Installs `script` as plugin `id`, starts the daemon and waits until that build runs;
    /// returns the build's bytes and its pid.
    #[track_caller]
    pub fn start_running(&mut self, id: &str, script: &Script) -> (Vec<u8>, i32) {
        let content = self.install(id, script);
        self.start();
        let pid = self.wait_started(id, &script.label);
        self.wait_running(id, &content);
        (content, pid)
    }

    /// Starts the daemon and waits until its socket answers `status`.
    #[track_caller]
    pub fn start(&mut self) {
        self.spawn();
        self.wait_ready();
    }

    pub fn spawn(&mut self) {
        let mut cmd = match (&self.launch.wrapper, self.launch.via_program.split_first()) {
            (Some(script), _) => {
                let mut cmd = self.command("sh");
                cmd.arg("-c").arg(script).arg(daemon_bin());
                cmd
            }
            (None, Some((program, args))) => {
                let mut cmd = self.command(program);
                cmd.args(args).arg(daemon_bin());
                cmd
            }
            (None, None) => self.command(daemon_bin()),
        };
        let stderr = File::options()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .unwrap();
        let stdout = File::options()
            .create(true)
            .append(true)
            .open(self.root.join("daemon.stdout"));
        cmd.args(self.daemon_args()).current_dir(&self.launch.cwd);
        cmd.stdout(stdout.unwrap()).stderr(stderr).process_group(0);
        let fd3 = self.launch.fd3.take();
        if let Some(fd) = &fd3 {
            pass_at_fd3(&mut cmd, fd.as_raw_fd());
        }
        if self.launch.signals_blocked {
            // SAFETY: only async-signal-safe calls (sigprocmask, sigaction) between fork and exec.
            unsafe { cmd.pre_exec(block_and_ignore_signals) };
        }
        self.child = Some(cmd.spawn().unwrap());
        drop(fd3);
    }

    #[track_caller]
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(status) = self.try_exit() {
                panic!(
                    "hotreloadd exited ({status}) before its socket answered\n{}",
                    self.stderr_tail()
                );
            }
            match try_status(&self.socket) {
                Ok(resp) if resp["status"] == "success" => return,
                Ok(resp) => last = resp.to_string(),
                Err(e) => last = e,
            }
            thread::sleep(POLL_INTERVAL);
        }
        panic!(
            "socket {} did not answer status within {TIMEOUT:?} (last: {last})\n{}",
            self.socket.display(),
            self.stderr_tail()
        );
    }

    pub fn pid(&self) -> i32 {
        let child = self
            .child
            .as_ref()
            .expect("test bug: the daemon was not started");
        i32::try_from(child.id()).expect("pids fit in i32")
    }

    pub fn signal(&self, signal: Signal) {
        send_signal(self.pid(), signal);
    }

    /// The daemon's exit status if it has exited (reaped here).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Waits for the daemon to exit; fails after `timeout`.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match poll_until(timeout, || self.try_exit()) {
            Some(status) => status,
            None => panic!(
                "hotreloadd did not exit within {timeout:?}\n{}",
                self.stderr_tail()
            ),
        }
    }

    pub fn stderr_text(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn stderr_tail(&self) -> String {
        let text = self.stderr_text();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(80)..].join("\n");
        format!("--- daemon stderr (last 80 lines) ---\n{tail}\n---")
    }

    // -- control socket

    #[track_caller]
    pub fn client(&self) -> Client {
        Client::connect(&self.socket)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.socket.display()))
    }

    /// One request on a fresh connection.
    #[track_caller]
    pub fn request(&self, request: &Value) -> Value {
        self.client().request(request)
    }

    /// One request on a fresh connection, answered within `timeout` (a `trigger` that waits).
    #[track_caller]
    pub fn request_within(&self, request: &Value, timeout: Duration) -> Value {
        let mut c = self.client();
        c.send(request);
        c.read_json(timeout)
    }

    #[track_caller]
    pub fn status(&self) -> Value {
        let resp = self.request(&json!({"cmd": "status"}));
        assert_success(&resp, "status").clone()
    }

    #[track_caller]
    pub fn list(&self) -> Vec<Value> {
        let resp = self.request(&json!({"cmd": "list"}));
        match assert_success(&resp, "list")["plugins"].as_array() {
            Some(plugins) => plugins.clone(),
            None => panic!("contract (SPEC §6): list answers a 'plugins' array; saw {resp}"),
        }
    }

    /// Plugin `id`'s `list` entry, if listed.
    pub fn plugin_info(&self, id: &str) -> Option<Value> {
        self.list().into_iter().find(|p| p["id"] == id)
    }

    /// Waits until plugin `id`'s `list` entry satisfies `pred`; returns it.
    #[track_caller]
    pub fn wait_plugin(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let found = poll_until(TIMEOUT, || self.plugin_info(id).filter(|p| pred(p)));
        match found {
            Some(info) => info,
            None => panic!(
                "timed out waiting for plugin {id}: {what}; last list entry {:?}; log {:?}",
                self.plugin_info(id),
                self.log_lines(id)
            ),
        }
    }

    #[track_caller]
    pub fn wait_state(&self, id: &str, state: &str) -> Value {
        self.wait_plugin(id, &format!("state {state}"), |p| p["state"] == state)
    }

    /// Waits until plugin `id` runs the build whose bytes are `content`.
    #[track_caller]
    pub fn wait_running(&self, id: &str, content: &[u8]) -> Value {
        let version = expected_version(content);
        self.wait_plugin(id, &format!("running version {version}"), |p| {
            p["state"] == "running" && p["version"] == version.as_str()
        })
    }

    /// Waits until `status` counts at least `n` connected clients (its own included).
    #[track_caller]
    pub fn wait_sessions(&self, n: u64) {
        wait_until(TIMEOUT, &format!("active_sessions >= {n}"), || {
            let sessions = self.status()["hot_reload"]["active_sessions"].as_u64()?;
            (sessions >= n).then_some(())
        });
    }

    // -- other processes

    /// Runs `cmd` to completion (output to files in the test dir); fails after `timeout`.
    #[track_caller]
    pub fn run(&self, mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
        let tag = random_hex(4);
        let out_path = self.root.join(format!("run-{tag}.stdout"));
        let err_path = self.root.join(format!("run-{tag}.stderr"));
        cmd.stdout(File::create(&out_path).unwrap())
            .stderr(File::create(&err_path).unwrap());
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let mut child = cmd.spawn().unwrap();
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            let _ = pipe.write_all(input);
        }
        let status = poll_until(timeout, || child.try_wait().ok().flatten());
        let read = |p: &Path| fs::read_to_string(p).unwrap_or_default();
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {timeout:?}; stdout {:?}; stderr {:?}",
                read(&out_path),
                read(&err_path)
            );
        };
        Output {
            status,
            stdout: read(&out_path),
            stderr: read(&err_path),
        }
    }

    /// Runs another `hotreloadd` with the test environment and `args` until it exits.
    #[track_caller]
    pub fn run_daemon(&self, args: &[OsString]) -> Output {
        let mut cmd = self.command(daemon_bin());
        cmd.args(args);
        self.run(cmd, None, TIMEOUT)
    }

    /// `hotreloadctl --socket <ours> ARGS...`.
    #[track_caller]
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.run(self.ctl_command(args), None, Duration::from_secs(30))
    }

    /// `hotreloadctl --socket <ours> ARGS...` with `input` on stdin.
    #[track_caller]
    pub fn ctl_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        self.run(self.ctl_command(args), Some(input), Duration::from_secs(30))
    }

    /// A `hotreloadctl --socket <ours> ARGS...` command, not yet run.
    pub fn ctl_command(&self, args: &[&str]) -> Command {
        let mut cmd = self.command(ctl_bin());
        cmd.arg("--socket").arg(&self.socket).args(args);
        cmd
    }

    /// Starts `hotreloadctl --socket <ours> ARGS...` and reads its output as it comes.
    pub fn ctl_follow(&self, args: &[&str]) -> Follow {
        let mut cmd = self.ctl_command(args);
        cmd.stderr(
            File::create(self.root.join(format!("follow-{}.stderr", random_hex(4)))).unwrap(),
        );
        Follow::spawn(cmd)
    }

    /// Runs requests as user `nobody` (uid/gid 65534 unless the user database says otherwise)
    /// through a copy of this test binary, whose `control::peer_client_helper` is the client.
    /// `None` when not root (the caller skips).
    pub fn requests_as_nobody(&self, lines: &[&str]) -> Option<Vec<Value>> {
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        let user = nix::unistd::User::from_name("nobody").ok().flatten();
        let (uid, gid) = user.map_or((65534, 65534), |u| (u.uid.as_raw(), u.gid.as_raw()));
        let helper = self.root.join("peer-client");
        fs::copy(std::env::current_exe().unwrap(), &helper).unwrap();
        for path in [&self.root, &helper] {
            fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut cmd = self.command(&helper);
        cmd.args([
            "control::peer_client_helper",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(PEER_SOCKET_ENV, &self.socket)
        .env(PEER_REQUESTS_ENV, lines.join("\n"))
        .uid(uid)
        .gid(gid);
        let out = self.run(cmd, None, TIMEOUT);
        let answers: Vec<Value> = out
            .stdout
            .lines()
            .filter_map(|l| l.strip_prefix(PEER_PREFIX))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            answers.len(),
            lines.len(),
            "peer helper as uid {uid} failed: {out:?}"
        );
        Some(answers)
    }

    /// Live processes started for this test's plugins (grandchildren included).
    pub fn plugin_processes(&self) -> Vec<i32> {
        processes_with_env(&format!("HOTRELOAD_PLUGIN_DIR={}/", self.root.display()))
    }

    /// SIGTERM, then SIGKILL after 10 s; reaps the daemon.
    fn stop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pids fit in i32"));
        let _ = kill(pid, Signal::SIGTERM);
        if poll_until(Duration::from_secs(10), || child.try_wait().ok().flatten()).is_none() {
            eprintln!("hotreloadd ignored SIGTERM for 10 s; sending SIGKILL");
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Makes `fd` the child's fd 3, inheritable across `exec` (`dup2` clears close-on-exec; when `fd`
/// already is 3, the flag is cleared directly).
fn pass_at_fd3(cmd: &mut Command, fd: RawFd) {
    let set_up = move || {
        // SAFETY: between fork and exec only async-signal-safe calls are allowed; dup2 and fcntl
        // are, and they touch nothing but descriptors of this (child) process.
        let result = unsafe {
            if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            }
        };
        if result == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the closure is async-signal-safe (see above) and allocates nothing.
    unsafe {
        cmd.pre_exec(set_up);
    }
}

/// `pre_exec` of `launch_with_signals_blocked`.
fn block_and_ignore_signals() -> io::Result<()> {
    use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, sigprocmask};
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&SigSet::all()), None)?;
    for sig in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGPIPE,
    ] {
        // SAFETY: SIG_IGN installs no handler code; the child execs right after.
        unsafe { nix::sys::signal::signal(sig, SigHandler::SigIgn) }?;
    }
    Ok(())
}

/// Environment variables and output prefix of the `nobody` client (see `requests_as_nobody`).
pub const PEER_SOCKET_ENV: &str = "HRIT_PEER_SOCKET";
pub const PEER_REQUESTS_ENV: &str = "HRIT_PEER_REQUESTS";
pub const PEER_PREFIX: &str = "peer-response: ";

fn try_status(socket: &Path) -> Result<Value, String> {
    let mut c = Client::connect(socket).map_err(|e| e.to_string())?;
    c.send(&json!({"cmd": "status"}));
    match c.try_read_line(Duration::from_secs(1)) {
        Line::Text(line) => serde_json::from_slice(&line).map_err(|e| e.to_string()),
        Line::Eof => Err("connection closed".to_string()),
        Line::Timeout => Err("no answer within 1 s".to_string()),
    }
}

/// A fresh, canonical test dir, short enough for socket paths: `/tmp/hrit-<test>-<rand>`.
fn make_test_root() -> PathBuf {
    let base = std::env::temp_dir();
    let base = if base.as_os_str().len() > 40 {
        PathBuf::from("/tmp")
    } else {
        base
    };
    let name: String = thread::current()
        .name()
        .filter(|n| *n != "main")
        .unwrap_or("test")
        .rsplit("::")
        .next()
        .unwrap_or("test")
        .chars()
        .take(32)
        .collect();
    let root = base.join(format!("hrit-{name}-{}", random_hex(4)));
    fs::create_dir(&root).unwrap();
    root.canonicalize().unwrap()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let failing = thread::panicking();
        self.stop();
        let left = poll_until(Duration::from_secs(3), || {
            let procs = self.plugin_processes();
            procs.is_empty().then_some(())
        });
        let leftovers = if left.is_some() {
            Vec::new()
        } else {
            self.plugin_processes()
        };
        for &pid in &leftovers {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let failed = failing || !leftovers.is_empty();
        if failed || std::env::var_os(KEEP_ENV).is_some() {
            eprintln!(
                "test dir kept: {}\n{}",
                self.root.display(),
                self.stderr_tail()
            );
        } else {
            let _ = fs::remove_dir_all(&self.root);
        }
        // A second panic while unwinding would abort the whole test binary.
        if !leftovers.is_empty() && !failing {
            panic!(
                "contract (SPEC §4, §7): plugin processes left after the daemon stopped: \
                 {leftovers:?} (killed now)"
            );
        }
    }
}
