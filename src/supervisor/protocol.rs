//! What plugins say to the daemon, and what the daemon runs around reloads.
//!
//! Each plugin gets its own sd_notify datagram socket (`NOTIFY_SOCKET`), so attribution starts
//! with which socket a message arrived on; a message counts only when its sender (by the kernel's
//! SCM_CREDENTIALS) is in the process group of one of the plugin's instances. Understood:
//! READY=1 (readiness for `ready = "notify"`), STATUS= (`status_text`), STOPPING=1 (the coming
//! exit is deliberate), WATCHDOG=1 / WATCHDOG=trigger, EXTEND_TIMEOUT_USEC= (more time to get
//! ready or to stop), FDSTORE=1 / FDSTOREREMOVE=1 with FDNAME= (descriptors parked across
//! reloads, handed back through LISTEN_FDS).
//!
//! The listening sockets of `sockets = [...]` are bound here once per plugin and kept for its
//! whole life, so a reload never closes them. Reload hooks run here too: spawned without a shell,
//! reaped by the daemon's one waitpid loop, killed at their time limit, and never able to fail or
//! delay a reload.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use mio::{Interest, Token, unix::SourceFd};
use nix::unistd::Pid;

use super::plugin::{Phase, Plugin, Slot};
use super::reap::ExitKind;
use super::{Core, Ctx, Supervisor, Timer};
use crate::fsutil::create_private_dir;
use crate::hooks::{HookContext, HookKind};
use crate::listen;
use crate::plugin_notify::{Datagram, NotifySocket, sender_in_group};
use crate::protocol::{Event, EventKind};

/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

impl Supervisor {
    /// Bind the plugin's notify socket and its listening sockets.
    pub(super) fn open_plugin_sockets(&mut self, ctx: &mut Ctx<'_>, id: &str) {
        self.open_notify_socket(ctx, id);
        self.open_listen_sockets(id);
    }

    fn open_notify_socket(&mut self, ctx: &mut Ctx<'_>, id: &str) {
        let Some(path) = self.core.notify_socket_path(id) else {
            log::warn!(
                "[{id}] runtime dir path too long for a notify socket: NOTIFY_SOCKET not offered"
            );
            return;
        };
        if let Err(e) = create_private_dir(&self.core.notify_dir) {
            log::warn!(
                "[{id}] cannot create {}: {e}",
                self.core.notify_dir.display()
            );
            return;
        }
        let sock = match NotifySocket::bind(&path) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("[{id}] cannot create its notify socket: {e}");
                return;
            }
        };
        let token = self.core.new_token();
        let fd = sock.fd();
        if let Err(e) = ctx
            .registry
            .register(&mut SourceFd(&fd), token, Interest::READABLE)
        {
            log::warn!("[{id}] cannot poll its notify socket: {e}");
            return;
        }
        self.core.notify.insert(token, (id.to_string(), sock));
    }

    pub(super) fn close_notify_socket(&mut self, ctx: &mut Ctx<'_>, id: &str) {
        let tokens: Vec<Token> = self
            .core
            .notify
            .iter()
            .filter(|(_, (owner, _))| owner == id)
            .map(|(t, _)| *t)
            .collect();
        for token in tokens {
            if let Some((_, sock)) = self.core.notify.remove(&token) {
                let fd = sock.fd();
                let _ = ctx.registry.deregister(&mut SourceFd(&fd));
            }
        }
    }

    /// Bind `sockets = [...]` once; after a configuration change, sockets whose spec is unchanged
    /// are kept (a running instance holds them, and rebinding would fail or drop connections),
    /// new ones are bound and removed ones closed. A socket that cannot be bound is reported and
    /// left out.
    pub(super) fn open_listen_sockets(&mut self, id: &str) {
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        let mut old = std::mem::take(&mut p.listen);
        for spec in p.settings.sockets.clone() {
            if let Some(i) = old.iter().position(|s| s.spec == spec) {
                p.listen.push(old.swap_remove(i));
                continue;
            }
            match listen::bind(&spec) {
                Ok(sock) => {
                    let fd = 3 + p.listen.len();
                    log::info!("[{id}] listening on {spec} (passed to every instance as fd {fd})");
                    p.listen.push(sock);
                }
                Err(e) => {
                    log::error!("[{id}] cannot listen on {spec}: {e}");
                    p.last_error = Some(format!("cannot listen on {spec}: {e}"));
                }
            }
        }
    }

    /// Datagrams on a plugin's notify socket.
    pub(super) fn on_notify(&mut self, ctx: &mut Ctx<'_>, token: Token) {
        let Some((id, sock)) = self.core.notify.get_mut(&token) else {
            return;
        };
        let id = id.clone();
        for dgram in sock.recv_all() {
            self.on_datagram(ctx, &id, dgram);
        }
    }

    fn on_datagram(&mut self, ctx: &mut Ctx<'_>, id: &str, dgram: Datagram) {
        let Some(p) = self.plugins.get_mut(id) else {
            return;
        };
        let slot = [Slot::Current, Slot::Retiring].into_iter().find(|&s| {
            p.slot(s).is_some_and(|i| {
                !i.leader.is_reaped() && sender_in_group(dgram.pid, i.pid.as_raw())
            })
        });
        let Some(slot) = slot else {
            log::warn!(
                "[{id}] ignoring a notify message from pid {} (uid {}): not a process of this plugin",
                dgram.pid,
                dgram.uid
            );
            return;
        };
        let msg = dgram.message;
        let watchdog_ms = p.settings.watchdog_ms;
        let Some(inst) = p.slot_mut(slot) else { return };
        let seq = inst.seq;
        if msg.stopping {
            inst.stopping_announced = true;
        }
        if let Some(usec) = msg.extend_timeout_usec {
            let ms = usec.div_ceil(1000);
            match &mut inst.phase {
                Phase::Stopping {
                    kill_timer: Some(t),
                    ..
                } => {
                    ctx.wheel.cancel(*t);
                    *t = ctx.arm(ms, Timer::Kill(id.to_string(), seq));
                }
                Phase::Starting {
                    verify_timer: Some(t),
                } => {
                    ctx.wheel.cancel(*t);
                    *t = ctx.arm(ms, Timer::Verify(id.to_string(), seq));
                }
                _ => {}
            }
        }
        if msg.watchdog {
            if let Phase::Running {
                watchdog_timer: Some(t),
            } = &mut inst.phase
            {
                ctx.wheel.cancel(*t);
                *t = ctx.arm(watchdog_ms, Timer::PluginWatchdog(id.to_string(), seq));
            }
        }
        if let Some(status) = msg.status.clone() {
            p.status_text = Some(status.clone());
            ctx.emit(Event::plugin(
                id,
                EventKind::PluginStatus {
                    status_text: status.to_string(),
                },
            ));
        }
        if msg.fdstore_remove {
            if let Some(name) = &msg.fdname {
                p.fdstore.retain(|(n, _)| n != name);
            }
        }
        if msg.fdstore {
            let name = msg.fdname.clone().unwrap_or_else(|| "stored".to_string());
            p.park_fds(name, dgram.fds);
        }
        if msg.watchdog_trigger {
            self.core.on_plugin_watchdog(ctx, p, seq);
        }
        if msg.ready && slot == Slot::Current {
            self.mark_verified(ctx, id, seq);
        }
    }

    // -- hooks

    /// A reaped pid that was a hook: log and event a failure; never affects the reload.
    pub(super) fn on_hook_exit(&mut self, ctx: &mut Ctx<'_>, pid: Pid, status: ExitKind) -> bool {
        let Some((run, timer)) = self.core.hooks.remove(&pid) else {
            return false;
        };
        ctx.wheel.cancel(timer);
        let _ = self.core.host.signal_group(pid, libc::SIGKILL);
        if !status.is_success() {
            log::warn!(
                "[{}] {} hook exited with {status}",
                run.plugin,
                run.kind.as_str()
            );
            ctx.emit(hook_failed(
                &run.plugin,
                run.kind,
                format!("exited with {status}"),
            ));
        } else {
            log::debug!("[{}] {} hook done", run.plugin, run.kind.as_str());
        }
        true
    }

    pub(super) fn on_hook_timeout(&mut self, ctx: &mut Ctx<'_>, pid: Pid) {
        let Some((run, _)) = self.core.hooks.get(&pid) else {
            return;
        };
        let ms = ctx.config.hooks.timeout_ms;
        log::warn!(
            "[{}] {} hook still running after {ms} ms: killing it",
            run.plugin,
            run.kind.as_str()
        );
        let error = format!("killed after timeout_ms ({ms} ms)");
        ctx.emit(hook_failed(&run.plugin, run.kind, error));
        self.core.host.kill_hook(run);
    }
}

impl Plugin {
    /// FDSTORE=1: keep the descriptors for the next instance, up to fdstore_max.
    fn park_fds(&mut self, name: String, fds: Vec<OwnedFd>) {
        let id = &self.id;
        let max = self.settings.fdstore_max;
        for fd in fds {
            if self.fdstore.len() >= max {
                log::warn!(
                    "[{id}] fd store full (fdstore_max = {max}): closing a descriptor named {name:?}"
                );
                continue;
            }
            self.fdstore.push((name.clone(), fd));
        }
    }
}

impl Core {
    /// Where the plugin's notify socket lives: `<runtime>/notify/<id>.sock`, or a short hashed
    /// name when a long runtime dir would overflow `sun_path`.
    pub(super) fn notify_socket_path(&self, id: &str) -> Option<PathBuf> {
        let plain = self.notify_dir.join(format!("{id}.sock"));
        if plain.as_os_str().len() <= MAX_SOCKET_PATH {
            return Some(plain);
        }
        let hash = blake3::hash(id.as_bytes()).to_hex();
        let short = self.notify_dir.join(format!("{}.sock", &hash[..12]));
        (short.as_os_str().len() <= MAX_SOCKET_PATH).then_some(short)
    }

    pub(super) fn notify_path_of(&self, id: &str) -> Option<PathBuf> {
        self.notify
            .values()
            .find(|(owner, _)| owner == id)
            .map(|(_, sock)| sock.path().to_path_buf())
    }

    /// Starts the `kind` hook, if one is configured, with its time limit armed (the daemon's
    /// one waitpid loop reaps it: `on_hook_exit`).
    pub(super) fn run_hook(&mut self, ctx: &mut Ctx<'_>, kind: HookKind, hook: &HookContext<'_>) {
        let argv = match kind {
            HookKind::ReloadStart => &ctx.config.hooks.on_reload_start,
            HookKind::ReloadSuccess => &ctx.config.hooks.on_reload_success,
            HookKind::ReloadFailure => &ctx.config.hooks.on_reload_failure,
        };
        let Some(argv) = argv.clone() else { return };
        match self.host.spawn_hook(&argv, kind, hook) {
            Ok(run) => {
                let timer = ctx.arm(
                    ctx.config.hooks.timeout_ms,
                    Timer::HookTimeout(run.pid.as_raw()),
                );
                log::debug!(
                    "[{}] {} hook started (pid {})",
                    hook.plugin,
                    kind.as_str(),
                    run.pid
                );
                self.hooks.insert(run.pid, (run, timer));
            }
            Err(e) => {
                log::warn!(
                    "[{}] {} hook failed to start: {e}",
                    hook.plugin,
                    kind.as_str()
                );
                ctx.emit(hook_failed(hook.plugin, kind, e.to_string()));
            }
        }
    }
}

/// The `hook_failed` event of plugin `id`'s `kind` hook.
fn hook_failed(id: &str, kind: HookKind, error: String) -> Event {
    let hook = kind.as_str().to_owned();
    Event::plugin(id, EventKind::HookFailed { hook, error })
}
