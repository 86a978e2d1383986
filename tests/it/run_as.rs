//! `user`/`group` per plugin (SPEC §3, issue 12): a daemon running as root runs the plugin as
//! that account (ids in /proc), the plugin can read its `state.json` and write its
//! `runtime.json`, which the daemon reads back; its snapshot is the daemon's file, readable by
//! the plugin's group only. A daemon that is not root, or a name that does not exist, is a
//! configuration error (exit 78) naming the file, the plugin, the key and the value.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;

use crate::util::{
    Config, Daemon, EX_CONFIG, Script, TIMEOUT, assert_success, daemon_bin, expected_version,
    find_program, wait_until,
};

/// nobody's uid and primary gid (65534 on Debian, whose primary group is nogroup).
fn nobody() -> (u32, u32) {
    let user = nix::unistd::User::from_name("nobody").ok().flatten();
    user.map_or((65534, 65534), |u| (u.uid.as_raw(), u.gid.as_raw()))
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The `Uid:` or `Gid:` line of /proc/PID/status as numbers (real, effective, saved, fs).
fn status_ids(pid: i32, field: &str) -> Vec<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect()
}

#[test]
fn a_plugin_with_user_nobody_runs_as_nobody_and_its_runtime_json_is_read_back() {
    if !is_root() {
        println!("SKIPPED: running a plugin as another user needs a root daemon (CI runs as root)");
        return;
    }
    let (uid, gid) = nobody();
    let config = Config::new().set("plugins.p1.user", json!("nobody"));
    let mut d = Daemon::with_config(&config);
    // The test plugin logs into the test dir: let nobody write there (sticky, like /tmp).
    fs::set_permissions(&d.root, fs::Permissions::from_mode(0o1777)).unwrap();
    let script = Script::new("v1").runtime_json(&json!({"jobs": 3}));
    let (content, pid) = d.start_running("p1", &script);
    assert_eq!(
        status_ids(pid, "Uid:"),
        [uid; 4],
        "contract (SPEC §3 user): real, effective, saved and fs uid are nobody's"
    );
    assert_eq!(status_ids(pid, "Gid:"), [gid; 4], "its primary group");
    let env = d.plugin_env("p1", pid);
    assert_eq!(env.get("USER").map(String::as_str), Some("nobody"));
    let seen = d
        .seen_state("p1", pid)
        .expect("contract (SPEC §4): the plugin can read its state.json");
    assert_eq!(seen["version"], json!(expected_version(&content)));
    let runtime = d.runtime_file("p1");
    let written = fs::metadata(&runtime)
        .unwrap_or_else(|e| panic!("the plugin as nobody wrote {}: {e}", runtime.display()));
    assert_eq!(written.uid(), uid, "runtime.json is the plugin's file");
    let snapshot_dir = d.runtime.join("snapshots/p1");
    let snapshot = snapshot_dir.join(expected_version(&content));
    for (path, mode) in [(&snapshot_dir, 0o710), (&snapshot, 0o750)] {
        let meta = fs::metadata(path).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (0, gid, mode),
            "{} stays the daemon's, readable by the plugin's group only",
            path.display()
        );
    }
    // A restart folds what the plugin saved into state.json: the daemon read it.
    let answer = d.request_within(
        &json!({"cmd": "trigger", "plugin": "p1"}),
        Duration::from_secs(20),
    );
    assert_success(&answer, "trigger");
    let second = d.wait_started_n("p1", "v1", 2);
    assert_eq!(status_ids(second, "Uid:"), [uid; 4]);
    let info = d.request(&json!({"cmd": "plugin", "plugin": "p1"}));
    assert_eq!(
        info["plugin"]["state_file"]["runtime_data"],
        json!({"jobs": 3}),
        "contract (SPEC §4): the daemon reads the runtime.json its nobody plugin wrote; {info}"
    );
    // A daemon that stops takes back what it gave: the next one may run without `user`.
    let state_dir = d.state.join("plugins/p1");
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(15)).code(), Some(0));
    assert_eq!(
        fs::metadata(&state_dir).unwrap().uid(),
        0,
        "taken back at shutdown"
    );
    d.start();
    let third = d.wait_started_n("p1", "v1", 3);
    assert_eq!(status_ids(third, "Uid:"), [uid; 4]);
    // One that was killed could not: the next one accepts the state dir it gave to nobody,
    // for this plugin only.
    d.signal(Signal::SIGKILL);
    d.wait_exit(TIMEOUT);
    assert_eq!(fs::metadata(&state_dir).unwrap().uid(), uid);
    d.start();
    let fourth = d.wait_started_n("p1", "v1", 4);
    assert_eq!(status_ids(fourth, "Uid:"), [uid; 4]);
}

#[test]
fn a_removed_plugin_gives_its_state_dir_back_so_the_next_daemon_starts() {
    if !is_root() {
        println!("SKIPPED: running a plugin as another user needs a root daemon (CI runs as root)");
        return;
    }
    let config = Config::new().set("plugins.p1.user", json!("nobody"));
    let mut d = Daemon::with_config(&config);
    fs::set_permissions(&d.root, fs::Permissions::from_mode(0o1777)).unwrap();
    d.start_running("p1", &Script::new("v1"));
    let state_dir = d.state.join("plugins/p1");
    assert_eq!(fs::metadata(&state_dir).unwrap().uid(), nobody().0);
    fs::remove_dir_all(d.plugin_dir("p1")).unwrap();
    wait_until(TIMEOUT, "p1 to be forgotten", || {
        d.plugin_info("p1").is_none().then_some(())
    });
    assert_eq!(
        fs::metadata(&state_dir).unwrap().uid(),
        0,
        "taken back at removal"
    );
    // The lab's sequence: the table goes too (the daemon was stopped meanwhile, say).
    d.signal(Signal::SIGKILL);
    d.wait_exit(TIMEOUT);
    d.write_config(&Config::new());
    d.start();
}

#[test]
fn a_daemon_that_is_not_root_refuses_user_with_a_config_error() {
    if !is_root() {
        println!("SKIPPED: running the daemon as nobody needs root (CI runs as root)");
        return;
    }
    let (uid, gid) = nobody();
    let config = Config::new().set("plugins.p1.user", json!("root"));
    let d = Daemon::with_config(&config);
    let mut cmd = d.command(daemon_bin());
    cmd.args(d.daemon_args()).uid(uid).gid(gid);
    let out = d.run(cmd, None, TIMEOUT);
    assert_eq!(
        out.code(),
        Some(EX_CONFIG),
        "contract (SPEC §3, §7): a config error, exit 78; {out:?}"
    );
    let expected = format!(
        "{}: invalid value for `user` in [plugins.p1]: \"root\"; only a daemon running as root",
        d.config_path.display()
    );
    assert!(out.stderr.contains(&expected), "{expected:?} in {out:?}");
    assert!(
        fs::read_dir(&d.runtime).unwrap().next().is_none(),
        "refused before anything was created"
    );
}

#[test]
fn an_unknown_user_or_group_is_a_config_error_naming_it() {
    for (key, value, says) in [
        ("user", "no-such-user-hrl", "no such user"),
        ("group", "no-such-group-hrl", "no such group"),
    ] {
        let config = Config::new().set(&format!("plugins.p1.{key}"), json!(value));
        let d = Daemon::with_config(&config);
        let mut args = d.daemon_args();
        args.push("--check-config".into());
        let out = d.run_daemon(&args);
        assert_eq!(out.code(), Some(EX_CONFIG), "{out:?}");
        let expected = format!("invalid value for `{key}` in [plugins.p1]: \"{value}\"; {says}");
        assert!(out.stderr.contains(&expected), "{expected:?} in {out:?}");
    }
}

#[test]
fn a_plugin_running_as_nobody_can_send_ready_on_its_notify_socket() {
    if !is_root() {
        println!("SKIPPED: running a plugin as another user needs a root daemon (CI runs as root)");
        return;
    }
    if find_program("socat").is_none() {
        println!("SKIPPED: the test plugin sends READY=1 with socat (apt-get install socat)");
        return;
    }
    let config = Config::new()
        .set("plugins.p1.user", json!("nobody"))
        .set("plugins.p1.ready", json!("notify"));
    let mut d = Daemon::with_config(&config);
    fs::set_permissions(&d.root, fs::Permissions::from_mode(0o1777)).unwrap();
    let script = Script::new("v1")
        .shell("printf 'READY=1' | socat - UNIX-SENDTO:\"$NOTIFY_SOCKET\" || echo \"notify failed $$\" >>\"$LOG\"");
    let (_, pid) = d.start_running("p1", &script);
    assert_eq!(status_ids(pid, "Uid:")[1], nobody().0);
    assert!(
        !d.log_lines("p1")
            .iter()
            .any(|l| l.first().is_some_and(|w| w == "notify")),
        "sendto as nobody failed: {:?}",
        d.log_lines("p1")
    );
}
