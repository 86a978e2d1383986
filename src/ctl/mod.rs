//! `hotreloadctl`, the client of the control socket (SPEC §6, §8), as a library so every part of it
//! can be unit-tested and the binary stays a one-line `main`.
//!
//! The client speaks the daemon's JSON-lines protocol over a blocking `UnixStream`, one connection
//! per command (`install --wait` and `interactive` use two). Replies are handled as
//! `serde_json::Value`: the client only reads the fields it shows, so it keeps working when the
//! daemon adds new ones.
//!
//! Errors become exit codes in one place, [`CtlError::exit_code`]: 0 success, 1 the daemon answered
//! with an error or the reload failed, 64 usage, 69 daemon not reachable, 78 configuration error.

pub mod cli;
pub mod client;
mod commands;
pub mod completions;
pub mod install;
mod interactive;
pub mod render;
mod suggest;
#[cfg(test)]
mod testutil;
mod wait;

use std::ffi::OsString;
use std::fmt;
use std::io::{self, BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use render::Style;

/// Exit code: the daemon answered with an error, or the reload failed.
pub const EXIT_FAILURE: u8 = crate::exit::FAILURE;
/// Exit code: bad command line (sysexits `EX_USAGE`).
pub const EXIT_USAGE: u8 = crate::exit::USAGE;
/// Exit code: the daemon is not reachable (sysexits `EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: u8 = crate::exit::UNAVAILABLE;
/// Exit code: configuration or environment error (sysexits `EX_CONFIG`).
pub const EXIT_CONFIG: u8 = crate::exit::CONFIG;

/// Why a command did not succeed; [`CtlError::exit_code`] maps each kind to its exit code.
#[derive(Debug)]
pub enum CtlError {
    /// A command-line argument is invalid beyond what clap checks (e.g. a plugin id): exit 64.
    Usage(String),
    /// The daemon cannot be reached, or closed the connection or spoke garbage: exit 69.
    Unreachable(String),
    /// The daemon answered `{"status":"error",...}`: exit 1.
    Daemon {
        /// The `code` member, e.g. `unknown_plugin`.
        code: String,
        /// The `error` member, a human message.
        message: String,
    },
    /// Anything else that failed on our side (install I/O, a failed reload, a timeout): exit 1.
    Failed(String),
    /// The socket path could not be resolved from the environment or configuration: exit 78.
    Config(String),
    /// Writing to stdout failed; a closed pipe (`hotreloadctl events | head`) is not an error.
    Output(io::Error),
}

impl CtlError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Usage(_) => EXIT_USAGE,
            CtlError::Unreachable(_) => EXIT_UNAVAILABLE,
            CtlError::Daemon { .. } | CtlError::Failed(_) => EXIT_FAILURE,
            CtlError::Config(_) => EXIT_CONFIG,
            // Unix convention: a reader that went away ends the writer quietly.
            CtlError::Output(e) if e.kind() == io::ErrorKind::BrokenPipe => 0,
            CtlError::Output(_) => EXIT_FAILURE,
        }
    }
}

impl fmt::Display for CtlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CtlError::Usage(m)
            | CtlError::Unreachable(m)
            | CtlError::Failed(m)
            | CtlError::Config(m) => f.write_str(m),
            CtlError::Daemon { code, message } => write!(f, "{message} ({code})"),
            CtlError::Output(e) => write!(f, "cannot write to stdout: {e}"),
        }
    }
}

impl From<io::Error> for CtlError {
    fn from(e: io::Error) -> Self {
        CtlError::Output(e)
    }
}

/// How a command that ran to completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exit 0.
    Success,
    /// Exit 1, already reported on stdout (e.g. "p1: reload failed: ...").
    Failure,
}

/// The process's streams and terminal facts, passed in so tests can capture everything.
pub struct Io<'a> {
    /// Standard output; `Send` because `interactive`'s event watch prints from a second thread.
    pub out: &'a mut (dyn Write + Send),
    /// Standard error.
    pub err: &'a mut dyn Write,
    /// Standard input (used by `interactive` only).
    pub input: &'a mut dyn BufRead,
    /// Whether stdout is a terminal: colours, truncation to `width`.
    pub stdout_tty: bool,
    /// Whether stdin is a terminal: `interactive` prints its prompt only then.
    pub stdin_tty: bool,
    /// Terminal width in columns, when stdout is a terminal.
    pub width: Option<usize>,
    /// `NO_COLOR` is set (<https://no-color.org>): never colour.
    pub no_color: bool,
    /// Show event times in local time (tests use UTC for stable output).
    pub local_time: bool,
}

impl Io<'_> {
    /// The rendering style for a command starting now.
    fn style(&self) -> Style {
        Style {
            color: self.stdout_tty && !self.no_color,
            width: if self.stdout_tty { self.width } else { None },
            local_time: self.local_time,
            now: std::time::SystemTime::now(),
        }
    }
}

/// Runs `hotreloadctl` with `args` (including the program name) and returns the exit code.
pub fn run<I, T>(args: I, io: &mut Io<'_>) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match cli::parse(args) {
        cli::Parsed::Run(cli) => cli,
        cli::Parsed::Exit {
            code,
            text,
            to_stdout,
        } => {
            let stream: &mut dyn Write = if to_stdout { io.out } else { io.err };
            // Nothing useful can be done when printing help itself fails.
            let _ = stream.write_all(text.as_bytes());
            return code;
        }
    };
    if let Some(code) = run_offline(&cli, io) {
        return code;
    }
    let result = resolve_socket(cli.socket.as_deref())
        .map_err(CtlError::Config)
        .and_then(|socket| {
            if cli.socket.is_none()
                && std::env::var_os("HOTRELOAD_SOCKET").is_none_or(|v| v.is_empty())
            {
                client::check_socket_dir(&socket)?;
            }
            commands::execute(&cli.command, &socket, cli.json, io)
                .map_err(|e| with_suggestion(e, cli.command.plugin_id(), &socket))
        });
    match result {
        Ok(Outcome::Success) => 0,
        Ok(Outcome::Failure) => EXIT_FAILURE,
        Err(e) => report(&e, cli.json, io),
    }
}

/// The commands for shell completion, which must never fail loudly: `completions` needs no
/// daemon, and `__plugin-ids` prints nothing when none answers. `None` for every other command.
fn run_offline(cli: &cli::Cli, io: &mut Io<'_>) -> Option<u8> {
    let text = match &cli.command {
        cli::Command::Completions { shell } => completions::script(*shell),
        cli::Command::PluginIds => match resolve_socket(cli.socket.as_deref()) {
            Ok(socket) => suggest::plugin_ids(&socket)
                .iter()
                .map(|id| format!("{id}\n"))
                .collect(),
            Err(_) => String::new(),
        },
        _ => return None,
    };
    let written = io.out.write_all(text.as_bytes());
    Some(written.map_or_else(|e| CtlError::Output(e).exit_code(), |()| 0))
}

/// An `unknown_plugin` error for `typed` gains the closest known id: "did you mean "hello"?".
fn with_suggestion(e: CtlError, typed: Option<&str>, socket: &Path) -> CtlError {
    match (e, typed) {
        (CtlError::Daemon { code, message }, Some(typed)) if code == "unknown_plugin" => {
            let known = suggest::plugin_ids(socket);
            let message = match suggest::closest(typed, &known) {
                Some(id) => format!("{message}; did you mean \"{id}\"?"),
                None => message,
            };
            CtlError::Daemon { code, message }
        }
        (e, _) => e,
    }
}

/// Prints `e` on stderr (unless `--json` already printed the daemon's error reply) and returns its
/// exit code.
fn report(e: &CtlError, json: bool, io: &mut Io<'_>) -> u8 {
    let quiet = match e {
        CtlError::Daemon { .. } => json,
        CtlError::Output(io_err) => io_err.kind() == io::ErrorKind::BrokenPipe,
        _ => false,
    };
    if !quiet {
        let _ = writeln!(io.err, "hotreloadctl: {e}");
    }
    e.exit_code()
}

/// The binary's entry point: real stdio, real terminal checks.
pub fn main() -> ExitCode {
    let stdout_tty = io::stdout().is_terminal();
    let stdin_tty = io::stdin().is_terminal();
    let mut out = io::stdout();
    let mut err = io::stderr();
    let mut input = io::stdin().lock();
    let mut io = Io {
        out: &mut out,
        err: &mut err,
        input: &mut input,
        stdout_tty,
        stdin_tty,
        width: if stdout_tty {
            render::terminal_width()
        } else {
            None
        },
        no_color: std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()),
        local_time: true,
    };
    ExitCode::from(run(std::env::args_os(), &mut io))
}

/// The socket to talk to: `--socket`, then `$HOTRELOAD_SOCKET` (no config read in either case),
/// else what the daemon's configuration resolves (SPEC §2), so client and daemon always agree.
pub fn resolve_socket(cli: Option<&Path>) -> Result<PathBuf, String> {
    let env = crate::config::Env::from_process();
    crate::config::client_socket(cli, &env).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_per_error_kind() {
        assert_eq!(CtlError::Usage(String::new()).exit_code(), 64);
        assert_eq!(CtlError::Unreachable(String::new()).exit_code(), 69);
        let daemon = CtlError::Daemon {
            code: "busy".into(),
            message: "shutting down".into(),
        };
        assert_eq!(daemon.exit_code(), 1);
        assert_eq!(CtlError::Failed(String::new()).exit_code(), 1);
        assert_eq!(CtlError::Config(String::new()).exit_code(), 78);
        let pipe = CtlError::Output(io::Error::from(io::ErrorKind::BrokenPipe));
        assert_eq!(pipe.exit_code(), 0);
    }
}
