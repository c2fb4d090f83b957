//! Terminal reports from the store: what keywatch sees, without Grafana.

use chrono::{TimeZone, Utc};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, ContentArrangement, Table};

use crate::event::Outcome;
use crate::store::{KeyUsage, SourceRow};

/// `2026-11-23 14:05` (UTC).
pub fn format_ms(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_else(|| ms.to_string())
}

fn new_table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.iter().map(Cell::new));
    t
}

fn right(s: impl ToString) -> Cell {
    Cell::new(s.to_string()).set_alignment(CellAlignment::Right)
}

/// Failures by outcome, only those that happened: `invalid_key 12, rate_limited 3`.
pub fn failures_summary(totals: &crate::aggregate::Rollup) -> String {
    let parts: Vec<String> = Outcome::ALL
        .iter()
        .filter(|o| o.is_failure() && totals.outcomes[o.index()] > 0)
        .map(|o| format!("{} {}", o.as_str(), totals.outcomes[o.index()]))
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}"))
}

/// One row per key: requests, failures, latency, sources, first and last seen (UTC).
pub fn usage_table(rows: &[KeyUsage]) -> String {
    let mut t = new_table(&[
        "key",
        "consumer",
        "requests",
        "failures",
        "p50 ms",
        "p95 ms",
        "sources",
        "first seen (UTC)",
        "last seen (UTC)",
    ]);
    for u in rows {
        let key = match &u.hint {
            Some(h) => format!("{} ({h})", u.key_id),
            None => u.key_id.clone(),
        };
        t.add_row(vec![
            Cell::new(key),
            Cell::new(u.consumer.as_deref().unwrap_or("-")),
            right(u.totals.requests),
            Cell::new(failures_summary(&u.totals)),
            right(ms(u.totals.latency_quantile(0.5))),
            right(ms(u.totals.latency_quantile(0.95))),
            right(u.sources),
            Cell::new(format_ms(u.first_seen_ms)),
            Cell::new(format_ms(u.last_seen_ms)),
        ]);
    }
    t.to_string()
}

/// One row per source of a key.
pub fn sources_table(rows: &[SourceRow]) -> String {
    let mut t = new_table(&[
        "ip",
        "user agent",
        "endpoint",
        "gateway",
        "requests",
        "failures",
        "first seen (UTC)",
        "last seen (UTC)",
    ]);
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    for (k, s) in rows {
        t.add_row(vec![
            Cell::new(dash(&k.ip)),
            Cell::new(dash(&k.user_agent)),
            Cell::new(dash(&k.endpoint)),
            Cell::new(dash(&k.gateway)),
            right(s.requests),
            right(s.failures),
            Cell::new(format_ms(s.first_seen_ms)),
            Cell::new(format_ms(s.last_seen_ms)),
        ]);
    }
    t.to_string()
}
