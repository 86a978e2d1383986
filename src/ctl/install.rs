//! `hotreloadctl install ID FILE [--wait]`: put a new build in place atomically, so the daemon
//! never sees a half-written executable, and optionally wait for the reload it causes.
//!
//! The daemon is asked where the executable lives (`plugin ID` → `exec`; for a new plugin `status`
//! → `plugins_dir`, then `<plugins_dir>/<ID>/<ID>`). FILE is copied to `.hotreload-<random hex>` in
//! the same directory (a name the daemon's watcher ignores), hashed in the same pass, chmod-ed like
//! FILE, fsync-ed and renamed over the executable; the directory is fsync-ed last. The rename is
//! what the daemon sees, as one `IN_MOVED_TO`. To wait, events are subscribed on a second
//! connection *before* the rename, so the outcome cannot be missed (see `wait`).

use std::fs::{self, File, Permissions};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::fsutil;
use crate::protocol::{self, PluginReply, Request, StatusReply};

use super::client::{Client, os_text};
use super::commands;
use super::wait::{Probe, Waiter, wait_for_outcome};
use super::{CtlError, Io, Outcome};

/// Prefix of the temporary file; the daemon never counts changes to files named like this.
pub const TEMP_PREFIX: &str = ".hotreload-";

/// Whether `id` is a valid plugin id: `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$` (SPEC §4).
pub fn valid_plugin_id(id: &str) -> bool {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    first_ok
        && id.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The version of a build: the first 16 hex digits of its BLAKE3 hash, as `b3sum` prints it.
pub fn file_version(path: &Path) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(File::open(path)?)?;
    Ok(version_of(&hasher))
}

fn version_of(hasher: &blake3::Hasher) -> String {
    hasher.finalize().to_hex()[..16].to_string()
}

/// Removes the temporary file when dropped, unless it was renamed into place.
struct TempGuard(Option<PathBuf>);

impl TempGuard {
    /// The file was renamed into place: nothing to remove any more.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_file(path);
        }
    }
}

/// 16 random hex digits from the kernel's CSPRNG.
fn random_hex() -> Result<String, String> {
    let mut bytes = [0u8; 8];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("cannot read /dev/urandom: {}", os_text(&e)))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Copies `source` over `target` atomically (temp file in the target's directory, fsync, chmod
/// like `source`, rename, fsync the directory) and returns the installed version. On failure no
/// temporary file is left behind and the message names the paths involved.
pub fn install_atomically(source: &Path, target: &Path) -> Result<String, String> {
    let show = |p: &Path| p.display().to_string();
    let mut src =
        File::open(source).map_err(|e| format!("cannot open {}: {}", show(source), os_text(&e)))?;
    let meta = src
        .metadata()
        .map_err(|e| format!("cannot stat {}: {}", show(source), os_text(&e)))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", show(source)));
    }
    let dir = fsutil::parent_dir(target);
    let temp = dir.join(format!("{TEMP_PREFIX}{}", random_hex()?));
    let mut file = fsutil::create_private_file(&temp)
        .map_err(|e| format!("cannot create {}: {}", show(&temp), os_text(&e)))?;
    let guard = TempGuard(Some(temp.clone()));
    let version = copy_hashing(&mut src, source, &mut file, &temp)?;
    // Permissions before fsync, so the mode is as durable as the content.
    file.set_permissions(Permissions::from_mode(meta.permissions().mode() & 0o7777))
        .map_err(|e| format!("cannot chmod {}: {}", show(&temp), os_text(&e)))?;
    file.sync_all()
        .map_err(|e| format!("cannot fsync {}: {}", show(&temp), os_text(&e)))?;
    drop(file);
    fs::rename(&temp, target).map_err(|e| {
        format!(
            "cannot rename {} over {}: {}",
            show(&temp),
            show(target),
            os_text(&e)
        )
    })?;
    guard.disarm();
    fsutil::sync_dir(dir).map_err(|e| {
        format!(
            "installed {} but cannot fsync directory {}: {}",
            show(target),
            show(dir),
            os_text(&e)
        )
    })?;
    Ok(version)
}

/// Copies all of `src` to `dst`, hashing as it goes, so the version is that of the bytes installed.
fn copy_hashing(
    src: &mut File,
    src_path: &Path,
    dst: &mut File,
    dst_path: &Path,
) -> Result<String, String> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(format!(
                    "cannot read {}: {}",
                    src_path.display(),
                    os_text(&e)
                ));
            }
        };
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n])
            .map_err(|e| format!("cannot write {}: {}", dst_path.display(), os_text(&e)))?;
    }
    Ok(version_of(&hasher))
}

// ---------------------------------------------------------------------------------------------
// Where to install, and what to expect afterwards

/// What the daemon told us about the plugin before the install.
#[derive(Debug)]
struct Target {
    /// The executable path to rename over.
    exec: PathBuf,
    /// The plugin's running version, if it is known and has one.
    version: Option<String>,
    /// Expect a first start rather than a reload (new, missing, stopped or failed plugin).
    first_start: bool,
    /// The directory must be created (a new plugin).
    create_dir: bool,
    /// `hot_reload.enabled` from `status`.
    hot_reload: bool,
    /// For a new plugin: the id matches none of `watch_patterns`, so the daemon will ignore it.
    unwatched: Option<String>,
    /// The plugin's `last_error` before the install (none for a new plugin).
    last_error: Option<String>,
}

impl Target {
    /// Why the daemon will not load the new build by itself, if it will not.
    fn obstacle(&self, id: &str) -> Option<String> {
        (!self.hot_reload).then(|| {
            format!(
                "hot reload is disabled, so the daemon will not load the new build; \
                 run `hotreloadctl trigger {id}` or `hotreloadctl enable`"
            )
        })
    }
}

/// Asks the daemon where plugin `id`'s executable lives and what state it is in.
fn locate(client: &mut Client, id: &str) -> Result<Target, CtlError> {
    let plugin = client.request(&Request::new(protocol::Command::Plugin {
        id: id.to_owned(),
    }))?;
    let known = match plugin.value["code"].as_str() {
        Some("unknown_plugin") => None,
        _ => Some(plugin.into_success()?.body::<PluginReply>()?.plugin.info),
    };
    let status = client
        .request(&Request::new(protocol::Command::Status))?
        .into_success()?
        .body::<StatusReply>()?;
    let hot_reload = status.hot_reload.enabled;
    if let Some(p) = known {
        let exec = Some(PathBuf::from(&p.exec))
            .filter(|e| e.is_absolute())
            .ok_or_else(|| {
                CtlError::Failed(format!(
                    "the daemon reported no absolute exec path for plugin {id}: {:?}",
                    p.exec
                ))
            })?;
        return Ok(Target {
            exec,
            version: p.version,
            first_start: matches!(p.state.as_str(), "missing" | "stopped" | "failed"),
            create_dir: false,
            hot_reload,
            unwatched: None,
            last_error: p.last_error,
        });
    }
    let plugins_dir = Some(PathBuf::from(&status.daemon.plugins_dir))
        .filter(|d| d.is_absolute())
        .ok_or_else(|| {
            CtlError::Failed(
                "the daemon's status has no daemon.plugins_dir; cannot place a new plugin"
                    .to_string(),
            )
        })?;
    Ok(Target {
        exec: plugins_dir.join(id).join(id),
        version: None,
        first_start: true,
        create_dir: true,
        hot_reload,
        unwatched: unwatched(id, &status.hot_reload.watch_patterns),
        last_error: None,
    })
}

/// `Some(patterns)` when `id` matches none of the daemon's `watch_patterns` globs.
fn unwatched(id: &str, patterns: &[String]) -> Option<String> {
    let matches =
        |p: &String| globset::Glob::new(p).is_ok_and(|g| g.compile_matcher().is_match(id));
    if patterns.is_empty() || patterns.iter().any(matches) {
        None
    } else {
        Some(patterns.join(", "))
    }
}

/// Where to rename to: the executable itself, or a symlinked executable's target (SPEC §5,
/// symlinked builds), so a developer's symlink is not replaced by a copy.
fn rename_target(exec: &Path) -> Result<PathBuf, CtlError> {
    match fs::symlink_metadata(exec) {
        Ok(meta) if meta.file_type().is_symlink() => fs::canonicalize(exec).map_err(|e| {
            CtlError::Failed(format!(
                "{} is a symlink whose target cannot be resolved: {}; fix or remove the link",
                exec.display(),
                os_text(&e)
            ))
        }),
        _ => Ok(exec.to_path_buf()),
    }
}

/// Runs `install ID FILE [--wait]`.
pub(super) fn run(
    id: &str,
    file: &Path,
    wait: bool,
    socket: &Path,
    json: bool,
    io: &mut Io<'_>,
) -> Result<Outcome, CtlError> {
    // Unlike other commands, install prints no raw daemon replies, so an error reply must be
    // reported as a message even with `--json`.
    install(id, file, wait, socket, json, io).map_err(|e| match e {
        CtlError::Daemon { code, message } => CtlError::Failed(format!("{message} ({code})")),
        other => other,
    })
}

fn install(
    id: &str,
    file: &Path,
    wait: bool,
    socket: &Path,
    json: bool,
    io: &mut Io<'_>,
) -> Result<Outcome, CtlError> {
    if !valid_plugin_id(id) {
        return Err(CtlError::Usage(format!(
            "invalid plugin id {id:?}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )));
    }
    let mut client = Client::connect(socket)?;
    let target = locate(&mut client, id)?;
    if let Some(patterns) = &target.unwatched {
        // Refused before anything is written: a dir the daemon ignores would only mislead.
        return Err(CtlError::Failed(format!(
            "refusing to install {id}: the daemon supervises only plugin dirs whose names match \
             watch_patterns ({patterns}), and {id} matches none, so nothing was written; \
             use a matching id, or add a glob such as \"{id}\" or \"*\" to watch_patterns in \
             hotreload.toml and run `hotreloadctl reload-config`"
        )));
    }
    if target.create_dir {
        create_plugin_dir(&target.exec)?;
    }
    let mut events = if wait {
        let mut events = Client::connect(socket)?;
        commands::subscribe(&mut events, Some(id), false, false, io)?;
        Some(events)
    } else {
        None
    };
    let dest = rename_target(&target.exec)?;
    warn_if_not_executable(file, io)?;
    let version = install_atomically(file, &dest).map_err(CtlError::Failed)?;
    let mut report = Report::new(id, &dest, &version, json);
    if target.version.as_deref() == Some(version.as_str()) {
        report.unchanged = true;
        return report.finish(
            Ok(format!(
                "{id}: version {version} unchanged, nothing to reload"
            )),
            io,
        );
    }
    let installed = format!("{id}: installed {} (version {version})", dest.display());
    let obstacle = target.obstacle(id);
    let Some(events) = events.as_mut() else {
        if let Some(why) = &obstacle
            && !json
        {
            writeln!(io.err, "hotreloadctl: warning: {why}")?;
        }
        return report.finish(Ok(installed), io);
    };
    if !json {
        writeln!(io.out, "{installed}")?;
    }
    if let Some(why) = obstacle {
        return report.finish(Err(why), io);
    }
    let mut waiter = Waiter::new(id, &version, target.first_start, io.style());
    let mut probe = Probe::new(&mut client, target.last_error.clone());
    let waited = wait_for_outcome(events, &mut waiter, &mut probe, json, io)?;
    report.events = waited.events;
    report.finish(waited.result, io)
}

fn create_plugin_dir(exec: &Path) -> Result<(), CtlError> {
    let Some(dir) = exec.parent() else {
        return Ok(());
    };
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(CtlError::Failed(format!(
            "cannot create plugin directory {}: {}",
            dir.display(),
            os_text(&e)
        ))),
    }
}

fn warn_if_not_executable(file: &Path, io: &mut Io<'_>) -> Result<(), CtlError> {
    let mode = fs::metadata(file)
        .map(|m| m.permissions().mode())
        .unwrap_or(0o755);
    if mode & 0o111 == 0 {
        writeln!(
            io.err,
            "hotreloadctl: warning: {} is not executable, so the daemon will reject it; chmod +x it and install again",
            file.display()
        )?;
    }
    Ok(())
}

/// Collects what `install` did, for the final line (human) or object (`--json`).
struct Report {
    plugin: String,
    path: PathBuf,
    version: String,
    unchanged: bool,
    json: bool,
    /// The events that decided the outcome (`--json` shows them).
    events: Vec<Value>,
}

impl Report {
    fn new(plugin: &str, path: &Path, version: &str, json: bool) -> Report {
        Report {
            plugin: plugin.to_string(),
            path: path.to_path_buf(),
            version: version.to_string(),
            unchanged: false,
            json,
            events: Vec::new(),
        }
    }

    /// Prints the outcome: on stdout for success, as an error otherwise (exit 1).
    fn finish(self, result: Result<String, String>, io: &mut Io<'_>) -> Result<Outcome, CtlError> {
        if self.json {
            let (status, error) = match &result {
                Ok(_) => ("success", Value::Null),
                Err(e) => ("error", json!(e)),
            };
            let summary = json!({"status": status, "plugin": self.plugin, "path": self.path,
                "version": self.version, "unchanged": self.unchanged, "events": self.events,
                "error": error});
            writeln!(io.out, "{summary}")?;
            return Ok(if result.is_ok() {
                Outcome::Success
            } else {
                Outcome::Failure
            });
        }
        match result {
            Ok(line) => {
                writeln!(io.out, "{line}")?;
                Ok(Outcome::Success)
            }
            Err(message) => Err(CtlError::Failed(message)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{Captured, FakeDaemon, run_capture, temp_dir};
    use super::*;
    use crate::fsutil::tests::sorted_names;

    #[test]
    fn plugin_id_rule() {
        for ok in ["a", "p1", "ffmpeg_transcoder", "A.b-c_d", &"x".repeat(64)] {
            assert!(valid_plugin_id(ok), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "_x",
            "a/b",
            "a b",
            "é",
            "..",
            &"x".repeat(65),
        ] {
            assert!(!valid_plugin_id(bad), "{bad}");
        }
    }

    #[test]
    fn version_is_b3sum_prefix() {
        let dir = temp_dir("version");
        let path = dir.join("f");
        fs::write(&path, b"abc").unwrap();
        // b3sum of "abc" is 6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85.
        assert_eq!(file_version(&path).unwrap(), "6437b3ac38465133");
        fs::write(&path, b"").unwrap();
        assert_eq!(file_version(&path).unwrap(), "af1349b9f5f9a1a6");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn atomic_install_copies_content_and_mode() {
        let dir = temp_dir("atomic");
        let src = dir.join("build");
        fs::write(&src, b"#!/bin/sh\necho new\n").unwrap();
        fs::set_permissions(&src, Permissions::from_mode(0o750)).unwrap();
        let plugin_dir = dir.join("p1");
        fs::create_dir(&plugin_dir).unwrap();
        let target = plugin_dir.join("p1");
        fs::write(&target, b"old").unwrap();
        let old_inode = fs::metadata(&target).unwrap();
        let version = install_atomically(&src, &target).unwrap();
        assert_eq!(version, file_version(&src).unwrap());
        assert_eq!(fs::read(&target).unwrap(), b"#!/bin/sh\necho new\n");
        let meta = fs::metadata(&target).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o750);
        use std::os::unix::fs::MetadataExt;
        assert_ne!(
            meta.ino(),
            old_inode.ino(),
            "replaced by rename, not written in place"
        );
        assert_eq!(sorted_names(&plugin_dir), vec!["p1"]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn temp_name_is_dot_hotreload_random_hex() {
        let a = random_hex().unwrap();
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, random_hex().unwrap());
        // The rename fails (the target is a non-empty directory), so the temp file stays visible
        // in the error message, and must be gone afterwards.
        let dir = temp_dir("tempname");
        let src = dir.join("build");
        fs::write(&src, b"x").unwrap();
        let target = dir.join("p1");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("keep"), b"").unwrap();
        let err = install_atomically(&src, &target).unwrap_err();
        let temp = err.split_whitespace().nth(2).unwrap();
        let name = Path::new(temp).file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(TEMP_PREFIX), "{err}");
        assert_eq!(name.len(), TEMP_PREFIX.len() + 16, "{err}");
        assert!(err.contains(&target.display().to_string()), "{err}");
        assert_eq!(sorted_names(&dir), vec!["build", "p1"], "no temp file left");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_source_names_it_and_leaves_nothing() {
        let dir = temp_dir("nosource");
        let err = install_atomically(&dir.join("nope"), &dir.join("p1")).unwrap_err();
        assert!(
            err.starts_with("cannot open ") && err.contains("nope"),
            "{err}"
        );
        assert!(sorted_names(&dir).is_empty());
        let err = install_atomically(&dir, &dir.join("p1")).unwrap_err();
        assert!(err.contains("is not a regular file"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unwatched_ids_are_detected() {
        let globs = |g: &[&str]| g.iter().map(|g| (*g).to_owned()).collect::<Vec<_>>();
        assert_eq!(unwatched("p1", &globs(&["*"])), None);
        let two = globs(&["*_transcoder", "*_scanner"]);
        assert_eq!(unwatched("x_scanner", &two), None);
        assert_eq!(
            unwatched("p1", &two),
            Some("*_transcoder, *_scanner".into())
        );
        assert_eq!(unwatched("p1", &[]), None, "a daemon that names no globs");
    }

    /// A fake daemon for install: `plugin` answers from `plugin` (or unknown_plugin when null),
    /// `status` gives `plugins_dir`, `subscribe` acknowledges and sends `events`.
    fn install_daemon(plugin: Value, plugins_dir: &Path, events: Vec<Value>) -> FakeDaemon {
        let plugins_dir = plugins_dir.display().to_string();
        FakeDaemon::answering(move |req| {
            let reply = match req["cmd"].as_str() {
                Some("plugin") if plugin.is_null() => {
                    json!({"status": "error", "code": "unknown_plugin", "error": "no such plugin"})
                }
                Some("plugin") => json!({"status": "success", "plugin": plugin}),
                Some("status") => json!({"status": "success",
                    "hot_reload": {"enabled": true, "watch_patterns": ["*"]},
                    "daemon": {"plugins_dir": plugins_dir}}),
                Some("subscribe") => {
                    let mut lines =
                        vec![json!({"status": "success", "subscribed": true}).to_string()];
                    lines.extend(events.iter().map(Value::to_string));
                    return lines;
                }
                _ => json!({"status": "error", "code": "unknown_command", "error": "?"}),
            };
            vec![reply.to_string()]
        })
    }

    fn build(dir: &Path, content: &str) -> (PathBuf, String) {
        let src = dir.join("build");
        fs::write(&src, content).unwrap();
        fs::set_permissions(&src, Permissions::from_mode(0o755)).unwrap();
        let version = file_version(&src).unwrap();
        (src, version)
    }

    /// The version the fake daemon reports `p1` running before the install.
    const RUNNING_VERSION: &str = "0123abcd00000000";

    /// A test directory with `plugins/p1/` (where `p1`'s executable lives) and a build of
    /// `content` to install.
    struct P1Setup {
        dir: PathBuf,
        exec: PathBuf,
        src: PathBuf,
        version: String,
    }

    fn p1_setup(name: &str, content: &str) -> P1Setup {
        let dir = temp_dir(name);
        fs::create_dir_all(dir.join("plugins/p1")).unwrap();
        let exec = dir.join("plugins/p1/p1");
        let (src, version) = build(&dir, content);
        P1Setup {
            dir,
            exec,
            src,
            version,
        }
    }

    impl P1Setup {
        /// A fake daemon (see [`install_daemon`]) reporting `p1` running `running_version`.
        fn daemon(&self, running_version: &str, events: Vec<Value>) -> FakeDaemon {
            let plugin = running_p1(&self.exec, running_version);
            install_daemon(plugin, &self.dir.join("plugins"), events)
        }
    }

    /// `p1` as the daemon's `plugin` reply shows it: running `version` from `exec`.
    fn running_p1(exec: &Path, version: &str) -> Value {
        json!({"id": "p1", "state": "running", "exec": exec, "version": version})
    }

    /// Runs `hotreloadctl install p1 SRC` against `daemon`, with `--wait` when asked.
    fn install_p1(src: &Path, wait: bool, daemon: &FakeDaemon) -> Captured {
        let mut args = vec!["install", "p1", src.to_str().unwrap()];
        if wait {
            args.push("--wait");
        }
        run_capture(&args, daemon, "")
    }

    #[test]
    fn install_wait_reload_succeeds() {
        let p1 = p1_setup("install-ok", "#!/bin/sh\nexec sleep 100\n");
        fs::write(&p1.exec, "old").unwrap();
        let events = vec![
            json!({"event": "reload_started", "plugin": "p1", "trigger": "watch"}),
            json!({"event": "reload_succeeded", "plugin": "p1", "old_version": RUNNING_VERSION,
                   "new_version": p1.version, "duration_ms": 12}),
        ];
        let daemon = p1.daemon(RUNNING_VERSION, events);
        let run = install_p1(&p1.src, true, &daemon);
        assert_eq!(run.code, 0, "{run:?}");
        assert_eq!(
            daemon.requests(),
            vec![
                json!({"cmd": "plugin", "plugin": "p1"}),
                json!({"cmd": "status"}),
                json!({"cmd": "subscribe", "plugin": "p1"}),
            ]
        );
        assert_eq!(
            fs::read_to_string(&p1.exec).unwrap(),
            "#!/bin/sh\nexec sleep 100\n"
        );
        assert_eq!(
            fs::metadata(&p1.exec).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert!(
            run.out.ends_with(&format!(
                "p1: reloaded 0123abcd… -> {}… in 12 ms\n",
                &p1.version[..8]
            )),
            "{}",
            run.out
        );
        assert_eq!(sorted_names(&p1.dir.join("plugins/p1")), vec!["p1"]);
        fs::remove_dir_all(p1.dir).unwrap();
    }

    #[test]
    fn install_wait_final_failure_shows_rollback_and_exits_1() {
        let p1 = p1_setup("install-fail", "#!/bin/sh\nexit 1\n");
        let events = vec![
            json!({"event": "reload_failed", "plugin": "p1", "error": "exited with code 1", "attempt": 1,
                   "retry_in_ms": 1000}),
            json!({"event": "reload_failed", "plugin": "p1", "error": "exited with code 1", "attempt": 2,
                   "retry_in_ms": null}),
            json!({"event": "rolled_back", "plugin": "p1", "version": "0123abcd00000000"}),
        ];
        let daemon = p1.daemon(RUNNING_VERSION, events);
        let run = install_p1(&p1.src, true, &daemon);
        assert_eq!(run.code, 1, "{run:?}");
        assert!(
            run.err
                .contains("attempt 1 failed: exited with code 1; retrying in 1000 ms"),
            "{}",
            run.err
        );
        assert!(
            run.err
                .contains("hotreloadctl: p1: reload failed: exited with code 1"),
            "{}",
            run.err
        );
        assert!(
            run.out
                .contains("p1: rolled back to version 0123abcd00000000"),
            "{}",
            run.out
        );
        fs::remove_dir_all(p1.dir).unwrap();
    }

    #[test]
    fn install_new_plugin_creates_dir_and_waits_for_start() {
        let dir = temp_dir("install-new");
        fs::create_dir_all(dir.join("plugins")).unwrap();
        let (src, version) = build(&dir, "#!/bin/sh\nexec sleep 100\n");
        let events = vec![
            json!({"event": "plugin_added", "plugin": "p2"}),
            json!({"event": "plugin_started", "plugin": "p2", "pid": 42, "version": version}),
            json!({"event": "plugin_ready", "plugin": "p2", "pid": 42}),
        ];
        let daemon = install_daemon(Value::Null, &dir.join("plugins"), events);
        let run = run_capture(
            &["install", "p2", src.to_str().unwrap(), "--wait"],
            &daemon,
            "",
        );
        assert_eq!(run.code, 0, "{run:?}");
        assert_eq!(
            fs::read_to_string(dir.join("plugins/p2/p2")).unwrap(),
            "#!/bin/sh\nexec sleep 100\n"
        );
        assert!(
            run.out
                .ends_with(&format!("p2: started version {version} (pid 42)\n")),
            "{}",
            run.out
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn install_same_version_does_not_wait() {
        let p1 = p1_setup("install-same", "same");
        let daemon = p1.daemon(&p1.version, Vec::new());
        let run = install_p1(&p1.src, true, &daemon);
        assert_eq!(run.code, 0, "{run:?}");
        assert_eq!(
            run.out,
            format!("p1: version {} unchanged, nothing to reload\n", p1.version)
        );
        let run = run_capture(
            &["--json", "install", "p1", p1.src.to_str().unwrap()],
            &daemon,
            "",
        );
        let summary: Value = serde_json::from_str(run.out.trim()).unwrap();
        assert_eq!(summary["unchanged"], true);
        assert_eq!(summary["version"], json!(p1.version));
        fs::remove_dir_all(p1.dir).unwrap();
    }

    #[test]
    fn install_without_wait_only_installs() {
        let p1 = p1_setup("install-nowait", "new");
        let daemon = p1.daemon(RUNNING_VERSION, Vec::new());
        let run = install_p1(&p1.src, false, &daemon);
        assert_eq!(run.code, 0, "{run:?}");
        assert_eq!(
            run.out,
            format!(
                "p1: installed {} (version {})\n",
                p1.exec.display(),
                p1.version
            )
        );
        assert_eq!(daemon.requests().len(), 2, "no subscription without --wait");
        fs::remove_dir_all(p1.dir).unwrap();
    }

    #[test]
    fn install_wait_with_hot_reload_disabled_installs_then_exits_1() {
        let p1 = p1_setup("install-disabled", "new");
        let plugin = running_p1(&p1.exec, RUNNING_VERSION);
        let daemon = FakeDaemon::answering(move |req| {
            let reply = match req["cmd"].as_str() {
                Some("plugin") => json!({"status": "success", "plugin": plugin}),
                Some("status") => json!({"status": "success", "hot_reload": {"enabled": false}}),
                Some("subscribe") => json!({"status": "success", "subscribed": true}),
                _ => json!({"status": "error", "code": "unknown_command", "error": "?"}),
            };
            vec![reply.to_string()]
        });
        let run = install_p1(&p1.src, true, &daemon);
        assert_eq!(run.code, 1, "{run:?}");
        assert!(run.err.contains("hot reload is disabled"), "{}", run.err);
        assert_eq!(fs::read_to_string(&p1.exec).unwrap(), "new");
        let run = install_p1(&p1.src, false, &daemon);
        assert_eq!(run.code, 0, "without --wait only a warning: {run:?}");
        assert!(
            run.err.contains("warning: hot reload is disabled"),
            "{}",
            run.err
        );
        fs::remove_dir_all(p1.dir).unwrap();
    }

    #[test]
    fn install_reports_daemon_errors_even_with_json() {
        let daemon = FakeDaemon::answering(|_| {
            vec![
                json!({"status": "error", "code": "busy", "error": "the daemon is shutting down"})
                    .to_string(),
            ]
        });
        let run = run_capture(&["--json", "install", "p1", "/bin/sh"], &daemon, "");
        assert_eq!(run.code, 1, "{run:?}");
        assert!(
            run.err.contains("the daemon is shutting down (busy)"),
            "{}",
            run.err
        );
    }

    #[test]
    fn install_rejects_bad_id_with_64() {
        let daemon = install_daemon(Value::Null, Path::new("/nonexistent"), Vec::new());
        let run = run_capture(&["install", "../etc", "/bin/sh"], &daemon, "");
        assert_eq!(run.code, 64, "{run:?}");
        assert!(
            run.err.contains("invalid plugin id \"../etc\""),
            "{}",
            run.err
        );
        assert!(daemon.requests().is_empty());
    }

    #[test]
    fn install_follows_symlinked_exec() {
        let p1 = p1_setup("install-link", "new");
        fs::create_dir_all(p1.dir.join("src")).unwrap();
        let real = p1.dir.join("src/p1");
        fs::write(&real, "old").unwrap();
        std::os::unix::fs::symlink(&real, &p1.exec).unwrap();
        let daemon = p1.daemon(RUNNING_VERSION, Vec::new());
        let run = install_p1(&p1.src, false, &daemon);
        assert_eq!(run.code, 0, "{run:?}");
        assert!(
            fs::symlink_metadata(&p1.exec)
                .unwrap()
                .file_type()
                .is_symlink(),
            "link kept"
        );
        assert_eq!(fs::read_to_string(&real).unwrap(), "new");
        fs::remove_dir_all(p1.dir).unwrap();
    }
}
