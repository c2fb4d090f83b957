//! RowBinary encoding of keywatch's rows, in the column order of [`super::schema`].
//!
//! RowBinary is the same on 18.16 and current versions: little-endian numbers, strings as a
//! LEB128 length and bytes, `Nullable` as a null byte before the value, `DateTime` as
//! `UInt32` seconds, `Enum8` as its `Int8` value. keywatch writes the bytes itself (instead
//! of serde rows) so that the column order lives next to the schema and the exact bytes can
//! be replayed against chdb.

use std::borrow::Cow;

use super::schema::Table;
use crate::aggregate::{Aggregate, KeySeen, Rollup, SourceKey, SourceStats};
use crate::event::AuthEvent;
use crate::store::Origin;

/// Rows of one table, encoded.
#[derive(Debug, Default)]
pub(crate) struct RowBinary {
    pub buf: Vec<u8>,
    pub rows: usize,
    /// Values written, to check the column count in tests.
    values: usize,
}

impl RowBinary {
    /// Rows encoded elsewhere (the chdb catalog replays recorded bytes).
    pub fn from_parts(buf: Vec<u8>, rows: usize) -> Self {
        RowBinary {
            buf,
            rows,
            values: 0,
        }
    }

    fn varint(&mut self, mut n: u64) {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                self.buf.push(b);
                return;
            }
            self.buf.push(b | 0x80);
        }
    }

    pub fn string(&mut self, s: &str) {
        self.values += 1;
        self.varint(s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
    }

    pub fn opt_string(&mut self, s: &Option<Cow<'_, str>>) {
        self.string(s.as_deref().unwrap_or(""));
    }

    pub fn i8(&mut self, v: i8) {
        self.values += 1;
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn u16(&mut self, v: u16) {
        self.values += 1;
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn u32(&mut self, v: u32) {
        self.values += 1;
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn i32(&mut self, v: i32) {
        self.values += 1;
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn u64(&mut self, v: u64) {
        self.values += 1;
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn i64(&mut self, v: i64) {
        self.values += 1;
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn f64(&mut self, v: f64) {
        self.values += 1;
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn nullable_f64(&mut self, v: Option<f64>) {
        match v {
            Some(v) => {
                self.buf.push(0);
                self.f64(v);
            }
            None => {
                self.values += 1;
                self.buf.push(1);
            }
        }
    }

    /// `DateTime` from milliseconds since the epoch, clamped to its range.
    pub fn datetime_ms(&mut self, ms: i64) {
        self.u32(seconds(ms));
    }

    fn end_row(&mut self) {
        self.rows += 1;
    }

    #[cfg(test)]
    pub fn values(&self) -> usize {
        self.values
    }
}

/// Seconds of a millisecond timestamp, clamped to `DateTime`'s range.
pub(crate) fn seconds(ms: i64) -> u32 {
    ms.div_euclid(1000).clamp(0, i64::from(u32::MAX)) as u32
}

/// Which batch a row belongs to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchId<'a> {
    pub src: &'a str,
    pub topic: &'a str,
    pub part: i32,
    pub batch_end: i64,
}

impl RowBinary {
    fn batch(&mut self, id: &BatchId<'_>) {
        self.string(id.src);
        self.string(id.topic);
        self.i32(id.part);
        self.i64(id.batch_end);
    }

    pub fn event(&mut self, ev: &AuthEvent<'_>, origin: &Origin, id: &BatchId<'_>) {
        self.datetime_ms(ev.ts_ms);
        self.i64(ev.ts_ms);
        self.string(&ev.key_id);
        self.string(ev.key_hint.as_deref().unwrap_or(""));
        self.opt_string(&ev.consumer);
        self.opt_string(&ev.source_ip);
        self.opt_string(&ev.user_agent);
        self.opt_string(&ev.method);
        self.opt_string(&ev.endpoint);
        self.u16(ev.status);
        self.i8(ev.outcome.index() as i8);
        self.nullable_f64(ev.latency_ms.filter(|l| l.is_finite()));
        self.opt_string(&ev.gateway);
        self.opt_string(&ev.request_id);
        self.string(id.src);
        self.string(id.topic);
        self.i32(id.part);
        self.i64(origin.offset);
        self.u32(origin.index);
        self.i64(id.batch_end);
        self.end_row();
    }

    pub fn rollup(&mut self, key_id: &str, minute_ms: i64, r: &Rollup, id: &BatchId<'_>) {
        self.string(key_id);
        self.datetime_ms(minute_ms);
        self.u64(r.requests);
        for n in r.outcomes {
            self.u64(n);
        }
        self.u64(r.latency_count);
        self.f64(r.latency_sum_ms);
        self.f64(r.latency_max_ms);
        for n in r.latency_buckets {
            self.u64(n);
        }
        self.batch(id);
        self.end_row();
    }

    pub fn source(&mut self, k: &SourceKey, s: &SourceStats, id: &BatchId<'_>) {
        self.string(&k.key_id);
        self.string(&k.ip);
        self.string(&k.user_agent);
        self.string(&k.endpoint);
        self.string(&k.gateway);
        self.i64(s.first_seen_ms);
        self.i64(s.last_seen_ms);
        self.u64(s.requests);
        self.u64(s.failures);
        self.batch(id);
        self.end_row();
    }

    pub fn key(&mut self, key_id: &str, seen: &KeySeen, id: &BatchId<'_>) {
        self.string(key_id);
        self.string(seen.hint.as_deref().unwrap_or(""));
        self.string(seen.consumer.as_deref().unwrap_or(""));
        self.i64(seen.first_seen_ms);
        self.i64(seen.last_seen_ms);
        self.batch(id);
        self.end_row();
    }

    pub fn offset(
        &mut self,
        id: &BatchId<'_>,
        next_offset: i64,
        position: &str,
        written_at_ms: i64,
    ) {
        self.string(id.src);
        self.string(id.topic);
        self.i32(id.part);
        self.i64(next_offset);
        self.i64(id.batch_end);
        self.string(position);
        self.datetime_ms(written_at_ms);
        self.end_row();
    }
}

/// Everything a batch inserts, one buffer per table.
#[derive(Debug, Default)]
pub(crate) struct EncodedBatch {
    pub events: RowBinary,
    pub rollups: RowBinary,
    pub sources: RowBinary,
    pub keys: RowBinary,
}

impl EncodedBatch {
    /// Appends the rollup, source and key rows of one stream's aggregate.
    fn aggregate(&mut self, agg: &Aggregate, id: &BatchId<'_>) {
        for (key_id, minute, r) in agg.rollups() {
            self.rollups.rollup(key_id, minute, r, id);
        }
        for (k, s) in agg.sources() {
            self.sources.source(k, s, id);
        }
        for (key_id, seen) in agg.keys() {
            self.keys.key(key_id, seen, id);
        }
    }

    /// In insert order.
    pub fn tables(&self) -> [(Table, &RowBinary); 4] {
        [
            (Table::Events, &self.events),
            (Table::RollupMinute, &self.rollups),
            (Table::KeySources, &self.sources),
            (Table::KeysSeen, &self.keys),
        ]
    }
}

/// Folds events into per-stream aggregates (readers sum the per-batch rows) and encodes
/// the events and the aggregates. Each event comes with the index of its stream's identity
/// in `ids`. `whole`: the aggregate of all the events, when there is one stream (not folded
/// again).
pub(crate) fn encode<'a, 'b: 'a, I>(
    events: I,
    ids: &[BatchId<'_>],
    whole: Option<&Aggregate>,
) -> EncodedBatch
where
    I: IntoIterator<Item = (&'a AuthEvent<'b>, &'a Origin, usize)>,
{
    let mut out = EncodedBatch::default();
    let whole = whole.filter(|_| ids.len() == 1);
    let mut aggs: Vec<Aggregate> = Vec::new();
    if whole.is_none() {
        aggs.resize_with(ids.len(), Aggregate::default);
    }
    for (ev, origin, i) in events {
        out.events.event(ev, origin, &ids[i]);
        if let Some(agg) = aggs.get_mut(i) {
            agg.add(ev);
        }
    }
    for (i, id) in ids.iter().enumerate() {
        let agg = match whole {
            Some(w) => w,
            None => &aggs[i],
        };
        if agg.events == 0 && whole.is_none() {
            continue;
        }
        out.aggregate(agg, id);
    }
    out
}

/// The result of a scoped thread; its panic, if any, goes on in the caller.
fn join<T>(h: std::thread::ScopedJoinHandle<'_, T>) -> T {
    h.join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Events below which [`encode_batch`] encodes on the calling thread alone.
const PARALLEL_ENCODE_EVENTS: usize = 4096;

/// [`encode`] for a batch's selected events, on three threads when the batch is large and
/// has one stream (`whole`): the aggregate's rows on one, each half of the events' rows on
/// another, the halves joined after (RowBinary rows simply follow one another). The
/// encoding runs on the pipeline thread between a batch's preparation and the start of its
/// commit, where nothing else overlaps it (BENCHMARKS.md, issue 19).
pub(crate) fn encode_batch(
    events: &[(&AuthEvent<'_>, &Origin, usize)],
    ids: &[BatchId<'_>],
    whole: Option<&Aggregate>,
) -> EncodedBatch {
    let (Some(agg), [id]) = (whole, ids) else {
        return encode(events.iter().copied(), ids, whole);
    };
    if events.len() < PARALLEL_ENCODE_EVENTS {
        return encode(events.iter().copied(), ids, whole);
    }
    let rows = |part: &[(&AuthEvent<'_>, &Origin, usize)]| {
        let mut out = RowBinary::default();
        out.buf.reserve(part.len() * 320);
        for (ev, origin, _) in part {
            out.event(ev, origin, id);
        }
        out
    };
    let (first, second) = events.split_at(events.len() / 2);
    let (mut out, first, second) = std::thread::scope(|s| {
        let aggregates = s.spawn(|| {
            let mut out = EncodedBatch::default();
            out.aggregate(agg, id);
            out
        });
        let first = s.spawn(|| rows(first));
        let second = rows(second);
        (join(aggregates), join(first), second)
    });
    out.events = first;
    out.events.buf.extend_from_slice(&second.buf);
    out.events.rows += second.rows;
    out.events.values += second.values;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Outcome;

    #[test]
    fn every_row_writes_every_column() {
        let mut ev = AuthEvent::new(61_500, Cow::Borrowed("k"), 200, Outcome::Ok);
        ev.latency_ms = Some(3.0);
        let origin = Origin {
            partition: 2,
            offset: 7,
            index: 0,
        };
        let ids = [BatchId {
            src: "s",
            topic: "t",
            part: 2,
            batch_end: 9,
        }];
        let b = encode([(&ev, &origin, 0)], &ids, None);
        for (table, rows) in b.tables() {
            assert_eq!(rows.rows, 1, "{table:?}");
            assert_eq!(rows.values(), table.columns().len(), "{table:?}");
        }
        let mut o = RowBinary::default();
        let id = BatchId {
            src: "s",
            topic: "t",
            part: 0,
            batch_end: 0,
        };
        o.offset(&id, 1, "", 0);
        assert_eq!(o.values(), Table::Offsets.columns().len());
    }

    #[test]
    fn a_large_batch_encoded_on_three_threads_is_the_same_bytes() {
        let evs: Vec<AuthEvent<'static>> = (0..10_001i64)
            .map(|i| {
                let mut ev = AuthEvent::new(
                    61_500 + i * 7_000,
                    Cow::Owned(format!("k{}", i % 37)),
                    if i % 5 == 0 { 401 } else { 200 },
                    if i % 5 == 0 {
                        Outcome::InvalidKey
                    } else {
                        Outcome::Ok
                    },
                );
                ev.latency_ms = Some((i % 90) as f64);
                ev.source_ip = Some(Cow::Owned(format!("10.0.0.{}", i % 9)));
                ev
            })
            .collect();
        let origins: Vec<Origin> = (0..evs.len())
            .map(|i| Origin {
                partition: 0,
                offset: i as i64,
                index: 0,
            })
            .collect();
        let mut agg = Aggregate::default();
        for ev in &evs {
            agg.add(ev);
        }
        let ids = [BatchId {
            src: "s",
            topic: "",
            part: 0,
            batch_end: 3,
        }];
        let selected: Vec<_> = evs.iter().zip(&origins).map(|(e, o)| (e, o, 0)).collect();
        let one = encode(selected.iter().copied(), &ids, Some(&agg));
        let three = encode_batch(&selected, &ids, Some(&agg));
        for ((table, a), (_, b)) in one.tables().into_iter().zip(three.tables()) {
            assert_eq!((a.rows, a.values()), (b.rows, b.values()), "{table:?}");
            assert!(a.buf == b.buf, "{table:?}: the bytes differ");
        }
        assert_eq!(three.events.rows, 10_001);
    }

    #[test]
    fn encodings() {
        let mut w = RowBinary::default();
        w.string(&"x".repeat(300));
        assert_eq!(&w.buf[..2], &[0xac, 0x02]);
        let mut w = RowBinary::default();
        w.nullable_f64(None);
        w.nullable_f64(Some(1.0));
        assert_eq!(w.buf[0], 1);
        assert_eq!(w.buf[1], 0);
        assert_eq!(w.buf.len(), 10);
        assert_eq!(seconds(-5), 0);
        assert_eq!(seconds(61_999), 61);
        assert_eq!(seconds(i64::MAX), u32::MAX);
    }
}
