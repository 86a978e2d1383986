//! Reading processes from `/proc`: who a process is (its stat line), whose children it has, and
//! what its environment says. Used to find every process of a plugin where there are no cgroups.
//!
//! Everything here tolerates processes vanishing between two reads: a process that exits while
//! it is being looked at is simply not there.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

/// The parts of `/proc/<pid>/stat` containment needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub pid: i32,
    pub state: u8,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// Field 22, clock ticks after boot: with the pid, it names one process for good (a pid
    /// that is reused gets a later start time).
    pub start_ticks: u64,
}

impl Stat {
    /// A zombie (or dead) process has exited; it only waits to be reaped.
    pub fn exited(&self) -> bool {
        matches!(self.state, b'Z' | b'X' | b'x')
    }
}

/// Parse a stat line. The command name (field 2) may hold spaces and parentheses, so the fields
/// are counted from its last `)`.
pub fn parse_stat(line: &str) -> Option<Stat> {
    let (head, rest) = line.rsplit_once(')')?;
    let pid = head.split_once(" (")?.0.trim().parse().ok()?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); field N is f[N - 3].
    Some(Stat {
        pid,
        state: *f.first()?.as_bytes().first()?,
        ppid: f.get(1)?.parse().ok()?,
        pgid: f.get(2)?.parse().ok()?,
        sid: f.get(3)?.parse().ok()?,
        start_ticks: f.get(19)?.parse().ok()?,
    })
}

pub fn stat(pid: i32) -> Option<Stat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// True while `pid` is the process that started at `start_ticks` and has not exited.
pub fn is_running(pid: i32, start_ticks: u64) -> bool {
    stat(pid).is_some_and(|s| s.start_ticks == start_ticks && !s.exited())
}

/// Every pid in `/proc`.
pub fn all_pids() -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Every process's stat, for when `children` files are not available.
pub fn all_stats() -> Vec<Stat> {
    all_pids().into_iter().filter_map(stat).collect()
}

/// Direct children of `pid` (of all its threads), from `/proc/<pid>/task/*/children`
/// (`CONFIG_PROC_CHILDREN`). None when the kernel does not provide those files.
pub fn children(pid: i32) -> Option<Vec<i32>> {
    if !children_files_supported() {
        return None;
    }
    if thread_count(pid) == Some(1) {
        // A single thread (the common plugin): its one `children` file, without listing the
        // task dir (three system calls fewer on the way to a reload's stop signal). A thread
        // started after this look is missed as one started after a listing would be.
        let file = format!("/proc/{pid}/task/{pid}/children");
        return Some(read_children(Path::new(&file)).unwrap_or_default());
    }
    let mut out = Vec::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Some(out);
    };
    for task in tasks.filter_map(Result::ok) {
        if let Some(pids) = read_children(&task.path().join("children")) {
            out.extend(pids);
        }
    }
    Some(out)
}

/// The threads of `pid`: the link count of `/proc/<pid>/task` is 2 plus their number.
fn thread_count(pid: i32) -> Option<u64> {
    let links = fs::metadata(format!("/proc/{pid}/task")).ok()?.nlink();
    links.checked_sub(2)
}

/// A `children` file in as few read(2) calls as possible: each call makes the kernel walk the
/// list from its start to the read position again, so small reads of a long list (the daemon
/// with a thousand plugins) cost quadratic time.
fn read_children(path: &Path) -> Option<Vec<i32>> {
    read_children_of(&fs::File::open(path).ok()?)
}

/// [`read_children`] of an open `children` file, from its start: a read at offset 0 makes the
/// kernel list the children afresh, so one descriptor serves every look.
fn read_children_of(file: &fs::File) -> Option<Vec<i32>> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match file.read_at(&mut buf[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    }
    let text = std::str::from_utf8(&buf[..len]).ok()?;
    Some(
        text.split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect(),
    )
}

/// The daemon's own children, from its main thread's `children` file alone: every fork of the
/// daemon happens on its main thread (one event loop), and orphans are re-parented to that
/// thread too (the kernel picks the subreaper's first live thread: its main thread, which lives
/// as long as the daemon; the snapshot helpers never fork). One
/// file read instead of a directory listing per look: this is on a reload's critical path.
pub fn own_children(me: i32) -> Option<Vec<i32>> {
    if !children_files_supported() {
        return None;
    }
    // Opened once (a reload looks twice: at the stop signal and at the reap).
    static OWN: std::sync::OnceLock<Option<(i32, fs::File)>> = std::sync::OnceLock::new();
    let own = OWN.get_or_init(|| {
        let pid = crate::sys::process::pid();
        let file = fs::File::open(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        Some((pid, file))
    });
    match own {
        Some((pid, file)) if *pid == me => read_children_of(file),
        _ => read_children(Path::new(&format!("/proc/{me}/task/{me}/children"))),
    }
}

fn children_files_supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let me = crate::sys::process::pid();
        Path::new(&format!("/proc/{me}/task/{me}/children")).exists()
    })
}

/// Where descendants are looked up: the kernel's children lists, or a parent map built from one
/// pass over `/proc` when the kernel has none.
pub enum Tree {
    Children,
    ParentMap(HashMap<i32, Vec<i32>>),
}

impl Tree {
    pub fn new() -> Tree {
        if children_files_supported() {
            Tree::Children
        } else {
            let mut map: HashMap<i32, Vec<i32>> = HashMap::new();
            for s in all_stats() {
                map.entry(s.ppid).or_default().push(s.pid);
            }
            Tree::ParentMap(map)
        }
    }

    pub fn children(&self, pid: i32) -> Vec<i32> {
        match self {
            Tree::Children => children(pid).unwrap_or_default(),
            Tree::ParentMap(map) => map.get(&pid).cloned().unwrap_or_default(),
        }
    }

    /// `roots` and all their descendants (each once).
    pub fn subtree(&self, roots: &[i32]) -> Vec<i32> {
        let mut out: Vec<i32> = Vec::new();
        let mut todo: Vec<i32> = roots.to_vec();
        while let Some(pid) = todo.pop() {
            if out.contains(&pid) {
                continue;
            }
            out.push(pid);
            todo.extend(self.children(pid));
        }
        out
    }
}

/// The value of variable `name` in `/proc/<pid>/environ` (the environment the process was
/// executed with). None when unreadable (gone, or another user's without privilege) or absent.
pub fn environ_var(pid: i32, name: &str) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    fs::File::open(format!("/proc/{pid}/environ"))
        .ok()?
        .read_to_end(&mut buf)
        .ok()?;
    find_var(&buf, name).map(<[u8]>::to_vec)
}

/// `name`'s value in a NUL-separated `NAME=value` block.
pub fn find_var<'a>(block: &'a [u8], name: &str) -> Option<&'a [u8]> {
    block.split(|&b| b == 0).find_map(|entry| {
        entry
            .strip_prefix(name.as_bytes())
            .and_then(|rest| rest.strip_prefix(b"="))
    })
}

/// Which plugin of the daemon whose per-plugin state lives in `plugins_state` a process belongs
/// to, by its `HOTRELOAD_STATE_FILE` (`<plugins_state>/<id>/state.json`). Only an exact match
/// counts, so a daemon with another state dir never claims our processes, nor we theirs.
pub fn plugin_of(state_file: &[u8], plugins_state: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let rest = state_file.strip_prefix(plugins_state.as_os_str().as_bytes())?;
    let rest = rest.strip_prefix(b"/")?;
    let id = rest.strip_suffix(b"/state.json")?;
    let id = std::str::from_utf8(id).ok()?;
    crate::config::valid_plugin_id(id).then(|| id.to_string())
}

/// Clock ticks since boot now, in the unit of `Stat::start_ticks` (rounded down).
pub fn now_ticks() -> u64 {
    crate::sys::process::boottime_ticks()
}

/// Send `sig` to `pid`; false when it could not be sent (gone, or not ours to signal).
pub fn signal(pid: i32, sig: libc::c_int) -> bool {
    if pid <= 1 {
        return false;
    }
    crate::sys::process::kill(pid, sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        let line = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 \
                    987654 1000 100 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!(
            s,
            Stat {
                pid: 4242,
                state: b'S',
                ppid: 1,
                pgid: 4242,
                sid: 4242,
                start_ticks: 987654
            }
        );
        assert!(!s.exited());
        assert!(parse_stat("12 (x) Z 1 2 3").is_none(), "truncated line");
        let z = parse_stat(&line.replace(") S ", ") Z ")).unwrap();
        assert!(z.exited());
    }

    #[test]
    fn own_stat_is_read_and_matches_our_start_time() {
        let me = std::process::id() as i32;
        let s = stat(me).unwrap();
        assert_eq!(s.pid, me);
        assert!(is_running(me, s.start_ticks));
        assert!(!is_running(me, s.start_ticks + 1));
        assert!(s.start_ticks <= now_ticks());
    }

    #[test]
    fn environment_variables_are_found_exactly() {
        let block =
            b"A=1\0HOTRELOAD_STATE_FILE_X=no\0HOTRELOAD_STATE_FILE=/s/plugins/p1/state.json\0";
        assert_eq!(
            find_var(block, "HOTRELOAD_STATE_FILE"),
            Some(&b"/s/plugins/p1/state.json"[..])
        );
        assert_eq!(find_var(block, "A"), Some(&b"1"[..]));
        assert_eq!(find_var(block, "B"), None);
    }

    #[test]
    fn a_state_file_names_its_plugin_only_under_our_state_dir() {
        let ours = Path::new("/var/lib/hotreload/state/plugins");
        let of = |s: &str| plugin_of(s.as_bytes(), ours);
        assert_eq!(
            of("/var/lib/hotreload/state/plugins/p1/state.json").as_deref(),
            Some("p1")
        );
        assert_eq!(of("/var/lib/hotreload/state/plugins2/p1/state.json"), None);
        assert_eq!(of("/var/lib/hotreload/state/plugins/a/b/state.json"), None);
        assert_eq!(of("/var/lib/hotreload/state/plugins/p1/runtime.json"), None);
        assert_eq!(of("/other/plugins/p1/state.json"), None);
        assert_eq!(of("/var/lib/hotreload/state/plugins/.x/state.json"), None);
    }

    #[test]
    fn a_child_is_found_in_the_subtree_and_by_its_environment() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env("HRTEST_MARK", "yes")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let me = std::process::id() as i32;
        // A `children` list read while other test threads' children exit may skip an entry
        // (proc(5): the list is not a consistent snapshot), which the daemon covers by looking
        // again each kill round; so look again here until a deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut found = Tree::new().subtree(&[me]);
        while !found.contains(&pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
            found = Tree::new().subtree(&[me]);
        }
        // `spawn` returns once the child's close-on-exec pipe closes, which is before the kernel
        // has set up the new program's environment: until then `environ` reads empty.
        let mut env = environ_var(pid, "HRTEST_MARK");
        while env.is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
            env = environ_var(pid, "HRTEST_MARK");
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(found.contains(&pid), "{pid} in {found:?}");
        assert_eq!(env.as_deref(), Some(&b"yes"[..]));
    }

    /// The children of a single-threaded process (read without listing its task dir) and of a
    /// process that forked from a second thread (read from every thread's file).
    #[test]
    fn children_are_found_with_one_thread_and_with_several() {
        let shell = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & echo started; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut shell = shell;
        let mut line = String::new();
        let stdout = shell.stdout.take().unwrap();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        let sh = shell.id() as i32;
        assert_eq!(thread_count(sh), Some(1));
        let sleeps = children(sh).unwrap();
        let all_sleep = sleeps
            .iter()
            .all(|&pid| stat(pid).is_some_and(|s| s.ppid == sh));
        assert!(
            sleeps.len() == 2 && all_sleep,
            "two sleeps below {sh}: {sleeps:?}"
        );
        for pid in sleeps {
            signal(pid, libc::SIGKILL);
        }
        let _ = shell.wait();

        // This test process has several threads (the harness's and this one); a child forked
        // from a thread of its own is listed in that thread's file only.
        let forked = std::thread::spawn(|| {
            std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .unwrap()
        })
        .join()
        .unwrap();
        let mut forked = forked;
        let me = std::process::id() as i32;
        assert!(thread_count(me).is_some_and(|n| n > 1));
        let mine = children(me).unwrap();
        let _ = forked.kill();
        let _ = forked.wait();
        assert!(
            mine.contains(&(forked.id() as i32)),
            "{} in {mine:?}",
            forked.id()
        );
    }

    #[test]
    fn a_children_file_kept_open_lists_the_children_of_the_moment_each_time() {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let me = std::process::id();
        let file = fs::File::open(format!("/proc/{me}/task/{tid}/children")).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let while_alive = read_children_of(&file).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        let after_reap = read_children_of(&file).unwrap();
        assert!(while_alive.contains(&pid), "{pid} in {while_alive:?}");
        assert!(!after_reap.contains(&pid), "{pid} gone from {after_reap:?}");
    }
}
