//! Detectors fed one event at a time: revoked or expired key used, unknown keys, and bursts
//! of invalid-key failures from one IP.
//!
//! State is small and bounded: what was reported per key and source (one entry per
//! reporting interval), the keys reported as unknown, and the last `threshold` failures per
//! IP. Each map has a cap; past it, stale entries go first.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use serde_json::json;

use super::{Finding, FindingKind, Policy, Severity};
use crate::event::{AuthEvent, Outcome, NO_KEY};
use crate::registry::{format_local, format_rfc3339, Registry};

/// Entries of (kind, key, source) → reporting interval kept before pruning.
const MAX_REPORTED: usize = 100_000;
/// Unknown keys remembered as reported.
const MAX_UNKNOWN: usize = 100_000;
/// IPs with an open burst window.
const MAX_BURST_IPS: usize = 20_000;
/// Distinct values listed in a burst's evidence.
const EVIDENCE_VALUES: usize = 10;

#[derive(Debug, Default)]
pub(super) struct StreamDetectors {
    /// (kind, key id, source IP) → the last reporting interval (`ts / repeat_after`).
    reported: HashMap<(FindingKind, String, String), i64>,
    unknown: HashSet<String>,
    bursts: HashMap<String, Burst>,
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
        let known = registry.key(key_id);
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
                let slot = (kind, key_id.to_owned(), ip.to_owned());
                if self.reported.get(&slot) != Some(&interval) {
                    if self.reported.len() >= MAX_REPORTED {
                        self.reported.retain(|_, i| *i >= interval - 1);
                        if self.reported.len() >= MAX_REPORTED {
                            self.reported.clear();
                        }
                    }
                    self.reported.insert(slot, interval);
                    out.push(key_used(kind, ev, registry, interval));
                }
            }
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

        let counts = ev.outcome == Outcome::InvalidKey
            || (unknown && ev.outcome.is_failure() && ev.outcome != Outcome::RateLimited);
        if counts {
            self.burst(ev, ip, interval, policy, out);
        }
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
        out.push(Finding {
            kind: FindingKind::UnknownKeyBurst,
            key_id: NO_KEY.to_owned(),
            owner: None,
            at_ms: ev.ts_ms,
            severity: Severity::Warning,
            summary: format!(
                "{} sent {n} requests with a missing, invalid or unknown key within {} s \
                 ({} distinct keys presented)",
                if ip.is_empty() {
                    "an unknown source"
                } else {
                    ip
                },
                (ev.ts_ms - first) / 1000,
                keys.len()
            ),
            evidence: json!({
                "ip": ip,
                "failures": n,
                "window_start": format_rfc3339(first),
                "window_end": format_rfc3339(ev.ts_ms),
                "threshold": p.threshold,
                "window_s": p.window_ms / 1000,
                "keys": keys,
                "user_agents": uas,
                "endpoints": endpoints,
            }),
            dedup_key: format!("unknown_key_burst:{ip}:{interval}"),
        });
    }
}

fn key_used(kind: FindingKind, ev: &AuthEvent<'_>, registry: &Registry, interval: i64) -> Finding {
    let key_id = ev.key_id.as_ref();
    let key = registry.key(key_id);
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
            "registry_state": key.map(|k| k.state),
            format!("{word}_at"): since.map(format_rfc3339),
        }),
        dedup_key: format!("{}:{key_id}:{ip}:{interval}", kind.as_str()),
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
}
