//! The lifecycle, driven through the fake host (`testhost.rs`): one test per behaviour, named
//! after it. Time moves only when a test says so (`advance`), processes exist only as pids the
//! fake handed out, and an exit is whatever the test reaps.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use nix::unistd::Pid;
use serde_json::Value;

use super::reap::ExitKind;
use super::testhost::{Call, FakeHost, World};
use super::{Ctx, Outbox, Supervisor, Timer, Trigger};
use crate::config::{self, Config, Env, Overrides};
use crate::protocol::Event;
use crate::wheel::TimerWheel;

const PLUGINS: &str = "/dev/null/hr/plugins";
const SIGTERM: i32 = libc::SIGTERM;
const SIGKILL: i32 = libc::SIGKILL;

/// Defaults of every test: no debounce, 2 retries 100 ms apart, 50 ms grace, 1 s stop timeout.
const BASE: &str = r#"
plugins_dir = "/dev/null/hr/plugins"
runtime_dir = "/dev/null/hr/run"
state_dir = "/dev/null/hr/state"
[hot_reload]
debounce_delay_ms = 0
max_retries = 2
retry_delay_ms = 100
[supervisor]
startup_grace_ms = 50
stop_timeout_ms = 1000
ready_timeout_ms = 300
"#;

/// BASE with `extra`: its `[hot_reload]` and `[supervisor]` lines go into BASE's tables (a key
/// given there replaces BASE's), other tables follow.
fn config(extra: &str) -> Config {
    let mut text = BASE.to_string();
    let mut rest = String::new();
    let mut table = String::new();
    for line in extra.lines() {
        if line.starts_with('[') {
            table = line.to_string();
            if table != "[hot_reload]" && table != "[supervisor]" {
                rest.push_str(line);
                rest.push('\n');
            }
        } else if table == "[hot_reload]" || table == "[supervisor]" {
            // A key given here replaces BASE's.
            let key = line.split('=').next().unwrap_or("").trim();
            text = text
                .lines()
                .filter(|l| key.is_empty() || l.split('=').next().unwrap_or("").trim() != key)
                .map(|l| format!("{l}\n"))
                .collect();
            let head = format!("{table}\n");
            text = text.replace(&head, &format!("{head}{line}\n"));
        } else {
            rest.push_str(line);
            rest.push('\n');
        }
    }
    text.push_str(&rest);
    let file = config::parse(&text, Path::new("test.toml")).expect("test config parses");
    config::resolve(file, None, &Overrides::default(), &Env::default()).expect("resolves")
}

fn exec(id: &str) -> PathBuf {
    Path::new(PLUGINS).join(id).join(id)
}

/// A supervisor over a fake machine, with the daemon's loop played by hand.
struct Rig {
    world: Rc<RefCell<World>>,
    sup: Supervisor,
    wheel: TimerWheel<Timer>,
    poll: mio::Poll,
    out: Outbox,
    config: Config,
    now_ms: u64,
    events: Vec<Event>,
    /// Answers to waiters, in order.
    replies: Vec<(super::Waiter, crate::protocol::TriggerResult)>,
}

impl Rig {
    fn new(extra: &str) -> Rig {
        let world = Rc::new(RefCell::new(World::new()));
        let host = FakeHost(world.clone());
        let config = config(extra);
        let sup = Supervisor::with_host(&config.runtime_dir, &config.state_dir, Box::new(host));
        Rig {
            world,
            sup,
            wheel: TimerWheel::new(0),
            poll: mio::Poll::new().expect("epoll"),
            out: Outbox::default(),
            config,
            now_ms: 0,
            events: Vec::new(),
            replies: Vec::new(),
        }
    }

    /// One input to the supervisor, then the end of the loop turn.
    fn turn<R>(&mut self, f: impl FnOnce(&mut Supervisor, &mut Ctx<'_>) -> R) -> R {
        let mut ctx = Ctx {
            now_ms: self.now_ms,
            wheel: &mut self.wheel,
            registry: self.poll.registry(),
            out: &mut self.out,
            config: &self.config,
        };
        let r = f(&mut self.sup, &mut ctx);
        self.events.append(&mut self.out.events);
        self.replies.append(&mut self.out.replies);
        self.sup.sync_state_dirs();
        r
    }

    fn install(&mut self, id: &str, version: &str) {
        self.world
            .borrow_mut()
            .builds
            .insert(exec(id), version.to_string());
    }

    fn uninstall(&mut self, id: &str) {
        self.world.borrow_mut().builds.remove(&exec(id));
    }

    /// The plugin dir appears; its first start begins.
    fn add(&mut self, id: &str) {
        let dir = Path::new(PLUGINS).join(id);
        self.turn(|s, c| s.add_plugin(c, id, dir));
        self.turn(|s, c| s.start_pending(c, 100));
    }

    /// `id` installed with `version` and running (its grace passed).
    fn running(&mut self, id: &str, version: &str) -> i32 {
        self.install(id, version);
        self.add(id);
        self.advance(self.config.plugin(id).startup_grace_ms);
        assert_eq!(self.state(id), "running", "{:?}", self.names());
        self.pid(id).expect("a pid")
    }

    /// A debounced change of the executable.
    fn change(&mut self, id: &str) {
        let path = exec(id);
        self.turn(|s, c| s.on_change(c, id, &path, true));
        self.advance(0);
    }

    /// A new build lands and its change is handled.
    fn deploy(&mut self, id: &str, version: &str) {
        self.install(id, version);
        self.change(id);
    }

    fn trigger(&mut self, id: &str) {
        let exec = exec(id).to_string_lossy().into_owned();
        self.turn(|s, c| s.request(c, id, Trigger::Manual, vec![exec], Vec::new()));
    }

    /// Move the clock, firing every timer due on the way, in order.
    fn advance(&mut self, ms: u64) {
        let target = self.now_ms + ms;
        while let Some(due) = self.wheel.next_deadline().filter(|&d| d <= target) {
            self.now_ms = self.now_ms.max(due);
            self.world.borrow_mut().elapsed_ms = self.now_ms;
            for (_, timer) in self.wheel.poll(self.now_ms) {
                self.turn(|s, c| s.on_timer(c, timer));
            }
        }
        self.now_ms = target;
        self.world.borrow_mut().elapsed_ms = target;
    }

    /// The leader `pid` is reaped with `status`.
    fn exit(&mut self, pid: i32, status: ExitKind) {
        self.turn(|s, c| {
            s.on_exit(c, Pid::from_raw(pid), status);
            s.check_stragglers(c);
        });
    }

    fn crash(&mut self, pid: i32) {
        self.exit(pid, ExitKind::Code(1));
    }

    /// Exits the way a SIGTERM'd plugin does.
    fn terminated(&mut self, pid: i32) {
        self.exit(pid, ExitKind::Signal(SIGTERM));
    }

    /// READY=1 from the current instance.
    fn ready(&mut self, id: &str) {
        let seq = self
            .sup
            .get(id)
            .and_then(|p| p.instance.as_ref())
            .map(|i| i.seq);
        if let Some(seq) = seq {
            self.turn(|s, c| s.mark_verified(c, id, seq));
        }
    }

    fn shutdown(&mut self) {
        self.turn(|s, c| s.begin_shutdown(c));
    }

    fn state(&self, id: &str) -> &'static str {
        self.sup.get(id).map_or("gone", |p| p.state_name())
    }

    fn plugin(&self, id: &str) -> &super::Plugin {
        self.sup.get(id).expect("plugin known")
    }

    /// The pid of the current instance, while its leader lives.
    fn pid(&self, id: &str) -> Option<i32> {
        let p = self.sup.get(id)?;
        p.instance
            .as_ref()
            .filter(|i| !i.leader.is_reaped())
            .map(|i| i.pid.as_raw())
    }

    fn retiring_pid(&self, id: &str) -> Option<i32> {
        self.sup.get(id)?.retiring.as_ref().map(|i| i.pid.as_raw())
    }

    fn version(&self, id: &str) -> Option<String> {
        let p = self.sup.get(id)?;
        p.instance.as_ref().map(|i| i.version.clone())
    }

    fn last_error(&self, id: &str) -> String {
        self.plugin(id).last_error.clone().unwrap_or_default()
    }

    fn names(&self) -> Vec<String> {
        self.events.iter().map(|e| e.name().to_string()).collect()
    }

    fn count(&self, name: &str) -> usize {
        self.events.iter().filter(|e| e.name() == name).count()
    }

    fn last(&self, name: &str) -> &Event {
        self.events
            .iter()
            .rev()
            .find(|e| e.name() == name)
            .unwrap_or_else(|| panic!("no {name} in {:?}", self.names()))
    }

    fn field(&self, name: &str, key: &str) -> Value {
        self.last(name).field(key)
    }

    fn clear(&mut self) {
        self.events.clear();
        self.world.borrow_mut().calls.clear();
    }

    fn calls(&self) -> Vec<Call> {
        self.world.borrow().calls.clone()
    }

    fn spawned(&self) -> Vec<(i32, String)> {
        self.world.borrow().spawned()
    }

    fn signalled(&self, pid: i32, sig: i32) -> bool {
        self.calls().iter().any(|c| {
            matches!(c, Call::SignalGroup { pgid, sig: s } if *pgid == pid && *s == sig)
                || matches!(c, Call::Signal { pid: p, sig: s } if *p == pid && *s == sig)
        })
    }
}

#[test]
fn retry_delay_doubles_and_caps() {
    use super::{MAX_RETRY_DELAY_MS, retry_delay};
    assert_eq!(retry_delay(50, 0), 50);
    assert_eq!(retry_delay(50, 1), 100);
    assert_eq!(retry_delay(50, 2), 200);
    assert_eq!(retry_delay(1000, 10), MAX_RETRY_DELAY_MS);
    assert_eq!(retry_delay(u64::MAX, 40), MAX_RETRY_DELAY_MS);
}

// -------------------------------------------------------------------------------------------
// First start

#[test]
fn a_plugin_with_a_build_starts_and_runs_once_its_grace_passes() {
    let mut r = Rig::new("");
    r.install("p1", "v1");
    r.add("p1");
    assert_eq!(r.state("p1"), "starting");
    assert_eq!(r.spawned().len(), 1);
    r.advance(49);
    assert_eq!(r.state("p1"), "starting");
    r.advance(1);
    assert_eq!(r.state("p1"), "running");
    assert_eq!(
        r.names(),
        ["plugin_added", "plugin_started", "plugin_ready"]
    );
    assert_eq!(r.plugin("p1").last_good.as_ref().unwrap().version, "v1");
}

#[test]
fn a_plugin_without_a_build_is_missing_and_says_why() {
    let mut r = Rig::new("");
    r.add("p1");
    assert_eq!(r.state("p1"), "missing");
    assert!(r.spawned().is_empty());
    assert!(
        r.last_error("p1").contains("no executable"),
        "{}",
        r.last_error("p1")
    );
}

#[test]
fn a_missing_plugin_starts_when_its_build_lands() {
    let mut r = Rig::new("");
    r.add("p1");
    r.deploy("p1", "v1");
    assert_eq!(r.state("p1"), "starting");
    assert_eq!(r.count("reload_started"), 0, "a first start is no reload");
    r.advance(50);
    assert_eq!(r.state("p1"), "running");
    assert_eq!(r.last_error("p1"), "");
}

#[test]
fn a_first_start_refused_by_preflight_stays_missing_with_the_refusal_as_error() {
    let mut r = Rig::new("");
    r.install("p1", "v1");
    r.world.borrow_mut().refused.insert("v1".into());
    r.add("p1");
    assert_eq!(r.state("p1"), "missing");
    assert!(r.spawned().is_empty());
    assert!(
        r.last_error("p1")
            .starts_with(crate::preflight::FAILED_PREFIX),
        "{}",
        r.last_error("p1")
    );
}

#[test]
fn a_first_start_that_exits_during_its_grace_is_retried_after_the_backoff() {
    let mut r = Rig::new("");
    r.install("p1", "v1");
    r.add("p1");
    let pid = r.pid("p1").unwrap();
    r.crash(pid);
    assert_eq!(r.state("p1"), "backoff");
    assert!(
        r.last_error("p1").contains("startup grace"),
        "{}",
        r.last_error("p1")
    );
    r.advance(99);
    assert_eq!(r.spawned().len(), 1);
    r.advance(1);
    assert_eq!(r.spawned().len(), 2);
    assert_eq!(r.state("p1"), "starting");
}

#[test]
fn a_first_start_gives_up_failed_after_one_plus_max_retries_attempts() {
    let mut r = Rig::new("");
    r.install("p1", "v1");
    r.add("p1");
    for delay in [100, 200] {
        let pid = r.pid("p1").unwrap();
        r.crash(pid);
        assert_eq!(r.state("p1"), "backoff");
        r.advance(delay);
    }
    let pid = r.pid("p1").unwrap();
    r.crash(pid);
    assert_eq!(r.spawned().len(), 3);
    assert_eq!(r.state("p1"), "failed");
    assert_eq!(r.count("reload_failed"), 0, "a first start is no reload");
}

#[test]
fn a_first_start_that_cannot_exec_is_a_failed_attempt() {
    let mut r = Rig::new("");
    r.install("p1", "v1");
    r.world.borrow_mut().unspawnable.insert("v1".into());
    r.add("p1");
    assert_eq!(r.state("p1"), "backoff");
    assert!(
        r.last_error("p1").contains("cannot execute"),
        "{}",
        r.last_error("p1")
    );
}

#[test]
fn a_first_start_whose_copy_fails_retries_the_copy_and_starts_once_it_works() {
    let mut r = Rig::new("");
    r.install("p1", "v1");
    r.world.borrow_mut().copy_failures = 1;
    r.add("p1");
    assert_eq!(r.state("p1"), "backoff");
    assert!(
        r.last_error("p1").contains("cannot snapshot"),
        "{}",
        r.last_error("p1")
    );
    r.advance(100);
    assert_eq!(r.spawned().len(), 1);
    r.advance(50);
    assert_eq!(r.state("p1"), "running");
    assert_eq!(r.last_error("p1"), "", "a good start clears the copy error");
}

#[test]
fn a_first_start_whose_copy_keeps_failing_keeps_retrying_past_max_retries() {
    let mut r = Rig::new("");
    r.install("p1", "v1");
    r.world.borrow_mut().copy_failures = 10;
    r.add("p1");
    let mut delay = 100;
    for _ in 0..6 {
        assert_eq!(r.state("p1"), "backoff");
        r.advance(delay);
        delay = (delay * 2).min(super::MAX_RETRY_DELAY_MS);
    }
    assert_eq!(
        r.state("p1"),
        "backoff",
        "endless: no fallback for a first start"
    );
    assert!(r.spawned().is_empty());
}

#[test]
fn a_first_start_writes_state_json_with_its_version_before_the_spawn() {
    let mut r = Rig::new("");
    r.install("p1", "v1");
    r.add("p1");
    let calls = r.calls();
    let write = calls
        .iter()
        .position(|c| matches!(c, Call::WriteState { version, status } if version == "v1" && status == "starting"))
        .expect("state written");
    let spawn = calls
        .iter()
        .position(|c| matches!(c, Call::Spawn { .. }))
        .unwrap();
    assert!(write < spawn);
}

#[test]
fn without_preserve_state_a_start_removes_runtime_json() {
    let mut r = Rig::new("[hot_reload]\npreserve_state = false\n");
    r.install("p1", "v1");
    r.world.borrow_mut().runtime = Some(serde_json::json!({"n": 1}));
    r.add("p1");
    assert!(r.calls().contains(&Call::RemoveRuntime));
    assert_eq!(r.plugin("p1").runtime_data, Value::Null);
}

#[test]
fn with_preserve_state_runtime_json_is_folded_into_state_json_at_start() {
    let mut r = Rig::new("");
    r.install("p1", "v1");
    r.world.borrow_mut().runtime = Some(serde_json::json!({"n": 1}));
    r.add("p1");
    assert_eq!(r.plugin("p1").runtime_data, serde_json::json!({"n": 1}));
    let states = r.world.borrow().states.clone();
    let state = states.values().next().expect("written");
    assert_eq!(state.runtime_data, serde_json::json!({"n": 1}));
}

#[test]
fn a_state_dir_that_refuses_writes_does_not_keep_the_plugin_down() {
    let mut r = Rig::new("");
    r.install("p1", "v1");
    r.world.borrow_mut().state_writes_fail = true;
    r.add("p1");
    assert_eq!(r.count("state_warning"), 1, "{:?}", r.names());
    r.advance(50);
    assert_eq!(r.state("p1"), "running");
}

#[test]
fn an_autostart_false_plugin_waits_for_a_trigger() {
    let mut r = Rig::new("[plugins.p1]\nautostart = false\n");
    r.install("p1", "v1");
    r.add("p1");
    assert_eq!(r.state("p1"), "missing");
    assert!(r.spawned().is_empty());
    r.trigger("p1");
    assert_eq!(r.state("p1"), "starting");
}

// -------------------------------------------------------------------------------------------
// Reload (stop-start)

#[test]
fn a_reload_stops_the_old_instance_then_starts_and_verifies_the_new_build() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.clear();
    r.deploy("p1", "v2");
    assert_eq!(r.state("p1"), "reloading");
    assert!(r.signalled(old, SIGTERM));
    assert!(
        r.spawned().is_empty(),
        "the new one waits for the old one's exit"
    );
    r.terminated(old);
    assert_eq!(r.spawned().len(), 1);
    assert_eq!(r.spawned()[0].1, "v2");
    assert_eq!(r.state("p1"), "reloading");
    r.advance(50);
    assert_eq!(r.state("p1"), "running");
    assert_eq!(
        r.names(),
        [
            "reload_started",
            "plugin_exited",
            "plugin_started",
            "plugin_ready",
            "reload_succeeded"
        ]
    );
    assert_eq!(r.field("reload_succeeded", "old_version"), "v1");
    assert_eq!(r.field("reload_succeeded", "new_version"), "v2");
    let p = r.plugin("p1");
    assert_eq!(p.reload_count, 1);
    assert_eq!(p.last_good.as_ref().unwrap().version, "v2");
    assert_eq!(p.history.len(), 1);
    assert!(p.history[0].ok);
    assert_eq!(r.sup.totals().reload_count, 1);
}

#[test]
fn a_reload_makes_the_new_start_ready_while_the_old_instance_exits_and_starts_from_it() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.clear();
    r.world.borrow_mut().prepared.clear();
    r.deploy("p1", "v2");
    assert!(r.signalled(old, SIGTERM));
    assert_eq!(
        r.world.borrow().prepared,
        ["v2"],
        "made ready beside the old instance's exit"
    );
    r.terminated(old);
    assert_eq!(r.spawned().len(), 1);
    assert_eq!(r.spawned()[0].1, "v2");
    assert_eq!(
        r.world.borrow().prepared,
        ["v2"],
        "the start made ahead is the one used, not made again"
    );
}

#[test]
fn the_reap_before_a_reloads_start_reads_runtime_json_once_and_carries_it() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.clear();
    r.deploy("p1", "v2");
    r.world.borrow_mut().runtime = Some(serde_json::json!({"saved": "on the way out"}));
    r.world.borrow_mut().runtime_reads = 0;
    r.terminated(old);
    assert_eq!(r.spawned().len(), 1);
    assert_eq!(r.world.borrow().runtime_reads, 1);
    let states = r.world.borrow().states.clone();
    let state = states.values().next().expect("written");
    assert_eq!(state.version, "v2");
    assert_eq!(
        state.runtime_data,
        serde_json::json!({"saved": "on the way out"}),
        "what the old instance saved as it exited reaches the new one"
    );
}

#[test]
fn a_reload_measures_its_duration_on_the_hosts_clock() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.advance(7);
    r.terminated(old);
    r.advance(50);
    assert_eq!(r.field("reload_succeeded", "duration_ms"), 57);
}

#[test]
fn the_same_build_installed_again_is_a_no_op() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.clear();
    r.change("p1");
    assert_eq!(r.names(), ["change_ignored"]);
    assert!(
        r.field("change_ignored", "reason")
            .as_str()
            .unwrap()
            .contains("unchanged version v1")
    );
    assert!(!r.signalled(pid, SIGTERM));
    assert_eq!(r.state("p1"), "running");
}

#[test]
fn a_manual_trigger_of_the_same_build_restarts_it_all_the_same() {
    let mut r = Rig::new("");
    r.running("p1", "v1");
    r.clear();
    let exec = exec("p1").to_string_lossy().into_owned();
    r.turn(|s, c| {
        s.request(
            c,
            "p1",
            Trigger::Manual,
            vec![exec, "other".into()],
            Vec::new(),
        )
    });
    assert_eq!(r.state("p1"), "reloading");
    assert_eq!(r.count("reload_started"), 1);
}

#[test]
fn a_build_refused_by_preflight_leaves_the_old_instance_serving() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.clear();
    r.world.borrow_mut().refused.insert("v2".into());
    r.deploy("p1", "v2");
    assert_eq!(r.names(), ["reload_started", "reload_failed"]);
    assert_eq!(r.field("reload_failed", "retry_in_ms"), Value::Null);
    assert!(!r.signalled(pid, SIGTERM));
    assert_eq!(r.state("p1"), "running");
    assert_eq!(r.pid("p1"), Some(pid));
    let p = r.plugin("p1");
    assert_eq!(p.failed_reloads, 1);
    assert!(!p.history[0].ok);
    assert!(
        r.last_error("p1")
            .starts_with(crate::preflight::FAILED_PREFIX)
    );
}

#[test]
fn a_new_build_that_exits_during_its_grace_is_retried_after_retry_delay() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.terminated(old);
    let new = r.pid("p1").unwrap();
    r.clear();
    r.crash(new);
    assert_eq!(r.state("p1"), "backoff");
    assert_eq!(r.field("reload_failed", "attempt"), 1);
    assert_eq!(r.field("reload_failed", "retry_in_ms"), 100);
    r.advance(100);
    assert_eq!(r.spawned().len(), 1);
    assert_eq!(r.spawned()[0].1, "v2");
    r.advance(50);
    assert_eq!(r.state("p1"), "running");
    assert_eq!(r.count("reload_succeeded"), 1);
}

#[test]
fn the_second_retry_waits_twice_as_long() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.terminated(old);
    r.crash(r.pid("p1").unwrap());
    r.advance(100);
    r.crash(r.pid("p1").unwrap());
    assert_eq!(r.field("reload_failed", "attempt"), 2);
    assert_eq!(r.field("reload_failed", "retry_in_ms"), 200);
    let before = r.spawned().len();
    r.advance(199);
    assert_eq!(r.spawned().len(), before);
    r.advance(1);
    assert_eq!(r.spawned().len(), before + 1);
}

/// Runs `v1`, deploys `v2` and makes every attempt of it fail; returns when the last one did.
fn fail_every_attempt(r: &mut Rig) {
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.terminated(old);
    for delay in [100, 200] {
        r.crash(r.pid("p1").unwrap());
        r.advance(delay);
    }
    r.clear();
    r.crash(r.pid("p1").unwrap());
}

#[test]
fn after_the_last_failed_attempt_the_last_good_build_is_rolled_back_to() {
    let mut r = Rig::new("");
    fail_every_attempt(&mut r);
    assert_eq!(r.field("reload_failed", "attempt"), 3);
    assert_eq!(r.field("reload_failed", "retry_in_ms"), Value::Null);
    assert_eq!(r.spawned(), vec![(r.pid("p1").unwrap(), "v1".to_string())]);
    assert_eq!(r.state("p1"), "reloading", "a rollback is under way");
    r.advance(50);
    assert_eq!(r.state("p1"), "running");
    assert_eq!(r.field("rolled_back", "version"), "v1");
    let p = r.plugin("p1");
    assert_eq!(p.failed_reloads, 1);
    assert_eq!(p.reload_count, 0);
    assert_eq!(p.current.as_ref().unwrap().version, "v1");
}

#[test]
fn a_rollback_that_fails_too_leaves_the_plugin_failed() {
    let mut r = Rig::new("");
    fail_every_attempt(&mut r);
    r.crash(r.pid("p1").unwrap());
    assert_eq!(r.state("p1"), "failed");
    assert_eq!(r.count("rolled_back"), 0);
    assert_eq!(r.spawned().len(), 1, "a rollback has one attempt");
}

#[test]
fn a_reload_that_fails_with_no_last_good_build_leaves_the_plugin_failed() {
    let mut r = Rig::new("");
    r.add("p1");
    r.deploy("p1", "v1");
    for delay in [100, 200] {
        r.crash(r.pid("p1").unwrap());
        r.advance(delay);
    }
    r.crash(r.pid("p1").unwrap());
    assert_eq!(r.state("p1"), "failed");
}

#[test]
fn the_build_a_plugin_failed_on_installed_again_is_a_no_op() {
    let mut r = Rig::new("[supervisor]\nrestart = \"never\"\n");
    let pid = r.running("p1", "v1");
    r.crash(pid);
    assert_eq!(r.state("p1"), "failed");
    r.clear();
    r.change("p1");
    assert!(r.spawned().is_empty());
    assert_eq!(r.names(), ["change_ignored"]);
}

#[test]
fn a_newer_build_after_a_failed_reload_starts_the_failed_plugin() {
    let mut r = Rig::new("");
    fail_every_attempt(&mut r);
    r.crash(r.pid("p1").unwrap());
    r.clear();
    r.deploy("p1", "v3");
    assert_eq!(r.spawned().len(), 1);
    r.advance(50);
    assert_eq!(r.state("p1"), "running");
    assert_eq!(r.version("p1").as_deref(), Some("v3"));
}

#[test]
fn every_stop_sends_the_configured_stop_signal_and_sigkill_still_follows() {
    let mut r =
        Rig::new("[supervisor]\nstop_signal = \"SIGINT\"\n[plugins.p2]\nstop_signal = \"QUIT\"");
    let old = r.running("p1", "v1");
    r.clear();
    r.deploy("p1", "v2");
    assert!(r.signalled(old, libc::SIGINT), "a reload's stop");
    assert!(!r.signalled(old, SIGTERM));
    r.advance(1000);
    assert!(r.signalled(old, SIGKILL), "escalation unchanged");
    r.exit(old, ExitKind::Signal(SIGKILL));
    r.advance(50);
    let new = r.pid("p1").expect("v2 runs");
    let other = r.running("p2", "w1");
    r.clear();
    r.shutdown();
    assert!(
        r.signalled(new, libc::SIGINT),
        "shutdown, [supervisor]'s signal"
    );
    assert!(
        r.signalled(other, libc::SIGQUIT),
        "shutdown, the plugin's own signal"
    );
    assert!(!r.signalled(new, SIGTERM) && !r.signalled(other, SIGTERM));
}

#[test]
fn a_stop_timeout_escalates_to_sigkill() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.clear();
    r.advance(999);
    assert!(!r.signalled(old, SIGKILL));
    r.advance(1);
    assert!(r.signalled(old, SIGKILL));
    r.exit(old, ExitKind::Signal(SIGKILL));
    assert_eq!(r.spawned().len(), 1);
}

#[test]
fn a_stop_waits_for_the_other_processes_of_the_instance() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.world.borrow_mut().members_alive.insert(old);
    r.terminated(old);
    assert!(r.spawned().len() == 1, "only the first start so far");
    assert_eq!(r.state("p1"), "reloading");
    r.world.borrow_mut().members_alive.clear();
    r.turn(|s, c| s.check_stragglers(c));
    assert_eq!(r.spawned().len(), 2);
}

#[test]
fn the_kill_timer_ends_a_stop_whose_leader_is_gone_but_members_live() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.world.borrow_mut().members_alive.insert(old);
    r.terminated(old);
    r.clear();
    r.advance(1000);
    assert!(r.calls().contains(&Call::KillMembers("p1".into())));
    assert_eq!(r.spawned().len(), 1);
}

// -------------------------------------------------------------------------------------------
// Reload (start-stop)

const START_STOP: &str = "[plugins.p1]\nstrategy = \"start-stop\"\n";

#[test]
fn start_stop_starts_the_new_build_beside_the_old_one_and_stops_the_old_once_verified() {
    let mut r = Rig::new(START_STOP);
    let old = r.running("p1", "v1");
    r.clear();
    r.deploy("p1", "v2");
    assert!(!r.signalled(old, SIGTERM), "the old one keeps serving");
    assert_eq!(r.retiring_pid("p1"), Some(old));
    assert_eq!(r.spawned().len(), 1);
    assert_eq!(r.state("p1"), "reloading");
    r.advance(50);
    assert!(r.signalled(old, SIGTERM));
    assert_eq!(r.count("reload_succeeded"), 1);
    assert_eq!(r.state("p1"), "reloading", "until the old one is gone");
    r.terminated(old);
    assert_eq!(r.retiring_pid("p1"), None);
    assert_eq!(r.state("p1"), "running");
}

#[test]
fn start_stop_keeps_the_old_instance_when_every_attempt_of_the_new_build_fails() {
    let mut r = Rig::new(START_STOP);
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    for delay in [100, 200] {
        r.crash(r.pid("p1").unwrap());
        assert_eq!(r.state("p1"), "backoff");
        r.advance(delay);
    }
    r.clear();
    r.crash(r.pid("p1").unwrap());
    assert_eq!(r.field("rolled_back", "version"), "v1");
    assert_eq!(r.pid("p1"), Some(old));
    assert_eq!(r.retiring_pid("p1"), None);
    assert!(!r.signalled(old, SIGTERM));
    assert_eq!(r.state("p1"), "running");
    assert!(r.spawned().is_empty(), "keeping is no start");
}

#[test]
fn start_stop_the_serving_build_installed_again_while_a_newer_one_waits_to_retry_ends_that_reload()
{
    let mut r = Rig::new(START_STOP);
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.crash(r.pid("p1").unwrap());
    assert_eq!(r.state("p1"), "backoff");
    r.clear();
    r.deploy("p1", "v1");
    assert_eq!(r.pid("p1"), Some(old));
    assert_eq!(r.state("p1"), "running");
    assert_eq!(r.field("reload_failed", "retry_in_ms"), Value::Null);
    assert!(
        r.field("reload_failed", "error")
            .as_str()
            .unwrap()
            .starts_with("superseded")
    );
    r.advance(1000);
    assert!(r.spawned().is_empty(), "the retry is gone");
}

#[test]
fn start_stop_the_old_instance_exiting_on_its_own_while_the_new_one_verifies_is_only_logged() {
    let mut r = Rig::new(START_STOP);
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.crash(old);
    assert_eq!(r.retiring_pid("p1"), None);
    r.advance(50);
    assert_eq!(r.state("p1"), "running");
    assert_eq!(r.count("reload_succeeded"), 1);
}

#[test]
fn start_stop_a_newer_build_while_the_new_instance_verifies_is_queued_behind_it() {
    let mut r = Rig::new(START_STOP);
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.deploy("p1", "v3");
    assert_eq!(r.spawned().len(), 2, "v1 and v2 only");
    r.advance(50);
    r.terminated(old);
    // The queued reload of v3 runs once the retiring instance is gone.
    assert_eq!(r.spawned().last().unwrap().1, "v3");
    assert_eq!(r.count("reload_started"), 2);
}

// -------------------------------------------------------------------------------------------
// Readiness and watchdog

const NOTIFY: &str = "[plugins.p1]\nready = \"notify\"\n";

#[test]
fn a_notify_plugin_is_running_once_it_sends_ready() {
    let mut r = Rig::new(NOTIFY);
    r.install("p1", "v1");
    r.add("p1");
    r.advance(200);
    assert_eq!(r.state("p1"), "starting", "grace does not count for notify");
    r.ready("p1");
    assert_eq!(r.state("p1"), "running");
    assert_eq!(r.count("plugin_ready"), 1);
}

#[test]
fn a_notify_plugin_without_ready_in_time_is_killed_and_its_attempt_fails() {
    let mut r = Rig::new(NOTIFY);
    r.install("p1", "v1");
    r.add("p1");
    let pid = r.pid("p1").unwrap();
    r.advance(300);
    assert!(r.signalled(pid, SIGKILL));
    assert_eq!(r.state("p1"), "starting", "until its exit is reaped");
    r.exit(pid, ExitKind::Signal(SIGKILL));
    assert_eq!(r.state("p1"), "backoff");
    assert!(
        r.last_error("p1").contains("no READY=1 within"),
        "{}",
        r.last_error("p1")
    );
}

#[test]
fn a_reloaded_notify_plugin_that_misses_ready_is_retried_like_a_crash() {
    let mut r = Rig::new(NOTIFY);
    r.install("p1", "v1");
    r.add("p1");
    r.ready("p1");
    let old = r.pid("p1").unwrap();
    r.deploy("p1", "v2");
    r.terminated(old);
    let new = r.pid("p1").unwrap();
    r.advance(300);
    r.exit(new, ExitKind::Signal(SIGKILL));
    assert_eq!(r.field("reload_failed", "retry_in_ms"), 100);
    assert_eq!(r.state("p1"), "backoff");
}

#[test]
fn ready_before_the_grace_ends_does_not_verify_an_exec_plugin_twice() {
    let mut r = Rig::new("");
    r.install("p1", "v1");
    r.add("p1");
    r.advance(50);
    r.ready("p1");
    assert_eq!(r.count("plugin_ready"), 1);
}

const WATCHDOG: &str = "[plugins.p1]\nwatchdog_ms = 100\n";

#[test]
fn a_plugin_missing_its_watchdog_deadline_is_aborted_and_restarted() {
    let mut r = Rig::new(WATCHDOG);
    let pid = r.running("p1", "v1");
    r.clear();
    r.advance(99);
    assert_eq!(r.count("plugin_watchdog"), 0);
    r.advance(1);
    assert_eq!(r.count("plugin_watchdog"), 1);
    assert!(r.signalled(pid, libc::SIGABRT));
    r.exit(pid, ExitKind::Signal(libc::SIGABRT));
    assert_eq!(r.state("p1"), "backoff");
    assert_eq!(r.plugin("p1").restarts, 1);
}

#[test]
fn the_watchdog_is_not_armed_before_the_plugin_is_verified() {
    let mut r = Rig::new("[plugins.p1]\nwatchdog_ms = 10\nready = \"notify\"\n");
    r.install("p1", "v1");
    r.add("p1");
    r.advance(200);
    assert_eq!(r.count("plugin_watchdog"), 0);
}

// -------------------------------------------------------------------------------------------
// Crashes and restarts

#[test]
fn a_crash_of_a_running_plugin_restarts_it_after_a_delay() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.clear();
    r.crash(pid);
    assert_eq!(r.state("p1"), "backoff");
    assert_eq!(r.plugin("p1").restarts, 1);
    assert!(r.last_error("p1").contains("exited unexpectedly"));
    r.advance(10_000);
    assert_eq!(r.spawned().len(), 1);
    assert_eq!(r.spawned()[0].1, "v1");
    assert_eq!(r.count("reload_started"), 0, "a restart is no reload");
}

#[test]
fn a_clean_exit_of_an_on_failure_plugin_leaves_it_stopped() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.exit(pid, ExitKind::Code(0));
    assert_eq!(r.state("p1"), "stopped");
    r.advance(10_000);
    assert_eq!(r.spawned().len(), 1);
}

#[test]
fn restart_always_restarts_after_a_clean_exit_too() {
    let mut r = Rig::new("[supervisor]\nrestart = \"always\"\n");
    let pid = r.running("p1", "v1");
    r.exit(pid, ExitKind::Code(0));
    assert_eq!(r.state("p1"), "backoff");
}

#[test]
fn restart_never_leaves_a_crashed_plugin_failed_with_its_exit_as_error() {
    let mut r = Rig::new("[supervisor]\nrestart = \"never\"\n");
    let pid = r.running("p1", "v1");
    r.crash(pid);
    assert_eq!(r.state("p1"), "failed");
    assert_eq!(r.last_error("p1"), "exited with exit code 1");
}

#[test]
fn a_crash_writes_what_the_plugin_left_to_state_json_when_it_stays_down() {
    let mut r = Rig::new("[supervisor]\nrestart = \"never\"\n");
    let pid = r.running("p1", "v1");
    r.world.borrow_mut().runtime = Some(serde_json::json!({"saved": true}));
    r.clear();
    r.crash(pid);
    assert!(r.calls().contains(&Call::WriteState {
        version: "v1".into(),
        status: "stopped".into()
    }));
    assert_eq!(
        r.plugin("p1").runtime_data,
        serde_json::json!({"saved": true})
    );
}

#[test]
fn the_start_limit_leaves_a_crash_looping_plugin_failed() {
    let mut r = Rig::new("[supervisor]\nstart_limit_burst = 2\nstart_limit_interval_ms = 60000\n");
    let pid = r.running("p1", "v1");
    r.crash(pid);
    r.advance(100);
    r.crash(r.pid("p1").unwrap());
    r.advance(200);
    r.clear();
    r.crash(r.pid("p1").unwrap());
    assert_eq!(r.state("p1"), "failed");
    assert_eq!(r.count("start_limit_hit"), 1);
    assert!(
        r.last_error("p1").contains("start"),
        "{}",
        r.last_error("p1")
    );
    r.advance(60_000);
    assert!(r.spawned().is_empty());
}

#[test]
fn a_new_build_starts_a_plugin_the_start_limit_stopped() {
    let mut r = Rig::new("[supervisor]\nstart_limit_burst = 1\nstart_limit_interval_ms = 60000\n");
    let pid = r.running("p1", "v1");
    r.crash(pid);
    r.advance(100);
    r.crash(r.pid("p1").unwrap());
    assert_eq!(r.state("p1"), "failed");
    r.clear();
    r.deploy("p1", "v2");
    assert_eq!(r.spawned().len(), 1);
}

#[test]
fn the_same_build_landing_while_a_crashed_plugin_waits_to_restart_is_a_no_op() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.crash(pid);
    r.clear();
    r.change("p1");
    assert_eq!(r.names(), ["change_ignored"]);
    assert_eq!(r.state("p1"), "backoff");
    r.advance(10_000);
    assert_eq!(r.spawned().len(), 1, "the restart goes on");
}

#[test]
fn a_newer_build_while_a_crashed_plugin_waits_to_restart_takes_over() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.crash(pid);
    r.clear();
    r.deploy("p1", "v2");
    assert_eq!(r.spawned(), vec![(r.pid("p1").unwrap(), "v2".to_string())]);
    r.advance(10_000);
    assert_eq!(r.spawned().len(), 1, "the restart is superseded");
    assert_eq!(r.state("p1"), "running");
}

// -------------------------------------------------------------------------------------------
// A crash or a newer build during each phase of a reload

#[test]
fn the_old_instance_exiting_on_its_own_while_being_stopped_goes_on_with_the_reload() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.crash(old);
    assert_eq!(r.field("plugin_exited", "expected"), true);
    assert_eq!(r.spawned().last().unwrap().1, "v2");
}

#[test]
fn a_newer_build_while_the_old_instance_stops_is_queued_and_reloaded_after() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.deploy("p1", "v3");
    r.terminated(old);
    assert_eq!(r.spawned().last().unwrap().1, "v2");
    let v2 = r.pid("p1").unwrap();
    r.advance(50);
    assert!(r.signalled(v2, SIGTERM), "the queued reload stops v2");
    r.terminated(v2);
    assert_eq!(r.spawned().last().unwrap().1, "v3");
}

#[test]
fn a_newer_build_while_the_new_instance_verifies_is_queued() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.terminated(old);
    r.deploy("p1", "v3");
    assert_eq!(r.spawned().last().unwrap().1, "v2");
    r.advance(50);
    assert_eq!(r.count("reload_succeeded"), 1);
    assert_eq!(r.count("reload_started"), 2);
}

#[test]
fn a_newer_build_while_a_reload_waits_in_backoff_supersedes_it() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.terminated(old);
    r.crash(r.pid("p1").unwrap());
    assert_eq!(r.state("p1"), "backoff");
    r.clear();
    r.deploy("p1", "v3");
    assert_eq!(r.spawned(), vec![(r.pid("p1").unwrap(), "v3".to_string())]);
    assert_eq!(
        r.count("reload_started"),
        1,
        "the newer build is a reload of its own"
    );
    r.advance(1000);
    assert_eq!(r.spawned().len(), 1, "the old retry is cancelled");
    assert_eq!(r.state("p1"), "running");
}

#[test]
fn a_refused_newer_build_while_a_reload_waits_in_backoff_leaves_the_retry_alone() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.terminated(old);
    r.crash(r.pid("p1").unwrap());
    r.clear();
    r.world.borrow_mut().refused.insert("v3".into());
    r.deploy("p1", "v3");
    assert_eq!(r.count("reload_failed"), 1);
    assert_eq!(r.state("p1"), "backoff");
    r.advance(100);
    assert_eq!(r.spawned().last().unwrap().1, "v2");
}

#[test]
fn a_crash_of_the_rollback_instance_after_it_verified_is_restarted() {
    let mut r = Rig::new("");
    fail_every_attempt(&mut r);
    r.advance(50);
    assert_eq!(r.state("p1"), "running");
    r.crash(r.pid("p1").unwrap());
    assert_eq!(r.state("p1"), "backoff");
}

// -------------------------------------------------------------------------------------------
// The copy retry (the build cannot be copied)

#[test]
fn a_reload_whose_copy_fails_keeps_the_old_instance_and_retries_the_copy() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.clear();
    r.world.borrow_mut().copy_failures = 1;
    r.deploy("p1", "v2");
    assert_eq!(r.names(), ["reload_started", "reload_failed"]);
    assert_eq!(r.field("reload_failed", "retry_in_ms"), 100);
    assert!(!r.signalled(old, SIGTERM));
    assert_eq!(r.state("p1"), "reloading");
    r.advance(100);
    assert!(r.signalled(old, SIGTERM), "copied: now the reload goes on");
    r.terminated(old);
    r.advance(50);
    assert_eq!(r.count("reload_succeeded"), 1);
    assert_eq!(r.count("reload_started"), 1);
}

#[test]
fn a_reload_whose_copy_never_works_gives_up_and_the_old_instance_keeps_running() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.world.borrow_mut().copy_failures = 10;
    r.deploy("p1", "v2");
    r.advance(100);
    r.advance(200);
    assert_eq!(r.field("reload_failed", "attempt"), 3);
    assert_eq!(r.field("reload_failed", "retry_in_ms"), Value::Null);
    assert_eq!(r.pid("p1"), Some(old));
    assert_eq!(r.state("p1"), "running");
    assert_eq!(r.plugin("p1").failed_reloads, 1);
    assert_eq!(r.plugin("p1").history[0].new_version, None);
}

#[test]
fn a_crash_while_a_copy_retry_waits_ends_that_reload_and_the_restart_policy_decides() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.world.borrow_mut().copy_failures = 10;
    r.deploy("p1", "v2");
    r.clear();
    r.crash(old);
    assert_eq!(r.count("reload_failed"), 1);
    assert_eq!(r.field("reload_failed", "retry_in_ms"), Value::Null);
    assert!(
        r.field("reload_failed", "error")
            .as_str()
            .unwrap()
            .contains("before the new build could be copied")
    );
    assert_eq!(r.state("p1"), "backoff", "restarting v1");
}

#[test]
fn a_newer_change_while_a_copy_retry_waits_takes_it_over() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.world.borrow_mut().copy_failures = 1;
    r.deploy("p1", "v2");
    r.clear();
    r.deploy("p1", "v3");
    assert_eq!(r.count("reload_started"), 0, "announced already");
    assert!(r.signalled(old, SIGTERM));
    r.terminated(old);
    assert_eq!(r.spawned().last().unwrap().1, "v3");
    r.advance(1000);
    assert_eq!(r.spawned().len(), 1, "no second copy retry");
}

#[test]
fn the_running_build_landing_while_a_copy_retry_waits_ends_it_as_a_success() {
    let mut r = Rig::new("");
    r.running("p1", "v1");
    r.world.borrow_mut().copy_failures = 1;
    r.deploy("p1", "v2");
    r.clear();
    r.deploy("p1", "v1");
    assert_eq!(r.count("reload_succeeded"), 1);
    assert_eq!(r.state("p1"), "running");
    r.advance(1000);
    assert!(r.spawned().is_empty());
}

#[test]
fn a_first_start_whose_build_vanishes_during_a_copy_retry_is_missing() {
    let mut r = Rig::new("");
    r.install("p1", "v1");
    r.world.borrow_mut().copy_failures = 1;
    r.add("p1");
    r.uninstall("p1");
    r.advance(100);
    assert_eq!(r.state("p1"), "missing");
    r.advance(1000);
    assert!(r.spawned().is_empty());
}

// -------------------------------------------------------------------------------------------
// Shutdown during each phase

#[test]
fn shutdown_stops_a_running_plugin_and_saves_its_state() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.world.borrow_mut().runtime = Some(serde_json::json!(1));
    r.clear();
    r.shutdown();
    assert!(r.signalled(pid, SIGTERM));
    assert_eq!(r.state("p1"), "stopping");
    assert!(!r.sup.all_stopped());
    r.terminated(pid);
    assert!(r.sup.all_stopped());
    assert_eq!(r.state("p1"), "stopped");
    assert!(r.calls().contains(&Call::WriteState {
        version: "v1".into(),
        status: "stopping".into()
    }));
}

#[test]
fn shutdown_while_starting_stops_the_new_instance() {
    let mut r = Rig::new("");
    r.install("p1", "v1");
    r.add("p1");
    let pid = r.pid("p1").unwrap();
    r.shutdown();
    assert!(r.signalled(pid, SIGTERM));
    r.terminated(pid);
    assert!(r.sup.all_stopped());
    r.advance(1000);
    assert_eq!(r.spawned().len(), 1);
}

#[test]
fn shutdown_while_the_old_instance_stops_for_a_reload_starts_nothing_after() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.shutdown();
    r.terminated(old);
    assert!(r.sup.all_stopped());
    assert_eq!(r.spawned().len(), 1);
    assert_eq!(r.state("p1"), "stopped");
}

#[test]
fn shutdown_while_a_reload_waits_in_backoff_cancels_the_retry() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.terminated(old);
    r.crash(r.pid("p1").unwrap());
    r.shutdown();
    assert!(r.sup.all_stopped());
    r.advance(1000);
    assert_eq!(r.spawned().len(), 2);
}

#[test]
fn shutdown_while_a_crashed_plugin_waits_to_restart_cancels_the_restart() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.crash(pid);
    r.shutdown();
    r.advance(60_000);
    assert_eq!(r.spawned().len(), 1);
    assert!(r.sup.all_stopped());
}

#[test]
fn shutdown_during_a_start_stop_reload_stops_both_instances() {
    let mut r = Rig::new(START_STOP);
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    let new = r.pid("p1").unwrap();
    r.shutdown();
    assert!(r.signalled(old, SIGTERM));
    assert!(r.signalled(new, SIGTERM));
    r.terminated(old);
    assert!(!r.sup.all_stopped());
    r.terminated(new);
    assert!(r.sup.all_stopped());
}

#[test]
fn shutdown_while_a_copy_retry_waits_cancels_it() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.world.borrow_mut().copy_failures = 10;
    r.deploy("p1", "v2");
    r.shutdown();
    r.terminated(pid);
    r.clear();
    r.advance(1000);
    assert!(r.calls().iter().all(|c| !matches!(c, Call::Snapshot(_))));
}

#[test]
fn a_change_during_shutdown_is_refused() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.shutdown();
    r.clear();
    r.deploy("p1", "v2");
    r.terminated(pid);
    assert!(r.spawned().is_empty());
    assert_eq!(r.count("reload_started"), 0);
}

#[test]
fn a_stop_that_times_out_during_shutdown_is_killed() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.shutdown();
    r.advance(1000);
    assert!(r.signalled(pid, SIGKILL));
    r.exit(pid, ExitKind::Signal(SIGKILL));
    assert!(r.sup.all_stopped());
}

// -------------------------------------------------------------------------------------------
// An instance's phase

#[test]
fn an_instance_is_starting_until_verified_then_running_then_stopping() {
    let mut r = Rig::new("");
    r.install("p1", "v1");
    r.add("p1");
    let phase = |r: &Rig| format!("{:?}", r.plugin("p1").instance.as_ref().unwrap().phase);
    assert!(phase(&r).starts_with("Starting"), "{}", phase(&r));
    r.advance(50);
    assert!(phase(&r).starts_with("Running"), "{}", phase(&r));
    r.shutdown();
    assert!(phase(&r).starts_with("Stopping"), "{}", phase(&r));
}

#[test]
fn an_aborted_instance_stopped_by_a_shutdown_keeps_its_failure() {
    use super::plugin::Phase;
    let mut phase = Phase::Aborting { why: "late".into() };
    assert!(phase.is_leaving() && !phase.is_stopping() && phase.killed());
    let failure = phase.take_failure();
    let stopping = Phase::Stopping {
        kill_timer: None,
        killed: false,
        failure,
    };
    assert_eq!(stopping.failure(), Some("late"));
    assert!(stopping.killed(), "an aborted instance was sent SIGKILL");
    assert!(
        !Phase::Running {
            watchdog_timer: None
        }
        .is_leaving()
    );
}

#[test]
fn a_notify_plugin_aborted_for_readiness_and_then_shut_down_ends_cleanly() {
    let mut r = Rig::new(NOTIFY);
    r.install("p1", "v1");
    r.add("p1");
    let pid = r.pid("p1").unwrap();
    r.advance(300);
    r.shutdown();
    r.exit(pid, ExitKind::Signal(SIGKILL));
    assert!(r.sup.all_stopped());
    r.advance(10_000);
    assert_eq!(r.spawned().len(), 1);
}

#[test]
fn an_aborted_instance_whose_members_outlive_it_is_gone_once_they_are() {
    let mut r = Rig::new(NOTIFY);
    r.install("p1", "v1");
    r.add("p1");
    let pid = r.pid("p1").unwrap();
    r.advance(300);
    r.world.borrow_mut().members_alive.insert(pid);
    r.exit(pid, ExitKind::Signal(SIGKILL));
    // Killed: the leader's exit ends it, whatever is left gets SIGKILL too.
    assert_eq!(r.state("p1"), "backoff");
}

// -------------------------------------------------------------------------------------------
// Hooks

const HOOKS: &str = "[hooks]\non_reload_start = [\"/bin/true\"]\non_reload_success = [\"/bin/true\"]\non_reload_failure = [\"/bin/true\"]\ntimeout_ms = 500\n";

fn hooks_run(r: &Rig) -> Vec<&'static str> {
    r.calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Hook(kind) => Some(kind),
            _ => None,
        })
        .collect()
}

#[test]
fn a_successful_reload_runs_the_start_and_success_hooks() {
    let mut r = Rig::new(HOOKS);
    let old = r.running("p1", "v1");
    r.clear();
    r.deploy("p1", "v2");
    r.terminated(old);
    r.advance(50);
    assert_eq!(hooks_run(&r), ["on_reload_start", "on_reload_success"]);
}

#[test]
fn a_first_start_runs_no_hook() {
    let mut r = Rig::new(HOOKS);
    r.running("p1", "v1");
    assert!(hooks_run(&r).is_empty());
}

#[test]
fn a_refused_build_runs_the_start_and_failure_hooks() {
    let mut r = Rig::new(HOOKS);
    r.running("p1", "v1");
    r.clear();
    r.world.borrow_mut().refused.insert("v2".into());
    r.deploy("p1", "v2");
    assert_eq!(hooks_run(&r), ["on_reload_start", "on_reload_failure"]);
}

#[test]
fn a_reload_that_fails_every_attempt_runs_the_failure_hook_once() {
    let mut r = Rig::new(HOOKS);
    fail_every_attempt(&mut r);
    assert_eq!(hooks_run(&r), ["on_reload_failure"]);
}

#[test]
fn a_hook_past_its_timeout_is_killed_and_reported() {
    let mut r = Rig::new(HOOKS);
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.clear();
    r.advance(500);
    assert!(r.calls().iter().any(|c| matches!(c, Call::KillHook(_))));
    assert_eq!(r.count("hook_failed"), 1);
    r.terminated(old);
}

#[test]
fn a_hook_that_fails_is_reported_and_the_reload_goes_on() {
    let mut r = Rig::new(HOOKS);
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    let hook = super::testhost::FIRST_PID + 2;
    r.exit(hook, ExitKind::Code(3));
    assert_eq!(r.count("hook_failed"), 1);
    r.terminated(old);
    r.advance(50);
    assert_eq!(r.count("reload_succeeded"), 1);
}

// -------------------------------------------------------------------------------------------
// Plugins coming and going, toggles, configuration

#[test]
fn a_removed_plugin_is_stopped_then_forgotten() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.turn(|s, c| s.remove_plugin(c, "p1"));
    assert!(r.signalled(pid, SIGTERM));
    assert!(r.sup.contains("p1"));
    r.terminated(pid);
    assert!(!r.sup.contains("p1"));
    assert_eq!(r.count("plugin_removed"), 1);
}

#[test]
fn a_plugin_removed_during_a_reload_ends_it_and_starts_nothing() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.turn(|s, c| s.remove_plugin(c, "p1"));
    r.terminated(old);
    assert_eq!(r.spawned().len(), 1);
    assert!(!r.sup.contains("p1"));
}

#[test]
fn a_plugin_dir_back_while_its_old_instance_stops_starts_again_after() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.turn(|s, c| s.remove_plugin(c, "p1"));
    r.add("p1");
    r.terminated(pid);
    assert!(r.sup.contains("p1"));
    assert_eq!(r.spawned().len(), 2);
}

#[test]
fn a_change_while_hot_reload_is_disabled_is_ignored_until_enable() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.install("p1", "v2");
    let path = exec("p1");
    r.turn(|s, c| s.on_change(c, "p1", &path, false));
    r.advance(0);
    assert_eq!(r.count("change_ignored"), 1);
    assert!(!r.signalled(old, SIGTERM));
    r.turn(|s, c| s.on_enable(c));
    assert!(r.signalled(old, SIGTERM));
    assert_eq!(r.field("reload_started", "trigger"), "enable");
}

#[test]
fn changes_within_the_debounce_delay_make_one_reload() {
    let mut r = Rig::new("[hot_reload]\ndebounce_delay_ms = 100\n");
    let old = r.running("p1", "v1");
    r.install("p1", "v2");
    let path = exec("p1");
    for _ in 0..3 {
        r.turn(|s, c| s.on_change(c, "p1", &path, true));
        r.advance(60);
    }
    assert!(!r.signalled(old, SIGTERM));
    r.advance(40);
    assert!(r.signalled(old, SIGTERM));
    assert_eq!(r.count("reload_started"), 1);
}

#[test]
fn a_rescan_reloads_a_plugin_whose_build_changed_unseen() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.install("p1", "v2");
    r.turn(|s, c| s.rescan_versions(c));
    assert!(r.signalled(old, SIGTERM));
    assert_eq!(r.field("reload_started", "trigger"), "rescan");
}

#[test]
fn a_rescan_leaves_an_unchanged_plugin_alone() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.clear();
    r.turn(|s, c| s.rescan_versions(c));
    assert!(!r.signalled(pid, SIGTERM));
    assert!(r.names().is_empty());
}

#[test]
fn changed_settings_restart_the_plugin() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.config = config("[plugins.p1]\nargs = [\"--new\"]\n");
    r.turn(|s, c| s.apply_config(c));
    assert!(r.signalled(pid, SIGTERM));
    assert_eq!(r.field("reload_started", "trigger"), "config");
    r.terminated(pid);
    assert_eq!(r.spawned().last().unwrap().1, "v1");
}

#[test]
fn unchanged_settings_leave_the_plugin_alone() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.turn(|s, c| s.apply_config(c));
    assert!(!r.signalled(pid, SIGTERM));
}

#[test]
fn a_stopped_instance_leaves_its_runtime_data_in_state_json() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.world.borrow_mut().runtime = Some(serde_json::json!({"k": 2}));
    r.shutdown();
    r.terminated(pid);
    let states = r.world.borrow().states.clone();
    let state = states.values().next().unwrap();
    assert_eq!(state.runtime_data, serde_json::json!({"k": 2}));
}

#[test]
fn a_reload_writes_the_new_version_to_state_json_while_the_old_instance_stops() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.clear();
    r.deploy("p1", "v2");
    assert!(
        r.calls().contains(&Call::WriteState {
            version: "v2".into(),
            status: "starting".into()
        }),
        "written before the old one's exit: {:?}",
        r.calls()
    );
    r.terminated(old);
}

#[test]
fn a_thousand_plugins_start_a_few_per_turn() {
    let mut r = Rig::new("");
    for n in 0..10 {
        let id = format!("p{n}");
        r.install(&id, "v1");
        let dir = Path::new(PLUGINS).join(&id);
        r.turn(|s, c| s.add_plugin(c, &id, dir));
    }
    assert!(r.spawned().is_empty());
    let more = r.turn(|s, c| s.start_pending(c, 4));
    assert!(more);
    assert_eq!(r.spawned().len(), 4);
    r.turn(|s, c| s.start_pending(c, 100));
    assert_eq!(r.spawned().len(), 10);
    assert!(!r.sup.has_pending_starts());
}

// -------------------------------------------------------------------------------------------
// More phases: a rollback, a start-stop retry

#[test]
fn start_stop_the_old_instance_crashing_while_the_new_build_waits_to_retry_leaves_the_retry() {
    let mut r = Rig::new(START_STOP);
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.crash(r.pid("p1").unwrap());
    assert_eq!(r.state("p1"), "backoff");
    r.crash(old);
    assert_eq!(r.retiring_pid("p1"), None);
    assert_eq!(r.state("p1"), "backoff");
    r.advance(100);
    assert_eq!(r.spawned().last().unwrap().1, "v2");
}

#[test]
fn a_newer_build_during_a_rollback_is_queued_behind_it() {
    let mut r = Rig::new("");
    fail_every_attempt(&mut r);
    assert_eq!(r.state("p1"), "reloading");
    r.deploy("p1", "v3");
    assert_eq!(r.spawned().len(), 1, "only the rollback so far");
    r.advance(50);
    assert_eq!(r.count("rolled_back"), 1);
    let v1 = r.pid("p1").unwrap();
    assert!(r.signalled(v1, SIGTERM), "then the queued v3");
    r.terminated(v1);
    assert_eq!(r.spawned().last().unwrap().1, "v3");
}

#[test]
fn shutdown_during_a_rollback_stops_it() {
    let mut r = Rig::new("");
    fail_every_attempt(&mut r);
    let v1 = r.pid("p1").unwrap();
    r.shutdown();
    assert!(r.signalled(v1, SIGTERM));
    r.terminated(v1);
    assert!(r.sup.all_stopped());
    assert_eq!(r.count("rolled_back"), 0);
}

#[test]
fn a_restart_that_fails_its_grace_backs_off_like_the_crashes_before_it() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.crash(pid);
    let first = r.wheel.next_deadline().unwrap() - r.now_ms;
    r.advance(first);
    r.crash(r.pid("p1").unwrap());
    assert_eq!(r.state("p1"), "backoff");
    let second = r.wheel.next_deadline().unwrap() - r.now_ms;
    assert!(second > first, "{second} after {first}");
}

#[test]
fn the_reload_history_keeps_the_last_twenty() {
    let mut r = Rig::new("");
    let mut pid = r.running("p1", "v0");
    for n in 1..=25 {
        r.deploy("p1", &format!("v{n}"));
        r.terminated(pid);
        r.advance(50);
        pid = r.pid("p1").unwrap();
    }
    let p = r.plugin("p1");
    assert_eq!(p.reload_count, 25);
    assert_eq!(p.history.len(), super::plugin::HISTORY_LEN);
    assert_eq!(p.history[0].new_version.as_deref(), Some("v25"));
}

#[test]
fn a_reloads_state_write_is_made_durable_only_after_the_new_instance_spawned() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.clear();
    r.deploy("p1", "v2");
    assert!(
        !r.calls().contains(&Call::SyncDir),
        "no directory fsync while the old instance stops"
    );
    r.clear();
    r.terminated(old);
    let calls = r.calls();
    let spawn = calls
        .iter()
        .position(|c| matches!(c, Call::Spawn { .. }))
        .expect("spawned");
    let sync = calls
        .iter()
        .position(|c| *c == Call::SyncDir)
        .expect("the directory fsync at the end of the turn");
    assert!(spawn < sync, "{calls:?}");
}

#[test]
fn a_first_starts_state_write_is_made_durable_at_the_end_of_its_turn() {
    let mut r = Rig::new("");
    r.install("p1", "v1");
    r.add("p1");
    let calls = r.calls();
    let spawn = calls
        .iter()
        .position(|c| matches!(c, Call::Spawn { .. }))
        .unwrap();
    let sync = calls.iter().position(|c| *c == Call::SyncDir).unwrap();
    assert!(spawn < sync, "{calls:?}");
}

// -------------------------------------------------------------------------------------------
// Per-plugin lifecycle: stop, start, restart (SPEC §5)

/// A waiter for the lifecycle commands, told apart by `n`.
fn waiter(n: u64) -> super::Waiter {
    super::Waiter {
        client: crate::control::ClientId::for_tests(n),
        request_id: None,
        reply: super::Reply::Lifecycle,
    }
}

impl Rig {
    fn stop(&mut self, id: &str, n: u64) {
        self.turn(|s, c| s.stop(c, id, Some(waiter(n))));
    }

    fn start(&mut self, id: &str, n: u64) {
        self.turn(|s, c| s.start(c, id, Some(waiter(n))));
    }

    fn restart(&mut self, id: &str, n: u64) {
        self.turn(|s, c| s.restart(c, id, Some(waiter(n))));
    }

    /// The answer waiter `n` got, if any: (ok, error).
    fn answer(&self, n: u64) -> Option<(bool, Option<String>)> {
        let client = crate::control::ClientId::for_tests(n);
        let mut answers = self.replies.iter().filter(|(w, _)| w.client == client);
        let (_, result) = answers.next()?;
        assert!(answers.next().is_none(), "waiter {n} answered twice");
        Some((result.ok, result.error.clone()))
    }

    /// The state file last written for `id`.
    fn state_file(&self, id: &str) -> crate::state_file::PluginState {
        let path = Path::new("/dev/null/hr/state/plugins")
            .join(id)
            .join("state.json");
        self.world
            .borrow()
            .states
            .get(&path)
            .cloned()
            .expect("state.json written")
    }

    /// The daemon restarts: a new supervisor over the same machine, the plugin found again.
    fn restart_daemon(&mut self, id: &str) {
        let host = FakeHost(self.world.clone());
        let (run, state) = (&self.config.runtime_dir, &self.config.state_dir);
        self.sup = Supervisor::with_host(run, state, Box::new(host));
        self.wheel = TimerWheel::new(self.now_ms);
        self.add(id);
    }
}

#[test]
fn stop_of_a_running_plugin_answers_once_it_is_down_and_keeps_it_stopped() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.clear();
    r.stop("p1", 1);
    assert!(r.signalled(pid, SIGTERM));
    assert_eq!(r.state("p1"), "stopping");
    assert_eq!(r.answer(1), None, "answered when the plugin is down");
    r.terminated(pid);
    assert_eq!(r.state("p1"), "stopped");
    assert_eq!(r.answer(1), Some((true, None)));
    assert_eq!(r.names(), ["plugin_exited", "plugin_stopped"]);
    assert_eq!(r.field("plugin_stopped", "version"), "v1");
    let entry = r.sup.list_entry(r.plugin("p1"));
    assert!(
        entry
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("stopped by request"),
        "list says why: {entry:?}"
    );
    assert!(r.state_file("p1").control.stopped_by_request.is_some());
}

#[test]
fn a_stopped_plugin_ignores_a_new_build_and_says_so() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.stop("p1", 1);
    r.terminated(pid);
    r.clear();
    r.deploy("p1", "v2");
    assert!(r.spawned().is_empty());
    assert_eq!(r.state("p1"), "stopped");
    assert_eq!(r.names(), ["change_ignored"]);
    let reason = r.field("change_ignored", "reason");
    assert!(reason.as_str().unwrap().contains("stopped"), "{reason}");
}

#[test]
fn a_stopped_plugin_is_not_started_by_global_enable_config_reload_rescan_or_trigger() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.stop("p1", 1);
    r.terminated(pid);
    r.install("p1", "v2");
    r.clear();
    r.turn(|s, c| s.on_enable(c));
    r.turn(|s, c| s.rescan_versions(c));
    r.config = config("[plugins.p1]\nargs = [\"--new\"]\n");
    r.turn(|s, c| s.apply_config(c));
    let exec = exec("p1").to_string_lossy().into_owned();
    r.turn(|s, c| s.request(c, "p1", Trigger::Manual, vec![exec], vec![waiter(2)]));
    r.advance(10_000);
    assert!(r.spawned().is_empty(), "{:?}", r.calls());
    assert_eq!(r.state("p1"), "stopped");
    let (ok, error) = r.answer(2).expect("the trigger is answered");
    assert!(!ok);
    assert!(error.unwrap().contains("start p1"), "says how to start it");
}

#[test]
fn stop_during_a_crash_restart_backoff_cancels_the_restart() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.crash(pid);
    assert_eq!(r.state("p1"), "backoff");
    r.clear();
    r.stop("p1", 1);
    assert_eq!(r.state("p1"), "stopped");
    assert_eq!(
        r.answer(1),
        Some((true, None)),
        "nothing ran: answered at once"
    );
    r.advance(60_000);
    assert!(r.spawned().is_empty(), "the restart timer started nothing");
    assert_eq!(r.state("p1"), "stopped");
}

#[test]
fn stop_of_a_failed_plugin_makes_it_stopped_at_once() {
    let mut r = Rig::new("[supervisor]\nrestart = \"never\"\n");
    let pid = r.running("p1", "v1");
    r.crash(pid);
    assert_eq!(r.state("p1"), "failed");
    r.stop("p1", 1);
    assert_eq!(r.state("p1"), "stopped");
    assert_eq!(r.answer(1), Some((true, None)));
}

#[test]
fn stop_during_a_reload_ends_the_reload_and_starts_nothing_new() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    let exec = exec("p1").to_string_lossy().into_owned();
    r.install("p1", "v2");
    let mut reload_waiter = waiter(7);
    reload_waiter.reply = super::Reply::Reload;
    r.turn(|s, c| s.request(c, "p1", Trigger::Manual, vec![exec], vec![reload_waiter]));
    assert_eq!(r.state("p1"), "reloading");
    r.clear();
    r.stop("p1", 1);
    let (ok, error) = r.answer(7).expect("the reload's waiter is told");
    assert!(!ok);
    assert!(error.unwrap().contains("stopped by request"));
    r.terminated(old);
    assert!(r.spawned().is_empty(), "v2 was not started");
    assert_eq!(r.state("p1"), "stopped");
    assert_eq!(r.answer(1), Some((true, None)));
}

#[test]
fn stop_during_a_first_start_stops_it_without_retry() {
    let mut r = Rig::new("");
    r.install("p1", "v1");
    r.add("p1");
    assert_eq!(r.state("p1"), "starting");
    let pid = r.pid("p1").unwrap();
    r.stop("p1", 1);
    assert!(r.signalled(pid, SIGTERM));
    r.terminated(pid);
    r.advance(10_000);
    assert_eq!(r.spawned().len(), 1, "no retry after the stop");
    assert_eq!(r.state("p1"), "stopped");
    assert_eq!(r.answer(1), Some((true, None)));
}

#[test]
fn stop_of_an_instance_being_killed_for_failing_readiness_waits_for_its_exit() {
    let mut r = Rig::new("[plugins.p1]\nready = \"notify\"\n");
    r.install("p1", "v1");
    r.add("p1");
    let pid = r.pid("p1").unwrap();
    r.advance(300);
    assert!(r.signalled(pid, SIGKILL), "aborted for missing READY=1");
    r.stop("p1", 1);
    assert_eq!(r.answer(1), None);
    r.exit(pid, ExitKind::Signal(SIGKILL));
    r.advance(10_000);
    assert_eq!(r.spawned().len(), 1, "neither retried nor restarted");
    assert_eq!(r.state("p1"), "stopped");
    assert_eq!(r.answer(1), Some((true, None)));
}

#[test]
fn start_of_a_stopped_plugin_starts_its_newest_build_and_lifts_the_stop() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.stop("p1", 1);
    r.terminated(pid);
    r.install("p1", "v2");
    r.clear();
    r.start("p1", 2);
    assert_eq!(r.spawned()[0].1, "v2");
    assert_eq!(r.answer(2), None, "answered once it runs");
    r.advance(50);
    assert_eq!(r.state("p1"), "running");
    assert_eq!(r.answer(2), Some((true, None)));
    assert_eq!(r.names()[0], "plugin_start_requested");
    assert_eq!(r.field("plugin_start_requested", "action"), "start");
    assert_eq!(r.count("reload_started"), 0, "a start is no reload");
    assert_eq!(r.state_file("p1").control.stopped_by_request, None);
    // Supervised as before: the next build reloads it.
    r.deploy("p1", "v3");
    assert_eq!(r.state("p1"), "reloading");
}

#[test]
fn start_falls_back_to_the_last_good_build_when_the_newest_is_refused() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.stop("p1", 1);
    r.terminated(pid);
    r.install("p1", "v2");
    r.world.borrow_mut().refused.insert("v2".into());
    r.clear();
    r.start("p1", 2);
    assert_eq!(r.spawned(), [(FIRST_NEXT_PID, "v1".to_string())]);
    r.advance(50);
    assert_eq!(r.answer(2), Some((true, None)));
    assert_eq!(r.version("p1").as_deref(), Some("v1"));
}

/// The pid the fake hands out for the spawn after `running` (and nothing else) ran one.
const FIRST_NEXT_PID: i32 = super::testhost::FIRST_PID + 2;

#[test]
fn start_of_a_running_plugin_is_answered_at_once_and_spawns_nothing() {
    let mut r = Rig::new("");
    r.running("p1", "v1");
    r.clear();
    r.start("p1", 1);
    assert_eq!(r.answer(1), Some((true, None)));
    assert!(r.spawned().is_empty());
}

#[test]
fn start_during_a_stop_supersedes_it_and_starts_once_the_old_instance_is_gone() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.stop("p1", 1);
    r.clear();
    r.start("p1", 2);
    let (ok, _) = r.answer(1).expect("the stop is told it was superseded");
    assert!(!ok);
    assert!(r.spawned().is_empty(), "one instance at a time");
    r.terminated(pid);
    assert_eq!(r.spawned().len(), 1);
    r.advance(50);
    assert_eq!(r.state("p1"), "running");
    assert_eq!(r.answer(2), Some((true, None)));
    assert_eq!(r.count("plugin_stopped"), 0);
}

#[test]
fn start_during_a_crash_restart_backoff_starts_at_once() {
    let mut r = Rig::new("[hot_reload]\nretry_delay_ms = 5000\n");
    let pid = r.running("p1", "v1");
    r.crash(pid);
    assert_eq!(r.state("p1"), "backoff");
    r.clear();
    r.start("p1", 1);
    assert_eq!(r.spawned().len(), 1, "not after the backoff");
    r.advance(50);
    assert_eq!(r.answer(1), Some((true, None)));
    r.advance(10_000);
    assert_eq!(r.spawned().len(), 1, "the superseded restart is gone");
}

#[test]
fn restart_of_a_running_plugin_restarts_the_same_version() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.clear();
    r.restart("p1", 1);
    assert!(
        r.signalled(pid, SIGTERM),
        "not a no-op although the version is the same"
    );
    r.terminated(pid);
    assert_eq!(r.spawned()[0].1, "v1");
    r.advance(50);
    assert_eq!(r.answer(1), Some((true, None)));
    assert_eq!(r.field("reload_started", "trigger"), "restart");
}

#[test]
fn restart_of_a_failed_plugin_starts_its_newest_build() {
    let mut r = Rig::new("[supervisor]\nrestart = \"never\"\n");
    let pid = r.running("p1", "v1");
    r.crash(pid);
    assert_eq!(r.state("p1"), "failed");
    r.install("p1", "v2");
    r.clear();
    r.restart("p1", 1);
    assert_eq!(r.spawned()[0].1, "v2");
    r.advance(50);
    assert_eq!(r.state("p1"), "running");
    assert_eq!(r.answer(1), Some((true, None)));
}

#[test]
fn restart_of_a_plugin_failed_at_its_start_limit_starts_it() {
    let mut r = Rig::new("[supervisor]\nstart_limit_burst = 0\n");
    let pid = r.running("p1", "v1");
    r.crash(pid);
    assert_eq!(r.state("p1"), "failed");
    assert!(r.last_error("p1").contains("start limit"));
    r.restart("p1", 1);
    r.advance(50);
    assert_eq!(r.state("p1"), "running");
    assert_eq!(r.answer(1), Some((true, None)));
}

#[test]
fn restart_of_a_stopped_plugin_lifts_the_stop() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.stop("p1", 1);
    r.terminated(pid);
    r.restart("p1", 2);
    r.advance(50);
    assert_eq!(r.state("p1"), "running");
    assert_eq!(r.answer(2), Some((true, None)));
    assert_eq!(r.field("plugin_start_requested", "action"), "restart");
}

#[test]
fn restart_during_a_reload_runs_after_it() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.restart("p1", 1);
    r.terminated(old);
    r.advance(50);
    assert_eq!(r.version("p1").as_deref(), Some("v2"));
    assert_eq!(r.answer(1), None, "queued behind the reload");
    let v2 = r.pid("p1").unwrap();
    assert!(r.signalled(v2, SIGTERM), "then the restart");
    r.terminated(v2);
    r.advance(50);
    assert_eq!(r.state("p1"), "running");
    assert_eq!(r.answer(1), Some((true, None)));
}

#[test]
fn restart_with_a_refused_newest_build_restarts_the_last_good_one() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.install("p1", "v2");
    r.world.borrow_mut().refused.insert("v2".into());
    r.clear();
    r.restart("p1", 1);
    assert!(r.signalled(pid, SIGTERM));
    r.terminated(pid);
    assert_eq!(r.spawned()[0].1, "v1");
    r.advance(50);
    assert_eq!(r.answer(1), Some((true, None)));
}

#[test]
fn shutdown_while_stopping_answers_the_stop_once_the_plugin_is_down() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.stop("p1", 1);
    r.shutdown();
    assert!(!r.sup.all_stopped());
    r.terminated(pid);
    assert!(r.sup.all_stopped());
    assert_eq!(r.answer(1), Some((true, None)));
    assert!(r.state_file("p1").control.stopped_by_request.is_some());
}

#[test]
fn a_plugin_stopped_by_request_stays_stopped_across_a_daemon_restart() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.stop("p1", 1);
    r.terminated(pid);
    r.clear();
    r.restart_daemon("p1");
    assert!(r.spawned().is_empty());
    assert_eq!(r.state("p1"), "stopped");
    r.start("p1", 2);
    r.advance(50);
    assert_eq!(r.state("p1"), "running");
}

#[test]
fn without_preserve_state_a_stop_still_outlives_a_daemon_restart() {
    let mut r = Rig::new("[hot_reload]\npreserve_state = false\n");
    let pid = r.running("p1", "v1");
    r.stop("p1", 1);
    r.terminated(pid);
    r.clear();
    r.restart_daemon("p1");
    assert!(r.spawned().is_empty());
    assert_eq!(r.state("p1"), "stopped");
}

// -------------------------------------------------------------------------------------------
// A plugin's own hot reload switch (SPEC §5 enable/disable ID, `hot_reload`)

#[test]
fn a_plugin_disabled_on_its_own_ignores_changes_and_a_global_enable() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.clear();
    let on = r.turn(|s, c| s.set_hot_reload(c, "p1", false, true));
    assert!(!on);
    assert_eq!(r.names(), ["hot_reload_disabled"]);
    r.deploy("p1", "v2");
    assert!(!r.signalled(pid, SIGTERM));
    let reason = r.field("change_ignored", "reason");
    assert!(
        reason.as_str().unwrap().contains("for this plugin"),
        "{reason}"
    );
    r.turn(|s, c| s.on_enable(c));
    assert!(!r.signalled(pid, SIGTERM), "a global enable leaves it off");
    assert!(!r.sup.list_entry(r.plugin("p1")).hot_reload);
    assert_eq!(r.state_file("p1").control.hot_reload, Some(false));
    r.turn(|s, c| s.set_hot_reload(c, "p1", true, true));
    assert!(
        r.signalled(pid, SIGTERM),
        "enable ID reloads the changed build"
    );
    assert_eq!(r.field("reload_started", "trigger"), "enable");
    assert_eq!(r.state_file("p1").control.hot_reload, None);
}

#[test]
fn enable_id_of_an_unchanged_plugin_reloads_nothing() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.turn(|s, c| s.set_hot_reload(c, "p1", false, true));
    r.turn(|s, c| s.set_hot_reload(c, "p1", true, true));
    assert!(!r.signalled(pid, SIGTERM));
}

#[test]
fn hot_reload_false_in_the_config_ignores_changes_until_enable_id() {
    let mut r = Rig::new("[plugins.p1]\nhot_reload = false\n");
    let pid = r.running("p1", "v1");
    r.deploy("p1", "v2");
    assert!(!r.signalled(pid, SIGTERM));
    assert_eq!(
        r.state_file("p1").control.hot_reload,
        None,
        "the config says so"
    );
    r.turn(|s, c| s.set_hot_reload(c, "p1", true, true));
    assert!(r.signalled(pid, SIGTERM));
    assert_eq!(r.state_file("p1").control.hot_reload, Some(true));
}

#[test]
fn a_plugin_disabled_on_its_own_stays_disabled_across_a_daemon_restart() {
    let mut r = Rig::new("");
    r.running("p1", "v1");
    r.turn(|s, c| s.set_hot_reload(c, "p1", false, true));
    r.restart_daemon("p1");
    assert!(!r.plugin("p1").hot_reload_on());
    assert_eq!(r.spawned().len(), 2, "it still starts with the daemon");
}

#[test]
fn changing_only_hot_reload_in_the_config_restarts_nothing_and_overrides_the_command() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.turn(|s, c| s.set_hot_reload(c, "p1", false, true));
    r.clear();
    r.config = config("[plugins.p1]\nhot_reload = false\n");
    r.turn(|s, c| s.apply_config(c));
    assert!(!r.signalled(pid, SIGTERM));
    assert!(!r.plugin("p1").hot_reload_on());
    r.config = config("[plugins.p1]\nhot_reload = true\n");
    r.turn(|s, c| s.apply_config(c));
    assert!(!r.signalled(pid, SIGTERM));
    assert!(
        r.plugin("p1").hot_reload_on(),
        "the newest word is the config's"
    );
}

#[test]
fn stop_during_a_start_stop_reload_stops_both_instances_before_answering() {
    let mut r = Rig::new("[plugins.p1]\nstrategy = \"start-stop\"\n");
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    let new = r.pid("p1").unwrap();
    assert_eq!(r.retiring_pid("p1"), Some(old));
    r.stop("p1", 1);
    assert!(r.signalled(old, SIGTERM) && r.signalled(new, SIGTERM));
    r.terminated(new);
    assert_eq!(r.answer(1), None, "the old one still runs");
    r.terminated(old);
    assert_eq!(r.state("p1"), "stopped");
    assert_eq!(r.answer(1), Some((true, None)));
    r.advance(10_000);
    assert_eq!(r.spawned().len(), 2, "nothing started since");
}

#[test]
fn a_start_whose_newest_build_keeps_failing_falls_back_to_the_last_good_one() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.stop("p1", 1);
    r.terminated(pid);
    r.install("p1", "v2");
    r.start("p1", 2);
    for delay in [100, 200] {
        let pid = r.pid("p1").unwrap();
        r.crash(pid);
        r.advance(delay);
    }
    let pid = r.pid("p1").unwrap();
    r.crash(pid);
    assert_eq!(
        r.spawned().last().unwrap().1,
        "v1",
        "rolled back to the last good"
    );
    assert_eq!(r.answer(2), None, "the start waits for the rollback");
    r.advance(50);
    assert_eq!(r.state("p1"), "running");
    assert_eq!(
        r.answer(2),
        Some((true, None)),
        "the newest good build runs"
    );
}

#[test]
fn a_restart_whose_build_and_rollback_both_fail_is_answered_failed() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.install("p1", "v2");
    r.world.borrow_mut().unspawnable.insert("v2".into());
    r.restart("p1", 1);
    r.terminated(pid);
    r.advance(300);
    assert_eq!(r.answer(1), None, "the rollback runs");
    let rollback = r.pid("p1").unwrap();
    r.crash(rollback);
    assert_eq!(r.state("p1"), "failed");
    let (ok, error) = r.answer(1).expect("answered");
    assert!(!ok);
    assert!(error.unwrap().contains("startup grace"));
}

#[test]
fn a_trigger_waiter_is_answered_at_the_failure_not_after_the_rollback() {
    let mut r = Rig::new("");
    let pid = r.running("p1", "v1");
    r.install("p1", "v2");
    r.world.borrow_mut().unspawnable.insert("v2".into());
    let mut w = waiter(1);
    w.reply = super::Reply::Reload;
    let exec = exec("p1").to_string_lossy().into_owned();
    r.turn(|s, c| s.request(c, "p1", Trigger::Manual, vec![exec], vec![w]));
    r.terminated(pid);
    r.advance(300);
    let (ok, _) = r
        .answer(1)
        .expect("answered when the reload finally failed");
    assert!(!ok);
}

#[test]
fn a_plugin_with_hot_reload_off_still_starts_with_its_first_build() {
    let mut r = Rig::new("[plugins.p1]\nhot_reload = false\n");
    r.add("p1");
    assert_eq!(r.state("p1"), "missing");
    r.deploy("p1", "v1");
    assert_eq!(r.state("p1"), "starting");
    r.advance(50);
    let pid = r.pid("p1").unwrap();
    r.deploy("p1", "v2");
    assert!(!r.signalled(pid, SIGTERM), "but no reload");
}

#[test]
fn start_of_a_failed_plugin_starts_it_again() {
    let mut r = Rig::new("[supervisor]\nrestart = \"never\"\n");
    let pid = r.running("p1", "v1");
    r.crash(pid);
    assert_eq!(r.state("p1"), "failed");
    r.start("p1", 1);
    r.advance(50);
    assert_eq!(r.state("p1"), "running");
    assert_eq!(r.answer(1), Some((true, None)));
}

#[test]
fn start_during_a_reload_is_answered_with_the_reloads_outcome() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.start("p1", 1);
    assert_eq!(r.answer(1), None);
    r.terminated(old);
    r.advance(50);
    assert_eq!(r.answer(1), Some((true, None)));
    assert_eq!(r.spawned().len(), 2, "no extra start");
}

#[test]
fn start_during_a_first_start_is_answered_when_it_runs() {
    let mut r = Rig::new("");
    r.install("p1", "v1");
    r.add("p1");
    r.start("p1", 1);
    assert_eq!(r.answer(1), None);
    r.advance(50);
    assert_eq!(r.answer(1), Some((true, None)));
    assert_eq!(r.spawned().len(), 1);
}

#[test]
fn restart_during_a_crash_restart_backoff_starts_at_once() {
    let mut r = Rig::new("[hot_reload]\nretry_delay_ms = 5000\n");
    let pid = r.running("p1", "v1");
    r.crash(pid);
    assert_eq!(r.state("p1"), "backoff");
    r.restart("p1", 1);
    assert_eq!(r.spawned().len(), 2, "not after the backoff");
    r.advance(50);
    assert_eq!(r.answer(1), Some((true, None)));
    r.advance(10_000);
    assert_eq!(r.spawned().len(), 2);
}

#[test]
fn restart_during_a_first_start_restarts_once_it_runs() {
    let mut r = Rig::new("");
    r.install("p1", "v1");
    r.add("p1");
    let first = r.pid("p1").unwrap();
    r.restart("p1", 1);
    assert!(!r.signalled(first, SIGTERM), "queued behind the start");
    r.advance(50);
    assert!(r.signalled(first, SIGTERM));
    r.terminated(first);
    r.advance(50);
    assert_eq!(r.spawned().len(), 2);
    assert_eq!(r.answer(1), Some((true, None)));
}

#[test]
fn a_failed_deferred_fsync_of_state_json_writes_it_again_durably() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.world.borrow_mut().state_syncs_fail = true;
    r.clear();
    r.terminated(old);
    let calls = r.calls();
    let writes: Vec<&Call> = calls
        .iter()
        .filter(|c| matches!(c, Call::WriteState { .. }))
        .collect();
    // The deferred write happened while v1 stopped; after its fsync failed, one synced rewrite
    // with the same content (fsyncgate: never trust a second fsync of the same data).
    assert_eq!(
        writes,
        vec![&Call::WriteState {
            version: "v2".into(),
            status: "starting".into()
        }],
        "{calls:?}"
    );
    let spawn = calls
        .iter()
        .position(|c| matches!(c, Call::Spawn { .. }))
        .expect("spawned");
    let rewrite = calls
        .iter()
        .position(|c| matches!(c, Call::WriteState { .. }))
        .unwrap();
    assert!(spawn < rewrite, "{calls:?}");
}

#[test]
fn a_reload_writes_its_staged_copy_after_asking_the_old_instance_to_stop() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.clear();
    r.deploy("p1", "v2");
    let calls = r.calls();
    let at = |want: &dyn Fn(&Call) -> bool| calls.iter().position(want);
    let preflight = at(&|c| *c == Call::Preflight("v2".into()));
    let stop =
        at(&|c| matches!(c, Call::SignalGroup { pgid, sig } if *pgid == old && *sig == SIGTERM));
    let written = at(&|c| *c == Call::SnapshotWritten("v2".into()));
    assert!(preflight.is_some() && preflight < stop, "{calls:?}");
    assert!(stop.is_some() && stop < written, "{calls:?}");
    r.terminated(old);
    assert_eq!(r.spawned()[0].1, "v2");
    r.advance(50);
    assert_eq!(r.state("p1"), "running");
}

#[test]
fn an_instance_is_moved_off_the_daemons_cpu_just_before_its_stop_signal() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.clear();
    r.deploy("p1", "v2");
    let calls = r.calls();
    let moved = calls.iter().position(|c| *c == Call::ExitElsewhere(old));
    let stop = calls.iter().position(
        |c| matches!(c, Call::SignalGroup { pgid, sig } if *pgid == old && *sig == SIGTERM),
    );
    assert!(moved.is_some() && stop.is_some(), "{calls:?}");
    assert_eq!(moved.map(|m| m + 1), stop, "{calls:?}");
    // Nothing else is moved: the new instance starts wherever the kernel puts it.
    r.terminated(old);
    let moves = r
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::ExitElsewhere(_)))
        .count();
    assert_eq!(moves, 1, "{:?}", r.calls());
}

#[test]
fn a_first_start_copies_its_build_at_once_and_holds_no_staging_memory() {
    let mut r = Rig::new("");
    r.running("p1", "v1");
    assert!(!r.calls().contains(&Call::SnapshotWritten("v1".into())));
    assert!(!r.world.borrow().buffer_held);
}

#[test]
fn a_staged_copy_that_cannot_be_written_fails_the_attempts_and_rolls_back() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.world.borrow_mut().write_failures = 1;
    r.deploy("p1", "v2");
    r.terminated(old);
    assert!(
        r.spawned().iter().all(|(_, v)| v != "v2"),
        "{:?}",
        r.spawned()
    );
    assert!(
        r.last_error("p1").contains("cannot snapshot the build"),
        "{}",
        r.last_error("p1")
    );
    // Each retry reports the same failed write; then the last good build runs again.
    r.advance(100);
    r.advance(200);
    r.advance(50);
    assert_eq!(r.version("p1").as_deref(), Some("v1"));
    assert_eq!(r.state("p1"), "running");
    assert_eq!(r.count("rolled_back"), 1, "{:?}", r.names());
}

#[test]
fn the_staging_memory_is_freed_once_no_reload_used_it_for_thirty_seconds() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.deploy("p1", "v2");
    r.terminated(old);
    assert!(r.world.borrow().buffer_held);
    r.advance(20_000);
    let old = r.pid("p1").unwrap();
    r.deploy("p1", "v3");
    r.terminated(old);
    r.advance(29_000);
    assert!(
        r.world.borrow().buffer_held,
        "kept 30 s after the last reload"
    );
    r.advance(1_000);
    assert!(!r.world.borrow().buffer_held);
}

#[test]
fn only_the_first_start_of_a_loop_turn_hands_the_cpu_to_its_instance() {
    let mut r = Rig::new("");
    for id in ["p1", "p2"] {
        r.install(id, "v1");
        let dir = Path::new(PLUGINS).join(id);
        r.turn(|s, c| s.add_plugin(c, id, dir));
    }
    r.clear();
    r.turn(|s, c| s.start_pending(c, 100));
    let yields = |r: &Rig| r.calls().iter().filter(|c| **c == Call::Yield).count();
    assert_eq!(r.spawned().len(), 2, "{:?}", r.calls());
    assert_eq!(yields(&r), 1, "{:?}", r.calls());
    r.advance(50);
    let old = r.pid("p1").unwrap();
    r.clear();
    r.deploy("p1", "v2");
    r.terminated(old);
    assert_eq!(yields(&r), 1, "a later turn's start: {:?}", r.calls());
}

#[test]
fn a_staged_copy_of_a_refused_build_is_dropped_not_written() {
    let mut r = Rig::new("");
    let old = r.running("p1", "v1");
    r.world.borrow_mut().refused.insert("v2".into());
    r.clear();
    r.deploy("p1", "v2");
    assert!(!r.signalled(old, SIGTERM), "{:?}", r.calls());
    assert!(!r.calls().contains(&Call::SnapshotWritten("v2".into())));
    assert_eq!(r.world.borrow().staged, None, "nothing left staged");
}
