//! The Kafka source: a consumer-group member that hands out batches of messages.
//!
//! Checkpoint contract (see [`super`]): the store, not Kafka, is the source of truth for
//! what has been consumed. Each batch carries, per partition, the offset after its last
//! message; the store commits it with the batch's effect. When partitions are assigned
//! (at start and at every rebalance) the consumer asks the store for those offsets
//! ([`OffsetStore::recover`]), which also lets a store without transactions clean up a batch
//! it wrote but never committed, and starts each partition exactly there. Offsets are also
//! stored with the consumer after each commit (`enable.auto.offset.store=false`), so that
//! Kafka's lag tools see progress, but they are only used for partitions the store knows
//! nothing about.
//!
//! Rebalances: before partitions are revoked, the consumer waits until every batch it
//! handed out has been committed or dropped ([`super::InFlight`]) and discards the batch it
//! was filling; so the next owner of a partition never races a write from this instance.
//! Both of librdkafka's rebalance protocols work: eager (`range`, `roundrobin`: every
//! rebalance revokes and reassigns everything) and cooperative (`cooperative-sticky`, and
//! KIP-848's `group.protocol = consumer`: only the partitions that move are revoked or
//! assigned, with `incremental_assign`/`incremental_unassign`). A partition kept across a
//! cooperative rebalance is sought back to the start of the discarded batch, since it is not
//! reassigned (also one whose first messages ever were in that batch: the first offset read
//! of a partition the store knows nothing of is where it is expected to start).
//!
//! The rebalance callback runs inside the consumer's poll, so it is bounded by a budget
//! derived from `max.poll.interval.ms` (past that librdkafka would leave the group): the
//! wait for batches in flight and the store's recovery each get a share. If the store cannot
//! say where to start within its share, the partitions are assigned paused and the consume
//! loop keeps asking the store; each starts (a seek, then resume) once it has answered, and
//! nothing is read from it before. If the revocation's wait expired with batches still being
//! stored, no partition's start is read from the store until those batches are finished
//! with, since their commit is about to move it.
//!
//! Partition changes: every assignment and revocation is also recorded in
//! [`PartitionChanges`] for the pipeline, which warms up the anomaly models of the keys of
//! assigned partitions and drops those of revoked ones on its own thread: nothing of it runs
//! in the callback. An assignment is recorded before any of its messages is read.
//!
//! Backpressure: the consume loop never blocks on a full pipeline (a slow or unreachable
//! store), because a member that stops polling for `max.poll.interval.ms` is put out of the
//! group, and the rebalance callbacks only run while it polls. It pauses its partitions
//! instead, goes on polling, and resumes them when the pipeline has room.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc::Sender;
use tokio_util::sync::CancellationToken;

use super::{Batch, BufferPool, InFlight, PartitionOffset, Position};
use crate::store::StoreError;

/// `(topic, partition)`.
pub type TopicPartition = (String, i32);

/// A change of the partitions this member holds, as the rebalance callback saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionChange {
    Assigned(Vec<TopicPartition>),
    Revoked(Vec<TopicPartition>),
}

/// The partition changes not yet taken, in order: the pipeline keeps the anomaly models of
/// this member's keys only ([`KafkaSource::partition_changes`]). An assignment is recorded
/// before any message of it is read, so a batch holding its messages reaches the pipeline
/// after it; a revocation after the batches in flight were stored.
#[derive(Debug, Default)]
pub struct PartitionChanges(std::sync::Mutex<Vec<PartitionChange>>);

impl PartitionChanges {
    pub fn push(&self, change: PartitionChange) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(change);
    }

    /// The changes since the last call, oldest first.
    pub fn take(&self) -> Vec<PartitionChange> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// How long a revocation waits for batches in flight before giving the partitions away
/// (at most; see [`CallbackBudget`]).
const REVOKE_WAIT: Duration = Duration::from_secs(120);

/// librdkafka's default `max.poll.interval.ms`.
const DEFAULT_MAX_POLL_INTERVAL: Duration = Duration::from_secs(300);

/// How long the rebalance callback may block: it runs inside the consumer's poll, and a poll
/// interval longer than `max.poll.interval.ms` makes librdkafka leave the group.
#[derive(Clone, Copy, Debug)]
struct CallbackBudget {
    /// For the batches in flight to be stored before revoked partitions are given away.
    revoke_wait: Duration,
    /// For the store to say where assigned partitions start; after that they start paused
    /// and the consume loop goes on asking.
    recover: Duration,
}

impl CallbackBudget {
    fn from_max_poll_interval(max_poll: Duration) -> Self {
        CallbackBudget {
            revoke_wait: (max_poll / 2).min(REVOKE_WAIT),
            recover: (max_poll / 4).min(Duration::from_secs(20)),
        }
    }
}

/// Where committed offsets are read back from.
pub trait OffsetStore: Send + Sync + 'static {
    /// The next offset to read for each of `partitions` that the store has committed data
    /// for. A store that cannot write atomically also removes here whatever an uncommitted
    /// batch left behind in these partitions.
    fn recover(
        &self,
        source: &str,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, i64>, StoreError>;
}

/// Settings of the Kafka source (validated in [`crate::config`]).
#[derive(Clone)]
pub struct KafkaSettings {
    /// librdkafka properties, `bootstrap.servers` and `group.id` included; may hold secrets.
    pub properties: Vec<(String, String)>,
    pub topics: Vec<String>,
    pub group_id: String,
    pub max_messages: usize,
    /// A batch is sent once its payloads reach this many bytes (or `max_messages`).
    pub max_bytes: usize,
    pub max_wait: Duration,
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.properties.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("KafkaSettings")
            .field("properties", &names)
            .field("topics", &self.topics)
            .field("group_id", &self.group_id)
            .finish_non_exhaustive()
    }
}

impl KafkaSettings {
    /// The name under which this consumer group's offsets are stored.
    pub fn source_id(&self) -> String {
        format!("kafka:{}", self.group_id)
    }

    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

struct Context {
    source: String,
    offsets: Arc<dyn OffsetStore>,
    in_flight: Arc<InFlight>,
    /// Bumped at every rebalance, so that the consume loop drops the batch it was filling.
    generation: AtomicU64,
    /// Per assigned partition, the next offset keywatch expects; anything older is a
    /// message already stored (librdkafka may still deliver prefetched ones).
    expected: std::sync::Mutex<HashMap<TopicPartition, i64>>,
    /// Assigned partitions the store has not yet said where to start (assigned paused);
    /// nothing is read from them until it has.
    recovering: std::sync::Mutex<Vec<TopicPartition>>,
    /// Set when a revocation gave partitions away while batches were still being stored:
    /// the last of those batches. Until they are finished with, the store's offsets may be
    /// about to move, so no partition's start is read from it (they wait, paused).
    stale_through: std::sync::Mutex<Option<u64>>,
    cancel: CancellationToken,
    /// The partition that makes its owner the group's evaluator (see [`KafkaSource::leader`]).
    leader_partition: TopicPartition,
    leader: Arc<AtomicBool>,
    /// Set at the first assignment the group hands this member (even an empty one).
    assigned: Arc<AtomicBool>,
    changes: Arc<PartitionChanges>,
    budget: CallbackBudget,
}

impl ClientContext for Context {
    fn error(&self, error: KafkaError, reason: &str) {
        metrics::counter!("keywatch_kafka_errors_total").increment(1);
        tracing::warn!(%error, reason, "kafka client error");
    }

    /// librdkafka's statistics (every `statistics.interval.ms`): the consumer lag of this
    /// member's partitions, per topic (high watermark minus the committed offset, which
    /// keywatch commits only after a batch is stored: messages not yet stored).
    fn stats(&self, stats: rdkafka::Statistics) {
        for (name, topic) in &stats.topics {
            let lag: i64 = topic
                .partitions
                .iter()
                // -1 is librdkafka's internal "unassigned" partition; a lag of -1 is unknown.
                .filter(|(p, part)| **p >= 0 && part.consumer_lag >= 0)
                .map(|(_, part)| part.consumer_lag)
                .sum();
            metrics::gauge!("keywatch_kafka_consumer_lag", "topic" => name.clone()).set(lag as f64);
        }
    }
}

impl ConsumerContext for Context {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        metrics::counter!("keywatch_kafka_rebalances_total").increment(1);
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let partitions: Vec<TopicPartition> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let recovered = if self.stale_batches_pending() {
                    tracing::warn!(
                        "batches handed out before a revocation are still being stored; the partitions wait, paused"
                    );
                    None
                } else {
                    self.recover(&partitions, self.budget.recover)
                };
                if let Some(recovered) = &recovered {
                    let mut expected = self.expected.lock().unwrap_or_else(|e| e.into_inner());
                    for (tp, offset) in recovered {
                        if let Err(e) =
                            tpl.set_partition_offset(&tp.0, tp.1, Offset::Offset(*offset))
                        {
                            tracing::error!(topic = %tp.0, partition = tp.1, error = %e, "cannot set the start offset");
                        }
                        expected.insert(tp.clone(), *offset);
                    }
                } else {
                    self.recovering
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend(partitions.iter().cloned());
                }
                if partitions.contains(&self.leader_partition) {
                    self.leader.store(true, Ordering::SeqCst);
                }
                self.assigned.store(true, Ordering::SeqCst);
                self.changes
                    .push(PartitionChange::Assigned(partitions.clone()));
                tracing::info!(
                    partitions = ?partitions,
                    resumed = recovered.as_ref().map_or(0, HashMap::len),
                    deferred = recovered.is_none(),
                    cooperative,
                    leader = self.leader.load(Ordering::SeqCst),
                    "partitions assigned"
                );
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = assigned {
                    tracing::error!(error = %e, "assigning partitions failed");
                }
                if recovered.is_none() {
                    if let Err(e) = consumer.pause(tpl) {
                        tracing::error!(error = %e, "pausing partitions whose start is unknown");
                    }
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if !self.in_flight.wait_idle(self.budget.revoke_wait) {
                    *self.stale_through.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(self.in_flight.issued());
                    tracing::error!(
                        in_flight = self.in_flight.count(),
                        "batches still being stored after {:?}; giving the partitions away",
                        self.budget.revoke_wait
                    );
                }
                self.forget(&partitions);
                self.changes
                    .push(PartitionChange::Revoked(partitions.clone()));
                tracing::info!(partitions = ?partitions, cooperative, "partitions revoked");
                let unassigned = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = unassigned {
                    tracing::error!(error = %e, "unassigning partitions failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error");
                self.forget(&partitions);
                self.changes
                    .push(PartitionChange::Revoked(partitions.clone()));
                self.leader.store(false, Ordering::SeqCst);
                let _ = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
            }
        }
    }
}

impl Context {
    /// Asks the store where to start, retrying while it is unavailable, for at most `budget`
    /// (`None` after that): starting anywhere else could count events twice.
    fn recover(
        &self,
        partitions: &[TopicPartition],
        budget: Duration,
    ) -> Option<HashMap<TopicPartition, i64>> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(200);
        loop {
            match self.offsets.recover(&self.source, partitions) {
                Ok(found) => return Some(found),
                Err(e) if self.cancel.is_cancelled() => {
                    tracing::warn!(error = %e, "cannot read stored offsets while shutting down");
                    return Some(HashMap::new());
                }
                Err(e) if start.elapsed() + delay > budget => {
                    tracing::warn!(error = %e, "cannot read stored offsets; the partitions wait, paused");
                    return None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot read stored offsets, retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// Drops what is known about partitions this instance no longer owns.
    fn forget(&self, partitions: &[TopicPartition]) {
        let mut expected = self.expected.lock().unwrap_or_else(|e| e.into_inner());
        for tp in partitions {
            expected.remove(tp);
        }
        drop(expected);
        self.recovering
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|tp| !partitions.contains(tp));
        if partitions.contains(&self.leader_partition) {
            self.leader.store(false, Ordering::SeqCst);
        }
    }

    /// True while batches handed out before a timed-out revocation are being stored.
    fn stale_batches_pending(&self) -> bool {
        let mut stale = self.stale_through.lock().unwrap_or_else(|e| e.into_inner());
        match *stale {
            Some(seq) if !self.in_flight.drained_through(seq) => true,
            Some(_) => {
                *stale = None;
                false
            }
            None => false,
        }
    }

    fn is_recovering(&self, tp: &TopicPartition) -> bool {
        self.recovering
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(tp)
    }
}

/// `max.poll.interval.ms` as configured, or librdkafka's default.
fn max_poll_interval(settings: &KafkaSettings) -> Duration {
    settings
        .properties
        .iter()
        .find(|(k, _)| k == "max.poll.interval.ms")
        .and_then(|(_, v)| v.parse().ok())
        .map_or(DEFAULT_MAX_POLL_INTERVAL, Duration::from_millis)
}

/// A running Kafka source.
pub struct KafkaSource {
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    leader: Arc<AtomicBool>,
    assigned: Arc<AtomicBool>,
    changes: Arc<PartitionChanges>,
}

impl KafkaSource {
    /// Creates the consumer, subscribes, and starts the consume loop.
    pub fn spawn(
        settings: KafkaSettings,
        offsets: Arc<dyn OffsetStore>,
        tx: Sender<Batch>,
        cancel: CancellationToken,
    ) -> anyhow::Result<KafkaSource> {
        let in_flight = Arc::new(InFlight::default());
        let leader = Arc::new(AtomicBool::new(false));
        let assigned = Arc::new(AtomicBool::new(false));
        let changes = Arc::new(PartitionChanges::default());
        let context = Context {
            changes: changes.clone(),
            leader_partition: (settings.topics.first().cloned().unwrap_or_default(), 0),
            leader: leader.clone(),
            assigned: assigned.clone(),
            source: settings.source_id(),
            offsets,
            in_flight: in_flight.clone(),
            generation: AtomicU64::new(0),
            expected: Default::default(),
            recovering: Default::default(),
            stale_through: Default::default(),
            cancel: cancel.clone(),
            budget: CallbackBudget::from_max_poll_interval(max_poll_interval(&settings)),
        };
        let mut config = settings.client_config();
        config
            .set("group.id", &settings.group_id)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false");
        if config.get("auto.offset.reset").is_none() {
            config.set("auto.offset.reset", "earliest");
        }
        // keywatch_kafka_consumer_lag comes from librdkafka's statistics.
        if config.get("statistics.interval.ms").is_none() {
            config.set("statistics.interval.ms", "15000");
        }
        let consumer: StreamConsumer<Context> = config
            .create_with_context(context)
            .map_err(|e| anyhow::anyhow!("creating the Kafka consumer: {e}"))?;
        let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| anyhow::anyhow!("subscribing to {topics:?}: {e}"))?;
        let consumer = Arc::new(consumer);
        let task = tokio::spawn(consume(consumer, settings, in_flight, tx, cancel));
        Ok(KafkaSource {
            task,
            leader,
            assigned,
            changes,
        })
    }

    /// Set once the group has handed this member its partitions (possibly none: a member
    /// beyond the partition count stands by). `/readyz` waits for it.
    pub fn assigned(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.assigned)
    }

    /// True while this instance owns partition 0 of the first topic. Exactly one member of
    /// the group does at a time (partitions are revoked before they are given to another),
    /// so the work that must be done once per group, not once per instance (evaluating
    /// rotations over the shared store, and the reminders that follow), is done by it.
    pub fn leader(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.leader)
    }

    /// The partitions assigned to and revoked from this member, for the pipeline.
    pub fn partition_changes(&self) -> Arc<PartitionChanges> {
        Arc::clone(&self.changes)
    }

    pub async fn join(self) -> anyhow::Result<()> {
        self.task.await?
    }
}

struct Pending {
    batch: Batch,
    next: HashMap<TopicPartition, i64>,
    started: Option<Instant>,
}

impl Pending {
    /// `pool`: where the batch's line buffer comes from and goes back to.
    fn new(pool: &BufferPool) -> Self {
        Pending {
            batch: pool.batch(),
            next: HashMap::new(),
            started: None,
        }
    }

    /// Ready to be handed to the pipeline: full, or its first message waited `max_wait`.
    fn ready(&self, settings: &KafkaSettings) -> bool {
        !self.batch.is_empty()
            && (self.batch.len() >= settings.max_messages
                || self.batch.buf.len() >= settings.max_bytes
                || self
                    .started
                    .is_some_and(|s| s.elapsed() >= settings.max_wait))
    }

    /// Past twice a full batch: while the pipeline is full, only messages fetched before
    /// the pause can still arrive, and past this they are sent back to Kafka (a seek).
    fn over_bound(&self, settings: &KafkaSettings) -> bool {
        self.batch.len() >= settings.max_messages.saturating_mul(2)
            || self.batch.buf.len() >= settings.max_bytes.saturating_mul(2)
    }
}

/// What woke the consume loop.
enum Woke<'a, M> {
    Nothing,
    Message(M),
    /// The pipeline has room for the batch being held back.
    Room(tokio::sync::mpsc::Permit<'a, Batch>),
}

/// Backpressure without leaving the group: when the pipeline's channel is full (the store
/// is slow or down), the consume loop does not block on it, since the rebalance callbacks
/// and librdkafka's `max.poll.interval.ms` both need it to go on polling. It pauses every
/// assigned partition instead, keeps polling, and resumes them when the channel has room.
#[derive(Default)]
struct Backpressure {
    paused: bool,
    /// Partitions sought back to a message that arrived over [`Pending::over_bound`]; until
    /// that offset comes again, later ones (fetched before the seek) are skipped.
    held: HashMap<TopicPartition, i64>,
}

impl Backpressure {
    fn pause(&mut self, consumer: &StreamConsumer<Context>) {
        if self.paused {
            return;
        }
        self.paused = true;
        metrics::counter!("keywatch_kafka_backpressure_pauses_total").increment(1);
        tracing::debug!("the pipeline is full; pausing the assigned partitions and polling on");
        match consumer.assignment() {
            Ok(tpl) => {
                if let Err(e) = consumer.pause(&tpl) {
                    tracing::warn!(error = %e, "pausing partitions while the pipeline is full");
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the assignment to pause it"),
        }
    }

    /// Resumes what [`Self::pause`] paused; partitions whose start the store has not yet
    /// given stay paused ([`start_recovered`] resumes them).
    fn resume(&mut self, consumer: &StreamConsumer<Context>) {
        if !std::mem::take(&mut self.paused) {
            return;
        }
        let recovering = consumer
            .context()
            .recovering
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match consumer.assignment() {
            Ok(tpl) => {
                let mut running = TopicPartitionList::new();
                for e in tpl.elements() {
                    let tp = (e.topic().to_owned(), e.partition());
                    if !recovering.contains(&tp) {
                        running.add_partition(&tp.0, tp.1);
                    }
                }
                if let Err(e) = consumer.resume(&running) {
                    tracing::warn!(error = %e, "resuming partitions after the pipeline drained");
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the assignment to resume it"),
        }
    }

    /// Sends `tp` back to `offset` (nothing from it is kept).
    fn hold(&mut self, consumer: &StreamConsumer<Context>, tp: TopicPartition, offset: i64) {
        if let Err(e) = consumer.seek(&tp.0, tp.1, Offset::Offset(offset), Duration::ZERO) {
            tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "seeking back a message the full pipeline cannot take");
        }
        self.held.insert(tp, offset);
    }

    /// False for a message fetched before [`Self::hold`]'s seek.
    fn admits(&mut self, tp: &TopicPartition, offset: i64) -> bool {
        match self.held.get(tp) {
            Some(o) if *o == offset => {
                self.held.remove(tp);
                true
            }
            Some(_) => false,
            None => true,
        }
    }
}

async fn consume(
    consumer: Arc<StreamConsumer<Context>>,
    settings: KafkaSettings,
    in_flight: Arc<InFlight>,
    tx: Sender<Batch>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let topic_names: Vec<Arc<str>> = settings
        .topics
        .iter()
        .map(|t| Arc::from(t.as_str()))
        .collect();
    let pool = BufferPool::default();
    let mut pending = Pending::new(&pool);
    let mut backpressure = Backpressure::default();
    let mut generation = consumer.context().generation.load(Ordering::SeqCst);
    let mut retry_recovery = tokio::time::interval(Duration::from_secs(1));
    retry_recovery.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let ready = pending.ready(&settings);
        let deadline = pending
            .started
            .filter(|_| !ready)
            .map(|s| tokio::time::Instant::from_std(s + settings.max_wait));
        // Always armed: partitions may be deferred by a rebalance inside recv(), which then
        // waits for messages that paused partitions never deliver.
        let woke = tokio::select! {
            _ = cancel.cancelled() => break,
            _ = async { tokio::time::sleep_until(deadline.unwrap()).await }, if deadline.is_some() => Woke::Nothing,
            _ = retry_recovery.tick() => {
                start_recovered(&consumer, &settings).await;
                Woke::Nothing
            }
            permit = tx.reserve(), if ready => match permit {
                Ok(permit) => Woke::Room(permit),
                Err(_) => break,
            },
            m = consumer.recv() => Woke::Message(m),
        };
        // A rebalance happened inside recv(): what was being collected may belong to
        // partitions this instance no longer owns. It was not stored, so dropping it is safe;
        // the partitions this instance keeps (a cooperative rebalance) are sought back to
        // where the dropped batch began, since they are not assigned again.
        let now_generation = consumer.context().generation.load(Ordering::SeqCst);
        if now_generation != generation {
            generation = now_generation;
            if !pending.batch.is_empty() {
                tracing::debug!(
                    lines = pending.batch.len(),
                    "dropping a partial batch at rebalance"
                );
                rewind_kept(&consumer, pending.next.keys());
            }
            pending = Pending::new(&pool);
            backpressure.held.clear();
            backpressure.resume(&consumer);
        }
        match woke {
            Woke::Nothing => {}
            Woke::Room(permit) => {
                if !pending.batch.is_empty() {
                    permit.send(cut(&mut pending, &pool, &consumer, &in_flight));
                }
                backpressure.resume(&consumer);
                continue;
            }
            Woke::Message(Err(e)) => {
                metrics::counter!("keywatch_kafka_errors_total").increment(1);
                tracing::warn!(error = %e, "kafka receive error");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Woke::Message(Ok(msg)) => {
                let tp = (msg.topic().to_owned(), msg.partition());
                let offset = msg.offset();
                let expected = consumer
                    .context()
                    .expected
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&tp)
                    .copied();
                let already_in_batch = pending.next.get(&tp).is_some_and(|n| offset < *n);
                if expected.is_some_and(|e| offset < e)
                    || already_in_batch
                    || consumer.context().is_recovering(&tp)
                    || !backpressure.admits(&tp, offset)
                {
                    metrics::counter!("keywatch_kafka_skipped_total").increment(1);
                    continue;
                }
                if pending.over_bound(&settings) {
                    backpressure.hold(&consumer, tp, offset);
                    continue;
                }
                if expected.is_none() {
                    // The first message of a partition the store knows nothing of (no
                    // batch of it stored or cut yet): where a batch dropped at a
                    // cooperative rebalance must be read again from. Without it, a kept
                    // partition would not be sought back, and its messages in the dropped
                    // batch would be skipped.
                    consumer
                        .context()
                        .expected
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(tp.clone())
                        .or_insert(offset);
                }
                let payload = msg.payload().unwrap_or_default();
                pending.batch.push_line(payload, offset as u64);
                pending.batch.partitions.push(tp.1);
                let topic = topic_names
                    .iter()
                    .find(|t| t.as_ref() == tp.0)
                    .cloned()
                    .unwrap_or_else(|| Arc::from(tp.0.as_str()));
                pending.batch.topics.push(topic);
                pending.next.insert(tp, offset + 1);
                pending.started.get_or_insert_with(Instant::now);
                metrics::counter!("keywatch_source_lines_total").increment(1);
            }
        }
        if pending.ready(&settings) {
            match tx.try_reserve() {
                Ok(permit) => {
                    permit.send(cut(&mut pending, &pool, &consumer, &in_flight));
                    backpressure.resume(&consumer);
                }
                Err(tokio::sync::mpsc::error::TrySendError::Full(())) => {
                    backpressure.pause(&consumer)
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(())) => break,
            }
        }
    }
    // Shutdown: let the pipeline finish what it has, then commit the stored offsets so that
    // Kafka's view of the group is current. (The store stays the source of truth.)
    drop(tx);
    let flights = in_flight.clone();
    let idle = tokio::task::spawn_blocking(move || flights.wait_idle(Duration::from_secs(30)))
        .await
        .unwrap_or(false);
    if idle {
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %e, "final offset commit");
        }
    }
    consumer.unsubscribe();
    Ok(())
}

/// Takes the pending batch to hand it to the pipeline: it carries the offsets to commit
/// with it and an in-flight guard (revocations wait for it), and the messages it holds are
/// from now on expected no more.
fn cut(
    pending: &mut Pending,
    pool: &BufferPool,
    consumer: &Arc<StreamConsumer<Context>>,
    in_flight: &Arc<InFlight>,
) -> Batch {
    let Pending {
        mut batch, next, ..
    } = std::mem::replace(pending, Pending::new(pool));
    let offsets: Vec<PartitionOffset> = next
        .iter()
        .map(|((topic, partition), offset)| PartitionOffset {
            topic: topic.clone(),
            partition: *partition,
            offset: *offset,
        })
        .collect();
    let ack_consumer = consumer.clone();
    let ack_offsets = offsets.clone();
    batch.on_commit = Some(Box::new(move || store_offsets(&ack_consumer, &ack_offsets)));
    batch.position = Some(Position::Kafka { offsets });
    batch.in_flight = Some(in_flight.guard());
    let mut expected = consumer
        .context()
        .expected
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    for (tp, offset) in next {
        expected.insert(tp, offset);
    }
    drop(expected);
    batch
}

/// Seeks each of `partitions` that this instance still owns back to the next offset it
/// expects (the first of a batch dropped at a rebalance).
fn rewind_kept<'a>(
    consumer: &StreamConsumer<Context>,
    partitions: impl Iterator<Item = &'a TopicPartition>,
) {
    let expected = consumer
        .context()
        .expected
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for tp in partitions {
        if let Some(offset) = expected.get(tp) {
            if let Err(e) = consumer.seek(&tp.0, tp.1, Offset::Offset(*offset), Duration::ZERO) {
                tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "seeking back after a rebalance");
            }
        }
    }
}

/// Asks the store again where the paused partitions start; those it answers for are sought
/// there (or to the group's committed offset, or per `auto.offset.reset`, when the store
/// knows nothing of them) and resumed.
async fn start_recovered(consumer: &Arc<StreamConsumer<Context>>, settings: &KafkaSettings) {
    let ctx = consumer.context();
    let partitions = ctx
        .recovering
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if partitions.is_empty() || ctx.stale_batches_pending() {
        return;
    }
    let offsets = Arc::clone(&ctx.offsets);
    let source = ctx.source.clone();
    let asked = partitions.clone();
    let found = match tokio::task::spawn_blocking(move || offsets.recover(&source, &asked)).await {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read stored offsets, retrying");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "reading stored offsets");
            return;
        }
    };
    let earliest = !matches!(
        settings
            .properties
            .iter()
            .find(|(k, _)| k == "auto.offset.reset")
            .map(|(_, v)| v.as_str()),
        Some("latest" | "largest" | "end")
    );
    for tp in partitions {
        let start = match found.get(&tp) {
            Some(o) => Offset::Offset(*o),
            None => committed(consumer, &tp).unwrap_or(if earliest {
                Offset::Beginning
            } else {
                Offset::End
            }),
        };
        // Still ours? A rebalance may have taken it meanwhile.
        let mut recovering = ctx.recovering.lock().unwrap_or_else(|e| e.into_inner());
        if !recovering.contains(&tp) {
            continue;
        }
        if let Err(e) = consumer.seek(&tp.0, tp.1, start, Duration::from_secs(5)) {
            tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "seeking a recovered partition, retrying");
            continue;
        }
        if let Offset::Offset(o) = start {
            ctx.expected
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(tp.clone(), o);
        }
        recovering.retain(|p| *p != tp);
        drop(recovering);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&tp.0, tp.1);
        if let Err(e) = consumer.resume(&tpl) {
            tracing::error!(topic = %tp.0, partition = tp.1, error = %e, "resuming a recovered partition");
        }
        tracing::info!(topic = %tp.0, partition = tp.1, ?start, "partition started after the store recovered");
    }
}

/// The group's committed offset for `tp`, if it has one.
fn committed(consumer: &StreamConsumer<Context>, tp: &TopicPartition) -> Option<Offset> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&tp.0, tp.1);
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .ok()?;
    got.elements()
        .first()
        .map(|e| e.offset())
        .filter(|o| matches!(o, Offset::Offset(_)))
}

fn store_offsets(consumer: &StreamConsumer<Context>, offsets: &[PartitionOffset]) {
    let mut tpl = TopicPartitionList::new();
    for o in offsets {
        if let Err(e) = tpl.add_partition_offset(&o.topic, o.partition, Offset::Offset(o.offset)) {
            tracing::warn!(error = %e, "building the offsets to store");
        }
    }
    // Fails harmlessly for a partition revoked meanwhile: the store has the truth.
    if let Err(e) = consumer.store_offsets(&tpl) {
        tracing::debug!(error = %e, "storing offsets with the consumer");
    }
}
