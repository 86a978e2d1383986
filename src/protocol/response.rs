//! The bodies of the daemon's answers (SPEC §6), typed. The daemon builds one of these for each
//! request and serialises it once ([`Response::to_line`]); `hotreloadctl` reads a reply back
//! into the same type, so a member renamed on one side cannot go unnoticed on the other.
//!
//! Members of each struct are declared in alphabetical order: the lines are byte for byte those
//! of the string-keyed maps they replaced (a `serde_json::Map` sorts its keys), so nothing a
//! script parsed or diffed changes. `Option` fields are always present, as `null` when unset,
//! exactly as SPEC §6 lists them. Reading is lenient: a member missing from a reply (a daemon
//! older than the client) reads as its default, so `hotreloadctl` keeps working across an
//! upgrade that restarts only one of the two.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ErrorCode, error_line, success};

/// `status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusReply {
    pub daemon: DaemonStatus,
    pub hot_reload: HotReloadStatus,
}

/// `status` → `"hot_reload"`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HotReloadStatus {
    /// Connected control clients, this one included.
    pub active_sessions: usize,
    pub debounce_delay_ms: u64,
    /// Whether builds landing on disk reload by themselves (false with `HOTRELOAD_WATCH=0`).
    pub enabled: bool,
    pub exclude_patterns: Vec<String>,
    pub failed_reloads: u64,
    /// RFC 3339, or `null` before the first reload.
    pub last_reload: Option<String>,
    pub reload_count: u64,
    pub watch_patterns: Vec<String>,
    /// Directories watched: the plugins dir (while present) and each plugin dir (not build dirs).
    pub watching_directories: usize,
    /// `auto`, `inotify` or `poll` (SPEC §5 "Watching beyond inotify").
    pub watch_mode: String,
    /// Directories polled rather than watched with inotify (plugins dir, plugin dirs, subdirs).
    pub polled_directories: usize,
    /// Subdirectories of plugin dirs watched (`watch_subdirs`), by inotify or polling.
    pub watching_subdirectories: usize,
}

/// `status` → `"daemon"`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DaemonStatus {
    pub pid: u32,
    /// Absolute.
    pub plugins_dir: String,
    /// Whether the plugins dir exists (and, when watching, is the one watched).
    pub plugins_dir_present: bool,
    pub plugins_running: usize,
    pub plugins_total: usize,
    pub uptime_ms: u64,
    pub version: String,
    /// Whether file watching is on at all (`HOTRELOAD_WATCH`).
    pub watch: bool,
}

/// `list`: every plugin, sorted by id.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ListReply {
    pub plugins: Vec<PluginInfo>,
}

/// One plugin, as `list` shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PluginInfo {
    /// CPU time of the plugin's processes, when its cgroup tells.
    pub cpu_usage_ms: Option<u64>,
    /// Absolute path of the executable in the plugin dir.
    pub exec: String,
    pub failed_reloads: u64,
    /// The plugin's own hot reload switch (`[plugins.ID] hot_reload`, `enable ID`/`disable ID`):
    /// its changes reload it when this and the global switch are both on. A daemon that predates
    /// the switch reloaded every plugin, so a missing member reads as on.
    #[serde(default = "switch_on")]
    pub hot_reload: bool,
    pub id: String,
    pub last_error: Option<String>,
    pub last_good_version: Option<String>,
    /// Memory of the plugin's processes, when its cgroup tells.
    pub memory_bytes: Option<u64>,
    pub pid: Option<i32>,
    pub reload_count: u64,
    pub restarts: u64,
    /// RFC 3339, while an instance runs.
    pub started_at: Option<String>,
    /// A state name of SPEC §5.
    pub state: String,
    /// The last `STATUS=` of the plugin.
    pub status_text: Option<String>,
    /// Live processes of the plugin (its instances and what they started).
    pub tasks: usize,
    pub version: Option<String>,
}

fn switch_on() -> bool {
    true
}

/// `plugin ID`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PluginReply {
    pub plugin: PluginDetail,
}

/// One plugin in detail: its `list` entry, its last reloads and its state file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, into = "Value")]
pub struct PluginDetail {
    #[serde(flatten)]
    pub info: PluginInfo,
    /// The last reloads, newest first.
    pub history: Vec<ReloadRecord>,
    /// The plugin's `state.json` as last written (`null` when there is none).
    pub state_file: Value,
    /// How the plugin's directory is watched: `inotify`, `poll`, or null when it is not.
    pub watched_by: Option<String>,
    /// Why it is polled (null unless it is).
    pub poll_reason: Option<String>,
}

/// [`PluginDetail`] as written: through a map, so `history` and `state_file` sort among the
/// `list` members as they always did (a flattened struct would put them last).
impl From<PluginDetail> for Value {
    fn from(detail: PluginDetail) -> Value {
        #[derive(Serialize)]
        struct Members {
            #[serde(flatten)]
            info: PluginInfo,
            history: Vec<ReloadRecord>,
            state_file: Value,
            watched_by: Option<String>,
            poll_reason: Option<String>,
        }
        let members = Members {
            info: detail.info,
            history: detail.history,
            state_file: detail.state_file,
            watched_by: detail.watched_by,
            poll_reason: detail.poll_reason,
        };
        // Strings, numbers and a `Value`: nothing that cannot be encoded.
        serde_json::to_value(members).unwrap_or(Value::Null)
    }
}

/// One reload in a plugin's history.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReloadRecord {
    pub duration_ms: u64,
    pub error: Option<String>,
    pub new_version: Option<String>,
    pub ok: bool,
    pub old_version: Option<String>,
    pub time: String,
    /// What started it: `watch`, `manual`, `enable`, `rescan`, `config`.
    pub trigger: String,
}

/// `enable`, `disable`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EnabledReply {
    pub enabled: bool,
}

/// `trigger` with wait, once the reload has succeeded or finally failed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TriggerReply {
    pub result: TriggerResult,
}

/// How a waited-for reload (or first start) went. A request that was carried out is a success
/// whatever the reload did: `ok` says that.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TriggerResult {
    pub duration_ms: u64,
    pub error: Option<String>,
    pub new_version: Option<String>,
    pub ok: bool,
    /// `null` for a first start.
    pub old_version: Option<String>,
    pub plugin: String,
}

/// `stop`, `start` or `restart` with wait, once the plugin has reached the state asked for or
/// failed to.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LifecycleReply {
    pub result: LifecycleResult,
}

/// How a waited-for `stop`, `start` or `restart` went (SPEC §6). As with `trigger`, a request
/// that was carried out is a success whatever happened to the plugin: `ok` says that.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LifecycleResult {
    pub error: Option<String>,
    pub ok: bool,
    pub plugin: String,
    /// The plugin's state once the command is done (`running`, `stopped`, `failed`, ...).
    pub state: String,
    /// The version now running, or for a plugin that is down the one it last ran.
    pub version: Option<String>,
}

/// `trigger`, `stop`, `start`, `restart` without wait.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScheduledReply {
    pub scheduled: bool,
}

/// `subscribe`; event lines follow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SubscribedReply {
    pub subscribed: bool,
}

/// `reload-config` that was applied.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReloadedReply {
    /// Changed keys that take effect only at a daemon restart.
    pub needs_restart: Vec<String>,
    pub reloaded: bool,
}

/// `help`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HelpReply {
    pub commands: Vec<String>,
}

/// An error answer: `{"status":"error","code":CODE,"error":MESSAGE}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: ErrorCode,
    /// What went wrong, for a person.
    pub error: String,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, error: impl Into<String>) -> Self {
        ErrorReply {
            code,
            error: error.into(),
        }
    }
}

/// Any answer of the daemon to a request.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Response {
    Status(Box<StatusReply>),
    List(ListReply),
    Plugin(Box<PluginReply>),
    Enabled(EnabledReply),
    Trigger(TriggerReply),
    Lifecycle(LifecycleReply),
    Scheduled(ScheduledReply),
    Subscribed(SubscribedReply),
    Reloaded(ReloadedReply),
    Help(HelpReply),
    Error(ErrorReply),
}

impl Response {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Response::Error(ErrorReply::new(code, message))
    }

    /// The response line, `"id"` echoed when the request had one.
    pub fn to_line(&self, id: Option<&Value>) -> Vec<u8> {
        match self {
            Response::Error(e) => error_line(id, e.code, &e.error),
            body => success(id, body),
        }
    }
}

impl From<ErrorReply> for Response {
    fn from(e: ErrorReply) -> Self {
        Response::Error(e)
    }
}
