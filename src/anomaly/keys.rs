//! Per-key anomaly models for the daemon: fed per-minute rollups, they raise
//! [`AnomalyFinding`]s.
//!
//! Each key has one [`KeyModel`] of bounded size: 600 bytes inline (with up to two members
//! per source set), plus the per-minute latency model and the hourly volume tail once they
//! are first fed (about 340 bytes: a key with two requests never has them), plus source
//! sets past two members (at most 3 × 32 × 8 bytes); [`AnomalyModels::bytes_per_key`]. The
//! models live in one vector of slots with a table of `u32` slot numbers as the index, so
//! a key costs its model, its id once, about 10 bytes of index and 8 of partition set (the
//! Kafka partitions it was fed from, so that a consumer-group member drops it with them): 1 M keys with two
//! requests each take about 700 MB (`cargo bench --bench memory_per_key`). The models,
//! and what each finding says it expected:
//!
//! | kind | model | expected | seen |
//! | --- | --- | --- | --- |
//! | `volume_anomaly` | hourly requests: log-scale baseline per hour of day plus a day-of-week offset, both on the key owner's wall clock (registry time zone, UTC when unknown); the residual against its SPOT tail and the count against a quasi-Poisson tail (Chernoff bound over the measured dispersion), the larger surprise wins; a 24-hour refractory period; raised once every weekday has been seen (8 days). Plus a per-minute burst test (Poisson tail over an overdispersion of 4, at least 4× the hour's baseline, once an hour) | requests in the hour (minute) | requests |
//! | `failure_rate_spike` | failures of the last 5 minutes (at least 20 requests), and of the whole hour for quiet keys, against an upper confidence bound of the key's usual rate: binomial Chernoff bound `exp(−n·KL(f/n ‖ p₀))`; at most once an hour | failure rate | failures / requests |
//! | `latency_shift` | per minute (3+ samples) mean latency (log) against its exponentially weighted mean and scale; the median of the last 5 such minutes, SPOT tail; and the hour's median latency (10+ samples) against the key's hourly level and spread for quiet keys; latencies of requests the upstream failed (5xx, timeouts) or the gateway refused are not the key's (`aggregate`); at least 1.5× up or 2× down | latency | the same, now |
//! | `new_source` | bounded sets (32 each) of networks (/24 for IPv4, /64 for IPv6: a new IP in a known network is not new), user agents and endpoints, with last-seen time; a key whose set gained no member for `source_stable_ms` (7 days) and is older than `min_history_ms` raises one finding per new member; a set that overflows is churning and raises nothing | the known members (count, stable since) | the new one, with the IP, user agent and endpoint |
//! | `dormant_key_woke` | last minute with traffic | no traffic (dormant since) | requests after `dormant_after_ms` (30 days) of silence |
//! | `out_of_scope_use` | endpoint against the key's registry scopes (a scope `invoices:read` covers endpoints with a path or route segment `invoices`; `*` covers all), and the gateway's `forbidden` outcomes of the last 5 minutes against their usual rate (binomial bound) | the scopes / forbidden rate | the endpoint / forbidden share |
//! | `behaviour_anomaly` | hourly feature vector (log requests, failure rate shrunk by 20 pseudo-requests, log median latency, log distinct networks, log distinct endpoints), hours with 20+ requests, against the key's own exponentially weighted mean and variance (χ², 4 decades beyond `min_surprise`) and against its peer group: k-means clusters (linfa) over every key's mean vector, refitted by [`AnomalyModels::refit_peers`] (χ², `min_surprise`) | own mean and peer centroid, per feature, top 3 listed | the hour's features |
//!
//! "How unusual" is a surprise, `−log10` of the tail probability (6 = one chance in a
//! million); the evidence carries it with `score = score_of_surprise(surprise)` in [0, 1].
//! A statistical finding is raised from `min_surprise` on (default 8), and only when the
//! change is also large in practice (2× for volume, 1.5× up or 2× down for latency, +5 points and 2× for
//! failure rates). Rule findings (new source, dormant key, scope) state a fact: their
//! surprise is `null`, their score 1, and the evidence says how long the set was stable
//! or the key silent. All times are event times (minute starts): no clock, so a replay
//! raises what the daemon would have. On a simulated fleet (`benches/anomaly_eval.rs`)
//! these settings find 92-100% of injected incidents of each kind with about 0.002 false
//! findings per key and week.
//!
//! Warm-up: [`AnomalyModels::warm_up`] replays stored per-minute rollups (in time order per
//! key) and [`AnomalyModels::warm_up_sources`] the stored sources, without raising
//! anything, so a restart keeps the baselines. For the embedded store:
//! `SELECT * FROM rollup_minute WHERE minute >= ?since ORDER BY key_id, minute` and
//! `SELECT key_id, ip, user_agent, endpoint, first_seen_ms, last_seen_ms FROM key_sources`;
//! 2 to 4 weeks of history is enough for every baseline.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::HashTable;
use serde_json::{json, Value};
use smallvec::SmallVec;

use super::stats::{score_of_surprise, surprise, EwScale, Tail};
use crate::aggregate::{Aggregate, Rollup, LATENCY_BUCKETS};
use crate::detect::{FindingKind, Severity};
use crate::event::{Outcome, NO_KEY};
use crate::registry::{format_rfc3339, Registry};

const MINUTE_MS: i64 = 60_000;
/// The hourly latency test needs this many latencies in the hour.
const MIN_HOURLY_LATENCY_SAMPLES: u64 = 10;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// A finding of the anomaly models: the fields of `detect::Finding` but the owner, which the
/// caller knows from the registry. Its kind is one of [`FindingKind::anomalies`].
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyFinding {
    pub kind: FindingKind,
    pub key_id: String,
    pub at_ms: i64,
    pub severity: Severity,
    pub summary: String,
    /// Always has `model`, `expected`, `seen`, `surprise` and `score`.
    pub evidence: Value,
    pub dedup_key: String,
}

/// One source of a key's traffic in the minute being observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceSeen<'a> {
    pub ip: &'a str,
    pub user_agent: &'a str,
    pub endpoint: &'a str,
}

/// Thresholds and bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyConfig {
    /// Smallest surprise (−log10 p, after corrections) that raises a statistical finding.
    /// 8 (one chance in 10⁸) because a fleet runs millions of tests a day: at 6, a fleet
    /// of 1 M keys would see hundreds of false findings a week.
    pub min_surprise: f64,
    /// Silence after which traffic counts as a dormant key waking up.
    pub dormant_after_ms: i64,
    /// A key's source set must have had no new member for this long to be "stable".
    pub source_stable_ms: i64,
    /// A key must have been seen for this long before sources can be new.
    pub min_history_ms: i64,
    /// Fewest requests in a minute for the failure and forbidden tests.
    pub min_requests: u64,
    /// Fewest requests with a latency in a minute for the latency model.
    pub min_latency_samples: u64,
    /// Keys kept; past it, the longest idle tenth goes.
    pub max_keys: usize,
    /// Peer groups (k-means clusters).
    pub peer_groups: usize,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        AnomalyConfig {
            min_surprise: 8.0,
            dormant_after_ms: 30 * DAY_MS,
            source_stable_ms: 7 * DAY_MS,
            min_history_ms: 7 * DAY_MS,
            min_requests: 20,
            min_latency_samples: 3,
            max_keys: 2_000_000,
            peer_groups: 8,
        }
    }
}

/// The "surprise" of rule findings (new source, dormant key, scope): none.
const RULE: f64 = f64::NAN;

/// Behaviour features per hour.
const FEATURES: usize = 5;
pub const FEATURE_NAMES: [&str; FEATURES] = [
    "log_requests",
    "failure_rate",
    "log_median_latency_ms",
    "log_networks",
    "log_endpoints",
];
/// Behaviour findings need this many more decades of surprise than `min_surprise` from
/// the key's own past (the volume, failure and latency models see the single features).
const BEHAVIOUR_MARGIN: f64 = 4.0;
/// Variance of per-minute counts over a Poisson's, for the minute burst test.
const OVERDISPERSION: f64 = 4.0;
/// Minutes the failure and forbidden tests add up.
const RATE_MINUTES: usize = 5;
/// Members per source set.
const SET_CAP: usize = 32;
/// Hours of baseline before the volume and behaviour models vote.
const MIN_HOURS: u32 = 48;
/// Hours of baseline before the hourly volume model raises anything: every weekday seen.
const VOLUME_HOURS: u32 = 8 * 24;
/// Hours of missing traffic filled with zeros; a longer gap restarts the hour baseline
/// alignment without counting the silence (the dormancy model covers it).
const MAX_FILL_HOURS: i64 = 24 * 7;

/// A bounded set of source fingerprints with their last-seen minute.
#[derive(Debug, Clone)]
struct SourceSet {
    /// (hash, last-seen minute); two inline: most keys have one or two of each.
    members: SmallVec<[(u32, u32); 2]>,
    /// Minute the last member was added (or the set overflowed).
    changed_min: i32,
}

impl Default for SourceSet {
    fn default() -> Self {
        SourceSet {
            members: SmallVec::new(),
            changed_min: i32::MIN,
        }
    }
}

impl SourceSet {
    /// Adds `h`; returns whether it was new, and the set's state before.
    fn touch(&mut self, h: u32, minute: i32) -> Option<(usize, i32)> {
        if let Some(m) = self.members.iter_mut().find(|m| m.0 == h) {
            m.1 = m.1.max(minute as u32);
            return None;
        }
        let before = (self.members.len(), self.changed_min);
        if self.members.len() >= SET_CAP {
            // Churning: drop the least recently seen member.
            let (i, _) = self
                .members
                .iter()
                .enumerate()
                .min_by_key(|(_, m)| m.1)
                .expect("full");
            self.members.swap_remove(i);
        }
        self.members.push((h, minute as u32));
        self.changed_min = minute;
        Some(before)
    }

    fn seen_since(&self, minute: i32) -> usize {
        self.members
            .iter()
            .filter(|m| m.1 as i64 >= minute as i64)
            .count()
    }
}

/// One key's models. Fixed size apart from the three source sets (at most 32 members each)
/// and the tails' calibration buffers (freed once calibrated).
#[derive(Debug, Clone)]
pub struct KeyModel {
    first_min: i32,
    last_min: i32,
    // The hour being accumulated.
    hour: i64,
    h_requests: u64,
    h_failures: u64,
    /// The hour's latency histogram (buckets of `aggregate::LATENCY_BOUNDS_MS`) and
    /// maximum: the hourly test and the behaviour vector use its median, so that one slow
    /// request does not move the hour.
    h_lat_buckets: [u32; LATENCY_BUCKETS],
    h_lat_max: f32,
    h_lat_n: u64,
    // Volume: log1p(hourly requests) ≈ hod[h] + dow[d].
    hod: [f32; 24],
    dow: [f32; 7],
    hod_scale: [f32; 24],
    hours: u32,
    /// Created when first fed (8 hours of baseline): before that it would be a fresh tail.
    vol_tail: Option<Box<Tail>>,
    /// Dispersion of hourly counts around the baseline, over a Poisson's (≥ 1).
    vol_disp: f32,
    vol_high: f32,
    vol_high_age: u16,
    // Failure and forbidden rates (exponentially weighted over requests).
    fail_rate: f32,
    forbid_rate: f32,
    rate_weight: f32,
    fail_alert_min: i32,
    forbid_alert_min: i32,
    burst_alert_min: i32,
    /// Requests in a minute with traffic, and their dispersion over a Poisson's.
    min_mean: f32,
    min_disp: f32,
    /// The last minutes' (minute, requests, failures, forbidden), for the rate tests.
    recent: [(i32, u32, u32, u32); RATE_MINUTES],
    /// Created at the first minute with enough latencies: until then it would hold its
    /// initial state, so a key that never has one pays a pointer.
    lat: Option<Box<Latency>>,
    lat_alert_min: i32,
    // Sources.
    nets: SourceSet,
    agents: SourceSet,
    endpoints: SourceSet,
    // Behaviour: exponentially weighted mean and variance of the hourly features.
    feat_mean: [f32; FEATURES],
    feat_var: [f32; FEATURES],
    peer: u8,
}

impl KeyModel {
    fn new(minute: i32) -> KeyModel {
        KeyModel {
            first_min: minute,
            last_min: minute,
            hour: i64::from(minute).div_euclid(60),
            h_requests: 0,
            h_failures: 0,
            h_lat_buckets: [0; LATENCY_BUCKETS],
            h_lat_max: 0.0,
            h_lat_n: 0,
            hod: [f32::NAN; 24],
            dow: [0.0; 7],
            hod_scale: [0.0; 24],
            hours: 0,
            vol_tail: None,
            vol_disp: 1.0,
            vol_high: 0.0,
            vol_high_age: 0,
            fail_rate: 0.0,
            forbid_rate: 0.0,
            rate_weight: 0.0,
            fail_alert_min: i32::MIN,
            forbid_alert_min: i32::MIN,
            burst_alert_min: i32::MIN,
            min_mean: f32::NAN,
            min_disp: OVERDISPERSION as f32,
            recent: [(i32::MIN, 0, 0, 0); RATE_MINUTES],
            lat: None,
            lat_alert_min: i32::MIN,
            nets: SourceSet::default(),
            agents: SourceSet::default(),
            endpoints: SourceSet::default(),
            feat_mean: [0.0; FEATURES],
            feat_var: [0.0; FEATURES],
            peer: u8::MAX,
        }
    }

    /// An upper confidence bound of a rate the key usually has: the exponentially weighted
    /// rate shrunk toward `prior` by 50 pseudo-requests, plus two standard errors.
    fn rate_bound(&self, rate: f32, prior: f64) -> f64 {
        let w = f64::from(self.rate_weight);
        let p = (f64::from(rate) * w + prior * 50.0) / (w + 50.0);
        let w_eff = w.clamp(1.0, 7000.0);
        (p + 2.0 * (p * (1.0 - p) / w_eff).sqrt() + 1.0 / w_eff).min(1.0)
    }

    /// Heap and inline bytes.
    pub fn bytes(&self) -> usize {
        let set = |s: &SourceSet| {
            if s.members.spilled() {
                8 * s.members.capacity()
            } else {
                0
            }
        };
        std::mem::size_of::<KeyModel>()
            + set(&self.nets)
            + set(&self.agents)
            + set(&self.endpoints)
            + self
                .vol_tail
                .as_ref()
                .map_or(0, |t| std::mem::size_of::<Tail>() + 4 * t.buffer_capacity())
            + self.lat.as_ref().map_or(0, |l| {
                std::mem::size_of::<Latency>() + 4 * l.tail.buffer_capacity()
            })
    }
}

/// The per-minute latency model: ln(mean ms) per minute with 3+ samples.
#[derive(Debug, Clone)]
struct Latency {
    mean: f32,
    scale: EwScale,
    recent: [f32; 5],
    head: u8,
    tail: Tail,
}

impl Latency {
    fn new() -> Latency {
        Latency {
            mean: f32::NAN,
            scale: EwScale::new(),
            recent: [f32::NAN; 5],
            head: 0,
            tail: Tail::new(64, 0.5),
        }
    }
}

/// Peer groups: centroids and spreads of the key feature means, from k-means.
#[derive(Debug, Clone, Default)]
pub struct Peers {
    /// Per group, per feature (in the order of [`FEATURE_NAMES`]).
    pub centroids: Vec<Vec<f32>>,
    pub spreads: Vec<Vec<f32>>,
    pub sizes: Vec<usize>,
}

/// Every key's models. See the module docs.
///
/// The models sit in one vector of slots, each with its key; the index is a hash table of
/// slot numbers (4 bytes a bucket) hashed by the slot's key, so a key is stored once and a
/// table bucket is not the size of a model (a `HashMap<String, KeyModel>` at 1 M keys has
/// 2 M buckets of 1 KB: twice the models, and three times during its last resize).
#[derive(Debug)]
pub struct AnomalyModels {
    cfg: AnomalyConfig,
    index: HashTable<u32>,
    slots: Vec<Slot>,
    build: foldhash::fast::RandomState,
    registry: Option<Arc<Registry>>,
    peers: Peers,
    hasher: foldhash::fast::FixedState,
}

#[derive(Debug, Clone)]
struct Slot {
    key: Box<str>,
    model: KeyModel,
    /// The Kafka topic partitions the key was fed from, as bits the caller chose
    /// ([`AnomalyModels::mark_partitions`]); 0: none (files, stdin), never dropped.
    parts: u64,
}

/// Minutes since the epoch, for compact times.
fn minute_index(ms: i64) -> i32 {
    ms.div_euclid(MINUTE_MS)
        .clamp(i32::MIN as i64, i32::MAX as i64) as i32
}

fn minute_ms(m: i32) -> i64 {
    i64::from(m) * MINUTE_MS
}

/// The network an IP belongs to: `a.b.c.0/24` or the /64 of an IPv6 address; anything
/// unparsable stands for itself.
pub fn network_of(ip: &str) -> String {
    match ip.trim().parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4)) => {
            let o = v4.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        Ok(std::net::IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Err(_) => ip.to_owned(),
    }
}

/// A hash of [`network_of`]`(ip)` without building the string.
fn network_hash(h: &foldhash::fast::FixedState, ip: &str) -> u32 {
    match ip.trim().parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4)) => {
            let o = v4.octets();
            h.hash_one((4u8, o[0], o[1], o[2])) as u32
        }
        Ok(std::net::IpAddr::V6(v6)) => {
            let s = v6.segments();
            h.hash_one((6u8, s[0], s[1], s[2], s[3])) as u32
        }
        Err(_) => h.hash_one(ip) as u32,
    }
}

/// Whether `endpoint` is covered by `scopes`: a scope `resource[:action]` covers endpoints
/// with a path or route segment equal to `resource` (case-insensitive, plural `s`
/// tolerated); `*` covers everything; no scopes means no restriction known.
pub fn endpoint_in_scopes(endpoint: &str, scopes: &[String]) -> bool {
    if scopes.is_empty() || endpoint.is_empty() {
        return true;
    }
    let ep = endpoint.to_ascii_lowercase();
    let segments: Vec<&str> = ep
        .split(['/', '.', ':', '?', '&', '=', ' '])
        .filter(|s| !s.is_empty())
        .collect();
    scopes.iter().any(|s| {
        let res = s
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        res == "*"
            || (!res.is_empty()
                && segments.iter().any(|seg| {
                    *seg == res
                        || seg.strip_suffix('s') == Some(res.as_str())
                        || res.strip_suffix('s') == Some(seg)
                }))
    })
}

/// `−log10` of the Chernoff bound on P(Binomial(n, p0) ≥ k).
fn binomial_surprise(k: u64, n: u64, p0: f64) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let q = k as f64 / n as f64;
    let p0 = p0.clamp(1e-6, 1.0 - 1e-6);
    if q <= p0 {
        return 0.0;
    }
    let kl = if q >= 1.0 {
        -p0.ln()
    } else {
        q * (q / p0).ln() + (1.0 - q) * ((1.0 - q) / (1.0 - p0)).ln()
    };
    n as f64 * kl / std::f64::consts::LN_10
}

/// `−log10` of the Chernoff bound on P(Poisson(λ) ≥ k).
fn poisson_surprise(k: f64, lambda: f64) -> f64 {
    let lambda = lambda.max(1e-3);
    if k <= lambda {
        return 0.0;
    }
    (k * (k / lambda).ln() - k + lambda) / std::f64::consts::LN_10
}

/// `−log10` of the χ² survival function with `dof` degrees of freedom (Wilson–Hilferty).
fn chi2_surprise(x: f64, dof: f64) -> f64 {
    let z = ((x / dof).cbrt() - (1.0 - 2.0 / (9.0 * dof))) / (2.0 / (9.0 * dof)).sqrt();
    surprise(super::stats::normal_sf(z))
}

fn severity_of(s: f64) -> Severity {
    if s >= 12.0 {
        Severity::Critical
    } else {
        Severity::Warning
    }
}

#[allow(clippy::too_many_arguments)]
fn finding(
    kind: FindingKind,
    key: &str,
    at_ms: i64,
    severity: Severity,
    summary: String,
    model: &str,
    expected: Value,
    seen: Value,
    s: f64,
    extra: Value,
    dedup: String,
) -> AnomalyFinding {
    let mut evidence = json!({
        "model": model,
        "expected": expected,
        "seen": seen,
        // Rule findings (a fact, not a probability) have no surprise and score 1.
        "surprise": if s.is_finite() { json!((s * 100.0).round() / 100.0) } else { Value::Null },
        "score": if s.is_finite() { (score_of_surprise(s) * 1000.0).round() / 1000.0 } else { 1.0 },
    });
    if let (Value::Object(e), Value::Object(x)) = (&mut evidence, extra) {
        e.extend(x);
    }
    AnomalyFinding {
        kind,
        key_id: key.to_owned(),
        at_ms,
        severity,
        summary,
        evidence,
        dedup_key: format!("{}:{key}:{dedup}", kind.as_str()),
    }
}

fn hour_label(hour: i64) -> String {
    format_rfc3339(hour * HOUR_MS)[..13].to_owned()
}

impl AnomalyModels {
    pub fn new(cfg: AnomalyConfig) -> AnomalyModels {
        AnomalyModels {
            cfg,
            index: HashTable::new(),
            slots: Vec::new(),
            build: foldhash::fast::RandomState::default(),
            registry: None,
            peers: Peers::default(),
            hasher: foldhash::fast::FixedState::with_seed(0x6b77),
        }
    }

    pub fn config(&self) -> &AnomalyConfig {
        &self.cfg
    }

    /// The registry whose key scopes the scope model checks (none: no scope checks).
    pub fn set_registry(&mut self, registry: Arc<Registry>) {
        self.registry = Some(registry);
    }

    pub fn key_count(&self) -> usize {
        self.slots.len()
    }

    pub fn key(&self, key: &str) -> Option<&KeyModel> {
        self.slot_of(key).map(|i| &self.slots[i].model)
    }

    /// Mean bytes per key: the model, its key string, its slot and the index's share (as
    /// requested from the allocator, without its per-allocation overhead).
    pub fn bytes_per_key(&self) -> usize {
        if self.slots.is_empty() {
            return 0;
        }
        let models: usize = self
            .slots
            .iter()
            .map(|s| s.model.bytes() + s.key.len())
            .sum();
        let slot_extra = std::mem::size_of::<Slot>() - std::mem::size_of::<KeyModel>();
        let unused = (self.slots.capacity() - self.slots.len()) * std::mem::size_of::<Slot>();
        // A bucket holds a u32 and a control byte; the table keeps 1/8 free.
        let index = self.index.capacity() * 8 / 7 * 5;
        (models + self.slots.len() * slot_extra + unused + index) / self.slots.len()
    }

    fn slot_of(&self, key: &str) -> Option<usize> {
        let h = self.build.hash_one(key);
        self.index
            .find(h, |&i| &*self.slots[i as usize].key == key)
            .map(|&i| i as usize)
    }

    /// Adds a key that is not there yet; returns its slot.
    fn insert(&mut self, key: &str, model: KeyModel) -> usize {
        let i = self.slots.len();
        let n = u32::try_from(i).expect("fewer than 2^32 keys (max_keys bounds them)");
        self.slots.push(Slot {
            key: key.into(),
            model,
            parts: 0,
        });
        let (slots, build) = (&self.slots, &self.build);
        self.index.insert_unique(build.hash_one(key), n, |&j| {
            build.hash_one(&*slots[j as usize].key)
        });
        i
    }

    /// The slot of `key`, created with `new` when the key is not there.
    fn slot_or_insert(&mut self, key: &str, new: impl FnOnce() -> KeyModel) -> usize {
        match self.slot_of(key) {
            Some(i) => i,
            None => self.insert(key, new()),
        }
    }

    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// Records that `key` (or the registry key it is an alias of) was fed from the
    /// partitions of `bits` (the caller's numbering); a key not held is left alone.
    pub fn mark_partitions(&mut self, key: &str, bits: u64) {
        let key = match self.registry.as_deref() {
            Some(r) => r.canonical(key),
            None => key,
        };
        if let Some(i) = self.slot_of(key) {
            self.slots[i].parts |= bits;
        }
    }

    /// Gives the keys not marked yet the partitions of `bits`.
    pub fn mark_unmarked(&mut self, bits: u64) {
        for s in self.slots.iter_mut().filter(|s| s.parts == 0) {
            s.parts = bits;
        }
    }

    /// The partition bits `key` was fed from (see [`Self::mark_partitions`]).
    pub fn partitions_of(&self, key: &str) -> Option<u64> {
        self.slot_of(key).map(|i| self.slots[i].parts)
    }

    /// Drops the keys fed only from partitions outside `held` (bits, as marked); keys
    /// never marked stay. Returns how many were dropped. The slot vector is compacted and
    /// the index rebuilt: linear in the keys, done once per revocation.
    pub fn drop_unless_in(&mut self, held: u64) -> usize {
        let before = self.slots.len();
        self.slots.retain(|s| s.parts == 0 || s.parts & held != 0);
        let dropped = before - self.slots.len();
        if dropped > 0 {
            // Memory goes back once most of it is unused (a shrink copies what is left).
            if self.slots.len() < self.slots.capacity() / 2 {
                self.slots.shrink_to_fit();
                self.index.clear();
                self.index.shrink_to(self.slots.len(), |_| 0);
            }
            self.reindex();
        }
        dropped
    }

    fn hash(&self, s: &str) -> u32 {
        self.hasher.hash_one(s) as u32
    }

    /// Replays stored rollups (in time order per key) without raising findings.
    pub fn warm_up<'a>(&mut self, rollups: impl IntoIterator<Item = (&'a str, i64, &'a Rollup)>) {
        let mut sink = Vec::new();
        for (key, minute, r) in rollups {
            self.observe_inner(key, minute, r, &[], &[], &mut sink, false);
            sink.clear();
        }
    }

    /// Seeds the source sets from stored sources `(key, ip, user agent, endpoint,
    /// first_seen_ms, last_seen_ms)`, without raising findings.
    pub fn warm_up_sources<'a>(
        &mut self,
        sources: impl IntoIterator<Item = (&'a str, &'a str, &'a str, &'a str, i64, i64)>,
    ) {
        for (key, ip, ua, ep, first, last) in sources {
            if key == NO_KEY {
                continue;
            }
            // The same hashes as `observe_inner`: a stored network must match a live one.
            let (hn, ha, he) = (network_hash(&self.hasher, ip), self.hash(ua), self.hash(ep));
            let i = self.slot_or_insert(key, || KeyModel::new(minute_index(first)));
            let m = &mut self.slots[i].model;
            m.first_min = m.first_min.min(minute_index(first));
            let (fm, lm) = (minute_index(first), minute_index(last));
            // A key whose rollups are older than the warm-up window was still in use until
            // its sources' last sight: its dormancy counts from there.
            m.last_min = m.last_min.max(lm);
            let mut sets: Vec<(&mut SourceSet, u32)> = vec![(&mut m.agents, ha)];
            if !ip.is_empty() {
                sets.push((&mut m.nets, hn));
            }
            if !ep.is_empty() {
                sets.push((&mut m.endpoints, he));
            }
            for (set, h) in sets {
                let before = set.changed_min;
                if set.touch(h, lm).is_some() {
                    // Stable since the newest member's first appearance.
                    set.changed_min = if before == i32::MIN {
                        fm
                    } else {
                        before.max(fm)
                    };
                }
            }
        }
    }

    /// Feeds one key's rollup of one minute and the sources seen in it; returns what it
    /// raises. Minutes of a key should come in time order; a minute older than the hour
    /// being accumulated still counts for the sources and rates, not for the hourly volume.
    pub fn observe_minute(
        &mut self,
        key: &str,
        minute_ms: i64,
        rollup: &Rollup,
        sources: &[SourceSeen<'_>],
    ) -> Vec<AnomalyFinding> {
        let mut out = Vec::new();
        self.observe_inner(key, minute_ms, rollup, sources, &[], &mut out, true);
        out
    }

    /// Feeds a batch's [`Aggregate`]: its rollups in time order per key, each key's new
    /// sources with the minute they were first seen in.
    pub fn observe_aggregate(&mut self, agg: &Aggregate) -> Vec<AnomalyFinding> {
        // One model per registry key: a refused request carries an alias of its key (the
        // fingerprint of the presented secret), so rows are merged under the registry id.
        let registry = self.registry.clone();
        let canonical = |k: &'_ str| -> String {
            registry
                .as_deref()
                .map_or(k, |reg| reg.canonical(k))
                .to_owned()
        };
        let mut rows: Vec<(String, i64, Rollup)> = Vec::new();
        {
            let mut merged: HashMap<(String, i64), usize> = HashMap::new();
            for (k, minute, r) in agg.rollups() {
                // Latency of the requests the upstream answered: a 5xx or a timeout is the
                // upstream's health, not the key's behaviour.
                let r = r.with_latency_of(agg.answered_latency(k, minute));
                let key = canonical(k);
                match merged.get(&(key.clone(), minute)) {
                    Some(&i) => rows[i].2.merge(&r),
                    None => {
                        merged.insert((key.clone(), minute), rows.len());
                        rows.push((key, minute, r));
                    }
                }
            }
        }
        rows.sort_unstable_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        type Seen<'s> = (Vec<SourceSeen<'s>>, Vec<i64>);
        let mut sources: HashMap<(String, i64), Seen<'_>> = HashMap::new();
        for (k, st) in agg.sources() {
            let e = sources
                .entry((
                    canonical(&k.key_id),
                    crate::aggregate::minute_of(st.first_seen_ms),
                ))
                .or_default();
            e.0.push(SourceSeen {
                ip: &k.ip,
                user_agent: &k.user_agent,
                endpoint: &k.endpoint,
            });
            e.1.push(st.first_seen_ms);
        }
        let mut out = Vec::new();
        for (key, minute, r) in &rows {
            let (src, at) = sources
                .get(&(key.clone(), *minute))
                .map_or((&[][..], &[][..]), |(s, t)| (&s[..], &t[..]));
            self.observe_inner(key, *minute, r, src, at, &mut out, true);
        }
        out
    }

    /// `first_seen`: per source, when its first request came (the minute's start when not
    /// given), so that a new source is stamped at its first request, not before it.
    #[allow(clippy::too_many_arguments)]
    fn observe_inner(
        &mut self,
        key: &str,
        minute_ms: i64,
        r: &Rollup,
        sources: &[SourceSeen<'_>],
        first_seen: &[i64],
        out: &mut Vec<AnomalyFinding>,
        raise: bool,
    ) {
        if key == NO_KEY {
            // Requests without a key are many clients at once, not a key's behaviour; the
            // stream detectors (unknown-key bursts) watch them.
            return;
        }
        let known = self
            .registry
            .as_deref()
            .map(|reg| (reg.is_empty(), reg.key(key)));
        if let Some((false, None)) = known {
            if r.outcomes[Outcome::Ok.index()] == 0 {
                // A key the registry does not know and the gateway refused: a guess, not a
                // key's behaviour (unknown-key bursts watch guesses).
                return;
            }
        }
        let retired = matches!(known, Some((_, Some(k)))
            if k.is_revoked_at(minute_ms) || k.is_expired_at(minute_ms));
        let existing = self.slot_of(key);
        if existing.is_none() && self.slots.len() >= self.cfg.max_keys {
            self.evict();
        }
        let minute = minute_index(minute_ms);
        let cfg = self.cfg.clone();
        let hasher = self.hasher;
        let registry = self.registry.clone();
        let scopes: Option<&Vec<String>> = registry
            .as_deref()
            .and_then(|reg| reg.key(key))
            .map(|k| &k.scopes)
            .filter(|s| !s.is_empty());
        // Baselines per hour of day and weekday are in the owner's zone (UTC when unknown).
        let tz = registry
            .as_deref()
            .map_or(chrono_tz::Tz::UTC, |reg| reg.timezone_of(key));
        let is_new = existing.is_none();
        let i = match existing {
            Some(i) => i,
            None => self.insert(key, KeyModel::new(minute)),
        };
        let peers = &self.peers;
        let m = &mut self.slots[i].model;
        let mut found = Vec::new();
        // A retired key raises no anomaly: every use of it is a finding of the stream
        // detectors already (per source and interval), and its failures are by design.
        let raise_now = raise && !is_new && !retired;

        // Dormant key waking up.
        if !is_new && minute > m.last_min {
            let silent = minute_ms - minute_ms_of(m.last_min);
            if silent >= cfg.dormant_after_ms && raise_now {
                let days = silent as f64 / DAY_MS as f64;
                found.push(finding(
                    FindingKind::DormantKeyWoke,
                    key,
                    minute_ms,
                    Severity::Warning,
                    format!(
                        "key {key} had no traffic for {days:.0} days (last seen {}) and now sent {} requests",
                        format_rfc3339(minute_ms_of(m.last_min)),
                        r.requests
                    ),
                    "last_seen",
                    json!({"requests": 0, "since": format_rfc3339(minute_ms_of(m.last_min))}),
                    json!({"requests": r.requests}),
                    RULE,
                    json!({"dormant_days": (days * 10.0).round() / 10.0}),
                    format!("{minute_ms}"),
                ));
            }
        }

        // Hourly volume (and behaviour) when the hour changes.
        let hour = minute_ms.div_euclid(HOUR_MS);
        if hour > m.hour {
            close_hours(m, hour, tz, key, &cfg, peers, raise_now, &mut found);
        }
        if hour == m.hour {
            m.h_requests += r.requests;
            m.h_failures += r.failures();
            for (a, b) in m.h_lat_buckets.iter_mut().zip(r.latency_buckets) {
                *a = a.saturating_add(b.min(u64::from(u32::MAX)) as u32);
            }
            m.h_lat_max = m.h_lat_max.max(r.latency_max_ms as f32);
            m.h_lat_n += r.latency_count;
        }

        // Per-minute burst against the hour's baseline spread over the hour, or what a
        // minute with traffic usually holds when that is more (a client that sends its
        // hour in a few batches).
        let k = r.requests as f64;
        if m.hours >= MIN_HOURS && raise_now && !m.min_mean.is_nan() {
            let local = local_hour(hour, tz);
            let h = local.rem_euclid(24) as usize;
            let d = weekday(local);
            if !m.hod[h].is_nan() {
                let expected = ((f64::from(m.hod[h] + m.dow[d])).exp_m1().max(0.0) / 60.0)
                    .max(f64::from(m.min_mean));
                let disp = f64::from(m.min_disp).max(OVERDISPERSION);
                let s = poisson_surprise(k, expected.max(0.05)) / disp;
                if s >= cfg.min_surprise
                    && k >= 4.0 * expected.max(1.0)
                    && minute >= m.burst_alert_min
                {
                    m.burst_alert_min = minute + 60;
                    found.push(finding(
                        FindingKind::VolumeAnomaly,
                        key,
                        minute_ms,
                        severity_of(s),
                        format!(
                            "key {key} sent {} requests in one minute, about {:.1} expected at this time",
                            r.requests, expected
                        ),
                        "minute_burst",
                        json!({"requests_per_minute": (expected * 10.0).round() / 10.0}),
                        json!({"requests_per_minute": r.requests}),
                        s,
                        json!({}),
                        hour_label(hour),
                    ));
                }
            }
        }

        if k > 0.0 {
            if m.min_mean.is_nan() {
                m.min_mean = k as f32;
            } else {
                let mean = f64::from(m.min_mean).max(0.5);
                let pearson = ((k - mean).powi(2) / mean) as f32;
                m.min_disp += 0.01 * (pearson.min(25.0 * m.min_disp.max(1.0)) - m.min_disp);
                m.min_mean += 0.01 * (k as f32 - m.min_mean);
            }
        }

        // Failure and forbidden rates, over the last RATE_MINUTES minutes, against an upper
        // confidence bound of the key's usual rate (so that a rate estimated from few
        // requests does not make ordinary failures look rare).
        let n = r.requests;
        if n > 0 {
            let f = r.failures();
            let fb = r.outcomes[Outcome::Forbidden.index()];
            let slot = minute.rem_euclid(RATE_MINUTES as i32) as usize;
            if m.recent[slot].0 == minute {
                let e = &mut m.recent[slot];
                e.1 = e.1.saturating_add(n as u32);
                e.2 = e.2.saturating_add(f as u32);
                e.3 = e.3.saturating_add(fb as u32);
            } else {
                m.recent[slot] = (minute, n as u32, f as u32, fb as u32);
            }
            let (mut n5, mut f5, mut fb5) = (0u64, 0u64, 0u64);
            for e in &m.recent {
                if e.0 > minute - RATE_MINUTES as i32 && e.0 <= minute {
                    n5 += u64::from(e.1);
                    f5 += u64::from(e.2);
                    fb5 += u64::from(e.3);
                }
            }
            let p_fail = m.rate_bound(m.fail_rate, 0.01);
            let p_forbid = m.rate_bound(m.forbid_rate, 0.005);
            let seasoned = m.rate_weight >= 200.0;
            let (n, f, fb) = (n5, f5, fb5);
            if seasoned && raise_now && n >= cfg.min_requests {
                let q = f as f64 / n as f64;
                let s = binomial_surprise(f, n, p_fail);
                if s >= cfg.min_surprise
                    && q >= (2.0 * p_fail).max(p_fail + 0.05)
                    && minute >= m.fail_alert_min
                {
                    m.fail_alert_min = minute + 60;
                    found.push(finding(
                        FindingKind::FailureRateSpike,
                        key,
                        minute_ms,
                        if q >= 0.5 {
                            Severity::Critical
                        } else {
                            severity_of(s)
                        },
                        format!(
                            "{f} of {n} requests with key {key} failed authentication in the last {RATE_MINUTES} minutes ({:.0}%), against at most {:.1}% usually",
                            100.0 * q,
                            100.0 * p_fail
                        ),
                        "binomial_failure_rate",
                        json!({"failure_rate": round4(p_fail)}),
                        json!({"failure_rate": round4(q), "failures": f, "requests": n}),
                        s,
                        json!({"outcomes_this_minute": outcome_counts(r), "minutes": RATE_MINUTES}),
                        hour_label(hour),
                    ));
                }
                let qf = fb as f64 / n as f64;
                let sf = binomial_surprise(fb, n, p_forbid);
                if sf >= cfg.min_surprise
                    && qf >= (2.0 * p_forbid).max(p_forbid + 0.05)
                    && minute >= m.forbid_alert_min
                {
                    m.forbid_alert_min = minute + 60;
                    found.push(finding(
                        FindingKind::OutOfScopeUse,
                        key,
                        minute_ms,
                        severity_of(sf),
                        format!(
                            "the gateway refused {fb} of {n} requests with key {key} as not allowed in the last {RATE_MINUTES} minutes ({:.0}%), against at most {:.1}% usually",
                            100.0 * qf,
                            100.0 * p_forbid
                        ),
                        "forbidden_rate",
                        json!({"forbidden_rate": round4(p_forbid)}),
                        json!({"forbidden_rate": round4(qf), "forbidden": fb, "requests": n}),
                        sf,
                        json!({"minutes": RATE_MINUTES}),
                        format!("forbidden:{}", hour_label(hour)),
                    ));
                }
            }
            // Learn the rates from this minute (half-life about 5 000 requests).
            let (n, f, fb) = (
                r.requests,
                r.failures(),
                r.outcomes[Outcome::Forbidden.index()],
            );
            let a = (n as f64 / 7000.0).min(0.5) as f32;
            let q = f as f32 / n as f32;
            let qf = fb as f32 / n as f32;
            if m.rate_weight == 0.0 {
                m.fail_rate = q;
                m.forbid_rate = qf;
            } else {
                m.fail_rate += a * (q - m.fail_rate);
                m.forbid_rate += a * (qf - m.forbid_rate);
            }
            m.rate_weight = (m.rate_weight + n as f32).min(1e9);
        }

        // Latency: the median of the last 5 minutes against the key's usual median.
        if r.latency_count >= cfg.min_latency_samples {
            // The minute's mean: continuous, where the histogram median takes a few values.
            {
                let lat = m.lat.get_or_insert_with(|| Box::new(Latency::new()));
                let mean = r.latency_sum_ms / r.latency_count as f64;
                let y = (mean.max(0.1)).ln() as f32;
                lat.recent[lat.head as usize] = y;
                lat.head = (lat.head + 1) % 5;
                if lat.mean.is_nan() {
                    lat.mean = y;
                } else {
                    let mut v: Vec<f32> =
                        lat.recent.iter().copied().filter(|v| !v.is_nan()).collect();
                    let recent = if v.len() == 5 {
                        v.sort_by(|a, b| a.total_cmp(b));
                        Some(f64::from(v[2]))
                    } else {
                        None
                    };
                    let scale = lat.scale.value.max(0.02);
                    if let Some(recent) = recent {
                        let z = (recent - f64::from(lat.mean)).abs() / scale;
                        let p = lat.tail.p_value(z);
                        let s = surprise(p);
                        let ratio = (recent - f64::from(lat.mean)).exp();
                        if s >= cfg.min_surprise
                            && !(0.5..=1.5).contains(&ratio)
                            && raise_now
                            && minute >= m.lat_alert_min
                        {
                            m.lat_alert_min = minute + 60;
                            found.push(finding(
                                FindingKind::LatencyShift,
                                key,
                                minute_ms,
                                severity_of(s),
                                format!(
                                    "latency of key {key} is {:.0} ms over the last 5 minutes (median of the minutes' means), against {:.0} ms usually",
                                    recent.exp(),
                                    f64::from(lat.mean).exp()
                                ),
                                "latency_5m",
                                json!({"latency_ms": round1(f64::from(lat.mean).exp())}),
                                json!({"latency_ms": round1(recent.exp())}),
                                s,
                                json!({"ratio": round4(ratio)}),
                                hour_label(hour),
                            ));
                        }
                        lat.tail.update(z, 1.0 / 3000.0);
                    }
                    let r1 = f64::from(y - lat.mean);
                    lat.scale.update(r1, 1.0 / 500.0, 4.0);
                    lat.mean += (1.0 / 500.0) * (y - lat.mean);
                }
            }
        }

        // Sources.
        let old_enough = minute_ms - minute_ms_of(m.first_min) >= cfg.min_history_ms;
        // Sources new in the same minute: the earliest first, so that the finding of a new
        // member is stamped at the first request that showed it.
        let mut order: Vec<usize> = (0..sources.len()).collect();
        order.sort_by_key(|&i| first_seen.get(i).copied().unwrap_or(minute_ms));
        for i in order {
            let src = &sources[i];
            let seen_at = first_seen
                .get(i)
                .copied()
                .unwrap_or(minute_ms)
                .max(minute_ms);
            let (hn, ha, he) = (
                network_hash(&hasher, src.ip),
                hasher.hash_one(src.user_agent) as u32,
                hasher.hash_one(src.endpoint) as u32,
            );
            let checks: [(&mut SourceSet, u32, &str, &str); 3] = [
                (&mut m.nets, hn, "network", src.ip),
                (&mut m.agents, ha, "user_agent", src.user_agent),
                (&mut m.endpoints, he, "endpoint", src.endpoint),
            ];
            for (set, h, what, raw) in checks {
                if raw.is_empty() && what != "user_agent" {
                    continue;
                }
                if let Some((known, changed)) = set.touch(h, minute) {
                    let value = if what == "network" {
                        network_of(raw)
                    } else {
                        raw.to_owned()
                    };
                    let stable_for = minute_ms - minute_ms_of(changed);
                    if raise_now
                        && old_enough
                        && known > 0
                        && known < SET_CAP
                        && stable_for >= cfg.source_stable_ms
                    {
                        let days = stable_for as f64 / DAY_MS as f64;
                        found.push(finding(
                            FindingKind::NewSource,
                            key,
                            seen_at,
                            Severity::Warning,
                            format!(
                                "key {key} is used from a new {} {value:?} (from {}); its {known} known {}s had not changed for {days:.0} days",
                                what.replace('_', " "),
                                if src.ip.is_empty() { "-" } else { src.ip },
                                what.replace('_', " ")
                            ),
                            &format!("new_{what}"),
                            json!({"known": known, "stable_since": format_rfc3339(minute_ms_of(changed))}),
                            json!({what: value, "ip": src.ip, "user_agent": src.user_agent, "endpoint": src.endpoint, "first_request": format_rfc3339(seen_at)}),
                            RULE,
                            json!({"stable_days": (days * 10.0).round() / 10.0}),
                            format!("{what}:{value}"),
                        ));
                    }
                }
            }
            // Scopes.
            if let Some(scopes) = scopes {
                if raise && !endpoint_in_scopes(src.endpoint, scopes) {
                    found.push(finding(
                        FindingKind::OutOfScopeUse,
                        key,
                        minute_ms,
                        Severity::Critical,
                        format!(
                            "key {key} called {:?}, which none of its scopes ({}) covers (from {})",
                            src.endpoint,
                            scopes.join(", "),
                            if src.ip.is_empty() { "-" } else { src.ip }
                        ),
                        "registry_scopes",
                        json!({"scopes": scopes}),
                        json!({"endpoint": src.endpoint, "ip": src.ip, "user_agent": src.user_agent}),
                        RULE,
                        json!({}),
                        format!("endpoint:{}", src.endpoint),
                    ));
                }
            }
        }

        m.last_min = m.last_min.max(minute);
        m.first_min = m.first_min.min(minute);
        if raise && !retired {
            out.extend(found);
        }
    }

    /// Drops the longest idle tenth of the keys.
    fn evict(&mut self) {
        if self.slots.is_empty() {
            return;
        }
        let mut last: Vec<i32> = self.slots.iter().map(|s| s.model.last_min).collect();
        let k = (last.len() / 10).max(1);
        let (_, cut, _) = last.select_nth_unstable(k - 1);
        let cut = *cut;
        let mut dropped = 0;
        self.slots.retain(|s| {
            if dropped < k && s.model.last_min <= cut {
                dropped += 1;
                false
            } else {
                true
            }
        });
        self.reindex();
    }

    /// Numbers the slots again in the index, after slots were removed (they moved).
    fn reindex(&mut self) {
        let (index, slots, build) = (&mut self.index, &self.slots, &self.build);
        index.clear();
        for (i, s) in slots.iter().enumerate() {
            index.insert_unique(build.hash_one(&*s.key), i as u32, |&j| {
                build.hash_one(&*slots[j as usize].key)
            });
        }
    }

    /// Refits the peer groups: k-means (linfa) over the keys' mean feature vectors (keys
    /// with at least 48 hours of baseline), and assigns each key its group. Run it hourly
    /// or daily; it costs O(keys · groups · iterations).
    pub fn refit_peers(&mut self) -> &Peers {
        let ids: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].model.hours >= MIN_HOURS)
            .collect();
        let rows: Vec<[f32; FEATURES]> =
            ids.iter().map(|&i| self.slots[i].model.feat_mean).collect();
        let Some((peers, labels)) = super::peers::fit(&rows, self.cfg.peer_groups) else {
            return &self.peers;
        };
        for (i, l) in ids.into_iter().zip(labels) {
            self.slots[i].model.peer = l as u8;
        }
        self.peers = peers;
        &self.peers
    }
}

fn minute_ms_of(m: i32) -> i64 {
    minute_ms(m)
}

fn round4(v: f64) -> f64 {
    (v * 10_000.0).round() / 10_000.0
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn outcome_counts(r: &Rollup) -> Value {
    let mut o = serde_json::Map::new();
    for oc in Outcome::ALL {
        let n = r.outcomes[oc.index()];
        if n > 0 {
            o.insert(oc.as_str().to_owned(), json!(n));
        }
    }
    Value::Object(o)
}

/// 0 = Monday.
fn weekday(hour: i64) -> usize {
    (hour.div_euclid(24) + 3).rem_euclid(7) as usize
}

/// The hour index (hours since the epoch) on the wall clock of `tz` for the UTC hour
/// `hour`: seasonal baselines follow the owner's local time, so that a job at 02:00 local
/// stays in its slot when daylight-saving time changes.
fn local_hour(hour: i64, tz: chrono_tz::Tz) -> i64 {
    use chrono::{Offset, TimeZone};
    if tz == chrono_tz::Tz::UTC {
        return hour;
    }
    let Some(t) = chrono::DateTime::from_timestamp_millis(hour * HOUR_MS) else {
        return hour;
    };
    let off = tz
        .offset_from_utc_datetime(&t.naive_utc())
        .fix()
        .local_minus_utc();
    (hour * HOUR_MS + i64::from(off) * 1000).div_euclid(HOUR_MS)
}

/// Closes the accumulated hour (and fills missing hours with zeros, up to a week).
#[allow(clippy::too_many_arguments)]
fn close_hours(
    m: &mut KeyModel,
    hour: i64,
    tz: chrono_tz::Tz,
    key: &str,
    cfg: &AnomalyConfig,
    peers: &Peers,
    raise: bool,
    out: &mut Vec<AnomalyFinding>,
) {
    let gap = hour - m.hour;
    let fill = if gap > MAX_FILL_HOURS { 1 } else { gap };
    for i in 0..fill {
        let h_abs = m.hour + i;
        let (req, fail, lat_median, lat_n) = if i == 0 {
            (m.h_requests, m.h_failures, hour_median(m), m.h_lat_n)
        } else {
            (0, 0, None, 0)
        };
        let networks = m.nets.seen_since(minute_index(h_abs * HOUR_MS));
        let endpoints = m.endpoints.seen_since(minute_index(h_abs * HOUR_MS));
        close_hour(
            m, h_abs, tz, req, fail, lat_median, lat_n, networks, endpoints, key, cfg, peers,
            raise, out,
        );
    }
    m.hour = hour;
    m.h_requests = 0;
    m.h_failures = 0;
    m.h_lat_buckets = [0; LATENCY_BUCKETS];
    m.h_lat_max = 0.0;
    m.h_lat_n = 0;
}

/// The median latency of the model's current hour, from its histogram.
fn hour_median(m: &KeyModel) -> Option<f64> {
    let mut r = Rollup {
        latency_count: m.h_lat_n,
        latency_max_ms: f64::from(m.h_lat_max),
        ..Rollup::default()
    };
    for (a, b) in r.latency_buckets.iter_mut().zip(m.h_lat_buckets) {
        *a = u64::from(b);
    }
    r.latency_quantile(0.5)
}

#[allow(clippy::too_many_arguments)]
fn close_hour(
    m: &mut KeyModel,
    hour: i64,
    tz: chrono_tz::Tz,
    req: u64,
    fail: u64,
    lat_median: Option<f64>,
    lat_n: u64,
    networks: usize,
    endpoints: usize,
    key: &str,
    cfg: &AnomalyConfig,
    peers: &Peers,
    raise: bool,
    out: &mut Vec<AnomalyFinding>,
) {
    let local = local_hour(hour, tz);
    let h = local.rem_euclid(24) as usize;
    let d = weekday(local);
    let y = (req as f64).ln_1p() as f32;
    let at = (hour + 1) * HOUR_MS - MINUTE_MS;

    // Volume.
    if m.hod[h].is_nan() {
        m.hod[h] = y;
    } else {
        let pred = m.hod[h] + m.dow[d];
        let r = y - pred;
        let scale = m.hod_scale[h].max(0.05);
        let z = f64::from(r.abs() / scale);
        let expected = f64::from(pred).exp_m1().max(0.0);
        let k = req as f64;
        if m.hours >= MIN_HOURS {
            // Two views, the larger surprise wins (each halved for the choice): the robust
            // log-scale residual against its SPOT tail, and a quasi-Poisson tail (Chernoff
            // bound over the dispersion) of the count against the expected one.
            // A tail not yet created is a fresh one: not calibrated, p = 1.
            let p = m.vol_tail.as_ref().map_or(1.0, |t| t.p_value(z));
            let mu = expected.max(0.5);
            let chernoff = if k > mu {
                k * (k / mu).ln() - k + mu
            } else if k > 0.0 {
                mu - k + k * (k / mu).ln()
            } else {
                mu
            };
            let s_qp = chernoff / std::f64::consts::LN_10 / f64::from(m.vol_disp.max(1.0));
            let s = surprise((p * 2.0).min(1.0)).max(s_qp - 2f64.log10());
            let held = f64::from(m.vol_high) * (1.0 - f64::from(m.vol_high_age) / 24.0).max(0.0);
            m.vol_high_age = m.vol_high_age.saturating_add(1);
            // Practical significance: at least 2x (or half) and 10 requests apart.
            let ratio = (req as f64 + 1.0) / (expected + 1.0);
            let big = (req as f64 - expected).abs() >= 10.0 && !(0.5..=2.0).contains(&ratio);
            if s > held && s >= 2.0 {
                m.vol_high = s.min(12.0) as f32;
                m.vol_high_age = 0;
                if raise && s >= cfg.min_surprise && big && m.hours >= VOLUME_HOURS {
                    let dir = if req as f64 > expected {
                        "more"
                    } else {
                        "fewer"
                    };
                    out.push(finding(
                        FindingKind::VolumeAnomaly,
                        key,
                        at,
                        severity_of(s),
                        format!(
                            "key {key} sent {req} requests in the hour from {}:00 UTC, {dir} than the {:.0} expected for that hour and weekday",
                            hour_label(hour),
                            expected
                        ),
                        "seasonal_hourly",
                        json!({"requests_per_hour": round1(expected)}),
                        json!({"requests_per_hour": req}),
                        s,
                        json!({"hour_of_day": h, "weekday": d, "robust_z": round1(z), "dispersion": round1(f64::from(m.vol_disp))}),
                        hour_label(hour),
                    ));
                }
            }
        }
        if m.hours >= 8 {
            m.vol_tail
                .get_or_insert_with(|| Box::new(Tail::new(48, 1.0)))
                .update(z, 1.0 / 2000.0);
            let mu = expected.max(1.0);
            let pearson = ((k - expected).powi(2) / mu) as f32;
            let d = m.vol_disp.max(1.0);
            m.vol_disp += 0.05 * (pearson.min(25.0 * d) - m.vol_disp);
        }
        // Learn: hour-of-day level fast (over ~4 weeks of that hour), weekday slower.
        let capped = r.clamp(-4.0 * scale.max(0.2), 4.0 * scale.max(0.2));
        m.hod[h] += 0.25 * capped;
        m.dow[d] += 0.05 * capped;
        m.hod_scale[h] += 0.1 * (r.abs().min(4.0 * scale.max(0.2)) - m.hod_scale[h]);
        if m.hod_scale[h] == 0.0 {
            m.hod_scale[h] = r.abs();
        }
    }

    // Failures over the whole hour, for keys too quiet for the 5-minute test.
    let hour_min = minute_index(hour * HOUR_MS);
    if raise && req >= cfg.min_requests && m.rate_weight >= 200.0 && m.fail_alert_min <= hour_min {
        let p_fail = m.rate_bound(m.fail_rate, 0.01);
        let q = fail as f64 / req as f64;
        let s = binomial_surprise(fail, req, p_fail);
        if s >= cfg.min_surprise && q >= (2.0 * p_fail).max(p_fail + 0.05) {
            m.fail_alert_min = hour_min + 120;
            out.push(finding(
                FindingKind::FailureRateSpike,
                key,
                at,
                if q >= 0.5 { Severity::Critical } else { severity_of(s) },
                format!(
                    "{fail} of {req} requests with key {key} failed authentication in the hour from {}:00 UTC ({:.0}%), against at most {:.1}% usually",
                    hour_label(hour),
                    100.0 * q,
                    100.0 * p_fail
                ),
                "binomial_failure_rate_hourly",
                json!({"failure_rate": round4(p_fail)}),
                json!({"failure_rate": round4(q), "failures": fail, "requests": req}),
                s,
                json!({}),
                hour_label(hour),
            ));
        }
    }

    // Median latency over the whole hour, for keys too quiet for the 5-minute test: robust
    // to a lone slow request, and only from enough samples to have a median.
    if let (true, Some(median)) = (
        raise
            && lat_n >= MIN_HOURLY_LATENCY_SAMPLES
            && m.hours >= MIN_HOURS
            && m.lat_alert_min <= hour_min,
        lat_median,
    ) {
        let seen = (median as f32).ln_1p();
        let sd = m.feat_var[2].sqrt().max(0.1);
        let zl = f64::from((seen - m.feat_mean[2]) / sd);
        let s = surprise((2.0 * super::stats::normal_sf(zl.abs())).min(1.0));
        let (was, now) = (f64::from(m.feat_mean[2]).exp_m1(), f64::from(seen).exp_m1());
        let ratio = (now + 1.0) / (was + 1.0);
        if s >= cfg.min_surprise && !(0.5..=1.5).contains(&ratio) {
            m.lat_alert_min = hour_min + 120;
            out.push(finding(
                FindingKind::LatencyShift,
                key,
                at,
                severity_of(s),
                format!(
                    "median latency of key {key} was {now:.0} ms in the hour from {}:00 UTC, against {was:.0} ms usually",
                    hour_label(hour)
                ),
                "latency_median_hourly",
                json!({"median_latency_ms": round1(was)}),
                json!({"median_latency_ms": round1(now), "samples": lat_n}),
                s,
                json!({"ratio": round4(ratio), "z": round1(zl)}),
                hour_label(hour),
            ));
        }
    }

    // Behaviour.
    let x = [
        y,
        if req > 0 {
            fail as f32 / req as f32
        } else {
            0.0
        },
        if let Some(median) = lat_median {
            (median as f32).ln_1p()
        } else {
            m.feat_mean[2]
        },
        (networks as f32).ln_1p(),
        (endpoints as f32).ln_1p(),
    ];
    if m.hours >= MIN_HOURS && req >= cfg.min_requests {
        let floor = [0.3f32, 0.02, 0.1, 0.3, 0.3];
        let mut d_self = 0.0f64;
        let mut parts = Vec::with_capacity(FEATURES);
        for i in 0..FEATURES {
            let sd = m.feat_var[i].sqrt().max(floor[i]);
            let zi = (x[i] - m.feat_mean[i]) / sd;
            d_self += f64::from(zi * zi);
            parts.push((i, zi));
        }
        let s_self = chi2_surprise(d_self, FEATURES as f64);
        let peer = m.peer as usize;
        if s_self >= cfg.min_surprise + BEHAVIOUR_MARGIN && raise && peer < peers.centroids.len() {
            let c = &peers.centroids[peer];
            let sp = &peers.spreads[peer];
            let mut d_peer = 0.0f64;
            for i in 0..FEATURES {
                let zi = (x[i] - c[i]) / sp[i].max(floor[i]);
                d_peer += f64::from(zi * zi);
            }
            let s_peer = chi2_surprise(d_peer, FEATURES as f64);
            if s_peer >= cfg.min_surprise {
                parts.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
                let top: Vec<Value> = parts
                    .iter()
                    .take(3)
                    .map(|(i, zi)| {
                        json!({
                            "feature": FEATURE_NAMES[*i],
                            "seen": round4(f64::from(x[*i])),
                            "own_mean": round4(f64::from(m.feat_mean[*i])),
                            "peer_centroid": round4(f64::from(c[*i])),
                            "z": round1(f64::from(*zi)),
                        })
                    })
                    .collect();
                let s = s_self.min(s_peer + 3.0);
                out.push(finding(
                    FindingKind::BehaviourAnomaly,
                    key,
                    at,
                    severity_of(s),
                    format!(
                        "key {key} behaved unlike its own past and its peer group in the hour from {}:00 UTC (most different: {})",
                        hour_label(hour),
                        FEATURE_NAMES[parts[0].0]
                    ),
                    "kmeans_peers_chi2",
                    json!(FEATURE_NAMES.iter().zip(m.feat_mean).map(|(n, v)| (n.to_string(), json!(round4(f64::from(v))))).collect::<serde_json::Map<_, _>>()),
                    json!(FEATURE_NAMES.iter().zip(x).map(|(n, v)| (n.to_string(), json!(round4(f64::from(v))))).collect::<serde_json::Map<_, _>>()),
                    s,
                    json!({"features": top, "peer_group": peer, "surprise_self": round1(s_self), "surprise_peers": round1(s_peer)}),
                    hour_label(hour),
                ));
            }
        }
    }
    if req > 0 {
        let a = if m.hours < 24 {
            1.0 / (f32::from(m.hours.min(24) as u8) + 1.0)
        } else {
            1.0 / 168.0
        };
        for (i, xi) in x.iter().enumerate() {
            let dlt = xi - m.feat_mean[i];
            m.feat_mean[i] += a * dlt;
            m.feat_var[i] = (1.0 - a) * (m.feat_var[i] + a * dlt * dlt);
        }
    }
    m.hours = m.hours.saturating_add(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicting_keeps_the_index_in_step_with_the_slots() {
        let mut models = AnomalyModels::new(AnomalyConfig {
            max_keys: 20,
            ..AnomalyConfig::default()
        });
        let r = Rollup {
            requests: 1,
            ..Rollup::default()
        };
        for i in 0..50 {
            models.observe_minute(&format!("k{i}"), i * MINUTE_MS, &r, &[]);
        }
        assert!(models.key_count() <= 20, "{}", models.key_count());
        // The most recently seen keys stay; every slot is found by its key, once.
        for i in 45..50 {
            assert!(models.key(&format!("k{i}")).is_some(), "k{i}");
        }
        let found = (0..50)
            .filter(|i| models.key(&format!("k{i}")).is_some())
            .count();
        assert_eq!(found, models.key_count());
        let k = models.key("k49").unwrap();
        assert_eq!((k.first_min, k.last_min), (49, 49));
    }

    #[test]
    fn a_key_with_a_few_requests_pays_only_its_inline_model() {
        let mut models = AnomalyModels::new(AnomalyConfig::default());
        let r = Rollup {
            requests: 1,
            latency_count: 1,
            latency_sum_ms: 12.0,
            ..Rollup::default()
        };
        let src = [SourceSeen {
            ip: "192.0.2.1",
            user_agent: "ua/1",
            endpoint: "/v1/things",
        }];
        // Two requests an hour apart: an hour closes, no minute has 3 latencies.
        models.observe_minute("k", 0, &r, &src);
        models.observe_minute("k", HOUR_MS, &r, &src);
        let m = models.key("k").unwrap();
        assert!(m.lat.is_none() && m.vol_tail.is_none());
        assert_eq!(m.bytes(), std::mem::size_of::<KeyModel>());
        assert!(std::mem::size_of::<KeyModel>() <= 640);
    }

    #[test]
    fn seasonal_slots_follow_the_owners_wall_clock() {
        let berlin: chrono_tz::Tz = "Europe/Berlin".parse().unwrap();
        let akl: chrono_tz::Tz = "Pacific/Auckland".parse().unwrap();
        let hour = |rfc: &str| {
            chrono::DateTime::parse_from_rfc3339(rfc)
                .unwrap()
                .timestamp_millis()
                .div_euclid(HOUR_MS)
        };
        // (zone, UTC hour, local hour of day, local weekday: 0 is Monday)
        let cases = [
            // 02:00 in Berlin is 00:00 UTC in summer time, 01:00 UTC after 25 October.
            (berlin, "2026-10-24T00:00:00Z", 2, 5),
            (berlin, "2026-10-27T01:00:00Z", 2, 1),
            (chrono_tz::Tz::UTC, "2026-10-27T01:00:00Z", 1, 1),
            // Auckland (+13) is already on the next day.
            (akl, "2026-10-27T13:00:00Z", 2, 2),
        ];
        for (tz, utc, h, d) in cases {
            let l = local_hour(hour(utc), tz);
            assert_eq!(
                (l.rem_euclid(24), weekday(l)),
                (h, d as usize),
                "{utc} in {tz}"
            );
        }
    }
}
