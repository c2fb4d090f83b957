//! The dead-letter file: lines that could not be decoded, with the reason, kept aside.
//!
//! One JSON object per line: `{"at", "source", "offset", "reason", "line"}`. The line is
//! redacted first ([`crate::event::Decoder::redact`]): raw key material in a bad line is
//! replaced by its fingerprint, like everywhere else. Records are flushed before the batch
//! they belong to is committed, so a crash can repeat a dead letter but never lose one. The
//! file is rotated to `<name>.1` when it grows past its size limit, so it cannot fill the
//! disk.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// File name inside the state directory.
pub const DEAD_LETTER_FILE: &str = "dead-letter.jsonl";

/// Default size past which the file is rotated.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, Serialize)]
pub struct DeadLetter<'a> {
    /// When keywatch rejected the line (RFC 3339, UTC).
    pub at: String,
    pub source: &'a str,
    /// The Kafka topic and partition the message came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<i32>,
    /// Where the line started in its source (byte offset in a file, offset in a partition).
    pub offset: u64,
    pub reason: String,
    /// The line, redacted.
    pub line: String,
}

/// Where dead letters go: a file, or a Kafka topic.
pub trait DeadLetterSink: Send {
    fn write(&mut self, record: &DeadLetter<'_>) -> io::Result<()>;
    /// Makes what was written durable; called before the batch is committed.
    fn flush(&mut self) -> io::Result<()>;
    /// Where to look, for messages.
    fn describe(&self) -> String;
}

impl DeadLetterSink for DeadLetterFile {
    fn write(&mut self, record: &DeadLetter<'_>) -> io::Result<()> {
        DeadLetterFile::write(self, record)
    }

    fn flush(&mut self) -> io::Result<()> {
        DeadLetterFile::flush(self)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

pub struct DeadLetterFile {
    path: PathBuf,
    out: BufWriter<File>,
    size: u64,
    max_bytes: u64,
}

impl DeadLetterFile {
    pub fn open(path: &Path, max_bytes: u64) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(DeadLetterFile {
            path: path.to_owned(),
            out: BufWriter::new(file),
            size,
            max_bytes,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, record: &DeadLetter<'_>) -> io::Result<()> {
        if self.size >= self.max_bytes {
            self.rotate()?;
        }
        let mut json = serde_json::to_vec(record)?;
        json.push(b'\n');
        self.out.write_all(&json)?;
        self.size += json.len() as u64;
        Ok(())
    }

    /// Makes what was written durable; called before the batch is committed.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_data()
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.flush()?;
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&self.path, old)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.out = BufWriter::new(file);
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_json_lines_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DEAD_LETTER_FILE);
        let mut dl = DeadLetterFile::open(&path, 150).unwrap();
        for i in 0..3 {
            dl.write(&DeadLetter {
                at: "2026-11-26T00:00:00Z".into(),
                source: "file:/x",
                topic: None,
                partition: None,
                offset: i,
                reason: "not valid JSON: expected value at line 1 column 1".into(),
                line: format!("garbage {i}"),
            })
            .unwrap();
        }
        dl.flush().unwrap();
        let current = std::fs::read_to_string(&path).unwrap();
        let rotated = std::fs::read_to_string(dir.path().join("dead-letter.jsonl.1")).unwrap();
        let all: Vec<serde_json::Value> = rotated
            .lines()
            .chain(current.lines())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(all.len(), 3);
        assert_eq!(all[2]["offset"], 2);
        assert_eq!(all[2]["line"], "garbage 2");
        assert_eq!(all[0]["source"], "file:/x");
    }
}
