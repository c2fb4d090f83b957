//! The detectors inside the daemon: the [`Engine`] fed by the pipeline, the registry kept
//! current, rotations evaluated on a schedule, and new findings handed on.
//!
//! Clock: a daemon following live logs evaluates at wall-clock time; a one-shot read of a
//! file (`follow = false`) evaluates at the latest event time, like `keywatch backtest`, so
//! that replaying yesterday's log says what was true then.
//!
//! What goes to the notifier ([`crate::notify::Input`]): stream findings as soon as their
//! batch is committed; every evaluation's findings (new or not: the notification log
//! deduplicates, and a finding raised again is what drives reminders and repeats) with the
//! open rotations' state; and the registry whenever it changes (file reload or lifecycle
//! event), for owners' contacts and time zones.
//!
//! Lifecycle events ([`crate::source::lifecycle`]) are applied between batches. An event that
//! does not parse or does not apply (unknown key, bad time, ...) is logged with its reason,
//! counted (`keywatch_lifecycle_events_total{outcome="rejected"}`) and kept aside in
//! `lifecycle-dead-letter.jsonl` in the state directory; the registry stays as it was.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;

use crate::aggregate::Aggregate;
use crate::anomaly_feed::AnomalyFeed;
use crate::config::Config;
use crate::deadletter::{DeadLetter, DeadLetterFile, DEFAULT_MAX_BYTES};
use crate::detect::{Engine, Finding, Policy};
use crate::event::AuthEvent;
use crate::notify::Input;
use crate::registry::{LifecycleEvent, Registry, RegistryWatcher, Reload};
use crate::source::lifecycle::LifecycleMessage;
use crate::store::Store;

/// While the source is behind, rotation evaluation waits at most this many intervals.
const MAX_POSTPONED: u32 = 10;

/// How long the pipeline waits for the notifier to confirm a batch's findings.
const NOTIFIER_ACK_WAIT: Duration = Duration::from_secs(30);

/// File in the state directory where refused lifecycle events are kept.
pub const LIFECYCLE_DEAD_LETTER_FILE: &str = "lifecycle-dead-letter.jsonl";

/// Lifecycle messages waiting to be applied, and where refused ones go.
struct Lifecycle {
    rx: mpsc::Receiver<LifecycleMessage>,
    topic: String,
    dead_letters: DeadLetterFile,
    caught_up: bool,
}

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
    /// Findings and registry changes go here (the notifier); a full channel makes the
    /// pipeline wait: none is dropped.
    out: Option<mpsc::Sender<Input>>,
    lifecycle: Option<Lifecycle>,
    /// See [`Detection::evaluate_only_when`].
    gate: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The source is reading a backlog ([`Detection::set_behind`]): rotation evaluation
    /// waits.
    behind: bool,
    postponing: bool,
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
    pub fn new(config: &Config, out: Option<mpsc::Sender<Input>>) -> anyhow::Result<Self> {
        let (mut watcher, policy) = load_rules(config).context("rules")?;
        if watcher.is_none() && config.rules.lifecycle.is_some() {
            watcher = Some(RegistryWatcher::without_file());
        }
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
            lifecycle: None,
            gate: None,
            behind: false,
            postponing: false,
            raised: Vec::new(),
        })
    }

    /// Evaluates rotations and key ages only while `gate` is set: with several instances
    /// in a consumer group, one evaluation per group (the partition-0 owner's,
    /// [`crate::source::kafka::KafkaSource::leader`]). Stream and anomaly findings, which come
    /// from each instance's own partitions, are not gated.
    pub fn evaluate_only_when(&mut self, gate: Arc<std::sync::atomic::AtomicBool>) {
        self.gate = Some(gate);
    }

    /// Takes lifecycle messages from `rx` from now on (see [`crate::source::lifecycle`]).
    pub fn follow_lifecycle(
        &mut self,
        config: &Config,
        topic: &str,
        rx: mpsc::Receiver<LifecycleMessage>,
    ) -> anyhow::Result<()> {
        let path = config.state_dir.join(LIFECYCLE_DEAD_LETTER_FILE);
        let dead_letters = DeadLetterFile::open(&path, DEFAULT_MAX_BYTES)
            .with_context(|| format!("opening {}", path.display()))?;
        if self.watcher.is_none() {
            self.watcher = Some(RegistryWatcher::without_file());
        }
        self.lifecycle = Some(Lifecycle {
            rx,
            topic: topic.to_owned(),
            dead_letters,
            caught_up: false,
        });
        Ok(())
    }

    /// At start: applies lifecycle events until the topic has been read to its end, or
    /// `timeout`; returns whether it got there.
    pub async fn catch_up(&mut self, timeout: Duration) -> anyhow::Result<bool> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changed = false;
        loop {
            let Some(l) = self.lifecycle.as_mut() else {
                return Ok(true);
            };
            if l.caught_up {
                break;
            }
            match tokio::time::timeout_at(deadline, l.rx.recv()).await {
                Ok(Some(msg)) => changed |= self.lifecycle_message(msg)?,
                Ok(None) | Err(_) => break,
            }
        }
        if changed {
            self.registry_changed_async().await;
        }
        Ok(self.lifecycle.as_ref().is_none_or(|l| l.caught_up))
    }

    /// Applies the lifecycle messages waiting now; returns whether the registry changed.
    fn drain_lifecycle(&mut self) -> anyhow::Result<bool> {
        let mut changed = false;
        while let Some(msg) = self.lifecycle.as_mut().and_then(|l| l.rx.try_recv().ok()) {
            changed |= self.lifecycle_message(msg)?;
        }
        Ok(changed)
    }

    fn lifecycle_message(&mut self, msg: LifecycleMessage) -> anyhow::Result<bool> {
        let (Some(l), Some(w)) = (self.lifecycle.as_mut(), self.watcher.as_mut()) else {
            return Ok(false);
        };
        let (partition, offset, payload) = match msg {
            LifecycleMessage::CaughtUp { events } => {
                l.caught_up = true;
                tracing::info!(
                    events,
                    keys = w.registry().keys().count(),
                    "lifecycle events applied"
                );
                return Ok(false);
            }
            LifecycleMessage::Event {
                partition,
                offset,
                payload,
            } => (partition, offset, payload),
        };
        let outcome = LifecycleEvent::from_json(&payload).and_then(|ev| {
            let key = ev.key_id().to_owned();
            w.apply(ev).map(|r| (key, r))
        });
        match outcome {
            Ok((key, registry)) => {
                metrics::counter!("keywatch_lifecycle_events_total", "outcome" => "applied")
                    .increment(1);
                tracing::debug!(%key, partition, offset, "lifecycle event applied");
                self.engine.set_registry(registry);
                Ok(true)
            }
            Err(reason) => {
                metrics::counter!("keywatch_lifecycle_events_total", "outcome" => "rejected")
                    .increment(1);
                tracing::warn!(topic = %l.topic, partition, offset, %reason, "refused a lifecycle event");
                // Lifecycle events name keys by id and carry no key material; cut what
                // is kept of a message that is not even an event.
                let mut line = String::from_utf8_lossy(&payload).into_owned();
                if line.len() > 4096 {
                    let mut end = 4096;
                    while !line.is_char_boundary(end) {
                        end -= 1;
                    }
                    line.truncate(end);
                }
                l.dead_letters
                    .write(&DeadLetter {
                        at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                        source: "lifecycle",
                        topic: Some(&l.topic),
                        partition: Some(partition),
                        offset: offset.max(0) as u64,
                        reason,
                        line,
                    })
                    .and_then(|_| l.dead_letters.flush())
                    .context("writing the lifecycle dead letters")?;
                Ok(false)
            }
        }
    }

    /// The registry changed (reload or lifecycle event): tell the notifier.
    fn registry_changed(&mut self) {
        let registry = Arc::clone(self.engine.registry());
        self.send(Input::Registry(registry));
    }

    async fn registry_changed_async(&mut self) {
        let registry = Arc::clone(self.engine.registry());
        if let Some(out) = &self.out {
            if out.send(Input::Registry(registry)).await.is_err() {
                tracing::debug!("the notifier has stopped");
            }
        }
    }

    fn send(&mut self, input: Input) {
        if let Some(out) = &self.out {
            if out.blocking_send(input).is_err() {
                tracing::debug!("the notifier has stopped; findings stay in the store");
            }
        }
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

    /// Before a batch is committed: feeds its aggregate to the anomaly models, once per
    /// event; their findings wait with the stream findings for [`Self::before_commit`].
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
        // Lifecycle events are applied within a second even without traffic.
        let lifecycle = if self.lifecycle.is_some() {
            Duration::from_secs(1)
        } else {
            Duration::MAX
        };
        eval.min(reload).min(lifecycle)
    }

    /// Before a batch is committed: the stream findings its events raised (revoked key
    /// used, ...) are stored, and handed to the notifier, which confirms once they are in
    /// its log. The batch is committed only then: after a crash before the commit, the batch
    /// is read again and raises them again (stored already: not new), and the notifier's
    /// log knows what it has told, so a finding is neither lost nor told twice. All of
    /// them go to the notifier, new or not, for that reason.
    pub fn before_commit(&mut self, store: &mut dyn Store) -> anyhow::Result<()> {
        let pending = self.engine.take_pending();
        if pending.is_empty() {
            return Ok(());
        }
        let new = self.store_findings(store, &pending)?;
        self.raised.extend(new);
        self.send_durably(pending);
        Ok(())
    }

    /// Sends findings to the notifier and waits until they are in its log (at most
    /// [`NOTIFIER_ACK_WAIT`]: a notifier that cannot answer must not stop ingestion).
    fn send_durably(&mut self, findings: Vec<Finding>) {
        let Some(out) = &self.out else {
            return;
        };
        let (ack, confirmed) = tokio::sync::oneshot::channel();
        if out.blocking_send(Input::Durable { findings, ack }).is_err() {
            tracing::debug!("the notifier has stopped; findings stay in the store");
            return;
        }
        let waited = tokio::runtime::Handle::current()
            .block_on(tokio::time::timeout(NOTIFIER_ACK_WAIT, confirmed));
        match waited {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => tracing::error!(
                "the notifier could not log findings; they are in the findings table"
            ),
            Ok(Err(_)) => tracing::debug!("the notifier has stopped; findings stay in the store"),
            Err(_) => tracing::warn!(
                wait = ?NOTIFIER_ACK_WAIT,
                "the notifier did not confirm findings in time; storing the batch anyway"
            ),
        }
    }

    /// After a batch is committed: stores findings still pending (none in the pipeline's
    /// order, where [`Self::before_commit`] takes them; kept for callers that feed later).
    pub fn after_commit(&mut self, store: &mut dyn Store) -> anyhow::Result<()> {
        let pending = self.engine.take_pending();
        if !pending.is_empty() {
            self.record(store, &pending)?;
        }
        Ok(())
    }

    /// Reloads the registry and evaluates rotations when their time has come.
    pub fn tick(&mut self, store: &mut dyn Store) -> anyhow::Result<()> {
        let mut changed = self.drain_lifecycle()?;
        if self.last_reload.elapsed() >= self.reload_every {
            self.last_reload = Instant::now();
            if let Some(w) = &mut self.watcher {
                if let Reload::Reloaded(r) = w.poll() {
                    self.engine.set_registry(r);
                    changed = true;
                }
            }
        }
        if changed {
            self.registry_changed();
        }
        if self.last_eval.elapsed() >= self.evaluate_every {
            // While reading a backlog, what is stored is the past up to some point, not
            // now: a host that switched later in the backlog would look like it lingers.
            // Wait until the source has caught up (or for MAX_POSTPONED evaluations, so
            // that sustained full load cannot starve the reminders).
            let postponed = self.last_eval.elapsed() < self.evaluate_every * MAX_POSTPONED;
            if self.behind && postponed {
                if !self.postponing {
                    self.postponing = true;
                    tracing::info!("reading a backlog: rotations are evaluated once it is read");
                }
                metrics::counter!("keywatch_evaluations_postponed_total").increment(1);
                return self.after_commit(store);
            }
            self.postponing = false;
            self.evaluate(store)?;
        }
        Ok(())
    }

    /// Whether the source is behind (the pipeline's last batch was full, or more wait).
    pub fn set_behind(&mut self, behind: bool) {
        self.behind = behind;
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
        let evaluator = self
            .gate
            .as_ref()
            .is_none_or(|g| g.load(std::sync::atomic::Ordering::SeqCst));
        metrics::gauge!("keywatch_rotation_evaluator").set(if evaluator { 1.0 } else { 0.0 });
        if !evaluator {
            // Another member of the group evaluates rotations.
            return self.after_commit(store);
        }
        metrics::counter!("keywatch_evaluations_total").increment(1);
        let Some(ds) = store.detection() else {
            return Ok(());
        };
        let (found, rotations) = self.engine.evaluate_with_rotations(now, &*ds);
        let new = self.store_findings(store, &found)?;
        self.raised.extend(new);
        if !found.is_empty() || !rotations.is_empty() {
            self.send(Input::Evaluated {
                findings: found,
                rotations,
            });
        }
        Ok(())
    }

    /// Stores stream findings and hands the new ones to the notifier.
    fn record(&mut self, store: &mut dyn Store, found: &[Finding]) -> anyhow::Result<()> {
        let new = self.store_findings(store, found)?;
        if !new.is_empty() {
            self.send(Input::Findings(new.clone()));
            self.raised.extend(new);
        }
        Ok(())
    }

    /// Stores findings; returns those never stored before (logged and counted here).
    fn store_findings(
        &mut self,
        store: &mut dyn Store,
        found: &[Finding],
    ) -> anyhow::Result<Vec<Finding>> {
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let Some(ds) = store.detection() else {
            return Ok(Vec::new());
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
        Ok(new)
    }
}

/// The registry as the daemon sees it: the registry file, plus the lifecycle topic read to
/// its end (waiting at most `rules.lifecycle.catch_up_timeout`), for the commands that show
/// rotations or address owners outside the daemon. Events that do not apply are skipped
/// here (the daemon keeps them aside); `None` without a registry file or lifecycle topic.
pub async fn registry_now(config: &Config) -> anyhow::Result<Option<Arc<Registry>>> {
    let (watcher, _) = load_rules(config).context("rules")?;
    let Some(l) = &config.rules.lifecycle else {
        return Ok(watcher.map(|w| w.registry()));
    };
    let mut watcher = watcher.unwrap_or_else(RegistryWatcher::without_file);
    let (tx, mut rx) = mpsc::channel(1024);
    let cancel = tokio_util::sync::CancellationToken::new();
    let consumer = crate::source::lifecycle::LifecycleConsumer::spawn(
        &crate::app::lifecycle_properties(l)?,
        &l.topic,
        tx,
        cancel.clone(),
    )
    .context("rules.lifecycle")?;
    let deadline = tokio::time::Instant::now() + l.catch_up_timeout;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(LifecycleMessage::Event { payload, .. })) => {
                if let Ok(ev) = LifecycleEvent::from_json(&payload) {
                    let _ = watcher.apply(ev);
                }
            }
            Ok(Some(LifecycleMessage::CaughtUp { .. })) => break,
            Ok(None) | Err(_) => {
                tracing::warn!(topic = %l.topic, "the lifecycle topic was not read to its end in time; showing what was read");
                break;
            }
        }
    }
    cancel.cancel();
    drop(rx);
    tokio::task::spawn_blocking(move || consumer.join()).await?;
    Ok(Some(watcher.registry()))
}
