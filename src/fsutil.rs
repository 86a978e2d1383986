//! File-system steps shared by the modules that replace files atomically: snapshots
//! (`snapshot`), state files (`state_file`) and `hotreloadctl install` (`ctl::install`).
//!
//! Each of them writes a private temp file next to its target, renames it into place and, where
//! durability matters, fsyncs the directory; each also cleans up leftover temps. The steps below
//! are the parts that must behave the same everywhere (exclusive, owner-only creation that never
//! goes through a symlink; a private directory created 0700, or verified before it is used; a
//! missing file or directory counting as already clean), kept in one place so a fix to one of
//! them reaches every caller. What a caller names its temps, and which errors it reports in which
//! words, stays with the caller.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::private_dir;

/// How many temp names to try before giving up on a directory full of leftovers.
const TEMP_NAME_ATTEMPTS: u32 = 64;

/// Distinguishes temp files created by this process (the pid distinguishes processes).
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Create `dir` and any missing parents with mode 0700; an existing `dir` is used only when it
/// is a real directory of ours that nobody else may write into (SPEC §2), else the error (kind
/// `PermissionDenied`) carries a [`private_dir::UnsafeDir`] naming `role` ("snapshot directory").
pub(crate) fn create_private_dir_for(role: &'static str, dir: &Path) -> io::Result<()> {
    match private_dir::ensure(dir, private_dir::Sharing::OwnerOnly)? {
        Ok(()) => Ok(()),
        Err(problem) => Err(private_dir::UnsafeDir::new(role, dir, problem).into_io()),
    }
}

/// [`create_private_dir_for`] a directory with no more specific name.
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    create_private_dir_for("private directory", dir)
}

/// The directory holding `path` ("." for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Create `path` for writing: exclusive (`O_EXCL`), never through a symlink, mode 0600.
pub(crate) fn create_private_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Create a fresh temp file in `dir` that nobody else can have opened, named by `name(pid, n)`
/// with `n` counting up in this process; returns its path and the open file.
pub(crate) fn create_temp(
    dir: &Path,
    name: impl Fn(u32, u64) -> OsString,
) -> io::Result<(PathBuf, File)> {
    at_fresh_temp_name(dir, name, create_private_file)
}

/// Give the unnamed `file` (`sys::fs::create_unnamed`, made in `dir`) a fresh temp name in
/// `dir`, `name(pid, n)` as [`create_temp`] names them: a name that exists (even a planted
/// symlink: a link never follows its target name) is skipped. Its path.
pub(crate) fn link_as_temp(
    file: &File,
    dir: &Path,
    name: impl Fn(u32, u64) -> OsString,
) -> io::Result<PathBuf> {
    at_fresh_temp_name(dir, name, |path| crate::sys::fs::link_unnamed(file, path))
        .map(|(path, ())| path)
}

/// `make` the first of the names `name(pid, n)` in `dir` that does not exist yet (EEXIST: a
/// leftover from an earlier process with the same pid, or something planted; try the next).
fn at_fresh_temp_name<T>(
    dir: &Path,
    name: impl Fn(u32, u64) -> OsString,
    mut make: impl FnMut(&Path) -> io::Result<T>,
) -> io::Result<(PathBuf, T)> {
    let pid = std::process::id();
    let mut last_error = None;
    for _ in 0..TEMP_NAME_ATTEMPTS {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(name(pid, n));
        match make(&path) {
            Ok(made) => return Ok((path, made)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_error = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_error.unwrap_or_else(|| io::Error::other("no temp name available")))
}

/// fsync a directory so a rename inside it is durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)?
        .sync_all()
}

/// Remove `path`; `Ok(false)` when it was already gone.
pub(crate) fn remove_file_if_exists(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// What [`remove_files_in`] says when it fails, each followed by the path: "cannot list …",
/// "cannot remove stale temp file …".
pub(crate) struct RemovalWords {
    pub(crate) listing: &'static str,
    pub(crate) removing: &'static str,
}

/// Remove every file in `dir` whose name `doomed` picks, leaving subdirectories alone; returns
/// how many were removed. A missing `dir` has none, and a file that vanishes meanwhile is skipped.
pub(crate) fn remove_files_in(
    dir: &Path,
    doomed: impl Fn(&OsStr) -> bool,
    words: &RemovalWords,
) -> io::Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(with_path(e, words.listing, dir)),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|e| with_path(e, words.listing, dir))?;
        if !doomed(&entry.file_name()) {
            continue;
        }
        let path = entry.path();
        let is_dir = entry
            .file_type()
            .map_err(|e| with_path(e, "cannot stat", &path))?
            .is_dir();
        if is_dir {
            continue;
        }
        if remove_file_if_exists(&path).map_err(|e| with_path(e, words.removing, &path))? {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Prefix an I/O error with what was being done and the path, keeping its kind.
pub(crate) fn with_path(e: io::Error, doing: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{doing} `{}`: {e}", path.display()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::snapshot::tests::TestDir;
    use std::os::unix::fs::{PermissionsExt, symlink};

    /// The names in `dir`, sorted: what a test expects to be left there.
    pub(crate) fn sorted_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn parent_dir_of_a_bare_name_is_the_current_directory() {
        assert_eq!(parent_dir(Path::new("state.json")), Path::new("."));
        assert_eq!(parent_dir(Path::new("/a/b")), Path::new("/a"));
    }

    #[test]
    fn temps_are_private_and_never_reuse_a_name() {
        let t = TestDir::new("fsutil-temp");
        let name = |pid: u32, n: u64| OsString::from(format!(".t.{pid}.{n}"));
        let (a, _) = create_temp(&t.0, name).unwrap();
        let (b, _) = create_temp(&t.0, name).unwrap();
        assert_ne!(a, b);
        let mode = fs::metadata(&a).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_private_file_is_not_created_through_a_symlink() {
        let t = TestDir::new("fsutil-symlink");
        symlink(t.join("target"), t.join("link")).unwrap();
        let err = create_private_file(&t.join("link")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(!t.join("target").exists());
    }

    #[test]
    fn remove_files_in_counts_what_it_removed_and_keeps_directories() {
        let t = TestDir::new("fsutil-remove");
        for name in ["drop-1", "drop-2", "keep"] {
            fs::write(t.join(name), b"").unwrap();
        }
        fs::create_dir(t.join("drop-dir")).unwrap();
        let words = RemovalWords {
            listing: "cannot list",
            removing: "cannot remove",
        };
        let doomed = |name: &OsStr| name.as_encoded_bytes().starts_with(b"drop");
        assert_eq!(remove_files_in(&t.0, doomed, &words).unwrap(), 2);
        assert_eq!(sorted_names(&t.0), vec!["drop-dir", "keep"]);
        assert_eq!(
            remove_files_in(&t.join("missing"), doomed, &words).unwrap(),
            0
        );
        assert!(!remove_file_if_exists(&t.join("drop-1")).unwrap());
    }
}
