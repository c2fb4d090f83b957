//! Anomaly models: per-key streaming models for the daemon, and `keywatch score` for one
//! series.
//!
//! - [`series`]: [`SeriesDetector`], the univariate streaming detector: an ensemble of
//!   small causal models (local spike, level shift, long-window range, daily and weekly
//!   seasonal baselines, value-transition novelty), each with its own peaks-over-threshold
//!   tail so that every model speaks in probabilities, combined by the smallest corrected
//!   tail probability, with a warm-up and a refractory period so that an incident scores
//!   high at its onset and once. `keywatch score` runs it with [`Params::default`].
//! - [`score`]: [`score_csv`], the `timestamp,value` → `timestamp,value,anomaly_score`
//!   CSV filter behind the CLI.
//! - [`keys`]: [`AnomalyModels`], per-key models of bounded size fed per-minute rollups:
//!   seasonal hourly volume, minute bursts, failure-rate spikes, latency shifts, new
//!   sources, dormant keys waking up, out-of-scope use, and behaviour against the key's
//!   own past and its peer group ([`peers`]: k-means from linfa). They raise
//!   [`AnomalyFinding`]s whose evidence says what was expected, what was seen, and how
//!   unusual it is (`surprise` = −log10 p, `score` in [0, 1], `model`).
//! - [`stats`]: the fixed-size streaming statistics they are built from (sorted windows,
//!   robust scales, SPOT tails).
//! - [`eval`]: labelled series generation and NAB-style scoring, for
//!   `benches/anomaly_eval.rs` and the tests.
//!
//! Contract: pure, no IO and no clock (times are event times), like `detect`. The daemon
//! and `score` share the building blocks and their semantics: the same SPOT tails, robust
//! scales, surprise (−log10 p) and score scale, refractory periods. The per-key volume
//! model is the small form of the series detector's seasonal model (one level per hour of
//! day plus a weekday offset instead of 3 cycles per phase bucket), because a million keys
//! must fit in a few GB: [`SeriesDetector`] holds up to ~250 KB, a [`KeyModel`] 0.6–1.8 KB.

pub mod eval;
pub mod keys;
pub mod peers;
pub mod score;
pub mod series;
pub mod stats;

pub use keys::{AnomalyConfig, AnomalyFinding, AnomalyModels, KeyModel, SourceSeen};
pub use score::{score_csv, ScoreError, ScoreSummary};
pub use series::{Model, Params, Scored, SeriesDetector};
