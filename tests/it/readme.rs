//! The README's set-up and Quick start, run as written: the commands are read from README.md (so
//! this test breaks when the README drifts), the set-up's daemon command runs in the background
//! in a fresh directory with the built binaries where the set-up puts them (`target/release/`),
//! and the Quick start's `sh` blocks run there literally, one script, `sh -e`. Once as root and
//! once as an unprivileged user (`nobody`, with a HOME and XDG_RUNTIME_DIR of its own).

use std::fs;
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::util::{
    Client, TIMEOUT, ctl_bin, daemon_bin, expected_version, find_program, pid_alive, poll_until,
    random_hex, wait_until,
};

/// Unprivileged user of the second run.
const NOBODY: u32 = 65534;

/// The `sh` code blocks of the README section whose heading starts with `heading`.
fn sh_blocks(readme: &str, heading: &str) -> Vec<String> {
    let start = readme
        .find(&format!("\n## {heading}"))
        .unwrap_or_else(|| panic!("README.md has a section `## {heading}`"));
    let section = &readme[start + 1..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    section
        .split("```sh\n")
        .skip(1)
        .map(|block| block[..block.find("```").expect("a closed code block")].to_string())
        .collect()
}

/// The README's set-up: (the daemon command, the test command), without their comments.
fn setup_commands(readme: &str) -> (String, String) {
    let lines: Vec<String> = sh_blocks(readme, "Set-up")
        .concat()
        .lines()
        .map(|l| l.split("  #").next().unwrap_or_default().trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        2,
        "the README keeps exactly two set-up commands; saw {lines:?}"
    );
    assert_eq!(
        lines[1], "cargo test",
        "the second set-up command runs the tests (.ci/run runs the same)"
    );
    (lines[0].clone(), lines[1].clone())
}

/// The part of the daemon set-up command that runs the daemon, after it built both binaries.
fn daemon_part(setup: &str) -> String {
    let (build, run) = setup
        .rsplit_once("&& ")
        .unwrap_or_else(|| panic!("the set-up builds, then runs the daemon: {setup:?}"));
    assert!(
        build.starts_with("cargo build --release") && build.contains("--bins"),
        "the set-up builds both binaries (hotreloadctl too) in release mode: {setup:?}"
    );
    assert!(
        run.trim() == "target/release/hotreloadd",
        "the set-up runs the daemon it built, on its built-in defaults: {setup:?}"
    );
    run.trim().to_string()
}

/// Who runs the Quick start.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Who {
    Root,
    Nobody,
}

/// A fresh "checkout" for one run: binaries in `target/release/`, the daemon started from it,
/// everything removed (and the daemon stopped) at the end.
struct Checkout {
    root: PathBuf,
    who: Who,
    daemon: Option<Child>,
    keep: bool,
}

impl Checkout {
    fn new(who: Who) -> Checkout {
        let root = std::env::temp_dir().join(format!("hrit-readme-{who:?}-{}", random_hex(4)));
        let release = root.join("target/release");
        fs::create_dir_all(&release).unwrap();
        for bin in [daemon_bin(), ctl_bin()] {
            let name = Path::new(bin).file_name().unwrap();
            fs::copy(bin, release.join(name)).unwrap();
        }
        let checkout = Checkout {
            root,
            who,
            daemon: None,
            keep: false,
        };
        for dir in ["home", "xdg-run", "run", "state"] {
            fs::create_dir_all(checkout.root.join(dir)).unwrap();
            fs::set_permissions(checkout.root.join(dir), fs::Permissions::from_mode(0o700))
                .unwrap();
        }
        fs::set_permissions(&checkout.root, fs::Permissions::from_mode(0o755)).unwrap();
        if who == Who::Nobody {
            chown_tree(&checkout.root);
        }
        checkout
    }

    /// Where the daemon's socket is for this user.
    fn socket(&self) -> PathBuf {
        match self.who {
            Who::Root => self.root.join("run/control.sock"),
            Who::Nobody => self.root.join("xdg-run/hotreload/control.sock"),
        }
    }

    /// A command run in the checkout as this user, with a clean environment of its own. As root,
    /// systemd's RUNTIME_DIRECTORY and STATE_DIRECTORY keep the daemon out of the machine's own
    /// /run/hotreload and /var/lib/hotreload (tests run in parallel, as root in CI); the
    /// commands stay the README's.
    fn command(&self, line: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-ec").arg(line).current_dir(&self.root).env_clear();
        let path = format!(
            "{}:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            self.root.join("target/release").display()
        );
        cmd.env("PATH", path)
            .env("HOME", self.root.join("home"))
            .env("LANG", "C.UTF-8");
        match self.who {
            Who::Root => {
                cmd.env("RUNTIME_DIRECTORY", self.root.join("run"))
                    .env("STATE_DIRECTORY", self.root.join("state"));
                if Path::new("/etc/hotreload/hotreload.toml").exists() {
                    // This machine's system configuration is not the built-in defaults.
                    let empty = self.root.join("home/empty.toml");
                    fs::write(&empty, "").unwrap();
                    cmd.env("HOTRELOAD_CONFIG", empty);
                }
            }
            Who::Nobody => {
                cmd.env("XDG_RUNTIME_DIR", self.root.join("xdg-run"))
                    .uid(NOBODY)
                    .gid(NOBODY);
            }
        }
        cmd
    }

    /// Starts the set-up's daemon command in the background and waits until it answers.
    fn start_daemon(&mut self, line: &str) {
        let log = fs::File::create(self.root.join("daemon.log")).unwrap();
        let mut cmd = self.command(line);
        cmd.stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .process_group(0);
        self.daemon = Some(cmd.spawn().unwrap());
        let socket = self.socket();
        let up = poll_until(TIMEOUT, || {
            let mut client = Client::connect(&socket).ok()?;
            (client.request(&json!({"cmd": "status"}))["status"] == "success").then_some(())
        });
        if up.is_none() {
            self.keep = true;
            panic!(
                "the set-up's `{line}` did not answer on {} within {TIMEOUT:?} as {:?}; log: {}",
                socket.display(),
                self.who,
                self.log()
            );
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.root.join("daemon.log")).unwrap_or_default()
    }

    fn request(&self, request: &Value) -> Value {
        Client::connect(&self.socket()).unwrap().request(request)
    }

    /// SIGTERM to the daemon; it must exit, with its plugins.
    fn stop_daemon(&mut self) {
        let pid = self.request(&json!({"cmd": "status"}))["daemon"]["pid"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .expect("status names the daemon's pid");
        kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
        wait_until(TIMEOUT, "the daemon to exit on SIGTERM", || {
            (!pid_alive(pid)).then_some(())
        });
        if let Some(mut child) = self.daemon.take() {
            let _ = child.wait();
        }
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let group = Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
            let _ = killpg(group, Signal::SIGTERM);
            if poll_until(TIMEOUT, || child.try_wait().ok().flatten()).is_none() {
                let _ = killpg(group, Signal::SIGKILL);
                let _ = child.wait();
            }
        }
        if self.keep || std::thread::panicking() {
            eprintln!("readme test dir kept: {}", self.root.display());
        } else {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

/// Makes everything under `dir` belong to `nobody`.
fn chown_tree(dir: &Path) {
    chown(dir, Some(NOBODY), Some(NOBODY)).unwrap();
    if fs::symlink_metadata(dir).unwrap().is_dir() {
        for entry in fs::read_dir(dir).unwrap() {
            chown_tree(&entry.unwrap().path());
        }
    }
}

/// Runs the README as `who`: the set-up's daemon in the background, the Quick start's blocks as
/// one `sh -e` script; then checks what the Quick start promises and stops the daemon.
fn run_the_readme_as(who: Who) {
    assert!(
        find_program("socat").is_some(),
        "the Quick start uses socat: install it (apt-get install socat; .ci/run does)"
    );
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let (setup, _) = setup_commands(&readme);
    let script = sh_blocks(&readme, "Quick start").concat();
    let mut checkout = Checkout::new(who);
    checkout.start_daemon(&daemon_part(&setup));
    let mut cmd = checkout.command(&script);
    cmd.stdin(Stdio::null());
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        checkout.keep = true;
        panic!(
            "the README's Quick start fails as {who:?} ({}):\n--- script\n{script}--- stdout\n\
             {stdout}--- stderr\n{stderr}--- daemon log\n{}",
            out.status,
            checkout.log()
        );
    }
    let build = fs::read(checkout.root.join("plugins/hello/hello")).unwrap();
    let hello = &checkout.request(&json!({"cmd": "plugin", "plugin": "hello"}))["plugin"];
    assert!(
        hello["state"] == "running" && hello["version"] == expected_version(&build),
        "the Quick start ends with hello running its last build; saw {hello}"
    );
    let over_socat = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .any(|v| v["status"] == "success" && v["plugins"][0]["id"] == "hello");
    assert!(
        over_socat,
        "the Quick start's socat line gets the list as JSON; stdout {stdout}"
    );
    checkout.stop_daemon();
}

#[test]
fn readme_quick_start_runs_as_written_as_root() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIPPED: the root half needs root (CI runs the tests as root)");
        return;
    }
    run_the_readme_as(Who::Root);
}

#[test]
fn readme_quick_start_runs_as_written_as_an_unprivileged_user() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIPPED: switching to an unprivileged user needs root (CI runs as root)");
        return;
    }
    run_the_readme_as(Who::Nobody);
}
