//! `watch_mode` (inotify, poll, auto's per-directory fallback) and `watch_subdirs` (SPEC §3,
//! §5 "Watching beyond inotify", "Subdirectories"), seen from outside: /proc, `status`,
//! `plugin`, events and what the plugins log.

use std::fs;
use std::io::Write;
use std::time::Duration;

use serde_json::{Value, json};

use crate::faults::{skip, unshare_works};
use crate::util::*;

/// Short enough to keep the tests quick, long enough that a loaded machine keeps up.
const POLL_MS: u64 = 150;

fn poll_config() -> Config {
    Config::new()
        .set("hot_reload.watch_mode", json!("poll"))
        .set("hot_reload.poll_interval_ms", json!(POLL_MS))
}

/// The lines of the daemon's /proc/PID/fdinfo files that describe an inotify instance.
fn inotify_fdinfo_lines(pid: i32) -> Vec<String> {
    let mut lines = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let text = fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
        lines.extend(
            text.lines()
                .filter(|l| l.starts_with("inotify"))
                .map(str::to_string),
        );
    }
    lines
}

fn plugin(d: &Daemon, id: &str) -> Value {
    d.request(&json!({"cmd": "plugin", "plugin": id}))["plugin"].clone()
}

#[test]
fn poll_mode_uses_no_inotify_and_picks_up_builds_and_plugin_dirs() {
    let mut d = Daemon::with_config(&poll_config());
    let (_, _) = d.start_running("p1", &Script::new("v1"));
    assert_eq!(
        inotify_fdinfo_lines(d.pid()),
        Vec::<String>::new(),
        "watch_mode = poll: no inotify instance in the daemon"
    );
    let status = d.status();
    let hr = &status["hot_reload"];
    assert_eq!(hr["watch_mode"], "poll", "{status}");
    assert_eq!(hr["polled_directories"], 2, "plugins dir and p1: {status}");
    assert_eq!(hr["watching_directories"], 2, "{status}");
    let p1 = plugin(&d, "p1");
    assert_eq!(p1["watched_by"], "poll", "{p1}");

    let mut sub = d.client();
    sub.subscribe(json!({}));
    let v2 = d.install("p1", &Script::new("v2"));
    let started = sub.wait_named("plugin_started", "p1");
    assert_eq!(started["version"], expected_version(&v2), "{started}");
    d.wait_running("p1", &v2);

    // A new plugin dir is found by polling the plugins dir; a verbose subscriber hears why it
    // is polled.
    let mut verbose = d.client();
    verbose.subscribe(json!({"verbose": true}));
    d.install("p2", &Script::new("v1"));
    d.wait_started("p2", "v1");
    let polled = verbose.wait_named("directory_polled", "p2");
    assert_eq!(
        polled["path"],
        d.plugin_dir("p2").to_string_lossy().as_ref()
    );
    assert!(
        polled["reason"]
            .as_str()
            .is_some_and(|r| r.contains("poll")),
        "{polled}"
    );
    sub.collect_events(Duration::from_millis(0));
    assert!(sub.all_named("directory_polled").is_empty(), "verbose only");
    assert_eq!(plugin(&d, "p2")["watched_by"], "poll");
    assert_eq!(inotify_fdinfo_lines(d.pid()), Vec::<String>::new());
}

#[test]
fn inotify_mode_reports_itself_and_watches_with_inotify() {
    let config = Config::new().set("hot_reload.watch_mode", json!("inotify"));
    let mut d = Daemon::with_config(&config);
    d.start_running("p1", &Script::new("v1"));
    assert!(!inotify_fdinfo_lines(d.pid()).is_empty());
    let status = d.status();
    assert_eq!(status["hot_reload"]["watch_mode"], "inotify", "{status}");
    assert_eq!(status["hot_reload"]["polled_directories"], 0, "{status}");
    assert_eq!(plugin(&d, "p1")["watched_by"], "inotify");
}

#[test]
fn a_slow_writer_is_never_started_half_written_under_poll() {
    // The confirming listing comes a debounce after the one that saw the change.
    let mut d = Daemon::with_config(&poll_config().set("hot_reload.debounce_delay_ms", json!(400)));
    d.start_running("p1", &Script::new("v1"));
    // The first part alone is a valid script (it passes pre-flight, then exits): started, it
    // would show up with its own version.
    let head = b"#!/bin/sh\nlabel=half\n".to_vec();
    let full_script = Script::new("full").render(&d.root, "p1");
    let shebang = b"#!/bin/sh\n".len();
    let mut full = head.clone();
    full.extend_from_slice(&full_script[shebang..]);

    let mut sub = d.client();
    sub.subscribe(json!({}));
    let mut file = fs::File::create(d.exec_path("p1")).unwrap();
    file.write_all(&head).unwrap();
    file.flush().unwrap();
    // The writer's pause (not a synchronisation): shorter than the interval and than the
    // debounce, so no two listings can see the first part alone.
    std::thread::sleep(Duration::from_millis(POLL_MS / 2));
    file.write_all(&full[head.len()..]).unwrap();
    drop(file);

    let started = sub.wait_named("plugin_started", "p1");
    assert_eq!(
        started["version"],
        expected_version(&full),
        "the first start after the write is the complete build; events {:?}",
        sub.all_named("plugin_started")
    );
    d.wait_running("p1", &full);
    d.wait_started("p1", "full");
    let half = expected_version(&head);
    assert!(
        sub.all_named("plugin_started")
            .iter()
            .all(|e| e["version"] != half.as_str()),
        "the half-written build never started"
    );
}

#[test]
fn auto_polls_the_directories_inotify_has_no_watch_left_for() {
    if !unshare_works(&["-U", "-r"]) {
        return skip("auto_polls_at_the_watch_limit", "needs unshare -U -r");
    }
    let config = Config::new().set("hot_reload.poll_interval_ms", json!(POLL_MS));
    let mut d = Daemon::with_config(&config);
    d.start_with_three_inotify_watches();
    let status = d.status();
    assert_eq!(status["hot_reload"]["watch_mode"], "auto", "{status}");
    assert_eq!(status["hot_reload"]["polled_directories"], 1, "{status}");
    assert_eq!(status["hot_reload"]["watching_directories"], 4, "{status}");
    let p3 = plugin(&d, "p3");
    assert_eq!(p3["watched_by"], "poll", "{p3}");
    assert!(
        p3["poll_reason"]
            .as_str()
            .is_some_and(|r| r.contains("max_user_watches")),
        "{p3}"
    );
    assert_eq!(plugin(&d, "p1")["watched_by"], "inotify");
    // No trigger: the polled plugin reloads by itself, and so does a watched one.
    let v2 = d.install("p3", &Script::new("v2"));
    d.wait_running("p3", &v2);
    let v2 = d.install("p1", &Script::new("v2"));
    d.wait_running("p1", &v2);
}

fn subdir_config(mode: &str) -> Config {
    Config::new()
        .set("hot_reload.watch_subdirs", json!(true))
        .set("hot_reload.watch_mode", json!(mode))
        .set("hot_reload.poll_interval_ms", json!(POLL_MS))
}

fn subdirs_reload_but_git_does_not(mode: &str) {
    let mut d = Daemon::with_config(&subdir_config(mode));
    let dir = d.plugin_dir("p1");
    fs::create_dir_all(dir.join("assets/img")).unwrap();
    fs::create_dir_all(dir.join(".git/objects")).unwrap();
    d.start_running("p1", &Script::new("v1"));
    let status = d.status();
    assert_eq!(
        status["hot_reload"]["watching_subdirectories"], 2,
        "assets and assets/img, not .git: {status}"
    );
    assert_eq!(status["hot_reload"]["watching_directories"], 2, "{status}");

    // A changed asset, two levels down: the same build restarts.
    fs::write(dir.join("assets/img/logo.txt"), b"new logo").unwrap();
    d.wait_started_n("p1", "v1", 2);

    // Nothing under .git counts (a new subdir there included).
    fs::write(dir.join(".git/HEAD"), b"ref: refs/heads/main\n").unwrap();
    fs::create_dir(dir.join(".git/refs")).unwrap();
    fs::write(dir.join(".git/objects/ab"), b"blob").unwrap();
    d.prove_quiet();
    assert_eq!(
        d.starts("p1", Some("v1")).len(),
        2,
        "{:?}",
        d.log_lines("p1")
    );

    // A new subdirectory is watched, and a file written in it reloads.
    fs::create_dir(dir.join("templates")).unwrap();
    let more = |d: &Daemon| d.status()["hot_reload"]["watching_subdirectories"] == json!(3);
    assert!(poll_until(TIMEOUT, || more(&d).then_some(())).is_some());
    fs::write(dir.join("templates/page.html"), b"<p>hi</p>").unwrap();
    d.wait_started_n("p1", "v1", 3);

    // A removed subdirectory is forgotten.
    fs::remove_dir_all(dir.join("templates")).unwrap();
    let fewer = |d: &Daemon| d.status()["hot_reload"]["watching_subdirectories"] == json!(2);
    assert!(poll_until(TIMEOUT, || fewer(&d).then_some(())).is_some());
}

#[test]
fn subdir_changes_reload_git_ones_do_not_and_new_subdirs_count_with_inotify() {
    subdirs_reload_but_git_does_not("inotify");
}

#[test]
fn subdir_changes_reload_git_ones_do_not_and_new_subdirs_count_when_polled() {
    subdirs_reload_but_git_does_not("poll");
}

#[test]
fn without_watch_subdirs_a_subdir_change_reloads_nothing() {
    let mut d = Daemon::new();
    let dir = d.plugin_dir("p1");
    fs::create_dir_all(dir.join("assets")).unwrap();
    d.start_running("p1", &Script::new("v1"));
    assert_eq!(d.status()["hot_reload"]["watching_subdirectories"], 0);
    fs::write(dir.join("assets/logo.txt"), b"new logo").unwrap();
    d.prove_quiet();
    assert_eq!(d.starts("p1", Some("v1")).len(), 1);
}

/// Voluntary context switches of the daemon: each is a wakeup from its sleep in epoll_wait.
fn wakeups(pid: i32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// Wakeups of an idle daemon over `window`.
fn idle_wakeups(d: &Daemon, window: Duration) -> u64 {
    let before = wakeups(d.pid());
    std::thread::sleep(window);
    wakeups(d.pid()) - before
}

#[test]
fn an_idle_daemon_wakes_once_per_poll_interval_and_never_without_polled_dirs() {
    let window = Duration::from_millis(1500);
    let mut inotify = Daemon::new();
    inotify.start_running("p1", &Script::new("v1"));
    inotify.prove_quiet();
    let none = idle_wakeups(&inotify, window);
    assert!(
        none <= 1,
        "no polled directory: no wakeup ({none} in {window:?})"
    );

    let config = Config::new()
        .set("hot_reload.watch_mode", json!("poll"))
        .set("hot_reload.poll_interval_ms", json!(300));
    let mut polled = Daemon::with_config(&config);
    for id in ["p1", "p2", "p3"] {
        polled.install(id, &Script::new("v1"));
    }
    polled.start();
    for id in ["p1", "p2", "p3"] {
        polled.wait_started(id, "v1");
        polled.wait_state(id, "running");
    }
    polled.prove_quiet();
    let n = idle_wakeups(&polled, window);
    // 5 intervals in the window, one timer for the four polled dirs.
    assert!((3..=8).contains(&n), "{n} wakeups in {window:?} at 300 ms");
}

#[track_caller]
fn wait_present(d: &Daemon, present: bool) {
    wait_until(TIMEOUT, "plugins_dir_present", || {
        (d.status()["daemon"]["plugins_dir_present"] == present).then_some(())
    });
}

#[test]
fn a_polled_plugins_dir_that_goes_and_comes_back_is_supervised_again() {
    let mut d = Daemon::with_config(&poll_config());
    let (v1, pid1) = d.start_running("p1", &Script::new("v1"));
    let mut sub = d.client();
    sub.subscribe(json!({}));

    // Swapped by two renames: the same build of p1 keeps running, a new plugin starts.
    let new = d.root.join("plugins.new");
    install_atomic(&new.join("p1").join("p1"), &v1, 0o755);
    let fresh = Script::new("v1").render(&d.root, "fresh");
    install_atomic(&new.join("fresh").join("fresh"), &fresh, 0o755);
    fs::rename(&d.plugins, d.root.join("plugins.old")).unwrap();
    fs::rename(&new, &d.plugins).unwrap();
    d.wait_running("fresh", &fresh);
    let info = d.wait_running("p1", &v1);
    assert_eq!(info["pid"], pid1, "same build in the new dir: no restart");
    sub.wait_event(TIMEOUT, "plugins_dir_back", |e| {
        e["event"] == "plugins_dir_back"
    });

    // Deleted: every plugin stops; recreated: what it holds is supervised, and polled.
    fs::remove_dir_all(&d.plugins).unwrap();
    sub.wait_event(TIMEOUT, "plugins_dir_lost", |e| {
        e["event"] == "plugins_dir_lost"
    });
    wait_present(&d, false);
    wait_until(TIMEOUT, "p1 forgotten", || {
        d.plugin_info("p1").is_none().then_some(())
    });
    fs::create_dir(&d.plugins).unwrap();
    let v3 = d.install("p3", &Script::new("v1"));
    d.wait_running("p3", &v3);
    wait_present(&d, true);
    let v4 = d.install("p3", &Script::new("v2"));
    d.wait_running("p3", &v4);
    assert_eq!(plugin(&d, "p3")["watched_by"], "poll");
    assert_eq!(inotify_fdinfo_lines(d.pid()), Vec::<String>::new());
}
