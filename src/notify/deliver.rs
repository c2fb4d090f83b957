//! Delivery (stage 6 of the pipeline): every message due in the log is sent on its channel,
//! `retry.parallel` at a time, with retries on its schedule ([`super::log::decide`]).
//!
//! Contract: an attempt is in the log as started before its request goes out and as ended
//! after the answer ([`NotifyLog::attempt_start`], [`NotifyLog::attempt_end`]), and the
//! parts of a split message the channel accepted are recorded, so a restart knows what may
//! have gone out. A queued message that cannot be read fails for good without an attempt
//! on the network. A panicking attempt leaves its message `sending`; the caller recovers it
//! like after a restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::channel::{Address, Transports};
use super::config::Retry;
use super::log::{self, AttemptEnd, MessageRow, NotifyLog};
use super::message::Rendered;
use super::record::Ended;
use super::NotifyError;

/// Sends the messages due at `now_ms` until none is left; `ended` hears of every attempt
/// that got an answer, after the log has it. Returns whether an attempt panicked.
pub async fn deliver_due<L: NotifyLog>(
    log: &mut L,
    transports: &Arc<Transports>,
    retry: &Retry,
    now_ms: i64,
    mut ended: impl FnMut(&L, Ended<'_>) -> Result<(), NotifyError>,
) -> Result<bool, NotifyError> {
    let mut panicked = false;
    let parallel = retry.parallel;
    loop {
        let due = log.due(now_ms, parallel)?;
        if due.is_empty() {
            break;
        }
        let mut set = tokio::task::JoinSet::new();
        let mut attempts = HashMap::new();
        for m in &due {
            let attempt = log.attempt_start(&m.id, now_ms)?;
            attempts.insert(m.id.clone(), attempt);
            let (rendered, address) = match read(m) {
                Ok(x) => x,
                Err(detail) => {
                    let end = AttemptEnd::Failed {
                        transient: false,
                        detail,
                    };
                    log.attempt_end(&m.id, attempt, now_ms, &end)?;
                    continue;
                }
            };
            let reminder_key = if m.channel_type == "telegram" {
                crate::notify::bot::reminder_key(&log.message_findings(&m.id)?)
            } else {
                None
            };
            let transports = transports.clone();
            let (id, channel, recipient) = (m.id.clone(), m.channel.clone(), m.recipient.clone());
            let parts_done = m.parts_done;
            set.spawn(async move {
                let t0 = Instant::now();
                let (done, result) = transports
                    .send(
                        &channel,
                        &id,
                        &recipient,
                        &address,
                        &rendered,
                        parts_done,
                        reminder_key.as_deref(),
                    )
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
                log.parts_done(&id, done)?;
            }
            let finished = now_ms.saturating_add(took.as_millis() as i64);
            let end = log::decide(retry, &id, m.created_ms, attempt, finished, &result);
            log.attempt_end(&id, attempt, finished, &end)?;
            ended(
                log,
                Ended {
                    message: m,
                    attempt,
                    started_ms: now_ms,
                    finished_ms: finished,
                    end: &end,
                },
            )?;
        }
        if due.len() < parallel {
            break;
        }
    }
    Ok(panicked)
}

/// A queued message's rendering and address, or why they cannot be read.
fn read(m: &MessageRow) -> Result<(Rendered, Address), String> {
    let rendered = serde_json::from_str::<Rendered>(&m.payload);
    let address = serde_json::from_str::<Address>(&m.address);
    match (rendered, address) {
        (Ok(r), Ok(a)) => Ok((r, a)),
        (Err(e), _) | (_, Err(e)) => Err(format!("the queued message cannot be read: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::notify::channel::Console;
    use crate::notify::config::Config;
    use crate::notify::log::{MessageFinding, NewMessage};
    use crate::store::SqliteStore;

    fn message(id: &str, channel: &str, address: &str, payload: &str) -> NewMessage {
        NewMessage {
            id: id.into(),
            recipient: "team:ops".into(),
            receiver: "ops".into(),
            channel: channel.into(),
            channel_type: "console".into(),
            target: "console".into(),
            address: address.into(),
            group_key: "g".into(),
            kinds: "unknown_key".into(),
            severity: "info".into(),
            created_ms: 0,
            payload: payload.into(),
            findings: vec![MessageFinding {
                dedup_key: format!("f-{id}"),
                kind: "unknown_key".into(),
                key_id: "k".into(),
                owner: None,
            }],
        }
    }

    #[tokio::test]
    async fn due_messages_are_sent_recorded_and_unreadable_ones_fail() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SqliteStore::open(dir.path()).unwrap();
        let payload = r#"{"subject":"s","text":"hello"}"#;
        let console = r#"{"type":"console"}"#;
        log.enqueue(
            &[
                message("ok", "console", console, payload),
                message("bad", "console", console, "not json"),
                message(
                    "gone",
                    "tg",
                    r#"{"type":"telegram","chat_id":"1"}"#,
                    payload,
                ),
            ],
            &[],
            0,
        )
        .unwrap();
        let (out, buf) = Console::capture();
        let config = Config::default();
        let transports = Arc::new(Transports::build(&config, None, out).unwrap());
        let retry = Retry {
            first_ms: 1000,
            max_ms: 60_000,
            give_up_after_ms: 3_600_000,
            timeout: Duration::from_secs(1),
            parallel: 2,
        };
        let mut heard = Vec::new();
        let panicked = deliver_due(&mut log, &transports, &retry, 10, |_, e| {
            heard.push((e.message.id.clone(), e.end.clone()));
            Ok(())
        })
        .await
        .unwrap();
        assert!(!panicked);
        heard.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(heard.len(), 2, "{heard:?}");
        assert_eq!(heard[1], ("ok".to_owned(), AttemptEnd::Ok));
        assert!(
            matches!(&heard[0].1, AttemptEnd::Failed { transient: false, detail } if detail.contains("no longer configured")),
            "{heard:?}"
        );
        assert_eq!(buf.lock().unwrap().len(), 1);
        assert!(buf.lock().unwrap()[0].contains("hello"));
        let state = |id: &str| log.notify_message(id).unwrap().unwrap().state;
        assert_eq!(state("ok"), "sent");
        assert_eq!(state("bad"), "failed");
        assert_eq!(state("gone"), "failed");
        assert!(log.due(i64::MAX, 10).unwrap().is_empty());
    }
}
