//! The per-plugin lifecycle commands (SPEC §5 "Per-plugin lifecycle", §6 `stop`/`start`/
//! `restart`, §8): `stop ID` keeps a plugin stopped across new builds, `reload-config` and a
//! daemon restart until `start ID`; `restart ID` works on a failed plugin; and the per-plugin
//! hot reload switch (`enable ID` / `disable ID`, `[plugins.ID] hot_reload`), which a global
//! `enable` does not override. Through the socket (JSON and bare words) and `hotreloadctl`.

use std::fs;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::util::*;

/// A stop, start or restart waits for a plugin's stop and its startup grace; generous under load.
const WAIT: Duration = Duration::from_secs(30);

/// `result` of a waited-for lifecycle command, checked for its shape (SPEC §6).
#[track_caller]
fn lifecycle_result(resp: &Value, what: &str) -> Value {
    let result = assert_success(resp, what)["result"].clone();
    for member in ["plugin", "ok", "state", "version", "error"] {
        assert!(
            result.get(member).is_some(),
            "contract (SPEC §6): {what} answers result.{member}; saw {resp}"
        );
    }
    result
}

/// A subscriber that also hears why changes were ignored.
fn verbose_subscriber(d: &Daemon) -> Client {
    let mut sub = d.client();
    sub.subscribe(json!({"verbose": true}));
    sub
}

/// The `change_ignored` about `id` whose reason contains `words`.
#[track_caller]
fn wait_ignored(sub: &mut Client, id: &str, words: &str) -> Value {
    sub.wait_event(WAIT, &format!("change_ignored of {id} ({words})"), |e| {
        is_event(e, "change_ignored", id) && e["reason"].as_str().is_some_and(|r| r.contains(words))
    })
}

/// The daemon stops (SIGTERM) and starts again on the same directories.
fn restart_daemon(d: &mut Daemon) {
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(WAIT);
    assert!(status.success(), "clean stop: {status}");
    d.start();
}

#[test]
fn stop_start_and_restart_over_the_socket_answer_when_done() {
    let mut d = Daemon::new();
    let (content, pid) = d.start_running("p1", &Script::new("v1"));
    let version = expected_version(&content);
    let mut sub = d.client();
    sub.subscribe(json!({"plugin": "p1"}));

    let resp = d.request_within(&json!({"cmd": "stop", "plugin": "p1", "id": 7}), WAIT);
    assert_eq!(resp["id"], 7, "the id is echoed; saw {resp}");
    let result = lifecycle_result(&resp, "stop");
    assert_eq!(
        (
            &result["plugin"],
            &result["ok"],
            &result["state"],
            &result["version"]
        ),
        (
            &json!("p1"),
            &json!(true),
            &json!("stopped"),
            &json!(version)
        ),
        "contract (SPEC §6): stop answers once the plugin is stopped; saw {resp}"
    );
    assert!(
        d.stops("p1", Some("v1")).contains(&pid),
        "the plugin was asked to stop"
    );
    assert!(!pid_alive(pid));
    sub.wait_named("plugin_stopped", "p1");
    let info = d.plugin_info("p1").unwrap();
    assert_eq!(info["state"], "stopped");
    assert!(
        info["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("stop")),
        "contract (SPEC §5): list says why it is stopped; saw {info}"
    );

    // A bare-word request.
    let mut c = d.client();
    c.send_raw(b"start p1\n");
    let resp = c.read_json(WAIT);
    let result = lifecycle_result(&resp, "start");
    assert_eq!(
        (&result["ok"], &result["state"], &result["version"]),
        (&json!(true), &json!("running"), &json!(version)),
        "contract (SPEC §6): start answers once the plugin runs; saw {resp}"
    );
    let started = d.wait_started_n("p1", "v1", 2);
    let requested = sub.wait_named("plugin_start_requested", "p1");
    assert_eq!(requested["action"], "start", "saw {requested}");

    let mut c = d.client();
    c.send_raw(b"restart p1\n");
    let resp = c.read_json(WAIT);
    let result = lifecycle_result(&resp, "restart");
    assert_eq!(
        (&result["ok"], &result["state"]),
        (&json!(true), &json!("running")),
        "contract (SPEC §5): restart restarts a running plugin whatever the version; saw {resp}"
    );
    assert!(!pid_alive(started), "the old instance is gone");
    let restarted = d.wait_started_n("p1", "v1", 3);
    assert_eq!(d.plugin_info("p1").unwrap()["pid"], restarted);

    let resp = d.request(&json!({"cmd": "stop", "plugin": "p1", "wait": false}));
    assert_eq!(
        assert_success(&resp, "stop without wait")["scheduled"],
        true,
        "contract (SPEC §6): wait false answers scheduled at once; saw {resp}"
    );
    d.wait_state("p1", "stopped");
    let resp = d.request(&json!({"cmd": "stop", "plugin": "nope"}));
    assert_error(&resp, "unknown_plugin", "stop of an unknown plugin");
}

#[test]
fn a_stopped_plugin_stays_stopped_across_a_build_a_config_reload_and_a_daemon_restart() {
    let mut d = Daemon::new();
    let (_, pid) = d.start_running("p1", &Script::new("v1"));
    let out = d.ctl(&["stop", "p1"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("p1: stopped"), "{out:?}");
    assert!(!pid_alive(pid));
    let state: Value = serde_json::from_slice(&fs::read(d.state_file("p1")).unwrap()).unwrap();
    assert!(
        state["stopped_by_request"].is_string(),
        "the stop is recorded in the state file; saw {state}"
    );

    let mut sub = verbose_subscriber(&d);
    let v2 = d.install("p1", &Script::new("v2"));
    wait_ignored(&mut sub, "p1", "stopped");

    let out = d.ctl(&["reload-config"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    restart_daemon(&mut d);
    d.prove_quiet();
    assert_eq!(d.plugin_info("p1").unwrap()["state"], "stopped");
    assert_eq!(
        d.starts("p1", None).len(),
        1,
        "started once, before the stop"
    );

    let out = d.ctl(&["start", "p1"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("p1: running"), "{out:?}");
    d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
    let state: Value = serde_json::from_slice(&fs::read(d.state_file("p1")).unwrap()).unwrap();
    assert!(state.get("stopped_by_request").is_none(), "saw {state}");
}

#[test]
fn restart_via_hotreloadctl_brings_back_a_failed_plugin() {
    let config = Config::new().set("supervisor.restart", json!("never"));
    let mut d = Daemon::with_config(&config);
    let (_, pid) = d.start_running("p1", &Script::new("v1"));
    send_signal(pid, Signal::SIGKILL);
    d.wait_state("p1", "failed");
    let out = d.ctl(&["restart", "p1"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("p1: running"), "{out:?}");
    d.wait_started_n("p1", "v1", 2);

    let out = d.ctl(&["stop", "p1", "--no-wait"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("stop scheduled"), "{out:?}");
    d.wait_state("p1", "stopped");
    let out = d.ctl(&["--json", "restart", "p1"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let reply: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(reply["result"]["state"], "running", "saw {reply}");
    let out = d.ctl(&["start", "nope"]);
    assert_eq!(
        out.code(),
        Some(1),
        "an unknown plugin is the daemon's error: {out:?}"
    );
}

#[test]
fn a_plugin_disabled_on_its_own_stays_off_across_a_global_enable_until_enable_id() {
    let mut d = Daemon::new();
    d.install("p2", &Script::new("v1"));
    d.start_running("p1", &Script::new("v1"));
    d.wait_started("p2", "v1");
    let out = d.ctl(&["disable", "p1"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("p1: hot reload disabled"), "{out:?}");
    let switches: Vec<(Value, Value)> = d
        .list()
        .iter()
        .map(|p| (p["id"].clone(), p["hot_reload"].clone()))
        .collect();
    assert_eq!(
        switches,
        [(json!("p1"), json!(false)), (json!("p2"), json!(true))],
        "contract (SPEC §6): list shows each plugin's hot_reload"
    );

    let mut sub = verbose_subscriber(&d);
    let p1_v2 = d.install("p1", &Script::new("v2"));
    wait_ignored(&mut sub, "p1", "for this plugin");
    for command in ["disable", "enable"] {
        let out = d.ctl(&[command]);
        assert_eq!(out.code(), Some(0), "{out:?}");
    }
    let p2_v2 = d.install("p2", &Script::new("v2"));
    d.wait_running("p2", &p2_v2);
    assert!(
        d.starts("p1", Some("v2")).is_empty(),
        "contract (SPEC §5): a global enable does not re-enable p1"
    );

    restart_daemon(&mut d);
    let info = d.plugin_info("p1").unwrap();
    assert_eq!(
        info["hot_reload"], false,
        "kept across a daemon restart; saw {info}"
    );
    let resp = d.request(&json!({"cmd": "enable", "plugin": "p1"}));
    assert_eq!(
        assert_success(&resp, "enable p1")["enabled"],
        true,
        "saw {resp}"
    );
    // The daemon restart started v2 (its newest build): the switch is about changes.
    d.wait_running("p1", &p1_v2);
}

#[test]
fn enable_id_reloads_a_build_that_changed_while_the_plugin_was_disabled() {
    let config = Config::new().set("plugins.p1.hot_reload", json!(false));
    let mut d = Daemon::with_config(&config);
    d.start_running("p1", &Script::new("v1"));
    assert_eq!(d.plugin_info("p1").unwrap()["hot_reload"], false);
    let mut sub = verbose_subscriber(&d);
    let v2 = d.install("p1", &Script::new("v2"));
    wait_ignored(&mut sub, "p1", "for this plugin");
    let mut c = d.client();
    c.send_raw(b"enable p1\n");
    let resp = c.read_json(REQUEST_TIMEOUT);
    assert_eq!(assert_success(&resp, "enable p1")["enabled"], true);
    let started = sub.wait_named("reload_started", "p1");
    assert_eq!(started["trigger"], "enable", "saw {started}");
    d.wait_running("p1", &v2);
}

#[test]
fn lifecycle_and_per_plugin_switch_commands_from_a_foreign_uid_are_permission_denied() {
    let mut d = Daemon::with_config(&Config::new().set("control.mode", json!("0666")));
    let (_, pid) = d.start_running("p1", &Script::new("v1"));
    let lines = [
        "stop p1",
        "start p1",
        "restart p1",
        "disable p1",
        "enable p1",
        r#"{"cmd": "stop", "plugin": "p1", "wait": false}"#,
    ];
    let Some(answers) = d.requests_as_nobody(&lines) else {
        println!("SKIPPED: the peer-credential test needs root to run a client as nobody");
        return;
    };
    for (answer, line) in answers.iter().zip(lines) {
        assert_error(answer, "permission_denied", &format!("{line} from nobody"));
    }
    let info = d.plugin_info("p1").unwrap();
    assert_eq!(
        (&info["state"], &info["pid"], &info["hot_reload"]),
        (&json!("running"), &json!(pid), &json!(true)),
        "nothing changed; saw {info}"
    );
}

#[test]
fn hot_reload_switched_on_in_the_config_reloads_a_build_that_changed_meanwhile() {
    let off = Config::new().set("plugins.p1.hot_reload", json!(false));
    let mut d = Daemon::with_config(&off);
    d.start_running("p1", &Script::new("v1"));
    let mut sub = verbose_subscriber(&d);
    let v2 = d.install("p1", &Script::new("v2"));
    wait_ignored(&mut sub, "p1", "for this plugin");
    d.write_config(&Config::new().set("plugins.p1.hot_reload", json!(true)));
    let resp = d.request(&json!({"cmd": "reload-config"}));
    assert_success(&resp, "reload-config");
    d.wait_running("p1", &v2);
    assert_eq!(d.plugin_info("p1").unwrap()["hot_reload"], true);
}
