//! Prometheus metrics, hand-formatted (text exposition format 0.0.4): requests and their
//! durations by route, adapter and status; queue depth; rows per forward; Monte Carlo samples.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the request-duration histogram.
const DURATION_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Upper bounds of the rows-per-forward histogram.
const ROW_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

#[derive(Clone, Debug, Default)]
struct Histogram {
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.buckets.len() != bounds.len() {
            self.buckets = vec![0; bounds.len()];
        }
        for (b, &le) in self.buckets.iter_mut().zip(bounds) {
            if v <= le {
                *b += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, le) in self.buckets.iter().zip(bounds) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {b}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// The server's counters. Label values are route templates, loaded adapter names (validated to
/// `[A-Za-z0-9._-]`) or `-`, and status codes, so nothing a client sends reaches a label.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), Histogram>>,
    rows: Mutex<Histogram>,
    /// Requests waiting for the model worker.
    pub queue_depth: AtomicU64,
    /// Requests being answered (holding a concurrency permit).
    pub in_flight: AtomicU64,
    /// Forwards run by the worker.
    pub forwards: AtomicU64,
    /// Monte Carlo samples drawn (samples × inputs of sampled requests).
    pub mc_samples: AtomicU64,
    /// Requests refused with 429.
    pub overloaded: AtomicU64,
    /// Adapters loaded now.
    pub adapters: AtomicU64,
}

impl Metrics {
    /// Records one answered request.
    pub fn request(&self, route: &str, adapter: &str, status: u16, seconds: f64) {
        if let Ok(mut m) = self.requests.lock() {
            m.entry((route.to_string(), adapter.to_string(), status)).or_default().observe(&DURATION_BUCKETS, seconds);
        }
    }

    /// Records one forward of `rows` rows.
    pub fn forward(&self, rows: usize) {
        self.forwards.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut h) = self.rows.lock() {
            h.observe(&ROW_BUCKETS, rows as f64);
        }
    }

    /// The Prometheus text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP pvera_requests_total Requests answered, by route, adapter and status.");
        let _ = writeln!(out, "# TYPE pvera_requests_total counter");
        let reqs = self.requests.lock().map(|m| m.clone()).unwrap_or_default();
        for ((route, adapter, status), h) in &reqs {
            let _ = writeln!(out, "pvera_requests_total{{route=\"{route}\",adapter=\"{adapter}\",status=\"{status}\"}} {}", h.count);
        }
        let _ = writeln!(out, "# HELP pvera_request_duration_seconds Time from the request's arrival to its answer.");
        let _ = writeln!(out, "# TYPE pvera_request_duration_seconds histogram");
        for ((route, adapter, status), h) in &reqs {
            let labels = format!("route=\"{route}\",adapter=\"{adapter}\",status=\"{status}\"");
            h.write(&mut out, "pvera_request_duration_seconds", &labels, &DURATION_BUCKETS);
        }
        let gauges = [
            ("pvera_queue_depth", "gauge", "Requests waiting for the model worker.", &self.queue_depth),
            ("pvera_in_flight_requests", "gauge", "Requests being answered.", &self.in_flight),
            ("pvera_adapters_loaded", "gauge", "Adapters loaded.", &self.adapters),
            ("pvera_forwards_total", "counter", "Forward passes run by the model worker.", &self.forwards),
            ("pvera_mc_samples_total", "counter", "Monte Carlo samples drawn (samples x inputs).", &self.mc_samples),
            ("pvera_overloaded_total", "counter", "Requests refused with 429 (over --max-concurrent-requests).", &self.overloaded),
        ];
        for (name, kind, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
        let _ = writeln!(out, "# HELP pvera_batch_rows Rows per forward pass (packed requests, Monte Carlo stacks).");
        let _ = writeln!(out, "# TYPE pvera_batch_rows histogram");
        if let Ok(h) = self.rows.lock() {
            let mut h = h.clone();
            if h.buckets.is_empty() {
                h.buckets = vec![0; ROW_BUCKETS.len()];
            }
            h.write(&mut out, "pvera_batch_rows", "", &ROW_BUCKETS);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.request("/classify", "spam", 200, 0.02);
        m.request("/classify", "spam", 200, 0.2);
        m.forward(12);
        let t = m.render();
        assert!(t.contains("pvera_requests_total{route=\"/classify\",adapter=\"spam\",status=\"200\"} 2"), "{t}");
        assert!(t.contains("pvera_request_duration_seconds_bucket{route=\"/classify\",adapter=\"spam\",status=\"200\",le=\"0.025\"} 1"), "{t}");
        assert!(t.contains("pvera_batch_rows_bucket{le=\"16\"} 1") && t.contains("pvera_batch_rows_count 1"), "{t}");
        assert!(t.contains("pvera_forwards_total 1"), "{t}");
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = line.rsplit_once(' ').unwrap();
            assert!(v.parse::<f64>().is_ok(), "{line}");
        }
    }
}
