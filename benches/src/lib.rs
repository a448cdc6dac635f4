//! Small helpers shared by the bench binaries: percentiles and table printing.

use std::time::Duration;

/// Percentile (0–100) of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// `p50 / p99 / mean` of samples, in microseconds.
pub struct Summary {
    pub p50_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    pub n: usize,
}

pub fn summarize(mut samples: Vec<Duration>) -> Summary {
    samples.sort();
    let n = samples.len();
    let mean = samples.iter().sum::<Duration>().as_secs_f64() / n.max(1) as f64;
    Summary {
        p50_us: percentile(&samples, 50.0).as_secs_f64() * 1e6,
        p99_us: percentile(&samples, 99.0).as_secs_f64() * 1e6,
        mean_us: mean * 1e6,
        n,
    }
}

/// Print a markdown table row.
pub fn row(cells: &[String]) {
    let line = format!("| {} |", cells.join(" | "));
    // Bench binaries are tools whose output is the table itself.
    std::io::Write::write_all(&mut std::io::stdout(), format!("{line}\n").as_bytes()).ok();
}
