//! Inhibition (stage 2 of the pipeline, with [`super::silence`]): `[[inhibit]]` rules hold
//! back target findings while a source finding holds for the same key or owner (a
//! `safe_to_revoke` for a key holds back that key's lingering-source reminders).
//!
//! Contract: a target is held back when a source for the same value was raised at or after
//! the target (so a source raised with its targets in one batch holds them back: callers
//! note the batch's sources first). Pure, no IO; the state is the latest raise per rule and
//! value, kept for the notifier's life.

use std::collections::HashMap;

use super::route::{Inhibit, Item};
use super::Hold;

/// The rules, and the latest raise of each rule's source findings by the value they share
/// with targets.
#[derive(Debug)]
pub struct Inhibitors {
    rules: Vec<Inhibit>,
    raised: HashMap<(usize, String), i64>,
}

impl Hold for Inhibitors {
    fn holds(&self, item: &Item, raised_ms: i64, _now_ms: i64) -> bool {
        self.inhibited(item, raised_ms)
    }

    fn metric(&self) -> &'static str {
        "keywatch_notify_inhibited_total"
    }
}

impl Inhibitors {
    pub fn new(rules: Vec<Inhibit>) -> Inhibitors {
        Inhibitors {
            rules,
            raised: HashMap::new(),
        }
    }

    /// Notes the source findings among `items`, raised at `raised_ms`.
    pub fn note(&mut self, items: &[Item], raised_ms: i64) {
        for item in items {
            for (i, rule) in self.rules.iter().enumerate() {
                if !rule.sources.contains(&item.kind) {
                    continue;
                }
                if let Some(v) = rule.value(item) {
                    let t = self.raised.entry((i, v.to_owned())).or_insert(raised_ms);
                    *t = (*t).max(raised_ms);
                }
            }
        }
    }

    /// Whether a source holds back `item`, raised at `raised_ms`.
    pub fn inhibited(&self, item: &Item, raised_ms: i64) -> bool {
        self.rules.iter().enumerate().any(|(i, rule)| {
            rule.targets.contains(&item.kind)
                && rule.value(item).is_some_and(|v| {
                    self.raised
                        .get(&(i, v.to_owned()))
                        .is_some_and(|t| *t >= raised_ms)
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::{FindingKind, Severity};
    use crate::notify::route::{Equal, Kind};

    fn item(kind: FindingKind, key: &str, owner: &str) -> Item {
        Item {
            kind: Kind::Finding(kind),
            key_id: key.into(),
            owner: Some(owner.into()),
            at_ms: 0,
            severity: Severity::Warning,
            summary: String::new(),
            evidence: serde_json::Value::Null,
            dedup_key: format!("{kind}:{key}"),
        }
    }

    fn rule(equal: Equal) -> Inhibit {
        Inhibit {
            sources: [Kind::Finding(FindingKind::SafeToRevoke)].into(),
            targets: [Kind::Finding(FindingKind::LingeringOldKey)].into(),
            equal,
        }
    }

    #[test]
    fn sources_hold_back_targets_of_the_same_value_raised_no_later() {
        use FindingKind::{LingeringOldKey as Linger, RevokedKeyUsed, SafeToRevoke as Safe};
        // (rule, source, target, target raised at, inhibited); sources raised at 100.
        let cases = [
            (Equal::Key, ("k1", "o"), (Linger, "k1", "o"), 100, true),
            (Equal::Key, ("k1", "o"), (Linger, "k1", "o"), 50, true),
            (Equal::Key, ("k1", "o"), (Linger, "k1", "o"), 101, false),
            (Equal::Key, ("k1", "o"), (Linger, "k2", "o"), 50, false),
            (
                Equal::Key,
                ("k1", "o"),
                (RevokedKeyUsed, "k1", "o"),
                50,
                false,
            ),
            (Equal::Owner, ("k1", "o"), (Linger, "k2", "o"), 50, true),
            (Equal::Owner, ("k1", "o"), (Linger, "k2", "p"), 50, false),
        ];
        for (equal, (sk, so), (kind, tk, to), at, want) in cases {
            let mut inh = Inhibitors::new(vec![rule(equal)]);
            inh.note(&[item(Safe, sk, so)], 100);
            // An earlier raise of the same source does not move its time back.
            inh.note(&[item(Safe, sk, so)], 10);
            assert_eq!(
                inh.holds(&item(kind, tk, to), at, 0),
                want,
                "{equal:?} {kind} {tk} {to} at {at}"
            );
        }
    }
}
