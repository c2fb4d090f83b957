//! Sources: where gateway log lines come from.
//!
//! Checkpoint contract: a source hands out [`Batch`]es of complete lines together with the
//! [`Position`] just after the batch's last line. The pipeline stores the batch's effect and
//! the position in one store transaction; only then is the batch acknowledged
//! ([`Batch::on_commit`]). After a crash, the source restarts from the stored position, so every
//! line is counted exactly once. A source never reads ahead by more than its bounded
//! channel holds.

pub mod file;
pub mod kafka;
pub mod lifecycle;
pub mod stdin;

use std::ops::Range;

use serde::{Deserialize, Serialize};

pub use file::{FileFollower, FilePosition, FollowOptions};

/// Where a source stands, as stored with the data it produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Position {
    File(FilePosition),
    /// Bytes read from standard input; stdin cannot be resumed, this is informational.
    Stdin {
        offset: u64,
    },
    /// Per partition, the offset of the next message to read (Kafka's convention).
    Kafka {
        offsets: Vec<PartitionOffset>,
    },
}

/// The next offset to read in one topic partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PartitionOffset {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Complete lines (or Kafka messages) read from a source, in one buffer.
#[derive(Default)]
pub struct Batch {
    /// The raw bytes; `lines` index into it. Lines exclude their `\n` (and a trailing `\r`).
    pub buf: Vec<u8>,
    pub lines: Vec<Range<usize>>,
    /// Where each line started in its source (same length as `lines`): the byte offset in a
    /// file, the message offset in a Kafka partition.
    pub line_offsets: Vec<u64>,
    /// The Kafka partition of each line; empty for files and stdin (partition 0).
    pub partitions: Vec<i32>,
    /// The Kafka topic of each line; empty for files and stdin.
    pub topics: Vec<std::sync::Arc<str>>,
    /// The position just after the last line of this batch.
    pub position: Option<Position>,
    /// Run once the store has committed the batch (Kafka: store the offsets for the next
    /// consumer commit). Never run for a batch that was not committed.
    pub on_commit: Option<Box<dyn FnOnce() + Send>>,
    /// Held while the batch is in flight; dropping the batch (committed or not) releases it,
    /// which is how a Kafka rebalance knows that nothing it gives away is still being
    /// written.
    pub in_flight: Option<InFlightGuard>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("lines", &self.lines.len())
            .field("bytes", &self.buf.len())
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

/// Counts batches handed to the pipeline and not yet finished with.
#[derive(Debug, Default)]
pub struct InFlight {
    count: std::sync::Mutex<usize>,
    idle: std::sync::Condvar,
}

impl InFlight {
    pub fn guard(self: &std::sync::Arc<Self>) -> InFlightGuard {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        InFlightGuard(self.clone())
    }

    pub fn count(&self) -> usize {
        *self.count.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until no batch is in flight; false on timeout.
    pub fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        let (count, _) = self
            .idle
            .wait_timeout_while(count, timeout, |c| *c > 0)
            .unwrap_or_else(|e| e.into_inner());
        *count == 0
    }
}

#[derive(Debug)]
pub struct InFlightGuard(std::sync::Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut count = self.0.count.lock().unwrap_or_else(|e| e.into_inner());
        *count = count.saturating_sub(1);
        if *count == 0 {
            self.0.idle.notify_all();
        }
    }
}

impl Batch {
    /// The partition of line `i` (0 outside Kafka).
    pub fn partition(&self, i: usize) -> i32 {
        self.partitions.get(i).copied().unwrap_or(0)
    }

    pub fn line(&self, i: usize) -> &[u8] {
        &self.buf[self.lines[i].clone()]
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Appends one line (without its terminator).
    pub fn push_line(&mut self, line: &[u8], offset: u64) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let start = self.buf.len();
        self.buf.extend_from_slice(line);
        self.lines.push(start..self.buf.len());
        self.line_offsets.push(offset);
    }
}
