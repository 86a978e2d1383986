//! The peer tools the `peers` benchmark compares `hotreloadd` with, found or installed by the
//! harness itself: `entr` from Debian's packages (`apt-get install -y entr`, as root) and
//! `watchexec` from crates.io (`cargo install watchexec-cli --locked`, into a cache dir under the
//! target dir, reused by later runs).
//!
//! An install that fails is not an error of the run: the caller gets the reason and reports that
//! peer as "not measured", so a machine without network or root still gets hotreloadd's figures.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A peer tool ready to run, or why it is not.
pub type Found = Result<Tool, String>;

#[derive(Debug, Clone)]
pub struct Tool {
    pub path: PathBuf,
    /// What `--version` (or the usage text) says, for the report.
    pub version: String,
}

/// `entr` on PATH, else installed with apt-get.
pub fn entr() -> Found {
    if let Some(path) = on_path("entr") {
        return Ok(describe_entr(path));
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "entr is not installed and the bench is not root, so it cannot run \
                    `apt-get install -y entr`; install it and run again"
                .into(),
        );
    }
    let log = tools_dir().join("apt-entr.log");
    let installed = run_logged(
        Command::new("apt-get").args(["install", "-y", "entr"]),
        &log,
    );
    if installed.is_err() {
        // A fresh machine may have no package lists yet.
        run_logged(Command::new("apt-get").arg("update"), &log)?;
        run_logged(
            Command::new("apt-get").args(["install", "-y", "entr"]),
            &log,
        )?;
    }
    on_path("entr")
        .map(describe_entr)
        .ok_or_else(|| "`apt-get install -y entr` succeeded but no entr is on PATH".into())
}

/// `watchexec` from the bench's tool cache, else PATH, else `cargo install`ed into the cache
/// (several minutes on 2 cores; only the first run pays it).
pub fn watchexec() -> Found {
    let cache = tools_dir();
    let cached = cache.join("bin").join("watchexec");
    if let Some(path) = [Some(cached.clone()), on_path("watchexec")]
        .into_iter()
        .flatten()
        .find(|path| path.is_file())
    {
        return describe_watchexec(path);
    }
    let cargo = std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from);
    println!(
        "installing watchexec-cli with `cargo install --locked --root {}` (several minutes, once)",
        cache.display()
    );
    let mut install = Command::new(cargo);
    install
        .args(["install", "watchexec-cli", "--locked", "--root"])
        .arg(&cache);
    run_logged(&mut install, &cache.join("cargo-install-watchexec.log"))?;
    describe_watchexec(cached)
}

/// `<target dir>/bench-tools`, or `$HOTRELOAD_BENCH_TOOLS`. The target dir is the one holding the
/// `hotreloadd` cargo built for this bench (`<target>/release/hotreloadd`).
pub fn tools_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HOTRELOAD_BENCH_TOOLS") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_BIN_EXE_hotreloadd"))
        .parent()
        .and_then(Path::parent)
        .map_or_else(
            || std::env::temp_dir().join("hotreload-bench-tools"),
            |target| target.join("bench-tools"),
        )
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// entr has no `--version`; its usage text (stderr, exit 1) starts with `release: X.Y`.
fn describe_entr(path: PathBuf) -> Tool {
    let usage = Command::new(&path)
        .stdin(Stdio::null())
        .output()
        .map(|out| String::from_utf8_lossy(&out.stderr).into_owned())
        .unwrap_or_default();
    let version = usage
        .lines()
        .find_map(|line| line.strip_prefix("release: "))
        .map_or_else(|| "entr (version unknown)".into(), |v| format!("entr {v}"));
    Tool { path, version }
}

fn describe_watchexec(path: PathBuf) -> Found {
    let out = Command::new(&path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("failed to run `{} --version`: {e}", path.display()))?;
    if !out.status.success() {
        return Err(format!(
            "`{} --version` failed ({}); reinstall it by deleting it",
            path.display(),
            out.status
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.lines().next().unwrap_or("watchexec").trim().to_owned();
    Ok(Tool { path, version })
}

/// Runs `command` with its output in `log`; an error quotes the end of the log.
fn run_logged(command: &mut Command, log: &Path) -> Result<(), String> {
    if let Some(dir) = log.parent() {
        fs::create_dir_all(dir)
            .map_err(|e| format!("failed to create `{}`: {e}", dir.display()))?;
    }
    let out =
        File::create(log).map_err(|e| format!("failed to create `{}`: {e}", log.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("failed to clone the handle of `{}`: {e}", log.display()))?;
    let shown = format!("{command:?}");
    let status = command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .map_err(|e| format!("failed to run {shown}: {e}"))?;
    if status.success() {
        return Ok(());
    }
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(5)..].join("\n  ");
    Err(format!(
        "{shown} failed ({status}); `{}` ends with:\n  {tail}",
        log.display()
    ))
}
