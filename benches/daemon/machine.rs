//! The machine a run happened on, and the process limits the benchmarks need.
//!
//! Every figure is printed with the date, kernel, CPU, core count and the file system of the
//! bench directory, because reload latency depends on them (fsync of state files costs far more on
//! ext4 than on tmpfs), and a figure without its machine cannot be compared with anything.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::statfs::{self, statfs};
use serde_json::{Value, json};

use crate::Outcome;

/// Facts printed in every report header and JSON line.
#[derive(Debug, Clone)]
pub struct Machine {
    pub date: String,
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub bench_dir: PathBuf,
    pub bench_fs: String,
    pub daemon: PathBuf,
    pub nofile: u64,
    pub inotify: String,
}

impl Machine {
    pub fn probe(bench_dir: &Path, daemon: &Path, nofile: u64) -> Machine {
        Machine {
            date: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            kernel: first_line("/proc/sys/kernel/osrelease"),
            cpu: cpu_model(),
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            bench_dir: bench_dir.to_path_buf(),
            bench_fs: fs_type(bench_dir),
            daemon: daemon.to_path_buf(),
            nofile,
            inotify: inotify_limits(),
        }
    }

    pub fn print(&self) {
        println!("hotreloadd benchmarks, {}", self.date);
        println!(
            "machine: {} x {}, linux {}",
            self.cpus, self.cpu, self.kernel
        );
        println!(
            "bench dir: {} ({})",
            self.bench_dir.display(),
            self.bench_fs
        );
        println!("daemon: {}", self.daemon.display());
        println!(
            "limits: RLIMIT_NOFILE {} (inherited by the daemon); {}",
            self.nofile, self.inotify
        );
    }

    pub fn to_json(&self) -> Value {
        json!({
            "kernel": self.kernel,
            "cpu": self.cpu,
            "cpus": self.cpus,
            "bench_fs": self.bench_fs,
            "nofile": self.nofile,
        })
    }
}

fn first_line(path: &str) -> String {
    fs::read_to_string(path)
        .ok()
        .and_then(|text| text.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

fn cpu_model() -> String {
    let info = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map_or_else(|| "unknown cpu".into(), |(_, name)| name.trim().to_owned())
}

/// A readable name for the file system holding `dir` (the ones a bench dir is likely to be on).
pub fn fs_type(dir: &Path) -> String {
    let Ok(stat) = statfs(dir) else {
        return "unknown fs".into();
    };
    let kind = stat.filesystem_type();
    let known = [
        (statfs::TMPFS_MAGIC, "tmpfs"),
        (statfs::EXT4_SUPER_MAGIC, "ext4"),
        (statfs::XFS_SUPER_MAGIC, "xfs"),
        (statfs::BTRFS_SUPER_MAGIC, "btrfs"),
        (statfs::OVERLAYFS_SUPER_MAGIC, "overlayfs"),
    ];
    known
        .iter()
        .find(|(magic, _)| *magic == kind)
        .map_or_else(|| format!("{kind:?}"), |(_, name)| (*name).into())
}

fn inotify_limits() -> String {
    let read = |name: &str| first_line(&format!("/proc/sys/fs/inotify/{name}"));
    format!(
        "fs.inotify max_user_watches={} max_user_instances={} max_queued_events={}",
        read("max_user_watches"),
        read("max_user_instances"),
        read("max_queued_events")
    )
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns it. The daemon inherits it: with
/// 1000 plugins it holds two pipe ends per plugin, and the control benchmark holds 1100 clients
/// on each side of the socket.
pub fn raise_nofile() -> Outcome<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|e| format!("getrlimit(RLIMIT_NOFILE) failed: {e}"))?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(|e| {
            format!(
                "failed to raise RLIMIT_NOFILE from {soft} to {hard}: {e}; try `ulimit -n {hard}`"
            )
        })?;
    }
    Ok(hard)
}
