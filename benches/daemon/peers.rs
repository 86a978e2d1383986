//! `hotreloadd` beside `entr -r` and `watchexec --restart` on one workload: a new build renamed
//! over a plugin's executable (or, in `peers_rm_cp_1mb`, the executable removed and the build
//! copied to it), over and over, and the time until the new build runs. `ab_*` run the same
//! workload through two hotreloadd binaries in alternating rounds.
//!
//! "Running" is the same signal for every tool: the plugin is the probe of `probe.rs`, whose first
//! instruction stamps `CLOCK_MONOTONIC` and which then reports that stamp and its build serial on
//! a FIFO. Latency = probe stamp - stamp taken just before rename(2), on one clock, so neither the
//! harness's reading nor any tool's own events are in the figure. The records also show every
//! start, so a tool that starts a build twice (extra restart) or never (missed restart) is
//! counted, whichever tool it is.
//!
//! Pacing is the same for all: after each build started (or a timeout passed), the harness leaves
//! `GAP` of quiet, then stages the next build (write + flush to an unwatched dir) and renames it
//! in. The old build stays hard-linked (see `plugin::pin`) during the timed window for every tool.
//! How each tool is run:
//! - hotreloadd: `debounce_delay_ms = 0`, `startup_grace_ms = 1`, once with its state dir in the
//!   bench dir and once on tmpfs (its reload writes state.json before the spawn, and fsyncs it
//!   after);
//! - `entr -nr EXEC FIFO`, fed EXEC on stdin (`-n`: no TTY). entr 5 re-opens a watched file that
//!   was renamed over (it gets `IN_ATTRIB`, and `IN_DELETE_SELF` once the last link goes), so it
//!   keeps following the path without `-d` or a restart loop. Its Linux event layer waits until
//!   50 ms pass with no inotify event before acting; that fixed window cannot be set to 0, so
//!   entr's figures are also printed less 50 ms ("minus debounce");
//! - `watchexec --restart --debounce 0ms --shell=none --watch PLUGIN_DIR -- EXEC FIFO`, with no
//!   ignore files. Its default debounce is 50 ms; 0 is accepted ("highly discouraged").
//!
//! Two floors are measured in the same run, without any tool: the harness spawning the probe
//! (back to back), and the harness doing what any reload that runs a hashed copy must do before
//! the copy's first instruction (read, BLAKE3, write the copy, spawn it), after the same quiet
//! gap the tools get. A target below the second floor is said to be out of reach.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use crate::fixture::{Config, Daemon, Layout};
use crate::probe::{self, ProbeBuilds, Reports, Start};
use crate::report::{Bound, Report};
use crate::tools::{self, Tool};
use crate::{Bench, Outcome, plugin};

/// How a new build lands on the plugin's executable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Install {
    /// rename(2) of a flushed file from an unwatched dir (an atomic install).
    Rename,
    /// `rm` of the executable, then `cp` of the build to it (std's copy: `copy_file_range`, as
    /// coreutils' `cp` does): tools see the file vanish, appear and be written.
    RemoveAndCopy,
}

impl Install {
    fn verb(self) -> &'static str {
        match self {
            Install::Rename => "rename",
            Install::RemoveAndCopy => "rm + cp",
        }
    }
}

/// One size of build, how it is installed and how many are.
pub struct Case {
    pub name: &'static str,
    pub size: usize,
    pub install: Install,
    pub warmup: u64,
    pub reloads: u64,
    /// Longest wait for one build to start before counting on (a start after it still counts).
    pub timeout: Duration,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// hotreloadd's p50 at most this times watchexec's in the same run.
    pub of_watchexec: Option<f64>,
}

pub const ONE_MB: Case = Case {
    name: "peers_1mb",
    size: 1 << 20,
    install: Install::Rename,
    warmup: 5,
    reloads: 100,
    timeout: Duration::from_secs(3),
    // Issue 14: 1 ms from rename to running, p99 3 ms, at most half of watchexec's p50.
    p50_ms: Some(1.0),
    p99_ms: Some(3.0),
    of_watchexec: Some(0.5),
};

pub const ONE_MB_RM_CP: Case = Case {
    name: "peers_rm_cp_1mb",
    size: 1 << 20,
    install: Install::RemoveAndCopy,
    warmup: 5,
    reloads: 100,
    timeout: Duration::from_secs(3),
    // Issue 14: a p50 no higher than watchexec's in the same run.
    p50_ms: None,
    p99_ms: None,
    of_watchexec: Some(1.0),
};

pub const FIFTY_MB: Case = Case {
    name: "peers_50mb",
    size: 50 << 20,
    install: Install::Rename,
    warmup: 2,
    reloads: 30,
    timeout: Duration::from_secs(10),
    // Issue 14: the copy and hash are the floor (the context rows).
    p50_ms: Some(20.0),
    p99_ms: None,
    of_watchexec: None,
};

/// Quiet time after a build started, before the next is staged: builds land seconds apart in
/// real use, and every tool gets the same time to re-arm its watch.
const GAP: Duration = Duration::from_millis(100);

/// After the last build, how long to keep listening for a late or repeated start.
const TAIL: Duration = Duration::from_secs(1);

/// entr's fixed quiet window: its Linux kqueue emulation keeps reading inotify events until
/// `poll` has seen none for 50 ms, and only then acts. Not configurable; every other tool runs
/// with no debounce (hotreloadd `debounce_delay_ms = 0`, watchexec `--debounce 0ms`).
const ENTR_QUIET_MS: f64 = 50.0;

const ID: &str = "plugin";

/// The tools compared, in the order they run and are printed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Contender {
    Hotreloadd,
    HotreloaddTmpfsState,
    Entr,
    Watchexec,
}

impl Contender {
    fn label(self) -> &'static str {
        match self {
            Contender::Hotreloadd => "hotreloadd",
            Contender::HotreloaddTmpfsState => "hotreloadd, state on tmpfs",
            Contender::Entr => "entr -r",
            Contender::Watchexec => "watchexec --restart",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Contender::Hotreloadd => "hotreloadd",
            Contender::HotreloaddTmpfsState => "hotreloadd_tmpfs_state",
            Contender::Entr => "entr",
            Contender::Watchexec => "watchexec",
        }
    }

    /// The debounce built into the tool or configured for it, subtracted from its latency.
    fn debounce_ms(self) -> f64 {
        match self {
            Contender::Entr => ENTR_QUIET_MS,
            _ => 0.0,
        }
    }
}

/// What one tool did with the builds.
struct Outcomes {
    /// Rename -> probe start of each timed build that started.
    latency_ms: Vec<f64>,
    builds: u64,
    missed: u64,
    extra: u64,
    /// Why the run of this tool ended early, if it did.
    ended: Option<String>,
}

pub fn run(bench: &Bench, case: &Case) -> Outcome<Report> {
    if !probe::supported() {
        return Err("the peers benchmark's probe plugin is an x86-64 Linux program".into());
    }
    let tmpfs = crate::reload::tmpfs_dir();
    let entr = tools::entr();
    let watchexec = tools::watchexec();
    let mut measured = Vec::new();
    let mut not_measured = Vec::new();
    let contenders = [
        (Contender::Hotreloadd, Ok(None)),
        (Contender::HotreloaddTmpfsState, Ok(None)),
        (Contender::Entr, entr.clone().map(Some)),
        (Contender::Watchexec, watchexec.clone().map(Some)),
    ];
    for (contender, tool) in contenders {
        let result = tool.and_then(|tool| {
            if contender == Contender::HotreloaddTmpfsState && tmpfs.is_none() {
                return Err("no tmpfs dir (set HOTRELOAD_BENCH_TMPFS)".into());
            }
            measure(bench, case, contender, tool.as_ref(), tmpfs.as_deref())
        });
        match result {
            Ok(outcomes) => measured.push((contender, outcomes)),
            Err(e) if matches!(contender, Contender::Hotreloadd) => return Err(e),
            Err(e) => not_measured.push((contender, e)),
        }
    }
    let floor = Floors {
        exec_ms: exec_floor(bench)?,
        snapshot_ms: snapshot_floor(bench, case)?,
    };
    let costs = build_costs(bench, case)?;
    let mut report = report(case, &measured, &not_measured, &floor, &costs);
    for tool in [entr, watchexec].into_iter().flatten() {
        report.note(format!("{}: {}", tool.version, tool.path.display()));
    }
    Ok(report)
}

/// Rounds of an A/B comparison (`HOTRELOAD_BENCH_AB_ROUNDS`) and timed builds per round.
const AB_ROUNDS: u64 = 8;
const AB_PER_ROUND: u64 = 30;

/// `ab_1mb`, `ab_rm_cp_1mb`: two daemon binaries, A (`HOTRELOADD_BIN` or cargo's build) and B
/// (`HOTRELOADD_BIN_B`), through `peers_1mb`'s workload in alternating rounds of 30 builds
/// (each round a fresh daemon). The machine's speed drifts by more than a change of 0.1 ms
/// within minutes; interleaving spreads that drift over both binaries, which two separate runs
/// cannot.
pub fn ab(bench: &Bench, install: Install) -> Outcome<Report> {
    if !probe::supported() {
        return Err("the A/B benchmark's probe plugin is an x86-64 Linux program".into());
    }
    let name = match install {
        Install::Rename => "ab_1mb",
        Install::RemoveAndCopy => "ab_rm_cp_1mb",
    };
    let Some(other) = std::env::var_os("HOTRELOADD_BIN_B") else {
        // Not an error: a plain `cargo bench` runs every benchmark, and this one needs a second
        // binary to compare with.
        let mut report = Report::new(name, "two daemons compared: not run");
        report.note(
            "set HOTRELOADD_BIN_B to the daemon binary to compare with (A is HOTRELOADD_BIN, or \
             the one cargo built)",
        );
        return Ok(report);
    };
    let rounds = match std::env::var("HOTRELOAD_BENCH_AB_ROUNDS") {
        Ok(text) => text.parse::<u64>().ok().filter(|&n| n > 0).ok_or(format!(
            "HOTRELOAD_BENCH_AB_ROUNDS={text:?} is not a positive number"
        ))?,
        Err(_) => AB_ROUNDS,
    };
    let b = Bench {
        daemon: other.into(),
        root: bench.root.clone(),
    };
    let case = Case {
        name,
        warmup: 3,
        reloads: AB_PER_ROUND,
        install,
        ..ONE_MB
    };
    let mut runs = [(bench, Vec::new(), 0u64), (&b, Vec::new(), 0u64)];
    for _ in 0..rounds {
        for (which, latency, faults) in &mut runs {
            let outcomes = measure(which, &case, Contender::Hotreloadd, None, None)?;
            if let Some(ended) = outcomes.ended {
                return Err(format!("{}: {ended}", which.daemon.display()));
            }
            latency.extend(outcomes.latency_ms);
            *faults += outcomes.missed + outcomes.extra;
        }
    }
    let verb = install.verb();
    let title = format!(
        "two daemons, {rounds} alternating rounds of {AB_PER_ROUND} builds of 1 MiB, {verb} -> \
         new process running"
    );
    let mut report = Report::new(case.name, &title);
    let mut p50 = Vec::new();
    for ((which, latency, faults), key) in runs.iter().zip(["a", "b"]) {
        let label = format!("{}: {verb} -> running", key.to_uppercase());
        if let Some(summary) =
            report.distribution(&format!("{key}_latency_ms"), &label, "ms", latency)
        {
            p50.push(summary.p50);
        }
        report.value(
            &format!("{key}_missed_extra"),
            "  missed + extra restarts",
            *faults as f64,
            "",
        );
        report.note(format!(
            "{}: {}",
            key.to_uppercase(),
            which.daemon.display()
        ));
    }
    if let [a, b] = p50[..] {
        report.value("b_minus_a_p50_ms", "B - A, p50", b - a, "ms");
    }
    report.note(
        "each round starts a fresh daemon (state dir in the bench dir), installs 3 warm-up builds, \
         then times 30; the rounds alternate A, B, A, B, ...",
    );
    Ok(report)
}

/// Runs all builds of `case` through one tool.
fn measure(
    bench: &Bench,
    case: &Case,
    contender: Contender,
    tool: Option<&Tool>,
    tmpfs: Option<&Path>,
) -> Outcome<Outcomes> {
    let mut layout = Layout::create(&bench.root, &format!("{}-{}", case.name, contender.key()))?;
    if contender == Contender::HotreloaddTmpfsState
        && let Some(tmpfs) = tmpfs
    {
        layout = layout.with_state_in(tmpfs)?;
    }
    let mut builds = ProbeBuilds::new(case.size);
    layout.install(ID, builds.build(0))?;
    let reports = Reports::create(&layout.root.join("starts.fifo"))?;
    let mut running = Running::start(bench, contender, tool, layout, &reports)?;
    let mut starts: BTreeMap<u64, Vec<Start>> = BTreeMap::new();
    let first = await_serial(
        &reports,
        0,
        Instant::now() + Duration::from_secs(10),
        &mut starts,
    );
    if first.is_none() {
        return Err(format!(
            "{} never started the first build within 10 s{}",
            contender.label(),
            running.log_tail()
        ));
    }

    let total = case.warmup + case.reloads;
    let mut renamed_ns = BTreeMap::new();
    let mut ended = None;
    for serial in 1..=total {
        if let Some(exit) = running.exited() {
            ended = Some(format!(
                "{} exited ({exit}) before build {serial}{}",
                contender.label(),
                running.log_tail()
            ));
            break;
        }
        // Pacing, not synchronisation: the quiet time every tool gets between builds.
        std::thread::sleep(GAP);
        drain(&reports, &mut starts);
        let layout = running.layout();
        let staged = plugin::stage(&layout.staging, ID, serial, builds.build(serial))?;
        let previous = plugin::pin(&layout.exec(ID), &layout.staging)?;
        let before = probe::now_ns();
        match case.install {
            Install::Rename => plugin::swap_in(&staged, &layout.exec(ID))?,
            Install::RemoveAndCopy => plugin::remove_and_copy(&staged, &layout.exec(ID))?,
        }
        renamed_ns.insert(serial, before);
        await_serial(&reports, serial, Instant::now() + case.timeout, &mut starts);
        for leftover in [previous, staged] {
            if leftover.exists() {
                std::fs::remove_file(&leftover)
                    .map_err(|e| format!("failed to remove `{}`: {e}", leftover.display()))?;
            }
        }
    }
    let deadline = Instant::now() + TAIL;
    while let Some(start) = reports.next_before(deadline) {
        starts.entry(start.serial).or_default().push(start);
    }
    running.stop();
    kill_leftover_probes(&starts, &reports.path);
    Ok(tally(case, &renamed_ns, &starts, ended))
}

/// Records starts until build `serial` has started or `deadline` passes.
fn await_serial(
    reports: &Reports,
    serial: u64,
    deadline: Instant,
    starts: &mut BTreeMap<u64, Vec<Start>>,
) -> Option<Start> {
    while let Some(start) = reports.next_before(deadline) {
        starts.entry(start.serial).or_default().push(start);
        if start.serial == serial {
            return Some(start);
        }
    }
    None
}

/// Records the starts that have already arrived.
fn drain(reports: &Reports, starts: &mut BTreeMap<u64, Vec<Start>>) {
    while let Ok(start) = reports.starts.try_recv() {
        starts.entry(start.serial).or_default().push(start);
    }
}

/// Missed = a build that never started; extra = every start of a build beyond its first.
fn tally(
    case: &Case,
    renamed_ns: &BTreeMap<u64, u64>,
    starts: &BTreeMap<u64, Vec<Start>>,
    ended: Option<String>,
) -> Outcomes {
    let total = case.warmup + case.reloads;
    let missed = (1..=total).filter(|s| !starts.contains_key(s)).count() as u64;
    let extra = starts
        .values()
        .map(|list| list.len().saturating_sub(1) as u64)
        .sum();
    let latency_ms = renamed_ns
        .iter()
        .filter(|(serial, _)| **serial > case.warmup)
        .filter_map(|(serial, renamed)| {
            let first = starts.get(serial)?.iter().map(|s| s.started_ns).min()?;
            Some(first.saturating_sub(*renamed) as f64 / 1e6)
        })
        .collect();
    Outcomes {
        latency_ms,
        builds: total,
        missed,
        extra,
        ended,
    }
}

/// SIGKILLs every probe that reported to `fifo` and still runs after its tool stopped (entr puts
/// its child in a process group of its own, so stopping entr's group does not reach it). The
/// pid is checked to still be one of our probes first: its cmdline names our FIFO.
fn kill_leftover_probes(starts: &BTreeMap<u64, Vec<Start>>, fifo: &Path) {
    let fifo = fifo.to_string_lossy();
    for start in starts.values().flatten() {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", start.pid)).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(fifo.as_ref()) {
            let _ = kill(Pid::from_raw(start.pid), Signal::SIGKILL);
        }
    }
}

/// A running tool with the probe as its plugin.
enum Running {
    Daemon(Daemon),
    Peer {
        child: Child,
        layout: Layout,
        log: std::path::PathBuf,
    },
}

impl Running {
    fn start(
        bench: &Bench,
        contender: Contender,
        tool: Option<&Tool>,
        layout: Layout,
        reports: &Reports,
    ) -> Outcome<Running> {
        let exec = layout.exec(ID);
        let fifo = reports.path.clone();
        let tool_path = tool.map(|t| t.path.clone());
        match (contender, tool_path) {
            (Contender::Hotreloadd | Contender::HotreloaddTmpfsState, _) => {
                let config = Config {
                    debounce_ms: 0,
                    startup_grace_ms: 1,
                    args: vec![fifo.to_string_lossy().into_owned()],
                    ..Config::default()
                };
                let daemon = Daemon::start(&bench.daemon, layout, &config, &[ID.to_owned()])?;
                Ok(Running::Daemon(daemon))
            }
            (Contender::Entr, Some(entr)) => {
                let mut command = Command::new(entr);
                command.arg("-nr").arg(&exec).arg(&fifo);
                let paths = format!("{}\n", exec.display());
                Running::spawn_peer(command, layout, Some(paths))
            }
            (Contender::Watchexec, Some(watchexec)) => {
                let mut command = Command::new(watchexec);
                command
                    .args(["--restart", "--debounce", "0ms", "--shell=none"])
                    .args([
                        "--no-vcs-ignore",
                        "--no-project-ignore",
                        "--no-global-ignore",
                    ])
                    .args(["--no-discover-ignore", "--no-default-ignore"])
                    .arg("--watch")
                    .arg(layout.plugins.join(ID))
                    .arg("--")
                    .arg(&exec)
                    .arg(&fifo);
                Running::spawn_peer(command, layout, None)
            }
            (_, None) => Err(format!("{} is not installed", contender.label())),
        }
    }

    /// Starts a peer in a process group of its own, its output in `<root>/tool.log`.
    fn spawn_peer(
        mut command: Command,
        layout: Layout,
        stdin_text: Option<String>,
    ) -> Outcome<Running> {
        let log = layout.root.join("tool.log");
        let out =
            File::create(&log).map_err(|e| format!("failed to create `{}`: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("failed to clone the handle of `{}`: {e}", log.display()))?;
        command
            .current_dir(&layout.root)
            .stdin(if stdin_text.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let mut child = command
            .spawn()
            .map_err(|e| format!("failed to start {command:?}: {e}"))?;
        if let (Some(text), Some(mut stdin)) = (stdin_text, child.stdin.take()) {
            use std::io::Write;
            stdin
                .write_all(text.as_bytes())
                .map_err(|e| format!("failed to write the file list to {command:?}: {e}"))?;
        }
        Ok(Running::Peer { child, layout, log })
    }

    fn layout(&self) -> &Layout {
        match self {
            Running::Daemon(daemon) => &daemon.layout,
            Running::Peer { layout, .. } => layout,
        }
    }

    /// The tool's exit status, once it has exited.
    fn exited(&mut self) -> Option<String> {
        match self {
            Running::Daemon(daemon) => daemon.ensure_alive().err(),
            Running::Peer { child, .. } => match child.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                _ => None,
            },
        }
    }

    fn log_tail(&self) -> String {
        let Running::Peer { log, .. } = self else {
            return String::new();
        };
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "; its output `{}` ends with:\n  {}",
            log.display(),
            lines[lines.len().saturating_sub(5)..].join("\n  ")
        )
    }

    /// SIGTERM to the peer's process group, SIGKILL after 5 s (a daemon stops on drop).
    fn stop(self) {
        let Running::Peer {
            mut child, layout, ..
        } = self
        else {
            return;
        };
        let group = Pid::from_raw(child.id() as i32);
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = killpg(group, Signal::SIGKILL);
        let _ = child.wait();
        if std::env::var_os("HOTRELOAD_BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&layout.root);
        }
    }
}

/// The floor under every tool: the harness itself spawning the probe (fork + exec + first
/// instruction), 100 times.
fn exec_floor(bench: &Bench) -> Outcome<Vec<f64>> {
    let dir = bench.root.join("peers-floor");
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("failed to create `{}`: {e}", dir.display()))?;
    let exe = dir.join("probe");
    drop(plugin::write_executable(
        &exe,
        ProbeBuilds::new(0).build(7),
    )?);
    let reports = Reports::create(&dir.join("starts.fifo"))?;
    let mut floor = Vec::new();
    for _ in 0..100 {
        let before = probe::now_ns();
        let mut child = Command::new(&exe)
            .arg(&reports.path)
            .spawn()
            .map_err(|e| format!("failed to run the probe `{}`: {e}", exe.display()))?;
        let start = reports.next_before(Instant::now() + Duration::from_secs(5));
        let _ = child.kill();
        let _ = child.wait();
        if let Some(start) = start {
            floor.push(start.started_ns.saturating_sub(before) as f64 / 1e6);
        }
    }
    drop(reports);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(floor)
}

/// What the harness measures of its own, with no tool in the way.
struct Floors {
    /// [`exec_floor`].
    exec_ms: Vec<f64>,
    /// [`snapshot_floor`].
    snapshot_ms: Vec<f64>,
}

/// Builds timed by [`snapshot_floor`].
const SNAPSHOT_FLOOR_ROUNDS: u64 = 30;

/// The floor under any reload that runs a hashed copy of the build (SPEC §3: the version, a
/// BLAKE3 of the content, is known before the old instance is touched and is in the new one's
/// environment; the copy is what runs), done by the harness alone: read the build and hash it,
/// write the copy, spawn the copy, on one thread, each build after the same quiet gap as the
/// tools get. No inotify, no old instance to stop, no state file: a tool can come close to this
/// only by spreading the copy and the hash over two CPUs.
fn snapshot_floor(bench: &Bench, case: &Case) -> Outcome<Vec<f64>> {
    let dir = bench.root.join("peers-snapshot-floor");
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("failed to create `{}`: {e}", dir.display()))?;
    let source = dir.join("build");
    let mut builds = ProbeBuilds::new(case.size);
    let reports = Reports::create(&dir.join("starts.fifo"))?;
    // One buffer for every build, its pages faulted in once, as a tool would keep it.
    let mut bytes = vec![1u8; case.size];
    let mut floor = Vec::new();
    for serial in 0..SNAPSHOT_FLOOR_ROUNDS {
        drop(plugin::write_executable(&source, builds.build(serial))?);
        std::thread::sleep(GAP);
        let copy = dir.join(format!("copy-{serial}"));
        let before = probe::now_ns();
        File::open(&source)
            .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut bytes))
            .map_err(|e| format!("failed to read `{}`: {e}", source.display()))?;
        std::hint::black_box(blake3::hash(&bytes));
        drop(plugin::write_executable(&copy, &bytes)?);
        let mut child = Command::new(&copy)
            .arg(&reports.path)
            .spawn()
            .map_err(|e| format!("failed to run the probe `{}`: {e}", copy.display()))?;
        let start = reports.next_before(Instant::now() + case.timeout);
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(&copy);
        if let Some(start) = start {
            floor.push(start.started_ns.saturating_sub(before) as f64 / 1e6);
        }
    }
    drop(reports);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(floor)
}

/// What reading a build costs outside any tool, in the harness: BLAKE3 of it, and a copy of it
/// with a 128 KiB buffer, no fsync, into the bench dir. hotreloadd does both on every reload: up
/// to 3 MiB read and hashed in one pass while a second thread writes the copy, above that copied
/// on one CPU while the copy is hashed on another; entr and watchexec do neither.
struct BuildCosts {
    hash_ms: Vec<f64>,
    copy_ms: Vec<f64>,
}

fn build_costs(bench: &Bench, case: &Case) -> Outcome<BuildCosts> {
    let mut builds = ProbeBuilds::new(case.size);
    let dir = bench.root.join("peers-costs");
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("failed to create `{}`: {e}", dir.display()))?;
    let source = dir.join("build");
    drop(plugin::write_executable(&source, builds.build(1))?);
    let mut costs = BuildCosts {
        hash_ms: Vec::new(),
        copy_ms: Vec::new(),
    };
    for round in 0..10 {
        let began = Instant::now();
        let bytes = std::fs::read(&source)
            .map_err(|e| format!("failed to read `{}`: {e}", source.display()))?;
        std::hint::black_box(blake3::hash(&bytes));
        costs.hash_ms.push(crate::millis(began.elapsed()));
        let target = dir.join(format!("copy-{round}"));
        let began = Instant::now();
        copy_with_buffer(&source, &target)?;
        costs.copy_ms.push(crate::millis(began.elapsed()));
        let _ = std::fs::remove_file(&target);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(costs)
}

fn copy_with_buffer(source: &Path, target: &Path) -> Outcome<()> {
    use std::io::{Read, Write};
    let mut input =
        File::open(source).map_err(|e| format!("failed to open `{}`: {e}", source.display()))?;
    let mut output = File::create(target)
        .map_err(|e| format!("failed to create `{}`: {e}", target.display()))?;
    let mut buffer = vec![0; 128 * 1024];
    loop {
        let n = input
            .read(&mut buffer)
            .map_err(|e| format!("failed to read `{}`: {e}", source.display()))?;
        if n == 0 {
            return Ok(());
        }
        output
            .write_all(&buffer[..n])
            .map_err(|e| format!("failed to write `{}`: {e}", target.display()))?;
    }
}

fn report(
    case: &Case,
    measured: &[(Contender, Outcomes)],
    not_measured: &[(Contender, String)],
    floor: &Floors,
    costs: &BuildCosts,
) -> Report {
    let verb = case.install.verb();
    let title = format!(
        "{} of a new {} MiB build -> new process running, hotreloadd vs entr vs watchexec",
        match case.install {
            Install::Rename => "rename(2)",
            Install::RemoveAndCopy => "`rm` + `cp`",
        },
        case.size >> 20
    );
    let mut report = Report::new(case.name, &title);
    let mut ours = None;
    let mut peers_worst_best: Option<f64> = None;
    let mut watchexec_p50: Option<f64> = None;
    for (contender, outcomes) in measured {
        let key = contender.key();
        let latency = report.distribution(
            &format!("{key}_latency_ms"),
            &format!("{}: {verb} -> running", contender.label()),
            "ms",
            &outcomes.latency_ms,
        );
        if contender.debounce_ms() > 0.0 {
            let less: Vec<f64> = outcomes
                .latency_ms
                .iter()
                .map(|ms| ms - contender.debounce_ms())
                .collect();
            report.distribution(
                &format!("{key}_latency_minus_debounce_ms"),
                &format!(
                    "  minus its fixed {} ms quiet window",
                    contender.debounce_ms()
                ),
                "ms",
                &less,
            );
        }
        report.value(
            &format!("{key}_missed"),
            &format!("  missed restarts (of {} builds)", outcomes.builds),
            outcomes.missed as f64,
            "",
        );
        report.value(
            &format!("{key}_extra"),
            "  extra restarts",
            outcomes.extra as f64,
            "",
        );
        let faults = (outcomes.missed + outcomes.extra) as f64;
        match contender {
            Contender::Hotreloadd => ours = Some((latency, faults)),
            Contender::Entr | Contender::Watchexec => {
                peers_worst_best = Some(peers_worst_best.map_or(faults, |f| f.min(faults)));
                if *contender == Contender::Watchexec {
                    watchexec_p50 = latency.as_ref().map(|l| l.p50);
                }
            }
            Contender::HotreloaddTmpfsState => {}
        }
        if let Some(ended) = &outcomes.ended {
            report.note(ended.clone());
        }
    }
    for (contender, why) in not_measured {
        report.value(
            &format!("{}_not_measured", contender.key()),
            &format!("{}: not measured", contender.label()),
            0.0,
            "",
        );
        report.note(format!("{} not measured: {why}", contender.label()));
    }
    report.distribution(
        "exec_floor_ms",
        "floor: harness spawns the probe itself",
        "ms",
        &floor.exec_ms,
    );
    let snapshot_floor = report.distribution(
        "snapshot_floor_ms",
        "floor: harness reads, hashes, copies, spawns",
        "ms",
        &floor.snapshot_ms,
    );
    report.distribution(
        "build_read_hash_ms",
        "context: read + BLAKE3 of one build (harness)",
        "ms",
        &costs.hash_ms,
    );
    report.distribution(
        "build_copy_ms",
        "context: copy of one build, 128 KiB buffer",
        "ms",
        &costs.copy_ms,
    );
    if let Some((latency, faults)) = ours {
        if let Some(latency) = latency {
            if let Some(p50) = case.p50_ms {
                report.target(
                    &format!("p50 hotreloadd {verb} -> running"),
                    latency.p50,
                    Bound::AtMost(p50),
                    "ms",
                );
            }
            if let Some(p99) = case.p99_ms {
                report.target(
                    &format!("p99 hotreloadd {verb} -> running"),
                    latency.p99,
                    Bound::AtMost(p99),
                    "ms",
                );
            }
            if let (Some(ratio), Some(theirs)) = (case.of_watchexec, watchexec_p50) {
                report.target(
                    &format!("p50 hotreloadd {verb} -> running vs {ratio} x watchexec's"),
                    latency.p50,
                    Bound::AtMost(ratio * theirs),
                    "ms",
                );
            }
            let bounds = [
                case.p50_ms,
                case.of_watchexec.zip(watchexec_p50).map(|(r, w)| r * w),
            ];
            // Said only of a missed target: one that is met needs no explaining.
            if let (Some(lowest), Some(floor)) = (
                bounds.into_iter().flatten().reduce(f64::min),
                snapshot_floor.as_ref().map(|f| f.p50),
            ) && lowest < floor
                && latency.p50 > lowest
            {
                report.note(format!(
                    "a p50 of {lowest:.3} ms is below the snapshot floor's p50 ({floor:.3} ms): \
                     out of reach on this machine for any tool that runs a hashed copy of the \
                     build, unless it spreads the copy and the hash over two CPUs"
                ));
            }
        }
        if let Some(peers) = peers_worst_best {
            report.target(
                "hotreloadd missed + extra restarts vs the better peer",
                faults,
                Bound::AtMost(peers),
                "",
            );
        }
    }
    report.note(format!(
        "{} timed builds after {} warm-up; counts cover all {}; {} ms of quiet between builds; \
         a build not started within {} s is waited for no longer (a later start still counts)",
        case.reloads,
        case.warmup,
        case.warmup + case.reloads,
        GAP.as_millis(),
        case.timeout.as_secs()
    ));
    report.note(format!(
        "latency = probe's CLOCK_MONOTONIC at its first instruction - the harness's just before \
         the {verb}; hotreloadd runs with debounce_delay_ms = 0 and watchexec with --debounce 0ms; \
         entr cannot be told: it waits for 50 ms without inotify events before it acts, so its \
         figure is also shown less those 50 ms"
    ));
    report
}
