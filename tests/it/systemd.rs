//! systemd integration (SPEC §7): the sd_notify messages a fake `NOTIFY_SOCKET` (a datagram
//! socket of the test, by path or in the abstract namespace) receives — `READY=1`, `STATUS=`,
//! `RELOADING=1` + `MONOTONIC_USEC=`, `STOPPING=1`, `WATCHDOG=1` — socket activation (a
//! pre-bound listener at fd 3, and `systemd-socket-activate` when installed), and the journald
//! `<N>` priority prefixes of the log.
//!
//! Messages are read with a deadline, never after a sleep; only the watchdog tests observe a fixed
//! window, because counting pings (or proving there are none) needs one.

use std::fs::{self, File};
use std::io;
use std::os::fd::OwnedFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::util::{
    Config, Daemon, Script, TIMEOUT, children_of, find_program, is_rfc3339_millis_utc, random_hex,
};

/// `WATCHDOG_USEC` of the watchdog tests: pings every 100 ms.
const WATCHDOG_USEC: u64 = 200_000;
/// How long the watchdog tests count pings.
const WATCHDOG_WINDOW: Duration = Duration::from_secs(1);

// ------------------------------------------------------------------------------------------------
// The fake service manager

/// One sd_notify datagram: newline-separated `KEY=VALUE` assignments.
#[derive(Clone, Debug)]
struct Message {
    text: String,
}

impl Message {
    fn value(&self, key: &str) -> Option<&str> {
        self.text
            .lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    fn has(&self, key: &str, value: &str) -> bool {
        self.value(key) == Some(value)
    }

    fn is_ready(&self) -> bool {
        self.has("READY", "1")
    }

    fn is_watchdog(&self) -> bool {
        self.has("WATCHDOG", "1")
    }
}

/// The test's end of `NOTIFY_SOCKET`: every datagram the daemon sent, in arrival order.
struct Notify {
    socket: UnixDatagram,
    seen: Vec<Message>,
    /// How many of `seen` a `wait_for` already went past.
    read: usize,
}

impl Notify {
    /// Binds `notify.sock` in the test dir and points the daemon's `NOTIFY_SOCKET` at it.
    fn bind(d: &mut Daemon) -> Notify {
        let path = d.root.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        d.set_env("NOTIFY_SOCKET", &path);
        Notify::from_socket(socket)
    }

    /// Binds an abstract-namespace name and passes it as `NOTIFY_SOCKET=@name`.
    fn bind_abstract(d: &mut Daemon) -> Notify {
        let name = format!("hotreload-test-notify-{}", random_hex(8));
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        d.set_env("NOTIFY_SOCKET", format!("@{name}"));
        Notify::from_socket(socket)
    }

    fn from_socket(socket: UnixDatagram) -> Notify {
        Notify {
            socket,
            seen: Vec::new(),
            read: 0,
        }
    }

    /// Receives one datagram within `wait` (kept in `seen`).
    fn receive(&mut self, wait: Duration) -> Option<Message> {
        let mut buf = vec![0u8; 65536];
        let wait = wait.max(Duration::from_millis(1));
        self.socket.set_read_timeout(Some(wait)).unwrap();
        match self.socket.recv(&mut buf) {
            Ok(n) => {
                let message = Message {
                    text: String::from_utf8_lossy(&buf[..n]).into_owned(),
                };
                self.seen.push(message.clone());
                Some(message)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
            Err(e) => panic!("receiving on the test's NOTIFY_SOCKET: {e}"),
        }
    }

    /// The next message after the last one `wait_for` returned that matches `pred`; fails the
    /// test after `TIMEOUT`.
    #[track_caller]
    fn wait_for(&mut self, what: &str, pred: impl Fn(&Message) -> bool) -> Message {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            while self.read < self.seen.len() {
                self.read += 1;
                if pred(&self.seen[self.read - 1]) {
                    return self.seen[self.read - 1].clone();
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "timed out after {TIMEOUT:?} waiting for an sd_notify message with {what}; \
                     received {:?}",
                    self.texts()
                );
            }
            self.receive(left);
        }
    }

    /// Receives everything that arrives within `window`.
    fn collect(&mut self, window: Duration) {
        let deadline = Instant::now() + window;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            self.receive(left);
        }
    }

    /// Receives what is already queued, without waiting for more.
    fn drain(&mut self) {
        while self.receive(Duration::from_millis(1)).is_some() {}
    }

    fn texts(&self) -> Vec<&str> {
        self.seen.iter().map(|m| m.text.as_str()).collect()
    }
}

/// CLOCK_MONOTONIC now, in microseconds: the clock `MONOTONIC_USEC=` is read from.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC)");
    let secs = u64::try_from(ts.tv_sec).unwrap();
    let nanos = u64::try_from(ts.tv_nsec).unwrap();
    secs * 1_000_000 + nanos / 1000
}

/// The daemon's one-line summary as it must read for this `status` answer.
fn expected_status_text(status: &Value) -> String {
    let daemon = &status["daemon"];
    let hot = &status["hot_reload"];
    format!(
        "{}/{} plugins running, hot reload {}, {} reloads, {} failed",
        daemon["plugins_running"],
        daemon["plugins_total"],
        if hot["enabled"] == true { "on" } else { "off" },
        hot["reload_count"],
        hot["failed_reloads"]
    )
}

/// Spawns the daemon and waits for its `READY=1`.
#[track_caller]
fn spawn_until_ready(d: &mut Daemon, notify: &mut Notify) -> Message {
    d.spawn();
    notify.wait_for("READY=1", Message::is_ready)
}

// ------------------------------------------------------------------------------------------------
// READY, STATUS

#[test]
fn ready_comes_once_the_socket_answers_and_the_plugins_are_launched() {
    let mut d = Daemon::new();
    let mut notify = Notify::bind(&mut d);
    d.install("p1", &Script::new("v1"));
    let ready = spawn_until_ready(&mut d, &mut notify);
    // Taken at once: the plugin must already be a child of the daemon when READY=1 is sent.
    let children = children_of(d.pid());
    let status = d.status();
    assert_eq!(
        status["daemon"]["pid"],
        json!(d.pid()),
        "the control socket answering right after READY=1 is this daemon's"
    );
    let pid = d.wait_started("p1", "v1");
    assert!(
        children.contains(&pid),
        "contract (SPEC §7): READY=1 once plugins are launched; plugin pid {pid} was not among \
         the daemon's children {children:?} when READY=1 arrived"
    );
    let text = ready.value("STATUS").unwrap_or_default();
    assert!(
        text.contains("/1 plugins running"),
        "contract (SPEC §7): READY=1 carries the STATUS= summary; saw {:?}",
        ready.text
    );
    let readies = notify.seen.iter().filter(|m| m.is_ready()).count();
    assert_eq!(readies, 1, "one READY=1 at start; saw {:?}", notify.texts());
}

#[test]
fn status_is_kept_current_after_reloads_and_switches() {
    let mut d = Daemon::new();
    let mut notify = Notify::bind(&mut d);
    d.install("p1", &Script::new("v1"));
    spawn_until_ready(&mut d, &mut notify);
    // READY=1 may precede the plugin's startup grace; STATUS must catch up without any request.
    notify.wait_for("STATUS=1/1 plugins running, ...", |m| {
        m.value("STATUS")
            .is_some_and(|s| s.starts_with("1/1 plugins running"))
    });

    let v2 = d.install("p1", &Script::new("v2"));
    d.wait_running("p1", &v2);
    let status = d.status();
    assert_eq!(status["hot_reload"]["reload_count"], 1, "{status}");
    let expected = expected_status_text(&status);
    assert!(expected.contains("1 reloads"), "{expected}");
    notify.wait_for(&format!("STATUS={expected}"), |m| {
        m.has("STATUS", &expected)
    });

    d.request(&json!({"cmd": "disable"}));
    let expected = expected_status_text(&d.status());
    assert!(expected.contains("hot reload off"), "{expected}");
    notify.wait_for(&format!("STATUS={expected}"), |m| {
        m.has("STATUS", &expected)
    });
}

// ------------------------------------------------------------------------------------------------
// RELOADING, STOPPING

/// Sends `trigger`'s reload and checks the datagrams: `RELOADING=1` with a current
/// `MONOTONIC_USEC=` in the same datagram, then `READY=1` with a `STATUS=`.
#[track_caller]
fn assert_reload_notifications(notify: &mut Notify, trigger: impl FnOnce()) {
    let before = monotonic_usec();
    trigger();
    let reloading = notify.wait_for("RELOADING=1", |m| m.has("RELOADING", "1"));
    let after = monotonic_usec();
    let usec: u64 = match reloading.value("MONOTONIC_USEC").map(str::parse) {
        Some(Ok(usec)) => usec,
        _ => panic!(
            "contract (SPEC §7): RELOADING=1 and MONOTONIC_USEC= in one datagram; saw {:?}",
            reloading.text
        ),
    };
    assert!(
        (before..=after).contains(&usec),
        "contract: MONOTONIC_USEC is CLOCK_MONOTONIC when the reload starts: {usec} not in \
         [{before}, {after}]"
    );
    let ready = notify.wait_for("READY=1 after RELOADING=1", Message::is_ready);
    assert!(
        ready.value("STATUS").is_some(),
        "READY=1 after a reload carries the STATUS= summary; saw {:?}",
        ready.text
    );
}

#[test]
fn sighup_sends_reloading_with_monotonic_usec_then_ready() {
    let mut d = Daemon::new();
    let mut notify = Notify::bind(&mut d);
    spawn_until_ready(&mut d, &mut notify);

    d.write_config(&Config::new().set("hot_reload.debounce_delay_ms", json!(70)));
    assert_reload_notifications(&mut notify, || d.signal(Signal::SIGHUP));
    let status = d.status();
    assert_eq!(
        status["hot_reload"]["debounce_delay_ms"], 70,
        "the new configuration is applied by READY=1; saw {status}"
    );

    d.write_config(&Config::new().set("hot_reload.debounce_delay_ms", json!(90)));
    assert_reload_notifications(&mut notify, || {
        let resp = d.request(&json!({"cmd": "reload-config"}));
        assert_eq!(resp["status"], "success", "{resp}");
    });
    assert_eq!(d.status()["hot_reload"]["debounce_delay_ms"], 90);
}

#[test]
fn sighup_with_a_broken_config_still_ends_with_ready() {
    let mut d = Daemon::new();
    let mut notify = Notify::bind(&mut d);
    spawn_until_ready(&mut d, &mut notify);

    d.write_config_text("[hot_reload\ndebounce_delay_ms = 70\n");
    assert_reload_notifications(&mut notify, || d.signal(Signal::SIGHUP));
    let status = d.status();
    assert_eq!(
        status["hot_reload"]["debounce_delay_ms"],
        json!(crate::util::DEBOUNCE_MS),
        "contract (SPEC §7): a broken config is rejected and the running one kept; saw {status}"
    );
    assert!(
        d.try_exit().is_none(),
        "the daemon survives a broken config"
    );
}

#[test]
fn sigterm_sends_stopping_and_nothing_after_it_claims_readiness() {
    let mut d = Daemon::new();
    let mut notify = Notify::bind(&mut d);
    d.install("p1", &Script::new("v1"));
    spawn_until_ready(&mut d, &mut notify);
    d.wait_started("p1", "v1");

    d.signal(Signal::SIGTERM);
    notify.wait_for("STOPPING=1", |m| m.has("STOPPING", "1"));
    let exit = d.wait_exit(TIMEOUT);
    assert!(exit.success(), "contract (SPEC §7): exit 0; saw {exit}");
    notify.drain();
    let after_stopping = &notify.seen[notify.read..];
    assert!(
        !after_stopping
            .iter()
            .any(|m| m.is_ready() || m.value("STATUS").is_some_and(|s| s.contains("running"))),
        "nothing after STOPPING=1 may claim readiness or a running summary; saw {:?}",
        notify.texts()
    );
}

#[test]
fn abstract_namespace_notify_socket_works() {
    let mut d = Daemon::new();
    let mut notify = Notify::bind_abstract(&mut d);
    spawn_until_ready(&mut d, &mut notify);
    d.status();
    d.signal(Signal::SIGTERM);
    notify.wait_for("STOPPING=1", |m| m.has("STOPPING", "1"));
    assert!(d.wait_exit(TIMEOUT).success());
}

// ------------------------------------------------------------------------------------------------
// WATCHDOG

/// `WATCHDOG=1` pings a daemon started with `env` (and the shell `prelude`, if any) sent.
struct Pings {
    /// In the `WATCHDOG_WINDOW` after `READY=1`.
    in_window: usize,
    /// From start to the end of that window.
    total: usize,
    seen: Vec<String>,
}

fn watchdog_pings(env: &[(&str, &str)], prelude: Option<&str>) -> Pings {
    let mut d = Daemon::new();
    let mut notify = Notify::bind(&mut d);
    for (key, value) in env {
        d.set_env(key, value);
    }
    if let Some(prelude) = prelude {
        d.launch_via_shell(prelude);
    }
    spawn_until_ready(&mut d, &mut notify);
    let before = notify.seen.len();
    notify.collect(WATCHDOG_WINDOW);
    let count = |messages: &[Message]| messages.iter().filter(|m| m.is_watchdog()).count();
    Pings {
        in_window: count(&notify.seen[before..]),
        total: count(&notify.seen),
        seen: notify.texts().into_iter().map(str::to_string).collect(),
    }
}

/// Every 100 ms: about 10 in one second, with room for a loaded machine.
#[track_caller]
fn assert_watchdog_cadence(pings: &Pings) {
    assert!(
        (5..=20).contains(&pings.in_window),
        "contract (SPEC §7): WATCHDOG=1 every WATCHDOG_USEC/2 = 100 ms; {} pings in {:?}: {:?}",
        pings.in_window,
        WATCHDOG_WINDOW,
        pings.seen
    );
}

#[test]
fn watchdog_pings_at_half_watchdog_usec() {
    let usec = WATCHDOG_USEC.to_string();
    assert_watchdog_cadence(&watchdog_pings(&[("WATCHDOG_USEC", &usec)], None));
}

#[test]
fn watchdog_pid_of_the_daemon_itself_pings() {
    // As systemd sets it: WATCHDOG_PID is the main process, the daemon (exec'd by the shell).
    let usec = WATCHDOG_USEC.to_string();
    let pings = watchdog_pings(&[("WATCHDOG_USEC", &usec)], Some("export WATCHDOG_PID=$$"));
    assert_watchdog_cadence(&pings);
}

#[test]
fn watchdog_for_another_pid_sends_no_pings() {
    let usec = WATCHDOG_USEC.to_string();
    let pings = watchdog_pings(&[("WATCHDOG_USEC", &usec), ("WATCHDOG_PID", "1")], None);
    assert_eq!(
        pings.total, 0,
        "WATCHDOG_PID names another process: no pings; saw {:?}",
        pings.seen
    );
}

#[test]
fn no_watchdog_usec_sends_no_pings() {
    let pings = watchdog_pings(&[], None);
    assert_eq!(
        pings.total, 0,
        "no WATCHDOG_USEC: no pings; saw {:?}",
        pings.seen
    );
}

// ------------------------------------------------------------------------------------------------
// Socket activation

/// After the daemon answered on the activated socket `activated` (set as `d.socket`): its own
/// `--socket` path `own` was never bound, plugins see no `LISTEN_*`, and stopping the daemon
/// leaves the activated socket file to whoever created it.
#[track_caller]
fn assert_activated_control_socket(d: &mut Daemon, own: &Path, activated: &Path) {
    let status = d.status();
    assert_eq!(status["daemon"]["pid"], json!(d.pid()), "{status}");
    assert!(
        fs::symlink_metadata(own).is_err(),
        "contract (SPEC §7): with an activated socket the daemon binds no socket of its own; \
         {} exists",
        own.display()
    );
    let pid = d.wait_started("p1", "v1");
    let env = d.plugin_env("p1", pid);
    let leaked: Vec<&String> = env.keys().filter(|k| k.starts_with("LISTEN_")).collect();
    assert!(
        leaked.is_empty(),
        "contract (SPEC §4): plugins never see the daemon's LISTEN_* variables; saw {leaked:?}"
    );
    d.signal(Signal::SIGTERM);
    let exit = d.wait_exit(TIMEOUT);
    assert!(exit.success(), "clean stop; saw {exit}");
    let kept = fs::symlink_metadata(activated).is_ok_and(|m| m.file_type().is_socket());
    assert!(
        kept,
        "the service manager owns the activated socket file {}: the daemon must not unlink it",
        activated.display()
    );
}

#[test]
fn socket_activation_with_a_pre_bound_listener() {
    let mut d = Daemon::new();
    d.install("p1", &Script::new("v1"));
    let activated = d.root.join("activated.sock");
    let listener = UnixListener::bind(&activated).unwrap();
    d.pass_fd3(OwnedFd::from(listener));
    d.set_env("LISTEN_FDS", "1");
    d.set_env("LISTEN_FDNAMES", "control");
    // LISTEN_PID must be the daemon's own pid: the shell exports its pid, then execs the daemon.
    d.launch_via_shell("export LISTEN_PID=$$");
    d.spawn();
    let own = std::mem::replace(&mut d.socket, activated.clone());
    d.wait_ready();
    assert_activated_control_socket(&mut d, &own, &activated);
}

#[test]
fn socket_activation_with_systemd_socket_activate() {
    let Some(program) = find_program("systemd-socket-activate") else {
        eprintln!(
            "skipped: systemd-socket-activate is not installed (apt-get install systemd); \
             the pre-bound listener test covers socket activation"
        );
        return;
    };
    let mut d = Daemon::new();
    d.install("p1", &Script::new("v1"));
    let activated = d.root.join("activated.sock");
    let mut args = vec![
        "--listen".into(),
        activated.clone().into(),
        "--fdname=control".into(),
    ];
    // It starts its child with only the variables passed with -E.
    for (key, value) in d.environment() {
        let mut pair = key;
        pair.push("=");
        pair.push(value);
        args.extend(["-E".into(), pair]);
    }
    d.launch_via_program(program, &args);
    d.spawn();
    let own = std::mem::replace(&mut d.socket, activated.clone());
    // The first connection makes it exec the daemon, which then answers that very connection.
    d.wait_ready();
    assert_activated_control_socket(&mut d, &own, &activated);
}

// ------------------------------------------------------------------------------------------------
// journald

/// Runs a daemon with plugin output and a hot reload (info, debug, plugin lines) and stops it;
/// `journal_stream` picks `JOURNAL_STREAM` from the stderr file's metadata. Returns the stderr.
fn daemon_log(journal_stream: impl FnOnce(&Daemon, &fs::Metadata) -> Option<String>) -> String {
    let mut d = Daemon::new();
    File::create(&d.stderr_path).unwrap();
    let meta = fs::metadata(&d.stderr_path).unwrap();
    if let Some(value) = journal_stream(&d, &meta) {
        d.set_env("JOURNAL_STREAM", value);
    }
    let script = Script::new("v1")
        .stdout("plugin says hello")
        .stderr("plugin warns");
    d.start_running("p1", &script);
    let v2 = d.install("p1", &Script::new("v2"));
    d.wait_running("p1", &v2);
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(TIMEOUT).success());
    let text = d.stderr_text();
    assert!(
        text.contains("hot reload completed"),
        "the log covers a hot reload; saw {text}"
    );
    text
}

/// `<N>` with N a syslog priority, and what follows it.
fn priority_prefix(line: &str) -> Option<(u8, &str)> {
    let rest = line.strip_prefix('<')?;
    let (n, rest) = rest.split_once('>')?;
    let n: u8 = n.parse().ok()?;
    (n <= 7).then_some((n, rest))
}

fn starts_with_timestamp(text: &str) -> bool {
    text.split_whitespace()
        .next()
        .is_some_and(is_rfc3339_millis_utc)
}

#[track_caller]
fn assert_plain_log(text: &str) {
    for line in text.lines() {
        assert!(
            priority_prefix(line).is_none(),
            "contract (SPEC §7): no <N> prefixes unless stderr is the journal; saw {line:?}"
        );
        assert!(
            starts_with_timestamp(line),
            "outside the journal each log line starts with an RFC 3339 timestamp; saw {line:?}"
        );
    }
}

#[test]
fn journal_stream_naming_stderr_gives_priority_prefixes() {
    let text = daemon_log(|_, meta| Some(format!("{}:{}", meta.dev(), meta.ino())));
    let mut priorities = Vec::new();
    for line in text.lines() {
        let Some((n, rest)) = priority_prefix(line) else {
            panic!("contract (SPEC §7): under journald every line starts with <N>; saw {line:?}");
        };
        assert!(
            !starts_with_timestamp(rest),
            "the journal stamps lines itself: no timestamp of our own; saw {line:?}"
        );
        priorities.push(n);
    }
    // HOTRELOAD_LOG=debug in the tests: info and debug lines are both there.
    for n in [6, 7] {
        assert!(
            priorities.contains(&n),
            "a <{n}> line is expected; saw {text}"
        );
    }
}

#[test]
fn no_journal_stream_means_timestamps_and_no_prefixes() {
    let text = daemon_log(|_, _| None);
    assert_plain_log(&text);
}

#[test]
fn journal_stream_naming_another_file_means_no_prefixes() {
    // Inherited from a parent whose stderr was the journal, but ours goes elsewhere.
    let text = daemon_log(|d, _| {
        let other = fs::metadata(&d.config_path).unwrap();
        Some(format!("{}:{}", other.dev(), other.ino()))
    });
    assert_plain_log(&text);
}
