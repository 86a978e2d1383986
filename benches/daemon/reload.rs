//! Reload latency: from the rename(2) of a new build over a plugin's executable to the new
//! process running.
//!
//! "Running" means: the daemon has spawned the new snapshot, which it announces with the
//! `plugin_started` event right after the spawn returns (the exec has then happened). The figure
//! is the arrival time of that event on a subscriber connection, so there is no polling lag in
//! it; afterwards `/proc/<pid>/exe` of the announced pid is checked to be the snapshot of the new
//! version, so a wrong or stale event cannot pass as a reload. Debounce is 0 and startup grace
//! 1 ms, so `reload_succeeded` follows closely; its `duration_ms` (the daemon's own measure,
//! grace included) is reported as a second distribution.
//!
//! Each case runs twice, side by side in one table: with the daemon's state dir in the bench dir
//! (the default file system) and on tmpfs (`/dev/shm`). A reload writes state.json whole and
//! exchanges it into place while the old instance exits, before the spawn, and fsyncs the file
//! and its directory after the spawn (hotreloadd(8), Durability), so no fsync is on the critical
//! path; the time of a fully synced write sequence alone is measured on each file system and
//! printed with the figures, as context.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::client::{Event, EventStream};
use crate::fixture::{self, Config, Daemon, Layout};
use crate::plugin::{self, Builds};
use crate::report::{Bound, Report};
use crate::{Bench, Outcome, machine, millis};

/// One reload benchmark: the build size and how many reloads to time.
pub struct Case {
    pub name: &'static str,
    pub size: usize,
    pub warmup: u64,
    pub reloads: u64,
    pub p50_ms: f64,
    pub p99_ms: Option<f64>,
}

pub const ONE_MB: Case = Case {
    name: "reload_1mb",
    size: 1 << 20,
    warmup: 10,
    reloads: 200,
    p50_ms: 2.0,
    p99_ms: Some(5.0),
};

pub const FIFTY_MB: Case = Case {
    name: "reload_50mb",
    size: 50 << 20,
    warmup: 3,
    reloads: 30,
    p50_ms: 40.0,
    p99_ms: None,
};

const ID: &str = "plugin";

/// Figures of one timed reload.
struct Sample {
    rename_ms: f64,
    to_started_ms: f64,
    to_succeeded_ms: f64,
    daemon_ms: f64,
    exe_confirmed: bool,
}

/// The results of one case with the state dir on one file system.
struct Run {
    fs: String,
    samples: Vec<Sample>,
    failures: Vec<String>,
    /// An fsync'd 150-byte atomic write (temp + fsync + rename + fsync dir) in that state dir.
    atomic_write_ms: Vec<f64>,
}

pub fn run(bench: &Bench, case: &Case) -> Outcome<Report> {
    let on_bench_fs = measure(bench, case, None)?;
    let on_tmpfs = match tmpfs_dir() {
        Some(dir) => Some(measure(bench, case, Some(&dir))?),
        None => None,
    };
    Ok(report(case, &on_bench_fs, on_tmpfs.as_ref()))
}

/// `$HOTRELOAD_BENCH_TMPFS`, else `/dev/shm` when it is a tmpfs: where the second run of each
/// reload case keeps the daemon's state dir.
pub fn tmpfs_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("HOTRELOAD_BENCH_TMPFS") {
        return Some(PathBuf::from(dir));
    }
    let shm = PathBuf::from("/dev/shm");
    (machine::fs_type(&shm) == "tmpfs").then_some(shm)
}

/// All reloads of `case`, with the daemon's state dir in the bench dir or in `state_base`.
fn measure(bench: &Bench, case: &Case, state_base: Option<&Path>) -> Outcome<Run> {
    let mut builds = Builds::new(case.size)?;
    let name = match state_base {
        Some(_) => format!("{}-tmpfs-state", case.name),
        None => case.name.to_owned(),
    };
    let mut layout = Layout::create(&bench.root, &name)?;
    if let Some(base) = state_base {
        layout = layout.with_state_in(base)?;
    }
    let fs = machine::fs_type(&layout.state);
    let atomic_write_ms = atomic_writes(&layout.state, 50)?;
    let config = Config {
        debounce_ms: 0,
        startup_grace_ms: 1,
        ..Config::default()
    };
    let ids = [ID.to_owned()];
    let mut daemon =
        fixture::start_with_plugins(&bench.daemon, layout, &config, &ids, &mut builds)?;
    daemon.wait_plugins_running(1, Duration::from_secs(10))?;
    let events = daemon.subscribe()?;
    // 50 MB builds take a while to write and hash: give each reload room, proportional to size.
    let timeout = Duration::from_secs(10) + Duration::from_millis((case.size >> 20) as u64 * 100);

    let mut samples = Vec::new();
    let mut failures = Vec::new();
    for serial in 1..=case.warmup + case.reloads {
        daemon.ensure_alive()?;
        match reload_once(&daemon, &events, &mut builds, serial, timeout)? {
            Attempt::Reloaded(sample) if serial > case.warmup => samples.push(sample),
            Attempt::Reloaded(_) => {}
            Attempt::Failed(event) => failures.push(event),
        }
        if failures.len() > 10 {
            return Err(format!(
                "more than 10 reloads failed; the last: {}",
                failures.join("; ")
            ));
        }
    }
    Ok(Run {
        fs,
        samples,
        failures,
        atomic_write_ms,
    })
}

/// Times `count` durable replacements of a 150-byte file in `dir`, the way the daemon writes
/// state.json: write a temp file, fsync it, rename it over the target, fsync the directory.
fn atomic_writes(dir: &Path, count: usize) -> Outcome<Vec<f64>> {
    let target = dir.join("fsync-probe.json");
    let temp = dir.join(".fsync-probe.json.tmp");
    let body = [b'x'; 150];
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let began = Instant::now();
        let mut file = File::create(&temp)
            .map_err(|e| format!("failed to create `{}`: {e}", temp.display()))?;
        file.write_all(&body)
            .and_then(|()| file.sync_all())
            .map_err(|e| format!("failed to write and fsync `{}`: {e}", temp.display()))?;
        drop(file);
        std::fs::rename(&temp, &target)
            .map_err(|e| format!("failed to rename `{}`: {e}", temp.display()))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("failed to fsync directory `{}`: {e}", dir.display()))?;
        times.push(millis(began.elapsed()));
    }
    let _ = std::fs::remove_file(&target);
    Ok(times)
}

/// How one reload went.
enum Attempt {
    Reloaded(Sample),
    /// The daemon reported `reload_failed` (its event, as text).
    Failed(String),
}

/// Installs build `serial` and times its reload; an error means the daemon is unusable.
fn reload_once(
    daemon: &Daemon,
    events: &EventStream,
    builds: &mut Builds,
    serial: u64,
    timeout: Duration,
) -> Outcome<Attempt> {
    let layout = &daemon.layout;
    let bytes = builds.build(serial);
    let version = plugin::version_of(bytes);
    let staged = plugin::stage(&layout.staging, ID, serial, bytes)?;
    let previous = plugin::pin(&layout.exec(ID), &layout.staging)?;

    let renamed = Instant::now();
    plugin::swap_in(&staged, &layout.exec(ID))?;
    let rename_ms = millis(renamed.elapsed());
    let attempt = await_reload(events, &version, renamed, renamed + timeout);
    // The old build's blocks are freed only now, outside the timed window (see `plugin::pin`).
    std::fs::remove_file(&previous)
        .map_err(|e| format!("failed to remove `{}`: {e}", previous.display()))?;
    Ok(match attempt? {
        Attempt::Reloaded(sample) => Attempt::Reloaded(Sample {
            rename_ms,
            ..sample
        }),
        failed => failed,
    })
}

/// Waits for the new version's `plugin_started` (or a `reload_failed`), then its
/// `reload_succeeded`; times are measured from `renamed`.
fn await_reload(
    events: &EventStream,
    version: &str,
    renamed: Instant,
    deadline: Instant,
) -> Outcome<Attempt> {
    let ours = |event: &Event| event.plugin() == ID;
    let started = events.wait_for(
        deadline,
        &format!("plugin_started of version {version}"),
        |e| {
            let failed = e.name() == "reload_failed";
            let started = e.name() == "plugin_started" && e.text("version") == version;
            ours(e) && (failed || started)
        },
        |_| {},
    )?;
    if started.name() == "reload_failed" {
        return Ok(Attempt::Failed(started.body.to_string()));
    }
    let succeeded = events.wait_for(
        deadline,
        &format!("reload_succeeded to version {version}"),
        |e| ours(e) && e.name() == "reload_succeeded" && e.text("new_version") == version,
        |_| {},
    )?;
    Ok(Attempt::Reloaded(Sample {
        rename_ms: 0.0,
        to_started_ms: millis(started.at - renamed),
        to_succeeded_ms: millis(succeeded.at - renamed),
        daemon_ms: succeeded.body["duration_ms"].as_f64().unwrap_or(f64::NAN),
        exe_confirmed: runs_snapshot(&started, version),
    }))
}

/// Whether the pid announced by `plugin_started` executes `snapshots/<id>/<version>` (SPEC §4).
fn runs_snapshot(started: &Event, version: &str) -> bool {
    let Some(pid) = started.body["pid"].as_i64() else {
        return false;
    };
    crate::procfs::exe(pid).is_ok_and(|exe| exe.ends_with(format!("snapshots/{ID}/{version}")))
}

fn report(case: &Case, on_bench_fs: &Run, on_tmpfs: Option<&Run>) -> Report {
    let size_mib = case.size >> 20;
    let title = format!(
        "rename(2) of a new {size_mib} MiB build -> new process running (debounce 0, \
         startup grace 1 ms), state dir on {} and on {}",
        on_bench_fs.fs,
        on_tmpfs.map_or("(no tmpfs)", |run| run.fs.as_str())
    );
    let mut report = Report::new(case.name, &title);
    add_run(&mut report, case, on_bench_fs, "");
    if let Some(run) = on_tmpfs {
        add_run(&mut report, case, run, "tmpfs_state_");
    }
    report.note(format!(
        "{} timed reloads after {} warm-up per file system; build = /bin/sleep padded to {} bytes",
        case.reloads, case.warmup, case.size
    ));
    report.note(
        "the daemon writes state.json whole and exchanges it into place while the old version \
         exits, before it spawns the new one, and fsyncs the file and the directory after the \
         spawn; the 'atomic 150 B write' rows time temp + fsync + rename + fsync dir alone on \
         each file system (what a reload no longer waits for)",
    );
    report
}

/// The rows and targets of one file system, keys prefixed with `prefix`.
fn add_run(report: &mut Report, case: &Case, run: &Run, prefix: &str) {
    let samples = &run.samples;
    let fs = &run.fs;
    let column = |pick: fn(&Sample) -> f64| samples.iter().map(pick).collect::<Vec<f64>>();
    report.distribution(
        &format!("{prefix}atomic_write_ms"),
        &format!("[state on {fs}] atomic 150 B write w/ fsync"),
        "ms",
        &run.atomic_write_ms,
    );
    let latency = report.distribution(
        &format!("{prefix}rename_to_started_ms"),
        &format!("[state on {fs}] rename -> plugin_started"),
        "ms",
        &column(|s| s.to_started_ms),
    );
    report.distribution(
        &format!("{prefix}rename_to_succeeded_ms"),
        &format!("[state on {fs}] rename -> reload_succeeded"),
        "ms",
        &column(|s| s.to_succeeded_ms),
    );
    report.distribution(
        &format!("{prefix}daemon_duration_ms"),
        &format!("[state on {fs}] duration_ms (daemon, w/ grace)"),
        "ms",
        &column(|s| s.daemon_ms),
    );
    report.distribution(
        &format!("{prefix}rename_syscall_ms"),
        &format!("[state on {fs}]   the rename(2) call itself"),
        "ms",
        &column(|s| s.rename_ms),
    );
    let confirmed = samples.iter().filter(|s| s.exe_confirmed).count();
    report.value(
        &format!("{prefix}failed_reloads"),
        &format!("[state on {fs}] failed reloads"),
        run.failures.len() as f64,
        "",
    );
    report.value(
        &format!("{prefix}exe_confirmed"),
        &format!("[state on {fs}] new pid runs new snapshot"),
        confirmed as f64,
        "",
    );
    if let Some(latency) = latency {
        report.target(
            &format!("[state on {fs}] p50 rename -> plugin_started"),
            latency.p50,
            Bound::AtMost(case.p50_ms),
            "ms",
        );
        if let Some(p99) = case.p99_ms {
            report.target(
                &format!("[state on {fs}] p99 rename -> plugin_started"),
                latency.p99,
                Bound::AtMost(p99),
                "ms",
            );
        }
    }
    report.target(
        &format!("[state on {fs}] timed reloads with /proc/pid/exe confirmed"),
        confirmed as f64,
        Bound::Exactly(case.reloads as f64),
        "",
    );
    if let Some(first) = run.failures.first() {
        report.note(format!("[state on {fs}] first failed reload: {first}"));
    }
}
