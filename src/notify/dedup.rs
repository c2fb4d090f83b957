//! Dedup (stage 3 of the pipeline): a fact (`dedup_key`) is told to a recipient once, or
//! again after its repeat interval when it is raised again.
//!
//! Contract: what was told is in the notification log ([`NotifyLog::fact_last`]), with a
//! bounded cache in front of it; a fact this instance never told is looked up in the
//! consumer group's shared log when there is one ([`SharedLog`]): delivered by another
//! instance counts as told then. An unreadable shared log tells the fact (at least once
//! rather than perhaps never).

use std::collections::HashMap;
use std::sync::Arc;

use super::log::{NotifyLog, SharedLog};
use super::NotifyError;

/// Told-fact cache entries before it is cleared.
const MAX_TOLD_CACHE: usize = 200_000;

/// What this instance (and its group) told whom, and when.
#[derive(Default)]
pub struct Dedup {
    /// (recipient, dedup key) → when last told: a cache of the log.
    told: HashMap<(String, String), Option<i64>>,
    shared: Option<Arc<dyn SharedLog>>,
}

impl Dedup {
    /// Consults `shared` for facts the log has never told.
    pub fn set_shared(&mut self, shared: Arc<dyn SharedLog>) {
        self.shared = Some(shared);
    }

    /// When the fact was last told to the recipient, if ever.
    pub fn last_told(
        &mut self,
        log: &impl NotifyLog,
        recipient: &str,
        dedup_key: &str,
    ) -> Result<Option<i64>, NotifyError> {
        let k = (recipient.to_owned(), dedup_key.to_owned());
        if let Some(t) = self.told.get(&k) {
            return Ok(*t);
        }
        let mut t = log.fact_last(recipient, dedup_key)?;
        if let (None, Some(shared)) = (t, &self.shared) {
            match shared.last_delivered(recipient, dedup_key) {
                Ok(Some(at)) => {
                    metrics::counter!("keywatch_notify_told_elsewhere_total").increment(1);
                    tracing::debug!(%recipient, finding = %dedup_key, "told by another instance");
                    t = Some(at);
                }
                Ok(None) => {}
                // Unknown: tell it (at least once, rather than perhaps never).
                Err(e) => tracing::warn!(error = %e, "cannot read the shared notification log"),
            }
        }
        if self.told.len() >= MAX_TOLD_CACHE {
            self.told.clear();
        }
        self.told.insert(k, t);
        Ok(t)
    }

    /// The fact was queued for the recipient at `now_ms` (the log has it too).
    pub fn told(&mut self, recipient_and_key: (String, String), now_ms: i64) {
        self.told.insert(recipient_and_key, Some(now_ms));
    }
}

/// Whether to tell a fact last told at `last` (never: `None`) with the repeat interval
/// `repeat` (`None`: never repeated): `None` not now, `Some(repeated)` yes.
pub fn verdict(last: Option<i64>, repeat: Option<i64>, now_ms: i64) -> Option<bool> {
    match (last, repeat) {
        (None, _) => Some(false),
        (Some(t), Some(every)) if now_ms.saturating_sub(t) >= every => Some(true),
        (Some(_), _) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::log::{MessageFinding, NewMessage};
    use crate::store::SqliteStore;

    #[test]
    fn verdicts() {
        // (last told, repeat every, now, verdict)
        let cases = [
            (None, None, 0, Some(false)),
            (None, Some(10), 0, Some(false)),
            (Some(0), None, 1_000_000, None),
            (Some(0), Some(10), 9, None),
            (Some(0), Some(10), 10, Some(true)),
            (Some(i64::MIN), Some(10), i64::MAX, Some(true)),
        ];
        for (last, repeat, now, want) in cases {
            assert_eq!(
                verdict(last, repeat, now),
                want,
                "{last:?} {repeat:?} {now}"
            );
        }
    }

    #[test]
    fn the_log_answers_once_then_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SqliteStore::open(dir.path()).unwrap();
        let mut d = Dedup::default();
        assert_eq!(d.last_told(&log, "owner:o", "f1").unwrap(), None);
        let message = NewMessage {
            id: "m".into(),
            recipient: "owner:o".into(),
            receiver: "owner".into(),
            channel: "console".into(),
            channel_type: "console".into(),
            target: "console".into(),
            address: "{}".into(),
            group_key: "g".into(),
            kinds: "unknown_key".into(),
            severity: "info".into(),
            created_ms: 7,
            payload: "{}".into(),
            findings: vec![MessageFinding {
                dedup_key: "f1".into(),
                kind: "unknown_key".into(),
                key_id: "k".into(),
                owner: None,
            }],
        };
        let told = [("owner:o".to_owned(), "f1".to_owned())];
        log.enqueue(&[message], &told, 7).unwrap();
        // Cached: the notifier marks what it queued itself.
        assert_eq!(d.last_told(&log, "owner:o", "f1").unwrap(), None);
        d.told(told[0].clone(), 7);
        assert_eq!(d.last_told(&log, "owner:o", "f1").unwrap(), Some(7));
        // A fresh cache reads the log.
        assert_eq!(
            Dedup::default().last_told(&log, "owner:o", "f1").unwrap(),
            Some(7)
        );
        assert_eq!(d.last_told(&log, "owner:p", "f1").unwrap(), None);
    }
}
