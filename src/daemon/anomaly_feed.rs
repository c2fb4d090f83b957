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
//! - In a Kafka consumer group the models hold only the keys of this member's partitions:
//!   [`AnomalyFeed::warm_up_partitions`] replays the history stored from partitions as they
//!   are assigned (before any batch of theirs is fed: the pipeline takes the source's
//!   partition changes before each batch), and [`AnomalyFeed::drop_revoked`] forgets the
//!   keys fed only from partitions taken away. A warm-up never replays a key the models
//!   already hold (a key seen on several partitions, when messages are not keyed by key
//!   id): its stored rows may include batches the models saw, which would count twice.
//!   Each key remembers the partitions it was fed from (a 64-bit set, bit `i % 64` for the
//!   `i`-th partition this process has met) and is kept while any of them is held. A batch
//!   still being stored when its partition was revoked (the revocation's wait for it
//!   expired) is fed after the drop: its keys stay until the next revocation.
//! - Time is event time throughout (peer groups are refitted every `refit_peers_every` of
//!   event time), so a one-shot replay of old logs raises what a live daemon would have.

use std::sync::Arc;
use std::time::Instant;

use crate::aggregate::Aggregate;
use crate::anomaly::AnomalyModels;
use crate::detect::{AnomalyPolicy, Finding};
use crate::registry::Registry;
use crate::source::kafka::TopicPartition;
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
    /// Every topic partition met, in order: the `i`-th is bit `i % 64` of a key's set.
    partitions: Vec<TopicPartition>,
    /// The partitions held now (consumer group mode).
    held: Vec<TopicPartition>,
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
            partitions: Vec::new(),
            held: Vec::new(),
        })
    }

    /// The bit of a topic partition in the keys' partition sets.
    fn bit(&mut self, topic: &str, partition: i32) -> u64 {
        let i = match self
            .partitions
            .iter()
            .position(|(t, p)| *p == partition && t == topic)
        {
            Some(i) => i,
            None => {
                self.partitions.push((topic.to_owned(), partition));
                self.partitions.len() - 1
            }
        };
        1u64 << (i % 64)
    }

    fn bits(&mut self, partitions: &[TopicPartition]) -> u64 {
        partitions.iter().fold(0, |b, (t, p)| b | self.bit(t, *p))
    }

    /// The partitions held now (consumer group mode).
    pub fn held(&self) -> &[TopicPartition] {
        &self.held
    }

    /// Forgets the keys fed only from partitions no longer held, once `revoked` are taken
    /// away. Returns how many keys were dropped.
    pub fn drop_revoked(&mut self, revoked: &[TopicPartition]) -> usize {
        let started = Instant::now();
        self.held.retain(|h| !revoked.contains(h));
        let held = self.held.clone();
        let held_bits = self.bits(&held);
        let dropped = self.models.drop_unless_in(held_bits);
        let keys = self.models.key_count();
        metrics::gauge!("keywatch_anomaly_keys").set(keys as f64);
        tracing::info!(
            partitions = ?revoked,
            dropped,
            keys,
            took_ms = started.elapsed().as_millis() as u64,
            "anomaly models dropped the keys of revoked partitions"
        );
        dropped
    }

    /// Warms the models up with the history stored from `assigned` (newly held partitions),
    /// leaving alone the keys they hold already (see the module doc). Logs what it read.
    pub fn warm_up_partitions(
        &mut self,
        store: &mut dyn Store,
        assigned: &[TopicPartition],
    ) -> Option<WarmUp> {
        for p in assigned {
            if !self.held.contains(p) {
                self.held.push(p.clone());
            }
        }
        let new_bits = self.bits(assigned);
        let lookup: Vec<(TopicPartition, u64)> = assigned
            .iter()
            .map(|p| (p.clone(), self.bit(&p.0, p.1)))
            .collect();
        if self.warm_up_max_rows == 0 {
            return None;
        }
        let history = store.history()?;
        let started = Instant::now();
        let keys_before = self.models.key_count();
        let models = &mut self.models;
        // Rows come by key: whether a key was held before is decided at its first row.
        let mut current: Option<(String, bool)> = None;
        let mut skipped = 0u64;
        let rollups = history.rollup_history(
            self.warm_up_ms,
            self.warm_up_max_rows,
            Some(assigned),
            &mut |k, m, r| {
                let fresh = match &current {
                    Some((ck, fresh)) if ck == k => *fresh,
                    _ => {
                        let fresh = models.key(k).is_none();
                        current = Some((k.to_owned(), fresh));
                        fresh
                    }
                };
                if fresh {
                    models.warm_up(std::iter::once((k, m, r)));
                } else {
                    skipped += 1;
                }
            },
        );
        let rollups = match rollups {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(partitions = ?assigned, error = %e, "cannot read stored rollups of assigned partitions; their keys start cold");
                return None;
            }
        };
        // Source sets are sets: seeding a held key again adds nothing twice.
        let sources = match history.source_history(
            self.warm_up_max_rows,
            Some(assigned),
            &mut |row| models.warm_up_sources(std::iter::once(row)),
        ) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read stored sources of assigned partitions; new-source findings start cold");
                0
            }
        };
        if let Err(e) = history.key_partitions(rollups.since_ms, assigned, &mut |k, t, p| {
            if let Some((_, bit)) = lookup.iter().find(|((lt, lp), _)| *lp == p && lt == t) {
                models.mark_partitions(k, *bit);
            }
        }) {
            tracing::warn!(error = %e, "cannot read which partitions stored each key; the warmed-up keys stay while any assigned partition is held");
        }
        // Keys seeded only by their sources (no rollup in the window), or when the read
        // above failed: any of the assigned partitions keeps them.
        self.models.mark_unmarked(new_bits);
        if rollups.latest_ms.is_some() {
            self.models.refit_peers();
            if self.next_refit_ms == i64::MIN {
                self.next_refit_ms = rollups
                    .latest_ms
                    .unwrap_or(0)
                    .saturating_add(self.refit_every_ms);
            }
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
            partitions = ?assigned,
            rollups = w.rollups.rows,
            rollups_of_held_keys = skipped,
            sources = w.sources,
            new_keys = w.keys - keys_before,
            keys = w.keys,
            took_ms = took.as_millis() as u64,
            "anomaly models warmed up from the stored history of assigned partitions"
        );
        Some(w)
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
        let rollups = history.rollup_history(
            self.warm_up_ms,
            self.warm_up_max_rows,
            None,
            &mut |k, m, r| models.warm_up(std::iter::once((k, m, r))),
        );
        let rollups = match rollups {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read stored rollups; the anomaly models start cold");
                return None;
            }
        };
        let sources = match history.source_history(self.warm_up_max_rows, None, &mut |row| {
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
        // Kafka batches only (a file's events have no partition).
        for (k, t, p, _) in agg.key_partitions() {
            let bit = self.bit(t, p);
            self.models.mark_partitions(k, bit);
        }
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

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::event::{AuthEvent, Outcome};
    use crate::store::{BatchWrite, SqliteStore};

    fn tp(p: i32) -> TopicPartition {
        ("logs".to_owned(), p)
    }

    /// Keys `a` (partition 0), `b` (1) and `c` (both: messages not keyed by key id).
    fn store() -> SqliteStore {
        let mut store = SqliteStore::open_file(std::path::Path::new(":memory:")).unwrap();
        let topic: Arc<str> = "logs".into();
        let mut agg = Aggregate::default();
        for (key, part) in [("a", 0), ("b", 1), ("c", 0), ("c", 1)] {
            for m in 0..3 {
                let e = AuthEvent::new(600_000 + m * 60_000, Cow::Borrowed(key), 200, Outcome::Ok);
                agg.add_from(&e, &topic, part);
            }
        }
        store
            .commit(&BatchWrite {
                aggregate: &agg,
                events: &[],
                checkpoint: None,
            })
            .unwrap();
        store
    }

    fn feed() -> AnomalyFeed {
        AnomalyFeed::new(
            &crate::detect::Policy::default().anomaly,
            Arc::new(Registry::empty()),
        )
        .unwrap()
    }

    fn held_keys(f: &AnomalyFeed) -> Vec<&str> {
        let mut k: Vec<&str> = ["a", "b", "c", "e"]
            .into_iter()
            .filter(|k| f.models().key(k).is_some())
            .collect();
        k.sort_unstable();
        k
    }

    #[test]
    fn members_hold_the_keys_of_their_partitions() {
        let mut store = store();
        let mut f = feed();
        let w = f.warm_up_partitions(&mut store, &[tp(0)]).unwrap();
        assert_eq!(held_keys(&f), ["a", "c"]);
        // `c`'s whole minutes (SQLite sums partitions): 3 rows each.
        assert_eq!(w.rollups.rows, 6);

        // Partition 1 later: `c` is held already, so its rows are not replayed (they hold
        // what the models saw), but it now counts partition 1 too.
        let w = f.warm_up_partitions(&mut store, &[tp(1)]).unwrap();
        assert_eq!(held_keys(&f), ["a", "b", "c"]);
        assert_eq!(w.keys, 3);
        assert_eq!(w.rollups.rows, 6, "b's and c's rows read");
        let bit = |p: i32| 1u64 << p;
        assert_eq!(f.models().partitions_of("c"), Some(bit(0) | bit(1)));
        assert_eq!(f.models().partitions_of("b"), Some(bit(1)));

        // Live traffic marks its key's partition.
        let topic: Arc<str> = "logs".into();
        let mut agg = Aggregate::default();
        agg.add_from(
            &AuthEvent::new(900_000, Cow::Borrowed("e"), 200, Outcome::Ok),
            &topic,
            0,
        );
        f.observe(&agg, &Arc::new(Registry::empty()));
        assert_eq!(f.models().partitions_of("e"), Some(bit(0)));

        // Partition 0 revoked: `c` stays while partition 1 is held.
        assert_eq!(f.drop_revoked(&[tp(0)]), 2);
        assert_eq!(held_keys(&f), ["b", "c"]);
        assert_eq!(f.held(), [tp(1)]);
        assert_eq!(f.drop_revoked(&[tp(1)]), 2);
        assert!(held_keys(&f).is_empty());
        assert_eq!(f.models().key_count(), 0);
    }

    #[test]
    fn without_partitions_every_key_warms_up_and_stays() {
        let mut store = store();
        let mut f = feed();
        let w = f.warm_up(&mut store).unwrap();
        assert_eq!(w.keys, 3);
        // Keys warmed up at start know no partition: a revocation (none comes without
        // Kafka) would not drop them.
        assert_eq!(f.drop_revoked(&[tp(0)]), 0);
        assert_eq!(held_keys(&f), ["a", "b", "c"]);
    }
}
