//! A plugin that counts, and keeps its count across hot reloads.
//!
//! This is the smallest plugin that uses the whole state protocol of `hotreloadd` (SPEC §4):
//!
//! - at start it reads `$HOTRELOAD_STATE_FILE` (a PluginState written by the daemon) and resumes
//!   from `runtime_data.count`; its tick interval comes from `configuration.interval_ms`, the
//!   plugin's `config` table in `hotreload.toml`;
//! - on every tick, and once more on SIGTERM, it writes `{"count": n}` to
//!   `$HOTRELOAD_RUNTIME_FILE`; the daemon folds that file into the next instance's
//!   `runtime_data`, so a new build carries on where the old one stopped;
//! - it sends `READY=1` (and a `STATUS=` line per tick) to `$NOTIFY_SOCKET` when one is given,
//!   so it also works with `ready = "notify"`.
//!
//! Try it without the daemon:
//!
//! ```sh
//! echo '{"runtime_data": {"count": 41}, "configuration": {"interval_ms": 200}}' > /tmp/state.json
//! HOTRELOAD_STATE_FILE=/tmp/state.json HOTRELOAD_RUNTIME_FILE=/tmp/runtime.json \
//!     cargo run --example counter
//! ```
//!
//! Change [`STEP`], rebuild and install the new build to see a reload keep the count.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::Duration;

use sd_notify::NotifyState;
use serde::Deserialize;
use serde_json::json;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// How much each tick adds. Edit this, rebuild, and watch the running plugin pick it up.
const STEP: u64 = 1;

/// Tick interval when the plugin's `config` has no `interval_ms`.
const DEFAULT_INTERVAL_MS: u64 = 1000;

/// The parts of PluginState (`state.json`) this plugin reads; serde skips the other fields
/// (`plugin_id`, `last_activity`, `status`), and a field that is missing or `null` reads as its
/// default, as `runtime_data` is before any instance ever wrote one.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PluginState {
    configuration: Option<Configuration>,
    runtime_data: Option<RuntimeData>,
}

/// `[plugins.counter] config = { interval_ms = 250 }` in `hotreload.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Configuration {
    interval_ms: Option<u64>,
}

/// What this plugin writes to `runtime.json`, and so what comes back as `runtime_data`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RuntimeData {
    count: u64,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("counter: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> io::Result<()> {
    let version = std::env::var("HOTRELOAD_VERSION").unwrap_or_else(|_| "dev".to_owned());
    let state = std::env::var_os("HOTRELOAD_STATE_FILE")
        .map(|path| read_state(Path::new(&path)))
        .unwrap_or_default();
    let runtime_file = std::env::var_os("HOTRELOAD_RUNTIME_FILE").map(PathBuf::from);

    let mut count = state.runtime_data.map_or(0, |data| data.count);
    let interval_ms = state
        .configuration
        .and_then(|config| config.interval_ms)
        .unwrap_or(DEFAULT_INTERVAL_MS);
    println!("counter {version} starting at count={count}, step {STEP} every {interval_ms} ms");

    let stop = stop_signals()?;
    // Errors are ignored on purpose: without a NOTIFY_SOCKET this is a no-op, and a daemon that
    // waits for READY=1 reports the missing message better than this plugin could.
    let _ = sd_notify::notify(&[NotifyState::Ready]);

    let interval = Duration::from_millis(interval_ms);
    loop {
        match stop.recv_timeout(interval) {
            Err(RecvTimeoutError::Timeout) => {
                count += STEP;
                println!("counter {version} count={count}");
                let _ = sd_notify::notify(&[NotifyState::Status(&format!("count={count}"))]);
                // A failed save is not worth dying for: the next tick tries again.
                if let Some(path) = &runtime_file {
                    if let Err(e) = save_count(path, count) {
                        eprintln!("counter: {e}");
                    }
                }
            }
            Ok(signal) => {
                // Save before exiting: the daemon reads runtime.json once we are gone, and
                // whatever is in it then is what the next instance starts from.
                let _ = sd_notify::notify(&[NotifyState::Stopping]);
                if let Some(path) = &runtime_file {
                    save_count(path, count)?;
                }
                println!("counter {version} stopping on signal {signal} at count={count}");
                return Ok(());
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(io::Error::other("the signal thread ended unexpectedly"));
            }
        }
    }
}

/// Read the PluginState the daemon left for us. A plugin should start even when the state is
/// unusable (first run, run by hand, a file from an older format): warn and start fresh.
fn read_state(path: &Path) -> PluginState {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return PluginState::default(),
        Err(e) => {
            eprintln!(
                "counter: cannot read {}: {e}; starting from 0",
                path.display()
            );
            return PluginState::default();
        }
    };
    serde_json::from_str(&text).unwrap_or_else(|e| {
        eprintln!(
            "counter: {} is not a PluginState: {e}; starting from 0",
            path.display()
        );
        PluginState::default()
    })
}

/// A channel that receives SIGTERM and SIGINT, so the main loop can wait for "next tick or
/// stop request, whichever comes first" with one `recv_timeout`.
fn stop_signals() -> io::Result<mpsc::Receiver<i32>> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        for signal in signals.forever() {
            if sender.send(signal).is_err() {
                break;
            }
        }
    });
    Ok(receiver)
}

/// Replace `path` with `{"count": count}` so that the daemon, which may read it at any moment,
/// sees either the old or the new content, never a half-written file: write a temp file in the
/// same directory (a rename is atomic only within one file system), flush it to disk, rename it
/// over the target.
fn save_count(path: &Path, count: u64) -> io::Result<()> {
    let mut temp_name = path.file_name().unwrap_or_default().to_owned();
    temp_name.push(format!(".tmp.{}", std::process::id()));
    let temp = path.with_file_name(temp_name);

    let write = || -> io::Result<()> {
        let mut file = fs::File::create(&temp)?;
        serde_json::to_writer(&mut file, &json!({ "count": count }))?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        fs::rename(&temp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&temp);
        io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display()))
    })
}
