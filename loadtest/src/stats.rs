//! Latency and size distributions for reports: exact percentiles over the
//! recorded samples (runs are bounded, so keeping every sample is cheap and
//! needs no approximation).

use std::time::Duration;

use serde::Serialize;

/// Recorded samples of one quantity.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    values: Vec<f64>,
}

/// p50/p95/p99/max of a sample set, in the samples' unit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    /// `p50 …  p95 …  p99 …  max … ms` with `decimals` places.
    pub fn line(&self, decimals: usize) -> String {
        let d = decimals;
        format!(
            "p50 {:.d$}  p95 {:.d$}  p99 {:.d$}  max {:.d$} ms",
            self.p50, self.p95, self.p99, self.max
        )
    }

    /// [`Summary::line`], or `-` when nothing was recorded.
    pub fn line_of(s: Option<Summary>, decimals: usize) -> String {
        s.map_or_else(|| "-".to_owned(), |s| s.line(decimals))
    }

    /// One indented line per key (such as "n0→n1"), under a summary line.
    pub fn by_key(rows: &std::collections::BTreeMap<String, Summary>, decimals: usize) -> String {
        rows.iter()
            .map(|(k, s)| format!("    {k:<26}{}\n", s.line(decimals)))
            .collect()
    }
}

impl Samples {
    pub fn record(&mut self, v: f64) {
        if v.is_finite() {
            self.values.push(v);
        }
    }

    /// Records a duration in milliseconds.
    pub fn record_ms(&mut self, d: Duration) {
        self.record(d.as_secs_f64() * 1_000.0);
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn merge(&mut self, other: &Samples) {
        self.values.extend_from_slice(&other.values);
    }

    /// The summary of every non-empty set in `by_key`.
    pub fn summaries(
        by_key: &std::collections::BTreeMap<String, Samples>,
    ) -> std::collections::BTreeMap<String, Summary> {
        by_key
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.summary()?)))
            .collect()
    }

    /// Nearest-rank percentiles; `None` when nothing was recorded.
    pub fn summary(&self) -> Option<Summary> {
        if self.values.is_empty() {
            return None;
        }
        let mut v = self.values.clone();
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let idx = ((p / 100.0) * v.len() as f64).ceil() as usize;
            v[idx.clamp(1, v.len()) - 1]
        };
        Some(Summary {
            count: v.len(),
            p50: rank(50.0),
            p95: rank(95.0),
            p99: rank(99.0),
            max: v[v.len() - 1],
            mean: v.iter().sum::<f64>() / v.len() as f64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut s = Samples::default();
        assert_eq!(s.summary(), None);
        for v in (1..=100).rev() {
            s.record(f64::from(v));
        }
        s.record(f64::NAN);
        let sum = s.summary().expect("samples");
        assert_eq!(sum.count, 100);
        assert_eq!(
            (sum.p50, sum.p95, sum.p99, sum.max),
            (50.0, 95.0, 99.0, 100.0)
        );
        assert_eq!(sum.mean, 50.5);
        let mut one = Samples::default();
        one.record_ms(Duration::from_micros(1500));
        assert_eq!(one.summary().map(|s| s.p99), Some(1.5));
        assert_eq!(
            one.summary().map(|s| s.line(1)).as_deref(),
            Some("p50 1.5  p95 1.5  p99 1.5  max 1.5 ms")
        );
        assert_eq!(Summary::line_of(None, 2), "-");
    }
}
