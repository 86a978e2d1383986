//! The instance record: `<runtime_dir>/instances.json`, what a daemon killed without warning
//! (`SIGKILL`, the OOM killer) leaves for the next one, so that the next one can stop every
//! process the dead one's plugins left behind before it starts anything.
//!
//! It is rewritten at the end of each loop turn in which an instance started or ended (once per
//! turn, however many: a thousand plugins reloaded at once cost one write per turn, not two
//! thousand), and removed when the daemon stops cleanly: a record found at start means the
//! previous daemon did not. A process started in a turn that the daemon did not finish is still
//! found by its environment (see `contain.rs`).
//!
//! It is written in place (`pwrite` at offset 0, then `ftruncate`), not by rename: renaming (or
//! truncating to zero) over a file on ext4 makes the kernel flush the new data at once
//! (`auto_da_alloc`), about a millisecond per write. A daemon killed between the two calls
//! leaves the new record followed by a stale tail, and the reader takes the first JSON value;
//! one killed in the middle of a write leaves an unreadable record, and the next daemon then
//! finds leftovers by their environment alone. It is not fsynced: it only matters while the
//! machine stays up, and the page cache outlives any process.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const FILE_NAME: &str = "instances.json";

/// One running (or stopping) instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub plugin: String,
    /// The leader's pid, also its process group and session id.
    pub pid: i32,
    /// The leader's start time (`/proc/<pid>/stat` field 22): a recycled pid has another.
    pub start_ticks: u64,
    /// The leader has been reaped: its group and session numbers may be reused since.
    pub reaped: bool,
    pub cgroup: Option<PathBuf>,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contents {
    /// `/proc/sys/kernel/random/boot_id`: pids and start times mean nothing after a reboot
    /// (a runtime dir that is not on a tmpfs survives one).
    #[serde(default)]
    pub boot_id: String,
    pub daemon_pid: i32,
    pub daemon_start_ticks: u64,
    /// When the file was written, in clock ticks after boot: every process still in the
    /// group or session of an unreaped leader that started before this is that plugin's.
    pub written_ticks: u64,
    /// Instances by sequence number.
    pub instances: BTreeMap<u64, Entry>,
}

/// The record a running daemon keeps up to date.
#[derive(Debug)]
pub struct Record {
    path: PathBuf,
    contents: Contents,
    /// The last write failed: said once, not at every start and stop.
    warned: bool,
    /// Changed since the last write.
    dirty: bool,
    /// Open from the first write on.
    file: Option<fs::File>,
}

impl Record {
    pub fn new(runtime_dir: &Path, daemon_pid: i32, daemon_start_ticks: u64) -> Record {
        Record {
            path: runtime_dir.join(FILE_NAME),
            contents: Contents {
                boot_id: boot_id(),
                daemon_pid,
                daemon_start_ticks,
                written_ticks: 0,
                instances: BTreeMap::new(),
            },
            warned: false,
            dirty: false,
            file: None,
        }
    }

    pub fn insert(&mut self, seq: u64, entry: Entry) {
        self.contents.instances.insert(seq, entry);
        self.dirty = true;
    }

    pub fn mark_reaped(&mut self, seq: u64) {
        if let Some(e) = self.contents.instances.get_mut(&seq) {
            if !e.reaped {
                e.reaped = true;
                self.dirty = true;
            }
        }
    }

    /// The leader's start time, read once the turn that started it is over (reading a process's
    /// stat while it executes its program is slow, and the start must not wait for it).
    pub fn set_start_ticks(&mut self, seq: u64, ticks: u64) {
        if let Some(e) = self.contents.instances.get_mut(&seq) {
            e.start_ticks = ticks;
            self.dirty = true;
        }
    }

    pub fn remove(&mut self, seq: u64) {
        if self.contents.instances.remove(&seq).is_some() {
            self.dirty = true;
        }
    }

    /// Write the record if it changed (end of a loop turn).
    pub fn flush(&mut self) {
        if self.dirty {
            self.save();
        }
    }

    /// Write the record now (at start, before any plugin runs).
    pub fn save(&mut self) {
        self.dirty = false;
        self.contents.written_ticks = super::procs::now_ticks();
        match self.write() {
            Ok(()) => self.warned = false,
            Err(e) if !self.warned => {
                self.warned = true;
                log::warn!(
                    "cannot write {}: {e}; if this daemon is killed, the next one cannot stop \
                     what its plugins leave behind",
                    self.path.display()
                );
            }
            Err(_) => {}
        }
    }

    fn write(&mut self) -> io::Result<()> {
        let bytes = serde_json::to_vec(&self.contents).map_err(io::Error::other)?;
        if self.file.is_none() {
            self.file = Some(
                fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&self.path)?,
            );
        }
        let Some(f) = &self.file else {
            return Ok(());
        };
        f.write_all_at(&bytes, 0)?;
        f.set_len(bytes.len() as u64)
    }

    /// A clean stop: nothing is left to clean up after us.
    pub fn discard(&mut self) {
        self.file = None;
        if let Err(e) = fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// This boot's id (empty if unknown).
pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The record a previous daemon left, if any.
pub fn read(runtime_dir: &Path) -> Result<Option<Contents>, String> {
    let path = runtime_dir.join(FILE_NAME);
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    // The first JSON value: a write cut short between pwrite and ftruncate leaves a stale tail.
    let first = serde_json::Deserializer::from_slice(&text)
        .into_iter::<Contents>()
        .next();
    match first {
        Some(Ok(contents)) => Ok(Some(contents)),
        Some(Err(e)) => Err(format!("{} is not a valid record ({e})", path.display())),
        None => Err(format!("{} is empty", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "hotreload-record-{}-{}",
            std::process::id(),
            super::super::procs::now_ticks()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_record_follows_instances_and_reads_back() {
        let dir = temp_dir();
        let mut r = Record::new(&dir, 42, 7);
        r.save();
        assert_eq!(read(&dir).unwrap().unwrap().instances.len(), 0);
        let entry = |plugin: &str, pid| Entry {
            plugin: plugin.into(),
            pid,
            start_ticks: 99,
            reaped: false,
            cgroup: None,
        };
        r.insert(1, entry("p1", 100));
        r.insert(2, entry("p2", 200));
        r.mark_reaped(1);
        r.set_start_ticks(1, 123);
        r.flush();
        assert_eq!(read(&dir).unwrap().unwrap().instances.len(), 2);
        r.remove(2);
        assert_eq!(
            read(&dir).unwrap().unwrap().instances.len(),
            2,
            "written at the flush"
        );
        r.flush();
        let back = read(&dir).unwrap().unwrap();
        assert_eq!(back.daemon_pid, 42);
        assert_eq!(back.daemon_start_ticks, 7);
        assert_eq!(back.boot_id, boot_id());
        assert!(back.written_ticks > 0);
        let only: Vec<_> = back.instances.values().collect();
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].plugin, "p1");
        assert!(only[0].reaped);
        assert_eq!(only[0].start_ticks, 123);
        // A shorter record over a longer one, cut before the truncate: the first value counts.
        let mut text = fs::read(dir.join(FILE_NAME)).unwrap();
        text.extend_from_slice(b"ances\":{}}");
        fs::write(dir.join(FILE_NAME), &text).unwrap();
        assert_eq!(read(&dir).unwrap().unwrap().instances.len(), 1);
        r.discard();
        assert_eq!(read(&dir).unwrap(), None);
        fs::write(dir.join(FILE_NAME), b"{not json").unwrap();
        assert!(read(&dir).unwrap_err().contains("not a valid record"));
        let _ = fs::remove_dir_all(&dir);
    }
}
