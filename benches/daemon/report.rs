//! One benchmark's results: a plain-text table for people and one JSON line for scripts.
//!
//! A benchmark adds distributions, single values, targets and notes as it goes; `print` writes the
//! table, one `PASS`/`MISS` line per target and a single line starting with `{"bench":` holding
//! everything (grep it out of a log, or set `HOTRELOAD_BENCH_JSON` to append it to a file).
//! Missing a target is a finding to report, never a panic.

use std::fs::OpenOptions;
use std::io::Write;

use serde_json::{Map, Value, json};

use crate::machine::Machine;
use crate::stats::Summary;

/// Which side of a limit passes.
#[derive(Debug, Clone, Copy)]
pub enum Bound {
    AtMost(f64),
    AtLeast(f64),
    Exactly(f64),
}

impl Bound {
    fn accepts(self, actual: f64) -> bool {
        match self {
            Bound::AtMost(limit) => actual <= limit,
            Bound::AtLeast(limit) => actual >= limit,
            Bound::Exactly(limit) => actual == limit,
        }
    }

    fn describe(self, unit: &str) -> String {
        let (op, limit) = match self {
            Bound::AtMost(limit) => ("<=", limit),
            Bound::AtLeast(limit) => (">=", limit),
            Bound::Exactly(limit) => ("==", limit),
        };
        format!("{op} {} {unit}", number(limit))
            .trim_end()
            .to_owned()
    }
}

struct Check {
    label: String,
    actual: f64,
    pass: bool,
}

/// Results of one benchmark, printed once at its end.
pub struct Report {
    name: String,
    title: String,
    table: Vec<String>,
    checks: Vec<Check>,
    notes: Vec<String>,
    metrics: Map<String, Value>,
}

impl Report {
    pub fn new(name: &str, title: &str) -> Report {
        Report {
            name: name.into(),
            title: title.into(),
            table: Vec::new(),
            checks: Vec::new(),
            notes: Vec::new(),
            metrics: Map::new(),
        }
    }

    /// Adds a distribution row; returns its summary (`None` when there were no samples).
    pub fn distribution(
        &mut self,
        key: &str,
        label: &str,
        unit: &str,
        samples: &[f64],
    ) -> Option<Summary> {
        let Some(s) = Summary::of(samples) else {
            self.table
                .push(format!("{label:<48} {unit:>5} {:>7}  (no samples)", 0));
            self.metrics
                .insert(key.into(), json!({"unit": unit, "count": 0}));
            return None;
        };
        self.table.push(format!(
            "{label:<48} {unit:>5} {:>7} {:>9} {:>9} {:>9} {:>9}",
            s.count,
            number(s.p50),
            number(s.p90),
            number(s.p99),
            number(s.max)
        ));
        let metric = json!({"unit": unit, "count": s.count, "min": round(s.min),
                            "p50": round(s.p50), "p90": round(s.p90), "p99": round(s.p99),
                            "max": round(s.max), "mean": round(s.mean)});
        self.metrics.insert(key.into(), metric);
        Some(s)
    }

    /// Adds a single figure (a count, a total, a rate).
    pub fn value(&mut self, key: &str, label: &str, value: f64, unit: &str) {
        self.table
            .push(format!("{label:<48} {unit:>5} {:>7}", number(value)));
        self.metrics
            .insert(key.into(), json!({"unit": unit, "value": round(value)}));
    }

    /// Records a target and whether `actual` meets it.
    pub fn target(&mut self, label: &str, actual: f64, bound: Bound, unit: &str) {
        self.checks.push(Check {
            label: format!("{label} {}", bound.describe(unit)),
            actual,
            pass: bound.accepts(actual),
        });
    }

    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    pub fn misses(&self) -> usize {
        self.checks.iter().filter(|check| !check.pass).count()
    }

    pub fn print(&self, machine: &Machine) {
        println!("\n== {}: {} ==", self.name, self.title);
        println!(
            "{:<48} {:>5} {:>7} {:>9} {:>9} {:>9} {:>9}",
            "metric", "unit", "count", "p50", "p90", "p99", "max"
        );
        for row in &self.table {
            println!("{row}");
        }
        for check in &self.checks {
            let verdict = if check.pass { "PASS" } else { "MISS" };
            println!(
                "{verdict}  {} (measured {})",
                check.label,
                number(check.actual)
            );
        }
        for note in &self.notes {
            println!("note: {note}");
        }
        emit_json(&self.to_json(machine));
    }

    fn to_json(&self, machine: &Machine) -> Value {
        let targets: Vec<Value> = self
            .checks
            .iter()
            .map(|c| json!({"target": c.label, "actual": round(c.actual), "pass": c.pass}))
            .collect();
        json!({
            "bench": self.name,
            "date": machine.date,
            "machine": machine.to_json(),
            "metrics": self.metrics,
            "targets": targets,
            "notes": self.notes,
        })
    }
}

/// Prints the JSON line of a benchmark that could not run at all.
pub fn print_error(name: &str, error: &str, machine: &Machine) {
    println!("\n== {name}: ERROR ==\n{error}");
    emit_json(
        &json!({"bench": name, "date": machine.date, "machine": machine.to_json(),
                      "error": error}),
    );
}

fn emit_json(line: &Value) {
    println!("{line}");
    let Some(path) = std::env::var_os("HOTRELOAD_BENCH_JSON") else {
        return;
    };
    let appended = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| writeln!(file, "{line}"));
    if let Err(e) = appended {
        eprintln!(
            "failed to append results to `{}` (HOTRELOAD_BENCH_JSON): {e}",
            path.to_string_lossy()
        );
    }
}

/// Microsecond precision for millisecond figures is all a measurement here can carry.
fn round(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// Three significant decimals for small figures, none for large ones.
fn number(value: f64) -> String {
    if value.fract() == 0.0 || value.abs() >= 1000.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.3}")
    }
}

/// Checks of the verdict logic and number formatting; run by `cargo test --bench daemon`.
pub fn self_check() -> Result<(), String> {
    let cases = [
        (Bound::AtMost(2.0), 2.0, true),
        (Bound::AtMost(2.0), 2.001, false),
        (Bound::AtLeast(20_000.0), 19_999.0, false),
        (Bound::Exactly(1000.0), 1000.0, true),
        (Bound::Exactly(0.0), 1.0, false),
    ];
    for (bound, actual, want) in cases {
        if bound.accepts(actual) != want {
            return Err(format!("{bound:?} accepting {actual}: want {want}"));
        }
    }
    let formatted = (number(1.23456), number(200.0), number(12345.6));
    if formatted != ("1.235".into(), "200".into(), "12346".into()) {
        return Err(format!("number formatting gave {formatted:?}"));
    }
    let mut report = Report::new("x", "self check");
    report.distribution("lat", "latency", "ms", &[1.0, 2.0, 3.0]);
    report.target("p50", 2.0, Bound::AtMost(1.0), "ms");
    if report.misses() != 1 || report.metrics["lat"]["p50"] != json!(2.0) {
        return Err(format!("report recorded {:?}", report.metrics));
    }
    Ok(())
}
