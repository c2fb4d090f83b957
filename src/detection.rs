//! The detectors inside the daemon: the [`Engine`] fed by the pipeline, the registry kept
//! current, rotations evaluated on a schedule, and new findings handed on.
//!
//! Clock: a daemon following live logs evaluates at wall-clock time; a one-shot read of a
//! file (`follow = false`) evaluates at the latest event time, like `keywatch backtest`, so
//! that replaying yesterday's log says what was true then.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;

use crate::aggregate::Aggregate;
use crate::anomaly_feed::AnomalyFeed;
use crate::config::Config;
use crate::detect::{Engine, Finding, Policy};
use crate::event::AuthEvent;
use crate::registry::{Registry, RegistryWatcher, Reload};
use crate::store::Store;

pub struct Detection {
    engine: Engine,
    watcher: Option<RegistryWatcher>,
    evaluate_every: Duration,
    reload_every: Duration,
    last_eval: Instant,
    last_reload: Instant,
    /// Evaluate at the latest event time instead of the wall clock.
    event_clock: bool,
    latest_ms: i64,
    /// New findings go here (the notifier); full channel: the oldest wait, none is dropped.
    out: Option<mpsc::Sender<Vec<Finding>>>,
    /// The per-key anomaly models, fed committed batches (`None`: `[anomaly] enabled = false`).
    anomaly: Option<AnomalyFeed>,
    /// Every new finding of this run, for the one-shot report.
    pub raised: Vec<Finding>,
}

/// The registry and policy the config names (defaults without them).
pub fn load_rules(config: &Config) -> anyhow::Result<(Option<RegistryWatcher>, Policy)> {
    let watcher = match &config.rules.keys {
        Some(path) => Some(RegistryWatcher::open(path)?),
        None => None,
    };
    let policy = match &config.rules.policy {
        Some(path) => Policy::load(path)?,
        None => Policy::default(),
    };
    Ok((watcher, policy))
}

impl Detection {
    pub fn new(config: &Config, out: Option<mpsc::Sender<Vec<Finding>>>) -> anyhow::Result<Self> {
        let (watcher, policy) = load_rules(config).context("rules")?;
        let registry = watcher
            .as_ref()
            .map_or_else(|| Arc::new(Registry::empty()), |w| w.registry());
        let anomaly = AnomalyFeed::new(&policy.anomaly, Arc::clone(&registry));
        Ok(Detection {
            anomaly,
            engine: Engine::new(registry, policy),
            watcher,
            evaluate_every: config.rules.evaluate_every,
            reload_every: config.rules.reload_every,
            last_eval: Instant::now(),
            last_reload: Instant::now(),
            event_clock: !config.input.follow,
            latest_ms: i64::MIN,
            out,
            raised: Vec::new(),
        })
    }

    pub fn observe(&mut self, ev: &AuthEvent<'_>) {
        self.latest_ms = self.latest_ms.max(ev.ts_ms);
        self.engine.observe(ev);
    }

    /// At start: warms the anomaly models up from the store's history (see
    /// [`crate::anomaly_feed`]).
    pub fn warm_up(&mut self, store: &mut dyn Store) {
        if let Some(a) = &mut self.anomaly {
            a.warm_up(store);
        }
    }

    /// After a batch is committed: feeds its aggregate to the anomaly models, once per
    /// stored event; their findings wait with the stream findings for [`Self::after_commit`].
    pub fn observe_aggregate(&mut self, agg: &Aggregate) {
        if let Some(a) = &mut self.anomaly {
            let found = a.observe(agg, self.engine.registry());
            self.engine.push_pending(found);
        }
    }

    /// How long the pipeline may wait for input before [`Detection::tick`] is due.
    pub fn next_due(&self) -> Duration {
        let eval = self.evaluate_every.saturating_sub(self.last_eval.elapsed());
        let reload = self.reload_every.saturating_sub(self.last_reload.elapsed());
        eval.min(reload)
    }

    /// After a batch is committed: stores the stream findings (revoked key used, ...) at once.
    pub fn after_commit(&mut self, store: &mut dyn Store) -> anyhow::Result<()> {
        let pending = self.engine.take_pending();
        if !pending.is_empty() {
            self.record(store, &pending)?;
        }
        Ok(())
    }

    /// Reloads the registry and evaluates rotations when their time has come.
    pub fn tick(&mut self, store: &mut dyn Store) -> anyhow::Result<()> {
        if self.last_reload.elapsed() >= self.reload_every {
            self.last_reload = Instant::now();
            if let Some(w) = &mut self.watcher {
                if let Reload::Reloaded(r) = w.poll() {
                    tracing::info!(path = %w.path().display(), "registry reloaded");
                    self.engine.set_registry(r);
                }
            }
        }
        if self.last_eval.elapsed() >= self.evaluate_every {
            self.evaluate(store)?;
        }
        Ok(())
    }

    /// Evaluates rotations now (at the end of a one-shot run, for instance).
    pub fn evaluate(&mut self, store: &mut dyn Store) -> anyhow::Result<()> {
        self.last_eval = Instant::now();
        let now = if self.event_clock {
            if self.latest_ms == i64::MIN {
                return Ok(());
            }
            self.latest_ms
        } else {
            chrono::Utc::now().timestamp_millis()
        };
        let Some(ds) = store.detection() else {
            return Ok(());
        };
        let found = self.engine.evaluate(now, &*ds);
        let mut pending = self.engine.take_pending();
        pending.extend(found);
        if !pending.is_empty() {
            self.record(store, &pending)?;
        }
        Ok(())
    }

    fn record(&mut self, store: &mut dyn Store, found: &[Finding]) -> anyhow::Result<()> {
        let Some(ds) = store.detection() else {
            return Ok(());
        };
        let new = ds.record_findings(found).context("storing findings")?;
        for f in &new {
            metrics::counter!("keywatch_findings_total", "kind" => f.kind.as_str()).increment(1);
            tracing::warn!(
                kind = f.kind.as_str(),
                key = %f.key_id,
                owner = f.owner.as_deref().unwrap_or("-"),
                severity = f.severity.as_str(),
                "{}",
                f.summary
            );
        }
        if !new.is_empty() {
            if let Some(out) = &self.out {
                if out.blocking_send(new.clone()).is_err() {
                    tracing::debug!("the notifier has stopped; findings stay in the store");
                }
            }
            self.raised.extend(new);
        }
        Ok(())
    }
}
