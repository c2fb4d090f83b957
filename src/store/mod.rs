//! Storage: the only module that talks to databases.
//!
//! Contract: [`Store::commit`] adds a batch's [`Aggregate`] and records the source position
//! after that batch in one atomic step. Either both are stored or neither is, so a source
//! restarted from [`Store::position`] neither loses nor double-counts an event.

pub mod clickhouse;
pub mod notify_log;
pub mod open;
pub mod sqlite;
pub mod sqlite_offsets;
pub mod views;

use crate::aggregate::{Aggregate, Rollup, SourceKey, SourceStats};
use crate::detect::{Finding, RotationSource};
use crate::event::AuthEvent;
use crate::source::kafka::TopicPartition;
use crate::source::Position;

pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Worth retrying: the database is busy or briefly unavailable.
    #[error("store temporarily unavailable: {0}")]
    Transient(String),
    /// Retrying cannot help (corrupt database, schema from a newer keywatch, ...).
    #[error("store failed: {0}")]
    Fatal(String),
    /// The store refuses this batch's rows for good (a value the server cannot take):
    /// retrying the same batch cannot help, the rest of the store works. The pipeline puts
    /// the batch's events in the dead letter with this reason and commits the batch's
    /// checkpoint without them.
    #[error("store rejected the batch: {0}")]
    Rejected(String),
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient(_))
    }

    pub fn is_rejected(&self) -> bool {
        matches!(self, StoreError::Rejected(_))
    }
}

/// Where a batch came from, committed with the batch.
#[derive(Debug, Clone, Copy)]
pub struct Checkpoint<'a> {
    /// Stable name of the source (`file:/var/log/api.log`).
    pub source: &'a str,
    pub position: &'a Position,
}

/// Where a raw event came from inside its source, so that a store keeping raw events can
/// tell which batch wrote a row (and remove rows of a batch it never committed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// Kafka partition (0 for files and stdin).
    pub partition: i32,
    /// Kafka offset of the message, or byte offset of the line in a file.
    pub offset: i64,
    /// Index of the event within its message (a Kong array holds several).
    pub index: u32,
}

/// A decoded event kept for stores that keep raw events.
#[derive(Debug, Clone)]
pub struct StoredEvent<'a> {
    pub event: AuthEvent<'a>,
    pub origin: Origin,
}

/// Everything one batch writes.
#[derive(Debug, Clone, Copy)]
pub struct BatchWrite<'a, 'e> {
    pub aggregate: &'a Aggregate,
    /// Raw events, only filled when [`Store::keeps_raw_events`] says so.
    pub events: &'a [StoredEvent<'e>],
    pub checkpoint: Option<Checkpoint<'a>>,
}

pub trait Store {
    /// Adds the batch's aggregate (and raw events) and moves the checkpoint's source to its
    /// position, atomically: after a crash, either all of it is visible or none of it is.
    fn commit(&mut self, batch: &BatchWrite<'_, '_>) -> Result<(), StoreError>;

    /// Starts committing a batch: like [`Store::commit`], but the store may still be
    /// writing when it returns, so that the caller prepares the next batch meanwhile. The
    /// batch is committed (and may be acknowledged) only once [`Store::wait_committed`]
    /// returns `Ok`; a start waits for the commit started before it. A store that cannot
    /// write in the background commits here.
    fn commit_started(&mut self, batch: &BatchWrite<'_, '_>) -> Result<(), StoreError> {
        self.commit(batch)
    }

    /// Waits for the commit [`Store::commit_started`] started. After a transient error,
    /// calling again retries it; any other error drops it (the caller stores the batch
    /// again, line by line for [`StoreError::Rejected`]).
    fn wait_committed(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    /// The rotation view and findings table, for stores that have them.
    fn detection(&mut self) -> Option<&mut dyn DetectionStore> {
        None
    }

    /// Stored usage history, for stores that can give it back (the anomaly models' warm-up).
    fn history(&mut self) -> Option<&mut dyn HistoryStore> {
        None
    }

    /// Whether [`BatchWrite::events`] should be filled (it costs a copy of every event).
    fn keeps_raw_events(&self) -> bool {
        false
    }

    /// The position stored for a source by the last successful commit.
    fn position(&self, source: &str) -> Result<Option<Position>, StoreError>;
}

/// What the detectors need from a store: the rotation view, and a findings table that
/// remembers what was already raised.
pub trait DetectionStore: RotationSource {
    /// Stores findings (upsert by dedup key) and returns those not seen before.
    fn record_findings(&mut self, found: &[Finding]) -> Result<Vec<Finding>, StoreError>;
}

/// A stored source of a key as the anomaly models' warm-up reads it:
/// `(key, ip, user agent, endpoint, first_seen_ms, last_seen_ms)`.
pub type SourceHistoryRow<'a> = (&'a str, &'a str, &'a str, &'a str, i64, i64);

/// Stored usage read back at start (and, in a consumer group, when partitions are
/// assigned), so that the anomaly models keep their baselines across a restart. Rows are
/// handed to a callback one at a time: nothing of the size of the history is held in
/// memory.
///
/// `partitions` narrows a read to what came from those Kafka topic partitions (`None`:
/// everything). ClickHouse keeps each batch's rows per partition, so it reads the rows those
/// partitions stored; SQLite sums a key's minute over partitions, so it reads the whole
/// rows of the keys it saw in those partitions since the window's start (table
/// `key_partitions`). Both are the same when messages are keyed by key id.
pub trait HistoryStore {
    /// Per-minute rollups `(key, minute start ms, rollup)` of the last `window_ms` before
    /// the latest stored minute (event time, so that a replay of old logs warms up like a
    /// live daemon), ordered by key then minute. When those minutes hold more than
    /// `max_rows` rows, the oldest minutes are left out: the read starts at
    /// [`HistoryRead::since_ms`].
    fn rollup_history(
        &mut self,
        window_ms: i64,
        max_rows: u64,
        partitions: Option<&[TopicPartition]>,
        f: &mut dyn FnMut(&str, i64, &Rollup),
    ) -> Result<HistoryRead, StoreError>;

    /// Every key's sources, the most recently seen first, at most `max_rows` (one row per
    /// key, IP, user agent and endpoint: gateways are not told apart). Returns the rows read.
    fn source_history(
        &mut self,
        max_rows: u64,
        partitions: Option<&[TopicPartition]>,
        f: &mut dyn FnMut(SourceHistoryRow<'_>),
    ) -> Result<u64, StoreError>;

    /// The keys stored from each of `partitions` since `since_ms` (event time):
    /// `(key, topic, partition)`, at most one row per triple. Returns the rows read.
    fn key_partitions(
        &mut self,
        since_ms: i64,
        partitions: &[TopicPartition],
        f: &mut dyn FnMut(&str, &str, i32),
    ) -> Result<u64, StoreError>;
}

/// What [`HistoryStore::rollup_history`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryRead {
    pub rows: u64,
    /// The first minute read: later than the window's start when the rows would not fit.
    pub since_ms: i64,
    /// The latest stored minute (`None`: nothing stored).
    pub latest_ms: Option<i64>,
}

/// The start of the newest minutes whose rows fit in `max_rows`, from per-minute row counts
/// `(minute ms, rows)` newest first; `since_ms` when they all fit.
pub fn history_cut(since_ms: i64, max_rows: u64, newest_first: Vec<(i64, u64)>) -> i64 {
    let mut total = 0u64;
    let mut cut = since_ms;
    for (minute_ms, rows) in newest_first {
        total = total.saturating_add(rows);
        if total > max_rows {
            // This minute no longer fits: start just after it.
            return cut.max(minute_ms + 60_000);
        }
        cut = minute_ms;
    }
    since_ms
}

/// One key's usage over a time range, for reports.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyUsage {
    pub key_id: String,
    pub hint: Option<String>,
    pub consumer: Option<String>,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    /// The sum of the key's per-minute rollups in the range.
    pub totals: Rollup,
    /// Distinct sources (ip, user agent, endpoint, gateway) the key was seen from.
    pub sources: u64,
}

/// One source of a key's traffic, for reports.
pub type SourceRow = (SourceKey, SourceStats);

/// What the terminal reports read, from either store.
pub trait UsageReport {
    fn key_usage(&self, since_ms: Option<i64>) -> Result<Vec<KeyUsage>, StoreError>;
    fn key_sources(&self, key_id: &str) -> Result<Vec<SourceRow>, StoreError>;
    fn latest_event_ms(&self) -> Result<Option<i64>, StoreError>;
}

macro_rules! usage_report {
    ($t:ty) => {
        impl UsageReport for $t {
            fn key_usage(&self, since_ms: Option<i64>) -> Result<Vec<KeyUsage>, StoreError> {
                <$t>::key_usage(self, since_ms)
            }
            fn key_sources(&self, key_id: &str) -> Result<Vec<SourceRow>, StoreError> {
                <$t>::key_sources(self, key_id)
            }
            fn latest_event_ms(&self) -> Result<Option<i64>, StoreError> {
                <$t>::latest_event_ms(self)
            }
        }
    };
}
usage_report!(SqliteStore);
usage_report!(clickhouse::ClickHouseStore);
