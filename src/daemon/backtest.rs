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
    mut pipeline: Pipeline,
) -> anyhow::Result<RunSummary> {
    let mut stage = LineStage {
        decoder,
        dead_letters: None,
        source_id: "backtest".into(),
    };
    let mut batch = Batch::default();
    let mut offset = 0u64;
    for line in lines {
        batch.push_line(&line, offset);
        offset += line.len() as u64 + 1;
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
