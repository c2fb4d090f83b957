//! Storage: the only module that talks to databases.
//!
//! Contract: [`Store::commit`] adds a batch's [`Aggregate`] and records the source position
//! after that batch in one atomic step. Either both are stored or neither is, so a source
//! restarted from [`Store::position`] neither loses nor double-counts an event.

pub mod sqlite;

use crate::aggregate::{Aggregate, Rollup, SourceKey, SourceStats};
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
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient(_))
    }
}

/// Where a batch came from, committed with the batch.
#[derive(Debug, Clone, Copy)]
pub struct Checkpoint<'a> {
    /// Stable name of the source (`file:/var/log/api.log`).
    pub source: &'a str,
    pub position: &'a Position,
}

pub trait Store {
    /// Adds `agg` and moves `checkpoint`'s source to its position, atomically.
    fn commit(&mut self, agg: &Aggregate, checkpoint: Option<Checkpoint<'_>>)
        -> Result<(), StoreError>;

    /// The position stored for a source by the last successful commit.
    fn position(&self, source: &str) -> Result<Option<Position>, StoreError>;
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
