//! `keywatch backtest`: replays a log (or a ClickHouse time range) through the daemon's own
//! [`Pipeline`], with event time as the clock and a scratch store.
//!
//! Contract: the same per-batch order as the daemon (decode, stream detectors, anomaly
//! models, findings stored, commit), cut at every evaluation tick (multiples of `--every`)
//! so that each evaluation sees exactly the events before its clock; a last evaluation runs
//! at the last event's time. Findings go through the store's findings table, so each fact is
//! reported once, when it is first raised, as the notifier would have been told it. Lines
//! that do not decode are skipped and counted. Lifecycle events (`--lifecycle`, one JSON
//! event per line, the lifecycle topic's format) apply at their own time, in event time
//! order with the traffic.
//!
//! The scratch store is SQLite in memory: a backtest never touches the daemon's state.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::findings::FindingSink;
use super::lifecycle::{load_rules, RegistryFeed, TimedLifecycle};
use super::pipeline::{LineStage, Parts, Pipeline, RunSummary};
use super::schedule::{Clock, Ticks};
use crate::config::Config;
use crate::detect::Policy;
use crate::event::{AuthEvent, Decoder};
use crate::registry::{LifecycleEvent, Registry};
use crate::source::Batch;
use crate::store::SqliteStore;

/// Lines (or events) handed to the pipeline at a time.
const CHUNK: usize = 4096;

/// A pipeline over a scratch in-memory store with event time as the clock, evaluating at
/// `ticks`; findings are only stored (no notifier).
pub fn replay_pipeline(
    registry: Arc<Registry>,
    policy: Policy,
    ticks: Ticks,
) -> anyhow::Result<Pipeline> {
    let feed = RegistryFeed::new(
        Some(crate::registry::RegistryWatcher::fixed((*registry).clone())),
        Duration::MAX,
    );
    Pipeline::new(Parts {
        store: Box::new(SqliteStore::open_file(Path::new(":memory:"))?),
        registry: feed,
        policy,
        clock: Clock::Event(ticks),
        findings: FindingSink::new(None),
        source_id: "backtest".into(),
    })
}

/// The pipeline `keywatch backtest` runs for `config`: its registry and policy, ticks every
/// `every`, and the lifecycle events of `lifecycle` at their times.
pub fn pipeline_for(
    config: &Config,
    every: Duration,
    lifecycle: Option<&Path>,
) -> anyhow::Result<Pipeline> {
    let (watcher, policy) = load_rules(config)?;
    let every_ms = i64::try_from(every.as_millis()).unwrap_or(i64::MAX);
    let mut pipeline = Pipeline::new(Parts {
        store: Box::new(SqliteStore::open_file(Path::new(":memory:"))?),
        registry: RegistryFeed::new(watcher, Duration::MAX),
        policy,
        clock: Clock::Event(Ticks::Every(every_ms)),
        findings: FindingSink::new(None),
        source_id: "backtest".into(),
    })?;
    if let Some(path) = lifecycle {
        let events = read_lifecycle(path, pipeline.registry())?;
        pipeline.apply_at_their_time(events);
    }
    Ok(pipeline)
}

/// Lifecycle events from a file, one JSON object per line, each with the time it applies
/// from ([`LifecycleEvent::effective_ms`]: its `started_at`, `revoked_at`, `expired_at`,
/// `deprecated_at` or `created_at`; from the start without one). Times without an offset
/// are in the key owner's time zone.
pub fn read_lifecycle(path: &Path, registry: &Registry) -> anyhow::Result<TimedLifecycle> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--lifecycle: cannot read {}", path.display()))?;
    let mut events = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |e: String| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1);
        let ev = LifecycleEvent::from_json(line.as_bytes()).map_err(at)?;
        // An event without a time of its own applies from the start.
        let ms = ev
            .effective_ms(registry)
            .map_err(|e| at(format!("time: {e}")))?
            .unwrap_or(i64::MIN);
        events.push((ms, ev));
    }
    Ok(TimedLifecycle::new(events))
}

/// Replays `lines`: decodes them (lines that do not decode are skipped and counted) and runs
/// them through `pipeline`. Returns what the run did, its findings in the order raised.
pub fn backtest(
    lines: impl Iterator<Item = Vec<u8>>,
    decoder: Decoder,
    pipeline: Pipeline,
) -> anyhow::Result<RunSummary> {
    replay(
        lines.map(|l| {
            let consumed = l.len() as u64 + 1;
            Ok(Line {
                bytes: l,
                consumed,
                too_long: None,
            })
        }),
        decoder,
        pipeline,
        |_, _| {},
    )
}

/// [`backtest`] of a log read from `reader`, a line at most `max_line_bytes` long (the
/// daemon's `input.max_line_bytes`): a longer one is never held whole, but skipped up to
/// its newline and replaced by the marker the decoder dead-letters with its size
/// ([`BoundedLines`]). `seen` is told of every line (with its offset) as it is read.
pub fn backtest_reader(
    reader: impl std::io::BufRead,
    max_line_bytes: usize,
    decoder: Decoder,
    pipeline: Pipeline,
    seen: impl FnMut(&Line, u64),
) -> anyhow::Result<RunSummary> {
    replay(
        BoundedLines::new(reader, max_line_bytes),
        decoder,
        pipeline,
        seen,
    )
}

fn replay(
    lines: impl Iterator<Item = std::io::Result<Line>>,
    decoder: Decoder,
    mut pipeline: Pipeline,
    mut seen: impl FnMut(&Line, u64),
) -> anyhow::Result<RunSummary> {
    let mut stage = LineStage::new(
        decoder,
        None,
        "backtest".into(),
        crate::config::default_decode_threads(),
    );
    let mut batch = Batch::default();
    let mut offset = 0u64;
    for line in lines {
        let line = line.with_context(|| format!("cannot read the log at byte {offset}"))?;
        seen(&line, offset);
        batch.push_line(&line.bytes, offset);
        offset += line.consumed;
        if batch.len() >= CHUNK {
            pipeline.process_batch(&mut stage, std::mem::take(&mut batch))?;
        }
    }
    if !batch.is_empty() {
        pipeline.process_batch(&mut stage, batch)?;
    }
    let summary = pipeline.finish()?;
    if summary.dead_letters > 0 {
        tracing::warn!(
            rejected = summary.dead_letters,
            events = summary.events,
            "backtest skipped lines that do not decode"
        );
    }
    Ok(summary)
}

/// A line of a log as [`BoundedLines`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The line without its `\n`, or for an over-long line the marker
    /// ([`crate::event::too_long_marker`]) that the decoder refuses as `line too long: N
    /// bytes (limit M)`.
    pub bytes: Vec<u8>,
    /// Bytes of the log it took, its `\n` included.
    pub consumed: u64,
    /// An over-long line's length (without its `\n`).
    pub too_long: Option<u64>,
}

/// The lines of `reader`, none held longer than `max` bytes: the same contract as the file
/// source's `LineBatcher` (src/source/file.rs) for a reader that is read once, to its end.
///
/// Hand-written on `BufRead` (no crate does this): `read_until` under `take(max + 1)`
/// reads a line that fits; past that the rest of the line is skipped a buffer at a time
/// (`fill_buf`/`consume`), counted, never kept.
pub struct BoundedLines<R> {
    reader: R,
    max: usize,
}

impl<R: std::io::BufRead> BoundedLines<R> {
    pub fn new(reader: R, max: usize) -> Self {
        BoundedLines {
            reader,
            max: max.max(1),
        }
    }
}

impl<R: std::io::BufRead> Iterator for BoundedLines<R> {
    type Item = std::io::Result<Line>;

    fn next(&mut self) -> Option<Self::Item> {
        use std::io::{BufRead, Read};
        let mut bytes = Vec::new();
        let n = match (&mut self.reader)
            .take(self.max as u64 + 1)
            .read_until(b'\n', &mut bytes)
        {
            Ok(n) => n as u64,
            Err(e) => return Some(Err(e)),
        };
        if n == 0 {
            return None;
        }
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            return Some(Ok(Line {
                bytes,
                consumed: n,
                too_long: None,
            }));
        }
        if bytes.len() <= self.max {
            // The last line, without a newline.
            return Some(Ok(Line {
                bytes,
                consumed: n,
                too_long: None,
            }));
        }
        drop(bytes);
        let (mut len, mut consumed) = (n, n);
        loop {
            let buf = match self.reader.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Some(Err(e)),
            };
            if buf.is_empty() {
                break;
            }
            match buf.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    len += i as u64;
                    consumed += i as u64 + 1;
                    self.reader.consume(i + 1);
                    break;
                }
                None => {
                    let k = buf.len();
                    len += k as u64;
                    consumed += k as u64;
                    self.reader.consume(k);
                }
            }
        }
        Some(Ok(Line {
            bytes: crate::event::too_long_marker(len).into_bytes(),
            consumed,
            too_long: Some(len),
        }))
    }
}

/// Replays `events` (in event time order, for a meaningful replay) through `pipeline`. The
/// first error from `events` stops the replay and is returned.
pub fn backtest_events<E: std::fmt::Display>(
    events: impl Iterator<Item = Result<AuthEvent<'static>, E>>,
    mut pipeline: Pipeline,
) -> anyhow::Result<RunSummary> {
    let mut chunk = Vec::with_capacity(CHUNK);
    for ev in events {
        chunk.push(ev.map_err(|e| anyhow::anyhow!("{e}"))?);
        if chunk.len() >= CHUNK {
            pipeline.process_events(std::mem::take(&mut chunk))?;
        }
    }
    if !chunk.is_empty() {
        pipeline.process_events(chunk)?;
    }
    pipeline.finish()
}

#[cfg(test)]
mod line_tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<Line> {
        // A small buffer, so that lines straddle refills.
        let r = std::io::BufReader::with_capacity(7, input);
        BoundedLines::new(r, max).map(Result::unwrap).collect()
    }

    #[test]
    fn lines_past_the_bound_are_replaced_by_their_size_and_offsets_hold() {
        let mut input = b"short\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100));
        input.extend(b"\nexactly10\n0123456789\n01234567890\nlast");
        let got = lines(&input, 10);
        let text: Vec<String> = got
            .iter()
            .map(|l| String::from_utf8_lossy(&l.bytes).into_owned())
            .collect();
        assert_eq!(
            text,
            [
                "short",
                &crate::event::too_long_marker(100),
                "exactly10",
                "0123456789",
                &crate::event::too_long_marker(11),
                "last"
            ]
        );
        assert_eq!(got[1].too_long, Some(100));
        assert_eq!(got[4].too_long, Some(11));
        assert_eq!(
            got.iter().map(|l| l.consumed).sum::<u64>(),
            input.len() as u64
        );
        // An over-long last line without a newline.
        let got = lines(&[b'y'; 50], 10);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].too_long, got[0].consumed), (Some(50), 50));
        assert!(lines(b"", 10).is_empty());
    }
}
