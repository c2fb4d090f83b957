//! Sources: where gateway log lines come from.
//!
//! Checkpoint contract: a source hands out [`Batch`]es of complete lines together with the
//! [`Position`] just after the batch's last line. The pipeline stores the batch's effect and
//! the position in one store transaction; only then is the batch acknowledged
//! ([`Batch::ack`]). After a crash, the source restarts from the stored position, so every
//! line is counted exactly once. A source never reads ahead by more than its bounded
//! channel holds.

pub mod file;
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

/// Complete lines read from a source, in one buffer.
#[derive(Debug, Default)]
pub struct Batch {
    /// The raw bytes; `lines` index into it. Lines exclude their `\n` (and a trailing `\r`).
    pub buf: Vec<u8>,
    pub lines: Vec<Range<usize>>,
    /// Where each line started in its source, for dead-letter records (same length as
    /// `lines`). For files, the byte offset of the line in the file.
    pub line_offsets: Vec<u64>,
    /// The position just after the last line of this batch.
    pub position: Option<Position>,
}

impl Batch {
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
