//! One daemon per benchmark: its own directory tree, config file and process, started through the
//! command line of SPEC §2 and stopped (SIGTERM, then SIGKILL) when dropped.
//!
//! Nothing is shared between benchmarks, so one benchmark's leftovers (snapshots, a daemon that
//! would not die) cannot colour the next one's figures. Every wait polls a condition against a
//! deadline; no fixed sleep stands in for synchronisation.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::Outcome;
use crate::client::{Client, EventStream};
use crate::plugin::{self, SLEEP_ARGS};

/// How often a wait re-checks its condition.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Environment variables that would override the command line or config file (SPEC §3), or
/// make the daemon talk to a service manager; none may leak from the bench's own environment.
const SCRUBBED_ENV: [&str; 12] = [
    "HOTRELOAD_CONFIG",
    "HOTRELOAD_ENABLED",
    "HOTRELOAD_DEBOUNCE_MS",
    "HOTRELOAD_WATCH",
    "HOTRELOAD_SOCKET",
    "RUST_LOG",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// The keys of `hotreload.toml` a benchmark chooses; everything else keeps its default.
#[derive(Debug, Clone)]
pub struct Config {
    pub debounce_ms: u64,
    pub startup_grace_ms: u64,
    pub max_clients: u32,
    /// The arguments every plugin runs with (`sleep`'s `1000` by default).
    pub args: Vec<String>,
    /// More `[hot_reload]` lines, verbatim (`watch_mode = "poll"`).
    pub hot_reload_extra: String,
}

impl Config {
    /// A config where every plugin in `ids` runs with `args` (`sleep 1000` by default) and a
    /// failed reload is not retried (a failure is counted, not waited out through backoff).
    pub fn to_toml(&self, ids: &[String]) -> String {
        let mut text = format!(
            "[hot_reload]\ndebounce_delay_ms = {}\nmax_retries = 0\n{}\n\
             [supervisor]\nstartup_grace_ms = {}\nstop_timeout_ms = 2000\n\n\
             [control]\nmax_clients = {}\n",
            self.debounce_ms, self.hot_reload_extra, self.startup_grace_ms, self.max_clients
        );
        let args: Vec<String> = self.args.iter().map(|arg| format!("{arg:?}")).collect();
        for id in ids {
            text.push_str(&format!("\n[plugins.{id}]\nargs = [{}]\n", args.join(", ")));
        }
        text
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            debounce_ms: 100,
            startup_grace_ms: 50,
            max_clients: 256,
            args: SLEEP_ARGS.iter().map(|arg| (*arg).to_owned()).collect(),
            hot_reload_extra: String::new(),
        }
    }
}

/// The directories and files of one benchmark's daemon.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
    pub plugins: PathBuf,
    pub runtime: PathBuf,
    pub state: PathBuf,
    /// Where builds are written before being renamed into a plugin dir; not watched.
    pub staging: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub stderr: PathBuf,
}

impl Layout {
    /// Creates a fresh tree `<bench root>/<name>/`.
    pub fn create(bench_root: &Path, name: &str) -> Outcome<Layout> {
        let root = bench_root.join(name);
        if root.exists() {
            fs::remove_dir_all(&root)
                .map_err(|e| format!("failed to clear `{}`: {e}", root.display()))?;
        }
        let layout = Layout {
            plugins: root.join("plugins"),
            runtime: root.join("runtime"),
            state: root.join("state"),
            staging: root.join("staging"),
            socket: root.join("control.sock"),
            config: root.join("hotreload.toml"),
            stderr: root.join("daemon.stderr"),
            root,
        };
        for dir in [
            &layout.plugins,
            &layout.runtime,
            &layout.state,
            &layout.staging,
        ] {
            fs::create_dir_all(dir)
                .map_err(|e| format!("failed to create `{}`: {e}", dir.display()))?;
        }
        // sun_path holds 108 bytes including the terminating NUL.
        if layout.socket.as_os_str().len() > 107 {
            return Err(format!(
                "socket path `{}` is too long for a Unix socket; set HOTRELOAD_BENCH_DIR to a \
                 shorter directory",
                layout.socket.display()
            ));
        }
        Ok(layout)
    }

    /// Puts the state dir in `base` instead (`<base>/hotreload-bench-<pid>-<name>-state`), to
    /// measure the daemon with its fsync'd state writes on another file system such as tmpfs.
    /// Dropping the daemon removes it with the rest of the tree.
    pub fn with_state_in(mut self, base: &Path) -> Outcome<Layout> {
        let name = self.root.file_name().map_or_else(
            || "bench".into(),
            |name| name.to_string_lossy().into_owned(),
        );
        let state = base.join(format!(
            "hotreload-bench-{}-{name}-state",
            std::process::id()
        ));
        if state.exists() {
            fs::remove_dir_all(&state)
                .map_err(|e| format!("failed to clear `{}`: {e}", state.display()))?;
        }
        fs::create_dir_all(&state)
            .map_err(|e| format!("failed to create `{}`: {e}", state.display()))?;
        let _ = fs::remove_dir(&self.state);
        self.state = state;
        Ok(self)
    }

    /// The executable of plugin `id`: `<plugins>/<id>/<id>` (the default `exec`).
    pub fn exec(&self, id: &str) -> PathBuf {
        self.plugins.join(id).join(id)
    }

    /// Creates the dir of plugin `id` with `bytes` as its first build.
    pub fn install(&self, id: &str, bytes: &[u8]) -> Outcome<()> {
        let dir = self.plugins.join(id);
        fs::create_dir_all(&dir)
            .map_err(|e| format!("failed to create `{}`: {e}", dir.display()))?;
        plugin::write_executable(&self.exec(id), bytes).map(drop)
    }
}

/// A running `hotreloadd`; dropping it stops the daemon and removes its tree.
pub struct Daemon {
    child: Child,
    pub layout: Layout,
}

impl Daemon {
    /// Writes the config for `ids` (whose plugin dirs must already exist) and starts the daemon;
    /// returns once its control socket answers `status`.
    pub fn start(
        binary: &Path,
        layout: Layout,
        config: &Config,
        ids: &[String],
    ) -> Outcome<Daemon> {
        fs::write(&layout.config, config.to_toml(ids))
            .map_err(|e| format!("failed to write `{}`: {e}", layout.config.display()))?;
        let stderr = File::create(&layout.stderr)
            .map_err(|e| format!("failed to create `{}`: {e}", layout.stderr.display()))?;
        let mut command = Command::new(binary);
        command
            .arg("--config")
            .arg(&layout.config)
            .arg("--plugins-dir")
            .arg(&layout.plugins)
            .arg("--runtime-dir")
            .arg(&layout.runtime)
            .arg("--state-dir")
            .arg(&layout.state)
            .arg("--socket")
            .arg(&layout.socket)
            .current_dir(&layout.root)
            .env("HOTRELOAD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for name in SCRUBBED_ENV {
            command.env_remove(name);
        }
        let child = command
            .spawn()
            .map_err(|e| format!("failed to start `{}`: {e}", binary.display()))?;
        let mut daemon = Daemon { child, layout };
        daemon.wait_until(
            Duration::from_secs(10),
            "the control socket to answer",
            |d| {
                Ok(Client::connect(&d.layout.socket)
                    .and_then(|mut client| client.command("status"))
                    .is_ok())
            },
        )?;
        Ok(daemon)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn client(&self) -> Outcome<Client> {
        Client::connect(&self.layout.socket)
    }

    pub fn subscribe(&self) -> Outcome<EventStream> {
        EventStream::subscribe(&self.layout.socket)
    }

    /// Waits until `status` counts `count` plugins running; returns how long that took.
    pub fn wait_plugins_running(&mut self, count: u64, timeout: Duration) -> Outcome<Duration> {
        let start = Instant::now();
        let what = format!("{count} plugins running");
        let mut client = self.client()?;
        self.wait_until(timeout, &what, |_| {
            let status = client.command("status")?;
            Ok(status["daemon"]["plugins_running"].as_u64() == Some(count))
        })?;
        Ok(start.elapsed())
    }

    /// Polls `done` until it holds, the daemon dies, or `timeout` passes.
    pub fn wait_until(
        &mut self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&Daemon) -> Outcome<bool>,
    ) -> Outcome<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.ensure_alive()?;
            if done(self).unwrap_or(false) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "timed out after {timeout:?} waiting for {what}{}",
                    self.stderr_tail()
                ));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// An error when the daemon has exited, with the end of its stderr.
    pub fn ensure_alive(&mut self) -> Outcome<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "the daemon exited ({status}){}",
                self.stderr_tail()
            )),
            Err(e) => Err(format!("failed to check on the daemon: {e}")),
        }
    }

    /// The last lines of the daemon's stderr, formatted to end an error message.
    fn stderr_tail(&self) -> String {
        let text = fs::read_to_string(&self.layout.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(5)..].join("\n  ");
        if tail.is_empty() {
            format!("; its stderr `{}` is empty", self.layout.stderr.display())
        } else {
            format!(
                "; its stderr `{}` ends with:\n  {tail}",
                self.layout.stderr.display()
            )
        }
    }

    /// SIGTERM (a clean stop, SPEC §7), SIGKILL after 10 s; the exit is reaped.
    fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let pid = Pid::from_raw(self.pid());
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        eprintln!("daemon {pid} ignored SIGTERM for 10 s; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        if std::env::var_os("HOTRELOAD_BENCH_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.layout.root);
            if !self.layout.state.starts_with(&self.layout.root) {
                let _ = fs::remove_dir_all(&self.layout.state);
            }
        }
    }
}

/// Lays out `ids` as plugins running build 0 of `builds`, then starts a daemon on them.
pub fn start_with_plugins(
    binary: &Path,
    layout: Layout,
    config: &Config,
    ids: &[String],
    builds: &mut plugin::Builds,
) -> Outcome<Daemon> {
    let first = builds.build(0).to_vec();
    for id in ids {
        layout.install(id, &first)?;
    }
    Daemon::start(binary, layout, config, ids)
}

/// Checks that the generated config is valid TOML with the keys meant; run by
/// `cargo test --bench daemon`.
pub fn self_check() -> Result<(), String> {
    let config = Config {
        debounce_ms: 0,
        startup_grace_ms: 1,
        max_clients: 2000,
        hot_reload_extra: "watch_mode = \"poll\"\n".into(),
        ..Config::default()
    };
    let text = config.to_toml(&plugin::ids(2));
    let table: toml::Table = toml::from_str(&text).map_err(|e| format!("{e}\n{text}"))?;
    let checks = [
        (
            &table["hot_reload"]["debounce_delay_ms"],
            toml::Value::Integer(0),
        ),
        (
            &table["supervisor"]["startup_grace_ms"],
            toml::Value::Integer(1),
        ),
        (&table["control"]["max_clients"], toml::Value::Integer(2000)),
        (
            &table["hot_reload"]["watch_mode"],
            toml::Value::String("poll".into()),
        ),
        (
            &table["plugins"]["p0001"]["args"],
            toml::Value::Array(vec![toml::Value::String("1000".into())]),
        ),
    ];
    for (got, want) in checks {
        if *got != want {
            return Err(format!("config has {got} where {want} was meant:\n{text}"));
        }
    }
    Ok(())
}
