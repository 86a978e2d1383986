//! Containment (SPEC §4): no process a plugin starts outlives the plugin's stop, whether it
//! leaves the plugin's session (`setsid`) or double-forks; a daemon killed with SIGKILL leaves
//! enough behind for the next one to stop what its plugins left, so there are never two
//! instances of a plugin; `list` shows each plugin's `tasks`.
//!
//! Most tests run the path every machine has (process groups, child subreaper, /proc). The
//! cgroup path runs where the test may create a cgroup v2 directory and mark it delegated (as
//! root, on a writable cgroup2 mount), with the daemon started inside it.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;

use crate::util::*;

/// Shell code for a test plugin: an escapee that leaves the session (`setsid`, a child of the
/// plugin) and one that leaves the session and is orphaned (double fork, a child of nobody),
/// each writing its pid to `<kind>-<id>-<plugin pid>.pid` and becoming `sleep 4242`/`4243`.
const ESCAPEES: &str = r#"setsid sh -c 'echo $$ >"$0"; exec sleep 4242' "$ROOT/esc-$ID-$$.pid" &
( setsid sh -c 'echo $$ >"$0"; exec sleep 4243' "$ROOT/dfk-$ID-$$.pid" & )"#;

/// The pid an escapee of plugin process `plugin_pid` wrote.
#[track_caller]
fn escapee(d: &Daemon, kind: &str, id: &str, plugin_pid: i32) -> i32 {
    let path = d.root.join(format!("{kind}-{id}-{plugin_pid}.pid"));
    wait_until(
        TIMEOUT,
        &format!("{} to be written", path.display()),
        || fs::read_to_string(&path).ok()?.trim().parse().ok(),
    )
}

#[track_caller]
fn wait_gone(pids: &[i32], what: &str) {
    let left = poll_until(TIMEOUT, || {
        let alive: Vec<i32> = pids.iter().copied().filter(|&p| pid_alive(p)).collect();
        alive.is_empty().then_some(())
    });
    let alive: Vec<i32> = pids.iter().copied().filter(|&p| pid_alive(p)).collect();
    assert!(
        left.is_some(),
        "contract (SPEC §4 containment): {what}; still alive: {alive:?}"
    );
}

/// Live processes of plugin `id` of this test whose command line is exactly `cmdline`.
fn marked(d: &Daemon, id: &str, cmdline: &str) -> Vec<i32> {
    let want: Vec<u8> = cmdline.replace(' ', "\0").into_bytes();
    d.plugin_processes()
        .into_iter()
        .filter(|&pid| {
            fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|&b| b == 0)
                    .any(|e| e == format!("HOTRELOAD_PLUGIN_ID={id}").as_bytes())
            })
        })
        .filter(|&pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.strip_suffix(b"\0").unwrap_or(&c) == want.as_slice())
        })
        .collect()
}

#[test]
fn escapees_are_stopped_with_their_instance_on_reload_and_with_the_daemon() {
    let mut d = Daemon::new();
    let (_, old) = d.start_running("p1", &Script::new("v1").shell(ESCAPEES));
    let old_escapees = [escapee(&d, "esc", "p1", old), escapee(&d, "dfk", "p1", old)];
    assert!(
        old_escapees.iter().all(|&p| pid_alive(p)),
        "test bug: the escapees run"
    );
    let v2 = d.install("p1", &Script::new("v2").shell(ESCAPEES));
    let new = d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
    wait_gone(
        &old_escapees,
        "the processes of the old instance that left its session are gone after a reload",
    );
    let new_escapees = [escapee(&d, "esc", "p1", new), escapee(&d, "dfk", "p1", new)];
    assert!(
        new_escapees.iter().all(|&p| pid_alive(p)),
        "the new instance's escapees were not touched by the old one's stop"
    );
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(TIMEOUT);
    assert!(status.success(), "clean stop; {status}");
    wait_gone(
        &new_escapees,
        "the daemon's stop leaves no process of its plugins",
    );
}

#[test]
fn a_restart_after_the_daemon_was_killed_runs_one_instance_of_each_plugin() {
    let mut d = Daemon::new();
    d.install("p1", &Script::new("v1").shell(ESCAPEES));
    d.install("p2", &Script::new("v1").shell(ESCAPEES));
    d.start();
    let mut old = Vec::new();
    for id in ["p1", "p2"] {
        let pid = d.wait_started(id, "v1");
        old.push(escapee(&d, "esc", id, pid));
        old.push(escapee(&d, "dfk", id, pid));
    }
    let before = d.plugin_processes();
    d.signal(Signal::SIGKILL);
    d.wait_exit(TIMEOUT);
    assert!(
        old.iter().all(|&p| pid_alive(p)),
        "test bug: the escapees outlive a killed daemon until the next one stops them"
    );
    d.start();
    for id in ["p1", "p2"] {
        d.wait_started_n(id, "v1", 2);
        d.wait_state(id, "running");
    }
    wait_gone(
        &before,
        "the next daemon stops every process the killed one's plugins left",
    );
    for id in ["p1", "p2"] {
        for marker in ["sleep 4242", "sleep 4243"] {
            let found = marked(&d, id, marker);
            assert_eq!(
                found.len(),
                1,
                "contract (SPEC §4): one instance of {id} after a restart, so one `{marker}`; \
                 saw {found:?}"
            );
        }
    }
    let log = d.stderr_text();
    let second = log.rfind("supervising").unwrap_or(0);
    let killed = log[second..].find("left behind by a previous hotreloadd");
    let started = log[second..].find("[p1] started pid");
    assert!(
        killed.is_some() && killed < started,
        "the leftovers are stopped (and logged) before anything starts; log:\n{}",
        &log[second..]
    );
}

#[test]
fn list_shows_the_processes_of_each_plugin() {
    let mut d = Daemon::new();
    d.install("one", &Script::new("v1"));
    d.install("esc", &Script::new("v1").shell(ESCAPEES));
    d.start();
    d.wait_started("one", "v1");
    let pid = d.wait_started("esc", "v1");
    escapee(&d, "esc", "esc", pid);
    escapee(&d, "dfk", "esc", pid);
    // The plugin's shell and its `sleep`.
    let one = d.wait_plugin("one", "tasks = 2", |p| p["tasks"] == 2);
    // ... plus the escapee still its child and the orphaned one.
    let esc = d.wait_plugin("esc", "tasks = 4", |p| p["tasks"] == 4);
    for info in [&one, &esc] {
        for key in ["memory_bytes", "cpu_usage_ms"] {
            assert!(
                info[key].is_null() || info[key].is_u64(),
                "contract (SPEC §4, §6): {key} is a number or null; saw {info}"
            );
        }
    }
    let plugin = d.request(&json!({"cmd": "plugin", "plugin": "esc"}));
    assert_eq!(
        plugin["plugin"]["tasks"], 4,
        "`plugin` shows tasks too; {plugin}"
    );
}

#[test]
fn a_plugin_with_nothing_running_has_no_tasks() {
    let mut d = Daemon::new();
    d.install("done", &Script::new("v1").exit_after(300, 0));
    d.start();
    d.wait_started("done", "v1");
    let info = d.wait_state("done", "stopped");
    assert_eq!(
        info["tasks"], 0,
        "contract (SPEC §4): nothing runs; saw {info}"
    );
}

#[test]
fn an_orphan_that_cleared_its_environment_is_stopped_with_the_daemon() {
    let mut d = Daemon::new();
    // Double fork into a new session with an empty environment: nothing names its plugin.
    let stray =
        r#"( setsid env -i sh -c 'echo $$ >"$0"; exec sleep 4244' "$ROOT/stray-$ID.pid" & )"#;
    d.start_running("p1", &Script::new("v1").shell(stray));
    let path = d.root.join("stray-p1.pid");
    let pid: i32 = wait_until(TIMEOUT, "the stray's pid", || {
        fs::read_to_string(&path).ok()?.trim().parse().ok()
    });
    assert!(pid_alive(pid), "test bug: the stray runs");
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(TIMEOUT);
    assert!(status.success(), "clean stop; {status}");
    wait_gone(
        &[pid],
        "a process below the daemon that no plugin claims is stopped with the daemon",
    );
}

// ------------------------------------------------------------------------------------------------
// The cgroup path

/// A cgroup v2 directory made for one test and marked delegated as systemd marks the cgroup of
/// a unit with `Delegate=yes`; removed (its processes killed) when dropped.
struct TestCgroup {
    dir: PathBuf,
    /// Its path as `/proc/<pid>/cgroup` shows it.
    path: String,
}

impl TestCgroup {
    /// None (the test is skipped, saying why) unless we may create and delegate one.
    fn new() -> Option<TestCgroup> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: creating a delegated cgroup needs root");
            return None;
        }
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
        let Some(mount) = mountinfo.lines().find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fields: Vec<&str> = left.split_whitespace().collect();
            let mount = fields.get(4)?;
            (right.starts_with("cgroup2 ") && fields.get(3) == Some(&"/"))
                .then(|| PathBuf::from(mount))
        }) else {
            eprintln!("skipped: no cgroup2 mount");
            return None;
        };
        let name = format!("hrit-cg-{}", random_hex(4));
        let dir = mount.join(&name);
        if let Err(e) = fs::create_dir(&dir) {
            eprintln!("skipped: cannot create {}: {e}", dir.display());
            return None;
        }
        let cg = TestCgroup {
            dir,
            path: format!("/{name}"),
        };
        if !fs::exists(cg.dir.join("cgroup.kill")).unwrap_or(false) {
            eprintln!("skipped: no cgroup.kill (Linux < 5.14)");
            return None;
        }
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let (p, n) = (c(&cg.dir.to_string_lossy()), c("trusted.delegate"));
        // SAFETY: NUL-terminated strings and a 1-byte value that outlive the call.
        let rc = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), b"1".as_ptr().cast(), 1, 0) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            eprintln!(
                "skipped: cannot set trusted.delegate on {}: {e}",
                cg.dir.display()
            );
            return None;
        }
        Some(cg)
    }

    /// The cgroup path of process `pid`.
    fn of(pid: i32) -> String {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or("")
            .to_string()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        fn clean(dir: &Path) {
            let _ = fs::write(dir.join("cgroup.kill"), "1");
            if let Ok(entries) = fs::read_dir(dir) {
                for e in entries.filter_map(Result::ok) {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        clean(&e.path());
                    }
                }
            }
            let _ = poll_until(Duration::from_secs(5), || {
                fs::remove_dir(dir).is_ok().then_some(())
            });
        }
        clean(&self.dir);
    }
}

#[test]
fn under_a_delegated_cgroup_each_instance_runs_in_its_own_and_nothing_escapes() {
    let Some(cg) = TestCgroup::new() else { return };
    let mut d = Daemon::new();
    let procs = cg.dir.join("cgroup.procs");
    d.launch_via_shell(&format!("echo $$ >{}", sh_quote(&procs.to_string_lossy())));
    let (_, old) = d.start_running("p1", &Script::new("v1").shell(ESCAPEES));
    assert_eq!(
        TestCgroup::of(d.pid()),
        format!("{}/supervisor", cg.path),
        "the daemon moves itself into a leaf of its delegated cgroup"
    );
    let leaf = TestCgroup::of(old);
    assert!(
        leaf.starts_with(&format!("{}/plugin-p1-", cg.path)),
        "contract (SPEC §4): each instance runs in its own cgroup; saw {leaf:?}\n{}",
        d.stderr_tail()
    );
    let old_escapees = [escapee(&d, "esc", "p1", old), escapee(&d, "dfk", "p1", old)];
    for &pid in &old_escapees {
        assert_eq!(
            TestCgroup::of(pid),
            leaf,
            "escapees stay in the instance's cgroup"
        );
    }
    d.wait_plugin("p1", "tasks = 4", |p| p["tasks"] == 4);
    let v2 = d.install("p1", &Script::new("v2").shell(ESCAPEES));
    let new = d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
    wait_gone(&old_escapees, "an instance's cgroup is emptied at its stop");
    let gone = poll_until(TIMEOUT, || {
        (!fs::exists(
            cg.dir
                .join(leaf.trim_start_matches(&format!("{}/", cg.path))),
        )
        .unwrap_or(true))
        .then_some(())
    });
    assert!(
        gone.is_some(),
        "the old instance's cgroup {leaf} is removed"
    );
    let new_escapee = escapee(&d, "esc", "p1", new);
    d.signal(Signal::SIGKILL);
    d.wait_exit(TIMEOUT);
    assert!(
        pid_alive(new_escapee),
        "test bug: it outlives the killed daemon"
    );
    d.start();
    d.wait_started_n("p1", "v2", 2);
    d.wait_state("p1", "running");
    wait_gone(
        &[new, new_escapee],
        "the next daemon kills a dead one's cgroups",
    );
    for marker in ["sleep 4242", "sleep 4243"] {
        let found = marked(&d, "p1", marker);
        assert_eq!(
            found.len(),
            1,
            "one instance after a restart; `{marker}`: {found:?}"
        );
    }
    let now = d.wait_started_n("p1", "v2", 2);
    let last = [escapee(&d, "esc", "p1", now), escapee(&d, "dfk", "p1", now)];
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(TIMEOUT).success(), "clean stop");
    wait_gone(&last, "the daemon's stop empties every instance cgroup");
}
