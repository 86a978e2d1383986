//! `stop_signal` (SPEC §3, issue 12): the signal that asks a plugin to stop, from `[supervisor]`
//! or the plugin's own table, is what the plugin receives at every stop the daemon makes (here:
//! a reload and the daemon's own shutdown), with the SIGKILL escalation unchanged.

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;

use crate::util::{Config, Daemon, Script, TIMEOUT, wait_until};

/// The signals a test plugin reports: `caught <SIG> <label> <pid>` in its log, then it exits.
const REPORTED: [&str; 5] = ["INT", "QUIT", "HUP", "USR1", "USR2"];

/// A plugin that logs which of [`REPORTED`] arrived (SIGTERM logs `stop` as usual) and exits 0.
fn reporting(label: &str) -> Script {
    let mut script = Script::new(label);
    for signal in REPORTED {
        // `$!` is the `sleep` of the wait loop: a background job ignores SIGINT and SIGQUIT in a
        // non-interactive shell, so the trap ends it rather than leaving it to the stop timeout.
        script = script.shell(&format!(
            "trap 'echo \"caught {signal} {label} $$\" >>\"$LOG\"; kill $! 2>/dev/null; exit 0' {signal}"
        ));
    }
    script
}

/// `(signal, label, pid)` of every `caught` line of `id`'s log.
fn caught(d: &Daemon, id: &str) -> Vec<(String, String, i32)> {
    d.log_lines(id)
        .into_iter()
        .filter(|words| words.len() == 4 && words[0] == "caught")
        .map(|w| (w[1].clone(), w[2].clone(), w[3].parse().unwrap_or(0)))
        .collect()
}

#[test]
fn the_configured_stop_signal_reaches_the_plugin_on_a_reload_and_at_daemon_stop() {
    let config = Config::new()
        .set("supervisor.stop_signal", json!("SIGINT"))
        .set("plugins.p2.stop_signal", json!("USR1"));
    let mut d = Daemon::with_config(&config);
    d.install("p2", &reporting("w1"));
    let (_, v1) = d.start_running("p1", &reporting("v1"));
    let w1 = d.wait_started("p2", "w1");
    let v2_build = d.install("p1", &reporting("v2"));
    let v2 = d.wait_started("p1", "v2");
    d.wait_running("p1", &v2_build);
    assert_eq!(
        caught(&d, "p1"),
        [("INT".to_owned(), "v1".to_owned(), v1)],
        "contract (SPEC §3 stop_signal): a reload stops the old instance with [supervisor] \
         stop_signal = \"SIGINT\", not SIGTERM; log {:?}",
        d.log_lines("p1")
    );
    assert!(d.stops("p1", None).is_empty(), "no SIGTERM was sent");
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", d.stderr_tail());
    wait_until(TIMEOUT, "both plugins to log their stop signal", || {
        (caught(&d, "p1").len() == 2 && caught(&d, "p2").len() == 1).then_some(())
    });
    assert_eq!(
        caught(&d, "p1")[1],
        ("INT".to_owned(), "v2".to_owned(), v2),
        "the daemon's shutdown sends stop_signal too"
    );
    assert_eq!(
        caught(&d, "p2"),
        [("USR1".to_owned(), "w1".to_owned(), w1)],
        "[plugins.p2] stop_signal = \"USR1\" overrides [supervisor]'s"
    );
}

#[test]
fn a_stop_signal_that_cannot_be_caught_is_a_config_error_naming_key_and_value() {
    let config = Config::new().set("plugins.p1.stop_signal", json!("SIGKILL"));
    let d = Daemon::with_config(&config);
    let mut args = d.daemon_args();
    args.push("--check-config".into());
    let out = d.run_daemon(&args);
    assert_eq!(out.code(), Some(crate::util::EX_CONFIG), "{out:?}");
    for needle in [
        "invalid value for `stop_signal` in [plugins.p1]: \"SIGKILL\"",
        "cannot be caught",
        "SIGTERM, SIGINT",
    ] {
        assert!(out.stderr.contains(needle), "{needle:?} in {out:?}");
    }
}
