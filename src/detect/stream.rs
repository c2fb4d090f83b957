//! Detectors fed one event at a time: revoked or expired key used, unknown keys, bursts of
//! invalid-key failures from one IP, and failed rollovers.
//!
//! Every detector judges an event by what the registry knows at the event's time: the key
//! is looked up by id or alias (a refused request carries the fingerprint of the presented
//! secret, an accepted one the gateway's id; both name one key), and findings name the
//! registry id. A known key failing is never an "unknown key": it is revoked or expired use,
//! or, for the successor of a rotation open at that time, a failed rollover. Rate limiting
//! (429) is not an authentication failure anywhere here.
//!
//! Each finding's `at` is the time of the request that made it true (the one that crossed
//! a threshold), never the start of a bucket.
//!
//! State is small and bounded: what was reported per key and source (one entry per
//! reporting interval), the keys reported as unknown, the last `threshold` failures per IP,
//! and per registered key a pre-rotation failure baseline (per day, over the policy's
//! baseline period) and, while it is a rotation's successor, an hour of per-minute counts. Each map has a cap; past it, stale entries go
//! first.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use serde_json::json;

use super::{Finding, FindingKind, Policy, Severity};
use crate::event::{AuthEvent, Outcome, NO_KEY};
use crate::registry::{format_local, format_rfc3339, Key, Registry, Rotation};

/// Entries of (kind, key, source) → reporting interval kept before pruning.
const MAX_REPORTED: usize = 100_000;
/// Unknown keys remembered as reported.
const MAX_UNKNOWN: usize = 100_000;
/// IPs with an open burst window.
const MAX_BURST_IPS: usize = 20_000;
/// Distinct values listed in a burst's evidence.
const EVIDENCE_VALUES: usize = 10;
/// Keys with a failure baseline or a rollover window (registered keys only).
const MAX_KEYS: usize = 100_000;
/// A failed rollover is judged over the successor's last hour.
const ROLLOVER_WINDOW_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;
/// The old key's failure rate counts as a baseline from this many requests on.
const MIN_BASELINE_REQUESTS: u64 = 20;

#[derive(Debug, Default)]
pub(super) struct StreamDetectors {
    /// (kind, key id, source IP) → the last reporting interval (`ts / repeat_after`).
    reported: HashMap<(FindingKind, String, String), i64>,
    unknown: HashSet<String>,
    bursts: HashMap<String, Burst>,
    /// Per registered key, (day, requests, auth failures) of the days before its rotation
    /// started, at most the policy's baseline period of them.
    baselines: HashMap<String, VecDeque<(i64, u64, u64)>>,
    /// Per successor of an open rotation, its recent traffic.
    rollovers: HashMap<String, Rollover>,
}

/// The successor's last hour, per minute, and the failure run being judged.
#[derive(Debug, Default)]
struct Rollover {
    /// (minute, requests, auth failures), oldest first.
    minutes: VecDeque<(i64, u64, u64)>,
    /// The first failure of the current run (reset when the window has none).
    run_from: Option<i64>,
    /// The run was reported.
    reported: bool,
    /// Failing sources of the run: IP → failures.
    sources: BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
struct Burst {
    /// The latest failures, at most `threshold` of them, oldest first.
    recent: VecDeque<Failure>,
    /// The reporting interval of the last finding for this IP.
    reported: Option<i64>,
}

#[derive(Debug)]
struct Failure {
    ts_ms: i64,
    key_id: String,
    user_agent: String,
    endpoint: String,
}

fn text<'e>(f: &'e Option<std::borrow::Cow<'_, str>>) -> &'e str {
    f.as_deref().unwrap_or("")
}

impl StreamDetectors {
    pub(super) fn observe(
        &mut self,
        ev: &AuthEvent<'_>,
        registry: &Registry,
        policy: &Policy,
        out: &mut Vec<Finding>,
    ) {
        let key_id = ev.key_id.as_ref();
        let has_key = key_id != NO_KEY && !key_id.is_empty();
        let known = if has_key { registry.key(key_id) } else { None };
        let ip = text(&ev.source_ip);
        let interval = ev.ts_ms.div_euclid(policy.repeat_after_ms.max(1));
        // With an empty registry every key is "unknown": that says nothing.
        let unknown = has_key && known.is_none() && !registry.is_empty();

        if has_key {
            let revoked =
                known.is_some_and(|k| k.is_revoked_at(ev.ts_ms)) || ev.outcome == Outcome::Revoked;
            let expired = !revoked
                && (known.is_some_and(|k| k.is_expired_at(ev.ts_ms))
                    || ev.outcome == Outcome::Expired);
            let kind = if revoked {
                Some(FindingKind::RevokedKeyUsed)
            } else if expired {
                Some(FindingKind::ExpiredKeyUsed)
            } else {
                None
            };
            if let Some(kind) = kind {
                let id = known.map_or(key_id, |k| k.id.as_str());
                let slot = (kind, id.to_owned(), ip.to_owned());
                if self.reported.get(&slot) != Some(&interval) {
                    if self.reported.len() >= MAX_REPORTED {
                        self.reported.retain(|_, i| *i >= interval - 1);
                        if self.reported.len() >= MAX_REPORTED {
                            self.reported.clear();
                        }
                    }
                    self.reported.insert(slot, interval);
                    out.push(key_used(kind, ev, known, registry, interval));
                }
            }
        }

        if let Some(k) = known {
            self.rollover(ev, k, registry, policy, out);
        }

        if unknown
            && !matches!(
                ev.outcome,
                Outcome::InvalidKey | Outcome::Revoked | Outcome::Expired
            )
            && self.unknown.len() < MAX_UNKNOWN
            && self.unknown.insert(key_id.to_owned())
        {
            out.push(unknown_key(ev));
        }

        // A key the registry knows is not a guess, whatever the gateway answered.
        let counts = known.is_none()
            && (ev.outcome == Outcome::InvalidKey || (unknown && ev.outcome.is_auth_failure()));
        if counts {
            self.burst(ev, ip, interval, policy, out);
        }
    }

    /// Feeds a known key's request to its failure baseline or, when it is the successor of
    /// a rotation open at the request's time, to the failed-rollover check.
    fn rollover(
        &mut self,
        ev: &AuthEvent<'_>,
        key: &Key,
        registry: &Registry,
        policy: &Policy,
        out: &mut Vec<Finding>,
    ) {
        let failed = ev.outcome.is_auth_failure();
        let rotating = key.rotation.is_some_and(|r| ev.ts_ms >= r.started_ms);
        if !rotating && (self.baselines.len() < MAX_KEYS || self.baselines.contains_key(&key.id)) {
            let b = self.baselines.entry(key.id.clone()).or_default();
            let day = ev.ts_ms.div_euclid(DAY_MS);
            match b.back_mut() {
                Some((d, req, fail)) if *d == day => {
                    *req += 1;
                    *fail += u64::from(failed);
                }
                _ => b.push_back((day, 1, u64::from(failed))),
            }
            let oldest = (ev.ts_ms - policy.failed_rollover.baseline_ms).div_euclid(DAY_MS);
            while b.front().is_some_and(|(d, _, _)| *d < oldest) {
                b.pop_front();
            }
        }
        let Some((old, rot)) = registry.rotation_to(&key.id, ev.ts_ms) else {
            return;
        };
        if ev.ts_ms < rot.started_ms
            || (self.rollovers.len() >= MAX_KEYS && !self.rollovers.contains_key(&key.id))
        {
            return;
        }
        let p = &policy.failed_rollover;
        let r = self.rollovers.entry(key.id.clone()).or_default();
        let minute = ev.ts_ms.div_euclid(60_000);
        match r.minutes.back_mut() {
            Some((m, req, fail)) if *m == minute => {
                *req += 1;
                *fail += u64::from(failed);
            }
            _ => r.minutes.push_back((minute, 1, u64::from(failed))),
        }
        let horizon = (ev.ts_ms - ROLLOVER_WINDOW_MS).div_euclid(60_000);
        while r.minutes.front().is_some_and(|(m, _, _)| *m <= horizon) {
            r.minutes.pop_front();
        }
        let (requests, failures) = r
            .minutes
            .iter()
            .fold((0, 0), |(a, b), (_, req, fail)| (a + req, b + fail));
        if failures == 0 {
            *r = Rollover {
                minutes: std::mem::take(&mut r.minutes),
                ..Rollover::default()
            };
            return;
        }
        if !failed {
            return;
        }
        let run_from = *r.run_from.get_or_insert(ev.ts_ms);
        if r.sources.len() < EVIDENCE_VALUES || r.sources.contains_key(text(&ev.source_ip)) {
            *r.sources.entry(text(&ev.source_ip).to_owned()).or_default() += 1;
        }
        // The old key's auth-failure rate over the baseline period before the rotation.
        let since = (rot.started_ms - p.baseline_ms).div_euclid(DAY_MS);
        let (req, fail) = self.baselines.get(&old.id).map_or((0, 0), |b| {
            b.iter()
                .filter(|(d, _, _)| *d >= since)
                .fold((0, 0), |(a, f), (_, r, x)| (a + r, f + x))
        });
        let baseline = if req >= MIN_BASELINE_REQUESTS {
            fail as f64 / req as f64
        } else {
            0.0
        };
        let threshold = p.min_rate.max(p.factor * baseline);
        let rate = failures as f64 / requests as f64;
        if r.reported || failures < p.min_failures || rate < threshold {
            return;
        }
        r.reported = true;
        out.push(failed_rollover(
            ev,
            old,
            key,
            rot,
            registry,
            Judged {
                run_from,
                failures,
                requests,
                rate,
                baseline,
                threshold,
                sources: &r.sources,
            },
        ));
    }

    fn burst(
        &mut self,
        ev: &AuthEvent<'_>,
        ip: &str,
        interval: i64,
        policy: &Policy,
        out: &mut Vec<Finding>,
    ) {
        let p = &policy.unknown_key_burst;
        if !self.bursts.contains_key(ip) && self.bursts.len() >= MAX_BURST_IPS {
            let horizon = ev.ts_ms - p.window_ms;
            self.bursts
                .retain(|_, b| b.recent.back().is_some_and(|f| f.ts_ms >= horizon));
            if self.bursts.len() >= MAX_BURST_IPS {
                return;
            }
        }
        let b = self.bursts.entry(ip.to_owned()).or_default();
        b.recent.push_back(Failure {
            ts_ms: ev.ts_ms,
            key_id: ev.key_id.to_string(),
            user_agent: text(&ev.user_agent).to_owned(),
            endpoint: text(&ev.endpoint).to_owned(),
        });
        while b
            .recent
            .front()
            .is_some_and(|f| f.ts_ms < ev.ts_ms - p.window_ms)
            || b.recent.len() > p.threshold as usize
        {
            b.recent.pop_front();
        }
        if b.recent.len() < p.threshold as usize || b.reported == Some(interval) {
            return;
        }
        b.reported = Some(interval);
        let first = b.recent.front().map_or(ev.ts_ms, |f| f.ts_ms);
        let mut keys: BTreeMap<&str, u64> = BTreeMap::new();
        let mut uas: BTreeMap<&str, u64> = BTreeMap::new();
        let mut endpoints: BTreeMap<&str, u64> = BTreeMap::new();
        for f in &b.recent {
            for (map, v) in [
                (&mut keys, f.key_id.as_str()),
                (&mut uas, f.user_agent.as_str()),
                (&mut endpoints, f.endpoint.as_str()),
            ] {
                if map.len() < EVIDENCE_VALUES || map.contains_key(v) {
                    *map.entry(v).or_default() += 1;
                }
            }
        }
        let n = b.recent.len();
        let presented: HashSet<&str> = b
            .recent
            .iter()
            .map(|f| f.key_id.as_str())
            .filter(|k| *k != NO_KEY)
            .collect();
        let without_key = b.recent.iter().filter(|f| f.key_id == NO_KEY).count();
        out.push(Finding {
            kind: FindingKind::UnknownKeyBurst,
            key_id: NO_KEY.to_owned(),
            owner: None,
            at_ms: ev.ts_ms,
            severity: Severity::Warning,
            summary: format!(
                "{} sent {n} requests with a missing, invalid or unknown key within {} s \
                 ({} distinct keys presented, {without_key} requests without a key)",
                if ip.is_empty() {
                    "an unknown source"
                } else {
                    ip
                },
                (ev.ts_ms - first) / 1000,
                presented.len()
            ),
            evidence: json!({
                "ip": ip,
                "failures": n,
                "window_start": format_rfc3339(first),
                "window_end": format_rfc3339(ev.ts_ms),
                "threshold": p.threshold,
                "window_s": p.window_ms / 1000,
                "distinct_keys": presented.len(),
                "without_key": without_key,
                "keys": keys,
                "user_agents": uas,
                "endpoints": endpoints,
            }),
            dedup_key: format!("unknown_key_burst:{ip}:{interval}"),
        });
    }
}

fn key_used(
    kind: FindingKind,
    ev: &AuthEvent<'_>,
    key: Option<&Key>,
    registry: &Registry,
    interval: i64,
) -> Finding {
    // The registry id: a refused request carries an alias (the presented key's fingerprint).
    let key_id = key.map_or(ev.key_id.as_ref(), |k| k.id.as_str());
    let label = key.map_or(key_id, |k| k.label());
    let owner = key.map(|k| k.owner.clone());
    let accepted = ev.outcome == Outcome::Ok;
    let ip = text(&ev.source_ip);
    let tz = registry.timezone_of(key_id);
    let (word, severity, since) = if kind == FindingKind::RevokedKeyUsed {
        (
            "revoked",
            Severity::Critical,
            key.and_then(|k| k.revoked_ms),
        )
    } else {
        (
            "expired",
            if accepted {
                Severity::Critical
            } else {
                Severity::Warning
            },
            key.and_then(|k| k.expires_ms),
        )
    };
    let since_text = since.map_or(String::new(), |s| format!(" since {}", format_local(s, tz)));
    Finding {
        kind,
        key_id: key_id.to_owned(),
        owner,
        at_ms: ev.ts_ms,
        severity,
        summary: format!(
            "{word} key {label}{since_text} was used from {} ({}), and the gateway {} it",
            if ip.is_empty() {
                "an unknown source"
            } else {
                ip
            },
            if ev.user_agent.is_some() {
                text(&ev.user_agent)
            } else {
                "no user agent"
            },
            if accepted { "accepted" } else { "refused" }
        ),
        evidence: json!({
            "key_name": key.and_then(|k| k.name.clone()),
            "ip": ip,
            "user_agent": ev.user_agent,
            "endpoint": ev.endpoint,
            "method": ev.method,
            "gateway": ev.gateway,
            "consumer": ev.consumer,
            "request_id": ev.request_id,
            "status": ev.status,
            "outcome": ev.outcome,
            "accepted": accepted,
            "registry_state": key.map(|k| k.state_at(ev.ts_ms)),
            "presented_as": ev.key_id,
            "at": format_rfc3339(ev.ts_ms),
            format!("{word}_at"): since.map(format_rfc3339),
        }),
        dedup_key: format!("{}:{key_id}:{ip}:{interval}", kind.as_str()),
    }
}

/// What the failed-rollover check judged.
struct Judged<'a> {
    run_from: i64,
    failures: u64,
    requests: u64,
    rate: f64,
    baseline: f64,
    threshold: f64,
    sources: &'a BTreeMap<String, u64>,
}

fn failed_rollover(
    ev: &AuthEvent<'_>,
    old: &Key,
    new: &Key,
    rot: Rotation,
    registry: &Registry,
    j: Judged<'_>,
) -> Finding {
    let tz = registry.timezone_of(&old.id);
    let ip = text(&ev.source_ip);
    let failing: Vec<serde_json::Value> = j
        .sources
        .iter()
        .map(|(ip, n)| json!({"ip": ip, "failures": n}))
        .collect();
    Finding {
        kind: FindingKind::FailedRollover,
        key_id: old.id.clone(),
        owner: Some(old.owner.clone()),
        at_ms: ev.ts_ms,
        severity: Severity::Critical,
        summary: format!(
            "rollover of {} ({}) is failing: {} of {} requests on the new key {} failed \
             authentication in the last hour, from {} on ({:.0} %, baseline {:.1} %); fix it \
             before revoking {}",
            old.label(),
            old.owner,
            j.failures,
            j.requests,
            new.label(),
            format_local(j.run_from, tz),
            j.rate * 100.0,
            j.baseline * 100.0,
            old.label()
        ),
        evidence: json!({
            "scope": "new_key",
            "old_key": old.id,
            "old_name": old.name,
            "new_key": new.id,
            "new_name": new.name,
            "started": format_rfc3339(rot.started_ms),
            "window_start": format_rfc3339(j.run_from),
            "window_end": format_rfc3339(ev.ts_ms),
            "failures": j.failures,
            "requests": j.requests,
            "failure_rate": j.rate,
            "baseline_rate": j.baseline,
            "threshold_rate": j.threshold,
            "failing_sources": failing,
            "request": {
                "at": format_rfc3339(ev.ts_ms),
                "ip": ip,
                "user_agent": ev.user_agent,
                "endpoint": ev.endpoint,
                "status": ev.status,
                "outcome": ev.outcome,
                "presented_as": ev.key_id,
            },
        }),
        dedup_key: format!("failed_rollover:{}:{}:{}", old.id, new.id, j.run_from),
    }
}

fn unknown_key(ev: &AuthEvent<'_>) -> Finding {
    let key_id = ev.key_id.as_ref();
    let ip = text(&ev.source_ip);
    let who = ev
        .consumer
        .as_deref()
        .map_or(String::new(), |c| format!(" by consumer {c}"));
    Finding {
        kind: FindingKind::UnknownKey,
        key_id: key_id.to_owned(),
        owner: None,
        at_ms: ev.ts_ms,
        severity: Severity::Info,
        summary: format!(
            "key {key_id}{} is used{who} but not in the registry",
            ev.key_hint
                .as_deref()
                .map_or(String::new(), |h| format!(" ({h})"))
        ),
        evidence: json!({
            "hint": ev.key_hint,
            "consumer": ev.consumer,
            "ip": ip,
            "user_agent": ev.user_agent,
            "endpoint": ev.endpoint,
            "gateway": ev.gateway,
            "status": ev.status,
            "outcome": ev.outcome,
        }),
        dedup_key: format!("unknown_key:{key_id}"),
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    fn reg() -> Registry {
        Registry::parse(
            "k.toml",
            "[owners.o]\ntimezone = \"Europe/Berlin\"\n\
             [[keys]]\nid = \"live\"\nowner = \"o\"\n\
             [[keys]]\nid = \"gone\"\nname = \"old billing key\"\nowner = \"o\"\nstate = \"revoked\"\nrevoked = \"2026-11-01T00:00:00Z\"\n\
             [[keys]]\nid = \"stale\"\nowner = \"o\"\nexpires = \"2026-11-01T00:00:00Z\"\n",
        )
        .unwrap()
    }

    const NOV2: i64 = 1_793_577_600_000; // 2026-11-02T00:00:00Z

    fn ev(ts: i64, key: &'static str, ip: &'static str, outcome: Outcome) -> AuthEvent<'static> {
        let mut e = AuthEvent::new(ts, Cow::Borrowed(key), 200, outcome);
        e.source_ip = Some(Cow::Borrowed(ip));
        e.user_agent = Some(Cow::Borrowed("curl/8.5.0"));
        e
    }

    fn run(events: &[AuthEvent<'static>], reg: &Registry) -> Vec<Finding> {
        let mut d = StreamDetectors::default();
        let mut out = Vec::new();
        let p = Policy::default();
        for e in events {
            d.observe(e, reg, &p, &mut out);
        }
        out
    }

    #[test]
    fn revoked_key_use_is_raised_once_per_source_and_interval() {
        let hour = 3_600_000;
        let found = run(
            &[
                // Before the revocation: nothing.
                ev(NOV2 - 2 * 86_400_000, "gone", "10.0.0.1", Outcome::Ok),
                ev(NOV2, "gone", "10.0.0.1", Outcome::Ok),
                ev(NOV2 + hour, "gone", "10.0.0.1", Outcome::Revoked),
                ev(NOV2 + 2 * hour, "gone", "10.0.0.2", Outcome::InvalidKey),
                ev(NOV2 + 25 * hour, "gone", "10.0.0.1", Outcome::Ok),
                ev(NOV2, "live", "10.0.0.1", Outcome::Ok),
            ],
            &reg(),
        );
        let got: Vec<_> = found
            .iter()
            .map(|f| (f.kind, f.evidence["ip"].as_str().unwrap(), f.at_ms))
            .collect();
        assert_eq!(
            got,
            [
                (FindingKind::RevokedKeyUsed, "10.0.0.1", NOV2),
                (FindingKind::RevokedKeyUsed, "10.0.0.2", NOV2 + 2 * hour),
                (FindingKind::RevokedKeyUsed, "10.0.0.1", NOV2 + 25 * hour),
            ]
        );
        assert_eq!(found[0].severity, Severity::Critical);
        assert_eq!(found[0].owner.as_deref(), Some("o"));
        assert_eq!(found[0].evidence["accepted"], true);
        assert!(
            found[0].summary.starts_with(
                "revoked key old billing key since 2026-11-01 01:00 CET was used from 10.0.0.1"
            ),
            "{}",
            found[0].summary
        );
    }

    #[test]
    fn expired_keys_and_gateway_outcomes() {
        let found = run(
            &[
                ev(NOV2, "stale", "10.0.0.1", Outcome::Expired),
                // The gateway says revoked/expired for keys the registry does not know.
                ev(NOV2, "fp:aaaa", "10.0.0.3", Outcome::Revoked),
                ev(NOV2, "fp:bbbb", "10.0.0.3", Outcome::Expired),
            ],
            &reg(),
        );
        let kinds: Vec<_> = found.iter().map(|f| (f.kind, f.severity)).collect();
        assert_eq!(
            kinds,
            [
                (FindingKind::ExpiredKeyUsed, Severity::Warning),
                (FindingKind::RevokedKeyUsed, Severity::Critical),
                (FindingKind::ExpiredKeyUsed, Severity::Warning),
            ]
        );
    }

    #[test]
    fn unknown_keys_are_reported_once_and_not_without_a_registry() {
        let events = [
            ev(NOV2, "fp:new", "10.0.0.1", Outcome::Ok),
            ev(NOV2 + 1, "fp:new", "10.0.0.2", Outcome::Ok),
            ev(NOV2 + 2, "-", "10.0.0.2", Outcome::Ok),
            // Rejected guesses are bursts' business, not unknown keys.
            ev(NOV2 + 3, "fp:guess", "10.0.0.9", Outcome::InvalidKey),
        ];
        let found = run(&events, &reg());
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].kind, FindingKind::UnknownKey);
        assert_eq!(found[0].key_id, "fp:new");
        assert!(run(&events, &Registry::empty()).is_empty());
    }

    #[test]
    fn bursts_need_the_threshold_within_the_window() {
        let p = Policy::default();
        let (n, window) = (
            p.unknown_key_burst.threshold as i64,
            p.unknown_key_burst.window_ms,
        );
        // n - 1 failures in the window, then one too late for the first: nothing.
        let step = window / (n - 1);
        let mut events: Vec<_> = (0..n)
            .map(|i| {
                ev(
                    NOV2 + i * step + i,
                    "-",
                    "203.0.113.250",
                    Outcome::InvalidKey,
                )
            })
            .collect();
        assert!(run(&events, &reg()).is_empty());
        // Closer together they are a burst, raised once per interval.
        events = (0..3 * n)
            .map(|i| {
                let key = if i % 2 == 0 { "-" } else { "fp:guess" };
                ev(NOV2 + i * 1000, key, "203.0.113.250", Outcome::InvalidKey)
            })
            .collect();
        // Other sources and accepted requests do not count.
        events.push(ev(NOV2 + 5, "-", "198.51.100.1", Outcome::InvalidKey));
        events.push(ev(NOV2 + 6, "live", "203.0.113.250", Outcome::Ok));
        let found = run(&events, &reg());
        assert_eq!(found.len(), 1, "{found:?}");
        let f = &found[0];
        assert_eq!(f.kind, FindingKind::UnknownKeyBurst);
        assert_eq!(f.at_ms, NOV2 + (n - 1) * 1000);
        assert_eq!(f.evidence["ip"], "203.0.113.250");
        assert_eq!(f.evidence["failures"], n);
        assert_eq!(f.evidence["keys"]["-"], n / 2);
        // Failures on keys unknown to the registry count even when the gateway says
        // forbidden.
        let found = run(
            &(0..n)
                .map(|i| ev(NOV2 + i, "fp:x", "10.9.9.9", Outcome::Forbidden))
                .collect::<Vec<_>>(),
            &reg(),
        );
        assert_eq!(
            found
                .iter()
                .filter(|f| f.kind == FindingKind::UnknownKeyBurst)
                .count(),
            1
        );
    }

    fn rotating_reg() -> Registry {
        Registry::parse(
            "k.toml",
            "[owners.o]\ntimezone = \"Pacific/Auckland\"\n\
             [[keys]]\nid = \"old\"\nowner = \"o\"\naliases = [\"fp:01d\"]\nstate = \"revoked\"\n\
             successor = \"new\"\nrotation_started = \"2026-11-02T00:00:00Z\"\n\
             revoked = \"2026-11-05T00:00:00Z\"\n\
             [[keys]]\nid = \"new\"\nowner = \"o\"\naliases = [\"fp:0e0\"]\n",
        )
        .unwrap()
    }

    #[test]
    fn refused_requests_meet_their_key_by_alias() {
        let reg = rotating_reg();
        let day = 86_400_000;
        let cases: &[(&str, i64, Outcome, Option<FindingKind>)] = &[
            // Before the revocation the old key is rotating: its use is fine.
            ("fp:01d", NOV2 + day, Outcome::InvalidKey, None),
            ("old", NOV2 + day, Outcome::Ok, None),
            // After it, refused or not, by id or alias: revoked key used, on the registry id.
            (
                "fp:01d",
                NOV2 + 4 * day,
                Outcome::InvalidKey,
                Some(FindingKind::RevokedKeyUsed),
            ),
            (
                "old",
                NOV2 + 4 * day,
                Outcome::Ok,
                Some(FindingKind::RevokedKeyUsed),
            ),
        ];
        for (key, ts, outcome, want) in cases {
            let found = run(&[ev(*ts, key, "10.0.0.1", *outcome)], &reg);
            let got: Vec<_> = found.iter().map(|f| (f.kind, f.key_id.as_str())).collect();
            let want: Vec<_> = want.iter().map(|k| (*k, "old")).collect();
            assert_eq!(got, want, "{key} at {ts} {outcome:?}");
        }
        // A known key failing again and again is not a burst of unknown keys.
        let events: Vec<_> = (0..30)
            .map(|i| {
                ev(
                    NOV2 + 4 * day + i * 1000,
                    "fp:01d",
                    "10.0.0.1",
                    Outcome::InvalidKey,
                )
            })
            .collect();
        let found = run(&events, &reg);
        assert!(
            found.iter().all(|f| f.kind == FindingKind::RevokedKeyUsed),
            "{found:?}"
        );
    }

    #[test]
    fn a_failing_successor_is_a_failed_rollover_at_the_crossing_request() {
        let reg = rotating_reg();
        let p = Policy::default();
        let hour = 3_600_000;
        // Steady old key before the rotation (the baseline), then the successor: fine at
        // first, then refused (by its fingerprint alias); rate limits in between.
        let mut events: Vec<AuthEvent<'static>> = (0..40)
            .map(|i| ev(NOV2 - 2 * hour + i * 60_000, "old", "10.0.0.1", Outcome::Ok))
            .collect();
        let t = NOV2 + hour;
        events.extend((0..10).map(|i| ev(t + i * 1000, "new", "10.0.0.2", Outcome::Ok)));
        events.extend((0..5).map(|i| ev(t + 20_000 + i, "new", "10.0.0.2", Outcome::RateLimited)));
        let fails: Vec<i64> = (0..5).map(|i| t + 60_000 + i * 7_000).collect();
        events.extend(
            fails
                .iter()
                .map(|&ts| ev(ts, "fp:0e0", "10.0.0.3", Outcome::InvalidKey)),
        );
        let found = run(&events, &reg);
        let fr: Vec<_> = found
            .iter()
            .filter(|f| f.kind == FindingKind::FailedRollover)
            .collect();
        assert_eq!(fr.len(), 1, "one run, one finding: {found:?}");
        let f = fr[0];
        // The third failure crosses min_failures (3): 3 of 18 requests (429s are requests
        // too, but not failures) is over 5 %.
        let third = fails[p.failed_rollover.min_failures as usize - 1];
        assert_eq!(f.at_ms, third);
        assert_eq!(f.key_id, "old");
        assert_eq!(f.evidence["failures"], 3);
        assert_eq!(f.evidence["requests"], 18);
        assert_eq!(f.evidence["window_start"], format_rfc3339(fails[0]));
        assert_eq!(f.evidence["request"]["at"], format_rfc3339(third));
        assert_eq!(f.evidence["failing_sources"][0]["ip"], "10.0.0.3");
        assert!(found.iter().all(|f| f.kind != FindingKind::UnknownKeyBurst));
        // Rate limits alone are no failed rollover.
        let limited: Vec<_> = (0..20)
            .map(|i| ev(t + i * 1000, "new", "10.0.0.2", Outcome::RateLimited))
            .collect();
        assert!(run(&limited, &reg).is_empty());
    }

    #[test]
    fn a_burst_counts_the_keys_really_presented() {
        let p = Policy::default();
        let n = p.unknown_key_burst.threshold as i64;
        let events: Vec<_> = (0..n)
            .map(|i| {
                let key = ["-", "fp:g1", "fp:g2", "-"][i as usize % 4];
                ev(NOV2 + i * 1000, key, "203.0.113.9", Outcome::InvalidKey)
            })
            .collect();
        let found = run(&events, &reg());
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].evidence["distinct_keys"], 2);
        assert_eq!(found[0].evidence["without_key"], (n + 1) / 2);
        assert!(
            found[0].summary.contains("(2 distinct keys presented"),
            "{}",
            found[0].summary
        );
    }
}
