//! Storm: 100 000 file operations in a few seconds across 100 plugin dirs, most on excluded names
//! (rewrites of `*.log`/`*.swp`/`*.tmp`, renames between two `*.tmp` names), some rewrites of data
//! files that count, and bursts of real new builds for a subset. Figures: the daemon's CPU time
//! for the whole storm, and whether exactly the plugins that really changed reloaded, once each.
//!
//! Plugins 0-19 get 5 new builds each (10 rounds apart, at staggered points of the storm),
//! plugins 20-39 get a non-excluded data file rewritten every 10 rounds for the whole storm, and
//! plugins 40-99 only see excluded names. One round touches every plugin once (100 operations), so
//! each changed plugin sees its counted changes a few ms apart, well within the 500 ms debounce:
//! one reload each is the right answer. The bench records the longest gap it actually left
//! between two counted changes of a plugin, since a stall longer than the debounce would
//! legitimately allow a second reload.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::fixture::{Config, Daemon, Layout};
use crate::plugin::{self, Builds};
use crate::procfs;
use crate::report::{Bound, Report};
use crate::tally::{self, Tally};
use crate::{Bench, Outcome, millis};

const PLUGINS: usize = 100;
const ROUNDS: usize = 1000;
const BUILD_PLUGINS: usize = 20;
const DATA_PLUGINS: usize = 20;
const BUILDS_EACH: usize = 5;
/// Rounds between two counted changes of one plugin.
const SPACING: usize = 10;
const DEBOUNCE_MS: u64 = 500;

/// What one operation does to one plugin dir.
#[derive(Debug, PartialEq)]
enum Op {
    /// Rename the staged build number `.0` over the executable.
    Build(usize),
    /// Rewrite a data file whose name no exclude glob matches.
    Data(&'static str),
    /// Rewrite a file whose name an exclude glob matches.
    WriteExcluded(&'static str),
    /// Rename the scratch file between its two excluded names (`SCRATCH`).
    ToggleExcluded,
}

impl Op {
    fn counts(&self) -> bool {
        matches!(self, Op::Build(_) | Op::Data(_))
    }
}

const SCRATCH: [&str; 2] = ["scratch-a.tmp", "scratch-b.tmp"];
const DATA: [&str; 3] = ["data-0.dat", "data-1.dat", "data-2.dat"];
const EXCLUDED: [&str; 3] = ["build.log", "notes.swp", "cache.tmp"];

/// The operation of round `round` on plugin `p`.
fn op_for(p: usize, round: usize) -> Op {
    let build_start = p * 40;
    if p < BUILD_PLUGINS && round >= build_start && (round - build_start) % SPACING == 0 {
        let n = (round - build_start) / SPACING;
        if n < BUILDS_EACH {
            return Op::Build(n);
        }
    }
    let is_data = (BUILD_PLUGINS..BUILD_PLUGINS + DATA_PLUGINS).contains(&p);
    if is_data && round % SPACING == p % SPACING {
        return Op::Data(DATA[round % DATA.len()]);
    }
    match round % 4 {
        3 => Op::ToggleExcluded,
        n => Op::WriteExcluded(EXCLUDED[n]),
    }
}

/// What the storm did, as the bench saw it.
#[derive(Default)]
struct Storm {
    ops: HashMap<&'static str, u64>,
    took: Duration,
    /// Longest time between two counted changes of the same plugin.
    widest_gap: Duration,
    /// Version of the last build each build plugin got.
    final_versions: HashMap<String, String>,
}

pub fn run(bench: &Bench) -> Outcome<Report> {
    let mut builds = Builds::new(0)?;
    let layout = Layout::create(&bench.root, "storm")?;
    let config = Config {
        debounce_ms: DEBOUNCE_MS,
        ..Config::default()
    };
    let ids = plugin::ids(PLUGINS);
    prepare(&layout, &ids, &mut builds)?;
    let mut daemon = Daemon::start(&bench.daemon, layout, &config, &ids)?;
    daemon.wait_plugins_running(PLUGINS as u64, Duration::from_secs(20))?;
    let events = daemon.subscribe()?;

    let cpu_before = procfs::cpu_time(daemon.pid())?;
    let switches_before = procfs::context_switches(daemon.pid())?;
    let storm = blow(&daemon, &ids, &mut builds)?;
    let changed = BUILD_PLUGINS + DATA_PLUGINS;
    let mut tally = Tally::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    let all_done = tally.collect_until(&events, deadline, |t| {
        t.succeeded_at.len() + t.failed as usize >= changed
    });
    tally.collect_for(&events, Duration::from_millis(3 * DEBOUNCE_MS + 500));
    daemon.ensure_alive()?;
    let cpu = procfs::cpu_time(daemon.pid())? - cpu_before;
    let switches = procfs::context_switches(daemon.pid())? - switches_before;
    let listed = tally::plugin_versions(&daemon)?;

    let mut report = Report::new(
        "storm",
        "100 000 file events over 100 plugins: excluded names, data files, new builds for 20",
    );
    let total_ops: u64 = storm.ops.values().sum();
    report.value(
        "file_events",
        "file operations (write/rename)",
        total_ops as f64,
        "",
    );
    for (kind, n) in sorted(&storm.ops) {
        report.value(
            &format!("ops_{kind}"),
            &format!("  of which {kind}"),
            n as f64,
            "",
        );
    }
    report.value("storm_ms", "storm took", millis(storm.took), "ms");
    report.value(
        "ops_per_s",
        "file operations per second",
        total_ops as f64 / storm.took.as_secs_f64(),
        "/s",
    );
    report.value(
        "cpu_ms",
        "daemon CPU time (utime+stime), storm+reloads",
        millis(cpu),
        "ms",
    );
    report.value(
        "cpu_us_per_op",
        "daemon CPU per file operation",
        millis(cpu) * 1000.0 / total_ops as f64,
        "us",
    );
    report.value(
        "ctx_switches",
        "daemon context switches, storm+reloads",
        switches as f64,
        "",
    );

    let once = ids[..changed]
        .iter()
        .filter(|id| tally.starts(id) == 1)
        .count();
    let stray = ids[changed..]
        .iter()
        .filter(|id| tally.starts(id) > 0)
        .count();
    let on_last = storm
        .final_versions
        .iter()
        .filter(|(id, version)| tally::runs_version(&listed, id, version))
        .count();
    tally::report_count(&mut report, "reload_started", tally.total_started());
    tally::report_count(&mut report, "reload_failed", tally.failed);
    report.target(
        "changed plugins reloaded exactly once",
        once as f64,
        Bound::Exactly(changed as f64),
        "",
    );
    report.target(
        "unchanged plugins reloaded",
        stray as f64,
        Bound::Exactly(0.0),
        "",
    );
    report.target(
        "rebuilt plugins running their last build",
        on_last as f64,
        Bound::Exactly(BUILD_PLUGINS as f64),
        "",
    );
    report.note(format!(
        "reload_started triggers: {}",
        tally.describe_triggers()
    ));
    report.note(format!(
        "widest gap between two counted changes of one plugin: {:.1} ms (debounce \
         {DEBOUNCE_MS} ms)",
        millis(storm.widest_gap)
    ));
    if storm.widest_gap >= Duration::from_millis(DEBOUNCE_MS) {
        report.note(
            "the storm itself paused longer than the debounce: an extra reload there is correct",
        );
    }
    if !all_done {
        report.note("not every changed plugin finished a reload within 30 s of the storm");
    }
    tally.note_lag(&mut report);
    Ok(report)
}

/// Lays out the plugins with build 0 and every file the storm touches, before the daemon starts:
/// creating files during the storm would cost about 1 ms each on some disks and turn the storm
/// into a file-creation benchmark, and a data file created while watched would count as a change.
fn prepare(layout: &Layout, ids: &[String], builds: &mut Builds) -> Outcome<()> {
    let first = builds.build(0).to_vec();
    for id in ids {
        layout.install(id, &first)?;
        let dir = layout.plugins.join(id);
        for name in DATA.iter().chain(&EXCLUDED).chain(&SCRATCH[..1]) {
            overwrite(&dir.join(name), 0)?;
        }
    }
    Ok(())
}

/// The plugin dirs and staged builds the storm works on.
struct Target {
    dirs: Vec<PathBuf>,
    execs: Vec<PathBuf>,
    staged: Vec<Vec<PathBuf>>,
    /// Whether each plugin's scratch file is named `SCRATCH[0]` (else `SCRATCH[1]`).
    scratch_first: Vec<bool>,
}

impl Target {
    /// Performs `op` on plugin `p`'s dir; returns the kind of operation for the counts.
    fn apply(&mut self, op: &Op, p: usize, round: usize) -> Outcome<&'static str> {
        let dir = &self.dirs[p];
        match op {
            Op::Build(n) => {
                plugin::swap_in(&self.staged[p][*n], &self.execs[p])?;
                Ok("build_rename")
            }
            Op::Data(name) => overwrite(&dir.join(name), round).map(|()| "data_write"),
            Op::WriteExcluded(name) => overwrite(&dir.join(name), round).map(|()| "excluded_write"),
            Op::ToggleExcluded => {
                let (from, to) = if self.scratch_first[p] {
                    (0, 1)
                } else {
                    (1, 0)
                };
                let (from, to) = (dir.join(SCRATCH[from]), dir.join(SCRATCH[to]));
                fs::rename(&from, &to).map_err(|e| {
                    format!(
                        "failed to rename `{}` to `{}`: {e}",
                        from.display(),
                        to.display()
                    )
                })?;
                self.scratch_first[p] = !self.scratch_first[p];
                Ok("excluded_rename")
            }
        }
    }
}

/// Runs the 100 000 operations, round by round, as fast as they go.
fn blow(daemon: &Daemon, ids: &[String], builds: &mut Builds) -> Outcome<Storm> {
    let layout = &daemon.layout;
    let mut storm = Storm::default();
    let mut staged: Vec<Vec<PathBuf>> = Vec::new();
    for (p, id) in ids.iter().enumerate().take(BUILD_PLUGINS) {
        let mut mine = Vec::new();
        for n in 0..BUILDS_EACH {
            let serial = 1 + (p * BUILDS_EACH + n) as u64;
            let bytes = builds.build(serial);
            storm
                .final_versions
                .insert(id.clone(), plugin::version_of(bytes));
            mine.push(plugin::stage(&layout.staging, id, serial, bytes)?);
        }
        staged.push(mine);
    }
    let mut target = Target {
        dirs: ids.iter().map(|id| layout.plugins.join(id)).collect(),
        execs: ids.iter().map(|id| layout.exec(id)).collect(),
        staged,
        scratch_first: vec![true; ids.len()],
    };
    let mut last_counted: Vec<Option<Instant>> = vec![None; ids.len()];

    let start = Instant::now();
    for round in 0..ROUNDS {
        for (p, last) in last_counted.iter_mut().enumerate() {
            let op = op_for(p, round);
            let kind = target.apply(&op, p, round)?;
            *storm.ops.entry(kind).or_default() += 1;
            if op.counts() {
                let now = Instant::now();
                if let Some(previous) = *last {
                    storm.widest_gap = storm.widest_gap.max(now - previous);
                }
                *last = Some(now);
            }
        }
    }
    storm.took = start.elapsed();
    Ok(storm)
}

/// Writes a fixed-length line at the start of `path`, creating it if needed. No truncation:
/// ext4's `auto_da_alloc` flushes a file truncated and rewritten on close, which would make the
/// bench measure the disk (about 100 us per write) instead of feeding the daemon events; each
/// call is one IN_CLOSE_WRITE for the daemon.
fn overwrite(path: &Path, round: usize) -> Outcome<()> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .and_then(|mut file| file.write_all(format!("{round:08}\n").as_bytes()))
        .map_err(|e| format!("failed to write `{}`: {e}", path.display()))
}

fn sorted(ops: &HashMap<&'static str, u64>) -> Vec<(&'static str, u64)> {
    let mut pairs: Vec<_> = ops.iter().map(|(k, v)| (*k, *v)).collect();
    pairs.sort();
    pairs
}

/// Checks of the storm's schedule; run by `cargo test --bench daemon`.
pub fn self_check() -> Result<(), String> {
    let mut builds = vec![0; PLUGINS];
    let mut data = vec![0; PLUGINS];
    for round in 0..ROUNDS {
        for p in 0..PLUGINS {
            match op_for(p, round) {
                Op::Build(_) => builds[p] += 1,
                Op::Data(_) => data[p] += 1,
                _ => {}
            }
        }
    }
    for p in 0..PLUGINS {
        let want_builds = if p < BUILD_PLUGINS { BUILDS_EACH } else { 0 };
        let is_data = (BUILD_PLUGINS..BUILD_PLUGINS + DATA_PLUGINS).contains(&p);
        let want_data = if is_data { ROUNDS / SPACING } else { 0 };
        if builds[p] != want_builds || data[p] != want_data {
            return Err(format!(
                "plugin {p}: {} builds and {} data writes scheduled, want {want_builds} and \
                 {want_data}",
                builds[p], data[p]
            ));
        }
    }
    if op_for(99, 3) != Op::ToggleExcluded || op_for(99, 4) != Op::WriteExcluded(EXCLUDED[0]) {
        return Err(
            "plugins that only see excluded names must cycle write, write, write, rename".into(),
        );
    }
    Ok(())
}
