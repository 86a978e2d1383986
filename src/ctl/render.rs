//! Human-readable output of `hotreloadctl`: the status summary, the plugin table, the plugin detail
//! view, reload results and event lines.
//!
//! Everything here is a pure function of the daemon's JSON and a [`Style`] (colour on or off,
//! terminal width, clock), so the exact text is unit-tested. Fields are read leniently: a missing
//! or null field shows as `-`, never as a panic, so an older or newer daemon still renders.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::Value;

use crate::protocol::{
    Event, EventKind, LifecycleResult, PluginDetail, PluginInfo, ReloadRecord, StatusReply,
    TriggerResult,
};

/// How to render: decided once per command from the terminal and the environment.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    /// Emit ANSI colours (stdout is a terminal and `NO_COLOR` is unset).
    pub color: bool,
    /// Truncate the last table column to fit this many columns (stdout is a terminal).
    pub width: Option<usize>,
    /// Show times in the local time zone rather than UTC.
    pub local_time: bool,
    /// "Now", for ages such as "5m ago".
    pub now: SystemTime,
}

/// The meaning of a piece of text, mapped to a colour only when colours are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    /// Running, succeeded.
    Good,
    /// Failed, errors, stderr.
    Bad,
    /// Backoff, missing, lagged, rolled back.
    Warn,
    /// Transitional states.
    Busy,
    /// Unimportant.
    Dim,
    /// Headers.
    Bold,
}

impl Style {
    /// Wraps `text` in the ANSI colour for `tone` when colours are on.
    pub fn paint(&self, tone: Tone, text: &str) -> String {
        if !self.color {
            return text.to_string();
        }
        let code = match tone {
            Tone::Good => "32",
            Tone::Bad => "31",
            Tone::Warn => "33",
            Tone::Busy => "36",
            Tone::Dim => "2",
            Tone::Bold => "1",
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    }
}

/// The terminal width of stdout, from `TIOCGWINSZ`, if stdout is a terminal.
pub fn terminal_width() -> Option<usize> {
    crate::sys::term::stdout_width()
}

// ---------------------------------------------------------------------------------------------
// Values and times

/// A field as display text: strings as they are, `-` for missing or null.
pub fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.to_string(),
        other => other.to_string(),
    }
}

/// The first 8 hex digits of a version, with an ellipsis when cut.
pub fn short_version(v: &Value) -> String {
    match v.as_str() {
        Some(s) if s.chars().count() > 8 => format!("{}…", s.chars().take(8).collect::<String>()),
        Some(s) => s.to_string(),
        None => "-".to_string(),
    }
}

/// A duration in milliseconds as at most two units: `850 ms`, `12s`, `5m 3s`, `2h 3m`, `3d 4h`.
pub fn humanise_ms(ms: u64) -> String {
    const MIN: u64 = 60;
    const HOUR: u64 = 60 * MIN;
    const DAY: u64 = 24 * HOUR;
    if ms < 1000 {
        return format!("{ms} ms");
    }
    let s = ms / 1000;
    match s {
        _ if s < MIN => format!("{s}s"),
        _ if s < HOUR => format!("{}m {}s", s / MIN, s % MIN),
        _ if s < DAY => format!("{}h {}m", s / HOUR, (s % HOUR) / MIN),
        _ => format!("{}d {}h", s / DAY, (s % DAY) / HOUR),
    }
}

fn parse_time(v: &Value) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(v.as_str()?).ok()
}

/// "5m 3s ago" for an RFC 3339 time, `-` when absent.
fn ago(v: &Value, style: &Style) -> String {
    match parse_time(v) {
        Some(t) => match style.now.duration_since(t) {
            Ok(d) => format!("{} ago", humanise_ms(millis(d))),
            Err(_) => "just now".to_string(),
        },
        None => text(v),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `t` shifted so that formatting it as UTC shows the wall-clock time of the chosen zone.
fn wall_clock(t: SystemTime, style: &Style) -> SystemTime {
    if !style.local_time {
        return t;
    }
    let offset = local_utc_offset_secs(t);
    let shift = Duration::from_secs(offset.unsigned_abs());
    let shifted = if offset >= 0 {
        t.checked_add(shift)
    } else {
        t.checked_sub(shift)
    };
    shifted.unwrap_or(t)
}

/// The local zone's offset from UTC at `t`, in seconds (0 when it cannot be determined).
fn local_utc_offset_secs(t: SystemTime) -> i64 {
    let Ok(since_epoch) = t.duration_since(UNIX_EPOCH) else {
        return 0;
    };
    let Ok(secs) = libc::time_t::try_from(since_epoch.as_secs()) else {
        return 0;
    };
    crate::sys::term::local_utc_offset_secs(secs)
}

/// `HH:MM:SS.mmm` of an RFC 3339 time, in the style's zone; the raw text if it does not parse.
pub fn clock(v: &Value, style: &Style) -> String {
    match parse_time(v) {
        Some(t) => {
            let stamp = humantime::format_rfc3339_millis(wall_clock(t, style)).to_string();
            // `YYYY-MM-DDTHH:MM:SS.mmmZ`: the time is at 11..23.
            stamp.get(11..23).map_or_else(|| text(v), str::to_string)
        }
        None => text(v),
    }
}

/// `YYYY-MM-DD HH:MM:SS (5m ago)` of an RFC 3339 time, `never` when null.
fn when(v: &Value, style: &Style) -> String {
    match parse_time(v) {
        Some(t) => {
            let stamp = humantime::format_rfc3339_seconds(wall_clock(t, style)).to_string();
            match (stamp.get(..10), stamp.get(11..19)) {
                (Some(date), Some(time)) => format!("{date} {time} ({})", ago(v, style)),
                _ => format!("{stamp} ({})", ago(v, style)),
            }
        }
        None if v.is_null() => "never".to_string(),
        None => text(v),
    }
}

fn state_tone(state: &str) -> Tone {
    match state {
        "running" => Tone::Good,
        "failed" => Tone::Bad,
        "backoff" | "missing" => Tone::Warn,
        "stopped" => Tone::Dim,
        _ => Tone::Busy,
    }
}

// ---------------------------------------------------------------------------------------------
// Key/value blocks and tables

/// `key: value` lines with the values aligned.
fn key_values(rows: &[(&str, String)]) -> String {
    let key_width = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0)
        + 1;
    let mut s = String::new();
    for (key, value) in rows {
        let key = format!("{key}:");
        let _ = writeln!(s, "{key:<key_width$} {value}");
    }
    s
}

/// One table cell: its text and how to colour it.
#[derive(Debug, Clone)]
pub struct Cell {
    text: String,
    tone: Option<Tone>,
}

impl Cell {
    fn plain(text: String) -> Cell {
        Cell { text, tone: None }
    }
    fn toned(text: String, tone: Tone) -> Cell {
        Cell {
            text,
            tone: Some(tone),
        }
    }
}

/// Shortest width the last column is truncated to, however narrow the terminal.
const MIN_LAST_COLUMN: usize = 12;

/// An aligned table: widths from the content (in characters), two spaces between columns,
/// columns listed in `right` right-aligned, the last column truncated to the terminal width.
/// Padding is computed on the plain text, so colours never disturb the alignment.
fn table(headers: &[&str], right: &[usize], rows: &[Vec<Cell>], style: &Style) -> String {
    let columns = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(columns) {
            widths[i] = widths[i].max(cell.text.chars().count());
        }
    }
    let last_limit = style.width.map(|w| {
        let before: usize = widths[..columns - 1].iter().map(|w| w + 2).sum();
        w.saturating_sub(before).max(MIN_LAST_COLUMN)
    });
    let mut out = String::new();
    let header_cells: Vec<Cell> = headers
        .iter()
        .map(|h| Cell::toned(h.to_string(), Tone::Bold))
        .collect();
    for row in std::iter::once(&header_cells).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate().take(columns) {
            let last = i + 1 == columns;
            let content = match last_limit {
                Some(limit) if last => truncate(&cell.text, limit),
                _ => cell.text.clone(),
            };
            let pad = if last {
                0
            } else {
                widths[i].saturating_sub(content.chars().count())
            };
            let painted = match cell.tone {
                Some(tone) => style.paint(tone, &content),
                None => content,
            };
            if right.contains(&i) {
                line.push_str(&" ".repeat(pad));
                line.push_str(&painted);
            } else {
                line.push_str(&painted);
                if !last {
                    line.push_str(&" ".repeat(pad));
                }
            }
            if !last {
                line.push_str("  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `s` cut to `max` characters, the last one an ellipsis when cut.
fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let kept: String = s.chars().take(max.saturating_sub(1)).collect();
    format!("{kept}…")
}

// ---------------------------------------------------------------------------------------------
// Replies

/// An optional text field: `-` when unset.
fn or_dash(v: Option<&str>) -> String {
    v.unwrap_or("-").to_string()
}

/// An optional text field as JSON, for the helpers that also serve events (which are JSON).
fn as_json(v: &Option<String>) -> Value {
    Value::from(v.clone())
}

/// The `status` reply as a multi-line summary.
pub fn status(reply: &StatusReply, style: &Style) -> String {
    let (hr, daemon) = (&reply.hot_reload, &reply.daemon);
    let enabled = if hr.enabled {
        style.paint(Tone::Good, "on")
    } else {
        style.paint(Tone::Warn, "off")
    };
    let list = |items: &[String]| {
        if items.is_empty() {
            "(none)".to_string()
        } else {
            items.join(", ")
        }
    };
    let rows = [
        (
            "hot reload",
            format!("{enabled}, debounce {} ms", hr.debounce_delay_ms),
        ),
        ("watch", list(&hr.watch_patterns)),
        ("exclude", list(&hr.exclude_patterns)),
        (
            "watching",
            watching_text(hr.watching_directories, daemon.plugins_dir_present),
        ),
        (
            "reloads",
            format!("{}, {} failed", hr.reload_count, hr.failed_reloads),
        ),
        ("last reload", when(&as_json(&hr.last_reload), style)),
        ("sessions", hr.active_sessions.to_string()),
        (
            "daemon",
            format!(
                "pid {}, version {}, up {}",
                daemon.pid,
                daemon.version,
                humanise_ms(daemon.uptime_ms)
            ),
        ),
        (
            "plugins",
            format!(
                "{} running of {}",
                daemon.plugins_running, daemon.plugins_total
            ),
        ),
        ("plugins dir", daemon.plugins_dir.clone()),
    ];
    key_values(&rows)
}

/// The `list` reply's plugins as an aligned table, or a friendly line when there are none.
pub fn plugin_table(plugins: &[PluginInfo], style: &Style) -> String {
    if plugins.is_empty() {
        return "no plugins (a plugin is a directory in the plugins dir; see `hotreloadctl status`)\n"
            .to_string();
    }
    let headers = [
        "ID",
        "STATE",
        "PID",
        "TASKS",
        "VERSION",
        "RESTARTS",
        "RELOADS",
        "FAILED",
        "STARTED",
        "LAST ERROR/STATUS",
    ];
    let rows: Vec<Vec<Cell>> = plugins.iter().map(|p| plugin_row(p, style)).collect();
    table(&headers, &[2, 3, 5, 6, 7], &rows, style)
}

fn plugin_row(p: &PluginInfo, style: &Style) -> Vec<Cell> {
    let last = match (&p.last_error, &p.status_text) {
        (Some(e), _) => Cell::toned(e.clone(), Tone::Bad),
        (_, Some(s)) => Cell::plain(s.clone()),
        _ if !p.hot_reload => Cell::toned("hot reload off".to_string(), Tone::Warn),
        _ => Cell::plain("-".to_string()),
    };
    vec![
        Cell::plain(p.id.clone()),
        Cell::toned(p.state.clone(), state_tone(&p.state)),
        Cell::plain(p.pid.map_or_else(|| "-".to_string(), |pid| pid.to_string())),
        Cell::plain(p.tasks.to_string()),
        Cell::plain(
            p.version
                .as_deref()
                .map_or("-", |v| v.get(..8).unwrap_or(v))
                .to_string(),
        ),
        Cell::plain(p.restarts.to_string()),
        Cell::plain(p.reload_count.to_string()),
        Cell::plain(p.failed_reloads.to_string()),
        Cell::plain(ago(&as_json(&p.started_at), style)),
        last,
    ]
}

/// The `plugin` reply: key/value block, the state file as pretty JSON, the reload history.
pub fn plugin_detail(detail: &PluginDetail, style: &Style) -> String {
    let p = &detail.info;
    let rows = [
        ("id", p.id.clone()),
        ("state", style.paint(state_tone(&p.state), &p.state)),
        (
            "pid",
            p.pid.map_or_else(|| "-".to_string(), |pid| pid.to_string()),
        ),
        ("tasks", usage(p)),
        ("version", or_dash(p.version.as_deref())),
        ("last good", or_dash(p.last_good_version.as_deref())),
        ("started", when(&as_json(&p.started_at), style)),
        ("restarts", p.restarts.to_string()),
        (
            "reloads",
            format!("{}, {} failed", p.reload_count, p.failed_reloads),
        ),
        ("last error", or_dash(p.last_error.as_deref())),
        ("status", or_dash(p.status_text.as_deref())),
        (
            "hot reload",
            if p.hot_reload {
                "on"
            } else {
                "off (this plugin)"
            }
            .to_string(),
        ),
        ("exec", p.exec.clone()),
    ];
    let mut s = key_values(&rows);
    s.push_str("\nstate file:\n");
    let pretty =
        serde_json::to_string_pretty(&detail.state_file).unwrap_or_else(|_| "-".to_string());
    for line in pretty.lines() {
        let _ = writeln!(s, "  {line}");
    }
    s.push('\n');
    if detail.history.is_empty() {
        s.push_str("history: no reloads yet\n");
    } else {
        s.push_str("history (newest first):\n");
        s.push_str(&history_table(&detail.history, style));
    }
    s
}

/// The plugin's processes now, with its memory and CPU time where its cgroup tells them.
fn usage(p: &PluginInfo) -> String {
    let mut s = p.tasks.to_string();
    if let Some(bytes) = p.memory_bytes {
        let _ = write!(s, ", memory {:.1} MiB", bytes as f64 / (1024.0 * 1024.0));
    }
    if let Some(ms) = p.cpu_usage_ms {
        let _ = write!(s, ", cpu {}", humanise_ms(ms));
    }
    s
}

fn history_table(history: &[ReloadRecord], style: &Style) -> String {
    let rows: Vec<Vec<Cell>> = history
        .iter()
        .map(|h| {
            let result = if h.ok {
                Cell::toned("ok".to_string(), Tone::Good)
            } else {
                Cell::toned("failed".to_string(), Tone::Bad)
            };
            vec![
                Cell::plain(when(&Value::from(h.time.as_str()), style)),
                Cell::plain(h.trigger.clone()),
                Cell::plain(short_version(&as_json(&h.old_version))),
                Cell::plain(short_version(&as_json(&h.new_version))),
                result,
                Cell::plain(humanise_ms(h.duration_ms)),
                Cell::plain(or_dash(h.error.as_deref())),
            ]
        })
        .collect();
    let headers = [
        "TIME", "TRIGGER", "OLD", "NEW", "RESULT", "DURATION", "ERROR",
    ];
    table(&headers, &[5], &rows, style)
}

/// A `trigger` (or install) result: the line to print and whether the reload succeeded.
pub fn trigger_result(result: &TriggerResult, style: &Style) -> (String, bool) {
    let plugin = &result.plugin;
    let new = short_version(&as_json(&result.new_version));
    if result.ok {
        let duration = humanise_ms(result.duration_ms);
        let change = match &result.old_version {
            None => format!("started {new}"),
            Some(old) => format!(
                "reloaded {} -> {new}",
                short_version(&Value::from(old.as_str()))
            ),
        };
        (
            format!(
                "{plugin}: {} in {duration}",
                style.paint(Tone::Good, &change)
            ),
            true,
        )
    } else {
        let failed = style.paint(Tone::Bad, "reload failed");
        (
            format!("{plugin}: {failed}: {}", or_dash(result.error.as_deref())),
            false,
        )
    }
}

/// A `stop`, `start` or `restart` result: the line to print and whether the plugin reached the
/// state asked for.
pub fn lifecycle_result(action: &str, result: &LifecycleResult, style: &Style) -> (String, bool) {
    let plugin = &result.plugin;
    let version = short_version(&as_json(&result.version));
    if result.ok {
        let done = match action {
            "stop" => "stopped".to_owned(),
            _ => format!("{} {version}", result.state),
        };
        (
            format!("{plugin}: {}", style.paint(Tone::Good, &done)),
            true,
        )
    } else {
        let failed = style.paint(Tone::Bad, &format!("{action} failed"));
        (
            format!(
                "{plugin}: {failed} ({}): {}",
                result.state,
                or_dash(result.error.as_deref())
            ),
            false,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Events

/// Keys shown first, in this order, after the event name; any others follow alphabetically.
const KEY_ORDER: &[&str] = &[
    "trigger",
    "files",
    "old_version",
    "new_version",
    "version",
    "duration_ms",
    "pid",
    "code",
    "signal",
    "expected",
    "error",
    "attempt",
    "retry_in_ms",
    "stream",
    "line",
    "path",
    "reason",
    "dropped",
];

fn event_tone(name: &str) -> Option<Tone> {
    match name {
        "reload_succeeded" | "plugin_ready" | "hot_reload_enabled" | "config_reloaded" => {
            Some(Tone::Good)
        }
        "reload_failed" | "config_rejected" => Some(Tone::Bad),
        "rolled_back" | "state_warning" | "hot_reload_disabled" | "plugin_stopped" | "lagged" => {
            Some(Tone::Warn)
        }
        "change_ignored" => Some(Tone::Dim),
        _ => None,
    }
}

/// A `key=value` value: bare when it has no spaces or quotes, JSON-quoted otherwise.
fn event_value(v: &Value) -> String {
    match v {
        Value::String(s)
            if !s.is_empty()
                && !s.contains([' ', '"', '=', '\t'])
                && !s.contains(char::is_control) =>
        {
            s.clone()
        }
        other => other.to_string(),
    }
}

/// `HH:MM:SS.mmm plugin event key=value ...` for one event (`-` when it concerns no plugin);
/// `lagged` becomes a warning saying how many events were lost.
pub fn event_line(event: &Value, style: &Style) -> String {
    let time = clock(&event["time"], style);
    let name = event["event"].as_str().unwrap_or("?");
    if name == "lagged" {
        let warning = format!(
            "warning: {} events dropped because this client read too slowly",
            text(&event["dropped"])
        );
        return format!("{time} {}", style.paint(Tone::Warn, &warning));
    }
    let plugin = event["plugin"].as_str().unwrap_or("-");
    let painted_name = match event_tone(name) {
        Some(tone) => style.paint(tone, name),
        None => name.to_string(),
    };
    let mut line = format!("{time} {plugin} {painted_name}");
    let Some(fields) = event.as_object() else {
        return line;
    };
    let mut keys: Vec<&String> = fields
        .keys()
        .filter(|k| !matches!(k.as_str(), "event" | "time" | "plugin"))
        .collect();
    let rank = |k: &str| {
        KEY_ORDER
            .iter()
            .position(|o| *o == k)
            .unwrap_or(KEY_ORDER.len())
    };
    keys.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.cmp(b)));
    for key in keys {
        let _ = write!(line, " {key}={}", event_value(&fields[key]));
    }
    line
}

/// For a `plugin_output` event, `[id] line` (stderr lines as `[id stderr] line`); `None` for
/// every other event (read as the daemon's typed [`Event`]; `events` itself prints any event
/// generically, so an older client still shows a newer daemon's events).
pub fn log_line(event: &Value, style: &Style) -> Option<String> {
    let event = Event::deserialize(event).ok()?;
    let EventKind::PluginOutput { stream, line } = event.kind else {
        return None;
    };
    let plugin = event.plugin.as_deref().unwrap_or("-");
    let (tone, tag) = if stream == "stderr" {
        (Tone::Bad, format!("[{plugin} stderr]"))
    } else {
        (Tone::Dim, format!("[{plugin}]"))
    };
    Some(format!("{} {line}", style.paint(tone, &tag)))
}

/// `watching_directories` counts the plugins dir (while it is there) and each plugin dir:
/// say which is which.
fn watching_text(total: usize, plugins_dir_present: bool) -> String {
    let root = usize::from(plugins_dir_present && total > 0);
    let plugin_dirs = match total - root {
        1 => "1 plugin directory".to_string(),
        n => format!("{n} plugin directories"),
    };
    if root == 1 {
        format!("the plugins directory and {plugin_dirs}")
    } else {
        plugin_dirs
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::plain_style;
    use super::*;
    use serde_json::json;

    fn plain() -> Style {
        plain_style(humantime::parse_rfc3339("2026-11-27T22:35:48Z").unwrap())
    }

    fn colored() -> Style {
        Style {
            color: true,
            ..plain()
        }
    }

    fn plugin(id: &str, state: &str, last_error: Value) -> PluginInfo {
        typed(plugin_json(id, state, last_error))
    }

    /// A reply body written as the daemon sends it, read as the client reads it.
    fn typed<T: serde::de::DeserializeOwned>(body: Value) -> T {
        serde_json::from_value(body).unwrap()
    }

    fn plugin_json(id: &str, state: &str, last_error: Value) -> Value {
        json!({"id": id, "state": state, "pid": 4242, "version": "9f2c4e1a0b3d5c77",
               "last_good_version": "9f2c4e1a0b3d5c77", "started_at": "2026-11-27T22:30:45.123Z",
               "restarts": 0, "reload_count": 12, "failed_reloads": 1, "last_error": last_error,
               "exec": format!("/srv/plugins/{id}/{id}"), "status_text": null})
    }

    #[test]
    fn lifecycle_lines_say_the_state_reached_or_why_not() {
        let stopped: LifecycleResult = typed(json!({"plugin": "p1", "ok": true,
            "state": "stopped", "version": "9f2c4e1a0b3d5c77", "error": null}));
        assert_eq!(
            lifecycle_result("stop", &stopped, &plain()),
            ("p1: stopped".to_string(), true)
        );
        let running: LifecycleResult = typed(json!({"plugin": "p1", "ok": true,
            "state": "running", "version": "9f2c4e1a0b3d5c77", "error": null}));
        let (line, ok) = lifecycle_result("restart", &running, &plain());
        assert!(ok);
        assert!(line.starts_with("p1: running 9f2c4e1a"), "{line}");
        let failed: LifecycleResult = typed(json!({"plugin": "p1", "ok": false,
            "state": "failed", "version": null, "error": "exited with code 3"}));
        assert_eq!(
            lifecycle_result("start", &failed, &plain()),
            (
                "p1: start failed (failed): exited with code 3".to_string(),
                false
            )
        );
    }

    #[test]
    fn humanise_picks_two_units() {
        assert_eq!(humanise_ms(850), "850 ms");
        assert_eq!(humanise_ms(12_400), "12s");
        assert_eq!(humanise_ms(303_000), "5m 3s");
        assert_eq!(humanise_ms(7_380_000), "2h 3m");
        assert_eq!(humanise_ms(273_600_000), "3d 4h");
    }

    #[test]
    fn status_summary_has_every_fact() {
        let reply = json!({"status": "success",
            "hot_reload": {"enabled": true, "watching_directories": 3,
                "last_reload": "2026-11-27T22:30:45.123Z", "reload_count": 12, "failed_reloads": 2,
                "active_sessions": 1, "debounce_delay_ms": 500, "watch_patterns": ["*"],
                "exclude_patterns": ["*.tmp", "*.log"]},
            "daemon": {"pid": 1234, "version": "0.1.0", "uptime_ms": 7_380_000, "plugins_total": 3,
                "plugins_running": 2, "plugins_dir": "/srv/plugins", "plugins_dir_present": true,
                "watch": true}});
        let reply: StatusReply = typed(reply);
        let want = "\
hot reload:  on, debounce 500 ms
watch:       *
exclude:     *.tmp, *.log
watching:    the plugins directory and 2 plugin directories
reloads:     12, 2 failed
last reload: 2026-11-27 22:30:45 (5m 2s ago)
sessions:    1
daemon:      pid 1234, version 0.1.0, up 2h 3m
plugins:     2 running of 3
plugins dir: /srv/plugins
";
        assert_eq!(status(&reply, &plain()), want);
    }

    fn quiet_status() -> StatusReply {
        typed(json!({
            "hot_reload": {"enabled": false, "watching_directories": 2, "last_reload": null,
                "reload_count": 0, "failed_reloads": 0, "active_sessions": 1,
                "debounce_delay_ms": 500, "watch_patterns": [], "exclude_patterns": []},
            "daemon": {"pid": 1, "version": "0.1.0", "uptime_ms": 5, "plugins_total": 0,
                "plugins_running": 0, "plugins_dir": "/p", "plugins_dir_present": true,
                "watch": false}}))
    }

    #[test]
    fn status_of_a_daemon_that_never_reloaded() {
        let s = status(&quiet_status(), &plain());
        assert!(s.contains("hot reload:  off, debounce 500 ms"), "{s}");
        assert!(s.contains("watch:       (none)"), "{s}");
        assert!(
            s.contains("watching:    the plugins directory and 1 plugin directory\n"),
            "{s}"
        );
        assert!(s.contains("last reload: never"), "{s}");
        assert!(
            s.contains("daemon:      pid 1, version 0.1.0, up 5 ms"),
            "{s}"
        );
    }

    #[test]
    fn table_widths_follow_content() {
        let plugins = vec![
            plugin("a", "running", Value::Null),
            plugin(
                "much_longer_transcoder",
                "backoff",
                json!("exited with code 3"),
            ),
        ];
        let out = plugin_table(&plugins, &plain());
        let want = "\
ID                      STATE     PID  TASKS  VERSION   RESTARTS  RELOADS  FAILED  STARTED    LAST ERROR/STATUS
a                       running  4242      0  9f2c4e1a         0       12       1  5m 2s ago  -
much_longer_transcoder  backoff  4242      0  9f2c4e1a         0       12       1  5m 2s ago  exited with code 3
";
        assert_eq!(out, want);
    }

    #[test]
    fn table_widths_grow_with_every_column() {
        let mut wide = plugin("p", "reloading", Value::Null);
        wide.pid = Some(4_194_304);
        wide.restarts = 1_234_567_890;
        let out = plugin_table(&[plugin("p", "running", Value::Null), wide], &plain());
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].starts_with("ID  STATE          PID  TASKS  VERSION     RESTARTS"),
            "{out}"
        );
        assert!(
            lines[1].starts_with("p   running       4242      0  9f2c4e1a           0"),
            "{out}"
        );
        assert!(
            lines[2].starts_with("p   reloading  4194304      0  9f2c4e1a  1234567890"),
            "{out}"
        );
    }

    #[test]
    fn long_error_truncated_to_terminal_width() {
        let long = "x".repeat(300);
        let style = Style {
            width: Some(120),
            ..plain()
        };
        let out = plugin_table(&[plugin("p", "failed", json!(long))], &style);
        for line in out.lines() {
            assert!(
                line.chars().count() <= 120,
                "{} > 120: {line}",
                line.chars().count()
            );
        }
        assert!(out.lines().nth(1).unwrap().ends_with("x…"));
        // Not a terminal: nothing is cut.
        let out = plugin_table(&[plugin("p", "failed", json!(long))], &plain());
        assert!(out.contains(&long));
    }

    #[test]
    fn empty_list_says_so() {
        assert!(plugin_table(&[], &plain()).starts_with("no plugins"));
    }

    #[test]
    fn colours_only_when_asked() {
        let plugins = [plugin("p", "failed", json!("boom"))];
        let out = plugin_table(&plugins, &plain());
        assert!(!out.contains('\x1b'), "{out}");
        let out = plugin_table(&plugins, &colored());
        assert!(out.contains("\x1b[31mfailed\x1b[0m"), "{out:?}");
        // Alignment is computed without the escape codes.
        let stripped = out
            .replace("\x1b[31m", "")
            .replace("\x1b[1m", "")
            .replace("\x1b[0m", "");
        assert_eq!(stripped, plugin_table(&plugins, &plain()));
        let ev = json!({"event": "reload_failed", "time": "2026-11-27T22:30:45.123Z", "plugin": "p",
                        "error": "x", "attempt": 1, "retry_in_ms": null});
        assert!(!event_line(&ev, &plain()).contains('\x1b'));
        assert!(event_line(&ev, &colored()).contains('\x1b'));
        assert!(!status(&quiet_status(), &plain()).contains('\x1b'));
    }

    #[test]
    fn plugin_detail_shows_state_file_and_history() {
        let mut p = plugin_json("p1", "running", Value::Null);
        p["state_file"] = json!({"plugin_id": "p1", "runtime_data": {"jobs": 3}});
        p["history"] = json!([
            {"time": "2026-11-27T22:30:45.123Z", "trigger": "watch", "old_version": "0123456789abcdef",
             "new_version": "9f2c4e1a0b3d5c77", "ok": true, "duration_ms": 12, "error": null},
            {"time": "2026-11-27T22:20:00.000Z", "trigger": "manual", "old_version": "0123456789abcdef",
             "new_version": "ffffffffffffffff", "ok": false, "duration_ms": 1500,
             "error": "exited with code 1"}]);
        let mut p: PluginDetail = typed(p);
        let out = plugin_detail(&p, &plain());
        assert!(
            out.starts_with("id:         p1\nstate:      running\npid:        4242\n"),
            "{out}"
        );
        assert!(
            out.contains("state file:\n  {\n    \"plugin_id\": \"p1\",\n"),
            "{out}"
        );
        assert!(out.contains(
            "2026-11-27 22:30:45 (5m 2s ago)    watch    01234567…  9f2c4e1a…  ok         12 ms  -"
        ), "{out}");
        assert!(
            out.contains("manual   01234567…  ffffffff…  failed        1s  exited with code 1"),
            "{out}"
        );
        p.history.clear();
        assert!(plugin_detail(&p, &plain()).contains("history: no reloads yet"));
    }

    #[test]
    fn plugin_detail_shows_tasks_and_what_cgroups_measure() {
        let mut p = plugin_json("p1", "running", Value::Null);
        p["state_file"] = json!({});
        p["history"] = json!([]);
        p["tasks"] = json!(3);
        let without: PluginDetail = typed(p.clone());
        assert!(
            plugin_detail(&without, &plain()).contains("\ntasks:      3\n"),
            "{}",
            plugin_detail(&without, &plain())
        );
        p["memory_bytes"] = json!(5 * 1024 * 1024 + 512 * 1024);
        p["cpu_usage_ms"] = json!(61_000);
        let with: PluginDetail = typed(p);
        let out = plugin_detail(&with, &plain());
        assert!(
            out.contains("\ntasks:      3, memory 5.5 MiB, cpu 1m 1s\n"),
            "{out}"
        );
    }

    #[test]
    fn trigger_lines() {
        let ok = json!({"plugin": "p1", "ok": true, "old_version": "0123abcd99999999",
                        "new_version": "4567ef0188888888", "duration_ms": 12, "error": null});
        let ok: TriggerResult = typed(ok);
        assert_eq!(
            trigger_result(&ok, &plain()),
            (
                "p1: reloaded 0123abcd… -> 4567ef01… in 12 ms".to_string(),
                true
            )
        );
        let failed: TriggerResult = typed(json!({"plugin": "p1", "ok": false,
            "error": "exec format error", "old_version": null, "new_version": null,
            "duration_ms": 0}));
        assert_eq!(
            trigger_result(&failed, &plain()),
            ("p1: reload failed: exec format error".to_string(), false)
        );
    }

    #[test]
    fn event_lines() {
        let style = plain();
        let ev = json!({"event": "reload_succeeded", "time": "2026-11-27T22:30:45.123Z", "plugin": "p1",
                        "old_version": "0123", "new_version": "4567", "duration_ms": 12});
        assert_eq!(
            event_line(&ev, &style),
            "22:30:45.123 p1 reload_succeeded old_version=0123 new_version=4567 duration_ms=12"
        );
        let ev = json!({"event": "change_ignored", "time": "2026-11-27T22:30:45.000Z", "plugin": "p1",
                        "path": "/srv/plugins/p1/build.log", "reason": "matches exclude glob *.log"});
        assert_eq!(
            event_line(&ev, &style),
            "22:30:45.000 p1 change_ignored path=/srv/plugins/p1/build.log \
             reason=\"matches exclude glob *.log\""
        );
        let ev = json!({"event": "hot_reload_disabled", "time": "2026-11-27T22:30:45.000Z"});
        assert_eq!(
            event_line(&ev, &style),
            "22:30:45.000 - hot_reload_disabled"
        );
        let ev = json!({"event": "lagged", "time": "2026-11-27T22:30:45.000Z", "dropped": 17});
        assert_eq!(
            event_line(&ev, &style),
            "22:30:45.000 warning: 17 events dropped because this client read too slowly"
        );
        let ev = json!({"event": "reload_started", "time": "bogus", "plugin": "p", "zeta": 1,
                        "trigger": "watch", "files": ["p"]});
        assert_eq!(
            event_line(&ev, &style),
            "bogus p reload_started trigger=watch files=[\"p\"] zeta=1"
        );
    }

    #[test]
    fn log_lines_mark_stderr() {
        let style = plain();
        let out = json!({"event": "plugin_output", "plugin": "p1", "stream": "stdout", "line": "hi there"});
        assert_eq!(log_line(&out, &style).as_deref(), Some("[p1] hi there"));
        let err =
            json!({"event": "plugin_output", "plugin": "p1", "stream": "stderr", "line": "oops"});
        assert_eq!(log_line(&err, &style).as_deref(), Some("[p1 stderr] oops"));
        assert_eq!(
            log_line(&json!({"event": "plugin_ready", "plugin": "p1"}), &style),
            None
        );
    }

    #[test]
    fn local_clock_differs_from_utc_by_the_zone_offset() {
        let t = json!("2026-11-27T22:30:45.123Z");
        let utc = clock(&t, &plain());
        assert_eq!(utc, "22:30:45.123");
        let local = clock(
            &t,
            &Style {
                local_time: true,
                ..plain()
            },
        );
        let offset = local_utc_offset_secs(parse_time(&t).unwrap());
        let secs = |s: &str| -> i64 {
            let p: Vec<i64> = s[..8].split(':').map(|x| x.parse().unwrap()).collect();
            p[0] * 3600 + p[1] * 60 + p[2]
        };
        assert_eq!((secs(&local) - secs(&utc) - offset).rem_euclid(86_400), 0);
        assert_eq!(&local[8..], ".123");
    }
}
