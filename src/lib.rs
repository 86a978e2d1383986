//! hotreload: supervise plugin processes and hot-reload each one when a new build lands on disk.
//!
//! # Theory of operation
//!
//! `hotreloadd` is one thread around one `mio::Poll`. Every source of work is a file descriptor
//! registered with that poll: the inotify fd (new builds), a signal-hook-mio pipe (SIGCHLD,
//! SIGTERM, SIGINT, SIGHUP), each plugin's stdout/stderr pipe, the control socket and its
//! clients. Time is a hand-rolled timer wheel: the poll sleeps exactly until the next due timer
//! (debounce, retry backoff, SIGKILL escalation, startup grace) and not at all when none is due,
//! so an idle daemon never wakes up. The only other threads write and copy snapshots during a
//! reload (`snapshot`): they touch files and a buffer lent to them, never the loop's state.
//!
//! Subsystems own their state; the daemon owns them all and routes readiness events and
//! expired timers between them. The control server hands complete requests to the daemon,
//! which executes them and gives the replies back; the supervisor acts on the machine through
//! its `Host` seam (spawn, signals, snapshots, state files, hooks, cgroups), and binds plugins'
//! sockets itself. Every raw system call goes through `sys` (and `unsafe` lives only
//! there and in the plugin spawner's pre-exec code); exit codes are `exit`'s.
pub mod clock;
pub mod config;
pub mod control;
pub mod ctl;
pub mod daemon;
pub mod exit;
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
pub mod sys;
pub mod token;
pub mod watch;
pub mod wheel;
