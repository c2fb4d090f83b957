//! The notification log and silences in the embedded store: the SQLite side of the
//! notifier's port [`NotifyLog`] (whose contract, in `notify::log`, this file keeps: one
//! transaction per enqueue, an attempt started before the request and ended after it,
//! `parts_done` per split message, silences by key or owner), plus the reads behind reports
//! and tests ([`SqliteStore::notify_messages`], [`SqliteStore::notify_attempts`]).
//!
//! A message is `pending` (never tried, or to retry at `next_attempt_ms`), `sending` (an
//! attempt started and has no outcome yet), `sent` or `failed`.
//!
//! Row payloads (`address`, `payload`, `item`) are JSON written and read by the notifier
//! and opaque here: this file knows no channel and no secret shape (the notifier never
//! puts a secret in them; a Slack webhook is stored as the name of its variable or file).

use rusqlite::{params, OptionalExtension};

use super::sqlite::classify;
use super::{SqliteStore, StoreError};
use crate::notify::log::{
    AttemptEnd, AttemptRow, MessageFinding, MessageRow, NewMessage, NotifyLog, PendingRow,
    SilenceRow,
};

/// The schema, appended to the store's migrations.
pub(super) const MIGRATION: &str = "CREATE TABLE notify_messages (
        id TEXT PRIMARY KEY,            -- stable message id, also the idempotency key
        recipient TEXT NOT NULL,        -- owner:acme-billing, team:security
        receiver TEXT NOT NULL,         -- the receiver in routes.toml
        channel TEXT NOT NULL,          -- the channel in routes.toml
        channel_type TEXT NOT NULL,     -- email, telegram, slack, webhook, console
        target TEXT NOT NULL,           -- where it goes, without secrets
        address TEXT NOT NULL,          -- JSON: what the channel needs to reach the target
        group_key TEXT NOT NULL,
        kinds TEXT NOT NULL,            -- finding kinds in the message, comma-separated
        severity TEXT NOT NULL,         -- the highest of its findings
        created_ms INTEGER NOT NULL,
        state TEXT NOT NULL,            -- pending | sending | sent | failed
        attempts INTEGER NOT NULL,
        next_attempt_ms INTEGER NOT NULL,
        parts_done INTEGER NOT NULL,    -- parts of a split message already accepted
        sent_ms INTEGER,
        last_error TEXT,
        payload TEXT NOT NULL           -- JSON: the rendered message, resent as it was
     ) WITHOUT ROWID;
     CREATE INDEX notify_messages_due ON notify_messages (state, next_attempt_ms);
     CREATE INDEX notify_messages_by_time ON notify_messages (created_ms);
     CREATE TABLE notify_message_findings (
        message_id TEXT NOT NULL,
        dedup_key TEXT NOT NULL,
        kind TEXT NOT NULL,
        key_id TEXT NOT NULL,
        owner TEXT,
        PRIMARY KEY (message_id, dedup_key)
     ) WITHOUT ROWID;
     CREATE INDEX notify_message_findings_by_fact ON notify_message_findings (dedup_key);
     CREATE TABLE notify_attempts (
        message_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        started_ms INTEGER NOT NULL,
        finished_ms INTEGER,
        outcome TEXT,                   -- ok | transient | permanent | interrupted; NULL in flight
        detail TEXT,
        PRIMARY KEY (message_id, attempt)
     ) WITHOUT ROWID;
     CREATE TABLE notify_facts (
        recipient TEXT NOT NULL,
        dedup_key TEXT NOT NULL,
        first_ms INTEGER NOT NULL,      -- first queued for this recipient
        last_ms INTEGER NOT NULL,       -- last queued (repeats count from here)
        count INTEGER NOT NULL,
        PRIMARY KEY (recipient, dedup_key)
     ) WITHOUT ROWID;
     CREATE TABLE notify_pending (
        recipient TEXT NOT NULL,
        dedup_key TEXT NOT NULL,
        raised_ms INTEGER NOT NULL,
        item TEXT NOT NULL,             -- JSON of the finding
        PRIMARY KEY (recipient, dedup_key)
     ) WITHOUT ROWID;
     CREATE TABLE silences (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        matcher TEXT NOT NULL,          -- key | owner
        value TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        until_ms INTEGER NOT NULL,
        reason TEXT NOT NULL,
        removed_ms INTEGER
     );";

const MESSAGE_COLUMNS: &str = "id, recipient, receiver, channel, channel_type, target, address,
    group_key, kinds, severity, created_ms, state, attempts, next_attempt_ms, parts_done,
    sent_ms, last_error, payload";

fn message_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MessageRow> {
    Ok(MessageRow {
        id: r.get(0)?,
        recipient: r.get(1)?,
        receiver: r.get(2)?,
        channel: r.get(3)?,
        channel_type: r.get(4)?,
        target: r.get(5)?,
        address: r.get(6)?,
        group_key: r.get(7)?,
        kinds: r.get(8)?,
        severity: r.get(9)?,
        created_ms: r.get(10)?,
        state: r.get(11)?,
        attempts: r.get(12)?,
        next_attempt_ms: r.get(13)?,
        parts_done: r.get(14)?,
        sent_ms: r.get(15)?,
        last_error: r.get(16)?,
        payload: r.get(17)?,
    })
}

fn silence_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SilenceRow> {
    Ok(SilenceRow {
        id: r.get(0)?,
        matcher: r.get(1)?,
        value: r.get(2)?,
        created_ms: r.get(3)?,
        until_ms: r.get(4)?,
        reason: r.get(5)?,
        removed_ms: r.get(6)?,
    })
}

impl NotifyLog for SqliteStore {
    /// When a fact was last queued for a recipient, if ever.
    fn fact_last(&self, recipient: &str, dedup_key: &str) -> Result<Option<i64>, StoreError> {
        self.conn()
            .prepare_cached(
                "SELECT last_ms FROM notify_facts WHERE recipient = ?1 AND dedup_key = ?2",
            )
            .and_then(|mut s| {
                s.query_row(params![recipient, dedup_key], |r| r.get(0))
                    .optional()
            })
            .map_err(classify)
    }

    /// Adds or replaces findings waiting in groups (one transaction).
    fn pending_put(&mut self, rows: &[PendingRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let tx = self.conn_mut().transaction().map_err(classify)?;
        {
            let mut put = tx
                .prepare_cached(
                    "INSERT INTO notify_pending (recipient, dedup_key, raised_ms, item)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (recipient, dedup_key)
                     DO UPDATE SET raised_ms = excluded.raised_ms, item = excluded.item",
                )
                .map_err(classify)?;
            for r in rows {
                put.execute(params![r.recipient, r.dedup_key, r.raised_ms, r.item])
                    .map_err(classify)?;
            }
        }
        tx.commit().map_err(classify)
    }

    /// Removes waiting findings (silenced or inhibited while they waited).
    fn pending_remove(&mut self, keys: &[(String, String)]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let tx = self.conn_mut().transaction().map_err(classify)?;
        {
            let mut del = tx
                .prepare_cached(
                    "DELETE FROM notify_pending WHERE recipient = ?1 AND dedup_key = ?2",
                )
                .map_err(classify)?;
            for (recipient, key) in keys {
                del.execute(params![recipient, key]).map_err(classify)?;
            }
        }
        tx.commit().map_err(classify)
    }

    /// Every finding waiting in a group, oldest first.
    fn pending_all(&self) -> Result<Vec<PendingRow>, StoreError> {
        let mut stmt = self
            .conn()
            .prepare(
                "SELECT recipient, dedup_key, raised_ms, item FROM notify_pending
                 ORDER BY raised_ms, recipient, dedup_key",
            )
            .map_err(classify)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(PendingRow {
                    recipient: r.get(0)?,
                    dedup_key: r.get(1)?,
                    raised_ms: r.get(2)?,
                    item: r.get(3)?,
                })
            })
            .map_err(classify)?;
        rows.collect::<Result<_, _>>().map_err(classify)
    }

    /// Queues the messages of a group flush: inserts them `pending` (due at once), records
    /// each (recipient, fact) as told at `now_ms`, and removes the facts from the waiting
    /// findings; all in one transaction.
    fn enqueue(
        &mut self,
        messages: &[NewMessage],
        told: &[(String, String)],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let tx = self.conn_mut().transaction().map_err(classify)?;
        {
            let mut msg = tx
                .prepare_cached(
                    "INSERT INTO notify_messages (id, recipient, receiver, channel, channel_type,
                        target, address, group_key, kinds, severity, created_ms, state, attempts,
                        next_attempt_ms, parts_done, payload)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 'pending', 0, ?11, 0,
                        ?12)
                     ON CONFLICT (id) DO NOTHING",
                )
                .map_err(classify)?;
            let mut item = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO notify_message_findings
                        (message_id, dedup_key, kind, key_id, owner)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(classify)?;
            for m in messages {
                msg.execute(params![
                    m.id,
                    m.recipient,
                    m.receiver,
                    m.channel,
                    m.channel_type,
                    m.target,
                    m.address,
                    m.group_key,
                    m.kinds,
                    m.severity,
                    m.created_ms,
                    m.payload
                ])
                .map_err(classify)?;
                for f in &m.findings {
                    item.execute(params![m.id, f.dedup_key, f.kind, f.key_id, f.owner])
                        .map_err(classify)?;
                }
            }
            let mut fact = tx
                .prepare_cached(
                    "INSERT INTO notify_facts (recipient, dedup_key, first_ms, last_ms, count)
                     VALUES (?1, ?2, ?3, ?3, 1)
                     ON CONFLICT (recipient, dedup_key)
                     DO UPDATE SET last_ms = MAX(last_ms, excluded.last_ms), count = count + 1",
                )
                .map_err(classify)?;
            let mut unpend = tx
                .prepare_cached(
                    "DELETE FROM notify_pending WHERE recipient = ?1 AND dedup_key = ?2",
                )
                .map_err(classify)?;
            for (recipient, key) in told {
                fact.execute(params![recipient, key, now_ms])
                    .map_err(classify)?;
                unpend.execute(params![recipient, key]).map_err(classify)?;
            }
        }
        tx.commit().map_err(classify)
    }

    /// Messages due for an attempt at `now_ms` (pending, `next_attempt_ms` reached), oldest
    /// first, at most `limit`.
    fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<MessageRow>, StoreError> {
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM notify_messages
             WHERE state = 'pending' AND next_attempt_ms <= ?1
             ORDER BY next_attempt_ms, created_ms, id LIMIT ?2"
        );
        let mut stmt = self.conn().prepare_cached(&sql).map_err(classify)?;
        let rows = stmt
            .query_map(params![now_ms, limit as i64], message_row)
            .map_err(classify)?;
        rows.collect::<Result<_, _>>().map_err(classify)
    }

    /// The earliest `next_attempt_ms` of a pending message.
    fn next_due_ms(&self) -> Result<Option<i64>, StoreError> {
        self.conn()
            .prepare_cached(
                "SELECT MIN(next_attempt_ms) FROM notify_messages WHERE state = 'pending'",
            )
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(classify)
    }

    /// Marks an attempt as started (state `sending`) and returns its number (1, 2, ...).
    fn attempt_start(&mut self, id: &str, now_ms: i64) -> Result<u32, StoreError> {
        let tx = self.conn_mut().transaction().map_err(classify)?;
        let attempt: u32 = tx
            .query_row(
                "UPDATE notify_messages SET state = 'sending', attempts = attempts + 1
                 WHERE id = ?1 RETURNING attempts",
                params![id],
                |r| r.get(0),
            )
            .map_err(classify)?;
        tx.execute(
            "INSERT OR REPLACE INTO notify_attempts (message_id, attempt, started_ms)
             VALUES (?1, ?2, ?3)",
            params![id, attempt, now_ms],
        )
        .map_err(classify)?;
        tx.commit().map_err(classify)?;
        Ok(attempt)
    }

    /// Records that the first `parts_done` parts of a split message were accepted.
    fn parts_done(&mut self, id: &str, parts_done: u32) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE notify_messages SET parts_done = ?2 WHERE id = ?1",
                params![id, parts_done],
            )
            .map_err(classify)?;
        Ok(())
    }

    /// Records how an attempt ended and moves the message on (sent, pending again, failed).
    fn attempt_end(
        &mut self,
        id: &str,
        attempt: u32,
        now_ms: i64,
        end: &AttemptEnd,
    ) -> Result<(), StoreError> {
        let tx = self.conn_mut().transaction().map_err(classify)?;
        let (outcome, detail) = match end {
            AttemptEnd::Ok => ("ok", None),
            AttemptEnd::Retry { detail, .. } => ("transient", Some(detail.as_str())),
            AttemptEnd::Failed {
                transient: true,
                detail,
            } => ("transient", Some(detail.as_str())),
            AttemptEnd::Failed { detail, .. } => ("permanent", Some(detail.as_str())),
        };
        tx.execute(
            "UPDATE notify_attempts SET finished_ms = ?3, outcome = ?4, detail = ?5
             WHERE message_id = ?1 AND attempt = ?2",
            params![id, attempt, now_ms, outcome, detail],
        )
        .map_err(classify)?;
        match end {
            AttemptEnd::Ok => tx.execute(
                "UPDATE notify_messages SET state = 'sent', sent_ms = ?2, last_error = NULL
                 WHERE id = ?1",
                params![id, now_ms],
            ),
            AttemptEnd::Retry {
                next_attempt_ms,
                detail,
            } => tx.execute(
                "UPDATE notify_messages SET state = 'pending', next_attempt_ms = ?2,
                    last_error = ?3
                 WHERE id = ?1",
                params![id, next_attempt_ms, detail],
            ),
            AttemptEnd::Failed { detail, .. } => tx.execute(
                "UPDATE notify_messages SET state = 'failed', last_error = ?2 WHERE id = ?1",
                params![id, detail],
            ),
        }
        .map_err(classify)?;
        tx.commit().map_err(classify)
    }

    /// After a restart: every message left `sending` (an attempt without an outcome) goes
    /// back to `pending`, due at once, and its open attempt is closed as `interrupted` at
    /// `now_ms`.
    /// Returns the ids, oldest first.
    fn recover(&mut self, now_ms: i64) -> Result<Vec<String>, StoreError> {
        let tx = self.conn_mut().transaction().map_err(classify)?;
        let ids: Vec<String> = {
            let mut stmt = tx
                .prepare(
                    "SELECT id FROM notify_messages WHERE state = 'sending'
                     ORDER BY created_ms, id",
                )
                .map_err(classify)?;
            let rows = stmt.query_map([], |r| r.get(0)).map_err(classify)?;
            rows.collect::<Result<_, _>>().map_err(classify)?
        };
        tx.execute(
            "UPDATE notify_attempts SET finished_ms = ?1, outcome = 'interrupted',
                detail = 'keywatch stopped during the attempt; its outcome is unknown'
             WHERE outcome IS NULL",
            params![now_ms],
        )
        .map_err(classify)?;
        // Still due: it was when the attempt started.
        tx.execute(
            "UPDATE notify_messages SET state = 'pending' WHERE state = 'sending'",
            [],
        )
        .map_err(classify)?;
        tx.commit().map_err(classify)?;
        Ok(ids)
    }

    /// The dedup keys a message carries.
    fn message_findings(&self, id: &str) -> Result<Vec<MessageFinding>, StoreError> {
        let mut stmt = self
            .conn()
            .prepare(
                "SELECT dedup_key, kind, key_id, owner FROM notify_message_findings
                 WHERE message_id = ?1 ORDER BY dedup_key",
            )
            .map_err(classify)?;
        let rows = stmt
            .query_map(params![id], |r| {
                Ok(MessageFinding {
                    dedup_key: r.get(0)?,
                    kind: r.get(1)?,
                    key_id: r.get(2)?,
                    owner: r.get(3)?,
                })
            })
            .map_err(classify)?;
        rows.collect::<Result<_, _>>().map_err(classify)
    }

    /// Removes sent and failed messages (and their attempts) created before `before_ms`.
    /// Facts stay: they are what keeps a reminder step from being sent twice.
    fn prune_before(&mut self, before_ms: i64) -> Result<usize, StoreError> {
        let tx = self.conn_mut().transaction().map_err(classify)?;
        let old = "SELECT id FROM notify_messages
                   WHERE created_ms < ?1 AND state IN ('sent', 'failed')";
        tx.execute(
            &format!("DELETE FROM notify_attempts WHERE message_id IN ({old})"),
            params![before_ms],
        )
        .map_err(classify)?;
        tx.execute(
            &format!("DELETE FROM notify_message_findings WHERE message_id IN ({old})"),
            params![before_ms],
        )
        .map_err(classify)?;
        let n = tx
            .execute(
                "DELETE FROM notify_messages
                 WHERE created_ms < ?1 AND state IN ('sent', 'failed')",
                params![before_ms],
            )
            .map_err(classify)?;
        tx.commit().map_err(classify)?;
        Ok(n)
    }

    /// Adds a silence and returns its id.
    fn silence_insert(
        &mut self,
        matcher: &str,
        value: &str,
        created_ms: i64,
        until_ms: i64,
        reason: &str,
    ) -> Result<i64, StoreError> {
        self.conn()
            .execute(
                "INSERT INTO silences (matcher, value, created_ms, until_ms, reason)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![matcher, value, created_ms, until_ms, reason],
            )
            .map_err(classify)?;
        Ok(self.conn().last_insert_rowid())
    }

    /// Silences in force at `now_ms` (all that were ever set with `all`), by id.
    fn silence_rows(&self, now_ms: i64, all: bool) -> Result<Vec<SilenceRow>, StoreError> {
        let mut stmt = self
            .conn()
            .prepare_cached(
                "SELECT id, matcher, value, created_ms, until_ms, reason, removed_ms
                 FROM silences
                 WHERE ?2 OR (removed_ms IS NULL AND until_ms > ?1)
                 ORDER BY id",
            )
            .map_err(classify)?;
        let rows = stmt
            .query_map(params![now_ms, all], silence_row)
            .map_err(classify)?;
        rows.collect::<Result<_, _>>().map_err(classify)
    }

    /// Ends a silence; false when there is no such silence in force.
    fn silence_end(&mut self, id: i64, now_ms: i64) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute(
                "UPDATE silences SET removed_ms = ?2
                 WHERE id = ?1 AND removed_ms IS NULL AND until_ms > ?2",
                params![id, now_ms],
            )
            .map_err(classify)?;
        Ok(n == 1)
    }
}

/// Reads for reports and tests.
impl SqliteStore {
    /// Messages created at or after `since_ms`, oldest first.
    pub fn notify_messages(&self, since_ms: i64) -> Result<Vec<MessageRow>, StoreError> {
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM notify_messages WHERE created_ms >= ?1
             ORDER BY created_ms, id"
        );
        let mut stmt = self.conn().prepare(&sql).map_err(classify)?;
        let rows = stmt
            .query_map(params![since_ms], message_row)
            .map_err(classify)?;
        rows.collect::<Result<_, _>>().map_err(classify)
    }

    /// One message by id.
    pub fn notify_message(&self, id: &str) -> Result<Option<MessageRow>, StoreError> {
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM notify_messages WHERE id = ?1");
        self.conn()
            .query_row(&sql, params![id], message_row)
            .optional()
            .map_err(classify)
    }

    /// Every attempt of a message, in order.
    pub fn notify_attempts(&self, id: &str) -> Result<Vec<AttemptRow>, StoreError> {
        let mut stmt = self
            .conn()
            .prepare(
                "SELECT message_id, attempt, started_ms, finished_ms, outcome, detail
                 FROM notify_attempts WHERE message_id = ?1 ORDER BY attempt",
            )
            .map_err(classify)?;
        let rows = stmt
            .query_map(params![id], |r| {
                Ok(AttemptRow {
                    message_id: r.get(0)?,
                    attempt: r.get(1)?,
                    started_ms: r.get(2)?,
                    finished_ms: r.get(3)?,
                    outcome: r.get(4)?,
                    detail: r.get(5)?,
                })
            })
            .map_err(classify)?;
        rows.collect::<Result<_, _>>().map_err(classify)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: &str, created: i64) -> NewMessage {
        NewMessage {
            id: id.into(),
            recipient: "owner:acme".into(),
            receiver: "owner".into(),
            channel: "hook".into(),
            channel_type: "webhook".into(),
            target: "webhook".into(),
            address: "{}".into(),
            group_key: "g".into(),
            kinds: "revoked_key_used".into(),
            severity: "critical".into(),
            created_ms: created,
            payload: "{}".into(),
            findings: vec![MessageFinding {
                dedup_key: format!("f-{id}"),
                kind: "revoked_key_used".into(),
                key_id: "k".into(),
                owner: Some("acme".into()),
            }],
        }
    }

    #[test]
    fn a_message_moves_through_its_states() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(dir.path()).unwrap();
        s.pending_put(&[PendingRow {
            recipient: "owner:acme".into(),
            dedup_key: "f-m1".into(),
            raised_ms: 5,
            item: "{}".into(),
        }])
        .unwrap();
        assert_eq!(s.pending_all().unwrap().len(), 1);
        s.enqueue(
            &[message("m1", 10)],
            &[("owner:acme".into(), "f-m1".into())],
            10,
        )
        .unwrap();
        assert!(s.pending_all().unwrap().is_empty());
        assert_eq!(s.fact_last("owner:acme", "f-m1").unwrap(), Some(10));
        assert_eq!(s.fact_last("owner:other", "f-m1").unwrap(), None);
        assert_eq!(s.next_due_ms().unwrap(), Some(10));
        assert!(s.due(9, 10).unwrap().is_empty());
        assert_eq!(s.due(10, 10).unwrap()[0].id, "m1");

        let a = s.attempt_start("m1", 11).unwrap();
        assert_eq!(a, 1);
        assert!(s.due(100, 10).unwrap().is_empty(), "in flight");
        s.attempt_end(
            "m1",
            a,
            12,
            &AttemptEnd::Retry {
                next_attempt_ms: 1000,
                detail: "503".into(),
            },
        )
        .unwrap();
        assert_eq!(s.next_due_ms().unwrap(), Some(1000));
        let a = s.attempt_start("m1", 1000).unwrap();
        assert_eq!(a, 2);
        // A crash here: the restart finds the attempt without an outcome.
        assert_eq!(s.recover(2000).unwrap(), vec!["m1".to_owned()]);
        let a = s.attempt_start("m1", 2000).unwrap();
        s.parts_done("m1", 1).unwrap();
        s.attempt_end("m1", a, 2001, &AttemptEnd::Ok).unwrap();
        let m = s.notify_message("m1").unwrap().unwrap();
        assert_eq!(
            (m.state.as_str(), m.attempts, m.parts_done, m.sent_ms),
            ("sent", 3, 1, Some(2001))
        );
        let outcomes: Vec<_> = s
            .notify_attempts("m1")
            .unwrap()
            .into_iter()
            .map(|a| a.outcome.unwrap())
            .collect();
        assert_eq!(outcomes, ["transient", "interrupted", "ok"]);
        // Queuing the same message again changes nothing; telling the fact again moves it.
        s.enqueue(
            &[message("m1", 10)],
            &[("owner:acme".into(), "f-m1".into())],
            3000,
        )
        .unwrap();
        assert_eq!(s.notify_message("m1").unwrap().unwrap().state, "sent");
        assert_eq!(s.fact_last("owner:acme", "f-m1").unwrap(), Some(3000));
        assert_eq!(s.prune_before(11).unwrap(), 1);
        assert!(s.notify_message("m1").unwrap().is_none());
    }

    #[test]
    fn silences_end_by_time_or_removal() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(dir.path()).unwrap();
        let a = s
            .silence_insert("key", "k1", 0, 100, "maintenance")
            .unwrap();
        let b = s
            .silence_insert("owner", "acme", 0, 1000, "holiday")
            .unwrap();
        assert_eq!(s.silence_rows(50, false).unwrap().len(), 2);
        assert_eq!(s.silence_rows(100, false).unwrap().len(), 1, "expired");
        assert!(s.silence_end(b, 200).unwrap());
        assert!(!s.silence_end(b, 201).unwrap(), "already ended");
        assert!(!s.silence_end(a, 201).unwrap(), "already expired");
        assert!(s.silence_rows(300, false).unwrap().is_empty());
        assert_eq!(s.silence_rows(300, true).unwrap().len(), 2);
    }
}
