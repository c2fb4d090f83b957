//! `keywatch check-config --connect`: reaches the services a config names and says plainly
//! what works and what does not. Separate from validation, which never connects.

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
        out.push((format!("clickhouse {}", c.url), clickhouse(c).await));
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

async fn clickhouse(c: &crate::store::clickhouse::ClickHouseConfig) -> Result<String, String> {
    let password = c.load_password()?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.without_url().to_string())?;
    let mut req = client
        .post(&c.url)
        .header("X-ClickHouse-User", &c.user)
        .body("SELECT version()");
    if let Some(p) = &password {
        req = req.header("X-ClickHouse-Key", p.expose());
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("cannot reach the server: {}", chain(&e.without_url())))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        let first = body
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(200)
            .collect::<String>();
        return Err(format!("HTTP {status}: {first}"));
    }
    Ok(format!(
        "ClickHouse {} (database {})",
        body.trim(),
        c.database
    ))
}

/// An error with its causes (`error sending request: connection refused`); reqwest errors
/// have had their URL removed before they get here.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = c.source();
    }
    out
}
