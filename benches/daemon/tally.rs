//! Counting reload events per plugin, for the benchmarks that change many plugins at once (scale,
//! storm) and must show exactly one reload for each plugin that really changed, and none for the
//! others.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::Outcome;
use crate::client::{Event, EventStream};
use crate::fixture::Daemon;
use crate::report::Report;

/// Reload events seen so far, by plugin.
#[derive(Default)]
pub struct Tally {
    pub started: HashMap<String, u32>,
    /// Arrival of each plugin's latest `reload_succeeded`.
    pub succeeded_at: HashMap<String, Instant>,
    pub succeeded: u32,
    pub failed: u32,
    /// `reload_started.trigger` values (watch, rescan, ...) and how often each came.
    pub triggers: BTreeMap<String, u32>,
    /// Events the daemon dropped for this subscriber (`lagged.dropped`): counts are then lower
    /// bounds.
    pub lagged: u64,
}

impl Tally {
    pub fn record(&mut self, event: &Event) {
        let plugin = event.plugin().to_owned();
        match event.name() {
            "reload_started" => {
                *self.started.entry(plugin).or_default() += 1;
                let trigger = event.text("trigger").to_owned();
                *self.triggers.entry(trigger).or_default() += 1;
            }
            "reload_succeeded" => {
                self.succeeded += 1;
                self.succeeded_at.insert(plugin, event.at);
            }
            "reload_failed" => self.failed += 1,
            "lagged" => self.lagged += event.body["dropped"].as_u64().unwrap_or(1),
            _ => {}
        }
    }

    /// Records events until `done` holds (true) or `deadline` passes (false).
    pub fn collect_until(
        &mut self,
        events: &EventStream,
        deadline: Instant,
        done: impl Fn(&Tally) -> bool,
    ) -> bool {
        while !done(self) {
            let Some(event) = events.next_before(deadline) else {
                return false;
            };
            self.record(&event);
        }
        true
    }

    /// Records every event for `period`: the bounded wait that shows a stray extra reload.
    pub fn collect_for(&mut self, events: &EventStream, period: Duration) {
        let deadline = Instant::now() + period;
        while let Some(event) = events.next_before(deadline) {
            self.record(&event);
        }
    }

    /// Reloads started for `id`.
    pub fn starts(&self, id: &str) -> u32 {
        self.started.get(id).copied().unwrap_or(0)
    }

    pub fn total_started(&self) -> u32 {
        self.started.values().sum()
    }

    /// Notes in `report` that counts are lower bounds, if the subscriber lagged.
    pub fn note_lag(&self, report: &mut Report) {
        if self.lagged > 0 {
            report.note(format!(
                "the subscriber lagged: {} events dropped, counts are lower bounds",
                self.lagged
            ));
        }
    }

    /// `watch=998 rescan=2`, for a note.
    pub fn describe_triggers(&self) -> String {
        let parts: Vec<String> = self
            .triggers
            .iter()
            .map(|(t, n)| format!("{t}={n}"))
            .collect();
        parts.join(" ")
    }
}

/// Adds how many `event`s came to `report`, keyed by the event's name.
pub fn report_count(report: &mut Report, event: &str, count: u32) {
    report.value(event, &format!("{event} events"), f64::from(count), "");
}

/// `(state, version)` of every plugin by id, from `list`.
pub type Listed = HashMap<String, (String, String)>;

/// Whether `listed` shows plugin `id` running `version`.
pub fn runs_version(listed: &Listed, id: &str, version: &str) -> bool {
    listed
        .get(id)
        .is_some_and(|(state, v)| state == "running" && v == version)
}

/// `(state, version)` of every plugin, from `list`.
pub fn plugin_versions(daemon: &Daemon) -> Outcome<Listed> {
    let reply = daemon.client()?.command("list")?;
    let plugins = reply["plugins"]
        .as_array()
        .ok_or_else(|| format!("`list` reply has no plugins array: {reply}"))?;
    let text =
        |plugin: &serde_json::Value, key: &str| plugin[key].as_str().unwrap_or("").to_owned();
    Ok(plugins
        .iter()
        .map(|p| (text(p, "id"), (text(p, "state"), text(p, "version"))))
        .collect())
}
