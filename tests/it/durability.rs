//! Crash safety of `state.json` on the reload path (hotreloadd(8), DURABILITY): the daemon
//! writes a reload's state file whole and renames it into place before the spawn, and does its
//! fsyncs after it. A SIGKILL of the daemon at any point of any reload must still leave a
//! `state.json` that is whole, parses, and is not older than the last start that happened.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::util::*;

/// How long the kill loop runs, and the reloads it stops at (the issue asks for 500).
const KILL_LOOP: Duration = Duration::from_secs(20);
const MAX_RELOADS: usize = 500;

/// One build per label; the daemon's version of each, in install order.
struct Builds {
    versions: Vec<String>,
}

impl Builds {
    /// Position of `version` in install order: later builds are newer.
    fn index(&self, version: &str) -> Option<usize> {
        self.versions.iter().position(|v| v == version)
    }
}

/// A random number below `n` (the kill point), from the test utilities' random source.
fn below(n: u64) -> u64 {
    u64::from_str_radix(&random_hex(4), 16).unwrap_or(0) % n.max(1)
}

/// Every `plugin_started` version of `p1` the daemon announced before it died: the stream is
/// read to its end (EOF), so an event written just before the SIGKILL counts too.
fn started_versions(sub: &mut Client) -> Vec<String> {
    let mut versions = Vec::new();
    loop {
        match sub.try_read_line(TIMEOUT) {
            Line::Text(line) => {
                let Ok(event) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                if is_event(&event, "plugin_started", "p1") {
                    versions.push(event["version"].as_str().unwrap_or("").to_string());
                }
            }
            Line::Eof => return versions,
            Line::Timeout => panic!("the dead daemon's socket did not reach EOF"),
        }
    }
}

#[test]
fn sigkill_of_the_daemon_at_random_points_of_reloads_never_leaves_state_json_torn_or_old() {
    let config = Config::new()
        .set("hot_reload.debounce_delay_ms", json!(0))
        .set("hot_reload.max_retries", json!(0))
        .set("supervisor.startup_grace_ms", json!(1));
    let mut d = Daemon::with_config(&config);
    let mut builds = Builds {
        versions: Vec::new(),
    };
    let first = d.install("p1", &Script::new("b0").exec_sleep());
    builds.versions.push(expected_version(&first));
    let deadline = Instant::now() + KILL_LOOP;
    let (mut kills, mut reloads) = (0usize, 0usize);
    while Instant::now() < deadline && reloads < MAX_RELOADS {
        d.start();
        let mut sub = d.client();
        sub.subscribe(json!({}));
        // The restarted daemon starts the newest build (or has already: the event may precede
        // the subscription, `list` says so either way).
        let newest = builds.versions.len() - 1;
        d.wait_plugin("p1", "running the newest build", |p| {
            p["version"] == builds.versions[newest].as_str() && p["pid"].is_i64()
        });
        // A few reloads that complete, then one during which the daemon is killed: after its
        // install, at a random point within a few milliseconds (the whole reload's span).
        let completed = below(4);
        for i in 0..=completed {
            let label = format!("b{}", builds.versions.len());
            let content = d.install("p1", &Script::new(&label).exec_sleep());
            let version = expected_version(&content);
            builds.versions.push(version.clone());
            reloads += 1;
            if i < completed {
                sub.wait_event(TIMEOUT, "the reload's start", |e| {
                    is_event(e, "plugin_started", "p1") && e["version"] == version.as_str()
                });
            }
        }
        // Jitter, not synchronisation: where in the last reload the SIGKILL lands.
        thread::sleep(Duration::from_micros(below(4000)));
        d.signal(Signal::SIGKILL);
        d.wait_exit(TIMEOUT);
        kills += 1;
        let started = started_versions(&mut sub);
        // The next daemon refuses to start (exit 71, "another hotreloadd is already listening")
        // while a listener of the killed one still answers, which was seen for a few ms after
        // the kill under load; this test is about state.json, so it waits for that to pass.
        wait_until(
            TIMEOUT,
            "the killed daemon's control socket to stop answering",
            || {
                std::os::unix::net::UnixStream::connect(&d.socket)
                    .is_err()
                    .then_some(())
            },
        );
        let path = d.state_file("p1");
        let bytes = fs::read(&path)
            .unwrap_or_else(|e| panic!("kill {kills}: {} must exist: {e}", path.display()));
        let state: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "kill {kills}: contract (SPEC §4): state.json is never torn or empty; {e}: {:?}",
                String::from_utf8_lossy(&bytes)
            )
        });
        assert_eq!(state["plugin_id"], "p1", "kill {kills}: {state}");
        let on_disk = state["version"].as_str().unwrap_or("");
        let on_disk_index = builds
            .index(on_disk)
            .unwrap_or_else(|| panic!("kill {kills}: state.json names no build: {state}"));
        if let Some(last) = started.last() {
            let last_index = builds.index(last).expect("a started version is a build");
            assert!(
                on_disk_index >= last_index,
                "kill {kills}: state.json ({on_disk}, build {on_disk_index}) is older than the \
                 last start the daemon announced ({last}, build {last_index})"
            );
        }
        wait_until(TIMEOUT, "the plugin to die with the daemon", || {
            d.plugin_processes().is_empty().then_some(())
        });
    }
    // Every instance that ran read a state file naming its own version: what the daemon wrote
    // before it spawned it (the plugin copies $HOTRELOAD_STATE_FILE as it starts).
    let mut checked = 0;
    for entry in fs::read_dir(&d.root).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("seen-state-p1-")
            .and_then(|rest| rest.strip_suffix(".json"))
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(seen) = serde_json::from_slice::<Value>(&fs::read(entry.path()).unwrap()) else {
            // The copy itself may have been cut short by the kill (PDEATHSIG) of its plugin.
            continue;
        };
        // Written by the plugin at start too, and possibly cut short the same way.
        let env = fs::read_to_string(d.root.join(format!("env-p1-{pid}.txt"))).unwrap_or_default();
        let version = env
            .lines()
            .find_map(|l| l.strip_prefix("HOTRELOAD_VERSION="))
            .filter(|v| v.len() == 16);
        if let Some(version) = version {
            assert_eq!(
                seen["version"], version,
                "the instance {pid} read the state written for it: {seen}"
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "no instance recorded the state it read");
    assert!(
        kills >= 10,
        "only {kills} kills in {KILL_LOOP:?}: too few to mean anything ({reloads} reloads)"
    );
    eprintln!("{kills} SIGKILLs during {reloads} reloads, {checked} starts read their state");
}
