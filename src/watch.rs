//! Change detection: one inotify instance, directory watches only, decoded into `Change`s.
//!
//! Watched: `plugins_dir` (plugin directories appearing and disappearing), each plugin directory
//! (new builds), and, when a plugin's executable lives elsewhere (a symlink into a cargo `target/`
//! dir, or an `exec` in a subdirectory), the directory holding the real file. Files themselves are
//! never watched: a running executable pins its inode, so a file watch would go stale on the first
//! rename-over (see linux-pitfalls §4).
//!
//! What counts as a new build (SPEC §5): a close after writing, a move into the dir, a hard link
//! appearing (cargo's unlink + link, which produces no close-write), or an attribute change of the
//! executable itself (`chmod +x`). A plain IN_CREATE does not count, so a half-written file never
//! starts, even with a 0 ms debounce. Excluded names and the client's `.hotreload-*` temp files
//! never count. Every filtered event can be explained (`Change::Ignored`) for verbose subscribers;
//! the explanation is only built when someone listens, so an event storm stays cheap.
//!
//! The plugins dir itself may go (deleted, or renamed away by an atomic deploy) and come back.
//! The path, not the inode, is the truth: once the root watch reports its directory deleted or
//! moved, the watcher drops it (a moved directory's watch would follow it to `plugins.old`) and,
//! when asked, watches the nearest existing ancestor for the name to reappear. While the plugins
//! dir is there its parent is watched too, for what its own watch cannot see: the parent renamed
//! away, or a symlinked plugins dir re-pointed.
//!
//! Where inotify cannot serve (SPEC §5 "Watching beyond inotify") a directory is polled instead
//! (`poll_watch`): with `watch_mode = "poll"` every directory and no inotify instance at all;
//! under `auto` a directory on a remote file system, or one added once the watch limit is
//! reached. Polled differences become the same `Change`s as inotify events.
//!
//! With `watch_subdirs`, a plugin dir's subdirectories (depth ≤ 8, none whose path relative to
//! the plugin dir has an excluded component) are watched too; a file changed there is a change
//! of the plugin, never its executable.
//!
//! The watcher owns the inotify fd, the wd → owner map and the poller; it never decides what to
//! reload.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

use crate::config::{Matchers, WatchMode};
use crate::poll_watch::{Diff, Found, Kind, PollOwner, Poller};

/// Deepest subdirectory watched with `watch_subdirs` (components below the plugin dir).
pub const MAX_SUBDIR_DEPTH: usize = 8;

/// Most subdirectories watched per plugin: a plugin dir holding a huge tree (a checkout, a
/// `node_modules`) must not take the whole inotify watch table.
pub const MAX_SUBDIRS_PER_PLUGIN: usize = 1024;

/// How the watcher watches, fixed for its life (a change needs a daemon restart).
#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub mode: WatchMode,
    pub subdirs: bool,
}

/// Prefix of the temp files `hotreloadctl install` renames into place.
pub const INSTALL_TEMP_PREFIX: &str = ".hotreload-";

/// One decoded, filtered observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A directory appeared in `plugins_dir`.
    DirAdded(String),
    /// A directory left `plugins_dir` (deleted or moved away).
    DirRemoved(String),
    /// A plugin directory's own watch ended (deleted, moved, unmounted).
    PluginDirLost(String),
    /// A file change that counts for `plugin`.
    File { plugin: String, path: PathBuf },
    /// A change that was filtered out, with the reason (only produced when explaining).
    Ignored {
        plugin: Option<String>,
        path: PathBuf,
        reason: String,
    },
    /// Events were lost (queue overflow): everything must be re-examined.
    Rescan,
    /// A directory is polled rather than watched with inotify, and why (for verbose subscribers
    /// and the log).
    Polled {
        plugin: Option<String>,
        path: PathBuf,
        reason: String,
    },
    /// The plugins dir was deleted or moved away; its watch is dropped.
    RootLost,
    /// Something changed on the way to the plugins dir (its name appeared in its parent, an
    /// ancestor went): it may be back, or replaced.
    RootCheck,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Owner {
    Root,
    PluginDir(String),
    /// A directory outside the plugin dir holding the plugin's real executable `file`.
    Target {
        plugin: String,
        file: OsString,
    },
    /// The nearest existing ancestor of a build directory that does not exist (yet): when
    /// something appears in it, the build directory may be back.
    Ancestor {
        plugin: String,
    },
    /// A subdirectory of the plugin dir (`watch_subdirs`), `rel` relative to it.
    Subdir {
        plugin: String,
        rel: PathBuf,
    },
    /// The nearest existing ancestor of the missing plugins dir; `next` is the name in it that
    /// leads to the plugins dir (only that name appearing matters).
    RootAncestor {
        next: OsString,
    },
}

#[derive(Debug)]
struct PluginWatch {
    dir: PathBuf,
    /// Executable path relative to the plugin dir.
    exec: PathBuf,
    dir_wd: WatchDescriptor,
    /// Where the real executable lives when not directly in the plugin dir: its directory's
    /// watch, the directory and the file name.
    target: Option<(WatchDescriptor, PathBuf, OsString)>,
    /// Watch on the nearest existing ancestor while the build directory is missing.
    ancestor: Option<WatchDescriptor>,
    /// Subdirectories watched with inotify (`watch_subdirs`), relative to `dir`.
    subdirs: HashMap<PathBuf, WatchDescriptor>,
}

/// A plugin whose directory is polled.
#[derive(Debug)]
struct PolledPlugin {
    dir: PathBuf,
    exec: PathBuf,
    reason: String,
}

pub struct Watcher {
    /// None with `watch_mode = "poll"`: the daemon then holds no inotify fd at all.
    inotify: Option<Inotify>,
    options: WatchOptions,
    /// The exclude globs, for subdirectory paths (kept current by `set_matchers`).
    matchers: Option<Matchers>,
    poller: Poller,
    /// The polled plugins dir's (device, inode), when it is polled.
    root_polled: Option<(u64, u64)>,
    polled: HashMap<String, PolledPlugin>,
    /// Why directories were put under polling, not yet reported.
    notices: Vec<Change>,
    root: PathBuf,
    /// The plugins dir's watch and the (device, inode) it was added for; None while it is gone.
    root_wd: Option<(WatchDescriptor, (u64, u64))>,
    /// The watch on the plugins dir's parent (or, while even that is gone, its nearest
    /// existing ancestor): the directory and its (device, inode).
    root_wait: Option<(WatchDescriptor, PathBuf, (u64, u64))>,
    owners: HashMap<WatchDescriptor, Vec<Owner>>,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    plugins: HashMap<String, PluginWatch>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("root", &self.root)
            .field("plugins", &self.plugins.len())
            .finish()
    }
}

/// A name arriving in the watched directory: created, or moved in.
const ARRIVALS: WatchMask = WatchMask::CREATE.union(WatchMask::MOVED_TO);

/// The watched directory itself going away; `ONLYDIR` so a file swapped in is never watched.
const DIR_GONE: WatchMask = WatchMask::DELETE_SELF
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR);

const ROOT_MASK: WatchMask = ARRIVALS
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(DIR_GONE);

const DIR_MASK: WatchMask = ARRIVALS
    .union(WatchMask::CLOSE_WRITE)
    .union(WatchMask::ATTRIB)
    .union(DIR_GONE)
    .union(WatchMask::EXCL_UNLINK);

/// Something appearing in an ancestor of a missing build directory.
const ANCESTOR_MASK: WatchMask = ARRIVALS
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::ONLYDIR);

/// The name of the missing plugins dir (or of a directory on the way to it) appearing, or the
/// watched ancestor itself going away.
const ROOT_ANCESTOR_MASK: WatchMask = ARRIVALS.union(DIR_GONE);

/// Where the watcher waits for a missing plugins dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootWait {
    /// Its parent is watched: its name appearing there is reported at once.
    Parent,
    /// Even its parent is gone: a farther ancestor is watched (or none could be).
    Farther,
}

/// An inotify failure with the remedy spelled out (the kernel's own words mislead: a full watch
/// table says "No space left on device").
#[derive(Debug)]
pub struct WatchError {
    pub path: PathBuf,
    pub source: io::Error,
}

impl std::fmt::Display for WatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.source.raw_os_error() {
            Some(libc::ENOSPC) => write!(
                f,
                "cannot watch {}: the inotify watch limit is reached (fs.inotify.max_user_watches = {}); raise it, e.g. `sysctl fs.inotify.max_user_watches=524288`",
                self.path.display(),
                read_limit("max_user_watches")
            ),
            Some(libc::EMFILE) => write!(
                f,
                "cannot create an inotify instance: the per-user limit is reached (fs.inotify.max_user_instances = {}); raise it, e.g. `sysctl fs.inotify.max_user_instances=1024`",
                read_limit("max_user_instances")
            ),
            _ => write!(f, "cannot watch {}: {}", self.path.display(), self.source),
        }
    }
}

impl std::error::Error for WatchError {}

fn read_limit(name: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/fs/inotify/{name}"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

impl Watcher {
    /// Create the inotify instance and watch `root` (the plugins dir). A plugins dir that is
    /// gone already (swapped away right after it was created) is not an error: `root_watched`
    /// says so and the caller waits for it.
    pub fn new(root: &Path, options: WatchOptions) -> Result<Watcher, WatchError> {
        let inotify = match options.mode {
            WatchMode::Poll => None,
            _ => Some(Inotify::init().map_err(|source| WatchError {
                path: root.to_path_buf(),
                source,
            })?),
        };
        let mut w = Watcher {
            inotify,
            options,
            matchers: None,
            poller: Poller::default(),
            root_polled: None,
            polled: HashMap::new(),
            notices: Vec::new(),
            root: root.to_path_buf(),
            root_wd: None,
            root_wait: None,
            owners: HashMap::new(),
            dirs: HashMap::new(),
            plugins: HashMap::new(),
            buf: vec![0u8; 64 * 1024],
        };
        match w.watch_root() {
            Err(e) if is_missing_dir(&e.source) => {}
            other => other?,
        }
        Ok(w)
    }

    /// (Re-)add the watch on the plugins dir; harmless when it is already watched. Ends a wait
    /// for the plugins dir to come back.
    pub fn watch_root(&mut self) -> Result<(), WatchError> {
        let root = self.root.clone();
        if self.root_watched() && self.root_polled.is_some() {
            return Ok(());
        }
        let id = || dir_id(&root).unwrap_or((0, 0));
        let fallback = match self.poll_reason(&root) {
            Some(reason) => reason,
            None => match self.add(&root, ROOT_MASK, Owner::Root) {
                Ok(wd) => {
                    self.root_wd = Some((wd, id()));
                    return Ok(());
                }
                Err(e) => self.fallback_reason(e)?,
            },
        };
        if !root.is_dir() {
            return Err(WatchError {
                path: root,
                source: io::Error::from_raw_os_error(libc::ENOENT),
            });
        }
        self.poller.add(&root, PollOwner::Root, true);
        self.root_polled = Some(id());
        self.notice(None, &root, fallback);
        Ok(())
    }

    /// The plugins dir is under watch.
    pub fn root_watched(&self) -> bool {
        self.root_wd.is_some() || self.root_polled.is_some()
    }

    /// Why `dir` must be polled before inotify is even tried: `watch_mode = "poll"`, or under
    /// `auto` a file system whose remote changes inotify does not see.
    fn poll_reason(&self, dir: &Path) -> Option<String> {
        match self.options.mode {
            WatchMode::Poll => Some("watch_mode = \"poll\"".into()),
            WatchMode::Inotify => None,
            WatchMode::Auto => crate::poll_watch::remote_fs(dir)
                .map(|fs| format!("on {fs}, whose changes made elsewhere inotify does not see")),
        }
    }

    /// Under `auto`, an inotify failure that polling works around (the watch limit) becomes the
    /// reason to poll; any other failure, or any failure under `inotify`, stays an error.
    fn fallback_reason(&self, e: WatchError) -> Result<String, WatchError> {
        let limit = e.source.raw_os_error() == Some(libc::ENOSPC);
        if self.options.mode == WatchMode::Auto && limit {
            return Ok(format!(
                "the inotify watch limit is reached (fs.inotify.max_user_watches = {}); raise it to watch with inotify",
                read_limit("max_user_watches")
            ));
        }
        Err(e)
    }

    fn notice(&mut self, plugin: Option<&str>, path: &Path, reason: String) {
        let whose = plugin.map(|id| format!("[{id}] ")).unwrap_or_default();
        log::info!("{whose}polling {}: {reason}", path.display());
        self.notices.push(Change::Polled {
            plugin: plugin.map(str::to_string),
            path: path.to_path_buf(),
            reason,
        });
    }

    /// The directories put under polling since the last call, with the reason.
    pub fn take_notices(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.notices)
    }

    /// The exclude globs applied to subdirectory paths (`watch_subdirs`).
    pub fn set_matchers(&mut self, matchers: &Matchers) {
        self.matchers = Some(matchers.clone());
    }

    /// Number of polled directories (plugins dir, plugin dirs, subdirectories).
    pub fn polled_dirs(&self) -> usize {
        self.poller.len()
    }

    /// Whether a polled file waits for the listing that confirms it is complete.
    pub fn settling(&self) -> bool {
        self.poller.settling()
    }

    /// Whether a poll round is due every interval.
    pub fn polls(&self) -> bool {
        !self.poller.is_empty()
    }

    /// How a plugin's directory is watched: "inotify", "poll", or None when it is not.
    pub fn watched_by(&self, id: &str) -> Option<&'static str> {
        if self.polled.contains_key(id) {
            Some("poll")
        } else if self.plugins.contains_key(id) {
            Some("inotify")
        } else {
            None
        }
    }

    /// Why a plugin's directory is polled (None when it is not).
    pub fn poll_reason_of(&self, id: &str) -> Option<&str> {
        self.polled.get(id).map(|p| p.reason.as_str())
    }

    /// Number of plugin subdirectories watched (`watch_subdirs`), by inotify or polling.
    pub fn subdirs_watched(&self) -> usize {
        let by_inotify: usize = self.plugins.values().map(|p| p.subdirs.len()).sum();
        by_inotify + self.poller.subdirs()
    }

    /// The watched plugins dir is still the directory at its path (not deleted, not renamed
    /// away with a new one in its place: events saying so may have been lost in an overflow).
    pub fn root_is_current(&self) -> bool {
        let id = match (&self.root_wd, &self.root_polled) {
            (Some((_, id)), _) | (None, Some(id)) => id,
            (None, None) => return false,
        };
        dir_id(&self.root) == Some(*id)
    }

    /// Drop the plugins dir's watch and every plugin's watches: after a deletion or a swap they
    /// watch directories that are no longer at their paths.
    pub fn forget_root(&mut self) {
        if let Some((wd, _)) = self.root_wd.take() {
            self.release(wd, |o| *o == Owner::Root);
        }
        self.root_polled = None;
        self.poller.remove_root();
        let mut ids: Vec<String> = self.plugins.keys().cloned().collect();
        ids.extend(self.polled.keys().cloned());
        for id in ids {
            self.unwatch_plugin(&id);
        }
    }

    /// Watch the nearest existing ancestor of the plugins dir for the name that leads to it:
    /// while the plugins dir is gone, to see it come back; while it is there (the ancestor is
    /// then its parent), to see it replaced without an event on its own watch (its parent
    /// renamed away, a symlinked plugins dir re-pointed). Keeps the watch it has when that is
    /// still the right one. Says whether the watched ancestor is the parent (then an event will
    /// tell when the plugins dir is back) or a farther one (then the caller should also retry on
    /// a timer: a mount appearing on the way gives no inotify event).
    pub fn await_root(&mut self) -> RootWait {
        if self.inotify.is_none() {
            // Polling: the daemon's retry timer looks again.
            return RootWait::Farther;
        }
        let root = self.root.clone();
        let Some(existing) = root.ancestors().skip(1).find(|a| a.is_dir()) else {
            self.stop_waiting_for_root();
            return RootWait::Farther;
        };
        let wait = if root.parent() == Some(existing) {
            RootWait::Parent
        } else {
            RootWait::Farther
        };
        let id = dir_id(existing);
        if let Some((_, dir, watched)) = &self.root_wait {
            if dir == existing && Some(*watched) == id {
                return wait;
            }
        }
        self.stop_waiting_for_root();
        let next = root
            .strip_prefix(existing)
            .ok()
            .and_then(|rest| rest.components().next())
            .map(|c| c.as_os_str().to_os_string())
            .unwrap_or_default();
        let owner = Owner::RootAncestor { next };
        let lost = self.root_wd.is_none();
        match self.add(existing, ROOT_ANCESTOR_MASK, owner) {
            Ok(wd) => {
                if lost {
                    log::debug!(
                        "watching {} until plugins dir {} is back",
                        existing.display(),
                        root.display()
                    );
                }
                let id = id.unwrap_or((0, 0));
                self.root_wait = Some((wd, existing.to_path_buf(), id));
                wait
            }
            // Only a safeguard while the plugins dir is there: its own watch still works.
            Err(e) if !lost => {
                log::debug!("{e}; a renamed parent of the plugins dir will not be noticed");
                wait
            }
            Err(e) => {
                log::warn!(
                    "{e}; retrying on a timer until plugins dir {} is back",
                    root.display()
                );
                RootWait::Farther
            }
        }
    }

    fn stop_waiting_for_root(&mut self) {
        if let Some((wd, _, _)) = self.root_wait.take() {
            self.release(wd, |o| matches!(o, Owner::RootAncestor { .. }));
        }
    }

    /// The inotify fd to poll for readability; None when every directory is polled.
    pub fn fd(&self) -> Option<RawFd> {
        self.as_fd().map(|fd| fd.as_raw_fd())
    }

    pub fn as_fd(&self) -> Option<BorrowedFd<'_>> {
        self.inotify.as_ref().map(|i| i.as_fd())
    }

    /// Number of directories under watch: plugins_dir, each plugin dir, and build dirs that
    /// symlinked executables point into (not the plugins dir's parent).
    pub fn dirs_watched(&self) -> usize {
        let guard_only = |owners: &Vec<Owner>| {
            owners
                .iter()
                .all(|o| matches!(o, Owner::RootAncestor { .. }))
        };
        let polled = usize::from(self.root_polled.is_some()) + self.polled.len();
        self.owners.values().filter(|o| !guard_only(o)).count() + polled
    }

    /// Watch a plugin's directory, and the directory of its real executable when that lies
    /// elsewhere (a symlinked build or an `exec` in a subdirectory). Calling it again for the same
    /// directory keeps that watch and only re-resolves the executable's location.
    pub fn watch_plugin(&mut self, id: &str, dir: &Path, exec: &Path) -> Result<(), WatchError> {
        if let Some(pp) = self.polled.get_mut(id) {
            if pp.dir == dir {
                pp.exec = exec.to_path_buf();
                return Ok(());
            }
            self.unwatch_plugin(id);
        }
        if let Some(pw) = self.plugins.get_mut(id) {
            if pw.dir == dir {
                pw.exec = exec.to_path_buf();
                self.refresh_plugin(id);
                return Ok(());
            }
            self.unwatch_plugin(id);
        }
        let owner = Owner::PluginDir(id.to_string());
        let reason = match self.poll_reason(dir) {
            Some(reason) => reason,
            None => match self.add(dir, DIR_MASK, owner) {
                Ok(dir_wd) => {
                    self.plugins.insert(
                        id.to_string(),
                        PluginWatch {
                            dir: dir.to_path_buf(),
                            exec: exec.to_path_buf(),
                            dir_wd,
                            target: None,
                            ancestor: None,
                            subdirs: HashMap::new(),
                        },
                    );
                    self.refresh_plugin(id);
                    self.watch_subtree(id, Path::new(""), true, &mut Vec::new());
                    return Ok(());
                }
                Err(e) => self.fallback_reason(e)?,
            },
        };
        let plugin_owner = PollOwner::Plugin {
            id: id.to_string(),
            rel: PathBuf::new(),
        };
        self.poller.add(dir, plugin_owner, true);
        self.notice(Some(id), dir, reason.clone());
        self.polled.insert(
            id.to_string(),
            PolledPlugin {
                dir: dir.to_path_buf(),
                exec: exec.to_path_buf(),
                reason,
            },
        );
        self.watch_subtree(id, Path::new(""), true, &mut Vec::new());
        Ok(())
    }

    fn plugin_dir(&self, id: &str) -> Option<PathBuf> {
        match (self.plugins.get(id), self.polled.get(id)) {
            (Some(pw), _) => Some(pw.dir.clone()),
            (None, Some(pp)) => Some(pp.dir.clone()),
            (None, None) => None,
        }
    }

    /// Why a path below a plugin dir never counts: a component excluded, or too deep.
    fn subpath_excluded(&self, rel: &Path) -> Option<String> {
        if rel.components().count() > MAX_SUBDIR_DEPTH {
            return Some(format!("deeper than {MAX_SUBDIR_DEPTH} subdirectories"));
        }
        let m = self.matchers.as_ref()?;
        rel.components().find_map(|c| {
            let c = c.as_os_str().to_string_lossy();
            m.excluded_by(&c)
                .map(|glob| format!("excluded by pattern `{glob}` (on `{c}`)"))
        })
    }

    /// With `watch_subdirs`, watch the subdirectories below `rel` (relative to the plugin dir)
    /// — and `rel` itself unless it is the plugin dir — by inotify, or by polling where the plugin
    /// dir is polled or inotify has no watch left. `baseline`: what is there now is known (at
    /// start); otherwise the files found are new (a subdirectory that just arrived) and pushed to
    /// `found` (inotify) or left for the next poll round to report.
    fn watch_subtree(&mut self, id: &str, rel: &Path, baseline: bool, found: &mut Vec<PathBuf>) {
        if !self.options.subdirs {
            return;
        }
        let Some(dir) = self.plugin_dir(id) else {
            return;
        };
        if !rel.as_os_str().is_empty() && !self.watch_subdir(id, &dir, rel, baseline) {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir.join(rel)) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let child = rel.join(entry.file_name());
            // Not followed: a symlinked directory could lead into a loop or out of the tree.
            let Ok(t) = entry.file_type() else { continue };
            if self.subpath_excluded(&child).is_some() {
                continue;
            }
            if t.is_dir() {
                self.watch_subtree(id, &child, baseline, found);
            } else if t.is_file()
                && !baseline
                && !rel.as_os_str().is_empty()
                && !self.polled.contains_key(id)
            {
                found.push(dir.join(&child));
            }
        }
    }

    /// Watch one subdirectory; false when it cannot be (limit, vanished, excluded).
    fn watch_subdir(&mut self, id: &str, dir: &Path, rel: &Path, baseline: bool) -> bool {
        let path = dir.join(rel);
        if self.subpath_excluded(rel).is_some() {
            return false;
        }
        let count =
            self.plugins.get(id).map_or(0, |p| p.subdirs.len()) + self.poller.subdirs_of(id);
        if count >= MAX_SUBDIRS_PER_PLUGIN {
            log::warn!(
                "[{id}] not watching {}: the plugin already has {MAX_SUBDIRS_PER_PLUGIN} watched subdirectories (exclude the rest with exclude_patterns)",
                path.display()
            );
            return false;
        }
        let owner = PollOwner::Plugin {
            id: id.to_string(),
            rel: rel.to_path_buf(),
        };
        if self.polled.contains_key(id) {
            if !self.poller.contains(&path) {
                self.poller.add(&path, owner, baseline);
            }
            return true;
        }
        let sub = Owner::Subdir {
            plugin: id.to_string(),
            rel: rel.to_path_buf(),
        };
        match self.add(&path, DIR_MASK, sub) {
            Ok(wd) => {
                if let Some(pw) = self.plugins.get_mut(id) {
                    pw.subdirs.insert(rel.to_path_buf(), wd);
                }
                true
            }
            Err(e) if is_missing_dir(&e.source) => false,
            Err(e) => match self.fallback_reason(e) {
                Ok(reason) => {
                    if !self.poller.contains(&path) {
                        self.poller.add(&path, owner, baseline);
                        self.notice(Some(id), &path, reason);
                    }
                    true
                }
                Err(e) => {
                    log::warn!("[{id}] {e}; changes in this subdirectory will not be noticed");
                    false
                }
            },
        }
    }

    /// Forget a subdirectory (and those below it) that was deleted or moved away.
    fn forget_subdir(&mut self, id: &str, rel: &Path) {
        let Some(pw) = self.plugins.get_mut(id) else {
            return;
        };
        let gone: Vec<(PathBuf, WatchDescriptor)> = pw
            .subdirs
            .iter()
            .filter(|(r, _)| r.starts_with(rel))
            .map(|(r, wd)| (r.clone(), wd.clone()))
            .collect();
        for (r, _) in &gone {
            pw.subdirs.remove(r);
        }
        let dir = pw.dir.clone();
        for (r, wd) in gone {
            self.release(
                wd,
                |o| matches!(o, Owner::Subdir { plugin, rel } if plugin == id && *rel == r),
            );
        }
        self.poller.remove_tree(&dir.join(rel));
    }

    /// A subdirectory arrived in a plugin dir (or in one of its subdirectories): watch it and
    /// report the files it already holds.
    fn subdir_arrived(&mut self, id: &str, rel: &Path, explain: bool, out: &mut Vec<Change>) {
        let Some(dir) = self.plugin_dir(id) else {
            return;
        };
        if let Some(reason) = self.subpath_excluded(rel) {
            if explain {
                out.push(ignored(Some(id), dir.join(rel), reason));
            }
            return;
        }
        let mut found = Vec::new();
        self.watch_subtree(id, rel, false, &mut found);
        for path in found {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if !name.starts_with(INSTALL_TEMP_PREFIX) {
                out.push(Change::File {
                    plugin: id.to_string(),
                    path,
                });
            }
        }
    }

    /// Re-resolve where a plugin's executable really lives (its symlink may have been
    /// re-pointed, its build directory deleted or recreated) and move the extra watch there;
    /// nothing changes when it did not move. Returns true when the build directory is watched.
    pub fn refresh_plugin(&mut self, id: &str) -> bool {
        // The build directory can come back between a failed watch and the ancestor watch that
        // waits for it, whose IN_CREATE then never comes: look again, a bounded number of times
        // (a directory flapping faster than that is caught by its next event).
        for _ in 0..3 {
            match self.try_refresh_plugin(id) {
                Refresh::Watched => return true,
                Refresh::Waiting => return false,
                Refresh::CameBack => continue,
            }
        }
        false
    }

    fn try_refresh_plugin(&mut self, id: &str) -> Refresh {
        // A polled plugin's symlinked build dir is not followed (documented).
        let Some(pw) = self.plugins.get(id) else {
            return Refresh::Waiting;
        };
        let location = real_executable_location(&pw.dir, &pw.exec);
        let current = pw.target.as_ref().map(|(_, d, f)| (d.clone(), f.clone()));
        if location.is_some() && location == current {
            return Refresh::Watched;
        }
        let waiting = pw.ancestor.is_some() && pw.target.is_none();
        if waiting && location.as_ref().is_some_and(|(d, _)| !d.exists()) {
            return Refresh::Waiting; // still missing: keep waiting on the ancestor
        }
        self.release_extra(id);
        let Some((target_dir, file)) = location else {
            return Refresh::Waiting;
        };
        let owner = Owner::Target {
            plugin: id.to_string(),
            file: file.clone(),
        };
        match self.add(&target_dir, DIR_MASK, owner) {
            Ok(wd) => {
                if let Some(pw) = self.plugins.get_mut(id) {
                    pw.target = Some((wd, target_dir, file));
                }
                Refresh::Watched
            }
            Err(e) if e.source.kind() == std::io::ErrorKind::NotFound => {
                // `rm -rf target && cargo build`: wait for the build directory to come back.
                self.watch_ancestor(id, &target_dir);
                if target_dir.is_dir() {
                    Refresh::CameBack
                } else {
                    Refresh::Waiting
                }
            }
            Err(e) => {
                log::warn!("[{id}] {e}; changes there will not be noticed");
                Refresh::Waiting
            }
        }
    }

    fn watch_ancestor(&mut self, id: &str, missing: &Path) {
        let Some(existing) = missing.ancestors().skip(1).find(|a| a.is_dir()) else {
            return;
        };
        let owner = Owner::Ancestor {
            plugin: id.to_string(),
        };
        match self.add(existing, ANCESTOR_MASK, owner) {
            Ok(wd) => {
                log::debug!(
                    "[{id}] {} is missing; watching {} until it appears",
                    missing.display(),
                    existing.display()
                );
                if let Some(pw) = self.plugins.get_mut(id) {
                    pw.ancestor = Some(wd);
                }
            }
            Err(e) => log::warn!(
                "[{id}] {e}; a rebuilt {} will not be noticed",
                missing.display()
            ),
        }
    }

    /// Drop the build-directory and ancestor watches of a plugin.
    fn release_extra(&mut self, id: &str) {
        let Some(pw) = self.plugins.get_mut(id) else {
            return;
        };
        let target = pw.target.take().map(|(wd, _, _)| wd);
        let ancestor = pw.ancestor.take();
        if let Some(wd) = target {
            self.release(
                wd,
                |o| matches!(o, Owner::Target { plugin, .. } if plugin == id),
            );
        }
        if let Some(wd) = ancestor {
            self.release(
                wd,
                |o| matches!(o, Owner::Ancestor { plugin } if plugin == id),
            );
        }
    }

    /// The plugin's executable path (what a change to its real file is reported as, so the
    /// no-op check compares like with like).
    fn exec_path_of(&self, id: &str) -> Option<PathBuf> {
        match (self.plugins.get(id), self.polled.get(id)) {
            (Some(pw), _) => Some(pw.dir.join(&pw.exec)),
            (None, Some(pp)) => Some(pp.dir.join(&pp.exec)),
            (None, None) => None,
        }
    }

    pub fn unwatch_plugin(&mut self, id: &str) {
        self.polled.remove(id);
        self.poller.remove_plugin(id);
        let Some(pw) = self.plugins.remove(id) else {
            return;
        };
        let mut wds = vec![pw.dir_wd];
        wds.extend(pw.subdirs.into_values());
        wds.extend(pw.target.map(|(wd, _, _)| wd));
        wds.extend(pw.ancestor);
        for wd in wds {
            self.release(wd, |o| owner_plugin(o) == Some(id));
        }
    }

    pub fn is_watching(&self, id: &str) -> bool {
        self.plugins.contains_key(id) || self.polled.contains_key(id)
    }

    fn add(
        &mut self,
        path: &Path,
        mask: WatchMask,
        owner: Owner,
    ) -> Result<WatchDescriptor, WatchError> {
        let Some(inotify) = self.inotify.as_mut() else {
            return Err(WatchError {
                path: path.to_path_buf(),
                source: io::Error::other("watch_mode = \"poll\": no inotify"),
            });
        };
        let wd = inotify
            .watches()
            .add(path, mask)
            .map_err(|source| WatchError {
                path: path.to_path_buf(),
                source,
            })?;
        let owners = self.owners.entry(wd.clone()).or_default();
        if !owners.contains(&owner) {
            owners.push(owner);
        }
        self.dirs.insert(wd.clone(), path.to_path_buf());
        Ok(wd)
    }

    /// Drop the owners matching `which` from `wd`; remove the kernel watch when none is left.
    fn release(&mut self, wd: WatchDescriptor, which: impl Fn(&Owner) -> bool) {
        let now_empty = match self.owners.get_mut(&wd) {
            Some(owners) => {
                owners.retain(|o| !which(o));
                owners.is_empty()
            }
            None => false,
        };
        if now_empty {
            self.owners.remove(&wd);
            self.dirs.remove(&wd);
            // EINVAL when the kernel already dropped it (IN_IGNORED raced us): nothing to do.
            if let Some(inotify) = self.inotify.as_mut() {
                let _ = inotify.watches().remove(wd);
            }
        }
    }

    /// Read every queued event (until WouldBlock) and decode it. `explain` asks for
    /// `Change::Ignored` records; without it filtered events vanish without allocation.
    pub fn drain(&mut self, matchers: &Matchers, explain: bool) -> Vec<Change> {
        let mut out = Vec::new();
        let mut buf = std::mem::take(&mut self.buf);
        while let Some(inotify) = self.inotify.as_mut() {
            let events = match inotify.read_events(&mut buf) {
                Ok(events) => events,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("reading inotify events failed: {e}; rescanning");
                    out.push(Change::Rescan);
                    break;
                }
            };
            for ev in events {
                self.decode(&ev.wd, ev.mask, ev.name, matchers, explain, &mut out);
            }
        }
        self.buf = buf;
        out
    }

    fn decode(
        &mut self,
        wd: &WatchDescriptor,
        mask: EventMask,
        name: Option<&OsStr>,
        matchers: &Matchers,
        explain: bool,
        out: &mut Vec<Change>,
    ) {
        if mask.contains(EventMask::Q_OVERFLOW) {
            log::warn!("inotify queue overflowed: events were lost, rescanning every plugin");
            out.push(Change::Rescan);
            return;
        }
        let Some(owners) = self.owners.get(wd).cloned() else {
            return; // a watch we already dropped: late events are expected
        };
        if mask.contains(EventMask::IGNORED) {
            self.owners.remove(wd);
            self.dirs.remove(wd);
            for owner in owners {
                match owner {
                    Owner::Root => {
                        // Unmounted, or deleted with its IN_DELETE_SELF lost: the kernel
                        // already dropped the watch.
                        if self.root_wd.as_ref().is_some_and(|(w, _)| w == wd) {
                            self.root_wd = None;
                        }
                        self.forget_root();
                        out.push(Change::RootLost);
                    }
                    Owner::RootAncestor { .. } => {
                        if self.root_wait.as_ref().is_some_and(|(w, _, _)| w == wd) {
                            self.root_wait = None;
                        }
                        out.push(Change::RootCheck);
                    }
                    Owner::PluginDir(id) => {
                        // Forget the dead watch so the directory can be watched afresh.
                        self.unwatch_plugin(&id);
                        out.push(Change::PluginDirLost(id));
                    }
                    Owner::Target { plugin, .. } | Owner::Ancestor { plugin } => {
                        self.target_moved(&plugin, out);
                    }
                    Owner::Subdir { plugin, rel } => self.forget_subdir(&plugin, &rel),
                }
            }
            return;
        }
        let Some(dir) = self.dirs.get(wd).cloned() else {
            return;
        };
        for owner in owners {
            match owner {
                Owner::Root => {
                    if mask.intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF) {
                        // A moved directory's watch would follow it: the path is the truth.
                        self.forget_root();
                        out.push(Change::RootLost);
                    } else {
                        decode_root(&self.root, mask, name, matchers, explain, out);
                    }
                }
                Owner::RootAncestor { next } => {
                    let gone = mask.intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF);
                    if gone {
                        self.stop_waiting_for_root();
                    }
                    if gone || name == Some(next.as_os_str()) {
                        out.push(Change::RootCheck);
                    }
                }
                Owner::PluginDir(id) if self.is_subdir_arrival(mask) => {
                    if let Some(name) = name {
                        self.subdir_arrived(&id, Path::new(name), explain, out);
                    }
                }
                Owner::Subdir { plugin, rel } => {
                    self.decode_subdir(&plugin, &rel, mask, name, matchers, explain, out)
                }
                Owner::PluginDir(id) => {
                    if let Some(pw) = self.plugins.get(&id) {
                        // The plugin's own path: a symlinked plugin dir shares its target's wd.
                        decode_plugin_dir(&id, pw, mask, name, matchers, explain, &pw.dir, out);
                    }
                }
                Owner::Target { plugin, file } => {
                    let Some(exec) = self.exec_path_of(&plugin) else {
                        continue;
                    };
                    decode_target(&plugin, &file, &exec, mask, name, explain, &dir, out)
                }
                Owner::Ancestor { plugin } => self.target_moved(&plugin, out),
            }
        }
    }

    fn is_subdir_arrival(&self, mask: EventMask) -> bool {
        self.options.subdirs
            && mask.contains(EventMask::ISDIR)
            && mask.intersects(EventMask::CREATE | EventMask::MOVED_TO)
    }

    /// An event in a watched subdirectory of plugin `id`'s dir.
    #[allow(clippy::too_many_arguments)]
    fn decode_subdir(
        &mut self,
        id: &str,
        rel: &Path,
        mask: EventMask,
        name: Option<&OsStr>,
        matchers: &Matchers,
        explain: bool,
        out: &mut Vec<Change>,
    ) {
        if mask.intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF) {
            // A moved directory's watch would follow it out of the plugin dir.
            self.forget_subdir(id, rel);
            return;
        }
        let Some(name) = name else { return };
        let child = rel.join(name);
        if self.is_subdir_arrival(mask) {
            self.subdir_arrived(id, &child, explain, out);
            return;
        }
        let Some(dir) = self.plugin_dir(id) else {
            return;
        };
        let path = dir.join(&child);
        let decoded = Decoded { mask, name, path };
        self.report_subpath(id, rel, decoded, false, matchers, explain, out);
    }

    /// A file event below plugin `id`'s dir (in subdirectory `rel`): a change to reload for, or
    /// (explained to verbose subscribers) an ignored one.
    #[allow(clippy::too_many_arguments)]
    fn report_subpath(
        &self,
        id: &str,
        rel: &Path,
        event: Decoded<'_>,
        is_exec: bool,
        matchers: &Matchers,
        explain: bool,
        out: &mut Vec<Change>,
    ) {
        let Decoded { mask, name, path } = event;
        let verdict = match self.subpath_excluded(rel) {
            Some(reason) => Err(reason.into()),
            None => classify(mask, name, &path, is_exec, Some(matchers)),
        };
        match verdict {
            Ok(()) => out.push(Change::File {
                plugin: id.to_string(),
                path,
            }),
            Err(reason) => {
                if explain {
                    out.push(ignored(Some(id), path, reason.into_owned()));
                }
            }
        }
    }

    /// One poll round over every polled directory, decoded like inotify events. Also says when
    /// a polled plugins dir was replaced (a swap changes no listing of the old one).
    pub fn poll_round(&mut self, matchers: &Matchers, explain: bool) -> Vec<Change> {
        let mut out = Vec::new();
        if self.root_polled.is_some() && !self.root_is_current() {
            self.forget_root();
            out.push(Change::RootLost);
        }
        for found in self.poller.round() {
            self.decode_found(found, matchers, explain, &mut out);
        }
        out
    }

    fn decode_found(
        &mut self,
        found: Found,
        matchers: &Matchers,
        explain: bool,
        out: &mut Vec<Change>,
    ) {
        let Found { dir, owner, diffs } = found;
        let diffs = match diffs {
            Ok(diffs) => diffs,
            Err(e) => {
                log::debug!("cannot list polled {}: {e}", dir.display());
                match owner {
                    PollOwner::Root => {
                        self.forget_root();
                        out.push(Change::RootLost);
                    }
                    PollOwner::Plugin { id, rel } if rel.as_os_str().is_empty() => {
                        self.unwatch_plugin(&id);
                        out.push(Change::PluginDirLost(id));
                    }
                    PollOwner::Plugin { .. } => self.poller.remove_tree(&dir),
                }
                return;
            }
        };
        for diff in diffs {
            match &owner {
                PollOwner::Root => decode_root_diff(&self.root, diff, matchers, explain, out),
                PollOwner::Plugin { id, rel } => {
                    self.decode_plugin_diff(id, rel, &dir, diff, matchers, explain, out)
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn decode_plugin_diff(
        &mut self,
        id: &str,
        rel: &Path,
        dir: &Path,
        diff: Diff,
        matchers: &Matchers,
        explain: bool,
        out: &mut Vec<Change>,
    ) {
        let (name, mask) = match diff {
            Diff::Written(name) => (name, EventMask::CLOSE_WRITE),
            Diff::Attrib(name) => (name, EventMask::ATTRIB),
            Diff::Appeared(name, Kind::Dir) => {
                if self.options.subdirs {
                    self.subdir_arrived(id, &rel.join(&name), explain, out);
                } else if explain {
                    out.push(ignored(
                        Some(id),
                        dir.join(&name),
                        "a directory, not a file (watch_subdirs is off)".into(),
                    ));
                }
                return;
            }
            Diff::Appeared(name, _) => (name, EventMask::CREATE),
            Diff::Vanished(name, Kind::Dir) => {
                self.poller.remove_tree(&dir.join(&name));
                self.forget_subdir(id, &rel.join(&name));
                return;
            }
            Diff::Vanished(..) => return,
        };
        let path = dir.join(&name);
        let exec = self.exec_path_of(id);
        let is_exec = exec.as_deref() == Some(path.as_path());
        let decoded = Decoded {
            mask,
            name: &name,
            path,
        };
        self.report_subpath(id, rel, decoded, is_exec, matchers, explain, out);
    }

    /// The build directory's watch ended, or something appeared where it may come back:
    /// re-resolve, and when it is watched again, have the build looked at (a no-op by version
    /// if nothing changed while it was unwatched).
    fn target_moved(&mut self, plugin: &str, out: &mut Vec<Change>) {
        if let Some(pw) = self.plugins.get_mut(plugin) {
            // The kernel already dropped a deleted directory's watch.
            let dead = pw
                .target
                .as_ref()
                .is_some_and(|(wd, _, _)| !self.owners.contains_key(wd));
            if dead {
                pw.target = None;
            }
        }
        if self.refresh_plugin(plugin) {
            if let Some(path) = self.exec_path_of(plugin) {
                if path.exists() {
                    out.push(Change::File {
                        plugin: plugin.to_string(),
                        path,
                    });
                }
            }
        }
    }
}

/// One file event, as inotify reported it or a poll round worked it out.
struct Decoded<'a> {
    mask: EventMask,
    name: &'a OsStr,
    path: PathBuf,
}

/// What one attempt to watch a plugin's build directory came to.
enum Refresh {
    Watched,
    /// Missing (an ancestor is watched for it), or not watchable.
    Waiting,
    /// It was missing, and exists again now that its ancestor is watched.
    CameBack,
}

fn owner_plugin(o: &Owner) -> Option<&str> {
    match o {
        Owner::Root | Owner::RootAncestor { .. } => None,
        Owner::PluginDir(id) => Some(id),
        Owner::Target { plugin, .. }
        | Owner::Ancestor { plugin }
        | Owner::Subdir { plugin, .. } => Some(plugin),
    }
}

fn decode_root(
    root: &Path,
    mask: EventMask,
    name: Option<&OsStr>,
    matchers: &Matchers,
    explain: bool,
    out: &mut Vec<Change>,
) {
    let Some(name) = name.and_then(OsStr::to_str) else {
        return;
    };
    let arrived = mask.intersects(EventMask::CREATE | EventMask::MOVED_TO);
    // A symlink to a plugin dir arrives without IN_ISDIR; one that leaves cannot be examined
    // any more, so any departing name that may be a plugin counts (unknown ones are no-ops).
    let may_be_dir = mask.contains(EventMask::ISDIR)
        || !arrived
        || std::fs::symlink_metadata(root.join(name)).is_ok_and(|m| m.file_type().is_symlink());
    let why_not = if !may_be_dir {
        Some("not a plugin directory (a file in plugins_dir)")
    } else if !matchers.is_plugin_dir_name(name) {
        Some("directory name matches no watch_patterns glob")
    } else {
        None
    };
    if let Some(reason) = why_not {
        if explain {
            out.push(ignored(None, root.join(name), reason.to_owned()));
        }
        return;
    }
    if arrived {
        out.push(Change::DirAdded(name.to_string()));
    } else if mask.intersects(EventMask::DELETE | EventMask::MOVED_FROM) {
        out.push(Change::DirRemoved(name.to_string()));
    }
}

/// A difference in the polled plugins dir, decoded like the matching inotify event.
fn decode_root_diff(
    root: &Path,
    diff: Diff,
    matchers: &Matchers,
    explain: bool,
    out: &mut Vec<Change>,
) {
    let (name, mask) = match diff {
        Diff::Appeared(name, Kind::Dir) => (name, EventMask::CREATE | EventMask::ISDIR),
        Diff::Appeared(name, _) => (name, EventMask::CREATE),
        Diff::Vanished(name, _) => (name, EventMask::DELETE),
        Diff::Written(name) | Diff::Attrib(name) => (name, EventMask::CLOSE_WRITE),
    };
    decode_root(root, mask, Some(&name), matchers, explain, out);
}

#[allow(clippy::too_many_arguments)]
fn decode_plugin_dir(
    id: &str,
    pw: &PluginWatch,
    mask: EventMask,
    name: Option<&OsStr>,
    matchers: &Matchers,
    explain: bool,
    dir: &Path,
    out: &mut Vec<Change>,
) {
    if mask.intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF) {
        return; // the root watch reports the removal; IN_IGNORED follows
    }
    let Some(name) = name else { return };
    let path = dir.join(name);
    let is_exec = dir.join(&pw.exec) == path;
    match classify(mask, name, &path, is_exec, Some(matchers)) {
        Ok(()) => out.push(Change::File {
            plugin: id.to_string(),
            path,
        }),
        Err(reason) => {
            if explain {
                out.push(ignored(Some(id), path, reason.into_owned()));
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn decode_target(
    plugin: &str,
    file: &OsStr,
    exec: &Path,
    mask: EventMask,
    name: Option<&OsStr>,
    explain: bool,
    dir: &Path,
    out: &mut Vec<Change>,
) {
    let Some(name) = name else { return };
    let path = dir.join(name);
    if name != file {
        if explain {
            out.push(ignored(
                Some(plugin),
                path,
                "not the plugin's executable".into(),
            ));
        }
        return;
    }
    match classify(mask, name, &path, true, None) {
        Ok(()) => out.push(Change::File {
            plugin: plugin.to_string(),
            path: exec.to_path_buf(),
        }),
        Err(reason) => {
            if explain {
                out.push(ignored(Some(plugin), path, reason.into_owned()));
            }
        }
    }
}

/// Does this event on `name` count as a new build? Err carries the reason it does not.
fn classify(
    mask: EventMask,
    name: &OsStr,
    path: &Path,
    is_exec: bool,
    matchers: Option<&Matchers>,
) -> Result<(), std::borrow::Cow<'static, str>> {
    if mask.contains(EventMask::ISDIR) {
        return Err("a directory, not a file".into());
    }
    let name_str = name.to_string_lossy();
    if name_str.starts_with(INSTALL_TEMP_PREFIX) {
        return Err("hotreloadctl install temp file".into());
    }
    if let Some(glob) = matchers.and_then(|m| m.excluded_by(&name_str)) {
        return Err(format!("excluded by pattern `{glob}`").into());
    }
    if mask.intersects(EventMask::CLOSE_WRITE | EventMask::MOVED_TO) {
        return Ok(());
    }
    if mask.contains(EventMask::CREATE) {
        // A symlink is never written, so it counts when it appears (`ln -s ~/src/foo/target/
        // debug/foo plugins/foo/foo`), unless it leads to a directory.
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            return match std::fs::metadata(path) {
                Ok(m) if m.is_dir() => Err("a symlink to a directory, not a file".into()),
                _ => Ok(()),
            };
        }
        // A hard link arrives complete (cargo's unlink + link); a new file is still being written
        // and counts at its close-write.
        return match std::fs::metadata(path) {
            Ok(m) if m.is_file() && m.nlink() > 1 => Ok(()),
            _ => Err("created, not yet written (counts at close-write)".into()),
        };
    }
    if mask.contains(EventMask::ATTRIB) {
        if !is_exec {
            return Err("attribute change of a file that is not the executable".into());
        }
        // `chmod +x` after a write counts; a mode set while the file is still being written
        // (Rust's `fs::copy` sets it before the bytes) counts at the close-write.
        return match crate::sys::fs::open_for_writing(path) {
            Some(true) => {
                Err("attributes changed while open for writing (counts at close-write)".into())
            }
            _ => Ok(()),
        };
    }
    Err("event does not indicate a new build".into())
}

fn ignored(plugin: Option<&str>, path: PathBuf, reason: String) -> Change {
    Change::Ignored {
        plugin: plugin.map(str::to_string),
        path,
        reason,
    }
}

/// (device, inode) of a directory, following symlinks.
fn dir_id(path: &Path) -> Option<(u64, u64)> {
    let m = std::fs::metadata(path).ok()?;
    m.is_dir().then(|| (m.dev(), m.ino()))
}

fn is_missing_dir(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR))
}

/// What a name in the plugins dir that is a symlink leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkedDir {
    /// A directory inside the plugins dir's tree: followed.
    Inside,
    /// Somewhere else (or nowhere): skipped, with this description of where it leads.
    Outside(String),
}

/// For a plugin dir `root/name` that is a symlink, where it leads (SPEC §4: followed only when
/// it points inside the plugins dir's tree); None when it is not a symlink.
pub fn linked_plugin_dir(root: &Path, name: &str) -> Option<LinkedDir> {
    let path = root.join(name);
    let meta = std::fs::symlink_metadata(&path).ok()?;
    if !meta.file_type().is_symlink() {
        return None;
    }
    let target = std::fs::read_link(&path)
        .map(|t| t.display().to_string())
        .unwrap_or_else(|_| "?".into());
    let real = match std::fs::canonicalize(&path) {
        Ok(real) => real,
        Err(e) => {
            return Some(LinkedDir::Outside(format!(
                "{target}, which cannot be resolved ({e})"
            )));
        }
    };
    let inside = std::fs::canonicalize(root)
        .is_ok_and(|root| real != root && real.starts_with(&root) && real.is_dir());
    Some(if inside {
        LinkedDir::Inside
    } else {
        LinkedDir::Outside(target)
    })
}

/// Where the executable really lives when that is not directly in the plugin dir: the directory
/// and file name of the symlink's final target, or of an `exec` in a subdirectory.
fn real_executable_location(dir: &Path, exec: &Path) -> Option<(PathBuf, OsString)> {
    let path = dir.join(exec);
    let is_link = std::fs::symlink_metadata(&path)
        .map(|m| m.file_type().is_symlink())
        .unwrap_or(false);
    let real = if is_link {
        match std::fs::canonicalize(&path) {
            Ok(real) => real,
            // A dangling link (its build was deleted): where it points is where to look.
            Err(_) => {
                let target = std::fs::read_link(&path).ok()?;
                path.parent()?.join(target)
            }
        }
    } else {
        path
    };
    let parent = real.parent()?;
    if parent == dir {
        return None;
    }
    Some((parent.to_path_buf(), real.file_name()?.to_os_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fresh directory per test, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("hotreload-watch-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn inotify_only() -> WatchOptions {
        WatchOptions {
            mode: WatchMode::Inotify,
            subdirs: false,
        }
    }

    fn matchers() -> Matchers {
        Matchers::new(&["*".to_string()], &[]).unwrap()
    }

    #[test]
    fn plugin_dir_links_are_followed_only_inside_the_plugins_dir() {
        let tmp = Scratch::new("links");
        let root = tmp.0.join("plugins");
        std::fs::create_dir_all(root.join("releases/a-1")).unwrap();
        std::fs::create_dir_all(tmp.0.join("elsewhere")).unwrap();
        std::fs::create_dir(root.join("plain")).unwrap();
        symlink("releases/a-1", root.join("a")).unwrap();
        symlink(tmp.0.join("elsewhere"), root.join("out")).unwrap();
        symlink(".", root.join("self")).unwrap();
        symlink("nowhere", root.join("dangling")).unwrap();
        assert_eq!(linked_plugin_dir(&root, "plain"), None);
        assert_eq!(linked_plugin_dir(&root, "a"), Some(LinkedDir::Inside));
        for name in ["out", "self", "dangling"] {
            assert!(
                matches!(linked_plugin_dir(&root, name), Some(LinkedDir::Outside(_))),
                "{name} is not followed"
            );
        }
    }

    #[test]
    fn a_created_symlink_counts_unless_it_leads_to_a_directory() {
        let tmp = Scratch::new("classify");
        let build = tmp.0.join("build");
        std::fs::write(&build, b"#!/bin/sh\n").unwrap();
        symlink(&build, tmp.0.join("foo")).unwrap();
        symlink(&tmp.0, tmp.0.join("dir")).unwrap();
        std::fs::write(tmp.0.join("new"), b"").unwrap();
        let create = |name: &str| {
            let path = tmp.0.join(name);
            classify(EventMask::CREATE, OsStr::new(name), &path, true, None)
        };
        assert_eq!(create("foo"), Ok(()));
        assert!(create("dir").is_err());
        assert!(create("new").is_err(), "a new file counts at close-write");
    }

    #[test]
    fn a_plugins_dir_renamed_away_is_lost_and_its_name_coming_back_is_reported() {
        let tmp = Scratch::new("root");
        let root = tmp.0.join("plugins");
        std::fs::create_dir_all(root.join("p1")).unwrap();
        let mut w = Watcher::new(&root, inotify_only()).unwrap();
        w.watch_plugin("p1", &root.join("p1"), Path::new("p1"))
            .unwrap();
        assert!(w.root_watched() && w.root_is_current());

        std::fs::rename(&root, tmp.0.join("plugins.old")).unwrap();
        let changes = w.drain(&matchers(), false);
        assert!(changes.contains(&Change::RootLost), "{changes:?}");
        assert!(!w.root_watched() && !w.is_watching("p1"));
        assert_eq!(w.await_root(), RootWait::Parent);
        // Activity under the old dir, and other names in the parent, say nothing.
        std::fs::write(tmp.0.join("plugins.old/p1/p1"), b"x").unwrap();
        std::fs::create_dir(tmp.0.join("other")).unwrap();
        assert_eq!(w.drain(&matchers(), false), Vec::new());

        std::fs::create_dir(&root).unwrap();
        assert_eq!(w.drain(&matchers(), false), vec![Change::RootCheck]);
        w.watch_root().unwrap();
        assert!(w.root_is_current());
        assert_eq!(w.dirs_watched(), 1, "the parent's watch is not counted");
    }

    #[test]
    fn with_the_parent_gone_the_nearest_ancestor_is_watched() {
        let tmp = Scratch::new("ancestor");
        let root = tmp.0.join("deploy/plugins");
        std::fs::create_dir_all(&root).unwrap();
        let mut w = Watcher::new(&root, inotify_only()).unwrap();
        std::fs::remove_dir_all(tmp.0.join("deploy")).unwrap();
        assert!(w.drain(&matchers(), false).contains(&Change::RootLost));
        assert_eq!(w.await_root(), RootWait::Farther);
        std::fs::create_dir(tmp.0.join("deploy")).unwrap();
        assert_eq!(w.drain(&matchers(), false), vec![Change::RootCheck]);
        assert_eq!(w.await_root(), RootWait::Parent);
    }

    #[test]
    fn a_renamed_parent_is_noticed_while_the_plugins_dir_is_there() {
        let tmp = Scratch::new("guard");
        let root = tmp.0.join("release/plugins");
        std::fs::create_dir_all(&root).unwrap();
        let mut w = Watcher::new(&root, inotify_only()).unwrap();
        assert_eq!(w.await_root(), RootWait::Parent);
        assert_eq!(w.dirs_watched(), 1, "the parent's watch is not counted");
        std::fs::rename(tmp.0.join("release"), tmp.0.join("release.old")).unwrap();
        assert_eq!(w.drain(&matchers(), false), vec![Change::RootCheck]);
        assert!(
            !w.root_is_current(),
            "the path no longer leads to the watched dir"
        );
    }

    #[test]
    fn subdirs_are_watched_to_depth_8_except_excluded_trees() {
        let tmp = Scratch::new("subdirs");
        let root = tmp.0.join("plugins");
        let dir = root.join("p1");
        std::fs::create_dir_all(dir.join("assets/img")).unwrap();
        std::fs::create_dir_all(dir.join(".git/objects/ab")).unwrap();
        std::fs::create_dir_all(dir.join("d1/d2/d3/d4/d5/d6/d7/d8/d9")).unwrap();
        let options = WatchOptions {
            mode: WatchMode::Inotify,
            subdirs: true,
        };
        let mut w = Watcher::new(&root, options).unwrap();
        w.set_matchers(&Matchers::new(&["*".to_string()], &[".git*".to_string()]).unwrap());
        w.watch_plugin("p1", &dir, Path::new("p1")).unwrap();
        // assets, assets/img, d1 .. d1/../d8: not .git's tree, not d9 (depth 9).
        assert_eq!(w.subdirs_watched(), 10);
        assert_eq!(w.watched_by("p1"), Some("inotify"));

        std::fs::write(dir.join("assets/img/logo.png"), b"png").unwrap();
        std::fs::write(dir.join(".git/objects/ab/cd"), b"blob").unwrap();
        std::fs::create_dir(dir.join("templates")).unwrap();
        let changes = w.drain(&matchers(), false);
        let files: Vec<&Change> = changes
            .iter()
            .filter(|c| matches!(c, Change::File { .. }))
            .collect();
        assert_eq!(
            files,
            vec![&Change::File {
                plugin: "p1".into(),
                path: dir.join("assets/img/logo.png"),
            }]
        );
        assert_eq!(w.subdirs_watched(), 11, "templates is watched");
        std::fs::remove_dir(dir.join("templates")).unwrap();
        w.drain(&matchers(), false);
        assert_eq!(w.subdirs_watched(), 10, "a removed subdir is forgotten");
    }

    #[test]
    fn poll_mode_holds_no_inotify_and_reports_a_settled_build() {
        let tmp = Scratch::new("poll");
        let root = tmp.0.join("plugins");
        let dir = root.join("p1");
        std::fs::create_dir_all(&dir).unwrap();
        let options = WatchOptions {
            mode: WatchMode::Poll,
            subdirs: false,
        };
        let mut w = Watcher::new(&root, options).unwrap();
        assert_eq!(w.fd(), None);
        w.watch_plugin("p1", &dir, Path::new("p1")).unwrap();
        assert_eq!((w.watched_by("p1"), w.polled_dirs()), (Some("poll"), 2));
        std::fs::write(dir.join("p1"), b"#!/bin/sh\n").unwrap();
        assert_eq!(w.poll_round(&matchers(), false), vec![], "not settled yet");
        let exec = Change::File {
            plugin: "p1".into(),
            path: dir.join("p1"),
        };
        assert_eq!(w.poll_round(&matchers(), false), vec![exec]);
        std::fs::create_dir(root.join("p2")).unwrap();
        assert_eq!(
            w.poll_round(&matchers(), false),
            vec![Change::DirAdded("p2".into())]
        );
    }

    #[test]
    fn a_plugins_dir_missing_at_start_is_not_an_error() {
        let tmp = Scratch::new("missing");
        let w = Watcher::new(&tmp.0.join("plugins"), inotify_only()).unwrap();
        assert!(!w.root_watched());
    }
}
