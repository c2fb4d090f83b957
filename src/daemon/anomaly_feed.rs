//! The anomaly models inside the daemon: warmed up from the store at start, fed every
//! batch's [`Aggregate`] before it is committed, their findings turned into [`Finding`]s.
//!
//! Contract:
//! - The models see each event once per process: the pipeline feeds a batch's aggregate
//!   before committing it, and the findings go to the findings table and the notifier's log
//!   before the commit too (`Detection::before_commit`). A batch read again after a crash
//!   was never committed: the warm-up (from the store) did not see it, so the models see it
//!   once more and raise the same facts, which the findings table and the notification log
//!   already know. Lines the store refuses for good were seen too (they happened).
//! - A restart keeps the baselines: [`AnomalyFeed::warm_up`] replays the stored per-minute
//!   rollups of the last `[anomaly] warm_up` (event time, bounded by `warm_up_max_rows`)
//!   and the stored sources, without raising anything. Events after the stored position
//!   are then fed as they come. A finding raised again by a replay has the same dedup key
//!   and the findings table keeps one row, so it is not told twice.
//! - Time is event time throughout (peer groups are refitted every `refit_peers_every` of
//!   event time), so a one-shot replay of old logs raises what a live daemon would have.

use std::sync::Arc;
use std::time::Instant;

use crate::aggregate::Aggregate;
use crate::anomaly::AnomalyModels;
use crate::detect::{AnomalyPolicy, Finding};
use crate::registry::Registry;
use crate::store::{HistoryRead, Store};

/// The models, the registry they were last given, and the refit schedule.
#[derive(Debug)]
pub struct AnomalyFeed {
    models: AnomalyModels,
    /// The registry whose scopes and owners the models and findings use; compared by
    /// pointer with the engine's, so that a reload or lifecycle event reaches the models
    /// without a call from every place that swaps the registry.
    registry: Arc<Registry>,
    refit_every_ms: i64,
    /// Event time of the next peer-group refit (`i64::MIN`: at the first batch).
    next_refit_ms: i64,
    warm_up_ms: i64,
    warm_up_max_rows: u64,
}

/// What a warm-up read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmUp {
    pub rollups: HistoryRead,
    pub sources: u64,
    pub keys: usize,
}

impl AnomalyFeed {
    /// The models the policy asks for; `None` when `[anomaly] enabled = false`.
    pub fn new(policy: &AnomalyPolicy, registry: Arc<Registry>) -> Option<AnomalyFeed> {
        if !policy.enabled {
            return None;
        }
        let mut models = AnomalyModels::new(policy.models.clone());
        models.set_registry(Arc::clone(&registry));
        Some(AnomalyFeed {
            models,
            registry,
            refit_every_ms: policy.refit_peers_every_ms,
            next_refit_ms: i64::MIN,
            warm_up_ms: policy.warm_up_ms,
            warm_up_max_rows: policy.warm_up_max_rows,
        })
    }

    pub fn models(&self) -> &AnomalyModels {
        &self.models
    }

    /// Replays the store's history into the models without raising anything; logs what it
    /// read and how long it took. A store without history (or an error: the models then
    /// start cold, which only delays their findings) is not fatal.
    pub fn warm_up(&mut self, store: &mut dyn Store) -> Option<WarmUp> {
        if self.warm_up_max_rows == 0 {
            return None;
        }
        let history = store.history()?;
        let started = Instant::now();
        let models = &mut self.models;
        let rollups =
            history.rollup_history(self.warm_up_ms, self.warm_up_max_rows, &mut |k, m, r| {
                models.warm_up(std::iter::once((k, m, r)))
            });
        let rollups = match rollups {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read stored rollups; the anomaly models start cold");
                return None;
            }
        };
        let sources = match history.source_history(self.warm_up_max_rows, &mut |row| {
            models.warm_up_sources(std::iter::once(row))
        }) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read stored sources; new-source findings start cold");
                0
            }
        };
        if let Some(latest) = rollups.latest_ms {
            // Peer groups from the warmed-up means at once, then on schedule.
            self.models.refit_peers();
            self.next_refit_ms = latest.saturating_add(self.refit_every_ms);
        }
        let w = WarmUp {
            rollups,
            sources,
            keys: self.models.key_count(),
        };
        let took = started.elapsed();
        metrics::gauge!("keywatch_anomaly_keys").set(w.keys as f64);
        metrics::gauge!("keywatch_anomaly_warm_up_seconds").set(took.as_secs_f64());
        tracing::info!(
            rollups = w.rollups.rows,
            sources = w.sources,
            keys = w.keys,
            since = %w
                .rollups
                .latest_ms
                .map_or_else(|| "-".to_owned(), |_| crate::registry::format_rfc3339(w.rollups.since_ms)),
            took_ms = took.as_millis() as u64,
            "anomaly models warmed up from stored history"
        );
        Some(w)
    }

    /// Feeds a committed batch; returns the findings, each with its key's owner.
    pub fn observe(&mut self, agg: &Aggregate, registry: &Arc<Registry>) -> Vec<Finding> {
        if agg.is_empty() {
            return Vec::new();
        }
        if !Arc::ptr_eq(&self.registry, registry) {
            self.registry = Arc::clone(registry);
            self.models.set_registry(Arc::clone(registry));
        }
        let started = Instant::now();
        let found = self.models.observe_aggregate(agg);
        let latest = agg.rollups().map(|(_, m, _)| m).max().unwrap_or(i64::MIN);
        if latest >= self.next_refit_ms {
            if self.next_refit_ms != i64::MIN {
                self.models.refit_peers();
            }
            self.next_refit_ms = latest.saturating_add(self.refit_every_ms);
        }
        let took = started.elapsed().as_secs_f64();
        metrics::histogram!("keywatch_anomaly_batch_seconds").record(took);
        if agg.events > 0 {
            metrics::histogram!("keywatch_anomaly_event_seconds").record(took / agg.events as f64);
        }
        metrics::gauge!("keywatch_anomaly_keys").set(self.models.key_count() as f64);
        found
            .into_iter()
            .map(|a| Finding::from_anomaly(a, &self.registry))
            .collect()
    }
}
