//! What the detectors and the CLI read from the embedded store, and the findings table.
//!
//! Contract:
//! - [`RotationSource`] for [`SqliteStore`]: hourly counts of a rotation's two keys from the
//!   rollups, and both keys' sources (all time). Read-only.
//! - [`SqliteStore::record_findings`] stores findings by `dedup_key` (one row per fact, with
//!   first/last time and a count of how often it was raised) in one transaction, and returns
//!   the ones it had never seen: those, and only those, go to the notifier. Raising a fact
//!   again, in the same run or after a restart, updates its row and is not new.

use rusqlite::params;

use super::sqlite::classify;
use super::{DetectionStore, SqliteStore, StoreError};
use crate::detect::{Finding, FindingKind, HourRow, RotationData, RotationSource, Severity};

const HOUR_S: i64 = 3600;

/// A finding as stored: the latest version of the fact, and how often it was raised.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredFinding {
    /// The last raise (its `at_ms` is the last time).
    pub finding: Finding,
    pub first_at_ms: i64,
    pub last_at_ms: i64,
    pub count: u64,
}

impl DetectionStore for SqliteStore {
    fn record_findings(&mut self, found: &[Finding]) -> Result<Vec<Finding>, StoreError> {
        SqliteStore::record_findings(self, found)
    }
}

impl RotationSource for SqliteStore {
    fn rotation_data(&self, old: &str, new: &str, since_ms: i64) -> Result<RotationData, String> {
        let since_s = since_ms.div_euclid(HOUR_S * 1000) * HOUR_S;
        let mut stmt = self
            .conn()
            .prepare_cached(
                "SELECT (minute / 3600) * 3600 AS hour, key_id, SUM(requests),
                        SUM(invalid_key + expired + revoked + forbidden)
                 FROM rollup_minute
                 WHERE key_id IN (?1, ?2) AND minute >= ?3
                 GROUP BY hour, key_id
                 ORDER BY hour",
            )
            .map_err(|e| classify(e).to_string())?;
        let rows = stmt
            .query_map(params![old, new, since_s], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)? as u64,
                    r.get::<_, i64>(3)? as u64,
                ))
            })
            .map_err(|e| classify(e).to_string())?;
        let mut hourly: Vec<HourRow> = Vec::new();
        for row in rows {
            let (hour_s, key, requests, failures) = row.map_err(|e| classify(e).to_string())?;
            let hour_ms = hour_s * 1000;
            if !matches!(hourly.last(), Some(h) if h.hour_ms == hour_ms) {
                hourly.push(HourRow {
                    hour_ms,
                    ..HourRow::default()
                });
            }
            let h = hourly.last_mut().expect("pushed above");
            if key == old {
                h.old_requests += requests;
                h.old_failures += failures;
            } else {
                h.new_requests += requests;
                h.new_failures += failures;
            }
        }
        Ok(RotationData {
            old_key: old.to_owned(),
            new_key: new.to_owned(),
            old_sources: self.key_sources(old).map_err(|e| e.to_string())?,
            new_sources: self.key_sources(new).map_err(|e| e.to_string())?,
            hourly,
        })
    }
}

impl SqliteStore {
    /// Stores findings (upsert by `dedup_key`) and returns those never stored before, in
    /// the order given.
    pub fn record_findings(&mut self, found: &[Finding]) -> Result<Vec<Finding>, StoreError> {
        let tx = self.conn_mut().transaction().map_err(classify)?;
        let mut new = Vec::new();
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO findings (dedup_key, kind, key_id, owner, severity, first_at_ms,
                        last_at_ms, count, summary, evidence)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, 1, ?7, ?8)
                     ON CONFLICT (dedup_key) DO NOTHING",
                )
                .map_err(classify)?;
            let mut update = tx
                .prepare_cached(
                    "UPDATE findings SET
                        severity = ?2, summary = ?3, evidence = ?4,
                        first_at_ms = MIN(first_at_ms, ?5), last_at_ms = MAX(last_at_ms, ?5),
                        count = count + 1
                     WHERE dedup_key = ?1",
                )
                .map_err(classify)?;
            for f in found {
                let evidence = serde_json::to_string(&f.evidence)
                    .map_err(|e| StoreError::Fatal(format!("finding evidence: {e}")))?;
                let inserted = insert
                    .execute(params![
                        f.dedup_key,
                        f.kind.as_str(),
                        f.key_id,
                        f.owner,
                        f.severity.as_str(),
                        f.at_ms,
                        f.summary,
                        evidence
                    ])
                    .map_err(classify)?;
                if inserted == 1 {
                    new.push(f.clone());
                } else {
                    update
                        .execute(params![
                            f.dedup_key,
                            f.severity.as_str(),
                            f.summary,
                            evidence,
                            f.at_ms
                        ])
                        .map_err(classify)?;
                }
            }
        }
        tx.commit().map_err(classify)?;
        Ok(new)
    }

    /// Stored findings last raised at or after `since_ms` (all without it), of one kind or
    /// all, oldest first.
    pub fn findings(
        &self,
        since_ms: Option<i64>,
        kind: Option<FindingKind>,
    ) -> Result<Vec<StoredFinding>, StoreError> {
        let mut stmt = self
            .conn()
            .prepare_cached(
                "SELECT dedup_key, kind, key_id, owner, severity, first_at_ms, last_at_ms, count,
                        summary, evidence
                 FROM findings
                 WHERE last_at_ms >= ?1 AND (?2 IS NULL OR kind = ?2)
                 ORDER BY last_at_ms, dedup_key",
            )
            .map_err(classify)?;
        let rows = stmt
            .query_map(
                params![since_ms.unwrap_or(i64::MIN), kind.map(|k| k.as_str())],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, i64>(5)?,
                        r.get::<_, i64>(6)?,
                        r.get::<_, i64>(7)?,
                        r.get::<_, String>(8)?,
                        r.get::<_, String>(9)?,
                    ))
                },
            )
            .map_err(classify)?;
        let mut out = Vec::new();
        for row in rows {
            let (dedup_key, kind, key_id, owner, severity, first, last, count, summary, evidence) =
                row.map_err(classify)?;
            let bad = |what: &str, e: String| {
                StoreError::Fatal(format!("stored finding {dedup_key}: {what}: {e}"))
            };
            let finding = Finding {
                kind: kind.parse().map_err(|e| bad("kind", e))?,
                key_id,
                owner,
                at_ms: last,
                severity: severity
                    .parse::<Severity>()
                    .map_err(|e| bad("severity", e))?,
                summary,
                evidence: serde_json::from_str(&evidence)
                    .map_err(|e| bad("evidence", e.to_string()))?,
                dedup_key: dedup_key.clone(),
            };
            out.push(StoredFinding {
                finding,
                first_at_ms: first,
                last_at_ms: last,
                count: count as u64,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::aggregate::Aggregate;
    use crate::event::{AuthEvent, Outcome};
    use crate::store::{BatchWrite, Store};

    fn finding(kind: FindingKind, dedup: &str, at_ms: i64) -> Finding {
        Finding {
            kind,
            key_id: "A".into(),
            owner: Some("acme".into()),
            at_ms,
            severity: Severity::Warning,
            summary: format!("{dedup} at {at_ms}"),
            evidence: serde_json::json!({"at": at_ms}),
            dedup_key: dedup.into(),
        }
    }

    #[test]
    fn findings_are_new_once_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let a = finding(FindingKind::LingeringOldKey, "l:1", 1000);
        let b = finding(FindingKind::SafeToRevoke, "s:1", 2000);
        let new = store
            .record_findings(&[a.clone(), b.clone(), a.clone()])
            .unwrap();
        assert_eq!(new, [a.clone(), b.clone()]);
        drop(store);

        let mut store = SqliteStore::open(dir.path()).unwrap();
        let a2 = finding(FindingKind::LingeringOldKey, "l:1", 5000);
        assert!(store
            .record_findings(&[a2.clone(), b.clone()])
            .unwrap()
            .is_empty());

        let all = store.findings(None, None).unwrap();
        assert_eq!(all.len(), 2);
        let l = all.iter().find(|f| f.finding.dedup_key == "l:1").unwrap();
        assert_eq!((l.first_at_ms, l.last_at_ms, l.count), (1000, 5000, 3));
        assert_eq!(l.finding.summary, a2.summary, "the latest evidence wins");
        assert_eq!(l.finding.evidence["at"], 5000);

        let safe = store
            .findings(None, Some(FindingKind::SafeToRevoke))
            .unwrap();
        assert_eq!(safe.len(), 1);
        assert_eq!(safe[0].finding, b);
        assert_eq!(store.findings(Some(5001), None).unwrap().len(), 0);
        assert_eq!(safe[0].count, 2);
    }

    #[test]
    fn rotation_data_sums_hours_per_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let h = 3_600_000;
        let mut agg = Aggregate::default();
        let mut add = |ts: i64, key: &'static str, outcome: Outcome| {
            let mut e = AuthEvent::new(ts, Cow::Borrowed(key), 200, outcome);
            e.source_ip = Some(Cow::Borrowed("10.0.0.1"));
            agg.add(&e);
        };
        add(10 * h + 1, "A", Outcome::Ok);
        add(10 * h + 60_000, "A", Outcome::InvalidKey);
        add(10 * h + 120_000, "B", Outcome::Forbidden);
        add(10 * h + 180_000, "B", Outcome::RateLimited);
        add(11 * h + 5, "B", Outcome::Ok);
        add(11 * h + 6, "C", Outcome::Ok);
        add(8 * h, "A", Outcome::Ok);
        store
            .commit(&BatchWrite {
                aggregate: &agg,
                events: &[],
                checkpoint: None,
            })
            .unwrap();
        let d = store.rotation_data("A", "B", 9 * h + 10).unwrap();
        assert_eq!(
            d.hourly,
            [
                HourRow {
                    hour_ms: 10 * h,
                    old_requests: 2,
                    old_failures: 1,
                    new_requests: 2,
                    new_failures: 1,
                },
                HourRow {
                    hour_ms: 11 * h,
                    new_requests: 1,
                    ..HourRow::default()
                },
            ]
        );
        assert_eq!(d.old_sources.len(), 1);
        assert_eq!(d.old_sources[0].1.requests, 3);
        assert_eq!(d.new_sources[0].1.requests, 3);
    }
}
