//! Idle cost: how often a daemon supervising 100 quiet plugins wakes up (target: never), and its
//! resident memory with 1, 100 and 1000 plugins.
//!
//! Wake-ups are the daemon's context switches (voluntary + involuntary, all threads) counted from
//! `/proc` over a window in which nothing happens: no file changes, no clients (a `status`
//! request would itself wake it), no plugin output. The window opens only once the count has
//! stopped moving after start-up (startup-grace timers, state writes), so start-up work is not
//! mistaken for idle work.

use std::time::{Duration, Instant};

use crate::fixture::{self, Config, Daemon, Layout};
use crate::plugin::{self, Builds};
use crate::procfs::{self, Memory};
use crate::report::{Bound, Report};
use crate::{Bench, Outcome};

/// Length of the idle window; `HOTRELOAD_BENCH_IDLE_SECS` shortens it for a quick look.
const DEFAULT_WINDOW_SECS: u64 = 10;

/// The context-switch count must hold still this long before the window opens.
const SETTLED_AFTER: Duration = Duration::from_secs(1);

/// Memory and start-up figures for one plugin count.
struct Footprint {
    plugins: usize,
    memory: Memory,
    fds: usize,
    all_running_after: Duration,
}

pub fn run(bench: &Bench) -> Outcome<Report> {
    let mut report = Report::new(
        "idle",
        "wake-ups of an idle daemon with 100 plugins; memory with 1 / 100 / 1000 plugins",
    );
    let window = Duration::from_secs(window_secs());

    let small = footprint(&start(bench, 1)?)?;

    let mut idle = start(bench, 100)?;
    let settled = settle(&mut idle.daemon)?;
    let before = procfs::context_switches(idle.daemon.pid())?;
    std::thread::sleep(window); // the measurement itself, not a wait for anything
    idle.daemon.ensure_alive()?;
    let wakeups = procfs::context_switches(idle.daemon.pid())? - before;
    let hundred = footprint(&idle)?;
    drop(idle);

    let thousand = footprint(&start(bench, 1000)?)?;

    let label = format!(
        "daemon wake-ups in {}s idle (100 plugins)",
        window.as_secs()
    );
    report.value("idle_wakeups", &label, wakeups as f64, "");
    report.target(&label, wakeups as f64, Bound::Exactly(0.0), "");
    for print in [&small, &hundred, &thousand] {
        add_footprint(&mut report, print);
    }
    report.target(
        "VmRSS with 100 plugins",
        mib(hundred.memory.rss_kib),
        Bound::AtMost(8.0),
        "MiB",
    );
    report.target(
        "VmRSS with 1000 plugins",
        mib(thousand.memory.rss_kib),
        Bound::AtMost(32.0),
        "MiB",
    );
    match settled {
        Some(after) => report.note(format!(
            "the window opened once context switches had held still for {:.1} s, {:.1} s after \
             all plugins ran",
            SETTLED_AFTER.as_secs_f64(),
            after.as_secs_f64()
        )),
        None => report.note("context switches never held still for 1 s within 10 s of start-up"),
    }
    report.note(
        "1000 plugins need 1001 inotify watches (fs.inotify.max_user_watches) and about 2000 \
         pipe fds in the daemon (RLIMIT_NOFILE, raised to the hard limit by the bench)",
    );
    Ok(report)
}

fn window_secs() -> u64 {
    std::env::var("HOTRELOAD_BENCH_IDLE_SECS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(DEFAULT_WINDOW_SECS)
}

/// A daemon whose plugins have all started, and how long that took.
struct Started {
    daemon: Daemon,
    plugins: usize,
    all_running_after: Duration,
}

/// A daemon with `count` plugins running `sleep`, all started.
fn start(bench: &Bench, count: usize) -> Outcome<Started> {
    let mut builds = Builds::new(0)?;
    let layout = Layout::create(&bench.root, &format!("idle-{count}"))?;
    let ids = plugin::ids(count);
    let began = Instant::now();
    let mut daemon =
        fixture::start_with_plugins(&bench.daemon, layout, &Config::default(), &ids, &mut builds)?;
    let timeout = Duration::from_secs(10) + Duration::from_millis(60 * count as u64);
    daemon.wait_plugins_running(count as u64, timeout)?;
    Ok(Started {
        daemon,
        plugins: count,
        all_running_after: began.elapsed(),
    })
}

/// Waits until the daemon's context-switch count holds still for `SETTLED_AFTER`; returns how long
/// that took, or `None` when it kept moving for 10 s.
fn settle(daemon: &mut Daemon) -> Outcome<Option<Duration>> {
    let start = Instant::now();
    let pid = daemon.pid();
    let mut last = (procfs::context_switches(pid)?, Instant::now());
    while start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
        daemon.ensure_alive()?;
        let now = procfs::context_switches(pid)?;
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= SETTLED_AFTER {
            return Ok(Some(start.elapsed()));
        }
    }
    Ok(None)
}

fn footprint(started: &Started) -> Outcome<Footprint> {
    let pid = started.daemon.pid();
    Ok(Footprint {
        plugins: started.plugins,
        memory: procfs::memory(pid)?,
        fds: procfs::open_fds(pid)?,
        all_running_after: started.all_running_after,
    })
}

fn add_footprint(report: &mut Report, print: &Footprint) {
    let n = print.plugins;
    let plugins = if n == 1 {
        "1 plugin".to_owned()
    } else {
        format!("{n} plugins")
    };
    report.value(
        &format!("vmrss_{n}"),
        &format!("VmRSS, {plugins}"),
        mib(print.memory.rss_kib),
        "MiB",
    );
    report.value(
        &format!("vmhwm_{n}"),
        &format!("VmHWM, {plugins}"),
        mib(print.memory.hwm_kib),
        "MiB",
    );
    report.value(
        &format!("fds_{n}"),
        &format!("open fds, {plugins}"),
        print.fds as f64,
        "",
    );
    report.value(
        &format!("all_running_ms_{n}"),
        &format!("start -> {plugins} running"),
        print.all_running_after.as_secs_f64() * 1000.0,
        "ms",
    );
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
