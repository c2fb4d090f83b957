//! keywatch's own metrics, in one catalogue: every metric's name, type, labels and help
//! text ([`CATALOGUE`]), the Prometheus recorder that serves them ([`install`]), and
//! `keywatch_build_info`.
//!
//! Contract:
//! - A metric exists only if it is in [`CATALOGUE`]; the tests of this module read the
//!   sources and fail when a `counter!`, `gauge!` or `histogram!` names a metric that is
//!   not catalogued, or catalogued with another type, and when README.md's metric table
//!   differs from the catalogue.
//! - Durations are histograms (with [`SECONDS_BUCKETS`]), so that they add up across the
//!   instances of a consumer group; summaries do not.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// What a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric of the catalogue.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    /// The HELP text (and README.md's "meaning" column).
    pub help: &'static str,
}

const fn m(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind,
        labels,
        help,
    }
}

use Kind::{Counter, Gauge, Histogram};

/// Every metric keywatch exports, in the order of the data flow.
pub const CATALOGUE: &[Metric] = &[
    m(
        "keywatch_build_info",
        Gauge,
        &["version"],
        "always 1; the version in its label",
    ),
    m("keywatch_source_lines_total", Counter, &[], "lines read"),
    m(
        "keywatch_source_rotations_total",
        Counter,
        &[],
        "file rotations seen",
    ),
    m(
        "keywatch_source_truncations_total",
        Counter,
        &[],
        "file truncations seen",
    ),
    m(
        "keywatch_source_lag_bytes",
        Gauge,
        &[],
        "bytes of the file not read yet",
    ),
    m(
        "keywatch_kafka_rebalances_total",
        Counter,
        &[],
        "consumer group rebalances",
    ),
    m(
        "keywatch_kafka_errors_total",
        Counter,
        &[],
        "Kafka client errors",
    ),
    m(
        "keywatch_kafka_consumer_lag",
        Gauge,
        &["topic"],
        "messages of this member's partitions not yet stored (librdkafka's consumer lag, \
         every 15 s)",
    ),
    m(
        "keywatch_kafka_skipped_total",
        Counter,
        &[],
        "messages skipped because the store already had them",
    ),
    m(
        "keywatch_kafka_backpressure_pauses_total",
        Counter,
        &[],
        "times the pipeline was full and the assigned partitions were paused (polling goes on)",
    ),
    m("keywatch_events_total", Counter, &[], "events stored"),
    m(
        "keywatch_events_rejected_total",
        Counter,
        &["reason"],
        "lines dead-lettered, by reason",
    ),
    m(
        "keywatch_dead_letters_dropped_total",
        Counter,
        &["file"],
        "dead letters deleted from disk when the oldest rotated dead-letter file went \
         (`[dead_letter]` max_bytes, keep_files)",
    ),
    m(
        "keywatch_batches_committed_total",
        Counter,
        &[],
        "store transactions",
    ),
    m(
        "keywatch_store_commit_seconds",
        Histogram,
        &[],
        "store transaction time",
    ),
    m(
        "keywatch_store_errors_total",
        Counter,
        &["kind"],
        "failed store attempts (retried when transient)",
    ),
    m(
        "keywatch_last_commit_timestamp_seconds",
        Gauge,
        &[],
        "time of the last successful commit",
    ),
    m(
        "keywatch_clickhouse_uncommitted_rows_removed_total",
        Counter,
        &[],
        "ClickHouse rows of uncommitted batches removed by recovery",
    ),
    m(
        "keywatch_findings_total",
        Counter,
        &["kind"],
        "new findings raised",
    ),
    m(
        "keywatch_anomaly_keys",
        Gauge,
        &[],
        "keys the anomaly models hold (in a consumer group: the keys of this instance's partitions)",
    ),
    m(
        "keywatch_anomaly_batch_seconds",
        Histogram,
        &[],
        "the anomaly models' time per committed batch",
    ),
    m(
        "keywatch_anomaly_event_seconds",
        Histogram,
        &[],
        "the anomaly models' time per event of a batch",
    ),
    m(
        "keywatch_anomaly_warm_up_seconds",
        Gauge,
        &[],
        "how long the warm-up from stored history took at start (in a consumer group: the last warm-up of assigned partitions)",
    ),
    m(
        "keywatch_lifecycle_events_total",
        Counter,
        &["outcome"],
        "lifecycle events from Kafka, `applied` or `rejected`",
    ),
    m(
        "keywatch_rotation_evaluator",
        Gauge,
        &[],
        "1 when this instance evaluates rotations (always without Kafka; in a consumer group, \
         the owner of partition 0 of the first topic)",
    ),
    m(
        "keywatch_evaluations_total",
        Counter,
        &[],
        "rotation evaluations run",
    ),
    m(
        "keywatch_evaluation_seconds",
        Histogram,
        &[],
        "time one rotation evaluation took (reading the store's rotation view and judging \
         every open rotation and key age); the capacity guide's figure for rotations",
    ),
    m(
        "keywatch_rotations_open",
        Gauge,
        &[],
        "rotations the last evaluation judged",
    ),
    m(
        "keywatch_evaluations_postponed_total",
        Counter,
        &[],
        "evaluations put off while reading a backlog",
    ),
    m(
        "keywatch_notifications_total",
        Counter,
        &["channel", "outcome"],
        "notification attempts by channel type and outcome (`ok`, `transient`, `gave_up`, \
         `permanent`; `dry_run` for messages `run --dry-run` rendered and did not send)",
    ),
    m(
        "keywatch_notify_silenced_total",
        Counter,
        &[],
        "notifications held back by a silence",
    ),
    m(
        "keywatch_notify_inhibited_total",
        Counter,
        &[],
        "notifications held back by an inhibition rule",
    ),
    m(
        "keywatch_notify_told_elsewhere_total",
        Counter,
        &[],
        "facts not told because another instance of the group delivered them",
    ),
    m(
        "keywatch_notify_records_dropped_total",
        Counter,
        &[],
        "notification records not written to ClickHouse (they stay in the embedded log)",
    ),
];

/// Histogram buckets for every `*_seconds` histogram: 100 µs to 30 s.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The catalogue entry named `name`.
pub fn find(name: &str) -> Option<&'static Metric> {
    CATALOGUE.iter().find(|m| m.name == name)
}

/// Installs the Prometheus recorder (histograms with [`SECONDS_BUCKETS`]), describes every
/// metric of the catalogue and sets `keywatch_build_info`. Returns the handle `/metrics`
/// renders.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .install_recorder()?;
    describe();
    metrics::gauge!("keywatch_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

/// Registers every metric's HELP text with the recorder in force.
pub fn describe() {
    for m in CATALOGUE {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// (name, kind) of every metric macro call in the sources under `dir`, and every
    /// `"keywatch_…"` string literal (a name handed to a macro elsewhere, such as the
    /// hold-back stages' counters).
    fn uses(dir: &Path, out: &mut Vec<(String, Kind, String)>, literals: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                uses(&path, out, literals);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") || path.ends_with("telemetry.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for (i, _) in text.match_indices("\"keywatch_") {
                let rest = &text[i + 1..];
                literals.insert(rest[..rest.find('"').unwrap()].to_owned());
            }
            for (mac, kind) in [
                ("counter!(", Kind::Counter),
                ("gauge!(", Kind::Gauge),
                ("histogram!(", Kind::Histogram),
            ] {
                for (i, _) in text.match_indices(mac) {
                    let rest = text[i + mac.len()..].trim_start();
                    let Some(rest) = rest.strip_prefix('"') else {
                        continue;
                    };
                    let name = &rest[..rest.find('"').unwrap()];
                    out.push((name.to_owned(), kind, path.display().to_string()));
                }
            }
        }
    }

    #[test]
    fn every_metric_the_code_records_is_catalogued_with_its_type() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut found = Vec::new();
        let mut literals = BTreeSet::new();
        uses(&src, &mut found, &mut literals);
        assert!(
            found.len() > 20,
            "the scan finds the metric calls: {found:?}"
        );
        for (name, kind, file) in &found {
            let m = find(name).unwrap_or_else(|| panic!("{file}: {name} is not in the catalogue"));
            assert_eq!(m.kind, *kind, "{file}: {name}");
        }
        for m in CATALOGUE {
            assert!(
                m.name == "keywatch_build_info" || literals.contains(m.name),
                "{} is catalogued but never recorded",
                m.name
            );
        }
        let mut names = BTreeSet::new();
        for m in CATALOGUE {
            assert!(names.insert(m.name), "{} twice", m.name);
            assert!(m.name.starts_with("keywatch_"), "{}", m.name);
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}: counters and only counters end in _total",
                m.name
            );
        }
    }

    #[test]
    fn the_readme_metric_table_is_the_catalogue() {
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
                .unwrap();
        let mut table: BTreeMap<String, String> = BTreeMap::new();
        for line in readme.lines().filter(|l| l.starts_with("| `keywatch_")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let kind = cells[2].to_owned();
            // The names are the `quoted` parts of the first cell (labels in braces).
            for name in cells[1].split('`').skip(1).step_by(2) {
                let name = name.split('{').next().unwrap();
                table.insert(name.to_owned(), kind.clone());
            }
        }
        let catalogue: BTreeMap<String, String> = CATALOGUE
            .iter()
            .map(|m| (m.name.to_owned(), m.kind.as_str().to_owned()))
            .collect();
        assert_eq!(table, catalogue);
    }
}
