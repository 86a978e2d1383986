//! The per-test `Daemon` fixture: its temp dir, how it is launched, its files, what its plugins
//! logged, its control socket and the other processes a test runs against it, and the teardown
//! that stops it and fails the test if any plugin process is left.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use super::poll::POLL_INTERVAL;
use super::{
    Client, Config, DEBOUNCE_MS, Follow, Line, Output, STOP_TIMEOUT_MS, Script, TIMEOUT,
    assert_success, ctl_bin, daemon_bin, expected_version, install_atomic, install_in_place,
    poll_until, processes_with_env, quiet_period, random_hex, send_signal, wait_until,
};

/// Environment variable that keeps every test dir, failed or not.
const KEEP_ENV: &str = "HOTRELOAD_KEEP_TMP";

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

    /// Starts the daemon in a user namespace of its own whose inotify allows three watches (the
    /// plugins dir, p1 and p2; the machine's limits stay as they are), with plugins p1, p2 and p3
    /// installed, and waits until all three run `v1`: p3's dir is the one with no watch left.
    pub fn start_with_three_inotify_watches(&mut self) {
        let limited = "echo 3 >/proc/sys/user/max_inotify_watches && exec \"$0\" \"$@\"";
        self.launch_via_shell(&format!(
            "exec unshare -U -r sh -c {} \"$0\" \"$@\"",
            super::sh_quote(limited)
        ));
        for id in ["p1", "p2", "p3"] {
            self.install(id, &Script::new("v1"));
        }
        self.start();
        for id in ["p1", "p2", "p3"] {
            self.wait_started(id, "v1");
            self.wait_state(id, "running");
        }
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
