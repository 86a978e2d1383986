//! Waiting for the outcome of `hotreloadctl install --wait`: which of the plugin's events mean
//! success or failure, as a pure state machine with the clock passed in ([`Waiter`]), and the loop
//! that feeds it events from a subscribed connection until it decides or time runs out.
//!
//! A reload ends with `reload_succeeded` for the installed version or a final `reload_failed`
//! (`retry_in_ms` null, possibly followed by `rolled_back`). A plugin that was not running before
//! ends with its first start: `plugin_ready`, or `plugin_started` and no exit for [`SETTLE`].
//!
//! Two outcomes have no event of their own, so a second connection asks the daemon (`plugin ID`,
//! [`Probe`]): whether a rollback can still follow a final `reload_failed` (not when the old build
//! never stopped, as for a build refused by the pre-flight check), and whether a new plugin's
//! first start was refused (it stays `missing` with a new `last_error`, and no event says so).

use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;

use super::client::{Client, ReadError, parse_reply};
use super::render::{self, Style, text};
use super::{CtlError, Io};
use crate::protocol::{self, Event, EventKind, PluginInfo, PluginReply, Request, TriggerResult};

/// How long `--wait` waits for a reload result (retries with backoff included).
pub const WAIT_LIMIT: Duration = Duration::from_secs(120);
/// How long a new plugin must stay up after `plugin_started` to count as started when no
/// `plugin_ready` arrives.
const SETTLE: Duration = Duration::from_secs(3);
/// How long to wait for `rolled_back` after a final `reload_failed`.
const ROLLBACK_GRACE: Duration = Duration::from_secs(5);
/// How often a first start is checked for a refusal that no event reports.
const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// How long to read events already on their way once the plugin is known to be settled.
const DRAIN: Duration = Duration::from_millis(100);

/// Asks the daemon about the plugin on a connection of its own, for outcomes no event reports.
pub(super) struct Probe<'a> {
    client: &'a mut Client,
    /// `last_error` before the install: a refusal shows as a different one.
    error_before: Option<String>,
}

impl<'a> Probe<'a> {
    pub(super) fn new(client: &'a mut Client, error_before: Option<String>) -> Probe<'a> {
        Probe {
            client,
            error_before,
        }
    }

    /// The plugin as `plugin ID` shows it (`None` when the daemon does not know it yet).
    fn plugin(&mut self, id: &str) -> Result<Option<PluginInfo>, CtlError> {
        let reply = self
            .client
            .request(&Request::new(protocol::Command::Plugin {
                id: id.to_owned(),
            }))?;
        if reply.value["status"] != "success" {
            return Ok(None);
        }
        Ok(Some(reply.body::<PluginReply>()?.plugin.info))
    }

    /// A first start the daemon refused: the plugin waits in `missing` or `failed` with a new
    /// `last_error` from the pre-flight check, naming the file. (A `missing` plugin whose dir
    /// did not hold the build yet has a `last_error` too, saying what the dir holds: not ours.)
    fn refused_start(&mut self, id: &str) -> Result<Option<String>, CtlError> {
        let Some(p) = self.plugin(id)? else {
            return Ok(None);
        };
        let settled = matches!(p.state.as_str(), "missing" | "failed");
        let Some(error) = p
            .last_error
            .filter(|e| Some(e) != self.error_before.as_ref())
        else {
            return Ok(None);
        };
        let refused = error.starts_with(crate::preflight::FAILED_PREFIX);
        Ok((settled && refused).then(|| format!("{id}: not started: {error}")))
    }

    /// Whether a rollback can still follow a final failure: not when a build other than `ours`
    /// is running and no job is under way (the old build never stopped).
    fn rollback_possible(&mut self, id: &str, ours: &str) -> Result<bool, CtlError> {
        let old_runs = self
            .plugin(id)?
            .is_some_and(|p| p.state == "running" && p.version.as_deref() != Some(ours));
        Ok(!old_runs)
    }
}

/// What one event means for an install that is waiting for its outcome.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Nothing to report.
    Continue,
    /// Worth telling the user while waiting (a retry, an early exit).
    Note(String),
    /// Decided: the success or failure line.
    Done(Result<String, String>),
}

/// Decides the outcome of an install from the plugin's events: a pure state machine, time passed in.
#[derive(Debug)]
pub(super) struct Waiter {
    style: Style,
    plugin: String,
    version: String,
    first_start: bool,
    /// When `plugin_started` for our version arrived, and the pid (first-start mode).
    started: Option<(Instant, i32)>,
}

impl Waiter {
    pub(super) fn new(plugin: &str, version: &str, first_start: bool, style: Style) -> Waiter {
        Waiter {
            style,
            plugin: plugin.to_string(),
            version: version.to_string(),
            first_start,
            started: None,
        }
    }

    /// Reads `ev` as the daemon's typed [`Event`]; an event this client does not know (from a
    /// newer daemon) decides nothing.
    fn on_event(&mut self, ev: &Value, now: Instant) -> Step {
        match Event::deserialize(ev) {
            Ok(event) if event.plugin.as_deref() == Some(self.plugin.as_str()) => {
                self.on_plugin_event(event.kind, now)
            }
            _ => Step::Continue,
        }
    }

    fn on_plugin_event(&mut self, kind: EventKind, now: Instant) -> Step {
        let p = &self.plugin;
        let ours = |version: &str| version == self.version;
        match kind {
            // A reload of an earlier build that was already under way is not ours.
            EventKind::ReloadSucceeded {
                old_version,
                new_version,
                duration_ms,
            } if ours(&new_version) => {
                let result = TriggerResult {
                    duration_ms,
                    error: None,
                    new_version: Some(new_version),
                    ok: true,
                    old_version,
                    plugin: p.clone(),
                };
                Step::Done(Ok(render::trigger_result(&result, &self.style).0))
            }
            EventKind::ReloadFailed {
                error,
                retry_in_ms: None,
                ..
            } => Step::Done(Err(format!("{p}: reload failed: {error}"))),
            EventKind::ReloadFailed {
                error,
                attempt,
                retry_in_ms: Some(retry_in_ms),
            } => Step::Note(format!(
                "{p}: attempt {attempt} failed: {error}; retrying in {retry_in_ms} ms"
            )),
            EventKind::PluginStarted { pid, version } if self.first_start && ours(&version) => {
                self.started = Some((now, pid));
                Step::Continue
            }
            EventKind::PluginReady { .. } if self.first_start && self.started.is_some() => {
                Step::Done(Ok(self.started_line()))
            }
            EventKind::PluginExited { code, signal, .. }
                if self.first_start && self.started.take().is_some() =>
            {
                Step::Note(format!(
                    "{p}: exited right after starting ({}); waiting for the daemon to retry",
                    exit_text(code, signal)
                ))
            }
            _ => Step::Continue,
        }
    }

    /// When a started-but-not-ready new plugin counts as started.
    fn settle_deadline(&self) -> Option<Instant> {
        self.started.as_ref().map(|(at, _)| *at + SETTLE)
    }

    fn started_line(&self) -> String {
        let pid = self
            .started
            .map_or_else(|| "-".to_owned(), |(_, pid)| pid.to_string());
        format!(
            "{}: started version {} (pid {pid})",
            self.plugin, self.version
        )
    }
}

fn exit_text(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => "no exit status".to_string(),
    }
}

/// What waiting produced: the line to print (or the failure) and the events that decided it.
#[derive(Debug)]
pub(super) struct Waited {
    /// The success line, or the failure message.
    pub result: Result<String, String>,
    /// The events that mattered (notes, the outcome, a rollback), for `--json`.
    pub events: Vec<Value>,
}

/// Reads the plugin's events until the waiter decides, the daemon goes away or [`WAIT_LIMIT`].
pub(super) fn wait_for_outcome(
    events: &mut Client,
    waiter: &mut Waiter,
    probe: &mut Probe<'_>,
    json: bool,
    io: &mut Io<'_>,
) -> Result<Waited, CtlError> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + WAIT_LIMIT;
    let mut next_probe = Instant::now() + PROBE_INTERVAL;
    loop {
        let now = Instant::now();
        if waiter.first_start && waiter.started.is_none() && now >= next_probe {
            next_probe = now + PROBE_INTERVAL;
            if let Some(refused) = probe.refused_start(&waiter.plugin)? {
                return Ok(Waited {
                    result: Err(refused),
                    events: seen,
                });
            }
        }
        if let Some(settled) = waiter.settle_deadline()
            && now >= settled
        {
            return Ok(Waited {
                result: Ok(waiter.started_line()),
                events: seen,
            });
        }
        if now >= deadline {
            let id = &waiter.plugin;
            let result = Err(format!(
                "{id}: no reload result after {} s; see `hotreloadctl plugin {id}` and `hotreloadctl events {id}`",
                WAIT_LIMIT.as_secs()
            ));
            return Ok(Waited {
                result,
                events: seen,
            });
        }
        let mut wake = waiter
            .settle_deadline()
            .map_or(deadline, |s| s.min(deadline));
        if waiter.first_start && waiter.started.is_none() {
            wake = wake.min(next_probe);
        }
        let Some(ev) = next_event(events, wake.saturating_duration_since(now), &waiter.plugin)?
        else {
            continue;
        };
        match waiter.on_event(&ev, Instant::now()) {
            Step::Continue => {}
            Step::Note(note) => {
                seen.push(ev);
                if !json {
                    writeln!(io.err, "hotreloadctl: {note}")?;
                }
            }
            Step::Done(result) => {
                seen.push(ev);
                if result.is_err()
                    && let Some(rolled_back) = await_rollback(events, waiter, probe)
                {
                    if !json {
                        let version = text(&rolled_back["version"]);
                        writeln!(
                            io.out,
                            "{}: rolled back to version {version}",
                            waiter.plugin
                        )?;
                    }
                    seen.push(rolled_back);
                }
                return Ok(Waited {
                    result,
                    events: seen,
                });
            }
        }
    }
}

/// After a final failure, the `rolled_back` event if one follows promptly. When the daemon says
/// the old build still runs, only events already on their way are read: a refused build is
/// reported as soon as the daemon refuses it.
fn await_rollback(events: &mut Client, waiter: &Waiter, probe: &mut Probe<'_>) -> Option<Value> {
    // A failed probe changes nothing: wait the full grace as if a rollback could follow.
    let possible = probe
        .rollback_possible(&waiter.plugin, &waiter.version)
        .unwrap_or(true);
    let grace = if possible { ROLLBACK_GRACE } else { DRAIN };
    let deadline = Instant::now() + grace;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        // The failure is the news; a connection lost now does not change it.
        let ev = next_event(events, left, &waiter.plugin).ok()?;
        if let Some(ev) = ev
            && let Ok(event) = Event::deserialize(&ev)
            && matches!(event.kind, EventKind::RolledBack { .. })
            && event.plugin.as_deref() == Some(waiter.plugin.as_str())
        {
            return Some(ev);
        }
    }
    None
}

/// The next event within `timeout`: `Ok(None)` when the timeout passed first.
fn next_event(events: &mut Client, timeout: Duration, id: &str) -> Result<Option<Value>, CtlError> {
    events.set_read_timeout(Some(timeout))?;
    match events.read_line() {
        Ok(Some(line)) if line.trim().is_empty() => Ok(None),
        Ok(Some(line)) => Ok(Some(parse_reply(line, events.path())?.value)),
        Ok(None) => Err(CtlError::Unreachable(format!(
            "daemon at {} closed the connection while waiting for {id}'s reload",
            events.path().display()
        ))),
        Err(ReadError::TimedOut) => Ok(None),
        Err(ReadError::Failed(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::plain_style;
    use super::*;
    use serde_json::json;

    fn plain() -> Style {
        plain_style(std::time::SystemTime::now())
    }

    #[test]
    fn waiter_reload_mode() {
        let now = Instant::now();
        let mut w = Waiter::new("p1", "4567ef0011111111", false, plain());
        let ev = |v: Value| v;
        assert_eq!(
            w.on_event(&ev(json!({"event": "reload_started", "plugin": "p1"})), now),
            Step::Continue
        );
        // An older build's reload finishing is not ours.
        let older =
            json!({"event": "reload_succeeded", "plugin": "p1", "new_version": "aaaaaaaaaaaaaaaa"});
        assert_eq!(w.on_event(&older, now), Step::Continue);
        let retry = json!({"event": "reload_failed", "plugin": "p1", "error": "boom", "attempt": 1,
                           "retry_in_ms": 1000});
        assert_eq!(
            w.on_event(&retry, now),
            Step::Note("p1: attempt 1 failed: boom; retrying in 1000 ms".to_string())
        );
        // Plain starts do not decide a reload.
        let started = json!({"event": "plugin_started", "plugin": "p1", "pid": 5, "version": "4567ef0011111111"});
        assert_eq!(w.on_event(&started, now), Step::Continue);
        assert_eq!(w.settle_deadline(), None);
        let ok = json!({"event": "reload_succeeded", "plugin": "p1", "old_version": "0123abcd00000000",
                        "new_version": "4567ef0011111111", "duration_ms": 12});
        assert_eq!(
            w.on_event(&ok, now),
            Step::Done(Ok(
                "p1: reloaded 0123abcd… -> 4567ef00… in 12 ms".to_string()
            ))
        );
        let last = json!({"event": "reload_failed", "plugin": "p1", "error": "boom", "attempt": 4,
                          "retry_in_ms": null});
        assert_eq!(
            w.on_event(&last, now),
            Step::Done(Err("p1: reload failed: boom".to_string()))
        );
        let other =
            json!({"event": "reload_failed", "plugin": "p2", "error": "x", "retry_in_ms": null});
        assert_eq!(w.on_event(&other, now), Step::Continue);
    }

    #[test]
    fn waiter_first_start_mode() {
        let t0 = Instant::now();
        let mut w = Waiter::new("p2", "4567ef0011111111", true, plain());
        let started = json!({"event": "plugin_started", "plugin": "p2", "pid": 42, "version": "4567ef0011111111"});
        assert_eq!(w.on_event(&started, t0), Step::Continue);
        assert_eq!(w.settle_deadline(), Some(t0 + SETTLE));
        let exited = json!({"event": "plugin_exited", "plugin": "p2", "pid": 42, "code": 3, "expected": false});
        assert_eq!(
            w.on_event(&exited, t0),
            Step::Note(
                "p2: exited right after starting (exit code 3); waiting for the daemon to retry"
                    .into()
            )
        );
        assert_eq!(w.settle_deadline(), None);
        assert_eq!(w.on_event(&started, t0), Step::Continue);
        let ready = json!({"event": "plugin_ready", "plugin": "p2", "pid": 42});
        assert_eq!(
            w.on_event(&ready, t0),
            Step::Done(Ok(
                "p2: started version 4567ef0011111111 (pid 42)".to_string()
            ))
        );
    }
}
