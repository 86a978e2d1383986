//! Configuration (SPEC §3, §7): errors at start are fatal with exit 78 and a precise message,
//! `--check-config` prints the effective configuration, and SIGHUP applies a good file or keeps
//! the running configuration when the new one is broken.

use std::ffi::OsString;

use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::util::{Client, Config, Daemon, EX_CONFIG, Output, TIMEOUT, assert_success};

/// Starts the daemon, which must refuse its configuration and exit 78 (SPEC §3); returns what
/// it wrote on stderr.
#[track_caller]
fn start_refused(d: &mut Daemon) -> String {
    d.spawn();
    let status = d.wait_exit(TIMEOUT);
    let text = d.stderr_text();
    assert_eq!(
        status.code(),
        Some(EX_CONFIG),
        "contract (SPEC §3): exit 78; stderr {text}"
    );
    text
}

/// Runs `hotreloadd --config <the daemon's file> --check-config`.
fn check_config(d: &Daemon) -> Output {
    let args: Vec<OsString> = vec![
        "--config".into(),
        d.config_path.clone().into(),
        "--check-config".into(),
    ];
    d.run_daemon(&args)
}

#[test]
fn unknown_key_exits_78_naming_file_line_column_key_and_valid_keys() {
    let mut d = Daemon::with_config_text("[hot_reload]\ndebounce_delay_ms = 50\n  bogus_key = 1\n");
    let text = start_refused(&mut d);
    assert!(
        text.contains("bogus_key"),
        "contract: names the key; saw {text}"
    );
    assert!(
        text.contains("hotreload.toml"),
        "contract: names the file; saw {text}"
    );
    assert!(
        crate::util::mentions_line_and_column(&text, 3, 3),
        "contract: gives line 3, column 3; saw {text}"
    );
    assert!(
        text.contains("retry_delay_ms"),
        "contract: lists the valid keys; saw {text}"
    );
}

#[test]
fn wrongly_typed_value_exits_78_naming_the_key_and_line() {
    let d = Daemon::with_config_text("[supervisor]\nstop_timeout_ms = \"soon\"\n");
    let out = check_config(&d);
    let text = out.text();
    assert_eq!(
        out.code(),
        Some(EX_CONFIG),
        "contract (SPEC §3): exit 78; saw {text}"
    );
    assert!(
        text.contains("stop_timeout_ms"),
        "contract: names the key; saw {text}"
    );
    assert!(
        text.contains("hotreload.toml"),
        "contract: names the file; saw {text}"
    );
    assert!(
        text.contains("line 2") || text.contains(":2:"),
        "contract: gives line 2; {text}"
    );
}

#[test]
fn invalid_environment_value_exits_78_naming_the_variable() {
    let mut d = Daemon::new();
    d.set_env("HOTRELOAD_DEBOUNCE_MS", "soon");
    let text = start_refused(&mut d);
    assert!(
        text.contains("HOTRELOAD_DEBOUNCE_MS"),
        "contract: names the variable; {text}"
    );
    assert!(
        text.contains("soon"),
        "contract: names the value; saw {text}"
    );
}

#[test]
fn check_config_prints_the_effective_configuration_as_toml_with_defaults() {
    let d = Daemon::with_config_text(
        "[hot_reload]\ndebounce_delay_ms = 123\nwatch_patterns = [\"*_scanner\"]\n",
    );
    let out = check_config(&d);
    assert_eq!(
        out.code(),
        Some(0),
        "contract (SPEC §3): --check-config exits 0; {out:?}"
    );
    let effective: toml::Table = toml::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("contract: --check-config prints TOML ({e}): {}", out.stdout));
    let effective = serde_json::to_value(effective).unwrap();
    let expected = [
        ("/hot_reload/debounce_delay_ms", json!(123)),
        ("/hot_reload/watch_patterns", json!(["*_scanner"])),
        ("/hot_reload/enabled", json!(true)),
        ("/hot_reload/max_retries", json!(3)),
        ("/hot_reload/retry_delay_ms", json!(1000)),
        ("/hot_reload/preserve_state", json!(true)),
        ("/supervisor/stop_timeout_ms", json!(5000)),
        ("/supervisor/startup_grace_ms", json!(500)),
        ("/supervisor/restart", json!("on-failure")),
        ("/control/max_clients", json!(256)),
        ("/control/max_line_bytes", json!(65536)),
    ];
    for (pointer, value) in expected {
        let seen = effective.pointer(pointer);
        assert_eq!(
            seen,
            Some(&value),
            "contract (SPEC §3): {pointer}; printed {}",
            out.stdout
        );
    }
}

/// The configured parts of `status.hot_reload` (not the counters).
fn configured(status: &Value) -> Value {
    let hot = &status["hot_reload"];
    json!([
        hot["enabled"],
        hot["debounce_delay_ms"],
        hot["watch_patterns"],
        hot["exclude_patterns"]
    ])
}

/// Sends SIGHUP and waits on `sub` (subscribed to all events) for `event`, the daemon's answer.
fn sighup_answered_by(d: &Daemon, sub: &mut Client, event: &str) -> Value {
    d.signal(Signal::SIGHUP);
    sub.wait_event(TIMEOUT, event, |e| e["event"] == event)
}

#[test]
fn sighup_with_a_broken_config_keeps_the_running_one() {
    let mut d = Daemon::new();
    d.start();
    let before = configured(&d.status());
    let mut sub = d.client();
    sub.subscribe(json!({}));
    d.write_config_text("[hot_reload]\ndebounce_delay_ms = 77\nbogus = 1\n");
    let rejected = sighup_answered_by(&d, &mut sub, "config_rejected");
    let error = rejected["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("bogus"),
        "contract (SPEC §6): config_rejected error; saw {rejected}"
    );
    assert!(
        d.try_exit().is_none(),
        "contract (SPEC §3): the daemon keeps running"
    );
    assert_eq!(
        configured(&d.status()),
        before,
        "contract (SPEC §3): the running config stays"
    );
}

#[test]
fn sighup_with_a_good_changed_config_applies_it() {
    let mut d = Daemon::new();
    d.start();
    let mut sub = d.client();
    sub.subscribe(json!({}));
    d.write_config(&Config::new().set("hot_reload.debounce_delay_ms", json!(77)));
    sighup_answered_by(&d, &mut sub, "config_reloaded");
    let status = d.status();
    assert_success(&status, "status after SIGHUP");
    let debounce = &status["hot_reload"]["debounce_delay_ms"];
    assert_eq!(
        debounce, 77,
        "contract (SPEC §7): SIGHUP applies the new config; saw {status}"
    );
}
