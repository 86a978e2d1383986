//! Processes as the kernel shows them (`/proc` probes: liveness, children, process groups,
//! environments), signals, programs on `$PATH`, and the commands a test runs to completion
//! (`Output`) or follows line by line (`Follow`).

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The fields of `/proc/<pid>/stat` after the command name: state, ppid, pgrp, ...
pub fn proc_stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// True if `pid` exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    proc_stat_fields(pid).is_some_and(|f| f.first().is_some_and(|s| s != "Z" && s != "X"))
}

pub fn all_pids() -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Live processes whose environment contains `marker` (e.g. `HOTRELOAD_PLUGIN_DIR=<dir>/`).
pub fn processes_with_env(marker: &str) -> Vec<i32> {
    let needle = marker.as_bytes();
    let has_marker = |pid: i32| {
        fs::read(format!("/proc/{pid}/environ"))
            .is_ok_and(|env| env.windows(needle.len()).any(|w| w == needle))
    };
    all_pids()
        .into_iter()
        .filter(|&pid| has_marker(pid) && pid_alive(pid))
        .collect()
}

/// Live direct children of process `ppid`.
pub fn children_of(ppid: i32) -> Vec<i32> {
    let is_child = |pid: i32| {
        proc_stat_fields(pid).is_some_and(|f| f.get(1).is_some_and(|p| *p == ppid.to_string()))
    };
    all_pids()
        .into_iter()
        .filter(|&pid| is_child(pid) && pid_alive(pid))
        .collect()
}

/// Live members of process group `pgid`.
pub fn process_group_members(pgid: i32) -> Vec<i32> {
    let in_group = |pid: i32| {
        proc_stat_fields(pid).is_some_and(|f| f.get(2).is_some_and(|g| *g == pgid.to_string()))
    };
    all_pids()
        .into_iter()
        .filter(|&pid| in_group(pid) && pid_alive(pid))
        .collect()
}

pub fn send_signal(pid: i32, signal: Signal) {
    kill(Pid::from_raw(pid), signal).unwrap();
}

/// Finds `program` on `$PATH`.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The real path of `python3` (a pyenv shim would add a shell and a fork to every start), for
/// the tests whose plugins are Python scripts.
pub fn python() -> &'static str {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output();
        let real = out
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|p| !p.is_empty());
        match real.or_else(|| find_program("python3").map(|p| p.display().to_string())) {
            Some(path) => path,
            None => panic!("these tests need python3 on PATH (CI machines have it)"),
        }
    })
}

/// A finished command's exit status and output.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// stdout and stderr together, for "the message names X" checks.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// A running command whose stdout lines are read as they come (`hotreloadctl events`).
pub struct Follow {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Follow {
    pub(super) fn spawn(mut cmd: Command) -> Follow {
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().expect("stdout was piped");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Follow {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads lines until one matches `pred`; fails after `timeout`.
    #[track_caller]
    pub fn wait_line(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(line) = self.lines.recv_timeout(left) else {
                break;
            };
            self.seen.push(line.clone());
            if pred(&line) {
                return line;
            }
        }
        let status = self.child.try_wait().ok().flatten();
        panic!(
            "timed out after {timeout:?} waiting for {what}; exit {status:?}; lines {:?}",
            self.seen
        )
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
