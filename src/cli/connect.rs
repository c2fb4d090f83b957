//! `keywatch check-config --connect`: reaches the services a config names and says plainly
//! what works and what does not, one line each: the Kafka brokers and topics, the lifecycle
//! topic, ClickHouse, and from the routes file every email server (TLS and AUTH as
//! configured, nothing sent) and Telegram bot token (`getMe`). Separate from validation,
//! which never connects. No line holds a secret (passwords and tokens are scrubbed by the
//! channels, [`crate::notify::reach_channels`]).

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::{Config, InputSource, StoreConfig};

/// One line per check: (what, Ok(detail) | Err(reason)).
pub type Check = (String, Result<String, String>);

pub async fn check(config: &Config) -> Vec<Check> {
    let mut out = Vec::new();
    if let InputSource::Kafka(k) = &config.input.source {
        let what = format!("kafka {}", k.brokers);
        let result = match crate::daemon::kafka_settings(k, config) {
            Err(e) => Err(format!("{e:#}")),
            Ok(settings) => {
                let topics = {
                    let mut t = k.topics.clone();
                    t.extend(k.dead_letter_topic.clone());
                    t
                };
                tokio::task::spawn_blocking(move || {
                    kafka(settings.properties, &settings.group_id, topics)
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
            }
        };
        out.push((what, result));
    }
    if let Some(l) = &config.rules.lifecycle {
        let what = format!("lifecycle topic on {}", l.brokers);
        let result = match crate::daemon::lifecycle_properties(l) {
            Err(e) => Err(format!("{e:#}")),
            Ok(properties) => {
                let topics = vec![l.topic.clone()];
                tokio::task::spawn_blocking(move || kafka(properties, "keywatch-lifecycle", topics))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()))
            }
        };
        out.push((what, result));
    }
    if let StoreConfig::ClickHouse(c) = &config.store {
        out.push((
            format!("clickhouse {}", c.url),
            crate::store::open::ping(c).await,
        ));
    }
    if let Some(p) = &config.rules.routes {
        match crate::notify::Config::load(p) {
            Ok(routes) => out.extend(crate::notify::reach_channels(&routes).await),
            Err(e) => out.push(("routes".into(), Err(e.to_string()))),
        }
    }
    if out.is_empty() {
        out.push((
            "services".into(),
            Ok("none to reach: file or stdin input, embedded store".into()),
        ));
    }
    out
}

/// Reaches the brokers with these client `properties` and checks that `topics` exist.
fn kafka(
    properties: Vec<(String, String)>,
    group_id: &str,
    topics: Vec<String>,
) -> Result<String, String> {
    let mut cc = rdkafka::ClientConfig::new();
    for (k, v) in &properties {
        cc.set(k, v);
    }
    cc.set("group.id", group_id);
    let consumer: BaseConsumer = cc.create().map_err(|e| format!("client: {e}"))?;
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| format!("cannot reach the brokers: {e}"))?;
    let mut found = Vec::new();
    for t in &topics {
        match md.topics().iter().find(|m| m.name() == t) {
            Some(m) if m.error().is_none() => {
                found.push(format!("{t} ({} partitions)", m.partitions().len()))
            }
            _ => return Err(format!("topic {t} does not exist")),
        }
    }
    Ok(format!(
        "{} broker(s); topics {}",
        md.brokers().len(),
        found.join(", ")
    ))
}
