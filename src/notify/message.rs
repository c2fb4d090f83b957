//! From the findings of a group to what each channel sends: the template context (findings
//! in sections of one kind and key, with the rotation they belong to), rendered per channel
//! type and split to the channel's limits. Pure, no IO.
//!
//! The context, as the templates see it:
//! - `test`, `recipient` (`owner:acme`), `receiver`, `owner`, `tz` (the recipient's time
//!   zone: every `*_local` time is in it), `severity` (the highest), `count`, `channel`,
//!   `photo` (Telegram: true when the adoption chart goes as a photo, the text's head as
//!   its caption of at most 1024 characters);
//! - `sections`: `kind` (of the most severe finding), `kinds`, `title`, `severity`, `key_id`,
//!   `key_label`, `owner`, `rotation` (or none), `findings`. A section holds the findings of
//!   one kind and key, except that a rotation's progress (lingering sources, reminder,
//!   overdue, at risk) shares one section, so its sources are listed once;
//! - a finding: `kind`, `severity`, `summary`, `at`, `at_local`, `dedup_key`, `repeated`,
//!   `step` (a reminder's), `evidence` (as the detector wrote it), `source` (a lingering
//!   source, or the source of a revoked/expired key use);
//! - `rotation`: `old_key`, `old_label`, `new_key`, `new_label`, `owner`, `started_local`,
//!   `deadline_local`, `overdue` (when the findings were judged: the latest finding's `at`,
//!   not when the message is sent), `judged_local` (that time), `overdue_at_delivery` (by
//!   the notifier's clock, so a message can say both, each for what it is), `share` (0..1
//!   over 24 h, or none), `old_requests`,
//!   `new_requests`, `last_old_use_local`, `lingering` (sources), `lingering_count`,
//!   `lingering_more` (not listed), `forecast_local` (none when stalled or unknown),
//!   `phase` (`on track`, `at risk`, ...; from the rotation view, else what the findings
//!   say), `chart_cid` (email only: the inline adoption chart, when one was drawn);
//! - a source: `ip`, `user_agent`, `endpoints`, `gateways` (joined), `first_seen_local`,
//!   `last_seen_local`, `requests`, `failures`.

use std::collections::HashMap;

use chrono_tz::Tz;
use serde_json::{json, Value};

use super::channel::{slack, telegram};
use super::route::{Item, Kind};
use super::template::{self, Templates};
use crate::detect::{FindingKind, LingeringSource, RotationClass, RotationStatus, Severity};
use crate::event::NO_KEY;
use crate::registry::{format_local, format_rfc3339};

/// Sources listed in one message; the rest are counted.
pub const MAX_SOURCES: usize = 50;

/// A finding in a message, with whether it was told before.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub item: &'a Item,
    pub repeated: bool,
}

/// What a group flush is about, for the templates.
pub struct Context<'a> {
    pub test: bool,
    pub recipient: &'a str,
    pub receiver: &'a str,
    pub owner: Option<&'a str>,
    pub tz: Tz,
    pub entries: Vec<Entry<'a>>,
    pub rotations: &'a HashMap<String, RotationStatus>,
}

fn local_of(v: &Value, tz: Tz) -> Value {
    v.as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map_or(Value::Null, |t| {
            json!(format_local(t.timestamp_millis(), tz))
        })
}

fn join(v: &Value) -> String {
    match v {
        Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str())
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(", "),
        Value::String(s) => s.clone(),
        _ => String::new(),
    }
}

/// A source from a detector's JSON (`source_json` of the rotation detector, or the evidence
/// of a key use).
fn source_from_json(v: &Value, tz: Tz) -> Value {
    json!({
        "ip": v["ip"].as_str().unwrap_or(""),
        "user_agent": v["user_agent"].as_str().unwrap_or(""),
        "endpoints": if v["endpoints"].is_null() { join(&v["endpoint"]) } else { join(&v["endpoints"]) },
        "gateways": if v["gateways"].is_null() { join(&v["gateway"]) } else { join(&v["gateways"]) },
        "first_seen_local": local_of(&v["first_seen"], tz),
        "last_seen_local": local_of(&v["last_seen"], tz),
        "requests": v["requests"],
        "failures": v["failures"],
    })
}

fn source_from_status(s: &LingeringSource, tz: Tz) -> Value {
    json!({
        "ip": s.ip,
        "user_agent": s.user_agent,
        "endpoints": s.endpoints.join(", "),
        "gateways": s.gateways.join(", "),
        "first_seen_local": format_local(s.first_seen_ms, tz),
        "last_seen_local": format_local(s.last_seen_ms, tz),
        "requests": s.requests,
        "failures": s.failures,
    })
}

/// Findings without a key (bursts of missing or unknown keys) are named by their source.
fn keyless_label(items: &[&Item]) -> Option<String> {
    if items.iter().any(|i| i.key_id != NO_KEY) {
        return None;
    }
    let mut ips: Vec<&str> = items
        .iter()
        .filter_map(|i| i.evidence["ip"].as_str())
        .filter(|ip| !ip.is_empty())
        .collect();
    ips.sort_unstable();
    ips.dedup();
    match ips.as_slice() {
        [] => None,
        [ip] => Some(format!("from {ip}")),
        more => Some(format!("from {} sources", more.len())),
    }
}

fn label(name: &Value, id: &Value) -> Value {
    match name.as_str() {
        Some(n) if !n.is_empty() => json!(n),
        _ => id.clone(),
    }
}

/// The rotation a section is about: the latest status the notifier was given, else what the
/// findings' evidence holds. `items` are findings of one rotation (lingering sources, a
/// reminder, overdue, at risk, ...).
fn rotation(
    items: &[&Item],
    status: Option<&RotationStatus>,
    tz: Tz,
    now_ms: i64,
) -> Option<Value> {
    let lingering_kind = Kind::Finding(FindingKind::LingeringOldKey);
    // A reminder, overdue or at-risk finding carries the rotation and its sources at the
    // top; a lingering one nests the rotation and is one source.
    let other = items.iter().find(|i| i.kind != lingering_kind);
    let ev = match other {
        Some(o) => &o.evidence,
        None => &items.first()?.evidence["rotation"],
    };
    if ev["old_key"].is_null() && status.is_none() {
        return None;
    }
    let forecast = items
        .iter()
        .find(|i| i.kind == Kind::Finding(FindingKind::RotationAtRisk))
        .map_or(Value::Null, |i| {
            local_of(&i.evidence["forecast"]["completion"], tz)
        });
    // "Overdue" is what was true when the findings were judged (their latest `at`): a
    // reminder judged the day before the deadline must not say it passed because it is
    // delivered, or rendered in a backtest, later.
    let judged_ms = items.iter().map(|i| i.at_ms).max().unwrap_or(now_ms);
    let mut out = match status {
        Some(s) => json!({
            "old_key": s.old_key,
            "old_label": s.old_name.clone().unwrap_or_else(|| s.old_key.clone()),
            "new_key": s.new_key,
            "new_label": s.new_name.clone().unwrap_or_else(|| s.new_key.clone()),
            "owner": s.owner,
            "phase": s.phase.as_str(),
            "started_local": format_local(s.started_ms, tz),
            "deadline_local": format_local(s.deadline_ms, tz),
            "overdue": judged_ms >= s.deadline_ms,
            "overdue_at_delivery": now_ms >= s.deadline_ms,
            "share": s.share_24h,
            "old_requests": s.old_requests,
            "new_requests": s.new_requests,
            "last_old_use_local": s.last_old_use_ms.map(|t| format_local(t, tz)),
            "forecast_local": s.forecast.completion_ms.map(|t| format_local(t, tz)),
        }),
        None => {
            let deadline = ev["deadline"]
                .as_str()
                .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                .map(|t| t.timestamp_millis());
            let has = |k: FindingKind| items.iter().any(|i| i.kind == Kind::Finding(k));
            let phase = if has(FindingKind::RotationOverdue) {
                json!("overdue")
            } else if has(FindingKind::RotationAtRisk) {
                json!("at risk")
            } else {
                Value::Null
            };
            json!({
                "old_key": ev["old_key"],
                "old_label": label(&ev["old_name"], &ev["old_key"]),
                "phase": phase,
                "new_key": ev["new_key"],
                "new_label": label(&ev["new_name"], &ev["new_key"]),
                "owner": items[0].owner,
                "started_local": local_of(&ev["started"], tz),
                "deadline_local": local_of(&ev["deadline"], tz),
                "overdue": deadline.is_some_and(|d| judged_ms >= d),
                "overdue_at_delivery": deadline.is_some_and(|d| now_ms >= d),
                "share": ev["share_24h"],
                "old_requests": ev["old_requests"],
                "new_requests": ev["new_requests"],
                "last_old_use_local": local_of(&ev["last_old_use"], tz),
                "forecast_local": forecast,
            })
        }
    };
    // The sources: all the latest status lists; else those in the evidence and those of
    // the lingering findings, each once.
    let (lingering, total) = match status {
        Some(s) => (
            s.lingering
                .iter()
                .map(|l| source_from_status(l, tz))
                .collect::<Vec<_>>(),
            s.lingering.len(),
        ),
        None => {
            let mut v: Vec<Value> = other
                .and_then(|o| o.evidence["lingering_sources"].as_array())
                .map(|a| a.iter().map(|x| source_from_json(x, tz)).collect())
                .unwrap_or_default();
            for i in items.iter().filter(|i| i.kind == lingering_kind) {
                let src = source_from_json(&i.evidence, tz);
                if !v
                    .iter()
                    .any(|x| x["ip"] == src["ip"] && x["user_agent"] == src["user_agent"])
                {
                    v.push(src);
                }
            }
            let counted = other
                .and_then(|o| o.evidence["lingering_count"].as_u64())
                .map_or(0, |n| n as usize);
            let n = v.len();
            (v, counted.max(n))
        }
    };
    out["judged_local"] = json!(format_local(judged_ms, tz));
    let listed: Vec<Value> = lingering.into_iter().take(MAX_SOURCES).collect();
    out["lingering_more"] = json!(total.saturating_sub(listed.len()));
    out["lingering_count"] = json!(total);
    out["lingering"] = json!(listed);
    Some(out)
}

fn rotation_class(kind: Kind) -> RotationClass {
    kind.finding().map_or(RotationClass::None, |k| k.rotation)
}

impl Context<'_> {
    /// The template context.
    pub fn to_value(&self, channel: &str, now_ms: i64) -> Value {
        let tz = self.tz;
        // Sections: findings of one kind and key (a rotation's progress findings together),
        // in the order first seen; most severe first.
        let mut order: Vec<(&str, &str)> = Vec::new();
        let mut by: HashMap<(&str, &str), Vec<&Entry<'_>>> = HashMap::new();
        for e in &self.entries {
            let kind = if rotation_class(e.item.kind) == RotationClass::Progress {
                "rotation"
            } else {
                e.item.kind.as_str()
            };
            let k = (kind, e.item.key_id.as_str());
            if !by.contains_key(&k) {
                order.push(k);
            }
            by.entry(k).or_default().push(e);
        }
        let mut sections: Vec<(Severity, Value)> = Vec::new();
        for k in order {
            let mut entries = by[&k].clone();
            // Most severe first (stable): it names the section.
            entries.sort_by_key(|e| std::cmp::Reverse(e.item.severity));
            let items: Vec<&Item> = entries.iter().map(|e| e.item).collect();
            let first = items[0];
            let severity = first.severity;
            let mut titles: Vec<String> = Vec::new();
            let mut kinds: Vec<&str> = Vec::new();
            for i in &items {
                let t = match i.evidence["step"].as_str() {
                    Some(s) => format!("{} ({s})", i.kind.title()),
                    None => i.kind.title().to_owned(),
                };
                if !titles.contains(&t) {
                    titles.push(t);
                }
                if !kinds.contains(&i.kind.as_str()) {
                    kinds.push(i.kind.as_str());
                }
            }
            let title = titles.join(" · ");
            let rot = if rotation_class(first.kind) != RotationClass::None {
                rotation(&items, self.rotations.get(&first.key_id), tz, now_ms)
            } else {
                None
            };
            let key_label = first.evidence["key_name"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .or_else(|| {
                    rot.as_ref()
                        .and_then(|r| r["old_label"].as_str().map(str::to_owned))
                })
                .unwrap_or_else(|| keyless_label(&items).unwrap_or_else(|| first.key_id.clone()));
            let findings: Vec<Value> = entries
                .iter()
                .map(|e| {
                    let i = e.item;
                    let source = if i.kind.finding().is_some_and(|k| k.source_evidence) {
                        source_from_json(&i.evidence, tz)
                    } else {
                        Value::Null
                    };
                    json!({
                        "kind": i.kind.as_str(),
                        "severity": i.severity.as_str(),
                        "summary": i.summary,
                        "at": format_rfc3339(i.at_ms),
                        "at_local": format_local(i.at_ms, tz),
                        "dedup_key": i.dedup_key,
                        "repeated": e.repeated,
                        "step": i.evidence["step"],
                        "evidence": i.evidence,
                        "source": source,
                    })
                })
                .collect();
            sections.push((
                severity,
                json!({
                    "kind": first.kind.as_str(),
                    "kinds": kinds,
                    "title": title,
                    "severity": severity.as_str(),
                    "key_id": first.key_id,
                    "key_label": key_label,
                    "owner": first.owner,
                    "rotation": rot,
                    "findings": findings,
                }),
            ));
        }
        // Stable: equal severities keep their order.
        sections.sort_by_key(|s| std::cmp::Reverse(s.0));
        let severity = sections.first().map_or(Severity::Info, |s| s.0);
        json!({
            "test": self.test,
            "recipient": self.recipient,
            "receiver": self.receiver,
            "owner": self.owner,
            "tz": tz.name(),
            "channel": channel,
            "severity": severity.as_str(),
            "count": self.entries.len(),
            "sections": sections.into_iter().map(|s| s.1).collect::<Vec<_>>(),
        })
    }
}

/// What one channel type sends for a message.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Rendered {
    pub subject: String,
    /// Plain text (email, console).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text: String,
    /// Telegram or Slack messages, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<String>,
    /// The generic webhook's JSON body.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub body: Value,
    /// The email's HTML alternative (empty: text only, as in messages queued before it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub html: String,
    /// Slack: the Block Kit blocks of each of `parts` (whose texts are then the fallback).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<Value>,
    /// Pictures the HTML shows by `cid:` (the adoption charts). Telegram: the photo sent
    /// first, with `parts[0]` as its caption.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<InlineImage>,
}

/// A picture sent inside a message, referenced from its HTML as `cid:{cid}`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InlineImage {
    pub cid: String,
    pub content_type: String,
    /// The bytes, base64 in the stored message.
    #[serde(with = "base64_bytes")]
    pub data: Vec<u8>,
}

mod base64_bytes {
    use base64::Engine;

    pub fn serialize<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

/// Renders with `templates`, falling back to `fallback` (the built-ins) when a user template
/// fails at render time, and to the findings' summaries when both do.
pub fn render(
    channel_type: &str,
    ctx: &Value,
    templates: &Templates,
    fallback: &Templates,
    max_parts: usize,
    webhook: impl FnOnce(&str, &str) -> Value,
) -> Rendered {
    let value = minijinja::Value::from(minijinja::value::Serde(ctx));
    let get = |name: &str| -> String {
        match templates.render(name, &value) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "a notification template failed; using the built-in one");
                fallback.render(name, &value).unwrap_or_else(|e| {
                    tracing::error!(error = %e, "the built-in template failed too");
                    summaries(ctx)
                })
            }
        }
    };
    let subject = one_line(&get(template::SUBJECT));
    let mut r = Rendered {
        subject,
        text: String::new(),
        parts: Vec::new(),
        body: Value::Null,
        html: String::new(),
        blocks: Vec::new(),
        images: Vec::new(),
    };
    match channel_type {
        // With a photo (`photo`: the adoption chart goes with the message), the first
        // part is its caption.
        "telegram" if ctx["photo"] == true => {
            r.parts = telegram::split_caption(get(template::TELEGRAM).trim(), max_parts)
        }
        "telegram" => {
            r.parts = telegram::split_html(
                get(template::TELEGRAM).trim(),
                telegram::TELEGRAM_LIMIT,
                max_parts,
            )
        }
        "slack" => {
            // Slack shows the blocks; a message's text is what notifications show: the
            // mrkdwn template's first part with the first blocks, a continuation line with
            // the others.
            let msgs = slack::blocks(ctx, max_parts);
            let n = msgs.len();
            let first = slack::split_mrkdwn(get(template::SLACK).trim(), slack::SLACK_LIMIT, 1)
                .into_iter()
                .next()
                .unwrap_or_default();
            r.parts = (0..n)
                .map(|i| {
                    if i == 0 && !first.trim().is_empty() {
                        first.clone()
                    } else {
                        format!(
                            "{} (continued, {}/{n})",
                            slack::escape_mrkdwn(&r.subject),
                            i + 1
                        )
                    }
                })
                .collect();
            r.blocks = msgs.into_iter().map(Value::from).collect();
        }
        "webhook" => {
            let text = get(template::TEXT);
            r.body = webhook(&r.subject, text.trim());
        }
        "email" => {
            r.text = get(template::TEXT).trim().to_owned();
            // When both HTML templates fail the mail goes as text alone: the findings'
            // summaries as HTML would be unescaped.
            r.html = templates
                .render(template::EMAIL_HTML, &value)
                .or_else(|e| {
                    tracing::error!(error = %e, "a notification template failed; using the built-in one");
                    fallback.render(template::EMAIL_HTML, &value)
                })
                .unwrap_or_else(|e| {
                    tracing::error!(error = %e, "the built-in template failed too; sending text only");
                    String::new()
                })
                .trim()
                .to_owned();
        }
        _ => r.text = get(template::TEXT).trim().to_owned(),
    }
    r
}

fn summaries(ctx: &Value) -> String {
    let mut out = String::new();
    for s in ctx["sections"].as_array().into_iter().flatten() {
        for f in s["findings"].as_array().into_iter().flatten() {
            out.push_str(f["summary"].as_str().unwrap_or(""));
            out.push('\n');
        }
    }
    out
}

/// A subject line: no line breaks or control characters, at most 200 characters.
fn one_line(s: &str) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 200 {
        let mut out: String = flat.chars().take(199).collect();
        out.push('…');
        out
    } else {
        flat
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reminder judged the day before the deadline says what was true then, also when it
    /// is rendered after the deadline (a backtest, a late delivery), and says which is which.
    #[test]
    fn overdue_is_what_was_true_when_the_finding_was_judged() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        let deadline = 1_795_453_200_000; // 2026-11-24T17:00:00Z, 18:00 CET
        let day = 86_400_000;
        let item = |at_ms: i64| Item {
            kind: Kind::Finding(FindingKind::RotationReminder),
            key_id: "A".into(),
            owner: Some("acme".into()),
            at_ms,
            severity: Severity::Info,
            summary: "reminder".into(),
            evidence: json!({"old_key": "A", "new_key": "B",
                "deadline": format_rfc3339(deadline), "step": "1d"}),
            dedup_key: "r".into(),
        };
        let rotations = HashMap::new();
        // (judged at, rendered at, overdue, overdue at delivery)
        let cases = [
            (deadline - day, deadline - day, false, false),
            (deadline - day, deadline + 3_600_000, false, true),
            (deadline + 60_000, deadline + 3_600_000, true, true),
        ];
        for (judged, now, overdue, at_delivery) in cases {
            let it = item(judged);
            let ctx = Context {
                test: false,
                recipient: "owner:acme",
                receiver: "owners",
                owner: Some("acme"),
                tz: berlin,
                entries: vec![Entry {
                    item: &it,
                    repeated: false,
                }],
                rotations: &rotations,
            };
            let v = ctx.to_value("email", now);
            let r = &v["sections"][0]["rotation"];
            assert_eq!(r["overdue"], overdue, "judged {judged}, now {now}: {r}");
            assert_eq!(r["overdue_at_delivery"], at_delivery, "{r}");
            assert_eq!(r["judged_local"], format_local(judged, berlin));
        }
    }
}
