//! Reload hooks: the `[hooks]` commands run when a reload starts, succeeds or fails.
//!
//! A hook is an argv array executed directly (no shell, so nothing in a plugin id, version or
//! error message is ever interpreted). This module only *starts* hooks: the daemon is
//! single-threaded and is the one reaper of every child (`waitpid(-1, WNOHANG)` on SIGCHLD), so
//! [`spawn_hook`] returns the pid in a [`HookRun`] and never waits. The daemon keeps the run,
//! arms a timer for `[hooks] timeout_ms` ([`DEFAULT_TIMEOUT_MS`]), calls [`kill_hook`] when it
//! fires first, and reports the exit with [`exit_failure`] when it reaps the pid. A hook that
//! cannot start, fails or times out is logged and evented; it never fails the reload.
//!
//! The child gets:
//! - stdin `/dev/null`, stdout `/dev/null`, stderr **inherited**: a hook's diagnostics then land
//!   in the daemon's stderr, which is the journal under systemd, while chatty stdout output
//!   cannot flood it;
//! - its own process group, so [`kill_hook`] takes down everything the hook started;
//! - default signal dispositions and an empty signal mask (ignored and blocked signals survive
//!   `execve`, and std only resets `SIGPIPE`), and no inherited descriptors beyond 0, 1 and 2
//!   (`sys::child`, the same reset plugins get);
//! - `PR_SET_PDEATHSIG(SIGKILL)`, so a hook dies with a killed daemon;
//! - the daemon's environment minus `NOTIFY_SOCKET`, `LISTEN_*` and `WATCHDOG_*` (those describe
//!   the daemon's own relation with systemd), plus `HOTRELOAD_PLUGIN_ID`,
//!   `HOTRELOAD_OLD_VERSION`, `HOTRELOAD_NEW_VERSION` and `HOTRELOAD_ERROR` (each the empty
//!   string when there is no value);
//! - the daemon's working directory.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked exits, so [`spawn_hook`] must be
//! called from the event-loop thread (the daemon has no other).

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::sys::{self, child::ChildReset};

/// `[hooks] timeout_ms` when the key is absent: a hook still running then is killed.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// Variables that describe the daemon's own relation with its service manager; a hook that saw
/// them could mark the daemon ready, ping its watchdog or take its sockets.
const DAEMON_ONLY_PREFIXES: [&str; 3] = ["NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_"];

/// The variables this module sets; inherited values of the same names are dropped.
const HOOK_VARIABLES: [&str; 4] = [
    "HOTRELOAD_PLUGIN_ID",
    "HOTRELOAD_OLD_VERSION",
    "HOTRELOAD_NEW_VERSION",
    "HOTRELOAD_ERROR",
];

/// Which reload event a hook reacts to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HookKind {
    ReloadStart,
    ReloadSuccess,
    ReloadFailure,
}

impl HookKind {
    pub const ALL: [HookKind; 3] = [
        HookKind::ReloadStart,
        HookKind::ReloadSuccess,
        HookKind::ReloadFailure,
    ];

    /// The `[hooks]` key that configures this hook.
    pub fn as_str(self) -> &'static str {
        match self {
            HookKind::ReloadStart => "on_reload_start",
            HookKind::ReloadSuccess => "on_reload_success",
            HookKind::ReloadFailure => "on_reload_failure",
        }
    }
}

impl fmt::Display for HookKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a hook is told about the reload, through its environment.
#[derive(Clone, Copy, Debug, Default)]
pub struct HookContext<'a> {
    pub plugin: &'a str,
    /// The version running before the reload; `None` on a first start.
    pub old_version: Option<&'a str>,
    /// The version being (or just) started.
    pub new_version: Option<&'a str>,
    /// Why the reload failed; `None` unless it did.
    pub error: Option<&'a str>,
}

/// A started hook, kept by the daemon until it reaps `pid`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookRun {
    /// Also the hook's process group id.
    pub pid: Pid,
    pub kind: HookKind,
    pub plugin: String,
    pub started: Instant,
}

/// A hook that could not be started.
#[derive(Debug)]
pub enum HookError {
    /// The configured argv is empty (configuration validation should have refused it).
    EmptyCommand { kind: HookKind },
    /// `fork`/`execve` failed: program not found, not executable, out of processes, ...
    Spawn {
        kind: HookKind,
        program: String,
        source: io::Error,
    },
}

impl fmt::Display for HookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookError::EmptyCommand { kind } => write!(
                f,
                "hook `{kind}` has an empty command; give at least a program in [hooks] {kind}"
            ),
            HookError::Spawn {
                kind,
                program,
                source,
            } => {
                write!(f, "cannot run hook `{kind}` program `{program}`: {source}")?;
                if matches!(
                    source.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
                ) {
                    write!(
                        f,
                        "; check that [hooks] {kind} names an executable (absolute path or in PATH)"
                    )?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for HookError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HookError::EmptyCommand { .. } => None,
            HookError::Spawn { source, .. } => Some(source),
        }
    }
}

/// Start `argv` for `kind` with `ctx` in its environment and return at once (see the module
/// docs for what the child gets). `argv[0]` is an absolute path or a name looked up in `PATH`.
/// The caller owns reaping `HookRun::pid`.
pub fn spawn_hook(
    argv: &[String],
    kind: HookKind,
    ctx: &HookContext<'_>,
) -> Result<HookRun, HookError> {
    spawn_with_environment(argv, kind, ctx, std::env::vars_os())
}

/// SIGKILL the hook's whole process group (its timeout was reached). Call it only while the run
/// is not yet reaped: until then its pid, and so its group id, cannot be reused.
pub fn kill_hook(run: &HookRun) {
    match killpg(run.pid, Signal::SIGKILL) {
        Ok(()) => {}
        // The whole group is gone already; the daemon will reap the leader shortly.
        Err(Errno::ESRCH) => {}
        Err(errno) => log::warn!(
            "cannot kill hook `{}` for plugin {} (process group {}): {errno}",
            run.kind,
            run.plugin,
            run.pid
        ),
    }
}

/// How a reaped hook ended: `None` for exit status 0, otherwise a phrase for logs and events
/// ("exited with status 3", "killed by signal SIGKILL").
pub fn exit_failure(status: WaitStatus) -> Option<String> {
    match status {
        WaitStatus::Exited(_, 0) => None,
        WaitStatus::Exited(_, code) => Some(format!("exited with status {code}")),
        WaitStatus::Signaled(_, signal, _) => Some(format!("killed by signal {signal}")),
        other => Some(format!("ended with unexpected wait status {other:?}")),
    }
}

/// [`spawn_hook`] with the inherited environment passed in, so tests need not mutate the
/// process environment (unsafe in edition 2024 and racy between test threads).
fn spawn_with_environment(
    argv: &[String],
    kind: HookKind,
    ctx: &HookContext<'_>,
    inherited: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<HookRun, HookError> {
    let (program, args) = argv.split_first().ok_or(HookError::EmptyCommand { kind })?;
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(hook_environment(inherited, ctx))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .process_group(0);
    let parent = Pid::this();
    // The reset plugins get, but in the daemon's session: `process_group(0)` already makes the
    // hook a group of its own for `kill_hook`.
    sys::child::reset_before_exec(
        &mut command,
        ChildReset {
            parent: parent.as_raw(),
            new_session: false,
            nofile_soft: 0,
            signals: crate::sys::child::non_default_signals(),
        },
    );
    let child = command.spawn().map_err(|source| HookError::Spawn {
        kind,
        program: program.clone(),
        source,
    })?;
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("a pid always fits in pid_t"));
    // Dropping a `Child` neither waits for nor kills it: the daemon's reaper collects the pid.
    drop(child);
    Ok(HookRun {
        pid,
        kind,
        plugin: ctx.plugin.to_owned(),
        started: Instant::now(),
    })
}

/// The hook's complete environment: `inherited` minus the daemon-only variables, plus the
/// `HOTRELOAD_*` variables describing `ctx`.
fn hook_environment(
    inherited: impl IntoIterator<Item = (OsString, OsString)>,
    ctx: &HookContext<'_>,
) -> Vec<(OsString, OsString)> {
    let mut environment: Vec<(OsString, OsString)> = inherited
        .into_iter()
        .filter(|(key, _)| !is_daemon_only(key) && !is_hook_variable(key))
        .collect();
    let values = [
        Some(ctx.plugin),
        ctx.old_version,
        ctx.new_version,
        ctx.error,
    ];
    for (key, value) in HOOK_VARIABLES.iter().zip(values) {
        environment.push((key.into(), env_value(value.unwrap_or(""))));
    }
    environment
}

fn is_daemon_only(key: &OsStr) -> bool {
    DAEMON_ONLY_PREFIXES
        .iter()
        .any(|prefix| key.as_bytes().starts_with(prefix.as_bytes()))
}

fn is_hook_variable(key: &OsStr) -> bool {
    HOOK_VARIABLES.iter().any(|name| key == *name)
}

/// An environment value cannot hold a NUL byte (spawn would fail); error messages come from
/// anywhere, so escape it rather than lose the hook.
fn env_value(value: &str) -> OsString {
    OsString::from(value.replace('\0', "\\0"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::TestDir;
    use nix::sys::wait::{WaitPidFlag, waitpid};
    use std::collections::BTreeMap;
    use std::fs;
    use std::path::Path;
    use std::time::Duration;

    const DEADLINE: Duration = Duration::from_secs(10);

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|word| word.to_string()).collect()
    }

    fn env_pairs(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(key, value)| (OsString::from(key), OsString::from(value)))
            .collect()
    }

    /// Reap `pid` (tests may wait; the daemon never does), failing the test after a deadline.
    fn reap(pid: Pid) -> WaitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)).unwrap() {
                WaitStatus::StillAlive => {}
                status => return status,
            }
            if Instant::now() > deadline {
                let _ = killpg(pid, Signal::SIGKILL);
                panic!("hook {pid} still running after {DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Run `/bin/sh -c script sh OUT` as a hook, reap it and return what it wrote to OUT.
    fn run_script(
        script: &str,
        ctx: &HookContext<'_>,
        inherited: Vec<(OsString, OsString)>,
    ) -> String {
        let dir = TestDir::new("hook-script");
        let out = dir.join("out");
        let argv = argv(&["/bin/sh", "-c", script, "sh", out.to_str().unwrap()]);
        let run = spawn_with_environment(&argv, HookKind::ReloadSuccess, ctx, inherited).unwrap();
        assert_eq!(exit_failure(reap(run.pid)), None);
        fs::read_to_string(&out).unwrap()
    }

    fn parse_env_dump(dump: &str) -> BTreeMap<String, String> {
        dump.split('\0')
            .filter_map(|entry| entry.split_once('='))
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn kind_names_are_the_config_keys() {
        let names: Vec<&str> = HookKind::ALL.iter().map(|kind| kind.as_str()).collect();
        assert_eq!(
            names,
            ["on_reload_start", "on_reload_success", "on_reload_failure"]
        );
    }

    #[test]
    fn hook_sees_the_reload_in_its_environment() {
        let ctx = HookContext {
            plugin: "ffmpeg_transcoder",
            old_version: Some("9f2c4e1a0b3d5c77"),
            new_version: Some("0011223344556677"),
            error: Some("exited with status 1; it's $(broken)"),
        };
        let script = r#"printf '%s|%s|%s|%s' "$HOTRELOAD_PLUGIN_ID" "$HOTRELOAD_OLD_VERSION" \
            "$HOTRELOAD_NEW_VERSION" "$HOTRELOAD_ERROR" > "$1""#;
        let written = run_script(script, &ctx, Vec::new());
        assert_eq!(
            written,
            "ffmpeg_transcoder|9f2c4e1a0b3d5c77|0011223344556677|exited with status 1; it's $(broken)"
        );
    }

    /// A blocked signal survives `execve`: a hook started while the daemon's thread blocks one
    /// must still see an empty mask, as plugins do, or a SIGTERM would never reach it. (std's
    /// `Command` empties the mask too; `sys::child` does not rely on it, since the plugin
    /// spawner's clone3 path bypasses `Command`.)
    #[test]
    fn hook_starts_with_an_empty_signal_mask() {
        use nix::sys::signal::{SigSet, SigmaskHow, pthread_sigmask};
        // A thread of its own: the mask it blocks dies with it, whatever the assertions do.
        let mask = std::thread::spawn(|| {
            let mut blocked = SigSet::empty();
            blocked.add(Signal::SIGUSR2);
            blocked.add(Signal::SIGTERM);
            pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&blocked), None).unwrap();
            let ctx = HookContext {
                plugin: "p",
                ..HookContext::default()
            };
            run_script(
                "grep '^SigBlk:' /proc/self/status > \"$1\"",
                &ctx,
                Vec::new(),
            )
        })
        .join()
        .unwrap();
        assert_eq!(mask.trim(), "SigBlk:\t0000000000000000", "{mask}");
    }

    #[test]
    fn absent_values_are_empty_strings() {
        let ctx = HookContext {
            plugin: "p",
            ..HookContext::default()
        };
        let dump = run_script("env -0 > \"$1\"", &ctx, Vec::new());
        let env = parse_env_dump(&dump);
        assert_eq!(env["HOTRELOAD_PLUGIN_ID"], "p");
        assert_eq!(env["HOTRELOAD_OLD_VERSION"], "");
        assert_eq!(env["HOTRELOAD_NEW_VERSION"], "");
        assert_eq!(env["HOTRELOAD_ERROR"], "");
    }

    #[test]
    fn daemon_only_variables_are_not_passed_on() {
        let inherited = env_pairs(&[
            ("PATH", "/usr/bin:/bin"),
            ("KEEP_ME", "yes"),
            ("NOTIFY_SOCKET", "/run/systemd/notify"),
            ("LISTEN_FDS", "1"),
            ("LISTEN_PID", "1"),
            ("LISTEN_FDNAMES", "control"),
            ("WATCHDOG_USEC", "30000000"),
            ("WATCHDOG_PID", "1"),
            ("HOTRELOAD_PLUGIN_ID", "stale"),
        ]);
        let ctx = HookContext {
            plugin: "fresh",
            ..HookContext::default()
        };
        let env = parse_env_dump(&run_script("env -0 > \"$1\"", &ctx, inherited));
        assert_eq!(env.get("KEEP_ME").map(String::as_str), Some("yes"));
        assert_eq!(env["HOTRELOAD_PLUGIN_ID"], "fresh");
        let leaked: Vec<&String> = env
            .keys()
            .filter(|key| {
                key.starts_with("NOTIFY_SOCKET")
                    || key.starts_with("LISTEN_")
                    || key.starts_with("WATCHDOG_")
            })
            .collect();
        assert!(leaked.is_empty(), "leaked into the hook: {leaked:?}");
    }

    #[test]
    fn environment_has_each_hook_variable_once() {
        let ctx = HookContext {
            plugin: "p",
            error: Some("nul\0inside"),
            ..HookContext::default()
        };
        let env = hook_environment(env_pairs(&[("HOTRELOAD_ERROR", "old")]), &ctx);
        let errors: Vec<&OsString> = env
            .iter()
            .filter(|(key, _)| key == "HOTRELOAD_ERROR")
            .map(|(_, value)| value)
            .collect();
        assert_eq!(errors, [&OsString::from("nul\\0inside")]);
    }

    /// The hook's descriptors, as `fd -> target`, read while it runs.
    /// The descriptors of `pid` once it runs `program`: before its exec the forked child still
    /// shows what it is about to close.
    fn open_fds_once_running(pid: Pid, program: &str) -> BTreeMap<String, String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            != program
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{pid} never ran {program}"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let target = fs::read_link(entry.path()).ok()?;
                Some((
                    entry.file_name().to_string_lossy().into_owned(),
                    target.to_string_lossy().into_owned(),
                ))
            })
            .collect()
    }

    #[test]
    fn stdin_and_stdout_are_dev_null_and_nothing_else_is_inherited() {
        // A descriptor the daemon holds without close-on-exec must not reach the hook.
        let leaky = fs::File::open("/dev/zero").unwrap();
        let flags = nix::fcntl::fcntl(&leaky, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        let cleared =
            nix::fcntl::FdFlag::from_bits_truncate(flags) - nix::fcntl::FdFlag::FD_CLOEXEC;
        nix::fcntl::fcntl(&leaky, nix::fcntl::FcntlArg::F_SETFD(cleared)).unwrap();

        let run = spawn_hook(
            &argv(&["sleep", "1000"]),
            HookKind::ReloadStart,
            &HookContext::default(),
        )
        .unwrap();
        // `sleep` itself briefly opens files as it starts (the locale archive): look until only
        // what it inherited is left. A leaked descriptor never goes away, so this still fails.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut fds = open_fds_once_running(run.pid, "sleep");
        while fds.len() > 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
            fds = open_fds_once_running(run.pid, "sleep");
        }
        kill_hook(&run);
        reap(run.pid);
        drop(leaky);

        let names: Vec<&str> = fds.keys().map(String::as_str).collect();
        assert_eq!(names, ["0", "1", "2"], "{fds:?}");
        assert_eq!(fds["0"], "/dev/null");
        assert_eq!(fds["1"], "/dev/null");
    }

    #[test]
    fn missing_program_is_an_error_naming_it() {
        let missing = "/nonexistent/hotreload-hook";
        let error = spawn_hook(
            &argv(&[missing, "start"]),
            HookKind::ReloadStart,
            &HookContext::default(),
        )
        .unwrap_err();
        let message = error.to_string();
        assert!(message.contains(missing), "{message}");
        assert!(message.contains("on_reload_start"), "{message}");
        assert!(matches!(error, HookError::Spawn { ref source, .. }
            if source.kind() == io::ErrorKind::NotFound));
    }

    #[test]
    fn empty_command_is_an_error() {
        let error = spawn_hook(&[], HookKind::ReloadFailure, &HookContext::default()).unwrap_err();
        assert!(matches!(error, HookError::EmptyCommand { .. }));
        assert!(error.to_string().contains("on_reload_failure"));
    }

    #[test]
    fn program_is_looked_up_in_path() {
        let run = spawn_hook(
            &argv(&["true"]),
            HookKind::ReloadStart,
            &HookContext::default(),
        )
        .unwrap();
        assert_eq!(exit_failure(reap(run.pid)), None);
    }

    #[test]
    fn failing_hook_is_reported() {
        let run = spawn_hook(
            &argv(&["/bin/sh", "-c", "exit 3"]),
            HookKind::ReloadFailure,
            &HookContext::default(),
        )
        .unwrap();
        assert_eq!(
            exit_failure(reap(run.pid)).as_deref(),
            Some("exited with status 3")
        );
    }

    #[test]
    fn kill_hook_kills_a_running_hook() {
        let run = spawn_hook(
            &argv(&["sleep", "1000"]),
            HookKind::ReloadStart,
            &HookContext {
                plugin: "p",
                ..HookContext::default()
            },
        )
        .unwrap();
        assert_eq!(run.plugin, "p");
        assert_eq!(nix::unistd::getpgid(Some(run.pid)).unwrap(), run.pid);
        kill_hook(&run);
        let status = reap(run.pid);
        assert!(
            matches!(status, WaitStatus::Signaled(_, Signal::SIGKILL, _)),
            "{status:?}"
        );
        assert_eq!(
            exit_failure(status).as_deref(),
            Some("killed by signal SIGKILL")
        );
    }

    /// Whether `pid` is gone or a zombie (an orphan is reaped by init, possibly not at once).
    fn is_dead(pid: Pid) -> bool {
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            // The state follows the parenthesised command name.
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        }
    }

    fn wait_for_file(path: &Path) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match fs::read_to_string(path) {
                Ok(text) if text.ends_with('\n') => return text,
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "{} never written",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn kill_hook_kills_the_whole_process_group() {
        let dir = TestDir::new("hook-tree");
        let out = dir.join("grandchild");
        let script = r#"sleep 1000 & echo $! > "$1.tmp"; mv "$1.tmp" "$1"; wait"#;
        let run = spawn_hook(
            &argv(&["/bin/sh", "-c", script, "sh", out.to_str().unwrap()]),
            HookKind::ReloadStart,
            &HookContext::default(),
        )
        .unwrap();
        let grandchild = Pid::from_raw(wait_for_file(&out).trim().parse().unwrap());
        assert!(!is_dead(grandchild));

        kill_hook(&run);
        reap(run.pid);

        let deadline = Instant::now() + DEADLINE;
        while !is_dead(grandchild) {
            assert!(
                Instant::now() < deadline,
                "grandchild {grandchild} survived"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn kill_hook_after_exit_is_harmless() {
        let run = spawn_hook(
            &argv(&["true"]),
            HookKind::ReloadStart,
            &HookContext::default(),
        )
        .unwrap();
        // Exited but not reaped: the group may already be empty.
        let deadline = Instant::now() + DEADLINE;
        while !is_dead(run.pid) {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        kill_hook(&run);
        assert_eq!(exit_failure(reap(run.pid)), None);
    }
}
