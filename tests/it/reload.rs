//! Hot reloads (SPEC §4 snapshots and state, §5 detection, debounce, no-op, pre-flight, failure,
//! rollback): every way a new build can land, builds that must not start, and what a reload
//! carries from the old instance to the new one.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use nix::sys::signal::Signal;

use serde_json::{Value, json};

use crate::util::{
    Config, Daemon, Script, TIMEOUT, assert_success, expected_version, install_atomic,
    install_in_place, is_event, is_rfc3339_millis_utc, pid_alive, send_signal,
};

#[test]
fn new_build_renamed_over_the_executable_is_hot_reloaded() {
    let mut d = Daemon::new();
    let (_, old) = d.start_running("p1", &Script::new("v1"));
    let v2 = d.install("p1", &Script::new("v2"));
    let new = d.wait_started("p1", "v2");
    let info = d.wait_running("p1", &v2);
    assert_ne!(
        new, old,
        "contract (SPEC §5): a reload starts a new process"
    );
    assert!(
        d.stops("p1", Some("v1")).contains(&old),
        "contract: the old instance got SIGTERM"
    );
    assert!(
        !pid_alive(old),
        "contract: the old instance {old} is gone after the reload"
    );
    assert_eq!(
        info["pid"], new,
        "contract: list shows the new pid; saw {info}"
    );
    assert_eq!(
        info["reload_count"], 1,
        "contract: one reload counted; saw {info}"
    );
    let hot = &d.status()["hot_reload"];
    assert!(
        hot["reload_count"] == 1 && hot["last_reload"].is_string(),
        "contract (SPEC §6): status counts the reload and sets last_reload; saw {hot}"
    );
}

#[test]
fn build_overwritten_in_place_while_running_is_hot_reloaded() {
    let mut d = Daemon::new();
    let (_, old) = d.start_running("p1", &Script::new("v1"));
    let v2 = d.install_in_place("p1", &Script::new("v2"));
    let new = d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
    assert_ne!(
        new, old,
        "contract (SPEC §5): an in-place write is a new build"
    );
}

#[test]
fn subscriber_gets_reload_started_and_succeeded_with_millisecond_utc_times() {
    let mut d = Daemon::new();
    let (v1, _) = d.start_running("p1", &Script::new("v1"));
    let mut sub = d.client();
    sub.subscribe(json!({}));
    let v2 = d.install("p1", &Script::new("v2"));
    let started = sub.wait_named("reload_started", "p1");
    let done = sub.wait_named("reload_succeeded", "p1");
    for event in [&started, &done] {
        let time = event["time"].as_str().unwrap_or_default();
        assert!(
            is_rfc3339_millis_utc(time),
            "contract (SPEC §6): event time; saw {event}"
        );
    }
    assert_eq!(
        started["trigger"], "watch",
        "contract: a file change has trigger watch; {started}"
    );
    assert!(
        started["files"].is_array(),
        "contract: reload_started lists files; saw {started}"
    );
    assert_eq!(
        done["old_version"],
        expected_version(&v1),
        "old_version; saw {done}"
    );
    assert_eq!(
        done["new_version"],
        expected_version(&v2),
        "new_version; saw {done}"
    );
    assert!(
        done["duration_ms"].is_u64(),
        "contract: duration_ms is an integer; saw {done}"
    );
}

/// Lands a build that must fail the pre-flight check (via `land`) and checks that the running
/// instance was never touched: same pid, no stop, no new start, `reload_failed` without retry.
#[track_caller]
fn assert_rejected_build_keeps_the_old_instance(land: impl FnOnce(&Daemon)) {
    let mut d = Daemon::new();
    let (v1, pid) = d.start_running("p1", &Script::new("v1"));
    let mut sub = d.client();
    sub.subscribe(json!({}));
    land(&d);
    let failed = sub.wait_named("reload_failed", "p1");
    assert!(
        failed["error"].as_str().is_some_and(|e| !e.is_empty()),
        "error text; saw {failed}"
    );
    assert!(
        failed["retry_in_ms"].is_null(),
        "contract (SPEC §5): no retry; saw {failed}"
    );
    let info = d.plugin_info("p1").unwrap_or_default();
    assert!(
        info["pid"] == pid
            && info["state"] == "running"
            && info["version"] == expected_version(&v1),
        "contract (SPEC §5 pre-flight): the running instance keeps running; saw {info}"
    );
    assert!(
        pid_alive(pid),
        "contract: the old instance {pid} is still alive"
    );
    assert!(
        d.stops("p1", None).is_empty(),
        "contract: nothing was stopped; {:?}",
        d.log_lines("p1")
    );
    assert_eq!(
        d.starts("p1", None),
        vec![pid],
        "contract: nothing else was started"
    );
    assert!(
        info["failed_reloads"].as_u64() >= Some(1),
        "failed reload counted; saw {info}"
    );
}

#[test]
fn empty_build_is_rejected_and_the_old_instance_never_stops() {
    assert_rejected_build_keeps_the_old_instance(|d| install_in_place(&d.exec_path("p1"), b""));
}

#[test]
fn truncated_build_is_rejected_and_the_old_instance_never_stops() {
    // Cut inside the #! line: it now names an interpreter that does not exist.
    assert_rejected_build_keeps_the_old_instance(|d| {
        let content = Script::new("v2").render(&d.root, "p1");
        install_atomic(&d.exec_path("p1"), &content[..8], 0o755);
    });
}

#[test]
fn non_executable_build_is_rejected_and_the_old_instance_never_stops() {
    assert_rejected_build_keeps_the_old_instance(|d| {
        d.install_mode("p1", &Script::new("v2"), 0o644);
    });
}

#[test]
fn chmod_x_of_a_non_executable_build_reloads_it() {
    let mut d = Daemon::new();
    let (_, old) = d.start_running("p1", &Script::new("v1"));
    let mut sub = d.client();
    sub.subscribe(json!({"verbose": true}));
    let v2 = d.install_mode("p1", &Script::new("v2"), 0o644);
    // Whether the daemon calls it a failed reload or an ignored change, it must have seen it.
    sub.wait_event(TIMEOUT, "reload_failed or change_ignored for p1", |e| {
        let ignored =
            e["event"] == "change_ignored" && e["path"].as_str().is_some_and(|p| p.ends_with("p1"));
        is_event(e, "reload_failed", "p1") || ignored
    });
    assert_eq!(
        d.starts("p1", None),
        vec![old],
        "a non-executable build never starts"
    );
    let exec = d.exec_path("p1");
    fs::set_permissions(&exec, fs::Permissions::from_mode(0o755)).unwrap();
    d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
}

#[test]
fn a_build_whose_mode_is_set_before_its_bytes_starts_only_once_whole() {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // Rust's `fs::copy` creates the file, sets its mode (IN_ATTRIB), then writes the bytes:
    // even with a 0 ms debounce, the attribute change of a file still open for writing must
    // not start what is there so far.
    let mut d = Daemon::with_config(&Config::new().set("hot_reload.debounce_delay_ms", json!(0)));
    let (_, old) = d.start_running("p1", &Script::new("v1"));
    let mut sub = d.client();
    sub.subscribe(json!({}));
    let v2 = Script::new("v2").render(&d.root, "p1");
    let exec = d.exec_path("p1");
    fs::remove_file(&exec).unwrap();
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(&exec)
        .unwrap();
    let half = v2.len() / 2;
    file.write_all(&v2[..half]).unwrap();
    file.set_permissions(fs::Permissions::from_mode(0o755))
        .unwrap();
    d.prove_quiet();
    assert_eq!(d.starts("p1", None), vec![old], "half a build started");
    file.write_all(&v2[half..]).unwrap();
    drop(file);
    d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
    sub.wait_named("reload_succeeded", "p1");
    sub.collect_events(Duration::from_millis(100));
    assert_eq!(d.starts("p1", None).len(), 2, "one start for the one build");
    assert!(
        sub.all_named("reload_failed").is_empty(),
        "the half build was not even tried: {:?}",
        sub.all_named("reload_failed")
    );
}

#[test]
fn hard_link_install_like_cargo_reloads() {
    let mut d = Daemon::new();
    let (_, old) = d.start_running("p1", &Script::new("v1"));
    let build = d.root.join("target").join("p1");
    let v2 = Script::new("v2").render(&d.root, "p1");
    install_atomic(&build, &v2, 0o755);
    // cargo: unlink the old file, hard-link the new one in (no close-write in the plugin dir).
    fs::remove_file(d.exec_path("p1")).unwrap();
    fs::hard_link(&build, d.exec_path("p1")).unwrap();
    let new = d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
    assert_ne!(new, old, "contract (SPEC §5): a hard-linked build reloads");
}

#[test]
fn symlinked_build_reloads_when_its_target_is_rebuilt() {
    let mut d = Daemon::new();
    let target = d.root.join("src").join("p1").join("target").join("p1");
    let v1 = Script::new("v1").render(&d.root, "p1");
    install_atomic(&target, &v1, 0o755);
    fs::create_dir_all(d.plugin_dir("p1")).unwrap();
    std::os::unix::fs::symlink(&target, d.exec_path("p1")).unwrap();
    d.start();
    d.wait_started("p1", "v1");
    d.wait_running("p1", &v1);
    let v2 = Script::new("v2").render(&d.root, "p1");
    install_atomic(&target, &v2, 0o755);
    d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
}

#[test]
fn twenty_writes_within_100ms_cause_exactly_one_reload() {
    // A longer debounce than usual so a slow CI disk cannot split the burst.
    let mut d = Daemon::with_config(&Config::new().set("hot_reload.debounce_delay_ms", json!(300)));
    let (_, old) = d.start_running("p1", &Script::new("v1"));
    let mut sub = d.client();
    sub.subscribe(json!({}));
    let mut last = Vec::new();
    for i in 0..20 {
        last = d.install("p1", &Script::new(&format!("w{i}")));
        std::thread::sleep(Duration::from_millis(5)); // pacing of the burst, not a wait
    }
    let new = d.wait_started("p1", "w19");
    d.wait_running("p1", &last);
    sub.collect_events(d.quiet_period());
    assert_eq!(
        d.starts("p1", None),
        vec![old, new],
        "one reload to the last build only"
    );
    assert_eq!(
        sub.named("reload_started", "p1").len(),
        1,
        "contract (SPEC §5 debounce)"
    );
    assert_eq!(d.plugin_info("p1").unwrap_or_default()["reload_count"], 1);
}

#[test]
fn change_to_an_excluded_file_does_not_reload() {
    let config = Config::new().set("hot_reload.exclude_patterns", json!(["*.log", "*.tmp"]));
    let mut d = Daemon::with_config(&config);
    let (_, pid) = d.start_running("p1", &Script::new("v1"));
    fs::write(d.plugin_dir("p1").join("debug.log"), "noise\n").unwrap();
    fs::write(d.plugin_dir("p1").join("scratch.tmp"), "noise\n").unwrap();
    d.prove_quiet();
    assert_eq!(
        d.starts("p1", None),
        vec![pid],
        "contract (SPEC §5): excluded files never count"
    );
    assert_eq!(d.plugin_info("p1").unwrap_or_default()["reload_count"], 0);
}

#[test]
fn identical_content_rewritten_does_not_reload() {
    let mut d = Daemon::new();
    let (v1, pid) = d.start_running("p1", &Script::new("v1"));
    install_atomic(&d.exec_path("p1"), &v1, 0o755);
    install_in_place(&d.exec_path("p1"), &v1);
    d.prove_quiet();
    assert_eq!(
        d.starts("p1", None),
        vec![pid],
        "contract (SPEC §5 no-op): same version"
    );
    assert_eq!(d.plugin_info("p1").unwrap_or_default()["reload_count"], 0);
}

#[test]
fn runtime_data_and_configuration_are_carried_into_the_new_instance() {
    let config = Config::new().set("plugins.p1.config", json!({"preset": "fast", "threads": 4}));
    let mut d = Daemon::with_config(&config);
    d.start_running("p1", &Script::new("v1").runtime_json(&json!({"jobs": 3})));
    let v2 = d.install("p1", &Script::new("v2"));
    let pid = d.wait_started("p1", "v2");
    let state = d.seen_state("p1", pid).unwrap_or(Value::Null);
    let expected = json!({
        "plugin_id": "p1",
        "configuration": {"preset": "fast", "threads": 4},
        "runtime_data": {"jobs": 3},
        "version": expected_version(&v2),
        "status": "starting",
    });
    for (key, value) in expected.as_object().into_iter().flatten() {
        assert_eq!(
            &state[key], value,
            "contract (SPEC §4 PluginState) {key}; state {state}"
        );
    }
    assert!(
        state["last_activity"].is_string(),
        "contract: last_activity; saw {state}"
    );
}

#[test]
fn runtime_data_saved_by_the_old_instance_on_sigterm_reaches_the_new_one() {
    let mut d = Daemon::new();
    // Saves its final state in its SIGTERM handler, as a real plugin would.
    let on_term = r#"trap 'printf "%s" "{\"jobs\":2}" >"$HOTRELOAD_RUNTIME_FILE"; echo "stop v1 $$" >>"$LOG"; exit 0' TERM"#;
    let v1 = Script::new("v1")
        .runtime_json(&json!({"jobs": 1}))
        .shell(on_term);
    let (_, old) = d.start_running("p1", &v1);
    let v2 = d.install("p1", &Script::new("v2"));
    let pid = d.wait_started("p1", "v2");
    assert!(
        d.stops("p1", Some("v1")).contains(&old),
        "v1 ran its handler"
    );
    let state = d.seen_state("p1", pid).unwrap_or(Value::Null);
    assert_eq!(
        (&state["runtime_data"], &state["version"]),
        (&json!({"jobs": 2}), &json!(expected_version(&v2))),
        "contract (SPEC §5): runtime.json is folded in after the old instance is reaped; {state}"
    );
}

#[test]
fn build_that_cannot_be_copied_is_retried_after_backoff_without_a_new_event() {
    // A long first delay, so the build is back in place before the retry copies it.
    let config = Config::new().set("hot_reload.retry_delay_ms", json!(1000));
    let mut d = Daemon::with_config(&config);
    let (_, old) = d.start_running("p1", &Script::new("v1"));
    let mut sub = d.client();
    sub.subscribe(json!({}));
    // Disabled: the build's return below brings no reload of its own, only the retry can.
    assert_success(&d.request(&json!({"cmd": "disable"})), "disable");
    let away = d.root.join("away");
    fs::rename(d.exec_path("p1"), &away).unwrap();
    let resp = d.request(&json!({"cmd": "trigger", "plugin": "p1", "wait": false}));
    assert_success(&resp, "trigger --no-wait");
    let failed = sub.wait_named("reload_failed", "p1");
    assert!(
        failed["attempt"] == 1
            && failed["retry_in_ms"] == 1000
            && failed["error"]
                .as_str()
                .unwrap_or_default()
                .contains("snapshot"),
        "contract (SPEC §5): a snapshot that cannot be taken is a failed attempt, retried; saw {failed}"
    );
    assert!(
        pid_alive(old),
        "nothing was stopped: the old instance {old} runs on"
    );
    let v2 = Script::new("v2").render(&d.root, "p1");
    install_atomic(&away, &v2, 0o755);
    fs::rename(&away, d.exec_path("p1")).unwrap();
    let done = sub.wait_event(Duration::from_secs(20), "the reload's outcome", |e| {
        is_event(e, "reload_succeeded", "p1") || is_event(e, "rolled_back", "p1")
    });
    assert_eq!(
        done["event"], "reload_succeeded",
        "the retry reloads v2; saw {done}"
    );
    d.wait_running("p1", &v2);
    assert!(!pid_alive(old), "the old instance {old} made way for v2");
    assert_eq!(
        sub.named("reload_started", "p1").len(),
        1,
        "one reload, however many attempts"
    );
}

#[test]
fn crash_while_a_copy_retry_waits_ends_that_reload_and_follows_the_restart_policy() {
    let config = Config::new().set("hot_reload.retry_delay_ms", json!(1000));
    let mut d = Daemon::with_config(&config);
    let (v1, old) = d.start_running("p1", &Script::new("v1").exec_sleep());
    let mut sub = d.client();
    sub.subscribe(json!({}));
    fs::rename(d.exec_path("p1"), d.root.join("away")).unwrap();
    let resp = d.request(&json!({"cmd": "trigger", "plugin": "p1", "wait": false}));
    assert_success(&resp, "trigger --no-wait");
    let failed = sub.wait_named("reload_failed", "p1");
    assert_eq!(
        failed["retry_in_ms"], 1000,
        "a retry of the copy is due; saw {failed}"
    );
    send_signal(old, Signal::SIGKILL);
    let last = sub.wait_named("reload_failed", "p1");
    assert!(
        last["attempt"] == 2 && last["retry_in_ms"].is_null(),
        "the reload ends at once, without the retries it had left; saw {last}"
    );
    let info = d.wait_plugin("p1", "restarted by its restart policy", |p| {
        p["state"] == "running" && p["pid"] != old && p["restarts"] == 1
    });
    assert_eq!(info["version"], expected_version(&v1), "{info}");
    assert!(
        sub.named("rolled_back", "p1").is_empty(),
        "a reload that stopped nothing rolls nothing back"
    );
}

#[test]
fn reload_whose_copy_failed_ends_with_reload_succeeded_when_the_running_build_returns() {
    let config = Config::new().set("hot_reload.retry_delay_ms", json!(10_000));
    let mut d = Daemon::with_config(&config);
    let (v1, old) = d.start_running("p1", &Script::new("v1"));
    let mut sub = d.client();
    sub.subscribe(json!({}));
    let away = d.root.join("away");
    fs::rename(d.exec_path("p1"), &away).unwrap();
    // A change in the plugin dir while the executable is gone: a reload whose copy fails.
    fs::write(d.plugin_dir("p1").join("data.bin"), b"x").unwrap();
    let failed = sub.wait_named("reload_failed", "p1");
    assert_eq!(
        failed["retry_in_ms"], 10_000,
        "a retry is due; saw {failed}"
    );
    // The same build comes back long before that retry.
    fs::rename(&away, d.exec_path("p1")).unwrap();
    let done = sub.wait_event(TIMEOUT, "the reload's outcome", |e| {
        is_event(e, "reload_succeeded", "p1") || is_event(e, "reload_failed", "p1")
    });
    let version = expected_version(&v1);
    assert!(
        done["event"] == "reload_succeeded"
            && done["old_version"] == version.as_str()
            && done["new_version"] == version.as_str(),
        "the announced reload gets its outcome; saw {done}"
    );
    assert_eq!(sub.named("reload_started", "p1").len(), 1, "one reload");
    let info = d.wait_running("p1", &v1);
    assert_eq!(
        info["pid"], old,
        "nothing restarted: that build is the one running"
    );
}

#[test]
fn second_change_whose_copy_fails_continues_the_reload_already_announced() {
    let config = Config::new().set("hot_reload.retry_delay_ms", json!(10_000));
    let mut d = Daemon::with_config(&config);
    d.start_running("p1", &Script::new("v1"));
    let mut sub = d.client();
    sub.subscribe(json!({}));
    fs::rename(d.exec_path("p1"), d.root.join("away")).unwrap();
    for (n, name) in ["data-1.bin", "data-2.bin"].into_iter().enumerate() {
        fs::write(d.plugin_dir("p1").join(name), b"x").unwrap();
        let failed = sub.wait_named("reload_failed", "p1");
        assert_eq!(failed["retry_in_ms"], 10_000, "change {n}: saw {failed}");
    }
    assert_eq!(
        sub.named("reload_started", "p1").len(),
        1,
        "the second change takes over the reload waiting to retry, it does not start another"
    );
}

#[test]
fn broken_build_is_retried_with_backoff_then_rolled_back_with_its_state() {
    let mut d = Daemon::new();
    let (good, _) = d.start_running("p1", &Script::new("v1").runtime_json(&json!({"jobs": 3})));
    let mut sub = d.client();
    sub.subscribe(json!({}));
    d.install("p1", &Script::new("bad").broken());
    let rolled = sub.wait_event(Duration::from_secs(20), "rolled_back", |e| {
        is_event(e, "rolled_back", "p1")
    });
    let failures = sub.named("reload_failed", "p1");
    let attempts: Vec<&Value> = failures.iter().map(|e| &e["attempt"]).collect();
    let delays: Vec<&Value> = failures.iter().map(|e| &e["retry_in_ms"]).collect();
    assert_eq!(
        attempts,
        [1, 2, 3],
        "contract (SPEC §5): 1 + max_retries; events {failures:?}"
    );
    assert_eq!(
        delays,
        [&json!(50), &json!(100), &Value::Null],
        "contract: doubling delays"
    );
    assert_eq!(
        rolled["version"],
        expected_version(&good),
        "rolled back to v1; saw {rolled}"
    );
    assert_eq!(
        d.starts("p1", Some("bad")).len(),
        3,
        "three attempts of the broken build"
    );
    let pid = d.wait_started_n("p1", "v1", 2);
    let info = d.wait_running("p1", &good);
    assert_eq!(
        info["pid"], pid,
        "the last good build runs again; saw {info}"
    );
    let state = d.seen_state("p1", pid).unwrap_or(Value::Null);
    assert_eq!(
        state["runtime_data"],
        json!({"jobs": 3}),
        "contract: state survives; {state}"
    );
}
