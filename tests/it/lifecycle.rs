//! Daemon and plugin life cycle (SPEC §2 defaults, §4 process contract, §7 signals): start with
//! no arguments, what a plugin process is given, its output, plugins appearing and disappearing,
//! and what happens to plugins when the daemon is stopped or killed.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::util::{
    Config, Daemon, Script, TIMEOUT, expected_version, is_event, pid_alive, process_group_members,
    wait_until,
};

#[test]
fn starts_without_arguments_and_supervises_plugins_in_its_cwd() {
    let mut d = Daemon::new();
    let cwd = d.root.join("cwd");
    let runtime = d.root.join("rt");
    d.plugins = cwd.join("plugins");
    d.socket = runtime.join("control.sock");
    // Hermetic even as root: systemd's directory variables win over /run and /var/lib.
    d.set_env("RUNTIME_DIRECTORY", &runtime);
    d.set_env("STATE_DIRECTORY", d.root.join("st"));
    if nix::unistd::geteuid().is_root() && Path::new("/etc/hotreload/hotreload.toml").exists() {
        d.set_env("CONFIGURATION_DIRECTORY", d.root.join("no-conf"));
    }
    fs::create_dir_all(&runtime).unwrap();
    d.install("p1", &Script::new("v1"));
    d.launch_bare(&cwd);
    d.start();
    d.wait_started("p1", "v1");
    d.wait_state("p1", "running");
    let daemon = &d.status()["daemon"];
    let dir = d.plugins.to_string_lossy().into_owned();
    assert_eq!(
        daemon["plugins_dir"], dir,
        "contract (SPEC §2): ./plugins, absolute; saw {daemon}"
    );
}

#[test]
fn plugin_runs_with_the_contract_environment_and_cwd() {
    let mut d = Daemon::with_config(
        &Config::new().set("plugins.p1.env", json!({"PLUGIN_EXTRA": "from-config"})),
    );
    let own_notify = d.root.join("notify.sock");
    let _notify = UnixDatagram::bind(&own_notify).unwrap();
    d.set_env("NOTIFY_SOCKET", &own_notify);
    d.set_env("DAEMON_OWN_VAR", "inherited");
    d.set_env("LISTEN_FDNAMES", "leaked");
    d.set_env("WATCHDOG_PID", "1");
    let (v1, pid) = d.start_running("p1", &Script::new("v1"));
    let env = d.plugin_env("p1", pid);
    let path = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
    let expected = [
        ("HOTRELOAD_PLUGIN_ID", "p1".to_string()),
        ("HOTRELOAD_PLUGIN_DIR", path(d.plugin_dir("p1"))),
        ("HOTRELOAD_VERSION", expected_version(&v1)),
        ("HOTRELOAD_STATE_FILE", path(d.state_file("p1"))),
        ("HOTRELOAD_RUNTIME_FILE", path(d.runtime_file("p1"))),
        ("PLUGIN_EXTRA", "from-config".to_string()),
        ("DAEMON_OWN_VAR", "inherited".to_string()),
    ];
    for (key, value) in expected {
        assert_eq!(
            env.get(key),
            Some(&value),
            "contract (SPEC §4): plugin env {key}"
        );
    }
    let notify = env.get("NOTIFY_SOCKET").cloned().unwrap_or_default();
    assert!(
        !notify.is_empty() && notify != path(own_notify),
        "contract: own NOTIFY_SOCKET"
    );
    for key in ["LISTEN_FDNAMES", "WATCHDOG_PID"] {
        assert!(
            !env.contains_key(key),
            "contract (SPEC §4): {key} is not passed on"
        );
    }
    let cwd = d.plugin_record("cwd", "p1", pid);
    assert_eq!(
        cwd.trim(),
        path(d.plugin_dir("p1")),
        "contract (SPEC §4): cwd = plugin dir"
    );
}

/// File descriptors listed by `ls -l /proc/self/fd` run by the plugin, minus the one `ls` opens
/// on that directory itself.
fn inherited_fds(listing: &str) -> BTreeSet<u32> {
    let entries = listing.lines().filter_map(|l| l.split_once(" -> "));
    entries
        .filter(|(_, target)| !(target.starts_with("/proc/") && target.ends_with("/fd")))
        .filter_map(|(left, _)| left.split_whitespace().last()?.parse().ok())
        .collect()
}

/// Signals 32 and 33 (bits 31, 32 of a `/proc` mask) belong to glibc's threads. glibc's
/// `posix_spawn` leaves them ignored in the processes it starts (cargo starts this test binary
/// that way, so the daemon inherits them) and its `sigaction` refuses to change them: no daemon
/// can be blamed for them.
const GLIBC_INTERNAL_SIGNALS: u64 = 0b11 << 31;

#[test]
fn plugin_gets_dev_null_stdin_no_extra_fds_and_default_signals() {
    let mut d = Daemon::new();
    // Ignored signals survive exec: the daemon must reset them for its plugins.
    d.launch_via_shell("trap '' HUP USR2");
    let (_, pid) = d.start_running("p1", &Script::new("v1"));
    let stdin = d.plugin_record("stdin", "p1", pid);
    assert_eq!(
        stdin.trim(),
        "/dev/null",
        "contract (SPEC §4): stdin is /dev/null"
    );
    let listing = d.plugin_record("fds", "p1", pid);
    let fds = inherited_fds(&listing);
    assert_eq!(
        fds,
        BTreeSet::from([0, 1, 2]),
        "contract (SPEC §4): no daemon fds; {listing}"
    );
    let signals = d.plugin_record("signals", "p1", pid);
    for line in signals.lines() {
        let (name, mask) = line.split_once(':').unwrap_or((line, ""));
        let mask = u64::from_str_radix(mask.trim(), 16).map(|m| m & !GLIBC_INTERNAL_SIGNALS);
        assert_eq!(
            mask,
            Ok(0),
            "contract (SPEC §4): empty {name} in the plugin; saw {signals}"
        );
    }
    assert_eq!(
        signals.lines().count(),
        2,
        "test bug: SigBlk and SigIgn recorded; {signals}"
    );
}

#[test]
fn plugin_output_reaches_the_daemon_log_and_subscribers() {
    let mut d = Daemon::new();
    d.start();
    let mut sub = d.client();
    sub.subscribe(json!({}));
    d.install(
        "p1",
        &Script::new("v1").stdout("hello-out").stderr("hello-err"),
    );
    for (stream, line) in [("stdout", "hello-out"), ("stderr", "hello-err")] {
        let event = sub.wait_event(TIMEOUT, &format!("plugin_output {line}"), |e| {
            is_event(e, "plugin_output", "p1") && e["line"] == line
        });
        assert_eq!(
            event["stream"], stream,
            "contract (SPEC §6): plugin_output stream; {event}"
        );
    }
    wait_until(TIMEOUT, "[p1] lines in the daemon log", || {
        let log = d.stderr_text();
        (log.contains("[p1] hello-out") && log.contains("[p1] hello-err")).then_some(())
    });
}

/// SPEC §4: a plugin's output is logged with its control characters escaped, so a plugin cannot
/// start a line of its own in the daemon's log (`\r`, a bare `\n` inside a chunk, NUL) or drive
/// the terminal that shows it (ANSI escapes). Subscribers still get the exact text.
#[test]
fn plugin_output_cannot_forge_daemon_log_lines() {
    let mut d = Daemon::new();
    d.start();
    let mut sub = d.client();
    sub.subscribe(json!({}));
    let forged = "2026-12-07T00:00:00.000Z ERROR [p2] hot reload failed";
    let script = Script::new("v1").shell(&format!(
        r"printf 'evil\r{forged}\n'; printf 'color\033[2K\033[31mred\000nul\n'"
    ));
    d.install("p1", &script);
    let event = sub.wait_event(TIMEOUT, "plugin_output with the carriage return", |e| {
        is_event(e, "plugin_output", "p1")
            && e["line"].as_str().is_some_and(|l| l.starts_with("evil"))
    });
    assert_eq!(
        event["line"],
        format!("evil\r{forged}"),
        "subscribers get the exact line (JSON escapes it); {event}"
    );
    let log = wait_until(TIMEOUT, "both lines in the daemon log", || {
        let log = d.stderr_text();
        (log.contains("[p1] evil") && log.contains("[p1] color")).then_some(log)
    });
    let expected = format!("[p1] evil\\r{forged}");
    assert!(
        log.contains(&expected),
        "contract (SPEC §4): \\r is escaped in the log; want {expected:?} in:\n{log}"
    );
    assert!(
        log.contains("[p1] color\\x1b[2K\\x1b[31mred\\0nul"),
        "contract (SPEC §4): ESC and NUL are escaped in the log:\n{log}"
    );
    assert!(
        !log.bytes().any(|b| b == b'\r' || b == 0x1b || b == 0),
        "no raw control character reaches the log:\n{log:?}"
    );
}

/// Removes plugin `p1`'s dir and waits until the daemon stopped and forgot it.
#[track_caller]
fn remove_p1_and_wait_forgotten(d: &Daemon, sub: &mut crate::util::Client, pid: i32) {
    fs::remove_dir_all(d.plugin_dir("p1")).unwrap();
    sub.wait_named("plugin_removed", "p1");
    wait_until(TIMEOUT, "the removed plugin's processes to be gone", || {
        (!pid_alive(pid) && process_group_members(pid).is_empty()).then_some(())
    });
    wait_until(TIMEOUT, "p1 to leave the list", || {
        d.plugin_info("p1").is_none().then_some(())
    });
    assert!(
        d.stops("p1", Some("v1")).contains(&pid),
        "contract: stopped gracefully"
    );
}

#[test]
fn new_plugin_dir_is_started_and_a_removed_one_is_stopped() {
    let mut d = Daemon::new();
    d.start();
    let mut sub = d.client();
    sub.subscribe(json!({}));
    let v1 = d.install("p1", &Script::new("v1"));
    sub.wait_named("plugin_added", "p1");
    let pid = d.wait_started("p1", "v1");
    d.wait_running("p1", &v1);
    remove_p1_and_wait_forgotten(&d, &mut sub, pid);
}

#[test]
fn plugin_dir_deleted_and_recreated_is_picked_up_again() {
    let mut d = Daemon::new();
    let (_, pid) = d.start_running("p1", &Script::new("v1"));
    let mut sub = d.client();
    sub.subscribe(json!({}));
    remove_p1_and_wait_forgotten(&d, &mut sub, pid);
    let v2 = d.install("p1", &Script::new("v2"));
    sub.wait_named("plugin_added", "p1");
    d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
}

#[test]
fn sigterm_stops_every_plugin_gracefully_with_state_and_exits_zero() {
    let mut d = Daemon::new();
    d.install("p2", &Script::new("v1"));
    let (_, pid1) = d.start_running("p1", &Script::new("v1").runtime_json(&json!({"n": 1})));
    let pid2 = d.wait_started("p2", "v1");
    d.wait_state("p2", "running");
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(15));
    assert_eq!(
        status.code(),
        Some(0),
        "contract (SPEC §7): exit 0\n{}",
        d.stderr_tail()
    );
    assert!(
        d.stops("p1", None).contains(&pid1),
        "contract: p1 got SIGTERM"
    );
    assert!(
        d.stops("p2", None).contains(&pid2),
        "contract: p2 got SIGTERM"
    );
    assert!(
        !d.socket.exists(),
        "contract (SPEC §7): the socket file is removed"
    );
    wait_until(TIMEOUT, "no plugin process left", || {
        d.plugin_processes().is_empty().then_some(())
    });
    let state: Value = serde_json::from_slice(&fs::read(d.state_file("p1")).unwrap()).unwrap();
    assert_eq!(
        state["runtime_data"],
        json!({"n": 1}),
        "contract: state kept; saw {state}"
    );
}

#[test]
fn sigkill_of_the_daemon_takes_its_plugins_down() {
    let mut d = Daemon::new();
    // Single-process plugins: PR_SET_PDEATHSIG reaches the plugin process itself only.
    d.install("p2", &Script::new("v1").exec_sleep());
    d.start_running("p1", &Script::new("v1").exec_sleep());
    d.wait_started("p2", "v1");
    d.signal(Signal::SIGKILL);
    d.wait_exit(TIMEOUT);
    wait_until(
        TIMEOUT,
        "plugins to die with the daemon (PDEATHSIG)",
        || d.plugin_processes().is_empty().then_some(()),
    );
}

#[test]
fn daemon_raises_its_descriptor_limit_but_plugins_keep_the_inherited_one() {
    let mut d = Daemon::new();
    // Started with a soft limit of 512: the daemon needs more for many plugins, its plugins
    // must see what they would have seen without it.
    d.launch_via_shell("ulimit -S -n 512");
    let script = Script::new("v1").shell("ulimit -S -n > \"$ROOT/nofile-$ID-$$\"");
    let (_, pid) = d.start_running("p1", &script);
    let plugin = fs::read_to_string(d.root.join(format!("nofile-p1-{pid}"))).unwrap();
    assert_eq!(
        plugin.trim(),
        "512",
        "plugins keep the inherited soft limit"
    );
    let limits = fs::read_to_string(format!("/proc/{}/limits", d.pid())).unwrap();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(soft > 512, "the daemon raised its own soft limit; {limits}");
}
