//! `keywatch backtest`: replays a log through the detectors with event time as the clock.
//!
//! Contract: lines are decoded, observed by the stream detectors and folded into the store
//! in event order. Whenever an event's time reaches the next evaluation tick (multiples of
//! `eval_every_ms`), everything before it is committed and the engine evaluates at the tick,
//! so each evaluation sees exactly the events before its clock; a last evaluation runs at the
//! last event's time. Findings go through [`SqliteStore::record_findings`], so each fact is
//! reported once, when it is first raised, as the notifier would have sent it. Lines that
//! do not decode are skipped and counted (logged at the end). The anomaly models (when the
//! policy enables them) are fed each committed chunk, as the daemon feeds its batches;
//! their findings are recorded the same way, when the chunk that raises them is committed.
//!
//! The events come from a log ([`backtest`]) or from anywhere else in event time order
//! ([`backtest_events`]: `keywatch backtest --from/--to` replays the committed events of a
//! time range from ClickHouse, `store::clickhouse::ClickHouseStore::replay`).
//!
//! Use a fresh store (a temporary directory): findings already in it count as known.

use std::convert::Infallible;

use crate::aggregate::Aggregate;
use crate::anomaly_feed::AnomalyFeed;
use crate::detect::{Engine, Finding};
use crate::event::{AuthEvent, Decoder};
use crate::store::{BatchWrite, SqliteStore, Store};

/// More empty ticks than this between two events are skipped, evaluating once at the last.
const MAX_EMPTY_TICKS: i64 = 10_000;

/// Replays `lines` and returns the findings raised, in the order raised: decodes them (lines
/// that do not decode are skipped and counted) and hands the events to [`backtest_events`].
pub fn backtest(
    lines: impl Iterator<Item = Vec<u8>>,
    decoder: &Decoder,
    engine: &mut Engine,
    store: &mut SqliteStore,
    eval_every_ms: i64,
) -> Result<Vec<Finding>, String> {
    let (mut rejected, mut events_seen) = (0u64, 0u64);
    let events = lines.flat_map(|line| {
        let mut events: Vec<AuthEvent<'_>> = Vec::new();
        if decoder.decode(&line, &mut events).is_err() {
            rejected += 1;
            events.clear();
        }
        events_seen += events.len() as u64;
        events
            .into_iter()
            .map(|e| Ok::<_, Infallible>(e.into_owned()))
            .collect::<Vec<_>>()
    });
    let found = backtest_events(events, engine, store, eval_every_ms)?;
    if rejected > 0 {
        tracing::warn!(
            rejected,
            events = events_seen,
            "backtest skipped lines that do not decode"
        );
    }
    Ok(found)
}

/// Replays `events` (in the order given: event time, for a meaningful replay) and returns
/// the findings raised, in the order raised. The first error from `events` stops the replay
/// and is returned.
pub fn backtest_events<E: std::fmt::Display>(
    events: impl Iterator<Item = Result<AuthEvent<'static>, E>>,
    engine: &mut Engine,
    store: &mut SqliteStore,
    eval_every_ms: i64,
) -> Result<Vec<Finding>, String> {
    if eval_every_ms <= 0 {
        return Err(format!(
            "the evaluation interval must be more than 0, found {eval_every_ms} ms"
        ));
    }
    let mut out = Vec::new();
    let mut agg = Aggregate::default();
    let mut anomaly = AnomalyFeed::new(&engine.policy().anomaly, engine.registry().clone());
    let mut next_tick: Option<i64> = None;
    let mut last_ts: Option<i64> = None;
    for ev in events {
        let ev = ev.map_err(|e| e.to_string())?;
        let tick = next_tick.get_or_insert_with(|| first_tick(ev.ts_ms, eval_every_ms));
        if ev.ts_ms >= *tick {
            flush(&mut agg, store, anomaly.as_mut(), engine, &mut out)?;
            let behind = (ev.ts_ms - *tick) / eval_every_ms;
            if behind > MAX_EMPTY_TICKS {
                *tick += behind * eval_every_ms;
            }
            while ev.ts_ms >= *tick {
                evaluate(engine, store, *tick, &mut out)?;
                *tick += eval_every_ms;
            }
        }
        engine.observe(&ev);
        agg.add(&ev);
        last_ts = Some(last_ts.map_or(ev.ts_ms, |t| t.max(ev.ts_ms)));
    }
    flush(&mut agg, store, anomaly.as_mut(), engine, &mut out)?;
    if let Some(t) = last_ts {
        evaluate(engine, store, t, &mut out)?;
    }
    Ok(out)
}

/// The first multiple of `every` after `ts`.
fn first_tick(ts: i64, every: i64) -> i64 {
    (ts.div_euclid(every) + 1) * every
}

fn flush(
    agg: &mut Aggregate,
    store: &mut SqliteStore,
    anomaly: Option<&mut AnomalyFeed>,
    engine: &Engine,
    out: &mut Vec<Finding>,
) -> Result<(), String> {
    if agg.is_empty() {
        return Ok(());
    }
    store
        .commit(&BatchWrite {
            aggregate: agg,
            events: &[],
            checkpoint: None,
        })
        .map_err(|e| e.to_string())?;
    if let Some(feed) = anomaly {
        let found = feed.observe(agg, engine.registry());
        if !found.is_empty() {
            let new = store.record_findings(&found).map_err(|e| e.to_string())?;
            out.extend(new);
        }
    }
    *agg = Aggregate::default();
    Ok(())
}

fn evaluate(
    engine: &mut Engine,
    store: &mut SqliteStore,
    now_ms: i64,
    out: &mut Vec<Finding>,
) -> Result<(), String> {
    let found = engine.evaluate(now_ms, &*store);
    let new = store.record_findings(&found).map_err(|e| e.to_string())?;
    out.extend(new);
    Ok(())
}
