//! cgroup v2: one cgroup per plugin instance, below the cgroup the service manager delegated to
//! the daemon (`Delegate=yes`), so that no process a plugin starts can leave it and a stop can
//! end all of them at once with `cgroup.kill`.
//!
//! The daemon only ever writes below its own cgroup, and only when that cgroup is marked as
//! delegated to it (systemd sets the `trusted.delegate` or `user.delegate` extended attribute on
//! a delegated cgroup). cgroup v2 forbids processes in a cgroup whose children get controllers
//! (the "no internal processes" rule), so the daemon first moves itself into a leaf,
//! `<own>/supervisor`, and its plugins run in siblings, `<own>/plugin-<id>-<seq>`.

use std::fs;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The leaf the daemon moves itself into.
const SUPERVISOR: &str = "supervisor";
/// Prefix of every instance cgroup's name.
const PREFIX: &str = "plugin-";

/// The daemon's delegated cgroup subtree.
#[derive(Debug)]
pub struct Cgroups {
    own: PathBuf,
    memory: bool,
    cpu: bool,
}

impl Cgroups {
    /// The daemon's own cgroup if it is a delegated cgroup v2 directory it may write to; else
    /// why not, for the log.
    pub fn detect() -> Result<Cgroups, String> {
        let self_cgroup = fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let path = unified_path(&self_cgroup).ok_or("no cgroup v2 hierarchy")?;
        if path == "/" {
            return Err("the daemon runs in the root cgroup (not delegated)".into());
        }
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let own = locate(&mountinfo, &path)
            .ok_or_else(|| format!("cgroup {path} is not below a mounted cgroup2 file system"))?;
        if !is_delegated(&own) {
            return Err(format!(
                "cgroup {} is not delegated to the daemon (run it from a unit with Delegate=yes)",
                own.display()
            ));
        }
        Ok(Cgroups {
            own,
            memory: false,
            cpu: false,
        })
    }

    pub fn own(&self) -> &Path {
        &self.own
    }

    /// Move the daemon into its leaf and give instance cgroups the memory and cpu controllers
    /// when they were delegated too (the figures of `list` come from them).
    pub fn setup(&mut self) -> io::Result<()> {
        let leaf = self.own.join(SUPERVISOR);
        match fs::create_dir(&leaf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(annotate(e, &leaf)),
        }
        write_file(&leaf.join("cgroup.procs"), b"0")?;
        let available = fs::read_to_string(self.own.join("cgroup.controllers")).unwrap_or_default();
        for name in ["memory", "cpu"] {
            if available.split_whitespace().any(|c| c == name) {
                let line = format!("+{name}");
                if let Err(e) =
                    write_file(&self.own.join("cgroup.subtree_control"), line.as_bytes())
                {
                    log::debug!("cannot enable the {name} controller for plugins: {e}");
                }
            }
        }
        let enabled =
            fs::read_to_string(self.own.join("cgroup.subtree_control")).unwrap_or_default();
        self.memory = enabled.split_whitespace().any(|c| c == "memory");
        self.cpu = enabled.split_whitespace().any(|c| c == "cpu");
        Ok(())
    }

    /// A fresh cgroup for instance `seq` of plugin `id`.
    pub fn create(&self, id: &str, seq: u64) -> io::Result<PathBuf> {
        let dir = self.own.join(format!("{PREFIX}{id}-{seq}"));
        match fs::create_dir(&dir) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Left by a daemon that was killed: empty it first.
                kill(&dir);
                remove(&dir)?;
                fs::create_dir(&dir).map_err(|e| annotate(e, &dir))?;
            }
            other => other.map_err(|e| annotate(e, &dir))?,
        }
        Ok(dir)
    }

    pub fn memory_bytes(&self, dir: &Path) -> Option<u64> {
        if !self.memory {
            return None;
        }
        fs::read_to_string(dir.join("memory.current"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn cpu_usage_ms(&self, dir: &Path) -> Option<u64> {
        if !self.cpu {
            return None;
        }
        let stat = fs::read_to_string(dir.join("cpu.stat")).ok()?;
        let usec: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))?
            .trim()
            .parse()
            .ok()?;
        Some(usec / 1000)
    }

    /// Instance cgroups (and anything else below ours but our own leaf) left by a daemon that
    /// did not stop cleanly: each one's name and the processes it held, all killed.
    pub fn kill_leftovers(&self) -> Vec<(String, Vec<i32>)> {
        let Ok(entries) = fs::read_dir(&self.own) else {
            return Vec::new();
        };
        let me = crate::sys::process::pid();
        let mut out = Vec::new();
        for entry in entries.filter_map(Result::ok) {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let dir = entry.path();
            let pids: Vec<i32> = procs(&dir).into_iter().filter(|&p| p != me).collect();
            if name == SUPERVISOR {
                // A dead daemon's leaf: only strays of it, if any (never ourselves).
                for &pid in &pids {
                    super::procs::signal(pid, libc::SIGKILL);
                }
            } else {
                kill(&dir);
            }
            if !pids.is_empty() {
                out.push((name, pids));
            }
        }
        out
    }

    /// Remove every empty instance cgroup left below ours.
    pub fn remove_leftovers(&self) {
        let Ok(entries) = fs::read_dir(&self.own) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            if name.as_bytes().starts_with(PREFIX.as_bytes()) {
                if let Err(e) = remove(&entry.path()) {
                    log::warn!("cannot remove cgroup {}: {e}", entry.path().display());
                }
            }
        }
    }

    /// The plugin id an instance cgroup's name carries.
    pub fn plugin_of(name: &str) -> Option<&str> {
        let rest = name.strip_prefix(PREFIX)?;
        let (id, seq) = rest.rsplit_once('-')?;
        seq.parse::<u64>().ok().map(|_| id)
    }
}

/// The `0::PATH` line of `/proc/<pid>/cgroup`.
pub fn unified_path(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end().to_string())
}

/// The directory of cgroup `path` from the cgroup2 mounts in `mountinfo`.
pub fn locate(mountinfo: &str, path: &str) -> Option<PathBuf> {
    for line in mountinfo.lines() {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        let (Some(root), Some(mount)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let root = unescape(root);
        let mount = unescape(mount);
        let rel = if root == "/" {
            Some(path)
        } else {
            path.strip_prefix(root.as_str())
                .filter(|r| r.is_empty() || r.starts_with('/'))
        };
        if let Some(rel) = rel {
            return Some(PathBuf::from(format!(
                "{}{}",
                mount.trim_end_matches('/'),
                rel
            )));
        }
    }
    None
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// systemd's system manager marks a cgroup it delegates with `trusted.delegate=1` (and
/// `user.delegate=1`). The user manager of systemd 252 marks nothing, but everything below it
/// belongs to the user: for a daemon that is not root, a cgroup owned by its euid counts.
fn is_delegated(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let marked = ["trusted.delegate", "user.delegate"]
        .iter()
        .any(|name| xattr(dir, name).is_some_and(|v| v == b"1"));
    let euid = crate::sys::process::euid();
    marked || (euid != 0 && fs::metadata(dir).is_ok_and(|m| m.uid() == euid))
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    crate::sys::xattr::get_small(path, name)
}

/// The cgroup directory `dir`, opened for `clone3(CLONE_INTO_CGROUP)` (or, where that is
/// refused, for opening its `cgroup.procs`).
pub fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
        .map(OwnedFd::from)
        .map_err(|e| annotate(e, dir))
}

/// Every process in `dir` and the cgroups below it.
pub fn procs(dir: &Path) -> Vec<i32> {
    let mut out: Vec<i32> = fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    for sub in subdirs(dir) {
        out.extend(procs(&sub));
    }
    out
}

/// True while any process lives in `dir` or below (`cgroup.events`: `populated 1`).
pub fn populated(dir: &Path) -> bool {
    match fs::read_to_string(dir.join("cgroup.events")) {
        Ok(text) => text.lines().any(|l| l.trim() == "populated 1"),
        Err(_) => false,
    }
}

/// SIGKILL to everything in `dir` at once (`cgroup.kill`, Linux 5.14), or one by one on older
/// kernels (a few rounds, for processes forking meanwhile).
pub fn kill(dir: &Path) {
    if write_file(&dir.join("cgroup.kill"), b"1").is_ok() {
        return;
    }
    for _ in 0..4 {
        let pids = procs(dir);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            super::procs::signal(pid, libc::SIGKILL);
        }
    }
}

/// Remove `dir` and any cgroups a plugin created below it (they must be empty).
pub fn remove(dir: &Path) -> io::Result<()> {
    for sub in subdirs(dir) {
        remove(&sub)?;
    }
    match fs::remove_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other.map_err(|e| annotate(e, dir)),
    }
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| annotate(e, path))?;
    f.write_all(bytes).map_err(|e| annotate(e, path))
}

fn annotate(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unified_line_is_found_in_a_hybrid_layout() {
        let text = "9:name=systemd:/\n4:memory:/x\n0::/system.slice/hotreloadd.service\n";
        assert_eq!(
            unified_path(text).as_deref(),
            Some("/system.slice/hotreloadd.service")
        );
        assert_eq!(unified_path("4:memory:/x\n"), None);
    }

    #[test]
    fn the_cgroup_dir_is_found_from_mountinfo_wherever_cgroup2_is_mounted() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            locate(hybrid, "/a/b"),
            Some(PathBuf::from("/sys/fs/cgroup/unified/a/b"))
        );
        // A mount of a subtree (a container's view): paths are relative to its root.
        let sub = "50 1 0:38 /machine/x /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            locate(sub, "/machine/x/svc"),
            Some(PathBuf::from("/sys/fs/cgroup/svc"))
        );
        assert_eq!(locate(sub, "/machine/xy"), None);
        let spaced = "50 1 0:38 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            locate(spaced, "/s"),
            Some(PathBuf::from("/mnt/with space/s"))
        );
        assert_eq!(locate("31 23 0:28 / /x rw - tmpfs tmpfs rw\n", "/s"), None);
    }

    #[test]
    fn instance_cgroup_names_carry_the_plugin_id() {
        assert_eq!(Cgroups::plugin_of("plugin-my-plugin-12"), Some("my-plugin"));
        assert_eq!(Cgroups::plugin_of("plugin-p1-x"), None);
        assert_eq!(Cgroups::plugin_of("supervisor"), None);
    }
}

/// Spawning into a cgroup, and what a cgroup per instance costs on a reload's critical path
/// (create and open before the spawn, the spawn into it, the removal after the old instance's
/// exit) against a plain spawn of the same program. Need root and a writable cgroup2 mount:
/// `cargo test --release --lib cgroup_cost -- --ignored --nocapture`.
#[cfg(test)]
mod spawning {
    use super::*;
    use std::time::{Duration, Instant};

    fn spawn_true(procs: Option<std::os::fd::RawFd>) -> Duration {
        let spec = crate::supervisor::spawn::SpawnSpec {
            program: "/bin/true".into(),
            arg0: "true".to_string(),
            args: Vec::new(),
            cwd: "/".into(),
            env: Default::default(),
            pass_fds: Vec::new(),
            pid_vars: Vec::new(),
            cgroup: procs,
            creds: None,
        };
        let t = Instant::now();
        let child = crate::supervisor::spawn::spawn(&spec).unwrap();
        let d = t.elapsed();
        let _ = nix::sys::wait::waitpid(child.pid, None);
        d
    }

    /// Both ways into a cgroup put the child there before it runs, and an exec failure is
    /// reported as an error (skipped without root or a writable cgroup2 mount).
    #[test]
    fn a_child_starts_inside_its_cgroup_either_way() {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let Some(root) = locate(&mountinfo, "/") else {
            return;
        };
        let own = root.join(format!("hotreload-unit-{}", std::process::id()));
        if fs::create_dir(&own).is_err() {
            eprintln!("skipped: cannot create a cgroup under {}", root.display());
            return;
        }
        let c = Cgroups {
            own: own.clone(),
            memory: false,
            cpu: false,
        };
        for (n, refuse) in [(1, false), (2, true)] {
            crate::supervisor::spawn::refuse_clone3(refuse);
            let dir = c.create("unit", n).unwrap();
            let fd = open_dir(&dir).unwrap();
            let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
            let spec = crate::supervisor::spawn::SpawnSpec {
                program: "/bin/sh".into(),
                arg0: "sh".to_string(),
                args: vec!["-c".to_string(), "cat /proc/self/cgroup".to_string()],
                cwd: "/".into(),
                env: Default::default(),
                pass_fds: Vec::new(),
                pid_vars: Vec::new(),
                cgroup: Some(raw),
                creds: None,
            };
            let child = crate::supervisor::spawn::spawn(&spec).unwrap();
            let _ = nix::sys::wait::waitpid(child.pid, None);
            let mut out = String::new();
            let _ = std::io::Read::read_to_string(&mut fs::File::from(child.stdout), &mut out);
            let missing = crate::supervisor::spawn::SpawnSpec {
                program: "/nonexistent/program".into(),
                ..spec
            };
            let err = crate::supervisor::spawn::spawn(&missing).unwrap_err();
            drop(fd);
            remove(&dir).unwrap();
            let want = format!("/hotreload-unit-{}/plugin-unit-{n}", std::process::id());
            assert!(
                out.lines()
                    .any(|l| l.strip_prefix("0::") == Some(want.as_str())),
                "refuse_clone3={refuse}: {out:?} names {want}"
            );
            assert_eq!(err.source.kind(), io::ErrorKind::NotFound, "{err}");
        }
        crate::supervisor::spawn::refuse_clone3(false);
        fs::remove_dir(&own).unwrap();
    }

    fn p50(mut v: Vec<Duration>) -> Duration {
        v.sort();
        v[v.len() / 2]
    }

    #[test]
    #[ignore = "a measurement, not a test: needs root and a writable cgroup2 mount"]
    fn cgroup_cost() {
        measure(false);
        // What a seccomp filter refusing clone3 (systemd's RestrictNamespaces=) would cost.
        crate::supervisor::spawn::refuse_clone3(true);
        measure(true);
        crate::supervisor::spawn::refuse_clone3(false);
    }

    fn measure(join_after_fork: bool) {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let Some(root) = locate(&mountinfo, "/") else {
            eprintln!("no cgroup2 mount");
            return;
        };
        let own = root.join(format!("hotreload-bench-{}", std::process::id()));
        fs::create_dir(&own).unwrap();
        let c = Cgroups {
            own: own.clone(),
            memory: false,
            cpu: false,
        };
        const N: u64 = 300;
        let (mut plain, mut contained, mut parts) = (Vec::new(), Vec::new(), Vec::new());
        for seq in 0..N {
            // Reloads are apart in time: an RCU grace period passes between two of them.
            std::thread::sleep(Duration::from_millis(15));
            plain.push(spawn_true(None));
            let t = Instant::now();
            let dir = c.create("bench", seq).unwrap();
            let fd = open_dir(&dir).unwrap();
            let setup = t.elapsed();
            let spawn = spawn_true(Some(std::os::fd::AsRawFd::as_raw_fd(&fd)));
            drop(fd);
            let t = Instant::now();
            remove(&dir).unwrap();
            let teardown = t.elapsed();
            contained.push(setup + spawn + teardown);
            parts.push((setup, teardown));
        }
        let setup = p50(parts.iter().map(|p| p.0).collect());
        let teardown = p50(parts.iter().map(|p| p.1).collect());
        let (a, b) = (p50(plain), p50(contained));
        let how = if join_after_fork {
            "joining after fork"
        } else {
            "clone3 CLONE_INTO_CGROUP"
        };
        eprintln!(
            "p50 over {N} ({how}): plain spawn {a:?}; with a cgroup {b:?} (mkdir+open \
             {setup:?}, rmdir {teardown:?}); added {:?}",
            b.saturating_sub(a)
        );
        fs::remove_dir(&own).unwrap();
    }
}
