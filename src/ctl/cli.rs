//! The command line of `hotreloadctl` (clap derive) and the mapping of clap's outcomes to our exit
//! codes: help and version exit 0, every other clap error is a usage error, exit 64 (clap's own
//! default of 2 is not the sysexits code the SPEC asks for).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};

use super::EXIT_USAGE;
use super::completions::Shell;

const EXAMPLES: &str = "\
EXAMPLES:
  hotreloadctl status
  hotreloadctl list
  hotreloadctl trigger ffmpeg_transcoder
  hotreloadctl stop ffmpeg_transcoder          # stays stopped until `start` (or `restart`)
  hotreloadctl disable ffmpeg_transcoder       # ignore this plugin's changes only
  hotreloadctl events --verbose                # why did (or didn't) my plugin reload?
  hotreloadctl logs ffmpeg_transcoder
  hotreloadctl install ffmpeg_transcoder target/release/ffmpeg_transcoder --wait
  hotreloadctl --json list | jq -r '.plugins[] | .id + \" \" + .state'

  The socket speaks JSON lines; bare commands work too, so socat is enough:
  echo status | socat - UNIX-CONNECT:/run/hotreload/control.sock
  echo '{\"cmd\":\"trigger\",\"plugin\":\"ffmpeg_transcoder\"}' | socat -t 120 - UNIX-CONNECT:/run/hotreload/control.sock
  socat READLINE UNIX-CONNECT:/run/hotreload/control.sock     # then type: list, subscribe, help

SOCKET:
  --socket, else $HOTRELOAD_SOCKET, else where the daemon's configuration puts it (control.socket in
  hotreload.toml, else <runtime dir>/control.sock: /run/hotreload/control.sock for root,
  $XDG_RUNTIME_DIR/hotreload/control.sock or /tmp/hotreload-$UID/control.sock for other users).

EXIT STATUS:
  0 success, 1 the daemon answered with an error or the reload failed, 64 usage error,
  69 daemon not reachable, 78 configuration error";

/// Query and control hotreloadd, the plugin hot-reload daemon.
#[derive(Debug, Parser, PartialEq, Eq)]
#[command(
    name = "hotreloadctl",
    version,
    arg_required_else_help = true,
    after_help = EXAMPLES
)]
pub struct Cli {
    /// Control socket of hotreloadd [default: $HOTRELOAD_SOCKET, else as the daemon's configuration says]
    #[arg(long, value_name = "PATH", global = true)]
    pub socket: Option<PathBuf>,
    /// Print the daemon's JSON replies and events as they are, one object per line
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// One command of `hotreloadctl`.
#[derive(Debug, Subcommand, PartialEq, Eq)]
pub enum Command {
    /// Show the daemon summary: hot reload on/off, reload counts, plugins, uptime
    Status,
    /// List plugins with state, pid, tasks, version, restarts, reloads and last error
    List,
    /// Show one plugin in detail, with its state file and reload history
    Plugin {
        /// Plugin id (its directory name)
        id: String,
    },
    /// Turn automatic hot reload on, for all plugins or one (reloads what changed meanwhile)
    Enable {
        /// Only this plugin (a plugin disabled on its own stays off after a global enable)
        id: Option<String>,
    },
    /// Turn automatic hot reload off, for all plugins or one (changes are ignored until enabled)
    Disable {
        /// Only this plugin (kept across daemon restarts)
        id: Option<String>,
    },
    /// Reload a plugin now, even when hot reload is disabled
    Trigger {
        /// Plugin id
        id: String,
        /// Return as soon as the reload is scheduled instead of waiting for its result
        #[arg(long)]
        no_wait: bool,
    },
    /// Stop a plugin and keep it stopped (new builds, crashes, daemon restarts) until started
    Stop {
        /// Plugin id
        id: String,
        /// Return as soon as the stop is scheduled instead of waiting until the plugin is down
        #[arg(long)]
        no_wait: bool,
    },
    /// Start a stopped or failed plugin with its newest good build
    Start {
        /// Plugin id
        id: String,
        /// Return as soon as the start is scheduled instead of waiting for its result
        #[arg(long)]
        no_wait: bool,
    },
    /// Stop and start a plugin with its newest good build, whatever its state and version
    Restart {
        /// Plugin id
        id: String,
        /// Return as soon as the restart is scheduled instead of waiting for its result
        #[arg(long)]
        no_wait: bool,
    },
    /// Follow daemon events (reloads, starts, exits, output) until interrupted
    Events {
        /// Only events of this plugin
        id: Option<String>,
        /// Also show ignored changes and why they were ignored
        #[arg(short, long)]
        verbose: bool,
    },
    /// Follow plugin output (stdout and stderr lines) until interrupted
    Logs {
        /// Only output of this plugin
        id: Option<String>,
    },
    /// Re-read the daemon's configuration file (like SIGHUP)
    ReloadConfig,
    /// Install a new build of a plugin atomically (copy next to it, then rename over it)
    Install {
        /// Plugin id; a new id creates PLUGINS_DIR/ID/ID
        id: String,
        /// The new executable
        file: PathBuf,
        /// Wait for the reload's result (or a new plugin's first start)
        #[arg(long)]
        wait: bool,
    },
    /// A small menu: status, list, reload, watch events, enable, disable
    Interactive,
    /// Print a shell completion script (commands, flags, and plugin ids from the running daemon)
    Completions {
        /// The shell: bash, zsh or fish
        shell: Shell,
    },
    /// The running daemon's plugin ids, one per line; nothing when none answers (for completion)
    #[command(name = "__plugin-ids", hide = true)]
    PluginIds,
}

impl Command {
    /// The plugin id the command names, if any.
    pub fn plugin_id(&self) -> Option<&str> {
        match self {
            Command::Plugin { id }
            | Command::Trigger { id, .. }
            | Command::Stop { id, .. }
            | Command::Start { id, .. }
            | Command::Restart { id, .. }
            | Command::Install { id, .. } => Some(id),
            Command::Events { id, .. }
            | Command::Logs { id }
            | Command::Enable { id }
            | Command::Disable { id } => id.as_deref(),
            _ => None,
        }
    }
}

/// What parsing the command line produced.
#[derive(Debug)]
pub enum Parsed {
    /// Run this command.
    Run(Cli),
    /// Print `text` (on stdout or stderr) and exit with `code` without running anything.
    Exit {
        /// 0 for help and version, 64 for usage errors.
        code: u8,
        /// The text clap rendered.
        text: String,
        /// Help and version go to stdout, errors to stderr.
        to_stdout: bool,
    },
}

/// Parses `args` (including the program name).
pub fn parse<I, T>(args: I) -> Parsed
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    match Cli::try_parse_from(&args) {
        Ok(cli) => Parsed::Run(cli),
        Err(e) => {
            let ok = matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion);
            let mut text = e.render().to_string();
            if !text.ends_with('\n') {
                text.push('\n');
            }
            Parsed::Exit {
                code: if ok { 0 } else { EXIT_USAGE },
                text,
                to_stdout: ok,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(args: &[&str]) -> Cli {
        let mut full = vec!["hotreloadctl"];
        full.extend_from_slice(args);
        match parse(full) {
            Parsed::Run(cli) => cli,
            Parsed::Exit { text, .. } => panic!("{args:?} did not parse: {text}"),
        }
    }

    fn exit_of(args: &[&str]) -> (u8, String, bool) {
        let mut full = vec!["hotreloadctl"];
        full.extend_from_slice(args);
        match parse(full) {
            Parsed::Run(cli) => panic!("{args:?} parsed as {cli:?}"),
            Parsed::Exit {
                code,
                text,
                to_stdout,
            } => (code, text, to_stdout),
        }
    }

    #[test]
    fn every_subcommand_parses() {
        let id = || "p1".to_string();
        let cases: Vec<(&[&str], Command)> = vec![
            (&["status"], Command::Status),
            (&["list"], Command::List),
            (&["plugin", "p1"], Command::Plugin { id: id() }),
            (&["enable"], Command::Enable { id: None }),
            (&["disable"], Command::Disable { id: None }),
            (&["enable", "p1"], Command::Enable { id: Some(id()) }),
            (&["disable", "p1"], Command::Disable { id: Some(id()) }),
            (
                &["stop", "p1"],
                Command::Stop {
                    id: id(),
                    no_wait: false,
                },
            ),
            (
                &["start", "p1", "--no-wait"],
                Command::Start {
                    id: id(),
                    no_wait: true,
                },
            ),
            (
                &["restart", "p1"],
                Command::Restart {
                    id: id(),
                    no_wait: false,
                },
            ),
            (
                &["trigger", "p1"],
                Command::Trigger {
                    id: id(),
                    no_wait: false,
                },
            ),
            (
                &["trigger", "p1", "--no-wait"],
                Command::Trigger {
                    id: id(),
                    no_wait: true,
                },
            ),
            (
                &["events"],
                Command::Events {
                    id: None,
                    verbose: false,
                },
            ),
            (
                &["events", "p1", "--verbose"],
                Command::Events {
                    id: Some(id()),
                    verbose: true,
                },
            ),
            (
                &["events", "-v"],
                Command::Events {
                    id: None,
                    verbose: true,
                },
            ),
            (&["logs"], Command::Logs { id: None }),
            (&["logs", "p1"], Command::Logs { id: Some(id()) }),
            (&["reload-config"], Command::ReloadConfig),
            (
                &["install", "p1", "/tmp/build"],
                Command::Install {
                    id: id(),
                    file: "/tmp/build".into(),
                    wait: false,
                },
            ),
            (
                &["install", "p1", "/tmp/build", "--wait"],
                Command::Install {
                    id: id(),
                    file: "/tmp/build".into(),
                    wait: true,
                },
            ),
            (&["interactive"], Command::Interactive),
        ];
        for (args, want) in cases {
            let cli = run_of(args);
            assert_eq!(cli.command, want, "{args:?}");
            assert_eq!(cli.socket, None);
            assert!(!cli.json);
        }
    }

    #[test]
    fn global_options_go_before_or_after_the_command() {
        let before = run_of(&["--socket", "/s.sock", "--json", "list"]);
        let after = run_of(&["list", "--json", "--socket", "/s.sock"]);
        assert_eq!(before, after);
        assert_eq!(before.socket, Some(PathBuf::from("/s.sock")));
        assert!(before.json);
    }

    #[test]
    fn usage_errors_exit_64_on_stderr() {
        for args in [
            &["frobnicate"][..],
            &["trigger"],
            &["stop"],
            &["restart", "p1", "p2"],
            &["plugin"],
            &["install", "p1"],
            &["status", "--bogus"],
            &["list", "extra"],
            &[],
        ] {
            let (code, text, to_stdout) = exit_of(args);
            assert_eq!(code, 64, "{args:?}: {text}");
            assert!(!to_stdout, "{args:?}");
            assert!(!text.is_empty());
        }
    }

    #[test]
    fn help_and_version_exit_0_on_stdout() {
        let (code, text, to_stdout) = exit_of(&["--help"]);
        assert_eq!((code, to_stdout), (0, true));
        assert!(text.contains("EXAMPLES"), "{text}");
        assert!(text.ends_with('\n'));
        assert!(text.contains("echo status | socat - UNIX-CONNECT:/run/hotreload/control.sock"));
        assert!(text.contains("hotreloadctl status"));
        assert!(
            text.contains("Reload a plugin now"),
            "one line per subcommand: {text}"
        );
        let (code, text, to_stdout) = exit_of(&["--version"]);
        assert_eq!((code, to_stdout), (0, true));
        assert!(text.contains(env!("CARGO_PKG_VERSION")));
        let (code, _, _) = exit_of(&["trigger", "--help"]);
        assert_eq!(code, 0);
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
