//! Detectors: from events, stored usage and the registry to typed [`Finding`]s.
//!
//! Contract:
//! - Pure: no IO and no clock. Time is always a parameter (`now_ms`), so a backtest that
//!   replays a log with its event times as the clock raises exactly what the daemon would
//!   have raised. Stored usage comes in through [`RotationSource`], which the store
//!   implements (`store::views`).
//! - Two paths. Stream detectors see every event ([`Engine::observe`]) and keep small,
//!   bounded state per key and source: revoked or expired key used, unknown keys, bursts of
//!   invalid-key failures from one IP. Rotation detectors run on stored aggregates when the
//!   daemon evaluates ([`Engine::evaluate`], [`evaluate_rotation`]).
//! - Every finding carries a `dedup_key` that names the fact, not the evaluation: raising
//!   it again is idempotent for the store (`SqliteStore::record_findings` tells new from
//!   known ones), so the notifier sends a fact once, across restarts too.
//! - What is known about each kind of finding (its name, title, origin, severities, repeat
//!   policy, rotation class) is in one table, [`KINDS`] (`kind.rs`).
//! - The [`Engine`] holds the registry through an `Arc`: [`Engine::set_registry`] swaps in a
//!   reloaded one without losing stream state.

mod kind;
mod policy;
mod rotation;
mod stream;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use kind::{FindingKind, KindInfo, Origin, RotationClass, Severity, KINDS};
pub use policy::{AnomalyPolicy, BurstPolicy, Policy, Reminder, RolloverPolicy};
pub use rotation::{
    evaluate_rotation, Forecast, HourRow, LingeringSource, Phase, RotationData, RotationStatus,
    SharePoint,
};

use crate::anomaly::AnomalyFinding;
use crate::event::AuthEvent;
use crate::registry::{format_local, KeyState, Registry};

/// A fact worth telling someone, with its evidence.
///
/// As JSON (one object per line in `keywatch backtest`), `at` is RFC 3339 in UTC:
/// `{"kind":"safe_to_revoke","key_id":"…","owner":"acme-billing","at":"2026-11-27T…Z",
/// "severity":"info","summary":"…","evidence":{…},"dedup_key":"…"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub kind: FindingKind,
    /// The key the finding is about (the old key of a rotation; `-` when there is none, as
    /// for a burst of requests without a key).
    pub key_id: String,
    /// The key's owner when the registry knows it.
    pub owner: Option<String>,
    /// When the fact became true, by event time: the request, the end of the quiet period,
    /// the deadline, the reminder step; for states judged at an evaluation, its time.
    #[serde(rename = "at", with = "rfc3339_ms")]
    pub at_ms: i64,
    pub severity: Severity,
    /// One human sentence.
    pub summary: String,
    pub evidence: serde_json::Value,
    /// Names the fact: the same fact raised again has the same key.
    pub dedup_key: String,
}

impl Finding {
    /// A finding of the anomaly models, with the key's owner from the registry (none for a
    /// key the registry does not know) and the key's name in the evidence when it has one.
    ///
    /// The dedup key is the models' own: kind, key, and the hour (volume, failure and
    /// latency, behaviour), the minute (dormant key) or the new member (`network:10.1.2.0/24`)
    /// the fact is about. It names event times only, so a replay of the same events after a
    /// restart gives the same key and the findings table keeps one row.
    pub fn from_anomaly(a: AnomalyFinding, registry: &Registry) -> Finding {
        let key = registry.key(&a.key_id);
        let mut evidence = a.evidence;
        if let (Some(name), serde_json::Value::Object(e)) =
            (key.and_then(|k| k.name.as_ref()), &mut evidence)
        {
            e.insert("key_name".into(), serde_json::Value::String(name.clone()));
        }
        Finding {
            kind: a.kind,
            owner: key.map(|k| k.owner.clone()),
            key_id: a.key_id,
            at_ms: a.at_ms,
            severity: a.severity,
            // One line: a user agent or endpoint in the summary could carry a newline.
            summary: a.summary.replace(['\n', '\r'], " "),
            evidence,
            dedup_key: a.dedup_key,
        }
    }
}

mod rfc3339_ms {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::registry::format_rfc3339(*ms))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        let s = String::deserialize(d)?;
        chrono::DateTime::parse_from_rfc3339(&s)
            .map(|t| t.timestamp_millis())
            .map_err(serde::de::Error::custom)
    }
}

/// In debug builds (every test), a finding raised with a severity its kind's row in
/// [`KINDS`] does not list stops the test: the table is what notifiers and docs rely on.
fn debug_assert_severities(found: &[Finding]) {
    for f in found {
        debug_assert!(
            f.kind.info().severities.contains(&f.severity),
            "{} raised as {}, not in its row of detect::KINDS",
            f.kind,
            f.severity
        );
    }
}

/// Stored usage of a rotation's two keys, as the rotation detectors need it.
pub trait RotationSource {
    /// Sources of both keys (all time) and hourly counts of both keys from `since_ms` on.
    fn rotation_data(&self, old: &str, new: &str, since_ms: i64) -> Result<RotationData, String>;
}

/// Findings that wait in the engine for the next evaluation before older ones are dropped.
const MAX_PENDING: usize = 10_000;

/// The detectors behind one facade: what the daemon, the backtest and the CLI call.
#[derive(Debug)]
pub struct Engine {
    registry: Arc<Registry>,
    policy: Policy,
    stream: stream::StreamDetectors,
    pending: Vec<Finding>,
    dropped: u64,
}

impl Engine {
    pub fn new(registry: Arc<Registry>, policy: Policy) -> Engine {
        Engine {
            registry,
            policy,
            stream: stream::StreamDetectors::default(),
            pending: Vec::new(),
            dropped: 0,
        }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Swaps in a reloaded registry; stream state (what was reported, burst windows) stays.
    pub fn set_registry(&mut self, registry: Arc<Registry>) {
        self.registry = registry;
    }

    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// Feeds one event to the stream detectors. What they raise waits for
    /// [`Engine::take_pending`] or the next [`Engine::evaluate`].
    pub fn observe(&mut self, ev: &AuthEvent<'_>) {
        self.stream
            .observe(ev, &self.registry, &self.policy, &mut self.pending);
        self.trim_pending();
    }

    /// Adds findings raised outside the engine (the anomaly models) to the pending ones, so
    /// that they are stored and told like stream findings.
    pub fn push_pending(&mut self, found: impl IntoIterator<Item = Finding>) {
        self.pending.extend(found);
        self.trim_pending();
    }

    fn trim_pending(&mut self) {
        if self.pending.len() > MAX_PENDING {
            // Nobody is collecting: keep the newest, count the rest.
            let excess = self.pending.len() - MAX_PENDING;
            self.pending.drain(..excess);
            self.dropped += excess as u64;
        }
    }

    /// Findings the stream detectors raised since the last call (for immediate alerts).
    pub fn take_pending(&mut self) -> Vec<Finding> {
        let out = std::mem::take(&mut self.pending);
        debug_assert_severities(&out);
        out
    }

    /// Stream findings dropped because more than 10 000 waited.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Everything there is to say at `now_ms`: pending stream findings, every open rotation's
    /// findings, and keys past the maximum age; ordered by `at`. A rotation whose data cannot
    /// be read is skipped (and logged); the others still count.
    pub fn evaluate<S: RotationSource + ?Sized>(&mut self, now_ms: i64, src: &S) -> Vec<Finding> {
        self.evaluate_with_rotations(now_ms, src).0
    }

    /// [`Engine::evaluate`], with the state of every open rotation it looked at (what the
    /// notifier puts in reminders).
    pub fn evaluate_with_rotations<S: RotationSource + ?Sized>(
        &mut self,
        now_ms: i64,
        src: &S,
    ) -> (Vec<Finding>, Vec<RotationStatus>) {
        let mut out = self.take_pending();
        let mut rotations = Vec::new();
        for (status, findings) in self.rotation_results(now_ms, src) {
            out.extend(findings);
            rotations.push(status);
        }
        out.extend(self.key_age(now_ms));
        debug_assert_severities(&out);
        out.sort_by(|a, b| (a.at_ms, a.kind, &a.dedup_key).cmp(&(b.at_ms, b.kind, &b.dedup_key)));
        (out, rotations)
    }

    /// The state of every open rotation at `now_ms`, for `keywatch rotations`.
    pub fn rotations<S: RotationSource + ?Sized>(
        &self,
        now_ms: i64,
        src: &S,
    ) -> Vec<RotationStatus> {
        self.rotation_results(now_ms, src)
            .into_iter()
            .map(|(s, _)| s)
            .collect()
    }

    fn rotation_results<S: RotationSource + ?Sized>(
        &self,
        now_ms: i64,
        src: &S,
    ) -> Vec<(RotationStatus, Vec<Finding>)> {
        let mut out = Vec::new();
        for (old, new, rot) in self.registry.rotations_at(now_ms) {
            let since = rot
                .started_ms
                .saturating_sub(self.policy.failed_rollover.baseline_ms);
            match src.rotation_data(&old.id, new, since) {
                Ok(data) => out.push(evaluate_rotation(
                    now_ms,
                    old,
                    self.registry.key(new),
                    self.registry.timezone_of(&old.id),
                    &self.policy,
                    &data,
                )),
                Err(e) => {
                    tracing::warn!(old = %old.id, new, error = %e, "cannot read a rotation's usage");
                }
            }
        }
        out
    }

    /// `key_age_exceeded` for active keys older than the maximum age.
    fn key_age(&self, now_ms: i64) -> Vec<Finding> {
        let max = self.policy.max_key_age_ms;
        if max <= 0 {
            return Vec::new();
        }
        let mut out = Vec::new();
        for k in self.registry.keys() {
            let Some(created) = k.created_ms else {
                continue;
            };
            let due = created.saturating_add(max);
            if k.state_at(now_ms) != KeyState::Active || now_ms < due {
                continue;
            }
            let tz = self.registry.timezone_of(&k.id);
            let age_days = (now_ms - created) / 86_400_000;
            out.push(Finding {
                kind: FindingKind::KeyAgeExceeded,
                key_id: k.id.clone(),
                owner: Some(k.owner.clone()),
                at_ms: due,
                severity: FindingKind::KeyAgeExceeded.info().severities[0],
                summary: format!(
                    "key {} of {} is {age_days} days old, older than the maximum of {} days, \
                     and no rotation has started (created {})",
                    k.label(),
                    k.owner,
                    max / 86_400_000,
                    format_local(created, tz)
                ),
                evidence: serde_json::json!({
                    "key_name": k.name,
                    "version": k.version,
                    "created": crate::registry::format_rfc3339(created),
                    "age_days": age_days,
                    "max_age_days": max / 86_400_000,
                }),
                dedup_key: format!("key_age_exceeded:{}:{}", k.id, k.version),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_serialize_with_rfc3339_times() {
        let f = Finding {
            kind: FindingKind::SafeToRevoke,
            key_id: "A".into(),
            owner: Some("acme".into()),
            at_ms: 1_795_132_800_000,
            severity: Severity::Info,
            summary: "s".into(),
            evidence: serde_json::json!({"n": 1}),
            dedup_key: "safe_to_revoke:A".into(),
        };
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"safe_to_revoke","key_id":"A","owner":"acme","at":"2026-11-20T00:00:00.000Z","severity":"info","summary":"s","evidence":{"n":1},"dedup_key":"safe_to_revoke:A"}"#
        );
        assert_eq!(serde_json::from_str::<Finding>(&json).unwrap(), f);
        for k in FindingKind::ALL {
            assert_eq!(k.as_str().parse::<FindingKind>(), Ok(k));
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.as_str())
            );
        }
        assert!("lingering".parse::<FindingKind>().is_err());
    }

    #[test]
    fn anomaly_findings_get_the_owner_and_keep_their_dedup_key() {
        let reg = Registry::parse(
            "k.toml",
            "[owners.o]\n[[keys]]\nid = \"k1\"\nname = \"billing\"\nowner = \"o\"\n",
        )
        .unwrap();
        let a = AnomalyFinding {
            kind: FindingKind::NewSource,
            key_id: "k1".into(),
            at_ms: 1_795_132_800_000,
            severity: Severity::Warning,
            summary: "key k1 is used from a new user agent \"x\ny\"".into(),
            evidence: serde_json::json!({"expected": {"known": 2}, "seen": {"user_agent": "x"},
                "surprise": null, "score": 1.0, "model": "new_user_agent"}),
            dedup_key: "new_source:k1:user_agent:x".into(),
        };
        let f = Finding::from_anomaly(a.clone(), &reg);
        assert_eq!(f.kind, FindingKind::NewSource);
        assert_eq!(f.owner.as_deref(), Some("o"));
        assert_eq!(f.dedup_key, "new_source:k1:user_agent:x");
        assert_eq!(f.evidence["key_name"], "billing");
        assert_eq!(f.evidence["expected"]["known"], 2);
        assert!(!f.summary.contains('\n'), "{}", f.summary);
        let unknown = Finding::from_anomaly(
            AnomalyFinding {
                key_id: "k2".into(),
                ..a
            },
            &reg,
        );
        assert_eq!(unknown.owner, None);
        assert!(f.kind.is_anomaly());
        assert!(!FindingKind::SafeToRevoke.is_anomaly());
    }

    #[test]
    fn key_age_is_raised_for_old_active_keys_only() {
        let reg = Registry::parse(
            "k.toml",
            "[owners.o]\ntimezone = \"America/New_York\"\n\
             [[keys]]\nid = \"old\"\nowner = \"o\"\ncreated = \"2026-01-01T00:00:00Z\"\n\
             [[keys]]\nid = \"young\"\nowner = \"o\"\ncreated = \"2026-10-01T00:00:00Z\"\n\
             [[keys]]\nid = \"gone\"\nowner = \"o\"\nstate = \"revoked\"\ncreated = \"2025-01-01T00:00:00Z\"\n",
        )
        .unwrap();
        let engine = Engine::new(Arc::new(reg), Policy::default());
        let jan1 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
        let due = jan1 + 90 * 86_400_000;
        assert!(engine.key_age(due - 1).is_empty());
        let found = engine.key_age(due + 86_400_000);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].key_id, "old");
        assert_eq!(found[0].at_ms, due);
        assert_eq!(found[0].evidence["age_days"], 91);
    }
}
