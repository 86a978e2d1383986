//! `Config::to_effective_toml`: the resolved configuration written back as `hotreload.toml`
//! (what `hotreloadd --check-config` prints).
//!
//! Every key appears with its effective value, including the resolved directories and socket,
//! so the output read back through `parse` + `resolve` (with the same environment) gives an equal
//! `Config`. The environment-only switch `HOTRELOAD_WATCH` has no key and is shown as a comment.

use std::path::{Path, PathBuf};

use super::file::{ControlFile, FileConfig};
use super::{Config, vars};

impl Config {
    /// The effective configuration as TOML, every key with its value. Paths that are not UTF-8
    /// (possible from the command line, impossible in TOML) are shown lossily.
    pub fn to_effective_toml(&self) -> String {
        let body = toml::to_string(&self.to_file_config()).unwrap_or_else(|error| {
            format!("# cannot render the effective configuration: {error}\n")
        });
        format!("{}\n{body}", self.effective_header())
    }

    fn effective_header(&self) -> String {
        let source = match &self.source {
            Some(path) => format!("# read from {}", path.display()),
            None => "# no config file: built-in defaults".to_owned(),
        };
        let watch = if self.watch_enabled {
            "on"
        } else {
            "off (no inotify watches; hot_reload.enabled has no effect)"
        };
        let mut header = format!(
            "# effective configuration of hotreloadd {}\n{source}\n# watching ({}): {watch}\n",
            env!("CARGO_PKG_VERSION"),
            vars::WATCH,
        );
        for (id, run_as) in &self.accounts {
            let groups: Vec<String> = run_as.groups.iter().map(u32::to_string).collect();
            header.push_str(&format!(
                "# plugin {id} runs as user {} (uid {}, gid {}, groups {})\n",
                run_as.user,
                run_as.uid,
                run_as.gid,
                groups.join(",")
            ));
        }
        header
    }

    /// The configuration as a file that sets every key explicitly.
    fn to_file_config(&self) -> FileConfig {
        FileConfig {
            plugins_dir: Some(lossy(&self.plugins_dir)),
            runtime_dir: Some(lossy(&self.runtime_dir)),
            state_dir: Some(lossy(&self.state_dir)),
            hot_reload: self.hot_reload.clone(),
            supervisor: self.supervisor.clone(),
            control: ControlFile {
                socket: Some(lossy(&self.socket)),
                mode: format!("{:04o}", self.control.mode),
                group: self.control.group.clone().unwrap_or_default(),
                max_clients: self.control.max_clients,
                max_line_bytes: self.control.max_line_bytes,
            },
            plugins: self.plugins.clone(),
            hooks: self.hooks.clone(),
        }
    }
}

fn lossy(path: &Path) -> PathBuf {
    PathBuf::from(path.to_string_lossy().into_owned())
}
