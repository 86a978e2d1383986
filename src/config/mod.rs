//! Configuration of hotreloadd: `hotreload.toml`, the environment and the command line, resolved
//! into one immutable [`Config`] (SPEC §2, §3).
//!
//! Precedence is built-in defaults < config file < environment < command line. The pieces:
//! - [`parse`] (pure): TOML text to a validated [`FileConfig`], errors at `file:line:column`;
//! - [`resolve`] (pure): a `FileConfig` plus the [`Env`] snapshot and [`Overrides`] to a `Config`;
//! - [`load`]: picks and reads the file, then the two above, then resolves the plugins' `user`
//!   and `group` ([`accounts`]). It is the only I/O here.
//!
//! Any [`ConfigError`] means exit 78 at start-up, and "keep the running configuration" on
//! `SIGHUP`/`reload-config`. Relative paths, whether from the file, the command line or
//! `$HOTRELOAD_CONFIG`/`$HOTRELOAD_SOCKET`, are resolved against the working directory (the SPEC
//! defaults `plugins_dir` to `./plugins` of the working directory), never against the file's dir.

pub mod accounts;
mod effective;
mod error;
mod file;
mod locate;
mod matchers;
mod parse;
mod plugin;
mod socket_spec;
mod validate;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

pub use accounts::RunAs;
pub use error::ConfigError;
pub use file::{
    ControlFile, DEFAULT_FDSTORE_MAX, FileConfig, HookSettings, HotReload, PluginConfig, ReadyMode,
    RestartPolicy, StopSignal, Strategy, SupervisorSettings, WatchMode,
};
pub use locate::{
    CONFIG_FILE_NAME, ConfigFile, ConfigFileOrigin, Env, MAX_SOCKET_PATH_BYTES, Overrides,
    SOCKET_FILE_NAME, absolutize, locate_config_file, vars,
};
pub use matchers::Matchers;
pub use parse::parse;
pub use plugin::PluginSettings;
pub use socket_spec::{SocketSpec, parse_socket_spec, valid_socket_spec};
pub use validate::{
    MAX_FDSTORE, MAX_LINE_BYTES, MAX_MILLIS, MIN_LINE_BYTES, parse_mode, valid_plugin_id,
};

/// The resolved configuration the daemon runs with.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The config file actually read; `None` = built-in defaults.
    pub source: Option<PathBuf>,
    /// Absolute.
    pub plugins_dir: PathBuf,
    /// Absolute.
    pub runtime_dir: PathBuf,
    /// Absolute.
    pub state_dir: PathBuf,
    /// Absolute control socket path.
    pub socket: PathBuf,
    /// `false` when `HOTRELOAD_WATCH` is off: no inotify watches at all, the daemon only supervises.
    pub watch_enabled: bool,
    /// `[hot_reload]` with `HOTRELOAD_ENABLED`/`HOTRELOAD_DEBOUNCE_MS` applied.
    pub hot_reload: HotReload,
    pub supervisor: SupervisorSettings,
    pub control: ControlSettings,
    /// The `[plugins.<id>]` tables written in the file, each completed with its effective values
    /// (so the configuration is a fixpoint of `to_effective_toml` + `parse`).
    pub plugins: BTreeMap<String, PluginConfig>,
    /// Compiled `watch_patterns`/`exclude_patterns`.
    pub matchers: Matchers,
    /// `[hooks]`: commands run on reload events.
    pub hooks: HookSettings,
    /// The accounts of plugins with `user`/`group`, by id: filled by [`load`] (empty after
    /// [`resolve`] alone, which reads nothing from the system).
    pub accounts: BTreeMap<String, RunAs>,
}

/// `[control]` without the socket path (that is [`Config::socket`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlSettings {
    /// Socket file mode, parsed from the octal string ("0660").
    pub mode: u32,
    /// Socket file group; `None` (written `group = ""`) leaves the group alone.
    pub group: Option<String>,
    pub max_clients: usize,
    pub max_line_bytes: usize,
}

impl Config {
    /// The effective settings of plugin `id`: defaults when it has no `[plugins.<id>]` table.
    pub fn plugin(&self, id: &str) -> PluginSettings {
        let mut settings = plugin::settings(id, self.plugins.get(id), &self.supervisor);
        settings.run_as = self.accounts.get(id).cloned();
        settings
    }
}

/// Resolves a parsed file with the environment and command line. Pure; `source` is recorded as is.
pub fn resolve(
    file: FileConfig,
    source: Option<PathBuf>,
    overrides: &Overrides,
    env: &Env,
) -> Result<Config, ConfigError> {
    locate::check_overrides(overrides)?;
    check_file(&file, source.as_deref())?;
    let mut hot_reload = file.hot_reload.clone();
    if let Some(enabled) = locate::env_bool(env, vars::ENABLED)? {
        hot_reload.enabled = enabled;
    }
    if let Some(debounce) = locate::env_millis(env, vars::DEBOUNCE_MS)? {
        hot_reload.debounce_delay_ms = debounce;
    }
    let watch_enabled = locate::env_bool(env, vars::WATCH)?.unwrap_or(true);
    let runtime_dir = locate::runtime_dir(overrides, &file, env);
    let socket = locate::socket(overrides, &file, env, &runtime_dir);
    locate::check_socket_path(&socket)?;
    let plugins = file
        .plugins
        .iter()
        .map(|(id, table)| {
            (
                id.clone(),
                plugin::complete(id, Some(table), &file.supervisor),
            )
        })
        .collect();
    Ok(Config {
        plugins_dir: locate::plugins_dir(overrides, &file, env),
        state_dir: locate::state_dir(overrides, &file, env)?,
        runtime_dir,
        socket,
        watch_enabled,
        matchers: Matchers::new(&hot_reload.watch_patterns, &hot_reload.exclude_patterns)?,
        hot_reload,
        control: control_settings(&file.control, source.as_deref())?,
        supervisor: file.supervisor,
        hooks: file.hooks,
        plugins,
        source,
        accounts: BTreeMap::new(),
    })
}

/// Runs the value checks `parse` ran, for a `FileConfig` that did not come through `parse`.
fn check_file(file: &FileConfig, source: Option<&Path>) -> Result<(), ConfigError> {
    validate::validate(file).map_err(|problem| match source {
        Some(path) => ConfigError::new(format!("{}: {}", path.display(), problem.message)),
        None => ConfigError::new(problem.message),
    })
}

fn control_settings(
    control: &ControlFile,
    source: Option<&Path>,
) -> Result<ControlSettings, ConfigError> {
    let mode = parse_mode(&control.mode).map_err(|detail| {
        let origin = source.map_or_else(String::new, |path| format!("{}: ", path.display()));
        ConfigError::new(format!(
            "{origin}invalid value for `mode` in [control]: {detail}"
        ))
    })?;
    Ok(ControlSettings {
        mode,
        group: Some(control.group.clone()).filter(|group| !group.is_empty()),
        max_clients: control.max_clients,
        max_line_bytes: control.max_line_bytes,
    })
}

/// Resolves everything: picks the config file per SPEC §2 and reads it (a missing implicit file
/// means defaults, a missing explicit one is an error), then applies the environment and
/// `overrides`, and resolves the plugins' `user`/`group` for a daemon running as `env.euid`.
pub fn load(overrides: &Overrides, env: &Env) -> Result<Config, ConfigError> {
    let mut config = load_file(overrides, env)?;
    let egid = nix::unistd::getegid().as_raw();
    config.accounts = accounts::resolve(&config, env.euid, egid)?;
    Ok(config)
}

/// [`load`] without resolving accounts: what a client needs (a `user` it could not switch to is
/// the daemon's business, not the client's).
fn load_file(overrides: &Overrides, env: &Env) -> Result<Config, ConfigError> {
    locate::check_overrides(overrides)?;
    let chosen = locate_config_file(overrides, env);
    let text = match &chosen {
        Some(file) => read_config_file(file, env)?,
        None => None,
    };
    match (chosen, text) {
        (Some(file), Some(text)) => {
            let parsed = parse(&text, &file.path)?;
            resolve(parsed, Some(file.path), overrides, env)
        }
        _ => resolve(FileConfig::default(), None, overrides, env),
    }
}

/// The file's text; `None` when an implicit file does not exist.
fn read_config_file(file: &ConfigFile, env: &Env) -> Result<Option<String>, ConfigError> {
    let shown = file.path.display();
    match std::fs::read_to_string(&file.path) {
        Ok(text) => Ok(Some(text)),
        Err(error) if error.kind() == io::ErrorKind::NotFound && !file.is_explicit() => Ok(None),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            let named_by = match file.origin {
                ConfigFileOrigin::Environment => {
                    let value = env.get(vars::CONFIG).unwrap_or_default();
                    format!("${}={value}", vars::CONFIG)
                }
                _ => "--config".to_owned(),
            };
            Err(ConfigError::new(format!(
                "config file `{shown}` (named by {named_by}) does not exist; create it or name another file"
            )))
        }
        Err(error) => Err(ConfigError::new(format!(
            "cannot read config file `{shown}`: {error}"
        ))),
    }
}

/// The socket `hotreloadctl` talks to: `--socket`, then `$HOTRELOAD_SOCKET` (neither reads the
/// config), else what [`load`] resolves.
pub fn client_socket(cli_socket: Option<&Path>, env: &Env) -> Result<PathBuf, ConfigError> {
    if let Some(path) = cli_socket {
        return Ok(absolutize(&env.cwd, path));
    }
    if let Some(path) = env.get(vars::SOCKET) {
        return Ok(absolutize(&env.cwd, Path::new(path)));
    }
    load_file(&Overrides::default(), env).map(|config| config.socket)
}

#[cfg(test)]
mod tests;
