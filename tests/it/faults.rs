//! Fault injection (issue "Prove it"; linux-pitfalls §7): plugins, builds, state files, the file
//! watcher, signals, the clock and the control socket misbehaving at the worst moment.
//!
//! Every case ends by proving that nothing was lost and the daemon still serves: `status` is
//! answered, the plugins run what they should, state files parse and hold the plugin's data, no
//! zombie is left. Faults that need privileges the test may not have (mount namespaces, user
//! namespaces, libfaketime) are injected into the daemon alone, never into the machine, and the
//! test is skipped with a printed reason when they are unavailable.
//!
//! Cases named `slow_*` take more than 10 s each on 2 cores (a 1 GiB output flood, 200 plugins
//! crashing at once); `cargo test -- --skip slow_` leaves them out of a quick run.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::util::{
    Client, Config, Daemon, Line, Script, TIMEOUT, all_pids, assert_error, assert_success,
    expected_version, find_program, install_atomic, is_event, pid_alive, poll_until,
    proc_stat_fields, process_group_members, reload_past_the_stop_timeout, send_signal, wait_until,
};

// ------------------------------------------------------------------------------------------------
// Probes shared by the cases

/// Children of `pid` with their `/proc` state letter.
fn children_of(pid: i32) -> Vec<(i32, String)> {
    let parent = pid.to_string();
    all_pids()
        .into_iter()
        .filter_map(|child| {
            let fields = proc_stat_fields(child)?;
            (fields.get(1)? == &parent).then(|| (child, fields[0].clone()))
        })
        .collect()
}

/// Waits until the daemon has reaped every child that exited (none left in state `Z`).
#[track_caller]
fn wait_no_zombies(d: &Daemon) {
    let pid = d.pid();
    let reaped = poll_until(TIMEOUT, || {
        let zombies: Vec<i32> = children_of(pid)
            .into_iter()
            .filter(|(_, state)| state == "Z")
            .map(|(child, _)| child)
            .collect();
        zombies.is_empty().then_some(())
    });
    assert!(
        reaped.is_some(),
        "contract (SPEC §4): the daemon reaps its children; zombies {:?}",
        children_of(pid)
    );
}

/// Open file descriptors of process `pid`.
fn fd_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

/// Resident memory of process `pid` in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The daemon is alive and answers `status` with success on a fresh connection.
#[track_caller]
fn assert_serving(d: &mut Daemon) -> Value {
    assert!(
        d.try_exit().is_none(),
        "the daemon is still running\n{}",
        d.stderr_tail()
    );
    d.status()
}

/// Temp files of an atomic state write left in `dir` (`.<name>.tmp.<pid>.<n>`).
fn state_temps(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with('.') && name.contains(".tmp."))
        .collect()
}

/// Reads `path` as a PluginState of plugin `id`: whole, valid, no temp file left beside it.
#[track_caller]
fn assert_state_file_intact(path: &Path, id: &str) -> Value {
    let state = assert_state_file_whole(path, id);
    let dir = path.parent().expect("a state file has a dir");
    let temps = state_temps(dir);
    assert!(
        temps.is_empty(),
        "no temp file left beside {}: {temps:?}",
        path.display()
    );
    state
}

/// `state.json` parses as a PluginState of `id` (a temp file beside it is allowed: a daemon killed
/// during a reload may leave the previous content, which its next start removes).
fn assert_state_file_whole(path: &Path, id: &str) -> Value {
    let bytes =
        fs::read(path).unwrap_or_else(|e| panic!("state file {} must exist: {e}", path.display()));
    let state: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "contract (SPEC §4): {} is never torn; {e}: {:?}",
            path.display(),
            String::from_utf8_lossy(&bytes)
        )
    });
    assert_eq!(
        state["plugin_id"], id,
        "contract (SPEC §4): PluginState; saw {state}"
    );
    for key in ["version", "status", "last_activity"] {
        assert!(state[key].is_string(), "PluginState.{key}; saw {state}");
    }
    state
}

/// The plugin's state file, checked with `assert_state_file_intact`.
#[track_caller]
fn assert_state_intact(d: &Daemon, id: &str) -> Value {
    assert_state_file_intact(&d.state_file(id), id)
}

/// The pids of a plugin's `plugin_exited` events read so far.
fn exited_pids(sub: &Client, id: &str) -> Vec<i64> {
    sub.named("plugin_exited", id)
        .iter()
        .filter_map(|e| e["pid"].as_i64())
        .collect()
}

/// True if the `unshare` command can give the daemon a namespace of kind `flags` (e.g. `-m`).
pub(crate) fn unshare_works(flags: &[&str]) -> bool {
    if find_program("unshare").is_none() {
        return false;
    }
    Command::new("unshare")
        .args(flags)
        .arg("true")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub(crate) fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
}

/// Launches the daemon in its own mount namespace after running `setup` (POSIX `sh`, as root of
/// that namespace) there; false (skip) when mount namespaces are unavailable.
pub(crate) fn launch_in_mount_namespace(d: &mut Daemon, setup: &str) -> bool {
    if !nix::unistd::geteuid().is_root() || !unshare_works(&["-m", "--propagation", "private"]) {
        return false;
    }
    let inner = format!("{setup} && exec \"$0\" \"$@\"");
    d.launch_via_shell(&format!(
        "exec unshare -m --propagation private sh -c {} \"$0\" \"$@\"",
        crate::util::sh_quote(&inner)
    ));
    true
}

/// `path` as seen from inside the daemon's mount namespace.
pub(crate) fn in_daemon_ns(d: &Daemon, path: &Path) -> PathBuf {
    let relative = path.strip_prefix("/").unwrap_or(path);
    PathBuf::from(format!("/proc/{}/root", d.pid())).join(relative)
}

// ------------------------------------------------------------------------------------------------
// Plugins dying, resisting or misbehaving at the worst moment

#[test]
fn sigkill_of_the_old_plugin_mid_reload_lets_the_reload_finish() {
    let mut d = Daemon::new();
    let v1 = Script::new("v1")
        .ignore_term()
        .runtime_json(&json!({"n": 1}));
    let (_, old) = d.start_running("p1", &v1);
    let mut sub = d.client();
    sub.subscribe(json!({}));
    let v2 = d.install("p1", &Script::new("v2"));
    sub.wait_named("reload_started", "p1");
    // It ignores SIGTERM: the daemon is waiting for it to go, mid-reload.
    send_signal(old, Signal::SIGKILL);
    let new = d.wait_started("p1", "v2");
    let info = d.wait_running("p1", &v2);
    sub.wait_named("reload_succeeded", "p1");
    assert!(
        info["reload_count"] == 1 && info["restarts"] == 0,
        "one reload, the kill is no crash to restart from; saw {info}"
    );
    let exited = sub.wait_event(TIMEOUT, "plugin_exited of the old pid", |e| {
        is_event(e, "plugin_exited", "p1") && e["pid"] == old
    });
    assert_eq!(exited["signal"], 9, "killed by SIGKILL; saw {exited}");
    let seen = d.seen_state("p1", new).unwrap_or(Value::Null);
    assert_eq!(
        seen["runtime_data"],
        json!({"n": 1}),
        "state carried across; {seen}"
    );
    assert_state_intact(&d, "p1");
    assert_serving(&mut d);
}

#[test]
fn sigkill_of_the_new_plugin_in_its_startup_grace_retries_the_same_build() {
    let config = Config::new().set("supervisor.startup_grace_ms", json!(1500));
    let mut d = Daemon::with_config(&config);
    d.start_running("p1", &Script::new("v1").runtime_json(&json!({"n": 2})));
    let mut sub = d.client();
    sub.subscribe(json!({}));
    let v2 = d.install("p1", &Script::new("v2"));
    let first = d.wait_started("p1", "v2");
    send_signal(first, Signal::SIGKILL);
    let failed = sub.wait_named("reload_failed", "p1");
    assert!(
        failed["attempt"] == 1 && failed["retry_in_ms"] == 50,
        "contract (SPEC §5): a start that dies in its grace is a failed attempt, retried; {failed}"
    );
    let second = d.wait_started_n("p1", "v2", 2);
    let info = d.wait_running("p1", &v2);
    sub.wait_named("reload_succeeded", "p1");
    assert_eq!(info["pid"], second, "the retry runs; saw {info}");
    let seen = d.seen_state("p1", second).unwrap_or(Value::Null);
    assert_eq!(seen["runtime_data"], json!({"n": 2}), "state kept; {seen}");
    assert_state_intact(&d, "p1");
    assert_serving(&mut d);
}

#[test]
fn sigkill_of_the_daemon_mid_reload_then_restart_brings_plugins_and_state_back() {
    let mut d = Daemon::new();
    d.install("p2", &Script::new("v1").exec_sleep());
    // Ignores SIGTERM, so the reload below is still stopping it when the daemon dies.
    let stubborn = Script::new("v1")
        .ignore_term()
        .runtime_json(&json!({"jobs": 7}))
        .exec_sleep();
    let (_, old) = d.start_running("p1", &stubborn);
    d.wait_started("p2", "v1");
    let mut sub = d.client();
    sub.subscribe(json!({}));
    let v2 = d.install("p1", &Script::new("v2").exec_sleep());
    sub.wait_named("reload_started", "p1");
    assert!(pid_alive(old), "test bug: the old instance must still run");
    d.signal(Signal::SIGKILL);
    d.wait_exit(TIMEOUT);
    wait_until(TIMEOUT, "the plugins to die with the daemon", || {
        d.plugin_processes().is_empty().then_some(())
    });
    // Killed mid-reload: the previous content the reload's write exchanged away may still lie
    // beside state.json (hotreloadd(8), Durability); the restart below removes it.
    let state = assert_state_file_whole(&d.state_file("p1"), "p1");
    assert_eq!(
        state["runtime_data"],
        json!({"jobs": 7}),
        "saved before the stop; {state}"
    );
    d.start();
    let pid = d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
    d.wait_started_n("p2", "v1", 2);
    d.wait_state("p2", "running");
    let seen = d.seen_state("p1", pid).unwrap_or(Value::Null);
    assert_eq!(
        seen["runtime_data"],
        json!({"jobs": 7}),
        "contract (SPEC §4): state survives a daemon crash; {seen}"
    );
    assert_state_intact(&d, "p1");
    assert_serving(&mut d);
}

#[test]
fn grandchildren_ignoring_sigterm_are_killed_with_their_group_and_reaped() {
    let mut d = Daemon::new();
    // Three grandchildren, one with a child of its own, all ignoring SIGTERM like the plugin.
    let fork_three = r#"for n in 1 2 3; do
  sh -c 'trap "" TERM; sleep 100000 & echo $! >>"$0/family-$1.pids"; echo $$ >>"$0/family-$1.pids"; while :; do sleep 1; done' "$ROOT" "$ID" &
done"#;
    let build = Script::new("v1").ignore_term().shell(fork_three);
    let (_, old) = d.start_running("p1", &build);
    let family_file = d.root.join("family-p1.pids");
    let family: Vec<i32> = wait_until(TIMEOUT, "six pids of the plugin's family", || {
        let text = fs::read_to_string(&family_file).ok()?;
        let pids: Vec<i32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        (pids.len() == 6).then_some(pids)
    });
    reload_past_the_stop_timeout(&mut d);
    let alive: Vec<i32> = family.iter().copied().filter(|&p| pid_alive(p)).collect();
    assert!(
        alive.is_empty() && process_group_members(old).is_empty(),
        "contract (SPEC §5): the whole group is killed; alive {alive:?}"
    );
    wait_no_zombies(&d);
    assert_serving(&mut d);
}

#[test]
fn grandchild_escaping_with_setsid_is_reaped_by_the_daemon_when_it_exits() {
    let mut d = Daemon::new();
    // It leaves the plugin's process group, so no group signal reaches it; it exits by itself.
    let escape = r#"setsid sh -c 'echo $$ >"$0/escapee-$1.pid"; sleep 1.5' "$ROOT" "$ID" &"#;
    let (_, old) = d.start_running("p1", &Script::new("v1").shell(escape));
    let path = d.root.join("escapee-p1.pid");
    let escapee: i32 = wait_until(TIMEOUT, "the escapee's pid", || {
        fs::read_to_string(&path).ok()?.trim().parse().ok()
    });
    let v2 = d.install("p1", &Script::new("v2"));
    d.wait_running("p1", &v2);
    assert!(!pid_alive(old), "the plugin itself was stopped");
    // Orphaned: the daemon, a child subreaper, is now its parent and must reap it.
    wait_until(TIMEOUT, "the escapee to exit", || {
        (!pid_alive(escapee)).then_some(())
    });
    wait_no_zombies(&d);
    assert!(
        proc_stat_fields(escapee).is_none(),
        "the escapee {escapee} was reaped, not left a zombie"
    );
    assert_serving(&mut d);
}

#[test]
fn plugin_that_daemonizes_and_exits_0_leaves_nothing_behind() {
    let mut d = Daemon::new();
    // The classic double fork: the real work is orphaned, the plugin exits 0 after its grace.
    let daemonize = r#"( sleep 100000 & echo $! >"$ROOT/bg-$ID.pid" )"#;
    d.install("p1", &Script::new("v1").shell(daemonize).exit_after(400, 0));
    d.start();
    d.wait_started("p1", "v1");
    let info = d.wait_state("p1", "stopped");
    let path = d.root.join("bg-p1.pid");
    let bg: i32 = wait_until(TIMEOUT, "the background pid", || {
        fs::read_to_string(&path).ok()?.trim().parse().ok()
    });
    wait_until(
        TIMEOUT,
        "the orphaned background process to be killed",
        || (!pid_alive(bg)).then_some(()),
    );
    wait_no_zombies(&d);
    assert!(
        info["pid"].is_null(),
        "a stopped plugin has no pid; saw {info}"
    );
    assert_eq!(d.starts("p1", None).len(), 1, "exit 0 is not restarted");
    assert_serving(&mut d);
}

#[test]
fn plugin_exiting_the_instant_it_gets_sigterm_is_never_restarted_twice() {
    let mut d = Daemon::new();
    // The default test plugin exits 0 from its TERM trap at once.
    let (v1, _) = d.start_running("p1", &Script::new("v1"));
    let mut sub = d.client();
    sub.subscribe(json!({"plugin": "p1"}));
    const CYCLES: usize = 15;
    for n in 0..CYCLES {
        let resp = d.request_within(
            &json!({"cmd": "trigger", "plugin": "p1"}),
            Duration::from_secs(20),
        );
        assert_eq!(resp["result"]["ok"], true, "trigger succeeded; {resp}");
        // Its trap is set before the next SIGTERM comes.
        d.wait_started_n("p1", "v1", n + 2);
    }
    let info = d.wait_running("p1", &v1);
    assert!(
        info["reload_count"] == CYCLES && info["restarts"] == 0,
        "every stop was expected, no crash restart; saw {info}"
    );
    assert_eq!(
        (d.starts("p1", None).len(), d.stops("p1", None).len()),
        (CYCLES + 1, CYCLES),
        "one start and one graceful stop per trigger"
    );
    sub.collect_events(d.quiet_period());
    let unexpected: Vec<Value> = sub
        .named("plugin_exited", "p1")
        .into_iter()
        .filter(|e| e["expected"] != true)
        .collect();
    assert!(unexpected.is_empty(), "all exits expected: {unexpected:?}");
    assert_eq!(exited_pids(&sub, "p1").len(), CYCLES, "one exit per stop");
    wait_no_zombies(&d);
    assert_state_intact(&d, "p1");
}

#[test]
fn slow_two_hundred_plugins_killed_at_once_are_all_reaped_and_restarted() {
    const N: usize = 200;
    let mut d = Daemon::alone(&Config::new());
    // A tiny plugin (no test prologue): 200 of them start quickly on 2 cores.
    for i in 0..N {
        let id = format!("m{i:03}");
        install_atomic(&d.exec_path(&id), b"#!/bin/sh\nexec sleep 100000\n", 0o755);
    }
    d.spawn();
    // All 200 are launched before the loop first runs: allow that time.
    wait_until(Duration::from_secs(60), "the daemon to answer", || {
        let mut c = Client::connect(&d.socket).ok()?;
        c.send_raw(b"status\n");
        matches!(c.try_read_line(Duration::from_secs(30)), Line::Text(_)).then_some(())
    });
    // The loop handles a whole batch of restarts in one turn: allow it time to answer.
    let mut slowest = Duration::ZERO;
    let mut list = |d: &Daemon| {
        let asked = Instant::now();
        let resp = d.request_within(&json!({"cmd": "list"}), Duration::from_secs(30));
        slowest = slowest.max(asked.elapsed());
        resp["plugins"].as_array().cloned().unwrap_or_default()
    };
    let mut plugins = Vec::new();
    let pids = poll_until(Duration::from_secs(60), || {
        plugins = list(&d);
        let pids: Vec<i64> = plugins
            .iter()
            .filter(|p| p["state"] == "running")
            .filter_map(|p| p["pid"].as_i64())
            .collect();
        (pids.len() == N).then_some(pids)
    });
    let Some(pids) = pids else {
        let other: Vec<&Value> = plugins.iter().filter(|p| p["state"] != "running").collect();
        panic!("200 plugins running; not yet: {other:?}");
    };
    for &pid in &pids {
        send_signal(i32::try_from(pid).unwrap(), Signal::SIGKILL);
    }
    let mut lagging = Vec::new();
    let restarted = poll_until(Duration::from_secs(60), || {
        lagging = list(&d)
            .into_iter()
            .filter(|p| {
                let old_pid = pids.contains(&p["pid"].as_i64().unwrap_or(0));
                p["state"] != "running" || p["restarts"] != 1 || old_pid
            })
            .collect();
        lagging.is_empty().then_some(())
    });
    assert!(
        restarted.is_some(),
        "all 200 restarted once; not yet: {lagging:?}"
    );
    eprintln!("200 simultaneous crashes: slowest list answer {slowest:?}");
    wait_no_zombies(&d);
    let status = assert_serving(&mut d);
    assert_eq!(status["daemon"]["plugins_running"], N, "{status}");
}

#[test]
fn slow_plugin_flooding_1_gib_of_output_never_slows_the_control_socket() {
    let mut d = Daemon::alone(&Config::new());
    // 1 GiB spread over 8000-byte lines, then a marker; the daemon's log would be 1 GiB too.
    d.set_env("HOTRELOAD_LOG", "warn");
    let flood = r#"line=$(head -c 7999 /dev/zero | tr '\0' x)
yes "$line" | head -c 1073741824
echo "flooded $$" >>"$LOG""#;
    d.install("p1", &Script::new("v1").shell(flood));
    d.start();
    let mut client = d.client();
    let mut answered = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    let flooded = |d: &Daemon| {
        d.log_lines("p1")
            .iter()
            .any(|l| l.first().is_some_and(|w| w == "flooded"))
    };
    while !flooded(&d) {
        assert!(Instant::now() < deadline, "the flood did not drain");
        let asked = Instant::now();
        assert_success(&client.request_line("status"), "status during the flood");
        let took = asked.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "status answered within 1 s while flooding; took {took:?}"
        );
        answered += 1;
        thread::sleep(Duration::from_millis(100)); // pacing of the probes, not a wait
    }
    assert!(answered >= 3, "test bug: the flood was over too soon");
    d.wait_started("p1", "v1");
    d.wait_state("p1", "running");
    assert!(
        rss_kib(d.pid()) < 200 * 1024,
        "memory stays bounded: {} KiB",
        rss_kib(d.pid())
    );
    assert_serving(&mut d);
}

#[test]
fn plugin_closing_stdout_and_stderr_keeps_running_and_reloads() {
    let mut d = Daemon::new();
    let (v1, pid) = d.start_running("p1", &Script::new("v1").shell("exec >&- 2>&-"));
    d.prove_quiet();
    let info = d.wait_running("p1", &v1);
    assert_eq!(
        info["pid"], pid,
        "EOF on its output is not an exit; saw {info}"
    );
    let v2 = d.install("p1", &Script::new("v2").shell("exec >&- 2>&-"));
    d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
    assert!(!pid_alive(pid), "the old one stopped");
    assert_serving(&mut d);
}

// ------------------------------------------------------------------------------------------------
// Builds that are not what they seem

/// Runs `p1` v1 with runtime data, lands a bad build with `land`, waits for the daemon to have
/// looked at it (`reload_failed`, or `change_ignored` for a verbose subscriber), checks v1 still
/// runs untouched, then installs a good v3 and checks that it is reloaded normally.
#[track_caller]
fn assert_bad_build_harmless_and_next_good_build_reloads(land: impl FnOnce(&Daemon)) {
    let mut d = Daemon::new();
    let (v1, pid) = d.start_running("p1", &Script::new("v1").runtime_json(&json!({"k": 1})));
    let mut sub = d.client();
    sub.subscribe(json!({"verbose": true}));
    land(&d);
    let seen = sub.wait_event(TIMEOUT, "reload_failed or change_ignored for p1", |e| {
        is_event(e, "reload_failed", "p1") || is_event(e, "change_ignored", "p1")
    });
    d.prove_quiet();
    let info = d.plugin_info("p1").unwrap_or_default();
    assert!(
        info["pid"] == pid
            && info["state"] == "running"
            && info["version"] == expected_version(&v1),
        "the running instance is untouched by a bad build ({seen}); saw {info}"
    );
    assert_eq!(d.starts("p1", None), vec![pid], "nothing else started");
    assert_serving(&mut d);
    // Whatever is at the path now goes; a good build lands and must reload.
    let exec = d.exec_path("p1");
    if exec.is_dir() && !exec.is_symlink() {
        fs::remove_dir_all(&exec).unwrap();
    } else {
        let _ = fs::remove_file(&exec);
    }
    let v3 = d.install("p1", &Script::new("v3"));
    let new = d.wait_started("p1", "v3");
    d.wait_running("p1", &v3);
    let state = d.seen_state("p1", new).unwrap_or(Value::Null);
    assert_eq!(
        state["runtime_data"],
        json!({"k": 1}),
        "state kept: {state}"
    );
    assert_state_intact(&d, "p1");
}

#[test]
fn non_executable_build_is_harmless() {
    assert_bad_build_harmless_and_next_good_build_reloads(|d| {
        d.install_mode("p1", &Script::new("v2"), 0o644);
    });
}

#[test]
fn build_replaced_by_a_directory_is_harmless() {
    assert_bad_build_harmless_and_next_good_build_reloads(|d| {
        let exec = d.exec_path("p1");
        fs::remove_file(&exec).unwrap();
        fs::create_dir(&exec).unwrap();
        // An attribute change of the executable's name makes the daemon look at it.
        fs::set_permissions(&exec, fs::Permissions::from_mode(0o755)).unwrap();
    });
}

#[test]
fn build_replaced_by_a_dangling_symlink_is_harmless() {
    assert_bad_build_harmless_and_next_good_build_reloads(|d| {
        let tmp = d.plugin_dir("p1").join("link.new");
        symlink(d.root.join("nowhere"), &tmp).unwrap();
        fs::rename(&tmp, d.exec_path("p1")).unwrap();
    });
}

#[test]
fn build_replaced_by_a_fifo_never_blocks_the_daemon() {
    assert_bad_build_harmless_and_next_good_build_reloads(|d| {
        let exec = d.exec_path("p1");
        fs::remove_file(&exec).unwrap();
        nix::unistd::mkfifo(&exec, nix::sys::stat::Mode::from_bits_truncate(0o755)).unwrap();
        // mkfifo makes no close-write: an attribute change is what the daemon sees.
        fs::set_permissions(&exec, fs::Permissions::from_mode(0o777)).unwrap();
    });
}

#[test]
fn build_deleted_between_the_event_and_the_snapshot_is_harmless() {
    assert_bad_build_harmless_and_next_good_build_reloads(|d| {
        d.install("p1", &Script::new("v2"));
        // Within the 50 ms debounce: the snapshot finds nothing.
        fs::remove_file(d.exec_path("p1")).unwrap();
    });
}

#[test]
fn truncated_elf_build_never_replaces_the_running_one() {
    let Some(elf) = find_program("sleep").and_then(|p| fs::read(p).ok()) else {
        return skip("truncated_elf_build", "no sleep binary to truncate");
    };
    assert_bad_build_harmless_and_next_good_build_reloads(|d| {
        // A valid ELF header for this machine, but the segments it names are cut off.
        install_atomic(&d.exec_path("p1"), &elf[..elf.len().min(2048)], 0o755);
    });
}

#[test]
fn build_held_open_for_writing_during_a_reload_starts_from_its_snapshot() {
    let mut d = Daemon::new();
    let (_, old) = d.start_running("p1", &Script::new("v1"));
    // A linker still holding the output open (ETXTBSY for anyone who would exec it).
    let v2 = Script::new("v2").render(&d.root, "p1");
    let mut writer = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(d.exec_path("p1"))
        .unwrap();
    writer.write_all(&v2).unwrap();
    writer.flush().unwrap();
    assert_success(&d.request(&json!({"cmd": "disable"})), "disable");
    let resp = d.request_within(
        &json!({"cmd": "trigger", "plugin": "p1"}),
        Duration::from_secs(20),
    );
    assert_eq!(
        resp["result"]["ok"], true,
        "contract (SPEC §4): the snapshot runs, not the busy file; {resp}"
    );
    d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
    assert!(!pid_alive(old));
    drop(writer);
    assert_serving(&mut d);
}

#[test]
fn slow_in_place_write_in_four_chunks_reloads_once_after_the_close_with_debounce_0() {
    let config = Config::new().set("hot_reload.debounce_delay_ms", json!(0));
    let mut d = Daemon::with_config(&config);
    let (_, old) = d.start_running("p1", &Script::new("v1"));
    let mut sub = d.client();
    sub.subscribe(json!({}));
    let v2 = Script::new("v2").render(&d.root, "p1");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(d.exec_path("p1"))
        .unwrap();
    for chunk in v2.chunks(v2.len().div_ceil(4)) {
        file.write_all(chunk).unwrap();
        file.flush().unwrap();
        thread::sleep(Duration::from_millis(200)); // the slow writer itself, not a wait
    }
    drop(file);
    let new = d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
    sub.collect_events(d.quiet_period());
    assert_eq!(
        d.starts("p1", None),
        vec![old, new],
        "no partial build ever ran"
    );
    let started = sub.named("plugin_started", "p1");
    assert_eq!(
        started.len(),
        1,
        "contract (SPEC §5): one reload, after the close; {started:?}"
    );
    assert_eq!(started[0]["version"], expected_version(&v2));
}

#[test]
fn fifty_saves_within_100ms_reload_exactly_once_to_the_last() {
    let config = Config::new().set("hot_reload.debounce_delay_ms", json!(300));
    let mut d = Daemon::with_config(&config);
    let (_, old) = d.start_running("p1", &Script::new("v1"));
    let mut sub = d.client();
    sub.subscribe(json!({}));
    let builds: Vec<Vec<u8>> = (0..50)
        .map(|i| Script::new(&format!("s{i}")).render(&d.root, "p1"))
        .collect();
    let dir = d.plugin_dir("p1");
    let started = Instant::now();
    for (i, build) in builds.iter().enumerate() {
        // An editor's save: write a temp file, rename it over (no fsync, to fit 100 ms).
        let tmp = dir.join(format!(".hotreload-test-save{i}"));
        fs::write(&tmp, build).unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
        fs::rename(&tmp, d.exec_path("p1")).unwrap();
        thread::sleep(Duration::from_millis(2)); // pacing of the burst
    }
    let burst = started.elapsed();
    let new = d.wait_started("p1", "s49");
    d.wait_running("p1", &builds[49]);
    sub.collect_events(d.quiet_period());
    if burst < Duration::from_millis(300) {
        assert_eq!(
            sub.named("reload_started", "p1").len(),
            1,
            "contract (SPEC §5 debounce): one reload for a burst of {burst:?}"
        );
        assert_eq!(d.starts("p1", None), vec![old, new]);
    }
    assert_serving(&mut d);
}

#[test]
fn plugin_dir_deleted_and_recreated_during_a_reload_ends_with_the_new_build() {
    let mut d = Daemon::new();
    let (_, old) = d.start_running("p1", &Script::new("v1").ignore_term());
    let mut sub = d.client();
    sub.subscribe(json!({}));
    d.install("p1", &Script::new("v2"));
    sub.wait_named("reload_started", "p1");
    // The old instance ignores SIGTERM: the reload is stuck stopping it for 1 s. The dir goes,
    // and comes back whole (moved in, as `mv` or a deploy tool does: no event inside it).
    fs::remove_dir_all(d.plugin_dir("p1")).unwrap();
    let staged = d.root.join("staged-p1");
    let v3 = Script::new("v3").render(&d.root, "p1");
    install_atomic(&staged.join("p1"), &v3, 0o755);
    fs::rename(&staged, d.plugin_dir("p1")).unwrap();
    let pid = d.wait_started("p1", "v3");
    let info = d.wait_running("p1", &v3);
    assert_eq!(info["pid"], pid, "{info}");
    d.prove_quiet();
    let info = d.wait_running("p1", &v3);
    assert_eq!(info["pid"], pid, "stays on v3; saw {info}");
    assert!(!pid_alive(old), "the old instance is gone");
    let group = process_group_members(pid);
    let stray: Vec<i32> = d
        .plugin_processes()
        .into_iter()
        .filter(|p| !group.contains(p))
        .collect();
    assert!(stray.is_empty(), "only v3's group runs: stray {stray:?}");
    wait_no_zombies(&d);
    assert_state_intact(&d, "p1");
    assert_serving(&mut d);
}

#[test]
fn executable_deleted_under_a_running_plugin_still_restarts_it_from_the_snapshot() {
    let mut d = Daemon::new();
    let (v1, pid) = d.start_running("p1", &Script::new("v1").exec_sleep());
    fs::remove_file(d.exec_path("p1")).unwrap();
    d.prove_quiet();
    let info = d.wait_running("p1", &v1);
    assert_eq!(info["pid"], pid, "a deleted build stops nothing; {info}");
    send_signal(pid, Signal::SIGKILL);
    let again = d.wait_started_n("p1", "v1", 2);
    let info = d.wait_running("p1", &v1);
    assert_eq!(info["pid"], again, "restarted from the snapshot; {info}");
    assert_serving(&mut d);
}

// ------------------------------------------------------------------------------------------------
// State files

/// Runs `p1` v1 with runtime data {"n": 1}, reloads to a v2 that leaves `runtime.json` in a bad
/// shape (`spoil`, run as the plugin's shell code), reloads to v3 and checks that v3 got
/// {"n": 1}, that a `state_warning` named the file, and that state.json is intact.
#[track_caller]
fn assert_bad_runtime_file_keeps_the_previous_runtime_data(spoil: &str) -> Daemon {
    let mut d = Daemon::new();
    d.start_running("p1", &Script::new("v1").runtime_json(&json!({"n": 1})));
    let mut sub = d.client();
    sub.subscribe(json!({}));
    let v2 = d.install("p1", &Script::new("v2").shell(spoil));
    d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
    let v3 = d.install("p1", &Script::new("v3"));
    let pid = d.wait_started("p1", "v3");
    d.wait_running("p1", &v3);
    let warning = sub.wait_named("state_warning", "p1");
    assert!(
        warning["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("runtime.json")),
        "contract (SPEC §4): the warning names the file; {warning}"
    );
    let seen = d.seen_state("p1", pid).unwrap_or(Value::Null);
    assert_eq!(
        seen["runtime_data"],
        json!({"n": 1}),
        "contract (SPEC §4): the previous runtime_data is kept, never lost; {seen}"
    );
    let state = assert_state_intact(&d, "p1");
    assert_eq!(state["runtime_data"], json!({"n": 1}), "{state}");
    assert_serving(&mut d);
    d
}

#[test]
fn invalid_runtime_json_keeps_the_previous_runtime_data() {
    assert_bad_runtime_file_keeps_the_previous_runtime_data(
        r#"printf '{"n": 2, "broken' >"$HOTRELOAD_RUNTIME_FILE""#,
    );
}

#[test]
fn runtime_json_of_100_mb_is_refused_without_reading_it() {
    let d = assert_bad_runtime_file_keeps_the_previous_runtime_data(
        r#"head -c 104857600 /dev/zero | tr '\0' ' ' >"$HOTRELOAD_RUNTIME_FILE"; echo 1 >>"$HOTRELOAD_RUNTIME_FILE""#,
    );
    assert!(
        rss_kib(d.pid()) < 90 * 1024,
        "the daemon never read it all: {} KiB",
        rss_kib(d.pid())
    );
}

#[test]
fn runtime_json_symlinked_elsewhere_is_never_followed() {
    let d = assert_bad_runtime_file_keeps_the_previous_runtime_data(
        r#"printf '{"stolen": true}' >"$ROOT/victim.json"
ln -sf "$ROOT/victim.json" "$HOTRELOAD_RUNTIME_FILE.new" && mv -f "$HOTRELOAD_RUNTIME_FILE.new" "$HOTRELOAD_RUNTIME_FILE""#,
    );
    assert_eq!(
        fs::read_to_string(d.root.join("victim.json")).unwrap(),
        r#"{"stolen": true}"#,
        "the link target is untouched"
    );
}

#[test]
fn runtime_json_as_a_fifo_never_blocks_the_daemon() {
    assert_bad_runtime_file_keeps_the_previous_runtime_data(
        r#"rm -f "$HOTRELOAD_RUNTIME_FILE"; mkfifo "$HOTRELOAD_RUNTIME_FILE""#,
    );
}

#[test]
fn state_json_replaced_by_a_symlink_is_replaced_not_written_through() {
    let mut d = Daemon::new();
    d.start_running("p1", &Script::new("v1").runtime_json(&json!({"n": 5})));
    let victim = d.root.join("victim.txt");
    fs::write(&victim, "do not touch\n").unwrap();
    let state = d.state_file("p1");
    fs::remove_file(&state).unwrap();
    symlink(&victim, &state).unwrap();
    let v2 = d.install("p1", &Script::new("v2"));
    let pid = d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
    assert_eq!(
        fs::read_to_string(&victim).unwrap(),
        "do not touch\n",
        "never written through a link"
    );
    assert!(
        !fs::symlink_metadata(&state).unwrap().is_symlink(),
        "the link was replaced by a regular file"
    );
    let seen = d.seen_state("p1", pid).unwrap_or(Value::Null);
    assert_eq!(seen["runtime_data"], json!({"n": 5}), "{seen}");
    assert_state_intact(&d, "p1");
    assert_serving(&mut d);
}

#[test]
fn corrupt_state_json_at_start_is_survived_and_rewritten() {
    let mut d = Daemon::new();
    let state = d.state_file("p1");
    fs::create_dir_all(state.parent().unwrap()).unwrap();
    let torn = b"{\"plugin_id\": \"p1\", \"runtime_da";
    fs::write(&state, torn).unwrap();
    let (v1, pid) = d.start_running("p1", &Script::new("v1"));
    let seen = d.seen_state("p1", pid).unwrap_or(Value::Null);
    assert_eq!(
        seen["version"],
        expected_version(&v1),
        "a fresh state: {seen}"
    );
    assert_eq!(seen["runtime_data"], Value::Null, "{seen}");
    assert_state_intact(&d, "p1");
    let path = state.to_string_lossy().into_owned();
    let log = d.stderr_text();
    assert!(
        log.lines().any(|l| l.contains("WARN") && l.contains(&path)),
        "the corrupt file is reported by name\n{}",
        d.stderr_tail()
    );
    // Nothing lost: the unusable file is kept beside the new one, byte for byte.
    let aside: Vec<_> = fs::read_dir(state.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().contains("state.json.invalid-"))
        .collect();
    assert_eq!(aside.len(), 1, "one copy set aside: {aside:?}");
    assert_eq!(fs::read(&aside[0]).unwrap(), torn, "{}", aside[0].display());
    assert!(
        log.contains(&*aside[0].to_string_lossy()),
        "the log says where it went\n{}",
        d.stderr_tail()
    );
    assert_serving(&mut d);
}

#[test]
fn stale_state_temp_files_are_cleaned_at_start() {
    let mut d = Daemon::new();
    let dir = d.state_file("p1").parent().unwrap().to_path_buf();
    fs::create_dir_all(&dir).unwrap();
    // What a crash between create and rename leaves, from an earlier daemon pid.
    for name in [".state.json.tmp.999999.0", ".state.json.tmp.999999.1"] {
        fs::write(dir.join(name), "{\"half").unwrap();
    }
    d.start_running("p1", &Script::new("v1"));
    wait_until(TIMEOUT, "stale temp files removed", || {
        state_temps(&dir).is_empty().then_some(())
    });
    assert_state_intact(&d, "p1");
    assert_serving(&mut d);
}

#[test]
fn full_state_filesystem_keeps_plugins_running_and_state_files_whole() {
    let mut d = Daemon::new();
    let state = d.state.to_string_lossy().into_owned();
    let mount = format!(
        "mount -t tmpfs -o size=64k,mode=0700 hotreload-test {}",
        crate::util::sh_quote(&state)
    );
    if !launch_in_mount_namespace(&mut d, &mount) {
        return skip("full_state_filesystem", "needs root and unshare -m");
    }
    d.install("p1", &Script::new("v1").runtime_json(&json!({"n": 3})));
    d.start();
    d.wait_started("p1", "v1");
    d.wait_state("p1", "running");
    let state_file = in_daemon_ns(&d, &d.state_file("p1"));
    let before = wait_until(TIMEOUT, "the state file of the running v1", || {
        let state: Value = serde_json::from_slice(&fs::read(&state_file).ok()?).ok()?;
        // Written when the instance started (status "starting"); status-only changes are not
        // worth a durable write.
        state["version"].is_string().then_some(state)
    });
    // Fill the file system to the last block.
    let filler = in_daemon_ns(&d, &d.state.join("filler"));
    let mut file = File::create(&filler).unwrap();
    let block = [0u8; 4096];
    while file.write_all(&block).is_ok() {}
    let _ = file.sync_all();
    let mut sub = d.client();
    sub.subscribe(json!({}));
    let v2 = d.install("p1", &Script::new("v2"));
    let pid = d.wait_started("p1", "v2");
    let info = d.wait_running("p1", &v2);
    assert_eq!(info["pid"], pid, "{info}");
    let warning = sub.wait_named("state_warning", "p1");
    assert!(
        warning["error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left on device")),
        "the failure is reported; {warning}"
    );
    let state = assert_state_file_intact(&state_file, "p1");
    assert_eq!(
        state, before,
        "the state file is the last one written whole"
    );
    // Space comes back: the next reload writes the state again, nothing was lost.
    drop(file);
    fs::remove_file(&filler).unwrap();
    let v3 = d.install("p1", &Script::new("v3"));
    d.wait_running("p1", &v3);
    let state = wait_until(TIMEOUT, "the state file of v3", || {
        let state = assert_state_file_intact(&state_file, "p1");
        (state["version"] == expected_version(&v3)).then_some(state)
    });
    assert_eq!(state["runtime_data"], json!({"n": 3}), "{state}");
    assert_serving(&mut d);
}

#[test]
fn read_only_state_dir_keeps_plugins_running_and_reloading() {
    let mut d = Daemon::new();
    // A state file from an earlier run, which must survive untouched.
    let before = json!({"plugin_id": "p1", "configuration": null, "runtime_data": {"old": true},
        "last_activity": "2026-01-01T00:00:00.000Z", "version": "0000000000000000",
        "status": "stopped"});
    let state_path = d.state_file("p1");
    fs::create_dir_all(state_path.parent().unwrap()).unwrap();
    fs::write(&state_path, before.to_string()).unwrap();
    let state = crate::util::sh_quote(&d.state.to_string_lossy());
    let ro = format!("mount --bind {state} {state} && mount -o remount,bind,ro {state}");
    if !launch_in_mount_namespace(&mut d, &ro) {
        return skip("read_only_state_dir", "needs root and unshare -m");
    }
    d.install("p1", &Script::new("v1"));
    d.start();
    let pid = d.wait_started("p1", "v1");
    d.wait_state("p1", "running");
    let seen = d.seen_state("p1", pid).unwrap_or(Value::Null);
    assert_eq!(seen, before, "the plugin read the old state file");
    let v2 = d.install("p1", &Script::new("v2"));
    d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
    let now: Value = serde_json::from_slice(&fs::read(&state_path).unwrap()).unwrap();
    assert_eq!(now, before, "the read-only state file is untouched");
    assert!(
        d.stderr_text().contains("Read-only file system"),
        "the failure is reported\n{}",
        d.stderr_tail()
    );
    assert_serving(&mut d);
}

// ------------------------------------------------------------------------------------------------
// The file watcher

#[test]
fn inotify_watch_limit_reached_still_supervises_every_plugin() {
    // `inotify` fails like before polling existed (under `auto` p3 would be polled instead).
    let mut d = Daemon::with_config(&Config::new().set("hot_reload.watch_mode", json!("inotify")));
    if !unshare_works(&["-U", "-r"]) {
        return skip(
            "inotify_watch_limit",
            "needs unshare -U -r (user namespaces)",
        );
    }
    // p3 and anything later cannot be watched.
    d.start_with_three_inotify_watches();
    let log = d.stderr_text();
    assert!(
        log.contains("max_user_watches"),
        "the error names the limit to raise\n{}",
        d.stderr_tail()
    );
    let status = assert_serving(&mut d);
    assert_eq!(
        status["hot_reload"]["watching_directories"], 3,
        "test bug: the limit should leave p3 unwatched (plugins dir, p1 and p2 watched); {status}"
    );
    // A watched plugin still reloads; the unwatched one still answers a trigger.
    let v2 = d.install("p1", &Script::new("v2"));
    d.wait_running("p1", &v2);
    let v2 = d.install("p3", &Script::new("v2"));
    let resp = d.request_within(
        &json!({"cmd": "trigger", "plugin": "p3"}),
        Duration::from_secs(20),
    );
    assert_eq!(resp["result"]["ok"], true, "{resp}");
    d.wait_running("p3", &v2);
    assert_serving(&mut d);
}

/// Resumes a SIGSTOPped daemon even when the test fails.
struct Resume(i32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0), Signal::SIGCONT);
    }
}

#[test]
fn inotify_queue_overflow_rescans_and_reloads_exactly_the_changed_plugin() {
    let max_queued: usize = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(16384);
    if max_queued > 200_000 {
        return skip("inotify_queue_overflow", "max_queued_events is too large");
    }
    let mut d = Daemon::new();
    d.install("p2", &Script::new("v1"));
    let (_, p1_pid) = d.start_running("p1", &Script::new("v1"));
    let p2_pid = d.wait_started("p2", "v1");
    d.wait_state("p2", "running");
    let mut sub = d.client();
    sub.subscribe(json!({}));
    d.signal(Signal::SIGSTOP);
    let _resume = Resume(d.pid());
    // Each file makes IN_CREATE and IN_DELETE on the plugins dir: the queue overflows.
    for i in 0..max_queued / 2 + 500 {
        let path = d.plugins.join(format!("junk{i}"));
        File::create(&path).unwrap();
        fs::remove_file(&path).unwrap();
    }
    let v2 = d.install("p1", &Script::new("v2"));
    d.signal(Signal::SIGCONT);
    let started = sub.wait_named("reload_started", "p1");
    assert_eq!(
        started["trigger"], "rescan",
        "contract (SPEC §5): IN_Q_OVERFLOW rescans; {started}"
    );
    d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
    sub.collect_events(d.quiet_period());
    assert_eq!(
        sub.named("reload_started", "p1").len(),
        1,
        "one reload of p1"
    );
    assert!(sub.named("reload_started", "p2").is_empty(), "p2 untouched");
    assert_eq!(
        d.starts("p2", None),
        vec![p2_pid],
        "p2 still runs its first instance"
    );
    assert!(!pid_alive(p1_pid));
    assert!(
        d.stderr_text().contains("overflow"),
        "the overflow is logged"
    );
    assert_serving(&mut d);
}

// ------------------------------------------------------------------------------------------------
// Configuration, signals, environment, clock

#[test]
fn config_turned_invalid_in_every_way_under_sighup_keeps_the_running_one() {
    let config = Config::new().set("hot_reload.debounce_delay_ms", json!(60));
    let mut d = Daemon::with_config(&config);
    let (_, pid) = d.start_running("p1", &Script::new("v1"));
    let mut sub = d.client();
    sub.subscribe(json!({}));
    let path = d.config_path.clone();
    let breakages: [(&str, &dyn Fn()); 5] = [
        ("a syntax error", &|| {
            fs::write(&path, "[hot_reload\n").unwrap()
        }),
        ("invalid UTF-8", &|| {
            fs::write(&path, b"\xff\xfe = 1\n").unwrap()
        }),
        ("a wrong type", &|| {
            fs::write(&path, "[hot_reload]\ndebounce_delay_ms = \"fast\"\n").unwrap()
        }),
        ("a directory", &|| {
            fs::remove_file(&path).unwrap();
            fs::create_dir(&path).unwrap();
        }),
        ("deleted", &|| fs::remove_dir(&path).unwrap()),
    ];
    for (what, breakage) in breakages {
        breakage();
        d.signal(Signal::SIGHUP);
        let rejected = sub.wait_event(TIMEOUT, &format!("config_rejected ({what})"), |e| {
            e["event"] == "config_rejected"
        });
        assert!(
            rejected["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {rejected}"
        );
        let status = assert_serving(&mut d);
        assert_eq!(
            status["hot_reload"]["debounce_delay_ms"], 60,
            "contract (SPEC §3): {what}: the running config stays"
        );
    }
    d.write_config(&config.set("hot_reload.debounce_delay_ms", json!(70)));
    d.signal(Signal::SIGHUP);
    sub.wait_event(TIMEOUT, "config_reloaded", |e| {
        e["event"] == "config_reloaded"
    });
    let status = assert_serving(&mut d);
    assert_eq!(status["hot_reload"]["debounce_delay_ms"], 70, "{status}");
    assert_eq!(d.starts("p1", None), vec![pid], "the plugin never noticed");
}

#[test]
fn daemon_started_with_every_signal_blocked_and_ignored_still_handles_them() {
    let mut d = Daemon::new();
    d.launch_with_signals_blocked();
    let (v1, pid) = d.start_running("p1", &Script::new("v1").exec_sleep());
    // SIGCHLD: a crash is noticed and restarted.
    send_signal(pid, Signal::SIGKILL);
    let again = d.wait_started_n("p1", "v1", 2);
    d.wait_running("p1", &v1);
    wait_no_zombies(&d);
    // SIGHUP: the config is re-read.
    let mut sub = d.client();
    sub.subscribe(json!({}));
    d.signal(Signal::SIGHUP);
    sub.wait_event(TIMEOUT, "config_reloaded after SIGHUP", |e| {
        e["event"] == "config_reloaded"
    });
    let signals = d.plugin_record("signals", "p1", again);
    // Bits 31 and 32 are glibc's internal signals (see lifecycle.rs): nobody's doing.
    let clean = signals.lines().all(|l| {
        let mask = l.split_once(':').map_or("", |(_, m)| m.trim());
        u64::from_str_radix(mask, 16).is_ok_and(|m| m & !(0b11 << 31) == 0)
    });
    assert!(
        clean && signals.lines().count() == 2,
        "contract (SPEC §4): the plugin gets an empty mask and default dispositions; {signals}"
    );
    // SIGTERM: a clean stop.
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", d.stderr_tail());
}

#[test]
fn sigterm_during_startup_leaves_no_orphans() {
    for round in 0..8u64 {
        let mut d = Daemon::new();
        for id in ["p1", "p2", "p3"] {
            d.install(id, &Script::new("v1").exec_sleep());
        }
        d.spawn();
        thread::sleep(Duration::from_millis(5 + 10 * round)); // the moment of the fault
        d.signal(Signal::SIGTERM);
        let status = d.wait_exit(Duration::from_secs(15));
        assert!(
            status.code() == Some(0) || status.code().is_none(),
            "round {round}: a clean stop (or death before the handler existed); {status}\n{}",
            d.stderr_tail()
        );
        wait_until(TIMEOUT, "no plugin left", || {
            d.plugin_processes().is_empty().then_some(())
        });
    }
}

#[test]
fn notify_socket_pointing_nowhere_does_not_disturb_the_daemon() {
    for target in [
        "/nonexistent/notify.sock",
        "@hotreload-test-nobody",
        "relative.sock",
    ] {
        let mut d = Daemon::new();
        d.set_env("NOTIFY_SOCKET", target);
        d.set_env("WATCHDOG_USEC", "200000");
        let (_, pid) = d.start_running("p1", &Script::new("v1"));
        let v2 = d.install("p1", &Script::new("v2"));
        d.wait_running("p1", &v2);
        assert!(!pid_alive(pid));
        d.signal(Signal::SIGHUP);
        assert_serving(&mut d);
        d.signal(Signal::SIGTERM);
        let status = d.wait_exit(Duration::from_secs(15));
        assert_eq!(status.code(), Some(0), "NOTIFY_SOCKET={target}");
    }
}

/// libfaketime's preload library, if installed.
fn libfaketime() -> Option<PathBuf> {
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
        "/usr/local/lib/faketime/libfaketime.so.1",
    ];
    candidates
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn year_of(rfc3339: &str) -> i32 {
    rfc3339.get(..4).and_then(|y| y.parse().ok()).unwrap_or(0)
}

/// Fails unless the wall-clock stamp of `event` moved in the direction of `jump` ("+400d").
#[track_caller]
fn assert_event_time_jumped(event: &Value, jump: &str) {
    let year = year_of(event["time"].as_str().unwrap_or_default());
    let this_year = year_of(&humantime::format_rfc3339(SystemTime::now()).to_string());
    let moved = if jump.starts_with('+') {
        year > this_year
    } else {
        year < this_year
    };
    assert!(
        moved,
        "test bug: the {jump} jump did not reach the daemon; {event}"
    );
}

#[test]
fn wall_clock_jumps_do_not_move_debounce_or_backoff() {
    let Some(lib) = libfaketime() else {
        return skip(
            "wall_clock_jumps",
            "libfaketime not installed (apt install faketime)",
        );
    };
    const DELAY: u64 = 1000;
    let config = Config::new()
        .set("hot_reload.debounce_delay_ms", json!(DELAY))
        .set("hot_reload.retry_delay_ms", json!(DELAY))
        .set("hot_reload.max_retries", json!(1));
    let mut d = Daemon::with_config(&config);
    // The wall clock (CLOCK_REALTIME) follows this file; CLOCK_MONOTONIC is left alone.
    let offset = d.root.join("faketime-offset");
    fs::write(&offset, "+0\n").unwrap();
    d.set_env("LD_PRELOAD", lib);
    d.set_env("FAKETIME_TIMESTAMP_FILE", &offset);
    d.set_env("FAKETIME_NO_CACHE", "1");
    d.set_env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    d.start_running("p1", &Script::new("v1").exec_sleep());
    let mut sub = d.client();
    sub.subscribe(json!({}));
    let jump = |to: &str| fs::write(&offset, format!("{to}\n")).unwrap();
    let within_delay = |took: Duration, what: &str| {
        assert!(
            took >= Duration::from_millis(DELAY - 100)
                && took < Duration::from_millis(DELAY + 3000),
            "contract (SPEC §5, CLOCK_MONOTONIC): {what} took {took:?}, not {DELAY} ms"
        );
    };
    // Debounce: the wall clock jumps forward, then back, while it runs.
    let mut good = Vec::new();
    for (label, to) in [("v2", "+400d"), ("v3", "-400d")] {
        good = d.install("p1", &Script::new(label).exec_sleep());
        let changed = Instant::now();
        jump(to);
        let started = sub.wait_named("reload_started", "p1");
        within_delay(
            changed.elapsed(),
            &format!("the debounce across a {to} jump"),
        );
        d.wait_running("p1", &good);
        assert_event_time_jumped(&started, to);
    }
    // Backoff: a broken build fails, the clock jumps forward, the retry comes on time.
    d.install("p1", &Script::new("bad").broken());
    sub.wait_event(TIMEOUT, "the first failed attempt", |e| {
        is_event(e, "reload_failed", "p1") && e["attempt"] == 1
    });
    let failed = Instant::now();
    jump("+800d");
    let second = sub.wait_event(TIMEOUT, "the retry", |e| {
        is_event(e, "reload_failed", "p1") && e["attempt"] == 2
    });
    within_delay(failed.elapsed(), "the backoff across a +800d jump");
    assert_event_time_jumped(&second, "+800d");
    sub.wait_named("rolled_back", "p1");
    d.wait_running("p1", &good);
    assert_serving(&mut d);
}

// ------------------------------------------------------------------------------------------------
// The control socket

#[test]
fn socket_file_deleted_while_running_keeps_the_daemon_supervising() {
    let mut d = Daemon::new();
    let (_, pid) = d.start_running("p1", &Script::new("v1"));
    fs::remove_file(&d.socket).unwrap();
    // Nobody can connect now, but the daemon keeps doing its work.
    let v2 = d.install("p1", &Script::new("v2"));
    let new = d.wait_started("p1", "v2");
    assert!(!pid_alive(pid), "the reload happened without a socket");
    assert_eq!(
        d.plugin_env("p1", new).get("HOTRELOAD_VERSION"),
        Some(&expected_version(&v2))
    );
    // SIGHUP puts the socket file back: the way in without a restart.
    d.signal(Signal::SIGHUP);
    let rebound = poll_until(Duration::from_secs(5), || {
        UnixStream::connect(&d.socket).ok()
    });
    assert!(
        rebound.is_some(),
        "SIGHUP re-creates the deleted socket file"
    );
    assert_serving(&mut d);
    assert!(d.try_exit().is_none(), "the daemon keeps running");
    assert!(pid_alive(new), "the plugin keeps running");
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", d.stderr_tail());
    assert!(
        d.stops("p1", Some("v2")).contains(&new),
        "stopped gracefully"
    );
}

#[test]
fn ten_megabyte_line_is_refused_with_bounded_memory() {
    let mut d = Daemon::new();
    d.start();
    let rss_before = rss_kib(d.pid());
    let mut c = d.client();
    let mut writer = c.stream().try_clone().unwrap();
    let sender = thread::spawn(move || {
        let chunk = vec![b'{'; 1 << 20];
        for _ in 0..10 {
            if writer.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let resp = c.read_json(TIMEOUT);
    assert_error(&resp, "line_too_long", "a 10 MB line");
    assert!(c.closed_by_peer(TIMEOUT), "closed after line_too_long");
    sender.join().unwrap();
    let status = assert_serving(&mut d);
    assert_eq!(status["hot_reload"]["active_sessions"], 1, "{status}");
    let grown = rss_kib(d.pid()).saturating_sub(rss_before);
    assert!(grown < 8 * 1024, "memory bounded: grew {grown} KiB");
}

/// Raises this process's soft fd limit to its hard limit (the test opens 1000 sockets).
fn raise_fd_limit(wanted: u64) -> bool {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return false;
    };
    if soft >= wanted {
        return true;
    }
    hard >= wanted && setrlimit(Resource::RLIMIT_NOFILE, hard.min(wanted * 2), hard).is_ok()
}

#[test]
fn thousand_concurrent_connections_are_capped_at_max_clients() {
    if !raise_fd_limit(2200) {
        return skip(
            "thousand_concurrent_connections",
            "RLIMIT_NOFILE below 2200",
        );
    }
    let mut d = Daemon::with_config(&Config::new().set("control.max_clients", json!(100)));
    d.start_running("p1", &Script::new("v1"));
    let baseline = fd_count(d.pid());
    let mut clients: Vec<Client> = Vec::new();
    for _ in 0..1000 {
        match Client::connect(&d.socket) {
            Ok(c) => clients.push(c),
            Err(e) => panic!("connect failed with {} open: {e}", clients.len()),
        }
    }
    let mut admitted = 0;
    let mut refused = 0;
    for c in &clients {
        // A refused client may already be closed by the daemon: EPIPE is expected then.
        let _ = c.stream().write_all(b"status\n");
    }
    for c in &mut clients {
        match c.try_read_line(TIMEOUT) {
            Line::Text(line) => {
                let resp: Value = serde_json::from_slice(&line).unwrap();
                if resp["status"] == "success" {
                    admitted += 1;
                } else {
                    assert_eq!(resp["code"], "too_many_clients", "{resp}");
                    refused += 1;
                }
            }
            Line::Eof => refused += 1,
            Line::Timeout => panic!("a client got no answer within {TIMEOUT:?}"),
        }
    }
    assert!(
        admitted <= 100 && admitted + refused == 1000,
        "contract (SPEC §3): max_clients honoured; {admitted} admitted, {refused} refused"
    );
    assert!(
        fd_count(d.pid()) <= baseline + 110,
        "fds bounded: {}",
        fd_count(d.pid())
    );
    drop(clients);
    wait_until(TIMEOUT, "the daemon's fds back to its baseline", || {
        (fd_count(d.pid()) <= baseline + 1).then_some(())
    });
    assert_serving(&mut d);
}

#[test]
fn daemon_out_of_file_descriptors_recovers_when_clients_leave() {
    let mut d = Daemon::new();
    d.launch_via_shell("ulimit -n 48");
    d.start_running("p1", &Script::new("v1"));
    let mut clients: Vec<UnixStream> = Vec::new();
    for _ in 0..100 {
        if let Ok(s) = UnixStream::connect(&d.socket) {
            clients.push(s);
        }
    }
    // The daemon (limit 48) runs out of descriptors accepting them.
    wait_until(TIMEOUT, "the daemon to reach its fd limit", || {
        (fd_count(d.pid()) >= 47).then_some(())
    });
    let cpu = |pid: i32| -> u64 {
        proc_stat_fields(pid).map_or(0, |f| {
            f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
        })
    };
    let before = cpu(d.pid());
    thread::sleep(Duration::from_millis(1000)); // proving a non-event: no busy loop
    let spent = cpu(d.pid()) - before;
    assert!(
        spent < 50,
        "no busy loop on EMFILE: {spent} ticks of CPU in 1 s"
    );
    drop(clients);
    wait_until(TIMEOUT, "the daemon to answer again", || {
        Client::connect(&d.socket).ok().and_then(|mut c| {
            c.send_raw(b"status\n");
            match c.try_read_line(Duration::from_secs(1)) {
                Line::Text(l) => serde_json::from_slice::<Value>(&l)
                    .ok()
                    .filter(|r| r["status"] == "success"),
                _ => None,
            }
        })
    });
    let v2 = d.install("p1", &Script::new("v2"));
    d.wait_running("p1", &v2);
    assert_serving(&mut d);
}

#[test]
fn thousand_clients_disconnecting_mid_response_do_not_disturb_the_daemon() {
    let mut d = Daemon::new();
    d.start_running("p1", &Script::new("v1"));
    let baseline = fd_count(d.pid());
    let socket = d.socket.clone();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let socket = socket.clone();
            thread::spawn(move || {
                for i in 0..250 {
                    let Ok(mut s) = UnixStream::connect(&socket) else {
                        continue;
                    };
                    let request: &[u8] = match i % 3 {
                        0 => b"list\nstatus\nplugin p1\n",
                        1 => b"{\"cmd\": \"help\"}\n",
                        _ => b"subscribe\n",
                    };
                    let _ = s.write_all(request);
                    // Gone before (or while) the answer is written.
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    wait_until(TIMEOUT, "every connection closed by the daemon", || {
        (fd_count(d.pid()) <= baseline + 1).then_some(())
    });
    let status = assert_serving(&mut d);
    assert_eq!(status["hot_reload"]["active_sessions"], 1, "{status}");
    d.wait_state("p1", "running");
}

#[test]
fn no_file_descriptor_leaks_across_reloads_crashes_and_clients() {
    let mut d = Daemon::new();
    d.start_running("p1", &Script::new("v1"));
    // The first reload leaves the staging helper's spare copy file open (one descriptor, held
    // with the staging buffer until 30 s without reloads): part of the baseline, like the
    // descriptors of the first start.
    let build = d.install("p1", &Script::new("v2"));
    d.wait_running("p1", &build);
    let spare = poll_until(TIMEOUT, || {
        fs::read_dir(format!("/proc/{}/fd", d.pid()))
            .ok()?
            .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
            .any(|target| target.to_string_lossy().contains("(deleted)"))
            .then_some(())
    });
    assert!(
        spare.is_some(),
        "the staging helper made no spare copy file"
    );
    // Let everything the first start opened settle before the baseline.
    d.prove_quiet();
    let baseline = fd_count(d.pid());
    for i in 0..5 {
        let build = d.install("p1", &Script::new(&format!("r{i}")));
        d.wait_running("p1", &build);
        let mut c = d.client();
        c.subscribe(json!({}));
    }
    d.install("p1", &Script::new("bad").broken());
    wait_until(Duration::from_secs(20), "the rollback to r4", || {
        let info = d.plugin_info("p1")?;
        (info["state"] == "running" && d.starts("p1", Some("r4")).len() == 2).then_some(())
    });
    let listing = || {
        fs::read_dir(format!("/proc/{}/fd", d.pid())).map_or(Vec::new(), |dir| {
            dir.filter_map(|e| fs::read_link(e.ok()?.path()).ok())
                .collect::<Vec<_>>()
        })
    };
    let settled = poll_until(TIMEOUT, || (fd_count(d.pid()) <= baseline).then_some(()));
    assert!(
        settled.is_some(),
        "fds back to {baseline}; now {:?}",
        listing()
    );
    assert_serving(&mut d);
}
