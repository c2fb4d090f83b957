//! `keywatch run --dry-run`: the notification pipeline runs whole (silence, inhibit, route,
//! dedup, group, render) but nothing is sent and the notification log is left as it was.
//!
//! Contract:
//! - [`DryRunLog`] reads the real log for what was told before (dedup, so the dry run shows
//!   what a real run would *newly* send) and for the silences in force; everything it would
//!   write (waiting findings, queued messages, attempts, "told" marks) goes to a scratch
//!   in-memory log that ends with the run. A later real run therefore still tells
//!   everything the dry run only rendered.
//! - Messages the real log has queued from earlier runs are not sent: they stay queued for
//!   the next real run.
//! - The transports render each message to standard output with its channel and target
//!   instead of sending it ([`super::channel::Transports`] in dry-run mode), and attempts are
//!   counted with outcome `dry_run`.

use super::log::{
    AttemptEnd, MessageFinding, MessageRow, NewMessage, NotifyLog, PendingRow, SilenceRow,
};
use crate::store::{SqliteStore, StoreError};

/// The real notification log, read-only, with a scratch log taking every write.
pub struct DryRunLog<L: NotifyLog> {
    real: L,
    scratch: SqliteStore,
}

impl<L: NotifyLog> DryRunLog<L> {
    pub fn new(real: L) -> Result<DryRunLog<L>, StoreError> {
        Ok(DryRunLog {
            real,
            scratch: SqliteStore::open_file(std::path::Path::new(":memory:"))?,
        })
    }

    /// What the dry run would have queued, for tests and reports.
    pub fn scratch(&self) -> &SqliteStore {
        &self.scratch
    }
}

impl<L: NotifyLog> NotifyLog for DryRunLog<L> {
    fn fact_last(&self, recipient: &str, dedup_key: &str) -> Result<Option<i64>, StoreError> {
        let real = self.real.fact_last(recipient, dedup_key)?;
        let scratch = self.scratch.fact_last(recipient, dedup_key)?;
        Ok(real.max(scratch))
    }

    fn pending_put(&mut self, rows: &[PendingRow]) -> Result<(), StoreError> {
        self.scratch.pending_put(rows)
    }

    fn pending_remove(&mut self, keys: &[(String, String)]) -> Result<(), StoreError> {
        self.scratch.pending_remove(keys)
    }

    fn pending_all(&self) -> Result<Vec<PendingRow>, StoreError> {
        self.scratch.pending_all()
    }

    fn enqueue(
        &mut self,
        messages: &[NewMessage],
        told: &[(String, String)],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.scratch.enqueue(messages, told, now_ms)
    }

    fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<MessageRow>, StoreError> {
        self.scratch.due(now_ms, limit)
    }

    fn next_due_ms(&self) -> Result<Option<i64>, StoreError> {
        self.scratch.next_due_ms()
    }

    fn attempt_start(&mut self, id: &str, now_ms: i64) -> Result<u32, StoreError> {
        self.scratch.attempt_start(id, now_ms)
    }

    fn parts_done(&mut self, id: &str, parts_done: u32) -> Result<(), StoreError> {
        self.scratch.parts_done(id, parts_done)
    }

    fn attempt_end(
        &mut self,
        id: &str,
        attempt: u32,
        now_ms: i64,
        end: &AttemptEnd,
    ) -> Result<(), StoreError> {
        self.scratch.attempt_end(id, attempt, now_ms, end)
    }

    fn recover(&mut self, now_ms: i64) -> Result<Vec<String>, StoreError> {
        self.scratch.recover(now_ms)
    }

    fn message_findings(&self, id: &str) -> Result<Vec<MessageFinding>, StoreError> {
        self.scratch.message_findings(id)
    }

    fn prune_before(&mut self, before_ms: i64) -> Result<usize, StoreError> {
        self.scratch.prune_before(before_ms)
    }

    // The notifier never adds or ends silences (the CLI does, on the real log): these only
    // keep the trait whole.
    fn silence_insert(
        &mut self,
        matcher: &str,
        value: &str,
        created_ms: i64,
        until_ms: i64,
        reason: &str,
    ) -> Result<i64, StoreError> {
        self.scratch
            .silence_insert(matcher, value, created_ms, until_ms, reason)
    }

    /// The real log's silences: `keywatch silence add` during a dry run holds back there too.
    fn silence_rows(&self, now_ms: i64, all: bool) -> Result<Vec<SilenceRow>, StoreError> {
        self.real.silence_rows(now_ms, all)
    }

    fn silence_end(&mut self, id: i64, now_ms: i64) -> Result<bool, StoreError> {
        self.scratch.silence_end(id, now_ms)
    }
}
