//! The plugins dir going and coming back, and symlinks in it (SPEC §4, §5 "The plugins dir itself
//! may go and come back", "Symlinked builds", §6 `plugins_dir_present`, `plugins_dir_lost`,
//! `plugins_dir_back`): deleted and recreated, swapped by two renames, its parent gone and back;
//! a symlinked executable added live; plugin dirs that are symlinks.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::{
    Client, Config, Daemon, Script, TIMEOUT, install_atomic, pid_alive, proc_stat_fields,
    wait_until,
};

/// SPEC §5: "supervision resumes on its own within a second of the dir being back"; the tests
/// allow more, for a loaded machine.
const BACK_WITHIN: Duration = Duration::from_secs(5);

#[track_caller]
fn wait_dir_event(sub: &mut Client, name: &str) -> Value {
    sub.wait_event(TIMEOUT, &format!("event {name}"), |e| e["event"] == name)
}

#[track_caller]
fn wait_present(d: &Daemon, present: bool) {
    wait_until(
        TIMEOUT,
        &format!("status daemon.plugins_dir_present == {present}"),
        || (d.status()["daemon"]["plugins_dir_present"] == present).then_some(()),
    );
}

#[track_caller]
fn wait_unlisted(d: &Daemon, id: &str) {
    wait_until(TIMEOUT, &format!("plugin {id} gone from list"), || {
        d.plugin_info(id).is_none().then_some(())
    });
}

#[track_caller]
fn wait_dead(pid: i32) {
    wait_until(TIMEOUT, &format!("process {pid} stopped"), || {
        (!pid_alive(pid)).then_some(())
    });
}

/// Renders `script` as plugin `id` into `plugins/<id>/<id>` of another plugins dir.
fn install_into(d: &Daemon, plugins: &Path, id: &str, script: &Script) -> Vec<u8> {
    let content = script.render(&d.root, id);
    install_atomic(&plugins.join(id).join(id), &content, 0o755);
    content
}

#[test]
fn plugins_dir_deleted_and_recreated_is_supervised_again() {
    let mut d = Daemon::new();
    d.install("p2", &Script::new("v1"));
    let (_, old1) = d.start_running("p1", &Script::new("v1"));
    let old2 = d.wait_started("p2", "v1");
    let mut sub = d.client();
    sub.subscribe(json!({}));

    fs::remove_dir_all(&d.plugins).unwrap();
    let lost = wait_dir_event(&mut sub, "plugins_dir_lost");
    wait_present(&d, false);
    // SPEC §5: the plugins of a deleted plugins dir are stopped and forgotten.
    wait_dead(old1);
    wait_dead(old2);
    wait_unlisted(&d, "p1");
    wait_unlisted(&d, "p2");
    assert_eq!(
        lost["plugins_dir"],
        d.plugins.display().to_string(),
        "contract: plugins_dir_lost names the plugins dir; saw {lost}"
    );

    fs::create_dir(&d.plugins).unwrap();
    let back = wait_dir_event(&mut sub, "plugins_dir_back");
    let v2 = d.install("p1", &Script::new("v2"));
    let v3 = d.install("p3", &Script::new("v1"));
    d.wait_running("p1", &v2);
    d.wait_running("p3", &v3);
    wait_present(&d, true);
    assert!(
        d.plugin_info("p2").is_none(),
        "contract (SPEC §5): a plugin not in the recreated dir stays gone; back event {back}"
    );
    let status = d.status();
    assert!(
        status["hot_reload"]["watching_directories"].as_u64() == Some(3),
        "contract: the plugins dir and both plugin dirs are watched again; saw {status}"
    );
    // The new plugin dirs are watched: a new build is hot-reloaded.
    let v4 = d.install("p3", &Script::new("v2"));
    d.wait_running("p3", &v4);
}

#[test]
fn plugins_dir_swapped_by_two_renames_is_supervised() {
    let mut d = Daemon::new();
    d.install("gone", &Script::new("v1"));
    let (v1, pid1) = d.start_running("p1", &Script::new("v1"));
    let gone = d.wait_started("gone", "v1");
    let mut sub = d.client();
    sub.subscribe(json!({}));

    // The new release: p1 with the same build, a new plugin, no `gone`.
    let new = d.root.join("plugins.new");
    let old = d.root.join("plugins.old");
    install_atomic(&new.join("p1").join("p1"), &v1, 0o755);
    let fresh = install_into(&d, &new, "fresh", &Script::new("v1"));
    fs::rename(&d.plugins, &old).unwrap();
    fs::rename(&new, &d.plugins).unwrap();

    d.wait_running("fresh", &fresh);
    wait_unlisted(&d, "gone");
    wait_dead(gone);
    let info = d.wait_running("p1", &v1);
    wait_dir_event(&mut sub, "plugins_dir_back");
    wait_present(&d, true);
    assert_eq!(
        info["pid"],
        pid1,
        "contract (SPEC §5, by version): p1 has the same build in the new dir and keeps running; log {:?}",
        d.log_lines("p1")
    );

    // The path is the truth: builds in the old dir are not the plugin's any more, builds in
    // the new one are.
    install_into(&d, &old, "p1", &Script::new("stale"));
    let v2 = d.install("p1", &Script::new("v2"));
    d.wait_running("p1", &v2);
    assert!(
        d.starts("p1", Some("stale")).is_empty(),
        "contract (SPEC §5): a build in the renamed-away plugins.old never starts"
    );
}

/// Clock ticks of CPU the process `pid` has used (user + system).
fn cpu_ticks(pid: i32) -> u64 {
    let fields = proc_stat_fields(pid).unwrap_or_default();
    // After the command name: state is field 3, utime 14, stime 15 (1-based in proc(5)).
    let tick = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    tick(14).unwrap_or(0) + tick(15).unwrap_or(0)
}

#[test]
fn plugins_dir_whose_parent_is_removed_and_recreated_is_supervised_again() {
    let mut d = Daemon::new();
    let deploy = d.root.join("deploy");
    d.plugins = deploy.join("plugins");
    fs::create_dir_all(&d.plugins).unwrap();
    let (_, old) = d.start_running("p1", &Script::new("v1"));
    let mut sub = d.client();
    sub.subscribe(json!({}));

    fs::remove_dir_all(&deploy).unwrap();
    wait_dir_event(&mut sub, "plugins_dir_lost");
    wait_present(&d, false);
    wait_dead(old);

    // Waiting for it costs next to nothing: no busy loop while even the parent is gone.
    let before = cpu_ticks(d.pid());
    let window = Instant::now();
    sub.collect_events(Duration::from_millis(1500));
    let used = cpu_ticks(d.pid()) - before;
    assert!(
        used < 40,
        "contract (SPEC §5): the daemon retries with backoff, not a busy loop; it used {used} ticks in {:?}",
        window.elapsed()
    );

    fs::create_dir_all(&d.plugins).unwrap();
    let seen_back = Instant::now();
    wait_dir_event(&mut sub, "plugins_dir_back");
    assert!(
        seen_back.elapsed() < BACK_WITHIN,
        "contract (SPEC §5): supervision resumes soon after the dir is back"
    );
    let v2 = d.install("p1", &Script::new("v2"));
    d.wait_running("p1", &v2);
    wait_present(&d, true);
}

#[test]
fn symlinked_executable_added_while_running_starts_its_plugin() {
    let mut d = Daemon::new();
    fs::create_dir_all(d.plugin_dir("p1")).unwrap();
    d.start();
    d.wait_state("p1", "missing");
    // A developer's build tree outside the plugins dir.
    let build = d.root.join("src-p1").join("target");
    let v1 = Script::new("v1").render(&d.root, "p1");
    install_atomic(&build.join("p1"), &v1, 0o755);
    symlink(build.join("p1"), d.exec_path("p1")).unwrap();
    d.wait_running("p1", &v1);
    // Its target's directory is watched too: a rebuild there is hot-reloaded.
    let v2 = Script::new("v2").render(&d.root, "p1");
    install_atomic(&build.join("p1"), &v2, 0o755);
    d.wait_running("p1", &v2);
}

#[test]
fn plugin_dir_symlink_inside_the_plugins_dir_is_followed_and_outside_is_skipped_with_a_warning() {
    let config = Config::new().set("hot_reload.watch_patterns", json!(["p*"]));
    let mut d = Daemon::with_config(&config);
    // Releases kept in the plugins dir under a name no pattern matches.
    let release = d.plugins.join("releases").join("p1-1");
    let v1 = Script::new("v1").render(&d.root, "p1");
    install_atomic(&release.join("p1"), &v1, 0o755);
    symlink("releases/p1-1", d.plugin_dir("p1")).unwrap();
    let outside = d.root.join("elsewhere").join("p2");
    install_atomic(
        &outside.join("p2"),
        &Script::new("v1").render(&d.root, "p2"),
        0o755,
    );
    symlink(&outside, d.plugin_dir("p2")).unwrap();
    d.start();
    d.wait_running("p1", &v1);
    let warned = |name: &str| {
        let dir = d.plugin_dir(name).display().to_string();
        move |d: &Daemon| {
            d.stderr_text()
                .lines()
                .any(|l| l.contains("WARN") && l.contains(&dir) && l.contains("symlink"))
        }
    };
    let p2_warned = warned("p2");
    wait_until(TIMEOUT, "a warning naming the skipped plugins/p2", || {
        p2_warned(&d).then_some(())
    });
    assert!(
        d.plugin_info("p2").is_none(),
        "contract (SPEC §5): a plugin dir symlinked outside the plugins dir is skipped"
    );

    // Added while running: the same, and a verbose subscriber is told why.
    let mut sub = d.client();
    sub.subscribe(json!({"verbose": true}));
    let outside3 = d.root.join("elsewhere").join("p3");
    fs::create_dir_all(&outside3).unwrap();
    symlink(&outside3, d.plugin_dir("p3")).unwrap();
    let p3 = d.plugin_dir("p3").display().to_string();
    let why = sub.wait_event(TIMEOUT, "change_ignored for plugins/p3", |e| {
        e["event"] == "change_ignored" && e["path"] == p3.as_str()
    });
    assert!(
        why["reason"].as_str().unwrap_or("").contains("symlink"),
        "contract: the reason says it is a symlink leading outside; saw {why}"
    );
    let p3_warned = warned("p3");
    assert!(
        p3_warned(&d),
        "contract (SPEC §5): a warning names plugins/p3"
    );
    let release4 = d.plugins.join("releases").join("p4-1");
    let v4 = Script::new("v1").render(&d.root, "p4");
    install_atomic(&release4.join("p4"), &v4, 0o755);
    symlink("releases/p4-1", d.plugin_dir("p4")).unwrap();
    d.wait_running("p4", &v4);

    // Re-pointing the link is a new build of the plugin.
    let release12 = d.plugins.join("releases").join("p1-2");
    let v2 = Script::new("v2").render(&d.root, "p1");
    install_atomic(&release12.join("p1"), &v2, 0o755);
    let tmp = d.plugins.join("tmp-link");
    symlink("releases/p1-2", &tmp).unwrap();
    fs::rename(&tmp, d.plugin_dir("p1")).unwrap();
    d.wait_running("p1", &v2);
}

#[test]
fn plugins_dir_whose_parent_is_swapped_by_two_renames_is_supervised() {
    // No event reaches the plugins dir's own watch when its parent is renamed: the path is the
    // truth all the same.
    let mut d = Daemon::new();
    let release = d.root.join("release");
    d.plugins = release.join("plugins");
    fs::create_dir_all(&d.plugins).unwrap();
    d.install("gone", &Script::new("v1"));
    let (v1, pid1) = d.start_running("p1", &Script::new("v1"));
    let gone = d.wait_started("gone", "v1");
    let mut sub = d.client();
    sub.subscribe(json!({}));

    let new = d.root.join("release.new");
    install_atomic(&new.join("plugins/p1/p1"), &v1, 0o755);
    let fresh = install_into(&d, &new.join("plugins"), "fresh", &Script::new("v1"));
    fs::rename(&release, d.root.join("release.old")).unwrap();
    fs::rename(&new, &release).unwrap();

    d.wait_running("fresh", &fresh);
    wait_unlisted(&d, "gone");
    wait_dead(gone);
    wait_dir_event(&mut sub, "plugins_dir_back");
    let info = d.wait_running("p1", &v1);
    assert_eq!(
        info["pid"],
        pid1,
        "contract (SPEC §5, by version): the same build keeps running; log {:?}",
        d.log_lines("p1")
    );
    let v2 = d.install("p1", &Script::new("v2"));
    d.wait_running("p1", &v2);
}

#[test]
fn symlinked_plugins_dir_repointed_is_supervised_with_the_new_target() {
    let mut d = Daemon::new();
    let releases = d.root.join("releases");
    let link = d.root.join("current");
    d.plugins = link.clone();
    let v1 = install_into(&d, &releases.join("1"), "p1", &Script::new("v1"));
    symlink("releases/1", &link).unwrap();
    d.start();
    d.wait_running("p1", &v1);

    let v2 = install_into(&d, &releases.join("2"), "p1", &Script::new("v2"));
    let p2 = install_into(&d, &releases.join("2"), "p2", &Script::new("v1"));
    let tmp = d.root.join("current.tmp");
    symlink("releases/2", &tmp).unwrap();
    fs::rename(&tmp, &link).unwrap();
    d.wait_running("p1", &v2);
    d.wait_running("p2", &p2);
    // The new target's plugin dirs are the ones watched.
    let v3 = d.install("p2", &Script::new("v3"));
    d.wait_running("p2", &v3);
}

#[test]
fn with_watching_switched_off_status_says_whether_the_plugins_dir_exists() {
    let mut d = Daemon::new();
    d.set_env("HOTRELOAD_WATCH", "0");
    d.start();
    assert_eq!(
        d.status()["daemon"]["plugins_dir_present"],
        true,
        "contract (SPEC §6): status has daemon.plugins_dir_present"
    );
    fs::remove_dir(&d.plugins).unwrap();
    wait_present(&d, false);
}

#[test]
fn symlinked_executable_linked_before_its_first_build_starts_when_the_build_lands() {
    let mut d = Daemon::new();
    fs::create_dir_all(d.plugin_dir("p1")).unwrap();
    d.start();
    // `ln -s` first, `cargo build` later: the link dangles and its build dir does not exist.
    let build = d.root.join("src-p1").join("target").join("debug");
    symlink(build.join("p1"), d.exec_path("p1")).unwrap();
    let v1 = Script::new("v1").render(&d.root, "p1");
    install_atomic(&build.join("p1"), &v1, 0o755);
    d.wait_running("p1", &v1);
}
