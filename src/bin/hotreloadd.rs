//! `hotreloadd`: parse the command line, load the configuration, run the daemon, and turn the
//! outcome into an exit code (0 clean stop; the others are `hotreload::exit`'s).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use hotreload::config::{self, Env, Overrides};
use hotreload::daemon::Daemon;
use hotreload::exit::{self, FatalError};

/// Supervise plugin executables and hot-reload each one when a new build lands on disk.
#[derive(Debug, Parser)]
#[command(
    name = "hotreloadd",
    version,
    after_help = "Without arguments and without a config file, hotreloadd supervises ./plugins.\n\
                  Control it with `hotreloadctl status` or `echo status | socat - UNIX-CONNECT:<socket>`.\n\
                  Environment: HOTRELOAD_CONFIG, HOTRELOAD_ENABLED, HOTRELOAD_DEBOUNCE_MS, HOTRELOAD_WATCH,\n\
                  HOTRELOAD_SOCKET, HOTRELOAD_LOG. See hotreloadd(8) and hotreload.toml(5)."
)]
struct Cli {
    /// Configuration file (default: $HOTRELOAD_CONFIG, $CONFIGURATION_DIRECTORY/hotreload.toml,
    /// /etc/hotreload/hotreload.toml as root, else ~/.config/hotreload/hotreload.toml)
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Directory whose subdirectories are plugins (default: ./plugins)
    #[arg(long, value_name = "DIR")]
    plugins_dir: Option<PathBuf>,
    /// Directory for the control socket and snapshots
    #[arg(long, value_name = "DIR")]
    runtime_dir: Option<PathBuf>,
    /// Directory for the plugins' state files
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Control socket path
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Validate the configuration, print the effective configuration as TOML, and exit
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    hotreload::logging::init();
    let overrides = Overrides {
        config: cli.config,
        plugins_dir: cli.plugins_dir,
        runtime_dir: cli.runtime_dir,
        state_dir: cli.state_dir,
        socket: cli.socket,
    };
    let env = Env::from_process();
    let config = match config::load(&overrides, &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hotreloadd: {e}");
            return ExitCode::from(FatalError::from(e).exit_code());
        }
    };
    if cli.check_config {
        print!("{}", config.to_effective_toml());
        return ExitCode::SUCCESS;
    }
    match Daemon::start(config, overrides, env).and_then(Daemon::run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}
