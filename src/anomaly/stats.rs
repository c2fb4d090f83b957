//! Small streaming statistics the models are built from. Every type here has a fixed size
//! (no growth with the length of the stream) and an O(1) or O(window) update.

/// A window of the last `cap` values, kept both in arrival order and sorted, so that the
/// median and other quantiles cost O(1) and an update costs two binary searches and one
/// `memmove` of the values between the old value's place and the new one's.
#[derive(Debug, Clone)]
pub struct SortedWindow {
    ring: Vec<f64>,
    sorted: Vec<f64>,
    head: usize,
    cap: usize,
}

impl SortedWindow {
    pub fn new(cap: usize) -> SortedWindow {
        let cap = cap.max(1);
        SortedWindow {
            ring: Vec::with_capacity(cap),
            sorted: Vec::with_capacity(cap),
            head: 0,
            cap,
        }
    }

    pub fn len(&self) -> usize {
        self.ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.ring.len() == self.cap
    }

    /// Adds `x`; when full, drops the oldest value and returns it.
    pub fn push(&mut self, x: f64) -> Option<f64> {
        if self.ring.len() < self.cap {
            self.ring.push(x);
            let i = self.sorted.partition_point(|v| *v < x);
            self.sorted.insert(i, x);
            return None;
        }
        let old = std::mem::replace(&mut self.ring[self.head], x);
        self.head = (self.head + 1) % self.cap;
        // Overwrite the old value with the new one and move it to its place: only the
        // values between the two positions shift.
        let s = &mut self.sorted;
        let i = s.partition_point(|v| *v < old).min(s.len() - 1);
        let j = s.partition_point(|v| *v < x);
        if j > i {
            s.copy_within(i + 1..j, i);
            s[j - 1] = x;
        } else {
            s.copy_within(j..i, j + 1);
            s[j] = x;
        }
        Some(old)
    }

    /// The quantile `q` (nearest rank), `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.sorted.len();
        if n == 0 {
            return None;
        }
        let i = ((n - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        Some(self.sorted[i])
    }

    pub fn median(&self) -> Option<f64> {
        let n = self.sorted.len();
        match n {
            0 => None,
            _ if n % 2 == 1 => Some(self.sorted[n / 2]),
            _ => Some(0.5 * (self.sorted[n / 2 - 1] + self.sorted[n / 2])),
        }
    }

    /// The value pushed `back` pushes ago (0 = the newest).
    pub fn recent(&self, back: usize) -> Option<f64> {
        let n = self.ring.len();
        if back >= n {
            return None;
        }
        let newest = if n < self.cap {
            n - 1
        } else {
            (self.head + self.cap - 1) % self.cap
        };
        Some(self.ring[(newest + self.cap - back) % self.cap])
    }
}

/// A robust, exponentially weighted scale: the mean absolute value of a residual, each
/// update clipped at `clip` times the current scale so that one outlier cannot inflate it,
/// with a warm-up that averages the first values plainly.
#[derive(Debug, Clone, Copy)]
pub struct EwScale {
    pub value: f64,
    pub n: u32,
}

impl EwScale {
    pub const fn new() -> EwScale {
        EwScale { value: 0.0, n: 0 }
    }

    pub fn update(&mut self, abs_residual: f64, alpha: f64, clip: f64) {
        let a = abs_residual.abs();
        if self.n < 16 {
            self.n += 1;
            self.value += (a - self.value) / self.n as f64;
            return;
        }
        let capped = if self.value > 0.0 {
            a.min(clip * self.value)
        } else {
            a
        };
        self.value += alpha * (capped - self.value);
        self.n = self.n.saturating_add(1);
    }
}

impl Default for EwScale {
    fn default() -> Self {
        EwScale::new()
    }
}

/// Tail probability of a non-negative statistic by peaks over threshold (SPOT, Siffer et
/// al., KDD 2017). The first `init` observations are kept and calibrate the tail at once:
/// the threshold `u` is their 92nd percentile and the excesses above it start the fit.
/// From then on the threshold tracks the 92nd percentile (Robbins-Monro) and the excesses
/// over it follow a generalized Pareto distribution whose scale and shape come from their
/// exponentially weighted first two moments (shape kept in [0, 0.45], so a light tail is
/// treated as exponential). The probability that the statistic is at least `z` is then
/// `P(S > u) · (1 + γ (z−u)/σ)^(−1/γ)`.
///
/// Memory: 144 bytes; the `init` buffer is allocated at the first observation and freed
/// after calibration. Forgetting: about `1/alpha` observations.
#[derive(Debug, Clone)]
pub struct Tail {
    u: f64,
    /// Weighted count of observations and of exceedances.
    w_all: f64,
    w_exc: f64,
    /// Weighted sums of excesses and their squares.
    s1: f64,
    s2: f64,
    n: u32,
    init: Vec<f32>,
    init_n: u16,
    prior: f32,
    /// The largest observations of the last `1/alpha` (value, observation number), so
    /// that what happened several times recently is never called rarer than that.
    top: [(f32, u32); TOP],
}

/// Observations at least this share of a value count as "as large" for the floor.
const SIMILAR: f64 = 1.0;
/// Largest observations a tail remembers.
const TOP: usize = 8;

/// Robbins-Monro step of the threshold: from `RM_START` mean excesses, halved after
/// `RM_HALF` observations, down to `RM_END`.
const RM_START: f64 = 0.2;
const RM_HALF: f64 = 20.0;
const RM_END: f64 = 0.001;
/// Fraction of observations the threshold leaves above it.
const TAIL_FRACTION: f64 = 0.08;

impl Tail {
    /// A tail calibrated on its first `init` observations (at least 16), with two
    /// pseudo-excesses of mean `prior` (in the statistic's units) so that a calibration
    /// sample with few or no excesses still gives a sensible fit.
    pub fn new(init: usize, prior: f64) -> Tail {
        let init = init.clamp(16, 4096);
        Tail {
            u: 0.0,
            w_all: 0.0,
            w_exc: 0.0,
            s1: 0.0,
            s2: 0.0,
            n: 0,
            // Allocated at the first observation: most keys of a large fleet never feed
            // some of their tails.
            init: Vec::new(),
            init_n: init as u16,
            prior: prior as f32,
            top: [(f32::NEG_INFINITY, 0); TOP],
        }
    }

    /// Whether the calibration is done (before it, every p-value is 1).
    pub fn ready(&self) -> bool {
        self.n >= u32::from(self.init_n)
    }

    pub fn count(&self) -> u32 {
        self.n
    }

    /// Values held by the calibration buffer (0 once calibrated).
    pub fn buffer_capacity(&self) -> usize {
        self.init.capacity()
    }

    pub fn threshold(&self) -> f64 {
        self.u
    }

    /// Scale and shape of the fitted excess distribution.
    pub fn fit(&self) -> (f64, f64) {
        let w = self.w_exc.max(1e-9);
        let m = (self.s1 / w).max(1e-12);
        let var = (self.s2 / w - m * m).max(1e-24);
        let r = m * m / var;
        let gamma = (0.5 * (1.0 - r)).clamp(0.0, 0.25);
        let sigma = (0.5 * m * (1.0 + r)).max(1e-12);
        (sigma, gamma)
    }

    fn exceed_rate(&self) -> f64 {
        (self.w_exc / self.w_all.max(1e-9)).clamp(1e-4, 0.5)
    }

    /// P(S >= z) under the current fit; 1 below the threshold and before calibration.
    pub fn p_value(&self, z: f64) -> f64 {
        if !self.ready() || z.partial_cmp(&self.u) != Some(std::cmp::Ordering::Greater) {
            return 1.0;
        }
        let (sigma, gamma) = self.fit();
        let y = z - self.u;
        let tail = if gamma < 1e-6 {
            (-y / sigma).exp()
        } else {
            (1.0 + gamma * y / sigma).powf(-1.0 / gamma)
        };
        let fitted = (self.exceed_rate() * tail).max(1e-300);
        // Empirical floor: j recent observations at least SIMILAR times as large.
        let j = self
            .top
            .iter()
            .filter(|(v, _)| f64::from(*v) >= SIMILAR * z)
            .count();
        if j == 0 {
            fitted
        } else {
            let n = f64::from(self.n).min(self.w_all.max(1.0));
            fitted.max(j as f64 / (n + 1.0))
        }
    }

    fn remember(&mut self, z: f64, alpha: f64) {
        let horizon = (1.0 / alpha.max(1e-9)).min(f64::from(u32::MAX)) as u32;
        let now = self.n;
        // Forget what is older than the horizon.
        for t in self.top.iter_mut() {
            if now.saturating_sub(t.1) > horizon {
                *t = (f32::NEG_INFINITY, 0);
            }
        }
        let (i, min) = self
            .top
            .iter()
            .enumerate()
            .min_by(|a, b| a.1 .0.total_cmp(&b.1 .0))
            .map(|(i, t)| (i, t.0))
            .expect("TOP > 0");
        if z as f32 > min {
            self.top[i] = (z as f32, now);
        }
    }

    /// Adds an observation. Excesses are winsorized at the one-in-10 000 level, so that an
    /// anomaly does not make the next one look ordinary.
    pub fn update(&mut self, z: f64, alpha: f64) {
        if !z.is_finite() {
            return;
        }
        if !self.ready() {
            if self.init.capacity() == 0 {
                self.init.reserve_exact(usize::from(self.init_n));
            }
            self.init.push(z as f32);
            self.n += 1;
            if self.ready() {
                self.calibrate();
            }
            return;
        }
        self.n = self.n.saturating_add(1);
        if z > self.u {
            self.remember(z, alpha);
        }
        let keep = 1.0 - alpha;
        self.w_all = self.w_all * keep + 1.0;
        let above = z > self.u;
        if above {
            let (sigma, gamma) = self.fit();
            let r = (1e-4 / self.exceed_rate()).min(0.5);
            let cap = if gamma < 1e-6 {
                -sigma * r.ln()
            } else {
                sigma / gamma * (r.powf(-gamma) - 1.0)
            };
            let y = (z - self.u).min(cap);
            self.w_exc = self.w_exc * keep + 1.0;
            self.s1 = self.s1 * keep + y;
            self.s2 = self.s2 * keep + y * y;
        } else {
            self.w_exc *= keep;
            self.s1 *= keep;
            self.s2 *= keep;
        }
        // Robbins-Monro step on the percentile, in units of the mean excess, large at
        // first (a calibration sample can be unrepresentative) and then small.
        let m = (self.s1 / self.w_exc.max(1e-9)).max(1e-12);
        let since = f64::from(self.n - u32::from(self.init_n));
        let step = m * (RM_START / (1.0 + since / RM_HALF)).max(RM_END);
        self.u +=
            step * if above {
                1.0 - TAIL_FRACTION
            } else {
                -TAIL_FRACTION
            } / TAIL_FRACTION;
        if self.u < 0.0 {
            self.u = 0.0;
        }
    }

    fn calibrate(&mut self) {
        let mut v: Vec<f64> = self.init.iter().map(|x| f64::from(*x)).collect();
        self.init = Vec::new();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let k = ((n as f64) * (1.0 - TAIL_FRACTION)).floor() as usize;
        self.u = v[k.min(n - 1)];
        self.w_all = n as f64;
        let (mut s1, mut s2, mut c) = (0.0, 0.0, 0.0);
        for &x in &v {
            if x > self.u {
                let y = x - self.u;
                s1 += y;
                s2 += y * y;
                c += 1.0;
            }
        }
        let m0 = f64::from(self.prior);
        self.w_exc = c + 2.0;
        self.s1 = s1 + 2.0 * m0;
        self.s2 = s2 + 2.0 * 2.0 * m0 * m0;
        self.w_all = self.w_all.max(self.w_exc / 0.5);
    }
}

/// `-log10(p)`, the surprise of a probability, capped at 300.
pub fn surprise(p: f64) -> f64 {
    (-p.max(1e-300).log10()).clamp(0.0, 300.0)
}

/// Maps a surprise (`-log10 p`) to a score in [0, 1]: a logistic curve centred on 2 (one
/// chance in 100) with slope 2 per decade: 0.02 at 0, 0.12 at 1, 0.5 at 2, 0.88 at 3, 0.98
/// at 4, above 0.999 from 5.5 on.
pub fn score_of_surprise(s: f64) -> f64 {
    let x = 2.0 * (s - 2.0);
    let v = 1.0 / (1.0 + (-x).exp());
    v.clamp(0.0, 1.0)
}

/// Standard normal upper tail probability (Abramowitz-Stegun 7.1.26 via erfc).
pub fn normal_sf(z: f64) -> f64 {
    if z < 0.0 {
        return 1.0 - normal_sf(-z);
    }
    let x = z / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erfc = poly * (-x * x).exp();
    (0.5 * erfc).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_window_tracks_median_and_recent() {
        let mut w = SortedWindow::new(3);
        assert_eq!(w.median(), None);
        w.push(5.0);
        w.push(1.0);
        assert_eq!(w.median(), Some(3.0));
        w.push(9.0);
        assert_eq!(w.median(), Some(5.0));
        assert_eq!(w.push(2.0), Some(5.0));
        assert_eq!(w.median(), Some(2.0));
        assert_eq!(w.recent(0), Some(2.0));
        assert_eq!(w.recent(2), Some(1.0));
        assert_eq!(w.recent(3), None);
    }

    #[test]
    fn sorted_window_stays_sorted_with_duplicates() {
        let mut w = SortedWindow::new(50);
        let mut all: Vec<f64> = Vec::new();
        let mut x = 7u64;
        for _ in 0..1000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = ((x >> 40) % 100) as f64;
            w.push(v);
            all.push(v);
            let mut last: Vec<f64> = all[all.len().saturating_sub(50)..].to_vec();
            last.sort_by(|a, b| a.total_cmp(b));
            assert_eq!(w.sorted, last);
        }
    }

    #[test]
    fn tail_gives_small_p_to_extremes_only() {
        let mut t = Tail::new(128, 1.0);
        let mut x = 12345u64;
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            t.update(-(1.0 - u).ln(), 0.001); // Exp(1)
        }
        // 92nd percentile of Exp(1) is 2.53; the tracked threshold wanders around it.
        assert!((1.5..3.5).contains(&t.threshold()), "{}", t.threshold());
        let p = t.p_value(10.0); // true value 4.5e-5
        assert!(p > 5e-6 && p < 5e-4, "{p}");
        assert_eq!(t.p_value(1.0), 1.0);
    }

    #[test]
    fn normal_tail_is_accurate() {
        assert!((normal_sf(0.0) - 0.5).abs() < 1e-6);
        assert!((normal_sf(1.96) - 0.025).abs() < 1e-4);
        assert!((normal_sf(-1.96) - 0.975).abs() < 1e-4);
    }
}
