//! Raw events read back for `keywatch backtest --from/--to` ([`ClickHouseStore::replay`]).
//!
//! Only rows of committed batches are replayed (`batch_end` below the committed next offset
//! of their partition, as in the rotation view): a batch cut short by a crash never
//! happened. Events come in event time order, ties broken by where they were read (`src,
//! topic, part, msg_offset, idx`), so a log replayed from ClickHouse is in the same order
//! as the same log read from its file when the file is sorted by time.
//!
//! Memory stays bounded: events are read one hour of event time at a time, and an hour with
//! more than a page of events is read in pages (keyset pagination on the sort key). An hour
//! without events costs one query, and a run of them one more (the next event's time).
//! The time filter also names `ts` (seconds), which partitions the table, so each query only
//! reads the days it needs. SQL for 18.16 and current servers; every statement is in the
//! catalog (`catalog.rs`) that `tests/chdb` runs on both.

use std::borrow::Cow;

use ::clickhouse::Row;
use serde::Deserialize;

use super::rowbinary::seconds;
use super::schema::{lit, Sql, Table};
use super::{ClickHouseStore, REPORT_TIMEOUT};
use crate::event::{AuthEvent, Outcome};
use crate::store::StoreError;

const HOUR_MS: i64 = 3_600_000;

/// Events per query: a page of events in memory at a time.
const PAGE_ROWS: u64 = 50_000;

/// Where a page ends in the replay order: `ts_ms, src, topic, part, msg_offset, idx`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayKey {
    pub ts_ms: i64,
    pub src: String,
    pub topic: String,
    pub part: i32,
    pub msg_offset: i64,
    pub idx: u32,
}

/// The columns every replay query reads before filtering on the commit state.
const EVENT_FIELDS: &str = "ts_ms, key_id, key_hint, consumer, source_ip, user_agent, method, \
                            endpoint, status, toInt8(outcome) AS e_outcome, latency_ms, gateway, \
                            request_id, src, topic, part, msg_offset, idx, batch_end";

impl Sql {
    /// `ts_ms` in `[from_ms, to_ms)`, and `ts` around it so that only the days of the range
    /// are read.
    fn replay_range(from_ms: i64, to_ms: i64) -> String {
        format!(
            "ts >= toDateTime({}) AND ts <= toDateTime({}) AND ts_ms >= {from_ms} \
             AND ts_ms < {to_ms}",
            seconds(from_ms),
            seconds(to_ms)
        )
    }

    /// Events of committed batches with `ts_ms` in `[from_ms, to_ms)` and after `after` in
    /// the replay order (`ts_ms, src, topic, part, msg_offset, idx`), the first `limit` in
    /// that order: `ts_ms, key_id, key_hint, consumer, source_ip, user_agent, method,
    /// endpoint, status, outcome (Int8), latency_ms, gateway, request_id, src, topic, part,
    /// msg_offset, idx`.
    pub fn replay_events(
        &self,
        from_ms: i64,
        to_ms: i64,
        after: Option<&ReplayKey>,
        limit: u64,
    ) -> String {
        let after = after
            .map(|k| {
                format!(
                    " AND (ts_ms, src, topic, part, msg_offset, idx) > \
                     ({}, {}, {}, {}, {}, {})",
                    k.ts_ms,
                    lit(&k.src),
                    lit(&k.topic),
                    k.part,
                    k.msg_offset,
                    k.idx
                )
            })
            .unwrap_or_default();
        format!(
            "SELECT ts_ms, key_id, key_hint, consumer, source_ip, user_agent, method, endpoint, \
             status, e_outcome, latency_ms, gateway, request_id, src, topic, part, msg_offset, \
             idx FROM (SELECT {EVENT_FIELDS} FROM {events} WHERE {range}{after}) AS e \
             ANY LEFT JOIN ({committed}) AS o USING (src, topic, part) \
             WHERE batch_end < committed_next \
             ORDER BY ts_ms, src, topic, part, msg_offset, idx LIMIT {limit}",
            events = self.table(Table::Events),
            range = Self::replay_range(from_ms, to_ms),
            committed = self.committed_batches(),
        )
    }

    /// The time of the first event of a committed batch with `ts_ms` in `[from_ms, to_ms)`:
    /// `min(ts_ms), count()` (the count 0 when there is none).
    pub fn replay_next_event(&self, from_ms: i64, to_ms: i64) -> String {
        format!(
            "SELECT toInt64(min(ts_ms)) AS n_first, toUInt64(count()) AS n_events FROM (\
             SELECT ts_ms, src, topic, part, batch_end FROM {events} WHERE {range}) AS e \
             ANY LEFT JOIN ({committed}) AS o USING (src, topic, part) \
             WHERE batch_end < committed_next",
            events = self.table(Table::Events),
            range = Self::replay_range(from_ms, to_ms),
            committed = self.committed_batches(),
        )
    }
}

/// The columns of [`Sql::replay_events`].
#[derive(Row, Deserialize)]
struct EventRow {
    ts_ms: i64,
    key_id: String,
    key_hint: String,
    consumer: String,
    source_ip: String,
    user_agent: String,
    method: String,
    endpoint: String,
    status: u16,
    outcome: i8,
    latency_ms: Option<f64>,
    gateway: String,
    request_id: String,
    src: String,
    topic: String,
    part: i32,
    msg_offset: i64,
    idx: u32,
}

#[derive(Row, Deserialize)]
struct NextEvent {
    first_ms: i64,
    events: u64,
}

impl EventRow {
    fn key(&self) -> ReplayKey {
        ReplayKey {
            ts_ms: self.ts_ms,
            src: self.src.clone(),
            topic: self.topic.clone(),
            part: self.part,
            msg_offset: self.msg_offset,
            idx: self.idx,
        }
    }

    /// The event as it was decoded (the store writes `None` as an empty string).
    fn into_event(self) -> Result<AuthEvent<'static>, StoreError> {
        fn opt(s: String) -> Option<Cow<'static, str>> {
            (!s.is_empty()).then_some(Cow::Owned(s))
        }
        let outcome = usize::try_from(self.outcome)
            .ok()
            .and_then(|i| Outcome::ALL.get(i).copied())
            .ok_or_else(|| {
                StoreError::Fatal(format!(
                    "replaying events: outcome {} is none keywatch writes",
                    self.outcome
                ))
            })?;
        Ok(AuthEvent {
            ts_ms: self.ts_ms,
            key_id: Cow::Owned(self.key_id),
            key_hint: Some(self.key_hint).filter(|h| !h.is_empty()),
            consumer: opt(self.consumer),
            source_ip: opt(self.source_ip),
            user_agent: opt(self.user_agent),
            method: opt(self.method),
            endpoint: opt(self.endpoint),
            status: self.status,
            outcome,
            latency_ms: self.latency_ms,
            gateway: opt(self.gateway),
            request_id: opt(self.request_id),
        })
    }
}

/// The events of committed batches in a time range, in replay order, read page by page
/// (see the module documentation). Yields an error once and then ends when a query fails.
pub struct Replay<'s> {
    store: &'s ClickHouseStore,
    to_ms: i64,
    page_rows: u64,
    /// The hour being read: `[start, end)`, within the range.
    window: (i64, i64),
    /// The last event read of the window when it was cut by the page size.
    after: Option<ReplayKey>,
    page: std::vec::IntoIter<EventRow>,
    done: bool,
    read: u64,
}

impl ClickHouseStore {
    /// The events of committed batches with `ts_ms` in `[from_ms, to_ms)`, oldest first.
    pub fn replay(&self, from_ms: i64, to_ms: i64) -> Replay<'_> {
        self.replay_paged(from_ms, to_ms, PAGE_ROWS)
    }

    /// [`Self::replay`] with pages of `page_rows` events (tests of the paging).
    #[doc(hidden)]
    pub fn replay_paged(&self, from_ms: i64, to_ms: i64, page_rows: u64) -> Replay<'_> {
        Replay {
            store: self,
            to_ms,
            page_rows: page_rows.max(1),
            window: (from_ms, hour_end(from_ms).min(to_ms)),
            after: None,
            page: Vec::new().into_iter(),
            done: from_ms >= to_ms,
            read: 0,
        }
    }
}

/// The end of the hour holding `ms`.
fn hour_end(ms: i64) -> i64 {
    ms.div_euclid(HOUR_MS)
        .saturating_mul(HOUR_MS)
        .saturating_add(HOUR_MS)
}

impl Replay<'_> {
    /// Events yielded so far.
    pub fn events_read(&self) -> u64 {
        self.read
    }

    /// Reads the next page; `false` when the range is exhausted.
    fn fill(&mut self) -> Result<bool, StoreError> {
        let store = self.store;
        let sql = store.sql();
        loop {
            let (start, end) = self.window;
            if start >= self.to_ms {
                return Ok(false);
            }
            let rows: Vec<EventRow> = store.block_on(store.fetch_within(
                REPORT_TIMEOUT,
                &sql.replay_events(start, end, self.after.as_ref(), self.page_rows),
                "reading stored events",
            ))?;
            let full = rows.len() as u64 >= self.page_rows;
            if full {
                self.after = rows.last().map(EventRow::key);
            } else {
                // The hour is read: the next one.
                self.after = None;
                self.window = (end, hour_end(end).min(self.to_ms));
            }
            if !rows.is_empty() {
                self.page = rows.into_iter();
                return Ok(true);
            }
            if end >= self.to_ms {
                return Ok(false);
            }
            // An empty hour: skip to the hour of the next event, if any.
            let next: Vec<NextEvent> = store.block_on(store.fetch_within(
                REPORT_TIMEOUT,
                &sql.replay_next_event(end, self.to_ms),
                "looking for the next stored event",
            ))?;
            match next.first().filter(|n| n.events > 0) {
                Some(n) => {
                    let start = n.first_ms.max(end);
                    self.window = (start, hour_end(start).min(self.to_ms));
                }
                None => return Ok(false),
            }
        }
    }
}

impl Iterator for Replay<'_> {
    type Item = Result<AuthEvent<'static>, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(row) = self.page.next() {
                self.read += 1;
                return Some(row.into_event());
            }
            if self.done {
                return None;
            }
            match self.fill() {
                Ok(true) => {}
                Ok(false) => {
                    self.done = true;
                    return None;
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_continue_after_the_last_key() {
        let sql = Sql::new("kw", "p_");
        let first = sql.replay_events(0, 3_600_000, None, 10);
        assert!(!first.contains("> ("), "{first}");
        assert!(first.contains("ts >= toDateTime(0) AND ts <= toDateTime(3600)"));
        assert!(first.ends_with("LIMIT 10"), "{first}");
        let key = ReplayKey {
            ts_ms: 5,
            src: "file:a'b".into(),
            topic: String::new(),
            part: 0,
            msg_offset: 42,
            idx: 1,
        };
        let next = sql.replay_events(0, 3_600_000, Some(&key), 10);
        assert!(
            next.contains(
                "(ts_ms, src, topic, part, msg_offset, idx) > (5, 'file:a\\'b', '', 0, 42, 1)"
            ),
            "{next}"
        );
    }

    #[test]
    fn hours_end_on_the_hour() {
        assert_eq!(hour_end(0), HOUR_MS);
        assert_eq!(hour_end(HOUR_MS - 1), HOUR_MS);
        assert_eq!(hour_end(HOUR_MS), 2 * HOUR_MS);
        assert_eq!(hour_end(-1), 0);
        assert_eq!(hour_end(i64::MAX), i64::MAX);
    }
}
