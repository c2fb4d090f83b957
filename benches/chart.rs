//! What the adoption chart costs each reminder email: the time to draw and encode it and
//! the bytes it adds, for rotations of one, two and four weeks of hourly points.
//!
//! Run: `cargo bench --bench chart` (best of 10 rounds per size, one core).

use std::hint::black_box;
use std::time::{Duration, Instant};

use keywatch::chart::{adoption_png, sparkline};
use keywatch::detect::{Forecast, Phase, RotationStatus, SharePoint};

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

fn status(days: i64) -> RotationStatus {
    let start = 1_794_301_200_000;
    let hours = days * 24;
    RotationStatus {
        old_key: "key-a".into(),
        old_name: None,
        new_key: "key-b".into(),
        new_name: None,
        owner: "acme".into(),
        timezone: "Europe/Berlin".into(),
        started_ms: start,
        deadline_ms: start + (days + 3) * DAY,
        phase: Phase::OnTrack,
        share_24h: Some(0.8),
        share: (0..hours)
            .map(|h| SharePoint {
                hour_ms: start + h * HOUR,
                share: (1.0 - (-(h as f64) / 70.0).exp()) * 0.9,
                requests: if (h + 10) % 24 < 11 { 120 } else { 30 },
            })
            .collect(),
        old_requests: 1000,
        new_requests: 9000,
        last_old_use_ms: None,
        safe_to_revoke_ms: start + (days + 10) * DAY,
        forecast: Forecast {
            completion_ms: Some(start + (days + 5) * DAY),
            slope_per_day: Some(0.02),
            basis_hours: 72,
            basis_requests: 5000,
            stalled: false,
        },
        lingering: Vec::new(),
        old_key_sources: Vec::new(),
    }
}

fn best_of(rounds: usize, mut f: impl FnMut()) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..rounds {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed());
    }
    best
}

fn main() {
    println!("adoption chart (640x300 PNG), best of 10:");
    for days in [7, 14, 28] {
        let s = status(days);
        let bytes = adoption_png(&s).expect("draws").len();
        let t = best_of(10, || {
            black_box(adoption_png(black_box(&s)).expect("draws"));
        });
        let spark = best_of(10, || {
            black_box(sparkline(black_box(&s), 24));
        });
        println!(
            "  {days:>2} days ({:>3} hourly points): {:>6.1} ms to draw and encode, {:>6} bytes \
             ({:>6} as base64 in the mail), sparkline {:>5.1} µs",
            s.share.len(),
            t.as_secs_f64() * 1e3,
            bytes,
            bytes.div_ceil(3) * 4,
            spark.as_secs_f64() * 1e6
        );
    }
}
