//! Tests of the whole resolution: `load`, `resolve`, `client_socket`, `to_effective_toml`.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// A fresh directory per test under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let unique = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "hotreload-config-{}-{name}-{unique}",
            std::process::id()
        ));
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, relative: &str, text: &str) -> PathBuf {
        let path = self.0.join(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Overrides naming only the config file, as `--config PATH` does.
fn config_flag(path: impl Into<PathBuf>) -> Overrides {
    Overrides {
        config: Some(path.into()),
        ..Overrides::default()
    }
}

/// Parses `text`, which must be valid, as if read from `h.toml`.
fn parse_valid(text: &str) -> FileConfig {
    parse(text, Path::new("h.toml")).unwrap()
}

/// Parses and resolves `text`, which must be valid, for a user under `/t` with no variables set.
fn resolve_valid(text: &str) -> Config {
    let env = user_env(Path::new("/t"), &[]);
    resolve(parse_valid(text), None, &Overrides::default(), &env).unwrap()
}

/// A non-root user whose home is inside `dir`, with no variables set.
fn user_env(dir: &Path, vars: &[(&str, &str)]) -> Env {
    Env {
        vars: vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
        euid: 1000,
        cwd: dir.join("cwd"),
        home: Some(dir.join("home")),
    }
}

#[test]
fn no_file_means_built_in_defaults() {
    let tmp = TempDir::new("defaults");
    let env = user_env(&tmp.0, &[]);
    let config = load(&Overrides::default(), &env).unwrap();
    assert_eq!(config.source, None);
    assert_eq!(config.plugins_dir, tmp.0.join("cwd/plugins"));
    assert_eq!(config.runtime_dir, Path::new("/tmp/hotreload-1000"));
    assert_eq!(config.state_dir, tmp.0.join("home/.local/state/hotreload"));
    assert_eq!(config.socket, Path::new("/tmp/hotreload-1000/control.sock"));
    assert!(config.watch_enabled);
    assert_eq!(config.hot_reload, HotReload::default());
    assert_eq!(config.supervisor, SupervisorSettings::default());
    assert_eq!(
        config.control,
        ControlSettings {
            mode: 0o660,
            group: Some("hotreload".to_owned()),
            max_clients: 256,
            max_line_bytes: 65_536,
        }
    );
    assert!(config.plugins.is_empty());
    assert_eq!(config.matchers.excluded_by("x.swp"), Some("*.swp"));
    assert_eq!(config.hooks, HookSettings::default());
    assert_eq!(config.hooks.timeout_ms, 10_000);
    let plugin = config.plugin("anything");
    assert_eq!(plugin.exec, PathBuf::from("anything"));
    assert!(plugin.autostart);
    assert_eq!(plugin.config, serde_json::json!({}));
    assert_eq!(
        (plugin.ready, plugin.strategy),
        (ReadyMode::Exec, Strategy::StopStart)
    );
    assert!(plugin.sockets.is_empty());
    assert_eq!(plugin.watchdog_ms, 0);
    assert_eq!(plugin.fdstore_max, DEFAULT_FDSTORE_MAX);
}

#[test]
fn the_implicit_xdg_file_is_read_when_present() {
    let tmp = TempDir::new("xdg");
    let path = tmp.write(
        "home/.config/hotreload/hotreload.toml",
        "[hot_reload]\nmax_retries = 7\n",
    );
    let config = load(&Overrides::default(), &user_env(&tmp.0, &[])).unwrap();
    assert_eq!(config.source, Some(path));
    assert_eq!(config.hot_reload.max_retries, 7);
}

#[test]
fn a_missing_implicit_file_under_configuration_directory_means_defaults() {
    let tmp = TempDir::new("sd-missing");
    tmp.write(
        "home/.config/hotreload/hotreload.toml",
        "[hot_reload]\nmax_retries = 7\n",
    );
    let conf_dir = tmp.0.join("empty-conf");
    let env = user_env(
        &tmp.0,
        &[("CONFIGURATION_DIRECTORY", conf_dir.to_str().unwrap())],
    );
    let config = load(&Overrides::default(), &env).unwrap();
    assert_eq!(
        config.source, None,
        "no fallback past the first matching rule"
    );
    assert_eq!(config.hot_reload.max_retries, 3);
}

#[test]
fn a_missing_explicit_file_is_an_error() {
    let tmp = TempDir::new("explicit");
    let missing = tmp.0.join("nope.toml");
    let cli = config_flag(missing.clone());
    let err = load(&cli, &user_env(&tmp.0, &[])).unwrap_err();
    assert_eq!(err.exit_code(), 78);
    assert!(
        err.message().contains(&format!("`{}`", missing.display())),
        "{err}"
    );
    assert!(
        err.message().contains("--config") && err.message().contains("does not exist"),
        "{err}"
    );
    let env = user_env(&tmp.0, &[("HOTRELOAD_CONFIG", missing.to_str().unwrap())]);
    let err = load(&Overrides::default(), &env).unwrap_err();
    assert!(err.message().contains("$HOTRELOAD_CONFIG="), "{err}");
}

#[test]
fn an_unreadable_config_file_is_an_error() {
    let tmp = TempDir::new("unreadable");
    let dir = tmp.0.join("a-directory.toml");
    fs::create_dir_all(&dir).unwrap();
    let cli = config_flag(dir);
    let err = load(&cli, &user_env(&tmp.0, &[])).unwrap_err();
    assert!(
        err.message().starts_with("cannot read config file"),
        "{err}"
    );
}

#[test]
fn relative_explicit_paths_are_taken_against_the_cwd() {
    let tmp = TempDir::new("relative");
    let path = tmp.write("cwd/conf/h.toml", "plugins_dir = \"./p\"\n");
    let cli = config_flag("conf/h.toml");
    let config = load(&cli, &user_env(&tmp.0, &[])).unwrap();
    assert_eq!(config.source, Some(path));
    assert_eq!(config.plugins_dir, tmp.0.join("cwd/p"));
}

#[test]
fn parse_errors_from_load_name_the_file() {
    let tmp = TempDir::new("bad");
    let path = tmp.write(
        "hotreload.toml",
        "[hot_reload]\ndebounce_delay_ms = 50\nbogus_key = 1\n",
    );
    let cli = config_flag(path.clone());
    let err = load(&cli, &user_env(&tmp.0, &[])).unwrap_err();
    assert!(
        err.message()
            .starts_with(&format!("{}:3:1: unknown key `bogus_key`", path.display())),
        "{err}"
    );
    assert!(err.message().contains("retry_delay_ms"), "{err}");
}

#[test]
fn precedence_is_defaults_file_env_command_line() {
    let tmp = TempDir::new("precedence");
    let text = "plugins_dir = \"/f/plugins\"\nruntime_dir = \"/f/run\"\nstate_dir = \"/f/state\"\n\
                [hot_reload]\nenabled = true\ndebounce_delay_ms = 50\n[control]\nsocket = \"/f/s.sock\"\n";
    let path = tmp.write("h.toml", text);
    let file_only = config_flag(path.clone());
    let env = user_env(&tmp.0, &[]);
    let config = load(&file_only, &env).unwrap();
    assert_eq!(config.hot_reload.debounce_delay_ms, 50);
    assert!(config.hot_reload.enabled);
    assert_eq!(config.socket, Path::new("/f/s.sock"));

    let env_vars = [
        ("HOTRELOAD_DEBOUNCE_MS", "7"),
        ("HOTRELOAD_ENABLED", "off"),
        ("HOTRELOAD_SOCKET", "/e/s.sock"),
        ("RUNTIME_DIRECTORY", "/e/run"),
        ("STATE_DIRECTORY", "/e/state"),
    ];
    let env = user_env(&tmp.0, &env_vars);
    let config = load(&file_only, &env).unwrap();
    assert_eq!(config.hot_reload.debounce_delay_ms, 7);
    assert!(!config.hot_reload.enabled);
    assert_eq!(config.socket, Path::new("/e/s.sock"));
    // For these two the config key beats systemd's variables (SPEC §2).
    assert_eq!(config.runtime_dir, Path::new("/f/run"));
    assert_eq!(config.state_dir, Path::new("/f/state"));

    let cli = Overrides {
        config: Some(path),
        plugins_dir: Some("/c/plugins".into()),
        runtime_dir: Some("/c/run".into()),
        state_dir: Some("/c/state".into()),
        socket: Some("/c/s.sock".into()),
    };
    let config = load(&cli, &env).unwrap();
    assert_eq!(config.plugins_dir, Path::new("/c/plugins"));
    assert_eq!(config.runtime_dir, Path::new("/c/run"));
    assert_eq!(config.state_dir, Path::new("/c/state"));
    assert_eq!(config.socket, Path::new("/c/s.sock"));
}

#[test]
fn root_defaults_use_system_directories() {
    let env = Env {
        euid: 0,
        cwd: "/".into(),
        home: Some("/root".into()),
        ..Env::default()
    };
    let config = resolve(FileConfig::default(), None, &Overrides::default(), &env).unwrap();
    assert_eq!(config.runtime_dir, Path::new("/run/hotreload"));
    assert_eq!(config.state_dir, Path::new("/var/lib/hotreload"));
    assert_eq!(config.socket, Path::new("/run/hotreload/control.sock"));
    assert_eq!(config.plugins_dir, Path::new("/plugins"));
    let located = locate_config_file(&Overrides::default(), &env).unwrap();
    assert_eq!(located.path, Path::new("/etc/hotreload/hotreload.toml"));
}

#[test]
fn hotreload_watch_switches_inotify_off() {
    for (value, watch) in [
        ("0", false),
        ("false", false),
        ("OFF", false),
        ("on", true),
        ("1", true),
    ] {
        let env = user_env(Path::new("/t"), &[("HOTRELOAD_WATCH", value)]);
        let config = resolve(FileConfig::default(), None, &Overrides::default(), &env).unwrap();
        assert_eq!(config.watch_enabled, watch, "{value}");
        assert!(
            config.hot_reload.enabled,
            "HOTRELOAD_WATCH does not change hot_reload.enabled"
        );
    }
}

#[test]
fn bad_environment_values_name_the_variable_and_value() {
    for (key, value) in [
        ("HOTRELOAD_ENABLED", "perhaps"),
        ("HOTRELOAD_WATCH", "2"),
        ("HOTRELOAD_DEBOUNCE_MS", "500ms"),
    ] {
        let env = user_env(Path::new("/t"), &[(key, value)]);
        let err = resolve(FileConfig::default(), None, &Overrides::default(), &env).unwrap_err();
        assert!(
            err.message().contains(key) && err.message().contains(value),
            "{err}"
        );
        assert!(err.message().contains("expected"), "{err}");
    }
}

#[test]
fn resolve_checks_a_file_built_in_code() {
    let mut file = FileConfig::default();
    file.control.mode = "999".to_owned();
    let err = resolve(
        file,
        Some("/x.toml".into()),
        &Overrides::default(),
        &user_env(Path::new("/t"), &[]),
    )
    .unwrap_err();
    assert!(
        err.message()
            .starts_with("/x.toml: invalid value for `mode` in [control]"),
        "{err}"
    );
}

#[test]
fn a_too_long_socket_path_is_a_config_error() {
    let long = format!("/{}/control.sock", "d".repeat(100));
    let cli = Overrides {
        socket: Some(long.into()),
        ..Overrides::default()
    };
    let err = resolve(
        FileConfig::default(),
        None,
        &cli,
        &user_env(Path::new("/t"), &[]),
    )
    .unwrap_err();
    assert!(err.message().contains("limited to 107 bytes"), "{err}");
}

#[test]
fn group_empty_string_means_no_group() {
    let config = resolve_valid("[control]\ngroup = \"\"\nmode = \"600\"\n");
    assert_eq!(config.control.group, None);
    assert_eq!(config.control.mode, 0o600);
}

#[test]
fn plugin_settings_merge_table_over_supervisor() {
    let text = "[supervisor]\nstop_timeout_ms = 100\nrestart = \"never\"\n\
                [plugins.p]\nexec = \"bin/p\"\nargs = [\"-v\"]\nenv = { RUST_LOG = \"debug\" }\n\
                config = { preset = \"fast\", threads = 4 }\nautostart = false\nstartup_grace_ms = 9\n\
                start_limit_burst = 2\n";
    let config = resolve_valid(text);
    let p = config.plugin("p");
    assert_eq!(p.exec, PathBuf::from("bin/p"));
    assert_eq!(p.args, ["-v"]);
    assert_eq!(p.env.get("RUST_LOG").map(String::as_str), Some("debug"));
    assert_eq!(
        p.config,
        serde_json::json!({"preset": "fast", "threads": 4})
    );
    assert!(!p.autostart);
    assert_eq!(
        (p.stop_timeout_ms, p.startup_grace_ms, p.restart),
        (100, 9, RestartPolicy::Never)
    );
    assert_eq!(
        (p.start_limit_burst, p.start_limit_interval_ms),
        (2, 10_000)
    );
    let other = config.plugin("q");
    assert_eq!(
        (other.exec, other.stop_timeout_ms),
        (PathBuf::from("q"), 100)
    );
    assert_eq!(other.start_limit_burst, 5);
}

fn round_trip(config: &Config, env: &Env) -> Config {
    let text = config.to_effective_toml();
    let file = parse(&text, Path::new("effective.toml"))
        .unwrap_or_else(|err| panic!("effective TOML does not parse: {err}\n{text}"));
    resolve(file, config.source.clone(), &Overrides::default(), env).unwrap()
}

#[test]
fn effective_toml_shows_defaults_and_resolved_locations() {
    let env = user_env(Path::new("/t"), &[]);
    let file =
        parse_valid("[hot_reload]\ndebounce_delay_ms = 123\nwatch_patterns = [\"*_scanner\"]\n");
    let config = resolve(file, Some("/t/h.toml".into()), &Overrides::default(), &env).unwrap();
    let text = config.to_effective_toml();
    let value: toml::Table = toml::from_str(&text).unwrap();
    let hot = value["hot_reload"].as_table().unwrap();
    assert_eq!(hot["debounce_delay_ms"].as_integer(), Some(123));
    assert_eq!(hot["max_retries"].as_integer(), Some(3));
    assert_eq!(hot["retry_delay_ms"].as_integer(), Some(1000));
    assert_eq!(hot["exclude_patterns"].as_array().unwrap().len(), 11);
    assert_eq!(value["plugins_dir"].as_str(), Some("/t/cwd/plugins"));
    assert_eq!(value["runtime_dir"].as_str(), Some("/tmp/hotreload-1000"));
    assert_eq!(
        value["state_dir"].as_str(),
        Some("/t/home/.local/state/hotreload")
    );
    let control = value["control"].as_table().unwrap();
    assert_eq!(
        control["socket"].as_str(),
        Some("/tmp/hotreload-1000/control.sock")
    );
    assert_eq!(control["mode"].as_str(), Some("0660"));
    assert_eq!(control["group"].as_str(), Some("hotreload"));
    assert_eq!(value["supervisor"]["restart"].as_str(), Some("on-failure"));
    assert_eq!(
        value["supervisor"]["start_limit_burst"].as_integer(),
        Some(5)
    );
    assert_eq!(
        value["supervisor"]["start_limit_interval_ms"].as_integer(),
        Some(10_000)
    );
    // [hooks] is always shown, with its timeout; commands only when set (TOML has no null).
    let hooks = value["hooks"].as_table().unwrap();
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks["timeout_ms"].as_integer(), Some(10_000));
    assert!(text.contains("# read from /t/h.toml"), "{text}");
}

#[test]
fn effective_toml_completes_plugin_tables_with_the_protocol_keys() {
    let env = user_env(Path::new("/t"), &[]);
    let config =
        resolve_valid("[plugins.p]\nargs = [\"-v\"]\n[hooks]\non_reload_success = [\"true\"]\n");
    let value: toml::Table = toml::from_str(&config.to_effective_toml()).unwrap();
    let plugin = value["plugins"]["p"].as_table().unwrap();
    assert_eq!(plugin["ready"].as_str(), Some("exec"));
    assert_eq!(plugin["strategy"].as_str(), Some("stop-start"));
    assert_eq!(plugin["sockets"].as_array().map(Vec::len), Some(0));
    assert_eq!(plugin["watchdog_ms"].as_integer(), Some(0));
    assert_eq!(plugin["fdstore_max"].as_integer(), Some(16));
    assert_eq!(plugin["start_limit_burst"].as_integer(), Some(5));
    assert_eq!(plugin["start_limit_interval_ms"].as_integer(), Some(10_000));
    let hooks = value["hooks"].as_table().unwrap();
    assert_eq!(hooks["on_reload_success"][0].as_str(), Some("true"));
    assert!(!hooks.contains_key("on_reload_start"));
    assert_eq!(hooks["timeout_ms"].as_integer(), Some(10_000));
    assert_eq!(round_trip(&config, &env), config);
}

#[test]
fn resolve_checks_the_protocol_keys_of_a_file_built_in_code() {
    let env = user_env(Path::new("/t"), &[]);
    let mut file = FileConfig::default();
    file.hooks.on_reload_start = Some(vec!["bin/hook".to_owned()]);
    let err = resolve(file, Some("/x.toml".into()), &Overrides::default(), &env).unwrap_err();
    assert!(
        err.message().starts_with(
            "/x.toml: invalid value for `on_reload_start` in [hooks]: \"bin/hook\" is a relative path"
        ),
        "{err}"
    );
    let mut file = FileConfig::default();
    file.plugins.insert(
        "p".to_owned(),
        PluginConfig {
            sockets: Some(vec!["tcp:host:1".to_owned()]),
            ..PluginConfig::default()
        },
    );
    let err = resolve(file, None, &Overrides::default(), &env).unwrap_err();
    assert!(
        err.message()
            .starts_with("invalid value for `sockets` in [plugins.p]: \"tcp:host:1\""),
        "{err}"
    );
    assert!(err.message().contains("valid forms:"), "{err}");
}

/// Configuration and the binder share one grammar: a spec that passes configuration binds, so
/// a Unix path naming a directory (which could never be bound) is refused here, naming the key
/// and the value.
#[test]
fn a_unix_socket_path_naming_a_directory_is_refused_with_key_and_value() {
    let env = Env::default();
    for spec in ["unix:/run/x/", "unix:/"] {
        let mut file = FileConfig::default();
        file.plugins.insert(
            "p".to_owned(),
            PluginConfig {
                sockets: Some(vec![spec.to_owned()]),
                ..PluginConfig::default()
            },
        );
        let err = resolve(file, None, &Overrides::default(), &env).unwrap_err();
        let expected = format!("invalid value for `sockets` in [plugins.p]: {spec:?}; ");
        assert!(err.message().starts_with(&expected), "{err}");
        assert!(
            err.message().contains("names a directory, not a file"),
            "{err}"
        );
        assert_eq!(err.exit_code(), 78);
    }
}

#[test]
fn effective_toml_round_trips_to_an_equal_config() {
    let text = r#"
[hot_reload]
enabled = false
exclude_patterns = []
[supervisor]
restart = "always"
[control]
group = ""
mode = "0600"
[plugins.p]
args = ["--verbose"]
env = { RUST_LOG = "debug" }
config = { preset = "fast", when = 2026-11-27T22:30:45Z, nested = { list = [1.5, "x"] } }
watchdog_ms = 0
sockets = []
[plugins."a.b"]
exec = "./bin/ab"
[plugins.proto]
ready = "notify"
strategy = "start-stop"
sockets = ["tcp:127.0.0.1:9000", "tcp:[::1]:9000", "tcp:localhost:0", "unix:/run/hotreload/proto.sock"]
watchdog_ms = 500
fdstore_max = 4
ready_timeout_ms = 3000
[hooks]
on_reload_start = ["/usr/local/bin/notify-reload", "start"]
on_reload_success = ["notify-reload", "ok", "with \"quotes\" and 'apostrophes'"]
on_reload_failure = ["/bin/sh", "-c", "echo failed", ""]
timeout_ms = 2500
"#;
    let env = user_env(
        Path::new("/t"),
        &[
            ("HOTRELOAD_WATCH", "off"),
            ("HOTRELOAD_DEBOUNCE_MS", "42"),
            ("STATE_DIRECTORY", "/sd"),
        ],
    );
    let file = parse_valid(text);
    let config = resolve(file, Some("/t/h.toml".into()), &Overrides::default(), &env).unwrap();
    assert_eq!(config.hot_reload.debounce_delay_ms, 42);
    let again = round_trip(&config, &env);
    assert_eq!(again, config);
    assert_eq!(again.to_effective_toml(), config.to_effective_toml());
    assert_eq!(again.plugin("p"), config.plugin("p"));
    assert_eq!(again.plugin("a.b").exec, PathBuf::from("./bin/ab"));
    let proto = again.plugin("proto");
    assert_eq!(proto, config.plugin("proto"));
    assert_eq!(
        (proto.ready, proto.strategy),
        (ReadyMode::Notify, Strategy::StartStop)
    );
    assert_eq!(proto.sockets.len(), 4);
    assert_eq!(
        proto.sockets[3].to_string(),
        "unix:/run/hotreload/proto.sock"
    );
    assert_eq!((proto.watchdog_ms, proto.fdstore_max), (500, 4));
    assert_eq!(proto.ready_timeout_ms, 3000);
    assert_eq!(again.hooks.timeout_ms, 2500);
    assert_eq!(
        again.hooks.on_reload_failure.as_deref(),
        Some(
            ["/bin/sh", "-c", "echo failed", ""]
                .map(String::from)
                .as_slice()
        )
    );
    assert_eq!(again.hooks, config.hooks);
    assert!(
        config
            .to_effective_toml()
            .contains("# watching (HOTRELOAD_WATCH): off")
    );

    let defaults = resolve(FileConfig::default(), None, &Overrides::default(), &env).unwrap();
    assert_eq!(round_trip(&defaults, &env), defaults);
}

#[test]
fn client_socket_precedence() {
    let tmp = TempDir::new("client");
    let path = tmp.write(
        "home/.config/hotreload/hotreload.toml",
        "[control]\nsocket = \"/cfg/s.sock\"\n",
    );
    assert!(path.exists());
    let env = user_env(&tmp.0, &[("HOTRELOAD_SOCKET", "env.sock")]);
    assert_eq!(
        client_socket(Some(Path::new("/cli.sock")), &env).unwrap(),
        Path::new("/cli.sock")
    );
    assert_eq!(
        client_socket(None, &env).unwrap(),
        tmp.0.join("cwd/env.sock")
    );
    let env = user_env(&tmp.0, &[]);
    assert_eq!(client_socket(None, &env).unwrap(), Path::new("/cfg/s.sock"));
    fs::remove_file(&path).unwrap();
    assert_eq!(
        client_socket(None, &env).unwrap(),
        Path::new("/tmp/hotreload-1000/control.sock")
    );
    // With $HOTRELOAD_SOCKET the config is not read at all, so a broken one does not matter.
    tmp.write("home/.config/hotreload/hotreload.toml", "bogus = 1\n");
    assert!(client_socket(None, &env).is_err());
    let env = user_env(&tmp.0, &[("HOTRELOAD_SOCKET", "/e.sock")]);
    assert_eq!(client_socket(None, &env).unwrap(), Path::new("/e.sock"));
}

#[test]
fn plugin_accounts_are_the_daemons_business_not_the_clients() {
    let tmp = TempDir::new("accounts");
    let file = tmp.write(
        "home/.config/hotreload/hotreload.toml",
        "[control]\nsocket = \"/cfg/s.sock\"\n[plugins.p]\nuser = \"root\"\n",
    );
    // euid 1000 in the snapshot: the daemon could not switch to root, the client need not.
    let env = user_env(&tmp.0, &[]);
    assert_eq!(client_socket(None, &env).unwrap(), Path::new("/cfg/s.sock"));
    let err = load(&Overrides::default(), &env).unwrap_err();
    assert!(
        err.message().contains(
            "invalid value for `user` in [plugins.p]: \"root\"; only a daemon running as root"
        ),
        "{err}"
    );
    let root = Env { euid: 0, ..env };
    let config = load(&config_flag(&file), &root).unwrap();
    let run_as = config
        .plugin("p")
        .run_as
        .expect("resolved for a root daemon");
    assert_eq!(
        (run_as.user.as_str(), run_as.uid, run_as.gid),
        ("root", 0, 0)
    );
    assert_eq!(config.plugin("other").run_as, None);
}
