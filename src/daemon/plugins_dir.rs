//! The plugins dir going away and coming back (SPEC §5): deleted, recreated, swapped by two
//! renames (`mv plugins plugins.old && mv plugins.new plugins`), or with its parent gone.
//!
//! Supervision never ends because of it. When the root watch reports the dir deleted or moved,
//! the watcher waits on the parent for the name to reappear; when even the parent is gone it
//! waits on the nearest existing ancestor and also retries on the timer wheel with backoff,
//! because a mount appearing on the way gives no inotify event. Once back: rescan, stop what is
//! gone, start or reload by version what is there.
//!
//! The plugins are stopped when the dir has stayed away for a short grace: the two renames of a
//! swap are microseconds apart but the daemon may well wake between them, and a plugin whose
//! build is the same in the new dir should keep running, not restart. A plugin whose own
//! directory is deleted (`rm -rf plugins`) is stopped at once anyway, by its own watch.

use super::Core;
use crate::protocol::{Event, EventKind};
use crate::supervisor::Timer;
use crate::watch::RootWait;

/// First retry delay while even the parent of the plugins dir is gone; doubles up to the cap,
/// which keeps "back within a second" true without a busy loop.
const RETRY_FIRST_MS: u64 = 100;
const RETRY_MAX_MS: u64 = 1000;

/// How long the plugins of a plugins dir renamed away keep running, waiting for a new one in
/// its place (the second half of a swap).
const STOP_GRACE_MS: u64 = 250;

/// Watch-and-look rounds per check: each round watches an ancestor one level nearer, so a
/// `mkdir -p` racing the check is followed down a few levels before falling back to the timer.
const ROUNDS: usize = 8;

/// Where the daemon stands with the plugins dir.
#[derive(Debug, Default)]
pub(super) struct PluginsDirWatch {
    /// The dir was lost and is not watched again yet (never set without a watcher: nothing
    /// follows the dir then).
    pub lost: bool,
    /// The plugins were stopped after the grace (until then they run on, unwatched).
    stopped: bool,
    /// The pending timer: the end of the grace, or the next retry.
    retry: Option<crate::wheel::TimerId>,
    /// The delay of the next retry (0: the first).
    backoff_ms: u64,
}

impl Core {
    /// `status`: the plugins dir exists (and, with watching, is the one being watched).
    pub(super) fn plugins_dir_present(&self) -> bool {
        match self.watcher {
            Some(_) => !self.plugins_dir.lost,
            None => self.config.plugins_dir.is_dir(),
        }
    }

    /// At start: a plugins dir swapped away between its creation and the first watch.
    pub(super) fn start_plugins_dir(&mut self) -> bool {
        let missing = self.watcher.as_ref().is_some_and(|w| !w.root_watched());
        if missing {
            self.on_plugins_dir_lost();
        }
        !missing
    }

    /// The plugins dir was deleted or renamed away (or its watch ended).
    pub(super) fn on_plugins_dir_lost(&mut self) {
        if let Some(w) = self.watcher.as_mut() {
            w.forget_root();
        }
        if !self.plugins_dir.lost {
            self.plugins_dir.lost = true;
            self.plugins_dir.stopped = false;
            let dir = self.config.plugins_dir.to_string_lossy().into_owned();
            log::warn!(
                "plugins dir {dir} was removed or moved away; supervision resumes when it is back"
            );
            self.emit(Event::daemon(EventKind::PluginsDirLost {
                plugins_dir: dir,
            }));
        }
        self.look_for_plugins_dir();
    }

    /// Something changed on the way to the plugins dir: while it is gone, it may be back;
    /// while it is there, it may have been replaced with no event on its own watch (its parent
    /// renamed away, a symlinked plugins dir re-pointed).
    pub(super) fn on_plugins_dir_check(&mut self) {
        if self.plugins_dir.lost {
            self.look_for_plugins_dir();
        } else if self.watcher.as_ref().is_some_and(|w| !w.root_is_current()) {
            self.on_plugins_dir_lost();
        } else {
            self.guard_plugins_dir();
        }
    }

    /// While the plugins dir is there, watch its parent for it being replaced.
    pub(super) fn guard_plugins_dir(&mut self) {
        if let Some(w) = self.watcher.as_mut() {
            if w.root_watched() {
                w.await_root();
            }
        }
    }

    pub(super) fn on_plugins_dir_timer(&mut self) {
        self.plugins_dir.retry = None;
        if self.plugins_dir.lost && !self.plugins_dir.stopped {
            self.plugins_dir.stopped = true;
            self.stop_all_plugins();
        }
        if self.plugins_dir.lost {
            self.look_for_plugins_dir();
        }
    }

    /// Watch the plugins dir if it is there; otherwise stop every plugin and wait for it.
    fn look_for_plugins_dir(&mut self) {
        let Some(w) = self.watcher.as_mut() else {
            return;
        };
        let mut wait = RootWait::Farther;
        for _ in 0..ROUNDS {
            match w.watch_root() {
                Ok(()) => {
                    self.plugins_dir_back();
                    return;
                }
                Err(e)
                    if !matches!(e.source.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) =>
                {
                    log::error!("{e}; retrying");
                    wait = RootWait::Farther;
                    break;
                }
                Err(_) => {}
            }
            wait = w.await_root();
            // It may have appeared before the ancestor watch was in place: look again.
            if !self.config.plugins_dir.is_dir() {
                break;
            }
        }
        if !self.plugins_dir.stopped {
            self.arm_grace();
            return;
        }
        match wait {
            RootWait::Parent => self.cancel_plugins_dir_retry(),
            RootWait::Farther => self.arm_plugins_dir_retry(),
        }
    }

    fn plugins_dir_back(&mut self) {
        self.cancel_plugins_dir_retry();
        if self.plugins_dir.lost {
            self.plugins_dir.lost = false;
            let dir = self.config.plugins_dir.to_string_lossy().into_owned();
            log::info!("plugins dir {dir} is back; supervising what it holds");
            self.emit(Event::daemon(EventKind::PluginsDirBack {
                plugins_dir: dir,
            }));
        }
        self.scan_plugins_dir();
        self.guard_plugins_dir();
        let (mut ctx, sup) = self.ctx();
        sup.rescan_versions(&mut ctx);
    }

    /// The plugins dir is gone, and with it every plugin's directory.
    fn stop_all_plugins(&mut self) {
        let ids: Vec<String> = self
            .sup
            .plugins()
            .filter(|p| !p.removing)
            .map(|p| p.id.clone())
            .collect();
        for id in ids {
            self.remove_plugin(&id);
        }
    }

    /// Arm the next retry unless one is pending, each one twice as late as the one before.
    fn arm_plugins_dir_retry(&mut self) {
        if self.plugins_dir.retry.is_some() {
            return;
        }
        let ms = self.plugins_dir.backoff_ms.max(RETRY_FIRST_MS);
        self.plugins_dir.backoff_ms = (ms * 2).min(RETRY_MAX_MS);
        let now = self.clock.now_ms();
        self.plugins_dir.retry = Some(self.wheel.insert(now + ms, Timer::PluginsDir));
    }

    fn arm_grace(&mut self) {
        if self.plugins_dir.retry.is_none() {
            let now = self.clock.now_ms();
            let id = self.wheel.insert(now + STOP_GRACE_MS, Timer::PluginsDir);
            self.plugins_dir.retry = Some(id);
        }
    }

    fn cancel_plugins_dir_retry(&mut self) {
        self.plugins_dir.backoff_ms = 0;
        if let Some(id) = self.plugins_dir.retry.take() {
            self.wheel.cancel(id);
        }
    }
}
