//! hotreload: supervise plugin processes and hot-reload each one when a new build lands on disk.
//!
//! # Theory of operation
//!
//! `hotreloadd` is one thread around one `mio::Poll`. Every source of work is a file descriptor
//! registered with that poll: the inotify fd (new builds), a signal-hook-mio pipe (SIGCHLD,
//! SIGTERM, SIGINT, SIGHUP), each plugin's stdout/stderr pipe, the control socket and its
//! clients. Time is a hand-rolled timer wheel: the poll sleeps exactly until the next due timer
//! (debounce, retry backoff, SIGKILL escalation, startup grace) and not at all when none is due,
//! so an idle daemon never wakes up.
//!
//! Subsystems own their state and never call each other; the daemon owns them all and routes
//! readiness events and expired timers between them.
pub mod clock;
pub mod config;
pub mod control;
pub mod ctl;
pub mod daemon;
pub mod events;
mod fsutil;
pub mod hooks;
pub mod listen;
pub mod logging;
pub mod notify;
pub mod plugin_notify;
pub mod poll_watch;
pub mod preflight;
pub mod private_dir;
pub mod protocol;
pub mod signals;
pub mod snapshot;
pub mod state_file;
pub mod supervisor;
pub mod token;
pub mod watch;
pub mod wheel;
