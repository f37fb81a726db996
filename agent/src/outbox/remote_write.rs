//! Telemetry as Prometheus remote-write 1.0: the agent's own `/metrics` exposition, sampled at
//! each telemetry snapshot, sent as a snappy-compressed protobuf `WriteRequest` with each
//! snapshot's own timestamp (a backlog keeps its original times, in order per series).
//!
//! The messages are `prometheus.WriteRequest`, `TimeSeries`, `Label` and `Sample` of
//! Prometheus's `prompb` (remote.proto, types.proto), the fields remote-write 1.0 uses.

use std::collections::BTreeMap;

/// `prometheus.WriteRequest` (field 1; metadata, field 3, is not sent).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

/// `prometheus.TimeSeries`: sorted labels (with `__name__`) and samples oldest first.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, prost::Message)]
pub struct Label {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    #[prost(double, tag = "1")]
    pub value: f64,
    /// Milliseconds since the epoch.
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// One sample line of the text exposition format: labels (with `__name__`), value.
pub type Parsed = (Vec<(String, String)>, f64);

/// The samples of a text exposition (format 0.0.4; comments and blank lines skipped). A line
/// that does not parse is skipped: the text is the agent's own.
pub fn parse_exposition(text: &str) -> Vec<Parsed> {
    text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Parsed> {
    let name_end = line.find(['{', ' '])?;
    let mut labels = vec![("__name__".to_owned(), line[..name_end].to_owned())];
    let mut rest = &line[name_end..];
    if let Some(mut s) = rest.strip_prefix('{') {
        loop {
            s = s.trim_start_matches([',', ' ']);
            if let Some(after) = s.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = s.find('=')?;
            let key = s[..eq].trim().to_owned();
            s = s[eq + 1..].strip_prefix('"')?;
            let mut value = String::new();
            let mut chars = s.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '\\' => {
                        let (_, e) = chars.next()?;
                        value.push(if e == 'n' { '\n' } else { e });
                    }
                    '"' => break i,
                    c => value.push(c),
                }
            };
            labels.push((key, value));
            s = &s[end + 1..];
        }
    }
    let value: f64 = rest.split_whitespace().next()?.parse().ok()?;
    Some((labels, value))
}

/// A `WriteRequest` of snapshots `(time_ms, exposition text)`, oldest first, with `extra`
/// labels on every series (a label the exposition already has keeps its own value); snappy
/// compressed, ready to POST.
pub fn encode(snapshots: &[(i64, String)], extra: &[(&str, &str)]) -> Vec<u8> {
    let mut series: BTreeMap<Vec<Label>, Vec<Sample>> = BTreeMap::new();
    for (time_ms, text) in snapshots {
        for (labels, value) in parse_exposition(text) {
            let mut ls: Vec<Label> = labels.into_iter().map(|(name, value)| Label { name, value }).collect();
            for (k, v) in extra {
                if !ls.iter().any(|l| l.name == *k) {
                    ls.push(Label { name: (*k).to_owned(), value: (*v).to_owned() });
                }
            }
            ls.sort();
            series.entry(ls).or_default().push(Sample { value, timestamp: *time_ms });
        }
    }
    let req = WriteRequest {
        timeseries: series.into_iter().map(|(labels, samples)| TimeSeries { labels, samples }).collect(),
    };
    let raw = prost::Message::encode_to_vec(&req);
    snap::raw::Encoder::new().compress_vec(&raw).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_parses_with_labels_escapes_and_special_values() {
        let text = "# HELP x y\n# TYPE x counter\n\
            outpost_inference_requests_total{model=\"mlp\",outcome=\"ok\"} 12\n\
            outpost_alarm{name=\"a \\\"quoted\\\" \\\\ one\"} 1\n\
            outpost_inference_duration_seconds_bucket{model=\"mlp\",le=\"+Inf\"} 3\n\
            plain 2.5\n\
            trailing_comma{a=\"1\",} NaN\n";
        let s = parse_exposition(text);
        assert_eq!(s.len(), 5);
        assert_eq!(s[0].0[1], ("model".into(), "mlp".into()));
        assert_eq!(s[0].1, 12.0);
        assert_eq!(s[1].0[1].1, "a \"quoted\" \\ one");
        assert_eq!(s[2].0[2], ("le".into(), "+Inf".into()));
        assert_eq!(s[3], (vec![("__name__".into(), "plain".into())], 2.5));
        assert!(s[4].1.is_nan());
    }

    #[test]
    fn a_backlog_encodes_one_series_per_label_set_with_samples_in_time_order() {
        let snaps = vec![(1000, "m{a=\"1\"} 1\nn 5\n".to_owned()), (2000, "m{a=\"1\"} 2\n".to_owned())];
        let body = encode(&snaps, &[("node", "till-1")]);
        let raw = snap::raw::Decoder::new().decompress_vec(&body).expect("snappy");
        let req: WriteRequest = prost::Message::decode(&raw[..]).expect("protobuf");
        assert_eq!(req.timeseries.len(), 2);
        let m = &req.timeseries[0];
        let names: Vec<&str> = m.labels.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["__name__", "a", "node"], "sorted labels");
        let got: Vec<(i64, f64)> = m.samples.iter().map(|s| (s.timestamp, s.value)).collect();
        assert_eq!(got, [(1000, 1.0), (2000, 2.0)]);
    }
}
