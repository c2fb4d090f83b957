//! `keywatch produce`: sends a gateway log into Kafka, one message per line, keyed by the
//! key id keywatch decodes from it (so that a consumer group gives all of a key's events to
//! one instance). A lifecycle event (`rules/README.md`) is keyed by its `key_id`, so that a
//! key's events stay in order. A line that does not decode is still sent, without a key:
//! keywatch will dead-letter it, which is what a test of the dead-letter path wants.
//!
//! It succeeds only when the broker acknowledged every message: a message librdkafka gives
//! up on (its delivery report carries an error) is counted, and the command fails saying
//! how many of how many were lost and the first error.

use std::io::BufRead;
use std::time::Duration;

use anyhow::Context;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::ClientConfig;

use crate::daemon::deadletter_kafka::Deliveries;
use crate::event::Decoder;

/// Sends every line of `input` to `topic`; returns how many were sent, once the broker has
/// acknowledged them all (an error says how many were not).
pub fn produce(
    mut config: ClientConfig,
    topic: &str,
    input: &mut dyn BufRead,
    decoder: Option<&Decoder>,
) -> anyhow::Result<u64> {
    config
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .set("enable.idempotence", "true");
    let producer: ThreadedProducer<Deliveries> = config
        .create_with_context(Deliveries::default())
        .context("creating the Kafka producer")?;
    let mut sent = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        let payload = line.strip_suffix(b"\n").unwrap_or(&line);
        let payload = payload.strip_suffix(b"\r").unwrap_or(payload);
        if payload.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let mut events = Vec::new();
        let key: Option<String> = decoder
            .and_then(|d| d.decode(payload, &mut events).ok())
            .and_then(|_| events.first().map(|e| e.key_id.to_string()))
            // A lifecycle event: keyed by its key, so that one key's events stay in order.
            .or_else(|| {
                crate::registry::LifecycleEvent::from_json(payload)
                    .ok()
                    .map(|e| e.key_id().to_owned())
            });
        let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic).payload(payload);
        if let Some(k) = key.as_deref() {
            record = record.key(k);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    back,
                )) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(anyhow::anyhow!("sending to {topic}: {e}")),
            }
        }
        sent += 1;
    }
    producer
        .flush(Duration::from_secs(60))
        .context("waiting for the broker to acknowledge")?;
    if let Some((failed, first)) = producer.context().take_failures() {
        anyhow::bail!(
            "{failed} of {sent} messages to {topic} were not delivered (first error: {first})"
        );
    }
    Ok(sent)
}
