//! The anomaly models: `score_csv` (the `keywatch score` filter) and the daemon's per-key
//! models, on crafted series.

use std::sync::Arc;

use keywatch::aggregate::Rollup;
use keywatch::anomaly::eval::{self, Rng};
use keywatch::anomaly::{
    score_csv, AnomalyConfig, AnomalyFinding, AnomalyModels, ScoreError, SeriesDetector, SourceSeen,
};
use keywatch::detect::FindingKind;
use keywatch::event::Outcome;
use keywatch::registry::Registry;

fn run(input: &str) -> Result<String, ScoreError> {
    let mut out = Vec::new();
    score_csv(input.as_bytes(), &mut out)?;
    Ok(String::from_utf8(out).expect("utf-8"))
}

fn scores_of(output: &str) -> Vec<f64> {
    output
        .lines()
        .skip(1)
        .map(|l| l.rsplit(',').next().unwrap().parse().unwrap())
        .collect()
}

/// A 5-minute seasonal series with noise and one spike, in NAB's timestamp format.
fn seasonal_csv(n: usize, spike_at: Option<usize>) -> String {
    let mut rng = Rng::new(11);
    let mut s = String::from("timestamp,value\n");
    let start = chrono::DateTime::parse_from_rfc3339("2014-04-01T00:00:00Z").unwrap();
    for i in 0..n {
        let t = start + chrono::Duration::minutes(5 * i as i64);
        let day = (i % 288) as f64 / 288.0;
        let mut v = 50.0 + 20.0 * (std::f64::consts::TAU * day).sin() + 2.0 * rng.normal();
        if Some(i) == spike_at {
            v += 60.0;
        }
        s.push_str(&format!("{},{v:.3}\n", t.format("%Y-%m-%d %H:%M:%S")));
    }
    s
}

#[test]
fn score_keeps_rows_order_and_duplicates() {
    let mut input = seasonal_csv(400, None);
    // A duplicate, an out-of-order row and a quoted field.
    input.push_str("2014-04-02 09:20:00,51.5\n2014-04-02 09:20:00,51.5\n");
    input.push_str("2014-04-01 00:00:00,49\n\"2014-04-02 10:00:00\",\"1e1\"\n");
    let out = run(&input).unwrap();
    let in_lines: Vec<&str> = input.lines().collect();
    let out_lines: Vec<&str> = out.lines().collect();
    assert_eq!(out_lines[0], "timestamp,value,anomaly_score");
    assert_eq!(out_lines.len(), in_lines.len());
    for (i, o) in in_lines.iter().zip(&out_lines).skip(1) {
        let (fields, score) = o.rsplit_once(',').unwrap();
        let i = i.replace('"', "");
        assert_eq!(fields, i, "row kept as written");
        let s: f64 = score.parse().unwrap();
        assert!((0.0..=1.0).contains(&s), "{s}");
    }
}

#[test]
fn score_is_causal() {
    let full = seasonal_csv(3000, Some(2500));
    let full_scores = scores_of(&run(&full).unwrap());
    for cut in [150, 1000, 2501] {
        let prefix: String = full
            .lines()
            .take(cut + 1)
            .map(|l| format!("{l}\n"))
            .collect();
        let prefix_scores = scores_of(&run(&prefix).unwrap());
        assert_eq!(prefix_scores.len(), cut);
        assert_eq!(
            prefix_scores[..],
            full_scores[..cut],
            "prefix of {cut} rows"
        );
    }
}

#[test]
fn score_flags_a_spike_at_its_onset_and_once() {
    let scores = scores_of(&run(&seasonal_csv(4000, Some(3000))).unwrap());
    assert!(scores[3000] > 0.9, "spike scored {}", scores[3000]);
    let high_elsewhere = scores
        .iter()
        .enumerate()
        .filter(|(i, s)| **s >= 0.5 && *i != 3000 && *i > 600)
        .count();
    assert!(
        high_elsewhere <= 2,
        "{high_elsewhere} other rows scored ≥ 0.5"
    );
    // Nothing scores during the warm-up.
    assert!(scores[..50].iter().all(|s| *s == 0.0));
}

#[test]
fn score_reads_every_timestamp_format() {
    for (a, b) in [
        ("2014-04-10 07:15:00", "2014-04-10 07:20:00"),
        ("2014-04-10T07:15:00Z", "2014-04-10T07:20:00Z"),
        ("2014-04-10T09:15:00+02:00", "2014-04-10T09:20:00+02:00"),
        ("2014-04-10T07:15:00.250Z", "2014-04-10T07:20:00.250Z"),
        ("1397114100", "1397114400"),
    ] {
        let out = run(&format!("timestamp,value\n{a},1\n{b},2.5\n")).unwrap();
        assert_eq!(out.lines().count(), 3, "{a}");
        assert!(out.contains(&format!("{a},1,")), "{out}");
    }
    // CRLF line ends and blank lines.
    let out =
        run("timestamp,value\r\n2014-04-10 07:15:00,1\r\n\r\n2014-04-10 07:20:00,2\r\n").unwrap();
    assert_eq!(out.lines().count(), 3, "{out}");
    // Header case, spaces and a BOM are tolerated.
    assert!(run("\u{feff}Timestamp , Value\n2014-04-10 07:15:00,1\n").is_ok());
}

#[test]
fn bad_input_names_the_line() {
    let e = run("time,value\n2014-04-10 07:15:00,1\n").unwrap_err();
    assert!(e.to_string().contains("line 1"), "{e}");
    assert!(e.to_string().contains("timestamp,value"), "{e}");
    assert!(matches!(run("").unwrap_err(), ScoreError::Empty));

    let e = run("timestamp,value\n2014-04-10 07:15:00,1\n2014-04-10 07:20:00,abc\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "line 3: cannot read the value `abc` as a finite number"
    );
    let e = run("timestamp,value\n2014-04-10 07:15:00,NaN\n").unwrap_err();
    assert!(e.to_string().starts_with("line 2:"), "{e}");
    let e = run("timestamp,value\n2014-04-10 07:15:00,1\nyesterday,2\n").unwrap_err();
    assert!(
        e.to_string()
            .starts_with("line 3: cannot read the timestamp `yesterday`"),
        "{e}"
    );
    let e = run("timestamp,value\n2014-04-10 07:15:00,1,7\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "line 2: expected 2 fields (timestamp,value), found 3"
    );
}

#[test]
fn score_beats_a_windowed_zscore_on_generated_incidents() {
    let corpus = eval::corpus(40, 5);
    let ours: Vec<Vec<f64>> = corpus
        .iter()
        .map(|l| {
            let mut d = SeriesDetector::default();
            l.timestamps
                .iter()
                .zip(&l.values)
                .map(|(t, v)| d.update(*t, *v).score)
                .collect()
        })
        .collect();
    let base: Vec<Vec<f64>> = corpus
        .iter()
        .map(|l| eval::windowed_zscore(&l.values, 100))
        .collect();
    let a = eval::best_threshold(&corpus, &ours, eval::STANDARD);
    let b = eval::best_threshold(&corpus, &base, eval::STANDARD);
    assert!(
        a.nab > b.nab + 10.0,
        "keywatch {:.1} vs z-score {:.1}",
        a.nab,
        b.nab
    );
}

// ---- daemon models ----

const START: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z (a Thursday)
const MIN: i64 = 60_000;

/// Requests per minute of a key with a daily cycle (busy by day, quiet at night) and
/// quieter weekends.
fn rate(minute: i64) -> f64 {
    let t = START + minute * MIN;
    let day = (t % 86_400_000) as f64 / 86_400_000.0;
    let dow = (t / 86_400_000 + 3) % 7; // 0 = Monday
    let weekend = if dow >= 5 { 0.5 } else { 1.0 };
    (6.0 + 5.0 * (std::f64::consts::TAU * (day - 0.3)).sin()) * weekend
}

struct Sim {
    rng: Rng,
    models: AnomalyModels,
    found: Vec<AnomalyFinding>,
}

impl Sim {
    fn new() -> Sim {
        Sim {
            rng: Rng::new(42),
            models: AnomalyModels::new(AnomalyConfig::default()),
            found: Vec::new(),
        }
    }

    fn rollup(&mut self, requests: f64, fail_rate: f64, latency: f64) -> Rollup {
        let n = self.rng.poisson(requests) as usize;
        let mut r = Rollup::default();
        for _ in 0..n {
            let o = if self.rng.chance(fail_rate) {
                Outcome::InvalidKey
            } else {
                Outcome::Ok
            };
            r.add(o, Some(latency * (0.8 + 0.4 * self.rng.f())));
        }
        r
    }

    /// One minute of the key: `scale` times its usual volume, from the usual sources.
    fn minute(&mut self, key: &str, m: i64, scale: f64, fail: f64, latency: f64, ip: &str) {
        let r = self.rollup(rate(m) * scale, fail, latency);
        if r.requests == 0 {
            return;
        }
        let src = [SourceSeen {
            ip,
            user_agent: "billing-client/2.1",
            endpoint: "/v1/invoices",
        }];
        let f = self.models.observe_minute(key, START + m * MIN, &r, &src);
        self.found.extend(f);
    }

    fn normal_days(&mut self, key: &str, from_day: i64, days: i64) {
        for m in from_day * 1440..(from_day + days) * 1440 {
            let ip = ["10.1.2.3", "10.1.2.4", "192.0.2.7"][(m % 3) as usize];
            self.minute(key, m, 1.0, 0.01, 40.0, ip);
        }
    }

    fn kinds(&self) -> Vec<FindingKind> {
        self.found.iter().map(|f| f.kind).collect()
    }
}

#[test]
fn daemon_models_stay_quiet_on_a_clean_seasonal_key() {
    let mut sim = Sim::new();
    sim.normal_days("k", 0, 28);
    assert!(sim.found.is_empty(), "{:#?}", sim.found);
    let bytes = sim.models.bytes_per_key();
    assert!(bytes < 4096, "{bytes} bytes per key");
}

#[test]
fn volume_anomaly_says_what_was_expected_and_seen() {
    let mut sim = Sim::new();
    sim.normal_days("k", 0, 21);
    // A Wednesday afternoon hour with 8 times the usual traffic.
    let base = 21 * 1440 + 14 * 60;
    for m in base..base + 60 {
        sim.minute("k", m, 8.0, 0.01, 40.0, "10.1.2.3");
    }
    sim.normal_days("k", 22, 1);
    let v: Vec<&AnomalyFinding> = sim
        .found
        .iter()
        .filter(|f| f.kind == FindingKind::VolumeAnomaly)
        .collect();
    assert!(!v.is_empty(), "{:#?}", sim.found);
    let e = &v[0].evidence;
    assert!(e["expected"].is_object() && e["seen"].is_object(), "{e}");
    assert!(e["surprise"].as_f64().unwrap() >= 6.0, "{e}");
    assert!(e["score"].as_f64().unwrap() > 0.9, "{e}");
    assert!(e["model"].is_string());
    assert!(
        sim.kinds().iter().all(|k| *k == FindingKind::VolumeAnomaly),
        "{:#?}",
        sim.found
    );
}

#[test]
fn failure_rate_spike_is_raised_once_per_hour() {
    let mut sim = Sim::new();
    sim.normal_days("k", 0, 3);
    let base = 3 * 1440 + 12 * 60;
    for m in base..base + 30 {
        sim.minute("k", m, 3.0, 0.6, 40.0, "10.1.2.3");
    }
    let f: Vec<&AnomalyFinding> = sim
        .found
        .iter()
        .filter(|f| f.kind == FindingKind::FailureRateSpike)
        .collect();
    assert_eq!(f.len(), 1, "{:#?}", sim.found);
    assert!(f[0].evidence["seen"]["failure_rate"].as_f64().unwrap() > 0.4);
    assert!(f[0].evidence["expected"]["failure_rate"].as_f64().unwrap() < 0.05);
}

#[test]
fn latency_shift_is_raised() {
    let mut sim = Sim::new();
    sim.normal_days("k", 0, 3);
    let base = 3 * 1440 + 12 * 60;
    for m in base..base + 20 {
        sim.minute("k", m, 3.0, 0.01, 400.0, "10.1.2.3");
    }
    assert!(
        sim.kinds().contains(&FindingKind::LatencyShift),
        "{:#?}",
        sim.found
    );
}

#[test]
fn new_network_of_a_stable_key_is_raised_once() {
    let mut sim = Sim::new();
    sim.normal_days("k", 0, 10);
    let base = 10 * 1440 + 12 * 60;
    for m in base..base + 10 {
        sim.minute("k", m, 1.0, 0.01, 40.0, "203.0.113.9");
    }
    // Another IP of a known /24 is not new.
    sim.minute("k", base + 11, 1.0, 0.01, 40.0, "10.1.2.200");
    let f: Vec<&AnomalyFinding> = sim
        .found
        .iter()
        .filter(|f| f.kind == FindingKind::NewSource)
        .collect();
    assert_eq!(f.len(), 1, "{:#?}", sim.found);
    assert_eq!(f[0].evidence["seen"]["network"], "203.0.113.0/24");
    assert_eq!(f[0].evidence["expected"]["known"], 2);
}

#[test]
fn dormant_key_waking_up_is_raised() {
    let mut sim = Sim::new();
    sim.normal_days("k", 0, 2);
    sim.minute("k", 45 * 1440 + 600, 3.0, 0.0, 40.0, "10.1.2.3");
    let f: Vec<&AnomalyFinding> = sim
        .found
        .iter()
        .filter(|f| f.kind == FindingKind::DormantKeyWoke)
        .collect();
    assert_eq!(f.len(), 1, "{:#?}", sim.found);
    assert!(f[0].evidence["dormant_days"].as_f64().unwrap() > 40.0);
}

#[test]
fn out_of_scope_use_is_raised() {
    let reg = Registry::parse(
        "k.toml",
        "[owners.o]\n[[keys]]\nid = \"k\"\nowner = \"o\"\nscopes = [\"invoices:read\"]\n",
    )
    .unwrap();
    let mut models = AnomalyModels::new(AnomalyConfig::default());
    models.set_registry(Arc::new(reg));
    let mut r = Rollup::default();
    r.add(Outcome::Ok, Some(10.0));
    let ok = [SourceSeen {
        ip: "10.0.0.1",
        user_agent: "ua",
        endpoint: "/v1/invoices/17",
    }];
    assert!(models.observe_minute("k", START, &r, &ok).is_empty());
    let bad = [SourceSeen {
        ip: "10.0.0.1",
        user_agent: "ua",
        endpoint: "/v1/users/export",
    }];
    let f = models.observe_minute("k", START + MIN, &r, &bad);
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!(f[0].kind, FindingKind::OutOfScopeUse);
    assert_eq!(f[0].evidence["seen"]["endpoint"], "/v1/users/export");
    assert_eq!(f[0].kind.as_str(), "out_of_scope_use");
}

#[test]
fn behaviour_unlike_own_past_and_peers_is_raised() {
    let mut sim = Sim::new();
    for k in 0..40 {
        sim.normal_days(&format!("k{k}"), 0, 3);
    }
    assert!(sim.found.is_empty(), "{:#?}", sim.found);
    let groups = sim.models.refit_peers().sizes.len();
    assert!(groups >= 1);
    // k0: one hour of many failures at high latency from many networks.
    let base = 3 * 1440 + 12 * 60;
    for m in base..base + 61 {
        let ip = format!("198.51.{}.1", m % 20);
        sim.minute("k0", m, 1.0, 0.3, 900.0, &ip);
    }
    assert!(
        sim.kinds().contains(&FindingKind::BehaviourAnomaly),
        "{:#?}",
        sim.kinds()
    );
    let b = sim
        .found
        .iter()
        .find(|f| f.kind == FindingKind::BehaviourAnomaly)
        .unwrap();
    assert_eq!(b.evidence["features"].as_array().unwrap().len(), 3);
}

#[test]
fn warm_up_from_history_keeps_baselines_across_a_restart() {
    // History: 21 days of rollups, as the store would give them back.
    let mut sim = Sim::new();
    let mut rows: Vec<(i64, Rollup)> = Vec::new();
    for m in 0..21 * 1440 {
        let r = sim.rollup(rate(m), 0.01, 40.0);
        if r.requests > 0 {
            rows.push((START + m * MIN, r));
        }
    }
    let mut warm = AnomalyModels::new(AnomalyConfig::default());
    warm.warm_up(rows.iter().map(|(m, r)| ("k", *m, r)));
    // The sources `normal_days` uses, as the store keeps them.
    warm.warm_up_sources(["10.1.2.3", "10.1.2.4", "192.0.2.7"].map(|ip| {
        (
            "k",
            ip,
            "billing-client/2.1",
            "/v1/invoices",
            START,
            START + 20 * 86_400_000,
        )
    }));
    sim.models = warm;
    // After the restart: a normal day, then a burst hour.
    sim.normal_days("k", 21, 1);
    // The warmed-up sources are known: a stored network is the same network live.
    assert!(sim.found.is_empty(), "{:#?}", sim.found);
    let base = 22 * 1440 + 14 * 60;
    for m in base..base + 61 {
        sim.minute("k", m, 8.0, 0.01, 40.0, "10.1.2.3");
    }
    assert!(
        sim.kinds().contains(&FindingKind::VolumeAnomaly),
        "{:#?}",
        sim.found
    );
}

#[test]
fn requests_without_a_key_are_not_modelled() {
    let mut sim = Sim::new();
    sim.normal_days(keywatch::event::NO_KEY, 0, 2);
    sim.models.warm_up_sources([(
        keywatch::event::NO_KEY,
        "10.0.0.1",
        "ua",
        "/x",
        START,
        START,
    )]);
    assert_eq!(sim.models.key_count(), 0);
    assert!(sim.found.is_empty());
}
