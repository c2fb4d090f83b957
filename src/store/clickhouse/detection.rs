//! Rotations and findings in full mode: the [`RotationSource`] view and the findings state
//! over ClickHouse, and the notifier's attempts in the `notify_attempts` table.
//!
//! # Rotation view
//!
//! The same figures as the embedded store's (`store::views`): hourly requests and auth
//! failures (invalid key, expired, revoked, forbidden) of both keys from the hour of
//! `since_ms` on, and both keys' sources over all time. Per-batch rows are summed at query
//! time, and **only rows of committed batches count** (`batch_end` below the committed next
//! offset of their partition): rows of a batch that failed or was cut short by a crash stay
//! in the tables until recovery removes them, and must not raise findings meanwhile.
//!
//! # Findings
//!
//! One row per raise in `finding_state` (schema version 2), holding the fact's whole state:
//! first and last time (ms), how often it was raised (`raised`, the ReplacingMergeTree
//! version, so merges keep the latest state), and the latest severity, summary and evidence.
//! [`ClickHouseStore::record_findings`] reads the state of the facts it is given, inserts
//! their next state in one insert, and returns the facts it had never seen, in order — the
//! same answers as `SqliteStore::record_findings`, across restarts too, since the state is
//! in ClickHouse.
//!
//! Several instances of one consumer group share the table. Stream and anomaly findings
//! come from the events of the partitions an instance owns, so one instance raises each of
//! them; rotation findings are evaluated by one instance per group (the partition-0 owner,
//! `Detection::evaluate_only_when`). Around a rebalance, the old and the new owner of
//! partition 0 may still evaluate at the same moment, and ClickHouse has no transactions:
//! both can read "unknown" for a fact before either inserts it. Then both insert it, and
//! each reads the fact back once more: only the instance with the smallest id among the
//! rows' `claimed_by` tells it as new. Every interleaving leaves at least one instance
//! telling it (the one reading back last sees every row). Two can still both tell it when
//! the smaller id's read-back comes before the other instance's insert while the other's
//! read-back sees both — a window of a few milliseconds — or when a background merge folds
//! the rows in between; the notifier (its log is per instance) then sends it twice.
//! `raised` may be one short after such a race (both wrote the same count). Nothing else is
//! lost or counted twice. The read-back costs one query, only when a fact is new.
//!
//! Each state is also written, as its latest raise, to the version 1 `findings` table
//! (second times, no count), which the dashboards read; the two inserts run at once, as do
//! the rotation view's two reads: a replay evaluates once per `rules.evaluate_every` of
//! event time, and on a cluster each of them is a round trip through ZooKeeper or to
//! every shard. A retried pair is harmless: `findings` keeps one row per fact.
//!
//! # Notification attempts
//!
//! The ClickHouse side of the notifier's ports `notify::AttemptLog` and `notify::SharedLog`:
//! [`ClickHouseStore::record_attempts`] writes [`AttemptRecord`]s to `notify_attempts` and,
//! in the version 1 shape the dashboards read, to `notifications`, each as
//! [`AttemptRecord::redacted`] (the notifier knows which parts of a target or an error are
//! secret; this file does not). `notify::run_attempt_sink` is the task that batches them.

use std::collections::HashMap;

use ::clickhouse::Row;
use serde::Deserialize;

use super::error::{code_of, Phase};
use super::rowbinary::RowBinary;
use super::schema::{lit, Sql, Table};
use super::{ClickHouseStore, SourceRowCh, REPORT_TIMEOUT};
use crate::aggregate::{SourceKey, SourceStats};
use crate::detect::{Finding, FindingKind, HourRow, RotationData, RotationSource, Severity};
use crate::notify::{AttemptLog, AttemptRecord, SharedLog};
use crate::store::views::StoredFinding;
use crate::store::{DetectionStore, SourceRow, StoreError};

const HOUR_S: i64 = 3600;

/// Dedup keys per `IN (...)` list: keeps statements far below `max_query_size` (256 KiB).
const KEYS_PER_QUERY: usize = 500;

impl Sql {
    /// Per partition of every source, the committed next offset (`committed_next`): a row
    /// counts iff its `batch_end` is below it. Joined with `ANY LEFT JOIN` (a partition
    /// never committed gets 0, and `batch_end` is never negative): current versions'
    /// `ANY INNER JOIN` also keeps one left row per key, unlike 18.16's.
    pub(super) fn committed_batches(&self) -> String {
        format!(
            "SELECT src, topic, part, toInt64(max(next_offset)) AS committed_next FROM {} \
             GROUP BY src, topic, part",
            self.table(Table::Offsets)
        )
    }

    /// Hourly `hour (s), key_id, requests, auth failures` of two keys from `since_s`, over
    /// committed batches, by hour and key.
    pub fn rotation_hours(&self, old: &str, new: &str, since_s: u32) -> String {
        format!(
            "SELECT toInt64(intDiv(toUInt32(minute), 3600) * 3600) AS h_hour, key_id, \
             toUInt64(sum(requests)) AS h_requests, \
             toUInt64(sum(invalid_key + expired + revoked + forbidden)) AS h_failures \
             FROM (SELECT key_id, minute, requests, invalid_key, expired, revoked, forbidden, \
             src, topic, part, batch_end FROM {rollups} WHERE key_id IN ({old}, {new}) \
             AND minute >= toDateTime({since_s})) AS r \
             ANY LEFT JOIN ({committed}) AS o USING (src, topic, part) \
             WHERE batch_end < committed_next \
             GROUP BY h_hour, key_id ORDER BY h_hour, key_id",
            rollups = self.table(Table::RollupMinute),
            old = lit(old),
            new = lit(new),
            committed = self.committed_batches(),
        )
    }

    /// The sources of two keys over committed batches, per key most recently seen first
    /// (like `SqliteStore::key_sources`).
    pub fn rotation_sources(&self, old: &str, new: &str) -> String {
        format!(
            "SELECT key_id, ip, user_agent, endpoint, gateway, \
             toInt64(min(first_seen_ms)) AS s_first, toInt64(max(last_seen_ms)) AS s_last, \
             toUInt64(sum(requests)) AS s_requests, toUInt64(sum(failures)) AS s_failures \
             FROM (SELECT key_id, ip, user_agent, endpoint, gateway, first_seen_ms, \
             last_seen_ms, requests, failures, src, topic, part, batch_end FROM {sources} \
             WHERE key_id IN ({old}, {new})) AS s \
             ANY LEFT JOIN ({committed}) AS o USING (src, topic, part) \
             WHERE batch_end < committed_next \
             GROUP BY key_id, ip, user_agent, endpoint, gateway \
             ORDER BY key_id, s_last DESC, s_requests DESC, ip, user_agent, endpoint, gateway",
            sources = self.table(Table::KeySources),
            old = lit(old),
            new = lit(new),
            committed = self.committed_batches(),
        )
    }

    /// What is stored of some facts: `dedup_key, first_at_ms, last_at_ms, raised,
    /// claimed_by` (the smallest id over the fact's rows).
    pub fn finding_states(&self, dedup_keys: &[&str]) -> String {
        let keys: Vec<String> = dedup_keys.iter().map(|k| lit(k)).collect();
        format!(
            "SELECT dedup_key, toInt64(min(first_at_ms)) AS s_first, \
             toInt64(max(last_at_ms)) AS s_last, toUInt64(max(raised)) AS s_raised, \
             min(claimed_by) AS s_claimed FROM {} WHERE dedup_key IN ({}) GROUP BY dedup_key",
            self.table(Table::FindingState),
            if keys.is_empty() {
                "''".to_owned()
            } else {
                keys.join(", ")
            }
        )
    }

    /// When a message carrying `dedup_key` was last delivered to `recipient`, by any
    /// instance (ms; 0 when never): an `ok` attempt of a message whose rows name the fact.
    pub fn last_delivered(&self, recipient: &str, dedup_key: &str) -> String {
        format!(
            "SELECT toInt64(max(finished_ms)) FROM {attempts} WHERE recipient = {r} \
             AND outcome = 'ok' AND message_id IN (SELECT id FROM {notifications} \
             WHERE finding_key = {k} AND outcome = 'ok')",
            attempts = self.table(Table::NotifyAttempts),
            notifications = self.table(Table::Notifications),
            r = lit(recipient),
            k = lit(dedup_key),
        )
    }

    /// Stored findings last raised at or after `since_ms`, of one kind or all, oldest
    /// first: `dedup_key, kind, key_id, owner, severity, first_at_ms, last_at_ms, raised,
    /// summary, evidence`.
    pub fn stored_findings(&self, since_ms: Option<i64>, kind: Option<&str>) -> String {
        let mut filter = Vec::new();
        if let Some(s) = since_ms {
            filter.push(format!("f_last >= {s}"));
        }
        if let Some(k) = kind {
            filter.push(format!("f_kind = {}", lit(k)));
        }
        let filter = if filter.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", filter.join(" AND "))
        };
        format!(
            "SELECT * FROM (SELECT dedup_key, argMax(kind, raised) AS f_kind, \
             argMax(key_id, raised) AS f_key, argMax(owner, raised) AS f_owner, \
             argMax(severity, raised) AS f_severity, toInt64(min(first_at_ms)) AS f_first, \
             toInt64(max(last_at_ms)) AS f_last, toUInt64(max(raised)) AS f_raised, \
             argMax(summary, raised) AS f_summary, argMax(evidence, raised) AS f_evidence \
             FROM {} GROUP BY dedup_key) AS f{filter} ORDER BY f_last, dedup_key",
            self.table(Table::FindingState)
        )
    }
}

#[derive(Row, Deserialize)]
struct HourRowCh {
    hour_s: i64,
    key_id: String,
    requests: u64,
    failures: u64,
}

#[derive(Row, Deserialize, Debug, Clone)]
pub(crate) struct StateRow {
    pub dedup_key: String,
    pub first_at_ms: i64,
    pub last_at_ms: i64,
    pub raised: u64,
    pub claimed_by: String,
}

#[derive(Row, Deserialize)]
struct FindingRowCh {
    dedup_key: String,
    kind: String,
    key_id: String,
    owner: String,
    severity: String,
    first_at_ms: i64,
    last_at_ms: i64,
    raised: u64,
    summary: String,
    evidence: String,
}

/// This process's id in `claimed_by`: unique per process start.
fn instance_id() -> &'static str {
    use sha2::{Digest, Sha256};
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let mut h = Sha256::new();
        h.update(std::process::id().to_le_bytes());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        h.update(now.as_nanos().to_le_bytes());
        h.update(format!("{:p}", &h).as_bytes());
        hex::encode(&h.finalize()[..8])
    })
}

/// The facts `me` tells as new after reading back the rows of facts it found unknown:
/// those whose smallest `claimed_by` is `me` (see the module documentation).
fn claimed<'a>(me: &str, unknown: &[&'a str], read_back: &[StateRow]) -> Vec<&'a str> {
    let by_key: HashMap<&str, &str> = read_back
        .iter()
        .map(|r| (r.dedup_key.as_str(), r.claimed_by.as_str()))
        .collect();
    unknown
        .iter()
        .copied()
        // A fact missing on read-back (a merge in between, or a lagging replica) stays ours:
        // telling it twice is better than never.
        .filter(|k| by_key.get(k).is_none_or(|c| *c == me))
        .collect()
}

impl RotationSource for ClickHouseStore {
    fn rotation_data(&self, old: &str, new: &str, since_ms: i64) -> Result<RotationData, String> {
        // Like the embedded store: from the start of the hour of `since_ms`.
        let since_s =
            (since_ms.div_euclid(HOUR_S * 1000) * HOUR_S).clamp(0, i64::from(u32::MAX)) as u32;
        let sql = self.sql();
        let (hours, sources) = self
            // Both reads at once: a replay evaluates every `rules.evaluate_every` of event
            // time (5,760 times over four days), and on a cluster each read of the
            // Distributed tables is a round trip to every shard.
            .block_on(async {
                let hours_sql = sql.rotation_hours(old, new, since_s);
                let sources_sql = sql.rotation_sources(old, new);
                tokio::try_join!(
                    self.fetch_within::<HourRowCh>(
                        REPORT_TIMEOUT,
                        &hours_sql,
                        "reading a rotation's hourly counts",
                    ),
                    self.fetch_within::<SourceRowCh>(
                        REPORT_TIMEOUT,
                        &sources_sql,
                        "reading a rotation's sources",
                    ),
                )
            })
            .map_err(|e| e.to_string())?;
        let mut hourly: Vec<HourRow> = Vec::new();
        for r in hours {
            let hour_ms = r.hour_s * 1000;
            if !matches!(hourly.last(), Some(h) if h.hour_ms == hour_ms) {
                hourly.push(HourRow {
                    hour_ms,
                    ..HourRow::default()
                });
            }
            let h = hourly.last_mut().expect("pushed above");
            if r.key_id == old {
                h.old_requests += r.requests;
                h.old_failures += r.failures;
            } else {
                h.new_requests += r.requests;
                h.new_failures += r.failures;
            }
        }
        let mut old_sources = Vec::new();
        let mut new_sources = Vec::new();
        for r in sources {
            let row: SourceRow = (
                SourceKey {
                    key_id: r.key_id,
                    ip: r.ip,
                    user_agent: r.user_agent,
                    endpoint: r.endpoint,
                    gateway: r.gateway,
                },
                SourceStats {
                    first_seen_ms: r.first_seen_ms,
                    last_seen_ms: r.last_seen_ms,
                    requests: r.requests,
                    failures: r.failures,
                },
            );
            // Both lists hold a key's sources even when old and new are the same key.
            if row.0.key_id == new {
                new_sources.push(row.clone());
            }
            if row.0.key_id == old {
                old_sources.push(row);
            }
        }
        Ok(RotationData {
            old_key: old.to_owned(),
            new_key: new.to_owned(),
            old_sources,
            new_sources,
            hourly,
        })
    }
}

impl DetectionStore for ClickHouseStore {
    fn record_findings(&mut self, found: &[Finding]) -> Result<Vec<Finding>, StoreError> {
        ClickHouseStore::record_findings(self, found)
    }
}

impl ClickHouseStore {
    /// Stores findings (their next state by `dedup_key`) and returns those never stored
    /// before, in the order given. See the module documentation for several instances.
    pub fn record_findings(&self, found: &[Finding]) -> Result<Vec<Finding>, StoreError> {
        self.block_on(self.record_findings_as(found, instance_id()))
    }

    /// [`Self::record_findings`] under another instance id (tests of the race).
    #[doc(hidden)]
    pub fn record_findings_as_instance(
        &self,
        found: &[Finding],
        instance: &str,
    ) -> Result<Vec<Finding>, StoreError> {
        self.block_on(self.record_findings_as(found, instance))
    }

    async fn finding_states_of(&self, keys: &[&str]) -> Result<Vec<StateRow>, StoreError> {
        let mut out = Vec::new();
        for chunk in keys.chunks(KEYS_PER_QUERY) {
            let rows: Vec<StateRow> = self
                .fetch(&self.sql().finding_states(chunk), "reading stored findings")
                .await?;
            out.extend(rows);
        }
        Ok(out)
    }

    async fn record_findings_as(
        &self,
        found: &[Finding],
        me: &str,
    ) -> Result<Vec<Finding>, StoreError> {
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let mut keys: Vec<&str> = found.iter().map(|f| f.dedup_key.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut state: HashMap<String, StateRow> = self
            .finding_states_of(&keys)
            .await?
            .into_iter()
            .map(|r| (r.dedup_key.clone(), r))
            .collect();

        // The next state of each fact, raise by raise; the last raise's text wins.
        let mut unknown: Vec<&str> = Vec::new();
        let mut latest: HashMap<&str, &Finding> = HashMap::new();
        for f in found {
            let key = f.dedup_key.as_str();
            match state.get_mut(key) {
                Some(s) => {
                    s.first_at_ms = s.first_at_ms.min(f.at_ms);
                    s.last_at_ms = s.last_at_ms.max(f.at_ms);
                    s.raised += 1;
                }
                None => {
                    unknown.push(key);
                    state.insert(
                        key.to_owned(),
                        StateRow {
                            dedup_key: key.to_owned(),
                            first_at_ms: f.at_ms,
                            last_at_ms: f.at_ms,
                            raised: 1,
                            claimed_by: me.to_owned(),
                        },
                    );
                }
            }
            latest.insert(key, f);
        }

        let mut rows = RowBinary::default();
        let mut mirror = RowBinary::default();
        for key in &keys {
            finding_row(&mut rows, &state[*key], latest[key])?;
            finding_row_v1(&mut mirror, &state[*key], latest[key])?;
        }
        // Both at once: on a cluster each is a quorum insert into a table replicated on
        // every server, and an evaluation with an open rotation raises its findings again
        // at every tick.
        tokio::try_join!(
            self.insert(Table::FindingState, &rows, Phase::Query),
            self.insert(Table::Findings, &mirror, Phase::Query),
        )?;

        if unknown.is_empty() {
            return Ok(Vec::new());
        }
        let read_back = self.finding_states_of(&unknown).await?;
        let mine = claimed(me, &unknown, &read_back);
        if mine.len() < unknown.len() {
            tracing::info!(
                facts = unknown.len() - mine.len(),
                "findings raised by another instance at the same time; that instance tells them"
            );
        }
        // In the order given, the first raise of each new fact.
        let mut out = Vec::with_capacity(mine.len());
        let mut pending: std::collections::HashSet<&str> = mine.into_iter().collect();
        for f in found {
            if pending.remove(f.dedup_key.as_str()) {
                out.push(f.clone());
            }
        }
        Ok(out)
    }

    /// Stored findings last raised at or after `since_ms` (all without it), of one kind or
    /// all, oldest first; the same rows as `SqliteStore::findings`.
    pub fn findings(
        &self,
        since_ms: Option<i64>,
        kind: Option<FindingKind>,
    ) -> Result<Vec<StoredFinding>, StoreError> {
        let sql = self
            .sql()
            .stored_findings(since_ms, kind.map(|k| k.as_str()));
        let rows: Vec<FindingRowCh> = self
            .block_on(self.fetch_within(REPORT_TIMEOUT, &sql, "reading stored findings"))
            .map_err(|e| match &e {
                StoreError::Fatal(m) if code_of(m) == Some(60) => StoreError::Fatal(format!(
                    "no findings table in ClickHouse database {} (schema older than version \
                     2: run this keywatch's `run` once to migrate it)",
                    self.inner.cfg.database
                )),
                _ => e,
            })?;
        rows.into_iter()
            .map(|r| {
                let bad = |what: &str, e: String| {
                    StoreError::Fatal(format!("stored finding {}: {what}: {e}", r.dedup_key))
                };
                let finding = Finding {
                    kind: r.kind.parse().map_err(|e| bad("kind", e))?,
                    key_id: r.key_id.clone(),
                    owner: Some(r.owner.clone()).filter(|o| !o.is_empty()),
                    at_ms: r.last_at_ms,
                    severity: r
                        .severity
                        .parse::<Severity>()
                        .map_err(|e| bad("severity", e))?,
                    summary: r.summary.clone(),
                    evidence: serde_json::from_str(&r.evidence)
                        .map_err(|e| bad("evidence", e.to_string()))?,
                    dedup_key: r.dedup_key.clone(),
                };
                Ok(StoredFinding {
                    finding,
                    first_at_ms: r.first_at_ms,
                    last_at_ms: r.last_at_ms,
                    count: r.raised,
                })
            })
            .collect()
    }

    /// Writes notification attempts to `notify_attempts` (and the version 1
    /// `notifications`), secrets removed, in one insert each.
    pub fn record_attempts(&self, rows: &[AttemptRecord]) -> Result<(), StoreError> {
        self.block_on(self.record_attempts_async(rows))
    }

    /// [`Self::record_attempts`] for async callers.
    pub async fn record_attempts_async(&self, rows: &[AttemptRecord]) -> Result<(), StoreError> {
        let mut rb = RowBinary::default();
        let mut mirror = RowBinary::default();
        for r in rows {
            attempt_row(&mut rb, r);
            notification_row_v1(&mut mirror, r);
        }
        self.insert(Table::NotifyAttempts, &rb, Phase::Query)
            .await?;
        self.insert(Table::Notifications, &mirror, Phase::Query)
            .await
    }
}

/// One `finding_state` row: the fact's state `s`, the text of its latest raise `f`.
pub(crate) fn finding_row(
    rows: &mut RowBinary,
    s: &StateRow,
    f: &Finding,
) -> Result<(), StoreError> {
    let evidence = serde_json::to_string(&f.evidence)
        .map_err(|e| StoreError::Fatal(format!("finding evidence: {e}")))?;
    rows.string(&s.dedup_key);
    rows.string(f.kind.as_str());
    rows.string(&f.key_id);
    rows.string(f.owner.as_deref().unwrap_or(""));
    rows.string(f.severity.as_str());
    rows.i64(s.first_at_ms);
    rows.i64(s.last_at_ms);
    rows.u64(s.raised);
    rows.string(&f.summary);
    rows.string(&evidence);
    rows.string(&s.claimed_by);
    rows.datetime_ms(s.last_at_ms);
    rows.rows += 1;
    Ok(())
}

/// The fact's state in the version 1 `findings` table, which dashboards read: its latest
/// raise, `at` in seconds (ReplacingMergeTree(at) keeps the latest).
pub(crate) fn finding_row_v1(
    rows: &mut RowBinary,
    s: &StateRow,
    f: &Finding,
) -> Result<(), StoreError> {
    let evidence = serde_json::to_string(&f.evidence)
        .map_err(|e| StoreError::Fatal(format!("finding evidence: {e}")))?;
    rows.string(&s.dedup_key);
    rows.string(f.kind.as_str());
    rows.string(&f.key_id);
    rows.string(f.owner.as_deref().unwrap_or(""));
    rows.string(f.severity.as_str());
    rows.datetime_ms(s.last_at_ms);
    rows.string(&f.summary);
    rows.string(&evidence);
    rows.rows += 1;
    Ok(())
}

/// The attempt in the version 1 `notifications` table: one row per finding the message
/// carries (`finding_key` its dedup key, so a finding joins to what was told about it; the
/// message's kinds when it names none), `recipient` where it went (the redacted target),
/// `step` 0, `at` when the attempt ended.
pub(crate) fn notification_row_v1(rb: &mut RowBinary, r: &AttemptRecord) {
    let r = r.redacted();
    let keys: Vec<&str> = if r.findings.is_empty() {
        vec![r.kinds.as_str()]
    } else {
        r.findings.iter().map(String::as_str).collect()
    };
    for key in keys {
        rb.string(&r.message_id);
        rb.string(key);
        rb.string(&r.channel);
        rb.string(&r.target);
        rb.u32(0);
        rb.u32(r.attempt);
        rb.string(r.outcome);
        rb.string(r.detail.as_deref().unwrap_or(""));
        rb.datetime_ms(r.finished_ms);
        rb.rows += 1;
    }
}

/// One `notify_attempts` row, secrets removed.
pub(crate) fn attempt_row(rb: &mut RowBinary, r: &AttemptRecord) {
    let r = r.redacted();
    rb.string(&r.message_id);
    rb.string(&r.recipient);
    rb.string(&r.receiver);
    rb.string(&r.channel);
    rb.string(&r.channel_type);
    rb.string(&r.target);
    rb.string(&r.kinds);
    rb.string(&r.severity);
    rb.i64(r.created_ms);
    rb.u32(r.attempt);
    rb.i64(r.started_ms);
    rb.i64(r.finished_ms);
    rb.string(r.outcome);
    rb.string(r.detail.as_deref().unwrap_or(""));
    rb.datetime_ms(r.finished_ms);
    rb.rows += 1;
}

impl AttemptLog for ClickHouseStore {
    async fn record_attempts(&self, rows: &[AttemptRecord]) -> Result<(), StoreError> {
        self.record_attempts_async(rows).await
    }
}

impl SharedLog for ClickHouseStore {
    fn last_delivered(&self, recipient: &str, dedup_key: &str) -> Result<Option<i64>, String> {
        let sql = self.sql().last_delivered(recipient, dedup_key);
        let answer = self.query_tsv(&sql).map_err(|e| e.to_string())?;
        let ms: i64 = answer
            .trim()
            .parse()
            .map_err(|e| format!("last delivery: unexpected answer `{}`: {e}", answer.trim()))?;
        Ok((ms > 0).then_some(ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(key: &str, claimed_by: &str) -> StateRow {
        StateRow {
            dedup_key: key.into(),
            first_at_ms: 0,
            last_at_ms: 0,
            raised: 1,
            claimed_by: claimed_by.into(),
        }
    }

    #[test]
    fn racing_instances_tell_a_fact_once() {
        // Both read "unknown" for x; the read-back decides: smallest id wins.
        let both = [state("x", "a"), state("y", "b")];
        assert_eq!(claimed("a", &["x", "y"], &both), ["x"]);
        assert_eq!(claimed("b", &["x", "y"], &both), ["y"]);
        // min(claimed_by) over x's rows, as the query returns it.
        let raced = [state("x", "a")];
        assert_eq!(claimed("a", &["x"], &raced), ["x"]);
        assert!(claimed("b", &["x"], &raced).is_empty());
        // Not seen on read-back: still told.
        assert_eq!(claimed("b", &["z"], &raced), ["z"]);
    }
}
