//! Recovery from what the daemon can get past on its own, and plugins that say why they are
//! down (SPEC §4 PluginState, §5 "A failure the daemon can retry is retried", "No-op, always",
//! states): a runtime dir full at a plugin's first start or at a reload, `preserve_state =
//! false` still handing the plugin its state file, the build already running installed again
//! after a rollback or during a start-stop retry, and a plugin dir that holds everything but its
//! executable.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::faults::{in_daemon_ns, launch_in_mount_namespace, skip};
use crate::util::{
    Config, Daemon, MAX_RETRIES, Script, expected_version, install_atomic, is_event, wait_until,
};

/// Long enough for the capped doubling backoff of a busy machine to come round again.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts `d` in its own mount namespace with a 256 KiB tmpfs as runtime dir, filled to the last
/// block; the path of the filler as the test sees it. `None` (skip) without mount namespaces.
fn start_with_a_full_runtime_dir(d: &mut Daemon) -> Option<PathBuf> {
    let runtime = crate::util::sh_quote(&d.runtime.to_string_lossy());
    let mount = format!("mount -t tmpfs -o size=256k,mode=0700 hotreload-test {runtime}");
    if !launch_in_mount_namespace(d, &mount) {
        return None;
    }
    d.start();
    let filler = in_daemon_ns(d, &d.runtime.join("filler"));
    fill_to_the_last_block(&filler);
    Some(filler)
}

/// Write `filler` until its file system has no block left, and close it (an open file's blocks
/// are not freed when it is removed).
fn fill_to_the_last_block(filler: &Path) {
    let mut file = File::create(filler).unwrap();
    let block = [0u8; 4096];
    while file.write_all(&block).is_ok() {}
    let _ = file.sync_all();
}

#[test]
fn full_runtime_dir_at_first_start_backs_off_then_starts_once_space_is_freed() {
    let mut d = Daemon::new();
    let Some(filler) = start_with_a_full_runtime_dir(&mut d) else {
        return skip(
            "full_runtime_dir_at_first_start",
            "needs root and unshare -m",
        );
    };
    let v1 = d.install("p1", &Script::new("v1"));
    let info = d.wait_plugin("p1", "backoff with an error", |p| {
        p["state"] == "backoff" && p["last_error"].is_string()
    });
    let error = info["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("No space left on device") && error.contains("plugins/p1/p1"),
        "contract (SPEC §5): the error names the problem and the build; saw {info}"
    );
    assert!(
        d.starts("p1", None).is_empty(),
        "nothing started without a snapshot"
    );
    // No giving up: the copy is still retried after the 1 + max_retries attempts a reload gets.
    let beyond = format!("start failed (attempt {})", MAX_RETRIES + 2);
    wait_until(RECOVERY_TIMEOUT, &beyond, || {
        d.stderr_text().contains(&beyond).then_some(())
    });
    assert_eq!(d.plugin_info("p1").unwrap_or_default()["state"], "backoff");
    // Space comes back: the plugin starts with no command sent.
    fs::remove_file(&filler).unwrap();
    let running = wait_until(RECOVERY_TIMEOUT, "p1 running once space is freed", || {
        d.plugin_info("p1")
            .filter(|p| p["state"] == "running" && p["version"] == expected_version(&v1).as_str())
    });
    assert!(
        running["last_error"].is_null(),
        "a start that worked clears the error; saw {running}"
    );
    d.wait_started("p1", "v1");
}

#[test]
fn preserve_state_false_still_hands_the_plugin_its_state_file_and_configuration() {
    let config = Config::new()
        .set("hot_reload.preserve_state", json!(false))
        .set("plugins.p1.config", json!({"preset": "fast"}));
    let mut d = Daemon::with_config(&config);
    let v1 = Script::new("v1").runtime_json(&json!({"jobs": 3}));
    let (v1, pid) = d.start_running("p1", &v1);
    let seen = d.seen_state("p1", pid).unwrap_or(Value::Null);
    assert_eq!(
        (
            &seen["configuration"],
            &seen["runtime_data"],
            &seen["version"]
        ),
        (
            &json!({"preset": "fast"}),
            &Value::Null,
            &json!(expected_version(&v1))
        ),
        "contract (SPEC §4): state.json carries configuration and version; saw {seen}"
    );
    let runtime = d.runtime_file("p1");
    wait_until(Duration::from_secs(10), "the plugin's runtime.json", || {
        let text = fs::read_to_string(&runtime).ok()?;
        (serde_json::from_str::<Value>(&text).ok()? == json!({"jobs": 3})).then_some(())
    });
    // A reload carries nothing: runtime.json is gone before the new instance starts.
    let v2 = d.install("p1", &Script::new("v2"));
    let pid = d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
    let seen = d.seen_state("p1", pid).unwrap_or(Value::Null);
    assert_eq!(
        (
            &seen["configuration"],
            &seen["runtime_data"],
            &seen["version"]
        ),
        (
            &json!({"preset": "fast"}),
            &Value::Null,
            &json!(expected_version(&v2))
        ),
        "contract (SPEC §4): nothing carried across starts; saw {seen}"
    );
    assert!(
        !runtime.exists(),
        "contract (SPEC §4): runtime.json is removed before each start"
    );
}

#[test]
fn installing_the_running_build_right_after_a_rollback_is_a_no_op() {
    let mut d = Daemon::new();
    let (v1, _) = d.start_running("p1", &Script::new("v1"));
    let mut sub = d.client();
    sub.subscribe(json!({"verbose": true}));
    d.install("p1", &Script::new("bad").broken());
    sub.wait_event(Duration::from_secs(20), "rolled_back", |e| {
        is_event(e, "rolled_back", "p1")
    });
    let pid = d.wait_started_n("p1", "v1", 2);
    let info = d.wait_running("p1", &v1);
    assert_eq!(info["pid"], pid, "v1 runs again; saw {info}");
    let starts = d.starts("p1", None).len();
    sub.collect_events(Duration::ZERO);
    let started_before = sub.named("plugin_started", "p1").len();
    let reloads_before = sub.named("reload_started", "p1").len();
    install_atomic(&d.exec_path("p1"), &v1, 0o755);
    // A reload would have started by now if the no-op check had let it through.
    sub.wait_event(
        Duration::from_secs(10),
        "contract (SPEC §5 no-op): change_ignored \"unchanged version\"",
        |e| {
            is_event(e, "change_ignored", "p1")
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("unchanged version"))
        },
    );
    d.prove_quiet();
    sub.collect_events(Duration::ZERO);
    assert_eq!(
        d.starts("p1", None).len(),
        starts,
        "contract (SPEC §5 no-op, always): nothing restarts after a rollback"
    );
    assert_eq!(
        (
            sub.named("reload_started", "p1").len(),
            sub.named("plugin_started", "p1").len()
        ),
        (reloads_before, started_before),
        "no reload, no start"
    );
    let info = d.wait_running("p1", &v1);
    assert_eq!(info["pid"], pid, "the same instance runs; saw {info}");
}

#[test]
fn missing_plugin_says_which_files_its_dir_holds_instead() {
    let mut d = Daemon::new();
    let dir = d.plugin_dir("p1");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("p1.bin"), "#!/bin/sh\n").unwrap();
    fs::write(dir.join("README"), "docs\n").unwrap();
    d.start();
    let info = d.wait_plugin("p1", "missing with a reason", |p| {
        p["state"] == "missing" && p["last_error"].is_string()
    });
    let exec = d.exec_path("p1");
    assert_eq!(
        info["last_error"],
        format!(
            "no executable `{}`; the directory holds: README, p1.bin",
            exec.display()
        ),
        "contract (SPEC §5 states): a dir without its executable says what it holds; saw {info}"
    );
    let detail = d.request(&json!({"cmd": "plugin", "plugin": "p1"}));
    assert_eq!(
        detail["plugin"]["last_error"], info["last_error"],
        "`plugin` says it too; saw {detail}"
    );
    // The build arrives: the reason is gone with the state.
    let v1 = d.install("p1", &Script::new("v1"));
    let info = d.wait_running("p1", &v1);
    assert!(
        info["last_error"].is_null(),
        "a started plugin has no error; saw {info}"
    );
}

#[test]
fn installing_the_build_still_serving_during_a_start_stop_retry_is_a_no_op() {
    let config = Config::new()
        .set("plugins.p1.strategy", json!("start-stop"))
        .set("hot_reload.retry_delay_ms", json!(5000));
    let mut d = Daemon::with_config(&config);
    let (v1, pid) = d.start_running("p1", &Script::new("v1"));
    let mut sub = d.client();
    sub.subscribe(json!({"verbose": true}));
    d.install("p1", &Script::new("bad").broken());
    let failed = sub.wait_named("reload_failed", "p1");
    assert_eq!(
        failed["retry_in_ms"], 5000,
        "waiting to retry; saw {failed}"
    );
    // v1 still serves while the broken build waits for its next attempt.
    install_atomic(&d.exec_path("p1"), &v1, 0o755);
    sub.wait_event(
        Duration::from_secs(10),
        "contract (SPEC §5 no-op, always): change_ignored \"unchanged version\"",
        |e| {
            is_event(e, "change_ignored", "p1")
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("unchanged version"))
        },
    );
    let ended = sub.wait_event(
        Duration::from_secs(10),
        "the final reload_failed of the broken build's reload",
        |e| is_event(e, "reload_failed", "p1") && e["retry_in_ms"].is_null(),
    );
    assert!(
        ended["error"]
            .as_str()
            .is_some_and(|e| e.contains("superseded")),
        "the reload waiting to retry ends, saying why; saw {ended}"
    );
    // `running`, not `reloading`: the retry of the broken build is gone with its job.
    let info = d.wait_running("p1", &v1);
    assert_eq!(info["pid"], pid, "the same instance runs; saw {info}");
    d.prove_quiet();
    assert_eq!(
        d.starts("p1", Some("v1")),
        vec![pid],
        "contract (SPEC §5 no-op, always): v1 never restarts"
    );
}

#[test]
fn preserve_state_false_with_a_read_only_state_dir_still_starts_the_plugin() {
    let config = Config::new().set("hot_reload.preserve_state", json!(false));
    let mut d = Daemon::with_config(&config);
    // A runtime.json of an earlier run, which cannot be removed.
    let runtime = d.runtime_file("p1");
    fs::create_dir_all(runtime.parent().unwrap()).unwrap();
    fs::write(&runtime, r#"{"old": true}"#).unwrap();
    let state = crate::util::sh_quote(&d.state.to_string_lossy());
    let ro = format!("mount --bind {state} {state} && mount -o remount,bind,ro {state}");
    if !launch_in_mount_namespace(&mut d, &ro) {
        return skip(
            "preserve_state_false_read_only",
            "needs root and unshare -m",
        );
    }
    d.start();
    let mut sub = d.client();
    sub.subscribe(json!({}));
    let v1 = d.install("p1", &Script::new("v1"));
    d.wait_running("p1", &v1);
    let warning = sub.wait_named("state_warning", "p1");
    assert!(
        warning["error"]
            .as_str()
            .is_some_and(|e| e.contains("Read-only file system")),
        "the failure is reported; saw {warning}"
    );
}

#[test]
fn trigger_of_a_first_start_the_runtime_dir_has_no_room_for_is_answered_and_retries_go_on() {
    let mut d = Daemon::new();
    let Some(filler) = start_with_a_full_runtime_dir(&mut d) else {
        return skip("trigger_of_a_first_start", "needs root and unshare -m");
    };
    let v1 = d.install("p1", &Script::new("v1"));
    d.wait_state("p1", "backoff");
    let resp = d.request_within(
        &json!({"cmd": "trigger", "plugin": "p1"}),
        Duration::from_secs(30),
    );
    let result = &resp["result"];
    assert!(
        result["ok"] == false
            && result["error"]
                .as_str()
                .is_some_and(|e| e.contains("No space left on device")),
        "the waiter gets the error after 1 + max_retries attempts; saw {resp}"
    );
    assert_eq!(
        d.plugin_info("p1").unwrap_or_default()["state"],
        "backoff",
        "the copy is still retried"
    );
    fs::remove_file(&filler).unwrap();
    wait_until(RECOVERY_TIMEOUT, "p1 running once space is freed", || {
        d.plugin_info("p1")
            .filter(|p| p["state"] == "running" && p["version"] == expected_version(&v1).as_str())
    });
}

#[test]
fn a_reload_the_full_runtime_dir_has_no_room_for_stops_nothing_and_goes_on_once_space_is_freed() {
    let mut d = Daemon::new();
    let Some(filler) = start_with_a_full_runtime_dir(&mut d) else {
        return skip(
            "reload_into_a_full_runtime_dir",
            "needs root and unshare -m",
        );
    };
    // v1 found room before the filler took the rest.
    fs::remove_file(&filler).unwrap();
    let v1 = d.install("p1", &Script::new("v1"));
    let pid = d.wait_started("p1", "v1");
    d.wait_running("p1", &v1);
    fill_to_the_last_block(&filler);
    let mut sub = d.client();
    sub.subscribe(json!({}));
    // Larger than v1: a spare copy file the daemon may have reserved in advance (after a
    // staging of v1 that found nothing new) has room for a build of v1's size only.
    let mut v2 = Script::new("v2").render(&d.root, "p1");
    v2.extend_from_slice(b"\n# ");
    v2.resize(v2.len() + 64 * 1024, b'#');
    v2.push(b'\n');
    install_atomic(&d.exec_path("p1"), &v2, 0o755);
    let failed = sub.wait_named("reload_failed", "p1");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left on device")),
        "contract (SPEC §5): the reload fails on the copy, saying why; saw {failed}"
    );
    let info = d.plugin_info("p1").unwrap_or_default();
    assert_eq!(
        info["pid"], pid,
        "contract (SPEC §5): the copy is reserved before anything is stopped; saw {info}"
    );
    // The reload retries the copy 1 + max_retries times, then gives up with v1 still serving;
    // once there is room again, a trigger reloads.
    sub.wait_event(RECOVERY_TIMEOUT, "the reload's last reload_failed", |e| {
        is_event(e, "reload_failed", "p1") && e["retry_in_ms"].is_null()
    });
    assert_eq!(d.plugin_info("p1").unwrap_or_default()["pid"], pid);
    fs::remove_file(&filler).unwrap();
    let answer = d.request(&json!({"cmd": "trigger", "plugin": "p1"}));
    assert_eq!(answer["result"]["ok"], true, "{answer}");
    wait_until(
        RECOVERY_TIMEOUT,
        "p1 running v2 once space is freed",
        || {
            d.plugin_info("p1").filter(|p| {
                p["state"] == "running" && p["version"] == expected_version(&v2).as_str()
            })
        },
    );
}
