//! The per-batch pipeline: what happens to one batch, and in what order. The daemon, a
//! backtest (of a log or of a ClickHouse time range) and the scenario tests run this one
//! implementation; only the clock ([`Clock`]), the store and where findings go differ.
//!
//! The order, per batch (see [`Pipeline::process_batch`]):
//! 1. decode each line into events (gateway preset or field mapping; raw keys fingerprinted);
//!    an undecodable line is counted and kept in the dead letters;
//! 2. with an event-time clock, cut the batch before the first line whose event reaches the
//!    next lifecycle change, or the next evaluation tick when that evaluation reads the
//!    store (an open rotation; [`Schedule::next_cut`]); each segment runs steps 3-6, then the
//!    ticks and changes it reached are applied in time order (ticks that did not cut, after
//!    the batch's last segment);
//! 3. each event's key becomes the registry's id for it (an alias such as the fingerprint
//!    of the secret a refused request presented names the same key); the stream detectors
//!    observe every event; the events fold into one [`Aggregate`];
//! 4. the anomaly models see the aggregate (once per event: after a crash they are warmed up
//!    from the store, which does not hold the uncommitted batch, and see it again);
//! 5. the findings of steps 3-4 are stored and in the notifier's log ([`FindingSink`]);
//! 6. the aggregate (and raw events, when the store keeps them) is committed with the
//!    position after the segment, in one store transaction; a store that refuses it for good
//!    gets it line by line, each with the position after it, and what it refuses again is
//!    dead-lettered; transient store errors are retried until they pass or keywatch stops;
//! 7. the batch is acknowledged to its source (Kafka: its offsets may be committed).
//!
//! In the daemon's loop ([`Pipeline::run`]) step 6 of a batch's last segment only starts
//! the commit ([`Store::commit_started`]: ClickHouse writes it on its runtime), and steps
//! 1-5 of the next batch run meanwhile; the batch is acknowledged once
//! [`Store::wait_committed`] says its position is stored: before the next batch's commit,
//! before any evaluation, at the end, and at once when no batch waits in the channel.
//!
//! Asked to stop (the `cancel` token), the daemon's loop starts no batch waiting in the
//! channel, and a batch in hand ends at its next cut: the segments before it are committed
//! with their positions, the batch is not acknowledged, and the rest is read again at the
//! next start. Not for standard input, which cannot be read again: what was read from it
//! is stored first.
//!
//! Between batches ([`Pipeline::tick`]): the registry file and the lifecycle topic are
//! followed, and with the wall clock rotations are evaluated on their schedule. In a Kafka
//! consumer group, before each batch, the partitions assigned and revoked since the last
//! one warm up and drop the anomaly models of their keys ([`Pipeline::hold_keys_of`]). When the
//! input ends ([`Pipeline::finish`]) a last evaluation runs.
//!
//! Architecture invariant: a batch's position is stored only by [`Store::commit`] (or
//! [`Store::commit_started`]), with the batch's effect; nothing acknowledges a batch before
//! that is done.

use std::ops::Range;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::anomaly_feed::AnomalyFeed;
use super::deadletter::{DeadLetter, DeadLetterSink};
use super::findings::FindingSink;
use super::lifecycle::{RegistryFeed, TimedLifecycle};
use super::schedule::{Clock, Schedule, WallTick};
use super::server::Health;
use crate::aggregate::Aggregate;
use crate::detect::{Engine, Finding, Policy};
use crate::event::{AuthEvent, Decoder};
use crate::registry::Registry;
use crate::source::kafka::{PartitionChange, PartitionChanges, TopicPartition};
use crate::source::{Batch, PartitionOffset, Position};
use crate::store::{BatchWrite, Checkpoint, Origin, Store, StoreError, StoredEvent};

/// How long the keys of revoked partitions are kept waiting for the assignment that may
/// give the partitions back (an eager rebalance revokes and reassigns all of them).
const REVOCATION_GRACE: Duration = Duration::from_secs(10);

/// What a run did, for the final log line, the one-shot report and tests.
#[derive(Debug, Default, Clone)]
pub struct RunSummary {
    pub lines: u64,
    pub events: u64,
    pub dead_letters: u64,
    pub batches: u64,
    /// Findings raised for the first time during the run, in the order raised.
    pub findings: Vec<Finding>,
}

/// Whether a batch's source can give it again at the next start (a file, Kafka), so that
/// keywatch asked to stop may leave it, or its rest, unstored. Standard input cannot: what
/// was read from it is stored before keywatch stops.
fn read_again(batch: &Batch) -> bool {
    matches!(
        batch.position,
        Some(Position::File(_) | Position::Kafka { .. })
    )
}

/// What [`Pipeline::ingest`] did with a batch.
struct Ingested {
    /// Events stored.
    stored: u64,
    /// Lines committed, from the first: all of them unless keywatch was asked to stop
    /// between two segments.
    lines: usize,
}

/// One decoded event and where it came from.
#[derive(Debug, Clone)]
pub struct Decoded<'b> {
    /// The line (or message) of the batch.
    pub line: usize,
    /// Its place among the line's events (a Kong batch array holds several).
    pub index: u32,
    pub event: AuthEvent<'b>,
}

/// What a test sees at each evaluation tick when it replaces the evaluation
/// ([`Pipeline::on_tick`]).
pub struct Tick<'a> {
    pub now_ms: i64,
    pub engine: &'a mut Engine,
    pub store: &'a mut dyn Store,
    /// The stream and anomaly findings of the segments committed since the last tick (all
    /// of them, new or not), which the daemon hands over before each commit.
    pub streamed: Vec<Finding>,
}

type TickHook = Box<dyn FnMut(Tick<'_>) + Send>;

/// The lines of a batch: their stored origins, the positions between them, and where
/// undecodable or refused lines go.
pub trait Lines {
    /// The stored origin of event `index` of line `line`.
    fn origin(&self, line: usize, index: u32) -> Origin;
    /// The position just before line `line` (`line` = the number of lines: after the batch).
    fn position_before(&self, line: usize) -> Option<Position>;
    /// Keeps line `line` aside with `reason`.
    fn dead_letter(&mut self, line: usize, reason: &str) -> anyhow::Result<()>;
    /// Makes the dead letters written so far durable (before the commit that passes them).
    fn flush_dead_letters(&mut self) -> anyhow::Result<()>;
    /// The Kafka topic and partition of line `line` (`None`: files, stdin).
    fn topic_partition(&self, _line: usize) -> Option<(&Arc<str>, i32)> {
        None
    }
    /// The line stage the lines came through, which stores a refused earlier batch again
    /// line by line (`None`: events without lines, never committed in the background).
    fn stage(&mut self) -> Option<&mut LineStage> {
        None
    }
}

/// Folds an event into `agg`, with its Kafka topic partition when it has one.
fn fold(agg: &mut Aggregate, src: &dyn Lines, d: &Decoded<'_>) {
    match src.topic_partition(d.line) {
        Some((topic, partition)) => agg.add_from(&d.event, topic, partition),
        None => agg.add(&d.event),
    }
}

/// How lines become events: the decoder, and where undecodable lines go.
pub struct LineStage {
    pub decoder: Decoder,
    /// `None`: only counted (a backtest).
    pub dead_letters: Option<Box<dyn DeadLetterSink>>,
    /// The source's name in dead letters and logs.
    pub source_id: String,
    /// Threads that decode a large batch (`pipeline.decode_threads`); 1: the pipeline
    /// thread alone.
    decode_threads: usize,
    /// Copies of `decoder` for the other decoding threads, made at their first use: each
    /// with a fingerprint memo of its own, so that the threads never wait on one another.
    helpers: Vec<Decoder>,
}

/// Lines each decoding thread gets at least: a batch shorter than twice this (light live
/// traffic, cut by `batch_max_wait`) is decoded on the pipeline thread alone. 1,024 Kong
/// lines take about 2 ms to decode, a thread's start tens of microseconds.
const DECODE_LINES_PER_THREAD: usize = 1024;

/// The events of some lines of a batch, and the lines that did not decode.
struct DecodedLines<'b> {
    events: Vec<Decoded<'b>>,
    errors: Vec<(usize, crate::event::DecodeError)>,
}

/// Decodes lines `which` of a batch (its bytes `buf`, its line ranges `lines`: a `Batch`
/// itself is not `Sync`, for its acknowledgement).
fn decode_lines<'b>(
    decoder: &Decoder,
    buf: &'b [u8],
    lines: &[Range<usize>],
    which: Range<usize>,
) -> DecodedLines<'b> {
    let mut out = DecodedLines {
        events: Vec::with_capacity(which.len()),
        errors: Vec::new(),
    };
    let mut events: Vec<AuthEvent<'b>> = Vec::new();
    for i in which {
        match decoder.decode(&buf[lines[i].clone()], &mut events) {
            Ok(_) => out
                .events
                .extend(events.drain(..).enumerate().map(|(index, event)| Decoded {
                    line: i,
                    index: index as u32,
                    event,
                })),
            Err(e) => {
                events.clear();
                out.errors.push((i, e));
            }
        }
    }
    out
}

impl LineStage {
    /// `decode_threads`: threads that decode a large batch (at least 1).
    pub fn new(
        decoder: Decoder,
        dead_letters: Option<Box<dyn DeadLetterSink>>,
        source_id: String,
        decode_threads: usize,
    ) -> Self {
        LineStage {
            decoder,
            dead_letters,
            source_id,
            decode_threads: decode_threads.max(1),
            helpers: Vec::new(),
        }
    }

    /// Decodes every line of `batch`; undecodable lines are dead-lettered. Returns the events
    /// and the number of lines rejected.
    ///
    /// A large batch (a backlog) is cut into consecutive runs of lines, decoded on up to
    /// `decode_threads` threads at once (scoped threads started per batch, each with at
    /// least [`DECODE_LINES_PER_THREAD`] lines), and put back together in line order, so
    /// nothing downstream sees the difference. The decode is the largest part of the
    /// pipeline thread's work (BENCHMARKS.md, issue 19).
    fn decode<'b>(&mut self, batch: &'b Batch) -> anyhow::Result<(Vec<Decoded<'b>>, u64)> {
        let n = batch.len();
        let threads = self.decode_threads.min(n / DECODE_LINES_PER_THREAD).max(1);
        let mut parts = if threads == 1 {
            vec![decode_lines(&self.decoder, &batch.buf, &batch.lines, 0..n)]
        } else {
            let per = n.div_ceil(threads);
            while self.helpers.len() < threads - 1 {
                self.helpers.push(self.decoder.clone());
            }
            let (decoder, buf, lines) = (&self.decoder, &batch.buf[..], &batch.lines[..]);
            let helpers = &self.helpers;
            std::thread::scope(|s| {
                let others: Vec<_> = (1..threads)
                    .map(|t| {
                        let decoder = &helpers[t - 1];
                        let which = t * per..((t + 1) * per).min(n);
                        let thread = std::thread::Builder::new()
                            .name("keywatch-decode".into())
                            .spawn_scoped(s, {
                                let which = which.clone();
                                move || decode_lines(decoder, buf, lines, which)
                            });
                        (which, thread)
                    })
                    .collect();
                let mut parts = vec![decode_lines(decoder, buf, lines, 0..per)];
                for (which, thread) in others {
                    parts.push(match thread {
                        Ok(h) => h
                            .join()
                            .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                        // A thread that could not be started leaves its lines to this one.
                        Err(_) => decode_lines(decoder, buf, lines, which),
                    });
                }
                parts
            })
        };
        let mut out = std::mem::take(&mut parts[0].events);
        out.reserve(parts.iter().map(|p| p.events.len()).sum());
        let mut rejected = 0u64;
        for part in &mut parts {
            out.append(&mut part.events);
            for (i, e) in part.errors.drain(..) {
                rejected += 1;
                metrics::counter!("keywatch_events_rejected_total", "reason" => e.kind())
                    .increment(1);
                self.write_dead_letter(batch, i, &e.to_string())?;
            }
        }
        if rejected > 0 {
            self.flush()?;
        }
        Ok((out, rejected))
    }

    fn write_dead_letter(&mut self, batch: &Batch, i: usize, reason: &str) -> anyhow::Result<()> {
        let offset = batch.line_offsets.get(i).copied().unwrap_or(0);
        let Some(sink) = &mut self.dead_letters else {
            return Ok(());
        };
        tracing::warn!(source = %self.source_id, offset, reason, "rejected a line");
        sink.write(&DeadLetter {
            at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            source: &self.source_id,
            topic: batch.topics.get(i).map(|t| t.as_ref()),
            partition: batch.partitions.get(i).copied(),
            offset,
            reason: reason.to_owned(),
            line: self.decoder.redact(batch.line(i)),
        })
        .context("writing the dead letters")
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        if let Some(sink) = &mut self.dead_letters {
            sink.flush().context("writing the dead letters")?;
        }
        Ok(())
    }
}

/// A batch seen through its [`LineStage`].
struct BatchLines<'a> {
    batch: &'a Batch,
    stage: &'a mut LineStage,
}

impl Lines for BatchLines<'_> {
    fn stage(&mut self) -> Option<&mut LineStage> {
        Some(self.stage)
    }

    fn origin(&self, line: usize, index: u32) -> Origin {
        Origin {
            partition: self.batch.partition(line),
            offset: self.batch.line_offsets.get(line).copied().unwrap_or(0) as i64,
            index,
        }
    }

    fn position_before(&self, line: usize) -> Option<Position> {
        position_before(self.batch, line)
    }

    fn dead_letter(&mut self, line: usize, reason: &str) -> anyhow::Result<()> {
        self.stage.write_dead_letter(self.batch, line, reason)
    }

    fn flush_dead_letters(&mut self) -> anyhow::Result<()> {
        self.stage.flush()
    }

    fn topic_partition(&self, line: usize) -> Option<(&Arc<str>, i32)> {
        let topic = self.batch.topics.get(line)?;
        Some((topic, self.batch.partition(line)))
    }
}

/// The position just before line `line` of `batch`: a file's or stdin's byte offset of that
/// line; for Kafka, the next offset of every partition of the lines before it.
pub fn position_before(batch: &Batch, line: usize) -> Option<Position> {
    if line >= batch.len() {
        return batch.position.clone();
    }
    let offset = batch.line_offsets.get(line).copied()?;
    match batch.position.as_ref()? {
        Position::File(f) => Some(Position::File(crate::source::FilePosition {
            offset,
            ..f.clone()
        })),
        Position::Stdin { .. } => Some(Position::Stdin { offset }),
        Position::Kafka { .. } => {
            let mut offsets: Vec<PartitionOffset> = Vec::new();
            for i in 0..line {
                let topic = batch
                    .topics
                    .get(i)
                    .map(|t| t.to_string())
                    .unwrap_or_default();
                let partition = batch.partition(i);
                let next = batch.line_offsets.get(i).copied().unwrap_or(0) as i64 + 1;
                match offsets
                    .iter_mut()
                    .find(|p| p.partition == partition && p.topic == topic)
                {
                    Some(p) => p.offset = p.offset.max(next),
                    None => offsets.push(PartitionOffset {
                        topic,
                        partition,
                        offset: next,
                    }),
                }
            }
            (!offsets.is_empty()).then_some(Position::Kafka { offsets })
        }
    }
}

/// Events that come without lines (a backtest of stored events, tests): no positions, and
/// nothing to dead-letter (a scratch store refuses nothing).
struct NoLines;

impl Lines for NoLines {
    fn origin(&self, line: usize, index: u32) -> Origin {
        Origin {
            partition: 0,
            offset: line as i64,
            index,
        }
    }

    fn position_before(&self, _line: usize) -> Option<Position> {
        None
    }

    fn dead_letter(&mut self, line: usize, reason: &str) -> anyhow::Result<()> {
        tracing::warn!(event = line, reason, "the store refused an event");
        Ok(())
    }

    fn flush_dead_letters(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// The pipeline's parts; [`Pipeline::new`] puts them together.
pub struct Parts {
    pub store: Box<dyn Store + Send>,
    pub registry: RegistryFeed,
    pub policy: Policy,
    pub clock: Clock,
    pub findings: FindingSink,
    /// The source's name, under which its position is stored.
    pub source_id: String,
}

/// See the module doc.
pub struct Pipeline {
    store: Box<dyn Store + Send>,
    /// The stream and rotation detectors, with the registry in force.
    engine: Engine,
    /// The per-key anomaly models (`None`: `[anomaly] enabled = false`).
    anomaly: Option<AnomalyFeed>,
    registry: RegistryFeed,
    /// A backtest's lifecycle events, applied at their event time.
    timed: TimedLifecycle,
    schedule: Schedule,
    /// With several instances in a consumer group, one evaluates rotations (see
    /// [`Pipeline::evaluate_only_when`]).
    gate: Option<Arc<AtomicBool>>,
    /// In a consumer group: the partitions assigned and revoked, taken before each batch
    /// (see [`Pipeline::hold_keys_of`]).
    partition_changes: Option<Arc<PartitionChanges>>,
    /// Changes taken but not applied: a revocation waits for the assignment that follows it
    /// (an eager rebalance revokes every partition and assigns them again), at most
    /// [`REVOCATION_GRACE`] from the first.
    changes_pending: Vec<PartitionChange>,
    revoked_at: Option<Instant>,
    sink: FindingSink,
    source_id: String,
    /// Stops commit retries at shutdown (the batch is read again at the next start).
    cancel: CancellationToken,
    health: Option<Arc<Health>>,
    /// Replaces the evaluation at each tick (tests).
    on_tick: Option<TickHook>,
    /// The findings handed over since the last tick, kept for [`Tick::streamed`] (only
    /// while `collect_streamed`).
    streamed: Vec<Finding>,
    collect_streamed: bool,
    summary: RunSummary,
    /// The daemon's loop ([`Pipeline::run`]) only: a batch's last segment is committed with
    /// [`Store::commit_started`], and the batch acknowledged once the next batch is decoded
    /// and prepared (or before an evaluation, or when no batch waits).
    pipelined: bool,
    /// The last segment of the current batch is being committed (with `pipelined`).
    start_only: bool,
    /// Where the current batch's last segment starts (its lines to store again, one by
    /// one, should the store reject it after the start).
    last_segment: usize,
    /// The batch whose commit was started and not yet waited for.
    unacked: Option<Unacked>,
    /// The batch in hand can be read again (a file, Kafka): asked to stop, it may end at
    /// its next cut.
    may_stop_within: bool,
}

/// A batch whose last segment's commit was started ([`Store::commit_started`]) and not
/// yet waited for: it is acknowledged (Kafka offsets, in-flight guard, health) only once
/// the store says it is committed.
struct Unacked {
    batch: Batch,
    /// The lines of the started commit (the batch's last segment).
    lines: std::ops::Range<usize>,
    /// The store refused the started commit for good: the lines are stored again one by
    /// one (with the line stage, at the next batch or the end).
    rejected: Option<String>,
}

impl Pipeline {
    pub fn new(parts: Parts) -> anyhow::Result<Pipeline> {
        let registry = parts.registry.registry();
        Ok(Pipeline {
            anomaly: AnomalyFeed::new(&parts.policy.anomaly, Arc::clone(&registry)),
            engine: Engine::new(registry, parts.policy),
            store: parts.store,
            registry: parts.registry,
            timed: TimedLifecycle::default(),
            schedule: Schedule::new(parts.clock).map_err(anyhow::Error::msg)?,
            gate: None,
            partition_changes: None,
            changes_pending: Vec::new(),
            revoked_at: None,
            sink: parts.findings,
            source_id: parts.source_id,
            cancel: CancellationToken::new(),
            health: None,
            on_tick: None,
            streamed: Vec::new(),
            collect_streamed: false,
            summary: RunSummary::default(),
            pipelined: false,
            start_only: false,
            last_segment: 0,
            unacked: None,
            may_stop_within: false,
        })
    }

    /// Evaluates rotations and key ages only while `gate` is set: with several instances in
    /// a consumer group, one evaluation per group (the partition-0 owner's,
    /// [`crate::source::kafka::KafkaSource::leader`]). Stream and anomaly findings, which come
    /// from each instance's own partitions, are not gated.
    pub fn evaluate_only_when(&mut self, gate: Arc<AtomicBool>) {
        self.gate = Some(gate);
    }

    /// In a consumer group: the anomaly models warm up and keep only the keys of the
    /// partitions this member holds, as `changes` reports them (instead of every key at
    /// start).
    pub fn hold_keys_of(&mut self, changes: Arc<PartitionChanges>) {
        self.partition_changes = Some(changes);
    }

    /// Applies the partition changes reported since the last call: the keys of revoked
    /// partitions are dropped, assigned partitions warmed up. Called before each batch, so
    /// that a batch of a newly assigned partition is fed after its history (the source
    /// records an assignment before reading any of its messages). Revocations wait for the
    /// next assignment (at most [`REVOCATION_GRACE`]): a partition revoked and assigned
    /// again in between (an eager rebalance) is held throughout, its keys kept. No batch
    /// of a revoked partition comes meanwhile (the source discards them).
    fn follow_partitions(&mut self) -> anyhow::Result<()> {
        let Some(changes) = &self.partition_changes else {
            return Ok(());
        };
        self.changes_pending.extend(changes.take());
        match self.changes_pending.last() {
            None => return Ok(()),
            Some(PartitionChange::Revoked(_)) => {
                let since = *self.revoked_at.get_or_insert_with(Instant::now);
                if since.elapsed() < REVOCATION_GRACE {
                    return Ok(());
                }
            }
            Some(PartitionChange::Assigned(_)) => {}
        }
        self.revoked_at = None;
        let changes = std::mem::take(&mut self.changes_pending);
        let before: Vec<TopicPartition> = self
            .anomaly
            .as_ref()
            .map(|a| a.held().to_vec())
            .unwrap_or_default();
        let mut held = before.clone();
        for c in changes {
            match c {
                PartitionChange::Assigned(ps) => {
                    for p in ps {
                        if !held.contains(&p) {
                            held.push(p);
                        }
                    }
                }
                PartitionChange::Revoked(ps) => held.retain(|h| !ps.contains(h)),
            }
        }
        let gone: Vec<TopicPartition> = before
            .iter()
            .filter(|p| !held.contains(p))
            .cloned()
            .collect();
        let new: Vec<TopicPartition> = held
            .iter()
            .filter(|p| !before.contains(p))
            .cloned()
            .collect();
        if !new.is_empty() {
            // The history read is what is committed.
            self.settle_commit()?;
        }
        if let Some(a) = &mut self.anomaly {
            if !gone.is_empty() {
                a.drop_revoked(&gone);
            }
            if !new.is_empty() {
                a.warm_up_partitions(self.store.as_mut(), &new);
            }
        }
        Ok(())
    }

    /// Commit retries stop when `cancel` fires.
    pub fn stop_retrying_on(&mut self, cancel: CancellationToken) {
        self.cancel = cancel;
    }

    /// `/healthz` learns of every commit.
    pub fn report_health(&mut self, health: Arc<Health>) {
        self.health = Some(health);
    }

    /// Lifecycle events applied at their own event time (a backtest's `--lifecycle`).
    pub fn apply_at_their_time(&mut self, events: TimedLifecycle) {
        self.timed = events;
    }

    /// Replaces the evaluation at each tick by `hook` (scenario tests look at the engine and
    /// the store at chosen times, with exactly the events before each time ingested).
    pub fn on_tick(&mut self, hook: impl FnMut(Tick<'_>) + Send + 'static) {
        self.on_tick = Some(Box::new(hook));
        self.collect_streamed = true;
    }

    /// Keeps the stream and anomaly findings handed over, for [`Self::take_streamed`] (a test
    /// that steps the pipeline itself).
    pub fn collect_streamed(&mut self) {
        self.collect_streamed = true;
    }

    /// The stream and anomaly findings handed over since the last call (see
    /// [`Self::collect_streamed`]).
    pub fn take_streamed(&mut self) -> Vec<Finding> {
        std::mem::take(&mut self.streamed)
    }

    /// The detectors and the store, to look at between steps.
    pub fn parts_mut(&mut self) -> (&mut Engine, &mut dyn Store) {
        (&mut self.engine, self.store.as_mut())
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn store(&mut self) -> &mut dyn Store {
        self.store.as_mut()
    }

    pub fn registry(&self) -> &Arc<Registry> {
        self.engine.registry()
    }

    pub fn anomaly(&self) -> Option<&AnomalyFeed> {
        self.anomaly.as_ref()
    }

    /// The new findings of the run so far, in the order raised.
    pub fn raised(&self) -> &[Finding] {
        self.sink.raised()
    }

    /// At start: applies the lifecycle topic up to its end (or `timeout`); returns whether
    /// it got there.
    pub async fn catch_up(&mut self, timeout: Duration) -> anyhow::Result<bool> {
        let (caught_up, changed) = self.registry.catch_up(timeout).await?;
        if let Some(r) = changed {
            self.engine.set_registry(Arc::clone(&r));
            self.sink.registry_async(r).await;
        }
        Ok(caught_up)
    }

    /// Follows lifecycle messages (see [`RegistryFeed::follow_topic`]).
    pub fn registry_feed(&mut self) -> &mut RegistryFeed {
        &mut self.registry
    }

    /// At start: warms the anomaly models up from the store's history (in a consumer group,
    /// the partitions' histories are read as they are assigned instead).
    pub fn warm_up(&mut self) {
        // In a group nothing is warmed up before an assignment: until one comes, what the
        // instance waits for is the assignment (a readiness step of its own), and each
        // assignment's warm-up runs before its batches.
        if self.partition_changes.is_none() {
            if let Some(a) = &mut self.anomaly {
                a.warm_up(self.store.as_mut());
            }
        }
        if let Some(h) = &self.health {
            h.done(super::server::WAIT_WARM_UP);
        }
    }

    /// The daemon's loop: batches from `rx` until the source ends, with the registry and the
    /// wall-clock schedule looked after between batches. `batch_max` is
    /// `pipeline.batch_max_events`: a batch that long says the source is behind.
    pub fn run(
        mut self,
        mut rx: mpsc::Receiver<Batch>,
        mut lines: LineStage,
        batch_max: usize,
    ) -> anyhow::Result<RunSummary> {
        let rt = tokio::runtime::Handle::current();
        // Before the first batch: the source reads ahead into the bounded channel meanwhile.
        self.warm_up();
        self.pipelined = true;
        loop {
            // Wake up for the schedule and the registry even when no input comes (and, in a
            // consumer group, for the partitions assigned: their warm-up need not wait for
            // their first batch).
            let mut wait = self.schedule.wall_wait().min(self.registry.wait());
            if self.partition_changes.is_some() {
                wait = wait.min(Duration::from_millis(500));
            }
            let received = rt.block_on(tokio::time::timeout(wait, rx.recv()));
            self.follow_partitions()?;
            match received {
                // Asked to stop: a batch waiting in the channel is not started (it is read
                // again at the next start, from the stored position).
                Ok(Some(batch)) if self.cancel.is_cancelled() && read_again(&batch) => break,
                Ok(Some(batch)) => {
                    // A full batch, or more waiting: the source is behind (a backlog after
                    // an outage or at start).
                    let behind = batch.len() >= batch_max || !rx.is_empty();
                    self.process_batch(&mut lines, batch)?;
                    self.schedule.set_behind(behind);
                    // Nothing to prepare meanwhile: acknowledge the batch now rather than
                    // with the next one.
                    if rx.is_empty() {
                        self.settle(&mut lines)?;
                    }
                }
                Ok(None) => break,
                Err(_elapsed) => self.schedule.set_behind(false),
            }
            self.tick()?;
        }
        self.settle(&mut lines)?;
        self.finish()
    }

    /// Waits for the started commit of the previous batch and acknowledges it; a batch the
    /// store refused after the start is stored again line by line (see
    /// [`Self::isolate_rejected`]).
    fn settle(&mut self, stage: &mut LineStage) -> anyhow::Result<()> {
        self.settle_commit()?;
        let Some(u) = self.unacked.take() else {
            return Ok(());
        };
        let reason = u.rejected.clone().unwrap_or_default();
        // Decoded again (without dead-lettering the undecodable lines twice), with the
        // keys' canonical ids as first stored.
        let mut decoded = Vec::new();
        let mut events = Vec::new();
        for i in u.lines.clone() {
            if stage.decoder.decode(u.batch.line(i), &mut events).is_ok() {
                decoded.extend(events.drain(..).enumerate().map(|(index, event)| Decoded {
                    line: i,
                    index: index as u32,
                    event,
                }));
            }
            events.clear();
        }
        self.canonical_ids(&mut decoded);
        self.isolate_rejected(
            &decoded,
            &mut BatchLines {
                batch: &u.batch,
                stage,
            },
            u.lines.clone(),
            &reason,
        )?;
        drop(decoded);
        self.acknowledge(u.batch);
        Ok(())
    }

    /// Settles the previous batch's commit before the current batch's lines `src` are
    /// committed or evaluated: the commits stay in order, an evaluation reads what is
    /// committed, and a refused batch is stored line by line before anything after it.
    /// Until then the previous batch's inserts run while this batch is decoded and
    /// prepared (the detectors, the aggregate, the anomaly models, its findings stored).
    fn settle_before_store(&mut self, src: &mut dyn Lines) -> anyhow::Result<()> {
        if self.unacked.is_none() {
            return Ok(());
        }
        match src.stage() {
            Some(stage) => self.settle(stage),
            None => self.settle_commit(),
        }
    }

    /// Waits for the started commit of the previous batch and acknowledges it when it
    /// worked; a rejection is kept for [`Self::settle`] (which has the line stage).
    fn settle_commit(&mut self) -> anyhow::Result<()> {
        let Some(u) = &mut self.unacked else {
            return Ok(());
        };
        if u.rejected.is_some() {
            return Ok(());
        }
        match retry(
            self.store.as_mut(),
            &self.cancel,
            self.health.as_deref(),
            |s| s.wait_committed(),
        ) {
            Ok(()) => {
                let u = self.unacked.take().expect("checked above");
                self.acknowledge(u.batch);
            }
            Err(StoreError::Rejected(reason)) => u.rejected = Some(reason),
            Err(e) => return Err(e).context("storing a batch"),
        }
        Ok(())
    }

    /// Step 7: the batch is committed.
    fn acknowledge(&mut self, mut batch: Batch) {
        if let Some(h) = &self.health {
            h.committed();
        }
        if let Some(ack) = batch.on_commit.take() {
            ack();
        }
    }

    /// Steps 1-7 of the module doc for one batch of lines.
    pub fn process_batch(&mut self, stage: &mut LineStage, mut batch: Batch) -> anyhow::Result<()> {
        let started = Instant::now();
        let (mut decoded, rejected) = stage.decode(&batch)?;
        let decode_ms = started.elapsed().as_secs_f64() * 1e3;
        // The previous batch's commit runs on while this one is decoded and prepared; it is
        // settled before this one reads or writes the store (`settle_before_store`).
        let n = batch.len();
        self.start_only = self.pipelined;
        self.may_stop_within = read_again(&batch);
        let Ingested { stored, lines } = self.ingest(
            &mut decoded,
            &mut BatchLines {
                batch: &batch,
                stage,
            },
            n,
        )?;
        self.start_only = false;
        drop(decoded);
        self.summary.lines += lines as u64;
        self.summary.events += stored;
        self.summary.dead_letters += rejected;
        if lines < n {
            // Asked to stop between two segments: the segments before are committed with
            // their positions; the batch is not acknowledged, and its rest is read again at
            // the next start.
            tracing::info!(
                lines_stored = lines,
                lines_left = n - lines,
                "stopping within a batch: its rest is read again at the next start"
            );
            return Ok(());
        }
        self.summary.batches += 1;
        tracing::debug!(
            lines = n,
            bytes = batch.buf.len(),
            events = stored,
            rejected,
            decode_ms = (decode_ms * 10.0).round() / 10.0,
            total_ms = (started.elapsed().as_secs_f64() * 1e4).round() / 10.0,
            "batch committed"
        );
        if self.pipelined {
            self.unacked = Some(Unacked {
                lines: self.last_segment..n,
                batch,
                rejected: None,
            });
        } else if let Some(ack) = batch.on_commit.take() {
            ack();
        }
        Ok(())
    }

    /// Steps 2-6 for events that come without lines (a backtest of stored events, tests),
    /// in time order.
    pub fn process_events(&mut self, events: Vec<AuthEvent<'_>>) -> anyhow::Result<()> {
        let mut decoded: Vec<Decoded<'_>> = events
            .into_iter()
            .enumerate()
            .map(|(line, event)| Decoded {
                line,
                index: 0,
                event,
            })
            .collect();
        let n = decoded.len();
        self.may_stop_within = false;
        let Ingested { stored, lines } = self.ingest(&mut decoded, &mut NoLines, n)?;
        self.summary.lines += lines as u64;
        self.summary.events += stored;
        self.summary.batches += 1;
        Ok(())
    }

    /// Between batches: the registry followed, and a wall-clock evaluation when it is due.
    pub fn tick(&mut self) -> anyhow::Result<()> {
        if let Some(r) = self.registry.poll()? {
            self.registry_changed(r);
        }
        match self.schedule.wall_due() {
            WallTick::Due => self.evaluate(chrono::Utc::now().timestamp_millis())?,
            WallTick::Postponed => {
                metrics::counter!("keywatch_evaluations_postponed_total").increment(1)
            }
            WallTick::NotYet => {}
        }
        Ok(())
    }

    /// The input has ended (a one-shot read, a backtest, or shutdown): the last evaluations
    /// (see [`Schedule::finish`]); returns what the run did.
    pub fn finish(mut self) -> anyhow::Result<RunSummary> {
        for t in self.schedule.finish() {
            self.apply_timed_until(t);
            self.evaluate(t)?;
        }
        self.summary.findings = self.sink.take_raised();
        Ok(self.summary)
    }

    fn registry_changed(&mut self, registry: Arc<Registry>) {
        self.engine.set_registry(Arc::clone(&registry));
        self.sink.registry(registry);
    }

    /// The next event time at which ingestion must stop for a tick or a lifecycle change.
    /// A tick cuts only when its evaluation reads the store (see
    /// [`Self::ticks_read_the_store`]); the others are evaluated after the segment.
    fn next_cut(&mut self, ts_ms: i64) -> Option<i64> {
        let tick = if self.ticks_read_the_store() {
            self.schedule.next_cut(ts_ms)
        } else {
            None
        };
        match (tick, self.timed.next_at()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether an evaluation may read the store, so that the events after its tick must
    /// wait until it ran. It reads the store for open rotations only (key ages come from
    /// the registry), and a test hook may read anything. Without this, a one-shot read of a
    /// sparse log committed once per `rules.evaluate_every` of event time: 6,004 commits of
    /// 84 events (median) for 1,000,000 Kong lines over four days (issue 19).
    fn ticks_read_the_store(&self) -> bool {
        self.on_tick.is_some()
            || self
                .engine
                .registry()
                .keys()
                .any(|k| k.open_rotation().is_some())
    }

    /// Steps 2-6: cuts `decoded` at the ticks and changes it reaches, commits each segment
    /// with the position after it, and applies the ticks and changes in time order. The
    /// last segment (possibly without events) carries the position after all `n_lines`.
    /// Once keywatch is asked to stop, no segment starts after a cut: a batch spanning
    /// days of event time would otherwise run every evaluation of those days first.
    fn ingest(
        &mut self,
        decoded: &mut [Decoded<'_>],
        lines: &mut dyn Lines,
        n_lines: usize,
    ) -> anyhow::Result<Ingested> {
        let mut stored = 0;
        let (mut start, mut first_line) = (0, 0);
        // Only the last segment's commit may be left running (an evaluation follows the
        // others, and it reads what they stored).
        let start_last = std::mem::replace(&mut self.start_only, false);
        while start < decoded.len() {
            let Some(cut) = self.next_cut(decoded[start].event.ts_ms) else {
                break;
            };
            let Some(reach) = decoded[start..]
                .iter()
                .position(|d| d.event.ts_ms >= cut)
                .map(|i| start + i)
            else {
                break;
            };
            // Cut between lines: the whole line of the event that reached the cut waits.
            let line = decoded[reach].line;
            let end = decoded[start..reach]
                .iter()
                .position(|d| d.line == line)
                .map_or(reach, |i| start + i);
            if end > start {
                stored += self.commit_segment(&mut decoded[start..end], lines, first_line..line)?;
                (start, first_line) = (end, line);
            }
            self.settle_before_store(lines)?;
            self.advance_to(decoded[reach].event.ts_ms)?;
            if self.may_stop_within && self.cancel.is_cancelled() {
                return Ok(Ingested {
                    stored,
                    lines: first_line,
                });
            }
        }
        self.last_segment = first_line;
        self.start_only = start_last;
        stored += self.commit_segment(&mut decoded[start..], lines, first_line..n_lines)?;
        self.start_only = false;
        // Ticks that did not cut (their evaluation reads nothing of the store) and that the
        // batch reached are evaluated now, in time order.
        self.settle_before_store(lines)?;
        if let Some(latest) = decoded[start..].iter().map(|d| d.event.ts_ms).max() {
            if !self.ticks_read_the_store() {
                self.advance_to(latest)?;
            }
        }
        Ok(Ingested {
            stored,
            lines: n_lines,
        })
    }

    /// Applies the lifecycle changes and evaluates the ticks up to `ts_ms`, in time order (a
    /// change at the time of a tick comes first).
    fn advance_to(&mut self, ts_ms: i64) -> anyhow::Result<()> {
        for t in self.schedule.ticks_until(ts_ms) {
            self.apply_timed_until(t);
            self.evaluate(t)?;
        }
        self.apply_timed_until(ts_ms);
        Ok(())
    }

    fn apply_timed_until(&mut self, ts_ms: i64) {
        for (at, ev) in self.timed.until(ts_ms) {
            let key = ev.key_id().to_owned();
            match self.registry.apply(ev) {
                Ok(r) => self.registry_changed(r),
                Err(reason) => {
                    tracing::warn!(%key, at = %crate::registry::format_rfc3339(at), %reason, "refused a lifecycle event")
                }
            }
        }
    }

    /// Steps 3-6 for one segment: `events` of `lines` (all of them, for the position).
    fn commit_segment(
        &mut self,
        events: &mut [Decoded<'_>],
        src: &mut dyn Lines,
        lines: std::ops::Range<usize>,
    ) -> anyhow::Result<u64> {
        // One identity per key: a request the gateway refused carries the fingerprint of the
        // presented secret (or an id header), an accepted one the credential id; the
        // registry's aliases tie them, so both count as the key's usage, sources and
        // rotation progress.
        let prepare_started = Instant::now();
        self.canonical_ids(events);
        let events = &*events;
        let mut agg = Aggregate::default();
        let keep_raw = self.store.keeps_raw_events();
        let mut raw: Vec<StoredEvent<'_>> = Vec::new();
        for d in events {
            self.schedule.saw(d.event.ts_ms);
            self.engine.observe(&d.event);
            fold(&mut agg, &*src, d);
            if keep_raw {
                raw.push(StoredEvent {
                    origin: src.origin(d.line, d.index),
                    event: d.event.clone(),
                });
            }
        }
        // The anomaly models see the segment once, here; what it raised (stream and anomaly
        // findings) is safe with the notifier before the segment is committed.
        if let Some(a) = &mut self.anomaly {
            let found = a.observe(&agg, self.engine.registry());
            self.engine.push_pending(found);
        }
        let found = self.engine.take_pending();
        let prepared = prepare_started.elapsed();
        if self.collect_streamed {
            self.streamed.extend(found.iter().cloned());
        }
        if !found.is_empty() {
            let sink = &mut self.sink;
            retry(
                self.store.as_mut(),
                &self.cancel,
                self.health.as_deref(),
                |store| sink.record(store, &found),
            )
            .context("storing findings")?;
            self.sink.hand_over(found);
        }

        let handed_over = prepare_started.elapsed() - prepared;
        self.settle_before_store(src)?;
        let position = src.position_before(lines.end);
        let source_id = self.source_id.clone();
        let checkpoint = position.as_ref().map(|position| Checkpoint {
            source: &source_id,
            position,
        });
        let started = Instant::now();
        let write = BatchWrite {
            aggregate: &agg,
            events: &raw,
            checkpoint,
        };
        let result = if self.start_only {
            retry(
                self.store.as_mut(),
                &self.cancel,
                self.health.as_deref(),
                |store| store.commit_started(&write),
            )
        } else {
            self.commit_with_retry(&write)
        };
        let stored = match result {
            Ok(()) => agg.events,
            Err(StoreError::Rejected(reason)) => {
                drop(raw);
                self.isolate_rejected(events, src, lines, &reason)?
            }
            Err(e) => return Err(e).context("storing a batch"),
        };
        let committed = started.elapsed();
        metrics::histogram!("keywatch_store_commit_seconds").record(committed.as_secs_f64());
        let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
        // Where a segment's time goes (the ingest benchmarks read these lines): the stream
        // detectors, aggregation and models; storing its findings (the hand-over before
        // the commit); the store's commit.
        tracing::debug!(
            events = events.len(),
            prepare_ms = ms(prepared),
            handover_ms = ms(handed_over),
            commit_ms = ms(committed),
            "segment committed"
        );
        metrics::counter!("keywatch_events_total").increment(stored);
        metrics::counter!("keywatch_batches_committed_total").increment(1);
        metrics::gauge!("keywatch_last_commit_timestamp_seconds")
            .set(chrono::Utc::now().timestamp() as f64);
        if !self.start_only {
            if let Some(h) = &self.health {
                h.committed();
            }
        }
        Ok(stored)
    }

    /// Each event's key becomes the registry's id for it.
    fn canonical_ids(&self, events: &mut [Decoded<'_>]) {
        let registry = self.engine.registry();
        for d in events.iter_mut() {
            let id = registry.canonical(&d.event.key_id);
            if id != d.event.key_id {
                d.event.key_id = std::borrow::Cow::Owned(id.to_owned());
            }
        }
    }

    /// The store refused a segment for good. Stores it again line by line, each with the
    /// position just after it, so that only the lines the store refuses go to the dead
    /// letter and a crash in the middle neither loses nor repeats a line. The detectors saw
    /// every line already (those the store refuses too: they happened at the gateway).
    fn isolate_rejected(
        &mut self,
        events: &[Decoded<'_>],
        src: &mut dyn Lines,
        lines: std::ops::Range<usize>,
        reason: &str,
    ) -> anyhow::Result<u64> {
        tracing::warn!(
            lines = lines.len(),
            reason,
            "the store rejected a batch; storing it line by line"
        );
        let source_id = self.source_id.clone();
        let keep_raw = self.store.keeps_raw_events();
        let mut stored = 0;
        let mut rest = events;
        for line in lines {
            let n = rest.iter().take_while(|d| d.line == line).count();
            let (mine, after) = rest.split_at(n);
            rest = after;
            let mut agg = Aggregate::default();
            let mut raw = Vec::new();
            for d in mine {
                fold(&mut agg, &*src, d);
                if keep_raw {
                    raw.push(StoredEvent {
                        origin: src.origin(d.line, d.index),
                        event: d.event.clone(),
                    });
                }
            }
            let position = src.position_before(line + 1);
            let checkpoint = position.as_ref().map(|position| Checkpoint {
                source: &source_id,
                position,
            });
            match self.commit_with_retry(&BatchWrite {
                aggregate: &agg,
                events: &raw,
                checkpoint,
            }) {
                Ok(()) => stored += agg.events,
                Err(StoreError::Rejected(why)) => {
                    metrics::counter!("keywatch_events_rejected_total", "reason" => "store_rejected")
                        .increment(1);
                    src.dead_letter(line, &format!("rejected by the store: {why}"))?;
                    src.flush_dead_letters()?;
                    let empty = Aggregate::default();
                    self.commit_with_retry(&BatchWrite {
                        aggregate: &empty,
                        events: &[],
                        checkpoint,
                    })
                    .context("storing the position after a rejected line")?;
                }
                Err(e) => return Err(e).context("storing a line"),
            }
        }
        Ok(stored)
    }

    fn commit_with_retry(&mut self, batch: &BatchWrite<'_, '_>) -> Result<(), StoreError> {
        retry(
            self.store.as_mut(),
            &self.cancel,
            self.health.as_deref(),
            |store| store.commit(batch),
        )
    }

    /// Evaluates rotations and key ages at `now_ms` (or hands the tick to the test hook).
    fn evaluate(&mut self, now_ms: i64) -> anyhow::Result<()> {
        // The evaluation reads what is committed.
        self.settle_commit()?;
        if let Some(hook) = &mut self.on_tick {
            hook(Tick {
                now_ms,
                engine: &mut self.engine,
                store: self.store.as_mut(),
                streamed: std::mem::take(&mut self.streamed),
            });
            return Ok(());
        }
        let evaluator = self
            .gate
            .as_ref()
            .is_none_or(|g| g.load(std::sync::atomic::Ordering::SeqCst));
        metrics::gauge!("keywatch_rotation_evaluator").set(if evaluator { 1.0 } else { 0.0 });
        if !evaluator {
            // Another member of the group evaluates rotations.
            return Ok(());
        }
        metrics::counter!("keywatch_evaluations_total").increment(1);
        let Some(ds) = self.store.detection() else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let (found, rotations) = self.engine.evaluate_with_rotations(now_ms, &*ds);
        let took = started.elapsed();
        metrics::histogram!("keywatch_evaluation_seconds").record(took.as_secs_f64());
        metrics::gauge!("keywatch_rotations_open").set(rotations.len() as f64);
        tracing::debug!(
            rotations = rotations.len(),
            findings = found.len(),
            took_ms = took.as_millis() as u64,
            "rotations evaluated"
        );
        match self.sink.evaluated(self.store.as_mut(), found, rotations) {
            // The store is away for a while: this evaluation is dropped, the next one (on
            // the schedule) says the same again; ingestion goes on retrying its commits.
            Err(e) if e.is_transient() => {
                metrics::counter!("keywatch_store_errors_total", "kind" => "transient")
                    .increment(1);
                tracing::warn!(error = %e, "cannot store an evaluation's findings; the next evaluation tries again");
                Ok(())
            }
            other => other.context("storing findings"),
        }
    }
}

/// Retries transient store errors with capped exponential backoff until `op` works or
/// keywatch is asked to stop (the batch is then read again at the next start).
/// `/readyz` hears of the store's trouble (and of its end) through `health`.
fn retry(
    store: &mut dyn Store,
    cancel: &CancellationToken,
    health: Option<&Health>,
    mut op: impl FnMut(&mut dyn Store) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut delay = Duration::from_millis(100);
    loop {
        match op(store) {
            Err(e) if e.is_transient() && !cancel.is_cancelled() => {
                metrics::counter!("keywatch_store_errors_total", "kind" => "transient")
                    .increment(1);
                tracing::warn!(error = %e, retry_in = ?delay, "store unavailable, retrying");
                if let Some(h) = health {
                    h.store_failing(&e.to_string());
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            other => {
                if let (Some(h), Ok(())) = (health, &other) {
                    h.store_answers();
                }
                return other;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Outcome;
    use crate::source::FilePosition;
    use crate::store::SqliteStore;
    use std::borrow::Cow;
    use std::sync::Mutex;

    const H: i64 = 3_600_000;

    fn scratch(clock: Clock) -> Pipeline {
        Pipeline::new(Parts {
            store: Box::new(SqliteStore::open_file(std::path::Path::new(":memory:")).unwrap()),
            registry: RegistryFeed::new(None, Duration::from_secs(3600)),
            policy: Policy::default(),
            clock,
            findings: FindingSink::new(None),
            source_id: "test".into(),
        })
        .unwrap()
    }

    fn event(ts_ms: i64) -> AuthEvent<'static> {
        AuthEvent::new(ts_ms, Cow::Borrowed("k1"), 200, Outcome::Ok)
    }

    /// Dead letters kept in memory: (offset, reason, redacted line).
    struct Kept(Arc<Mutex<Vec<(u64, String, String)>>>);

    impl DeadLetterSink for Kept {
        fn write(&mut self, r: &DeadLetter<'_>) -> std::io::Result<()> {
            self.0
                .lock()
                .unwrap()
                .push((r.offset, r.reason.clone(), r.line.clone()));
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn describe(&self) -> String {
            "memory".into()
        }
    }

    #[test]
    fn a_batch_decoded_on_several_threads_is_the_same_as_on_one() {
        // 20,001 lines (three runs of 6,667 on three threads), with undecodable lines and a
        // Kong batch array of two records among them, and raw keys to fingerprint.
        let mut batch = Batch::default();
        let mut offset = 0;
        for i in 0..20_001u64 {
            let line = match i % 997 {
                13 => "{not json".to_owned(),
                500 => "[1, 2]".to_owned(),
                700 => format!(
                    r#"[{{"started_at":{t},"response":{{"status":200}},"request":{{"headers":{{"apikey":"sk_live_a{k}"}}}}}},{{"started_at":{t},"response":{{"status":401}}}}]"#,
                    t = 1_700_000_000_000 + i,
                    k = i % 7
                ),
                _ => format!(
                    r#"{{"started_at":{},"client_ip":"10.0.0.{}","response":{{"status":200}},"request":{{"method":"GET","uri":"/v1/x","headers":{{"apikey":"sk_live_key{}"}}}}}}"#,
                    1_700_000_000_000 + i,
                    i % 250,
                    i % 101
                ),
            };
            batch.push_line(line.as_bytes(), offset);
            offset += line.len() as u64 + 1;
        }
        let decode = |threads: usize| {
            let kept = Arc::new(Mutex::new(Vec::new()));
            let decoder = Decoder::new(
                crate::event::Format::Kong,
                crate::event::Fingerprinter::new(b"secret", 4),
                None,
            );
            let mut stage = LineStage::new(
                decoder,
                Some(Box::new(Kept(Arc::clone(&kept)))),
                "test".into(),
                threads,
            );
            let (events, rejected) = stage.decode(&batch).unwrap();
            let events: Vec<(usize, u32, String, i64, u16, Option<String>)> = events
                .iter()
                .map(|d| {
                    (
                        d.line,
                        d.index,
                        d.event.key_id.to_string(),
                        d.event.ts_ms,
                        d.event.status,
                        d.event.source_ip.as_deref().map(str::to_owned),
                    )
                })
                .collect();
            let kept = kept.lock().unwrap().clone();
            (events, rejected, kept)
        };
        let one = decode(1);
        let kind = |k: u64| (0..20_001u64).filter(|i| i % 997 == k).count();
        let (bad, arrays) = (kind(13) + kind(500), kind(700));
        assert_eq!((bad, arrays), (41, 20));
        assert_eq!(one.1, bad as u64);
        assert_eq!(
            one.0.len(),
            20_001 - bad + arrays,
            "a batch array gives two events"
        );
        assert_eq!(one.2.len(), bad);
        assert!(
            one.2.windows(2).all(|w| w[0].0 < w[1].0),
            "dead letters in line order"
        );
        for threads in [2, 3, 4] {
            assert_eq!(decode(threads), one, "{threads} threads");
        }
    }

    #[test]
    fn each_tick_sees_exactly_the_events_before_it_whatever_the_batches() {
        // Events every 10 minutes over 5 hours; ticks at each hour. The count stored when a
        // tick runs must be the number of events before it, in one batch or many.
        let times: Vec<i64> = (0..30).map(|i| 10 * H + i * 600_000).collect();
        let expected: Vec<(i64, u64)> = (11..=14)
            .map(|h| (h * H, times.iter().filter(|t| **t < h * H).count() as u64))
            .collect();
        for chunk in [1, 7, 30] {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let mut p = scratch(Clock::Event(crate::daemon::schedule::Ticks::Every(H)));
            let s = Arc::clone(&seen);
            p.on_tick(move |t| {
                let usage = t
                    .store
                    .detection()
                    .unwrap()
                    .rotation_data("k1", "k2", 0)
                    .unwrap();
                let n: u64 = usage.hourly.iter().map(|h| h.old_requests).sum();
                s.lock().unwrap().push((t.now_ms, n));
            });
            for c in times.chunks(chunk) {
                p.process_events(c.iter().map(|t| event(*t)).collect())
                    .unwrap();
            }
            let summary = p.finish().unwrap();
            assert_eq!(summary.events, 30);
            let seen = seen.lock().unwrap();
            assert_eq!(&seen[..4], &expected[..], "chunks of {chunk}");
            // The last evaluation: at the last event, with everything.
            assert_eq!(seen[4], (*times.last().unwrap(), 30), "chunks of {chunk}");
        }
    }

    /// 30 lines, one every 10 minutes from 10:00, in one batch from `position`; ticks every
    /// hour, each cutting the batch (the hook reads the store). Keywatch is asked to stop
    /// during the 11:00 tick. Returns the ticks evaluated, whether the batch was
    /// acknowledged, the stored position's offset, the summary's (lines, events, batches),
    /// and the offset of the seventh line.
    fn stopped_during_a_batch(position: Position) -> (Vec<i64>, bool, u64, (u64, u64, u64), u64) {
        let mut batch = Batch::default();
        let mut offset = 0;
        for i in 0..30i64 {
            let line = format!(
                r#"{{"started_at":{},"response":{{"status":200}},"request":{{"headers":{{"apikey":"sk_live_a"}}}}}}"#,
                10 * H + i * 600_000
            );
            batch.push_line(line.as_bytes(), offset);
            offset += line.len() as u64 + 1;
        }
        batch.position = Some(match position {
            Position::File(f) => Position::File(FilePosition { offset, ..f }),
            Position::Stdin { .. } => Position::Stdin { offset },
            other => other,
        });
        let seventh = match position_before(&batch, 6) {
            Some(Position::File(f)) => f.offset,
            Some(Position::Stdin { offset }) => offset,
            other => panic!("{other:?}"),
        };
        let acked = Arc::new(AtomicBool::new(false));
        let a = Arc::clone(&acked);
        batch.on_commit = Some(Box::new(move || {
            a.store(true, std::sync::atomic::Ordering::SeqCst)
        }));
        let mut p = scratch(Clock::Event(crate::daemon::schedule::Ticks::Every(H)));
        let cancel = CancellationToken::new();
        p.stop_retrying_on(cancel.clone());
        let ticks = Arc::new(Mutex::new(Vec::new()));
        let t = Arc::clone(&ticks);
        p.on_tick(move |tick| {
            t.lock().unwrap().push(tick.now_ms);
            cancel.cancel();
        });
        let mut stage = LineStage::new(
            Decoder::new(
                crate::event::Format::Kong,
                crate::event::Fingerprinter::new(b"secret", 4),
                None,
            ),
            None,
            "test".into(),
            1,
        );
        p.process_batch(&mut stage, batch).unwrap();
        let (_, store) = p.parts_mut();
        let stored = match store.position("test").unwrap() {
            Some(Position::File(f)) => f.offset,
            Some(Position::Stdin { offset }) => offset,
            other => panic!("{other:?}"),
        };
        let summary = p.finish().unwrap();
        let ticks = ticks.lock().unwrap().clone();
        (
            ticks,
            acked.load(std::sync::atomic::Ordering::SeqCst),
            stored,
            (summary.lines, summary.events, summary.batches),
            seventh,
        )
    }

    #[test]
    fn asked_to_stop_a_batch_ends_at_its_next_cut_unacknowledged() {
        let file = Position::File(FilePosition {
            path: "/x".into(),
            dev: 1,
            inode: 2,
            offset: 0,
        });
        let (ticks, acked, stored, summary, seventh) = stopped_during_a_batch(file);
        assert_eq!(ticks, [11 * H]);
        assert!(!acked);
        // The six lines before 11:00 are stored, with the position of the seventh.
        assert_eq!(stored, seventh);
        assert_eq!(summary, (6, 6, 0));
    }

    #[test]
    fn asked_to_stop_a_batch_from_stdin_is_stored_whole() {
        // Standard input cannot be read again: the whole batch, each of its ticks, then
        // the last evaluation at the last event.
        let (ticks, acked, _, summary, _) = stopped_during_a_batch(Position::Stdin { offset: 0 });
        assert_eq!(
            ticks,
            [11 * H, 12 * H, 13 * H, 14 * H, 10 * H + 29 * 600_000]
        );
        assert!(acked);
        assert_eq!(summary, (30, 30, 1));
    }

    #[test]
    fn a_refused_request_counts_for_the_key_its_alias_names() {
        let registry = Registry::parse(
            "k.toml",
            "[owners.o]\n[[keys]]\nid = \"k1\"\nowner = \"o\"\naliases = [\"fp:abc\"]\n",
        )
        .unwrap();
        let mut p = crate::daemon::backtest::replay_pipeline(
            Arc::new(registry),
            Policy::default(),
            crate::daemon::schedule::Ticks::At(Vec::new()),
        )
        .unwrap();
        let mut refused = AuthEvent::new(
            10 * H + 1,
            Cow::Borrowed("fp:abc"),
            401,
            Outcome::InvalidKey,
        );
        refused.source_ip = Some(Cow::Borrowed("10.0.0.1"));
        p.process_events(vec![event(10 * H), refused]).unwrap();
        let (_, store) = p.parts_mut();
        let usage = store
            .detection()
            .unwrap()
            .rotation_data("k1", "k2", 0)
            .unwrap();
        let hour = &usage.hourly[0];
        assert_eq!((hour.old_requests, hour.old_failures), (2, 1));
        assert!(usage.old_sources.len() == 2, "{:?}", usage.old_sources);
    }

    #[test]
    fn a_batch_position_is_cut_between_lines() {
        let mut b = Batch::default();
        for (i, line) in ["a", "bb", "ccc"].iter().enumerate() {
            b.push_line(line.as_bytes(), [0u64, 2, 5][i]);
        }
        b.position = Some(Position::File(FilePosition {
            path: "/x".into(),
            dev: 1,
            inode: 2,
            offset: 9,
        }));
        let offset = |p: Option<Position>| match p {
            Some(Position::File(f)) => f.offset,
            other => panic!("{other:?}"),
        };
        assert_eq!(offset(position_before(&b, 1)), 2);
        assert_eq!(offset(position_before(&b, 2)), 5);
        assert_eq!(offset(position_before(&b, 3)), 9);

        let mut k = Batch::default();
        for (i, (p, o)) in [(0, 10u64), (1, 4), (0, 11)].iter().enumerate() {
            k.push_line(format!("m{i}").as_bytes(), *o);
            k.partitions.push(*p);
            k.topics.push(Arc::from("t"));
        }
        k.position = Some(Position::Kafka {
            offsets: Vec::new(),
        });
        assert_eq!(position_before(&k, 0), None);
        let Some(Position::Kafka { offsets }) = position_before(&k, 2) else {
            panic!()
        };
        let mut got: Vec<_> = offsets.iter().map(|p| (p.partition, p.offset)).collect();
        got.sort();
        assert_eq!(got, [(0, 11), (1, 5)]);
    }
}
