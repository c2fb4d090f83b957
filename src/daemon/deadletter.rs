//! The dead-letter file: lines that could not be decoded, with the reason, kept aside.
//!
//! One JSON object per line: `{"at", "source", "offset", "reason", "line"}`. The line is
//! redacted first ([`crate::event::Decoder::redact`]): raw key material in a bad line is
//! replaced by its fingerprint, like everywhere else. Records are flushed before the batch
//! they belong to is committed, so a crash can repeat a dead letter but never lose one.
//!
//! On disk ([`crate::config::DeadLetterConfig`], `[dead_letter]` in the config): the file
//! is rotated when it has reached `max_bytes` (`<name>` → `<name>.1` → … →
//! `<name>.<keep_files>`, `.1` the newest), so at most `keep_files + 1` files of about
//! `max_bytes` each are kept and the disk cannot fill. The oldest file is deleted when one
//! more is rotated (with `keep_files = 0` the current file is); the dead letters it held are
//! counted in `keywatch_dead_letters_dropped_total{file}`, so what was lost is known. Every
//! dead letter is also counted when written (`keywatch_events_rejected_total`).

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// File name inside the state directory.
pub const DEAD_LETTER_FILE: &str = "dead-letter.jsonl";

pub use crate::config::DeadLetterConfig;

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
    keep: DeadLetterConfig,
    /// The file name, the metric's label.
    name: String,
    /// Dead letters deleted from disk by rotation since this file was opened.
    dropped: u64,
}

impl DeadLetterFile {
    pub fn open(path: &Path, keep: DeadLetterConfig) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(DeadLetterFile {
            path: path.to_owned(),
            out: BufWriter::new(file),
            size,
            keep,
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            dropped: 0,
        })
    }

    /// Dead letters deleted from disk by rotation since [`Self::open`] (also counted in
    /// `keywatch_dead_letters_dropped_total`).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The `n`th rotated file (`<name>.n`); the current one for 0.
    pub fn rotated(path: &Path, n: u32) -> PathBuf {
        if n == 0 {
            return path.to_owned();
        }
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, record: &DeadLetter<'_>) -> io::Result<()> {
        if self.size >= self.keep.max_bytes {
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

    /// Shifts every file one up and starts a new current file; the file pushed past
    /// `keep_files` is deleted and its dead letters counted.
    fn rotate(&mut self) -> io::Result<()> {
        self.flush()?;
        let n = self.keep.keep_files;
        let oldest = Self::rotated(&self.path, n);
        match count_lines(&oldest) {
            Ok(dropped) => {
                metrics::counter!("keywatch_dead_letters_dropped_total", "file" => self.name.clone())
                    .increment(dropped);
                self.dropped += dropped;
                std::fs::remove_file(&oldest)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        for i in (0..n).rev() {
            let from = Self::rotated(&self.path, i);
            match std::fs::rename(&from, Self::rotated(&self.path, i + 1)) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                r => r?,
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.out = BufWriter::new(file);
        self.size = 0;
        Ok(())
    }
}

/// Dead letters (lines) in a file, read in chunks: a rotated file is `max_bytes` at most,
/// read once when it is deleted.
fn count_lines(path: &Path) -> io::Result<u64> {
    use std::io::Read;
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut lines = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(lines);
        }
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_json_lines_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DEAD_LETTER_FILE);
        let keep = DeadLetterConfig {
            max_bytes: 150,
            keep_files: 1,
        };
        let mut dl = DeadLetterFile::open(&path, keep).unwrap();
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

    #[test]
    fn rotates_through_keep_files_and_counts_what_it_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DEAD_LETTER_FILE);
        let keep = DeadLetterConfig {
            max_bytes: 1000,
            keep_files: 3,
        };
        let record = |i: u64| DeadLetter {
            at: "2026-11-26T00:00:00Z".into(),
            source: "file:/x",
            topic: None,
            partition: None,
            offset: i,
            reason: "not valid JSON".into(),
            line: format!("garbage {i:04}"),
        };
        let mut dl = DeadLetterFile::open(&path, keep).unwrap();
        for i in 0..200 {
            dl.write(&record(i)).unwrap();
        }
        dl.flush().unwrap();
        let mut kept = Vec::new();
        for n in (0..=3).rev() {
            let p = DeadLetterFile::rotated(&path, n);
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(text.len() as u64 <= keep.max_bytes + 200, "{}", p.display());
            for l in text.lines() {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                kept.push(v["offset"].as_u64().unwrap());
            }
        }
        assert!(!DeadLetterFile::rotated(&path, 4).exists());
        // The newest are kept, in order, and what is gone was counted.
        let first = kept[0];
        assert_eq!(kept, (first..200).collect::<Vec<_>>());
        assert_eq!(dl.dropped(), first);
        assert!(first > 0);

        // Reopened (a restart): rotation goes on from what is on disk, counting it too.
        drop(dl);
        let mut dl = DeadLetterFile::open(&path, keep).unwrap();
        for i in 200..400 {
            dl.write(&record(i)).unwrap();
        }
        dl.flush().unwrap();
        let oldest = std::fs::read_to_string(DeadLetterFile::rotated(&path, 3)).unwrap();
        let v: serde_json::Value = serde_json::from_str(oldest.lines().next().unwrap()).unwrap();
        assert_eq!(dl.dropped(), v["offset"].as_u64().unwrap() - first);
    }

    #[test]
    fn keep_files_zero_keeps_the_current_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DEAD_LETTER_FILE);
        let keep = DeadLetterConfig {
            max_bytes: 300,
            keep_files: 0,
        };
        let mut dl = DeadLetterFile::open(&path, keep).unwrap();
        for i in 0..10 {
            dl.write(&DeadLetter {
                at: "2026-11-26T00:00:00Z".into(),
                source: "file:/x",
                topic: None,
                partition: None,
                offset: i,
                reason: "r".into(),
                line: "x".into(),
            })
            .unwrap();
        }
        dl.flush().unwrap();
        let lines = std::fs::read_to_string(&path).unwrap().lines().count() as u64;
        assert!(!DeadLetterFile::rotated(&path, 1).exists());
        assert_eq!(lines + dl.dropped(), 10);
    }
}
