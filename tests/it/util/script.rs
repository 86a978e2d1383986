//! What a test puts on disk for the daemon: installers of builds (atomic rename or in place),
//! the POSIX `sh` test plugin `Script`, and the `hotreload.toml` builder `Config`.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::{Value, json};

use super::{DEBOUNCE_MS, MAX_RETRIES, RETRY_DELAY_MS, STARTUP_GRACE_MS, STOP_TIMEOUT_MS};
use super::{random_hex, sh_quote};

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
    pub(super) label: String,
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
