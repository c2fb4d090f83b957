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
    /// Where `buf` goes back when the batch is dropped (a batch from [`BufferPool::batch`]).
    pub pool: Option<BufferPool>,
}

impl Drop for Batch {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.put(std::mem::take(&mut self.buf));
        }
    }
}

/// Line buffers of the batches finished with, handed back to the reader that fills new
/// ones.
///
/// A backlog is read in batches of up to `batch_max_bytes` (64 MiB with ClickHouse); a
/// fresh buffer for each is a fresh mapping from the allocator whose every page faults on
/// first write: 1 GB of lines made 280,000 page faults, most of the reader thread's system
/// time (BENCHMARKS.md, issue 19). Reused buffers are already mapped. The pool keeps at
/// most [`BufferPool::KEEP`] buffers, and not one that its last batch filled to less than a
/// quarter (live traffic, cut by `batch_max_wait`), so that the memory a backlog took goes
/// back once live batches have passed through. Memory stays within the documented bound:
/// a pooled buffer stands for a batch that no longer exists.
#[derive(Debug, Clone, Default)]
pub struct BufferPool(std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl BufferPool {
    /// Buffers kept at most: enough for the batches in flight with the default channel
    /// (up to `channel_capacity` + 2 of them). The pool never holds more buffers than
    /// there were batches at once: a new batch takes a kept buffer before it would
    /// allocate one.
    pub const KEEP: usize = 8;

    /// An empty batch whose line buffer comes from (and goes back to) the pool.
    pub fn batch(&self) -> Batch {
        let buf = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default();
        let mut batch = Batch::default();
        batch.buf = buf;
        batch.pool = Some(self.clone());
        batch
    }

    fn put(&self, mut buf: Vec<u8>) {
        if buf.len() < buf.capacity() / 4 {
            return;
        }
        buf.clear();
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() < Self::KEEP {
            kept.push(buf);
        }
    }

    /// Buffers kept now.
    pub fn kept(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
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

/// Counts batches handed to the pipeline and not yet finished with. Each has a sequence
/// number, so that a rebalance can wait for the batches handed out before a moment without
/// waiting for those handed out after it (see [`InFlight::drained_through`]).
#[derive(Debug, Default)]
pub struct InFlight {
    state: std::sync::Mutex<Flights>,
    idle: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct Flights {
    /// The sequence number of the last guard handed out.
    issued: u64,
    outstanding: std::collections::BTreeSet<u64>,
}

impl InFlight {
    fn state(&self) -> std::sync::MutexGuard<'_, Flights> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn guard(self: &std::sync::Arc<Self>) -> InFlightGuard {
        let mut state = self.state();
        state.issued += 1;
        let seq = state.issued;
        state.outstanding.insert(seq);
        InFlightGuard(self.clone(), seq)
    }

    pub fn count(&self) -> usize {
        self.state().outstanding.len()
    }

    /// The sequence number of the last batch handed out (0 before the first).
    pub fn issued(&self) -> u64 {
        self.state().issued
    }

    /// True once every batch up to sequence number `seq` is finished with.
    pub fn drained_through(&self, seq: u64) -> bool {
        self.state()
            .outstanding
            .first()
            .is_none_or(|first| *first > seq)
    }

    /// Waits until no batch is in flight; false on timeout.
    pub fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let state = self.state();
        let (state, _) = self
            .idle
            .wait_timeout_while(state, timeout, |s| !s.outstanding.is_empty())
            .unwrap_or_else(|e| e.into_inner());
        state.outstanding.is_empty()
    }
}

#[derive(Debug)]
pub struct InFlightGuard(std::sync::Arc<InFlight>, u64);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.outstanding.remove(&self.1);
        if state.outstanding.is_empty() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_finished_batch_gives_its_buffer_back_to_the_next_one() {
        let pool = BufferPool::default();
        let mut first = pool.batch();
        first.push_line(&[b'x'; 1000], 0);
        let (ptr, cap) = (first.buf.as_ptr(), first.buf.capacity());
        drop(first);
        assert_eq!(pool.kept(), 1);
        let second = pool.batch();
        assert!(second.is_empty() && second.buf.is_empty());
        assert_eq!((second.buf.as_ptr(), second.buf.capacity()), (ptr, cap));
        assert_eq!(pool.kept(), 0);

        // A buffer its batch filled to less than a quarter (live traffic) is let go, so the
        // memory of a backlog is returned; the pool never keeps more than KEEP.
        let mut small = pool.batch();
        small.buf.reserve(4096);
        small.push_line(b"short", 0);
        drop(small);
        assert_eq!(pool.kept(), 0);
        let full: Vec<Batch> = (0..BufferPool::KEEP + 3)
            .map(|_| {
                let mut b = pool.batch();
                b.push_line(b"line", 0);
                b
            })
            .collect();
        drop(full);
        assert_eq!(pool.kept(), BufferPool::KEEP);
        // A batch made without the pool keeps its buffer to itself.
        drop(Batch::default());
        assert_eq!(pool.kept(), BufferPool::KEEP);
    }

    #[test]
    fn a_revocation_waits_for_the_batches_handed_out_before_it_not_after() {
        let flights = Arc::new(InFlight::default());
        assert!(flights.drained_through(flights.issued()));
        let first = flights.guard();
        let second = flights.guard();
        let mark = flights.issued();
        let later = flights.guard();
        assert!(!flights.drained_through(mark));
        drop(second);
        assert!(!flights.drained_through(mark));
        drop(first);
        assert!(flights.drained_through(mark));
        assert_eq!(flights.count(), 1);
        assert!(!flights.wait_idle(Duration::from_millis(10)));
        drop(later);
        assert!(flights.wait_idle(Duration::ZERO));
    }
}
