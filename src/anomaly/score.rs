//! `keywatch score`: a CSV series in, the same rows with an anomaly score out.
//!
//! Input: a header `timestamp,value` (case and surrounding spaces ignored, a UTF-8 BOM
//! allowed), then one row per point. Timestamps in any form [`parse_timestamp`] reads
//! (`2014-04-10 07:15:00`, RFC 3339, epoch seconds or milliseconds); values are finite
//! numbers. Output: `timestamp,value,anomaly_score`, every input row in input order (so
//! duplicates and out-of-order rows stay as they are), the timestamp and value as written
//! in the input, the score in [0, 1] with 6 decimals. Scores come from one
//! [`SeriesDetector`] with the default parameters, fed the rows in order: each score uses
//! that row and the rows before it only.
//!
//! A bad header, a row without two fields, an unreadable timestamp or value is an error
//! naming the line; nothing after it is written.

use std::io::{Read, Write};

use super::series::SeriesDetector;
use crate::event::parse_timestamp;

/// Why a series could not be scored.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error("line 1: expected the header `timestamp,value`, found `{0}`")]
    Header(String),
    #[error("the input is empty: expected the header `timestamp,value`")]
    Empty,
    #[error("line {line}: expected 2 fields (timestamp,value), found {found}")]
    Fields { line: u64, found: usize },
    #[error("line {line}: cannot read the timestamp `{value}` (expected e.g. `2014-04-10 07:15:00` or RFC 3339)")]
    Timestamp { line: u64, value: String },
    #[error("line {line}: cannot read the value `{value}` as a finite number")]
    Value { line: u64, value: String },
    #[error("line {line}: {message}")]
    Csv { line: u64, message: String },
    #[error("cannot write the output: {0}")]
    Write(#[from] std::io::Error),
}

/// What a run scored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreSummary {
    pub rows: u64,
    /// The inferred sampling interval, when there were enough rows to infer one.
    pub interval_ms: Option<i64>,
    /// Rows that scored 0.5 or more.
    pub flagged: u64,
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Scores the CSV series in `input` and writes it, with a score per row, to `output`.
pub fn score_csv(input: impl Read, output: impl Write) -> Result<ScoreSummary, ScoreError> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .buffer_capacity(1 << 16)
        .from_reader(input);
    let mut out = std::io::BufWriter::with_capacity(1 << 16, output);
    let mut rec = csv::ByteRecord::new();
    let csv_err = |e: csv::Error| ScoreError::Csv {
        line: e.position().map_or(0, |p| p.line()),
        message: e.to_string(),
    };

    if !rdr.read_byte_record(&mut rec).map_err(csv_err)? {
        return Err(ScoreError::Empty);
    }
    let head: Vec<String> = rec
        .iter()
        .map(|f| {
            let f = f.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(f);
            lossy(f).trim().to_ascii_lowercase()
        })
        .collect();
    if head.len() != 2 || head[0] != "timestamp" || head[1] != "value" {
        return Err(ScoreError::Header(
            lossy(rec.as_slice()).replace('\u{0}', ""),
        ));
    }
    out.write_all(b"timestamp,value,anomaly_score\n")?;

    let mut det = SeriesDetector::default();
    let mut summary = ScoreSummary {
        rows: 0,
        interval_ms: None,
        flagged: 0,
    };
    while rdr.read_byte_record(&mut rec).map_err(csv_err)? {
        let line = rec.position().map_or(0, |p| p.line());
        if rec.len() != 2 {
            if rec.len() == 1 && rec[0].is_empty() {
                continue;
            }
            return Err(ScoreError::Fields {
                line,
                found: rec.len(),
            });
        }
        let (ts, val) = (&rec[0], &rec[1]);
        let t_ms = std::str::from_utf8(ts)
            .ok()
            .and_then(parse_timestamp)
            .ok_or_else(|| ScoreError::Timestamp {
                line,
                value: lossy(ts),
            })?;
        let x = std::str::from_utf8(val)
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite())
            .ok_or_else(|| ScoreError::Value {
                line,
                value: lossy(val),
            })?;
        let score = det.update(t_ms, x).score.clamp(0.0, 1.0);
        summary.rows += 1;
        summary.flagged += u64::from(score >= 0.5);
        if needs_quotes(ts) || needs_quotes(val) {
            // Rare: a field that needs quoting again.
            let mut wtr = csv::Writer::from_writer(Vec::with_capacity(64));
            wtr.write_record([ts, val, &format_score(score)])
                .map_err(|e| ScoreError::Write(std::io::Error::other(e)))?;
            let bytes = wtr
                .into_inner()
                .map_err(|e| ScoreError::Write(std::io::Error::other(e.to_string())))?;
            out.write_all(&bytes)?;
        } else {
            out.write_all(ts)?;
            out.write_all(b",")?;
            out.write_all(val)?;
            out.write_all(b",")?;
            out.write_all(&format_score(score))?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()?;
    summary.interval_ms = det.interval_ms();
    Ok(summary)
}

fn needs_quotes(f: &[u8]) -> bool {
    f.iter().any(|b| matches!(b, b',' | b'"' | b'\n' | b'\r'))
}

/// `0.123456`: 6 decimals, without the float formatting machinery.
fn format_score(s: f64) -> [u8; 8] {
    let micro = (s.clamp(0.0, 1.0) * 1e6).round() as u32;
    if micro >= 1_000_000 {
        return *b"1.000000";
    }
    let mut b = *b"0.000000";
    let mut v = micro;
    for i in (2..8).rev() {
        b[i] = b'0' + (v % 10) as u8;
        v /= 10;
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_format_with_six_decimals() {
        assert_eq!(&format_score(0.0), b"0.000000");
        assert_eq!(&format_score(0.1234567), b"0.123457");
        assert_eq!(&format_score(1.0), b"1.000000");
        assert_eq!(&format_score(0.9999999), b"1.000000");
    }
}
