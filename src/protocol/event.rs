//! The events of SPEC §6 as types: what subscribers receive, built by the daemon and read back by
//! `hotreloadctl events`.
//!
//! Every event is one JSON object `{"event": NAME, "time", "plugin"?, ...its own fields}`.
//! [`EventKind`] is the closed list of names with the fields each carries, so an emitter cannot
//! misspell a name or forget a field, and the manual's list of events is checked against
//! [`EventKind::NAMES`] (tests/it/docs.rs) rather than against a grep of the sources. [`Event`]
//! adds the envelope (time, plugin) and says which subscribers get it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Declares [`EventKind`] with its wire names, and [`EventKind::NAMES`] / [`EventKind::name`] from
/// the same list, so a new event cannot be added without a name the docs test sees.
macro_rules! event_kinds {
    ($(
        $(#[$doc:meta])*
        $variant:ident = $name:literal $({
            $( $(#[$fattr:meta])* $field:ident : $ty:ty ),* $(,)?
        })?
    ),* $(,)?) => {
        /// What happened, with the fields of that event (SPEC §6).
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "event")]
        pub enum EventKind {
            $(
                $(#[$doc])*
                #[serde(rename = $name)]
                $variant $({ $( $(#[$fattr])* $field: $ty ),* })?,
            )*
        }

        impl EventKind {
            /// Every event name, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($name),*];

            /// The wire name (`"event"` member).
            pub fn name(&self) -> &'static str {
                match self {
                    $( EventKind::$variant { .. } => $name, )*
                }
            }
        }
    };
}

event_kinds! {
    /// A reload began (`trigger`: watch, manual, enable, rescan, config, restart).
    ReloadStarted = "reload_started" { trigger: String, files: Vec<String> },
    ReloadSucceeded = "reload_succeeded" {
        old_version: Option<String>,
        new_version: String,
        duration_ms: u64,
    },
    /// `retry_in_ms` is null when no attempt follows.
    ReloadFailed = "reload_failed" { error: String, attempt: u32, retry_in_ms: Option<u64> },
    RolledBack = "rolled_back" { version: String },
    PluginStarted = "plugin_started" { pid: i32, version: String },
    PluginReady = "plugin_ready" { pid: i32 },
    /// Exactly one of `code` and `signal`.
    PluginExited = "plugin_exited" {
        pid: i32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
        expected: bool,
    },
    /// A line the plugin wrote (`stream`: stdout or stderr).
    PluginOutput = "plugin_output" { stream: String, line: String },
    /// A STATUS= the plugin sent.
    PluginStatus = "plugin_status" { status_text: String },
    /// Killed for missing its WATCHDOG=1.
    PluginWatchdog = "plugin_watchdog" { pid: i32, watchdog_ms: u64 },
    PluginAdded = "plugin_added",
    PluginRemoved = "plugin_removed",
    /// A state file could not be read or written (`path`: the file).
    StateWarning = "state_warning" { error: String, path: String },
    /// A `[hooks]` command failed (`hook`: on_reload_start, ...).
    HookFailed = "hook_failed" { hook: String, error: String },
    /// Globally, or for one plugin when the envelope has `plugin`.
    HotReloadEnabled = "hot_reload_enabled",
    HotReloadDisabled = "hot_reload_disabled",
    /// `stop ID` is done: the plugin is down and stays down (`version`: the one it last ran).
    PluginStopped = "plugin_stopped" { version: Option<String> },
    /// `start ID` or `restart ID` (`action`) was asked for: any stop no longer holds.
    PluginStartRequested = "plugin_start_requested" { action: String },
    StartLimitHit = "start_limit_hit" { restarts: u32, interval_ms: u64 },
    PluginsDirLost = "plugins_dir_lost" { plugins_dir: String },
    PluginsDirBack = "plugins_dir_back" { plugins_dir: String },
    ConfigReloaded = "config_reloaded" { needs_restart: Vec<String> },
    ConfigRejected = "config_rejected" { error: String },
    /// Events this subscriber missed because it did not read.
    Lagged = "lagged" { dropped: u64 },
    /// Verbose only: a change that reloads nothing, and why.
    ChangeIgnored = "change_ignored" { path: String, reason: String },
    /// Verbose only: a directory is polled instead of watched with inotify, and why.
    DirectoryPolled = "directory_polled" { path: String, reason: String },
}

impl EventKind {
    /// Meant for verbose subscribers only (`subscribe` with `"verbose": true`).
    pub fn is_verbose_only(&self) -> bool {
        matches!(
            self,
            EventKind::ChangeIgnored { .. } | EventKind::DirectoryPolled { .. }
        )
    }
}

/// One event with its envelope.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339 UTC with milliseconds (a client reading an event without one gets "").
    #[serde(default)]
    pub time: String,
    /// The plugin it concerns; absent for daemon-wide events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
    #[serde(flatten)]
    pub kind: EventKind,
}

impl Event {
    /// An event about plugin `id`, stamped now.
    pub fn plugin(id: &str, kind: EventKind) -> Event {
        Event::stamped(Some(id), kind)
    }

    /// A daemon-wide event, stamped now.
    pub fn daemon(kind: EventKind) -> Event {
        Event::stamped(None, kind)
    }

    /// An event about `plugin` if any, stamped now.
    pub fn stamped(plugin: Option<&str>, kind: EventKind) -> Event {
        Event {
            time: crate::clock::wall_rfc3339(),
            plugin: plugin.map(str::to_owned),
            kind,
        }
    }

    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    pub fn is_verbose_only(&self) -> bool {
        self.kind.is_verbose_only()
    }

    /// The event as a JSON object (its members sorted by name, as on the wire).
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// The wire form: one JSON line with its newline. Members are sorted by name (a JSON object
    /// is unordered; sorting keeps the bytes stable whatever order the fields are declared in).
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(&self.to_value()).unwrap_or_default();
        line.push(b'\n');
        line
    }

    /// One of the event's own members (`"pid"`, `"error"`, ...), or null.
    pub fn field(&self, key: &str) -> Value {
        self.to_value().get(key).cloned().unwrap_or(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &[u8]) -> Value {
        serde_json::from_slice(line).unwrap()
    }

    #[test]
    fn envelope_has_event_time_plugin_and_the_fields() {
        let e = Event::plugin("p1", EventKind::PluginReady { pid: 42 });
        let v = parse(&e.to_line());
        assert_eq!(v["event"], "plugin_ready");
        assert_eq!(v["plugin"], "p1");
        assert_eq!(v["pid"], 42);
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
        assert!(!e.is_verbose_only());
    }

    #[test]
    fn daemon_events_have_no_plugin_member_and_unit_events_only_the_envelope() {
        let v = parse(&Event::daemon(EventKind::HotReloadEnabled).to_line());
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["event", "time"]);
    }

    #[test]
    fn the_wire_line_is_one_line_with_members_sorted() {
        let e = Event::plugin(
            "p",
            EventKind::ReloadSucceeded {
                old_version: None,
                new_version: "b".into(),
                duration_ms: 3,
            },
        );
        let line = String::from_utf8(e.to_line()).unwrap();
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let keys: Vec<String> = parse(line.as_bytes())
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert!(line.contains("\"old_version\":null"), "{line}");
    }

    #[test]
    fn exit_events_carry_code_or_signal_never_both() {
        let by_code = Event::plugin(
            "p",
            EventKind::PluginExited {
                pid: 1,
                code: Some(0),
                signal: None,
                expected: true,
            },
        );
        let v = parse(&by_code.to_line());
        assert_eq!(v["code"], 0);
        assert!(v.get("signal").is_none());
    }

    #[test]
    fn verbose_only_events_are_the_ignored_changes_and_polled_dirs() {
        let ignored = EventKind::ChangeIgnored {
            path: "x".into(),
            reason: "y".into(),
        };
        assert!(Event::daemon(ignored).is_verbose_only());
        assert!(!Event::daemon(EventKind::Lagged { dropped: 1 }).is_verbose_only());
    }

    #[test]
    fn every_event_reads_back_into_the_same_type() {
        let samples = [
            EventKind::ReloadStarted {
                trigger: "watch".into(),
                files: vec!["p".into()],
            },
            EventKind::ReloadFailed {
                error: "e".into(),
                attempt: 2,
                retry_in_ms: None,
            },
            EventKind::PluginExited {
                pid: 9,
                code: None,
                signal: Some(15),
                expected: false,
            },
            EventKind::PluginRemoved,
            EventKind::Lagged { dropped: 4 },
        ];
        for kind in samples {
            let e = Event::plugin("p", kind);
            let back: Event = serde_json::from_slice(&e.to_line()).unwrap();
            assert_eq!(back, e);
        }
    }

    #[test]
    fn names_are_unique_snake_case_and_match_the_variants() {
        let mut seen = std::collections::BTreeSet::new();
        for name in EventKind::NAMES {
            assert!(seen.insert(name), "{name} twice");
            assert!(
                name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{name}"
            );
        }
        assert_eq!(EventKind::PluginAdded.name(), "plugin_added");
        assert_eq!(EventKind::Lagged { dropped: 0 }.name(), "lagged");
    }
}
