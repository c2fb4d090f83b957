//! Rotation evaluation: from a rotation's stored usage to its state and findings.
//!
//! [`evaluate_rotation`] is a pure function of `now`, the old key, the policy and a
//! [`RotationData`] view (hourly counts of both keys, their sources). The definitions:
//!
//! - **Share on the new key**: per hour since the rotation started, new-key requests over
//!   both keys' requests (failures included: a failing client is still on that key).
//! - **Source** (one notion for lingering, overdue and safe to revoke): a host, its IP; its
//!   user agent (the latest it sent with the old key) is a detail, and without an IP the
//!   user agent's product (not its version) stands in for the host. A host that moved to
//!   the new key in a release that also bumped its user agent has moved.
//! - **Lingering source**: a source (with the endpoints and gateways it called) that sent
//!   the old key after the rotation started, within the last quiet period, and has not
//!   moved: it never sent the new key, or it sent the old key again after its first request
//!   with the new one. A host that switched keeps its old-key history but is not lingering.
//! - **Forecast**: a straight line fitted by weighted least squares through the hourly
//!   shares of the last `forecast_window` (weights: the hour's requests); completion is
//!   where the line reaches 100 %. A slope of zero or less is *stalled* (no completion).
//!   It needs at least 3 hours and 20 requests of data. A rotation is **at risk** when,
//!   after it has run for a full forecast window and while sources still linger before the
//!   deadline, the forecast is stalled or falls after the deadline.
//! - **Overdue**: the deadline passed, sources still linger, and the old key was used after
//!   the deadline (`at` is the deadline).
//! - **Safe to revoke**: the old key had no request at all for the quiet period (counted
//!   from its last request, or from the rotation start if it was quiet before); `at` is the
//!   end of that period, and the dedup key names the rotation, so it is raised once.
//! - **Failed rollover** is judged per request by the stream detectors (`stream.rs`), so
//!   that it is stamped at the failing request that crossed the threshold and sees refused
//!   requests by any alias of the new key.
//! - **Reminders**: the latest step of the policy's schedule at or before `now` and not
//!   before the rotation started (steps in whole days are counted in the owner's calendar,
//!   so "1d" is the same wall-clock time the day before, across a DST change), then one
//!   every `overdue_reminder_every` after the deadline, while sources linger. The dedup key
//!   names the step, so each step is sent once.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{TimeZone, Utc};
use chrono_tz::Tz;
use serde::Serialize;
use serde_json::json;

use super::{Finding, FindingKind, Policy, Severity};
use crate::registry::{format_local, format_rfc3339, local_to_utc, Key};
use crate::store::SourceRow;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;
/// The forecast needs this much data.
const MIN_FIT_HOURS: usize = 3;
const MIN_FIT_REQUESTS: u64 = 20;
/// Sources listed in a reminder's or an overdue finding's evidence.
const EVIDENCE_SOURCES: usize = 20;

/// Counts of both keys in one hour. Failures are auth failures: invalid key, expired,
/// revoked, forbidden (not rate limits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HourRow {
    /// Start of the hour, ms since the epoch.
    pub hour_ms: i64,
    pub old_requests: u64,
    pub old_failures: u64,
    pub new_requests: u64,
    pub new_failures: u64,
}

/// What the rotation detectors read from the store about one rotation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RotationData {
    pub old_key: String,
    pub new_key: String,
    /// Every source of the old key, all time (first/last seen, counts).
    pub old_sources: Vec<SourceRow>,
    /// Every source of the new key, all time.
    pub new_sources: Vec<SourceRow>,
    /// Hourly counts from the requested start on, ordered by hour.
    pub hourly: Vec<HourRow>,
}

/// Where a rotation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The rotation starts later.
    Scheduled,
    OnTrack,
    AtRisk,
    Overdue,
    /// No source lingers; the old key waits out the quiet period.
    Draining,
    SafeToRevoke,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Scheduled => "scheduled",
            Phase::OnTrack => "on track",
            Phase::AtRisk => "at risk",
            Phase::Overdue => "overdue",
            Phase::Draining => "draining",
            Phase::SafeToRevoke => "safe to revoke",
        }
    }
}

/// The new key's share in one hour.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SharePoint {
    pub hour_ms: i64,
    pub share: f64,
    pub requests: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Forecast {
    /// When the fitted line reaches 100 % on the new key; `None` when stalled or when there
    /// is too little data.
    pub completion_ms: Option<i64>,
    /// The fitted change of the share per day (0.1: ten points a day).
    pub slope_per_day: Option<f64>,
    pub basis_hours: usize,
    pub basis_requests: u64,
    pub stalled: bool,
}

/// A source still on the old key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LingeringSource {
    pub ip: String,
    pub user_agent: String,
    pub endpoints: Vec<String>,
    pub gateways: Vec<String>,
    /// First and last request with the old key (all time).
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    /// Requests and failures with the old key (all time).
    pub requests: u64,
    pub failures: u64,
    /// The first request with the new key, when the source mixes both.
    pub new_key_since_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RotationStatus {
    pub old_key: String,
    pub old_name: Option<String>,
    pub new_key: String,
    pub new_name: Option<String>,
    pub owner: String,
    pub timezone: String,
    pub started_ms: i64,
    /// The rotation's deadline, or its start plus the grace period.
    pub deadline_ms: i64,
    pub phase: Phase,
    /// The new key's share over the last 24 hours.
    pub share_24h: Option<f64>,
    /// Hourly share since the rotation started.
    pub share: Vec<SharePoint>,
    /// Requests per key since the rotation started.
    pub old_requests: u64,
    pub new_requests: u64,
    pub last_old_use_ms: Option<i64>,
    /// When the old key is (or was) safe to revoke if nothing uses it until then.
    pub safe_to_revoke_ms: i64,
    pub forecast: Forecast,
    pub lingering: Vec<LingeringSource>,
    /// Every source (ip, user agent, endpoint, gateway) that sent the old key after the
    /// rotation started, most recent first.
    #[serde(serialize_with = "source_rows")]
    pub old_key_sources: Vec<SourceRow>,
}

fn source_rows<S: serde::Serializer>(rows: &[SourceRow], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(rows.iter().map(|(k, st)| {
        json!({
            "ip": k.ip,
            "user_agent": k.user_agent,
            "endpoint": k.endpoint,
            "gateway": k.gateway,
            "first_seen": format_rfc3339(st.first_seen_ms),
            "last_seen": format_rfc3339(st.last_seen_ms),
            "requests": st.requests,
            "failures": st.failures,
        })
    }))
}

/// Evaluates the rotation of `old` to its successor at `now_ms`. `new` is the successor's
/// registry entry when known, `tz` the owner's time zone. Only an open rotation (state
/// rotating or deprecated, with a start) raises findings; for a key whose rotation is over
/// (revoked) the status is computed and the findings are empty.
pub fn evaluate_rotation(
    now_ms: i64,
    old: &Key,
    new: Option<&Key>,
    tz: Tz,
    policy: &Policy,
    data: &RotationData,
) -> (RotationStatus, Vec<Finding>) {
    // Open at `now`: a rotation later ended by a revocation is judged as it was before it.
    let open = old.rotation_at(now_ms).is_some();
    let new_id = old.successor.clone().unwrap_or_default();
    // A key without a rotation is treated as one that never starts.
    let rot = old.rotation.unwrap_or(crate::registry::Rotation {
        started_ms: i64::MAX,
        deadline_ms: None,
    });
    let started = rot.started_ms;
    let deadline = rot
        .deadline_ms
        .unwrap_or(started.saturating_add(policy.grace_period_ms));
    let start_hour = started.div_euclid(HOUR_MS) * HOUR_MS;

    let hours: Vec<&HourRow> = data
        .hourly
        .iter()
        .filter(|h| h.hour_ms >= start_hour && h.hour_ms <= now_ms)
        .collect();
    let share: Vec<SharePoint> = hours
        .iter()
        .filter(|h| h.old_requests + h.new_requests > 0)
        .map(|h| SharePoint {
            hour_ms: h.hour_ms,
            share: h.new_requests as f64 / (h.old_requests + h.new_requests) as f64,
            requests: h.old_requests + h.new_requests,
        })
        .collect();
    let (mut old_24, mut all_24) = (0u64, 0u64);
    for h in hours
        .iter()
        .filter(|h| h.hour_ms + HOUR_MS > now_ms - DAY_MS)
    {
        old_24 += h.old_requests;
        all_24 += h.old_requests + h.new_requests;
    }
    let share_24h = (all_24 > 0).then(|| (all_24 - old_24) as f64 / all_24 as f64);
    let old_requests = hours.iter().map(|h| h.old_requests).sum();
    let new_requests = hours.iter().map(|h| h.new_requests).sum();

    let last_old_use_ms = data
        .old_sources
        .iter()
        .map(|(_, s)| s.last_seen_ms)
        .filter(|t| *t <= now_ms)
        .max();
    let safe_to_revoke_ms = last_old_use_ms
        .unwrap_or(started)
        .max(started)
        .saturating_add(policy.quiet_period_ms);
    let mut old_key_sources: Vec<SourceRow> = data
        .old_sources
        .iter()
        .filter(|(_, s)| s.last_seen_ms >= started)
        .cloned()
        .collect();
    old_key_sources.sort_by_key(|(_, s)| std::cmp::Reverse(s.last_seen_ms));
    let lingering = lingering(now_ms, started, policy.quiet_period_ms, data);
    let forecast = forecast(now_ms, started, policy.forecast_window_ms, &share);

    let ran_a_window = now_ms.saturating_sub(started) >= policy.forecast_window_ms;
    let at_risk = ran_a_window
        && !lingering.is_empty()
        && now_ms < deadline
        && (forecast.stalled || forecast.completion_ms.is_some_and(|c| c > deadline));
    let past_deadline = now_ms >= deadline;
    // Overdue needs the old key used after the deadline, not merely a source that used it
    // within the quiet period before.
    let used_after_deadline = last_old_use_ms.is_some_and(|t| t >= deadline);
    let phase = if now_ms < started {
        Phase::Scheduled
    } else if now_ms >= safe_to_revoke_ms {
        Phase::SafeToRevoke
    } else if lingering.is_empty() || (past_deadline && !used_after_deadline) {
        // Sources that went quiet before the deadline are draining, not overdue.
        Phase::Draining
    } else if past_deadline {
        Phase::Overdue
    } else if at_risk {
        Phase::AtRisk
    } else {
        Phase::OnTrack
    };

    let status = RotationStatus {
        old_key: old.id.clone(),
        old_name: old.name.clone(),
        new_key: new_id.clone(),
        new_name: new.and_then(|k| k.name.clone()),
        owner: old.owner.clone(),
        timezone: tz.name().to_owned(),
        started_ms: started,
        deadline_ms: deadline,
        phase,
        share_24h,
        share,
        old_requests,
        new_requests,
        last_old_use_ms,
        safe_to_revoke_ms,
        forecast,
        lingering,
        old_key_sources,
    };
    if phase == Phase::Scheduled || !open {
        return (status, Vec::new());
    }
    let ctx = Ctx {
        now_ms,
        old,
        new_label: new.map_or(new_id.as_str(), |k| k.label()).to_owned(),
        tz,
        deadline,
        policy,
        status: &status,
    };
    let mut findings = Vec::new();
    ctx.lingering_findings(&mut findings);
    if phase == Phase::AtRisk {
        findings.push(ctx.at_risk());
    }
    if phase == Phase::Overdue {
        findings.push(ctx.overdue());
    }
    if !status.lingering.is_empty() {
        findings.extend(ctx.reminder());
    }
    if phase == Phase::SafeToRevoke {
        findings.push(ctx.safe_to_revoke());
    }
    (status, findings)
}

/// Sources (ip, user agent) still on the old key; see the module doc.
fn lingering(
    now_ms: i64,
    started: i64,
    quiet_ms: i64,
    data: &RotationData,
) -> Vec<LingeringSource> {
    let mut new_first: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for (k, s) in &data.new_sources {
        let e = new_first
            .entry(host_of(&k.ip, &k.user_agent))
            .or_insert(s.first_seen_ms);
        *e = (*e).min(s.first_seen_ms);
    }
    struct Acc<'a> {
        endpoints: BTreeSet<&'a str>,
        gateways: BTreeSet<&'a str>,
        /// The user agent of the host's latest old-key request (a detail, not an identity).
        latest_ua: (i64, &'a str),
        first: i64,
        last: i64,
        requests: u64,
        failures: u64,
    }
    let mut groups: BTreeMap<(&str, &str), Acc<'_>> = BTreeMap::new();
    for (k, s) in &data.old_sources {
        let g = groups.entry(host_of(&k.ip, &k.user_agent)).or_insert(Acc {
            endpoints: BTreeSet::new(),
            gateways: BTreeSet::new(),
            latest_ua: (i64::MIN, ""),
            first: s.first_seen_ms,
            last: s.last_seen_ms,
            requests: 0,
            failures: 0,
        });
        g.endpoints.insert(&k.endpoint);
        g.gateways.insert(&k.gateway);
        if s.last_seen_ms > g.latest_ua.0 {
            g.latest_ua = (s.last_seen_ms, &k.user_agent);
        }
        g.first = g.first.min(s.first_seen_ms);
        g.last = g.last.max(s.last_seen_ms);
        g.requests += s.requests;
        g.failures += s.failures;
    }
    let mut out: Vec<LingeringSource> = groups
        .into_iter()
        .filter_map(|(host, g)| {
            let recent = g.last >= started && g.last > now_ms - quiet_ms;
            let moved_since = new_first.get(&host).copied();
            let moved = moved_since.is_some_and(|n| n > g.last);
            (recent && !moved).then(|| LingeringSource {
                ip: host.0.to_owned(),
                user_agent: g.latest_ua.1.to_owned(),
                endpoints: g.endpoints.iter().map(|s| s.to_string()).collect(),
                gateways: g
                    .gateways
                    .iter()
                    .filter(|s| !s.is_empty())
                    .map(|s| s.to_string())
                    .collect(),
                first_seen_ms: g.first,
                last_seen_ms: g.last,
                requests: g.requests,
                failures: g.failures,
                new_key_since_ms: moved_since,
            })
        })
        .collect();
    out.sort_by(|a, b| b.requests.cmp(&a.requests).then(a.ip.cmp(&b.ip)));
    out
}

/// The host a source row belongs to: its IP; without one, the user agent's product stands
/// in for it. A release that bumps the user agent's version is the same host.
fn host_of<'a>(ip: &'a str, user_agent: &'a str) -> (&'a str, &'a str) {
    if ip.is_empty() {
        ("", ua_product(user_agent))
    } else {
        (ip, "")
    }
}

/// The product of a user agent, without its version: `akl-pay-worker/2.4.0 (linux)` →
/// `akl-pay-worker`.
pub(crate) fn ua_product(user_agent: &str) -> &str {
    let ua = user_agent.trim();
    let end = ua.find(['/', ' ', '(']).unwrap_or(ua.len());
    &ua[..end]
}

/// Weighted least-squares line through the recent hourly shares; see the module doc.
fn forecast(now_ms: i64, started: i64, window_ms: i64, share: &[SharePoint]) -> Forecast {
    let from = (now_ms - window_ms).max(started.div_euclid(HOUR_MS) * HOUR_MS);
    let pts: Vec<&SharePoint> = share.iter().filter(|p| p.hour_ms >= from).collect();
    let basis_requests: u64 = pts.iter().map(|p| p.requests).sum();
    let mut f = Forecast {
        basis_hours: pts.len(),
        basis_requests,
        ..Forecast::default()
    };
    if pts.len() < MIN_FIT_HOURS || basis_requests < MIN_FIT_REQUESTS {
        return f;
    }
    // x in hours from now (the middle of each hour), y the share, w the requests.
    let xs: Vec<(f64, f64, f64)> = pts
        .iter()
        .map(|p| {
            (
                (p.hour_ms + HOUR_MS / 2 - now_ms) as f64 / HOUR_MS as f64,
                p.share,
                p.requests as f64,
            )
        })
        .collect();
    let w: f64 = xs.iter().map(|p| p.2).sum();
    let mx = xs.iter().map(|p| p.0 * p.2).sum::<f64>() / w;
    let my = xs.iter().map(|p| p.1 * p.2).sum::<f64>() / w;
    let sxx: f64 = xs.iter().map(|p| p.2 * (p.0 - mx).powi(2)).sum();
    let sxy: f64 = xs.iter().map(|p| p.2 * (p.0 - mx) * (p.1 - my)).sum();
    if sxx <= f64::EPSILON {
        return f;
    }
    let slope = sxy / sxx; // per hour
    let at_now = my - slope * mx; // the line at x = 0 (now)
    f.slope_per_day = Some(slope * 24.0);
    if slope <= 1e-9 {
        f.stalled = at_now < 1.0;
        return f;
    }
    let hours_left = ((1.0 - at_now) / slope).max(0.0);
    // Beyond ~100 years a forecast means "never"; keep it representable.
    let hours_left = hours_left.min(1e6);
    f.completion_ms = Some(now_ms + (hours_left * HOUR_MS as f64) as i64);
    f
}

/// `ms` moved by `delta_ms`; whole days are counted on the wall clock of `tz`.
fn shift(ms: i64, delta_ms: i64, tz: Tz) -> i64 {
    if delta_ms == 0 || delta_ms % DAY_MS != 0 {
        return ms + delta_ms;
    }
    let Some(t) = Utc.timestamp_millis_opt(ms).single() else {
        return ms + delta_ms;
    };
    let local = t.with_timezone(&tz).naive_local() + chrono::Duration::days(delta_ms / DAY_MS);
    local_to_utc(local, tz).unwrap_or(ms + delta_ms)
}

struct Ctx<'a> {
    now_ms: i64,
    old: &'a Key,
    new_label: String,
    tz: Tz,
    deadline: i64,
    policy: &'a Policy,
    status: &'a RotationStatus,
}

fn source_json(s: &LingeringSource) -> serde_json::Value {
    json!({
        "ip": s.ip,
        "user_agent": s.user_agent,
        "endpoints": s.endpoints,
        "gateways": s.gateways,
        "first_seen": format_rfc3339(s.first_seen_ms),
        "last_seen": format_rfc3339(s.last_seen_ms),
        "requests": s.requests,
        "failures": s.failures,
        "new_key_since": s.new_key_since_ms.map(format_rfc3339),
    })
}

fn pct(share: Option<f64>) -> String {
    share.map_or("no traffic".into(), |s| format!("{:.0} %", s * 100.0))
}

impl Ctx<'_> {
    fn old_label(&self) -> &str {
        self.old.label()
    }

    fn finding(
        &self,
        kind: FindingKind,
        at_ms: i64,
        severity: Severity,
        summary: String,
        evidence: serde_json::Value,
        dedup_key: String,
    ) -> Finding {
        Finding {
            kind,
            key_id: self.old.id.clone(),
            owner: Some(self.old.owner.clone()),
            at_ms,
            severity,
            summary,
            evidence,
            dedup_key,
        }
    }

    fn rotation_id(&self) -> String {
        format!("{}:{}", self.old.id, self.status.new_key)
    }

    /// The common evidence of a rotation.
    fn rotation_json(&self) -> serde_json::Value {
        let s = self.status;
        json!({
            "old_key": s.old_key,
            "old_name": s.old_name,
            "new_key": s.new_key,
            "new_name": s.new_name,
            "started": format_rfc3339(s.started_ms),
            "deadline": format_rfc3339(s.deadline_ms),
            "deadline_local": format_local(s.deadline_ms, self.tz),
            "timezone": s.timezone,
            "share_24h": s.share_24h,
            "old_requests": s.old_requests,
            "new_requests": s.new_requests,
            "last_old_use": s.last_old_use_ms.map(format_rfc3339),
        })
    }

    fn with_sources(&self, mut v: serde_json::Value) -> serde_json::Value {
        let lingering = &self.status.lingering;
        v["lingering_sources"] = lingering
            .iter()
            .take(EVIDENCE_SOURCES)
            .map(source_json)
            .collect();
        v["lingering_count"] = json!(lingering.len());
        v
    }

    fn lingering_findings(&self, out: &mut Vec<Finding>) {
        let overdue = self.now_ms >= self.deadline;
        for s in &self.status.lingering {
            let mut evidence = source_json(s);
            evidence["rotation"] = self.rotation_json();
            let who = if s.ip.is_empty() {
                "a source without an IP".to_owned()
            } else {
                s.ip.clone()
            };
            let ua = if s.user_agent.is_empty() {
                String::new()
            } else {
                format!(" ({})", s.user_agent)
            };
            out.push(self.finding(
                FindingKind::LingeringOldKey,
                self.now_ms,
                if overdue {
                    Severity::Critical
                } else {
                    Severity::Warning
                },
                format!(
                    "{who}{ua} still uses the old key {} of {} (last at {}, {} requests since \
                     {}); it must move to {} by {}",
                    self.old_label(),
                    self.old.owner,
                    format_local(s.last_seen_ms, self.tz),
                    s.requests,
                    format_local(s.first_seen_ms, self.tz),
                    self.new_label,
                    format_local(self.deadline, self.tz)
                ),
                evidence,
                // One fact per host: a new user-agent version is not a new source.
                format!(
                    "lingering_old_key:{}:{}|{}",
                    self.rotation_id(),
                    s.ip,
                    if s.ip.is_empty() {
                        ua_product(&s.user_agent)
                    } else {
                        ""
                    }
                ),
            ));
        }
    }

    fn at_risk(&self) -> Finding {
        let s = self.status;
        let f = &s.forecast;
        let when = match f.completion_ms {
            Some(c) => format!("the trend completes it around {}", format_local(c, self.tz)),
            None => "adoption has stalled".to_owned(),
        };
        let mut evidence = self.with_sources(self.rotation_json());
        evidence["forecast"] = json!({
            "model": "weighted linear fit of the hourly share on the new key",
            "window_h": self.policy.forecast_window_ms / HOUR_MS,
            "completion": f.completion_ms.map(format_rfc3339),
            "slope_per_day": f.slope_per_day,
            "stalled": f.stalled,
            "basis_hours": f.basis_hours,
            "basis_requests": f.basis_requests,
        });
        self.finding(
            FindingKind::RotationAtRisk,
            self.now_ms,
            Severity::Warning,
            format!(
                "the rotation of {} to {} ({}) will miss its deadline {}: {} on the new key, \
                 {when}; {} sources still use the old key",
                self.old_label(),
                self.new_label,
                self.old.owner,
                format_local(self.deadline, self.tz),
                pct(s.share_24h),
                s.lingering.len()
            ),
            evidence,
            format!("rotation_at_risk:{}", self.rotation_id()),
        )
    }

    fn overdue(&self) -> Finding {
        let s = self.status;
        self.finding(
            FindingKind::RotationOverdue,
            self.deadline,
            Severity::Critical,
            format!(
                "the rotation of {} to {} ({}) is overdue since {}: {} sources still use the \
                 old key, {} on the new key",
                self.old_label(),
                self.new_label,
                self.old.owner,
                format_local(self.deadline, self.tz),
                s.lingering.len(),
                pct(s.share_24h)
            ),
            self.with_sources(self.rotation_json()),
            format!("rotation_overdue:{}", self.rotation_id()),
        )
    }

    fn reminder(&self) -> Option<Finding> {
        let p = self.policy;
        let mut step: Option<(String, i64)> = None;
        for r in &p.reminders {
            let t = shift(self.deadline, -r.before_ms, self.tz);
            // Steps from before the rotation started are skipped, not sent late.
            if t <= self.now_ms && t >= self.status.started_ms {
                step = Some((r.label.clone(), t));
            }
        }
        let every = p.overdue_reminder_every_ms;
        if every > 0 && self.now_ms >= self.deadline {
            let at = |k: i64| shift(self.deadline, k.saturating_mul(every), self.tz);
            let mut k = (self.now_ms - self.deadline) / every;
            while k > 0 && at(k) > self.now_ms {
                k -= 1;
            }
            while at(k + 1) <= self.now_ms {
                k += 1;
            }
            if k > 0 {
                step = Some((format!("overdue #{k}"), at(k)));
            }
        }
        let (label, at) = step?;
        let overdue = self.now_ms >= self.deadline;
        let mut evidence = self.with_sources(self.rotation_json());
        evidence["step"] = json!(label);
        Some(self.finding(
            FindingKind::RotationReminder,
            at,
            if overdue {
                Severity::Warning
            } else {
                Severity::Info
            },
            format!(
                "reminder ({label}): {} must move {} sources from {} to {} by {}{}",
                self.old.owner,
                self.status.lingering.len(),
                self.old_label(),
                self.new_label,
                format_local(self.deadline, self.tz),
                if overdue { ", which has passed" } else { "" }
            ),
            evidence,
            format!("rotation_reminder:{}:{label}", self.rotation_id()),
        ))
    }

    fn safe_to_revoke(&self) -> Finding {
        let s = self.status;
        let mut evidence = self.rotation_json();
        evidence["quiet_period_h"] = json!(self.policy.quiet_period_ms / HOUR_MS);
        evidence["quiet_since"] = json!(format_rfc3339(
            s.safe_to_revoke_ms - self.policy.quiet_period_ms
        ));
        self.finding(
            FindingKind::SafeToRevoke,
            s.safe_to_revoke_ms,
            Severity::Info,
            format!(
                "{} ({}) is safe to revoke: no request with it for {} h, since {}; {} requests \
                 on {} since the rotation started",
                self.old_label(),
                self.old.owner,
                self.policy.quiet_period_ms / HOUR_MS,
                s.last_old_use_ms
                    .map_or("before the rotation started".into(), |t| {
                        format_local(t, self.tz)
                    }),
                s.new_requests,
                self.new_label
            ),
            evidence,
            format!("safe_to_revoke:{}", self.rotation_id()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{SourceKey, SourceStats};
    use crate::registry::{KeyState, Rotation};

    const T0: i64 = 1_795_132_800_000; // 2026-11-20T00:00:00Z

    fn key(deadline: Option<i64>) -> Key {
        let mut k = Key::new("A", "acme");
        k.state = KeyState::Rotating;
        k.successor = Some("B".into());
        k.rotation = Some(Rotation {
            started_ms: T0,
            deadline_ms: deadline,
        });
        k
    }

    fn src(ip: &str, first: i64, last: i64, requests: u64) -> SourceRow {
        (
            SourceKey {
                key_id: String::new(),
                ip: ip.into(),
                user_agent: "ua".into(),
                endpoint: "/e".into(),
                gateway: "gw".into(),
            },
            SourceStats {
                first_seen_ms: first,
                last_seen_ms: last,
                requests,
                failures: 0,
            },
        )
    }

    /// Hours from T0 with the share rising by `per_hour` from `start`, 100 requests each.
    fn linear(hours: i64, start: f64, per_hour: f64) -> Vec<HourRow> {
        (0..hours)
            .map(|h| {
                let share = (start + per_hour * (h as f64 + 0.5)).clamp(0.0, 1.0);
                let new = (share * 100.0).round() as u64;
                HourRow {
                    hour_ms: T0 + h * HOUR_MS,
                    old_requests: 100 - new,
                    new_requests: new,
                    ..HourRow::default()
                }
            })
            .collect()
    }

    #[test]
    fn the_forecast_extends_the_trend() {
        // 1 % per hour from 0: 100 % after 100 hours.
        let data = RotationData {
            hourly: linear(48, 0.0, 0.01),
            old_sources: vec![src("10.0.0.1", T0 - DAY_MS, T0 + 47 * HOUR_MS, 10)],
            ..RotationData::default()
        };
        let now = T0 + 48 * HOUR_MS;
        let (s, _) = evaluate_rotation(
            now,
            &key(Some(T0 + 200 * HOUR_MS)),
            None,
            Tz::UTC,
            &Policy::default(),
            &data,
        );
        let c = s.forecast.completion_ms.unwrap();
        assert!(
            (c - (T0 + 100 * HOUR_MS)).abs() < 2 * HOUR_MS,
            "{}",
            format_rfc3339(c)
        );
        assert!((s.forecast.slope_per_day.unwrap() - 0.24).abs() < 0.01);
        assert_eq!(s.phase, Phase::OnTrack);

        // The same trend with a deadline at 80 h is at risk.
        let (s, f) = evaluate_rotation(
            now,
            &key(Some(T0 + 80 * HOUR_MS)),
            None,
            Tz::UTC,
            &Policy::default(),
            &data,
        );
        assert_eq!(s.phase, Phase::AtRisk);
        assert!(f.iter().any(|f| f.kind == FindingKind::RotationAtRisk));

        // A flat share is stalled, hence at risk whatever the deadline.
        let flat = RotationData {
            hourly: linear(48, 0.6, 0.0),
            ..data.clone()
        };
        let (s, _) = evaluate_rotation(
            now,
            &key(Some(T0 + 1000 * HOUR_MS)),
            None,
            Tz::UTC,
            &Policy::default(),
            &flat,
        );
        assert!(s.forecast.stalled);
        assert_eq!(s.forecast.completion_ms, None);
        assert_eq!(s.phase, Phase::AtRisk);

        // Too early to judge: less than a forecast window since the start.
        let (s, _) = evaluate_rotation(
            T0 + 10 * HOUR_MS,
            &key(Some(T0 + 1000 * HOUR_MS)),
            None,
            Tz::UTC,
            &Policy::default(),
            &RotationData {
                hourly: linear(10, 0.6, 0.0),
                old_sources: vec![src("10.0.0.1", T0, T0 + 9 * HOUR_MS, 10)],
                ..RotationData::default()
            },
        );
        assert_eq!(s.phase, Phase::OnTrack);
    }

    #[test]
    fn switched_sources_do_not_linger() {
        let data = RotationData {
            old_sources: vec![
                // Switched at +5 h (old key last used just before).
                src("10.0.0.1", T0 - DAY_MS, T0 + 5 * HOUR_MS - 1, 50),
                // Never switched.
                src("10.0.0.2", T0 - DAY_MS, T0 + 30 * HOUR_MS, 80),
                // Mixes both keys: old key after its first new-key request.
                src("10.0.0.3", T0 - DAY_MS, T0 + 29 * HOUR_MS, 20),
                // Quiet since before the rotation started.
                src("10.0.0.4", T0 - DAY_MS, T0 - HOUR_MS, 20),
            ],
            new_sources: vec![
                src("10.0.0.1", T0 + 5 * HOUR_MS, T0 + 30 * HOUR_MS, 60),
                src("10.0.0.3", T0 + 10 * HOUR_MS, T0 + 30 * HOUR_MS, 60),
            ],
            ..RotationData::default()
        };
        let now = T0 + 31 * HOUR_MS;
        let (s, f) = evaluate_rotation(now, &key(None), None, Tz::UTC, &Policy::default(), &data);
        let ips: Vec<_> = s.lingering.iter().map(|l| l.ip.as_str()).collect();
        assert_eq!(ips, ["10.0.0.2", "10.0.0.3"]);
        assert_eq!(s.lingering[1].new_key_since_ms, Some(T0 + 10 * HOUR_MS));
        let lingering: Vec<_> = f
            .iter()
            .filter(|f| f.kind == FindingKind::LingeringOldKey)
            .map(|f| f.evidence["ip"].as_str().unwrap())
            .collect();
        assert_eq!(lingering, ["10.0.0.2", "10.0.0.3"]);
        // Deadline from the grace period (14 days).
        assert_eq!(s.deadline_ms, T0 + 14 * DAY_MS);
        assert_eq!(s.old_key_sources.len(), 3);
        assert_eq!(s.safe_to_revoke_ms, T0 + 30 * HOUR_MS + 72 * HOUR_MS);
    }

    #[test]
    fn a_source_is_a_host_whatever_its_user_agent_version() {
        let with_ua = |ip: &str, ua: &str, first: i64, last: i64| {
            let mut r = src(ip, first, last, 10);
            r.0.user_agent = ua.into();
            r
        };
        let cases = [
            ("akl-pay-worker/2.4.0 (linux)", "akl-pay-worker"),
            ("Mozilla/5.0 (X11)", "Mozilla"),
            ("curl", "curl"),
            ("", ""),
        ];
        for (ua, product) in cases {
            assert_eq!(ua_product(ua), product, "{ua}");
        }
        let data = RotationData {
            old_sources: vec![
                // Moved to the new key in a release that bumped its version.
                with_ua(
                    "10.0.0.1",
                    "worker/2.3.1",
                    T0 - DAY_MS,
                    T0 + 5 * HOUR_MS - 1,
                ),
                // Two versions on the old key, never moved: one source.
                with_ua("10.0.0.2", "worker/2.3.1", T0 - DAY_MS, T0 + 2 * HOUR_MS),
                with_ua(
                    "10.0.0.2",
                    "worker/2.3.2",
                    T0 + 2 * HOUR_MS,
                    T0 + 6 * HOUR_MS,
                ),
            ],
            new_sources: vec![with_ua(
                "10.0.0.1",
                "worker/2.4.0",
                T0 + 5 * HOUR_MS,
                T0 + 9 * HOUR_MS,
            )],
            ..RotationData::default()
        };
        let (s, f) = evaluate_rotation(
            T0 + 10 * HOUR_MS,
            &key(None),
            None,
            Tz::UTC,
            &Policy::default(),
            &data,
        );
        let got: Vec<_> = s
            .lingering
            .iter()
            .map(|l| (l.ip.as_str(), l.user_agent.as_str(), l.requests))
            .collect();
        assert_eq!(got, [("10.0.0.2", "worker/2.3.2", 20)]);
        let lingering = f
            .iter()
            .filter(|f| f.kind == FindingKind::LingeringOldKey)
            .count();
        assert_eq!(lingering, 1);
    }

    #[test]
    fn overdue_needs_old_key_traffic_after_the_deadline() {
        let deadline = T0 + DAY_MS;
        for (last_old, overdue) in [(deadline - HOUR_MS, false), (deadline + HOUR_MS, true)] {
            let data = RotationData {
                old_sources: vec![src("10.0.0.2", T0 - DAY_MS, last_old, 80)],
                ..RotationData::default()
            };
            let (s, f) = evaluate_rotation(
                deadline + 2 * HOUR_MS,
                &key(Some(deadline)),
                None,
                Tz::UTC,
                &Policy::default(),
                &data,
            );
            let raised = f.iter().any(|f| f.kind == FindingKind::RotationOverdue);
            assert_eq!(raised, overdue, "last old-key use {last_old}");
            assert_eq!(s.phase == Phase::Overdue, overdue);
            if !overdue {
                assert_eq!(s.phase, Phase::Draining);
            }
        }
    }

    #[test]
    fn a_rotation_revoked_later_is_judged_as_it_was_before() {
        let mut k = key(Some(T0 + DAY_MS));
        k.state = KeyState::Revoked;
        k.revoked_ms = Some(T0 + 10 * DAY_MS);
        let data = RotationData {
            old_sources: vec![src("10.0.0.2", T0 - DAY_MS, T0 + HOUR_MS, 80)],
            ..RotationData::default()
        };
        let quiet = T0 + HOUR_MS + 72 * HOUR_MS;
        let (_, f) = evaluate_rotation(quiet, &k, None, Tz::UTC, &Policy::default(), &data);
        let safe: Vec<_> = f
            .iter()
            .filter(|f| f.kind == FindingKind::SafeToRevoke)
            .map(|f| f.at_ms)
            .collect();
        assert_eq!(safe, [quiet]);
        // After the revocation the rotation is over: nothing more to say.
        let (_, f) = evaluate_rotation(
            T0 + 11 * DAY_MS,
            &k,
            None,
            Tz::UTC,
            &Policy::default(),
            &data,
        );
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn safe_to_revoke_is_at_the_end_of_the_quiet_period() {
        let last = T0 + 30 * HOUR_MS + 1234;
        let data = RotationData {
            old_sources: vec![src("10.0.0.2", T0 - DAY_MS, last, 80)],
            new_sources: vec![src("10.0.0.2", last + 1, last + 100 * HOUR_MS, 80)],
            ..RotationData::default()
        };
        let safe = last + 72 * HOUR_MS;
        let eval =
            |now| evaluate_rotation(now, &key(None), None, Tz::UTC, &Policy::default(), &data);
        let (s, f) = eval(safe - 1);
        assert_eq!(s.phase, Phase::Draining);
        assert!(f.iter().all(|f| f.kind != FindingKind::SafeToRevoke));
        for now in [safe, safe + DAY_MS] {
            let (s, f) = eval(now);
            assert_eq!(s.phase, Phase::SafeToRevoke);
            let safe_findings: Vec<_> = f
                .iter()
                .filter(|f| f.kind == FindingKind::SafeToRevoke)
                .collect();
            assert_eq!(safe_findings.len(), 1);
            assert_eq!(safe_findings[0].at_ms, safe);
            assert_eq!(safe_findings[0].dedup_key, "safe_to_revoke:A:B");
        }
        // Before the start: scheduled, nothing raised.
        let (s, f) = eval(T0 - 1);
        assert_eq!(s.phase, Phase::Scheduled);
        assert!(f.is_empty());
        // Once revoked, the rotation is over: nothing raised either.
        let mut revoked = key(None);
        revoked.state = KeyState::Revoked;
        let (s, f) = evaluate_rotation(
            safe + DAY_MS,
            &revoked,
            None,
            Tz::UTC,
            &Policy::default(),
            &data,
        );
        assert_eq!(s.phase, Phase::SafeToRevoke);
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn reminders_step_down_to_the_deadline_then_repeat_daily() {
        let deadline = T0 + 10 * DAY_MS;
        let data = RotationData {
            old_sources: vec![src("10.0.0.1", T0 - DAY_MS, T0 + 100 * DAY_MS, 10)],
            ..RotationData::default()
        };
        let step = |now: i64| {
            let (_, f) = evaluate_rotation(
                now,
                &key(Some(deadline)),
                None,
                Tz::UTC,
                &Policy::default(),
                &data,
            );
            f.into_iter()
                .find(|f| f.kind == FindingKind::RotationReminder)
                .map(|f| (f.evidence["step"].as_str().unwrap().to_owned(), f.at_ms))
        };
        assert_eq!(step(deadline - 7 * DAY_MS - 1), None);
        assert_eq!(
            step(deadline - 7 * DAY_MS),
            Some(("7d".into(), deadline - 7 * DAY_MS))
        );
        assert_eq!(step(deadline - 1), Some(("1d".into(), deadline - DAY_MS)));
        assert_eq!(step(deadline), Some(("due".into(), deadline)));
        assert_eq!(step(deadline + DAY_MS - 1), Some(("due".into(), deadline)));
        assert_eq!(
            step(deadline + 2 * DAY_MS + 5),
            Some(("overdue #2".into(), deadline + 2 * DAY_MS))
        );
        assert_eq!(
            step(deadline + 40 * DAY_MS),
            Some(("overdue #40".into(), deadline + 40 * DAY_MS))
        );
    }

    #[test]
    fn whole_day_steps_follow_the_owners_wall_clock() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        // 2026-03-29T12:00 CEST = 10:00Z; a day earlier is 12:00 CET = 11:00Z (23 h).
        let deadline = 1_774_778_400_000;
        assert_eq!(format_rfc3339(deadline), "2026-03-29T10:00:00.000Z");
        assert_eq!(
            format_rfc3339(shift(deadline, -DAY_MS, berlin)),
            "2026-03-28T11:00:00.000Z"
        );
        assert_eq!(
            format_rfc3339(shift(deadline, -DAY_MS, Tz::UTC)),
            "2026-03-28T10:00:00.000Z"
        );
        assert_eq!(
            format_rfc3339(shift(deadline, -3 * HOUR_MS, berlin)),
            "2026-03-29T07:00:00.000Z"
        );
    }
}
