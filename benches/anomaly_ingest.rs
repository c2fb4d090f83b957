//! The per-event cost of the anomaly models in the ingest hot path: what
//! `Detection::observe_aggregate` adds to each committed batch, next to decoding,
//! fingerprinting and aggregating the same events.
//!
//! Run: `cargo bench --bench anomaly_ingest` (optionally `-- LINES` for the log corpus).
//! Single-threaded, best of 3 rounds, each round on fresh models.
//!
//! - `log`: the quick-start scenario (`keywatch sample`, kong, 4 days, a handful of keys)
//!   cut in batches of 4 096 lines like the pipeline: decode + aggregate, then the models.
//! - `keys=N`: N keys, each sending `rate` requests a minute for a day, in batches of one
//!   minute: the models' cost grows with key-minutes, not events, so few events per
//!   key-minute is the expensive case.

use std::borrow::Cow;
use std::hint::black_box;
use std::time::{Duration, Instant};

use keywatch::aggregate::Aggregate;
use keywatch::anomaly::{AnomalyConfig, AnomalyModels};
use keywatch::event::{AuthEvent, Decoder, Fingerprinter, Format, Outcome};
use keywatch::sample::{self, SampleOptions};

const ROUNDS: usize = 3;
const BATCH: usize = 4096;

fn best_of<T>(rounds: usize, mut f: impl FnMut() -> (Duration, T)) -> (Duration, T) {
    let mut best: Option<(Duration, T)> = None;
    for _ in 0..rounds {
        let (d, v) = f();
        if best.as_ref().is_none_or(|(b, _)| d < *b) {
            best = Some((d, v));
        }
    }
    best.expect("one round")
}

fn ns(d: Duration, n: u64) -> f64 {
    d.as_nanos() as f64 / n.max(1) as f64
}

fn main() {
    let lines: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200_000);
    println!(
        "{:<22} {:>10} {:>12} {:>16} {:>14} {:>14} {:>7}",
        "corpus",
        "events",
        "key-minutes",
        "decode+agg ns/ev",
        "models ns/ev",
        "ns/key-minute",
        "added"
    );

    // The quick-start log, batched like the pipeline.
    let opts = SampleOptions {
        lines,
        ..SampleOptions::default()
    };
    let corpus: Vec<Vec<u8>> = sample::generate(&opts)
        .expect("sample")
        .into_iter()
        .map(String::into_bytes)
        .collect();
    let decoder = Decoder::new(
        Format::preset("kong").expect("kong"),
        Fingerprinter::new(b"benchmark-secret-0123456789", 4),
        None,
    );
    let batches: Vec<Aggregate> = corpus
        .chunks(BATCH)
        .map(|chunk| {
            let mut agg = Aggregate::default();
            let mut events = Vec::new();
            for line in chunk {
                decoder.decode(line, &mut events).expect("decode");
                for ev in events.drain(..) {
                    agg.add(&ev);
                }
            }
            agg
        })
        .collect();
    let (t_decode, events) = best_of(ROUNDS, || {
        let t = Instant::now();
        let mut n = 0;
        for chunk in corpus.chunks(BATCH) {
            let mut agg = Aggregate::default();
            let mut events = Vec::new();
            for line in chunk {
                decoder.decode(line, &mut events).expect("decode");
                for ev in events.drain(..) {
                    agg.add(&ev);
                }
            }
            n += agg.events;
            black_box(&agg);
        }
        (t.elapsed(), n)
    });
    report("log (kong sample)", &batches, Some((t_decode, events)));

    // Many keys, few events per key-minute.
    for (keys, rate) in [(1_000usize, 2u32), (10_000, 1), (10_000, 10)] {
        let minutes = if keys >= 10_000 { 6 * 60 } else { 24 * 60 };
        let key_names: Vec<String> = (0..keys).map(|k| format!("key-{k:06}")).collect();
        let ips: Vec<String> = (0..keys)
            .map(|k| format!("10.{}.{}.7", k / 250 % 250, k % 250))
            .collect();
        let start = 1_767_571_200_000i64;
        let mut batches = Vec::with_capacity(minutes);
        let mut events = 0u64;
        for m in 0..minutes as i64 {
            let mut agg = Aggregate::default();
            for (k, key) in key_names.iter().enumerate() {
                for i in 0..rate {
                    let ts = start + m * 60_000 + i64::from(i) * (60_000 / i64::from(rate));
                    let outcome = if (k + i as usize + m as usize).is_multiple_of(97) {
                        Outcome::InvalidKey
                    } else {
                        Outcome::Ok
                    };
                    let mut ev = AuthEvent::new(ts, Cow::Borrowed(key.as_str()), 200, outcome);
                    ev.latency_ms = Some(20.0 + (i % 7) as f64);
                    ev.source_ip = Some(Cow::Borrowed(ips[k].as_str()));
                    ev.user_agent = Some(Cow::Borrowed("client/1.0"));
                    ev.endpoint = Some(Cow::Borrowed("/v1/orders"));
                    agg.add(&ev);
                    events += 1;
                }
            }
            batches.push(agg);
        }
        let _ = events;
        report(&format!("keys={keys} rate={rate}/min"), &batches, None);
    }
}

/// Times the models over `batches` (fresh models each round) and prints one row.
fn report(name: &str, batches: &[Aggregate], decode: Option<(Duration, u64)>) {
    let events: u64 = batches.iter().map(|a| a.events).sum();
    let key_minutes: u64 = batches.iter().map(|a| a.rollups().count() as u64).sum();
    let (t_models, found) = best_of(ROUNDS, || {
        let mut models = AnomalyModels::new(AnomalyConfig::default());
        let t = Instant::now();
        let mut found = 0usize;
        for agg in batches {
            found += models.observe_aggregate(agg).len();
        }
        (t.elapsed(), (found, models.key_count()))
    });
    let models_ns = ns(t_models, events);
    let (decode_ns, share) = match decode {
        Some((t, n)) => {
            let d = ns(t, n);
            (format!("{d:.0}"), format!("{:.0}%", 100.0 * models_ns / d))
        }
        None => ("-".to_owned(), "-".to_owned()),
    };
    println!(
        "{:<22} {:>10} {:>12} {:>16} {:>14.0} {:>14.0} {:>7}   ({} findings, {} keys)",
        name,
        events,
        key_minutes,
        decode_ns,
        models_ns,
        ns(t_models, key_minutes),
        share,
        found.0,
        found.1
    );
}
