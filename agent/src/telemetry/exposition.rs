//! The `/metrics` exposition, encoded by the Prometheus project's Rust client
//! (`prometheus-client`, OpenMetrics 1.0 text), and the same families in the text format
//! 0.0.4 for scrapers and tools that only read that one (`promtool check metrics` in
//! Prometheus 2.x).
//!
//! The agent's counters stay in its own atomics (the request path touches nothing else); each
//! scrape reads them into an [`Exposition`], which the crate encodes as a collector.

use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

/// One sample's labels, in order.
type Labels = Vec<(String, String)>;

#[derive(Debug)]
enum Value {
    Counter(u64),
    /// A counter of seconds.
    Seconds(f64),
    Gauge(f64),
    /// A gauge that counts (written without a fraction).
    Count(i64),
    Histogram {
        sum: f64,
        count: u64,
        buckets: Vec<(f64, u64)>,
    },
}

#[derive(Debug)]
pub(super) struct Family {
    name: String,
    help: String,
    kind: MetricType,
    samples: Vec<(Labels, Value)>,
}

fn labels(l: &[(&str, &str)]) -> Labels {
    l.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

impl Family {
    pub(super) fn count(&mut self, l: &[(&str, &str)], v: u64) {
        self.samples.push((labels(l), Value::Counter(v)));
    }

    pub(super) fn seconds(&mut self, l: &[(&str, &str)], v: f64) {
        self.samples.push((labels(l), Value::Seconds(v)));
    }

    /// A gauge that counts things (queue depth, open connections, a 0/1 state).
    pub(super) fn level(&mut self, l: &[(&str, &str)], v: i64) {
        self.samples.push((labels(l), Value::Count(v)));
    }

    pub(super) fn sample(&mut self, l: &[(&str, &str)], v: f64) {
        self.samples.push((labels(l), Value::Gauge(v)));
    }

    /// A histogram from cumulative bucket counts (`cumulative[i]` observations at or under
    /// `bounds[i]`), `count` observations in all.
    pub(super) fn histogram(&mut self, l: &[(&str, &str)], bounds: &[f64], cumulative: &[u64], count: u64, sum: f64) {
        let mut buckets = Vec::with_capacity(bounds.len() + 1);
        let mut below = 0;
        for (le, c) in bounds.iter().zip(cumulative) {
            buckets.push((*le, c.saturating_sub(below)));
            below = *c;
        }
        // The crate's encoder writes `+Inf` for this bound.
        buckets.push((f64::MAX, count.saturating_sub(below)));
        self.samples.push((labels(l), Value::Histogram { sum, count, buckets }));
    }
}

/// The families of one scrape, in order.
#[derive(Debug, Default)]
pub(super) struct Exposition {
    families: Vec<Family>,
}

impl Exposition {
    fn family(&mut self, name: &str, help: &str, kind: MetricType) -> &mut Family {
        self.families.push(Family { name: name.to_owned(), help: help.to_owned(), kind, samples: Vec::new() });
        let last = self.families.len() - 1;
        &mut self.families[last]
    }

    /// A counter family; `name` without `_total` (the encoder adds it).
    pub(super) fn counter(&mut self, name: &str, help: &str) -> &mut Family {
        self.family(name, help, MetricType::Counter)
    }

    pub(super) fn gauge(&mut self, name: &str, help: &str) -> &mut Family {
        self.family(name, help, MetricType::Gauge)
    }

    pub(super) fn histogram(&mut self, name: &str, help: &str) -> &mut Family {
        self.family(name, help, MetricType::Histogram)
    }

    /// OpenMetrics text, ending in `# EOF`.
    pub(super) fn encode(self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::with_capacity(8192);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            // Only a formatter error, which writing to a String does not raise.
            tracing::error!(error = %e, "metrics could not be encoded");
        }
        out
    }
}

impl prometheus_client::collector::Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        for f in &self.families {
            let mut metric = encoder.encode_descriptor(&f.name, &f.help, None, f.kind)?;
            for (labels, value) in &f.samples {
                // A sample without labels is written bare (`name 1`, not `name{} 1`).
                if labels.is_empty() {
                    encode_value(&mut metric, value)?;
                } else {
                    encode_value(&mut metric.encode_family(labels)?, value)?;
                }
            }
        }
        Ok(())
    }
}

fn encode_value(e: &mut MetricEncoder<'_>, value: &Value) -> Result<(), std::fmt::Error> {
    match value {
        Value::Counter(v) => e.encode_counter::<NoLabelSet, _, f64>(v, None),
        Value::Seconds(v) => e.encode_counter::<NoLabelSet, _, f64>(v, None),
        Value::Gauge(v) => e.encode_gauge(v),
        Value::Count(v) => e.encode_gauge(v),
        Value::Histogram { sum, count, buckets } => e.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None),
    }
}

/// The process's resident memory, CPU time and open file descriptors, from `/proc/self`,
/// under the names Prometheus client libraries use; nothing where `/proc` is absent.
pub(super) fn process_metrics(x: &mut Exposition) {
    // CPU times are in clock ticks: 100 a second on Linux (USER_HZ).
    let ticks = 100.0;
    let rss_kb = std::fs::read_to_string("/proc/self/status").ok().and_then(|st| {
        st.lines().find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse::<f64>().ok())
    });
    if let Some(kb) = rss_kb {
        x.gauge("process_resident_memory_bytes", "Resident memory size in bytes.").sample(&[], kb * 1024.0);
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may hold spaces): utime and stime are the 12th
        // and 13th.
        let fields: Vec<&str> = stat.rsplit_once(") ").map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
        let f = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
        if let (Some(u), Some(s)) = (f(11), f(12)) {
            x.counter("process_cpu_seconds", "Total user and system CPU time spent in seconds.")
                .seconds(&[], (u + s) / ticks);
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        x.gauge("process_open_fds", "Number of open file descriptors.").level(&[], fds.count() as i64);
    }
}

/// The same exposition in the text format 0.0.4: a counter family is named with its `_total`
/// suffix, and the OpenMetrics-only lines (`# UNIT`, `# EOF`) are left out.
pub fn to_text_format(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            if let Some(h) = help.replace(line) {
                out.push_str(h);
                out.push('\n');
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let suffix = if kind == "counter" { "_total" } else { "" };
            if let Some(h) = help.take() {
                let text = h.strip_prefix("# HELP ").and_then(|r| r.split_once(' ')).map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name}{suffix} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name}{suffix} {kind}\n"));
            continue;
        }
        if let Some(h) = help.take() {
            out.push_str(h);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_encode_as_openmetrics_and_as_the_text_format() {
        let mut x = Exposition::default();
        x.counter("outpost_requests", "Requests.").count(&[("model", "m"), ("version", "1.0.0")], 3);
        x.gauge("outpost_up", "Up.").level(&[], 1);
        x.gauge("outpost_load", "Load.").sample(&[], 0.5);
        x.histogram("outpost_latency_seconds", "Latency.").histogram(&[("model", "m")], &[0.1, 1.0], &[1, 2], 3, 2.5);
        let om = x.encode();
        assert!(om.contains("# TYPE outpost_requests counter\n"), "{om}");
        assert!(om.contains("outpost_requests_total{model=\"m\",version=\"1.0.0\"} 3\n"), "{om}");
        assert!(
            om.contains("outpost_latency_seconds_bucket{le=\"+Inf\",model=\"m\"} 3")
                || om.contains("outpost_latency_seconds_bucket{model=\"m\",le=\"+Inf\"} 3"),
            "{om}"
        );
        assert!(om.ends_with("# EOF\n"), "{om}");
        let text = to_text_format(&om);
        assert!(
            text.contains("# HELP outpost_requests_total Requests.\n# TYPE outpost_requests_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE outpost_up gauge\noutpost_up 1\n"), "{text}");
        assert!(text.contains("outpost_load 0.5\n"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
    }
}
