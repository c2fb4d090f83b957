//! Notifications: findings to the people who have to act, by email (SMTP), Telegram, Slack,
//! a generic JSON webhook, or the console.
//!
//! The pipeline, one stage after the other (like Alertmanager's `notify.go`):
//!
//! ```text
//! findings ─▶ route ─▶ inhibit / silence ─▶ dedup against the log ─▶ group (wait, interval,
//!   quiet hours) ─▶ render per channel ─▶ queue in the log ─▶ send with retry ─▶ record
//! ```
//!
//! - **route** ([`route`]): `[[routes]]` in `rules/routes.toml` choose receivers by kind,
//!   severity and owner; the `owner` receiver is the key's owner with the contacts in
//!   `keys.toml`, other receivers are teams with their own contacts.
//! - **inhibit / silence**: `[[inhibit]]` rules (a `safe_to_revoke` for a key holds back
//!   that key's lingering-source reminders), and silences set with `keywatch silence` (by key
//!   or owner, until a time), read from the store.
//! - **dedup**: a fact (`dedup_key`) is told to a recipient once, or again after its kind's
//!   repeat interval when it is raised again ([`log`] has the policy).
//! - **group**: findings with the same grouping labels for one recipient share a message:
//!   the first waits `group_wait` for company, later ones `group_interval` after the last
//!   message of the group. A recipient's quiet hours hold back all but severe findings.
//! - **render** ([`template`], [`message`]): editable templates per channel, escaped for
//!   Telegram HTML and Slack mrkdwn, split to the channel's limits.
//! - **send** ([`channel`]): retries with backoff on transient failures, none on permanent
//!   ones, which become `notification_failed` for the operators.
//!
//! Contract:
//! - Time is a parameter (`now_ms`): [`Notifier::handle`] and [`Notifier::tick`] never look
//!   at the clock, so tests run hours of retries in simulated time. Only [`Notifier::run`]
//!   reads the wall clock.
//! - Only this module holds channel secrets; they are read when the notifier starts (owners'
//!   Slack webhooks when a message goes out), never logged, and scrubbed from errors.
//! - Every decision is in the notification log (SQLite, `store::notify_log`) before it is
//!   acted on; see [`log`] for what a restart may and may not repeat.
//! - With no channel configured for a recipient, the message goes to standard output.

mod channel;
pub mod config;
mod email;
pub mod log;
pub mod message;
pub mod route;
mod slack;
mod telegram;
pub mod template;
mod webhook;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use channel::{scrub, Address, Console, DeliveryError};
pub use config::Config;
pub use log::{silence_add, silence_list, silence_remove, AttemptRecord, Matcher, Silence};
pub use route::{Item, Kind};

use crate::config::ConfigError;
use crate::detect::{Finding, RotationStatus, Severity};
use crate::registry::{Owner, Registry};
use crate::store::notify_log::{AttemptEnd, MessageFinding, MessageRow, NewMessage, PendingRow};
use crate::store::{SqliteStore, StoreError};
use channel::Transports;
use config::{ChannelKind, Receiver};
use message::{Context, Entry, Rendered};
use template::Templates;

/// What can go wrong outside a delivery attempt.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `rules/routes.toml` or a template.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A channel cannot be built: a secret is missing, a CA file unreadable.
    #[error("{0}")]
    Channel(String),
    /// The notification log.
    #[error("notification log: {0}")]
    Store(String),
    /// A request that makes no sense (an unknown channel for `notify test`).
    #[error("{0}")]
    Invalid(String),
    /// `notify test`: the channel refused or could not be reached.
    #[error("{0}")]
    Delivery(DeliveryError),
}

impl From<StoreError> for NotifyError {
    fn from(e: StoreError) -> NotifyError {
        NotifyError::Store(e.to_string())
    }
}

/// What the daemon hands to [`Notifier::run`].
#[derive(Debug)]
pub enum Input {
    /// Findings to tell (new ones, or every finding of an evaluation: the log deduplicates).
    Findings(Vec<Finding>),
    /// An evaluation: its findings with the rotation statuses, whose full list of lingering
    /// sources goes into reminders.
    Evaluated {
        findings: Vec<Finding>,
        rotations: Vec<RotationStatus>,
    },
    /// A reloaded registry (owner contacts and time zones).
    Registry(Arc<Registry>),
    /// Findings the sender waits on: `ack` gets `true` once they are in the notification
    /// log (queued or grouped, durable), before any delivery is tried; `false` when the log
    /// could not take them. The pipeline commits a batch only after this, so a crash
    /// between the two cannot lose a finding (see [`crate::daemon::findings`]).
    Durable {
        findings: Vec<Finding>,
        ack: tokio::sync::oneshot::Sender<bool>,
    },
}

impl From<Vec<Finding>> for Input {
    fn from(f: Vec<Finding>) -> Input {
        Input::Findings(f)
    }
}

/// What the other instances of a consumer group have told: in full mode, the ClickHouse
/// notification tables every instance writes its attempts to.
pub trait SharedLog: Send + Sync {
    /// When a message carrying the fact `dedup_key` was last delivered to `recipient` by
    /// any instance, if ever.
    fn last_delivered(&self, recipient: &str, dedup_key: &str) -> Result<Option<i64>, String>;
}

/// The wall clock, in the only place that reads it.
pub fn wall_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Identifies a group: one recipient, one route, equal grouping labels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct GroupId {
    recipient: String,
    receiver: String,
    route: usize,
    values: String,
}

#[derive(Debug)]
struct Waiting {
    item: Item,
    raised_ms: i64,
    repeated: bool,
}

#[derive(Debug)]
struct Group {
    items: BTreeMap<String, Waiting>,
    next_flush_ms: i64,
}

/// Told-fact cache entries before it is cleared.
const MAX_TOLD_CACHE: usize = 200_000;
/// Sent and failed messages older than this are pruned from the log (facts stay).
const LOG_RETENTION_MS: i64 = 90 * 86_400_000;
/// How often silences are read again (the CLI writes them from another process).
const SILENCE_REFRESH_MS: i64 = 1000;

/// The notification pipeline. Owns its own store connection for the log.
pub struct Notifier {
    config: Arc<Config>,
    registry: Arc<Registry>,
    store: SqliteStore,
    templates: Templates,
    /// The built-in templates, when a user template fails at render time.
    fallback: Templates,
    transports: Arc<Transports>,
    groups: BTreeMap<GroupId, Group>,
    /// (recipient, dedup key) → the group it waits in.
    waiting: HashMap<(String, String), GroupId>,
    /// The latest status of each open rotation, by old key.
    rotations: HashMap<String, RotationStatus>,
    /// (inhibit rule, shared value) → when a source finding was last raised.
    inhibitors: HashMap<(usize, String), i64>,
    silences: Vec<Silence>,
    silences_read_ms: Option<i64>,
    /// (recipient, dedup key) → when last told: a cache of the log.
    told: HashMap<(String, String), Option<i64>>,
    attempt_sink: Option<mpsc::Sender<AttemptRecord>>,
    /// See [`Notifier::with_shared_log`].
    shared: Option<Arc<dyn SharedLog>>,
    pruned_ms: Option<i64>,
    /// A delivery round stopped on an error: attempts it marked as started are orphans.
    orphaned: bool,
}

impl Notifier {
    /// Reads the templates and the channels' secrets, and picks up what the log holds from
    /// the last run: messages to send or retry, findings waiting in groups.
    pub fn new(
        config: Config,
        registry: Arc<Registry>,
        store: SqliteStore,
    ) -> Result<Notifier, NotifyError> {
        Notifier::with_console(config, registry, store, Console::Stdout)
    }

    /// [`Notifier::new`] with the console output somewhere else (tests capture it).
    pub fn with_console(
        config: Config,
        registry: Arc<Registry>,
        store: SqliteStore,
        console: Console,
    ) -> Result<Notifier, NotifyError> {
        let templates = Templates::load(config.templates_dir.as_deref())?;
        let fallback = Templates::load(None)?;
        let transports = Arc::new(Transports::build(&config, None, console)?);
        let mut n = Notifier {
            config: Arc::new(config),
            registry,
            store,
            templates,
            fallback,
            transports,
            groups: BTreeMap::new(),
            waiting: HashMap::new(),
            rotations: HashMap::new(),
            inhibitors: HashMap::new(),
            silences: Vec::new(),
            silences_read_ms: None,
            told: HashMap::new(),
            attempt_sink: None,
            shared: None,
            pruned_ms: None,
            orphaned: false,
        };
        n.restore()?;
        Ok(n)
    }

    /// Every attempt is also handed to `sink` (bounded; when it is full, records are
    /// dropped and counted), for the ClickHouse notifications table in full mode.
    pub fn with_attempt_sink(mut self, sink: mpsc::Sender<AttemptRecord>) -> Notifier {
        self.attempt_sink = Some(sink);
        self
    }

    /// Consults `shared` for facts this instance's log has never told: in a consumer group,
    /// another instance (the previous rotation evaluator, before partition 0 moved) may
    /// have. A fact delivered there counts as told then, so it is not sent again (but is
    /// repeated on its schedule); a fact queued there but never delivered is sent here.
    pub fn with_shared_log(mut self, shared: Arc<dyn SharedLog>) -> Notifier {
        self.shared = Some(shared);
        self
    }

    /// Swaps in a reloaded registry: contacts and time zones of the messages queued from now.
    pub fn set_registry(&mut self, registry: Arc<Registry>) {
        self.rotations.retain(|old, _| {
            registry
                .key(old)
                .is_some_and(|k| k.open_rotation().is_some())
        });
        self.registry = registry;
    }

    /// The notification log, for reports and tests.
    pub fn store(&self) -> &SqliteStore {
        &self.store
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Takes findings raised at `now_ms` (and the rotation statuses of an evaluation, which
    /// give reminders their full list of sources), then sends what is due.
    pub async fn handle(
        &mut self,
        findings: Vec<Finding>,
        rotations: &[RotationStatus],
        now_ms: i64,
    ) -> Result<(), NotifyError> {
        self.take(findings, rotations, now_ms)?;
        self.deliver(now_ms).await
    }

    /// The first half of [`Notifier::handle`]: routes the findings and puts them in the
    /// log (waiting in their groups, or queued as messages), without sending anything.
    pub fn take(
        &mut self,
        findings: Vec<Finding>,
        rotations: &[RotationStatus],
        now_ms: i64,
    ) -> Result<(), NotifyError> {
        self.read_silences(now_ms)?;
        for r in rotations {
            self.rotations.insert(r.old_key.clone(), r.clone());
        }
        let items = findings.into_iter().map(Item::from).collect();
        self.accept(items, now_ms, now_ms)?;
        self.flush(now_ms, false)
    }

    /// Flushes the groups whose time has come and sends (or retries) what is due.
    pub async fn tick(&mut self, now_ms: i64) -> Result<(), NotifyError> {
        self.read_silences(now_ms)?;
        self.flush(now_ms, false)?;
        self.deliver(now_ms).await?;
        if self
            .pruned_ms
            .is_none_or(|t| now_ms.saturating_sub(t) >= 86_400_000)
        {
            self.pruned_ms = Some(now_ms);
            self.store.notify_prune(now_ms - LOG_RETENTION_MS)?;
        }
        Ok(())
    }

    /// Flushes every group now, whatever its wait (quiet hours still hold), and sends once:
    /// the end of a one-shot run. What fails transiently stays queued for the next run.
    pub async fn drain(&mut self, now_ms: i64) -> Result<(), NotifyError> {
        self.read_silences(now_ms)?;
        self.flush(now_ms, true)?;
        self.deliver(now_ms).await
    }

    /// When [`Notifier::tick`] has something to do next: a group to flush or a message to
    /// (re)try.
    pub fn next_wakeup_ms(&self) -> Result<Option<i64>, NotifyError> {
        let groups = self
            .groups
            .values()
            .filter(|g| !g.items.is_empty())
            .map(|g| g.next_flush_ms)
            .min();
        let messages = self.store.notify_next_due_ms()?;
        Ok(match (groups, messages) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    /// The notifier as a task, on the wall clock: takes [`Input`]s (or anything that turns
    /// into one, like the `Vec<Finding>` the detection stage sends), wakes up for group
    /// flushes and retries, and stops when `cancel` fires (attempts in flight finish first)
    /// or the input closes (after a last [`Notifier::drain`]).
    pub async fn run<T: Into<Input> + Send>(
        mut self,
        mut rx: mpsc::Receiver<T>,
        cancel: CancellationToken,
    ) {
        loop {
            let now = wall_ms();
            let wake = match self.next_wakeup_ms() {
                Ok(Some(t)) => (t - now).clamp(0, SILENCE_REFRESH_MS),
                Ok(None) => SILENCE_REFRESH_MS,
                Err(e) => {
                    tracing::error!(error = %e, "notifier");
                    SILENCE_REFRESH_MS
                }
            };
            let result = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                input = rx.recv() => match input.map(Into::into) {
                    Some(Input::Findings(f)) => self.handle(f, &[], wall_ms()).await,
                    Some(Input::Evaluated { findings, rotations }) => {
                        self.handle(findings, &rotations, wall_ms()).await
                    }
                    Some(Input::Registry(r)) => {
                        self.set_registry(r);
                        Ok(())
                    }
                    Some(Input::Durable { findings, ack }) => {
                        let now = wall_ms();
                        let taken = self.take(findings, &[], now);
                        let _ = ack.send(taken.is_ok());
                        match taken {
                            Ok(()) => self.deliver(now).await,
                            Err(e) => Err(e),
                        }
                    }
                    None => {
                        if let Err(e) = self.drain(wall_ms()).await {
                            tracing::error!(error = %e, "notifier: last delivery");
                        }
                        break;
                    }
                },
                _ = tokio::time::sleep(Duration::from_millis(wake as u64)) => {
                    self.tick(wall_ms()).await
                }
            };
            if let Err(e) = result {
                // The log is unavailable (busy, disk full): what was decided is in it, the
                // rest is raised again by the next evaluation.
                tracing::error!(error = %e, "notifier");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// After a restart: attempts cut short go back to the queue, waiting findings to their
    /// groups.
    fn restore(&mut self) -> Result<(), NotifyError> {
        let now = wall_ms();
        let recovered = self.store.notify_recover(now)?;
        if !recovered.is_empty() {
            tracing::warn!(
                messages = recovered.len(),
                "keywatch stopped while sending; those messages are sent again"
            );
        }
        self.read_silences(now)?;
        let rows = self.store.notify_pending_all()?;
        let mut latest: BTreeMap<String, (i64, Item)> = BTreeMap::new();
        for r in &rows {
            match serde_json::from_str::<Item>(&r.item) {
                Ok(item) => {
                    let e = latest
                        .entry(item.dedup_key.clone())
                        .or_insert((r.raised_ms, item.clone()));
                    if r.raised_ms > e.0 {
                        *e = (r.raised_ms, item);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "a waiting finding in the log cannot be read"),
            }
        }
        for (_, (raised, item)) in latest {
            self.accept(vec![item], raised, now)?;
        }
        let stale: Vec<(String, String)> = rows
            .into_iter()
            .map(|r| (r.recipient, r.dedup_key))
            .filter(|k| !self.waiting.contains_key(k))
            .collect();
        self.store.notify_pending_remove(&stale)?;
        Ok(())
    }

    fn read_silences(&mut self, now_ms: i64) -> Result<(), NotifyError> {
        let fresh = self
            .silences_read_ms
            .is_some_and(|t| now_ms >= t && now_ms - t < SILENCE_REFRESH_MS);
        if !fresh {
            self.silences = silence_list(&self.store, now_ms, false)?;
            self.silences_read_ms = Some(now_ms);
        }
        Ok(())
    }

    fn silenced(&self, item: &Item, now_ms: i64) -> bool {
        self.silences
            .iter()
            .any(|s| s.active_at(now_ms) && s.matches(&item.key_id, item.owner.as_deref()))
    }

    fn inhibited(&self, item: &Item, raised_ms: i64) -> bool {
        self.config.inhibit.iter().enumerate().any(|(i, rule)| {
            rule.targets.contains(&item.kind)
                && rule.value(item).is_some_and(|v| {
                    self.inhibitors
                        .get(&(i, v.to_owned()))
                        .is_some_and(|t| *t >= raised_ms)
                })
        })
    }

    fn last_told(&mut self, recipient: &str, dedup_key: &str) -> Result<Option<i64>, NotifyError> {
        let k = (recipient.to_owned(), dedup_key.to_owned());
        if let Some(t) = self.told.get(&k) {
            return Ok(*t);
        }
        let mut t = self.store.notify_fact_last(recipient, dedup_key)?;
        if let (None, Some(shared)) = (t, &self.shared) {
            match shared.last_delivered(recipient, dedup_key) {
                Ok(Some(at)) => {
                    metrics::counter!("keywatch_notify_told_elsewhere_total").increment(1);
                    tracing::debug!(%recipient, finding = %dedup_key, "told by another instance");
                    t = Some(at);
                }
                Ok(None) => {}
                // Unknown: tell it (at least once, rather than perhaps never).
                Err(e) => tracing::warn!(error = %e, "cannot read the shared notification log"),
            }
        }
        if self.told.len() >= MAX_TOLD_CACHE {
            self.told.clear();
        }
        self.told.insert(k, t);
        Ok(t)
    }

    /// Route, inhibit, silence, dedup; what is left waits in its group (and in the log).
    fn accept(&mut self, items: Vec<Item>, raised_ms: i64, now_ms: i64) -> Result<(), NotifyError> {
        let config = self.config.clone();
        // Sources first: a safe_to_revoke holds back the reminders raised with it.
        for item in &items {
            for (i, rule) in config.inhibit.iter().enumerate() {
                if rule.sources.contains(&item.kind) {
                    if let Some(v) = rule.value(item) {
                        let t = self
                            .inhibitors
                            .entry((i, v.to_owned()))
                            .or_insert(raised_ms);
                        *t = (*t).max(raised_ms);
                    }
                }
            }
        }
        let mut rows = Vec::new();
        for item in items {
            if self.inhibited(&item, raised_ms) {
                metrics::counter!("keywatch_notify_inhibited_total").increment(1);
                tracing::debug!(finding = %item.dedup_key, "inhibited");
                continue;
            }
            if self.silenced(&item, now_ms) {
                metrics::counter!("keywatch_notify_silenced_total").increment(1);
                tracing::debug!(finding = %item.dedup_key, "silenced");
                continue;
            }
            let routes = route::matching(&config.routes, &item);
            if routes.is_empty() {
                tracing::debug!(finding = %item.dedup_key, "no route");
            }
            for (ri, rname) in routes {
                let route = &config.routes[ri];
                let Some(receiver) = config.receivers.get(rname) else {
                    continue;
                };
                let recipient = recipient_of(receiver, item.owner.as_deref());
                let key = (recipient.clone(), item.dedup_key.clone());
                let row = PendingRow {
                    recipient: recipient.clone(),
                    dedup_key: item.dedup_key.clone(),
                    raised_ms,
                    item: serde_json::to_string(&item).expect("an item serializes"),
                };
                if let Some(gid) = self.waiting.get(&key) {
                    // Waiting already: keep the latest version of the fact.
                    if let Some(w) = self
                        .groups
                        .get_mut(gid)
                        .and_then(|g| g.items.get_mut(&item.dedup_key))
                    {
                        w.item = item.clone();
                        w.raised_ms = w.raised_ms.max(raised_ms);
                    }
                    rows.push(row);
                    continue;
                }
                let repeat = route
                    .repeat_ms
                    .unwrap_or_else(|| config.repeat.of(item.kind));
                let repeated = match self.last_told(&recipient, &item.dedup_key)? {
                    None => false,
                    Some(t) => match repeat {
                        Some(every) if now_ms.saturating_sub(t) >= every => true,
                        _ => continue,
                    },
                };
                let gid = GroupId {
                    recipient,
                    receiver: rname.to_owned(),
                    route: ri,
                    values: route.group_values(&item),
                };
                let first_flush = raised_ms.saturating_add(route.group_wait_ms);
                let g = self.groups.entry(gid.clone()).or_insert_with(|| Group {
                    items: BTreeMap::new(),
                    next_flush_ms: first_flush,
                });
                g.items.insert(
                    item.dedup_key.clone(),
                    Waiting {
                        item: item.clone(),
                        raised_ms,
                        repeated,
                    },
                );
                self.waiting.insert(key, gid);
                rows.push(row);
            }
        }
        self.store.notify_pending_put(&rows)?;
        Ok(())
    }

    /// Turns the groups whose time has come (all with `force`) into queued messages.
    fn flush(&mut self, now_ms: i64, force: bool) -> Result<(), NotifyError> {
        let due: Vec<GroupId> = self
            .groups
            .iter()
            .filter(|(_, g)| !g.items.is_empty() && (force || g.next_flush_ms <= now_ms))
            .map(|(k, _)| k.clone())
            .collect();
        for gid in due {
            self.flush_group(&gid, now_ms)?;
        }
        // A group without findings only keeps its interval; past it, it can go.
        self.groups
            .retain(|_, g| !g.items.is_empty() || g.next_flush_ms > now_ms);
        Ok(())
    }

    fn flush_group(&mut self, gid: &GroupId, now_ms: i64) -> Result<(), NotifyError> {
        let config = self.config.clone();
        let Some(receiver) = config.receivers.get(&gid.receiver) else {
            return Ok(());
        };
        let route = &config.routes[gid.route];
        let Some(group) = self.groups.get_mut(gid) else {
            return Ok(());
        };
        let waiting = std::mem::take(&mut group.items);
        let mut dropped = Vec::new();
        let mut send = Vec::new();
        let mut hold = BTreeMap::new();
        let owner = owner_name(&gid.recipient);
        let tz = if receiver.owner {
            owner
                .and_then(|o| self.registry.owner(o))
                .map_or(chrono_tz::Tz::UTC, |o| o.timezone)
        } else {
            receiver.timezone
        };
        let quiet_until = receiver
            .quiet_hours
            .and_then(|q| q.until(now_ms, tz).map(|u| (q, u)));
        for (k, w) in waiting {
            if self.inhibited(&w.item, w.raised_ms) || self.silenced(&w.item, now_ms) {
                dropped.push((gid.recipient.clone(), k));
            } else if quiet_until.is_some_and(|(q, _)| w.item.severity < q.except) {
                hold.insert(k, w);
            } else {
                send.push(w);
            }
        }
        for k in &dropped {
            self.waiting.remove(k);
        }
        self.store.notify_pending_remove(&dropped)?;
        if !send.is_empty() {
            send.sort_by(|a, b| {
                (a.item.at_ms, &a.item.dedup_key).cmp(&(b.item.at_ms, &b.item.dedup_key))
            });
            let messages = self.compose(gid, receiver, owner, tz, &send, now_ms);
            let told: Vec<(String, String)> = send
                .iter()
                .map(|w| (gid.recipient.clone(), w.item.dedup_key.clone()))
                .collect();
            if let Err(e) = self.store.notify_enqueue(&messages, &told, now_ms) {
                // Nothing was queued: the findings wait on for the next flush.
                let group = self.groups.get_mut(gid).expect("the group is still there");
                group.items = hold;
                for w in send {
                    group.items.insert(w.item.dedup_key.clone(), w);
                }
                return Err(e.into());
            }
            for k in told {
                self.waiting.remove(&k);
                self.told.insert(k, Some(now_ms));
            }
        }
        let group = self.groups.get_mut(gid).expect("the group is still there");
        if !send.is_empty() {
            group.next_flush_ms = now_ms.saturating_add(route.group_interval_ms);
        }
        if let Some((_, until)) = quiet_until.filter(|_| !hold.is_empty()) {
            group.next_flush_ms = group.next_flush_ms.max(until);
        }
        group.items = hold;
        Ok(())
    }

    fn compose(
        &self,
        gid: &GroupId,
        receiver: &Receiver,
        owner: Option<&str>,
        tz: chrono_tz::Tz,
        send: &[Waiting],
        now_ms: i64,
    ) -> Vec<NewMessage> {
        let reg_owner = owner.and_then(|o| self.registry.owner(o));
        let ctx = Context {
            test: false,
            recipient: &gid.recipient,
            receiver: &gid.receiver,
            owner,
            tz,
            entries: send
                .iter()
                .map(|w| Entry {
                    item: &w.item,
                    repeated: w.repeated,
                })
                .collect(),
            rotations: &self.rotations,
        };
        let severity = send
            .iter()
            .map(|w| w.item.severity)
            .max()
            .unwrap_or(Severity::Info);
        let mut kinds: Vec<&str> = send.iter().map(|w| w.item.kind.as_str()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        let findings: Vec<MessageFinding> = send
            .iter()
            .map(|w| MessageFinding {
                dedup_key: w.item.dedup_key.clone(),
                kind: w.item.kind.as_str().to_owned(),
                key_id: w.item.key_id.clone(),
                owner: w.item.owner.clone(),
            })
            .collect();
        let mut out = Vec::new();
        for t in targets(&self.config, receiver, &gid.recipient, reg_owner, None) {
            let id = message_id(
                &gid.recipient,
                &t.channel,
                &t.target,
                &gid.values,
                now_ms,
                send,
            );
            let value = ctx.to_value(&t.channel, now_ms);
            let rendered = message::render(
                t.channel_type,
                &value,
                &self.templates,
                &self.fallback,
                self.config.max_parts,
                |subject, text| webhook_body(&id, gid, owner, severity, subject, text, send, false),
            );
            out.push(NewMessage {
                id,
                recipient: gid.recipient.clone(),
                receiver: gid.receiver.clone(),
                channel: t.channel,
                channel_type: t.channel_type.to_owned(),
                target: t.target,
                address: serde_json::to_string(&t.address).expect("an address serializes"),
                group_key: gid.values.clone(),
                kinds: kinds.join(","),
                severity: severity.as_str().to_owned(),
                created_ms: now_ms,
                payload: serde_json::to_string(&rendered).expect("a message serializes"),
                findings: findings.clone(),
            });
        }
        out
    }

    /// Sends every message due at `now_ms`, `retry.parallel` at a time, and records each
    /// attempt.
    async fn deliver(&mut self, now_ms: i64) -> Result<(), NotifyError> {
        if self.orphaned {
            // The last round stopped on an error with attempts marked as started: none is
            // in flight any more, so they go back to the queue like after a restart.
            self.store.notify_recover(now_ms)?;
            self.orphaned = false;
        }
        self.orphaned = true;
        // A panicked attempt leaves its message `sending`: an orphan too.
        self.orphaned = self.deliver_rounds(now_ms).await?;
        Ok(())
    }

    /// Returns whether an attempt panicked.
    async fn deliver_rounds(&mut self, now_ms: i64) -> Result<bool, NotifyError> {
        let mut panicked = false;
        let parallel = self.config.retry.parallel;
        // A failure for good raises notification_failed, which may be due at once: one more
        // round sends it.
        for _round in 0..2 {
            let mut failures = Vec::new();
            loop {
                let due = self.store.notify_due(now_ms, parallel)?;
                if due.is_empty() {
                    break;
                }
                let mut set = tokio::task::JoinSet::new();
                let mut attempts = HashMap::new();
                for m in &due {
                    let attempt = self.store.notify_attempt_start(&m.id, now_ms)?;
                    attempts.insert(m.id.clone(), attempt);
                    let rendered = serde_json::from_str::<Rendered>(&m.payload);
                    let address = serde_json::from_str::<Address>(&m.address);
                    let (rendered, address) = match (rendered, address) {
                        (Ok(r), Ok(a)) => (r, a),
                        (Err(e), _) | (_, Err(e)) => {
                            let end = AttemptEnd::Failed {
                                transient: false,
                                detail: format!("the queued message cannot be read: {e}"),
                            };
                            self.store
                                .notify_attempt_end(&m.id, attempt, now_ms, &end)?;
                            continue;
                        }
                    };
                    let transports = self.transports.clone();
                    let (id, channel, recipient) =
                        (m.id.clone(), m.channel.clone(), m.recipient.clone());
                    let parts_done = m.parts_done;
                    set.spawn(async move {
                        let t0 = Instant::now();
                        let (done, result) = transports
                            .send(&channel, &id, &recipient, &address, &rendered, parts_done)
                            .await;
                        (id, done, result, t0.elapsed())
                    });
                }
                while let Some(joined) = set.join_next().await {
                    let (id, done, result, took) = match joined {
                        Ok(x) => x,
                        Err(e) => {
                            // Left `sending`: queued again by the next round.
                            tracing::error!(error = %e, "a notification attempt panicked");
                            panicked = true;
                            continue;
                        }
                    };
                    let m = due.iter().find(|m| m.id == id).expect("a due message");
                    let attempt = attempts[&id];
                    if done > m.parts_done {
                        self.store.notify_parts_done(&id, done)?;
                    }
                    let finished = now_ms.saturating_add(took.as_millis() as i64);
                    let end = log::decide(
                        &self.config.retry,
                        &id,
                        m.created_ms,
                        attempt,
                        finished,
                        &result,
                    );
                    self.store
                        .notify_attempt_end(&id, attempt, finished, &end)?;
                    self.report(m, attempt, now_ms, finished, &end);
                    if let AttemptEnd::Failed { detail, .. } = &end {
                        if !m
                            .kinds
                            .split(',')
                            .any(|k| k == Kind::NotificationFailed.as_str())
                        {
                            failures.push(self.failure_item(m, detail, now_ms)?);
                        }
                    }
                }
                if due.len() < parallel {
                    break;
                }
            }
            if failures.is_empty() {
                break;
            }
            self.accept(failures, now_ms, now_ms)?;
            self.flush(now_ms, false)?;
        }
        Ok(panicked)
    }

    /// Logs, counts and hands on one attempt's outcome.
    fn report(&self, m: &MessageRow, attempt: u32, started: i64, finished: i64, end: &AttemptEnd) {
        let (outcome, detail) = match end {
            AttemptEnd::Ok => ("ok", None),
            AttemptEnd::Retry { detail, .. } => ("transient", Some(detail.clone())),
            AttemptEnd::Failed {
                transient: true,
                detail,
            } => ("gave_up", Some(detail.clone())),
            AttemptEnd::Failed { detail, .. } => ("permanent", Some(detail.clone())),
        };
        metrics::counter!(
            "keywatch_notifications_total",
            "channel" => m.channel_type.clone(),
            "outcome" => outcome
        )
        .increment(1);
        match end {
            AttemptEnd::Ok => tracing::info!(
                message = %m.id, recipient = %m.recipient, channel = %m.channel,
                target = %m.target, kinds = %m.kinds, attempt, "notification sent"
            ),
            AttemptEnd::Retry {
                next_attempt_ms,
                detail,
            } => tracing::warn!(
                message = %m.id, recipient = %m.recipient, channel = %m.channel,
                target = %m.target, attempt, retry_in_ms = next_attempt_ms - finished,
                error = %detail, "notification failed; will retry"
            ),
            AttemptEnd::Failed { detail, .. } => tracing::error!(
                message = %m.id, recipient = %m.recipient, channel = %m.channel,
                target = %m.target, attempt, error = %detail,
                "notification failed for good"
            ),
        }
        if let Some(sink) = &self.attempt_sink {
            let findings = match self.store.notify_message_findings(&m.id) {
                Ok(f) => f.into_iter().map(|f| f.dedup_key).collect(),
                Err(e) => {
                    tracing::warn!(message = %m.id, error = %e, "cannot read a message's findings");
                    Vec::new()
                }
            };
            let record = AttemptRecord {
                findings,
                message_id: m.id.clone(),
                recipient: m.recipient.clone(),
                receiver: m.receiver.clone(),
                channel: m.channel.clone(),
                channel_type: m.channel_type.clone(),
                target: m.target.clone(),
                kinds: m.kinds.clone(),
                severity: m.severity.clone(),
                created_ms: m.created_ms,
                attempt,
                started_ms: started,
                finished_ms: finished,
                outcome,
                detail,
            };
            if sink.try_send(record).is_err() {
                metrics::counter!("keywatch_notify_records_dropped_total").increment(1);
            }
        }
    }

    /// `notification_failed` for the operators: who could not be told what, and why.
    fn failure_item(&self, m: &MessageRow, detail: &str, now_ms: i64) -> Result<Item, NotifyError> {
        let findings = self.store.notify_message_findings(&m.id)?;
        let key_id = findings
            .first()
            .map_or_else(|| "-".to_owned(), |f| f.key_id.clone());
        Ok(Item {
            kind: Kind::NotificationFailed,
            key_id,
            owner: None,
            at_ms: now_ms,
            severity: Severity::Warning,
            summary: format!(
                "keywatch could not notify {} by {} ({}): {detail}; {} finding(s) not delivered: {}",
                m.recipient,
                m.channel,
                m.target,
                findings.len(),
                m.kinds
            ),
            evidence: serde_json::json!({
                "message_id": m.id,
                "recipient": m.recipient,
                "receiver": m.receiver,
                "channel": m.channel,
                "channel_type": m.channel_type,
                "target": m.target,
                "error": detail,
                "findings": findings.iter().map(|f| &f.dedup_key).collect::<Vec<_>>(),
            }),
            dedup_key: format!("notification_failed:{}:{}", m.recipient, m.channel),
        })
    }
}

/// `owner:NAME` for the owner receiver (`owner:-` for findings without one), `team:NAME`.
fn recipient_of(receiver: &Receiver, owner: Option<&str>) -> String {
    if receiver.owner {
        format!("owner:{}", owner.unwrap_or("-"))
    } else {
        format!("team:{}", receiver.name)
    }
}

fn owner_name(recipient: &str) -> Option<&str> {
    recipient.strip_prefix("owner:").filter(|o| *o != "-")
}

/// Where a message goes on one channel.
struct Target {
    channel: String,
    channel_type: &'static str,
    /// Without secrets: `email:a@x`, `telegram:-100…`, `slack:owner:acme`.
    target: String,
    address: Address,
}

/// The targets of a receiver on its channels (or on `only`): those its contacts allow. None
/// at all: the console.
fn targets(
    config: &Config,
    receiver: &Receiver,
    recipient: &str,
    owner: Option<&Owner>,
    only: Option<&str>,
) -> Vec<Target> {
    let mut out = Vec::new();
    let channels: Vec<&str> = match only {
        Some(c) => vec![c],
        None => receiver.channels.iter().map(String::as_str).collect(),
    };
    for name in channels {
        let Some(ch) = config.channels.get(name) else {
            continue;
        };
        let (email, chat, slack) = if receiver.owner {
            (
                owner.map(|o| o.email.clone()).unwrap_or_default(),
                owner.and_then(|o| o.telegram_chat_id.clone()),
                owner.and_then(|o| o.slack_webhook.clone()),
            )
        } else {
            (
                receiver.email.clone(),
                receiver.telegram_chat_id.clone(),
                receiver.slack_webhook.clone(),
            )
        };
        let t = match &ch.kind {
            ChannelKind::Console => Some(("console".to_owned(), Address::Console)),
            ChannelKind::Email(_) => (!email.is_empty()).then(|| {
                (
                    format!("email:{}", email.join(",")),
                    Address::Email { to: email },
                )
            }),
            ChannelKind::Telegram(_) => {
                chat.map(|c| (format!("telegram:{c}"), Address::Telegram { chat_id: c }))
            }
            ChannelKind::Slack => slack.map(|r| (format!("slack:{recipient}"), Address::slack(&r))),
            ChannelKind::Webhook(_) => Some((format!("webhook:{name}"), Address::Webhook)),
        };
        if let Some((target, address)) = t {
            out.push(Target {
                channel: name.to_owned(),
                channel_type: ch.kind.type_name(),
                target,
                address,
            });
        }
    }
    if out.is_empty() && only.is_none() {
        out.push(Target {
            channel: "console".to_owned(),
            channel_type: "console",
            target: "console".to_owned(),
            address: Address::Console,
        });
    }
    out
}

fn message_id(
    recipient: &str,
    channel: &str,
    target: &str,
    group: &str,
    now_ms: i64,
    send: &[Waiting],
) -> String {
    let mut h = Sha256::new();
    for part in [recipient, channel, target, group, &now_ms.to_string()] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    for w in send {
        h.update(w.item.dedup_key.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..12])
}

#[allow(clippy::too_many_arguments)]
fn webhook_body(
    id: &str,
    gid: &GroupId,
    owner: Option<&str>,
    severity: Severity,
    subject: &str,
    text: &str,
    send: &[Waiting],
    test: bool,
) -> serde_json::Value {
    serde_json::json!({
        "version": "1",
        "id": id,
        "receiver": gid.receiver,
        "recipient": gid.recipient,
        "owner": owner,
        "group_key": gid.values,
        "severity": severity.as_str(),
        "subject": subject,
        "text": text,
        "test": test,
        "findings": send.iter().map(|w| serde_json::json!({
            "kind": w.item.kind.as_str(),
            "key_id": w.item.key_id,
            "owner": w.item.owner,
            "at": crate::registry::format_rfc3339(w.item.at_ms),
            "severity": w.item.severity.as_str(),
            "summary": w.item.summary,
            "evidence": w.item.evidence,
            "dedup_key": w.item.dedup_key,
            "repeated": w.repeated,
        })).collect::<Vec<_>>(),
    })
}

/// For `keywatch check-config`: the templates compile and render a sample of every kind
/// for every channel type. Reads the template files; no secrets, no network.
pub fn check_templates(config: &Config) -> Result<(), ConfigError> {
    let templates = Templates::load(config.templates_dir.as_deref())?;
    let source = serde_json::json!({
        "ip": "192.0.2.1", "user_agent": "sample/1.0", "endpoints": ["/v1/sample"],
        "gateways": ["edge-1"], "first_seen": "2026-11-20T08:00:00.000Z",
        "last_seen": "2026-11-20T09:00:00.000Z", "requests": 12, "failures": 0,
    });
    let items: Vec<Item> = Kind::all()
        .map(|kind| Item {
            kind,
            key_id: "sample-key".into(),
            owner: Some("sample-owner".into()),
            at_ms: 1_795_132_800_000,
            severity: Severity::Warning,
            summary: format!("a sample {kind} finding"),
            evidence: serde_json::json!({
                "old_key": "sample-key", "old_name": "sample A", "new_key": "sample-key-2",
                "new_name": "sample B", "started": "2026-11-10T08:00:00.000Z",
                "deadline": "2026-11-24T17:00:00.000Z", "share_24h": 0.5,
                "old_requests": 10, "new_requests": 10, "step": "3d",
                "lingering_sources": [source.clone()], "lingering_count": 1,
                "rotation": {"old_key": "sample-key", "new_key": "sample-key-2"},
                "ip": "192.0.2.1", "user_agent": "sample/1.0", "method": "GET",
                "endpoint": "/v1/sample", "gateway": "edge-1", "accepted": true,
                "forecast": {"completion": "2026-11-30T00:00:00.000Z"},
            }),
            dedup_key: format!("sample:{kind}"),
        })
        .collect();
    let rotations = HashMap::new();
    for test in [false, true] {
        let ctx = Context {
            test,
            recipient: "owner:sample-owner",
            receiver: config::OWNER_RECEIVER,
            owner: Some("sample-owner"),
            tz: chrono_tz::Tz::UTC,
            entries: if test {
                Vec::new()
            } else {
                items
                    .iter()
                    .map(|item| Entry {
                        item,
                        repeated: false,
                    })
                    .collect()
            },
            rotations: &rotations,
        };
        let value = minijinja::Value::from(minijinja::value::Serde(ctx.to_value("sample", 0)));
        for (name, _) in template::BUILT_IN {
            templates
                .render(name, &value)
                .map_err(|reason| ConfigError {
                    file: config.templates_dir.as_ref().map_or_else(
                        || format!("<built-in {name}>"),
                        |d| d.join(name).display().to_string(),
                    ),
                    line: None,
                    field: String::new(),
                    reason,
                })?;
        }
    }
    Ok(())
}

/// `keywatch notify test --channel NAME --owner OWNER`: sends one test message to the owner
/// (a registry owner, or a team receiver of that name) on one channel, without retrying or
/// logging it. Returns where it went.
pub async fn send_test(
    config: &Config,
    registry: &Registry,
    channel: &str,
    owner: &str,
) -> Result<String, NotifyError> {
    let ch = config.channels.get(channel).ok_or_else(|| {
        let known: Vec<&str> = config.channels.keys().map(String::as_str).collect();
        NotifyError::Invalid(if known.is_empty() {
            format!(
                "unknown channel `{channel}`: {} defines no channels",
                config.origin
            )
        } else {
            format!(
                "unknown channel `{channel}`, expected one of {}",
                known.join(", ")
            )
        })
    })?;
    let (receiver, reg_owner, tz) = if let Some(o) = registry.owner(owner) {
        let mut r = config
            .receivers
            .get(config::OWNER_RECEIVER)
            .cloned()
            .expect("the owner receiver always exists");
        r.owner = true;
        (r, Some(o), o.timezone)
    } else if let Some(r) = config.receivers.get(owner).filter(|r| !r.owner) {
        (r.clone(), None, r.timezone)
    } else {
        return Err(NotifyError::Invalid(format!(
            "unknown owner `{owner}`: not in {} nor a receiver in {}",
            registry.origin, config.origin
        )));
    };
    let recipient = recipient_of(&receiver, Some(owner));
    let target = targets(config, &receiver, &recipient, reg_owner, Some(channel))
        .into_iter()
        .next()
        .ok_or_else(|| {
            let what = match &ch.kind {
                ChannelKind::Email(_) => "email address",
                ChannelKind::Telegram(_) => "telegram_chat_id",
                ChannelKind::Slack => "Slack webhook (slack_webhook_env or slack_webhook_file)",
                _ => "contact",
            };
            let origin = if reg_owner.is_some() {
                &registry.origin
            } else {
                &config.origin
            };
            NotifyError::Invalid(format!(
                "{owner} has no {what} in {origin} for the {} channel `{channel}`",
                ch.kind.type_name()
            ))
        })?;
    let transports = Transports::build(config, Some(channel), Console::Stdout)?;
    let templates = Templates::load(config.templates_dir.as_deref())?;
    let fallback = Templates::load(None)?;
    let rotations = HashMap::new();
    let ctx = Context {
        test: true,
        recipient: &recipient,
        receiver: &receiver.name,
        owner: reg_owner.map(|o| o.name.as_str()),
        tz,
        entries: Vec::new(),
        rotations: &rotations,
    };
    let now = wall_ms();
    let id = format!(
        "test-{}",
        message_id(&recipient, channel, &target.target, "test", now, &[])
    );
    let gid = GroupId {
        recipient: recipient.clone(),
        receiver: receiver.name.clone(),
        route: 0,
        values: "test".into(),
    };
    let rendered = message::render(
        target.channel_type,
        &ctx.to_value(channel, now),
        &templates,
        &fallback,
        config.max_parts,
        |subject, text| {
            webhook_body(
                &id,
                &gid,
                Some(owner),
                Severity::Info,
                subject,
                text,
                &[],
                true,
            )
        },
    );
    let (_, result) = transports
        .send(channel, &id, &recipient, &target.address, &rendered, 0)
        .await;
    result
        .map(|()| format!("{} via {channel}", target.target))
        .map_err(NotifyError::Delivery)
}
