//! Decode + fingerprint + aggregate throughput per preset, next to a plain
//! `serde_json::from_slice::<serde_json::Value>` of the same lines, and decode + fingerprint
//! alone (the ratio columns compare each with the `Value` parse).
//!
//! Run: `cargo bench --bench decode` (optionally `-- LINES` to change the corpus size).
//! Single-threaded: both loops run on one core, one after the other, best of 5 rounds.

use std::hint::black_box;
use std::time::{Duration, Instant};

use keywatch::aggregate::Aggregate;
use keywatch::event::{Decoder, Fingerprinter, Format, PRESETS};
use keywatch::sample::{self, SampleOptions};

const ROUNDS: usize = 5;

fn best_of(rounds: usize, mut f: impl FnMut() -> u64) -> (Duration, u64) {
    let mut best = Duration::MAX;
    let mut n = 0;
    for _ in 0..rounds {
        let t = Instant::now();
        n = f();
        best = best.min(t.elapsed());
    }
    (best, n)
}

fn main() {
    let lines: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(50_000);
    println!(
        "{:<10} {:>9} {:>8} {:>14} {:>14} {:>7} {:>14} {:>7}",
        "preset", "lines", "avg B", "Value ev/s", "keywatch ev/s", "ratio", "decode ev/s", "ratio"
    );
    for preset in PRESETS {
        let opts = SampleOptions {
            preset: preset.to_string(),
            lines,
            ..SampleOptions::default()
        };
        let corpus: Vec<Vec<u8>> = sample::generate(&opts)
            .expect("sample")
            .into_iter()
            .map(String::into_bytes)
            .collect();
        let bytes: usize = corpus.iter().map(Vec::len).sum();
        let decoder = Decoder::new(
            Format::preset(preset).expect("preset"),
            Fingerprinter::new(b"benchmark-secret-0123456789", 4),
            None,
        );

        let (t_value, n_value) = best_of(ROUNDS, || {
            let mut n = 0;
            for line in &corpus {
                let v: serde_json::Value = serde_json::from_slice(line).expect("json");
                black_box(&v);
                n += 1;
            }
            n
        });

        let (t_kw, n_kw) = best_of(ROUNDS, || {
            let mut agg = Aggregate::default();
            let mut events = Vec::new();
            for line in &corpus {
                decoder.decode(line, &mut events).expect("decode");
                for ev in events.drain(..) {
                    agg.add(&ev);
                }
            }
            black_box(agg.key_count());
            agg.events
        });

        let (t_dec, n_dec) = best_of(ROUNDS, || {
            let mut n = 0u64;
            let mut events = Vec::new();
            for line in &corpus {
                decoder.decode(line, &mut events).expect("decode");
                n += events.len() as u64;
                black_box(&events);
                events.clear();
            }
            n
        });

        let rate = |n: u64, t: Duration| n as f64 / t.as_secs_f64();
        let (rv, rk, rd) = (rate(n_value, t_value), rate(n_kw, t_kw), rate(n_dec, t_dec));
        println!(
            "{:<10} {:>9} {:>8} {:>14.0} {:>14.0} {:>6.2}x {:>14.0} {:>6.2}x",
            preset,
            corpus.len(),
            bytes / corpus.len().max(1),
            rv,
            rk,
            rk / rv,
            rd,
            rd / rv
        );
    }
}
