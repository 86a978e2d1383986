//! `hotreloadctl interactive`: a small line-oriented menu (s status, l list, r reload, w watch
//! events, e enable, d disable, stop, start, restart, q quit) over one kept-open connection.
//!
//! It reads whole lines, so it works the same from a terminal and from a pipe
//! (`printf 's\nl\nq\n' | hotreloadctl interactive`); the prompt is printed only when stdin is a
//! terminal, and end of input quits. Watching events runs the follower on a second connection in
//! a scoped thread while the main thread waits for Enter; shutting the socket down wakes it.

use std::net::Shutdown;
use std::path::Path;

use super::cli::Command;
use super::client::Client;
use super::commands::{self, Action, Stream};
use super::{CtlError, Io, Outcome};

const MENU: &str = "s status  l list  r [ID] reload  w [ID] watch events  e [ID] enable  \
     d [ID] disable  stop ID  start ID  restart ID  q quit";

/// Runs the menu until `q` or end of input; exit 1 if any command failed.
pub(super) fn run(socket: &Path, json: bool, io: &mut Io<'_>) -> Result<Outcome, CtlError> {
    // Connect at once, so a daemon that is not there is reported (exit 69) before any menu.
    let mut session = Session {
        socket,
        json,
        client: Some(Client::connect(socket)?),
        failed: false,
    };
    if io.stdin_tty {
        writeln!(io.out, "{MENU}")?;
    }
    while let Some(line) = prompt(io, "> ")? {
        let mut words = line.split_whitespace();
        let (choice, arg) = (words.next().unwrap_or(""), words.next());
        match choice {
            "" => {}
            "q" | "quit" | "exit" => break,
            "s" | "status" => session.one_shot(&Command::Status, io)?,
            "l" | "list" => session.one_shot(&Command::List, io)?,
            "e" | "enable" => {
                let id = arg.map(str::to_owned);
                session.one_shot(&Command::Enable { id }, io)?
            }
            "d" | "disable" => {
                let id = arg.map(str::to_owned);
                session.one_shot(&Command::Disable { id }, io)?
            }
            "r" | "reload" => {
                let Some(id) = plugin_id(io, arg)? else { break };
                if !id.is_empty() {
                    session.reload(&id, io)?;
                }
            }
            "stop" | "start" | "restart" => {
                let Some(id) = plugin_id(io, arg)? else { break };
                let action = match choice {
                    "stop" => Action::Stop,
                    "start" => Action::Start,
                    _ => Action::Restart,
                };
                if !id.is_empty() {
                    session.lifecycle(action, &id, io)?;
                }
            }
            "w" | "watch" => session.watch(arg, io)?,
            "h" | "help" | "?" => writeln!(io.out, "{MENU}")?,
            other => writeln!(io.err, "hotreloadctl: unknown choice {other:?}; {MENU}")?,
        }
    }
    Ok(if session.failed {
        Outcome::Failure
    } else {
        Outcome::Success
    })
}

/// The plugin id given after the choice, else asked for; `None` at end of input.
fn plugin_id(io: &mut Io<'_>, given: Option<&str>) -> Result<Option<String>, CtlError> {
    Ok(match given {
        Some(id) => Some(id.to_string()),
        None => prompt(io, "plugin id: ")?.map(|id| id.trim().to_string()),
    })
}

/// Prints `text` as a prompt (terminal only) and reads one line; `None` at end of input.
fn prompt(io: &mut Io<'_>, text: &str) -> Result<Option<String>, CtlError> {
    if io.stdin_tty {
        write!(io.out, "{text}")?;
        io.out.flush()?;
    }
    let mut line = String::new();
    match io.input.read_line(&mut line) {
        Ok(0) => Ok(None),
        Ok(_) => Ok(Some(line)),
        Err(e) => Err(CtlError::Failed(format!("cannot read standard input: {e}"))),
    }
}

/// The menu's connection, re-opened after the daemon went away.
struct Session<'s> {
    socket: &'s Path,
    json: bool,
    client: Option<Client>,
    failed: bool,
}

impl Session<'_> {
    fn one_shot(&mut self, command: &Command, io: &mut Io<'_>) -> Result<(), CtlError> {
        let json = self.json;
        self.with_client(io, |client, io| {
            commands::one_shot(client, command, json, io)
        })
    }

    fn reload(&mut self, id: &str, io: &mut Io<'_>) -> Result<(), CtlError> {
        let json = self.json;
        self.with_client(io, |client, io| {
            commands::trigger(client, id, true, json, io)
        })
    }

    fn lifecycle(&mut self, action: Action, id: &str, io: &mut Io<'_>) -> Result<(), CtlError> {
        let json = self.json;
        self.with_client(io, |client, io| {
            commands::lifecycle(client, action, id, true, json, io)
        })
    }

    /// Runs `f` on the connection (connecting first if needed); a failure is reported and the
    /// menu goes on, except for a broken stdout, which ends it.
    fn with_client(
        &mut self,
        io: &mut Io<'_>,
        f: impl FnOnce(&mut Client, &mut Io<'_>) -> Result<Outcome, CtlError>,
    ) -> Result<(), CtlError> {
        let result = match self.client.take() {
            Some(client) => Ok(client),
            None => Client::connect(self.socket),
        }
        .and_then(|mut client| {
            let outcome = f(&mut client, io);
            // A connection that failed is not worth keeping; the next command reconnects.
            if !matches!(outcome, Err(CtlError::Unreachable(_))) {
                self.client = Some(client);
            }
            outcome
        });
        self.settle(result, io)
    }

    /// Records a command's result: prints errors, remembers failures, stops only on output errors.
    fn settle(
        &mut self,
        result: Result<Outcome, CtlError>,
        io: &mut Io<'_>,
    ) -> Result<(), CtlError> {
        match result {
            Ok(Outcome::Success) => Ok(()),
            Ok(Outcome::Failure) => {
                self.failed = true;
                Ok(())
            }
            Err(e @ CtlError::Output(_)) => Err(e),
            Err(e) => {
                self.failed = true;
                if !(self.json && matches!(e, CtlError::Daemon { .. })) {
                    writeln!(io.err, "hotreloadctl: {e}")?;
                }
                Ok(())
            }
        }
    }

    /// Follows events (of plugin `id` if given) until a line (Enter) or end of input.
    fn watch(&mut self, id: Option<&str>, io: &mut Io<'_>) -> Result<(), CtlError> {
        let result = self.follow_until_enter(id, io);
        self.settle(result, io)
    }

    fn follow_until_enter(
        &mut self,
        id: Option<&str>,
        io: &mut Io<'_>,
    ) -> Result<Outcome, CtlError> {
        let mut events = Client::connect(self.socket)?;
        commands::subscribe(&mut events, id, false, self.json, io)?;
        let stopper = events.handle()?;
        if io.stdin_tty {
            writeln!(io.out, "watching events; press Enter to stop")?;
        }
        let (json, style) = (self.json, io.style());
        let Io { out, input, .. } = io;
        std::thread::scope(|scope| {
            let watcher = scope.spawn(move || {
                commands::follow(&mut events, Stream::Events, json, &style, &mut **out)
            });
            let mut line = String::new();
            // Enter, any line, end of input or a read error all end the watch.
            let _ = input.read_line(&mut line);
            // Wakes the watcher's blocking read with end of stream; it may already have ended.
            let _ = stopper.shutdown(Shutdown::Both);
            watcher.join().unwrap_or_else(|_| {
                Err(CtlError::Failed(
                    "the event watcher thread panicked".to_string(),
                ))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{FakeDaemon, run_at, run_capture, temp_dir};
    use serde_json::{Value, json};

    fn menu_daemon() -> FakeDaemon {
        FakeDaemon::answering(|req| {
            let reply = match req["cmd"].as_str() {
                Some("status") => {
                    json!({"status": "success", "hot_reload": {"enabled": true}, "daemon": {}})
                }
                Some("list") => json!({"status": "success", "plugins": []}),
                Some("enable") => json!({"status": "success", "enabled": true}),
                Some("disable") => json!({"status": "success", "enabled": false}),
                Some("trigger") if req["plugin"] == "p1" => json!({"status": "success",
                    "result": {"plugin": "p1", "ok": true, "old_version": "0123abcd00000000",
                               "new_version": "4567ef0011111111", "duration_ms": 5, "error": null}}),
                Some("trigger") => {
                    json!({"status": "error", "code": "unknown_plugin", "error": "no plugin p2"})
                }
                Some("subscribe") => {
                    return vec![
                        json!({"status": "success", "subscribed": true}).to_string(),
                        json!({"event": "plugin_ready", "time": "2026-11-27T22:30:45.000Z", "plugin": "p1"})
                            .to_string(),
                    ];
                }
                _ => json!({"status": "error", "code": "unknown_command", "error": "?"}),
            };
            vec![reply.to_string()]
        })
    }

    #[test]
    fn menu_stops_starts_restarts_and_switches_one_plugin() {
        let daemon = FakeDaemon::answering(|req| {
            let reply = match req["cmd"].as_str() {
                Some(cmd @ ("stop" | "start" | "restart")) => {
                    let state = if cmd == "stop" { "stopped" } else { "running" };
                    json!({"status": "success", "result": {"plugin": req["plugin"], "ok": true,
                        "state": state, "version": "0123abcd00000000", "error": null}})
                }
                Some("enable") => json!({"status": "success", "enabled": true}),
                Some("disable") => json!({"status": "success", "enabled": false}),
                _ => json!({"status": "error", "code": "unknown_command", "error": "?"}),
            };
            vec![reply.to_string()]
        });
        let input = "stop p1\nstart\np1\nrestart p1\nd p1\ne p1\nq\n";
        let run = run_capture(&["interactive"], &daemon, input);
        assert_eq!(run.code, 0, "{run:?}");
        assert_eq!(
            daemon.requests(),
            vec![
                json!({"cmd": "stop", "plugin": "p1", "wait": true}),
                json!({"cmd": "start", "plugin": "p1", "wait": true}),
                json!({"cmd": "restart", "plugin": "p1", "wait": true}),
                json!({"cmd": "disable", "plugin": "p1"}),
                json!({"cmd": "enable", "plugin": "p1"}),
            ]
        );
        assert!(
            run.out.contains(
                "p1: stopped\np1: running 0123abcd…\np1: running 0123abcd…\n\
                 p1: hot reload disabled\np1: hot reload enabled\n"
            ),
            "{}",
            run.out
        );
    }

    #[test]
    fn menu_from_a_pipe() {
        let daemon = menu_daemon();
        let input = "s\nl\nr p1\nr\np2\ne\nd\nw\n\nx\nq\ns\n";
        let run = run_capture(&["interactive"], &daemon, input);
        assert_eq!(run.code, 1, "the unknown plugin failed: {run:?}");
        let cmds: Vec<Value> = daemon.requests();
        assert_eq!(
            cmds,
            vec![
                json!({"cmd": "status"}),
                json!({"cmd": "list"}),
                json!({"cmd": "trigger", "plugin": "p1", "wait": true}),
                json!({"cmd": "trigger", "plugin": "p2", "wait": true}),
                json!({"cmd": "enable"}),
                json!({"cmd": "disable"}),
                json!({"cmd": "subscribe"}),
            ],
            "q stops before the last s"
        );
        assert!(
            !run.out.lines().any(|l| l.starts_with("> ")),
            "no prompt when stdin is not a terminal: {}",
            run.out
        );
        assert!(run.out.contains("hot reload:  on"), "{}", run.out);
        assert!(run.out.contains("no plugins"), "{}", run.out);
        assert!(
            run.out
                .contains("p1: reloaded 0123abcd… -> 4567ef00… in 5 ms"),
            "{}",
            run.out
        );
        assert!(
            run.out
                .contains("hot reload enabled\nhot reload disabled\n"),
            "{}",
            run.out
        );
        assert!(
            run.err.contains("no plugin p2 (unknown_plugin)"),
            "{}",
            run.err
        );
        assert!(run.err.contains("unknown choice \"x\""), "{}", run.err);
    }

    #[test]
    fn end_of_input_quits_cleanly() {
        let daemon = menu_daemon();
        let run = run_capture(&["interactive"], &daemon, "s\n");
        assert_eq!(run.code, 0, "{run:?}");
        assert_eq!(daemon.requests(), vec![json!({"cmd": "status"})]);
        let run = run_capture(&["interactive"], &daemon, "w p1");
        assert_eq!(run.code, 0, "watch ends at end of input: {run:?}");
    }

    #[test]
    fn no_daemon_exits_69() {
        let dir = temp_dir("interactive-nodaemon");
        let run = run_at(&["interactive"], &dir.join("control.sock"), "s\n");
        assert_eq!(run.code, 69, "{run:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
