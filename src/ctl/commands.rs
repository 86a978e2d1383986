//! The one-shot commands (`status`, `list`, `plugin`, `enable`, `disable`, `trigger`, `stop`,
//! `start`, `restart`, `reload-config`) and the event followers (`events`, `logs`): build the request, send it, print
//! the reply in JSON or human form, and decide the outcome.
//!
//! Handlers take a connected [`Client`] so `interactive` can reuse them on its own connection.

use std::io::Write;
use std::path::Path;

use serde::de::DeserializeOwned;

use super::cli::Command;
use super::client::{Client, ReadError, parse_reply};
use super::render::{self, Style};
use super::{CtlError, Io, Outcome, install, interactive};
use crate::protocol::{
    self, EnabledReply, LifecycleReply, ListReply, PluginReply, ReloadedReply, Request,
    ScheduledReply, StatusReply, TriggerReply,
};

/// Runs `command` against the daemon at `socket`.
pub(super) fn execute(
    command: &Command,
    socket: &Path,
    json: bool,
    io: &mut Io<'_>,
) -> Result<Outcome, CtlError> {
    match command {
        Command::Install { id, file, wait } => install::run(id, file, *wait, socket, json, io),
        Command::Interactive => interactive::run(socket, json, io),
        Command::Events { id, verbose } => {
            let mut client = Client::connect(socket)?;
            let style = io.style();
            subscribe(&mut client, id.as_deref(), *verbose, json, io)?;
            follow(&mut client, Stream::Events, json, &style, io.out)
        }
        Command::Logs { id } => {
            let mut client = Client::connect(socket)?;
            let style = io.style();
            subscribe(&mut client, id.as_deref(), false, json, io)?;
            follow(&mut client, Stream::Logs, json, &style, io.out)
        }
        other => one_shot(&mut Client::connect(socket)?, other, json, io),
    }
}

/// Sends `request`, prints the raw reply with `--json`, and returns the reply's body if it is a
/// success.
pub(super) fn answer<T: DeserializeOwned>(
    client: &mut Client,
    request: &Request,
    json: bool,
    io: &mut Io<'_>,
) -> Result<T, CtlError> {
    let reply = client.request(request)?;
    if json {
        writeln!(io.out, "{}", reply.line)?;
    }
    reply.into_success()?.body()
}

/// Runs one request/reply command on an open connection.
pub(super) fn one_shot(
    client: &mut Client,
    command: &Command,
    json: bool,
    io: &mut Io<'_>,
) -> Result<Outcome, CtlError> {
    let style = io.style();
    match command {
        Command::Status => {
            let reply: StatusReply =
                answer(client, &Request::new(protocol::Command::Status), json, io)?;
            human(io, json, &render::status(&reply, &style))
        }
        Command::List => {
            let reply: ListReply =
                answer(client, &Request::new(protocol::Command::List), json, io)?;
            human(io, json, &render::plugin_table(&reply.plugins, &style))
        }
        Command::Plugin { id } => {
            let request = Request::new(protocol::Command::Plugin { id: id.clone() });
            let reply: PluginReply = answer(client, &request, json, io)?;
            human(io, json, &render::plugin_detail(&reply.plugin, &style))
        }
        Command::Enable { id } | Command::Disable { id } => {
            let on = matches!(command, Command::Enable { .. });
            let plugin = id.clone();
            let command = if on {
                protocol::Command::Enable { plugin }
            } else {
                protocol::Command::Disable { plugin }
            };
            let reply: EnabledReply = answer(client, &Request::new(command), json, io)?;
            let word = if reply.enabled { "enabled" } else { "disabled" };
            let text = match id {
                None => format!("hot reload {word}\n"),
                Some(id) => format!("{id}: hot reload {word}\n"),
            };
            human(io, json, &text)
        }
        Command::Stop { id, no_wait } => lifecycle(client, Action::Stop, id, !no_wait, json, io),
        Command::Start { id, no_wait } => lifecycle(client, Action::Start, id, !no_wait, json, io),
        Command::Restart { id, no_wait } => {
            lifecycle(client, Action::Restart, id, !no_wait, json, io)
        }
        Command::ReloadConfig => {
            let request = Request::new(protocol::Command::ReloadConfig);
            let reply: ReloadedReply = answer(client, &request, json, io)?;
            human(io, json, &reloaded_text(&reply.needs_restart))
        }
        Command::Trigger { id, no_wait } => trigger(client, id, !no_wait, json, io),
        Command::Events { .. }
        | Command::Logs { .. }
        | Command::Install { .. }
        | Command::Interactive
        | Command::Completions { .. }
        | Command::PluginIds => Err(CtlError::Failed(format!(
            "{command:?} is not a one-shot command"
        ))),
    }
}

/// Prints `text` unless `--json` already printed the reply.
/// What `reload-config` did, naming the changed keys that wait for a daemon restart.
fn reloaded_text(keys: &[String]) -> String {
    if keys.is_empty() {
        "configuration reloaded\n".to_string()
    } else {
        format!(
            "configuration reloaded; changed but applied only at a daemon restart: {} \
             (the running values stay until then)\n",
            keys.join(", ")
        )
    }
}

fn human(io: &mut Io<'_>, json: bool, text: &str) -> Result<Outcome, CtlError> {
    if !json {
        io.out.write_all(text.as_bytes())?;
    }
    Ok(Outcome::Success)
}

/// `trigger ID`: with `wait`, the reply comes when the reload has finished, however long it takes.
pub(super) fn trigger(
    client: &mut Client,
    id: &str,
    wait: bool,
    json: bool,
    io: &mut Io<'_>,
) -> Result<Outcome, CtlError> {
    let request = Request::new(protocol::Command::Trigger {
        id: id.to_owned(),
        wait,
    });
    let Some(reply) = send_waiting::<TriggerReply>(client, &request, wait, json, io)? else {
        human(io, json, &format!("{id}: reload scheduled\n"))?;
        return Ok(Outcome::Success);
    };
    let (line, ok) = render::trigger_result(&reply.result, &io.style());
    finish(io, json, &line, ok)
}

/// Sends a request that answers when its work is done (`trigger`, `stop`, `start`, `restart`):
/// with `wait`, reads the answer `R` with no read timeout (retries with backoff can take
/// minutes; the daemon always answers in the end); without, only `scheduled` (`None`).
fn send_waiting<R: DeserializeOwned>(
    client: &mut Client,
    request: &Request,
    wait: bool,
    json: bool,
    io: &mut Io<'_>,
) -> Result<Option<R>, CtlError> {
    if wait {
        client.set_read_timeout(None)?;
    }
    let result = if wait {
        answer::<R>(client, request, json, io).map(Some)
    } else {
        answer::<ScheduledReply>(client, request, json, io).map(|_| None)
    };
    client.set_read_timeout(Some(super::client::REQUEST_TIMEOUT))?;
    result
}

/// Prints a waited-for result's line (not with `--json`) and turns `ok` into the exit outcome.
fn finish(io: &mut Io<'_>, json: bool, line: &str, ok: bool) -> Result<Outcome, CtlError> {
    human(io, json, &format!("{line}\n"))?;
    Ok(if ok {
        Outcome::Success
    } else {
        Outcome::Failure
    })
}

/// A per-plugin lifecycle command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    Stop,
    Start,
    Restart,
}

impl Action {
    fn request(self, id: &str, wait: bool) -> protocol::Command {
        let id = id.to_owned();
        match self {
            Action::Stop => protocol::Command::Stop { id, wait },
            Action::Start => protocol::Command::Start { id, wait },
            Action::Restart => protocol::Command::Restart { id, wait },
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Action::Stop => "stop",
            Action::Start => "start",
            Action::Restart => "restart",
        }
    }
}

/// `stop ID`, `start ID`, `restart ID`: with `wait`, the reply comes once the plugin is down or
/// up (or failed to start), however long retries take.
pub(super) fn lifecycle(
    client: &mut Client,
    action: Action,
    id: &str,
    wait: bool,
    json: bool,
    io: &mut Io<'_>,
) -> Result<Outcome, CtlError> {
    let request = Request::new(action.request(id, wait));
    let Some(reply) = send_waiting::<LifecycleReply>(client, &request, wait, json, io)? else {
        human(io, json, &format!("{id}: {} scheduled\n", action.name()))?;
        return Ok(Outcome::Success);
    };
    let (line, ok) = render::lifecycle_result(action.name(), &reply.result, &io.style());
    finish(io, json, &line, ok)
}

/// Which events a follower shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stream {
    /// Every event (`events`).
    Events,
    /// Only `plugin_output` (`logs`).
    Logs,
}

/// Subscribes to events (of plugin `id` if given); with `--json` the acknowledgement is not printed,
/// so the output is nothing but events.
pub(super) fn subscribe(
    client: &mut Client,
    id: Option<&str>,
    verbose: bool,
    json: bool,
    io: &mut Io<'_>,
) -> Result<(), CtlError> {
    let request = Request::new(protocol::Command::Subscribe {
        plugin: id.map(str::to_owned),
        verbose,
    });
    let reply = client.request(&request)?;
    if json && reply.value["status"] == "error" {
        writeln!(io.out, "{}", reply.line)?;
    }
    reply.into_success()?;
    Ok(())
}

/// Prints events from a subscribed connection until the daemon closes it.
pub(super) fn follow(
    client: &mut Client,
    stream: Stream,
    json: bool,
    style: &Style,
    out: &mut (dyn Write + Send),
) -> Result<Outcome, CtlError> {
    client.set_read_timeout(None)?;
    loop {
        match client.read_line() {
            Ok(Some(line)) => print_event(line, client.path(), stream, json, style, out)?,
            Ok(None) => return Ok(Outcome::Success),
            Err(ReadError::TimedOut) => {}
            Err(ReadError::Failed(e)) => return Err(e),
        }
    }
}

/// Prints one event line in the form `stream` and `json` ask for.
fn print_event(
    line: String,
    path: &Path,
    stream: Stream,
    json: bool,
    style: &Style,
    out: &mut (dyn Write + Send),
) -> Result<(), CtlError> {
    if line.trim().is_empty() {
        return Ok(());
    }
    let event = parse_reply(line, path)?;
    let is_output = event.value["event"] == "plugin_output";
    let is_lag = event.value["event"] == "lagged";
    match (stream, json) {
        (Stream::Events, true) => writeln!(out, "{}", event.line)?,
        (Stream::Logs, true) if is_output => writeln!(out, "{}", event.line)?,
        (Stream::Events, false) => writeln!(out, "{}", render::event_line(&event.value, style))?,
        (Stream::Logs, false) if is_output || is_lag => {
            let text = render::log_line(&event.value, style)
                .unwrap_or_else(|| render::event_line(&event.value, style));
            writeln!(out, "{text}")?;
        }
        (Stream::Logs, _) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{FakeDaemon, run_capture};
    use serde_json::json;

    #[test]
    fn status_end_to_end() {
        let daemon = FakeDaemon::answering(|_| {
            vec![
                json!({"status": "success",
                "hot_reload": {"enabled": false, "watching_directories": 2, "last_reload": null,
                    "reload_count": 0, "failed_reloads": 0, "active_sessions": 1,
                    "debounce_delay_ms": 250, "watch_patterns": ["*"], "exclude_patterns": []},
                "daemon": {"pid": 77, "version": "0.1.0", "uptime_ms": 5000, "plugins_total": 0,
                    "plugins_running": 0, "plugins_dir": "/srv/plugins"}})
                .to_string(),
            ]
        });
        let run = run_capture(&["status"], &daemon, "");
        assert_eq!(run.code, 0, "{run:?}");
        assert_eq!(daemon.requests(), vec![json!({"cmd": "status"})]);
        assert!(
            run.out.contains("hot reload:  off, debounce 250 ms"),
            "{}",
            run.out
        );
        assert!(run.out.contains("last reload: never"), "{}", run.out);
        assert!(
            run.out
                .contains("daemon:      pid 77, version 0.1.0, up 5s"),
            "{}",
            run.out
        );
        assert!(!run.out.contains('\x1b'));
    }

    #[test]
    fn a_start_that_fails_exits_1_and_no_wait_says_scheduled() {
        let daemon = FakeDaemon::answering(|req| {
            let reply = if req["wait"] == false {
                json!({"status": "success", "scheduled": true})
            } else {
                json!({"status": "success", "result": {"plugin": "p1", "ok": false,
                    "state": "failed", "version": null, "error": "exited with code 3"}})
            };
            vec![reply.to_string()]
        });
        let run = run_capture(&["start", "p1"], &daemon, "");
        assert_eq!(run.code, 1, "{run:?}");
        assert_eq!(run.out, "p1: start failed (failed): exited with code 3\n");
        let run = run_capture(&["stop", "p1", "--no-wait"], &daemon, "");
        assert_eq!((run.code, run.out.as_str()), (0, "p1: stop scheduled\n"));
        assert_eq!(
            daemon.requests(),
            vec![
                json!({"cmd": "start", "plugin": "p1", "wait": true}),
                json!({"cmd": "stop", "plugin": "p1", "wait": false}),
            ]
        );
    }

    #[test]
    fn list_json_prints_reply_as_is() {
        let line = r#"{"status":"success","plugins":[]}"#;
        let daemon = FakeDaemon::answering(move |_| vec![line.to_string()]);
        let run = run_capture(&["--json", "list"], &daemon, "");
        assert_eq!(
            (run.code, run.out.as_str()),
            (0, "{\"status\":\"success\",\"plugins\":[]}\n")
        );
        assert_eq!(daemon.requests(), vec![json!({"cmd": "list"})]);
        let run = run_capture(&["list"], &daemon, "");
        assert!(run.out.starts_with("no plugins"), "{}", run.out);
    }

    #[test]
    fn plugin_unknown_exits_1_with_daemon_message() {
        let daemon = FakeDaemon::answering(|_| {
            vec![
                json!({"status": "error", "code": "unknown_plugin", "error": "no plugin named p9"})
                    .to_string(),
            ]
        });
        let run = run_capture(&["plugin", "p9"], &daemon, "");
        assert_eq!(run.code, 1, "{run:?}");
        // The second request looks for a known id to suggest.
        assert_eq!(
            daemon.requests(),
            vec![
                json!({"cmd": "plugin", "plugin": "p9"}),
                json!({"cmd": "list"})
            ]
        );
        assert_eq!(
            run.err,
            "hotreloadctl: no plugin named p9 (unknown_plugin)\n"
        );
        assert_eq!(run.out, "");
        // With --json the error reply itself is the output.
        let run = run_capture(&["--json", "plugin", "p9"], &daemon, "");
        assert_eq!(run.code, 1);
        assert!(run.out.contains("\"unknown_plugin\""), "{}", run.out);
        assert_eq!(run.err, "");
    }

    #[test]
    fn plugin_detail_end_to_end() {
        let daemon = FakeDaemon::answering(|_| {
            vec![
                json!({"status": "success", "plugin": {"id": "p1", "state": "running", "pid": 9,
                "version": "0123456789abcdef", "state_file": {"plugin_id": "p1"}, "history": []}})
                .to_string(),
            ]
        });
        let run = run_capture(&["plugin", "p1"], &daemon, "");
        assert_eq!(run.code, 0, "{run:?}");
        assert!(
            run.out.contains("version:    0123456789abcdef"),
            "{}",
            run.out
        );
        assert!(run.out.contains("\"plugin_id\": \"p1\""), "{}", run.out);
    }

    #[test]
    fn trigger_waits_and_reports_success() {
        let daemon = FakeDaemon::answering(|_| {
            vec![
                json!({"status": "success", "result": {"plugin": "p1", "ok": true,
                "old_version": "0123abcd00000000", "new_version": "4567ef0011111111",
                "duration_ms": 12, "error": null}})
                .to_string(),
            ]
        });
        let run = run_capture(&["trigger", "p1"], &daemon, "");
        assert_eq!(run.code, 0, "{run:?}");
        assert_eq!(
            daemon.requests(),
            vec![json!({"cmd": "trigger", "plugin": "p1", "wait": true})]
        );
        assert_eq!(run.out, "p1: reloaded 0123abcd… -> 4567ef00… in 12 ms\n");
    }

    #[test]
    fn trigger_failure_exits_1() {
        let daemon = FakeDaemon::answering(|_| {
            vec![
                json!({"status": "success", "result": {"plugin": "p1", "ok": false,
                "old_version": "0123abcd00000000", "new_version": null, "duration_ms": 3,
                "error": "exec format error"}})
                .to_string(),
            ]
        });
        let run = run_capture(&["trigger", "p1"], &daemon, "");
        assert_eq!(
            (run.code, run.out.as_str()),
            (1, "p1: reload failed: exec format error\n")
        );
        let run = run_capture(&["--json", "trigger", "p1"], &daemon, "");
        assert_eq!(run.code, 1);
        assert!(run.out.contains("\"exec format error\""));
    }

    #[test]
    fn trigger_no_wait() {
        let daemon = FakeDaemon::answering(|_| {
            vec![json!({"status": "success", "scheduled": true}).to_string()]
        });
        let run = run_capture(&["trigger", "p1", "--no-wait"], &daemon, "");
        assert_eq!((run.code, run.out.as_str()), (0, "p1: reload scheduled\n"));
        assert_eq!(
            daemon.requests(),
            vec![json!({"cmd": "trigger", "plugin": "p1", "wait": false})]
        );
    }

    #[test]
    fn enable_disable_reload_config() {
        let daemon = FakeDaemon::answering(|req| {
            let reply = match req["cmd"].as_str() {
                Some("enable") => json!({"status": "success", "enabled": true}),
                Some("disable") => json!({"status": "success", "enabled": false}),
                _ => json!({"status": "error", "code": "config_invalid",
                            "error": "/etc/hotreload/hotreload.toml:3:1: unknown key `foo`"}),
            };
            vec![reply.to_string()]
        });
        let run = run_capture(&["enable"], &daemon, "");
        assert_eq!((run.code, run.out.as_str()), (0, "hot reload enabled\n"));
        let run = run_capture(&["disable"], &daemon, "");
        assert_eq!((run.code, run.out.as_str()), (0, "hot reload disabled\n"));
        let run = run_capture(&["reload-config"], &daemon, "");
        assert_eq!(run.code, 1);
        assert!(
            run.err.contains("unknown key `foo` (config_invalid)"),
            "{}",
            run.err
        );
        assert_eq!(
            daemon.requests(),
            vec![
                json!({"cmd": "enable"}),
                json!({"cmd": "disable"}),
                json!({"cmd": "reload-config"})
            ]
        );
    }

    fn event_daemon() -> FakeDaemon {
        FakeDaemon::answering(|_| {
            vec![
                json!({"status": "success", "subscribed": true}).to_string(),
                json!({"event": "reload_started", "time": "2026-11-27T22:30:45.100Z", "plugin": "p1",
                       "trigger": "watch", "files": ["p1"]})
                .to_string(),
                json!({"event": "plugin_output", "time": "2026-11-27T22:30:45.200Z", "plugin": "p1",
                       "stream": "stderr", "line": "warming up"})
                .to_string(),
                json!({"event": "lagged", "time": "2026-11-27T22:30:45.300Z", "dropped": 3}).to_string(),
            ]
        })
    }

    #[test]
    fn events_follow_until_eof() {
        let daemon = event_daemon();
        let run = run_capture(&["events", "p1", "--verbose"], &daemon, "");
        assert_eq!(run.code, 0, "{run:?}");
        assert_eq!(
            daemon.requests(),
            vec![json!({"cmd": "subscribe", "plugin": "p1", "verbose": true})]
        );
        let want = "\
22:30:45.100 p1 reload_started trigger=watch files=[\"p1\"]
22:30:45.200 p1 plugin_output stream=stderr line=\"warming up\"
22:30:45.300 warning: 3 events dropped because this client read too slowly
";
        assert_eq!(run.out, want);
        let run = run_capture(&["--json", "events"], &daemon, "");
        assert_eq!(
            run.out.lines().count(),
            3,
            "events only, no ack: {}",
            run.out
        );
        assert!(
            run.out.starts_with("{\"event\":\"reload_started\""),
            "{}",
            run.out
        );
    }

    #[test]
    fn logs_show_only_plugin_output() {
        let daemon = event_daemon();
        let run = run_capture(&["logs"], &daemon, "");
        assert_eq!(run.code, 0, "{run:?}");
        assert_eq!(daemon.requests(), vec![json!({"cmd": "subscribe"})]);
        assert_eq!(
            run.out,
            "[p1 stderr] warming up\n22:30:45.300 warning: 3 events dropped because this client read too slowly\n"
        );
        let run = run_capture(&["--json", "logs", "p1"], &daemon, "");
        assert_eq!(run.out.lines().count(), 1, "{}", run.out);
        assert!(run.out.contains("warming up"));
    }

    #[test]
    fn no_daemon_exits_69_naming_the_path() {
        let dir = super::super::testutil::temp_dir("nodaemon");
        let missing = dir.join("control.sock");
        let run = super::super::testutil::run_at(&["status"], &missing, "");
        assert_eq!(run.code, 69, "{run:?}");
        assert!(
            run.err.contains(&missing.display().to_string()),
            "{}",
            run.err
        );
        assert!(run.err.contains("No such file or directory"), "{}", run.err);
    }

    #[test]
    fn daemon_closing_without_answer_exits_69() {
        let daemon = FakeDaemon::answering(|_| Vec::new());
        let run = run_capture(&["list"], &daemon, "");
        assert_eq!(run.code, 69, "{run:?}");
        assert!(
            run.err.contains("closed the connection before answering"),
            "{}",
            run.err
        );
    }

    #[test]
    fn usage_error_exits_64_without_connecting() {
        let daemon = FakeDaemon::answering(|_| Vec::new());
        let run = run_capture(&["trigger"], &daemon, "");
        assert_eq!(run.code, 64, "{run:?}");
        assert!(run.err.contains("Usage"), "{}", run.err);
        assert!(daemon.requests().is_empty());
    }
}
