//! Dead letters on a Kafka topic: the redacted message as payload, the reason and the
//! message's origin in headers (`keywatch.reason`, `keywatch.source`, `keywatch.topic`,
//! `keywatch.partition`, `keywatch.offset`).
//!
//! [`DeadLetterSink::flush`] waits until the broker acknowledged every record, so the batch
//! they belong to is only committed once its dead letters are safe.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use super::deadletter::{DeadLetter, DeadLetterSink};

/// A producer context that counts the messages whose delivery failed (librdkafka's delivery
/// reports; the default context drops them) and keeps the first error. Also used by
/// `keywatch produce`.
#[derive(Default)]
pub struct Deliveries {
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Deliveries {
    /// The failures since the last call: how many, and the first one's error.
    pub fn take_failures(&self) -> Option<(u64, String)> {
        let failed = self.failed.swap(0, Ordering::SeqCst);
        let first = self
            .first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        (failed > 0).then(|| (failed, first.unwrap_or_default()))
    }
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::SeqCst);
            self.first_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert_with(|| e.to_string());
        }
    }
}

pub struct KafkaDeadLetters {
    producer: ThreadedProducer<Deliveries>,
    topic: String,
}

impl KafkaDeadLetters {
    pub fn new(mut config: rdkafka::ClientConfig, topic: &str) -> io::Result<Self> {
        config
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "30000");
        // Consumer-only properties would make the producer warn; drop them.
        for p in crate::config::MANAGED_KAFKA_PROPERTIES {
            if p != "bootstrap.servers" {
                config.remove(p);
            }
        }
        config.remove("auto.offset.reset");
        let producer = config
            .create_with_context(Deliveries::default())
            .map_err(|e| io::Error::other(format!("creating the dead-letter producer: {e}")))?;
        Ok(KafkaDeadLetters {
            producer,
            topic: topic.to_owned(),
        })
    }
}

impl DeadLetterSink for KafkaDeadLetters {
    fn write(&mut self, r: &DeadLetter<'_>) -> io::Result<()> {
        let partition = r.partition.map(|p| p.to_string()).unwrap_or_default();
        let offset = r.offset.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "keywatch.reason",
                value: Some(r.reason.as_str()),
            })
            .insert(Header {
                key: "keywatch.source",
                value: Some(r.source),
            })
            .insert(Header {
                key: "keywatch.topic",
                value: r.topic,
            })
            .insert(Header {
                key: "keywatch.partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "keywatch.offset",
                value: Some(offset.as_str()),
            })
            .insert(Header {
                key: "keywatch.at",
                value: Some(r.at.as_str()),
            });
        let mut record: BaseRecord<'_, (), str> = BaseRecord::to(&self.topic)
            .payload(r.line.as_str())
            .headers(headers);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    back,
                )) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(io::Error::other(format!("sending a dead letter: {e}"))),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.producer
            .flush(Duration::from_secs(30))
            .map_err(|e| io::Error::other(format!("flushing dead letters: {e}")))?;
        if let Some((failed, first)) = self.producer.context().take_failures() {
            return Err(io::Error::other(format!(
                "{failed} dead letter(s) were not delivered to {} (first error: {first})",
                self.topic
            )));
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("the Kafka topic {}", self.topic)
    }
}
