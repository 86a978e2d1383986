//! Value checks that serde's types cannot express: ranges, octal modes, glob syntax, plugin ids,
//! executable paths, environment names, and the SPEC keys that are not supported yet.
//!
//! Checks work on a deserialised [`FileConfig`] and report the dotted key path of the first
//! problem; `parse` turns that path back into `file:line:column`. They are also run by `resolve`,
//! so a `FileConfig` built in code gets the same guarantees as one read from a file.

use std::path::{Component, Path};

use super::file::{ControlFile, FileConfig, HotReload, PluginConfig, ReadyMode, Strategy};
use super::matchers::build_glob;

/// Upper bound for every millisecond setting: a day is far beyond any sane delay, and a bound keeps
/// deadline arithmetic (now + delay, doubling backoff) far from overflow.
pub const MAX_MILLIS: u64 = 86_400_000;
/// Smallest accepted `control.max_line_bytes`: room for any request the protocol defines.
pub const MIN_LINE_BYTES: usize = 64;
/// Largest accepted `control.max_line_bytes`: a per-client buffer bound that still protects memory.
pub const MAX_LINE_BYTES: usize = 64 << 20;
/// Largest accepted `control.mode`: permission bits only (no setuid/setgid/sticky on a socket).
pub const MAX_MODE: u32 = 0o777;

/// A problem with one key, found after deserialising.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct KeyProblem {
    /// Dotted path of the offending key, e.g. `["plugins", "foo", "exec"]`.
    pub path: Vec<String>,
    pub message: String,
}

impl KeyProblem {
    fn new(path: &[&str], message: String) -> KeyProblem {
        KeyProblem {
            path: path.iter().map(|segment| (*segment).to_owned()).collect(),
            message,
        }
    }

    /// "invalid value for `<key>` in [<table>]: <detail>".
    fn invalid(path: &[&str], detail: impl std::fmt::Display) -> KeyProblem {
        KeyProblem::new(
            path,
            format!("invalid value for {}: {detail}", describe_key(path)),
        )
    }
}

/// Whether `id` is a valid plugin id: `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$` (SPEC §4).
pub fn valid_plugin_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    let Some(first) = bytes.first() else {
        return false;
    };
    bytes.len() <= 64
        && first.is_ascii_alphanumeric()
        && bytes[1..]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parses a socket file mode written as an octal string ("0660", "660"), at most `0777`.
pub fn parse_mode(text: &str) -> Result<u32, String> {
    let expected = "expected an octal string from \"0000\" to \"0777\", like \"0660\"";
    let all_octal =
        !text.is_empty() && text.len() <= 4 && text.bytes().all(|b| (b'0'..=b'7').contains(&b));
    match u32::from_str_radix(text, 8) {
        Ok(mode) if all_octal && mode <= MAX_MODE => Ok(mode),
        _ => Err(format!("{text:?}; {expected}")),
    }
}

/// Names a key for messages: "`debounce_delay_ms` in [hot_reload]", "`plugins_dir` at the top level".
pub(crate) fn describe_key<S: AsRef<str>>(path: &[S]) -> String {
    match path.split_last() {
        None => "the document".to_owned(),
        Some((key, [])) => format!("`{}` at the top level", key.as_ref()),
        Some((key, table)) => format!("`{}` in {}", key.as_ref(), describe_table(table)),
    }
}

/// Names a table for messages the way it is written in TOML: `[plugins.foo]`, `[plugins."a.b"]`.
pub(crate) fn describe_table<S: AsRef<str>>(path: &[S]) -> String {
    if path.is_empty() {
        return "the top-level table".to_owned();
    }
    let segments: Vec<String> = path
        .iter()
        .map(|segment| toml_key(segment.as_ref()))
        .collect();
    format!("[{}]", segments.join("."))
}

/// A key as TOML would need it written: bare when possible, quoted otherwise.
fn toml_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

/// The SPEC keys that parse but are not implemented yet. Rejecting them (instead of ignoring them)
/// keeps a configuration from silently meaning less than it says; when a feature lands, delete
/// its check here.
pub(crate) fn reject_unsupported(file: &FileConfig) -> Result<(), KeyProblem> {
    if file.hooks.is_some() {
        let message = "the [hooks] table is not supported yet; remove it".to_owned();
        return Err(KeyProblem::new(&["hooks"], message));
    }
    for (id, plugin) in &file.plugins {
        let unsupported = |key: &str, written: &str, remedy: &str| {
            let table = describe_table(&["plugins", id.as_str()]);
            let message = format!("`{written}` in {table} is not supported yet; {remedy}");
            KeyProblem::new(&["plugins", id.as_str(), key], message)
        };
        if plugin.ready == Some(ReadyMode::Notify) {
            let remedy = "use ready = \"exec\" or remove the key";
            return Err(unsupported("ready", "ready = \"notify\"", remedy));
        }
        if plugin.strategy == Some(Strategy::StartStop) {
            let remedy = "use strategy = \"stop-start\" or remove the key";
            return Err(unsupported("strategy", "strategy = \"start-stop\"", remedy));
        }
        if plugin
            .sockets
            .as_ref()
            .is_some_and(|sockets| !sockets.is_empty())
        {
            return Err(unsupported("sockets", "sockets", "remove the key"));
        }
        if plugin.watchdog_ms.is_some_and(|ms| ms > 0) {
            return Err(unsupported(
                "watchdog_ms",
                "watchdog_ms",
                "remove the key or set it to 0",
            ));
        }
        if plugin.fdstore_max.is_some() {
            return Err(unsupported("fdstore_max", "fdstore_max", "remove the key"));
        }
    }
    Ok(())
}

/// Checks every value of an already deserialised file; the first problem wins.
pub(crate) fn validate(file: &FileConfig) -> Result<(), KeyProblem> {
    let locations = [
        (["plugins_dir"].as_slice(), &file.plugins_dir),
        (&["runtime_dir"], &file.runtime_dir),
        (&["state_dir"], &file.state_dir),
        (&["control", "socket"], &file.control.socket),
    ];
    for (path, value) in locations {
        if let Some(value) = value {
            check_path_value(path, value)?;
        }
    }
    check_hot_reload(&file.hot_reload)?;
    let supervisor = &file.supervisor;
    check_millis(
        &["supervisor", "stop_timeout_ms"],
        supervisor.stop_timeout_ms,
        1,
    )?;
    check_millis(
        &["supervisor", "startup_grace_ms"],
        supervisor.startup_grace_ms,
        0,
    )?;
    check_millis(
        &["supervisor", "ready_timeout_ms"],
        supervisor.ready_timeout_ms,
        0,
    )?;
    check_control(&file.control)?;
    for (id, plugin) in &file.plugins {
        check_plugin(id, plugin)?;
    }
    Ok(())
}

fn check_path_value(path: &[&str], value: &Path) -> Result<(), KeyProblem> {
    let text = value.as_os_str().as_encoded_bytes();
    if text.is_empty() {
        return Err(KeyProblem::invalid(path, "\"\"; expected a path"));
    }
    if text.contains(&0) {
        return Err(KeyProblem::invalid(
            path,
            format!("{value:?}; a path cannot contain NUL"),
        ));
    }
    Ok(())
}

fn check_millis(path: &[&str], value: u64, min: u64) -> Result<(), KeyProblem> {
    if (min..=MAX_MILLIS).contains(&value) {
        return Ok(());
    }
    let detail = format!("{value}; expected {min} to {MAX_MILLIS} milliseconds (at most one day)");
    Err(KeyProblem::invalid(path, detail))
}

fn check_hot_reload(hot: &HotReload) -> Result<(), KeyProblem> {
    check_millis(
        &["hot_reload", "debounce_delay_ms"],
        hot.debounce_delay_ms,
        0,
    )?;
    check_millis(&["hot_reload", "retry_delay_ms"], hot.retry_delay_ms, 0)?;
    let lists = [
        ("watch_patterns", &hot.watch_patterns),
        ("exclude_patterns", &hot.exclude_patterns),
    ];
    for (key, patterns) in lists {
        for pattern in patterns {
            build_glob(pattern)
                .map_err(|error| KeyProblem::invalid(&["hot_reload", key], error))?;
        }
    }
    Ok(())
}

fn check_control(control: &ControlFile) -> Result<(), KeyProblem> {
    parse_mode(&control.mode).map_err(|error| KeyProblem::invalid(&["control", "mode"], error))?;
    let group = &control.group;
    let bad_group_byte = |b: u8| b == 0 || b == b':' || b == b'/' || b.is_ascii_whitespace();
    if group.bytes().any(bad_group_byte) {
        let detail =
            format!("{group:?}; expected a group name or gid, or \"\" to leave the group alone");
        return Err(KeyProblem::invalid(&["control", "group"], detail));
    }
    if control.max_clients == 0 {
        return Err(KeyProblem::invalid(
            &["control", "max_clients"],
            "0; expected at least 1",
        ));
    }
    if !(MIN_LINE_BYTES..=MAX_LINE_BYTES).contains(&control.max_line_bytes) {
        let detail = format!(
            "{}; expected {MIN_LINE_BYTES} to {MAX_LINE_BYTES} bytes",
            control.max_line_bytes
        );
        return Err(KeyProblem::invalid(&["control", "max_line_bytes"], detail));
    }
    Ok(())
}

fn check_plugin(id: &str, plugin: &PluginConfig) -> Result<(), KeyProblem> {
    if !valid_plugin_id(id) {
        let message = format!(
            "invalid plugin id {id:?} in [plugins]; ids must match ^[A-Za-z0-9][A-Za-z0-9._-]{{0,63}}$"
        );
        return Err(KeyProblem::new(&["plugins", id], message));
    }
    let at = |key: &'static str| ["plugins", id, key];
    if let Some(exec) = &plugin.exec {
        check_exec(&at("exec"), exec)?;
    }
    for arg in plugin.args.iter().flatten() {
        if arg.contains('\0') {
            return Err(KeyProblem::invalid(
                &at("args"),
                format!("{arg:?} contains NUL"),
            ));
        }
    }
    for (name, value) in plugin.env.iter().flatten() {
        check_env_entry(&["plugins", id, "env", name], name, value)?;
    }
    if let Some(config) = &plugin.config {
        let mut path = vec!["plugins", id, "config"];
        check_json_representable(&mut path, config)?;
    }
    let millis = [
        ("stop_timeout_ms", plugin.stop_timeout_ms, 1),
        ("startup_grace_ms", plugin.startup_grace_ms, 0),
        ("ready_timeout_ms", plugin.ready_timeout_ms, 0),
    ];
    for (key, value, min) in millis {
        if let Some(value) = value {
            check_millis(&at(key), value, min)?;
        }
    }
    Ok(())
}

/// `exec` is joined to the plugin dir, so it must be relative and must not climb out of it.
fn check_exec(path: &[&str], exec: &Path) -> Result<(), KeyProblem> {
    check_path_value(path, exec)?;
    let shown = exec.display();
    if exec.is_absolute() {
        let detail = format!("\"{shown}\"; expected a path relative to the plugin directory");
        return Err(KeyProblem::invalid(path, detail));
    }
    if exec.components().any(|c| c == Component::ParentDir) {
        let detail =
            format!("\"{shown}\"; the executable must stay inside the plugin directory (no `..`)");
        return Err(KeyProblem::invalid(path, detail));
    }
    if !exec.components().any(|c| matches!(c, Component::Normal(_))) {
        let detail =
            format!("\"{shown}\"; expected the name of a file inside the plugin directory");
        return Err(KeyProblem::invalid(path, detail));
    }
    Ok(())
}

fn check_env_entry(path: &[&str], name: &str, value: &str) -> Result<(), KeyProblem> {
    if name.is_empty() || name.contains(['=', '\0']) {
        let message = format!(
            "invalid environment variable name {name:?} in {}; a name must be non-empty without `=` or NUL",
            describe_table(&path[..path.len() - 1])
        );
        return Err(KeyProblem::new(path, message));
    }
    if value.contains('\0') {
        return Err(KeyProblem::invalid(path, format!("{value:?} contains NUL")));
    }
    Ok(())
}

/// `config` becomes JSON (`PluginState.configuration`), which has no NaN or infinity.
fn check_json_representable<'a>(
    path: &mut Vec<&'a str>,
    table: &'a toml::Table,
) -> Result<(), KeyProblem> {
    for (key, value) in table {
        path.push(key);
        check_json_value(path, value)?;
        path.pop();
    }
    Ok(())
}

fn check_json_value<'a>(path: &mut Vec<&'a str>, value: &'a toml::Value) -> Result<(), KeyProblem> {
    match value {
        toml::Value::Float(f) if !f.is_finite() => {
            let detail = format!("{f}; JSON (the plugin's state file) has no NaN or infinity");
            Err(KeyProblem::invalid(path, detail))
        }
        toml::Value::Array(items) => items
            .iter()
            .try_for_each(|item| check_json_value(path, item)),
        toml::Value::Table(table) => check_json_representable(path, table),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn plugin_ids_follow_the_spec_pattern() {
        for good in [
            "a",
            "A",
            "0",
            "ffmpeg_transcoder",
            "a.b-c_d",
            &"x".repeat(64),
        ] {
            assert!(valid_plugin_id(good), "{good:?} should be valid");
        }
        for bad in [
            "",
            ".hidden",
            "_x",
            "-x",
            "a b",
            "a/b",
            "é",
            "a\0",
            &"x".repeat(65),
        ] {
            assert!(!valid_plugin_id(bad), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn modes_are_octal_strings_up_to_0777() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert_eq!(parse_mode("0777"), Ok(0o777));
        for bad in ["", "0o660", "0880", "1777", "7777", "+660", "00660", "rw"] {
            let err = parse_mode(bad).unwrap_err();
            assert!(err.contains("like \"0660\""), "{bad:?}: {err}");
        }
    }

    #[test]
    fn keys_and_tables_are_described_as_written_in_toml() {
        assert_eq!(
            describe_key(&["plugins_dir"]),
            "`plugins_dir` at the top level"
        );
        assert_eq!(
            describe_key(&["hot_reload", "enabled"]),
            "`enabled` in [hot_reload]"
        );
        assert_eq!(
            describe_key(&["plugins", "a.b", "exec"]),
            "`exec` in [plugins.\"a.b\"]"
        );
        assert_eq!(describe_table::<&str>(&[]), "the top-level table");
    }

    fn with_plugin(plugin: PluginConfig) -> FileConfig {
        FileConfig {
            plugins: BTreeMap::from([("p".to_owned(), plugin)]),
            ..FileConfig::default()
        }
    }

    fn problem(file: &FileConfig) -> KeyProblem {
        reject_unsupported(file)
            .and_then(|()| validate(file))
            .unwrap_err()
    }

    #[test]
    fn the_default_file_is_valid() {
        assert_eq!(validate(&FileConfig::default()), Ok(()));
        assert_eq!(reject_unsupported(&FileConfig::default()), Ok(()));
    }

    #[test]
    fn exec_must_stay_inside_the_plugin_dir() {
        for (exec, needle) in [
            ("/usr/bin/foo", "relative"),
            ("../foo", "no `..`"),
            ("bin/../../foo", "no `..`"),
            (".", "name of a file"),
            ("", "expected a path"),
        ] {
            let file = with_plugin(PluginConfig {
                exec: Some(exec.into()),
                ..PluginConfig::default()
            });
            let problem = problem(&file);
            assert_eq!(problem.path, ["plugins", "p", "exec"]);
            assert!(
                problem.message.contains(needle),
                "{exec:?}: {}",
                problem.message
            );
        }
        for good in ["foo", "./foo", "bin/foo"] {
            let file = with_plugin(PluginConfig {
                exec: Some(good.into()),
                ..PluginConfig::default()
            });
            assert_eq!(validate(&file), Ok(()), "{good:?}");
        }
    }

    #[test]
    fn env_names_must_be_usable() {
        for name in ["", "A=B", "A\0"] {
            let env = BTreeMap::from([(name.to_owned(), "v".to_owned())]);
            let file = with_plugin(PluginConfig {
                env: Some(env),
                ..PluginConfig::default()
            });
            let problem = problem(&file);
            assert!(
                problem.message.contains("environment variable name"),
                "{}",
                problem.message
            );
            assert_eq!(problem.path, ["plugins", "p", "env", name]);
        }
    }

    #[test]
    fn a_non_finite_float_in_plugin_config_is_rejected() {
        let mut config = toml::Table::new();
        config.insert("rate".to_owned(), toml::Value::Float(f64::NAN));
        let file = with_plugin(PluginConfig {
            config: Some(config),
            ..PluginConfig::default()
        });
        assert_eq!(problem(&file).path, ["plugins", "p", "config", "rate"]);
    }

    #[test]
    fn each_unsupported_key_is_named() {
        let cases = [
            (
                PluginConfig {
                    ready: Some(ReadyMode::Notify),
                    ..PluginConfig::default()
                },
                "ready",
            ),
            (
                PluginConfig {
                    strategy: Some(Strategy::StartStop),
                    ..PluginConfig::default()
                },
                "strategy",
            ),
            (
                PluginConfig {
                    sockets: Some(vec!["tcp:127.0.0.1:9000".into()]),
                    ..PluginConfig::default()
                },
                "sockets",
            ),
            (
                PluginConfig {
                    watchdog_ms: Some(1000),
                    ..PluginConfig::default()
                },
                "watchdog_ms",
            ),
            (
                PluginConfig {
                    fdstore_max: Some(0),
                    ..PluginConfig::default()
                },
                "fdstore_max",
            ),
        ];
        for (plugin, key) in cases {
            let err = reject_unsupported(&with_plugin(plugin)).unwrap_err();
            assert_eq!(err.path, ["plugins", "p", key]);
            assert!(err.message.contains("not supported yet"), "{}", err.message);
            assert!(err.message.contains(key), "{}", err.message);
        }
        let harmless = PluginConfig {
            ready: Some(ReadyMode::Exec),
            strategy: Some(Strategy::StopStart),
            sockets: Some(Vec::new()),
            watchdog_ms: Some(0),
            ..PluginConfig::default()
        };
        assert_eq!(reject_unsupported(&with_plugin(harmless)), Ok(()));
        let hooks = FileConfig {
            hooks: Some(Default::default()),
            ..FileConfig::default()
        };
        let err = reject_unsupported(&hooks).unwrap_err();
        assert_eq!(err.path, ["hooks"]);
        assert!(err.message.contains("[hooks]") && err.message.contains("not supported yet"));
    }
}
