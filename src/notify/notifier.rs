//! The notifier: the stages of the pipeline wired in order, with the notification log as
//! their memory ([`super`] has the stage order and the contract).
//!
//! [`Notifier::take`] runs findings through route, silence and inhibit, dedup and group;
//! [`Notifier::flush`] renders and queues the groups whose time has come; delivery and
//! recording follow in [`Notifier::tick`]. Time is a parameter everywhere but in
//! [`Notifier::run`] and the restart recovery.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::channel::{Console, Transports};
use super::config::Config;
use super::dedup::{self, Dedup};
use super::deliver;
use super::dry_run::DryRunLog;
use super::group::{self, GroupId, Groups, Waiting};
use super::inhibit::Inhibitors;
use super::log::{AttemptEnd, AttemptRecord, NotifyLog, PendingRow, SharedLog};
use super::record::{self, Recorder};
use super::render::{owner_name, recipient_of, Audience, Renderer};
use super::route::{self, Item};
use super::silence::{Silences, REFRESH_MS};
use super::{wall_ms, Hold, Input, NotifyError};
use crate::detect::{Finding, RotationStatus};
use crate::registry::Registry;
use crate::store::SqliteStore;

/// Sent and failed messages older than this are pruned from the log (facts stay).
const LOG_RETENTION_MS: i64 = 90 * 86_400_000;

/// The notification pipeline. Owns its log (its own store connection).
pub struct Notifier<L: NotifyLog = SqliteStore> {
    config: Arc<Config>,
    registry: Arc<Registry>,
    log: L,
    renderer: Renderer,
    transports: Arc<Transports>,
    groups: Groups,
    /// The latest status of each open rotation, by old key.
    rotations: HashMap<String, RotationStatus>,
    inhibitors: Inhibitors,
    silences: Silences,
    dedup: Dedup,
    recorder: Recorder,
    pruned_ms: Option<i64>,
    /// A delivery round stopped on an error: attempts it marked as started are orphans.
    orphaned: bool,
}

impl<L: NotifyLog + Send> Notifier<DryRunLog<L>> {
    /// `run --dry-run` ([`super::dry_run`]): the same pipeline on `log` read-only, every
    /// message rendered to `console` instead of sent.
    pub fn dry_run(
        config: Config,
        registry: Arc<Registry>,
        log: L,
        console: Console,
    ) -> Result<Notifier<DryRunLog<L>>, NotifyError> {
        Notifier::build(config, registry, DryRunLog::new(log)?, console, true)
    }
}

impl<L: NotifyLog + Send> Notifier<L> {
    /// Reads the templates and the channels' secrets, and picks up what the log holds from
    /// the last run: messages to send or retry, findings waiting in groups.
    pub fn new(
        config: Config,
        registry: Arc<Registry>,
        log: L,
    ) -> Result<Notifier<L>, NotifyError> {
        Notifier::with_console(config, registry, log, Console::Stdout)
    }

    /// [`Notifier::new`] with the console output somewhere else (tests capture it).
    pub fn with_console(
        config: Config,
        registry: Arc<Registry>,
        log: L,
        console: Console,
    ) -> Result<Notifier<L>, NotifyError> {
        Notifier::build(config, registry, log, console, false)
    }

    fn build(
        config: Config,
        registry: Arc<Registry>,
        log: L,
        console: Console,
        dry_run: bool,
    ) -> Result<Notifier<L>, NotifyError> {
        let renderer = Renderer::load(&config)?;
        let mut transports = Transports::build(&config, None, console)?;
        let mut recorder = Recorder::default();
        if dry_run {
            transports = transports.dry_run();
            recorder.set_dry_run();
        }
        let transports = Arc::new(transports);
        let inhibitors = Inhibitors::new(config.inhibit.clone());
        let mut n = Notifier {
            config: Arc::new(config),
            registry,
            log,
            renderer,
            transports,
            groups: Groups::default(),
            rotations: HashMap::new(),
            inhibitors,
            silences: Silences::default(),
            dedup: Dedup::default(),
            recorder,
            pruned_ms: None,
            orphaned: false,
        };
        n.restore()?;
        Ok(n)
    }

    /// Every attempt is also handed to `sink` (bounded; when it is full, records are
    /// dropped and counted), for the ClickHouse notifications table in full mode.
    pub fn with_attempt_sink(mut self, sink: mpsc::Sender<AttemptRecord>) -> Notifier<L> {
        self.recorder.set_sink(sink);
        self
    }

    /// Consults `shared` for facts this instance's log has never told: in a consumer group,
    /// another instance (the previous rotation evaluator, before partition 0 moved) may
    /// have. A fact delivered there counts as told then, so it is not sent again (but is
    /// repeated on its schedule); a fact queued there but never delivered is sent here.
    pub fn with_shared_log(mut self, shared: Arc<dyn SharedLog>) -> Notifier<L> {
        self.dedup.set_shared(shared);
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
    pub fn store(&self) -> &L {
        &self.log
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
        self.silences.refresh(&self.log, now_ms)?;
        for r in rotations {
            self.rotations.insert(r.old_key.clone(), r.clone());
        }
        let items = findings.into_iter().map(Item::from).collect();
        self.accept(items, now_ms, now_ms)?;
        self.flush(now_ms, false)
    }

    /// Flushes the groups whose time has come and sends (or retries) what is due.
    pub async fn tick(&mut self, now_ms: i64) -> Result<(), NotifyError> {
        self.silences.refresh(&self.log, now_ms)?;
        self.flush(now_ms, false)?;
        self.deliver(now_ms).await?;
        if self
            .pruned_ms
            .is_none_or(|t| now_ms.saturating_sub(t) >= 86_400_000)
        {
            self.pruned_ms = Some(now_ms);
            self.log.prune_before(now_ms - LOG_RETENTION_MS)?;
        }
        Ok(())
    }

    /// Flushes every group now, whatever its wait (quiet hours still hold), and sends once:
    /// the end of a one-shot run. What fails transiently stays queued for the next run.
    pub async fn drain(&mut self, now_ms: i64) -> Result<(), NotifyError> {
        self.silences.refresh(&self.log, now_ms)?;
        self.flush(now_ms, true)?;
        self.deliver(now_ms).await
    }

    /// When [`Notifier::tick`] has something to do next: a group to flush or a message to
    /// (re)try.
    pub fn next_wakeup_ms(&self) -> Result<Option<i64>, NotifyError> {
        let groups = self.groups.next_flush_ms();
        let messages = self.log.next_due_ms()?;
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
                Ok(Some(t)) => (t - now).clamp(0, REFRESH_MS),
                Ok(None) => REFRESH_MS,
                Err(e) => {
                    tracing::error!(error = %e, "notifier");
                    REFRESH_MS
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
        let recovered = self.log.recover(now)?;
        if !recovered.is_empty() {
            tracing::warn!(
                messages = recovered.len(),
                "keywatch stopped while sending; those messages are sent again"
            );
        }
        self.silences.refresh(&self.log, now)?;
        let rows = self.log.pending_all()?;
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
            .filter(|k| !self.groups.is_waiting(k))
            .collect();
        self.log.pending_remove(&stale)?;
        Ok(())
    }

    /// The first hold-back stage (inhibit, then silence) that holds `item` back: its counter.
    fn held_by(&self, item: &Item, raised_ms: i64, now_ms: i64) -> Option<&'static str> {
        let stages: [&dyn Hold; 2] = [&self.inhibitors, &self.silences];
        stages
            .into_iter()
            .find(|s| s.holds(item, raised_ms, now_ms))
            .map(|s| s.metric())
    }

    /// Inhibit, silence, route, dedup; what is left waits in its group (and in the log).
    fn accept(&mut self, items: Vec<Item>, raised_ms: i64, now_ms: i64) -> Result<(), NotifyError> {
        let config = self.config.clone();
        // Sources first: a safe_to_revoke holds back the reminders raised with it.
        self.inhibitors.note(&items, raised_ms);
        let mut rows = Vec::new();
        for item in items {
            if let Some(stage) = self.held_by(&item, raised_ms, now_ms) {
                metrics::counter!(stage).increment(1);
                tracing::debug!(finding = %item.dedup_key, counter = stage, "held back");
                continue;
            }
            let routes = route::matching(&config.routes, &item);
            if routes.is_empty() {
                tracing::debug!(finding = %item.dedup_key, "no route");
            }
            let mut told = Vec::new();
            for (ri, rname) in routes {
                let route = &config.routes[ri];
                // Nobody owns the key (an unknown key's burst, say): the operators hear of it
                // instead of a recipient nobody reads.
                let rname = match config.receivers.get(rname) {
                    Some(r) if r.owner && item.owner.is_none() => config.operators.as_str(),
                    _ => rname,
                };
                if told.contains(&rname) {
                    continue;
                }
                told.push(rname);
                let Some(receiver) = config.receivers.get(rname) else {
                    continue;
                };
                let recipient = recipient_of(receiver, item.owner.as_deref());
                let row = PendingRow {
                    recipient: recipient.clone(),
                    dedup_key: item.dedup_key.clone(),
                    raised_ms,
                    item: serde_json::to_string(&item).expect("an item serializes"),
                };
                if self.groups.refresh(&recipient, &item, raised_ms) {
                    // Waiting already: the group keeps the latest version of the fact.
                    rows.push(row);
                    continue;
                }
                let repeat = route
                    .repeat_ms
                    .unwrap_or_else(|| config.repeat.of(item.kind));
                let last = self
                    .dedup
                    .last_told(&self.log, &recipient, &item.dedup_key)?;
                let Some(repeated) = dedup::verdict(last, repeat, now_ms) else {
                    continue;
                };
                let gid = GroupId {
                    recipient,
                    receiver: rname.to_owned(),
                    route: ri,
                    values: route.group_values(&item),
                };
                let first_flush = raised_ms.saturating_add(route.group_wait_ms);
                let waiting = Waiting {
                    item: item.clone(),
                    raised_ms,
                    repeated,
                };
                self.groups.add(gid, waiting, first_flush);
                rows.push(row);
            }
        }
        self.log.pending_put(&rows)?;
        Ok(())
    }

    /// Turns the groups whose time has come (all with `force`) into queued messages.
    fn flush(&mut self, now_ms: i64, force: bool) -> Result<(), NotifyError> {
        for gid in self.groups.due(now_ms, force) {
            self.flush_group(&gid, now_ms)?;
        }
        self.groups.prune(now_ms);
        Ok(())
    }

    fn flush_group(&mut self, gid: &GroupId, now_ms: i64) -> Result<(), NotifyError> {
        let config = self.config.clone();
        let Some(receiver) = config.receivers.get(&gid.receiver) else {
            return Ok(());
        };
        let route = &config.routes[gid.route];
        let Some(waiting) = self.groups.take(gid) else {
            return Ok(());
        };
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
        let split = group::split(
            waiting,
            |w| self.held_by(&w.item, w.raised_ms, now_ms).is_some(),
            quiet_until.map(|(q, _)| q.except),
        );
        let dropped: Vec<(String, String)> = split
            .dropped
            .into_iter()
            .map(|k| (gid.recipient.clone(), k))
            .collect();
        for k in &dropped {
            self.groups.forget(k);
        }
        self.log.pending_remove(&dropped)?;
        let (hold, send) = (split.hold, split.send);
        if !send.is_empty() {
            let to = Audience {
                gid,
                receiver,
                owner,
                tz,
            };
            let messages =
                self.renderer
                    .compose(&config, &self.registry, &self.rotations, &to, &send, now_ms);
            let told: Vec<(String, String)> = send
                .iter()
                .map(|w| (gid.recipient.clone(), w.item.dedup_key.clone()))
                .collect();
            if let Err(e) = self.log.enqueue(&messages, &told, now_ms) {
                // Nothing was queued: the findings wait on for the next flush.
                self.groups.put_back(gid, hold.into_values().chain(send));
                return Err(e.into());
            }
            for k in told {
                self.groups.forget(&k);
                self.dedup.told(k, now_ms);
            }
        }
        self.groups.flushed(
            gid,
            hold,
            !send.is_empty(),
            route.group_interval_ms,
            quiet_until.map(|(_, u)| u),
            now_ms,
        );
        Ok(())
    }

    /// Sends every message due at `now_ms`, `retry.parallel` at a time, and records each
    /// attempt.
    async fn deliver(&mut self, now_ms: i64) -> Result<(), NotifyError> {
        if self.orphaned {
            // The last round stopped on an error with attempts marked as started: none is
            // in flight any more, so they go back to the queue like after a restart.
            self.log.recover(now_ms)?;
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
        // A failure for good raises notification_failed, which may be due at once: one more
        // round sends it.
        for _round in 0..2 {
            let mut failures = Vec::new();
            let recorder = &self.recorder;
            panicked |= deliver::deliver_due(
                &mut self.log,
                &self.transports,
                &self.config.retry,
                now_ms,
                |log, ended| {
                    recorder.record(log, ended);
                    if let AttemptEnd::Failed { detail, .. } = ended.end {
                        if record::tells_failure(ended.message) {
                            let findings = log.message_findings(&ended.message.id)?;
                            failures.push(record::failure_item(
                                ended.message,
                                &findings,
                                detail,
                                now_ms,
                            ));
                        }
                    }
                    Ok(())
                },
            )
            .await?;
            if failures.is_empty() {
                break;
            }
            self.accept(failures, now_ms, now_ms)?;
            self.flush(now_ms, false)?;
        }
        Ok(panicked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::{FindingKind, Severity};
    use crate::notify::silence::{silence_add, Matcher};

    const ROUTES: &str = "[channels.out]\ntype = \"console\"\n\
        [receivers.owner]\nowner = true\nchannels = [\"out\"]\n\
        [[routes]]\nreceivers = [\"owner\"]\ngroup_by = [\"owner\"]\ngroup_wait = \"30s\"\n";
    const KEYS: &str = "[owners.acme]\n[[keys]]\nid = \"k1\"\nowner = \"acme\"\n\
        [[keys]]\nid = \"k2\"\nowner = \"acme\"\n";

    fn used(key: &str, ip: &str, at_ms: i64) -> Finding {
        Finding {
            kind: FindingKind::RevokedKeyUsed,
            key_id: key.into(),
            owner: Some("acme".into()),
            at_ms,
            severity: Severity::Critical,
            summary: format!("revoked key {key} used from {ip}"),
            evidence: serde_json::json!({"ip": ip}),
            dedup_key: format!("revoked_key_used:{key}:{ip}"),
        }
    }

    #[tokio::test]
    async fn findings_wait_for_company_go_out_once_and_silences_hold_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::parse("routes.toml", ROUTES).unwrap();
        let registry = Arc::new(Registry::parse("keys.toml", KEYS).unwrap());
        let (console, out) = Console::capture();
        let log = SqliteStore::open(dir.path()).unwrap();
        let mut n = Notifier::with_console(config, registry, log, console).unwrap();
        let t0 = 1_795_132_800_000;
        let sent = || out.lock().unwrap().clone();

        n.take(
            vec![used("k1", "10.0.0.1", t0), used("k1", "10.0.0.2", t0)],
            &[],
            t0,
        )
        .unwrap();
        assert_eq!(n.next_wakeup_ms().unwrap(), Some(t0 + 30_000));
        n.tick(t0 + 29_999).await.unwrap();
        assert!(sent().is_empty(), "group_wait holds the first message");
        n.tick(t0 + 30_000).await.unwrap();
        assert_eq!(sent().len(), 1, "one message for the group");
        assert!(sent()[0].contains("10.0.0.1") && sent()[0].contains("10.0.0.2"));
        assert_eq!(
            n.store().notify_messages(i64::MIN).unwrap()[0].state,
            "sent"
        );

        // Told once: raised again a day later, it is not repeated (never for this kind).
        n.handle(vec![used("k1", "10.0.0.1", t0)], &[], t0 + 86_400_000)
            .await
            .unwrap();
        n.drain(t0 + 86_400_000).await.unwrap();
        assert_eq!(sent().len(), 1);

        // A silence set from another connection (the CLI) holds back k2, not k1.
        let mut cli = SqliteStore::open(dir.path()).unwrap();
        let until = t0 + 3 * 86_400_000;
        silence_add(&mut cli, &Matcher::Key("k2".into()), until, "", t0).unwrap();
        let later = t0 + 2 * 86_400_000;
        let found = vec![used("k2", "10.0.0.3", later), used("k1", "10.0.0.4", later)];
        n.take(found, &[], later).unwrap();
        n.drain(later).await.unwrap();
        assert_eq!(sent().len(), 2);
        assert!(sent()[1].contains("10.0.0.4") && !sent()[1].contains("10.0.0.3"));
    }

    #[tokio::test]
    async fn a_restart_puts_waiting_findings_back_in_their_groups() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::parse("routes.toml", ROUTES).unwrap();
        let registry = Arc::new(Registry::parse("keys.toml", KEYS).unwrap());
        let t0 = 1_795_132_800_000;
        let log = SqliteStore::open(dir.path()).unwrap();
        let mut n = Notifier::new(config.clone(), registry.clone(), log).unwrap();
        n.take(vec![used("k1", "10.0.0.1", t0)], &[], t0).unwrap();
        drop(n);
        let (console, out) = Console::capture();
        let log = SqliteStore::open(dir.path()).unwrap();
        let mut n = Notifier::with_console(config, registry, log, console).unwrap();
        assert_eq!(
            n.next_wakeup_ms().unwrap(),
            Some(t0 + 30_000),
            "its original time"
        );
        n.tick(t0 + 30_000).await.unwrap();
        assert_eq!(out.lock().unwrap().len(), 1);
    }
    fn burst(ip: &str, at_ms: i64) -> Finding {
        Finding {
            kind: FindingKind::UnknownKeyBurst,
            key_id: "-".into(),
            owner: None,
            at_ms,
            severity: Severity::Warning,
            summary: format!("40 unknown keys from {ip}"),
            evidence: serde_json::json!({"ip": ip}),
            dedup_key: format!("unknown_key_burst:{ip}"),
        }
    }

    /// Who was told of an owner-less burst under `routes`.
    async fn burst_recipients(routes: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::parse("routes.toml", routes).unwrap();
        let registry = Arc::new(Registry::parse("keys.toml", KEYS).unwrap());
        let (console, _out) = Console::capture();
        let log = SqliteStore::open(dir.path()).unwrap();
        let mut n = Notifier::with_console(config, registry, log, console).unwrap();
        let t0 = 1_795_132_800_000;
        n.handle(vec![burst("203.0.113.9", t0)], &[], t0)
            .await
            .unwrap();
        n.drain(t0 + 3_600_000).await.unwrap();
        let mut who: Vec<String> = n
            .store()
            .notify_messages(i64::MIN)
            .unwrap()
            .into_iter()
            .map(|m| m.recipient)
            .collect();
        who.sort();
        who
    }

    #[tokio::test]
    async fn findings_nobody_owns_go_to_the_operators_not_to_an_owner_called_dash() {
        // The built-in routes (everything to the owner): the built-in operators receiver.
        assert_eq!(burst_recipients("").await, ["team:operators"]);
        // A routes file with an `operations` team: that team, once, although the owner
        // receiver and operations both match.
        let ops = "[receivers.operations]\n[[routes]]\nreceivers = [\"owner\", \"operations\"]\n";
        assert_eq!(burst_recipients(ops).await, ["team:operations"]);
        // Named explicitly; the owner receiver still hears of owned findings.
        let named = "[defaults]\noperators = \"security\"\n[receivers.security]\n\
            [[routes]]\nreceivers = [\"owner\"]\n";
        assert_eq!(burst_recipients(named).await, ["team:security"]);
    }

    #[test]
    fn operators_must_name_a_team_receiver() {
        let err = Config::parse("routes.toml", "[defaults]\noperators = \"nobody\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("routes.toml")
                && err.contains("defaults.operators")
                && err.contains("undefined receiver `nobody`"),
            "{err}"
        );
        let err = Config::parse("routes.toml", "[defaults]\noperators = \"owner\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("is an owner receiver"), "{err}");
    }
}
