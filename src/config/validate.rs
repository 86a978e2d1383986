//! Value checks that serde's types cannot express: ranges, octal modes, glob syntax, plugin ids,
//! executable paths, environment names, listening sockets and hook commands.
//!
//! Checks work on a deserialised [`FileConfig`] and report the dotted key path of the first
//! problem; `parse` turns that path back into `file:line:column`. They are also run by `resolve`,
//! so a `FileConfig` built in code gets the same guarantees as one read from a file.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use super::file::{ControlFile, FileConfig, HookSettings, HotReload, PluginConfig};
use super::matchers::build_glob;
use super::socket_spec::{SocketSpec, parse_socket_spec};

/// Upper bound for every millisecond setting: a day is far beyond any sane delay, and a bound keeps
/// deadline arithmetic (now + delay, doubling backoff) far from overflow.
pub const MAX_MILLIS: u64 = 86_400_000;
/// Smallest accepted `control.max_line_bytes`: room for any request the protocol defines.
pub const MIN_LINE_BYTES: usize = 64;
/// Largest accepted `control.max_line_bytes`: a per-client buffer bound that still protects memory.
pub const MAX_LINE_BYTES: usize = 64 << 20;
/// Largest accepted `fdstore_max`: far above any real need, and it bounds how many parked fds
/// the daemon holds per plugin.
pub const MAX_FDSTORE: usize = 1024;
/// Largest accepted `start_limit_burst`: far above any sane burst, and it bounds how many start
/// times the daemon remembers per plugin.
pub const MAX_START_LIMIT_BURST: u32 = 1000;
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
    check_start_limit(
        &["supervisor"],
        Some(supervisor.start_limit_burst),
        Some(supervisor.start_limit_interval_ms),
    )?;
    check_control(&file.control)?;
    check_hooks(&file.hooks)?;
    for (id, plugin) in &file.plugins {
        check_plugin(id, plugin)?;
    }
    check_sockets_distinct(&file.plugins)
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

/// `start_limit_burst` and `start_limit_interval_ms` of the table at `table` (each optional).
fn check_start_limit(
    table: &[&str],
    burst: Option<u32>,
    interval_ms: Option<u64>,
) -> Result<(), KeyProblem> {
    let at = |key: &'static str| [table, &[key]].concat();
    if let Some(burst) = burst.filter(|burst| *burst > MAX_START_LIMIT_BURST) {
        let detail = format!("{burst}; expected 0 to {MAX_START_LIMIT_BURST} restarts");
        return Err(KeyProblem::invalid(&at("start_limit_burst"), detail));
    }
    if let Some(interval_ms) = interval_ms {
        check_millis(&at("start_limit_interval_ms"), interval_ms, 0)?;
    }
    Ok(())
}

/// The shortest `poll_interval_ms` accepted.
pub const MIN_POLL_INTERVAL_MS: u64 = 10;

fn check_hot_reload(hot: &HotReload) -> Result<(), KeyProblem> {
    check_millis(
        &["hot_reload", "debounce_delay_ms"],
        hot.debounce_delay_ms,
        0,
    )?;
    check_millis(&["hot_reload", "retry_delay_ms"], hot.retry_delay_ms, 0)?;
    // A poll every few milliseconds would be a busy loop; 10 ms is already far below useful.
    check_millis(
        &["hot_reload", "poll_interval_ms"],
        hot.poll_interval_ms,
        MIN_POLL_INTERVAL_MS,
    )?;
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
    for spec in plugin.sockets.iter().flatten() {
        parse_socket_spec(spec).map_err(|detail| KeyProblem::invalid(&at("sockets"), detail))?;
    }
    let millis = [
        ("stop_timeout_ms", plugin.stop_timeout_ms, 1),
        ("startup_grace_ms", plugin.startup_grace_ms, 0),
        ("ready_timeout_ms", plugin.ready_timeout_ms, 0),
        ("watchdog_ms", plugin.watchdog_ms, 0),
    ];
    for (key, value, min) in millis {
        if let Some(value) = value {
            check_millis(&at(key), value, min)?;
        }
    }
    check_start_limit(
        &["plugins", id],
        plugin.start_limit_burst,
        plugin.start_limit_interval_ms,
    )?;
    match plugin.fdstore_max {
        Some(max) if max > MAX_FDSTORE => {
            let detail = format!("{max}; expected 0 to {MAX_FDSTORE} file descriptors");
            Err(KeyProblem::invalid(&at("fdstore_max"), detail))
        }
        _ => Ok(()),
    }
}

/// A socket is bound once, so the same address twice (in one plugin or in two) could never
/// bind; it is refused here with both places named. Runs after every spec is known to be valid.
fn check_sockets_distinct(plugins: &BTreeMap<String, PluginConfig>) -> Result<(), KeyProblem> {
    let mut seen: Vec<(SocketSpec, &str, &str)> = Vec::new();
    for (id, plugin) in plugins {
        for written in plugin.sockets.iter().flatten() {
            let Ok(spec) = parse_socket_spec(written) else {
                continue;
            };
            if !spec.is_exclusive() {
                continue;
            }
            if let Some((_, first, owner)) = seen.iter().find(|(other, ..)| *other == spec) {
                let place = if owner == id {
                    "earlier in this list".to_owned()
                } else {
                    format!("in {}", describe_table(&["plugins", owner]))
                };
                let detail = format!(
                    "{written:?} names the same socket as {first:?} {place}; list each socket once"
                );
                return Err(KeyProblem::invalid(&["plugins", id, "sockets"], detail));
            }
            seen.push((spec, written, id));
        }
    }
    Ok(())
}

fn check_hooks(hooks: &HookSettings) -> Result<(), KeyProblem> {
    let commands = [
        ("on_reload_start", &hooks.on_reload_start),
        ("on_reload_success", &hooks.on_reload_success),
        ("on_reload_failure", &hooks.on_reload_failure),
    ];
    for (key, argv) in commands {
        if let Some(argv) = argv {
            check_hook_argv(argv).map_err(|detail| KeyProblem::invalid(&["hooks", key], detail))?;
        }
    }
    check_millis(&["hooks", "timeout_ms"], hooks.timeout_ms, 1)
}

/// A hook is exec'd directly (no shell) from the daemon's working directory, which is nothing a
/// configuration should depend on: `argv[0]` is an absolute path or a bare name found in `PATH`.
fn check_hook_argv(argv: &[String]) -> Result<(), String> {
    let example = "like [\"/usr/local/bin/notify-reload\", \"start\"]";
    let Some(program) = argv.first() else {
        return Err(format!(
            "[]; expected a command and its arguments, {example}; remove the key for no hook"
        ));
    };
    if let Some(word) = argv.iter().find(|word| word.contains('\0')) {
        return Err(format!("{word:?} contains NUL"));
    }
    if program.is_empty() {
        return Err(format!(
            "the command name is \"\"; expected an absolute path or a command name, {example}"
        ));
    }
    if program.contains('/') && !program.starts_with('/') {
        return Err(format!(
            "{program:?} is a relative path; give an absolute path, or a bare command name to look up in PATH"
        ));
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
    use super::*;
    use crate::config::file::{ReadyMode, Strategy};

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

    fn first_problem(file: &FileConfig) -> KeyProblem {
        validate(file).unwrap_err()
    }

    #[test]
    fn the_default_file_is_valid() {
        assert_eq!(validate(&FileConfig::default()), Ok(()));
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
            let problem = first_problem(&file);
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
            let problem = first_problem(&file);
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
        assert_eq!(
            first_problem(&file).path,
            ["plugins", "p", "config", "rate"]
        );
    }

    #[test]
    fn the_plugin_protocol_keys_are_accepted() {
        let plugin = PluginConfig {
            ready: Some(ReadyMode::Notify),
            strategy: Some(Strategy::StartStop),
            sockets: Some(vec![
                "tcp:127.0.0.1:9000".into(),
                "unix:/run/hotreload/p.sock".into(),
            ]),
            watchdog_ms: Some(MAX_MILLIS),
            fdstore_max: Some(MAX_FDSTORE),
            ..PluginConfig::default()
        };
        let mut file = with_plugin(plugin);
        file.hooks = HookSettings {
            on_reload_start: Some(vec!["/usr/local/bin/notify-reload".into(), "start".into()]),
            on_reload_success: Some(vec!["notify-send".into()]),
            on_reload_failure: Some(vec!["/bin/sh".into(), "-c".into(), String::new()]),
            timeout_ms: 1,
        };
        assert_eq!(validate(&file), Ok(()));
    }

    #[test]
    fn a_bad_socket_names_the_plugin_table_the_value_and_the_valid_forms() {
        let file = with_plugin(PluginConfig {
            sockets: Some(vec!["tcp:127.0.0.1:9000".into(), "tcp:1.2.3:80".into()]),
            ..PluginConfig::default()
        });
        let problem = first_problem(&file);
        assert_eq!(problem.path, ["plugins", "p", "sockets"]);
        assert!(
            problem.message.starts_with(
                "invalid value for `sockets` in [plugins.p]: \"tcp:1.2.3:80\"; host \"1.2.3\""
            ),
            "{}",
            problem.message
        );
        assert!(
            problem.message.contains("valid forms: \"tcp:HOST:PORT\""),
            "{}",
            problem.message
        );
    }

    #[test]
    fn the_same_socket_twice_is_refused() {
        let file = with_plugin(PluginConfig {
            sockets: Some(vec!["tcp:[::1]:80".into(), "tcp:[0::1]:80".into()]),
            ..PluginConfig::default()
        });
        let problem = first_problem(&file);
        assert_eq!(problem.path, ["plugins", "p", "sockets"]);
        assert_eq!(
            problem.message,
            "invalid value for `sockets` in [plugins.p]: \"tcp:[0::1]:80\" names the same \
             socket as \"tcp:[::1]:80\" earlier in this list; list each socket once"
        );
        let sockets = |specs: &[&str]| PluginConfig {
            sockets: Some(specs.iter().map(|spec| (*spec).to_owned()).collect()),
            ..PluginConfig::default()
        };
        let two_plugins = FileConfig {
            plugins: BTreeMap::from([
                ("a".to_owned(), sockets(&["unix:/run/x.sock"])),
                (
                    "b".to_owned(),
                    sockets(&["tcp:127.0.0.1:1", "unix:/run/x.sock"]),
                ),
            ]),
            ..FileConfig::default()
        };
        let problem = first_problem(&two_plugins);
        assert_eq!(problem.path, ["plugins", "b", "sockets"]);
        assert!(
            problem
                .message
                .contains("as \"unix:/run/x.sock\" in [plugins.a]"),
            "{}",
            problem.message
        );
        let ephemeral = with_plugin(sockets(&["tcp:127.0.0.1:0", "tcp:127.0.0.1:0"]));
        assert_eq!(
            validate(&ephemeral),
            Ok(()),
            "port 0 binds a fresh port each time"
        );
        let distinct = with_plugin(sockets(&[
            "tcp:127.0.0.1:80",
            "tcp:[::1]:80",
            "tcp:localhost:81",
        ]));
        assert_eq!(validate(&distinct), Ok(()));
    }

    #[test]
    fn watchdog_and_fdstore_are_bounded() {
        let file = with_plugin(PluginConfig {
            watchdog_ms: Some(MAX_MILLIS + 1),
            ..PluginConfig::default()
        });
        let problem = first_problem(&file);
        assert_eq!(problem.path, ["plugins", "p", "watchdog_ms"]);
        assert!(
            problem.message.contains("86400001; expected 0 to 86400000"),
            "{}",
            problem.message
        );
        let file = with_plugin(PluginConfig {
            fdstore_max: Some(MAX_FDSTORE + 1),
            ..PluginConfig::default()
        });
        let problem = first_problem(&file);
        assert_eq!(problem.path, ["plugins", "p", "fdstore_max"]);
        assert_eq!(
            problem.message,
            "invalid value for `fdstore_max` in [plugins.p]: 1025; expected 0 to 1024 file descriptors"
        );
        let off = with_plugin(PluginConfig {
            watchdog_ms: Some(0),
            fdstore_max: Some(0),
            ..PluginConfig::default()
        });
        assert_eq!(validate(&off), Ok(()));
    }

    #[test]
    fn hook_commands_must_be_runnable_argvs() {
        let words = |words: &[&str]| Some(words.iter().map(|w| (*w).to_owned()).collect());
        for (argv, needle) in [
            (words(&[]), "[]; expected a command and its arguments"),
            (words(&[""]), "the command name is \"\""),
            (words(&["", "x"]), "the command name is \"\""),
            (words(&["/bin/e\0cho"]), "\"/bin/e\\0cho\" contains NUL"),
            (words(&["echo", "a\0"]), "\"a\\0\" contains NUL"),
            (words(&["bin/notify"]), "\"bin/notify\" is a relative path"),
            (words(&["./notify", "x"]), "\"./notify\" is a relative path"),
        ] {
            for key in ["on_reload_start", "on_reload_success", "on_reload_failure"] {
                let mut file = FileConfig::default();
                let slot = match key {
                    "on_reload_start" => &mut file.hooks.on_reload_start,
                    "on_reload_success" => &mut file.hooks.on_reload_success,
                    _ => &mut file.hooks.on_reload_failure,
                };
                *slot = argv.clone();
                let problem = first_problem(&file);
                assert_eq!(problem.path, ["hooks", key]);
                let prefix = format!("invalid value for `{key}` in [hooks]: ");
                assert!(
                    problem.message.starts_with(&prefix) && problem.message.contains(needle),
                    "{argv:?}: {}",
                    problem.message
                );
            }
        }
        let mut file = FileConfig::default();
        file.hooks.timeout_ms = 0;
        let problem = first_problem(&file);
        assert_eq!(problem.path, ["hooks", "timeout_ms"]);
        assert!(
            problem.message.contains("0; expected 1 to 86400000"),
            "{}",
            problem.message
        );
        file.hooks.timeout_ms = MAX_MILLIS + 1;
        assert_eq!(validate(&file).unwrap_err().path, ["hooks", "timeout_ms"]);
    }
}
