//! Throughput of the anomaly models, on one core.
//!
//! Run: `cargo bench --bench score` (optionally `-- POINTS`, default 1 000 000).
//!
//! - `score_csv`: the whole `keywatch score` path (CSV parse, timestamp parse, detector,
//!   CSV write to memory) on a generated 5-minute seasonal series, best of 3 rounds;
//! - `SeriesDetector::update` alone on the same points;
//! - `AnomalyModels::observe_minute`: the per-minute-rollup cost in the ingest hot path,
//!   over 10 000 keys with a few sources each, and the models' bytes per key.

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::{Duration, Instant};

use keywatch::aggregate::Rollup;
use keywatch::anomaly::eval::Rng;
use keywatch::anomaly::{score_csv, AnomalyConfig, AnomalyModels, SeriesDetector, SourceSeen};
use keywatch::event::Outcome;

fn best_of<T>(rounds: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut out = None;
    for _ in 0..rounds {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed());
        out = Some(v);
    }
    (best, out.expect("one round"))
}

fn series(n: usize) -> (Vec<i64>, Vec<f64>) {
    let mut rng = Rng::new(7);
    let start = 1_396_000_000_000i64;
    let mut ts = Vec::with_capacity(n);
    let mut vs = Vec::with_capacity(n);
    for i in 0..n {
        let t = start + i as i64 * 300_000;
        let day = (t % 86_400_000) as f64 / 86_400_000.0;
        let mut v = 100.0 + 40.0 * (std::f64::consts::TAU * day).sin() + 5.0 * rng.normal();
        if rng.chance(0.0005) {
            v += 80.0;
        }
        ts.push(t);
        vs.push(v);
    }
    (ts, vs)
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let (ts, vs) = series(n);

    let mut csv = String::with_capacity(n * 32);
    csv.push_str("timestamp,value\n");
    for (t, v) in ts.iter().zip(&vs) {
        let dt = chrono::DateTime::from_timestamp_millis(*t).expect("valid");
        writeln!(csv, "{},{:.3}", dt.format("%Y-%m-%d %H:%M:%S"), v).expect("string");
    }
    let (d, rows) = best_of(3, || {
        let mut out = Vec::with_capacity(csv.len() + n * 10);
        let s = score_csv(csv.as_bytes(), &mut out).expect("scores");
        black_box(&out);
        s.rows
    });
    println!(
        "score_csv:               {:>10} rows in {:>8.3} s = {:>6.2} M points/s (CSV {:.1} MB)",
        rows,
        d.as_secs_f64(),
        rows as f64 / d.as_secs_f64() / 1e6,
        csv.len() as f64 / 1e6
    );

    let (d, _) = best_of(3, || {
        let mut det = SeriesDetector::default();
        let mut acc = 0.0;
        for (t, v) in ts.iter().zip(&vs) {
            acc += det.update(*t, *v).score;
        }
        black_box(acc)
    });
    println!(
        "SeriesDetector::update:  {:>10} points in {:>6.3} s = {:>6.2} M points/s ({:.0} ns/point)",
        n,
        d.as_secs_f64(),
        n as f64 / d.as_secs_f64() / 1e6,
        d.as_nanos() as f64 / n as f64
    );

    // Daemon models: 10 000 keys, 1 week of minutes for a tenth of them (busy keys), the
    // rest every 10 minutes; each with 3 of 5 networks and a user agent.
    let keys: Vec<String> = (0..10_000).map(|i| format!("key-{i:05}")).collect();
    let ips = [
        "10.0.0.1",
        "10.0.1.7",
        "192.0.2.10",
        "198.51.100.4",
        "2001:db8::1",
    ];
    let mut models = AnomalyModels::new(AnomalyConfig::default());
    let mut rng = Rng::new(3);
    let minutes = 7 * 24 * 60;
    let start = 1_767_225_600_000i64;
    let mut calls = 0u64;
    let t = Instant::now();
    let mut findings: std::collections::BTreeMap<&str, usize> = Default::default();
    for m in 0..minutes {
        let minute_ms = start + m as i64 * 60_000;
        for (i, k) in keys.iter().enumerate() {
            if i % 10 != 0 && m % 10 != i % 10 {
                continue;
            }
            let mut r = Rollup::default();
            let n = 1 + rng.below(20);
            for _ in 0..n {
                let o = if rng.chance(0.01) {
                    Outcome::InvalidKey
                } else {
                    Outcome::Ok
                };
                r.add(o, Some(20.0 + 30.0 * rng.f()));
            }
            let s = [SourceSeen {
                ip: ips[(i + m) % 3],
                user_agent: "client/1.0",
                endpoint: "/v1/invoices",
            }];
            for f in models.observe_minute(k, minute_ms, &r, &s) {
                let n = findings.entry(f.kind.as_str()).or_default();
                *n += 1;
                if *n <= 2 && std::env::args().any(|a| a == "--show") {
                    println!("  {} {} {}", f.kind, f.summary, f.evidence);
                }
            }
            calls += 1;
        }
    }
    let d = t.elapsed();
    println!(
        "AnomalyModels::observe_minute: {calls} rollups of {} keys in {:.2} s = {:.0} ns per rollup (findings on this clean fleet: {findings:?})",
        keys.len(),
        d.as_secs_f64(),
        d.as_nanos() as f64 / calls as f64
    );
    let t = Instant::now();
    let groups = models.refit_peers().sizes.len();
    println!(
        "AnomalyModels::refit_peers: {} keys into {groups} groups in {:.1} ms",
        models.key_count(),
        t.elapsed().as_secs_f64() * 1e3
    );
    // Peer groups at fleet scale: k-means over 1 M keys' feature vectors.
    let mut rng = Rng::new(5);
    let rows: Vec<[f32; 5]> = (0..1_000_000)
        .map(|i| {
            let g = (i % 4) as f32;
            [
                g + rng.normal() as f32 * 0.3,
                0.01 * g + rng.f() as f32 * 0.01,
                3.0 + g * 0.5 + rng.normal() as f32 * 0.2,
                (1.0 + g).ln_1p(),
                (2.0 + g).ln_1p(),
            ]
        })
        .collect();
    let t = Instant::now();
    let fitted = keywatch::anomaly::peers::fit(&rows, 8).map(|(p, _)| p.sizes.len());
    println!(
        "peers::fit: 1000000 keys into {:?} groups in {:.2} s (k-means on a 100 000 sample, then every key assigned)",
        fitted,
        t.elapsed().as_secs_f64()
    );
    println!(
        "memory: {} bytes per key (model, key string, map share) -> {:.2} GB for 1M keys",
        models.bytes_per_key(),
        models.bytes_per_key() as f64 * 1e6 / 1e9
    );
}
