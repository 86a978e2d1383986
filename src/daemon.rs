//! The daemon: one thread, one `mio::Poll`, every subsystem owned here and driven from here.
//!
//! `Daemon` holds the control server and the `Core` (the poll and everything else). The server
//! owns the client connections and hands over the requests they complete; the core executes
//! them, and the daemon gives the answers back to the server. Neither calls the other, so both
//! share the poll's one `Registry`.
//!
//! Each loop turn: sleep until an fd is ready or the next timer is due (never longer, never a
//! periodic tick), dispatch every ready source (draining each to WouldBlock), fire due timers,
//! then publish the events and deferred replies the turn produced.

use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::clock::{self, Clock};
use crate::config::{self, Config, Env, Overrides};
use crate::control::{ClientId, ControlServer, EventRecord, Incoming, Limits, SubscribeFilter};
use crate::notify::Notifier;
use crate::private_dir::DaemonDirs;
use crate::protocol::{
    self, Command, DaemonStatus, EnabledReply, ErrorCode, HotReloadStatus, LifecycleReply,
    LifecycleResult, ListReply, PluginDetail, PluginReply, ReloadedReply, Request, Response,
    ScheduledReply, StatusReply, SubscribedReply, TriggerReply, TriggerResult,
};
use crate::protocol::{Event, EventKind};
use crate::signals::{SignalEvent, SignalSource};
use crate::supervisor::{
    Ctx, Outbox, Plugin, Reply, Supervisor, Timer, Trigger, Waiter, reap, spawn,
};
use crate::token;
use crate::watch::{Change, LinkedDir, WatchOptions, Watcher, linked_plugin_dir};
use crate::wheel::TimerWheel;

mod plugins_dir;

pub use crate::exit::FatalError;

fn os_err(what: impl std::fmt::Display) -> FatalError {
    FatalError::Os(what.to_string())
}

pub struct Daemon {
    control: ControlServer,
    core: Core,
}

/// Everything but the control server.
struct Core {
    poll: Poll,
    clock: Clock,
    wheel: TimerWheel<Timer>,
    signals: SignalSource,
    watcher: Option<Watcher>,
    sup: Supervisor,
    config: Config,
    overrides: Overrides,
    env: Env,
    enabled: bool,
    started: Instant,
    shutting_down: bool,
    outbox: Outbox,
    verbose_listeners: bool,
    notifier: Notifier,
    watchdog_interval_ms: Option<u64>,
    /// READY=1 went out (after the socket listened and the plugins found at start launched).
    ready_sent: bool,
    /// A configuration reload asked to make sure the control socket file still exists.
    check_socket: bool,
    /// The last `STATUS=` sent, so the summary is re-sent only when it changes.
    sent_status: String,
    /// Whether the plugins dir is gone and how the daemon waits for it.
    plugins_dir: plugins_dir::PluginsDirWatch,
    /// When the next poll round of the polled directories is due: one deadline for all of them,
    /// none while nothing is polled (an idle daemon then never wakes up). Kept beside the wheel
    /// rather than in it: the timer kinds belong to the supervisor.
    next_poll_ms: Option<u64>,
}

/// First starts per loop turn: enough to bring plugins up quickly, few enough that control
/// clients are answered in between.
const STARTS_PER_TURN: usize = 16;

/// Shortest wait for the poll that confirms a changed file is complete (with a debounce of 0).
const MIN_SETTLE_MS: u64 = 50;

impl Daemon {
    /// Set everything up: directories, signals, control socket, watches, initial plugins.
    pub fn start(config: Config, overrides: Overrides, env: Env) -> Result<Daemon, FatalError> {
        // Refuse an unsafe runtime or state dir before anything is put in it, the socket above all.
        let plugin_users = config.accounts.iter().map(|(id, a)| (id.clone(), a.uid));
        let private_dirs = DaemonDirs::new(&config.runtime_dir, &config.state_dir, &env)
            .with_plugin_users(plugin_users);
        private_dirs.check().map_err(os_err)?;
        match spawn::raise_fd_limit() {
            Ok(limit) => log::debug!("descriptor limit {limit}"),
            Err(e) => log::warn!("cannot raise the descriptor limit ({e}): fewer plugins fit"),
        }
        if let Err(e) = spawn::become_subreaper() {
            log::warn!("cannot become a child subreaper ({e}): escaped grandchildren go to init");
        }
        let poll = Poll::new().map_err(|e| os_err(format!("cannot create the event loop: {e}")))?;
        let registry = poll.registry();
        let signals = SignalSource::new(registry)
            .map_err(|e| os_err(format!("cannot handle signals: {e}")))?;
        // A second daemon learns here that the socket is taken, before it has created anything.
        let mut control = open_control(&config)?;
        if let Err(e) = prepare_dirs(&config, &private_dirs) {
            control.shutdown(registry);
            return Err(e);
        }
        control
            .register(registry)
            .map_err(|e| os_err(format!("cannot poll the control socket: {e}")))?;
        let watcher = if config.watch_enabled {
            let options = WatchOptions {
                mode: config.hot_reload.watch_mode,
                subdirs: config.hot_reload.watch_subdirs,
            };
            let mut w = Watcher::new(&config.plugins_dir, options).map_err(os_err)?;
            w.set_matchers(&config.matchers);
            // With watch_mode = "poll" there is no inotify fd at all.
            if let Some(fd) = w.fd() {
                registry
                    .register(&mut SourceFd(&fd), token::INOTIFY, Interest::READABLE)
                    .map_err(|e| os_err(format!("cannot poll inotify: {e}")))?;
            }
            Some(w)
        } else {
            log::info!("HOTRELOAD_WATCH is off: supervising only, no file watches");
            None
        };
        let clock = Clock::new();
        let notifier = Notifier::from_env();
        let watchdog_interval_ms = notifier.watchdog_interval_ms();
        let mut core = Core {
            sup: Supervisor::new(&config.runtime_dir, &config.state_dir),
            wheel: TimerWheel::new(clock.now_ms()),
            enabled: config.hot_reload.enabled,
            poll,
            clock,
            signals,
            watcher,
            config,
            overrides,
            env,
            started: Instant::now(),
            shutting_down: false,
            outbox: Outbox::default(),
            verbose_listeners: false,
            notifier,
            watchdog_interval_ms,
            ready_sent: false,
            check_socket: false,
            sent_status: String::new(),
            plugins_dir: plugins_dir::PluginsDirWatch::default(),
            next_poll_ms: None,
        };
        log::info!(
            "hotreloadd {} supervising {} (hot reload {})",
            env!("CARGO_PKG_VERSION"),
            core.config.plugins_dir.display(),
            if core.enabled { "on" } else { "off" }
        );
        // What a killed predecessor left behind is stopped before anything starts (SPEC §4).
        core.sup.prepare_containment();
        if core.start_plugins_dir() {
            core.scan_plugins_dir();
            core.guard_plugins_dir();
        }
        if let Some(ms) = core.watchdog_interval_ms {
            core.notifier.watchdog();
            let now = core.clock.now_ms();
            core.wheel.insert(now + ms, Timer::Watchdog);
        }
        let mut daemon = Daemon { control, core };
        daemon.flush();
        Ok(daemon)
    }

    /// Run until SIGTERM/SIGINT has stopped every plugin.
    pub fn run(mut self) -> Result<(), FatalError> {
        let mut events = Events::with_capacity(256);
        loop {
            self.core.start_pending();
            self.flush();
            self.core.sup.sync_state_dirs();
            let timeout = self.core.poll_timeout();
            if let Err(e) = self.core.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(os_err(format!("event loop failed: {e}")));
            }
            for event in events.iter() {
                self.dispatch(event);
            }
            self.core.read_backlog();
            self.core.fire_timers();
            if std::mem::take(&mut self.core.check_socket) {
                if let Err(e) = self.control.restore_socket_file(self.core.poll.registry()) {
                    log::error!("cannot restore the control socket: {e}");
                }
            }
            self.core.sup.close_ended_pipes(self.core.poll.registry());
            self.flush();
            self.core.sup.sync_state_dirs();
            self.core.publish_status();
            if self.core.shutting_down && self.core.sup.all_stopped() {
                break;
            }
        }
        self.core.sup.kill_strays();
        self.control.shutdown(self.core.poll.registry());
        log::info!("all plugins stopped, exiting");
        Ok(())
    }

    fn dispatch(&mut self, event: &mio::event::Event) {
        match event.token() {
            token::SIGNALS => self.core.on_signals(),
            token::INOTIFY => self.core.on_inotify(),
            t if token::is_pipe(t) => self.core.on_pipe(t),
            t if self.control.owns(t) => {
                self.control.handle_event(self.core.poll.registry(), event);
                self.serve_control();
            }
            // A source closed earlier in this batch: nothing to do.
            _ => {}
        }
    }

    /// Deliver what the turn produced: deferred replies (which may unblock pipelined requests,
    /// which may produce more) and events.
    fn flush(&mut self) {
        loop {
            let replies = std::mem::take(&mut self.core.outbox.replies);
            let mut events = std::mem::take(&mut self.core.outbox.events);
            // Nobody listens: skip serialising (a plugin flooding its output makes many).
            if self.control.subscriber_count() == 0 {
                events.clear();
            }
            if replies.is_empty() && events.is_empty() {
                break;
            }
            for event in events {
                let record = EventRecord {
                    plugin: event.plugin.clone(),
                    verbose_only: event.is_verbose_only(),
                    line: Rc::from(event.to_line()),
                };
                self.control.publish(self.core.poll.registry(), &record);
            }
            for (waiter, result) in replies {
                let reply = self.core.waiter_reply(waiter.reply, result);
                let line = reply.to_line(waiter.request_id.as_ref());
                self.control.reply(waiter.client, line);
            }
            // A deferred answer lets its client's next pipelined request through.
            self.serve_control();
        }
        self.core.verbose_listeners = self.control.has_verbose_subscriber();
    }

    /// Executes every request the control server has read and gives it the answers, until an
    /// answer lets no more pipelined request through.
    fn serve_control(&mut self) {
        while let Some(incoming) = self.control.next_request(self.core.poll.registry()) {
            let Incoming {
                client, request, ..
            } = incoming;
            let sessions = self.control.client_count();
            let id = request.id.clone();
            match self.core.execute(client, request, sessions) {
                Answer::Reply(reply) => self.control.reply(client, reply.to_line(id.as_ref())),
                Answer::Subscribe(filter) => {
                    let reply = Response::Subscribed(SubscribedReply { subscribed: true });
                    self.control
                        .subscribe(client, filter, reply.to_line(id.as_ref()));
                }
                Answer::Deferred => self.control.defer(self.core.poll.registry(), client),
            }
        }
    }
}

/// What the daemon does with a control request.
enum Answer {
    /// Answer now.
    Reply(Response),
    /// Answer `"subscribed": true`, then send the events the filter accepts.
    Subscribe(SubscribeFilter),
    /// Answered later, through the outbox's replies (a `trigger` that waits).
    Deferred,
}

/// Create the plugins dir, and the runtime and state dirs (mode 0700) unless they exist, which
/// are then judged again: they may have appeared since [`DaemonDirs::check`].
fn prepare_dirs(config: &Config, private_dirs: &DaemonDirs) -> Result<(), FatalError> {
    std::fs::create_dir_all(&config.plugins_dir).map_err(|e| {
        os_err(format!(
            "cannot create plugins dir {}: {e}",
            config.plugins_dir.display()
        ))
    })?;
    private_dirs.create().map_err(os_err)
}

fn open_control(config: &Config) -> Result<ControlServer, FatalError> {
    let limits = Limits {
        max_clients: config.control.max_clients,
        max_line_bytes: config.control.max_line_bytes,
        max_out_bytes: 1024 * 1024,
    };
    if let Some(listener) = crate::notify::take_activated_listener() {
        log::info!("using the control socket passed by the service manager");
        return ControlServer::from_listener(listener, limits, token::CONTROL_BASE).map_err(os_err);
    }
    ControlServer::bind(
        &config.socket,
        config.control.mode,
        config.control.group.as_deref(),
        limits,
        token::CONTROL_BASE,
    )
    // The error says it all, the other daemon's pid included when the socket is taken.
    .map_err(os_err)
}

/// The configuration keys whose value changed from `old` to `new` but that only a daemon restart
/// applies: where the daemon's files live and how its control socket was bound.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<String> {
    let (a, b) = (&old.control, &new.control);
    [
        ("plugins_dir", old.plugins_dir != new.plugins_dir),
        ("runtime_dir", old.runtime_dir != new.runtime_dir),
        ("state_dir", old.state_dir != new.state_dir),
        ("control.socket", old.socket != new.socket),
        (
            "hot_reload.watch_mode",
            old.hot_reload.watch_mode != new.hot_reload.watch_mode,
        ),
        (
            "hot_reload.watch_subdirs",
            old.hot_reload.watch_subdirs != new.hot_reload.watch_subdirs,
        ),
        ("control.mode", a.mode != b.mode),
        ("control.group", a.group != b.group),
        ("control.max_clients", a.max_clients != b.max_clients),
        (
            "control.max_line_bytes",
            a.max_line_bytes != b.max_line_bytes,
        ),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(key, _)| key.to_string())
    .collect()
}

impl Core {
    fn ctx(&mut self) -> (Ctx<'_>, &mut Supervisor) {
        let ctx = Ctx {
            now_ms: self.clock.now_ms(),
            wheel: &mut self.wheel,
            registry: self.poll.registry(),
            out: &mut self.outbox,
            config: &self.config,
        };
        (ctx, &mut self.sup)
    }

    fn poll_timeout(&mut self) -> Option<Duration> {
        if self.sup.has_backlog() || self.sup.has_pending_starts() {
            return Some(Duration::ZERO);
        }
        self.arm_poll();
        let next = match (self.wheel.next_deadline(), self.next_poll_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        next.map(|d| clock::timeout_until(d, self.clock.now_ms()))
    }

    fn emit(&mut self, event: Event) {
        self.outbox.events.push(event);
    }

    // -- sources

    fn on_signals(&mut self) {
        for sig in self.signals.pending() {
            match sig {
                SignalEvent::Child => self.reap(),
                SignalEvent::Terminate => self.begin_shutdown(),
                SignalEvent::Reload => {
                    let _ = self.reload_config();
                }
            }
        }
    }

    fn reap(&mut self) {
        let (mut ctx, sup) = self.ctx();
        for (pid, status) in reap::reap_all() {
            sup.on_exit(&mut ctx, pid, status);
        }
        sup.check_stragglers(&mut ctx);
    }

    fn on_inotify(&mut self) {
        let Some(watcher) = self.watcher.as_mut() else {
            return;
        };
        let changes = watcher.drain(&self.config.matchers, self.verbose_listeners);
        for change in changes {
            self.on_change(change);
        }
    }

    /// Keep the poll deadline in step with whether anything is polled.
    fn arm_poll(&mut self) {
        let polls = self.watcher.as_ref().is_some_and(Watcher::polls);
        match (polls, self.next_poll_ms) {
            (true, None) => {
                let ms = self.config.hot_reload.poll_interval_ms;
                self.next_poll_ms = Some(self.clock.now_ms() + ms);
            }
            (false, Some(_)) => self.next_poll_ms = None,
            _ => {}
        }
    }

    /// The poll deadline passed: compare every polled directory, and feed what changed down the
    /// same path as inotify's changes.
    fn poll_due(&mut self) {
        let now = self.clock.now_ms();
        if self.next_poll_ms.is_none_or(|due| due > now) {
            return;
        }
        self.next_poll_ms = None;
        let Some(watcher) = self.watcher.as_mut() else {
            return;
        };
        let changes = watcher.poll_round(&self.config.matchers, self.verbose_listeners);
        let settling = watcher.settling();
        for change in changes {
            self.on_change(change);
        }
        if settling {
            // A file changed: the listing that confirms it is complete comes after the quiet
            // time of a debounce, not a whole interval later (a build is then picked up within
            // one interval plus about two debounces). Only after a change: idle, the daemon
            // still wakes once per interval.
            let hr = &self.config.hot_reload;
            let ms = hr
                .debounce_delay_ms
                .clamp(MIN_SETTLE_MS, hr.poll_interval_ms.max(MIN_SETTLE_MS));
            self.next_poll_ms = Some(self.clock.now_ms() + ms);
            return;
        }
        self.arm_poll();
    }

    /// Report the directories the watcher put under polling since the last turn.
    fn report_polled(&mut self) {
        let notices = self.watcher.as_mut().map(Watcher::take_notices);
        for notice in notices.into_iter().flatten() {
            self.on_change(notice);
        }
    }

    fn on_change(&mut self, change: Change) {
        match change {
            Change::Polled {
                plugin,
                path,
                reason,
            } => {
                let (path, reason) = (path.to_string_lossy().into_owned(), reason.to_string());
                let kind = EventKind::DirectoryPolled { path, reason };
                self.emit(Event::stamped(plugin.as_deref(), kind));
            }
            Change::DirAdded(name) => self.plugin_dir_arrived(&name),
            Change::DirRemoved(name) => self.remove_plugin(&name),
            Change::PluginDirLost(id) => {
                if self.config.plugins_dir.join(&id).is_dir() {
                    self.add_plugin_dir(&id);
                } else {
                    self.remove_plugin(&id);
                }
            }
            Change::File { plugin, path } => {
                if self.sup.get(&plugin).is_some_and(|p| p.exec_path() == path) {
                    if let Some(w) = self.watcher.as_mut() {
                        w.refresh_plugin(&plugin);
                    }
                }
                let enabled = self.enabled;
                let (mut ctx, sup) = self.ctx();
                sup.on_change(&mut ctx, &plugin, &path, enabled);
            }
            Change::Ignored {
                plugin,
                path,
                reason,
            } => {
                let (path, reason) = (path.to_string_lossy().into_owned(), reason.to_string());
                let kind = EventKind::ChangeIgnored { path, reason };
                self.emit(Event::stamped(plugin.as_deref(), kind));
            }
            Change::Rescan => self.rescan(),
            Change::RootLost => self.on_plugins_dir_lost(),
            Change::RootCheck => self.on_plugins_dir_check(),
        }
    }

    fn on_pipe(&mut self, token: Token) {
        let (mut ctx, sup) = self.ctx();
        sup.on_fd(&mut ctx, token);
    }

    /// First starts, a batch per loop turn; READY=1 once every plugin found has been launched.
    fn start_pending(&mut self) {
        let (mut ctx, sup) = self.ctx();
        let more = sup.start_pending(&mut ctx, STARTS_PER_TURN);
        if !more && !self.ready_sent {
            self.ready_sent = true;
            self.notify_ready();
        }
    }

    fn read_backlog(&mut self) {
        let (mut ctx, sup) = self.ctx();
        for token in sup.take_backlog() {
            sup.on_fd(&mut ctx, token);
        }
    }

    fn fire_timers(&mut self) {
        self.poll_due();
        self.report_polled();
        loop {
            let now = self.clock.now_ms();
            let due = self.wheel.poll(now);
            if due.is_empty() {
                break;
            }
            for (_, timer) in due {
                if timer == Timer::Watchdog {
                    self.on_watchdog();
                    continue;
                }
                if timer == Timer::PluginsDir {
                    self.on_plugins_dir_timer();
                    continue;
                }
                let (mut ctx, sup) = self.ctx();
                sup.on_timer(&mut ctx, timer);
            }
        }
    }

    fn on_watchdog(&mut self) {
        self.notifier.watchdog();
        if let Some(ms) = self.watchdog_interval_ms {
            let now = self.clock.now_ms();
            self.wheel.insert(now + ms, Timer::Watchdog);
        }
    }

    // -- plugins dir

    /// Bring the plugin table in line with the directories in plugins_dir.
    fn scan_plugins_dir(&mut self) {
        if self.plugins_dir.lost {
            return; // every plugin was stopped; the scan after it is back finds them
        }
        let names = self.plugin_dir_names();
        let known: Vec<String> = self.sup.plugins().map(|p| p.id.clone()).collect();
        for id in known {
            if !names.contains(&id) {
                self.remove_plugin(&id);
            }
        }
        for name in names {
            self.add_plugin_dir(&name);
        }
    }

    fn plugin_dir_names(&self) -> Vec<String> {
        let dir = &self.config.plugins_dir;
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                log::error!("cannot list plugins dir {}: {e}", dir.display());
                return Vec::new();
            }
        };
        // Symlinks too: `add_plugin_dir` follows or skips them, and says why.
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir() || t.is_symlink()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| self.config.matchers.is_plugin_dir_name(name))
            .collect();
        names.sort();
        names
    }

    fn add_plugin_dir(&mut self, name: &str) {
        if !config::valid_plugin_id(name) {
            log::warn!(
                "skipping plugin directory {:?}: a plugin id must match ^[A-Za-z0-9][A-Za-z0-9._-]{{0,63}}$",
                name
            );
            return;
        }
        let dir: PathBuf = self.config.plugins_dir.join(name);
        if let Some(LinkedDir::Outside(target)) = linked_plugin_dir(&self.config.plugins_dir, name)
        {
            self.skip_linked_plugin_dir(name, &dir, &target);
            return;
        }
        if !dir.is_dir() {
            return;
        }
        let exec = self.config.plugin(name).exec;
        if let Some(w) = self.watcher.as_mut() {
            if !w.is_watching(name) {
                match w.watch_plugin(name, &dir, &exec) {
                    Ok(()) => log::info!(
                        "[{name}] added watch for plugin directory {}",
                        dir.display()
                    ),
                    Err(e) => log::error!("[{name}] {e}"),
                }
            }
        }
        if !self.sup.contains(name) || self.sup.get(name).is_some_and(|p| p.removing) {
            let (mut ctx, sup) = self.ctx();
            sup.add_plugin(&mut ctx, name, dir);
        }
    }

    /// A plugin dir that is a symlink leading out of the plugins dir's tree (SPEC §4): skipped,
    /// and stopped if it was a plugin (its link was re-pointed).
    fn skip_linked_plugin_dir(&mut self, name: &str, dir: &Path, target: &str) {
        let reason = format!(
            "plugin directory {} is a symlink to {target}, outside plugins dir {}: skipped (make it a directory, or a symlink inside the plugins dir)",
            dir.display(),
            self.config.plugins_dir.display()
        );
        log::warn!("{reason}");
        let ev = Event::daemon(EventKind::ChangeIgnored {
            path: dir.to_string_lossy().into_owned(),
            reason: reason.to_string(),
        });
        self.emit(ev);
        if self.sup.contains(name) {
            self.remove_plugin(name);
        }
    }

    /// A directory (or a symlink) named `name` appeared in plugins_dir. One that replaced a known
    /// plugin's directory (renamed over it, or a re-pointed symlink) is watched afresh and its
    /// build compared with what runs.
    fn plugin_dir_arrived(&mut self, name: &str) {
        let known = self.sup.get(name).is_some_and(|p| !p.removing);
        if known {
            if let Some(w) = self.watcher.as_mut() {
                w.unwatch_plugin(name);
            }
        }
        self.add_plugin_dir(name);
        if known {
            let (mut ctx, sup) = self.ctx();
            sup.rescan_version(&mut ctx, name);
        }
    }

    fn remove_plugin(&mut self, id: &str) {
        if let Some(w) = self.watcher.as_mut() {
            w.unwatch_plugin(id);
        }
        let (mut ctx, sup) = self.ctx();
        sup.remove_plugin(&mut ctx, id);
    }

    /// Events were lost: re-read the plugins dir and compare every build with what runs. The
    /// lost events may have said that the plugins dir itself went or was swapped.
    fn rescan(&mut self) {
        if self.plugins_dir.lost {
            self.on_plugins_dir_check();
            return;
        }
        if self.watcher.as_ref().is_some_and(|w| !w.root_is_current()) {
            self.on_plugins_dir_lost();
            return;
        }
        self.scan_plugins_dir();
        let (mut ctx, sup) = self.ctx();
        sup.rescan_versions(&mut ctx);
    }

    // -- config and lifecycle

    /// SIGHUP / reload-config: apply a new configuration, or keep the running one on error.
    fn reload_config(&mut self) -> Result<Vec<String>, String> {
        if self.shutting_down {
            log::info!("ignoring a configuration reload: the daemon is shutting down");
            return Err("the daemon is shutting down".into());
        }
        // A deleted socket file is restored on reload: the way back in without a restart.
        self.check_socket = true;
        self.notifier.reloading();
        let result = config::load(&self.overrides, &self.env);
        let outcome = match result {
            Err(e) => {
                let error = e.to_string();
                log::error!(
                    "configuration reload failed, keeping the running configuration: {error}"
                );
                self.emit(Event::daemon(EventKind::ConfigRejected {
                    error: error.clone(),
                }));
                Err(error)
            }
            Ok(new) => {
                let needs_restart = self.apply_config(new);
                log::info!("configuration reloaded");
                self.emit(Event::daemon(EventKind::ConfigReloaded {
                    needs_restart: needs_restart.clone(),
                }));
                Ok(needs_restart)
            }
        };
        // Before start-up finished, the READY=1 of start-up ends the reload too.
        if self.ready_sent {
            self.notify_ready();
        }
        outcome
    }

    /// Switch automatic reloads on or off (`enable`/`disable`, or `enabled` changed by a config
    /// reload). Turning them on reloads every plugin whose build changed meanwhile.
    fn set_enabled(&mut self, on: bool) {
        if self.enabled == on {
            return;
        }
        self.enabled = on;
        if on {
            log::info!("hot reload enabled");
            self.emit(Event::daemon(EventKind::HotReloadEnabled));
            let (mut ctx, sup) = self.ctx();
            sup.on_enable(&mut ctx);
        } else {
            log::info!("hot reload disabled");
            self.emit(Event::daemon(EventKind::HotReloadDisabled));
        }
    }

    fn notify_ready(&mut self) {
        self.sent_status = self.status_line();
        self.notifier.ready(&self.sent_status);
    }

    /// Keeps systemd's `STATUS=` current: once per loop turn, only when the summary changed (a
    /// turn happens only when something woke the loop, so an idle daemon stays asleep). After
    /// `STOPPING=1` the status says "stopping plugins" until the end.
    fn publish_status(&mut self) {
        if self.shutting_down || !self.notifier.is_active() {
            return;
        }
        let line = self.status_line();
        if line != self.sent_status {
            self.notifier.status(&line);
            self.sent_status = line;
        }
    }

    /// Apply a validated configuration. Settings bound at start (directories, the control
    /// socket and its file) keep their running values; the keys whose new value waits for a
    /// daemon restart are returned (and logged) so `reload-config` can say so.
    fn apply_config(&mut self, mut new: Config) -> Vec<String> {
        let needs_restart = restart_only_changes(&self.config, &new);
        for key in &needs_restart {
            log::warn!(
                "{key} changed in the configuration but takes effect only after a daemon restart; \
                 the running value stays"
            );
        }
        new.plugins_dir = self.config.plugins_dir.clone();
        new.runtime_dir = self.config.runtime_dir.clone();
        new.state_dir = self.config.state_dir.clone();
        new.socket = self.config.socket.clone();
        new.control = self.config.control.clone();
        let patterns_changed =
            new.hot_reload.watch_patterns != self.config.hot_reload.watch_patterns;
        let flip = (new.hot_reload.enabled != self.config.hot_reload.enabled)
            .then_some(new.hot_reload.enabled);
        self.config = new;
        match flip {
            Some(true) => self.set_enabled(true),
            Some(false) => self.set_enabled(false),
            None => {}
        }
        if patterns_changed {
            self.scan_plugins_dir();
        }
        let enabled = self.enabled;
        let (mut ctx, sup) = self.ctx();
        sup.apply_config(&mut ctx);
        if enabled {
            // A plugin whose `hot_reload` setting went from false to true reloads a build that
            // changed meanwhile, as `enable ID` would.
            sup.on_enable(&mut ctx);
        }
        // The executable may have moved (`exec` changed): watch where it lives now.
        if let Some(w) = self.watcher.as_mut() {
            w.set_matchers(&self.config.matchers);
            for p in self.sup.plugins() {
                if w.is_watching(&p.id) {
                    if let Err(e) = w.watch_plugin(&p.id, &p.dir, &p.settings.exec) {
                        log::warn!("[{}] {e}", p.id);
                    }
                }
            }
        }
        needs_restart
    }

    fn begin_shutdown(&mut self) {
        if self.shutting_down {
            return;
        }
        log::info!("stopping all plugins");
        self.shutting_down = true;
        self.notifier.stopping();
        let (mut ctx, sup) = self.ctx();
        sup.begin_shutdown(&mut ctx);
    }

    // -- control commands

    fn status_line(&self) -> String {
        let total = self.sup.plugins().count();
        let missing = if self.plugins_dir.lost {
            ", plugins dir missing"
        } else {
            ""
        };
        format!(
            "{}/{} plugins running, hot reload {}, {} reloads, {} failed{missing}",
            self.sup.running_count(),
            total,
            if self.enabled { "on" } else { "off" },
            self.sup.totals().reload_count,
            self.sup.totals().failed_reloads
        )
    }

    fn status_reply(&self, sessions: usize) -> StatusReply {
        let hr = &self.config.hot_reload;
        // The directories watched for plugins: the plugins dir and each plugin dir. Not the
        // build dirs that symlinked executables point into, nor the plugins dir's parent, which
        // the watcher also watches.
        let watching = self.watcher.as_ref().map_or(0, |w| {
            usize::from(w.root_watched())
                + self.sup.plugins().filter(|p| w.is_watching(&p.id)).count()
        });
        let totals = self.sup.totals();
        StatusReply {
            daemon: DaemonStatus {
                pid: std::process::id(),
                plugins_dir: self.config.plugins_dir.to_string_lossy().into_owned(),
                plugins_dir_present: self.plugins_dir_present(),
                plugins_running: self.sup.running_count(),
                plugins_total: self.sup.plugins().count(),
                uptime_ms: clock::millis(self.started.elapsed()),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                watch: self.watcher.is_some(),
            },
            hot_reload: HotReloadStatus {
                active_sessions: sessions,
                debounce_delay_ms: hr.debounce_delay_ms,
                // With HOTRELOAD_WATCH=0 nothing reloads by itself, whatever the toggle says.
                enabled: self.enabled && self.watcher.is_some(),
                exclude_patterns: hr.exclude_patterns.clone(),
                failed_reloads: totals.failed_reloads,
                last_reload: totals.last_reload.clone(),
                reload_count: totals.reload_count,
                watch_patterns: hr.watch_patterns.clone(),
                watching_directories: watching,
                watch_mode: hr.watch_mode.as_str().to_owned(),
                polled_directories: self.watcher.as_ref().map_or(0, Watcher::polled_dirs),
                watching_subdirectories: self.watcher.as_ref().map_or(0, Watcher::subdirs_watched),
            },
        }
    }

    fn plugin_detail(&self, p: &Plugin) -> PluginDetail {
        let w = self.watcher.as_ref();
        PluginDetail {
            info: self.sup.list_entry(p),
            history: p.history.iter().map(|h| h.to_record()).collect(),
            state_file: self.sup.state_file_json(&p.id),
            watched_by: w.and_then(|w| w.watched_by(&p.id)).map(str::to_owned),
            poll_reason: w.and_then(|w| w.poll_reason_of(&p.id)).map(str::to_owned),
        }
    }

    /// `enable ID` / `disable ID`: answered with the plugin's own switch.
    fn set_plugin_hot_reload(&mut self, id: &str, on: bool) -> Response {
        let global = self.enabled;
        let (mut ctx, sup) = self.ctx();
        let enabled = sup.set_hot_reload(&mut ctx, id, on, global);
        Response::Enabled(EnabledReply { enabled })
    }

    /// The answer to a waiter: `trigger`'s reload result, or the state a `stop`, `start` or
    /// `restart` left the plugin in, as it is now.
    fn waiter_reply(&self, reply: Reply, result: TriggerResult) -> Response {
        match reply {
            Reply::Reload => Response::Trigger(TriggerReply { result }),
            Reply::Lifecycle => {
                let plugin = self.sup.get(&result.plugin);
                let state = plugin.map_or("removed", Plugin::state_name);
                let version = plugin
                    .and_then(|p| p.list_entry().version)
                    .or(result.new_version);
                Response::Lifecycle(LifecycleReply {
                    result: LifecycleResult {
                        error: result.error,
                        ok: result.ok,
                        plugin: result.plugin,
                        state: state.to_owned(),
                        version,
                    },
                })
            }
        }
    }

    /// Executes one control request; `sessions`: connected control clients, for `status`.
    fn execute(&mut self, client: ClientId, request: Request, sessions: usize) -> Answer {
        if self.shutting_down && request.command.is_mutating() {
            return Answer::Reply(Response::error(
                ErrorCode::Busy,
                "the daemon is shutting down",
            ));
        }
        let unknown = |id: &str| {
            Answer::Reply(Response::error(
                ErrorCode::UnknownPlugin,
                format!("no plugin named {id:?}"),
            ))
        };
        let name = request.command.name();
        let reply = match request.command {
            Command::Status => Response::Status(Box::new(self.status_reply(sessions))),
            Command::List => Response::List(ListReply {
                plugins: self.sup.plugins().map(|p| self.sup.list_entry(p)).collect(),
            }),
            Command::Plugin { id } => match self.sup.get(&id) {
                None => return unknown(&id),
                Some(p) => Response::Plugin(Box::new(PluginReply {
                    plugin: self.plugin_detail(p),
                })),
            },
            Command::Enable { plugin } => {
                if self.watcher.is_none() {
                    return Answer::Reply(Response::error(
                        ErrorCode::WatchDisabled,
                        "file watching is switched off (HOTRELOAD_WATCH=0): restart the daemon without it to enable hot reload",
                    ));
                }
                match plugin {
                    None => {
                        self.set_enabled(true);
                        Response::Enabled(EnabledReply { enabled: true })
                    }
                    Some(pid) if !self.sup.contains(&pid) => return unknown(&pid),
                    Some(pid) => self.set_plugin_hot_reload(&pid, true),
                }
            }
            Command::Disable { plugin } => match plugin {
                None => {
                    self.set_enabled(false);
                    Response::Enabled(EnabledReply { enabled: false })
                }
                Some(pid) if !self.sup.contains(&pid) => return unknown(&pid),
                Some(pid) => self.set_plugin_hot_reload(&pid, false),
            },
            Command::Trigger { id: pid, wait }
            | Command::Stop { id: pid, wait }
            | Command::Start { id: pid, wait }
            | Command::Restart { id: pid, wait } => {
                if !self.sup.contains(&pid) {
                    return unknown(&pid);
                }
                let reply = match name {
                    "trigger" => Reply::Reload,
                    _ => Reply::Lifecycle,
                };
                let waiter = wait.then(|| Waiter {
                    client,
                    request_id: request.id.clone(),
                    reply,
                });
                let (mut ctx, sup) = self.ctx();
                match name {
                    "stop" => sup.stop(&mut ctx, &pid, waiter),
                    "start" => sup.start(&mut ctx, &pid, waiter),
                    "restart" => sup.restart(&mut ctx, &pid, waiter),
                    _ => {
                        let waiters = waiter.into_iter().collect();
                        sup.request(&mut ctx, &pid, Trigger::Manual, Vec::new(), waiters);
                    }
                }
                if wait {
                    return Answer::Deferred;
                }
                Response::Scheduled(ScheduledReply { scheduled: true })
            }
            Command::Subscribe { plugin, verbose } => {
                if let Some(p) = plugin.as_deref().filter(|p| !self.sup.contains(p)) {
                    return unknown(p);
                }
                return Answer::Subscribe(SubscribeFilter { plugin, verbose });
            }
            Command::ReloadConfig => match self.reload_config() {
                Ok(needs_restart) => Response::Reloaded(ReloadedReply {
                    needs_restart,
                    reloaded: true,
                }),
                Err(e) => Response::error(ErrorCode::ConfigInvalid, e),
            },
            Command::Help => Response::Help(protocol::help_body()),
        };
        Answer::Reply(reply)
    }
}
