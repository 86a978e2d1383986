//! Private directories are verified, never trusted (SPEC §2).
//!
//! The runtime dir holds the control socket and the snapshots the daemon executes; the state dir
//! holds what plugins get back after a restart. Whoever can write into either can make the
//! daemon run their code as the daemon's user, or impersonate it to `hotreloadctl`. A name like
//! `/tmp/hotreload-1000` can be created by anyone before the daemon first starts, so a directory
//! the daemon did not just create itself is judged from `lstat` before it is used: it must be a
//! real directory (not a symlink, which would let its owner point it anywhere), owned by the
//! daemon's euid, and writable by nobody else. Group write is tolerated only where the group
//! cannot be anyone else: a directory the service manager created for the unit
//! (`RuntimeDirectoryMode=0770`), or the user's private group (Debian's umask 002 gives every
//! `mkdir` mode 0775 with group = the user's own one-member group; OpenSSH tolerates the same).
//!
//! Checking the path and then using it is safe because of what the check establishes: once a
//! directory is ours and nobody else may write into it, nobody else can swap anything inside it
//! either. What lies above it matters too: a directory above it that anybody may write into
//! must be sticky, as `/tmp` is for the default `/tmp/hotreload-$UID` ([`open_ancestor`]).
//! A directory this module creates is created mode 0700 and needs no check.
//!
//! [`judge`] is the rule, [`inspect`] and [`ensure`] apply it to a path (the latter creating a
//! missing directory), [`UnsafeDir`] is the refusal, worded to say what is wrong and what to do,
//! and [`DaemonDirs`] is the daemon's set: checked before the control socket is bound, created
//! after it (a second daemon must not create anything).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, DirBuilder, Metadata};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Group, Uid, User};

use crate::config::{Env, vars};

/// Who besides the owner may write into a directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharing {
    /// Nobody (the owner's private group aside).
    OwnerOnly,
    /// The directory's group too: the service manager created it for the unit
    /// (`$RUNTIME_DIRECTORY`, `$STATE_DIRECTORY`) with the mode the unit asked for.
    ServiceManager,
}

/// What makes an existing directory unsafe to use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// A symlink: whoever owns it decides where it points.
    Symlink { owner: u32, target: Option<PathBuf> },
    /// Not a directory at all ("a regular file").
    NotADirectory { what: &'static str },
    /// Owned by another user, who can do anything with it.
    Foreign { owner: u32, mode: u32 },
    /// Ours, but others (or a shared group) may write into it.
    Writable { mode: u32 },
    /// A directory above it that anybody may write into, without the sticky bit: anybody can
    /// rename it away and put their own in its place.
    OpenAncestor { ancestor: PathBuf, mode: u32 },
}

/// The facts of one `lstat` that the verdict depends on (apart, so unit tests need no chown).
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    pub kind: Kind,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// What kind of file a path names, without following a symlink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Directory,
    Symlink,
    Other(&'static str),
}

impl Seen {
    pub fn of(meta: &Metadata) -> Seen {
        let file_type = meta.file_type();
        let kind = if file_type.is_dir() {
            Kind::Directory
        } else if file_type.is_symlink() {
            Kind::Symlink
        } else {
            Kind::Other(crate::snapshot::describe(file_type))
        };
        Seen {
            kind,
            uid: meta.uid(),
            gid: meta.gid(),
            mode: meta.mode() & 0o7777,
        }
    }
}

/// The verdict on a directory seen as `seen` by a process running as `euid`;
/// `private_group(gid)` tells whether `gid` is `euid`'s own one-member group.
pub fn judge(
    seen: &Seen,
    euid: u32,
    sharing: Sharing,
    private_group: impl Fn(u32) -> bool,
) -> Result<(), Problem> {
    match seen.kind {
        Kind::Directory => {}
        Kind::Symlink => {
            return Err(Problem::Symlink {
                owner: seen.uid,
                target: None,
            });
        }
        Kind::Other(what) => return Err(Problem::NotADirectory { what }),
    }
    if seen.uid != euid {
        return Err(Problem::Foreign {
            owner: seen.uid,
            mode: seen.mode,
        });
    }
    let others_write = seen.mode & 0o002 != 0;
    let group_write = seen.mode & 0o020 != 0;
    let group_is_trusted = || sharing == Sharing::ServiceManager || private_group(seen.gid);
    if others_write || (group_write && !group_is_trusted()) {
        return Err(Problem::Writable { mode: seen.mode });
    }
    Ok(())
}

/// Judges the existing `dir` (`lstat`, never following a symlink). A missing `dir` is an
/// `io::ErrorKind::NotFound` error, for the caller to create it or not.
pub fn inspect(dir: &Path, sharing: Sharing) -> io::Result<Result<(), Problem>> {
    let dir = normalized(dir);
    let meta = fs::symlink_metadata(&dir)?;
    let euid = nix::unistd::geteuid().as_raw();
    let verdict = judge(&Seen::of(&meta), euid, sharing, |gid| {
        is_private_group(gid, euid)
    });
    Ok(verdict.map_err(|problem| match problem {
        Problem::Symlink { owner, .. } => Problem::Symlink {
            owner,
            target: fs::read_link(&dir).ok(),
        },
        other => other,
    }))
}

/// Creates `dir` mode 0700 (and its missing parents, also 0700), or judges it when it exists.
/// `Ok(Err(problem))` when an existing `dir` is unsafe.
pub fn ensure(dir: &Path, sharing: Sharing) -> io::Result<Result<(), Problem>> {
    let dir = normalized(dir);
    let mkdir = |path: &Path| DirBuilder::new().mode(0o700).create(path);
    let created = match mkdir(&dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent() {
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)?;
            }
            mkdir(&dir)
        }
        other => other,
    };
    match created {
        Ok(()) => Ok(Ok(())),
        // Ours or not, it was there before: judge it (a symlink also lands here).
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => inspect(&dir, sharing),
        Err(e) => Err(e),
    }
}

/// The first directory above `dir` (following symlinks, as the kernel does on the way to
/// `dir`) that is writable by others and not sticky. Only the mode counts: ownership above the
/// private directory is the system's business (and is often unmapped in a user namespace),
/// while a world-writable, non-sticky directory lets anyone swap what lies below it.
pub fn open_ancestor(dir: &Path) -> io::Result<Option<Problem>> {
    let dir = normalized(dir);
    for ancestor in dir.ancestors().skip(1) {
        if ancestor.as_os_str().is_empty() {
            continue;
        }
        let meta = match fs::metadata(ancestor) {
            Ok(meta) => meta,
            // Created (0700) by the daemon later.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mode = meta.mode() & 0o7777;
        if mode & 0o002 != 0 && mode & 0o1000 == 0 {
            return Ok(Some(Problem::OpenAncestor {
                ancestor: ancestor.to_path_buf(),
                mode,
            }));
        }
    }
    Ok(None)
}

/// `dir` without a trailing slash or `.` components: `lstat("link/")` would follow the link.
fn normalized(dir: &Path) -> PathBuf {
    dir.components().collect()
}

/// Whether `gid` is `uid`'s user private group: the user's primary group, named like the user,
/// with no other member listed. (A user with the same primary gid would not be listed; such
/// setups defeat the private-group scheme itself.)
fn is_private_group(gid: u32, uid: u32) -> bool {
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return false;
    };
    let Ok(Some(group)) = Group::from_gid(Gid::from_raw(gid)) else {
        return false;
    };
    user.gid.as_raw() == gid
        && group.name == user.name
        && group.mem.iter().all(|member| *member == user.name)
}

/// An existing directory refused, with everything its message needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsafeDir {
    /// What the directory is for: "runtime directory", "snapshot directory".
    pub role: &'static str,
    pub path: PathBuf,
    pub problem: Problem,
    /// The option that chooses another one ("--runtime-dir"); `None` for a subdirectory, which
    /// the daemon creates again when it is removed.
    pub option: Option<&'static str>,
}

impl UnsafeDir {
    /// The error for `problem` found at `path`.
    pub fn new(role: &'static str, path: &Path, problem: Problem) -> UnsafeDir {
        UnsafeDir {
            role,
            path: normalized(path),
            problem,
            option: None,
        }
    }

    /// Names the option that chooses another directory in the advice.
    pub fn chosen_by(mut self, option: &'static str) -> UnsafeDir {
        self.option = Some(option);
        self
    }

    /// The same, as an `io::Error` (kind `PermissionDenied`) for callers that deal in those.
    pub fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::PermissionDenied, self)
    }

    /// "remove it (rm -rf PATH)", "or choose another --runtime-dir" as fits.
    fn remove_or_choose(&self, rm: &str) -> String {
        let path = self.path.display();
        match self.option {
            Some(option) => format!("remove it ({rm} {path}) or choose another {option}"),
            None => format!("remove it ({rm} {path}); hotreloadd creates it again"),
        }
    }
}

impl fmt::Display for UnsafeDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let euid = nix::unistd::geteuid().as_raw();
        write!(f, "refusing to use {} {}: ", self.role, self.path.display())?;
        match &self.problem {
            Problem::Symlink { owner, target } => {
                match target {
                    Some(target) => write!(f, "it is a symlink to {}", target.display())?,
                    None => f.write_str("it is a symlink")?,
                }
                let path = self.path.display();
                if *owner == euid {
                    f.write_str(
                        ", and hotreloadd does not follow a symlink to a private directory: ",
                    )?;
                    match self.option {
                        Some(option) => write!(
                            f,
                            "name the real directory with {option} instead, or remove the link \
                             (rm {path})"
                        ),
                        None => write!(
                            f,
                            "remove the link (rm {path}); hotreloadd creates the directory again"
                        ),
                    }
                } else {
                    write!(
                        f,
                        " owned by {}; another user may have created it to take over the \
                         daemon: {}",
                        user_text(*owner),
                        self.remove_or_choose("as root: rm")
                    )
                }
            }
            Problem::NotADirectory { what } => write!(
                f,
                "it is {what}, not a directory; {}",
                self.remove_or_choose("rm")
            ),
            Problem::Foreign { owner, mode } => write!(
                f,
                "it is owned by {}, not by {} that hotreloadd runs as, and has mode {mode:04o}; \
                 another user may have created it to take over the daemon: {}",
                user_text(*owner),
                user_text(euid),
                self.remove_or_choose("as root: rm -rf")
            ),
            Problem::Writable { mode } => {
                let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
                    (true, true) => "its group and others",
                    (false, true) => "others",
                    _ => "its group",
                };
                let fix = format!("chmod 700 {}", self.path.display());
                match self.option {
                    Some(option) => write!(
                        f,
                        "it is writable by {who} (mode {mode:04o}); make it private ({fix}) or \
                         choose another {option}"
                    ),
                    None => write!(
                        f,
                        "it is writable by {who} (mode {mode:04o}); make it private ({fix})"
                    ),
                }
            }
            Problem::OpenAncestor { ancestor, mode } => {
                write!(
                    f,
                    "{} above it is writable by others and not sticky (mode {mode:04o}), so \
                     anybody can replace it with a directory of their own",
                    ancestor.display()
                )?;
                match self.option {
                    Some(option) => write!(f, "; choose another {option}"),
                    None => Ok(()),
                }
            }
        }
    }
}

impl std::error::Error for UnsafeDir {}

/// The private directories of one daemon: the runtime and state dirs and the subdirectories it
/// keeps in them.
pub struct DaemonDirs(Vec<PrivateDir>);

/// One of a daemon's private directories, and how it is judged.
struct PrivateDir {
    path: PathBuf,
    /// "runtime directory", for messages.
    role: &'static str,
    /// The option that chooses another one; `None` for a subdirectory (created again when it is
    /// removed).
    option: Option<&'static str>,
    sharing: Sharing,
    /// Its subdirectories (`snapshots/<id>`, `plugins/<id>`) are private directories too.
    with_subdirs: bool,
    /// Subdirectories that may belong to another user: `plugins/<id>` of a plugin with `user`,
    /// which the daemon gave to that uid (`supervisor::credentials`). By name, the uid.
    given: BTreeMap<String, u32>,
}

impl DaemonDirs {
    pub fn new(runtime: &Path, state: &Path, env: &Env) -> DaemonDirs {
        let top = |path: &Path, role, option, variable| PrivateDir {
            path: normalized(path),
            role,
            option: Some(option),
            sharing: sharing_of(path, env, variable),
            with_subdirs: false,
            given: BTreeMap::new(),
        };
        let sub = |path: PathBuf, role, with_subdirs| PrivateDir {
            path: normalized(&path),
            role,
            option: None,
            sharing: Sharing::OwnerOnly,
            with_subdirs,
            given: BTreeMap::new(),
        };
        DaemonDirs(vec![
            top(
                runtime,
                "runtime directory",
                "--runtime-dir",
                vars::RUNTIME_DIRECTORY,
            ),
            sub(runtime.join("snapshots"), "snapshot directory", true),
            sub(runtime.join("notify"), "notify socket directory", false),
            top(
                state,
                "state directory",
                "--state-dir",
                vars::STATE_DIRECTORY,
            ),
            sub(state.join("plugins"), "plugin state directory", true),
        ])
    }

    /// Accepts `<state_dir>/plugins/<id>` owned by `uid` for each `(id, uid)`: the state dir
    /// of a plugin running as that user, given to it by the daemon. Any other owner is still
    /// refused, and so is such a directory that its group or others may write.
    pub fn with_plugin_users(mut self, users: impl IntoIterator<Item = (String, u32)>) -> Self {
        let users: BTreeMap<String, u32> = users.into_iter().collect();
        if let Some(plugins) = self
            .0
            .iter_mut()
            .find(|dir| dir.role == "plugin state directory")
        {
            plugins.given = users;
        }
        self
    }

    fn top_level(&self) -> impl Iterator<Item = &PrivateDir> {
        self.0.iter().filter(|dir| dir.option.is_some())
    }

    /// The message refusing any of them that exists but is unsafe (or cannot be inspected), or
    /// above which anybody may swap directories; creates nothing.
    pub fn check(&self) -> Result<(), String> {
        for dir in self.top_level() {
            if let Some(problem) =
                open_ancestor(&dir.path).map_err(|e| cannot_inspect(&dir.path, &e))?
            {
                return Err(dir.refusal(&dir.path, problem));
            }
        }
        for dir in &self.0 {
            match inspect(&dir.path, dir.sharing) {
                Ok(verdict) => verdict.map_err(|problem| dir.refusal(&dir.path, problem))?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(cannot_inspect(&dir.path, &e)),
            }
            if dir.with_subdirs {
                dir.check_subdirs()?;
            }
        }
        Ok(())
    }

    /// Creates the runtime and state dirs (mode 0700) unless they exist, which are then judged
    /// again; the subdirectories are created when first needed.
    pub fn create(&self) -> Result<(), String> {
        for dir in self.top_level() {
            match ensure(&dir.path, dir.sharing) {
                Ok(verdict) => verdict.map_err(|problem| dir.refusal(&dir.path, problem))?,
                Err(e) => {
                    return Err(format!(
                        "cannot create directory {}: {e}",
                        dir.path.display()
                    ));
                }
            }
        }
        Ok(())
    }
}

impl PrivateDir {
    /// Every directory (or symlink) directly inside is a private directory too.
    fn check_subdirs(&self) -> Result<(), String> {
        let listing = |e: io::Error| format!("cannot list {}: {e}", self.path.display());
        for entry in fs::read_dir(&self.path).map_err(listing)? {
            let entry = entry.map_err(listing)?;
            let dir_or_link = entry
                .file_type()
                .is_ok_and(|t| t.is_dir() || t.is_symlink());
            if !dir_or_link {
                continue;
            }
            let path = entry.path();
            let given = self.given.get(&*entry.file_name().to_string_lossy());
            match inspect(&path, Sharing::OwnerOnly) {
                Ok(Err(Problem::Foreign { owner, mode }))
                    if given == Some(&owner) && mode & 0o022 == 0 => {}
                Ok(verdict) => verdict.map_err(|problem| self.refusal(&path, problem))?,
                // Removed while we looked: nothing to judge.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(cannot_inspect(&path, &e)),
            }
        }
        Ok(())
    }

    /// The message refusing `path` (this directory or one inside it).
    fn refusal(&self, path: &Path, problem: Problem) -> String {
        let refused = UnsafeDir::new(self.role, path, problem);
        match self.option {
            Some(option) if path == self.path => refused.chosen_by(option),
            _ => refused,
        }
        .to_string()
    }
}

fn cannot_inspect(path: &Path, e: &io::Error) -> String {
    format!("cannot inspect {}: {e}", path.display())
}

/// Group write is the unit's choice (`RuntimeDirectoryMode=`) only for the very directory the
/// service manager created and named in `variable` (a `:`-separated list).
fn sharing_of(path: &Path, env: &Env, variable: &str) -> Sharing {
    let listed = env.get(variable).unwrap_or_default().split(':');
    let mut listed = listed.filter(|entry| !entry.is_empty());
    if listed.any(|entry| normalized(Path::new(entry)) == normalized(path)) {
        Sharing::ServiceManager
    } else {
        Sharing::OwnerOnly
    }
}

/// "uid 1000 (alice)", or "uid 1000" for a uid without a name.
fn user_text(uid: u32) -> String {
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(user)) => format!("uid {uid} ({})", user.name),
        _ => format!("uid {uid}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::TestDir;
    use std::os::unix::fs::{PermissionsExt, symlink};

    const ME: u32 = 1000;
    const MY_GROUP: u32 = 1000;
    const SHARED_GROUP: u32 = 100;

    fn dir(uid: u32, gid: u32, mode: u32) -> Seen {
        Seen {
            kind: Kind::Directory,
            uid,
            gid,
            mode,
        }
    }

    fn verdict(seen: Seen, sharing: Sharing) -> Result<(), Problem> {
        judge(&seen, ME, sharing, |gid| gid == MY_GROUP)
    }

    #[test]
    fn own_directories_that_nobody_else_may_write_are_accepted() {
        for mode in [0o700, 0o750, 0o755, 0o711, 0o1700] {
            assert_eq!(
                verdict(dir(ME, SHARED_GROUP, mode), Sharing::OwnerOnly),
                Ok(()),
                "mode {mode:o}"
            );
        }
    }

    #[test]
    fn writable_by_others_is_refused_whoever_created_it() {
        for sharing in [Sharing::OwnerOnly, Sharing::ServiceManager] {
            for mode in [0o777, 0o703, 0o1777, 0o757] {
                assert_eq!(
                    verdict(dir(ME, MY_GROUP, mode), sharing),
                    Err(Problem::Writable { mode }),
                    "mode {mode:o}"
                );
            }
        }
    }

    #[test]
    fn group_write_needs_the_service_manager_or_a_private_group() {
        let shared = dir(ME, SHARED_GROUP, 0o770);
        assert_eq!(
            verdict(shared, Sharing::OwnerOnly),
            Err(Problem::Writable { mode: 0o770 })
        );
        assert_eq!(verdict(shared, Sharing::ServiceManager), Ok(()));
        assert_eq!(
            verdict(dir(ME, MY_GROUP, 0o775), Sharing::OwnerOnly),
            Ok(())
        );
    }

    #[test]
    fn another_users_directory_is_refused_whatever_its_mode() {
        for mode in [0o700, 0o755, 0o777] {
            assert_eq!(
                verdict(dir(65534, 65534, mode), Sharing::ServiceManager),
                Err(Problem::Foreign { owner: 65534, mode })
            );
        }
    }

    #[test]
    fn symlinks_and_files_are_refused() {
        let link = Seen {
            kind: Kind::Symlink,
            ..dir(ME, MY_GROUP, 0o777)
        };
        assert_eq!(
            verdict(link, Sharing::OwnerOnly),
            Err(Problem::Symlink {
                owner: ME,
                target: None
            })
        );
        let file = Seen {
            kind: Kind::Other("a regular file"),
            ..dir(ME, MY_GROUP, 0o700)
        };
        assert_eq!(
            verdict(file, Sharing::OwnerOnly),
            Err(Problem::NotADirectory {
                what: "a regular file"
            })
        );
    }

    #[test]
    fn ensure_creates_owner_only_and_judges_what_exists() {
        let t = TestDir::new("private-dir");
        let fresh = t.join("a/b/runtime");
        assert_eq!(ensure(&fresh, Sharing::OwnerOnly).unwrap(), Ok(()));
        for path in [&fresh, &t.join("a/b")] {
            let mode = fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", path.display());
        }
        fs::set_permissions(&fresh, fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(
            ensure(&fresh, Sharing::OwnerOnly).unwrap(),
            Err(Problem::Writable { mode: 0o777 })
        );
        let link = t.join("link");
        symlink(&fresh, &link).unwrap();
        // A trailing slash must not make lstat follow the link.
        let with_slash = PathBuf::from(format!("{}/", link.display()));
        match ensure(&with_slash, Sharing::OwnerOnly).unwrap() {
            Err(Problem::Symlink { target, .. }) => assert_eq!(target, Some(fresh.clone())),
            other => panic!("{other:?}"),
        }
        let missing = t.join("missing");
        assert_eq!(
            inspect(&missing, Sharing::OwnerOnly).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn a_world_writable_ancestor_counts_unless_it_is_sticky() {
        let t = TestDir::new("private-dir-ancestor");
        let shared = t.join("shared");
        fs::create_dir(&shared).unwrap();
        let below = shared.join("missing/runtime");
        assert_eq!(open_ancestor(&below).unwrap(), None);
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(
            open_ancestor(&below).unwrap(),
            Some(Problem::OpenAncestor {
                ancestor: shared.clone(),
                mode: 0o777
            })
        );
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
        assert_eq!(open_ancestor(&below).unwrap(), None);
        assert_eq!(
            open_ancestor(Path::new("/tmp/hotreload-1000")).unwrap(),
            None
        );
    }

    #[test]
    fn the_message_names_path_owner_mode_and_remedy() {
        let path = Path::new("/tmp/hotreload-1000");
        let foreign = UnsafeDir::new(
            "runtime directory",
            path,
            Problem::Foreign {
                owner: 4_000_000_000,
                mode: 0o777,
            },
        )
        .chosen_by("--runtime-dir")
        .to_string();
        assert!(
            foreign.starts_with(
                "refusing to use runtime directory /tmp/hotreload-1000: it is owned by uid \
                 4000000000, not by uid "
            ),
            "{foreign}"
        );
        assert!(
            foreign.ends_with(
                "that hotreloadd runs as, and has mode 0777; another user may have created it to take over the daemon: remove it (as root: \
                 rm -rf /tmp/hotreload-1000) or choose another --runtime-dir"
            ),
            "{foreign}"
        );
        let writable = UnsafeDir::new(
            "snapshot directory",
            path,
            Problem::Writable { mode: 0o770 },
        );
        assert_eq!(
            writable.to_string(),
            "refusing to use snapshot directory /tmp/hotreload-1000: it is writable by its group \
             (mode 0770); make it private (chmod 700 /tmp/hotreload-1000)"
        );
    }
}
