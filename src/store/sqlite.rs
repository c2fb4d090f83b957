//! The embedded store: SQLite in the state directory.
//!
//! WAL mode with `synchronous = NORMAL`: a process crash loses nothing committed, and a power
//! loss can only roll back whole transactions, position included, so counts stay exact
//! either way. The schema is versioned with `PRAGMA user_version`.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use super::{BatchWrite, KeyUsage, SourceRow, Store, StoreError};
use crate::aggregate::{Rollup, SourceKey, SourceStats, LATENCY_BUCKETS};
use crate::event::Outcome;
use crate::source::Position;

/// Database file name inside the state directory.
pub const DB_FILE: &str = "keywatch.db";

/// Schema migrations; entry `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: rollups, keys, sources, positions.
    "CREATE TABLE rollup_minute (
        key_id TEXT NOT NULL,
        minute INTEGER NOT NULL, -- start of the minute, Unix seconds
        requests INTEGER NOT NULL,
        ok INTEGER NOT NULL, invalid_key INTEGER NOT NULL, expired INTEGER NOT NULL,
        revoked INTEGER NOT NULL, forbidden INTEGER NOT NULL, rate_limited INTEGER NOT NULL,
        other INTEGER NOT NULL,
        latency_count INTEGER NOT NULL, latency_sum_ms REAL NOT NULL, latency_max_ms REAL NOT NULL,
        lat_b0 INTEGER NOT NULL, lat_b1 INTEGER NOT NULL, lat_b2 INTEGER NOT NULL,
        lat_b3 INTEGER NOT NULL, lat_b4 INTEGER NOT NULL, lat_b5 INTEGER NOT NULL,
        lat_b6 INTEGER NOT NULL, lat_b7 INTEGER NOT NULL, lat_b8 INTEGER NOT NULL,
        lat_b9 INTEGER NOT NULL, lat_b10 INTEGER NOT NULL, lat_b11 INTEGER NOT NULL,
        PRIMARY KEY (key_id, minute)
     ) WITHOUT ROWID;
     CREATE INDEX rollup_minute_by_minute ON rollup_minute (minute);
     CREATE TABLE keys_seen (
        key_id TEXT PRIMARY KEY,
        hint TEXT,
        consumer TEXT,
        first_seen_ms INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL
     ) WITHOUT ROWID;
     CREATE TABLE key_sources (
        key_id TEXT NOT NULL, ip TEXT NOT NULL, user_agent TEXT NOT NULL,
        endpoint TEXT NOT NULL, gateway TEXT NOT NULL,
        first_seen_ms INTEGER NOT NULL, last_seen_ms INTEGER NOT NULL,
        requests INTEGER NOT NULL, failures INTEGER NOT NULL,
        PRIMARY KEY (key_id, ip, user_agent, endpoint, gateway)
     ) WITHOUT ROWID;
     CREATE TABLE source_positions (
        source TEXT PRIMARY KEY,
        position TEXT NOT NULL, -- JSON of source::Position
        updated_ms INTEGER NOT NULL
     ) WITHOUT ROWID;",
    // 2: findings (store::views), one row per fact (dedup_key).
    "CREATE TABLE findings (
        dedup_key TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        key_id TEXT NOT NULL,
        owner TEXT,
        severity TEXT NOT NULL,
        first_at_ms INTEGER NOT NULL,
        last_at_ms INTEGER NOT NULL,
        count INTEGER NOT NULL,
        summary TEXT NOT NULL,
        evidence TEXT NOT NULL -- JSON
     ) WITHOUT ROWID;
     CREATE INDEX findings_by_time ON findings (last_at_ms);",
    // 3: the notification log and silences (store::notify_log).
    super::notify_log::MIGRATION,
    // 4: which Kafka topic partitions each key's traffic came from, and until when (the
    // anomaly models' warm-up per assigned partition, `HistoryStore::key_partitions`).
    "CREATE TABLE key_partitions (
        topic TEXT NOT NULL,
        part INTEGER NOT NULL,
        key_id TEXT NOT NULL,
        last_minute INTEGER NOT NULL, -- the key's last minute from this partition, Unix s
        PRIMARY KEY (topic, part, key_id)
     ) WITHOUT ROWID;",
];

/// `key_id IN` the keys stored from `n` topic partitions (parameters `?{first}`, topic and
/// partition in turn) whose last minute is at or after `?1`; false for none.
fn keys_of_partitions(first: usize, n: usize) -> String {
    if n == 0 {
        return "0".to_owned();
    }
    let conds: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "(topic = ?{} AND part = ?{})",
                first + 2 * i,
                first + 2 * i + 1
            )
        })
        .collect();
    format!(
        "key_id IN (SELECT key_id FROM key_partitions WHERE last_minute >= ?1 AND ({}))",
        conds.join(" OR ")
    )
}

/// The parameters of [`keys_of_partitions`].
fn partition_params(
    partitions: &[crate::source::kafka::TopicPartition],
) -> Vec<rusqlite::types::Value> {
    partitions
        .iter()
        .flat_map(|(t, p)| [t.clone().into(), i64::from(*p).into()])
        .collect()
}

const OUTCOME_COLUMNS: [&str; 7] = [
    "ok",
    "invalid_key",
    "expired",
    "revoked",
    "forbidden",
    "rate_limited",
    "other",
];

pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    /// The connection, for the queries in sibling modules (`store::views`).
    pub(super) fn conn(&self) -> &Connection {
        &self.conn
    }

    pub(super) fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

pub(super) fn classify(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::*;
    match e.sqlite_error_code() {
        Some(DatabaseBusy | DatabaseLocked | SystemIoFailure | DiskFull) => {
            StoreError::Transient(e.to_string())
        }
        _ => StoreError::Fatal(e.to_string()),
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database in `state_dir` and migrates it.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|e| {
            StoreError::Fatal(format!(
                "cannot create state directory {}: {e}",
                state_dir.display()
            ))
        })?;
        Self::open_file(&state_dir.join(DB_FILE))
    }

    pub fn open_file(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Fatal(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(classify)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(classify)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(classify)?;
        let mut store = SqliteStore { conn };
        store.migrate()?;
        Ok(store)
    }

    /// Opens an existing database for reading, without migrating it.
    pub fn open_read_only(state_dir: &Path) -> Result<Self, StoreError> {
        let path = state_dir.join(DB_FILE);
        if !path.exists() {
            return Err(StoreError::Fatal(format!(
                "no keywatch database at {} (has `keywatch run` stored anything yet?)",
                path.display()
            )));
        }
        let conn =
            Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(|e| StoreError::Fatal(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(classify)?;
        Ok(SqliteStore { conn })
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        // IMMEDIATE, like commits: a deferred transaction that reads the version and then
        // writes fails at once with "database is locked" when another process (a second
        // instance, or the notifier's own connection) writes meanwhile, instead of waiting.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(classify)?;
        let version: usize = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(classify)?;
        if version > MIGRATIONS.len() {
            return Err(StoreError::Fatal(format!(
                "the database has schema version {version}, newer than this keywatch knows ({}); \
                 upgrade keywatch",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            tx.execute_batch(sql)
                .map_err(|e| StoreError::Fatal(format!("migration {}: {e}", i + 1)))?;
            tx.pragma_update(None, "user_version", i + 1)
                .map_err(classify)?;
        }
        tx.commit().map_err(classify)
    }

    /// Usage per key over rollups with `minute >= since_ms` (all time without it), busiest
    /// first.
    pub fn key_usage(&self, since_ms: Option<i64>) -> Result<Vec<KeyUsage>, StoreError> {
        let since_s = since_ms.map_or(i64::MIN, |ms| ms.div_euclid(1000));
        let buckets: Vec<String> = (0..LATENCY_BUCKETS)
            .map(|i| format!("SUM(r.lat_b{i})"))
            .collect();
        let outcomes: Vec<String> = OUTCOME_COLUMNS
            .iter()
            .map(|c| format!("SUM(r.{c})"))
            .collect();
        let sql = format!(
            "SELECT r.key_id, k.hint, k.consumer, MIN(r.minute), MAX(r.minute),
                    SUM(r.requests), {outcomes}, SUM(r.latency_count), SUM(r.latency_sum_ms),
                    MAX(r.latency_max_ms), {buckets},
                    (SELECT COUNT(*) FROM key_sources s WHERE s.key_id = r.key_id),
                    k.first_seen_ms, k.last_seen_ms
             FROM rollup_minute r LEFT JOIN keys_seen k ON k.key_id = r.key_id
             WHERE r.minute >= ?1
             GROUP BY r.key_id
             ORDER BY SUM(r.requests) DESC, r.key_id",
            outcomes = outcomes.join(", "),
            buckets = buckets.join(", "),
        );
        let mut stmt = self.conn.prepare(&sql).map_err(classify)?;
        let rows = stmt
            .query_map([since_s], |row| {
                let mut totals = Rollup {
                    requests: row.get::<_, i64>(5)? as u64,
                    ..Rollup::default()
                };
                for i in 0..OUTCOME_COLUMNS.len() {
                    totals.outcomes[i] = row.get::<_, i64>(6 + i)? as u64;
                }
                let base = 6 + OUTCOME_COLUMNS.len();
                totals.latency_count = row.get::<_, i64>(base)? as u64;
                totals.latency_sum_ms = row.get(base + 1)?;
                totals.latency_max_ms = row.get(base + 2)?;
                for i in 0..LATENCY_BUCKETS {
                    totals.latency_buckets[i] = row.get::<_, i64>(base + 3 + i)? as u64;
                }
                let after = base + 3 + LATENCY_BUCKETS;
                let first_minute: i64 = row.get(3)?;
                let last_minute: i64 = row.get(4)?;
                Ok(KeyUsage {
                    key_id: row.get(0)?,
                    hint: row.get(1)?,
                    consumer: row.get(2)?,
                    // Within a range, the rollups bound first and last use to the minute.
                    first_seen_ms: row
                        .get::<_, Option<i64>>(after + 1)?
                        .map_or(first_minute * 1000, |f| f.max(first_minute * 1000)),
                    last_seen_ms: row
                        .get::<_, Option<i64>>(after + 2)?
                        .map_or(last_minute * 1000 + 59_999, |l| {
                            l.min(last_minute * 1000 + 59_999)
                        }),
                    totals,
                    sources: row.get::<_, i64>(after)? as u64,
                })
            })
            .map_err(classify)?;
        rows.collect::<Result<_, _>>().map_err(classify)
    }

    /// The sources of one key, most recently seen first.
    pub fn key_sources(&self, key_id: &str) -> Result<Vec<SourceRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT key_id, ip, user_agent, endpoint, gateway, first_seen_ms, last_seen_ms,
                        requests, failures
                 FROM key_sources WHERE key_id = ?1
                 ORDER BY last_seen_ms DESC, requests DESC",
            )
            .map_err(classify)?;
        let rows = stmt
            .query_map([key_id], |r| {
                Ok((
                    SourceKey {
                        key_id: r.get(0)?,
                        ip: r.get(1)?,
                        user_agent: r.get(2)?,
                        endpoint: r.get(3)?,
                        gateway: r.get(4)?,
                    },
                    SourceStats {
                        first_seen_ms: r.get(5)?,
                        last_seen_ms: r.get(6)?,
                        requests: r.get::<_, i64>(7)? as u64,
                        failures: r.get::<_, i64>(8)? as u64,
                    },
                ))
            })
            .map_err(classify)?;
        rows.collect::<Result<_, _>>().map_err(classify)
    }

    /// Total requests in the rollups and in the sources table (they must agree).
    pub fn totals(&self) -> Result<(u64, u64), StoreError> {
        self.conn
            .query_row(
                "SELECT (SELECT COALESCE(SUM(requests), 0) FROM rollup_minute),
                        (SELECT COALESCE(SUM(requests), 0) FROM key_sources)",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
            .map_err(classify)
    }

    /// The latest event time stored, if any.
    pub fn latest_event_ms(&self) -> Result<Option<i64>, StoreError> {
        self.conn
            .query_row("SELECT MAX(last_seen_ms) FROM keys_seen", [], |r| r.get(0))
            .map_err(classify)
    }
}

impl SqliteStore {
    /// `partitions`, or `None` (everything) while `key_partitions` is empty: a database
    /// from before it (schema version 3) knows no key's partition, and its first warm-ups
    /// read every key, as keywatch did then.
    fn partitions_known<'p>(
        &self,
        partitions: Option<&'p [crate::source::kafka::TopicPartition]>,
    ) -> Result<Option<&'p [crate::source::kafka::TopicPartition]>, StoreError> {
        if partitions.is_none() {
            return Ok(None);
        }
        let any: bool = self
            .conn
            .query_row("SELECT EXISTS (SELECT 1 FROM key_partitions)", [], |r| {
                r.get(0)
            })
            .map_err(classify)?;
        Ok(partitions.filter(|_| any))
    }
}

impl super::HistoryStore for SqliteStore {
    fn rollup_history(
        &mut self,
        window_ms: i64,
        max_rows: u64,
        partitions: Option<&[crate::source::kafka::TopicPartition]>,
        f: &mut dyn FnMut(&str, i64, &Rollup),
    ) -> Result<super::HistoryRead, StoreError> {
        let latest: Option<i64> = self
            .conn
            .query_row("SELECT MAX(minute) FROM rollup_minute", [], |r| r.get(0))
            .map_err(classify)?;
        let Some(latest_ms) = latest.map(|s| s * 1000) else {
            return Ok(super::HistoryRead {
                rows: 0,
                since_ms: 0,
                latest_ms: None,
            });
        };
        let since_ms = latest_ms.saturating_sub(window_ms);
        // The keys of the partitions asked for: those seen there since the window's start.
        let partitions = self.partitions_known(partitions)?;
        let (keys, part_params) = match partitions {
            Some(p) => (keys_of_partitions(3, p.len()), partition_params(p)),
            None => ("1".to_owned(), Vec::new()),
        };
        // Keep the newest minutes that fit in `max_rows` (the minute index answers this).
        let mut per_minute = self
            .conn
            .prepare(&format!(
                "SELECT minute, COUNT(*) FROM rollup_minute WHERE minute >= ?1 AND ?2 = ?2
                 AND {keys} GROUP BY minute ORDER BY minute DESC"
            ))
            .map_err(classify)?;
        let mut count_params: Vec<rusqlite::types::Value> =
            vec![since_ms.div_euclid(1000).into(), 0i64.into()];
        count_params.extend(part_params.iter().cloned());
        let counts = per_minute
            .query_map(rusqlite::params_from_iter(count_params), |r| {
                Ok((r.get::<_, i64>(0)? * 1000, r.get::<_, i64>(1)? as u64))
            })
            .map_err(classify)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(classify)?;
        let since_ms = super::history_cut(since_ms, max_rows, counts);
        let mut cols = vec!["key_id", "minute", "requests"];
        cols.extend(OUTCOME_COLUMNS);
        cols.extend(["latency_count", "latency_sum_ms", "latency_max_ms"]);
        let buckets: Vec<String> = (0..LATENCY_BUCKETS).map(|i| format!("lat_b{i}")).collect();
        cols.extend(buckets.iter().map(String::as_str));
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {} FROM rollup_minute WHERE minute >= ?1 AND {keys}
                 ORDER BY key_id, minute LIMIT ?2",
                cols.join(", ")
            ))
            .map_err(classify)?;
        let mut row_params: Vec<rusqlite::types::Value> = vec![
            since_ms.div_euclid(1000).into(),
            i64::try_from(max_rows).unwrap_or(i64::MAX).into(),
        ];
        row_params.extend(part_params);
        let mut rows = stmt
            .query(rusqlite::params_from_iter(row_params))
            .map_err(classify)?;
        let mut n = 0;
        let mut r = Rollup::default();
        while let Some(row) = rows.next().map_err(classify)? {
            let key: String = row.get(0).map_err(classify)?;
            let minute_ms = row.get::<_, i64>(1).map_err(classify)? * 1000;
            let int = |i: usize| row.get::<_, i64>(i).map(|v| v as u64).map_err(classify);
            r.requests = int(2)?;
            for i in 0..OUTCOME_COLUMNS.len() {
                r.outcomes[i] = int(3 + i)?;
            }
            let base = 3 + OUTCOME_COLUMNS.len();
            r.latency_count = int(base)?;
            r.latency_sum_ms = row.get(base + 1).map_err(classify)?;
            r.latency_max_ms = row.get(base + 2).map_err(classify)?;
            for i in 0..LATENCY_BUCKETS {
                r.latency_buckets[i] = int(base + 3 + i)?;
            }
            f(&key, minute_ms, &r);
            n += 1;
        }
        Ok(super::HistoryRead {
            rows: n,
            since_ms,
            latest_ms: Some(latest_ms),
        })
    }

    fn source_history(
        &mut self,
        max_rows: u64,
        partitions: Option<&[crate::source::kafka::TopicPartition]>,
        f: &mut dyn FnMut(super::SourceHistoryRow<'_>),
    ) -> Result<u64, StoreError> {
        // Sources have no window: the keys ever seen in the partitions (`?1` = 0).
        let partitions = self.partitions_known(partitions)?;
        let (keys, part_params) = match partitions {
            Some(p) => (keys_of_partitions(3, p.len()), partition_params(p)),
            None => ("?1 = ?1".to_owned(), Vec::new()),
        };
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT key_id, ip, user_agent, endpoint, MIN(first_seen_ms), MAX(last_seen_ms)
                 FROM key_sources WHERE {keys} GROUP BY key_id, ip, user_agent, endpoint
                 ORDER BY MAX(last_seen_ms) DESC LIMIT ?2"
            ))
            .map_err(classify)?;
        let mut params: Vec<rusqlite::types::Value> = vec![
            i64::MIN.into(),
            i64::try_from(max_rows).unwrap_or(i64::MAX).into(),
        ];
        params.extend(part_params);
        let mut rows = stmt
            .query(rusqlite::params_from_iter(params))
            .map_err(classify)?;
        let mut n = 0;
        while let Some(row) = rows.next().map_err(classify)? {
            let text = |i: usize| {
                row.get_ref(i)
                    .and_then(|v| Ok(v.as_str()?))
                    .map_err(classify)
            };
            f((
                text(0)?,
                text(1)?,
                text(2)?,
                text(3)?,
                row.get(4).map_err(classify)?,
                row.get(5).map_err(classify)?,
            ));
            n += 1;
        }
        Ok(n)
    }

    fn key_partitions(
        &mut self,
        since_ms: i64,
        partitions: &[crate::source::kafka::TopicPartition],
        f: &mut dyn FnMut(&str, &str, i32),
    ) -> Result<u64, StoreError> {
        if partitions.is_empty() {
            return Ok(0);
        }
        let conds: Vec<String> = (0..partitions.len())
            .map(|i| format!("(topic = ?{} AND part = ?{})", 2 + 2 * i, 3 + 2 * i))
            .collect();
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT key_id, topic, part FROM key_partitions
                 WHERE last_minute >= ?1 AND ({})",
                conds.join(" OR ")
            ))
            .map_err(classify)?;
        let mut params: Vec<rusqlite::types::Value> = vec![since_ms.div_euclid(1000).into()];
        params.extend(partition_params(partitions));
        let mut rows = stmt
            .query(rusqlite::params_from_iter(params))
            .map_err(classify)?;
        let mut n = 0;
        while let Some(row) = rows.next().map_err(classify)? {
            let text = |i: usize| {
                row.get_ref(i)
                    .and_then(|v| Ok(v.as_str()?))
                    .map_err(classify)
            };
            f(text(0)?, text(1)?, row.get(2).map_err(classify)?);
            n += 1;
        }
        Ok(n)
    }
}

impl Store for SqliteStore {
    fn detection(&mut self) -> Option<&mut dyn super::DetectionStore> {
        Some(self)
    }

    fn history(&mut self) -> Option<&mut dyn super::HistoryStore> {
        Some(self)
    }

    fn commit(&mut self, batch: &BatchWrite<'_, '_>) -> Result<(), StoreError> {
        let agg = batch.aggregate;
        // IMMEDIATE: take the write lock up front, so that two processes sharing the
        // database (two consumers in one group) wait for each other instead of failing
        // a read-then-write upgrade.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(classify)?;
        {
            let mut rollup = tx
                .prepare_cached(ROLLUP_UPSERT.get_or_init(rollup_upsert))
                .map_err(classify)?;
            for (key_id, minute_ms, r) in agg.rollups() {
                let mut values: Vec<rusqlite::types::Value> = Vec::with_capacity(26);
                values.push(key_id.to_owned().into());
                values.push((minute_ms.div_euclid(1000)).into());
                values.push((r.requests as i64).into());
                for o in Outcome::ALL {
                    values.push((r.outcomes[o.index()] as i64).into());
                }
                values.push((r.latency_count as i64).into());
                values.push(r.latency_sum_ms.into());
                values.push(r.latency_max_ms.into());
                for b in r.latency_buckets {
                    values.push((b as i64).into());
                }
                rollup
                    .execute(rusqlite::params_from_iter(values))
                    .map_err(classify)?;
            }

            let mut key = tx
                .prepare_cached(
                    "INSERT INTO keys_seen (key_id, hint, consumer, first_seen_ms, last_seen_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (key_id) DO UPDATE SET
                        hint = COALESCE(keys_seen.hint, excluded.hint),
                        consumer = COALESCE(excluded.consumer, keys_seen.consumer),
                        first_seen_ms = MIN(keys_seen.first_seen_ms, excluded.first_seen_ms),
                        last_seen_ms = MAX(keys_seen.last_seen_ms, excluded.last_seen_ms)",
                )
                .map_err(classify)?;
            for (key_id, seen) in agg.keys() {
                key.execute(params![
                    key_id,
                    seen.hint,
                    seen.consumer,
                    seen.first_seen_ms,
                    seen.last_seen_ms
                ])
                .map_err(classify)?;
            }

            let mut source = tx
                .prepare_cached(
                    "INSERT INTO key_sources (key_id, ip, user_agent, endpoint, gateway,
                        first_seen_ms, last_seen_ms, requests, failures)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                     ON CONFLICT (key_id, ip, user_agent, endpoint, gateway) DO UPDATE SET
                        first_seen_ms = MIN(key_sources.first_seen_ms, excluded.first_seen_ms),
                        last_seen_ms = MAX(key_sources.last_seen_ms, excluded.last_seen_ms),
                        requests = key_sources.requests + excluded.requests,
                        failures = key_sources.failures + excluded.failures",
                )
                .map_err(classify)?;
            for (k, s) in agg.sources() {
                source
                    .execute(params![
                        k.key_id,
                        k.ip,
                        k.user_agent,
                        k.endpoint,
                        k.gateway,
                        s.first_seen_ms,
                        s.last_seen_ms,
                        s.requests as i64,
                        s.failures as i64
                    ])
                    .map_err(classify)?;
            }

            let mut part = tx
                .prepare_cached(
                    "INSERT INTO key_partitions (topic, part, key_id, last_minute)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (topic, part, key_id) DO UPDATE SET
                        last_minute = MAX(key_partitions.last_minute, excluded.last_minute)",
                )
                .map_err(classify)?;
            for (key_id, topic, p, last_ms) in agg.key_partitions() {
                part.execute(params![
                    topic,
                    p,
                    key_id,
                    crate::aggregate::minute_of(last_ms).div_euclid(1000)
                ])
                .map_err(classify)?;
            }

            if let Some(cp) = batch.checkpoint {
                // A Kafka batch covers some partitions; the others keep their offsets.
                let merged;
                let position = match cp.position {
                    Position::Kafka { offsets } => {
                        let stored: Option<String> = tx
                            .query_row(
                                "SELECT position FROM source_positions WHERE source = ?1",
                                [cp.source],
                                |r| r.get(0),
                            )
                            .optional()
                            .map_err(classify)?;
                        let mut all = match stored.and_then(|j| serde_json::from_str(&j).ok()) {
                            Some(Position::Kafka { offsets }) => offsets,
                            _ => Vec::new(),
                        };
                        for o in offsets {
                            match all
                                .iter_mut()
                                .find(|a| a.topic == o.topic && a.partition == o.partition)
                            {
                                Some(a) => a.offset = o.offset,
                                None => all.push(o.clone()),
                            }
                        }
                        all.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
                        merged = Position::Kafka { offsets: all };
                        &merged
                    }
                    other => other,
                };
                let json = serde_json::to_string(position)
                    .map_err(|e| StoreError::Fatal(format!("position: {e}")))?;
                tx.execute(
                    "INSERT INTO source_positions (source, position, updated_ms)
                     VALUES (?1, ?2, ?3)
                     ON CONFLICT (source) DO UPDATE SET
                        position = excluded.position, updated_ms = excluded.updated_ms",
                    params![cp.source, json, chrono::Utc::now().timestamp_millis()],
                )
                .map_err(classify)?;
            }
        }
        tx.commit().map_err(classify)
    }

    fn position(&self, source: &str) -> Result<Option<Position>, StoreError> {
        let json: Option<String> = self
            .conn
            .query_row(
                "SELECT position FROM source_positions WHERE source = ?1",
                [source],
                |r| r.get(0),
            )
            .optional()
            .map_err(classify)?;
        json.map(|j| {
            serde_json::from_str(&j)
                .map_err(|e| StoreError::Fatal(format!("stored position of {source}: {e}")))
        })
        .transpose()
    }
}

static ROLLUP_UPSERT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn rollup_upsert() -> String {
    let mut cols = vec![
        "key_id".to_owned(),
        "minute".to_owned(),
        "requests".to_owned(),
    ];
    cols.extend(OUTCOME_COLUMNS.iter().map(|c| c.to_string()));
    cols.extend(["latency_count", "latency_sum_ms", "latency_max_ms"].map(String::from));
    cols.extend((0..LATENCY_BUCKETS).map(|i| format!("lat_b{i}")));
    let placeholders: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
    let updates: Vec<String> = cols[2..]
        .iter()
        .map(|c| match c.as_str() {
            "latency_max_ms" => format!("{c} = MAX(rollup_minute.{c}, excluded.{c})"),
            _ => format!("{c} = rollup_minute.{c} + excluded.{c}"),
        })
        .collect();
    format!(
        "INSERT INTO rollup_minute ({}) VALUES ({}) ON CONFLICT (key_id, minute) DO UPDATE SET {}",
        cols.join(", "),
        placeholders.join(", "),
        updates.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::aggregate::Aggregate;
    use crate::event::AuthEvent;
    use crate::source::FilePosition;
    use crate::store::Checkpoint;

    fn event(ts: i64, key: &'static str, ip: &'static str) -> AuthEvent<'static> {
        let mut e = AuthEvent::new(ts, Cow::Borrowed(key), 200, Outcome::Ok);
        e.source_ip = Some(Cow::Borrowed(ip));
        e.latency_ms = Some(12.0);
        e
    }

    #[test]
    fn commits_add_up_and_keep_the_position() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let pos = |offset| {
            Position::File(FilePosition {
                path: "/x".into(),
                dev: 1,
                inode: 2,
                offset,
            })
        };
        for (i, offset) in [100u64, 200].into_iter().enumerate() {
            let mut agg = Aggregate::default();
            agg.add(&event(60_000 + i as i64, "k1", "10.0.0.1"));
            agg.add(&event(61_000, "k1", "10.0.0.2"));
            agg.add(&event(200_000, "k2", "10.0.0.1"));
            let p = pos(offset);
            store
                .commit(&BatchWrite {
                    aggregate: &agg,
                    events: &[],
                    checkpoint: Some(Checkpoint {
                        source: "file:/x",
                        position: &p,
                    }),
                })
                .unwrap();
        }
        assert_eq!(store.position("file:/x").unwrap(), Some(pos(200)));
        assert_eq!(store.position("file:/y").unwrap(), None);
        assert_eq!(store.totals().unwrap(), (6, 6));

        let usage = store.key_usage(None).unwrap();
        assert_eq!(usage.len(), 2);
        assert_eq!(usage[0].key_id, "k1");
        assert_eq!(usage[0].totals.requests, 4);
        assert_eq!(usage[0].totals.outcomes[Outcome::Ok.index()], 4);
        assert_eq!(usage[0].sources, 2);
        assert_eq!(usage[0].first_seen_ms, 60_000);
        assert_eq!(usage[0].last_seen_ms, 61_000);
        assert_eq!(usage[0].totals.latency_quantile(0.5), Some(11.0));

        let recent = store.key_usage(Some(120_000)).unwrap();
        assert_eq!(recent.len(), 1);
        assert_eq!(recent[0].key_id, "k2");

        let sources = store.key_sources("k1").unwrap();
        assert_eq!(sources.len(), 2);
        let one = sources.iter().find(|(k, _)| k.ip == "10.0.0.1").unwrap();
        assert_eq!(one.1.requests, 2);
        assert_eq!((one.1.first_seen_ms, one.1.last_seen_ms), (60_000, 60_001));
    }

    #[test]
    fn kafka_positions_merge_across_batches() {
        use crate::source::PartitionOffset;
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let po = |partition, offset| PartitionOffset {
            topic: "t".into(),
            partition,
            offset,
        };
        for offsets in [vec![po(0, 10)], vec![po(1, 5), po(2, 7)], vec![po(0, 20)]] {
            let p = Position::Kafka { offsets };
            store
                .commit(&BatchWrite {
                    aggregate: &Aggregate::default(),
                    events: &[],
                    checkpoint: Some(Checkpoint {
                        source: "kafka:g",
                        position: &p,
                    }),
                })
                .unwrap();
        }
        assert_eq!(
            store.position("kafka:g").unwrap(),
            Some(Position::Kafka {
                offsets: vec![po(0, 20), po(1, 5), po(2, 7)]
            })
        );
    }

    #[test]
    fn history_is_read_by_key_and_minute_newest_minutes_first_kept() {
        use crate::store::HistoryStore;
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let mut empty = 0;
        let r = store
            .rollup_history(86_400_000, 100, None, &mut |_, _, _| empty += 1)
            .unwrap();
        assert_eq!((r.rows, r.latest_ms, empty), (0, None, 0));
        let mut agg = Aggregate::default();
        // Minutes 0, 1, 2 for k2, minutes 1 and 2 for k1, one a day earlier for k1.
        let t = 10 * 86_400_000;
        for (ts, key) in [
            (t, "k2"),
            (t + 60_000, "k2"),
            (t + 120_000, "k2"),
            (t + 61_000, "k1"),
            (t + 62_000, "k1"),
            (t + 125_000, "k1"),
            (t - 86_400_000, "k1"),
        ] {
            agg.add(&event(ts, key, "10.0.0.1"));
        }
        store
            .commit(&BatchWrite {
                aggregate: &agg,
                events: &[],
                checkpoint: None,
            })
            .unwrap();
        let mut rows = Vec::new();
        let r = store
            .rollup_history(3_600_000, 100, None, &mut |k, m, r| {
                rows.push((k.to_owned(), (m - t) / 60_000, r.requests, r.latency_count))
            })
            .unwrap();
        assert_eq!(r.latest_ms, Some(t + 120_000));
        assert_eq!(r.since_ms, t + 120_000 - 3_600_000);
        let want = [
            ("k1", 1, 2, 2),
            ("k1", 2, 1, 1),
            ("k2", 0, 1, 1),
            ("k2", 1, 1, 1),
            ("k2", 2, 1, 1),
        ];
        let want: Vec<_> = want
            .iter()
            .map(|(k, m, n, l)| (k.to_string(), *m, *n, *l))
            .collect();
        assert_eq!(rows, want);
        // Four rows allowed: minute 0 (one row) would make five, so it is left out whole.
        let mut rows = Vec::new();
        let r = store
            .rollup_history(3_600_000, 4, None, &mut |k, m, _| {
                rows.push((k.to_owned(), (m - t) / 60_000))
            })
            .unwrap();
        assert_eq!(r.since_ms, t + 60_000);
        assert_eq!(r.rows, 4);
        assert!(rows.iter().all(|(_, m)| *m >= 1), "{rows:?}");
        let mut sources = Vec::new();
        let n = store
            .source_history(10, None, &mut |(k, ip, _, _, first, last)| {
                sources.push((k.to_owned(), ip.to_owned(), first, last))
            })
            .unwrap();
        assert_eq!(n, 2);
        assert_eq!(
            sources,
            [
                (
                    "k1".to_owned(),
                    "10.0.0.1".to_owned(),
                    t - 86_400_000,
                    t + 125_000
                ),
                ("k2".to_owned(), "10.0.0.1".to_owned(), t, t + 120_000),
            ]
        );
    }

    #[test]
    fn reopening_keeps_data_and_refuses_newer_schemas() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = SqliteStore::open(dir.path()).unwrap();
            let mut agg = Aggregate::default();
            agg.add(&event(1, "k", "ip"));
            store
                .commit(&BatchWrite {
                    aggregate: &agg,
                    events: &[],
                    checkpoint: None,
                })
                .unwrap();
        }
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(store.totals().unwrap(), (1, 1));
        store.conn.pragma_update(None, "user_version", 99).unwrap();
        drop(store);
        let err = SqliteStore::open(dir.path()).err().unwrap();
        assert!(
            err.to_string()
                .contains("schema version 99, newer than this keywatch knows"),
            "{err}"
        );
    }

    /// Commits `agg` alone (no raw events, no position), as a batch of rollups.
    fn commit_rollups(store: &mut SqliteStore, agg: &Aggregate) {
        store
            .commit(&BatchWrite {
                aggregate: agg,
                events: &[],
                checkpoint: None,
            })
            .unwrap();
    }

    /// Keys `a` (partition 0), `b` (1), `c` (both), and `d` (1, a day before the rest).
    fn partitioned() -> SqliteStore {
        let mut store = SqliteStore::open_file(Path::new(":memory:")).unwrap();
        let topic: std::sync::Arc<str> = "logs".into();
        let t0 = 10 * 86_400_000;
        let mut agg = Aggregate::default();
        agg.add_from(&event(t0 - 86_400_000, "d", "10.0.0.4"), &topic, 1);
        for (ts, key, part) in [
            (t0, "a", 0),
            (t0 + 60_000, "a", 0),
            (t0, "b", 1),
            (t0, "c", 0),
            (t0 + 120_000, "c", 1),
        ] {
            agg.add_from(&event(ts, key, "10.0.0.1"), &topic, part);
        }
        commit_rollups(&mut store, &agg);
        store
    }

    fn rollups_of(
        store: &mut SqliteStore,
        window_ms: i64,
        parts: Option<&[(String, i32)]>,
    ) -> Vec<(String, i64, u64)> {
        use crate::store::HistoryStore;
        let mut got = Vec::new();
        store
            .rollup_history(window_ms, 1000, parts, &mut |k, m, r| {
                got.push((k.to_owned(), m, r.requests))
            })
            .unwrap();
        got
    }

    #[test]
    fn history_reads_narrow_to_the_keys_of_partitions() {
        use crate::store::HistoryStore;
        let mut store = partitioned();
        let t0 = 10 * 86_400_000;
        let p = |n: i32| ("logs".to_owned(), n);
        let hour = 3_600_000;
        // A key's whole rows, every partition's (SQLite sums a minute over partitions).
        assert_eq!(
            rollups_of(&mut store, hour, Some(&[p(0)])),
            [
                ("a".into(), t0, 1),
                ("a".into(), t0 + 60_000, 1),
                ("c".into(), t0, 1),
                ("c".into(), t0 + 120_000, 1)
            ]
        );
        // `d` last came from partition 1 before the window.
        let keys = |v: Vec<(String, i64, u64)>| {
            let mut k: Vec<String> = v.into_iter().map(|r| r.0).collect();
            k.dedup();
            k
        };
        assert_eq!(
            keys(rollups_of(&mut store, hour, Some(&[p(1)]))),
            ["b", "c"]
        );
        assert_eq!(
            keys(rollups_of(&mut store, 2 * 86_400_000, Some(&[p(1)]))),
            ["b", "c", "d"]
        );
        assert_eq!(
            keys(rollups_of(&mut store, hour, None)),
            ["a", "b", "c"],
            "everything"
        );
        assert!(rollups_of(&mut store, hour, Some(&[])).is_empty());
        assert!(rollups_of(&mut store, hour, Some(&[("other".into(), 0)])).is_empty());

        // The row cut counts the partitions' rows only: 2 rows keep the newest minutes of
        // `a` and `c` (t0 + 1 and + 2 minutes).
        let mut got = Vec::new();
        let read = store
            .rollup_history(hour, 2, Some(&[p(0)]), &mut |k, m, _| {
                got.push((k.to_owned(), m))
            })
            .unwrap();
        assert_eq!(read.since_ms, t0 + 60_000);
        assert_eq!(got, [("a".into(), t0 + 60_000), ("c".into(), t0 + 120_000)]);

        // Sources have no window.
        let mut sources = Vec::new();
        store
            .source_history(1000, Some(&[p(1)]), &mut |(k, ip, ..)| {
                sources.push((k.to_owned(), ip.to_owned()))
            })
            .unwrap();
        sources.sort();
        assert_eq!(
            sources,
            [
                ("b".into(), "10.0.0.1".into()),
                ("c".into(), "10.0.0.1".into()),
                ("d".into(), "10.0.0.4".into())
            ]
        );

        let mut seen = Vec::new();
        let n = store
            .key_partitions(t0 - hour, &[p(0), p(1)], &mut |k, t, part| {
                seen.push((k.to_owned(), t.to_owned(), part))
            })
            .unwrap();
        seen.sort();
        assert_eq!(n, 4);
        assert_eq!(
            seen,
            [
                ("a".into(), "logs".into(), 0),
                ("b".into(), "logs".into(), 1),
                ("c".into(), "logs".into(), 0),
                ("c".into(), "logs".into(), 1)
            ]
        );
    }

    #[test]
    fn a_database_that_knows_no_partition_reads_every_key() {
        let mut store = SqliteStore::open_file(Path::new(":memory:")).unwrap();
        let mut agg = Aggregate::default();
        agg.add(&event(60_000, "k", "ip"));
        commit_rollups(&mut store, &agg);
        let p0 = [("logs".to_owned(), 0)];
        assert_eq!(rollups_of(&mut store, 3_600_000, Some(&p0)).len(), 1);
        // Once it knows some, only theirs.
        assert!(rollups_of(&mut partitioned(), 3_600_000, Some(&[("x".into(), 0)])).is_empty());
    }

    #[test]
    fn files_record_no_partitions() {
        use crate::store::HistoryStore;
        let mut store = SqliteStore::open_file(Path::new(":memory:")).unwrap();
        let mut agg = Aggregate::default();
        agg.add(&event(60_000, "k", "ip"));
        commit_rollups(&mut store, &agg);
        let mut n = 0;
        store
            .key_partitions(0, &[("".into(), 0)], &mut |_, _, _| n += 1)
            .unwrap();
        assert_eq!(n, 0);
        assert_eq!(rollups_of(&mut store, 3_600_000, None).len(), 1);
    }
}
