//! Where findings go once raised: the store's findings table, then the notifier.
//!
//! Contract:
//! - [`FindingSink::before_commit`]: the stream and anomaly findings of a batch are stored
//!   and handed to the notifier, which confirms once they are in its log
//!   ([`Input::Durable`]); the batch is committed only then. After a crash before the commit
//!   the batch is read again and raises them again (stored already: not new), and the
//!   notifier's log knows what it has told, so a finding is neither lost nor told twice. All
//!   of them go to the notifier, new or not, for that reason.
//! - [`FindingSink::evaluated`]: every finding of an evaluation (new or not: the
//!   notification log deduplicates, and a finding raised again is what drives reminders and
//!   repeats) with the open rotations' state.
//! - A full channel makes the pipeline wait: no finding is dropped. A notifier that does not
//!   confirm within [`NOTIFIER_ACK_WAIT`] does not stop ingestion (the findings are in the
//!   findings table).
//! - Without a notifier (a backtest) findings are only stored; the new ones are kept, in the
//!   order raised, for the run's report.
//!
//! This is where sync meets async: the pipeline is a blocking task, the notifier a tokio
//! task; `blocking_send` and `Handle::block_on` bridge them, so the sink must run on a
//! blocking thread of a runtime when it has a notifier.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::detect::{Finding, RotationStatus};
use crate::notify::Input;
use crate::registry::Registry;
use crate::store::{Store, StoreError};

/// How long the pipeline waits for the notifier to confirm a batch's findings.
pub const NOTIFIER_ACK_WAIT: Duration = Duration::from_secs(30);

/// Stores findings and hands them to the notifier.
#[derive(Default)]
pub struct FindingSink {
    /// The notifier's input; `None` in a backtest.
    out: Option<mpsc::Sender<Input>>,
    /// Every new finding of this run, in the order raised.
    raised: Vec<Finding>,
}

impl FindingSink {
    pub fn new(out: Option<mpsc::Sender<Input>>) -> FindingSink {
        FindingSink {
            out,
            raised: Vec::new(),
        }
    }

    /// The new findings of the run so far, in the order raised.
    pub fn raised(&self) -> &[Finding] {
        &self.raised
    }

    pub fn take_raised(&mut self) -> Vec<Finding> {
        std::mem::take(&mut self.raised)
    }

    /// A batch's stream and anomaly findings, before the batch is committed (see the module
    /// doc): stored, then handed over durably. The pipeline retries a transient store error
    /// (see [`Self::record`] and [`Self::hand_over`] for the two halves).
    pub fn before_commit(
        &mut self,
        store: &mut dyn Store,
        found: Vec<Finding>,
    ) -> Result<(), StoreError> {
        self.record(store, &found)?;
        self.hand_over(found);
        Ok(())
    }

    /// Hands findings already stored to the notifier and waits until they are in its log.
    pub fn hand_over(&mut self, found: Vec<Finding>) {
        if !found.is_empty() {
            self.send_durably(found);
        }
    }

    /// An evaluation's findings and the rotations it looked at.
    pub fn evaluated(
        &mut self,
        store: &mut dyn Store,
        findings: Vec<Finding>,
        rotations: Vec<RotationStatus>,
    ) -> Result<(), StoreError> {
        self.record(store, &findings)?;
        if !findings.is_empty() || !rotations.is_empty() {
            self.send(Input::Evaluated {
                findings,
                rotations,
            });
        }
        Ok(())
    }

    /// The registry changed (reload or lifecycle event): the notifier needs the owners'
    /// contacts and time zones.
    pub fn registry(&mut self, registry: Arc<Registry>) {
        self.send(Input::Registry(registry));
    }

    /// [`Self::registry`] from async code (before the pipeline's blocking task starts).
    pub async fn registry_async(&mut self, registry: Arc<Registry>) {
        if let Some(out) = &self.out {
            if out.send(Input::Registry(registry)).await.is_err() {
                tracing::debug!("the notifier has stopped");
            }
        }
    }

    fn send(&mut self, input: Input) {
        if let Some(out) = &self.out {
            if out.blocking_send(input).is_err() {
                tracing::debug!("the notifier has stopped; findings stay in the store");
            }
        }
    }

    /// Sends findings to the notifier and waits until they are in its log (at most
    /// [`NOTIFIER_ACK_WAIT`]).
    fn send_durably(&mut self, findings: Vec<Finding>) {
        let Some(out) = &self.out else {
            return;
        };
        let (ack, confirmed) = tokio::sync::oneshot::channel();
        if out.blocking_send(Input::Durable { findings, ack }).is_err() {
            tracing::debug!("the notifier has stopped; findings stay in the store");
            return;
        }
        let waited = tokio::runtime::Handle::current()
            .block_on(tokio::time::timeout(NOTIFIER_ACK_WAIT, confirmed));
        match waited {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => tracing::error!(
                "the notifier could not log findings; they are in the findings table"
            ),
            Ok(Err(_)) => tracing::debug!("the notifier has stopped; findings stay in the store"),
            Err(_) => tracing::warn!(
                wait = ?NOTIFIER_ACK_WAIT,
                "the notifier did not confirm findings in time; storing the batch anyway"
            ),
        }
    }

    /// Stores findings; keeps those never stored before (logged and counted here).
    pub fn record(&mut self, store: &mut dyn Store, found: &[Finding]) -> Result<(), StoreError> {
        if found.is_empty() {
            return Ok(());
        }
        let Some(ds) = store.detection() else {
            return Ok(());
        };
        let new = ds.record_findings(found)?;
        for f in &new {
            metrics::counter!("keywatch_findings_total", "kind" => f.kind.as_str()).increment(1);
            tracing::warn!(
                kind = f.kind.as_str(),
                key = %f.key_id,
                owner = f.owner.as_deref().unwrap_or("-"),
                severity = f.severity.as_str(),
                "{}",
                f.summary
            );
        }
        self.raised.extend(new);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::{FindingKind, Severity};
    use crate::store::SqliteStore;

    fn finding(dedup: &str) -> Finding {
        Finding {
            kind: FindingKind::RevokedKeyUsed,
            key_id: "k".into(),
            owner: Some("o".into()),
            at_ms: 1_795_132_800_000,
            severity: Severity::Critical,
            summary: "s".into(),
            evidence: serde_json::json!({}),
            dedup_key: dedup.into(),
        }
    }

    #[test]
    fn a_fact_raised_again_is_stored_once_and_reported_new_once() {
        let mut store = SqliteStore::open_file(std::path::Path::new(":memory:")).unwrap();
        let mut sink = FindingSink::new(None);
        sink.before_commit(&mut store, vec![finding("a"), finding("b")])
            .unwrap();
        sink.evaluated(&mut store, vec![finding("a"), finding("c")], Vec::new())
            .unwrap();
        let keys: Vec<_> = sink.raised().iter().map(|f| f.dedup_key.as_str()).collect();
        assert_eq!(keys, ["a", "b", "c"]);
        assert_eq!(sink.take_raised().len(), 3);
        assert!(sink.raised().is_empty());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn findings_reach_the_notifier_durably_before_the_call_returns() {
        let (tx, mut rx) = mpsc::channel(4);
        let notifier = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(input) = rx.recv().await {
                match input {
                    Input::Durable { findings, ack } => {
                        seen.extend(findings.into_iter().map(|f| f.dedup_key));
                        ack.send(true).unwrap();
                    }
                    Input::Evaluated { findings, .. } => {
                        seen.extend(findings.into_iter().map(|f| f.dedup_key))
                    }
                    _ => {}
                }
            }
            seen
        });
        tokio::task::spawn_blocking(move || {
            let mut store = SqliteStore::open_file(std::path::Path::new(":memory:")).unwrap();
            let mut sink = FindingSink::new(Some(tx));
            sink.before_commit(&mut store, vec![finding("a")]).unwrap();
            // Known already: still handed on (the notifier's log decides what is left to tell).
            sink.before_commit(&mut store, vec![finding("a")]).unwrap();
            sink.evaluated(&mut store, vec![finding("b")], Vec::new())
                .unwrap();
        })
        .await
        .unwrap();
        assert_eq!(notifier.await.unwrap(), ["a", "a", "b"]);
    }
}
