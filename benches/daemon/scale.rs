//! Scale: 1000 running plugins all get a new build within one second; every one must reload
//! exactly once, and the figure is how long the daemon takes to finish them all.
//!
//! The builds are written to a staging dir first (untimed), then renamed over the 1000
//! executables in one burst, like a workspace build finishing. Debounce is 100 ms and startup grace
//! 50 ms, so those two add a fixed ~150 ms to each plugin's figure.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::fixture::{self, Config, Layout};
use crate::plugin::{self, Builds};
use crate::report::{Bound, Report};
use crate::tally::{self, Tally};
use crate::{Bench, Outcome, millis};

const PLUGINS: usize = 1000;

pub fn run(bench: &Bench) -> Outcome<Report> {
    let mut builds = Builds::new(0)?;
    let layout = Layout::create(&bench.root, "scale")?;
    let config = Config::default();
    let ids = plugin::ids(PLUGINS);
    let mut daemon =
        fixture::start_with_plugins(&bench.daemon, layout, &config, &ids, &mut builds)?;
    daemon.wait_plugins_running(PLUGINS as u64, Duration::from_secs(70))?;
    let events = daemon.subscribe()?;

    let mut staged = Vec::with_capacity(PLUGINS);
    let mut expected = HashMap::with_capacity(PLUGINS);
    for (n, id) in ids.iter().enumerate() {
        let bytes = builds.build(1 + n as u64);
        expected.insert(id.clone(), plugin::version_of(bytes));
        staged.push(plugin::stage(&daemon.layout.staging, id, 1, bytes)?);
    }

    let first_rename = Instant::now();
    let mut renamed_at = HashMap::with_capacity(PLUGINS);
    for (id, build) in ids.iter().zip(&staged) {
        plugin::swap_in(build, &daemon.layout.exec(id))?;
        renamed_at.insert(id.clone(), Instant::now());
    }
    let renames_took = first_rename.elapsed();

    let mut tally = Tally::default();
    let all_done = tally.collect_until(&events, first_rename + Duration::from_secs(90), |t| {
        t.succeeded_at.len() + t.failed as usize >= PLUGINS
    });
    let last_done = tally.succeeded_at.values().max().copied();
    tally.collect_for(&events, Duration::from_millis(3 * config.debounce_ms + 500));
    daemon.ensure_alive()?;
    let listed = tally::plugin_versions(&daemon)?;

    let mut report = Report::new(
        "scale",
        "1000 plugins, a new build renamed over each within 1 s (debounce 100 ms, grace 50 ms)",
    );
    let per_plugin: Vec<f64> = tally
        .succeeded_at
        .iter()
        .filter_map(|(id, at)| renamed_at.get(id).map(|renamed| millis(*at - *renamed)))
        .collect();
    report.distribution(
        "rename_to_succeeded_ms",
        "own rename -> own reload_succeeded",
        "ms",
        &per_plugin,
    );
    report.value(
        "renames_ms",
        "1000 renames took",
        millis(renames_took),
        "ms",
    );
    if let Some(last) = last_done {
        let total = millis(last - first_rename);
        report.value(
            "all_done_ms",
            "first rename -> last reload_succeeded",
            total,
            "ms",
        );
    }
    let on_new = ids
        .iter()
        .filter(|id| tally::runs_version(&listed, id, &expected[*id]))
        .count();
    tally::report_count(&mut report, "reload_started", tally.total_started());
    tally::report_count(&mut report, "reload_succeeded", tally.succeeded);
    tally::report_count(&mut report, "reload_failed", tally.failed);
    report.value(
        "running_new_version",
        "plugins running the new version (list)",
        on_new as f64,
        "",
    );
    report.target(
        "1000 renames took",
        millis(renames_took),
        Bound::AtMost(1000.0),
        "ms",
    );
    report.target(
        "reload_succeeded events",
        f64::from(tally.succeeded),
        Bound::Exactly(1000.0),
        "",
    );
    report.target(
        "reload_started events",
        f64::from(tally.total_started()),
        Bound::Exactly(1000.0),
        "",
    );
    report.target(
        "plugins running the new version",
        on_new as f64,
        Bound::Exactly(1000.0),
        "",
    );
    report.note(format!(
        "reload_started triggers: {}",
        tally.describe_triggers()
    ));
    if !all_done {
        report.note("not every plugin finished its reload within 90 s of the first rename");
    }
    tally.note_lag(&mut report);
    Ok(report)
}
