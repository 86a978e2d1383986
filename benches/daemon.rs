//! `cargo bench --bench daemon [-- FILTER...]`: figures for `hotreloadd`, measured from outside
//! through its contract (SPEC §2-§6: command line, `hotreload.toml`, control socket, events).
//!
//! Each benchmark starts its own daemon in its own temp dir, drives it, prints a plain-text table
//! with PASS/MISS against the project's targets and one JSON line, and stops the daemon. These are
//! measurements, not tests: a missed target is reported and the run goes on; only a benchmark that
//! cannot run at all (no daemon, a daemon that dies) counts as an error and makes the exit status
//! non-zero. BENCHMARKS.md says how to run them and where results go.
//!
//! A FILTER selects the benchmarks whose name contains it (`reload` runs both reload sizes);
//! `--list` prints the names. Without the `--bench` flag that `cargo bench` passes, as under
//! `cargo test --benches`, the harness checks its own helpers instead and starts no daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[path = "daemon/client.rs"]
mod client;
#[path = "daemon/control.rs"]
mod control;
#[path = "daemon/fixture.rs"]
mod fixture;
#[path = "daemon/idle.rs"]
mod idle;
#[path = "daemon/machine.rs"]
mod machine;
#[path = "daemon/peers.rs"]
mod peers;
#[path = "daemon/plugin.rs"]
mod plugin;
#[path = "daemon/poll.rs"]
mod poll;
#[path = "daemon/probe.rs"]
mod probe;
#[path = "daemon/procfs.rs"]
mod procfs;
#[path = "daemon/reload.rs"]
mod reload;
#[path = "daemon/report.rs"]
mod report;
#[path = "daemon/scale.rs"]
mod scale;
#[path = "daemon/stats.rs"]
mod stats;
#[path = "daemon/storm.rs"]
mod storm;
#[path = "daemon/tally.rs"]
mod tally;
#[path = "daemon/tools.rs"]
mod tools;

use machine::Machine;
use report::Report;

/// Errors are messages: a benchmark that fails says why and the run moves on.
type Outcome<T> = Result<T, String>;

/// What every benchmark needs: the daemon binary and a directory to make its tree in.
pub struct Bench {
    pub daemon: PathBuf,
    pub root: PathBuf,
}

type Run = fn(&Bench) -> Outcome<Report>;
type SelfCheck = fn() -> Outcome<()>;

/// Every benchmark, in the order they run, with a one-line description for `--list`.
const BENCHMARKS: [(&str, &str, Run); 12] = [
    (
        "reload_1mb",
        "rename of a 1 MiB build -> new process running",
        |b| reload::run(b, &reload::ONE_MB),
    ),
    (
        "reload_50mb",
        "rename of a 50 MiB build -> new process running",
        |b| reload::run(b, &reload::FIFTY_MB),
    ),
    (
        "peers_1mb",
        "1 MiB builds: hotreloadd vs entr -r vs watchexec --restart",
        |b| peers::run(b, &peers::ONE_MB),
    ),
    (
        "peers_rm_cp_1mb",
        "1 MiB builds installed by rm + cp: hotreloadd vs entr -r vs watchexec --restart",
        |b| peers::run(b, &peers::ONE_MB_RM_CP),
    ),
    (
        "peers_50mb",
        "50 MiB builds: hotreloadd vs entr -r vs watchexec --restart",
        |b| peers::run(b, &peers::FIFTY_MB),
    ),
    (
        "ab_1mb",
        "two daemons (HOTRELOADD_BIN_B), interleaved: rename of 1 MiB builds",
        |b| peers::ab(b, peers::Install::Rename),
    ),
    (
        "ab_rm_cp_1mb",
        "two daemons (HOTRELOADD_BIN_B), interleaved: rm + cp of 1 MiB builds",
        |b| peers::ab(b, peers::Install::RemoveAndCopy),
    ),
    (
        "idle",
        "wake-ups with 100 idle plugins; RSS with 1/100/1000",
        idle::run,
    ),
    (
        "poll",
        "watch_mode = poll, 100 plugins: CPU, wake-ups, pickup",
        poll::run,
    ),
    ("scale", "1000 plugins rebuilt within 1 s", scale::run),
    (
        "storm",
        "100 000 file events; CPU time; one reload per change",
        storm::run,
    ),
    (
        "control",
        "pipelined status rate; latency with 1100 clients",
        control::run,
    ),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().any(|arg| arg == name);
    if flag("--help") || flag("-h") {
        println!("usage: cargo bench --bench daemon [-- [--list] [FILTER...]]");
        return ExitCode::SUCCESS;
    }
    if flag("--list") {
        let width = BENCHMARKS.iter().map(|(name, _, _)| name.len()).max();
        let width = width.unwrap_or(0);
        for (name, what, _) in BENCHMARKS {
            println!("{name:<width$}  {what}");
        }
        return ExitCode::SUCCESS;
    }
    if !flag("--bench") {
        return self_check();
    }
    let filters: Vec<&String> = args.iter().filter(|arg| !arg.starts_with('-')).collect();
    match run_selected(&filters) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every benchmark matching a filter (all without filters); true when none errored.
fn run_selected(filters: &[&String]) -> Outcome<bool> {
    let selected: Vec<_> = BENCHMARKS
        .iter()
        .filter(|(name, _, _)| {
            filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))
        })
        .collect();
    if selected.is_empty() {
        let names: Vec<&str> = BENCHMARKS.iter().map(|(name, _, _)| *name).collect();
        return Err(format!(
            "no benchmark matches {filters:?}; the benchmarks are {names:?}"
        ));
    }
    let bench = Bench {
        daemon: daemon_binary()?,
        root: bench_root()?,
    };
    let nofile = machine::raise_nofile()?;
    let machine = Machine::probe(&bench.root, &bench.daemon, nofile);
    machine.print();

    let began = Instant::now();
    let (mut errors, mut misses) = (0, 0);
    for (name, _, run) in &selected {
        let started = Instant::now();
        match run(&bench) {
            Ok(report) => {
                misses += report.misses();
                report.print(&machine);
            }
            Err(e) => {
                errors += 1;
                report::print_error(name, &e, &machine);
            }
        }
        println!("({name} took {:.1} s)", started.elapsed().as_secs_f64());
    }
    println!(
        "\n{} benchmarks in {:.0} s: {misses} targets missed, {errors} benchmarks could not run",
        selected.len(),
        began.elapsed().as_secs_f64()
    );
    if std::env::var_os("HOTRELOAD_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&bench.root);
    }
    Ok(errors == 0)
}

/// `$HOTRELOADD_BIN`, else the `hotreloadd` cargo built for this bench (cargo builds a package's
/// binaries before its benchmarks and tells us where: CARGO_BIN_EXE_<name>).
fn daemon_binary() -> Outcome<PathBuf> {
    let path = std::env::var_os("HOTRELOADD_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_hotreloadd")),
        PathBuf::from,
    );
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "daemon binary `{}` not found; build it with `cargo build --release --bins` or set \
             HOTRELOADD_BIN",
            path.display()
        ))
    }
}

/// `<$HOTRELOAD_BENCH_DIR or the temp dir>/hotreload-bench-<pid>`, created empty.
fn bench_root() -> Outcome<PathBuf> {
    let base =
        std::env::var_os("HOTRELOAD_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let root = base.join(format!("hotreload-bench-{}", std::process::id()));
    std::fs::create_dir_all(&root).map_err(|e| {
        format!(
            "failed to create bench dir `{}`: {e}; set HOTRELOAD_BENCH_DIR to a writable directory",
            root.display()
        )
    })?;
    Ok(root)
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The harness's own checks (no daemon needed): what `cargo test --bench daemon` runs, since a
/// `harness = false` target has no `#[test]` runner.
fn self_check() -> ExitCode {
    let checks: [(&str, SelfCheck); 7] = [
        ("stats", stats::self_check),
        ("report", report::self_check),
        ("procfs", procfs::self_check),
        ("plugin", plugin::self_check),
        ("probe", probe::self_check),
        ("fixture", fixture::self_check),
        ("storm", storm::self_check),
    ];
    let mut failed = 0;
    for (name, check) in checks {
        match check() {
            Ok(()) => println!("self-check {name} ... ok"),
            Err(e) => {
                failed += 1;
                println!("self-check {name} ... FAILED: {e}");
            }
        }
    }
    println!("(benchmarks run with `cargo bench --bench daemon`)");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
