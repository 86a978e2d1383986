//! The shape of `hotreload.toml` (SPEC §3): serde types carrying the built-in defaults.
//!
//! Every table denies unknown keys, so a typo is an error instead of a silently ignored setting.
//! Location keys (`plugins_dir`, `runtime_dir`, `state_dir`, `control.socket`) are `Option`s
//! because the environment sits between the file and the built-in default for some of them
//! (SPEC §2); everything else is filled with its default by serde, so a parsed file is already
//! "defaults < file".

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The whole file as written, with defaults filled in for every key that has one.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct FileConfig {
    /// Directory holding one subdirectory per plugin.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugins_dir: Option<PathBuf>,
    /// Socket and snapshots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime_dir: Option<PathBuf>,
    /// Plugin state files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub hot_reload: HotReload,
    #[serde(default)]
    pub supervisor: SupervisorSettings,
    #[serde(default)]
    pub control: ControlFile,
    /// `[plugins.<id>]` tables, keyed by plugin id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub plugins: BTreeMap<String, PluginConfig>,
    #[serde(default)]
    pub hooks: HookSettings,
}

/// `[hot_reload]`: when and what to reload.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub struct HotReload {
    /// Watch and reload automatically (runtime toggle: `enable`/`disable`).
    pub enabled: bool,
    /// Quiet time after the last change before a reload; 0 = next loop turn.
    pub debounce_delay_ms: u64,
    /// Globs on plugin directory names.
    pub watch_patterns: Vec<String>,
    /// Globs on file names inside a plugin directory; a matching file never triggers a reload.
    pub exclude_patterns: Vec<String>,
    /// Carry state.json/runtime.json across restarts.
    pub preserve_state: bool,
    /// Attempts after a failed reload / failed start before giving up.
    pub max_retries: u32,
    /// First retry delay; doubles each further attempt (capped at 60 s by the supervisor).
    pub retry_delay_ms: u64,
    /// How directories are watched: inotify, polling, or inotify with a per-directory fallback.
    pub watch_mode: WatchMode,
    /// How often a polled directory is compared (`poll`, or `auto`'s fallback).
    pub poll_interval_ms: u64,
    /// Files in subdirectories of a plugin dir count too (depth ≤ 8).
    pub watch_subdirs: bool,
}

impl Default for HotReload {
    fn default() -> HotReload {
        HotReload {
            enabled: true,
            debounce_delay_ms: 500,
            watch_patterns: vec!["*".to_owned()],
            exclude_patterns: [
                "*.tmp",
                "*.log",
                "*.pid",
                ".git*",
                "*.swp",
                "*.swo",
                "go.mod",
                "go.sum",
                "*.go",
                "plugin.cue",
                "*.json",
            ]
            .map(str::to_owned)
            .to_vec(),
            preserve_state: true,
            max_retries: 3,
            retry_delay_ms: 1000,
            watch_mode: WatchMode::Auto,
            poll_interval_ms: 1000,
            watch_subdirs: false,
        }
    }
}

/// `[supervisor]`: how plugins are started and stopped (each key may be overridden per plugin).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub struct SupervisorSettings {
    /// `stop_signal`, then this long, then SIGKILL to the whole process group.
    pub stop_timeout_ms: u64,
    /// `ready = "exec"`: the process must stay alive this long to count as started.
    pub startup_grace_ms: u64,
    /// `ready = "notify"`: READY=1 must arrive within this.
    pub ready_timeout_ms: u64,
    /// What to do after an exit the daemon did not ask for.
    pub restart: RestartPolicy,
    /// More than this many automatic restarts inside `start_limit_interval_ms`: `failed`.
    pub start_limit_burst: u32,
    /// The start limit's window; 0 = no limit (restarts still back off).
    pub start_limit_interval_ms: u64,
    /// The signal that asks a plugin to stop (SIGKILL follows after `stop_timeout_ms`).
    pub stop_signal: StopSignal,
}

impl Default for SupervisorSettings {
    fn default() -> SupervisorSettings {
        SupervisorSettings {
            stop_timeout_ms: 5000,
            startup_grace_ms: 500,
            ready_timeout_ms: 10_000,
            restart: RestartPolicy::OnFailure,
            start_limit_burst: DEFAULT_START_LIMIT_BURST,
            start_limit_interval_ms: DEFAULT_START_LIMIT_INTERVAL_MS,
            stop_signal: StopSignal::default(),
        }
    }
}

/// `[control]` as written; `mode` is still the octal string and `group = ""` means "no group".
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub struct ControlFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// Socket file mode as an octal string, e.g. "0660".
    pub mode: String,
    /// Socket file group; empty = leave the group alone.
    pub group: String,
    pub max_clients: usize,
    pub max_line_bytes: usize,
}

impl Default for ControlFile {
    fn default() -> ControlFile {
        ControlFile {
            socket: None,
            mode: "0660".to_owned(),
            group: "hotreload".to_owned(),
            max_clients: 256,
            max_line_bytes: 65_536,
        }
    }
}

/// One `[plugins.<id>]` table. Every key is optional; absent keys fall back to `[supervisor]`
/// and the built-in defaults (see `Config::plugin`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct PluginConfig {
    /// Executable path relative to the plugin dir; default: the id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exec: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Free-form; becomes `PluginState.configuration` (as JSON).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<toml::Table>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<ReadyMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autostart: Option<bool>,
    /// `false`: supervised, but a change of its files never reloads it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hot_reload: Option<bool>,
    /// `tcp:HOST:PORT` / `unix:/path` specs bound once by the daemon and passed as `LISTEN_FDS`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sockets: Option<Vec<String>>,
    /// > 0: the plugin must send `WATCHDOG=1` at least this often; 0 = off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watchdog_ms: Option<u64>,
    /// How many fds the plugin may park with `FDSTORE=1` across reloads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fdstore_max: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startup_grace_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartPolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_limit_burst: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_limit_interval_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<StopSignal>,
    /// Run as this user (name or numeric uid), with its primary and supplementary groups;
    /// only a daemon running as root may (see `config::accounts`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Run with this group (name or numeric gid) instead of the user's primary group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// `start_limit_burst` when neither `[supervisor]` nor the plugin's table sets it.
pub const DEFAULT_START_LIMIT_BURST: u32 = 5;
/// `start_limit_interval_ms` when neither `[supervisor]` nor the plugin's table sets it.
pub const DEFAULT_START_LIMIT_INTERVAL_MS: u64 = 10_000;

/// `fdstore_max` when a plugin table does not set it.
pub const DEFAULT_FDSTORE_MAX: usize = 16;

/// `[hooks]`: commands run on reload events, each an argv array (`argv[0]` absolute or a bare
/// name looked up in `PATH`, no shell). An absent command means no hook for that event.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub struct HookSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_reload_start: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_reload_success: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_reload_failure: Option<Vec<String>>,
    /// A hook still running this long after its start is killed.
    pub timeout_ms: u64,
}

impl Default for HookSettings {
    fn default() -> HookSettings {
        HookSettings {
            on_reload_start: None,
            on_reload_success: None,
            on_reload_failure: None,
            timeout_ms: 10_000,
        }
    }
}

/// A closed set of string values: one table of names drives parsing, printing and the
/// "valid values" list in error messages, so the three cannot disagree.
trait Choice: Copy + PartialEq + 'static {
    const CHOICES: &'static [(&'static str, Self)];

    fn name(self) -> &'static str {
        Self::CHOICES
            .iter()
            .find(|(_, value)| *value == self)
            .map(|(name, _)| *name)
            .expect("every variant is listed in CHOICES")
    }

    fn from_name(name: &str) -> Result<Self, String> {
        Self::CHOICES
            .iter()
            .find(|(candidate, _)| *candidate == name)
            .map(|(_, value)| *value)
            .ok_or_else(|| {
                let valid: Vec<&str> = Self::CHOICES.iter().map(|(name, _)| *name).collect();
                format!("{name:?}; valid values: {}", valid.join(", "))
            })
    }
}

/// Declares the string conversions serde uses for a [`Choice`] enum.
macro_rules! choice_conversions {
    ($ty:ty) => {
        impl TryFrom<String> for $ty {
            type Error = String;
            fn try_from(name: String) -> Result<Self, String> {
                <$ty as Choice>::from_name(&name)
            }
        }
        impl From<$ty> for &'static str {
            fn from(value: $ty) -> &'static str {
                value.name()
            }
        }
        impl $ty {
            /// The name as written in `hotreload.toml`.
            pub fn as_str(self) -> &'static str {
                self.name()
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

/// `watch_mode`: how a directory is watched (SPEC §5 "Watching beyond inotify").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum WatchMode {
    /// inotify, and polling per directory where inotify cannot serve (watch limit, remote fs).
    #[default]
    Auto,
    /// inotify only; a directory it cannot watch is an error, as before polling existed.
    Inotify,
    /// Polling only; no inotify instance at all.
    Poll,
}

impl Choice for WatchMode {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("auto", Self::Auto),
        ("inotify", Self::Inotify),
        ("poll", Self::Poll),
    ];
}
choice_conversions!(WatchMode);

/// `restart`: what happens after an exit the daemon did not ask for (SPEC §5 "Crashes").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum RestartPolicy {
    /// After a non-zero exit code or a signal.
    #[default]
    OnFailure,
    /// After any exit.
    Always,
    /// Never.
    Never,
}

impl Choice for RestartPolicy {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("on-failure", Self::OnFailure),
        ("always", Self::Always),
        ("never", Self::Never),
    ];
}
choice_conversions!(RestartPolicy);

/// `ready`: when a started instance counts as up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum ReadyMode {
    /// Alive for `startup_grace_ms` after exec.
    #[default]
    Exec,
    /// Sent READY=1 within `ready_timeout_ms`.
    Notify,
}

impl Choice for ReadyMode {
    const CHOICES: &'static [(&'static str, Self)] =
        &[("exec", Self::Exec), ("notify", Self::Notify)];
}
choice_conversions!(ReadyMode);

/// `strategy`: the order of stopping the old and starting the new instance on a reload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum Strategy {
    /// Stop the old instance, then start the new one.
    #[default]
    StopStart,
    /// Start and verify the new instance, then stop the old one.
    StartStop,
}

impl Choice for Strategy {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("stop-start", Self::StopStart),
        ("start-stop", Self::StartStop),
    ];
}
choice_conversions!(Strategy);

/// `stop_signal`: the signal that asks a plugin to stop, before SIGKILL after `stop_timeout_ms`
/// (supervisord's `stopsignal`, systemd's `KillSignal=`).
///
/// A closed set of signals a program may catch to shut down. Written `"SIGINT"` or `"INT"`,
/// shown as `"SIGINT"`. SIGKILL is refused: it cannot be caught, so the grace of
/// `stop_timeout_ms` would mean nothing (and SIGKILL comes after it anyway); so are SIGSTOP
/// (it would freeze the plugin until the kill), SIGCONT (sent with every stop signal anyway)
/// and the signals of faults and job control, which no program reads as "please stop".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum StopSignal {
    #[default]
    Term,
    Int,
    Quit,
    Hup,
    Usr1,
    Usr2,
    Winch,
}

impl StopSignal {
    /// Every accepted signal, its name as shown, and its number.
    const ALL: [(StopSignal, &'static str, libc::c_int); 7] = [
        (StopSignal::Term, "SIGTERM", libc::SIGTERM),
        (StopSignal::Int, "SIGINT", libc::SIGINT),
        (StopSignal::Quit, "SIGQUIT", libc::SIGQUIT),
        (StopSignal::Hup, "SIGHUP", libc::SIGHUP),
        (StopSignal::Usr1, "SIGUSR1", libc::SIGUSR1),
        (StopSignal::Usr2, "SIGUSR2", libc::SIGUSR2),
        (StopSignal::Winch, "SIGWINCH", libc::SIGWINCH),
    ];

    /// The signal number to send.
    pub fn number(self) -> libc::c_int {
        Self::ALL
            .iter()
            .find(|(signal, ..)| *signal == self)
            .map_or(libc::SIGTERM, |(_, _, number)| *number)
    }

    /// The name as shown: "SIGTERM".
    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(signal, ..)| *signal == self)
            .map_or("SIGTERM", |(_, name, _)| name)
    }

    /// Parses "SIGINT" or "INT"; the error says what is wrong and lists the valid names.
    pub fn from_name(written: &str) -> Result<StopSignal, String> {
        let full = if written.starts_with("SIG") {
            written.to_owned()
        } else {
            format!("SIG{written}")
        };
        if let Some((signal, ..)) = Self::ALL.iter().find(|(_, name, _)| *name == full) {
            return Ok(*signal);
        }
        let valid: Vec<&str> = Self::ALL.iter().map(|(_, name, _)| *name).collect();
        let why = match full.as_str() {
            "SIGKILL" => {
                "SIGKILL cannot be caught, so stop_timeout_ms would give the plugin no time to \
                 stop; SIGKILL follows the stop signal after stop_timeout_ms anyway (set \
                 stop_timeout_ms = 1 for a near-immediate kill); "
            }
            "SIGSTOP" => "SIGSTOP would freeze the plugin until SIGKILL; ",
            _ => "",
        };
        Err(format!(
            "{written:?}; {why}valid values (with or without the SIG prefix): {}",
            valid.join(", ")
        ))
    }
}

impl TryFrom<String> for StopSignal {
    type Error = String;
    fn try_from(name: String) -> Result<Self, String> {
        StopSignal::from_name(&name)
    }
}

impl From<StopSignal> for &'static str {
    fn from(signal: StopSignal) -> &'static str {
        signal.as_str()
    }
}

impl fmt::Display for StopSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_round_trip_through_their_names() {
        for (name, value) in RestartPolicy::CHOICES {
            assert_eq!(RestartPolicy::try_from(name.to_string()), Ok(*value));
            assert_eq!(value.as_str(), *name);
        }
        assert_eq!(ReadyMode::Notify.to_string(), "notify");
        assert_eq!(Strategy::StartStop.as_str(), "start-stop");
    }

    #[test]
    fn a_bad_choice_lists_the_valid_values() {
        let err = RestartPolicy::try_from("sometimes".to_owned()).unwrap_err();
        assert_eq!(
            err,
            r#""sometimes"; valid values: on-failure, always, never"#
        );
    }

    #[test]
    fn stop_signals_parse_with_or_without_the_prefix() {
        for (signal, name, number) in StopSignal::ALL {
            assert_eq!(StopSignal::from_name(name), Ok(signal));
            assert_eq!(StopSignal::from_name(&name[3..]), Ok(signal));
            assert_eq!((signal.as_str(), signal.number()), (name, number));
        }
        assert_eq!(StopSignal::default().number(), libc::SIGTERM);
        let kill = StopSignal::from_name("SIGKILL").unwrap_err();
        assert!(
            kill.starts_with("\"SIGKILL\"; SIGKILL cannot be caught"),
            "{kill}"
        );
        assert!(kill.contains("valid values (with or without the SIG prefix): SIGTERM, SIGINT"));
        for bad in ["STOP", "sigint", "int", "9", "", "SIGSEGV", "SIGCONT"] {
            let err = StopSignal::from_name(bad).unwrap_err();
            assert!(err.contains("valid values"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn defaults_are_the_spec_example() {
        let hot = HotReload::default();
        assert!(hot.enabled && hot.preserve_state);
        assert_eq!(hot.debounce_delay_ms, 500);
        assert_eq!(hot.watch_patterns, ["*"]);
        assert_eq!(hot.exclude_patterns.len(), 11);
        assert_eq!((hot.max_retries, hot.retry_delay_ms), (3, 1000));
        let sup = SupervisorSettings::default();
        assert_eq!(
            (
                sup.stop_timeout_ms,
                sup.startup_grace_ms,
                sup.ready_timeout_ms
            ),
            (5000, 500, 10_000)
        );
        assert_eq!(sup.restart, RestartPolicy::OnFailure);
        assert_eq!(
            (sup.start_limit_burst, sup.start_limit_interval_ms),
            (5, 10_000)
        );
        let control = ControlFile::default();
        assert_eq!(
            (control.mode.as_str(), control.group.as_str()),
            ("0660", "hotreload")
        );
        assert_eq!((control.max_clients, control.max_line_bytes), (256, 65_536));
        let hooks = HookSettings::default();
        assert_eq!(hooks.timeout_ms, 10_000);
        assert!(hooks.on_reload_start.is_none() && hooks.on_reload_success.is_none());
        assert!(hooks.on_reload_failure.is_none());
    }
}
