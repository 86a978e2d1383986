//! Polling: the watcher's stand-in where inotify cannot serve (SPEC §5 "Watching beyond
//! inotify"): `watch_mode = "poll"`, or under `auto` a directory on a file system whose remote
//! changes inotify cannot see, or one added after the inotify watch limit was reached.
//!
//! A polled directory is listed every `poll_interval_ms` and each entry's name, inode, size,
//! mtime and ctime compared with the previous listing. The comparison ([`compare`]) is pure:
//! two snapshots in, differences out, no clock, so it is unit-tested without sleeping. A new or
//! rewritten file is only reported once its size and mtime are the same in two listings in a
//! row: a file still being written is never started. The watcher turns the differences into the
//! same `Change`s inotify events become, so a change takes one path to a reload either way.
//!
//! The poller owns no timer: the daemon keeps one deadline for all polled directories, and none
//! at all while nothing is polled (an idle daemon never wakes up).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What an entry is, from `lstat` (a symlink is not followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

/// The attributes compared between two listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

/// One listing of a directory, by name.
pub type Snapshot = BTreeMap<OsString, Entry>;

/// Files seen new or rewritten, waiting to be seen unchanged once more: name → (size, mtime).
pub type Unsettled = BTreeMap<OsString, (u64, i128)>;

/// A difference between two listings, in inotify's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Diff {
    /// A name that is not a regular file appeared, or was replaced (inode changed): a directory,
    /// a symlink (never written, so it counts at once, like its IN_CREATE).
    Appeared(OsString, Kind),
    /// A name left the directory (files too: the watcher decides what that means).
    Vanished(OsString, Kind),
    /// A regular file is new or rewritten and has settled (like IN_CLOSE_WRITE / IN_MOVED_TO).
    Written(OsString),
    /// Only a regular file's ctime changed (like IN_ATTRIB: `chmod +x`).
    Attrib(OsString),
}

/// Compare two listings of one directory. `unsettled` carries files across calls: a file new or
/// rewritten in `new` is recorded there and reported as [`Diff::Written`] by the next call that
/// finds it with the same size and mtime.
pub fn compare(old: &Snapshot, new: &Snapshot, unsettled: &mut Unsettled) -> Vec<Diff> {
    let mut out = Vec::new();
    // Files waiting to settle: still the same → written; changed → wait again; gone → forget.
    unsettled.retain(|name, seen| match new.get(name) {
        Some(e) if e.kind == Kind::File => {
            if *seen == (e.size, e.mtime_ns) {
                out.push(Diff::Written(name.clone()));
                false
            } else {
                *seen = (e.size, e.mtime_ns);
                true
            }
        }
        _ => false,
    });
    for (name, e) in new {
        let before = old.get(name);
        let replaced = before.is_some_and(|b| b.kind != e.kind || b.ino != e.ino);
        if let Some(b) = before.filter(|_| replaced) {
            if b.kind != e.kind {
                out.push(Diff::Vanished(name.clone(), b.kind));
            }
        }
        match (e.kind, before) {
            (Kind::File, Some(b)) if !replaced => {
                if (b.size, b.mtime_ns) != (e.size, e.mtime_ns) {
                    unsettled.insert(name.clone(), (e.size, e.mtime_ns));
                } else if b.ctime_ns != e.ctime_ns && !unsettled.contains_key(name) {
                    out.push(Diff::Attrib(name.clone()));
                }
            }
            (Kind::File, _) => {
                unsettled.insert(name.clone(), (e.size, e.mtime_ns));
            }
            (Kind::Symlink, Some(b)) if !replaced && b.mtime_ns != e.mtime_ns => {
                out.push(Diff::Appeared(name.clone(), e.kind));
            }
            (_, Some(_)) if !replaced => {}
            _ => out.push(Diff::Appeared(name.clone(), e.kind)),
        }
    }
    for (name, b) in old {
        if !new.contains_key(name) {
            out.push(Diff::Vanished(name.clone(), b.kind));
        }
    }
    out
}

/// List `dir` (entries' own attributes; symlinks not followed).
pub fn snapshot(dir: &Path) -> io::Result<Snapshot> {
    let mut snap = Snapshot::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        // Gone between the listing and the lstat: it is simply not there.
        let Ok(m) = entry.metadata() else { continue };
        let t = m.file_type();
        let kind = if t.is_file() {
            Kind::File
        } else if t.is_dir() {
            Kind::Dir
        } else if t.is_symlink() {
            Kind::Symlink
        } else {
            Kind::Other
        };
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        snap.insert(
            entry.file_name(),
            Entry {
                kind,
                ino: m.ino(),
                size: m.size(),
                mtime_ns: ns(m.mtime(), m.mtime_nsec()),
                ctime_ns: ns(m.ctime(), m.ctime_nsec()),
            },
        );
    }
    Ok(snap)
}

/// Whose directory a polled directory is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollOwner {
    /// The plugins dir.
    Root,
    /// A plugin's directory (`rel` empty) or one of its subdirectories (`rel` relative to it).
    Plugin { id: String, rel: PathBuf },
}

#[derive(Debug)]
struct PolledDir {
    owner: PollOwner,
    last: Snapshot,
    unsettled: Unsettled,
}

/// What one round found in one directory.
#[derive(Debug)]
pub struct Found {
    pub dir: PathBuf,
    pub owner: PollOwner,
    /// The differences, or why the directory could not be listed (it is gone, most likely).
    pub diffs: io::Result<Vec<Diff>>,
}

/// The polled directories.
#[derive(Debug, Default)]
pub struct Poller {
    dirs: BTreeMap<PathBuf, PolledDir>,
}

impl Poller {
    /// Poll `dir` from now on. With `baseline`, what is there now is the reference (only later
    /// changes count); without, everything in it counts as new (a subdirectory that just
    /// appeared: its files were written before anyone looked).
    pub fn add(&mut self, dir: &Path, owner: PollOwner, baseline: bool) {
        let last = if baseline {
            snapshot(dir).unwrap_or_default()
        } else {
            Snapshot::new()
        };
        self.dirs.insert(
            dir.to_path_buf(),
            PolledDir {
                owner,
                last,
                unsettled: Unsettled::new(),
            },
        );
    }

    /// Stop polling `dir` and every polled directory below it.
    pub fn remove_tree(&mut self, dir: &Path) {
        self.dirs.retain(|d, _| !d.starts_with(dir));
    }

    /// Stop polling every directory of plugin `id`.
    pub fn remove_plugin(&mut self, id: &str) {
        self.dirs
            .retain(|_, d| !matches!(&d.owner, PollOwner::Plugin { id: i, .. } if i == id));
    }

    pub fn remove_root(&mut self) {
        self.dirs.retain(|_, d| d.owner != PollOwner::Root);
    }

    pub fn contains(&self, dir: &Path) -> bool {
        self.dirs.contains_key(dir)
    }

    /// Number of polled directories (plugins dir, plugin dirs and subdirectories).
    pub fn len(&self) -> usize {
        self.dirs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }

    /// Whether some file was seen new or rewritten and waits for its confirming listing.
    pub fn settling(&self) -> bool {
        self.dirs.values().any(|d| !d.unsettled.is_empty())
    }

    /// Number of polled subdirectories of plugin dirs.
    pub fn subdirs(&self) -> usize {
        self.dirs
            .values()
            .filter(|d| matches!(&d.owner, PollOwner::Plugin { rel, .. } if !rel.as_os_str().is_empty()))
            .count()
    }

    /// Number of polled subdirectories of plugin `id`.
    pub fn subdirs_of(&self, id: &str) -> usize {
        self.dirs
            .values()
            .filter(|d| matches!(&d.owner, PollOwner::Plugin { id: i, rel } if i == id && !rel.as_os_str().is_empty()))
            .count()
    }

    /// List every polled directory once and compare it with its previous listing.
    pub fn round(&mut self) -> Vec<Found> {
        let mut found = Vec::new();
        for (dir, polled) in &mut self.dirs {
            let diffs = snapshot(dir).map(|now| {
                let diffs = compare(&polled.last, &now, &mut polled.unsettled);
                polled.last = now;
                diffs
            });
            let quiet = diffs.as_ref().is_ok_and(Vec::is_empty);
            if !quiet {
                found.push(Found {
                    dir: dir.clone(),
                    owner: polled.owner.clone(),
                    diffs,
                });
            }
        }
        found
    }
}

/// statfs f_type magic numbers of file systems whose changes made elsewhere (another NFS client,
/// the host of a 9p or virtiofs share, the far end of sshfs) produce no inotify event here.
const REMOTE_FS: &[(i64, &str)] = &[
    (0x6969, "NFS"),
    (0x517B, "SMB"),
    (0xFF53_4D42, "CIFS"),
    (0xFE53_4D42, "SMB2"),
    (0x0102_1997, "9p"),
    (0x6573_5546, "FUSE (sshfs, virtiofs, ...)"),
    (0x5346_414F, "AFS"),
    (0x6B41_4653, "AFS (kAFS)"),
    (0x00C3_6400, "Ceph"),
    (0x0BD0_0BD0, "Lustre"),
    (0x4730_4653, "GPFS"),
    (0x0133_3C00, "CODA"),
];

/// The name of the remote file system `dir` is on, or None for a local one (or when `statfs`
/// fails: inotify is then tried, and says what is wrong).
pub fn remote_fs(dir: &Path) -> Option<&'static str> {
    fs_name(crate::sys::fs::fs_type(dir).ok()?)
}

fn fs_name(magic: i64) -> Option<&'static str> {
    REMOTE_FS
        .iter()
        .find(|(m, _)| *m == magic)
        .map(|(_, name)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(ino: u64, size: u64, mtime: i128) -> Entry {
        Entry {
            kind: Kind::File,
            ino,
            size,
            mtime_ns: mtime,
            ctime_ns: mtime,
        }
    }

    fn dir(ino: u64) -> Entry {
        Entry {
            kind: Kind::Dir,
            ino,
            size: 4096,
            mtime_ns: 0,
            ctime_ns: 0,
        }
    }

    fn snap(entries: &[(&str, Entry)]) -> Snapshot {
        entries
            .iter()
            .map(|(n, e)| (OsString::from(n), *e))
            .collect()
    }

    fn name(n: &str) -> OsString {
        OsString::from(n)
    }

    #[test]
    fn a_new_file_counts_once_it_is_unchanged_in_the_next_listing() {
        let mut u = Unsettled::new();
        let empty = snap(&[]);
        let one = snap(&[("p", file(1, 10, 100))]);
        assert_eq!(compare(&empty, &one, &mut u), vec![]);
        assert_eq!(compare(&one, &one, &mut u), vec![Diff::Written(name("p"))]);
        assert_eq!(compare(&one, &one, &mut u), vec![], "reported once");
    }

    #[test]
    fn a_file_still_growing_is_not_reported_until_it_settles() {
        let mut u = Unsettled::new();
        let a = snap(&[("p", file(1, 10, 100))]);
        let half = snap(&[("p", file(1, 20, 200))]);
        let full = snap(&[("p", file(1, 40, 300))]);
        assert_eq!(compare(&a, &half, &mut u), vec![]);
        assert_eq!(compare(&half, &full, &mut u), vec![], "grew again: wait");
        assert_eq!(
            compare(&full, &full, &mut u),
            vec![Diff::Written(name("p"))]
        );
    }

    #[test]
    fn a_rename_over_counts_like_a_write_and_a_chmod_like_attrib() {
        let mut u = Unsettled::new();
        let a = snap(&[("p", file(1, 10, 100))]);
        let replaced = snap(&[("p", file(2, 10, 100))]);
        assert_eq!(compare(&a, &replaced, &mut u), vec![]);
        assert_eq!(
            compare(&replaced, &replaced, &mut u),
            vec![Diff::Written(name("p"))]
        );
        let mut chmod = replaced.clone();
        chmod.get_mut(&name("p")).unwrap().ctime_ns = 555;
        assert_eq!(
            compare(&replaced, &chmod, &mut u),
            vec![Diff::Attrib(name("p"))]
        );
    }

    #[test]
    fn directories_appear_vanish_and_a_replaced_one_appears_again() {
        let mut u = Unsettled::new();
        let none = snap(&[]);
        let d = snap(&[("a", dir(7))]);
        let swapped = snap(&[("a", dir(8))]);
        assert_eq!(
            compare(&none, &d, &mut u),
            vec![Diff::Appeared(name("a"), Kind::Dir)]
        );
        assert_eq!(compare(&d, &d, &mut u), vec![]);
        assert_eq!(
            compare(&d, &swapped, &mut u),
            vec![Diff::Appeared(name("a"), Kind::Dir)],
            "a swap is one arrival, not a removal first"
        );
        assert_eq!(
            compare(&swapped, &none, &mut u),
            vec![Diff::Vanished(name("a"), Kind::Dir)]
        );
    }

    #[test]
    fn a_file_removed_before_it_settled_is_forgotten() {
        let mut u = Unsettled::new();
        let none = snap(&[]);
        let one = snap(&[("p", file(1, 10, 100))]);
        assert_eq!(compare(&none, &one, &mut u), vec![]);
        assert_eq!(
            compare(&one, &none, &mut u),
            vec![Diff::Vanished(name("p"), Kind::File)]
        );
        assert!(u.is_empty());
    }

    #[test]
    fn remote_file_systems_are_recognised_by_magic() {
        assert_eq!(fs_name(0x6969), Some("NFS"));
        assert_eq!(fs_name(0x0102_1997), Some("9p"));
        assert_eq!(fs_name(0xEF53), None, "ext4 is local");
        assert_eq!(fs_name(0x0102_1994), None, "tmpfs is local");
    }
}
