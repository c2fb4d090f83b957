//! Lifecycle events from Kafka: key created, rotation started, key revoked or expired (one
//! JSON object per message, schema in `rules/README.md`).
//!
//! Contract: every keywatch instance reads the whole topic, from its first message, at every
//! start: the registry is rebuilt from the file plus every event, in order per partition
//! (key the messages by key id, so that one key's events stay in order). No offsets are
//! committed: applying an event is idempotent ([`crate::registry::Registry::apply`]), so a
//! redelivery after a restart changes nothing. Keep the topic's retention long enough to
//! cover every key still in use, and do not compact it (compaction by key keeps a key's
//! last event only, and `key_revoked` alone names a key the registry may not know).
//!
//! The consumer runs on its own thread and hands raw messages to the detectors through a
//! bounded channel; once it has read every partition to the end it had at start, it sends
//! [`LifecycleMessage::CaughtUp`] in the same channel, so that whoever waits for it has
//! applied everything before. Parsing and applying happen in the detectors
//! ([`crate::daemon::lifecycle::RegistryFeed`]), which count and keep aside what they refuse.

use std::collections::HashMap;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc::Sender;
use tokio_util::sync::CancellationToken;

/// How long a metadata or watermark request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the topic's partitions are looked up again (new partitions are picked up).
const METADATA_EVERY: Duration = Duration::from_secs(60);

/// What the consumer hands to the detectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LifecycleMessage {
    /// One message, as read.
    Event {
        partition: i32,
        offset: i64,
        payload: Vec<u8>,
    },
    /// Every partition has been read up to where it ended when the consumer started.
    CaughtUp { events: u64 },
}

/// The consumer thread.
pub struct LifecycleConsumer {
    thread: JoinHandle<()>,
}

impl LifecycleConsumer {
    /// Starts reading `topic` from its beginning. `properties` are librdkafka properties
    /// (`bootstrap.servers` included; they may hold credentials and are never logged).
    pub fn spawn(
        properties: &[(String, String)],
        topic: &str,
        tx: Sender<LifecycleMessage>,
        cancel: CancellationToken,
    ) -> anyhow::Result<LifecycleConsumer> {
        let mut config = ClientConfig::new();
        for (k, v) in properties {
            config.set(k, v);
        }
        config
            // Required by librdkafka even without a group; nothing is committed under it.
            .set("group.id", "keywatch-lifecycle")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest");
        let consumer: BaseConsumer = config.create().context("creating the lifecycle consumer")?;
        let topic = topic.to_owned();
        let thread = std::thread::Builder::new()
            .name("keywatch-lifecycle".into())
            .spawn(move || consume(&consumer, &topic, &tx, &cancel))
            .context("starting the lifecycle consumer thread")?;
        Ok(LifecycleConsumer { thread })
    }

    /// Waits for the thread (after `cancel` fired, or the receiver was dropped).
    pub fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!("the lifecycle consumer thread panicked");
        }
    }
}

/// The topic's partitions, or why they cannot be had.
fn partitions(consumer: &BaseConsumer, topic: &str) -> Result<Vec<i32>, String> {
    let md = consumer
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(|e| e.to_string())?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Err("the broker does not list the topic".into());
    };
    if let Some(e) = t.error() {
        return Err(format!("{e:?}"));
    }
    let mut ps: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    ps.sort_unstable();
    if ps.is_empty() {
        return Err("the topic has no partitions".into());
    }
    Ok(ps)
}

fn consume(
    consumer: &BaseConsumer,
    topic: &str,
    tx: &Sender<LifecycleMessage>,
    cancel: &CancellationToken,
) {
    let mut assigned: Vec<i32> = Vec::new();
    // Per partition, the end offset to reach before saying "caught up", and the next offset.
    let mut targets: HashMap<i32, i64> = HashMap::new();
    let mut next: HashMap<i32, i64> = HashMap::new();
    let mut caught_up = false;
    let mut events = 0u64;
    let mut last_metadata: Option<Instant> = None;
    let mut warned = false;
    while !cancel.is_cancelled() {
        if last_metadata.is_none_or(|t| t.elapsed() >= METADATA_EVERY) {
            last_metadata = Some(Instant::now());
            match partitions(consumer, topic) {
                Ok(ps) if ps != assigned => {
                    let mut tpl = TopicPartitionList::new();
                    for p in &ps {
                        let at = next
                            .get(p)
                            .map_or(Offset::Beginning, |o| Offset::Offset(*o));
                        if let Err(e) = tpl.add_partition_offset(topic, *p, at) {
                            tracing::warn!(error = %e, partition = p, "lifecycle topic");
                        }
                    }
                    if let Err(e) = consumer.assign(&tpl) {
                        tracing::warn!(error = %e, topic, "cannot read the lifecycle topic");
                        last_metadata = None;
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                    if !caught_up {
                        for p in &ps {
                            if targets.contains_key(p) {
                                continue;
                            }
                            match consumer.fetch_watermarks(topic, *p, REQUEST_TIMEOUT) {
                                Ok((_, high)) => {
                                    targets.insert(*p, high);
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, partition = p, "lifecycle topic: cannot read where the partition ends");
                                    // Try again with the next metadata round.
                                    last_metadata = Some(
                                        Instant::now() - METADATA_EVERY + Duration::from_secs(1),
                                    );
                                }
                            }
                        }
                    }
                    tracing::info!(topic, partitions = ps.len(), "reading lifecycle events");
                    assigned = ps;
                    warned = false;
                }
                Ok(_) => {}
                Err(reason) => {
                    if !warned {
                        tracing::warn!(
                            topic,
                            reason,
                            "the lifecycle topic cannot be read yet; retrying"
                        );
                        warned = true;
                    }
                    metrics::counter!("keywatch_kafka_errors_total").increment(1);
                    last_metadata = Some(Instant::now() - METADATA_EVERY + Duration::from_secs(2));
                }
            }
        }
        if !caught_up
            && !assigned.is_empty()
            && assigned.iter().all(|p| {
                targets
                    .get(p)
                    .is_some_and(|end| next.get(p).copied().unwrap_or(0) >= *end)
            })
        {
            caught_up = true;
            tracing::info!(topic, events, "read the lifecycle topic to its end");
            if tx
                .blocking_send(LifecycleMessage::CaughtUp { events })
                .is_err()
            {
                return;
            }
        }
        if assigned.is_empty() {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        match consumer.poll(Duration::from_millis(200)) {
            None if !caught_up => {
                // Nothing to read: the consumer's position may be past offsets that hold no
                // message (transaction markers), which the loop above must count as read.
                if let Ok(tpl) = consumer.position() {
                    for e in tpl.elements() {
                        if let Offset::Offset(o) = e.offset() {
                            let n = next.entry(e.partition()).or_insert(0);
                            *n = (*n).max(o);
                        }
                    }
                }
            }
            None => {}
            Some(Ok(m)) => {
                next.insert(m.partition(), m.offset() + 1);
                events += 1;
                let msg = LifecycleMessage::Event {
                    partition: m.partition(),
                    offset: m.offset(),
                    payload: m.payload().unwrap_or_default().to_vec(),
                };
                if tx.blocking_send(msg).is_err() {
                    // The detectors have stopped.
                    return;
                }
            }
            Some(Err(e)) => {
                metrics::counter!("keywatch_kafka_errors_total").increment(1);
                tracing::warn!(error = %e, topic, "lifecycle consumer");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}
