//! The start limit (SPEC §3 `start_limit_burst`, `start_limit_interval_ms`; §5 "Crashes" and
//! "Start limit"; §6 event `start_limit_hit`): restarts after crashes back off, doubling, and a
//! plugin the daemon keeps restarting on its own is `failed` after `start_limit_burst + 1`
//! starts inside the window, whatever the delays, until someone acts. Reloads for new builds
//! never count.
//!
//! Starts are counted from the daemon's own `plugin_started` events and from the `start` lines
//! the test plugins append to their log, never from timing.

use std::ffi::OsString;
use std::time::Duration;

use serde_json::{Value, json};

use crate::util::*;

/// A window no test run comes near, however loaded the machine: every start is inside it.
const WINDOW_MS: u64 = 60_000;
/// Long enough for a few backed-off restarts on a loaded machine.
const LONG: Duration = Duration::from_secs(30);

/// The daemon with `config` and no plugin yet, and a subscriber that sees every event of the
/// plugins installed afterwards.
fn daemon_and_subscriber(config: &Config) -> (Daemon, Client) {
    let mut d = Daemon::with_config(config);
    d.start();
    let mut sub = d.client();
    sub.subscribe(json!({}));
    (d, sub)
}

fn limit_config(burst: u64) -> Config {
    Config::new()
        .set("supervisor.start_limit_burst", json!(burst))
        .set("supervisor.start_limit_interval_ms", json!(WINDOW_MS))
}

/// Waits for `start_limit_hit` about `id` and checks its fields.
#[track_caller]
fn wait_limit_hit(sub: &mut Client, id: &str, burst: u64) -> Value {
    let hit = sub.wait_event(LONG, "start_limit_hit", |e| {
        is_event(e, "start_limit_hit", id)
    });
    assert!(
        hit["restarts"] == burst && hit["interval_ms"] == WINDOW_MS,
        "contract (SPEC §6): start_limit_hit carries restarts = {burst} and interval_ms = \
         {WINDOW_MS}; saw {hit}"
    );
    hit
}

/// The `last_error` of a plugin the limit stopped (SPEC §5).
fn limit_error(burst: u64) -> String {
    format!("start limit hit: {burst} restarts in {WINDOW_MS} ms")
}

#[test]
fn restart_storm_with_zero_delays_stops_after_burst_plus_one_starts() {
    const BURST: u64 = 3;
    // The settings of the issue: every delay zero, a plugin that exits at once, restarted
    // always; and retries of failed starts that would go on for long.
    let config = limit_config(BURST)
        .set("supervisor.restart", json!("always"))
        .set("hot_reload.retry_delay_ms", json!(0))
        .set("supervisor.startup_grace_ms", json!(0))
        .set("hot_reload.max_retries", json!(1000));
    let (d, mut sub) = daemon_and_subscriber(&config);
    d.install("p1", &Script::new("v1").exit_now(0));
    wait_limit_hit(&mut sub, "p1", BURST);
    let info = d.wait_state("p1", "failed");
    assert_eq!(
        info["last_error"],
        limit_error(BURST),
        "contract (SPEC §5): last_error says the start limit was hit; saw {info}"
    );
    let started = sub.named("plugin_started", "p1");
    assert_eq!(
        started.len() as u64,
        BURST + 1,
        "contract (SPEC §5): at most start_limit_burst + 1 starts per window; saw {started:?}"
    );
    // `failed` has nothing scheduled: what the plugins logged is final.
    assert_eq!(
        d.starts("p1", None).len() as u64,
        BURST + 1,
        "contract (SPEC §5): the plugin ran start_limit_burst + 1 times; log {:?}",
        d.log_lines("p1")
    );
    // A new build starts it again.
    let v2 = d.install("p1", &Script::new("v2"));
    d.wait_running("p1", &v2);
}

#[test]
fn eight_quick_rebuilds_do_not_hit_the_limit() {
    const BURST: u64 = 1;
    let config = limit_config(BURST).set("supervisor.restart", json!("always"));
    let (d, mut sub) = daemon_and_subscriber(&config);
    let v0 = d.install("p1", &Script::new("v0"));
    d.wait_running("p1", &v0);
    for n in 1..=8 {
        let build = d.install("p1", &Script::new(&format!("v{n}")));
        let version = expected_version(&build);
        sub.wait_event(LONG, &format!("reload {n} to {version}"), |e| {
            is_event(e, "reload_succeeded", "p1") && e["new_version"] == version.as_str()
        });
    }
    let started = sub.named("plugin_started", "p1");
    assert_eq!(started.len(), 9, "one start per build; saw {started:?}");
    let info = d.wait_state("p1", "running");
    assert!(
        sub.named("start_limit_hit", "p1").is_empty() && info["last_error"].is_null(),
        "contract (SPEC §5): reloads for new builds never count; saw {info}"
    );
}

#[test]
fn a_plugin_that_crashes_after_ready_backs_off_doubling_until_the_limit() {
    const BURST: u64 = 3;
    const BASE_MS: i64 = 200;
    // Timestamps are in whole milliseconds on both sides of a gap.
    const TOLERANCE_MS: i64 = 5;
    let config = limit_config(BURST)
        .set("hot_reload.retry_delay_ms", json!(BASE_MS))
        .set("supervisor.startup_grace_ms", json!(100));
    let (d, mut sub) = daemon_and_subscriber(&config);
    // Outlives the startup grace, so each run counts as started, then crashes.
    d.install("p1", &Script::new("v1").exit_after(300, 1));
    wait_limit_hit(&mut sub, "p1", BURST);
    let info = d.wait_state("p1", "failed");
    assert_eq!(
        info["last_error"],
        limit_error(BURST),
        "contract (SPEC §5): last_error says the start limit was hit; saw {info}"
    );
    assert_eq!(
        sub.named("plugin_ready", "p1").len() as u64,
        BURST + 1,
        "every run got ready before it crashed"
    );
    let exits = sub.named("plugin_exited", "p1");
    let starts = sub.named("plugin_started", "p1");
    assert_eq!(starts.len() as u64, BURST + 1, "{starts:?}");
    let gaps: Vec<i64> = exits
        .iter()
        .zip(&starts[1..])
        .map(|(exit, start)| event_ms(start) - event_ms(exit))
        .collect();
    for (n, gap) in gaps.iter().enumerate() {
        let expected = BASE_MS << n;
        assert!(
            *gap >= expected - TOLERANCE_MS,
            "contract (SPEC §5): the delay doubles per restart: restart {} expected after \
             {expected} ms; gaps between exit and restart {gaps:?}",
            n + 1
        );
    }
    // A trigger starts it again, with a fresh count.
    let resp = d.request_within(&json!({"cmd": "trigger", "plugin": "p1"}), LONG);
    assert_eq!(
        assert_success(&resp, "trigger")["result"]["ok"],
        true,
        "contract (SPEC §5): trigger starts a plugin the start limit stopped; saw {resp}"
    );
    let known: Vec<Value> = starts.iter().map(|s| s["pid"].clone()).collect();
    sub.wait_event(LONG, "the start the trigger asked for", |e| {
        is_event(e, "plugin_started", "p1") && !known.contains(&e["pid"])
    });
}

/// The same bytes landing again while a crashed plugin waits for its restart are not a new
/// build (SPEC §5 "No-op, always"): the pending restart goes on, still counted by the start
/// limit, instead of a reload that would start it at once and wipe the count.
#[test]
fn the_same_build_landing_during_a_crash_restart_is_a_no_op() {
    let config = limit_config(5)
        .set("hot_reload.retry_delay_ms", json!(1500))
        .set("supervisor.startup_grace_ms", json!(100));
    let (d, mut sub) = daemon_and_subscriber(&config);
    let mut verbose = d.client();
    verbose.subscribe(json!({"verbose": true}));
    let v1 = d.install("p1", &Script::new("v1").exit_after(300, 1));
    let first = sub.wait_named("plugin_exited", "p1");
    install_atomic(&d.exec_path("p1"), &v1, 0o755);
    let version = expected_version(&v1);
    verbose.wait_event(LONG, "change_ignored for the same bytes", |e| {
        is_event(e, "change_ignored", "p1")
            && e["reason"].as_str().is_some_and(|r| r.contains(&version))
    });
    let restart = sub.wait_event(LONG, "the crash restart", |e| {
        is_event(e, "plugin_started", "p1") && e["pid"] != first["pid"]
    });
    assert!(
        event_ms(&restart) - event_ms(&first) >= 1500 - 5,
        "the restart kept its backoff: exit {first}, restart {restart}"
    );
    assert!(
        sub.named("reload_started", "p1").is_empty(),
        "contract (SPEC §5): no reload for the build that is about to restart; saw {:?}",
        sub.named("reload_started", "p1")
    );
}

#[test]
fn watchdog_kills_count_as_automatic_restarts() {
    const BURST: u64 = 2;
    let config = limit_config(BURST)
        .set("hot_reload.retry_delay_ms", json!(0))
        .set("supervisor.startup_grace_ms", json!(50))
        .set("plugins.p1.watchdog_ms", json!(200));
    let (d, mut sub) = daemon_and_subscriber(&config);
    // Never sends WATCHDOG=1: each run is killed by the watchdog once it counts as started.
    d.install("p1", &Script::new("v1"));
    wait_limit_hit(&mut sub, "p1", BURST);
    let info = d.wait_state("p1", "failed");
    assert_eq!(info["last_error"], limit_error(BURST), "{info}");
    let kills = sub.named("plugin_watchdog", "p1");
    assert_eq!(
        kills.len() as u64,
        BURST + 1,
        "contract (SPEC §5): every run was killed by the watchdog; saw {kills:?}"
    );
    assert_eq!(
        sub.named("plugin_started", "p1").len() as u64,
        BURST + 1,
        "contract (SPEC §5): a watchdog kill counts as an automatic restart"
    );
}

#[test]
fn check_config_shows_the_start_limit_and_refuses_a_bad_one() {
    let d = Daemon::with_config_text(
        "[supervisor]\nstart_limit_burst = 2\n[plugins.p1]\nstart_limit_interval_ms = 0\n",
    );
    let check = |d: &Daemon| {
        let args: [OsString; 3] = [
            "--config".into(),
            d.config_path.clone().into(),
            "--check-config".into(),
        ];
        d.run_daemon(&args)
    };
    let out = check(&d);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let effective: toml::Table = toml::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("--check-config prints TOML ({e}): {}", out.stdout));
    let effective = serde_json::to_value(effective).unwrap();
    let expected = [
        ("/supervisor/start_limit_burst", json!(2)),
        ("/supervisor/start_limit_interval_ms", json!(10_000)),
        ("/plugins/p1/start_limit_burst", json!(2)),
        ("/plugins/p1/start_limit_interval_ms", json!(0)),
    ];
    for (pointer, value) in expected {
        assert_eq!(
            effective.pointer(pointer),
            Some(&value),
            "contract (SPEC §3): {pointer}; printed {}",
            out.stdout
        );
    }
    d.write_config_text("[plugins.p1]\nstart_limit_burst = 100000\n");
    let out = check(&d);
    assert_eq!(out.code(), Some(EX_CONFIG), "{out:?}");
    assert!(
        out.stderr
            .contains("`start_limit_burst` in [plugins.p1]: 100000"),
        "contract (SPEC §3): the error names the key and the value; saw {}",
        out.stderr
    );
}
