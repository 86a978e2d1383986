//! Order statistics over samples: the p50/p90/p99/max every benchmark prints.
//!
//! Percentiles use the nearest-rank method (the smallest sample with at least p% of the samples at
//! or below it), so every figure printed is a value that was actually measured, never an
//! interpolation between two runs.

/// Summary of one distribution; all values share the unit of the samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    /// `None` for no samples: an empty distribution has no median to report.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let sum: f64 = sorted.iter().sum();
        Some(Summary {
            count: sorted.len(),
            min: sorted[0],
            p50: nearest_rank(&sorted, 50.0),
            p90: nearest_rank(&sorted, 90.0),
            p99: nearest_rank(&sorted, 99.0),
            max: sorted[sorted.len() - 1],
            mean: sum / sorted.len() as f64,
        })
    }
}

/// The p-th percentile of `sorted` (ascending, non-empty) by nearest rank.
fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Checks of the percentile arithmetic; run by `cargo test --bench daemon` (see `daemon.rs`).
pub fn self_check() -> Result<(), String> {
    let hundred: Vec<f64> = (1..=100).rev().map(f64::from).collect();
    let summary = Summary::of(&hundred).ok_or("no summary for 100 samples")?;
    let want = (100, 1.0, 50.0, 90.0, 99.0, 100.0, 50.5);
    let got = (
        summary.count,
        summary.min,
        summary.p50,
        summary.p90,
        summary.p99,
        summary.max,
        summary.mean,
    );
    if got != want {
        return Err(format!("summary of 1..=100: got {got:?}, want {want:?}"));
    }
    let single = Summary::of(&[7.0]).ok_or("no summary for one sample")?;
    if (single.p50, single.p99, single.max) != (7.0, 7.0, 7.0) {
        return Err(format!("summary of one sample: got {single:?}"));
    }
    // Nearest rank on 3 samples: p50 is the 2nd, p90 and p99 the 3rd.
    let three = Summary::of(&[3.0, 1.0, 2.0]).ok_or("no summary for three samples")?;
    if (three.p50, three.p90, three.p99) != (2.0, 3.0, 3.0) {
        return Err(format!("summary of 3 samples: got {three:?}"));
    }
    if Summary::of(&[]).is_some() {
        return Err("an empty sample set must have no summary".into());
    }
    Ok(())
}
