//! Peer groups of keys: k-means (linfa-clustering) over the keys' mean behaviour vectors.
//!
//! Features are standardized per column before clustering (they have different units),
//! k-means++ starts from a fixed seed (the same keys give the same groups), at most
//! 100 000 keys (an even sample of them) fit the centroids, and every key is then assigned
//! to its nearest centroid. Each group keeps its centroid and per-feature spread (standard
//! deviation of its members) in the features' own units, which is what a finding's
//! evidence shows next to the key's own values.

use linfa::traits::{Fit, Predict};
use linfa::DatasetBase;
use linfa_clustering::KMeans;
use ndarray::{Array2, Axis};
use rand_xoshiro::rand_core::SeedableRng;
use rand_xoshiro::Xoshiro256Plus;

use super::keys::Peers;

const MAX_FIT_ROWS: usize = 100_000;

/// Fits `k` groups over `rows`; returns the groups and each row's group, or `None` when
/// there are too few rows (fewer than 4 per group) or the fit fails.
pub fn fit<const F: usize>(rows: &[[f32; F]], k: usize) -> Option<(Peers, Vec<usize>)>
where
    [f32; F]: Sized,
{
    let n = rows.len();
    let k = k.max(1).min(n / 4);
    if k == 0 {
        return None;
    }
    let mut data = Array2::<f64>::zeros((n, F));
    for (i, r) in rows.iter().enumerate() {
        for j in 0..F {
            data[[i, j]] = f64::from(r[j]);
        }
    }
    let mean = data.mean_axis(Axis(0))?;
    let sd = data
        .std_axis(Axis(0), 0.0)
        .mapv(|v| if v > 1e-9 { v } else { 1.0 });
    let z = (&data - &mean) / &sd;
    let step = n.div_ceil(MAX_FIT_ROWS);
    let sample = z.select(Axis(0), &(0..n).step_by(step).collect::<Vec<_>>());
    let model = KMeans::params_with_rng(k, Xoshiro256Plus::seed_from_u64(0x6b65_7977))
        .max_n_iterations(100)
        .tolerance(1e-4)
        .fit(&DatasetBase::from(sample))
        .ok()?;
    let labels = model.predict(&z);
    let k = model.centroids().nrows();
    let mut sums = vec![[0f64; F]; k];
    let mut sq = vec![[0f64; F]; k];
    let mut sizes = vec![0usize; k];
    for (i, &l) in labels.iter().enumerate() {
        sizes[l] += 1;
        for j in 0..F {
            let v = data[[i, j]];
            sums[l][j] += v;
            sq[l][j] += v * v;
        }
    }
    let mut peers = Peers::default();
    for l in 0..k {
        let c = sizes[l].max(1) as f64;
        let mut centroid = [0f32; F];
        let mut spread = [0f32; F];
        for j in 0..F {
            let m = sums[l][j] / c;
            centroid[j] = m as f32;
            spread[j] = (sq[l][j] / c - m * m).max(0.0).sqrt() as f32;
        }
        peers.centroids.push(centroid.to_vec());
        peers.spreads.push(spread.to_vec());
        peers.sizes.push(sizes[l]);
    }
    Some((peers, labels.to_vec()))
}
