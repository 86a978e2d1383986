//! What the benchmarks read about a process from `/proc`: context switches (wake-ups), memory,
//! CPU time, open fds and the executable a pid runs.
//!
//! These are read from outside the daemon, so measuring never wakes it: a `status` request would
//! itself be a wake-up and spoil the idle figure.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use nix::unistd::{SysconfVar, sysconf};

use crate::Outcome;

fn read_proc(path: &str) -> Outcome<String> {
    fs::read_to_string(path).map_err(|e| format!("failed to read `{path}`: {e}"))
}

/// The number in a `Key:   123 kB` line of a `/proc/.../status` file.
fn status_field(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|line| {
        line.strip_prefix(key)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    line[key.len() + 1..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Voluntary plus involuntary context switches summed over every thread of `pid`: each one is a
/// time the process was scheduled out, so an idle process that never wakes keeps this constant.
pub fn context_switches(pid: i32) -> Outcome<u64> {
    let dir = format!("/proc/{pid}/task");
    let tasks = fs::read_dir(&dir).map_err(|e| format!("failed to list `{dir}`: {e}"))?;
    let mut total = 0;
    for task in tasks {
        let task = task.map_err(|e| format!("failed to list `{dir}`: {e}"))?;
        let path = task.path().join("status");
        let status = read_proc(&path.to_string_lossy())?;
        for key in ["voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"] {
            total += status_field(&status, key)
                .ok_or_else(|| format!("no `{key}` in `{}`", path.display()))?;
        }
    }
    Ok(total)
}

/// Resident memory now (`VmRSS`) and at its peak (`VmHWM`), in KiB.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

pub fn memory(pid: i32) -> Outcome<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = read_proc(&path)?;
    let field = |key| status_field(&status, key).ok_or_else(|| format!("no `{key}` in `{path}`"));
    Ok(Memory {
        rss_kib: field("VmRSS")?,
        hwm_kib: field("VmHWM")?,
    })
}

/// User plus system CPU time of `pid` (fields 14 and 15 of `/proc/<pid>/stat`), in clock-tick
/// resolution (usually 10 ms).
pub fn cpu_time(pid: i32) -> Outcome<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = read_proc(&path)?;
    // The command name (field 2) is in parentheses and may contain spaces; fields after it are
    // plain. After the last ')' the first field is field 3, so utime/stime are at index 11/12.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| format!("no command name in `{path}`"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let tick = |index: usize| -> Outcome<u64> {
        let text = fields
            .get(index)
            .ok_or_else(|| format!("`{path}` has only {} fields", fields.len() + 2))?;
        text.parse()
            .map_err(|e| format!("bad tick count {text:?} in `{path}`: {e}"))
    };
    let ticks = tick(11)? + tick(12)?;
    let per_second = match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(hz)) if hz > 0 => hz as u64,
        _ => return Err("sysconf(_SC_CLK_TCK) gave no clock tick rate".into()),
    };
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / per_second))
}

/// Number of open file descriptors of `pid`.
pub fn open_fds(pid: i32) -> Outcome<usize> {
    let dir = format!("/proc/{pid}/fd");
    let entries = fs::read_dir(&dir).map_err(|e| format!("failed to list `{dir}`: {e}"))?;
    Ok(entries.count())
}

/// The file `pid` executes, as the kernel resolved it at exec time.
pub fn exe(pid: i64) -> Outcome<PathBuf> {
    let link = format!("/proc/{pid}/exe");
    fs::read_link(&link).map_err(|e| format!("failed to read link `{link}`: {e}"))
}

/// Checks of the `/proc` parsers against this very process; run by `cargo test --bench daemon`.
pub fn self_check() -> Result<(), String> {
    let sample = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nvoluntary_ctxt_switches:\t7\n";
    let got = (
        status_field(sample, "VmRSS"),
        status_field(sample, "VmHWM"),
        status_field(sample, "voluntary_ctxt_switches"),
        status_field(sample, "ctxt_switches"),
    );
    if got != (Some(1024), Some(2048), Some(7), None) {
        return Err(format!("status_field parsed {got:?}"));
    }
    let me = std::process::id() as i32;
    let memory = memory(me)?;
    if memory.rss_kib == 0 || memory.hwm_kib < memory.rss_kib {
        return Err(format!("implausible memory of this process: {memory:?}"));
    }
    context_switches(me)?;
    cpu_time(me)?;
    if open_fds(me)? < 3 {
        return Err("this process should have at least stdin, stdout and stderr open".into());
    }
    exe(i64::from(me))?;
    Ok(())
}
