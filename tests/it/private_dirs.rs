//! Private directories are verified, never trusted (SPEC §2; issue "Runtime-dir squatting runs an
//! attacker's code"): a runtime or state dir, or a `snapshots/` or `plugins/<id>/` subdir, that
//! is a symlink, belongs to another user or may be written by others is refused with exit 71 and
//! a message naming it, before anything is created; `hotreloadctl` refuses to talk through a
//! socket in such a directory (exit 69). And a second daemon on a taken socket names the first
//! one's pid, once (SPEC §7).

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{PermissionsExt, chown, symlink};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{
    Daemon, EX_OSERR, EX_UNAVAILABLE, Output, Script, TIMEOUT, ctl_bin, daemon_bin, find_program,
    random_hex,
};

/// An unprivileged uid that no test and no account uses, so `/tmp/hotreload-<uid>` is ours alone.
fn unused_uid() -> u32 {
    let n = u32::from_str_radix(&random_hex(3), 16).unwrap();
    3_000_000_000 + n % 1_000_000_000
}

fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// The daemon with the fixture's arguments, run to its exit.
fn run_daemon(d: &Daemon) -> Output {
    d.run_daemon(&d.daemon_args())
}

/// The daemon refused `path` with exit 71, in one message that names it and says `says`.
#[track_caller]
fn assert_refused(out: &Output, path: &Path, says: &[&str]) {
    assert_eq!(
        out.code(),
        Some(EX_OSERR),
        "contract (SPEC §2): an unsafe private dir is exit 71; {out:?}"
    );
    let text = out.text();
    let line = text
        .lines()
        .find(|l| l.contains("refusing to use"))
        .unwrap_or_else(|| panic!("no refusal in {text:?}"));
    let named = format!("{} ", path.display());
    assert!(
        line.contains(&named) || line.contains(&format!("{}:", path.display())),
        "contract: the message names {}; {line}",
        path.display()
    );
    for word in says {
        assert!(line.contains(word), "the message says {word:?}; {line}");
    }
}

/// Nothing in `dir` (the refusal came before the daemon put anything there).
#[track_caller]
fn assert_empty(dir: &Path) {
    let names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(names.is_empty(), "{} holds {names:?}", dir.display());
}

#[test]
fn a_runtime_dir_others_may_write_is_refused_before_anything_is_put_in_it() {
    let d = Daemon::new();
    set_mode(&d.runtime, 0o777);
    let out = run_daemon(&d);
    assert_refused(
        &out,
        &d.runtime,
        &["mode 0777", "chmod 700", "--runtime-dir"],
    );
    assert_empty(&d.runtime);
    assert!(!d.socket.exists(), "no control socket was bound");
}

#[test]
fn a_symlinked_runtime_dir_is_refused() {
    let mut d = Daemon::new();
    let real = d.root.join("real-runtime");
    fs::create_dir(&real).unwrap();
    set_mode(&real, 0o700);
    fs::remove_dir(&d.runtime).unwrap();
    symlink(&real, &d.runtime).unwrap();
    // The socket where the issue puts it: in the runtime dir.
    d.socket = d.runtime.join("control.sock");
    let out = run_daemon(&d);
    assert_refused(
        &out,
        &d.runtime,
        &[&format!("is a symlink to {}", real.display())],
    );
    assert_empty(&real);
}

#[test]
fn a_state_dir_or_plugin_state_dir_owned_by_another_user_is_refused() {
    if !is_root() {
        return skip(
            "a_state_dir_or_plugin_state_dir_owned_by_another_user_is_refused",
            "needs root to chown",
        );
    }
    let d = Daemon::new();
    let theirs = unused_uid();
    let plugin_state = d.state.join("plugins").join("p1");
    fs::create_dir_all(&plugin_state).unwrap();
    set_mode(&plugin_state, 0o755);
    chown(&plugin_state, Some(theirs), Some(theirs)).unwrap();
    let out = run_daemon(&d);
    assert_refused(
        &out,
        &plugin_state,
        &[
            &format!("owned by uid {theirs}"),
            "not by uid 0 (root) that hotreloadd runs as",
            "mode 0755",
            "another user may have created it",
        ],
    );
    chown(&plugin_state, Some(0), Some(0)).unwrap();
    chown(&d.state, Some(theirs), Some(theirs)).unwrap();
    let out = run_daemon(&d);
    assert_refused(
        &out,
        &d.state,
        &[&format!("owned by uid {theirs}"), "--state-dir"],
    );
    assert_empty(&d.runtime);
}

#[test]
fn a_runtime_dir_below_a_directory_anybody_may_write_is_refused_unless_it_is_sticky() {
    let mut d = Daemon::new();
    let shared = d.root.join("shared");
    fs::create_dir(&shared).unwrap();
    set_mode(&shared, 0o777);
    d.runtime = shared.join("rt");
    let out = run_daemon(&d);
    assert_refused(
        &out,
        &d.runtime,
        &[
            &format!(
                "{} above it is writable by others and not sticky",
                shared.display()
            ),
            "mode 0777",
            "--runtime-dir",
        ],
    );
    assert_empty(&shared);
    // Like /tmp: the sticky bit keeps others from renaming what they do not own.
    set_mode(&shared, 0o1777);
    d.start();
    let mode = fs::metadata(&d.runtime).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "created owner-only");
}

#[test]
fn a_symlinked_snapshots_dir_is_refused() {
    let d = Daemon::new();
    let elsewhere = d.root.join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let snapshots = d.runtime.join("snapshots");
    symlink(&elsewhere, &snapshots).unwrap();
    d.install("p1", &Script::new("v1"));
    let out = run_daemon(&d);
    assert_refused(&out, &snapshots, &["snapshot directory", "is a symlink to"]);
    assert_empty(&elsewhere);
}

#[test]
fn owner_only_and_explicitly_named_0755_dirs_are_accepted_and_new_ones_are_0700() {
    let mut d = Daemon::new();
    set_mode(&d.runtime, 0o700);
    // What `mkdir` gives a test harness or an admin: readable, writable by the owner alone.
    set_mode(&d.state, 0o755);
    d.start_running("p1", &Script::new("v1"));
    for sub in [d.runtime.join("snapshots"), d.state.join("plugins")] {
        let mode = fs::metadata(&sub).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} is created owner-only", sub.display());
    }
}

#[test]
fn a_group_writable_dir_is_accepted_only_from_the_service_manager() {
    let mut d = Daemon::new();
    set_mode(&d.runtime, 0o770);
    if is_root() {
        // A group that is not the owner's private group (root's own would be accepted).
        let shared = unused_uid();
        chown(&d.runtime, None, Some(shared)).unwrap();
        let out = run_daemon(&d);
        assert_refused(&out, &d.runtime, &["writable by its group", "mode 0770"]);
    }
    // The same directory handed over by systemd (RuntimeDirectoryMode=0770).
    let cwd = d.root.join("cwd");
    fs::create_dir(&cwd).unwrap();
    d.plugins = cwd.join("plugins");
    d.socket = d.runtime.join("control.sock");
    let runtime = d.runtime.clone();
    d.set_env("RUNTIME_DIRECTORY", &runtime);
    d.set_env("STATE_DIRECTORY", d.state.clone());
    d.set_env("HOTRELOAD_CONFIG", d.config_path.clone());
    d.launch_bare(&cwd);
    d.start();
}

/// A squatted `/tmp/hotreload-<uid>` removed when the test ends.
struct Squat(PathBuf);

impl Drop for Squat {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_default_tmp_runtime_dir_made_first_by_another_user_is_refused() {
    let test = "the_default_tmp_runtime_dir_made_first_by_another_user_is_refused";
    if !is_root() {
        return skip(test, "needs root to run the daemon as another user");
    }
    let Some(setpriv) = find_program("setpriv") else {
        return skip(test, "setpriv (util-linux) is not installed");
    };
    let d = Daemon::new();
    let uid = unused_uid();
    // The victim's daemon: no --runtime-dir, no $XDG_RUNTIME_DIR, so /tmp/hotreload-<uid>.
    let squat = Squat(PathBuf::from(format!("/tmp/hotreload-{uid}")));
    fs::create_dir(&squat.0).unwrap();
    set_mode(&squat.0, 0o777);
    // The victim reads its config and owns its other dirs, whatever the test's umask.
    set_mode(&d.root, 0o755);
    set_mode(&d.config_path, 0o644);
    for dir in [&d.plugins, &d.state] {
        chown(dir, Some(uid), Some(uid)).unwrap();
    }
    let bin = d.root.join("hotreloadd");
    fs::copy(daemon_bin(), &bin).unwrap();
    set_mode(&bin, 0o755);
    let mut cmd = d.command(setpriv);
    let id = uid.to_string();
    cmd.args([
        format!("--reuid={id}"),
        format!("--regid={id}"),
        "--clear-groups".to_string(),
    ])
    .arg(&bin)
    .env_remove("XDG_RUNTIME_DIR");
    let args: [OsString; 6] = [
        "--config".into(),
        d.config_path.clone().into(),
        "--plugins-dir".into(),
        d.plugins.clone().into(),
        "--state-dir".into(),
        d.state.clone().into(),
    ];
    cmd.args(args);
    let out = d.run(cmd, None, TIMEOUT);
    assert_refused(
        &out,
        &squat.0,
        &[
            "owned by uid 0 (root)",
            &format!("not by uid {uid} that hotreloadd runs as"),
            "mode 0777",
            "another user may have created it to take over the daemon",
            &format!("rm -rf /tmp/hotreload-{uid}"),
            "--runtime-dir",
        ],
    );
    assert_empty(&squat.0);
}

#[test]
fn a_second_daemon_names_the_first_ones_pid_once_and_creates_nothing() {
    let mut d = Daemon::new();
    d.start();
    let other = d.root.join("second");
    let args: Vec<OsString> = vec![
        "--config".into(),
        d.config_path.clone().into(),
        "--plugins-dir".into(),
        other.join("plugins").into(),
        "--runtime-dir".into(),
        other.join("run").into(),
        "--state-dir".into(),
        other.join("st").into(),
        "--socket".into(),
        d.socket.clone().into(),
    ];
    let out = d.run_daemon(&args);
    assert_eq!(out.code(), Some(EX_OSERR), "contract (SPEC §7): {out:?}");
    let text = out.text();
    let expected = format!(
        "another hotreloadd (pid {}) is already listening on {}: stop it or choose another \
         --socket",
        d.pid(),
        d.socket.display()
    );
    assert!(text.contains(&expected), "{expected:?} in {text:?}");
    for once in [format!("pid {}", d.pid()), d.socket.display().to_string()] {
        assert_eq!(
            text.matches(&once).count(),
            1,
            "contract (SPEC §7): {once:?} said once; {text:?}"
        );
    }
    assert!(
        !other.exists(),
        "the refused daemon created {}",
        other.display()
    );
}

/// `hotreloadctl status` resolving its socket from `config` (no --socket, no $HOTRELOAD_SOCKET).
fn ctl_via_config(d: &Daemon, runtime_dir: &Path) -> Output {
    let config = d.root.join("ctl.toml");
    fs::write(
        &config,
        format!("runtime_dir = \"{}\"\n", runtime_dir.display()),
    )
    .unwrap();
    let mut cmd: Command = d.command(ctl_bin());
    cmd.env("HOTRELOAD_CONFIG", &config).arg("status");
    d.run(cmd, None, TIMEOUT)
}

#[test]
fn hotreloadctl_refuses_a_socket_in_a_directory_another_user_controls() {
    let d = Daemon::new();
    let squat = d.root.join("squat");
    fs::create_dir(&squat).unwrap();
    set_mode(&squat, 0o777);
    let impostor = UnixListener::bind(squat.join("control.sock")).unwrap();
    impostor.set_nonblocking(true).unwrap();
    let mut cases = vec![(0o777, None, "is writable by others (mode 0777)".to_string())];
    if is_root() {
        let theirs = unused_uid();
        cases.push((
            0o755,
            Some(theirs),
            format!("is owned by uid {theirs}, not by you or root"),
        ));
    }
    for (mode, owner, says) in cases {
        if let Some(uid) = owner {
            chown(&squat, Some(uid), Some(uid)).unwrap();
        }
        set_mode(&squat, mode);
        let out = ctl_via_config(&d, &squat);
        assert_eq!(
            out.code(),
            Some(EX_UNAVAILABLE),
            "contract (SPEC §8): exit 69; {out:?}"
        );
        let expected = format!("its directory {} {says}", squat.display());
        assert!(out.stderr.contains(&expected), "{expected:?} in {out:?}");
        assert!(
            impostor.accept().is_err(),
            "hotreloadctl connected to the impostor"
        );
    }
}
