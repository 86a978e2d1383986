//! Shared harness of the black-box tests: a per-test `Daemon` fixture living in its own temp dir,
//! a JSON-lines control `Client`, POSIX `sh` test plugins (`Script`), build installers, process
//! probes and polling helpers.
//!
//! The tests talk to `hotreloadd` and `hotreloadctl` only through their contract (SPEC §2–§8):
//! command line, `hotreload.toml`, environment, files, the control socket, signals, processes.
//! Everything is per test (own dir, own socket, own daemon) so tests run in parallel, and nothing
//! sleeps to synchronise: waits poll a condition until a deadline. Only tests proving that
//! something does *not* happen wait a bounded quiet period (`Daemon::prove_quiet`).
//!
//! By concern: `daemon` (the fixture), `client` (the control socket), `script` (builds, test
//! plugins, configs), `procs` (`/proc` probes, signals, commands run), `poll` (waiting) and
//! `pure` (formats and assertions). Everything is re-exported here, so tests `use crate::util::*`.

mod client;
mod daemon;
mod poll;
mod procs;
mod pure;
mod script;

use std::time::Duration;

pub use client::*;
pub use daemon::*;
pub use poll::*;
pub use procs::*;
pub use pure::*;
pub use script::*;

/// Timing knobs of the default test config: small so the suite runs fast.
pub const DEBOUNCE_MS: u64 = 50;
pub const RETRY_DELAY_MS: u64 = 50;
pub const MAX_RETRIES: u64 = 2;
pub const STOP_TIMEOUT_MS: u64 = 1000;
pub const STARTUP_GRACE_MS: u64 = 150;
/// How long a wait for something that must happen may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// How long a single request may take to be answered.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Exit codes of SPEC §7 and §8 (sysexits).
pub const EX_USAGE: i32 = 64;
pub const EX_UNAVAILABLE: i32 = 69;
pub const EX_OSERR: i32 = 71;
pub const EX_CONFIG: i32 = 78;

pub fn daemon_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hotreloadd")
}

pub fn ctl_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hotreloadctl")
}
