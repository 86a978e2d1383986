//! Per-plugin settings: a `[plugins.<id>]` table merged over `[supervisor]` and the defaults.
//!
//! The merge happens once, when a configuration is resolved: each written table is completed with
//! its effective values, so `Config::plugins` and `--check-config` show what will really be used,
//! and a plugin without a table gets the same merge from an empty one.

use super::socket_spec::{SocketSpec, parse_socket_spec};
use std::collections::BTreeMap;
use std::path::PathBuf;

use super::accounts::RunAs;
use super::file::{
    DEFAULT_FDSTORE_MAX, PluginConfig, ReadyMode, RestartPolicy, StopSignal, Strategy,
    SupervisorSettings,
};

/// Effective settings of one plugin: per-plugin overrides merged over `[supervisor]`/defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct PluginSettings {
    /// Executable path relative to the plugin dir (default: the id).
    pub exec: PathBuf,
    pub args: Vec<String>,
    /// Added to the daemon's environment for this plugin.
    pub env: BTreeMap<String, String>,
    /// `[plugins.<id>].config` as JSON (`PluginState.configuration`); `{}` when absent. TOML
    /// datetimes become their RFC 3339 string form.
    pub config: serde_json::Value,
    pub ready: ReadyMode,
    pub strategy: Strategy,
    /// `false`: known but not started until triggered.
    pub autostart: bool,
    /// `false`: a change of its files never reloads it (`enable ID` may override at runtime).
    pub hot_reload: bool,
    /// Listening sockets (parsed from `tcp:HOST:PORT`, `unix:/path`; distinct), bound once by
    /// the daemon and passed to every instance as `LISTEN_FDS` in this order.
    pub sockets: Vec<SocketSpec>,
    /// > 0: the plugin must send `WATCHDOG=1` at least this often; 0 = off.
    pub watchdog_ms: u64,
    /// How many fds the plugin may park with `FDSTORE=1` across reloads; 0 = none.
    pub fdstore_max: usize,
    pub stop_timeout_ms: u64,
    pub startup_grace_ms: u64,
    pub ready_timeout_ms: u64,
    pub restart: RestartPolicy,
    /// More than this many automatic restarts inside `start_limit_interval_ms`: `failed`.
    pub start_limit_burst: u32,
    /// The start limit's window; 0 = no limit.
    pub start_limit_interval_ms: u64,
    /// Sent to the plugin's processes to ask them to stop (SIGKILL after `stop_timeout_ms`).
    pub stop_signal: StopSignal,
    /// `user` and `group` as written; `None`: the daemon's.
    pub user: Option<String>,
    pub group: Option<String>,
    /// The account `user`/`group` resolved to (`Config::plugin` fills it from
    /// `Config::accounts`); `None`: run as the daemon.
    pub run_as: Option<RunAs>,
}

/// The settings of one plugin: its table's keys, else `[supervisor]`, else the defaults.
pub(crate) fn settings(
    id: &str,
    table: Option<&PluginConfig>,
    supervisor: &SupervisorSettings,
) -> PluginSettings {
    let empty = PluginConfig::default();
    let written = table.unwrap_or(&empty);
    PluginSettings {
        exec: written.exec.clone().unwrap_or_else(|| PathBuf::from(id)),
        args: written.args.clone().unwrap_or_default(),
        env: written.env.clone().unwrap_or_default(),
        config: written
            .config
            .as_ref()
            .map_or_else(|| serde_json::json!({}), table_to_json),
        ready: written.ready.unwrap_or_default(),
        strategy: written.strategy.unwrap_or_default(),
        autostart: written.autostart.unwrap_or(true),
        hot_reload: written.hot_reload.unwrap_or(true),
        sockets: parsed_sockets(written.sockets.as_deref().unwrap_or_default()),
        watchdog_ms: written.watchdog_ms.unwrap_or(0),
        fdstore_max: written.fdstore_max.unwrap_or(DEFAULT_FDSTORE_MAX),
        stop_timeout_ms: written
            .stop_timeout_ms
            .unwrap_or(supervisor.stop_timeout_ms),
        startup_grace_ms: written
            .startup_grace_ms
            .unwrap_or(supervisor.startup_grace_ms),
        ready_timeout_ms: written
            .ready_timeout_ms
            .unwrap_or(supervisor.ready_timeout_ms),
        restart: written.restart.unwrap_or(supervisor.restart),
        start_limit_burst: written
            .start_limit_burst
            .unwrap_or(supervisor.start_limit_burst),
        start_limit_interval_ms: written
            .start_limit_interval_ms
            .unwrap_or(supervisor.start_limit_interval_ms),
        stop_signal: written.stop_signal.unwrap_or(supervisor.stop_signal),
        user: written.user.clone(),
        group: written.group.clone(),
        run_as: None,
    }
}

/// The `sockets` entries, parsed. Validation refused any entry that does not parse before
/// settings are made, so none is dropped here.
fn parsed_sockets(written: &[String]) -> Vec<SocketSpec> {
    written
        .iter()
        .filter_map(|spec| parse_socket_spec(spec).ok())
        .collect()
}

/// A plugin table with every key set to its effective value. `config` stays TOML (a datetime
/// must stay a datetime).
pub(crate) fn complete(
    id: &str,
    table: Option<&PluginConfig>,
    supervisor: &SupervisorSettings,
) -> PluginConfig {
    let effective = settings(id, table, supervisor);
    let config = table.and_then(|written| written.config.clone());
    PluginConfig {
        exec: Some(effective.exec),
        args: Some(effective.args),
        env: Some(effective.env),
        config: Some(config.unwrap_or_default()),
        ready: Some(effective.ready),
        strategy: Some(effective.strategy),
        autostart: Some(effective.autostart),
        hot_reload: Some(effective.hot_reload),
        sockets: Some(effective.sockets.iter().map(ToString::to_string).collect()),
        watchdog_ms: Some(effective.watchdog_ms),
        fdstore_max: Some(effective.fdstore_max),
        stop_timeout_ms: Some(effective.stop_timeout_ms),
        startup_grace_ms: Some(effective.startup_grace_ms),
        ready_timeout_ms: Some(effective.ready_timeout_ms),
        restart: Some(effective.restart),
        start_limit_burst: Some(effective.start_limit_burst),
        start_limit_interval_ms: Some(effective.start_limit_interval_ms),
        stop_signal: Some(effective.stop_signal),
        user: effective.user,
        group: effective.group,
    }
}

fn table_to_json(table: &toml::Table) -> serde_json::Value {
    let object = table
        .iter()
        .map(|(key, value)| (key.clone(), value_to_json(value)))
        .collect();
    serde_json::Value::Object(object)
}

/// TOML to JSON. Validation has already refused NaN and infinity; should one get here anyway it
/// becomes `null` rather than a panic.
fn value_to_json(value: &toml::Value) -> serde_json::Value {
    use serde_json::Value as Json;
    match value {
        toml::Value::String(text) => Json::String(text.clone()),
        toml::Value::Integer(number) => Json::from(*number),
        toml::Value::Float(number) => {
            serde_json::Number::from_f64(*number).map_or(Json::Null, Json::Number)
        }
        toml::Value::Boolean(flag) => Json::Bool(*flag),
        toml::Value::Datetime(datetime) => Json::String(datetime.to_string()),
        toml::Value::Array(items) => Json::Array(items.iter().map(value_to_json).collect()),
        toml::Value::Table(table) => table_to_json(table),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_plugin_without_a_table_gets_defaults() {
        let settings = settings("foo", None, &SupervisorSettings::default());
        assert_eq!(settings.exec, PathBuf::from("foo"));
        assert!(settings.args.is_empty() && settings.env.is_empty());
        assert_eq!(settings.config, json!({}));
        assert_eq!(
            (settings.ready, settings.strategy),
            (ReadyMode::Exec, Strategy::StopStart)
        );
        assert!(settings.autostart);
        assert!(settings.sockets.is_empty());
        assert_eq!((settings.watchdog_ms, settings.fdstore_max), (0, 16));
        assert_eq!(
            (
                settings.stop_timeout_ms,
                settings.startup_grace_ms,
                settings.ready_timeout_ms
            ),
            (5000, 500, 10_000)
        );
        assert_eq!(settings.restart, RestartPolicy::OnFailure);
        assert_eq!(
            (settings.start_limit_burst, settings.start_limit_interval_ms),
            (5, 10_000)
        );
    }

    #[test]
    fn plugin_keys_override_the_supervisor_table() {
        let supervisor = SupervisorSettings {
            stop_timeout_ms: 1,
            startup_grace_ms: 2,
            ready_timeout_ms: 3,
            restart: RestartPolicy::Never,
            start_limit_burst: 4,
            start_limit_interval_ms: 5,
            stop_signal: StopSignal::Quit,
        };
        let inherited = settings("p", Some(&PluginConfig::default()), &supervisor);
        assert_eq!(
            (
                inherited.start_limit_burst,
                inherited.start_limit_interval_ms
            ),
            (4, 5)
        );
        assert_eq!(
            (inherited.stop_timeout_ms, inherited.startup_grace_ms),
            (1, 2)
        );
        assert_eq!(
            (inherited.ready_timeout_ms, inherited.restart),
            (3, RestartPolicy::Never)
        );
        let table = PluginConfig {
            exec: Some("bin/p".into()),
            stop_timeout_ms: Some(10),
            restart: Some(RestartPolicy::Always),
            autostart: Some(false),
            start_limit_burst: Some(0),
            start_limit_interval_ms: Some(0),
            stop_signal: Some(StopSignal::Int),
            ..PluginConfig::default()
        };
        assert_eq!(inherited.stop_signal, StopSignal::Quit);
        let own = settings("p", Some(&table), &supervisor);
        assert_eq!((own.start_limit_burst, own.start_limit_interval_ms), (0, 0));
        assert_eq!(own.exec, PathBuf::from("bin/p"));
        assert_eq!((own.stop_timeout_ms, own.startup_grace_ms), (10, 2));
        assert_eq!(own.restart, RestartPolicy::Always);
        assert_eq!(own.stop_signal, StopSignal::Int);
        assert!(!own.autostart);
    }

    #[test]
    fn a_completed_table_has_the_same_settings() {
        let table = PluginConfig {
            args: Some(vec!["-v".into()]),
            ..PluginConfig::default()
        };
        let supervisor = SupervisorSettings::default();
        let full = complete("p", Some(&table), &supervisor);
        assert_eq!(full.exec, Some(PathBuf::from("p")));
        assert_eq!(full.config, Some(toml::Table::new()));
        assert_eq!(full.sockets, Some(Vec::new()));
        assert_eq!((full.watchdog_ms, full.fdstore_max), (Some(0), Some(16)));
        assert_eq!(
            settings("p", Some(&full), &supervisor),
            settings("p", Some(&table), &supervisor)
        );
        let protocol = PluginConfig {
            ready: Some(ReadyMode::Notify),
            strategy: Some(Strategy::StartStop),
            sockets: Some(vec!["unix:/run/p.sock".into(), "tcp:[::1]:9".into()]),
            watchdog_ms: Some(500),
            fdstore_max: Some(4),
            ..PluginConfig::default()
        };
        let full = complete("p", Some(&protocol), &supervisor);
        assert_eq!(full, complete("p", Some(&full), &supervisor));
        let effective = settings("p", Some(&full), &supervisor);
        assert_eq!(effective, settings("p", Some(&protocol), &supervisor));
        let written: Vec<String> = effective.sockets.iter().map(ToString::to_string).collect();
        assert_eq!(written, ["unix:/run/p.sock", "tcp:[::1]:9"]);
        assert_eq!((effective.watchdog_ms, effective.fdstore_max), (500, 4));
        assert_eq!(
            (effective.ready, effective.strategy),
            (ReadyMode::Notify, Strategy::StartStop)
        );
    }

    #[test]
    fn config_becomes_json_with_datetimes_as_strings() {
        let table: toml::Table = toml::from_str(
            "preset = \"fast\"\nthreads = 4\nratio = 0.5\non = true\nat = 2026-11-27T22:30:45Z\nlist = [1, \"a\"]\nnested = { x = 1 }\n",
        )
        .unwrap();
        let plugin = PluginConfig {
            config: Some(table),
            ..PluginConfig::default()
        };
        let json = settings("p", Some(&plugin), &SupervisorSettings::default()).config;
        assert_eq!(
            json,
            json!({"preset": "fast", "threads": 4, "ratio": 0.5, "on": true,
                   "at": "2026-11-27T22:30:45Z", "list": [1, "a"], "nested": {"x": 1}})
        );
        assert_eq!(
            value_to_json(&toml::Value::Float(f64::INFINITY)),
            serde_json::Value::Null
        );
    }
}
