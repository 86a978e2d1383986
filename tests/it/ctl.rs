//! `hotreloadctl` (SPEC §8): every command against a live daemon, its exit codes, `install`
//! end to end, `interactive` with piped input, and the socket driven by `socat` as a README shows.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::util::{
    Config, Daemon, EX_UNAVAILABLE, EX_USAGE, Output, Script, TIMEOUT, ctl_bin, expected_version,
    find_program, sh_quote,
};

#[track_caller]
fn assert_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.code(),
        Some(code),
        "contract (SPEC §8): {what} exits {code}; saw {out:?}"
    );
}

/// The JSON a `--json` command printed.
#[track_caller]
fn printed_json(out: &Output) -> Value {
    assert_exit(out, 0, "a --json command");
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| {
        panic!("contract (SPEC §8): --json prints the daemon's JSON ({e}): {out:?}")
    })
}

#[test]
fn ctl_status_list_and_plugin_print_human_readable_output() {
    let mut d = Daemon::new();
    d.start_running("p1", &Script::new("v1"));
    for args in [&["status"][..], &["list"], &["plugin", "p1"]] {
        let out = d.ctl(args);
        assert_exit(&out, 0, &args.join(" "));
        assert!(
            !out.stdout.trim().is_empty(),
            "{args:?} prints something; saw {out:?}"
        );
        let is_json = serde_json::from_str::<Value>(out.stdout.trim()).is_ok();
        assert!(
            !is_json,
            "contract (SPEC §8): human-readable without --json; saw {out:?}"
        );
    }
    assert!(
        d.ctl(&["list"]).stdout.contains("p1"),
        "contract: list shows p1"
    );
}

#[test]
fn ctl_json_prints_the_daemons_json() {
    let mut d = Daemon::new();
    d.start_running("p1", &Script::new("v1"));
    let status = printed_json(&d.ctl(&["--json", "status"]));
    assert!(
        status["hot_reload"].is_object() && status["daemon"].is_object(),
        "{status}"
    );
    let list = printed_json(&d.ctl(&["--json", "list"]));
    assert_eq!(
        list["plugins"][0]["id"], "p1",
        "contract: --json list; saw {list}"
    );
    let plugin = printed_json(&d.ctl(&["--json", "plugin", "p1"]));
    assert_eq!(
        plugin["plugin"]["id"], "p1",
        "contract: --json plugin p1; saw {plugin}"
    );
}

#[test]
fn ctl_disable_and_enable_switch_hot_reload() {
    let mut d = Daemon::new();
    d.start();
    assert_exit(&d.ctl(&["disable"]), 0, "disable");
    assert_eq!(
        d.status()["hot_reload"]["enabled"],
        false,
        "contract: disabled"
    );
    assert_exit(&d.ctl(&["enable"]), 0, "enable");
    assert_eq!(
        d.status()["hot_reload"]["enabled"],
        true,
        "contract: enabled again"
    );
}

#[test]
fn ctl_trigger_waits_for_the_reload() {
    let mut d = Daemon::new();
    d.start_running("p1", &Script::new("v1"));
    assert_exit(&d.ctl(&["disable"]), 0, "disable");
    let v2 = d.install("p1", &Script::new("v2"));
    assert_exit(&d.ctl(&["trigger", "p1"]), 0, "trigger of a good build");
    let info = d.plugin_info("p1").unwrap_or_default();
    assert!(
        info["state"] == "running" && info["version"] == expected_version(&v2),
        "contract (SPEC §8): trigger returns once the new build runs; list shows {info}"
    );
}

#[test]
fn ctl_trigger_no_wait_only_schedules_the_reload() {
    let mut d = Daemon::new();
    d.start_running("p1", &Script::new("v1"));
    assert_exit(&d.ctl(&["disable"]), 0, "disable");
    let v2 = d.install("p1", &Script::new("v2"));
    let resp = printed_json(&d.ctl(&["--json", "trigger", "p1", "--no-wait"]));
    assert_eq!(
        resp["scheduled"], true,
        "contract (SPEC §6): wait false answers at once; {resp}"
    );
    d.wait_started("p1", "v2");
    d.wait_running("p1", &v2);
}

#[test]
fn ctl_trigger_of_a_reload_that_fails_exits_1() {
    let mut d = Daemon::new();
    d.start_running("p1", &Script::new("v1"));
    assert_exit(&d.ctl(&["disable"]), 0, "disable");
    d.install("p1", &Script::new("bad").broken());
    assert_exit(
        &d.ctl(&["trigger", "p1"]),
        1,
        "trigger of a reload that fails",
    );
}

#[test]
fn ctl_events_follows_the_daemons_events() {
    let mut d = Daemon::new();
    d.start_running("p1", &Script::new("v1"));
    let mut events = d.ctl_follow(&["--json", "events"]);
    d.wait_sessions(2);
    d.install("p1", &Script::new("v2"));
    events.wait_line(TIMEOUT, "a reload_succeeded line for p1", |line| {
        let event: Value = serde_json::from_str(line).unwrap_or_default();
        event["event"] == "reload_succeeded" && event["plugin"] == "p1"
    });
}

#[test]
fn ctl_logs_shows_only_plugin_output() {
    let mut d = Daemon::new();
    d.start_running("p1", &Script::new("v1"));
    let mut logs = d.ctl_follow(&["logs", "p1"]);
    d.wait_sessions(2);
    d.install("p1", &Script::new("v2").stdout("hello-from-v2"));
    logs.wait_line(TIMEOUT, "the plugin's output", |line| {
        line.contains("hello-from-v2")
    });
    let lifecycle = [
        "reload_started",
        "reload started",
        "plugin_started",
        "plugin started",
    ];
    let leaked: Vec<&String> = logs
        .seen
        .iter()
        .filter(|l| lifecycle.iter().any(|e| l.to_lowercase().contains(e)))
        .collect();
    assert!(
        leaked.is_empty(),
        "contract (SPEC §8): logs shows only output; saw {leaked:?}"
    );
}

#[test]
fn ctl_reload_config_applies_the_changed_file() {
    let mut d = Daemon::new();
    d.start();
    d.write_config(&Config::new().set("hot_reload.debounce_delay_ms", json!(88)));
    assert_exit(&d.ctl(&["reload-config"]), 0, "reload-config");
    assert_eq!(
        d.status()["hot_reload"]["debounce_delay_ms"],
        88,
        "contract: applied"
    );
}

#[test]
fn ctl_exits_69_naming_the_socket_when_no_daemon_listens() {
    let d = Daemon::new();
    let missing = d.root.join("nobody-here.sock");
    let path = missing.to_string_lossy().into_owned();
    let mut by_flag = d.command(ctl_bin());
    by_flag.arg("--socket").arg(&missing).arg("status");
    let mut by_env = d.command(ctl_bin());
    by_env.arg("status").env("HOTRELOAD_SOCKET", &missing);
    for (how, cmd) in [("--socket", by_flag), ("$HOTRELOAD_SOCKET", by_env)] {
        let out = d.run(cmd, None, TIMEOUT);
        assert_exit(
            &out,
            EX_UNAVAILABLE,
            &format!("status with {how} and no daemon"),
        );
        assert!(
            out.text().contains(&path),
            "contract (SPEC §8): names {path}; saw {out:?}"
        );
    }
}

#[test]
fn ctl_exits_1_when_the_daemon_answers_an_error() {
    let mut d = Daemon::new();
    d.start();
    for args in [&["trigger", "nope"][..], &["plugin", "nope"]] {
        let out = d.ctl(args);
        assert_exit(&out, 1, &args.join(" "));
        assert!(
            out.text().contains("nope"),
            "the message names the plugin; saw {out:?}"
        );
    }
}

#[test]
fn ctl_exits_64_on_usage_errors() {
    let mut d = Daemon::new();
    d.start();
    for args in [
        &[][..],
        &["frobnicate"],
        &["trigger"],
        &["--no-such-flag", "status"],
    ] {
        assert_exit(&d.ctl(args), EX_USAGE, &format!("hotreloadctl {args:?}"));
    }
}

/// Writes build `script` of plugin `id` outside the plugins dir with `mode`; its path and bytes.
fn build_outside(d: &Daemon, id: &str, script: &Script, mode: u32) -> (PathBuf, Vec<u8>) {
    let path = d.root.join("build").join(format!("{id}-build"));
    let content = script.render(&d.root, id);
    crate::util::install_atomic(&path, &content, mode);
    (path, content)
}

/// Checks what `install` left in plugin `id`'s dir: the build, its mode, no temp file.
#[track_caller]
fn assert_installed(d: &Daemon, id: &str, content: &[u8], mode: u32) {
    let exec = d.exec_path(id);
    assert_eq!(
        fs::read(&exec).unwrap(),
        content,
        "contract (SPEC §8): the build is installed"
    );
    let seen = fs::metadata(&exec).unwrap().permissions().mode() & 0o7777;
    assert_eq!(
        seen, mode,
        "contract (SPEC §8): mode copied from the source; saw {seen:o}"
    );
    let names: Vec<String> = fs::read_dir(d.plugin_dir(id))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let temps: Vec<&String> = names
        .iter()
        .filter(|n| n.starts_with(".hotreload-"))
        .collect();
    assert!(
        temps.is_empty(),
        "contract: no temp file left behind; saw {temps:?}"
    );
}

fn arg(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

#[test]
fn ctl_install_of_a_new_plugin_waits_for_its_first_start() {
    let mut d = Daemon::new();
    d.start();
    let (src, content) = build_outside(&d, "p2", &Script::new("v1"), 0o750);
    assert_exit(
        &d.ctl(&["install", "p2", arg(&src), "--wait"]),
        0,
        "install --wait",
    );
    assert!(
        !d.starts("p2", Some("v1")).is_empty(),
        "contract: --wait waits for the first start"
    );
    assert_installed(&d, "p2", &content, 0o750);
    d.wait_started("p2", "v1");
    d.wait_running("p2", &content);
}

#[test]
fn ctl_install_over_an_existing_plugin_waits_for_the_reload() {
    let mut d = Daemon::new();
    d.start_running("p1", &Script::new("v1"));
    let (src, v2) = build_outside(&d, "p1", &Script::new("v2"), 0o755);
    assert_exit(
        &d.ctl(&["install", "p1", arg(&src), "--wait"]),
        0,
        "install --wait",
    );
    let info = d.plugin_info("p1").unwrap_or_default();
    assert!(
        info["state"] == "running" && info["version"] == expected_version(&v2),
        "contract (SPEC §8): install --wait returns once the new build runs; list shows {info}"
    );
    assert_installed(&d, "p1", &v2, 0o755);
}

#[test]
fn socat_one_liner_from_the_readme_gets_the_status() {
    let mut d = Daemon::new();
    // No silent skip: a test that passes without running proves nothing.
    assert!(
        find_program("socat").is_some(),
        "this test drives the socket with socat as the README does: install it \
         (apt-get install socat; .ci/run does)"
    );
    d.start();
    let address = sh_quote(&format!("UNIX-CONNECT:{}", arg(&d.socket)));
    let line = format!("printf 'status\\n' | socat - {address}");
    let mut cmd = d.command("sh");
    cmd.arg("-c").arg(&line);
    let out = d.run(cmd, None, TIMEOUT);
    assert_exit(&out, 0, &line);
    let first = out.stdout.lines().next().unwrap_or_default();
    let resp: Value = serde_json::from_str(first).unwrap_or_default();
    assert!(
        resp["status"] == "success" && resp["hot_reload"].is_object(),
        "saw {out:?}"
    );
}

#[test]
fn ctl_interactive_with_piped_stdin_prints_status_and_list() {
    let mut d = Daemon::new();
    d.start_running("p1", &Script::new("v1"));
    let out = d.ctl_stdin(&["interactive"], b"s\nl\nq\n");
    assert_exit(&out, 0, "interactive ending with q");
    assert!(
        out.stdout.contains("p1"),
        "contract (SPEC §8): l lists p1; saw {out:?}"
    );
    let pid = d.pid().to_string();
    let dir = d.plugins.to_string_lossy().into_owned();
    let status_shown = [pid.as_str(), dir.as_str(), "enabled"]
        .iter()
        .any(|s| out.stdout.contains(s));
    assert!(
        status_shown,
        "contract (SPEC §8): s prints the status (pid, dir or enabled); {out:?}"
    );
}

#[test]
fn ctl_install_of_an_id_no_watch_pattern_matches_writes_nothing_and_names_the_patterns() {
    let config = Config::new().set(
        "hot_reload.watch_patterns",
        json!(["*_transcoder", "*_scanner"]),
    );
    let mut d = Daemon::with_config(&config);
    d.start();
    let (src, _) = build_outside(&d, "demo", &Script::new("v1"), 0o755);
    let out = d.ctl(&["install", "demo", arg(&src), "--wait"]);
    assert_exit(&out, 1, "install of an id no watch_patterns glob matches");
    let text = out.text();
    assert!(
        text.contains("*_transcoder") && text.contains("*_scanner") && text.contains("demo"),
        "contract (SPEC §8): the refusal names the id and the patterns; saw {out:?}"
    );
    assert!(
        !d.plugin_dir("demo").exists(),
        "contract (SPEC §8): refused before anything is written; {} exists",
        d.plugin_dir("demo").display()
    );
}

/// The pre-flight message of plugin `id` names its file in the plugin dir and that file's mode,
/// never the daemon's snapshot copy.
#[track_caller]
fn assert_names_the_build(d: &Daemon, text: &str, id: &str, mode: &str) {
    let build = d.exec_path(id);
    let build = build.to_string_lossy();
    let snapshots = d.runtime.to_string_lossy();
    assert!(
        text.contains(build.as_ref()) && text.contains(mode) && !text.contains(snapshots.as_ref()),
        "contract (SPEC §5 states): the message names {build} and its mode {mode}, not a \
         snapshot under {snapshots}; saw {text:?}"
    );
}

#[test]
fn preflight_error_names_the_users_file_and_clears_once_a_good_build_runs() {
    let mut d = Daemon::new();
    d.start();
    let script = Script::new("v1");
    d.install_mode("noexec", &script, 0o644);
    let info = d.wait_plugin("noexec", "a pre-flight last_error", |p| {
        p["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("pre-flight"))
    });
    let error = info["last_error"].as_str().unwrap_or_default();
    assert_names_the_build(&d, error, "noexec", "0644");
    let shown = d.ctl(&["plugin", "noexec"]);
    assert_names_the_build(&d, &shown.text(), "noexec", "0644");
    let good = d.install_mode("noexec", &script, 0o755);
    d.wait_running("noexec", &good);
    let info = d.wait_plugin("noexec", "last_error cleared", |p| {
        p["last_error"].is_null()
    });
    assert_eq!(
        info["state"], "running",
        "contract (SPEC §5 states): once a good build runs, last_error is null; saw {info}"
    );
}

/// `time` of an event as the daemon stamped it.
fn event_time(event: &Value) -> std::time::SystemTime {
    let text = event["time"].as_str().unwrap_or_default();
    humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("event time {text:?}: {e}"))
}

#[test]
fn ctl_install_wait_reports_a_refused_build_as_soon_as_the_daemon_refuses_it() {
    let mut d = Daemon::new();
    d.start_running("p1", &Script::new("v1"));
    let mut events = d.client();
    events.subscribe(json!({"plugin": "p1"}));
    let (src, _) = build_outside(&d, "p1", &Script::new("v2"), 0o644);
    let out = d.ctl(&["install", "p1", arg(&src), "--wait"]);
    let exited = std::time::SystemTime::now();
    assert_exit(
        &out,
        1,
        "install --wait of a build refused by the pre-flight check",
    );
    assert_names_the_build(&d, &out.stderr, "p1", "0644");
    let refused = events.wait_named("reload_failed", "p1");
    let late = exited
        .duration_since(event_time(&refused))
        .unwrap_or_default();
    assert!(
        late < std::time::Duration::from_secs(2),
        "contract (SPEC §8): install --wait reports the refusal as soon as the daemon \
         refuses it; it exited {late:?} after the daemon's reload_failed: {out:?}"
    );
}

#[test]
fn ctl_install_wait_of_a_new_plugin_reports_its_refused_first_start() {
    let mut d = Daemon::new();
    d.start();
    let (src, _) = build_outside(&d, "fresh", &Script::new("v1"), 0o600);
    let out = d.run(
        d.ctl_command(&["install", "fresh", arg(&src), "--wait"]),
        None,
        TIMEOUT,
    );
    assert_exit(
        &out,
        1,
        "install --wait of a new plugin whose build is refused",
    );
    assert_names_the_build(&d, &out.stderr, "fresh", "0600");
}

#[test]
fn status_counts_plugin_directories_and_says_disabled_without_watches() {
    let mut d = Daemon::new();
    // A symlinked build: its directory is watched too, but it is no plugin directory.
    let build = d.root.join("build").join("p1-build");
    crate::util::install_atomic(&build, &Script::new("v1").render(&d.root, "p1"), 0o755);
    fs::create_dir_all(d.plugin_dir("p1")).unwrap();
    std::os::unix::fs::symlink(&build, d.exec_path("p1")).unwrap();
    d.start();
    d.wait_started("p1", "v1");
    let hot = &d.status()["hot_reload"];
    assert!(
        hot["watching_directories"] == 2 && hot["enabled"] == true,
        "contract (SPEC §6): the plugins dir and one plugin directory watched, not the \
         symlinked build's directory; saw {hot}"
    );
    let shown = d.ctl(&["status"]).stdout;
    assert!(
        shown.contains("the plugins directory and 1 plugin directory"),
        "status shows the count; saw {shown}"
    );

    let mut off = Daemon::new();
    off.set_env("HOTRELOAD_WATCH", "0");
    off.start_running("p1", &Script::new("v1"));
    let hot = &off.status()["hot_reload"];
    assert!(
        hot["enabled"] == false && hot["watching_directories"] == 0,
        "contract (SPEC §6): with HOTRELOAD_WATCH=0 nothing reloads by itself; saw {hot}"
    );
}

#[test]
fn a_restart_for_a_changed_plugin_table_reports_trigger_config() {
    let mut d = Daemon::new();
    d.start_running("p1", &Script::new("v1"));
    let mut events = d.client();
    events.subscribe(json!({"plugin": "p1"}));
    d.write_config(&Config::new().set("plugins.p1.env", json!({"GREETING": "hi"})));
    assert_exit(&d.ctl(&["reload-config"]), 0, "reload-config");
    let started = events.wait_named("reload_started", "p1");
    assert_eq!(
        started["trigger"], "config",
        "contract (hotreload.toml(5), SPEC §6): a changed [plugins.ID] restarts with trigger \
         config; saw {started}"
    );
    events.wait_named("reload_succeeded", "p1");
    let detail = d.request(&json!({"cmd": "plugin", "plugin": "p1"}));
    assert_eq!(
        detail["plugin"]["history"][0]["trigger"], "config",
        "contract (SPEC §6): the history records trigger config; saw {detail}"
    );
}

#[test]
fn a_typoed_plugin_id_suggests_the_closest_known_one() {
    let mut d = Daemon::new();
    d.install("ffmpeg_transcoder", &Script::new("v1"));
    d.start_running("hello", &Script::new("v1"));
    for args in [
        &["trigger", "helo"][..],
        &["stop", "helo"],
        &["plugin", "ffmpeg_transcodr"],
    ] {
        let out = d.ctl(args);
        assert_exit(&out, 1, &args.join(" "));
        let want = if args[1] == "helo" {
            "did you mean \"hello\"?"
        } else {
            "did you mean \"ffmpeg_transcoder\"?"
        };
        assert!(
            out.stderr.contains(want),
            "contract: a typo'd id suggests the closest one ({want}); saw {out:?}"
        );
    }
    let far = d.ctl(&["plugin", "zzzzzzzz"]);
    assert!(
        !far.stderr.contains("did you mean"),
        "no suggestion for an id like no other; saw {far:?}"
    );
}

/// Writes `hotreloadctl completions SHELL` to `<test dir>/<name>`; its path.
fn completion_script(d: &Daemon, shell: &str, name: &str) -> PathBuf {
    let out = d.ctl(&["completions", shell]);
    assert_exit(&out, 0, &format!("completions {shell}"));
    let dir = d.root.join(format!("completions-{shell}"));
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    fs::write(&path, &out.stdout).unwrap();
    path
}

/// Runs `shell -c code` with hotreloadctl on PATH and the test daemon's socket.
fn in_shell(d: &Daemon, shell: &str, code: &str) -> Output {
    let bin_dir = Path::new(ctl_bin()).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = d.command(shell);
    cmd.arg("-c")
        .arg(code)
        .env("PATH", path)
        .env("HOTRELOAD_SOCKET", &d.socket)
        .env("HOME", &d.root);
    d.run(cmd, None, TIMEOUT)
}

#[test]
fn completion_scripts_load_in_bash_zsh_and_fish() {
    let d = Daemon::new();
    let bash = completion_script(&d, "bash", "hotreloadctl");
    let out = in_shell(&d, "bash", &format!("bash -n {}", sh_quote(arg(&bash))));
    assert_exit(&out, 0, "bash -n on the bash completion script");
    let out = in_shell(
        &d,
        "bash",
        &format!(
            "source {} && complete -p hotreloadctl",
            sh_quote(arg(&bash))
        ),
    );
    assert_exit(
        &out,
        0,
        "complete -p hotreloadctl after sourcing the script",
    );
    assert!(out.stdout.contains("_hotreloadctl"), "{out:?}");

    let zsh = completion_script(&d, "zsh", "_hotreloadctl");
    if find_program("zsh").is_some() {
        let dir = zsh.parent().unwrap();
        let code = format!(
            "zsh -n {file} && fpath=({dir} $fpath) && autoload -Uz compinit && compinit -u -D \
             && [[ $_comps[hotreloadctl] == _hotreloadctl ]]",
            file = sh_quote(arg(&zsh)),
            dir = sh_quote(arg(dir)),
        );
        assert_exit(&in_shell(&d, "zsh", &code), 0, "zsh loads _hotreloadctl");
    } else {
        println!("SKIPPED zsh half: zsh is not installed here");
    }
    let fish = completion_script(&d, "fish", "hotreloadctl.fish");
    if find_program("fish").is_some() {
        let code = format!(
            "source {} && complete -C 'hotreloadctl reload-c'",
            sh_quote(arg(&fish))
        );
        let out = in_shell(&d, "fish", &code);
        assert_exit(&out, 0, "fish loads hotreloadctl.fish");
        assert!(
            out.stdout.contains("reload-config"),
            "fish completes commands; {out:?}"
        );
    } else {
        println!("SKIPPED fish half: fish is not installed here");
    }
}

#[test]
fn completion_offers_the_running_daemons_plugin_ids_and_is_silent_without_one() {
    let mut d = Daemon::new();
    d.install("other", &Script::new("v1"));
    d.start_running("hello", &Script::new("v1"));
    let bash = completion_script(&d, "bash", "hotreloadctl");
    let code = format!(
        "source {} && COMP_WORDS=(hotreloadctl trigger he) COMP_CWORD=2 && _hotreloadctl && \
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        sh_quote(arg(&bash))
    );
    let out = in_shell(&d, "bash", &code);
    assert_exit(&out, 0, "bash completion of `hotreloadctl trigger he`");
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        ["hello"],
        "contract (SPEC §8): ids come from the running daemon; {out:?}"
    );
    if find_program("fish").is_some() {
        let fish = completion_script(&d, "fish", "hotreloadctl.fish");
        let code = format!(
            "source {} && complete -C 'hotreloadctl plugin '",
            sh_quote(arg(&fish))
        );
        let out = in_shell(&d, "fish", &code);
        let ids: Vec<&str> = out.stdout.lines().collect();
        assert!(
            ids.contains(&"hello") && ids.contains(&"other"),
            "fish completes plugin ids; {out:?}"
        );
    }
    let missing = d.root.join("no-daemon.sock");
    let mut cmd = d.command(ctl_bin());
    cmd.arg("__plugin-ids").env("HOTRELOAD_SOCKET", &missing);
    let out = d.run(cmd, None, TIMEOUT);
    assert!(
        out.code() == Some(0) && out.text().is_empty(),
        "completion without a daemon is silent; {out:?}"
    );
}
