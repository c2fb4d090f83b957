//! The delivery policy on top of the notification log (`store::notify_log`), and silences.
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

use std::str::FromStr;

use serde::Serialize;

use super::channel::DeliveryError;
use super::config::Retry;
use super::NotifyError;
use crate::store::notify_log::{AttemptEnd, SilenceRow};
use crate::store::SqliteStore;

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

/// What a silence matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    /// Findings about this key id.
    Key(String),
    /// Findings about any key of this owner.
    Owner(String),
}

impl FromStr for Matcher {
    type Err = String;

    /// `key=ID` or `owner=NAME`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (what, value) = s
            .split_once('=')
            .ok_or_else(|| format!("expected key=ID or owner=NAME, found `{s}`"))?;
        let value = value.trim();
        if value.is_empty() {
            return Err(format!("expected key=ID or owner=NAME, found `{s}`"));
        }
        match what.trim() {
            "key" => Ok(Matcher::Key(value.to_owned())),
            "owner" => Ok(Matcher::Owner(value.to_owned())),
            other => Err(format!("expected key=ID or owner=NAME, found `{other}=`")),
        }
    }
}

impl std::fmt::Display for Matcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Matcher::Key(k) => write!(f, "key={k}"),
            Matcher::Owner(o) => write!(f, "owner={o}"),
        }
    }
}

/// A silence: findings it matches are not sent until it ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Silence {
    pub id: i64,
    #[serde(serialize_with = "matcher_str")]
    pub matcher: Matcher,
    pub created_ms: i64,
    pub until_ms: i64,
    pub reason: String,
    /// When it was removed before its end.
    pub removed_ms: Option<i64>,
}

fn matcher_str<S: serde::Serializer>(m: &Matcher, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&m.to_string())
}

impl Silence {
    pub fn matches(&self, key_id: &str, owner: Option<&str>) -> bool {
        match &self.matcher {
            Matcher::Key(k) => k == key_id,
            Matcher::Owner(o) => owner == Some(o.as_str()),
        }
    }

    pub fn active_at(&self, now_ms: i64) -> bool {
        self.removed_ms.is_none() && now_ms < self.until_ms
    }
}

impl TryFrom<SilenceRow> for Silence {
    type Error = NotifyError;

    fn try_from(r: SilenceRow) -> Result<Silence, NotifyError> {
        let matcher = match r.matcher.as_str() {
            "key" => Matcher::Key(r.value),
            "owner" => Matcher::Owner(r.value),
            other => {
                return Err(NotifyError::Store(format!(
                    "silence {}: unknown matcher `{other}`",
                    r.id
                )))
            }
        };
        Ok(Silence {
            id: r.id,
            matcher,
            created_ms: r.created_ms,
            until_ms: r.until_ms,
            reason: r.reason,
            removed_ms: r.removed_ms,
        })
    }
}

/// `keywatch silence add`: silences findings about a key or an owner until `until_ms`.
pub fn silence_add(
    store: &mut SqliteStore,
    matcher: &Matcher,
    until_ms: i64,
    reason: &str,
    now_ms: i64,
) -> Result<Silence, NotifyError> {
    if until_ms <= now_ms {
        return Err(NotifyError::Invalid(
            "a silence must end in the future".into(),
        ));
    }
    let (what, value) = match matcher {
        Matcher::Key(k) => ("key", k),
        Matcher::Owner(o) => ("owner", o),
    };
    let id = store.silence_insert(what, value, now_ms, until_ms, reason.trim())?;
    Ok(Silence {
        id,
        matcher: matcher.clone(),
        created_ms: now_ms,
        until_ms,
        reason: reason.trim().to_owned(),
        removed_ms: None,
    })
}

/// `keywatch silence list`: the silences in force at `now_ms`, or every one with `all`.
pub fn silence_list(
    store: &SqliteStore,
    now_ms: i64,
    all: bool,
) -> Result<Vec<Silence>, NotifyError> {
    store
        .silence_rows(now_ms, all)?
        .into_iter()
        .map(Silence::try_from)
        .collect()
}

/// `keywatch silence remove ID`: ends a silence now; false when none with that id is in
/// force.
pub fn silence_remove(store: &mut SqliteStore, id: i64, now_ms: i64) -> Result<bool, NotifyError> {
    Ok(store.silence_end(id, now_ms)?)
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

    #[test]
    fn matchers_parse() {
        assert_eq!("key=k1".parse(), Ok(Matcher::Key("k1".into())));
        assert_eq!("owner= acme ".parse(), Ok(Matcher::Owner("acme".into())));
        assert!("ip=1.2.3.4".parse::<Matcher>().is_err());
        assert!("key=".parse::<Matcher>().is_err());
        assert!("acme".parse::<Matcher>().is_err());
    }
}
