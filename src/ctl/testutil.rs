//! Test helpers: a tiny fake daemon (a thread on a temporary `UnixListener` that records every
//! request and answers canned JSON lines) and a runner that captures exit code, stdout and stderr.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde_json::Value;

use super::render::Style;
use super::{Io, run};

/// Output style without colours, width limit or local time, with "now" at `now`.
pub(crate) fn plain_style(now: std::time::SystemTime) -> Style {
    Style {
        color: false,
        width: None,
        local_time: false,
        now,
    }
}

/// A fresh, empty directory for one test.
pub(crate) fn temp_dir(name: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("hrctl-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

type Handler = dyn Fn(&Value) -> Vec<String> + Send + Sync;

/// A fake daemon. For each request line it records the parsed request and writes the handler's
/// lines; it closes the connection when the handler returns no lines (a daemon that hangs up) or
/// after answering a `subscribe` (so followers see end of stream).
pub(crate) struct FakeDaemon {
    pub path: PathBuf,
    dir: PathBuf,
    requests: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeDaemon {
    pub(crate) fn answering(
        handler: impl Fn(&Value) -> Vec<String> + Send + Sync + 'static,
    ) -> FakeDaemon {
        let dir = temp_dir("daemon");
        let path = dir.join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let thread = {
            let (requests, stop) = (Arc::clone(&requests), Arc::clone(&stop));
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { return };
                    let (requests, handler) = (Arc::clone(&requests), Arc::clone(&handler));
                    std::thread::spawn(move || serve(conn, &requests, &*handler));
                }
            })
        };
        FakeDaemon {
            path,
            dir,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    /// Every request received so far, in order.
    pub(crate) fn requests(&self) -> Vec<Value> {
        self.requests.lock().unwrap().clone()
    }
}

fn serve(conn: UnixStream, requests: &Mutex<Vec<Value>>, handler: &Handler) {
    let mut writer = conn.try_clone().unwrap();
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        let request: Value = serde_json::from_str(&line).unwrap_or(Value::String(line));
        requests.lock().unwrap().push(request.clone());
        let replies = handler(&request);
        if replies.is_empty() {
            return;
        }
        for reply in replies {
            if writeln!(writer, "{reply}").is_err() {
                return;
            }
        }
        if request["cmd"] == "subscribe" {
            return;
        }
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = UnixStream::connect(&self.path);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What a captured run produced.
#[derive(Debug)]
pub(crate) struct Captured {
    pub code: u8,
    pub out: String,
    pub err: String,
}

/// Runs `hotreloadctl --socket <daemon> ARGS` with `stdin` as its input, not on a terminal.
pub(crate) fn run_capture(args: &[&str], daemon: &FakeDaemon, stdin: &str) -> Captured {
    run_at(args, &daemon.path, stdin)
}

/// Runs `hotreloadctl --socket SOCKET ARGS` with `stdin` as its input, not on a terminal.
pub(crate) fn run_at(args: &[&str], socket: &Path, stdin: &str) -> Captured {
    let mut full: Vec<String> = vec![
        "hotreloadctl".into(),
        "--socket".into(),
        socket.display().to_string(),
    ];
    full.extend(args.iter().map(|a| a.to_string()));
    let mut out: Vec<u8> = Vec::new();
    let mut err: Vec<u8> = Vec::new();
    let mut input = stdin.as_bytes();
    let mut io = Io {
        out: &mut out,
        err: &mut err,
        input: &mut input,
        stdout_tty: false,
        stdin_tty: false,
        width: None,
        no_color: false,
        local_time: false,
    };
    let code = run(full, &mut io);
    Captured {
        code,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    }
}
