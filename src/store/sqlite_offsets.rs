//! Kafka offsets kept in the embedded store, read back when partitions are assigned.

use std::collections::HashMap;
use std::path::PathBuf;

use super::{SqliteStore, Store, StoreError};
use crate::source::kafka::{OffsetStore, TopicPartition};
use crate::source::Position;

/// Reads committed offsets through its own read-only connection (SQLite in WAL mode lets it
/// read while the pipeline writes).
pub struct SqliteOffsets {
    pub state_dir: PathBuf,
}

impl OffsetStore for SqliteOffsets {
    fn recover(
        &self,
        source: &str,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, i64>, StoreError> {
        let store = SqliteStore::open_read_only(&self.state_dir)?;
        let mut found = HashMap::new();
        if let Some(Position::Kafka { offsets }) = store.position(source)? {
            for o in offsets {
                let tp = (o.topic, o.partition);
                if partitions.contains(&tp) {
                    found.insert(tp, o.offset);
                }
            }
        }
        Ok(found)
    }
}
