//! Terminal tables for `keywatch rotations` and `keywatch findings` (comfy-table, like
//! [`super::report`]). Pure: the caller reads the store and evaluates.
//!
//! Rotation times (start, deadline, forecast) are shown in the owner's time zone, because
//! that is how the owner was told the deadline; traffic times (first/last seen) in UTC, like
//! `keywatch usage`. The share column carries a sparkline of the hourly share since the
//! rotation started ([`crate::chart::sparkline`]).

use chrono_tz::Tz;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, ContentArrangement, Table};

use super::report::format_ms;
use crate::detect::{Finding, Phase, RotationStatus};
use crate::registry::format_local;
use crate::store::views::StoredFinding;

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

fn dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

fn key_label(id: &str, name: &Option<String>) -> String {
    match name {
        Some(n) => format!("{n} ({id})"),
        None => id.to_owned(),
    }
}

/// One row per rotation, then per rotation with lingering sources the sources still on the
/// old key.
pub fn rotations_table(rows: &[RotationStatus]) -> String {
    if rows.is_empty() {
        return "no open rotations: no key in the registry is rotating or deprecated with a \
                rotation start\n"
            .to_owned();
    }
    let mut t = new_table(&[
        "old key → new key",
        "owner",
        "phase",
        "started",
        "deadline",
        "on new key (24 h)",
        "forecast completion",
        "old key last used (UTC)",
        "still on old key",
        "safe to revoke",
    ]);
    for r in rows {
        let tz: Tz = r.timezone.parse().unwrap_or(Tz::UTC);
        let forecast = match (r.forecast.completion_ms, r.forecast.stalled) {
            (Some(c), _) => format_local(c, tz),
            (None, true) => "stalled".to_owned(),
            (None, false) => "too little data".to_owned(),
        };
        let safe = if r.phase == Phase::SafeToRevoke {
            format!("yes, since {}", format_local(r.safe_to_revoke_ms, tz))
        } else if r.lingering.is_empty() && r.phase != Phase::Scheduled {
            format!("at {} if quiet", format_local(r.safe_to_revoke_ms, tz))
        } else {
            "no".to_owned()
        };
        t.add_row(vec![
            Cell::new(format!(
                "{}\n→ {}",
                key_label(&r.old_key, &r.old_name),
                key_label(&r.new_key, &r.new_name)
            )),
            Cell::new(&r.owner),
            Cell::new(r.phase.as_str()),
            Cell::new(format_local(r.started_ms, tz)),
            Cell::new(format_local(r.deadline_ms, tz)),
            // The 24-hour share, and under it the hourly share since the start (the
            // adoption chart as a sparkline).
            right(format!(
                "{}\n{}",
                r.share_24h
                    .map_or("-".into(), |s| format!("{:.0} %", s * 100.0)),
                crate::chart::sparkline(r, 24)
            )),
            Cell::new(forecast),
            Cell::new(r.last_old_use_ms.map_or("-".into(), format_ms)),
            right(format!("{} sources", r.lingering.len())),
            Cell::new(safe),
        ]);
    }
    let mut out = t.to_string();
    for r in rows.iter().filter(|r| !r.lingering.is_empty()) {
        out.push_str(&format!(
            "\n\nStill on the old key {} of {}:\n",
            r.old_name.as_deref().unwrap_or(&r.old_key),
            r.owner
        ));
        let mut s = new_table(&[
            "ip",
            "user agent",
            "endpoints",
            "gateways",
            "requests",
            "first seen (UTC)",
            "last seen (UTC)",
        ]);
        for l in &r.lingering {
            s.add_row(vec![
                Cell::new(dash(&l.ip)),
                Cell::new(dash(&l.user_agent)),
                Cell::new(dash(&l.endpoints.join(", "))),
                Cell::new(dash(&l.gateways.join(", "))),
                right(l.requests),
                Cell::new(format_ms(l.first_seen_ms)),
                Cell::new(format_ms(l.last_seen_ms)),
            ]);
        }
        out.push_str(&s.to_string());
    }
    out
}

/// One row per finding, in the order given.
pub fn findings_table(rows: &[Finding]) -> String {
    let mut t = new_table(&["at (UTC)", "severity", "kind", "key", "owner", "summary"]);
    for f in rows {
        t.add_row(vec![
            Cell::new(format_ms(f.at_ms)),
            Cell::new(f.severity.as_str()),
            Cell::new(f.kind.as_str()),
            Cell::new(&f.key_id),
            Cell::new(f.owner.as_deref().unwrap_or("-")),
            Cell::new(&f.summary),
        ]);
    }
    t.to_string()
}

/// One row per stored finding: first and last time raised, and how often.
pub fn stored_findings_table(rows: &[StoredFinding]) -> String {
    let mut t = new_table(&[
        "first (UTC)",
        "last (UTC)",
        "times",
        "severity",
        "kind",
        "key",
        "owner",
        "summary",
    ]);
    for s in rows {
        let f = &s.finding;
        t.add_row(vec![
            Cell::new(format_ms(s.first_at_ms)),
            Cell::new(format_ms(s.last_at_ms)),
            right(s.count),
            Cell::new(f.severity.as_str()),
            Cell::new(f.kind.as_str()),
            Cell::new(&f.key_id),
            Cell::new(f.owner.as_deref().unwrap_or("-")),
            Cell::new(&f.summary),
        ]);
    }
    t.to_string()
}
