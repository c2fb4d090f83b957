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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc::Sender;
use tokio_util::sync::CancellationToken;

use super::{Batch, InFlight, PartitionOffset, Position};
use crate::store::StoreError;

/// `(topic, partition)`.
pub type TopicPartition = (String, i32);

/// How long a revocation waits for batches in flight before giving the partitions away.
const REVOKE_WAIT: Duration = Duration::from_secs(120);

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
    cancel: CancellationToken,
    /// The partition that makes its owner the group's evaluator (see [`KafkaSource::leader`]).
    leader_partition: TopicPartition,
    leader: Arc<AtomicBool>,
}

impl ClientContext for Context {
    fn error(&self, error: KafkaError, reason: &str) {
        metrics::counter!("keywatch_kafka_errors_total").increment(1);
        tracing::warn!(%error, reason, "kafka client error");
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
        let partitions: Vec<TopicPartition> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let recovered = self.recover(&partitions);
                let mut expected = self.expected.lock().unwrap_or_else(|e| e.into_inner());
                for (tp, offset) in &recovered {
                    if let Err(e) = tpl.set_partition_offset(&tp.0, tp.1, Offset::Offset(*offset)) {
                        tracing::error!(topic = %tp.0, partition = tp.1, error = %e, "cannot set the start offset");
                    }
                    expected.insert(tp.clone(), *offset);
                }
                drop(expected);
                if partitions.contains(&self.leader_partition) {
                    self.leader.store(true, Ordering::SeqCst);
                }
                tracing::info!(
                    partitions = ?partitions,
                    resumed = recovered.len(),
                    leader = self.leader.load(Ordering::SeqCst),
                    "partitions assigned"
                );
                if let Err(e) = consumer.assign(tpl) {
                    tracing::error!(error = %e, "assigning partitions failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if !self.in_flight.wait_idle(REVOKE_WAIT) {
                    tracing::error!(
                        in_flight = self.in_flight.count(),
                        "batches still being stored after {REVOKE_WAIT:?}; giving the partitions away"
                    );
                }
                let mut expected = self.expected.lock().unwrap_or_else(|e| e.into_inner());
                for tp in &partitions {
                    expected.remove(tp);
                }
                drop(expected);
                if partitions.contains(&self.leader_partition) {
                    self.leader.store(false, Ordering::SeqCst);
                }
                tracing::info!(partitions = ?partitions, "partitions revoked");
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "unassigning partitions failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error");
                self.leader.store(false, Ordering::SeqCst);
                let _ = consumer.unassign();
            }
        }
    }
}

impl Context {
    /// Asks the store where to start, retrying while it is unavailable: starting anywhere
    /// else could count events twice.
    fn recover(&self, partitions: &[TopicPartition]) -> HashMap<TopicPartition, i64> {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.offsets.recover(&self.source, partitions) {
                Ok(found) => return found,
                Err(e) if self.cancel.is_cancelled() => {
                    tracing::warn!(error = %e, "cannot read stored offsets while shutting down");
                    return HashMap::new();
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot read stored offsets, retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

/// A running Kafka source.
pub struct KafkaSource {
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    leader: Arc<AtomicBool>,
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
        let context = Context {
            leader_partition: (settings.topics.first().cloned().unwrap_or_default(), 0),
            leader: leader.clone(),
            source: settings.source_id(),
            offsets,
            in_flight: in_flight.clone(),
            generation: AtomicU64::new(0),
            expected: Default::default(),
            cancel: cancel.clone(),
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
        let consumer: StreamConsumer<Context> = config
            .create_with_context(context)
            .map_err(|e| anyhow::anyhow!("creating the Kafka consumer: {e}"))?;
        let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| anyhow::anyhow!("subscribing to {topics:?}: {e}"))?;
        let consumer = Arc::new(consumer);
        let task = tokio::spawn(consume(consumer, settings, in_flight, tx, cancel));
        Ok(KafkaSource { task, leader })
    }

    /// True while this instance owns partition 0 of the first topic. Exactly one member of
    /// the group does at a time (partitions are revoked before they are given to another),
    /// so the work that must be done once per group, not once per instance (evaluating
    /// rotations over the shared store, and the reminders that follow), is done by it.
    pub fn leader(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.leader)
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
    fn new() -> Self {
        Pending {
            batch: Batch::default(),
            next: HashMap::new(),
            started: None,
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
    let mut pending = Pending::new();
    let mut generation = consumer.context().generation.load(Ordering::SeqCst);
    loop {
        let deadline = pending
            .started
            .map(|s| tokio::time::Instant::from_std(s + settings.max_wait));
        let received = tokio::select! {
            _ = cancel.cancelled() => break,
            _ = async { tokio::time::sleep_until(deadline.unwrap()).await }, if deadline.is_some() => None,
            m = consumer.recv() => Some(m),
        };
        // A rebalance happened inside recv(): what was being collected may belong to
        // partitions this instance no longer owns. It was not stored, so dropping it is safe.
        let now_generation = consumer.context().generation.load(Ordering::SeqCst);
        if now_generation != generation {
            generation = now_generation;
            if !pending.batch.is_empty() {
                tracing::debug!(
                    lines = pending.batch.len(),
                    "dropping a partial batch at rebalance"
                );
            }
            pending = Pending::new();
        }
        match received {
            None => {}
            Some(Err(e)) => {
                metrics::counter!("keywatch_kafka_errors_total").increment(1);
                tracing::warn!(error = %e, "kafka receive error");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Some(Ok(msg)) => {
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
                if expected.is_some_and(|e| offset < e) || already_in_batch {
                    metrics::counter!("keywatch_kafka_skipped_total").increment(1);
                    continue;
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
        let full = pending.batch.len() >= settings.max_messages;
        let due = pending
            .started
            .is_some_and(|s| s.elapsed() >= settings.max_wait);
        if !pending.batch.is_empty() && (full || due) {
            let Pending {
                mut batch, next, ..
            } = std::mem::replace(&mut pending, Pending::new());
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
            {
                let mut expected = consumer
                    .context()
                    .expected
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                for (tp, offset) in next {
                    expected.insert(tp, offset);
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                sent = tx.send(batch) => if sent.is_err() { break },
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
