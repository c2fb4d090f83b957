//! Folds decoded events into per-key per-minute rollups and per-key sources.
//!
//! Pure, no IO. One [`Aggregate`] holds the effect of one batch; the store adds it to what
//! it has in the same transaction as the source position, which is what makes a batch
//! count exactly once. The hot path allocates only when a key, minute or source is new in
//! the batch.

use std::collections::HashMap;
use std::hash::BuildHasher;

use crate::event::{AuthEvent, Outcome};

/// Upper bounds (ms) of the latency histogram buckets; a last bucket takes the rest.
pub const LATENCY_BOUNDS_MS: [f64; 11] = [
    5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// Counts of one key in one minute.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rollup {
    pub requests: u64,
    /// Indexed by [`Outcome::index`].
    pub outcomes: [u64; Outcome::ALL.len()],
    pub latency_count: u64,
    pub latency_sum_ms: f64,
    pub latency_max_ms: f64,
    pub latency_buckets: [u64; LATENCY_BUCKETS],
}

impl Rollup {
    pub fn add(&mut self, outcome: Outcome, latency_ms: Option<f64>) {
        self.requests += 1;
        self.outcomes[outcome.index()] += 1;
        if let Some(l) = latency_ms {
            self.add_latency(l);
        }
    }

    /// Folds in one latency (not a request); a negative or non-finite one is ignored.
    pub fn add_latency(&mut self, l: f64) {
        if l.is_finite() && l >= 0.0 {
            self.latency_count += 1;
            self.latency_sum_ms += l;
            self.latency_max_ms = self.latency_max_ms.max(l);
            let b = LATENCY_BOUNDS_MS.partition_point(|bound| *bound < l);
            self.latency_buckets[b] += 1;
        }
    }

    /// This rollup with its latency fields taken from `lat` (none when `None`).
    pub fn with_latency_of(&self, lat: Option<&Rollup>) -> Rollup {
        let mut r = self.clone();
        let l = lat.cloned().unwrap_or_default();
        r.latency_count = l.latency_count;
        r.latency_sum_ms = l.latency_sum_ms;
        r.latency_max_ms = l.latency_max_ms;
        r.latency_buckets = l.latency_buckets;
        r
    }

    pub fn merge(&mut self, other: &Rollup) {
        self.requests += other.requests;
        for (a, b) in self.outcomes.iter_mut().zip(other.outcomes) {
            *a += b;
        }
        self.latency_count += other.latency_count;
        self.latency_sum_ms += other.latency_sum_ms;
        self.latency_max_ms = self.latency_max_ms.max(other.latency_max_ms);
        for (a, b) in self.latency_buckets.iter_mut().zip(other.latency_buckets) {
            *a += b;
        }
    }

    /// Authentication failures ([`Outcome::is_auth_failure`]): rate limits are counted
    /// apart, in `outcomes`.
    pub fn failures(&self) -> u64 {
        Outcome::ALL
            .iter()
            .filter(|o| o.is_auth_failure())
            .map(|o| self.outcomes[o.index()])
            .sum()
    }

    /// The latency under which a fraction `q` of requests fell, interpolated linearly
    /// within the histogram bucket where the quantile lands, and never above the maximum.
    pub fn latency_quantile(&self, q: f64) -> Option<f64> {
        if self.latency_count == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.latency_count as f64;
        let mut seen = 0.0;
        for (i, &n) in self.latency_buckets.iter().enumerate() {
            let n = n as f64;
            if n > 0.0 && seen + n >= rank {
                let lower = if i == 0 {
                    0.0
                } else {
                    LATENCY_BOUNDS_MS[i - 1]
                };
                let upper = LATENCY_BOUNDS_MS
                    .get(i)
                    .copied()
                    .unwrap_or(self.latency_max_ms)
                    .min(self.latency_max_ms);
                let within = ((rank - seen) / n).clamp(0.0, 1.0);
                return Some(lower.min(upper) + (upper - lower.min(upper)) * within);
            }
            seen += n;
        }
        Some(self.latency_max_ms)
    }
}

/// What identifies a source of a key's traffic. Absent fields are empty strings, so that
/// the tuple can be a primary key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey {
    pub key_id: String,
    pub ip: String,
    pub user_agent: String,
    pub endpoint: String,
    pub gateway: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceStats {
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub requests: u64,
    /// Authentication failures (not rate limits).
    pub failures: u64,
}

/// What the batch saw of one key beyond its rollups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySeen {
    pub hint: Option<String>,
    pub consumer: Option<String>,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
}

/// foldhash: several times faster than SipHash on the short keys of the hot path, and still
/// seeded per process (the keys come from clients, so a fixed hash would invite flooding).
type Fast = foldhash::fast::RandomState;

/// The effect of a batch of events.
#[derive(Debug, Default)]
pub struct Aggregate {
    /// Events folded in.
    pub events: u64,
    keys: HashMap<String, KeyAgg, Fast>,
    hasher: Fast,
    /// The Kafka topic partitions the events came from ([`Aggregate::add_from`]); a key's
    /// `parts` bit `i` stands for entry `i % 64` (a batch rarely covers more).
    partitions: Vec<(std::sync::Arc<str>, i32)>,
}

#[derive(Debug, Default)]
struct KeyAgg {
    seen: KeySeen,
    minutes: HashMap<i64, Rollup, Fast>,
    /// Per minute, the latencies of the requests the upstream answered (accepted, status
    /// below 500): what the anomaly models judge, see [`Aggregate::answered_latency`].
    answered: HashMap<i64, Rollup, Fast>,
    /// Sources by a hash of their fields; collisions are rare and kept in the vector, so a
    /// lookup never needs to build the owned key.
    sources: HashMap<u64, Vec<(SourceKey, SourceStats)>, Fast>,
    /// Bits of `Aggregate::partitions` the key's events came from.
    parts: u64,
}

fn field<'e>(f: &'e Option<std::borrow::Cow<'_, str>>) -> &'e str {
    f.as_deref().unwrap_or("")
}

/// Start of the minute of `ts_ms`, in ms.
pub fn minute_of(ts_ms: i64) -> i64 {
    ts_ms.div_euclid(60_000) * 60_000
}

impl Aggregate {
    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    pub fn add(&mut self, ev: &AuthEvent<'_>) {
        self.add_in(ev, 0);
    }

    /// Adds an event read from a Kafka topic partition: the stores and the anomaly models
    /// learn which partitions each key's traffic came from (so that a member of a consumer
    /// group keeps only the keys of its partitions).
    pub fn add_from(&mut self, ev: &AuthEvent<'_>, topic: &std::sync::Arc<str>, partition: i32) {
        // The events of a batch come in runs of one partition: the last entry first.
        let i =
            match self.partitions.iter().rposition(|(t, p)| {
                *p == partition && (std::sync::Arc::ptr_eq(t, topic) || t == topic)
            }) {
                Some(i) => i,
                None => {
                    self.partitions
                        .push((std::sync::Arc::clone(topic), partition));
                    self.partitions.len() - 1
                }
            };
        self.add_in(ev, 1u64 << (i % 64));
    }

    fn add_in(&mut self, ev: &AuthEvent<'_>, part_bit: u64) {
        self.events += 1;
        let key = match self.keys.get_mut(ev.key_id.as_ref()) {
            Some(k) => k,
            None => self
                .keys
                .entry(ev.key_id.clone().into_owned())
                .or_insert_with(|| KeyAgg {
                    seen: KeySeen {
                        first_seen_ms: ev.ts_ms,
                        last_seen_ms: ev.ts_ms,
                        ..KeySeen::default()
                    },
                    ..KeyAgg::default()
                }),
        };
        key.parts |= part_bit;
        let seen = &mut key.seen;
        seen.first_seen_ms = seen.first_seen_ms.min(ev.ts_ms);
        seen.last_seen_ms = seen.last_seen_ms.max(ev.ts_ms);
        if seen.hint.is_none() {
            seen.hint.clone_from(&ev.key_hint);
        }
        if let (None, Some(c)) = (&seen.consumer, &ev.consumer) {
            seen.consumer = Some(c.to_string());
        }

        let minute = minute_of(ev.ts_ms);
        key.minutes
            .entry(minute)
            .or_default()
            .add(ev.outcome, ev.latency_ms);
        // The key's own latency only when the upstream answered: a 5xx or a timeout is the
        // upstream's health, and a refused request (401, 429) never reached it.
        if let Some(l) = ev
            .latency_ms
            .filter(|_| ev.outcome == Outcome::Ok && ev.status < 500)
        {
            key.answered.entry(minute).or_default().add_latency(l);
        }

        let (ip, ua, endpoint, gateway) = (
            field(&ev.source_ip),
            field(&ev.user_agent),
            field(&ev.endpoint),
            field(&ev.gateway),
        );
        let hash = self.hasher.hash_one((ip, ua, endpoint, gateway));
        let chain = key.sources.entry(hash).or_default();
        let failure = u64::from(ev.outcome.is_auth_failure());
        match chain.iter_mut().find(|(k, _)| {
            k.ip == ip && k.user_agent == ua && k.endpoint == endpoint && k.gateway == gateway
        }) {
            Some((_, st)) => {
                st.first_seen_ms = st.first_seen_ms.min(ev.ts_ms);
                st.last_seen_ms = st.last_seen_ms.max(ev.ts_ms);
                st.requests += 1;
                st.failures += failure;
            }
            None => chain.push((
                SourceKey {
                    key_id: ev.key_id.to_string(),
                    ip: ip.to_owned(),
                    user_agent: ua.to_owned(),
                    endpoint: endpoint.to_owned(),
                    gateway: gateway.to_owned(),
                },
                SourceStats {
                    first_seen_ms: ev.ts_ms,
                    last_seen_ms: ev.ts_ms,
                    requests: 1,
                    failures: failure,
                },
            )),
        }
    }

    /// The latencies of a key's minute that describe the key (requests the upstream
    /// answered: accepted, status below 500), in a rollup of latency fields only; `None`
    /// when there were none. The stored rollups keep every latency.
    pub fn answered_latency(&self, key_id: &str, minute_ms: i64) -> Option<&Rollup> {
        self.keys.get(key_id)?.answered.get(&minute_ms)
    }

    /// Per key and minute: `(key_id, minute_ms, rollup)`.
    pub fn rollups(&self) -> impl Iterator<Item = (&str, i64, &Rollup)> {
        self.keys
            .iter()
            .flat_map(|(k, agg)| agg.minutes.iter().map(move |(m, r)| (k.as_str(), *m, r)))
    }

    pub fn sources(&self) -> impl Iterator<Item = (&SourceKey, &SourceStats)> {
        self.keys
            .values()
            .flat_map(|agg| agg.sources.values().flatten().map(|(k, s)| (k, s)))
    }

    pub fn keys(&self) -> impl Iterator<Item = (&str, &KeySeen)> {
        self.keys.iter().map(|(k, agg)| (k.as_str(), &agg.seen))
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// The Kafka topic partitions each key's events came from (events added with
    /// [`Aggregate::add_from`]; none for files and stdin): `(key, topic, partition, the
    /// key's last event in the batch)`.
    pub fn key_partitions(&self) -> impl Iterator<Item = (&str, &str, i32, i64)> {
        self.keys.iter().flat_map(move |(k, agg)| {
            self.partitions
                .iter()
                .enumerate()
                .filter(move |(i, _)| agg.parts & (1u64 << (i % 64)) != 0)
                .map(move |(_, (t, p))| (k.as_str(), t.as_ref(), *p, agg.seen.last_seen_ms))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    fn ev(ts_ms: i64, key: &'static str, ip: &'static str, outcome: Outcome) -> AuthEvent<'static> {
        let mut e = AuthEvent::new(ts_ms, Cow::Borrowed(key), 200, outcome);
        e.source_ip = Some(Cow::Borrowed(ip));
        e.latency_ms = Some(42.0);
        e
    }

    #[test]
    fn keys_remember_their_topic_partitions() {
        let (logs, other): (std::sync::Arc<str>, std::sync::Arc<str>) =
            ("logs".into(), "other".into());
        let mut agg = Aggregate::default();
        agg.add_from(&ev(1_000, "a", "ip", Outcome::Ok), &logs, 0);
        agg.add_from(&ev(2_000, "b", "ip", Outcome::Ok), &logs, 1);
        agg.add_from(&ev(3_000, "a", "ip", Outcome::Ok), &logs, 1);
        // The same partition number of another topic, its name in another allocation.
        agg.add_from(&ev(4_000, "c", "ip", Outcome::Ok), &other, 0);
        agg.add_from(&ev(5_000, "c", "ip", Outcome::Ok), &"other".into(), 0);
        agg.add(&ev(6_000, "d", "ip", Outcome::Ok));
        let mut got: Vec<_> = agg.key_partitions().collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("a", "logs", 0, 3_000),
                ("a", "logs", 1, 3_000),
                ("b", "logs", 1, 2_000),
                ("c", "other", 0, 5_000)
            ]
        );
        assert_eq!(agg.events, 6);
        assert_eq!(agg.key_count(), 4);
    }

    #[test]
    fn folds_by_key_minute_and_source() {
        let mut agg = Aggregate::default();
        agg.add(&ev(60_000, "a", "10.0.0.1", Outcome::Ok));
        agg.add(&ev(60_500, "a", "10.0.0.1", Outcome::InvalidKey));
        agg.add(&ev(120_000, "a", "10.0.0.2", Outcome::Ok));
        agg.add(&ev(119_999, "b", "10.0.0.1", Outcome::Ok));
        assert_eq!(agg.events, 4);
        assert_eq!(agg.key_count(), 2);

        let mut rollups: Vec<_> = agg
            .rollups()
            .map(|(k, m, r)| (k.to_owned(), m, r.requests, r.failures()))
            .collect();
        rollups.sort();
        assert_eq!(
            rollups,
            vec![
                ("a".into(), 60_000, 2, 1),
                ("a".into(), 120_000, 1, 0),
                ("b".into(), 60_000, 1, 0)
            ]
        );

        let mut sources: Vec<_> = agg
            .sources()
            .map(|(k, s)| {
                (
                    k.key_id.clone(),
                    k.ip.clone(),
                    s.requests,
                    s.failures,
                    s.first_seen_ms,
                    s.last_seen_ms,
                )
            })
            .collect();
        sources.sort();
        assert_eq!(
            sources,
            vec![
                ("a".into(), "10.0.0.1".into(), 2, 1, 60_000, 60_500),
                ("a".into(), "10.0.0.2".into(), 1, 0, 120_000, 120_000),
                ("b".into(), "10.0.0.1".into(), 1, 0, 119_999, 119_999),
            ]
        );
    }

    #[test]
    fn the_keys_latency_leaves_out_upstream_failures_and_refusals() {
        let mut agg = Aggregate::default();
        // (status, outcome, latency, counted as the key's latency)
        let cases = [
            (200, Outcome::Ok, 40.0, true),
            (404, Outcome::Ok, 20.0, true),
            (504, Outcome::Ok, 60_000.0, false),
            (502, Outcome::Ok, 3.0, false),
            (401, Outcome::InvalidKey, 1.0, false),
            (429, Outcome::RateLimited, 1.0, false),
        ];
        for (status, outcome, l, _) in cases {
            let mut e = ev(60_000, "a", "10.0.0.1", outcome);
            e.status = status;
            e.latency_ms = Some(l);
            agg.add(&e);
        }
        let counted: Vec<f64> = cases.iter().filter(|c| c.3).map(|c| c.2).collect();
        let answered = agg.answered_latency("a", 60_000).unwrap();
        assert_eq!(answered.latency_count, counted.len() as u64);
        assert_eq!(answered.latency_sum_ms, counted.iter().sum::<f64>());
        assert_eq!(answered.latency_max_ms, 40.0);
        // The stored rollup keeps every request and latency; failures are auth failures.
        let (_, _, r) = agg.rollups().next().unwrap();
        assert_eq!((r.requests, r.latency_count, r.failures()), (6, 6, 1));
        let judged = r.with_latency_of(Some(answered));
        assert_eq!((judged.requests, judged.latency_count), (6, 2));
        assert!(agg.answered_latency("a", 0).is_none());
    }

    #[test]
    fn minutes_floor_negative_times() {
        assert_eq!(minute_of(-1), -60_000);
        assert_eq!(minute_of(59_999), 0);
        assert_eq!(minute_of(60_000), 60_000);
    }

    #[test]
    fn latency_histogram_and_quantiles() {
        let mut r = Rollup::default();
        for l in [1.0, 7.0, 30.0, 30.0, 200.0, 20_000.0] {
            r.add(Outcome::Ok, Some(l));
        }
        r.add(Outcome::Ok, None);
        r.add(Outcome::Ok, Some(f64::NAN));
        assert_eq!(r.requests, 8);
        assert_eq!(r.latency_count, 6);
        assert_eq!(r.latency_buckets[0], 1);
        assert_eq!(r.latency_buckets[1], 1);
        assert_eq!(r.latency_buckets[3], 2);
        assert_eq!(r.latency_buckets[5], 1);
        assert_eq!(r.latency_buckets[11], 1);
        // Rank 3 of 6 lands on the first of two values in the 25-50 ms bucket.
        assert_eq!(r.latency_quantile(0.5), Some(37.5));
        assert_eq!(r.latency_quantile(1.0), Some(20_000.0));
        assert_eq!(r.latency_quantile(0.0), Some(0.0));
        assert_eq!(Rollup::default().latency_quantile(0.5), None);

        let mut m = Rollup::default();
        m.merge(&r);
        m.merge(&r);
        assert_eq!(m.requests, 16);
        assert_eq!(m.latency_max_ms, 20_000.0);
        assert_eq!(m.latency_buckets[3], 4);
    }
}
