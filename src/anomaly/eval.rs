//! Evaluation: a generator of labelled series and a NAB-style scorer, used by
//! `benches/anomaly_eval.rs` and the tests.
//!
//! The generator ([`corpus`]) makes series that look like the usual public benchmarks:
//! sampling every 1 min to 1 h (some irregular, some with gaps), 1 000 to 16 000 points,
//! shapes with daily and weekly seasonality, noisy AR processes with heavy tails and benign
//! blips, slow random walks, flat step series with integer values, short-period square
//! waves, and 0 to 3 incidents of the kinds below, each labelled at its onset.
//!
//! The scorer ([`score_series`], [`summarize`], [`best_threshold`]) follows the Numenta Anomaly Benchmark: a window of
//! `10% of the length / number of incidents` points centred on each onset; the first 15%
//! of a series (at most 750 points) is a probation period that is not scored; one threshold
//! for all series; per window the earliest detection scores
//! `A_TP · σ(position)` with the scaled sigmoid `2/(1+e^{5y}) − 1` (1 at the window start,
//! 0 at its end), a window without detection scores `A_FN`, and every detection outside
//! windows scores `A_FP` (less right after a window, per the sigmoid); the total is
//! normalized to 100 for a perfect detector and 0 for one that never fires. Standard
//! profile: A_TP = 1, A_FP = −0.11, A_FN = −1.

/// What kind of incident a label marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Incident {
    SpikeUp,
    SpikeDown,
    LevelShift,
    TemporaryShift,
    Drift,
    VarianceChange,
    SeasonalBreak,
    NewRegime,
}

impl Incident {
    pub const ALL: [Incident; 8] = [
        Incident::SpikeUp,
        Incident::SpikeDown,
        Incident::LevelShift,
        Incident::TemporaryShift,
        Incident::Drift,
        Incident::VarianceChange,
        Incident::SeasonalBreak,
        Incident::NewRegime,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Incident::SpikeUp => "spike_up",
            Incident::SpikeDown => "spike_down",
            Incident::LevelShift => "level_shift",
            Incident::TemporaryShift => "temporary_shift",
            Incident::Drift => "drift",
            Incident::VarianceChange => "variance_change",
            Incident::SeasonalBreak => "seasonal_break",
            Incident::NewRegime => "new_regime",
        }
    }
}

/// A generated series with its incidents (onset index and kind).
#[derive(Debug, Clone)]
pub struct Labelled {
    pub name: String,
    pub timestamps: Vec<i64>,
    pub values: Vec<f64>,
    pub incidents: Vec<(usize, Incident)>,
}

/// SplitMix64: small, fast, deterministic.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn f(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.f() * n as f64) as usize % n.max(1)
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.f() < p
    }

    pub fn normal(&mut self) -> f64 {
        let u1 = self.f().max(1e-300);
        let u2 = self.f();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Student t with `df` degrees of freedom, scaled to unit variance for df > 2.
    pub fn student(&mut self, df: f64) -> f64 {
        let z = self.normal();
        let mut chi = 0.0;
        for _ in 0..df as usize {
            let n = self.normal();
            chi += n * n;
        }
        let t = z / (chi / df).sqrt().max(1e-9);
        t / (df / (df - 2.0)).sqrt()
    }

    pub fn poisson(&mut self, lambda: f64) -> f64 {
        if lambda > 30.0 {
            return (lambda + lambda.sqrt() * self.normal()).round().max(0.0);
        }
        let l = (-lambda).exp();
        let (mut k, mut p) = (0.0, 1.0);
        loop {
            p *= self.f();
            if p <= l {
                return k;
            }
            k += 1.0;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    Seasonal,
    Noisy,
    Wander,
    Steps,
    Square,
    Counts,
}

/// `n` labelled series from `seed`. The same seed gives the same corpus.
pub fn corpus(n: usize, seed: u64) -> Vec<Labelled> {
    let mut rng = Rng::new(seed);
    (0..n).map(|i| series(i, &mut rng)).collect()
}

fn series(idx: usize, rng: &mut Rng) -> Labelled {
    const SHAPES: [Shape; 9] = [
        Shape::Seasonal,
        Shape::Seasonal,
        Shape::Seasonal,
        Shape::Noisy,
        Shape::Noisy,
        Shape::Wander,
        Shape::Steps,
        Shape::Square,
        Shape::Counts,
    ];
    let shape = SHAPES[rng.below(SHAPES.len())];
    const INTERVALS: [i64; 8] = [60, 300, 300, 300, 300, 600, 1800, 3600];
    let interval_s = INTERVALS[rng.below(INTERVALS.len())];
    let len = match rng.below(6) {
        0 => rng.range(1000.0, 2000.0),
        1..=3 => rng.range(2000.0, 6000.0),
        4 => rng.range(6000.0, 10000.0),
        _ => rng.range(10000.0, 16000.0),
    } as usize;
    let irregular = rng.chance(0.15);
    let start_s = 1_396_000_000 + rng.below(10_000) as i64 * 3600;
    let mut timestamps = Vec::with_capacity(len);
    let mut t = start_s;
    for _ in 0..len {
        timestamps.push(t * 1000);
        let step = if irregular {
            let mut s = interval_s as f64 * rng.range(0.7, 1.3);
            if rng.chance(0.005) {
                s *= rng.range(3.0, 30.0);
            }
            s.round() as i64
        } else {
            interval_s
        };
        t += step.max(1);
    }

    // Base signal and noise.
    let level = 10f64.powf(rng.range(0.5, 3.5));
    let amp = level * rng.range(0.2, 0.8);
    let weekly = rng.chance(0.5);
    let weekend = rng.range(0.4, 0.9);
    let business = rng.chance(0.4);
    let harmonic = rng.range(0.0, 0.4);
    let phase = rng.range(0.0, 1.0);
    let noise_rel = rng.range(0.03, 0.2);
    let heavy = rng.chance(0.4);
    let phi = rng.range(0.0, 0.9);
    let blips = rng.chance(0.3);
    let sq_period = 12 + rng.below(48);
    let sigma = match shape {
        Shape::Seasonal => amp * noise_rel,
        Shape::Noisy => level * rng.range(0.05, 0.3),
        Shape::Wander => level * rng.range(0.01, 0.05),
        Shape::Steps => level * rng.range(0.0, 0.02),
        Shape::Square => amp * rng.range(0.02, 0.1),
        Shape::Counts => 0.0,
    };
    let mut base = vec![0.0; len];
    let mut noise = vec![0.0; len];
    let mut ar = 0.0;
    let mut walk = 0.0;
    let mut step_level = level;
    for i in 0..len {
        let ts = timestamps[i] / 1000;
        let day = (ts.rem_euclid(86_400)) as f64 / 86_400.0;
        let dow = (ts.div_euclid(86_400) + 4).rem_euclid(7); // 0 = Sunday
        let daily = if business {
            let on = ((day - 0.35 - phase * 0.1) * 24.0).clamp(0.0, 1.0)
                * ((0.75 + phase * 0.1 - day) * 24.0).clamp(0.0, 1.0);
            2.0 * on - 0.6
        } else {
            (std::f64::consts::TAU * (day + phase)).sin()
                + harmonic * (2.0 * std::f64::consts::TAU * (day + phase)).sin()
        };
        let week = if weekly && (dow == 0 || dow == 6) {
            weekend
        } else {
            1.0
        };
        let e = if heavy {
            rng.student(3.0)
        } else {
            rng.normal()
        };
        ar = phi * ar + (1.0 - phi * phi).sqrt() * e;
        base[i] = match shape {
            Shape::Seasonal => (level + amp * daily) * week,
            Shape::Noisy => level,
            Shape::Wander => {
                walk = 0.995 * walk + rng.normal() * level * 0.01;
                level + walk
            }
            Shape::Steps => {
                if rng.chance(0.002) {
                    step_level = (step_level * rng.range(0.8, 1.25)).round();
                }
                step_level.round()
            }
            Shape::Square => {
                if (i / sq_period) & 1 == 0 {
                    level + amp
                } else {
                    level
                }
            }
            Shape::Counts => ((level / 30.0).max(2.0) * (1.0 + 0.6 * daily)).max(0.2) * week,
        };
        noise[i] = sigma * ar;
        if blips && rng.chance(0.003) {
            noise[i] += sigma * rng.range(3.0, 5.0) * if rng.chance(0.5) { 1.0 } else { -1.0 };
        }
    }

    // Incidents, after the probation period and apart from each other.
    let count = match rng.below(10) {
        0 => 0,
        1..=4 => 1,
        5..=7 => 2,
        _ => 3,
    };
    let prob = (len as f64 * 0.15).min(750.0) as usize;
    let mut onsets: Vec<usize> = Vec::new();
    let mut tries = 0;
    while onsets.len() < count && tries < 100 {
        tries += 1;
        let at = prob + 100 + rng.below(len.saturating_sub(prob + 300).max(1));
        let gap = len / (count + 1) / 2;
        if onsets.iter().all(|o| o.abs_diff(at) > gap) {
            onsets.push(at);
        }
    }
    onsets.sort_unstable();
    let day_pts = (86_400 / interval_s).max(1) as usize;
    let noise_sd = match shape {
        Shape::Counts => (level / 30.0).max(2.0).sqrt(),
        _ => sigma.max(level * 0.005) * if heavy { 1.5 } else { 1.0 },
    };
    let base_mean = base.iter().sum::<f64>() / len.max(1) as f64;
    let span = (amp.max(noise_sd * 3.0)).max(level * 0.1);
    let mut incidents = Vec::new();
    let mut add = vec![0.0; len];
    let mut mult = vec![1.0; len];
    let mut noise_mult = vec![1.0; len];
    for &at in &onsets {
        let seasonal_shape = matches!(shape, Shape::Seasonal | Shape::Counts);
        let kinds: &[Incident] = if seasonal_shape && len > at + day_pts / 2 {
            &Incident::ALL
        } else {
            &Incident::ALL[..7]
        };
        let mut kind = kinds[rng.below(kinds.len())];
        if kind == Incident::SeasonalBreak && !seasonal_shape {
            kind = Incident::TemporaryShift;
        }
        let sign = if rng.chance(0.5) { 1.0 } else { -1.0 };
        let mag = |rng: &mut Rng, lo: f64, hi: f64| noise_sd.max(span * 0.05) * rng.range(lo, hi);
        match kind {
            Incident::SpikeUp | Incident::SpikeDown => {
                let s = if kind == Incident::SpikeUp { 1.0 } else { -1.0 };
                let m = mag(rng, 8.0, 20.0).max(span * 0.5);
                let w = 1 + rng.below(3);
                for v in add.iter_mut().skip(at).take(w) {
                    *v += s * m;
                }
            }
            Incident::LevelShift => {
                let m = mag(rng, 5.0, 12.0).max(span * 0.3);
                for v in add.iter_mut().skip(at) {
                    *v += sign * m;
                }
            }
            Incident::TemporaryShift => {
                let m = mag(rng, 5.0, 12.0).max(span * 0.3);
                let w = (day_pts / 4).clamp(10, 400) + rng.below(day_pts.clamp(10, 400));
                for v in add.iter_mut().skip(at).take(w) {
                    *v += sign * m;
                }
            }
            Incident::Drift => {
                let m = mag(rng, 6.0, 12.0).max(span * 0.5);
                let w = 100 + rng.below(400);
                for (k, v) in add.iter_mut().skip(at).enumerate() {
                    *v += sign * m * (k as f64 / w as f64).min(1.0);
                }
            }
            Incident::VarianceChange => {
                let f = rng.range(3.0, 6.0);
                let w = 200 + rng.below(600);
                for v in noise_mult.iter_mut().skip(at).take(w) {
                    *v = f;
                }
                if sigma == 0.0 || shape == Shape::Counts {
                    // No noise to amplify: make some.
                    for (k, v) in add.iter_mut().skip(at).take(w).enumerate() {
                        *v += noise_sd * f * ((k * 7919 % 13) as f64 / 6.0 - 1.0);
                    }
                }
            }
            Incident::SeasonalBreak => {
                // Half a day keeps the level it had at the onset (a flat middle).
                let w = day_pts / 2;
                let hold = base[at];
                for k in at..(at + w).min(len) {
                    add[k] += hold - base[k];
                }
            }
            Incident::NewRegime => {
                // The daily pattern doubles in amplitude from here on.
                for k in at..len {
                    mult[k] = 1.0;
                    add[k] += (base[k] - base_mean).clamp(-span * 2.0, span * 2.0);
                }
            }
        }
        incidents.push((at, kind));
    }

    let values: Vec<f64> = (0..len)
        .map(|i| {
            let v = base[i] * mult[i] + add[i];
            match shape {
                Shape::Counts => {
                    let lam = v.max(0.05);
                    let extra = if noise_mult[i] > 1.0 {
                        rng.normal() * lam.sqrt() * noise_mult[i]
                    } else {
                        0.0
                    };
                    (rng.poisson(lam) + extra).max(0.0).round()
                }
                Shape::Steps => (v + noise[i] * noise_mult[i]).round(),
                _ => v + noise[i] * noise_mult[i],
            }
        })
        .collect();
    let kinds: Vec<&str> = incidents.iter().map(|(_, k)| k.as_str()).collect();
    Labelled {
        name: format!(
            "s{idx:03}_{:?}_{}s_{}{}",
            shape,
            interval_s,
            len,
            if kinds.is_empty() {
                String::new()
            } else {
                format!("_{}", kinds.join("+"))
            }
        )
        .to_lowercase(),
        timestamps,
        values,
        incidents,
    }
}

/// NAB's cost profile.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    pub tp: f64,
    pub fp: f64,
    pub fn_: f64,
}

pub const STANDARD: Profile = Profile {
    tp: 1.0,
    fp: -0.11,
    fn_: -1.0,
};

fn scaled_sigmoid(y: f64) -> f64 {
    if y > 3.0 {
        -1.0
    } else {
        2.0 / (1.0 + (5.0 * y).exp()) - 1.0
    }
}

/// NAB windows `(start, end)` (inclusive) of a series of `len` points with these onsets.
pub fn windows(len: usize, onsets: &[usize]) -> Vec<(usize, usize)> {
    if onsets.is_empty() {
        return Vec::new();
    }
    let w = ((len as f64 * 0.1) / onsets.len() as f64) as usize;
    onsets
        .iter()
        .map(|&o| (o.saturating_sub(w / 2), (o + w / 2).min(len - 1)))
        .collect()
}

pub fn probation(len: usize) -> usize {
    ((len as f64 * 0.15) as usize).min(750)
}

/// What one threshold achieves on one series.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Raw NAB score.
    pub raw: f64,
    pub windows: usize,
    pub detected: usize,
    pub false_alarms: usize,
    /// First detection minus onset, in points, per detected window.
    pub delays: Vec<f64>,
    /// Per window: (incident, detected).
    pub hits: Vec<(Incident, bool)>,
}

/// Scores one series' anomaly scores at `threshold`.
pub fn score_series(
    scores: &[f64],
    incidents: &[(usize, Incident)],
    threshold: f64,
    profile: Profile,
) -> Outcome {
    let len = scores.len();
    let onsets: Vec<usize> = incidents.iter().map(|(o, _)| *o).collect();
    let wins = windows(len, &onsets);
    let prob = probation(len);
    let max_tp = scaled_sigmoid(-1.0);
    let mut out = Outcome {
        windows: wins.len(),
        ..Outcome::default()
    };
    let mut first_in: Vec<Option<usize>> = vec![None; wins.len()];
    let mut w = 0usize;
    let mut prev_end: Option<(usize, usize)> = None;
    for (i, &s) in scores.iter().enumerate() {
        while w < wins.len() && i > wins[w].1 {
            prev_end = Some(wins[w]);
            w += 1;
        }
        if i < prob || s.is_nan() || s < threshold {
            continue;
        }
        if w < wins.len() && i >= wins[w].0 {
            if first_in[w].is_none() {
                first_in[w] = Some(i);
            }
        } else {
            let unweighted = match prev_end {
                None => -1.0,
                Some((a, b)) => {
                    let width = (b - a + 1) as f64;
                    scaled_sigmoid((i - b) as f64 / (width - 1.0).max(1.0))
                }
            };
            out.raw += unweighted * profile.fp.abs();
            out.false_alarms += 1;
        }
    }
    for (k, (a, b)) in wins.iter().enumerate() {
        match first_in[k] {
            Some(i) => {
                let width = (b - a + 1) as f64;
                let pos = -((b - i + 1) as f64) / width;
                out.raw += profile.tp * scaled_sigmoid(pos) / max_tp;
                out.detected += 1;
                out.delays.push(i as f64 - onsets[k] as f64);
                out.hits.push((incidents[k].1, true));
            }
            None => {
                out.raw += profile.fn_;
                out.hits.push((incidents[k].1, false));
            }
        }
    }
    out
}

/// Totals over a corpus at one threshold.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub threshold: f64,
    /// Normalized NAB score (100 perfect, 0 = never fires).
    pub nab: f64,
    pub windows: usize,
    pub detected: usize,
    pub false_alarms: usize,
    pub precision: f64,
    pub recall: f64,
    /// Mean and median of first detection minus onset (points).
    pub mean_delay: f64,
    pub median_delay: f64,
    /// Per incident kind: (windows, detected).
    pub by_kind: Vec<(Incident, usize, usize)>,
    /// False alarms on series without incidents, per 1 000 points.
    pub fa_per_kpt: f64,
}

/// Scores a corpus at one threshold.
pub fn summarize(
    corpus: &[Labelled],
    scores: &[Vec<f64>],
    threshold: f64,
    profile: Profile,
) -> Summary {
    let mut raw = 0.0;
    let mut s = Summary {
        threshold,
        ..Summary::default()
    };
    let mut delays = Vec::new();
    let mut kinds: Vec<(Incident, usize, usize)> =
        Incident::ALL.iter().map(|k| (*k, 0, 0)).collect();
    let mut points = 0usize;
    for (l, sc) in corpus.iter().zip(scores) {
        let o = score_series(sc, &l.incidents, threshold, profile);
        raw += o.raw;
        s.windows += o.windows;
        s.detected += o.detected;
        s.false_alarms += o.false_alarms;
        delays.extend(o.delays);
        for (k, hit) in o.hits {
            let e = kinds.iter_mut().find(|e| e.0 == k).expect("all kinds");
            e.1 += 1;
            e.2 += usize::from(hit);
        }
        points += sc.len();
    }
    let null = s.windows as f64 * profile.fn_;
    let perfect = s.windows as f64 * profile.tp;
    s.nab = if perfect > null {
        100.0 * (raw - null) / (perfect - null)
    } else {
        0.0
    };
    s.precision = if s.detected + s.false_alarms > 0 {
        s.detected as f64 / (s.detected + s.false_alarms) as f64
    } else {
        0.0
    };
    s.recall = if s.windows > 0 {
        s.detected as f64 / s.windows as f64
    } else {
        0.0
    };
    if !delays.is_empty() {
        s.mean_delay = delays.iter().sum::<f64>() / delays.len() as f64;
        delays.sort_by(|a, b| a.total_cmp(b));
        s.median_delay = delays[delays.len() / 2];
    }
    s.fa_per_kpt = 1000.0 * s.false_alarms as f64 / points.max(1) as f64;
    s.by_kind = kinds.into_iter().filter(|k| k.1 > 0).collect();
    s
}

/// The threshold (among quantiles of all scores) with the best NAB score.
pub fn best_threshold(corpus: &[Labelled], scores: &[Vec<f64>], profile: Profile) -> Summary {
    let mut all: Vec<f64> = scores
        .iter()
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    all.sort_by(|a, b| a.total_cmp(b));
    all.dedup();
    let mut cands: Vec<f64> = Vec::new();
    let n = all.len();
    // Dense in the upper tail, where thresholds that make sense live.
    for k in 0..400 {
        let q = 1.0 - 0.5 * (-(k as f64) / 40.0).exp();
        if n > 0 {
            cands.push(all[((n - 1) as f64 * q) as usize]);
        }
    }
    for k in 1..100 {
        cands.push(k as f64 / 100.0);
    }
    cands.sort_by(|a, b| a.total_cmp(b));
    cands.dedup();
    let mut best: Option<Summary> = None;
    for t in cands {
        let s = summarize(corpus, scores, t, profile);
        let better = match &best {
            None => true,
            Some(b) => s.nab > b.nab,
        };
        if better {
            best = Some(s);
        }
    }
    best.unwrap_or_default()
}

/// The baseline: a z-score against the mean and standard deviation of the previous
/// `window` points, mapped to [0, 1] by `z / (z + 3)`.
pub fn windowed_zscore(values: &[f64], window: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(values.len());
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for (i, &x) in values.iter().enumerate() {
        let n = i.min(window) as f64;
        let score = if n >= 10.0 {
            let mean = s1 / n;
            let var = (s2 / n - mean * mean).max(0.0);
            let sd = var.sqrt().max(1e-9 * mean.abs().max(1e-9));
            let z = (x - mean).abs() / sd;
            z / (z + 3.0)
        } else {
            0.0
        };
        out.push(score);
        s1 += x;
        s2 += x * x;
        if i >= window {
            let old = values[i - window];
            s1 -= old;
            s2 -= old * old;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_and_null_detectors_score_100_and_0() {
        let c = corpus(6, 1);
        let null: Vec<Vec<f64>> = c.iter().map(|l| vec![0.0; l.values.len()]).collect();
        let s = summarize(&c, &null, 0.5, STANDARD);
        assert!(s.nab.abs() < 1e-9, "{}", s.nab);
        let perfect: Vec<Vec<f64>> = c
            .iter()
            .map(|l| {
                let mut v = vec![0.0; l.values.len()];
                for (a, _) in windows(
                    v.len(),
                    &l.incidents.iter().map(|x| x.0).collect::<Vec<_>>(),
                ) {
                    v[a] = 1.0;
                }
                v
            })
            .collect();
        let s = summarize(&c, &perfect, 0.5, STANDARD);
        assert!((s.nab - 100.0).abs() < 1e-6, "{}", s.nab);
    }

    #[test]
    fn false_alarms_cost_011_and_less_right_after_a_window() {
        let inc = [(500usize, Incident::SpikeUp)];
        let mut sc = vec![0.0; 1000];
        sc[300] = 1.0; // before the window (50 wide at 450..550): full cost
        let o = score_series(&sc, &inc, 0.5, STANDARD);
        assert!((o.raw - (-1.0 - 0.11)).abs() < 1e-9, "{}", o.raw);
        let mut sc = vec![0.0; 1000];
        sc[551] = 1.0; // right after it: almost free
        let o = score_series(&sc, &inc, 0.5, STANDARD);
        assert!(o.raw > -1.01 && o.raw < -1.0, "{}", o.raw);
    }
}
