//! The notification log: the port the stores implement ([`NotifyLog`] for the embedded
//! store, [`SharedLog`] and [`AttemptLog`] for the ClickHouse tables a consumer group
//! shares), the rows that cross it, and the delivery policy on top of it.
//!
//! The stores see rows and JSON payloads only: which channel a target is, and which of its
//! parts are secret, stays in the notifier (`notify::redact`).
//!
//! # Once per fact and recipient
//!
//! A fact (a finding's `dedup_key`, so one reminder step of one rotation) is told to a
//! recipient when the message carrying it is *queued*: the message, its findings and the
//! "told" mark are written in one transaction before any attempt. A finding raised again
//! (the next evaluation, a replay, a restart that re-evaluates) finds the mark and is not
//! queued again, unless its kind's repeat interval has passed (`never` for reminder steps).
//! Findings waiting in a group (group wait, quiet hours) are in the log too
//! (`notify_pending`) and come back after a restart with their original times.
//!
//! # Attempts, and what a restart does
//!
//! Each attempt is recorded as started before the request goes out and finished after the
//! answer. A transient failure schedules the next attempt (exponential backoff from
//! `retry.first` to `retry.max`, at least the channel's Retry-After, ±10 % spread by message
//! so that a channel coming back is not hit by everything at once) until
//! `retry.give_up_after` after queuing; a permanent failure ends the message at once. Both
//! endings raise `notification_failed` for the operators (never about a
//! `notification_failed` message itself).
//!
//! After a restart, a message whose last attempt has no outcome (keywatch stopped while the
//! request was out) is sent again: keywatch cannot know whether the channel took it.
//! - A restart during an outage never duplicates: an attempt that fails or hangs was not
//!   accepted, and the message is sent once when the channel is back.
//! - Otherwise the only window is the request in flight when keywatch stopped (at most
//!   `retry.parallel` messages, each at most `retry.timeout`): the channel may have taken it
//!   and it is sent again, once. The generic webhook carries the message id as
//!   `Idempotency-Key` and email as `Message-ID`, so receivers that deduplicate see it once;
//!   a split Telegram or Slack message resumes at the first part not recorded as accepted.
//! - Messages that were only queued, or failed transiently and wait for their next attempt,
//!   are sent after a restart like before it: no duplicate.
//!
//! A graceful stop (SIGTERM) lets the attempts in flight finish first, which closes the
//! window for everything but a crash.

use std::future::Future;

use serde::Serialize;

use super::channel::DeliveryError;
use super::config::Retry;
use crate::store::StoreError;

/// The notification log as the notifier needs it. The embedded store implements it
/// (`store::notify_log`); every call is one transaction.
pub trait NotifyLog {
    /// When a fact was last queued for a recipient, if ever.
    fn fact_last(&self, recipient: &str, dedup_key: &str) -> Result<Option<i64>, StoreError>;
    /// Adds or replaces findings waiting in groups.
    fn pending_put(&mut self, rows: &[PendingRow]) -> Result<(), StoreError>;
    /// Removes waiting findings, by (recipient, dedup key).
    fn pending_remove(&mut self, keys: &[(String, String)]) -> Result<(), StoreError>;
    /// Every finding waiting in a group, oldest first.
    fn pending_all(&self) -> Result<Vec<PendingRow>, StoreError>;
    /// Queues the messages of a group flush (`pending`, due at once), records each
    /// (recipient, fact) of `told` as told at `now_ms` and removes it from the waiting
    /// findings: a fact is either waiting or queued, never both nor neither.
    fn enqueue(
        &mut self,
        messages: &[NewMessage],
        told: &[(String, String)],
        now_ms: i64,
    ) -> Result<(), StoreError>;
    /// Messages due for an attempt at `now_ms`, oldest first, at most `limit`.
    fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<MessageRow>, StoreError>;
    /// The earliest time a pending message is due.
    fn next_due_ms(&self) -> Result<Option<i64>, StoreError>;
    /// Marks an attempt as started (`sending`) before the request goes out; returns its
    /// number (1, 2, ...).
    fn attempt_start(&mut self, id: &str, now_ms: i64) -> Result<u32, StoreError>;
    /// The first `parts_done` parts of a split message were accepted.
    fn parts_done(&mut self, id: &str, parts_done: u32) -> Result<(), StoreError>;
    /// How an attempt ended; moves the message on (sent, pending again, failed).
    fn attempt_end(
        &mut self,
        id: &str,
        attempt: u32,
        now_ms: i64,
        end: &AttemptEnd,
    ) -> Result<(), StoreError>;
    /// After a restart: messages left `sending` are pending again, due at once, their open
    /// attempts closed as interrupted. Returns their ids, oldest first.
    fn recover(&mut self, now_ms: i64) -> Result<Vec<String>, StoreError>;
    /// The findings a message carries.
    fn message_findings(&self, id: &str) -> Result<Vec<MessageFinding>, StoreError>;
    /// Removes sent and failed messages created before `before_ms`; facts stay (they keep a
    /// reminder step from being sent twice).
    fn prune_before(&mut self, before_ms: i64) -> Result<usize, StoreError>;
    /// Adds a silence (`matcher` is `key` or `owner`); returns its id.
    fn silence_insert(
        &mut self,
        matcher: &str,
        value: &str,
        created_ms: i64,
        until_ms: i64,
        reason: &str,
    ) -> Result<i64, StoreError>;
    /// Silences in force at `now_ms` (every one with `all`), by id.
    fn silence_rows(&self, now_ms: i64, all: bool) -> Result<Vec<SilenceRow>, StoreError>;
    /// Ends a silence; false when none with that id is in force.
    fn silence_end(&mut self, id: i64, now_ms: i64) -> Result<bool, StoreError>;
}

/// What the other instances of a consumer group have told: in full mode, the ClickHouse
/// notification tables every instance writes its attempts to.
pub trait SharedLog: Send + Sync {
    /// When a message carrying the fact `dedup_key` was last delivered to `recipient` by
    /// any instance, if ever.
    fn last_delivered(&self, recipient: &str, dedup_key: &str) -> Result<Option<i64>, String>;
}

/// Where attempts go beyond this instance (the ClickHouse `notify_attempts` table in full
/// mode), written by [`super::run_attempt_sink`]. An implementation stores
/// [`AttemptRecord::redacted`] records only.
pub trait AttemptLog: Send + Sync + 'static {
    /// Writes `rows` in one insert.
    fn record_attempts(
        &self,
        rows: &[AttemptRecord],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// One attempt, for a log table outside SQLite (the ClickHouse `notifications` table in full
/// mode): handed to the sink given to [`crate::notify::Notifier::with_attempt_sink`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttemptRecord {
    pub message_id: String,
    pub recipient: String,
    pub receiver: String,
    pub channel: String,
    pub channel_type: String,
    /// Where it went, without secrets.
    pub target: String,
    /// Finding kinds in the message, comma-separated.
    pub kinds: String,
    /// Dedup keys of the findings the message carries (what was told).
    pub findings: Vec<String>,
    pub severity: String,
    pub created_ms: i64,
    pub attempt: u32,
    pub started_ms: i64,
    pub finished_ms: i64,
    /// `ok`, `transient` (retried), `permanent`, `gave_up`.
    pub outcome: &'static str,
    pub detail: Option<String>,
}

/// A message to queue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub id: String,
    pub recipient: String,
    pub receiver: String,
    pub channel: String,
    pub channel_type: String,
    pub target: String,
    pub address: String,
    pub group_key: String,
    pub kinds: String,
    pub severity: String,
    pub created_ms: i64,
    pub payload: String,
    pub findings: Vec<MessageFinding>,
}

/// A finding carried by a message.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageFinding {
    pub dedup_key: String,
    pub kind: String,
    pub key_id: String,
    pub owner: Option<String>,
}

/// A queued message as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageRow {
    pub id: String,
    pub recipient: String,
    pub receiver: String,
    pub channel: String,
    pub channel_type: String,
    pub target: String,
    pub address: String,
    pub group_key: String,
    pub kinds: String,
    pub severity: String,
    pub created_ms: i64,
    pub state: String,
    pub attempts: u32,
    pub next_attempt_ms: i64,
    pub parts_done: u32,
    pub sent_ms: Option<i64>,
    pub last_error: Option<String>,
    pub payload: String,
}

/// One attempt to deliver a message.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRow {
    pub message_id: String,
    pub attempt: u32,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    /// `ok`, `transient`, `permanent`, `interrupted`; `None` while in flight.
    pub outcome: Option<String>,
    pub detail: Option<String>,
}

/// A finding waiting in a group for its recipient.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingRow {
    pub recipient: String,
    pub dedup_key: String,
    pub raised_ms: i64,
    pub item: String,
}

/// A silence as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SilenceRow {
    pub id: i64,
    /// `key` or `owner`.
    pub matcher: String,
    pub value: String,
    pub created_ms: i64,
    pub until_ms: i64,
    pub reason: String,
    pub removed_ms: Option<i64>,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptEnd {
    /// Accepted: the message is sent.
    Ok,
    /// Failed and will be tried again at this time.
    Retry {
        next_attempt_ms: i64,
        detail: String,
    },
    /// Failed for good (a permanent error, or retried for too long).
    Failed { transient: bool, detail: String },
}

/// A stable number in 0..1000 from a message id, to spread retries.
fn spread(id: &str) -> i64 {
    // FNV-1a.
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (h % 1000) as i64
}

/// The wait before attempt `attempt + 1` after `attempt` failed transiently.
pub fn backoff_ms(retry: &Retry, attempt: u32, id: &str) -> i64 {
    let exp = retry
        .first_ms
        .saturating_mul(1i64 << attempt.saturating_sub(1).min(30))
        .min(retry.max_ms);
    // 90 % to 110 %.
    exp * (900 + spread(id) / 5) / 1000
}

/// How an attempt that ended with `result` moves its message on.
pub fn decide(
    retry: &Retry,
    id: &str,
    created_ms: i64,
    attempt: u32,
    now_ms: i64,
    result: &Result<(), DeliveryError>,
) -> AttemptEnd {
    match result {
        Ok(()) => AttemptEnd::Ok,
        Err(DeliveryError::Permanent { detail }) => AttemptEnd::Failed {
            transient: false,
            detail: detail.clone(),
        },
        Err(DeliveryError::Transient {
            detail,
            retry_after,
        }) => {
            let asked = retry_after.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            let next = now_ms.saturating_add(backoff_ms(retry, attempt, id).max(asked));
            if next > created_ms.saturating_add(retry.give_up_after_ms) {
                AttemptEnd::Failed {
                    transient: true,
                    detail: format!("{detail}; gave up after {attempt} attempts"),
                }
            } else {
                AttemptEnd::Retry {
                    next_attempt_ms: next,
                    detail: detail.clone(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn retry() -> Retry {
        Retry {
            first_ms: 1000,
            max_ms: 60_000,
            give_up_after_ms: 3_600_000,
            timeout: Duration::from_secs(10),
            parallel: 4,
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_max_with_a_stable_spread() {
        let r = retry();
        let waits: Vec<i64> = (1..=9).map(|a| backoff_ms(&r, a, "m")).collect();
        for (i, w) in waits.iter().enumerate() {
            let base = (1000i64 << i).min(60_000);
            assert!(*w >= base * 9 / 10 && *w <= base * 11 / 10, "{i}: {w}");
        }
        assert_eq!(backoff_ms(&r, 3, "m"), backoff_ms(&r, 3, "m"));
        assert_ne!(backoff_ms(&r, 3, "m1"), backoff_ms(&r, 3, "m2"));
    }

    #[test]
    fn decisions_follow_the_error_class() {
        let r = retry();
        let transient = |after: Option<u64>| {
            Err(DeliveryError::Transient {
                detail: "503".into(),
                retry_after: after.map(Duration::from_secs),
            })
        };
        assert_eq!(decide(&r, "m", 0, 1, 10, &Ok(())), AttemptEnd::Ok);
        match decide(&r, "m", 0, 1, 10, &transient(None)) {
            AttemptEnd::Retry {
                next_attempt_ms, ..
            } => {
                assert!((910..=1110).contains(&next_attempt_ms))
            }
            other => panic!("{other:?}"),
        }
        // Retry-After wins when longer than the backoff.
        match decide(&r, "m", 0, 1, 10, &transient(Some(30))) {
            AttemptEnd::Retry {
                next_attempt_ms, ..
            } => assert_eq!(next_attempt_ms, 30_010),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decide(&r, "m", 0, 20, 3_590_000, &transient(None)),
            AttemptEnd::Failed {
                transient: true,
                ..
            }
        ));
        assert!(matches!(
            decide(
                &r,
                "m",
                0,
                1,
                10,
                &Err(DeliveryError::permanent("404 no_service"))
            ),
            AttemptEnd::Failed {
                transient: false,
                ..
            }
        ));
    }
}
