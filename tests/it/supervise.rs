//! Supervision (SPEC §4, §5 crashes, §1 stop timeout): stopping plugins that resist, their
//! process groups, crash loops, the `restart` policy and recovery from `failed`.

use nix::sys::signal::Signal;
use serde_json::json;

use crate::util::{
    Config, Daemon, MAX_RETRIES, Script, TIMEOUT, pid_alive, process_group_members,
    reload_past_the_stop_timeout, send_signal, wait_until,
};

/// Reloads `p1` from a build that ignores SIGTERM and checks the stop escalated to SIGKILL
/// only after `stop_timeout_ms`, taking the whole process group; returns the old pid.
#[track_caller]
fn assert_reload_kills_a_plugin_ignoring_sigterm(d: &mut Daemon, old_build: &Script) -> i32 {
    let (_, old) = d.start_running("p1", old_build);
    reload_past_the_stop_timeout(d);
    assert!(
        !pid_alive(old),
        "contract: the old instance {old} was killed"
    );
    let left = process_group_members(old);
    assert!(
        left.is_empty(),
        "contract: SIGKILL goes to the whole group; left {left:?}"
    );
    old
}

#[test]
fn plugin_ignoring_sigterm_is_killed_after_the_stop_timeout() {
    let mut d = Daemon::new();
    let old =
        assert_reload_kills_a_plugin_ignoring_sigterm(&mut d, &Script::new("v1").ignore_term());
    assert!(
        d.stops("p1", Some("v1")).is_empty(),
        "test bug: the plugin was to ignore SIGTERM"
    );
    assert!(!pid_alive(old));
}

#[test]
fn grandchild_of_a_plugin_ignoring_sigterm_is_killed_with_its_group() {
    let mut d = Daemon::new();
    let build = Script::new("v1").ignore_term().grandchild();
    let old = assert_reload_kills_a_plugin_ignoring_sigterm(&mut d, &build);
    let grandchild = d.grandchild_pid("p1");
    assert!(
        !pid_alive(grandchild),
        "contract: grandchild {grandchild} of {old} was killed"
    );
}

#[test]
fn grandchild_of_a_plugin_is_stopped_with_it_on_reload() {
    let mut d = Daemon::new();
    let (_, old) = d.start_running("p1", &Script::new("v1").grandchild());
    let grandchild = d.grandchild_pid("p1");
    assert!(pid_alive(grandchild), "test bug: the grandchild should run");
    let v2 = d.install("p1", &Script::new("v2"));
    d.wait_running("p1", &v2);
    wait_until(TIMEOUT, "the old plugin's process group to be gone", || {
        process_group_members(old).is_empty().then_some(())
    });
    assert!(
        !pid_alive(grandchild),
        "contract (SPEC §5): SIGTERM goes to the process group"
    );
}

#[test]
fn crash_loop_ends_in_failed_after_max_retries() {
    let mut d = Daemon::new();
    d.install("p1", &Script::new("v1").exit_now(1));
    d.start();
    let info = d.wait_state("p1", "failed");
    d.prove_quiet();
    let starts = d.starts("p1", None);
    assert_eq!(
        starts.len() as u64,
        1 + MAX_RETRIES,
        "contract (SPEC §5 crashes): 1 + max_retries starts then failed; starts {starts:?}"
    );
    assert!(
        info["pid"].is_null(),
        "contract: a failed plugin has no pid; saw {info}"
    );
    assert!(
        info["last_error"].is_string(),
        "contract: last_error says why; saw {info}"
    );
}

#[test]
fn new_good_build_of_a_failed_plugin_starts_it() {
    let mut d = Daemon::new();
    d.install("p1", &Script::new("v1").exit_now(1));
    d.start();
    d.wait_state("p1", "failed");
    let v2 = d.install("p1", &Script::new("v2"));
    d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
}

#[test]
fn crashed_plugin_is_restarted_on_failure() {
    let mut d = Daemon::new();
    let (v1, pid) = d.start_running("p1", &Script::new("v1").exec_sleep());
    send_signal(pid, Signal::SIGKILL);
    let again = d.wait_started_n("p1", "v1", 2);
    let info = d.wait_running("p1", &v1);
    assert_eq!(
        info["pid"], again,
        "contract (SPEC §5): restarted after a crash; saw {info}"
    );
    assert!(
        info["restarts"].as_u64() >= Some(1),
        "contract: restarts counted; saw {info}"
    );
}

#[test]
fn clean_exit_is_not_restarted_on_failure_and_leaves_it_stopped() {
    let mut d = Daemon::new();
    d.install("p1", &Script::new("v1").exit_after(400, 0));
    d.start();
    d.wait_started("p1", "v1");
    d.wait_state("p1", "stopped");
    d.prove_quiet();
    assert_eq!(
        d.starts("p1", None).len(),
        1,
        "contract (SPEC §5): on-failure ignores exit 0"
    );
}

#[test]
fn restart_never_leaves_a_crashed_plugin_failed_and_a_clean_exit_stopped() {
    let mut d = Daemon::with_config(&Config::new().set("supervisor.restart", json!("never")));
    // Both outlive startup_grace_ms, so they started fine and then exited on their own.
    d.install("crash", &Script::new("v1").exit_after(400, 1));
    d.install("clean", &Script::new("v1").exit_after(400, 0));
    d.start();
    d.wait_state("crash", "failed");
    d.wait_state("clean", "stopped");
    d.prove_quiet();
    for id in ["crash", "clean"] {
        let starts = d.starts(id, None);
        assert_eq!(
            starts.len(),
            1,
            "contract (SPEC §5 restart never): {id} started {starts:?}"
        );
    }
}
