//! A latency histogram in Prometheus's form (cumulative buckets, a count
//! and a sum): the requests' latency and the database's.

use std::fmt::Write as _;
use std::time::Duration;

/// Upper bounds of the buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0, 10.0,
];

/// Durations counted by bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Histogram {
    /// How many took at most each bucket's bound (cumulative).
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    /// Count one duration.
    pub(crate) fn record(&mut self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        for (count, bound) in self.counts.iter_mut().zip(BUCKETS) {
            if secs <= bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }

    /// The sample lines of metric `name` (its `_bucket`, `_sum` and
    /// `_count`), each with `labels` (`key="value",...` or empty).
    pub(crate) fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (count, bound) in self.counts.iter().zip(BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_labels_are_kept() {
        let mut h = Histogram::default();
        h.record(Duration::from_micros(300));
        h.record(Duration::from_millis(20));
        h.record(Duration::from_secs(20));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "kind=\"read\"");
        assert!(out.contains("x_seconds_bucket{kind=\"read\",le=\"0.00025\"} 0\n"));
        assert!(out.contains("x_seconds_bucket{kind=\"read\",le=\"0.0005\"} 1\n"));
        assert!(out.contains("x_seconds_bucket{kind=\"read\",le=\"0.025\"} 2\n"));
        assert!(out.contains("x_seconds_bucket{kind=\"read\",le=\"10\"} 2\n"));
        assert!(out.contains("x_seconds_bucket{kind=\"read\",le=\"+Inf\"} 3\n"));
        assert!(out.contains("x_seconds_count{kind=\"read\"} 3\n"));
        let mut bare = String::new();
        h.render(&mut bare, "y", "");
        assert!(bare.contains("y_bucket{le=\"+Inf\"} 3\n"));
        assert!(bare.contains("y_count 3\n"));
    }
}
