//! Recording (stage 7 of the pipeline): every attempt's outcome is counted
//! (`keywatch_notifications_total`), logged, and handed to the attempt sink for the shared
//! log of a consumer group ([`run_attempt_sink`], the ClickHouse tables in full mode); a
//! message that failed for good becomes a `notification_failed` item for the operators.
//!
//! Contract: the notification log already holds the attempt (the deliver stage writes it
//! before and after the request); this stage only tells others. The sink is bounded: when
//! it is full, records are dropped and counted (`keywatch_notify_records_dropped_total`),
//! never waited for.

use std::time::Duration;

use tokio::sync::mpsc;

use super::log::{AttemptEnd, AttemptLog, AttemptRecord, MessageFinding, MessageRow, NotifyLog};
use super::route::{Item, Kind};
use crate::detect::Severity;

/// Attempts per insert in [`run_attempt_sink`], and how long a record may wait.
const SINK_ROWS: usize = 500;
const SINK_EVERY: Duration = Duration::from_secs(1);
/// Attempts kept while the shared log is down; older ones are dropped (and counted) beyond it.
const SINK_BACKLOG: usize = 50_000;
/// How long the sink keeps retrying after its channel closed (shutdown).
const SINK_DRAIN_FOR: Duration = Duration::from_secs(10);

/// An attempt's outcome as recorded (`ok`, `transient`, `permanent`, `gave_up`) and its
/// error.
pub fn outcome(end: &AttemptEnd) -> (&'static str, Option<String>) {
    match end {
        AttemptEnd::Ok => ("ok", None),
        AttemptEnd::Retry { detail, .. } => ("transient", Some(detail.clone())),
        AttemptEnd::Failed {
            transient: true,
            detail,
        } => ("gave_up", Some(detail.clone())),
        AttemptEnd::Failed { detail, .. } => ("permanent", Some(detail.clone())),
    }
}

/// One attempt that got an answer.
#[derive(Debug, Clone, Copy)]
pub struct Ended<'a> {
    pub message: &'a MessageRow,
    pub attempt: u32,
    pub started_ms: i64,
    pub finished_ms: i64,
    pub end: &'a AttemptEnd,
}

/// Where attempts are told beyond the log.
#[derive(Debug, Default)]
pub struct Recorder {
    sink: Option<mpsc::Sender<AttemptRecord>>,
    /// `run --dry-run`: attempts are counted with outcome `dry_run` (nothing was sent).
    dry_run: bool,
}

impl Recorder {
    pub fn set_sink(&mut self, sink: mpsc::Sender<AttemptRecord>) {
        self.sink = Some(sink);
    }

    pub fn set_dry_run(&mut self) {
        self.dry_run = true;
    }

    /// Counts, logs and hands on one attempt's outcome.
    pub fn record(&self, log: &impl NotifyLog, e: Ended<'_>) {
        let m = e.message;
        let attempt = e.attempt;
        if self.dry_run {
            metrics::counter!(
                "keywatch_notifications_total",
                "channel" => m.channel_type.clone(),
                "outcome" => "dry_run"
            )
            .increment(1);
            tracing::info!(
                message = %m.id, recipient = %m.recipient, channel = %m.channel,
                target = %m.target, kinds = %m.kinds, "dry run: notification rendered, not sent"
            );
            return;
        }
        let (outcome, detail) = outcome(e.end);
        metrics::counter!(
            "keywatch_notifications_total",
            "channel" => m.channel_type.clone(),
            "outcome" => outcome
        )
        .increment(1);
        match e.end {
            AttemptEnd::Ok => tracing::info!(
                message = %m.id, recipient = %m.recipient, channel = %m.channel,
                target = %m.target, kinds = %m.kinds, attempt, "notification sent"
            ),
            AttemptEnd::Retry {
                next_attempt_ms,
                detail,
            } => tracing::warn!(
                message = %m.id, recipient = %m.recipient, channel = %m.channel,
                target = %m.target, attempt, retry_in_ms = next_attempt_ms - e.finished_ms,
                error = %detail, "notification failed; will retry"
            ),
            AttemptEnd::Failed { detail, .. } => tracing::error!(
                message = %m.id, recipient = %m.recipient, channel = %m.channel,
                target = %m.target, attempt, error = %detail,
                "notification failed for good"
            ),
        }
        let Some(sink) = &self.sink else {
            return;
        };
        let findings = match log.message_findings(&m.id) {
            Ok(f) => f.into_iter().map(|f| f.dedup_key).collect(),
            Err(err) => {
                tracing::warn!(message = %m.id, error = %err, "cannot read a message's findings");
                Vec::new()
            }
        };
        let record = AttemptRecord {
            findings,
            message_id: m.id.clone(),
            recipient: m.recipient.clone(),
            receiver: m.receiver.clone(),
            channel: m.channel.clone(),
            channel_type: m.channel_type.clone(),
            target: m.target.clone(),
            kinds: m.kinds.clone(),
            severity: m.severity.clone(),
            created_ms: m.created_ms,
            attempt,
            started_ms: e.started_ms,
            finished_ms: e.finished_ms,
            outcome,
            detail,
        };
        if sink.try_send(record).is_err() {
            metrics::counter!("keywatch_notify_records_dropped_total").increment(1);
        }
    }
}

/// Whether a message that failed for good is told to the operators: not when it was
/// itself about a failure (no loop).
pub fn tells_failure(m: &MessageRow) -> bool {
    !m.kinds
        .split(',')
        .any(|k| k == Kind::NotificationFailed.as_str())
}

/// `notification_failed` for the operators: who could not be told what, and why.
pub fn failure_item(
    m: &MessageRow,
    findings: &[MessageFinding],
    detail: &str,
    now_ms: i64,
) -> Item {
    let key_id = findings
        .first()
        .map_or_else(|| "-".to_owned(), |f| f.key_id.clone());
    Item {
        kind: Kind::NotificationFailed,
        key_id,
        owner: None,
        at_ms: now_ms,
        severity: Severity::Warning,
        summary: format!(
            "keywatch could not notify {} by {} ({}): {detail}; {} finding(s) not delivered: {}",
            m.recipient,
            m.channel,
            m.target,
            findings.len(),
            m.kinds
        ),
        evidence: serde_json::json!({
            "message_id": m.id,
            "recipient": m.recipient,
            "receiver": m.receiver,
            "channel": m.channel,
            "channel_type": m.channel_type,
            "target": m.target,
            "error": detail,
            "findings": findings.iter().map(|f| &f.dedup_key).collect::<Vec<_>>(),
        }),
        dedup_key: format!("notification_failed:{}:{}", m.recipient, m.channel),
    }
}

/// Writes the attempts received on `rx` to the shared log (ClickHouse in full mode): one
/// insert per 500 records or per
/// second, whichever comes first. Transient failures are retried with backoff (records
/// keep arriving meanwhile, up to a backlog of 50,000; older ones are dropped beyond it and
/// counted in `keywatch_notify_records_dropped_total`); records the server refuses for good
/// are logged and dropped. When the channel closes, what is left is written (retrying for
/// up to 10 s) and the task ends.
pub async fn run_attempt_sink<S: AttemptLog>(store: S, mut rx: mpsc::Receiver<AttemptRecord>) {
    use tokio::time::{sleep_until, Instant};
    let mut buf: Vec<AttemptRecord> = Vec::new();
    let mut open = true;
    let mut delay = Duration::from_millis(200);
    let mut retry_at: Option<Instant> = None;
    let mut closed_at: Option<Instant> = None;
    loop {
        // Take records until the batch is full or its time (or the retry's) has come.
        let deadline = retry_at.unwrap_or_else(|| Instant::now() + SINK_EVERY);
        while open && (retry_at.is_some() || buf.len() < SINK_ROWS) {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => {
                        buf.push(r);
                        if buf.len() > SINK_BACKLOG {
                            buf.remove(0);
                            metrics::counter!("keywatch_notify_records_dropped_total")
                                .increment(1);
                        }
                    }
                    None => {
                        open = false;
                        closed_at = Some(Instant::now());
                    }
                },
                _ = sleep_until(deadline) => break,
            }
        }
        if let Some(at) = retry_at {
            sleep_until(at).await;
        }
        if buf.is_empty() {
            if open {
                continue;
            }
            return;
        }
        let n = buf.len().min(SINK_ROWS);
        match store.record_attempts(&buf[..n]).await {
            Ok(()) => {
                buf.drain(..n);
                delay = Duration::from_millis(200);
                retry_at = None;
            }
            Err(e) if e.is_transient() => {
                if closed_at.is_some_and(|t| t.elapsed() >= SINK_DRAIN_FOR) {
                    tracing::warn!(error = %e, records = buf.len(),
                        "notification attempts not recorded in ClickHouse at shutdown");
                    metrics::counter!("keywatch_notify_records_dropped_total")
                        .increment(buf.len() as u64);
                    return;
                }
                tracing::warn!(error = %e, retry_in = ?delay,
                    "recording notification attempts in ClickHouse failed; will retry");
                retry_at = Some(Instant::now() + delay);
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => {
                tracing::error!(error = %e, records = n,
                    "ClickHouse refused notification attempts; dropping them");
                metrics::counter!("keywatch_notify_records_dropped_total").increment(n as u64);
                buf.drain(..n);
                retry_at = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::log::NewMessage;
    use crate::store::SqliteStore;

    /// A message about `kinds` queued in a fresh log, as the log returns it.
    fn queued(kinds: &str) -> (tempfile::TempDir, SqliteStore, MessageRow) {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SqliteStore::open(dir.path()).unwrap();
        let new = NewMessage {
            id: "m1".into(),
            recipient: "owner:acme".into(),
            receiver: "owner".into(),
            channel: "tg".into(),
            channel_type: "telegram".into(),
            target: "telegram:-100".into(),
            address: "{}".into(),
            group_key: "g".into(),
            kinds: kinds.into(),
            severity: "warning".into(),
            created_ms: 1,
            payload: "{}".into(),
            findings: vec![finding()],
        };
        log.enqueue(&[new], &[], 1).unwrap();
        let m = log.notify_message("m1").unwrap().unwrap();
        (dir, log, m)
    }

    fn finding() -> MessageFinding {
        MessageFinding {
            dedup_key: "unknown_key:k9".into(),
            kind: "unknown_key".into(),
            key_id: "k9".into(),
            owner: None,
        }
    }

    #[test]
    fn outcomes_name_the_ending() {
        let d = || "503".to_owned();
        let cases = [
            (AttemptEnd::Ok, "ok", None),
            (
                AttemptEnd::Retry {
                    next_attempt_ms: 5,
                    detail: d(),
                },
                "transient",
                Some(d()),
            ),
            (
                AttemptEnd::Failed {
                    transient: true,
                    detail: d(),
                },
                "gave_up",
                Some(d()),
            ),
            (
                AttemptEnd::Failed {
                    transient: false,
                    detail: d(),
                },
                "permanent",
                Some(d()),
            ),
        ];
        for (end, name, detail) in cases {
            assert_eq!(outcome(&end), (name, detail), "{end:?}");
        }
    }

    #[test]
    fn failures_are_told_once_and_say_what_was_lost() {
        assert!(tells_failure(&queued("lingering_old_key,unknown_key").2));
        assert!(!tells_failure(&queued("unknown_key,notification_failed").2));
        let findings = [finding()];
        let (_dir, _log, m) = queued("unknown_key");
        let i = failure_item(&m, &findings, "chat not found", 7);
        assert_eq!(i.kind, Kind::NotificationFailed);
        assert_eq!(i.key_id, "k9");
        assert_eq!(i.at_ms, 7);
        assert_eq!(i.dedup_key, "notification_failed:owner:acme:tg");
        assert_eq!(i.evidence["findings"][0], "unknown_key:k9");
        assert!(i.summary.contains("chat not found"), "{}", i.summary);
        assert_eq!(failure_item(&m, &[], "x", 7).key_id, "-");
    }

    #[test]
    fn attempts_go_to_the_sink_with_their_findings_and_are_dropped_when_it_is_full() {
        let (_dir, log, m) = queued("unknown_key");
        let (tx, mut rx) = mpsc::channel(1);
        let mut r = Recorder::default();
        r.set_sink(tx);
        let end = AttemptEnd::Retry {
            next_attempt_ms: 10,
            detail: "503".into(),
        };
        let ended = Ended {
            message: &m,
            attempt: 1,
            started_ms: 2,
            finished_ms: 3,
            end: &end,
        };
        r.record(&log, ended);
        r.record(&log, ended); // the sink holds one: dropped, not waited for
        let got = rx.try_recv().unwrap();
        assert_eq!(got.findings, ["unknown_key:k9"]);
        assert_eq!(
            (got.outcome, got.detail.as_deref()),
            ("transient", Some("503"))
        );
        assert_eq!((got.started_ms, got.finished_ms, got.attempt), (2, 3, 1));
        assert!(rx.try_recv().is_err());
    }
}
