//! Detection quality of `keywatch score` against a windowed z-score, on generated labelled
//! series (see `keywatch::anomaly::eval` for the corpus and the NAB-style scorer).
//!
//! Run: `cargo bench --bench anomaly_eval` (options: `--series N` (default 150),
//! `--seed S` (default 2026), `--per-series` to list every series, `--keys N` (default 200)
//! for the fleet, `--no-fleet` to skip it, `--disable MASK` to leave models out of the
//! series detector, bit `1 << Model as u32`, for ablations).
//!
//! Second part, the daemon's per-key models on a simulated fleet: keys with daily and weekly
//! seasonality, 3 weeks of per-minute rollups, and after two weeks one incident on most
//! keys (volume burst, failure spike, latency shift, new network, dormant key waking up,
//! out-of-scope endpoint). An incident is found when a finding of its kind for its key
//! comes within 2 hours of the onset; a finding is false when it is on a key and time with
//! no incident.
//!
//! For each detector one threshold is chosen for the whole corpus, the one that maximizes
//! the NAB standard-profile score; precision, recall and delays are reported at it, and
//! for keywatch also at its documented alert level 0.5.
//!
//! Definitions: a window is found when a detection (score ≥ threshold, after the NAB
//! probation period) falls in it; FP counts detections outside windows; precision =
//! found / (found + FP); recall = found / windows; delay = first detection in a window
//! minus the labelled onset, in points (negative: inside the window before the onset).

use std::time::Instant;

use std::sync::Arc;

use keywatch::aggregate::Rollup;
use keywatch::anomaly::eval::{self, Labelled, Rng, Summary, STANDARD};
use keywatch::anomaly::{AnomalyConfig, AnomalyModels, SeriesDetector, SourceSeen};
use keywatch::detect::FindingKind;
use keywatch::event::Outcome;
use keywatch::registry::Registry;

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn keywatch_scores(corpus: &[Labelled]) -> Vec<Vec<f64>> {
    let disabled: u32 = arg("--disable", 0);
    corpus
        .iter()
        .map(|l| {
            let mut d = SeriesDetector::new(keywatch::anomaly::Params {
                disabled,
                ..Default::default()
            });
            l.timestamps
                .iter()
                .zip(&l.values)
                .map(|(t, v)| d.update(*t, *v).score)
                .collect()
        })
        .collect()
}

fn row(name: &str, s: &Summary) {
    println!(
        "{:<22} {:>6.1} {:>9.3} {:>8} {:>7} {:>7.3} {:>7.3} {:>10.1} {:>10.1} {:>9.3}",
        name,
        s.nab,
        s.threshold,
        format!("{}/{}", s.detected, s.windows),
        s.false_alarms,
        s.precision,
        s.recall,
        s.mean_delay,
        s.median_delay,
        s.fa_per_kpt
    );
}

fn main() {
    let n: usize = arg("--series", 150);
    let seed: u64 = arg("--seed", 2026);
    let per_series = std::env::args().any(|a| a == "--per-series");
    let corpus = eval::corpus(n, seed);
    let points: usize = corpus.iter().map(|l| l.values.len()).sum();
    let windows: usize = corpus.iter().map(|l| l.incidents.len()).sum();
    println!(
        "corpus: {} series, {} points, {} labelled incidents (seed {seed})",
        corpus.len(),
        points,
        windows
    );

    let t = Instant::now();
    let kw = keywatch_scores(&corpus);
    let kw_time = t.elapsed();
    let z100: Vec<Vec<f64>> = corpus
        .iter()
        .map(|l| eval::windowed_zscore(&l.values, 100))
        .collect();
    let z1000: Vec<Vec<f64>> = corpus
        .iter()
        .map(|l| eval::windowed_zscore(&l.values, 1000))
        .collect();

    let fixed = eval::summarize(&corpus, &kw, 0.5, STANDARD);
    let results = [
        (
            "keywatch score",
            eval::best_threshold(&corpus, &kw, STANDARD),
        ),
        (
            "z-score (w=100)",
            eval::best_threshold(&corpus, &z100, STANDARD),
        ),
        (
            "z-score (w=1000)",
            eval::best_threshold(&corpus, &z1000, STANDARD),
        ),
    ];
    println!();
    println!("NAB standard profile (A_TP=1, A_FP=-0.11, A_FN=-1), one threshold per detector:");
    println!(
        "{:<22} {:>6} {:>9} {:>8} {:>7} {:>7} {:>7} {:>10} {:>10} {:>9}",
        "detector",
        "NAB",
        "threshold",
        "found",
        "FP",
        "prec",
        "recall",
        "mean dly",
        "med dly",
        "FP/kpt"
    );
    for (name, s) in &results {
        row(name, s);
    }
    row("keywatch @ 0.5", &fixed);
    println!("(delay: first detection minus labelled onset, in points; negative = inside the window before the onset)");
    println!();
    println!("recall by incident kind:");
    print!("{:<18}", "kind");
    for (name, _) in &results {
        print!(" {:>18}", name);
    }
    println!();
    for (i, (kind, w, _)) in results[0].1.by_kind.iter().enumerate() {
        print!("{:<18}", kind.as_str());
        for (_, s) in &results {
            let (_, _, d) = s.by_kind[i];
            print!(" {:>18}", format!("{d}/{w}"));
        }
        println!();
    }
    println!();
    println!(
        "keywatch score: {:.2} s for {} points ({:.2} M points/s, including the per-series setup)",
        kw_time.as_secs_f64(),
        points,
        points as f64 / kw_time.as_secs_f64() / 1e6
    );

    if per_series {
        let th = results[0].1.threshold;
        println!();
        println!("per series at threshold {th:.3}: detected/windows, false alarms");
        for (l, sc) in corpus.iter().zip(&kw) {
            let o = eval::score_series(sc, &l.incidents, th, STANDARD);
            let fa_at: Vec<usize> = sc
                .iter()
                .enumerate()
                .filter(|(i, s)| **s >= th && *i >= eval::probation(sc.len()))
                .map(|(i, _)| i)
                .take(12)
                .collect();
            println!(
                "{:<60} {}/{} fa={} raw={:.2} onsets={:?} det={:?}",
                l.name,
                o.detected,
                o.windows,
                o.false_alarms,
                o.raw,
                l.incidents.iter().map(|x| x.0).collect::<Vec<_>>(),
                fa_at
            );
        }
    }
    if !std::env::args().any(|a| a == "--no-fleet") {
        fleet(arg("--keys", 200), seed);
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Inject {
    Burst,
    Failures,
    Latency,
    NewNetwork,
    Dormant,
    OutOfScope,
}

impl Inject {
    fn kind(self) -> FindingKind {
        match self {
            Inject::Burst => FindingKind::VolumeAnomaly,
            Inject::Failures => FindingKind::FailureRateSpike,
            Inject::Latency => FindingKind::LatencyShift,
            Inject::NewNetwork => FindingKind::NewSource,
            Inject::Dormant => FindingKind::DormantKeyWoke,
            Inject::OutOfScope => FindingKind::OutOfScopeUse,
        }
    }
}

struct Key {
    id: String,
    rate: f64,
    fail: f64,
    latency: f64,
    phase: f64,
    nets: usize,
    incident: Option<(Inject, i64, i64)>,
}

fn fleet(keys: usize, seed: u64) {
    const DAYS: i64 = 21;
    const START: i64 = 1_767_225_600_000;
    let mut rng = Rng::new(seed ^ 0xf1ee7);
    let injects = [
        Inject::Burst,
        Inject::Failures,
        Inject::Latency,
        Inject::NewNetwork,
        Inject::Dormant,
        Inject::OutOfScope,
    ];
    let mut toml = String::from("[owners.o]\n");
    let ks: Vec<Key> = (0..keys)
        .map(|i| {
            let id = format!("key-{i:04}");
            toml.push_str(&format!(
                "[[keys]]\nid = \"{id}\"\nowner = \"o\"\nscopes = [\"invoices:read\", \"customers:read\"]\n"
            ));
            let incident = if rng.chance(0.75) {
                let k = injects[rng.below(injects.len())];
                let onset = (14 * 1440 + rng.below(6 * 1440)) as i64;
                let len = 30 + rng.below(150) as i64;
                Some((k, onset, len))
            } else {
                None
            };
            Key {
                id,
                rate: 10f64.powf(rng.range(-0.5, 1.7)),
                fail: rng.range(0.002, 0.03),
                latency: rng.range(15.0, 300.0),
                phase: rng.range(0.0, 1.0),
                nets: 1 + rng.below(4),
                incident,
            }
        })
        .collect();
    // Three weeks cannot hold the default 30 days of dormancy: 7 days here.
    let mut models = AnomalyModels::new(AnomalyConfig {
        dormant_after_ms: 7 * 86_400_000,
        ..AnomalyConfig::default()
    });
    models.set_registry(Arc::new(
        Registry::parse("fleet.toml", &toml).expect("registry"),
    ));
    let mut found = Vec::new();
    let t = Instant::now();
    let mut calls = 0u64;
    for m in 0..DAYS * 1440 {
        if m % 1440 == 0 && m >= 7 * 1440 {
            models.refit_peers();
        }
        let minute_ms = START + m * 60_000;
        let day = (m % 1440) as f64 / 1440.0;
        let weekday = (m / 1440 + 3) % 7;
        for k in &ks {
            let mut rate = k.rate
                * (1.0 + 0.8 * (std::f64::consts::TAU * (day + k.phase)).sin()).max(0.05)
                * if weekday >= 5 { 0.5 } else { 1.0 };
            let (mut fail, mut latency) = (k.fail, k.latency);
            let mut ip = format!("10.{}.{}.7", k.id.len(), m as usize % k.nets);
            let mut endpoint = if m % 2 == 0 {
                "/v1/invoices"
            } else {
                "/v1/customers"
            };
            if let Some((inj, onset, len)) = k.incident {
                let active = m >= onset && m < onset + len;
                match inj {
                    Inject::Dormant if (3 * 1440..onset).contains(&m) => continue,
                    Inject::Burst if active => rate *= 8.0,
                    Inject::Failures if active => fail = 0.5,
                    Inject::Latency if active => latency *= 5.0,
                    Inject::NewNetwork if active => ip = "203.0.113.50".to_owned(),
                    Inject::OutOfScope if active && m < onset + 5 => endpoint = "/v1/admin/users",
                    _ => {}
                }
            }
            let n = rng.poisson(rate) as usize;
            if n == 0 {
                continue;
            }
            let mut r = Rollup::default();
            for _ in 0..n {
                let o = if rng.chance(fail) {
                    Outcome::InvalidKey
                } else {
                    Outcome::Ok
                };
                r.add(o, Some(latency * rng.range(0.7, 1.4)));
            }
            let src = [SourceSeen {
                ip: &ip,
                user_agent: "client/3.2",
                endpoint,
            }];
            for f in models.observe_minute(&k.id, minute_ms, &r, &src) {
                found.push(f);
            }
            calls += 1;
        }
    }
    let elapsed = t.elapsed();

    println!();
    println!(
        "daemon models on a simulated fleet: {keys} keys, {DAYS} days of per-minute rollups ({calls} rollups, {:.0} ns each), one incident on {} keys after day 14",
        elapsed.as_nanos() as f64 / calls as f64,
        ks.iter().filter(|k| k.incident.is_some()).count()
    );
    println!(
        "{:<18} {:>9} {:>7} {:>12} {:>14}",
        "incident", "incidents", "found", "recall", "mean delay min"
    );
    let mut matched = vec![false; found.len()];
    for inj in injects {
        let (mut n, mut hit, mut delays) = (0, 0, Vec::new());
        for k in ks
            .iter()
            .filter(|k| matches!(k.incident, Some((i, _, _)) if i == inj))
        {
            let (_, onset, len) = k.incident.expect("filtered");
            n += 1;
            let on_ms = START + onset * 60_000;
            let end_ms = START + (onset + len) * 60_000 + 2 * 3_600_000;
            let mut first: Option<i64> = None;
            for (i, f) in found.iter().enumerate() {
                if f.key_id == k.id && f.at_ms >= on_ms && f.at_ms <= end_ms {
                    matched[i] = true;
                    if f.kind == inj.kind() && f.at_ms <= on_ms + 2 * 3_600_000 {
                        first = Some(first.map_or(f.at_ms, |x: i64| x.min(f.at_ms)));
                    }
                }
            }
            if let Some(at) = first {
                hit += 1;
                delays.push((at - on_ms) as f64 / 60_000.0);
            } else if std::env::args().any(|a| a == "--show-missed") {
                println!(
                    "  missed {:?} on {} (rate {:.2}/min, onset minute {onset}, {len} min)",
                    inj, k.id, k.rate
                );
            }
        }
        let mean = if delays.is_empty() {
            f64::NAN
        } else {
            delays.iter().sum::<f64>() / delays.len() as f64
        };
        println!(
            "{:<18} {:>9} {:>7} {:>12.2} {:>14.1}",
            inj.kind().as_str(),
            n,
            hit,
            if n > 0 { hit as f64 / n as f64 } else { 0.0 },
            mean
        );
    }
    let mut false_by_kind: std::collections::BTreeMap<&str, usize> = Default::default();
    for (f, m) in found.iter().zip(&matched) {
        if !m {
            *false_by_kind.entry(f.kind.as_str()).or_default() += 1;
        }
    }
    let false_total: usize = false_by_kind.values().sum();
    let mut related: std::collections::BTreeMap<&str, usize> = Default::default();
    let mut facts: std::collections::BTreeSet<&str> = Default::default();
    for (f, m) in found.iter().zip(&matched) {
        if *m {
            *related.entry(f.kind.as_str()).or_default() += 1;
        }
        facts.insert(&f.dedup_key);
    }
    if std::env::args().any(|a| a == "--show-false") {
        for (f, _) in found.iter().zip(&matched).filter(|(_, m)| !**m).take(8) {
            println!(
                "  false: {} {} {} {}",
                f.kind, f.key_id, f.summary, f.evidence
            );
        }
    }
    println!(
        "findings related to an incident, by kind: {related:?}; distinct facts (dedup keys): {}",
        facts.len()
    );
    println!(
        "findings: {} in all, {} related to an incident, {false_total} false ({:.3} per key-week): {false_by_kind:?}",
        found.len(),
        found.len() - false_total,
        false_total as f64 / (keys as f64 * DAYS as f64 / 7.0)
    );
}
