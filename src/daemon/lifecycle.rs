//! The registry inside the daemon: the registry file, reloaded when it changes, plus the
//! lifecycle events of the lifecycle topic (or of a file, in a backtest).
//!
//! Contract:
//! - [`RegistryFeed::poll`] is the one place the pipeline learns of a new registry: it
//!   applies the lifecycle messages waiting and reloads the file when its interval has
//!   passed; it returns the new registry when anything changed.
//! - At start, [`RegistryFeed::catch_up`] applies lifecycle events until the topic has been
//!   read to its end (the consumer says so in-band, [`LifecycleMessage::CaughtUp`]), or a
//!   timeout: traffic is judged against a registry that knows them.
//! - An event that does not parse or does not apply (unknown key, bad time, ...) is logged
//!   with its reason, counted (`keywatch_lifecycle_events_total{outcome="rejected"}`) and
//!   kept aside in `lifecycle-dead-letter.jsonl` in the state directory; the registry stays
//!   as it was.
//! - A backtest's lifecycle events ([`TimedLifecycle`]) apply at their own time, in event
//!   time order with the traffic: the pipeline cuts its input at each event's time.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;

use super::deadletter::{DeadLetter, DeadLetterConfig, DeadLetterFile};
use crate::config::Config;
use crate::detect::Policy;
use crate::registry::{LifecycleEvent, Registry, RegistryWatcher, Reload};
use crate::source::lifecycle::LifecycleMessage;

/// File in the state directory where refused lifecycle events are kept.
pub const LIFECYCLE_DEAD_LETTER_FILE: &str = "lifecycle-dead-letter.jsonl";

/// The registry and policy the config names (defaults without them). With a lifecycle topic
/// and no file, the registry starts empty and the events fill it.
pub fn load_rules(config: &Config) -> anyhow::Result<(Option<RegistryWatcher>, Policy)> {
    let mut watcher = match &config.rules.keys {
        Some(path) => Some(RegistryWatcher::open(path)?),
        None => None,
    };
    if watcher.is_none() && config.rules.lifecycle.is_some() {
        watcher = Some(RegistryWatcher::without_file());
    }
    let policy = match &config.rules.policy {
        Some(path) => Policy::load(path)?,
        None => Policy::default(),
    };
    Ok((watcher, policy))
}

/// Lifecycle messages waiting to be applied, and where refused ones go.
struct Topic {
    rx: mpsc::Receiver<LifecycleMessage>,
    topic: String,
    dead_letters: DeadLetterFile,
    caught_up: bool,
}

/// The registry file and the lifecycle topic, followed.
pub struct RegistryFeed {
    watcher: Option<RegistryWatcher>,
    reload_every: Duration,
    last_reload: Instant,
    topic: Option<Topic>,
}

impl RegistryFeed {
    /// Follows `watcher` (none: an empty registry that never changes), reloading the file
    /// every `reload_every`.
    pub fn new(watcher: Option<RegistryWatcher>, reload_every: Duration) -> RegistryFeed {
        RegistryFeed {
            watcher,
            reload_every,
            last_reload: Instant::now(),
            topic: None,
        }
    }

    /// The registry in force.
    pub fn registry(&self) -> Arc<Registry> {
        self.watcher
            .as_ref()
            .map_or_else(|| Arc::new(Registry::empty()), |w| w.registry())
    }

    /// Takes lifecycle messages from `rx` from now on; refused ones are kept in
    /// [`LIFECYCLE_DEAD_LETTER_FILE`] under `state_dir`.
    pub fn follow_topic(
        &mut self,
        state_dir: &Path,
        keep: DeadLetterConfig,
        topic: &str,
        rx: mpsc::Receiver<LifecycleMessage>,
    ) -> anyhow::Result<()> {
        let path = state_dir.join(LIFECYCLE_DEAD_LETTER_FILE);
        let dead_letters = DeadLetterFile::open(&path, keep)
            .with_context(|| format!("opening {}", path.display()))?;
        self.watcher
            .get_or_insert_with(RegistryWatcher::without_file);
        self.topic = Some(Topic {
            rx,
            topic: topic.to_owned(),
            dead_letters,
            caught_up: false,
        });
        Ok(())
    }

    /// Whether lifecycle messages may arrive (the pipeline then looks every second).
    pub fn follows_topic(&self) -> bool {
        self.topic.is_some()
    }

    /// At start: applies lifecycle events until the topic has been read to its end, or
    /// `timeout`; returns whether it got there, and the registry when it changed.
    pub async fn catch_up(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<(bool, Option<Arc<Registry>>)> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changed = false;
        loop {
            let Some(t) = self.topic.as_mut() else {
                return Ok((true, None));
            };
            if t.caught_up {
                break;
            }
            match tokio::time::timeout_at(deadline, t.rx.recv()).await {
                Ok(Some(msg)) => changed |= self.message(msg)?,
                Ok(None) | Err(_) => break,
            }
        }
        let caught_up = self.topic.as_ref().is_none_or(|t| t.caught_up);
        Ok((caught_up, changed.then(|| self.registry())))
    }

    /// Applies the lifecycle messages waiting now and reloads the file when due; returns the
    /// registry when it changed.
    pub fn poll(&mut self) -> anyhow::Result<Option<Arc<Registry>>> {
        let mut changed = false;
        while let Some(msg) = self.topic.as_mut().and_then(|t| t.rx.try_recv().ok()) {
            changed |= self.message(msg)?;
        }
        if self.last_reload.elapsed() >= self.reload_every {
            self.last_reload = Instant::now();
            if let Some(w) = &mut self.watcher {
                if let Reload::Reloaded(_) = w.poll() {
                    changed = true;
                }
            }
        }
        Ok(changed.then(|| self.registry()))
    }

    /// Applies one event (a backtest's, at its time); the error says why it was refused.
    pub fn apply(&mut self, ev: LifecycleEvent) -> Result<Arc<Registry>, String> {
        self.watcher
            .get_or_insert_with(RegistryWatcher::without_file)
            .apply(ev)
    }

    /// How long until the file is due to be looked at again.
    pub fn wait(&self) -> Duration {
        let reload = self.reload_every.saturating_sub(self.last_reload.elapsed());
        // Lifecycle events are applied within a second even without traffic.
        if self.topic.is_some() {
            reload.min(Duration::from_secs(1))
        } else {
            reload
        }
    }

    fn message(&mut self, msg: LifecycleMessage) -> anyhow::Result<bool> {
        let (Some(t), Some(w)) = (self.topic.as_mut(), self.watcher.as_mut()) else {
            return Ok(false);
        };
        let (partition, offset, payload) = match msg {
            LifecycleMessage::CaughtUp { events } => {
                t.caught_up = true;
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
            w.apply(ev).map(|_| key)
        });
        match outcome {
            Ok(key) => {
                metrics::counter!("keywatch_lifecycle_events_total", "outcome" => "applied")
                    .increment(1);
                tracing::debug!(%key, partition, offset, "lifecycle event applied");
                Ok(true)
            }
            Err(reason) => {
                metrics::counter!("keywatch_lifecycle_events_total", "outcome" => "rejected")
                    .increment(1);
                tracing::warn!(topic = %t.topic, partition, offset, %reason, "refused a lifecycle event");
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
                t.dead_letters
                    .write(&DeadLetter {
                        at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                        source: "lifecycle",
                        topic: Some(&t.topic),
                        partition: Some(partition),
                        offset: offset.max(0) as u64,
                        reason,
                        line,
                    })
                    .and_then(|_| t.dead_letters.flush())
                    .context("writing the lifecycle dead letters")?;
                Ok(false)
            }
        }
    }
}

/// A backtest's lifecycle events, each applied when event time reaches it.
#[derive(Debug, Default)]
pub struct TimedLifecycle {
    /// (time, event), sorted by time.
    events: VecDeque<(i64, LifecycleEvent)>,
}

impl TimedLifecycle {
    /// Events with their times (in any order; sorted here, ties kept in the given order).
    pub fn new(mut events: Vec<(i64, LifecycleEvent)>) -> TimedLifecycle {
        events.sort_by_key(|(t, _)| *t);
        TimedLifecycle {
            events: events.into(),
        }
    }

    /// The time of the next event.
    pub fn next_at(&self) -> Option<i64> {
        self.events.front().map(|(t, _)| *t)
    }

    /// The events at or before `ts_ms` (consumed), in order.
    pub fn until(&mut self, ts_ms: i64) -> Vec<(i64, LifecycleEvent)> {
        let mut out = Vec::new();
        while self.events.front().is_some_and(|(t, _)| *t <= ts_ms) {
            out.extend(self.events.pop_front());
        }
        out
    }

    /// Every event left (the input has ended).
    pub fn rest(&mut self) -> Vec<(i64, LifecycleEvent)> {
        self.events.drain(..).collect()
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
        &super::lifecycle_properties(l)?,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn created(key: &str) -> LifecycleEvent {
        LifecycleEvent::KeyCreated {
            key_id: key.into(),
            owner: "o".into(),
            name: None,
            version: None,
            created_at: None,
            expires_at: None,
            scopes: Vec::new(),
            aliases: Vec::new(),
        }
    }

    #[test]
    fn timed_events_come_out_in_time_order_once() {
        let mut t = TimedLifecycle::new(vec![(30, created("c")), (10, created("a"))]);
        assert_eq!(t.next_at(), Some(10));
        assert!(t.until(9).is_empty());
        let first = t.until(10);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].1.key_id(), "a");
        assert_eq!(t.next_at(), Some(30));
        assert_eq!(t.rest().len(), 1);
        assert_eq!(t.next_at(), None);
    }

    #[tokio::test]
    async fn topic_events_apply_and_refused_ones_are_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let mut feed = RegistryFeed::new(None, Duration::from_secs(3600));
        let (tx, rx) = mpsc::channel(8);
        feed.follow_topic(dir.path(), DeadLetterConfig::default(), "lc", rx)
            .unwrap();
        assert!(feed.follows_topic());
        let event = serde_json::to_vec(&created("k1")).unwrap();
        tx.send(LifecycleMessage::Event {
            partition: 0,
            offset: 0,
            payload: event,
        })
        .await
        .unwrap();
        tx.send(LifecycleMessage::Event {
            partition: 0,
            offset: 1,
            payload: b"{\"type\":\"key_revoked\",\"key_id\":\"nobody\"}".to_vec(),
        })
        .await
        .unwrap();
        tx.send(LifecycleMessage::CaughtUp { events: 2 })
            .await
            .unwrap();
        let (caught_up, changed) = feed.catch_up(Duration::from_secs(5)).await.unwrap();
        assert!(caught_up);
        let registry = changed.expect("the first event changed the registry");
        assert!(registry.key("k1").is_some());
        let kept = std::fs::read_to_string(dir.path().join(LIFECYCLE_DEAD_LETTER_FILE)).unwrap();
        assert!(kept.contains("nobody"), "{kept}");
        assert_eq!(kept.lines().count(), 1);
        assert!(feed.poll().unwrap().is_none(), "nothing new");
    }
}
