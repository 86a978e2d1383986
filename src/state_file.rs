//! Plugin state files: `state.json` (PluginState, written by the daemon) and `runtime.json` (any
//! JSON value, written by the plugin).
//!
//! `state.json` carries a plugin's state across reloads and daemon restarts, so a crash or power
//! loss at any moment must leave either the old or the new file, never a torn one. Files are
//! therefore never truncated in place: each write goes to a fresh temp file in the same directory
//! (rename is atomic only within one file system), is fsynced, renamed over the target, and the
//! directory is fsynced so the rename itself survives a power loss.
//!
//! A reload's write is *deferred* ([`write_atomic_deferred`]): temp file, complete write, close,
//! rename, and the two fsyncs ([`sync_written`]) once the new instance has been spawned. Against
//! a crash of the daemon (SIGKILL, OOM kill, panic) this is exactly as safe: the written bytes
//! and the rename live in the kernel's page cache and dentry cache, which outlive the process,
//! and rename(2) replaces the name atomically, so every reader (the new instance, the next
//! daemon) sees the old file or the new one, whole. Only a power loss or kernel crash in the
//! short window before [`sync_written`] can tell the difference: see hotreloadd(8), DURABILITY.
//!
//! `runtime.json` is written by a plugin we do not trust to behave: it is opened with
//! `O_NOFOLLOW` (a planted symlink is refused) and `O_NONBLOCK` (a FIFO cannot stall the daemon),
//! must be a regular file and is read only up to a size cap.
//!
//! A plugin with `user` owns its state directory (so it can write `runtime.json` any way it
//! likes, atomic renames included), and the daemon keeps writing `state.json` there. That is
//! safe because of where the directory sits: `<state_dir>/plugins/` is the daemon's and nobody
//! else may write into it, so the plugin can change what is *in* its directory but never swap
//! the directory itself. Inside it, the daemon never follows a name the plugin controls: temp
//! files are created `O_EXCL | O_NOFOLLOW`, `rename` replaces a planted symlink instead of
//! following it, and both files are read `O_NOFOLLOW`. The temp file is given to the
//! directory's owner before the rename, so the plugin can read its `state.json`; whatever the
//! plugin does to that file only misleads itself. A `runtime.json` that does not belong to the
//! directory's owner is refused: a plugin could otherwise hard-link a file only root may read
//! (where `fs.protected_hardlinks` is off) and have the daemon copy it into `state.json`.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil::{self, RemovalWords, create_private_dir, parent_dir, sync_dir, with_path};
use crate::snapshot::{OpenFailure, open_regular};

/// Largest `state.json` [`read_state`] accepts: far beyond any real state, small enough that a
/// corrupt or hostile file cannot exhaust memory at startup.
pub const MAX_STATE_BYTES: u64 = 64 * 1024 * 1024;

/// The content of `state.json` (SPEC §4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PluginState {
    pub plugin_id: String,
    /// The plugin's `config` table from `hotreload.toml`.
    pub configuration: serde_json::Value,
    /// The last valid JSON found in `runtime.json`; `null` before any was written.
    pub runtime_data: serde_json::Value,
    /// RFC 3339 UTC with milliseconds, supplied by the caller.
    pub last_activity: String,
    pub version: String,
    pub status: String,
    /// What the control commands decided for the plugin; its members are absent when they
    /// decided nothing, so such a file is exactly what earlier daemons wrote and read.
    #[serde(flatten)]
    pub control: ControlRecord,
}

/// The per-plugin decisions of the control commands that outlive a daemon restart (SPEC §5):
/// `stop ID` (the plugin stays stopped until `start ID` or `restart ID`) and `enable ID` /
/// `disable ID` (its own hot reload switch, when it differs from its `hot_reload` setting).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlRecord {
    /// When `stop ID` stopped the plugin (RFC 3339), while that holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_by_request: Option<String>,
    /// `enable ID` (true) or `disable ID` (false), when it overrides `hot_reload`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hot_reload: Option<bool>,
}

/// The step of reading or writing a state file that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    CreateDir,
    CreateTemp,
    Write,
    Fsync,
    Close,
    Rename,
    FsyncDir,
    Open,
    Read,
}

impl fmt::Display for Step {
    /// Phrased to read "failed to STEP `PATH`".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::CreateDir => "create the directory of",
            Step::CreateTemp => "create a temp file next to",
            Step::Write => "write the temp file for",
            Step::Fsync => "fsync the temp file for",
            Step::Close => "close the temp file for",
            Step::Rename => "rename the temp file over",
            Step::FsyncDir => "fsync the directory of",
            Step::Open => "open",
            Step::Read => "read",
        })
    }
}

/// Why a state file could not be written or read.
#[derive(Debug)]
pub enum StateError {
    /// A system call failed; `path` is the state file (not the temp file).
    Io {
        path: PathBuf,
        step: Step,
        source: io::Error,
    },
    /// The file is a symlink (refused, never followed).
    Symlink { path: PathBuf },
    /// The file is a directory, FIFO, ... ("a directory").
    NotRegular { path: PathBuf, what: &'static str },
    /// The file is larger than the cap.
    TooBig { path: PathBuf, len: u64, limit: u64 },
    /// The file belongs to another user than its directory (a plugin's hard link).
    ForeignOwner {
        path: PathBuf,
        owner: u32,
        expected: u32,
    },
    /// The content is not valid JSON for its type.
    Invalid {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// The value could not be serialized (e.g. a map with non-string keys).
    Serialize {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl StateError {
    /// The step that failed, for I/O errors.
    pub fn step(&self) -> Option<Step> {
        match self {
            StateError::Io { step, .. } => Some(*step),
            _ => None,
        }
    }

    fn io(path: &Path, step: Step, source: io::Error) -> StateError {
        StateError::Io {
            path: path.to_path_buf(),
            step,
            source,
        }
    }
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::Io { path, step, source } => {
                write!(f, "failed to {step} `{}`: {source}", path.display())
            }
            StateError::Symlink { path } => write!(
                f,
                "`{}` is a symlink, refused: remove it so the daemon can write a regular file",
                path.display()
            ),
            StateError::NotRegular { path, what } => {
                write!(f, "`{}` is {what}, not a regular file", path.display())
            }
            StateError::TooBig { path, len, limit } => write!(
                f,
                "`{}` is {len} bytes, over the {limit} byte limit",
                path.display()
            ),
            StateError::ForeignOwner {
                path,
                owner,
                expected,
            } => write!(
                f,
                "`{}` belongs to uid {owner}, not to uid {expected} who owns its directory: \
                 refused (a hard link to someone else's file?)",
                path.display()
            ),
            StateError::Invalid { path, source } => {
                write!(f, "`{}` is not valid: {source}", path.display())
            }
            StateError::Serialize { path, source } => {
                write!(
                    f,
                    "cannot serialize the state for `{}`: {source}",
                    path.display()
                )
            }
        }
    }
}

impl std::error::Error for StateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StateError::Io { source, .. } => Some(source),
            StateError::Invalid { source, .. } | StateError::Serialize { source, .. } => {
                Some(source)
            }
            _ => None,
        }
    }
}

/// For callers working in `io::Result`: keeps the kind of an I/O failure and the full message.
impl From<StateError> for io::Error {
    fn from(e: StateError) -> io::Error {
        let kind = match &e {
            StateError::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e.to_string())
    }
}

/// Replace `path` with `bytes` atomically and durably.
///
/// Writes a temp file `.<file>.tmp.<pid>.<n>` in the same directory (`O_CREAT|O_EXCL|O_NOFOLLOW`,
/// mode 0600), fsyncs and closes it, renames it over `path` and fsyncs the directory. On failure
/// before the rename the temp is removed and the old file is untouched. A symlink at `path` is
/// replaced, not followed. The parent directory is created (0700) if missing.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    write_atomic_unsynced_rename(path, bytes)?;
    sync_parent(path)
}

/// [`write_atomic`] without the final directory fsync: the new content is complete on disk
/// (the temp file was fsynced before the rename) and visible at once.
fn write_atomic_unsynced_rename(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let (temp, file) = create_temp_for(path)?;
    // After a failed fsync the page cache may have dropped the data ("fsyncgate"): never rename
    // such a file into place, and never retry the fsync; the caller rewrites from memory.
    let result = fill(file, bytes, path)
        .and_then(|()| fs::rename(&temp, path).map_err(|e| StateError::io(path, Step::Rename, e)));
    if let Err(e) = result {
        // Best effort: remove_stale_temps() cleans up whatever this leaves.
        let _ = fs::remove_file(&temp);
        return Err(e);
    }
    Ok(())
}

/// A new temp file beside `path`, in its directory (created or checked by [`prepare_dir`]),
/// given to the directory's owner when that is a plugin's user, so the plugin can read what
/// takes `path`'s name.
fn create_temp_for(path: &Path) -> Result<(PathBuf, File), StateError> {
    let (dir, name) = dir_and_name(path)?;
    let owner = prepare_dir(dir).map_err(|e| StateError::io(path, Step::CreateDir, e))?;
    let (temp, file) =
        create_temp(dir, name).map_err(|e| StateError::io(path, Step::CreateTemp, e))?;
    if let Some((uid, gid)) = owner
        && let Err(e) = std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
    {
        let _ = fs::remove_file(&temp);
        return Err(StateError::io(path, Step::CreateTemp, e));
    }
    Ok((temp, file))
}

/// Creates `dir` (0700) or checks it: a private directory of the daemon (`None`), or one the
/// daemon gave to a plugin's user inside a private directory of its own (`Some(owner)`: uid and
/// gid), which nobody but root can have put there. Anything else is refused as
/// [`create_private_dir`] refuses it.
fn prepare_dir(dir: &Path) -> io::Result<Option<(u32, u32)>> {
    match create_private_dir(dir) {
        Ok(()) => Ok(None),
        Err(refused) => match plugin_owned(dir) {
            Some(owner) => Ok(Some(owner)),
            None => Err(refused),
        },
    }
}

/// The owner of `dir` when it is a real directory that only its owner may write, owned by
/// someone else than the daemon, inside a private directory of the daemon.
fn plugin_owned(dir: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(dir).ok()?;
    let euid = nix::unistd::geteuid().as_raw();
    let private_parent = || {
        crate::private_dir::inspect(parent_dir(dir), crate::private_dir::Sharing::OwnerOnly)
            .is_ok_and(|verdict| verdict.is_ok())
    };
    let only_owner_writes = meta.mode() & 0o022 == 0;
    (meta.is_dir() && meta.uid() != euid && only_owner_writes && private_parent())
        .then_some((meta.uid(), meta.gid()))
}

/// Replace `path` with `bytes` atomically, leaving both fsyncs to [`sync_written`].
///
/// The temp file is written completely and closed before it takes the name `path`, so the name
/// always refers to a whole file: the old one or this one, for any process, including a daemon
/// restarted after this one was killed. The swap is `renameat2(RENAME_EXCHANGE)` where the file
/// system has it and `path` exists: a plain rename over an existing file makes ext4 free the old
/// file's blocks and start writing the new one's (`auto_da_alloc`) inside the call, about 0.3 ms
/// of disk work on a reload's path; the exchange leaves the old content under the temp name,
/// returned here, for the caller to remove later ([`remove_replaced`]; a daemon killed first
/// leaves a stale temp that [`remove_stale_temps`] removes at the next start). What is not yet
/// done is making the new file survive a power loss: call [`sync_written`] right after the
/// latency-critical step (the spawn) that needed the file in place. On failure the temp is
/// removed and the old file is untouched.
pub fn write_atomic_deferred(path: &Path, bytes: &[u8]) -> Result<Option<PathBuf>, StateError> {
    write_atomic_deferred_in(path, bytes, None)
}

/// An unnamed file in the directory of a state file, made ahead of its next write
/// ([`spare_for`]) so that a reload's write need not create one: an ext4 create costs ~70 µs
/// between the old instance's stop and the new one's start, naming an unnamed file a tenth of
/// that (where the daemon may link by descriptor, `AT_EMPTY_PATH`). It is invisible in the
/// directory, given to the directory's owner like a temp file, and gone with its descriptor
/// (or a crash) unless a write names it.
#[derive(Debug)]
pub struct Spare {
    dir: PathBuf,
    file: File,
    /// The directory's owner it was given to (`None`: the daemon's own directory).
    owner: Option<(u32, u32)>,
}

/// A [`Spare`] for the next write of the state file `path`; `None` where the file system has
/// no unnamed files (writes then create their temp file as usual).
pub fn spare_for(path: &Path) -> Option<Spare> {
    let (dir, _) = dir_and_name(path).ok()?;
    let owner = prepare_dir(dir).ok()?;
    let file = crate::sys::fs::create_unnamed(dir).ok()?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).ok()?;
    }
    Some(Spare {
        dir: dir.to_path_buf(),
        file,
        owner,
    })
}

impl Spare {
    /// Whether this spare can take a write of `path` (it is in that file's directory).
    pub fn serves(&self, path: &Path) -> bool {
        self.dir == parent_dir(path)
    }
}

/// [`write_atomic_deferred`] into `spare` when it serves `path` (a temp file is created as
/// usual when it does not, or cannot be named).
pub fn write_atomic_deferred_in(
    path: &Path,
    bytes: &[u8],
    spare: Option<Spare>,
) -> Result<Option<PathBuf>, StateError> {
    // The directory is checked again, as for a temp file created now: it may have been made
    // writable by others, or changed hands, since the spare was made.
    let checked = |spare: &Spare| {
        spare.serves(path) && prepare_dir(&spare.dir).is_ok_and(|owner| owner == spare.owner)
    };
    let (temp, mut file) = match spare.filter(checked) {
        Some(spare) => match name_spare(spare, path) {
            Some(named) => named,
            None => create_temp_for(path)?,
        },
        None => create_temp_for(path)?,
    };
    let result = file
        .write_all(bytes)
        .map_err(|e| StateError::io(path, Step::Write, e))
        .and_then(|()| close_checked(file, path))
        .and_then(|()| {
            swap_into_place(&temp, path).map_err(|e| StateError::io(path, Step::Rename, e))
        });
    match result {
        Ok(true) => Ok(Some(temp)),
        Ok(false) => Ok(None),
        Err(e) => {
            let _ = fs::remove_file(&temp);
            Err(e)
        }
    }
}

/// The spare under a fresh temp name beside `path`; `None` when it cannot be named there.
fn name_spare(spare: Spare, path: &Path) -> Option<(PathBuf, File)> {
    let (dir, name) = dir_and_name(path).ok()?;
    let temp = fsutil::link_as_temp(&spare.file, dir, |pid, n| temp_name(name, pid, n)).ok()?;
    Some((temp, spare.file))
}

/// Give `temp` the name `path`: `Ok(true)` when exchanged (the old file is now at `temp`),
/// `Ok(false)` when renamed (there was no old file, or no exchange on this file system).
fn swap_into_place(temp: &Path, path: &Path) -> io::Result<bool> {
    let Err(error) = crate::sys::fs::rename_exchange(temp, path) else {
        return Ok(true);
    };
    match error.raw_os_error() {
        // No old file to exchange with; no RENAME_EXCHANGE on this file system or kernel.
        Some(libc::ENOENT | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
            fs::rename(temp, path).map(|()| false)
        }
        _ => Err(error),
    }
}

/// Remove what a [`write_atomic_deferred`] exchanged out of the way (the previous content).
pub fn remove_replaced(old: &Path) {
    if let Err(e) = fsutil::remove_file_if_exists(old) {
        log::debug!("cannot remove replaced state file {}: {e}", old.display());
    }
}

/// The fsyncs a [`write_atomic_deferred`] owes: the file now at `path` (whatever write put it
/// there last: a newer one is just as good), then its directory. A file removed since needs only
/// the directory. After a failed file fsync the caller must rewrite the file from memory with
/// [`write_atomic`] ("fsyncgate": a second fsync may report success for data that was dropped).
pub fn sync_written(path: &Path) -> Result<(), StateError> {
    match File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file
            .sync_all()
            .map_err(|e| StateError::io(path, Step::Fsync, e))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(StateError::io(path, Step::Fsync, e)),
    }
    match sync_dir(parent_dir(path)) {
        // The plugin was forgotten and its state dir removed meanwhile: nothing left to sync.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other.map_err(|e| StateError::io(path, Step::FsyncDir, e)),
    }
}

/// Serialize `state` and write it with [`write_atomic_deferred`]; call [`remove_replaced`] and
/// [`sync_written`] soon after.
pub fn write_state_deferred(
    path: &Path,
    state: &PluginState,
    spare: Option<Spare>,
) -> Result<Option<PathBuf>, StateError> {
    write_atomic_deferred_in(path, &state_bytes(path, state)?, spare)
}

fn dir_and_name(path: &Path) -> Result<(&Path, &OsStr), StateError> {
    let name = path.file_name().ok_or_else(|| {
        StateError::io(
            path,
            Step::CreateTemp,
            io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"),
        )
    })?;
    Ok((parent_dir(path), name))
}

/// fsync the directory holding `path`, making a rename of it durable.
pub fn sync_parent(path: &Path) -> Result<(), StateError> {
    sync_dir(parent_dir(path)).map_err(|e| StateError::io(path, Step::FsyncDir, e))
}

/// Serialize `state` and write it to `path` with [`write_atomic`].
pub fn write_state(path: &Path, state: &PluginState) -> Result<(), StateError> {
    write_atomic(path, &state_bytes(path, state)?)
}

fn state_bytes(path: &Path, state: &PluginState) -> Result<Vec<u8>, StateError> {
    let mut bytes = serde_json::to_vec(state).map_err(|source| StateError::Serialize {
        path: path.to_path_buf(),
        source,
    })?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Read `state.json`: `None` when it does not exist; an error when it cannot be read or is not a
/// valid PluginState (the caller warns and starts fresh).
pub fn read_state(path: &Path) -> Result<Option<PluginState>, StateError> {
    let bytes = match read_capped(path, MAX_STATE_BYTES) {
        Ok(bytes) => bytes,
        Err(e) if is_missing(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| StateError::Invalid {
            path: path.to_path_buf(),
            source,
        })
}

/// Whether `error` means the file exists but its content cannot be used (as opposed to a file
/// that cannot be read at all): such a file is worth keeping for a human, see [`set_aside`].
pub fn is_unusable_content(error: &StateError) -> bool {
    matches!(
        error,
        StateError::Invalid { .. } | StateError::TooBig { .. }
    )
}

/// Move an unusable `state.json` out of the way, to `state.json.invalid-<unix seconds>` (with
/// `.N` added when that exists), so the next write does not destroy what may be the only copy of
/// a plugin's state. Returns the new name.
pub fn set_aside(path: &Path) -> io::Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut base = path.as_os_str().to_owned();
    base.push(format!(".invalid-{secs}"));
    for n in 0u32..1000 {
        let mut aside = base.clone();
        if n > 0 {
            aside.push(format!(".{n}"));
        }
        let aside = PathBuf::from(aside);
        // link + unlink, not rename(2): a rename would replace an earlier copy set aside in the
        // same second. File systems without hard links get the rename, after a check.
        match fs::hard_link(path, &aside) {
            Ok(()) => fs::remove_file(path)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(_) if fs::symlink_metadata(&aside).is_err() => fs::rename(path, &aside)?,
            Err(_) => continue,
        }
        sync_dir(parent_dir(path))?;
        return Ok(aside);
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "too many copies already set aside",
    ))
}

/// What [`read_runtime`] found.
#[derive(Clone, Debug, PartialEq)]
pub enum RuntimeRead {
    /// No `runtime.json`.
    Missing,
    /// A regular file within the size cap holding valid JSON.
    Valid(serde_json::Value),
    /// Anything else; the reason names the file.
    Invalid(String),
}

/// Read a `runtime.json` written by a plugin: any JSON value in a regular file of at most
/// `max_bytes`. Symlinks and non-regular files are refused without blocking.
pub fn read_runtime(path: &Path, max_bytes: u64) -> RuntimeRead {
    let bytes = match read_owned_by_dir_owner(path, max_bytes) {
        Ok(bytes) => bytes,
        Err(e) if is_missing(&e) => return RuntimeRead::Missing,
        Err(e) => return RuntimeRead::Invalid(e.to_string()),
    };
    if bytes.is_empty() {
        return RuntimeRead::Invalid(format!(
            "`{}` is empty: write it atomically (temp file + rename)",
            path.display()
        ));
    }
    match serde_json::from_slice(&bytes) {
        Ok(value) => RuntimeRead::Valid(value),
        Err(e) => RuntimeRead::Invalid(format!("`{}` is not valid JSON: {e}", path.display())),
    }
}

/// Remove leftover `.*.tmp.*` files in `dir` (a crash mid-write leaves them); returns how many.
/// A missing `dir` has none.
pub fn remove_stale_temps(dir: &Path) -> io::Result<usize> {
    let words = RemovalWords {
        listing: "cannot list",
        removing: "cannot remove stale temp file",
    };
    fsutil::remove_files_in(dir, is_temp_name, &words)
}

/// Remove `path`; a missing file is not an error.
pub fn remove_if_exists(path: &Path) -> io::Result<()> {
    fsutil::remove_file_if_exists(path)
        .map(|_existed| ())
        .map_err(|e| with_path(e, "cannot remove", path))
}

/// `.<name>.tmp.<pid>.<n>`, the pattern [`remove_stale_temps`] recognizes.
fn temp_name(name: &OsStr, pid: u32, n: u64) -> OsString {
    let mut temp = OsString::from(".");
    temp.push(name);
    temp.push(format!(".tmp.{pid}.{n}"));
    temp
}

fn is_temp_name(name: &OsStr) -> bool {
    let bytes = name.as_encoded_bytes();
    bytes.starts_with(b".") && bytes.windows(5).any(|w| w == b".tmp.")
}

/// Create a fresh temp file for `name` in `dir`: exclusive, never through a symlink, owner-only.
fn create_temp(dir: &Path, name: &OsStr) -> io::Result<(PathBuf, File)> {
    fsutil::create_temp(dir, |pid, n| temp_name(name, pid, n))
}

/// Write all of `bytes`, fsync and close, reporting each step's failure against `path`.
fn fill(mut file: File, bytes: &[u8], path: &Path) -> Result<(), StateError> {
    file.write_all(bytes)
        .map_err(|e| StateError::io(path, Step::Write, e))?;
    file.sync_all()
        .map_err(|e| StateError::io(path, Step::Fsync, e))?;
    close_checked(file, path)
}

/// Dropping a File ignores close(2) errors; some file systems (NFS) report write errors there.
fn close_checked(file: File, path: &Path) -> Result<(), StateError> {
    nix::unistd::close(OwnedFd::from(file))
        .map_err(|errno| StateError::io(path, Step::Close, io::Error::from(errno)))
}

/// [`read_capped`], refusing a file in a plugin-owned directory (see the module documentation)
/// that does not belong to that directory's owner.
fn read_owned_by_dir_owner(path: &Path, limit: u64) -> Result<Vec<u8>, StateError> {
    use std::os::unix::fs::MetadataExt;
    let euid = nix::unistd::geteuid().as_raw();
    let dir_owner = fs::symlink_metadata(parent_dir(path))
        .map(|meta| meta.uid())
        .ok()
        .filter(|uid| *uid != euid);
    read_capped_owned(path, limit, dir_owner)
}

/// Read a whole regular file of at most `limit` bytes without following a symlink or blocking.
fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>, StateError> {
    read_capped_owned(path, limit, None)
}

/// [`read_capped`]; with `owner`, the open file must belong to that uid.
fn read_capped_owned(path: &Path, limit: u64, owner: Option<u32>) -> Result<Vec<u8>, StateError> {
    use std::os::unix::fs::MetadataExt;
    let (file, meta) = open_regular(path, libc::O_NOFOLLOW).map_err(|failure| match failure {
        OpenFailure::NotRegular(what) => StateError::NotRegular {
            path: path.to_path_buf(),
            what,
        },
        OpenFailure::Io(e) if e.raw_os_error() == Some(libc::ELOOP) => StateError::Symlink {
            path: path.to_path_buf(),
        },
        OpenFailure::Io(e) => StateError::io(path, Step::Open, e),
    })?;
    if let Some(expected) = owner.filter(|uid| *uid != meta.uid()) {
        return Err(StateError::ForeignOwner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            expected,
        });
    }
    let too_big = |len| StateError::TooBig {
        path: path.to_path_buf(),
        len,
        limit,
    };
    if meta.len() > limit {
        return Err(too_big(meta.len()));
    }
    // The file may grow between fstat and read: read one byte past the cap to notice.
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| StateError::io(path, Step::Read, e))?;
    if bytes.len() as u64 > limit {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

fn is_missing(e: &StateError) -> bool {
    matches!(e, StateError::Io { step: Step::Open, source, .. } if source.kind() == io::ErrorKind::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsutil::tests::sorted_names;
    use crate::snapshot::tests::{TestDir, within_deadline};
    use serde_json::json;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn sample_state() -> PluginState {
        PluginState {
            plugin_id: "ffmpeg_transcoder".to_string(),
            configuration: json!({"preset": "fast"}),
            runtime_data: json!({"jobs": 3}),
            last_activity: "2026-11-27T22:30:45.123Z".to_string(),
            version: "9f2c4e1a0b3d5c77".to_string(),
            status: "running".to_string(),
            control: ControlRecord::default(),
        }
    }

    #[test]
    fn the_control_record_is_absent_unless_set_and_older_files_read_without_it() {
        let plain = serde_json::to_value(sample_state()).unwrap();
        let members: Vec<&str> = plain
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            members,
            [
                "configuration",
                "last_activity",
                "plugin_id",
                "runtime_data",
                "status",
                "version"
            ]
        );
        let older: PluginState = serde_json::from_value(plain).unwrap();
        assert_eq!(older, sample_state());
        let mut held = sample_state();
        held.control = ControlRecord {
            stopped_by_request: Some("2026-12-07T17:00:00.000Z".into()),
            hot_reload: Some(false),
        };
        let value = serde_json::to_value(&held).unwrap();
        assert_eq!(value["stopped_by_request"], "2026-12-07T17:00:00.000Z");
        assert_eq!(value["hot_reload"], false);
        assert_eq!(serde_json::from_value::<PluginState>(value).unwrap(), held);
    }

    #[test]
    fn write_atomic_creates_and_replaces() {
        let t = TestDir::new("state-replace");
        let path = t.join("state.json");
        write_atomic(&path, b"old").unwrap();
        write_atomic(&path, b"new content").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new content");
        assert_eq!(sorted_names(&t.0), vec!["state.json"]);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_deferred_write_is_whole_and_in_place_before_its_fsyncs() {
        let t = TestDir::new("state-deferred");
        let path = t.join("plugins").join("p").join("state.json");
        assert_eq!(write_atomic_deferred(&path, b"old").unwrap(), None);
        let old = write_atomic_deferred(&path, b"new content").unwrap();
        // Visible to any reader (a new instance, a restarted daemon) with no fsync done yet.
        assert_eq!(fs::read(&path).unwrap(), b"new content");
        // The previous content was exchanged out of the way, under a name the next start
        // removes if the daemon is killed before it does.
        let old = old.expect("ext4 and tmpfs have RENAME_EXCHANGE");
        assert_eq!(fs::read(&old).unwrap(), b"old");
        assert!(is_temp_name(old.file_name().unwrap()));
        remove_replaced(&old);
        assert_eq!(sorted_names(path.parent().unwrap()), vec!["state.json"]);
        sync_written(&path).unwrap();
        fs::remove_file(&path).unwrap();
        // A file removed since only needs its directory synced.
        sync_written(&path).unwrap();
    }

    #[test]
    fn a_deferred_write_into_a_spare_is_whole_in_place_and_leaves_no_other_file() {
        let t = TestDir::new("state-spare");
        let path = t.join("plugins").join("p").join("state.json");
        assert_eq!(write_atomic_deferred(&path, b"old").unwrap(), None);
        let spare = spare_for(&path).expect("ext4 and tmpfs have unnamed files");
        assert!(spare.serves(&path));
        assert!(!spare.serves(&t.join("plugins").join("q").join("state.json")));
        // Invisible until written.
        assert_eq!(sorted_names(path.parent().unwrap()), vec!["state.json"]);
        let old = write_atomic_deferred_in(&path, b"new content", Some(spare)).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new content");
        let old = old.expect("exchanged");
        assert_eq!(fs::read(&old).unwrap(), b"old");
        remove_replaced(&old);
        assert_eq!(sorted_names(path.parent().unwrap()), vec!["state.json"]);
        let meta = fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        sync_written(&path).unwrap();
    }

    #[test]
    fn a_spare_in_a_directory_opened_to_others_since_is_not_used() {
        use std::os::unix::fs::PermissionsExt;
        let t = TestDir::new("state-spare-opened");
        let path = t.join("plugins").join("p").join("state.json");
        assert_eq!(write_atomic_deferred(&path, b"old").unwrap(), None);
        let spare = spare_for(&path).unwrap();
        let dir = path.parent().unwrap();
        fs::set_permissions(dir, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(write_atomic_deferred_in(&path, b"new", Some(spare)).is_err());
        assert_eq!(fs::read(&path).unwrap(), b"old");
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).unwrap();
    }

    #[test]
    fn a_spare_for_another_directory_is_not_used_and_the_write_still_lands() {
        let t = TestDir::new("state-spare-other");
        let path = t.join("plugins").join("p").join("state.json");
        let other = t.join("plugins").join("q").join("state.json");
        fs::create_dir_all(other.parent().unwrap()).unwrap();
        let spare = spare_for(&other).unwrap();
        assert_eq!(
            write_atomic_deferred_in(&path, b"x", Some(spare)).unwrap(),
            None
        );
        assert_eq!(fs::read(&path).unwrap(), b"x");
        assert!(sorted_names(other.parent().unwrap()).is_empty());
    }

    #[test]
    fn write_atomic_creates_private_parent() {
        let t = TestDir::new("state-parent");
        let path = t.join("plugins/foo/state.json");
        write_atomic(&path, b"{}").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"{}");
        let mode = fs::metadata(t.join("plugins/foo"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn write_atomic_replaces_a_symlink_instead_of_following_it() {
        let t = TestDir::new("state-symlink");
        fs::write(t.join("victim"), b"victim").unwrap();
        symlink(t.join("victim"), t.join("state.json")).unwrap();

        write_atomic(&t.join("state.json"), b"new").unwrap();

        assert_eq!(fs::read(t.join("victim")).unwrap(), b"victim");
        let meta = fs::symlink_metadata(t.join("state.json")).unwrap();
        assert!(meta.is_file());
        assert_eq!(fs::read(t.join("state.json")).unwrap(), b"new");
    }

    #[test]
    fn failed_rename_keeps_old_file_and_removes_temp() {
        let t = TestDir::new("state-rename-fail");
        // A non-empty directory at the target path makes rename(2) fail.
        fs::create_dir(t.join("state.json")).unwrap();
        fs::write(t.join("state.json/inside"), b"keep").unwrap();

        let err = write_atomic(&t.join("state.json"), b"new").unwrap_err();

        assert_eq!(err.step(), Some(Step::Rename));
        assert!(
            err.to_string()
                .starts_with("failed to rename the temp file over `"),
            "{err}"
        );
        assert!(err.to_string().contains("state.json"), "{err}");
        assert_eq!(sorted_names(&t.0), vec!["state.json"]);
        assert_eq!(fs::read(t.join("state.json/inside")).unwrap(), b"keep");
    }

    #[test]
    fn parent_that_is_a_file_is_a_create_dir_error() {
        let t = TestDir::new("state-parent-file");
        fs::write(t.join("plugins"), b"").unwrap();
        let err = write_atomic(&t.join("plugins/state.json"), b"x").unwrap_err();
        assert_eq!(err.step(), Some(Step::CreateDir));
        let io: io::Error = err.into();
        assert!(io.to_string().contains("plugins/state.json"), "{io}");
    }

    #[test]
    fn state_round_trip() {
        let t = TestDir::new("state-roundtrip");
        let path = t.join("state.json");
        let state = sample_state();
        write_state(&path, &state).unwrap();
        assert_eq!(read_state(&path).unwrap(), Some(state));
        let on_disk: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(on_disk["runtime_data"], json!({"jobs": 3}));
        assert_eq!(on_disk["last_activity"], "2026-11-27T22:30:45.123Z");
    }

    #[test]
    fn read_state_missing_is_none() {
        let t = TestDir::new("state-missing");
        assert_eq!(read_state(&t.join("state.json")).unwrap(), None);
    }

    #[test]
    fn read_state_invalid_is_an_error_naming_the_file() {
        let t = TestDir::new("state-invalid");
        let path = t.join("state.json");
        for content in [&b""[..], b"{\"plugin_id\": 1", b"{\"plugin_id\": \"x\"}"] {
            fs::write(&path, content).unwrap();
            let err = read_state(&path).unwrap_err();
            assert!(matches!(err, StateError::Invalid { .. }), "{err:?}");
            assert!(err.to_string().contains("state.json"), "{err}");
        }
    }

    #[test]
    fn set_aside_keeps_every_unusable_copy() {
        let t = TestDir::new("state-aside");
        let path = t.join("state.json");
        fs::write(&path, b"{broken").unwrap();
        let first = set_aside(&path).unwrap();
        fs::write(&path, b"{broken again").unwrap();
        let second = set_aside(&path).unwrap();
        assert_ne!(first, second);
        assert!(!path.exists());
        assert_eq!(fs::read(&first).unwrap(), b"{broken");
        assert_eq!(fs::read(&second).unwrap(), b"{broken again");
        let name = first.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("state.json.invalid-"), "{name}");
    }

    #[test]
    fn read_state_refuses_symlink() {
        let t = TestDir::new("state-read-symlink");
        write_state(&t.join("real.json"), &sample_state()).unwrap();
        symlink(t.join("real.json"), t.join("state.json")).unwrap();
        let err = read_state(&t.join("state.json")).unwrap_err();
        assert!(matches!(err, StateError::Symlink { .. }), "{err:?}");
    }

    #[test]
    fn runtime_missing_valid_and_invalid() {
        let t = TestDir::new("runtime");
        let path = t.join("runtime.json");
        assert_eq!(read_runtime(&path, 1024), RuntimeRead::Missing);

        fs::write(&path, br#"{"jobs": 3, "queue": [1, 2]}"#).unwrap();
        assert_eq!(
            read_runtime(&path, 1024),
            RuntimeRead::Valid(json!({"jobs": 3, "queue": [1, 2]}))
        );
        fs::write(&path, b"42").unwrap();
        assert_eq!(read_runtime(&path, 1024), RuntimeRead::Valid(json!(42)));

        for content in [&b"{\"jobs\": "[..], b"", b"\xff\xfe", b"{} trailing"] {
            fs::write(&path, content).unwrap();
            match read_runtime(&path, 1024) {
                RuntimeRead::Invalid(reason) => {
                    assert!(reason.contains("runtime.json"), "{reason}")
                }
                other => panic!("{content:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn runtime_too_big() {
        let t = TestDir::new("runtime-big");
        let path = t.join("runtime.json");
        fs::write(&path, format!("\"{}\"", "x".repeat(98))).unwrap();
        assert!(matches!(read_runtime(&path, 100), RuntimeRead::Valid(_)));
        fs::write(&path, format!("\"{}\"", "x".repeat(99))).unwrap();
        assert_eq!(
            read_runtime(&path, 100),
            RuntimeRead::Invalid(format!(
                "`{}` is 101 bytes, over the 100 byte limit",
                path.display()
            ))
        );
    }

    #[test]
    fn runtime_symlink_refused() {
        let t = TestDir::new("runtime-symlink");
        fs::write(t.join("secret"), b"{}").unwrap();
        symlink(t.join("secret"), t.join("runtime.json")).unwrap();
        match read_runtime(&t.join("runtime.json"), 1024) {
            RuntimeRead::Invalid(reason) => assert!(reason.contains("symlink"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_plugin_owned_dir_gets_state_files_it_can_read_and_keeps_foreign_files_out() {
        use std::os::unix::fs::{MetadataExt, chown};
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: chown needs root");
            return;
        }
        let t = TestDir::new("plugin-owned");
        let dir = t.join("p");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&t.0, fs::Permissions::from_mode(0o700)).unwrap();
        chown(&dir, Some(65534), Some(65533)).unwrap();
        let path = dir.join("state.json");
        write_state(&path, &sample_state()).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (65534, 65533),
            "given to the dir's owner"
        );
        assert_eq!(read_state(&path).unwrap(), Some(sample_state()));
        let runtime = dir.join("runtime.json");
        fs::write(&runtime, b"{\"jobs\": 1}").unwrap();
        match read_runtime(&runtime, 1024) {
            RuntimeRead::Invalid(reason) => {
                assert!(
                    reason.contains("belongs to uid 0, not to uid 65534"),
                    "{reason}"
                )
            }
            other => panic!("a root-owned runtime.json in a plugin's dir: {other:?}"),
        }
        chown(&runtime, Some(65534), None).unwrap();
        assert_eq!(
            read_runtime(&runtime, 1024),
            RuntimeRead::Valid(serde_json::json!({"jobs": 1}))
        );
        // Writable by its group: not a directory only its owner controls.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o770)).unwrap();
        assert!(write_state(&path, &sample_state()).is_err());
    }

    #[test]
    fn runtime_fifo_does_not_block() {
        let t = TestDir::new("runtime-fifo");
        let path = t.join("runtime.json");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let result = within_deadline(move || read_runtime(&path, 1024));
        match result {
            RuntimeRead::Invalid(reason) => assert!(reason.contains("a fifo"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn runtime_directory_is_invalid() {
        let t = TestDir::new("runtime-dir");
        fs::create_dir(t.join("runtime.json")).unwrap();
        assert!(matches!(
            read_runtime(&t.join("runtime.json"), 1024),
            RuntimeRead::Invalid(_)
        ));
    }

    #[test]
    fn stale_temps_are_removed() {
        let t = TestDir::new("state-stale");
        fs::write(t.join("state.json"), b"{}").unwrap();
        fs::write(t.join("runtime.json"), b"{}").unwrap();
        fs::write(t.join(".state.json.tmp.123.0"), b"torn").unwrap();
        fs::write(t.join(".runtime.json.tmp.9.9"), b"torn").unwrap();
        assert_eq!(remove_stale_temps(&t.0).unwrap(), 2);
        assert_eq!(sorted_names(&t.0), vec!["runtime.json", "state.json"]);
        assert_eq!(remove_stale_temps(&t.join("missing")).unwrap(), 0);
    }

    #[test]
    fn temp_names_match_the_stale_pattern() {
        let name = temp_name(OsStr::new("state.json"), 42, 7);
        assert_eq!(name, ".state.json.tmp.42.7");
        assert!(is_temp_name(&name));
        assert!(!is_temp_name(OsStr::new("state.json")));
        assert!(!is_temp_name(OsStr::new("notes.tmp.txt")));
    }

    #[test]
    fn remove_if_exists_tolerates_missing() {
        let t = TestDir::new("state-remove");
        fs::write(t.join("state.json"), b"{}").unwrap();
        remove_if_exists(&t.join("state.json")).unwrap();
        remove_if_exists(&t.join("state.json")).unwrap();
        assert!(sorted_names(&t.0).is_empty());
    }
}
