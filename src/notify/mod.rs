//! Notifications: findings to the people who have to act, by email (SMTP), Telegram, Slack,
//! a generic JSON webhook, or the console.
//!
//! The pipeline, one stage after the other (like Alertmanager's `notify.go`), each a small
//! unit with its own module, state and unit tests, wired by [`Notifier`]:
//!
//! ```text
//! findings ─▶ silence / inhibit ─▶ route ─▶ dedup ─▶ group ─▶ render ─▶ (queue in the log)
//!   ─▶ deliver ─▶ record
//! ```
//!
//! 1. **silence / inhibit** (`silence`, `inhibit`): silences set with `keywatch silence`
//!    (by key or owner, until a time), read from the log; `[[inhibit]]` rules (a
//!    `safe_to_revoke` for a key holds back that key's lingering-source reminders). Both
//!    are hold-back stages (`Hold`), asked again when a group flushes.
//! 2. **route** ([`route`]): `[[routes]]` in `rules/routes.toml` choose receivers by kind,
//!    severity and owner; the `owner` receiver is the key's owner with the contacts in
//!    `keys.toml`, other receivers are teams with their own contacts.
//! 3. **dedup** (`dedup`): a fact (`dedup_key`) is told to a recipient once, or again
//!    after its kind's repeat interval (`detect::KINDS` says which kinds repeat).
//! 4. **group** (`group`): findings with the same grouping labels for one recipient share
//!    a message: the first waits `group_wait`, later ones `group_interval` after the last
//!    message of the group; quiet hours hold back all but severe findings.
//! 5. **render** (`render`, [`message`], [`template`]): one message per target of the
//!    recipient, from editable templates per channel, escaped for Telegram HTML and Slack
//!    mrkdwn, split to the channel's limits; queued in the log with its facts marked told.
//! 6. **deliver** (`deliver`, `channel`): retries with backoff on transient failures,
//!    none on permanent ones ([`log`] has the policy).
//! 7. **record** (`record`): metrics, logs, the attempt sink for the consumer group's
//!    shared log; failures for good become `notification_failed` for the operators.
//!
//! Contract:
//! - Time is a parameter (`now_ms`): [`Notifier::handle`] and [`Notifier::tick`] never look
//!   at the clock, so tests run hours of retries in simulated time. Only [`Notifier::run`]
//!   (and the recovery when it starts) reads the wall clock.
//! - Only this module holds channel secrets; they are read when the notifier starts (owners'
//!   Slack webhooks when a message goes out), never logged, and scrubbed from errors. Only
//!   this module knows their shapes: what leaves it for a shared store is redacted
//!   (`redact`).
//! - Every decision is in the notification log before it is acted on. The log is a port
//!   ([`NotifyLog`]) that the embedded store implements (`store::notify_log`); the
//!   ClickHouse store implements the group-wide ports [`SharedLog`] and [`AttemptLog`]. See
//!   [`log`] for what a restart may and may not repeat.
//! - With no channel configured for a recipient, the message goes to standard output.
//! - `run --dry-run` ([`dry_run`]): the whole pipeline on a read-only view of the log, every
//!   message rendered to standard output instead of sent, nothing written to the log.

pub mod bot;
mod channel;
mod check;
pub mod config;
mod dedup;
mod deliver;
pub mod dry_run;
mod group;
mod inhibit;
pub mod log;
pub mod message;
mod notifier;
mod record;
mod redact;
mod render;
pub mod route;
mod silence;
pub mod template;

use std::sync::Arc;

#[doc(hidden)]
pub use channel::fuzz as channel_fuzz;
/// How a webhook receiver checks keywatch's signature (rules/README.md, "webhook").
pub use channel::webhook::{
    verify as verify_webhook, SIGNATURE_HEADER as WEBHOOK_SIGNATURE_HEADER,
};
pub use channel::{scrub, Address, Console, DeliveryError};
pub use check::{check_templates, reach_channels, send_test};
pub use config::Config;
pub use dry_run::DryRunLog;
pub use log::{AttemptLog, AttemptRecord, NotifyLog, SharedLog};
pub use notifier::Notifier;
pub use record::run_attempt_sink;
pub use redact::redact_attempt;
pub use route::{Item, Kind};
pub use silence::{silence_add, silence_list, silence_remove, Matcher, Silence};

use crate::config::ConfigError;
use crate::detect::{Finding, RotationStatus};
use crate::registry::Registry;
use crate::store::StoreError;

/// What can go wrong outside a delivery attempt.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `rules/routes.toml` or a template.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A channel cannot be built: a secret is missing, a CA file unreadable.
    #[error("{0}")]
    Channel(String),
    /// The notification log.
    #[error("notification log: {0}")]
    Store(String),
    /// A request that makes no sense (an unknown channel for `notify test`).
    #[error("{0}")]
    Invalid(String),
    /// `notify test`: the channel refused or could not be reached.
    #[error("{0}")]
    Delivery(DeliveryError),
}

impl From<StoreError> for NotifyError {
    fn from(e: StoreError) -> NotifyError {
        NotifyError::Store(e.to_string())
    }
}

/// What the daemon hands to [`Notifier::run`].
#[derive(Debug)]
pub enum Input {
    /// Findings to tell (new ones, or every finding of an evaluation: the log deduplicates).
    Findings(Vec<Finding>),
    /// An evaluation: its findings with the rotation statuses, whose full list of lingering
    /// sources goes into reminders.
    Evaluated {
        findings: Vec<Finding>,
        rotations: Vec<RotationStatus>,
    },
    /// A reloaded registry (owner contacts and time zones).
    Registry(Arc<Registry>),
    /// Findings the sender waits on: `ack` gets `true` once they are in the notification
    /// log (queued or grouped, durable), before any delivery is tried; `false` when the log
    /// could not take them. The pipeline commits a batch only after this, so a crash
    /// between the two cannot lose a finding (see [`crate::daemon::findings`]).
    Durable {
        findings: Vec<Finding>,
        ack: tokio::sync::oneshot::Sender<bool>,
    },
}

impl From<Vec<Finding>> for Input {
    fn from(f: Vec<Finding>) -> Input {
        Input::Findings(f)
    }
}

/// A stage that may hold a finding back (inhibit, silence): asked when a finding arrives
/// and again when its group flushes, since a silence or an inhibiting finding may have come
/// in between.
pub(crate) trait Hold {
    /// Whether `item`, raised at `raised_ms`, is held back at `now_ms`.
    fn holds(&self, item: &Item, raised_ms: i64, now_ms: i64) -> bool;
    /// The counter of findings this stage held back.
    fn metric(&self) -> &'static str;
}

/// The wall clock, in the only place that reads it.
pub fn wall_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
