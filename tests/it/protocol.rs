//! The plugin protocol (SPEC §3 `[plugins.*]` ready/strategy/sockets/watchdog_ms/fdstore_max,
//! `[hooks]`; §4 `NOTIFY_SOCKET`): READY=1 gating, datagrams from foreign processes, start-stop
//! overlap, zero-downtime reloads of the echo_server example under load, the fd store, reload
//! hooks and the plugin watchdog.
//!
//! Plugins that speak the protocol are small `python3` scripts (`Py`): sockets, SCM_RIGHTS and
//! memfds are one call each there. They log `start/ready/stop <label> <pid>` and record their
//! environment exactly like the `sh` test plugins, so the `Daemon` helpers work for both. Timing
//! claims are checked on the daemon's own event timestamps, never with sleeps.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::{
    Config, Daemon, Script, TIMEOUT, event_ms, expected_version, install_atomic, is_event,
    pid_alive, python, random_hex, wait_until,
};

// ------------------------------------------------------------------------------------------------
// Python test plugins

/// What a `Py` plugin does, in order, once it has recorded its start; then it waits forever.
const PY_PLUGIN: &str = r#"
import array, json, os, signal, socket, sys, time

CFG = json.loads(CFG_JSON)
ROOT, ID, LABEL, PID = CFG["root"], CFG["id"], CFG["label"], os.getpid()

def record(kind, text):
    path = f"{ROOT}/{kind}-{ID}-{PID}.txt"
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)

def log(what):
    with open(f"{ROOT}/log-{ID}.txt", "a") as f:
        f.write(f"{what} {LABEL} {PID}\n")

def notify(text, fds=()):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if fds:
            # Not socket.send_fds: before Python 3.12 it drops its address argument.
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            s.sendmsg([text.encode()], rights, 0, os.environ["NOTIFY_SOCKET"])
        else:
            s.sendto(text.encode(), os.environ["NOTIFY_SOCKET"])
    finally:
        s.close()

def on_term(signum, frame):
    for step in CFG["steps"]:
        if "store_on_stop" in step:
            fd = os.memfd_create(step["store_on_stop"])
            os.write(fd, step["content"].encode())
            notify("FDSTORE=1\nFDNAME=" + step["store_on_stop"], [fd])
            os.close(fd)
            # Still busy a moment after parking it (flushing, say): the daemon reads the
            # datagram before this instance is reaped.
            time.sleep(step["linger_ms"] / 1000)
    log("stop")
    os._exit(0)

signal.signal(signal.SIGTERM, on_term)
record("env", "".join(f"{k}={v}\n" for k, v in os.environ.items()))

# Passed descriptors: fd 3 + i is named names[i]; a unix socket's address, a stored fd's content.
count = int(os.environ.get("LISTEN_FDS", "0"))
names = os.environ.get("LISTEN_FDNAMES", "").split(":") if count else []
fds = {}
for i, name in enumerate(names):
    fd = 3 + i
    try:
        s = socket.socket(fileno=os.dup(fd))
        fds[name] = {"fd": fd, "socket": str(s.getsockname())}
        s.close()
    except OSError:
        os.lseek(fd, 0, os.SEEK_SET)
        fds[name] = {"fd": fd, "content": os.read(fd, 4096).decode()}
record("listen", json.dumps({"count": count, "names": names, "fds": fds}))
log("start")

for step in CFG["steps"]:
    if "notify" in step:
        notify(step["notify"])
    elif "log" in step:
        log(step["log"])
    elif "sleep_ms" in step:
        time.sleep(step["sleep_ms"] / 1000)
    elif "wait_file" in step:
        while not os.path.exists(step["wait_file"]):
            time.sleep(0.01)
    elif "store" in step:
        fd = os.memfd_create(step["store"])
        os.write(fd, step["content"].encode())
        notify("FDSTORE=1\nFDNAME=" + step["store"], [fd])
        os.close(fd)

while True:
    time.sleep(1000)
"#;

/// A python3 test plugin: records `env-`, `listen-` (`<id>-<pid>.txt`), logs `start`, runs its
/// steps, then waits; SIGTERM logs `stop` and exits 0.
#[derive(Clone, Debug)]
struct Py {
    label: String,
    steps: Vec<Value>,
}

impl Py {
    fn new(label: &str) -> Py {
        Py {
            label: label.to_string(),
            steps: Vec::new(),
        }
    }

    fn step(mut self, step: Value) -> Py {
        self.steps.push(step);
        self
    }

    fn notify(self, text: &str) -> Py {
        self.step(json!({ "notify": text }))
    }

    /// Logs `<what> <label> <pid>`.
    fn log(self, what: &str) -> Py {
        self.step(json!({ "log": what }))
    }

    /// Logs `ready` (what `Daemon::wait_started` waits for), then sends READY=1: whatever the
    /// daemon does once it is ready comes after that line in the log.
    fn ready(self) -> Py {
        self.log("ready").notify("READY=1")
    }

    fn sleep_ms(self, ms: u64) -> Py {
        self.step(json!({ "sleep_ms": ms }))
    }

    fn wait_file(self, path: &Path) -> Py {
        self.step(json!({ "wait_file": path }))
    }

    /// A memfd holding `content`, sent with FDSTORE=1 and FDNAME=`name`.
    fn store_memfd(self, name: &str, content: &str) -> Py {
        self.step(json!({ "store": name, "content": content }))
    }

    /// On SIGTERM, before exiting: a memfd holding `content`, stored as `name`; then
    /// `linger_ms` more before the exit.
    fn store_memfd_on_stop(self, name: &str, content: &str, linger_ms: u64) -> Py {
        self.step(json!({ "store_on_stop": name, "content": content, "linger_ms": linger_ms }))
    }

    fn render(&self, root: &Path, id: &str) -> Vec<u8> {
        let cfg = json!({
            "root": root, "id": id, "label": self.label, "steps": self.steps,
            "nonce": random_hex(4),
        });
        // JSON inside a raw triple-quoted string: only `'''` could end it, and no path, label
        // or step of these tests contains one.
        let cfg = cfg.to_string();
        assert!(!cfg.contains("'''"), "test bug: ''' in a Py config");
        format!(
            "#!{}\n# hotreload protocol test plugin\nCFG_JSON = r'''{cfg}'''\n{PY_PLUGIN}",
            python()
        )
        .into_bytes()
    }
}

fn install_py(d: &Daemon, id: &str, py: &Py) -> Vec<u8> {
    let content = py.render(&d.root, id);
    install_atomic(&d.exec_path(id), &content, 0o755);
    content
}

/// Installs `py`, starts the daemon, waits until that build runs; its bytes and pid.
#[track_caller]
fn start_running_py(d: &mut Daemon, id: &str, py: &Py) -> (Vec<u8>, i32) {
    let content = install_py(d, id, py);
    d.start();
    let pid = d.wait_started(id, &py.label);
    d.wait_running(id, &content);
    (content, pid)
}

/// Waits until build `label` of `id` has logged its start (ready or not); its pid.
#[track_caller]
fn wait_logged_start(d: &Daemon, id: &str, label: &str) -> i32 {
    wait_until(TIMEOUT, &format!("{id} build {label} to start"), || {
        d.starts(id, Some(label)).first().copied()
    })
}

/// What a `Py` plugin found in its passed descriptors (`listen-<id>-<pid>.txt`).
fn listen_record(d: &Daemon, id: &str, pid: i32) -> Value {
    serde_json::from_str(&d.plugin_record("listen", id, pid)).unwrap()
}

// ------------------------------------------------------------------------------------------------
// Event times

/// Milliseconds from event `a` to event `b` by their timestamps.
fn ms_between(a: &Value, b: &Value) -> i64 {
    event_ms(b) - event_ms(a)
}

#[test]
fn event_ms_reads_rfc3339_millis() {
    let at = |t: &str| event_ms(&json!({ "time": t }));
    assert_eq!(at("1970-01-01T00:00:00.000Z"), 0);
    assert_eq!(at("2000-03-01T00:00:01.250Z"), 951_868_801_250);
    assert_eq!(at("2026-11-27T22:30:45.123Z"), 1_795_818_645_123);
}

fn plugin_started_with_pid(event: &Value, id: &str, pid: i32) -> bool {
    is_event(event, "plugin_started", id) && event["pid"] == pid
}

// ------------------------------------------------------------------------------------------------
// READY=1 gating

/// Fast retries and a short readiness limit, `ready = "notify"` for `p1`.
fn notify_config(ready_timeout_ms: u64, max_retries: u64) -> Config {
    Config::new()
        .set("hot_reload.max_retries", json!(max_retries))
        .set("hot_reload.retry_delay_ms", json!(50))
        .set("plugins.p1.ready", json!("notify"))
        .set("plugins.p1.ready_timeout_ms", json!(ready_timeout_ms))
}

#[test]
fn reload_to_a_plugin_ready_after_300ms_succeeds_only_then() {
    let mut d = Daemon::with_config(&notify_config(5000, 1));
    let (_, old) = start_running_py(&mut d, "p1", &Py::new("v1").ready());
    let mut sub = d.client();
    sub.subscribe(json!({}));
    let v2 = install_py(&d, "p1", &Py::new("v2").sleep_ms(300).ready());
    let new = wait_logged_start(&d, "p1", "v2");
    let started = sub.wait_event(TIMEOUT, "plugin_started of v2", |e| {
        plugin_started_with_pid(e, "p1", new)
    });
    let ready = sub.wait_named("plugin_ready", "p1");
    let done = sub.wait_named("reload_succeeded", "p1");
    assert_eq!(
        done["new_version"],
        expected_version(&v2),
        "contract: the reload to v2 succeeded; {done}"
    );
    assert_eq!(ready["pid"], new, "plugin_ready is about v2; saw {ready}");
    // Timestamps are cut to milliseconds, so a 300 ms gap can show as 299.
    assert!(
        ms_between(&started, &ready) >= 299 && ms_between(&started, &done) >= 299,
        "contract (SPEC §3 ready = notify): the instance counts as ready only at READY=1, \
         sent 300 ms after its start; started {started}, ready {ready}, succeeded {done}"
    );
    assert!(
        done["duration_ms"].as_u64() >= Some(300),
        "contract: the reload waited for READY=1; {done}"
    );
    assert!(
        sub.named("reload_failed", "p1").is_empty(),
        "no failed attempt"
    );
    assert!(d.stops("p1", Some("v1")).contains(&old), "v1 was stopped");
    d.wait_running("p1", &v2);
}

#[test]
fn plugin_that_never_sends_ready_fails_each_attempt_and_rolls_back() {
    let mut d = Daemon::with_config(&notify_config(300, 1));
    let (v1, _) = start_running_py(&mut d, "p1", &Py::new("v1").ready());
    let mut sub = d.client();
    sub.subscribe(json!({}));
    let v2 = install_py(&d, "p1", &Py::new("v2").log("waiting"));
    let rolled = sub.wait_event(Duration::from_secs(20), "rolled_back", |e| {
        is_event(e, "rolled_back", "p1")
    });
    assert_eq!(
        rolled["version"],
        expected_version(&v1),
        "contract (SPEC §5): rolled back to the last good build; {rolled}"
    );
    let failures = sub.named("reload_failed", "p1");
    let attempts: Vec<(&Value, &Value)> = failures
        .iter()
        .map(|e| (&e["attempt"], &e["retry_in_ms"]))
        .collect();
    assert_eq!(
        attempts,
        [(&json!(1), &json!(50)), (&json!(2), &Value::Null)],
        "contract (SPEC §5): 1 + max_retries attempts; events {failures:?}"
    );
    assert!(
        sub.named("reload_succeeded", "p1").is_empty(),
        "contract: a plugin that never sends READY=1 never succeeds"
    );
    // Its start, not its log: an instance killed early may not have logged anything yet.
    let v2_starts: Vec<Value> = sub
        .named("plugin_started", "p1")
        .into_iter()
        .filter(|e| e["version"] == expected_version(&v2))
        .collect();
    assert_eq!(v2_starts.len(), 2, "two attempts of v2: {v2_starts:?}");
    let v2_pids: Vec<i32> = v2_starts
        .iter()
        .filter_map(|e| e["pid"].as_i64()?.try_into().ok())
        .collect();
    for ((started, &pid), failed) in v2_starts.iter().zip(&v2_pids).zip(&failures) {
        // The readiness timer runs from the spawn, a little before plugin_started is stamped.
        assert!(
            ms_between(started, failed) >= 250,
            "contract (SPEC §3 ready_timeout_ms): the attempt failed at its readiness limit, \
             not before; started {started}, failed {failed}"
        );
        wait_until(TIMEOUT, &format!("unready instance {pid} killed"), || {
            (!pid_alive(pid)).then_some(())
        });
    }
    let ready_pids: Vec<Value> = sub
        .named("plugin_ready", "p1")
        .iter()
        .map(|e| e["pid"].clone())
        .collect();
    assert!(
        v2_pids.iter().all(|p| !ready_pids.contains(&json!(p))),
        "contract: no v2 instance was marked ready; plugin_ready pids {ready_pids:?}"
    );
    let info = d.wait_running("p1", &v1);
    assert!(
        info["failed_reloads"] == 1 && info["last_good_version"] == expected_version(&v1),
        "contract: one failed reload, last good v1; saw {info}"
    );
}

#[test]
fn ready_and_status_from_a_foreign_process_are_ignored() {
    let mut d = Daemon::with_config(&notify_config(2000, 0));
    let (v1, _) = start_running_py(&mut d, "p1", &Py::new("v1").ready());
    let mut sub = d.client();
    sub.subscribe(json!({}));
    let go = d.root.join("go");
    let v2 = Py::new("v2")
        .notify("STATUS=mine")
        .wait_file(&go)
        .notify("STATUS=mine again");
    install_py(&d, "p1", &v2);
    let pid = wait_logged_start(&d, "p1", "v2");
    d.wait_plugin("p1", "status_text from v2", |p| p["status_text"] == "mine");
    let socket = d.plugin_env("p1", pid).remove("NOTIFY_SOCKET");
    let socket = socket.unwrap_or_else(|| panic!("contract (SPEC §4): NOTIFY_SOCKET is set"));
    let foreign = UnixDatagram::unbound().unwrap();
    foreign
        .send_to(b"READY=1\nSTATUS=foreign", &socket)
        .unwrap_or_else(|e| panic!("send to the plugin's NOTIFY_SOCKET {socket}: {e}"));
    // The plugin's own next message is queued behind ours: once it shows, ours was handled.
    fs::write(&go, "").unwrap();
    d.wait_plugin("p1", "status_text from v2 again", |p| {
        p["status_text"] == "mine again"
    });
    let outcome = sub.wait_event(TIMEOUT, "the reload's outcome", |e| {
        is_event(e, "reload_failed", "p1") || is_event(e, "reload_succeeded", "p1")
    });
    assert!(
        outcome["event"] == "reload_failed"
            && outcome["error"]
                .as_str()
                .is_some_and(|e| e.contains("READY")),
        "contract (SPEC §4): READY=1 from another process does not make the plugin ready, \
         so the attempt fails for want of its own READY=1; saw {outcome}"
    );
    let statuses: Vec<Value> = sub
        .all_named("plugin_status")
        .iter()
        .map(|e| e["status_text"].clone())
        .collect();
    assert!(
        !statuses.contains(&json!("foreign")),
        "contract (SPEC §4): STATUS= from another process is ignored; saw {statuses:?}"
    );
    assert!(
        sub.named("reload_succeeded", "p1").is_empty()
            && !sub
                .named("plugin_ready", "p1")
                .iter()
                .any(|e| e["pid"] == pid),
        "contract (SPEC §4): READY=1 from another process does not make the plugin ready"
    );
    sub.wait_named("rolled_back", "p1");
    d.wait_running("p1", &v1);
}

// ------------------------------------------------------------------------------------------------
// start-stop

#[test]
fn start_stop_runs_both_instances_until_the_new_one_is_ready() {
    let config = Config::new()
        .set("plugins.p1.ready", json!("notify"))
        .set("plugins.p1.strategy", json!("start-stop"));
    let mut d = Daemon::with_config(&config);
    let (_, old) = start_running_py(&mut d, "p1", &Py::new("v1").ready());
    let mut sub = d.client();
    sub.subscribe(json!({}));
    let go = d.root.join("go");
    let v2 = install_py(&d, "p1", &Py::new("v2").wait_file(&go).ready());
    let new = wait_logged_start(&d, "p1", "v2");
    assert!(
        pid_alive(old) && pid_alive(new),
        "contract (SPEC §3 start-stop): the old instance {old} still runs while the new one \
         {new} starts; log {:?}",
        d.log_lines("p1")
    );
    assert!(
        d.stops("p1", None).is_empty(),
        "contract: nothing is stopped before the new instance is ready"
    );
    fs::write(&go, "").unwrap();
    let done = sub.wait_named("reload_succeeded", "p1");
    assert_eq!(done["new_version"], expected_version(&v2), "{done}");
    let exited = sub.wait_event(TIMEOUT, "the old instance's exit", |e| {
        is_event(e, "plugin_exited", "p1") && e["pid"] == old
    });
    assert!(
        exited["expected"] == true && exited["code"] == 0,
        "contract: the old instance was stopped with SIGTERM (and exited 0 for it); {exited}"
    );
    let lines = d.log_lines("p1");
    let at = |what: &str, label: &str, pid: i32| {
        let words = [what.to_string(), label.to_string(), pid.to_string()];
        lines.iter().position(|l| *l == words)
    };
    let (ready, stopped) = (at("ready", "v2", new), at("stop", "v1", old));
    assert!(
        ready.is_some() && stopped.is_some() && ready < stopped,
        "contract (SPEC §5 start-stop): the old instance stops only after the new one is \
         ready; log {lines:?}"
    );
    assert!(!pid_alive(old), "the old instance {old} is gone");
    let info = d.wait_running("p1", &v2);
    assert_eq!(info["pid"], new, "{info}");
}

#[test]
fn start_stop_build_that_never_gets_ready_leaves_the_old_instance_serving() {
    let config = notify_config(300, 0).set("plugins.p1.strategy", json!("start-stop"));
    let mut d = Daemon::with_config(&config);
    let (v1, old) = start_running_py(&mut d, "p1", &Py::new("v1").ready());
    let mut sub = d.client();
    sub.subscribe(json!({}));
    install_py(&d, "p1", &Py::new("v2").log("waiting"));
    let failed = sub.wait_named("reload_failed", "p1");
    assert!(
        failed["retry_in_ms"].is_null(),
        "max_retries 0: one attempt; {failed}"
    );
    let rolled = sub.wait_named("rolled_back", "p1");
    assert_eq!(rolled["version"], expected_version(&v1), "{rolled}");
    let info = d.wait_running("p1", &v1);
    assert!(
        info["pid"] == old && pid_alive(old) && d.stops("p1", Some("v1")).is_empty(),
        "contract (SPEC §5 start-stop): the old instance {old} never stopped and still \
         serves; saw {info}, log {:?}",
        d.log_lines("p1")
    );
    // The plugin is in a consistent state: the next good build replaces the old instance.
    let v3 = install_py(&d, "p1", &Py::new("v3").ready());
    let done = sub.wait_named("reload_succeeded", "p1");
    assert!(
        done["old_version"] == expected_version(&v1)
            && done["new_version"] == expected_version(&v3),
        "contract: the next reload goes from v1 to v3; {done}"
    );
    let new = d.wait_started("p1", "v3");
    assert_eq!(d.wait_running("p1", &v3)["pid"], new);
    wait_until(TIMEOUT, "v1 stopped after v3 got ready", || {
        d.stops("p1", Some("v1")).contains(&old).then_some(())
    });
}

// ------------------------------------------------------------------------------------------------
// Zero-downtime reloads of the echo_server example

/// `target/<profile>/examples/echo_server`, built by `cargo test` beside the test executable.
fn echo_server_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in <target>/<profile>/deps");
    let bin = profile_dir.join("examples").join("echo_server");
    assert!(
        bin.is_file(),
        "{} is missing: `cargo test` builds the examples (or run `cargo build --examples`)",
        bin.display()
    );
    bin
}

/// What the client loop saw.
#[derive(Debug, Default)]
struct ClientTally {
    echoed: u64,
    /// Refused, reset, cut off or wrong answers, with what happened.
    failures: Vec<String>,
}

/// One connection: connect, send a line, read it back, close.
fn echo_once(path: &Path, n: u64) -> Result<(), String> {
    let mut stream = UnixStream::connect(path).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let line = format!("ping {n}\n");
    stream
        .write_all(line.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(|e| match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => "no answer within 10 s".to_string(),
            _ => format!("read: {e}"),
        })?;
    if answer != line {
        return Err(format!("sent {line:?}, got back {answer:?}"));
    }
    Ok(())
}

/// Connects, echoes and disconnects in a tight loop until `stop`.
fn client_loop(path: PathBuf, stop: Arc<AtomicBool>) -> ClientTally {
    let mut tally = ClientTally::default();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        match echo_once(&path, n) {
            Ok(()) => tally.echoed += 1,
            Err(e) => {
                let refused_or_reset = e.contains("refused") || e.contains("reset");
                let kind = if refused_or_reset {
                    "REFUSED/RESET"
                } else {
                    "failed"
                };
                tally.failures.push(format!("connection {n} {kind}: {e}"));
            }
        }
    }
    tally
}

/// 50 reloads of echo_server (each a new build: same binary, distinct trailing bytes) while a
/// client connects in a loop: not one connection may be refused, reset or answered wrongly.
fn echo_server_survives_50_reloads(strategy: Option<&str>) {
    const RELOADS: usize = 50;
    let base = fs::read(echo_server_bin()).unwrap();
    let mut config = Config::new().set("plugins.echo.ready", json!("notify"));
    if let Some(strategy) = strategy {
        config = config.set("plugins.echo.strategy", json!(strategy));
    }
    let mut d = Daemon::with_config(&config);
    let socket = d.root.join("echo.sock");
    let spec = format!("unix:{}", socket.display());
    d.write_config(&config.set("plugins.echo.sockets", json!([spec])));
    let build = |i: usize| {
        let mut content = base.clone();
        content.extend_from_slice(format!("\nhotreload test padding {i}\n").as_bytes());
        content
    };
    let first = build(0);
    install_atomic(&d.exec_path("echo"), &first, 0o755);
    d.start();
    d.wait_running("echo", &first);
    echo_once(&socket, 0).unwrap_or_else(|e| panic!("echo_server answers before reloads: {e}"));

    let mut sub = d.client();
    sub.subscribe(json!({"plugin": "echo"}));
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (path, stop) = (socket.clone(), Arc::clone(&stop));
        thread::spawn(move || client_loop(path, stop))
    };
    let started = Instant::now();
    for i in 1..=RELOADS {
        let content = build(i);
        install_atomic(&d.exec_path("echo"), &content, 0o755);
        let version = expected_version(&content);
        let what = format!("reload {i} of {RELOADS} to {version}");
        let outcome = sub.skip_until(TIMEOUT, &what, |e| {
            (is_event(e, "reload_succeeded", "echo") && e["new_version"] == version.as_str())
                || is_event(e, "reload_failed", "echo")
        });
        assert_eq!(
            outcome["event"],
            "reload_succeeded",
            "{what} failed: {outcome}\n{}",
            d.stderr_tail()
        );
    }
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let tally = client.join().unwrap();
    eprintln!(
        "echo_server ({strategy:?}): {RELOADS} reloads in {took:?}, {} echoes, {} failures",
        tally.echoed,
        tally.failures.len()
    );
    let info = d.plugin_info("echo").unwrap_or_default();
    assert!(
        info["reload_count"] == RELOADS,
        "{RELOADS} reloads counted; saw {info}"
    );
    assert!(
        tally.failures.is_empty(),
        "contract (SPEC §3 sockets, strategy {strategy:?}): the listening socket outlives \
         every instance, so no connection is refused or reset across {RELOADS} reloads; \
         {} of {} connections failed, first ones: {:?}",
        tally.failures.len(),
        tally.failures.len() as u64 + tally.echoed,
        &tally.failures[..tally.failures.len().min(10)]
    );
    assert!(
        tally.echoed >= RELOADS as u64,
        "test bug: the client should have connected throughout the {took:?} of reloads; \
         only {} echoes",
        tally.echoed
    );
}

#[test]
fn echo_server_start_stop_reloads_50_times_without_refusing_a_connection() {
    echo_server_survives_50_reloads(Some("start-stop"));
}

#[test]
fn echo_server_stop_start_reloads_50_times_without_refusing_a_connection() {
    echo_server_survives_50_reloads(None);
}

// ------------------------------------------------------------------------------------------------
// fd store and socket passing

#[test]
fn fdstore_memfd_survives_reloads_until_removed_and_listen_vars_name_the_instance() {
    let mut d = Daemon::new();
    let socket = d.root.join("fd.sock");
    let config = Config::new().set("plugins.p1.ready", json!("notify")).set(
        "plugins.p1.sockets",
        json!([format!("unix:{}", socket.display())]),
    );
    d.write_config(&config);
    let marker = format!("state-{}", random_hex(8));
    let v1 = Py::new("v1").store_memfd("state", &marker).ready();
    let (_, pid1) = start_running_py(&mut d, "p1", &v1);
    let v2 = install_py(&d, "p1", &Py::new("v2").ready());
    let pid2 = d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
    let v3 = Py::new("v3")
        .notify("FDSTOREREMOVE=1\nFDNAME=state")
        .ready();
    let v3 = install_py(&d, "p1", &v3);
    let pid3 = d.wait_started("p1", "v3");
    d.wait_running("p1", &v3);
    let v4 = install_py(&d, "p1", &Py::new("v4").ready());
    let pid4 = d.wait_started("p1", "v4");
    d.wait_running("p1", &v4);

    let sock = socket.display().to_string();
    for (pid, names) in [
        (pid1, vec!["fd.sock"]),
        (pid2, vec!["fd.sock", "state"]),
        (pid3, vec!["fd.sock", "state"]),
        (pid4, vec!["fd.sock"]),
    ] {
        let env = d.plugin_env("p1", pid);
        let listen = listen_record(&d, "p1", pid);
        let var = |k: &str| env.get(k).cloned().unwrap_or_default();
        assert!(
            var("LISTEN_FDS") == names.len().to_string()
                && var("LISTEN_FDNAMES") == names.join(":")
                && var("LISTEN_PID") == pid.to_string(),
            "contract (SPEC §3 sockets, fdstore): pid {pid} gets LISTEN_FDS={}, \
             LISTEN_FDNAMES={}, LISTEN_PID={pid}; saw {:?}",
            names.len(),
            names.join(":"),
            [var("LISTEN_FDS"), var("LISTEN_FDNAMES"), var("LISTEN_PID")]
        );
        assert!(
            listen["fds"]["fd.sock"] == json!({"fd": 3, "socket": sock}),
            "contract (SPEC §3 sockets): fd 3 is the listening socket {sock}; saw {listen}"
        );
        if names.contains(&"state") {
            assert_eq!(
                listen["fds"]["state"],
                json!({"fd": 4, "content": marker}),
                "contract (SPEC §3 fdstore_max): the memfd parked by v1 reaches pid {pid} \
                 with its content"
            );
        }
    }
}

#[test]
fn an_fd_stored_by_the_old_instance_on_its_way_out_reaches_the_new_one() {
    fd_stored_on_the_way_out_reaches_the_new_instance(100);
}

/// The datagram is queued before the exit, and the exit follows it at once: the daemon reads it
/// before the reap all the same.
#[test]
fn an_fd_stored_just_before_the_old_instance_exits_reaches_the_new_one() {
    fd_stored_on_the_way_out_reaches_the_new_instance(0);
}

fn fd_stored_on_the_way_out_reaches_the_new_instance(linger_ms: u64) {
    let mut d = Daemon::new();
    let config = Config::new().set("plugins.p1.ready", json!("notify"));
    d.write_config(&config);
    let marker = format!("parting-{}", random_hex(8));
    let v1 = Py::new("v1")
        .store_memfd_on_stop("parting", &marker, linger_ms)
        .ready();
    start_running_py(&mut d, "p1", &v1);
    let v2 = install_py(&d, "p1", &Py::new("v2").ready());
    let pid2 = d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
    let listen = listen_record(&d, "p1", pid2);
    assert_eq!(
        listen["fds"]["parting"],
        json!({"fd": 3, "content": marker}),
        "contract (SPEC §3 fdstore): a descriptor the old instance stores after its stop \
         signal, before it exits, is handed to the instance that replaces it (the start \
         made ready while it exited is made again); saw {listen}"
    );
}

#[test]
fn fdstore_keeps_at_most_fdstore_max_descriptors() {
    let config = Config::new()
        .set("plugins.p1.ready", json!("notify"))
        .set("plugins.p1.fdstore_max", json!(1));
    let mut d = Daemon::with_config(&config);
    let v1 = Py::new("v1")
        .store_memfd("first", "kept")
        .store_memfd("second", "over the limit")
        .ready();
    start_running_py(&mut d, "p1", &v1);
    let v2 = install_py(&d, "p1", &Py::new("v2").ready());
    let pid = d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
    let listen = listen_record(&d, "p1", pid);
    assert!(
        listen["names"] == json!(["first"])
            && listen["fds"]["first"] == json!({"fd": 3, "content": "kept"}),
        "contract (SPEC §3 fdstore_max = 1): only the first parked fd is handed on; saw {listen}"
    );
}

// ------------------------------------------------------------------------------------------------
// Reload hooks

/// A hook that copies its environment to `<root>/hook-<name>-<new version>.env` (atomically).
fn env_recording_hook(root: &Path, name: &str) -> Value {
    let script = r#"f="$0-$HOTRELOAD_NEW_VERSION.env"; env >"$f.tmp" && mv "$f.tmp" "$f""#;
    json!(["/bin/sh", "-c", script, root.join(format!("hook-{name}"))])
}

/// The environment a recording hook saw, once it has been written.
#[track_caller]
fn hook_env(root: &Path, name: &str, version: &str) -> BTreeMap<String, String> {
    let path = root.join(format!("hook-{name}-{version}.env"));
    let text = wait_until(TIMEOUT, &format!("{} (hook ran)", path.display()), || {
        fs::read_to_string(&path).ok()
    });
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn hooks_get_plugin_versions_and_error_in_their_environment() {
    let mut d = Daemon::new();
    let config = Config::new()
        .set(
            "hooks.on_reload_start",
            env_recording_hook(&d.root, "start"),
        )
        .set(
            "hooks.on_reload_success",
            env_recording_hook(&d.root, "success"),
        )
        .set(
            "hooks.on_reload_failure",
            env_recording_hook(&d.root, "failure"),
        );
    d.write_config(&config);
    let (v1, _) = d.start_running("p1", &Script::new("v1"));
    let v2 = d.install("p1", &Script::new("v2"));
    d.wait_running("p1", &v2);
    let (old, new) = (expected_version(&v1), expected_version(&v2));
    for hook in ["start", "success"] {
        let env = hook_env(&d.root, hook, &new);
        let var = |k: &str| env.get(k).map(String::as_str);
        assert!(
            var("HOTRELOAD_PLUGIN_ID") == Some("p1")
                && var("HOTRELOAD_OLD_VERSION") == Some(old.as_str())
                && var("HOTRELOAD_NEW_VERSION") == Some(new.as_str())
                && var("HOTRELOAD_ERROR") == Some(""),
            "contract ([hooks] {hook}): plugin id, old {old} and new {new} versions, empty \
             error; saw {env:?}"
        );
    }

    let mut sub = d.client();
    sub.subscribe(json!({}));
    // Not executable: refused by the pre-flight check.
    let v3 = d.install_mode("p1", &Script::new("v3"), 0o644);
    let refused = expected_version(&v3);
    sub.wait_named("reload_failed", "p1");
    let env = hook_env(&d.root, "failure", &refused);
    let var = |k: &str| env.get(k).map(String::as_str);
    assert!(
        var("HOTRELOAD_PLUGIN_ID") == Some("p1")
            && var("HOTRELOAD_OLD_VERSION") == Some(new.as_str())
            && var("HOTRELOAD_ERROR").is_some_and(|e| !e.is_empty()),
        "contract ([hooks] on_reload_failure): plugin id, old version {new}, the error; \
         saw {env:?}"
    );
    hook_env(&d.root, "start", &refused);
    for (hook, version) in [("failure", &new), ("success", &refused)] {
        let path = d.root.join(format!("hook-{hook}-{version}.env"));
        assert!(
            !path.exists(),
            "contract: on_reload_{hook} runs only for that outcome; {} exists",
            path.display()
        );
    }
}

#[test]
fn hanging_hook_is_killed_at_its_limit_without_delaying_the_reload() {
    const HOOK_TIMEOUT_MS: u64 = 500;
    let mut d = Daemon::new();
    let pid_file = d.root.join("hook.pid");
    let hang = r#"echo $$ >"$0.tmp" && mv "$0.tmp" "$0" && exec sleep 1000"#;
    let config = Config::new()
        .set(
            "hooks.on_reload_start",
            json!(["/bin/sh", "-c", hang, pid_file]),
        )
        .set("hooks.timeout_ms", json!(HOOK_TIMEOUT_MS))
        .set("plugins.p1.startup_grace_ms", json!(20));
    d.write_config(&config);
    d.start_running("p1", &Script::new("v1"));
    let mut sub = d.client();
    sub.subscribe(json!({}));
    let v2 = d.install("p1", &Script::new("v2"));
    let started = sub.wait_named("reload_started", "p1");
    let hook_pid: i32 = wait_until(TIMEOUT, "the hook's pid file", || {
        fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
    });
    let done = sub.wait_named("reload_succeeded", "p1");
    assert!(
        pid_alive(hook_pid),
        "test bug: the hook should still hang when the reload completes"
    );
    let killed = sub.wait_named("hook_failed", "p1");
    assert!(
        done["duration_ms"].as_u64() < Some(HOOK_TIMEOUT_MS)
            && event_ms(&done) <= event_ms(&killed),
        "contract ([hooks]): a hook never delays the reload; succeeded {done}, hook {killed}"
    );
    assert!(
        killed["hook"] == "on_reload_start"
            && ms_between(&started, &killed) >= HOOK_TIMEOUT_MS as i64 - 50
            && ms_between(&started, &killed) < HOOK_TIMEOUT_MS as i64 + 2000,
        "contract ([hooks] timeout_ms): the hook is killed at its limit; started {started}, \
         killed {killed}"
    );
    wait_until(TIMEOUT, &format!("hook {hook_pid} gone"), || {
        (!pid_alive(hook_pid)).then_some(())
    });
    d.wait_running("p1", &v2);
}

// ------------------------------------------------------------------------------------------------
// Watchdog

#[test]
fn plugin_that_stops_pinging_its_watchdog_is_killed_and_restarted() {
    const WATCHDOG_MS: u64 = 300;
    const PINGS: u64 = 10;
    const PING_EVERY_MS: u64 = 100;
    let config = Config::new().set("plugins.p1.watchdog_ms", json!(WATCHDOG_MS));
    let mut d = Daemon::with_config(&config);
    let mut build = Py::new("v1").log("ready");
    for _ in 0..PINGS {
        build = build.notify("WATCHDOG=1").sleep_ms(PING_EVERY_MS);
    }
    let content = install_py(&d, "p1", &build);
    d.start();
    let mut sub = d.client();
    sub.subscribe(json!({}));
    let pid = d.wait_started("p1", "v1");
    let env = d.plugin_env("p1", pid);
    assert!(
        env.get("WATCHDOG_USEC").map(String::as_str) == Some("300000")
            && env.get("WATCHDOG_PID") == Some(&pid.to_string()),
        "contract (SPEC §3 watchdog_ms): WATCHDOG_USEC=300000 and WATCHDOG_PID={pid}; saw {:?}",
        (env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID"))
    );
    let fired = sub.wait_event(TIMEOUT, "plugin_watchdog", |e| {
        is_event(e, "plugin_watchdog", "p1")
    });
    assert_eq!(fired["pid"], pid, "the watchdog fired for {pid}: {fired}");
    let exited = sub.wait_event(TIMEOUT, "the starved plugin's exit", |e| {
        is_event(e, "plugin_exited", "p1") && e["pid"] == pid
    });
    assert!(
        exited["signal"].is_number(),
        "contract: a starved plugin is killed by a signal; {exited}"
    );
    assert!(!pid_alive(pid), "the starved instance {pid} is gone");
    let restarted = sub.wait_event(TIMEOUT, "the restart", |e| {
        is_event(e, "plugin_started", "p1") && e["pid"] != pid
    });
    // The plugin wrote its env record as it started, before its first ping. Firing sooner
    // than the pings lasted would mean WATCHDOG=1 did not hold the watchdog off.
    let env_written = fs::metadata(d.root.join(format!("env-p1-{pid}.txt")))
        .and_then(|m| m.modified())
        .unwrap();
    let started_ms = env_written
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX));
    let pinged_ms = i64::try_from(PINGS * PING_EVERY_MS).unwrap_or(i64::MAX);
    assert!(
        event_ms(&fired) - started_ms >= pinged_ms,
        "contract: each WATCHDOG=1 re-arms the watchdog: {PINGS} pings every {PING_EVERY_MS} ms \
         hold it off; the plugin started at {started_ms} ms, the watchdog fired {fired}"
    );
    let info = d.wait_plugin("p1", "restarts counted", |p| {
        p["restarts"].as_u64() >= Some(1)
    });
    assert_eq!(info["version"], expected_version(&content), "{info}");
    assert_ne!(restarted["pid"], pid);
}
