//! Where things live (SPEC §2) and what the environment says (SPEC §3 environment table).
//!
//! Everything here is pure: the process environment arrives as an [`Env`] snapshot, so tests
//! describe a whole situation (euid, cwd, home, variables) without touching the real process.
//! Each location has its own order of sources; the functions below follow the SPEC table row by
//! row, and the unit tests walk each row.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::error::ConfigError;
use super::file::FileConfig;
use super::validate::MAX_MILLIS;

/// Names of the environment variables the configuration reads.
pub mod vars {
    pub const CONFIG: &str = "HOTRELOAD_CONFIG";
    pub const ENABLED: &str = "HOTRELOAD_ENABLED";
    pub const DEBOUNCE_MS: &str = "HOTRELOAD_DEBOUNCE_MS";
    pub const WATCH: &str = "HOTRELOAD_WATCH";
    pub const SOCKET: &str = "HOTRELOAD_SOCKET";
    pub const CONFIGURATION_DIRECTORY: &str = "CONFIGURATION_DIRECTORY";
    pub const RUNTIME_DIRECTORY: &str = "RUNTIME_DIRECTORY";
    pub const STATE_DIRECTORY: &str = "STATE_DIRECTORY";
    pub const XDG_CONFIG_HOME: &str = "XDG_CONFIG_HOME";
    pub const XDG_RUNTIME_DIR: &str = "XDG_RUNTIME_DIR";
    pub const XDG_STATE_HOME: &str = "XDG_STATE_HOME";
}

/// File name of the configuration file in every configuration directory.
pub const CONFIG_FILE_NAME: &str = "hotreload.toml";
/// File name of the control socket inside the runtime directory.
pub const SOCKET_FILE_NAME: &str = "control.sock";
/// Longest path `bind(2)`/`connect(2)` accept for a Unix socket (`sun_path` is 108 bytes with NUL).
pub const MAX_SOCKET_PATH_BYTES: usize = 107;

/// Snapshot of what config resolution reads from the process: env vars, euid, cwd, home.
#[derive(Clone, Debug, Default)]
pub struct Env {
    pub vars: HashMap<String, String>,
    pub euid: u32,
    pub cwd: PathBuf,
    pub home: Option<PathBuf>,
}

impl Env {
    /// Reads the real process. Variables that are not valid UTF-8 are kept lossily converted, so a
    /// mangled `$HOTRELOAD_CONFIG` shows up as a missing file rather than being silently ignored.
    pub fn from_process() -> Env {
        let vars: HashMap<String, String> = std::env::vars_os()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.to_string_lossy().into_owned(),
                )
            })
            .collect();
        let euid = nix::unistd::geteuid();
        // A deleted working directory makes current_dir() fail; $PWD is the shell's idea of it,
        // and "/" at least keeps relative paths absolute (they will then fail loudly when used).
        let cwd = std::env::current_dir().unwrap_or_else(|_| {
            vars.get("PWD")
                .map(PathBuf::from)
                .filter(|pwd| pwd.is_absolute())
                .unwrap_or_else(|| PathBuf::from("/"))
        });
        let home_var = vars
            .get("HOME")
            .map(PathBuf::from)
            .filter(|home| home.is_absolute());
        let home = home_var.or_else(|| {
            nix::unistd::User::from_uid(euid)
                .ok()
                .flatten()
                .map(|user| user.dir)
                .filter(|dir| dir.is_absolute())
        });
        Env {
            vars,
            euid: euid.as_raw(),
            cwd,
            home,
        }
    }

    /// The value of a variable; an empty value counts as unset (as `VAR=` in a unit file means).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars
            .get(key)
            .map(String::as_str)
            .filter(|value| !value.is_empty())
    }

    /// A path variable, made absolute against the working directory.
    fn path(&self, key: &str) -> Option<PathBuf> {
        self.get(key)
            .map(|value| absolutize(&self.cwd, Path::new(value)))
    }

    /// First entry of a systemd directory list (`RuntimeDirectory=a b` gives `/run/a:/run/b`).
    fn first_listed_dir(&self, key: &str) -> Option<PathBuf> {
        let first = self.get(key)?.split(':').find(|entry| !entry.is_empty())?;
        Some(absolutize(&self.cwd, Path::new(first)))
    }

    /// An XDG base directory: only an absolute value counts (the XDG spec says to ignore relative
    /// ones), else `$HOME/<fallback>`.
    fn xdg_dir(&self, key: &str, home_fallback: &str) -> Option<PathBuf> {
        let set = self
            .get(key)
            .map(PathBuf::from)
            .filter(|dir| dir.is_absolute());
        set.or_else(|| self.home.as_ref().map(|home| home.join(home_fallback)))
    }

    fn is_root(&self) -> bool {
        self.euid == 0
    }
}

/// Command-line overrides (the binary parses argv with clap and fills this).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub plugins_dir: Option<PathBuf>,
    pub runtime_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
}

/// How the config file was chosen, which decides what a missing file means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigFileOrigin {
    /// `--config`: must exist.
    CommandLine,
    /// `$HOTRELOAD_CONFIG`: must exist.
    Environment,
    /// A default location: missing means built-in defaults.
    Implicit,
}

/// The config file `load` reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub origin: ConfigFileOrigin,
}

impl ConfigFile {
    /// Whether a missing file is an error (it was named explicitly).
    pub fn is_explicit(&self) -> bool {
        self.origin != ConfigFileOrigin::Implicit
    }
}

/// Joins a relative path to `base` and drops `.` components; `..` is kept (it may cross a symlink).
pub fn absolutize(base: &Path, path: &Path) -> PathBuf {
    base.join(path).components().collect()
}

/// Picks the config file (SPEC §2, first match wins): `--config`; `$HOTRELOAD_CONFIG`;
/// `$CONFIGURATION_DIRECTORY/hotreload.toml`; `/etc/hotreload/hotreload.toml` when euid is 0;
/// `$XDG_CONFIG_HOME/hotreload/hotreload.toml` (default `~/.config/...`). A rule matches when its
/// condition holds, not when its file exists: a systemd unit's empty configuration directory means
/// defaults, not a fallback to a file elsewhere. `None` only without any home directory.
pub fn locate_config_file(overrides: &Overrides, env: &Env) -> Option<ConfigFile> {
    let file = |path: PathBuf, origin| Some(ConfigFile { path, origin });
    if let Some(path) = &overrides.config {
        return file(absolutize(&env.cwd, path), ConfigFileOrigin::CommandLine);
    }
    if let Some(path) = env.path(vars::CONFIG) {
        return file(path, ConfigFileOrigin::Environment);
    }
    if let Some(dir) = env.first_listed_dir(vars::CONFIGURATION_DIRECTORY) {
        return file(dir.join(CONFIG_FILE_NAME), ConfigFileOrigin::Implicit);
    }
    if env.is_root() {
        return file(
            Path::new("/etc/hotreload").join(CONFIG_FILE_NAME),
            ConfigFileOrigin::Implicit,
        );
    }
    let dir = env.xdg_dir(vars::XDG_CONFIG_HOME, ".config")?;
    file(
        dir.join("hotreload").join(CONFIG_FILE_NAME),
        ConfigFileOrigin::Implicit,
    )
}

/// `--plugins-dir`; config `plugins_dir`; `./plugins`. Relative values (also in the file) are
/// taken against the working directory, as the SPEC's default `./plugins` is.
pub fn plugins_dir(overrides: &Overrides, file: &FileConfig, env: &Env) -> PathBuf {
    let chosen = overrides
        .plugins_dir
        .as_deref()
        .or(file.plugins_dir.as_deref());
    absolutize(&env.cwd, chosen.unwrap_or(Path::new("plugins")))
}

/// `--runtime-dir`; config `runtime_dir`; `$RUNTIME_DIRECTORY`; `/run/hotreload` for root;
/// `$XDG_RUNTIME_DIR/hotreload`; `/tmp/hotreload-<euid>` (which the daemon creates with mode 0700).
pub fn runtime_dir(overrides: &Overrides, file: &FileConfig, env: &Env) -> PathBuf {
    if let Some(dir) = overrides
        .runtime_dir
        .as_deref()
        .or(file.runtime_dir.as_deref())
    {
        return absolutize(&env.cwd, dir);
    }
    if let Some(dir) = env.first_listed_dir(vars::RUNTIME_DIRECTORY) {
        return dir;
    }
    if env.is_root() {
        return PathBuf::from("/run/hotreload");
    }
    let xdg = env
        .get(vars::XDG_RUNTIME_DIR)
        .map(PathBuf::from)
        .filter(|dir| dir.is_absolute());
    match xdg {
        Some(dir) => dir.join("hotreload"),
        None => PathBuf::from(format!("/tmp/hotreload-{}", env.euid)),
    }
}

/// `--state-dir`; config `state_dir`; `$STATE_DIRECTORY`; `/var/lib/hotreload` for root;
/// `$XDG_STATE_HOME/hotreload` (default `~/.local/state/hotreload`).
pub fn state_dir(
    overrides: &Overrides,
    file: &FileConfig,
    env: &Env,
) -> Result<PathBuf, ConfigError> {
    if let Some(dir) = overrides.state_dir.as_deref().or(file.state_dir.as_deref()) {
        return Ok(absolutize(&env.cwd, dir));
    }
    if let Some(dir) = env.first_listed_dir(vars::STATE_DIRECTORY) {
        return Ok(dir);
    }
    if env.is_root() {
        return Ok(PathBuf::from("/var/lib/hotreload"));
    }
    match env.xdg_dir(vars::XDG_STATE_HOME, ".local/state") {
        Some(dir) => Ok(dir.join("hotreload")),
        None => Err(ConfigError::new(
            "cannot choose a state directory: neither $XDG_STATE_HOME nor a home directory is set; \
             pass --state-dir or set state_dir in the config file",
        )),
    }
}

/// `--socket`; `$HOTRELOAD_SOCKET`; config `control.socket`; `<runtime dir>/control.sock`.
pub fn socket(overrides: &Overrides, file: &FileConfig, env: &Env, runtime_dir: &Path) -> PathBuf {
    if let Some(path) = &overrides.socket {
        return absolutize(&env.cwd, path);
    }
    if let Some(path) = env.path(vars::SOCKET) {
        return path;
    }
    match &file.control.socket {
        Some(path) => absolutize(&env.cwd, path),
        None => runtime_dir.join(SOCKET_FILE_NAME),
    }
}

/// Rejects a socket path `bind(2)` cannot take, while the fix is still a configuration change.
pub fn check_socket_path(path: &Path) -> Result<(), ConfigError> {
    let length = path.as_os_str().len();
    if length <= MAX_SOCKET_PATH_BYTES {
        return Ok(());
    }
    Err(ConfigError::new(format!(
        "control socket path `{}` is {length} bytes; Unix socket paths are limited to \
         {MAX_SOCKET_PATH_BYTES} bytes: choose a shorter --socket, control.socket or runtime directory",
        path.display()
    )))
}

/// Rejects empty command-line paths (`--state-dir ""`), which would otherwise mean the cwd.
pub fn check_overrides(overrides: &Overrides) -> Result<(), ConfigError> {
    let named = [
        ("--config", &overrides.config),
        ("--plugins-dir", &overrides.plugins_dir),
        ("--runtime-dir", &overrides.runtime_dir),
        ("--state-dir", &overrides.state_dir),
        ("--socket", &overrides.socket),
    ];
    for (flag, value) in named {
        if value
            .as_ref()
            .is_some_and(|path| path.as_os_str().is_empty())
        {
            return Err(ConfigError::new(format!("{flag} \"\": expected a path")));
        }
    }
    Ok(())
}

/// A boolean variable: `true/false/1/0/yes/no/on/off`, any case. `None` when unset or empty.
pub fn env_bool(env: &Env, key: &str) -> Result<Option<bool>, ConfigError> {
    let Some(value) = env.get(key) else {
        return Ok(None);
    };
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(Some(true)),
        "false" | "0" | "no" | "off" => Ok(Some(false)),
        _ => Err(ConfigError::new(format!(
            "invalid {key}={value:?}: expected one of true, false, 1, 0, yes, no, on, off"
        ))),
    }
}

/// A millisecond variable: a whole number from 0 to one day. `None` when unset or empty.
pub fn env_millis(env: &Env, key: &str) -> Result<Option<u64>, ConfigError> {
    let Some(value) = env.get(key) else {
        return Ok(None);
    };
    match value.parse::<u64>() {
        Ok(millis) if millis <= MAX_MILLIS => Ok(Some(millis)),
        _ => Err(ConfigError::new(format!(
            "invalid {key}={value:?}: expected a whole number of milliseconds from 0 to {MAX_MILLIS} (one day)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user_env(vars: &[(&str, &str)]) -> Env {
        Env {
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            euid: 1000,
            cwd: PathBuf::from("/work"),
            home: Some(PathBuf::from("/home/u")),
        }
    }

    fn root_env(vars: &[(&str, &str)]) -> Env {
        Env {
            euid: 0,
            home: Some(PathBuf::from("/root")),
            ..user_env(vars)
        }
    }

    fn config_path(overrides: &Overrides, env: &Env) -> Option<(PathBuf, ConfigFileOrigin)> {
        locate_config_file(overrides, env).map(|file| (file.path, file.origin))
    }

    #[test]
    fn config_file_order() {
        use ConfigFileOrigin::*;
        let cli = Overrides {
            config: Some("rel/c.toml".into()),
            ..Overrides::default()
        };
        let all = [
            ("HOTRELOAD_CONFIG", "/env/c.toml"),
            ("CONFIGURATION_DIRECTORY", "/etc/sd:/etc/other"),
            ("XDG_CONFIG_HOME", "/xdg"),
        ];
        let env = root_env(&all);
        assert_eq!(
            config_path(&cli, &env),
            Some(("/work/rel/c.toml".into(), CommandLine))
        );
        let none = Overrides::default();
        assert_eq!(
            config_path(&none, &env),
            Some(("/env/c.toml".into(), Environment))
        );
        let env = root_env(&all[1..]);
        assert_eq!(
            config_path(&none, &env),
            Some(("/etc/sd/hotreload.toml".into(), Implicit))
        );
        let env = root_env(&all[2..]);
        assert_eq!(
            config_path(&none, &env),
            Some(("/etc/hotreload/hotreload.toml".into(), Implicit))
        );
        let env = user_env(&all[2..]);
        assert_eq!(
            config_path(&none, &env),
            Some(("/xdg/hotreload/hotreload.toml".into(), Implicit))
        );
        let env = user_env(&[]);
        assert_eq!(
            config_path(&none, &env),
            Some(("/home/u/.config/hotreload/hotreload.toml".into(), Implicit))
        );
        let env = user_env(&[("XDG_CONFIG_HOME", "relative"), ("HOTRELOAD_CONFIG", "")]);
        assert_eq!(
            config_path(&none, &env),
            Some(("/home/u/.config/hotreload/hotreload.toml".into(), Implicit))
        );
        let homeless = Env {
            home: None,
            ..user_env(&[])
        };
        assert_eq!(config_path(&none, &homeless), None);
        assert!(locate_config_file(&cli, &env).unwrap().is_explicit());
    }

    #[test]
    fn plugins_dir_order() {
        let env = user_env(&[]);
        let file = FileConfig {
            plugins_dir: Some("from-file".into()),
            ..FileConfig::default()
        };
        let cli = Overrides {
            plugins_dir: Some("/cli".into()),
            ..Overrides::default()
        };
        assert_eq!(plugins_dir(&cli, &file, &env), Path::new("/cli"));
        assert_eq!(
            plugins_dir(&Overrides::default(), &file, &env),
            Path::new("/work/from-file")
        );
        assert_eq!(
            plugins_dir(&Overrides::default(), &FileConfig::default(), &env),
            Path::new("/work/plugins")
        );
    }

    #[test]
    fn runtime_dir_order() {
        let none = Overrides::default();
        let defaults = FileConfig::default();
        let vars = [
            ("RUNTIME_DIRECTORY", "/run/sd:/run/b"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
        ];
        let file = FileConfig {
            runtime_dir: Some("/file".into()),
            ..FileConfig::default()
        };
        let cli = Overrides {
            runtime_dir: Some("/cli".into()),
            ..Overrides::default()
        };
        assert_eq!(
            runtime_dir(&cli, &file, &root_env(&vars)),
            Path::new("/cli")
        );
        // The config key beats systemd's $RUNTIME_DIRECTORY.
        assert_eq!(
            runtime_dir(&none, &file, &root_env(&vars)),
            Path::new("/file")
        );
        assert_eq!(
            runtime_dir(&none, &defaults, &root_env(&vars)),
            Path::new("/run/sd")
        );
        assert_eq!(
            runtime_dir(&none, &defaults, &root_env(&vars[1..])),
            Path::new("/run/hotreload")
        );
        assert_eq!(
            runtime_dir(&none, &defaults, &user_env(&vars[1..])),
            Path::new("/run/user/1000/hotreload")
        );
        assert_eq!(
            runtime_dir(&none, &defaults, &user_env(&[])),
            Path::new("/tmp/hotreload-1000")
        );
        let relative_xdg = [("XDG_RUNTIME_DIR", "run")];
        assert_eq!(
            runtime_dir(&none, &defaults, &user_env(&relative_xdg)),
            Path::new("/tmp/hotreload-1000")
        );
    }

    #[test]
    fn state_dir_order() {
        let none = Overrides::default();
        let defaults = FileConfig::default();
        let vars = [
            ("STATE_DIRECTORY", ":/var/lib/sd"),
            ("XDG_STATE_HOME", "/xdg-state"),
        ];
        let file = FileConfig {
            state_dir: Some("st".into()),
            ..FileConfig::default()
        };
        let cli = Overrides {
            state_dir: Some("/cli".into()),
            ..Overrides::default()
        };
        let state = |o: &Overrides, f: &FileConfig, e: &Env| state_dir(o, f, e).unwrap();
        assert_eq!(state(&cli, &file, &root_env(&vars)), Path::new("/cli"));
        assert_eq!(state(&none, &file, &root_env(&vars)), Path::new("/work/st"));
        assert_eq!(
            state(&none, &defaults, &root_env(&vars)),
            Path::new("/var/lib/sd")
        );
        assert_eq!(
            state(&none, &defaults, &root_env(&vars[1..])),
            Path::new("/var/lib/hotreload")
        );
        assert_eq!(
            state(&none, &defaults, &user_env(&vars[1..])),
            Path::new("/xdg-state/hotreload")
        );
        assert_eq!(
            state(&none, &defaults, &user_env(&[])),
            Path::new("/home/u/.local/state/hotreload")
        );
        let homeless = Env {
            home: None,
            ..user_env(&[])
        };
        let err = state_dir(&none, &defaults, &homeless).unwrap_err();
        assert!(err.message().contains("--state-dir"), "{err}");
    }

    #[test]
    fn socket_order() {
        let run = Path::new("/run/x");
        let vars = [("HOTRELOAD_SOCKET", "env.sock")];
        let mut file = FileConfig::default();
        file.control.socket = Some("/file.sock".into());
        let cli = Overrides {
            socket: Some("/cli.sock".into()),
            ..Overrides::default()
        };
        let none = Overrides::default();
        assert_eq!(
            socket(&cli, &file, &user_env(&vars), run),
            Path::new("/cli.sock")
        );
        // $HOTRELOAD_SOCKET beats the config key.
        assert_eq!(
            socket(&none, &file, &user_env(&vars), run),
            Path::new("/work/env.sock")
        );
        assert_eq!(
            socket(&none, &file, &user_env(&[]), run),
            Path::new("/file.sock")
        );
        assert_eq!(
            socket(&none, &FileConfig::default(), &user_env(&[]), run),
            Path::new("/run/x/control.sock")
        );
    }

    #[test]
    fn absolutize_keeps_absolute_paths_and_drops_dots() {
        assert_eq!(
            absolutize(Path::new("/w"), Path::new("./plugins/")),
            Path::new("/w/plugins")
        );
        assert_eq!(
            absolutize(Path::new("/w"), Path::new("/abs/./x")),
            Path::new("/abs/x")
        );
        assert_eq!(
            absolutize(Path::new("/w"), Path::new("../x")),
            Path::new("/w/../x")
        );
    }

    #[test]
    fn boolean_variables() {
        for (value, expected) in [
            ("TRUE", true),
            ("1", true),
            ("Yes", true),
            ("on", true),
            ("false", false),
            ("0", false),
            ("NO", false),
            ("Off", false),
        ] {
            assert_eq!(
                env_bool(&user_env(&[("V", value)]), "V"),
                Ok(Some(expected)),
                "{value}"
            );
        }
        assert_eq!(env_bool(&user_env(&[]), "V"), Ok(None));
        assert_eq!(env_bool(&user_env(&[("V", "")]), "V"), Ok(None));
        let err = env_bool(
            &user_env(&[("HOTRELOAD_WATCH", "maybe")]),
            "HOTRELOAD_WATCH",
        )
        .unwrap_err();
        assert_eq!(
            err.message(),
            "invalid HOTRELOAD_WATCH=\"maybe\": expected one of true, false, 1, 0, yes, no, on, off"
        );
    }

    #[test]
    fn millisecond_variables() {
        assert_eq!(env_millis(&user_env(&[("V", "0")]), "V"), Ok(Some(0)));
        assert_eq!(
            env_millis(&user_env(&[("V", "86400000")]), "V"),
            Ok(Some(MAX_MILLIS))
        );
        for bad in ["-1", "1.5", "5s", "86400001", " 5"] {
            let err = env_millis(
                &user_env(&[("HOTRELOAD_DEBOUNCE_MS", bad)]),
                "HOTRELOAD_DEBOUNCE_MS",
            )
            .unwrap_err();
            assert!(
                err.message().starts_with("invalid HOTRELOAD_DEBOUNCE_MS="),
                "{err}"
            );
            assert!(err.message().contains(bad), "{err}");
        }
    }

    #[test]
    fn long_socket_paths_are_rejected() {
        assert!(check_socket_path(Path::new("/run/hotreload/control.sock")).is_ok());
        let long = PathBuf::from(format!("/{}", "x".repeat(107)));
        assert!(
            check_socket_path(&long)
                .unwrap_err()
                .message()
                .contains("108 bytes")
        );
    }

    #[test]
    fn empty_overrides_are_rejected() {
        let cli = Overrides {
            state_dir: Some(PathBuf::new()),
            ..Overrides::default()
        };
        assert_eq!(
            check_overrides(&cli).unwrap_err().message(),
            "--state-dir \"\": expected a path"
        );
    }
}
