//! Grouping (stage 4 of the pipeline): findings with the same grouping labels for one
//! recipient and route share a message. The first waits `group_wait` for company, later
//! ones `group_interval` after the group's last message; a recipient's quiet hours hold
//! back all but severe findings until they end.
//!
//! Contract: pure, no IO. The notifier mirrors every waiting finding in the notification
//! log (`notify_pending`), so that a restart puts them back with their original times; a
//! fact waits in at most one group per recipient.

use std::collections::{BTreeMap, HashMap};

use super::route::Item;
use crate::detect::Severity;

/// Identifies a group: one recipient, one route, equal grouping labels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId {
    pub recipient: String,
    pub receiver: String,
    pub route: usize,
    pub values: String,
}

/// A finding waiting in its group.
#[derive(Debug, Clone)]
pub struct Waiting {
    pub item: Item,
    pub raised_ms: i64,
    /// Told before: this is a repeat after the repeat interval.
    pub repeated: bool,
}

#[derive(Debug)]
struct Group {
    /// By dedup key.
    items: BTreeMap<String, Waiting>,
    next_flush_ms: i64,
}

/// (recipient, dedup key).
pub type Fact = (String, String);

/// The groups and what waits in them.
#[derive(Debug, Default)]
pub struct Groups {
    groups: BTreeMap<GroupId, Group>,
    /// Which group a fact waits in.
    waiting: HashMap<Fact, GroupId>,
}

impl Groups {
    /// When the fact already waits for the recipient, keeps its latest version (and the
    /// later raise time) and returns true.
    pub fn refresh(&mut self, recipient: &str, item: &Item, raised_ms: i64) -> bool {
        let fact = (recipient.to_owned(), item.dedup_key.clone());
        let Some(gid) = self.waiting.get(&fact) else {
            return false;
        };
        if let Some(w) = self
            .groups
            .get_mut(gid)
            .and_then(|g| g.items.get_mut(&item.dedup_key))
        {
            w.item = item.clone();
            w.raised_ms = w.raised_ms.max(raised_ms);
        }
        true
    }

    /// Puts a finding in its group; a new group flushes first at `first_flush_ms`.
    pub fn add(&mut self, gid: GroupId, w: Waiting, first_flush_ms: i64) {
        let fact = (gid.recipient.clone(), w.item.dedup_key.clone());
        let g = self.groups.entry(gid.clone()).or_insert_with(|| Group {
            items: BTreeMap::new(),
            next_flush_ms: first_flush_ms,
        });
        g.items.insert(w.item.dedup_key.clone(), w);
        self.waiting.insert(fact, gid);
    }

    pub fn is_waiting(&self, fact: &Fact) -> bool {
        self.waiting.contains_key(fact)
    }

    /// The fact no longer waits (queued in a message, or dropped).
    pub fn forget(&mut self, fact: &Fact) {
        self.waiting.remove(fact);
    }

    /// Groups with findings whose flush time has come (every one with `force`).
    pub fn due(&self, now_ms: i64, force: bool) -> Vec<GroupId> {
        self.groups
            .iter()
            .filter(|(_, g)| !g.items.is_empty() && (force || g.next_flush_ms <= now_ms))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The earliest flush of a group with findings.
    pub fn next_flush_ms(&self) -> Option<i64> {
        self.groups
            .values()
            .filter(|g| !g.items.is_empty())
            .map(|g| g.next_flush_ms)
            .min()
    }

    /// Drops empty groups past their interval (an empty group only keeps its interval).
    pub fn prune(&mut self, now_ms: i64) {
        self.groups
            .retain(|_, g| !g.items.is_empty() || g.next_flush_ms > now_ms);
    }

    /// Takes a group's findings out for a flush; they still count as waiting until
    /// [`Groups::forget`], [`Groups::put_back`] or [`Groups::flushed`].
    pub fn take(&mut self, gid: &GroupId) -> Option<BTreeMap<String, Waiting>> {
        self.groups
            .get_mut(gid)
            .map(|g| std::mem::take(&mut g.items))
    }

    /// Findings go back into their group unchanged (a flush that could not queue them).
    pub fn put_back(&mut self, gid: &GroupId, items: impl IntoIterator<Item = Waiting>) {
        if let Some(g) = self.groups.get_mut(gid) {
            for w in items {
                g.items.insert(w.item.dedup_key.clone(), w);
            }
        }
    }

    /// After a flush at `now_ms`: `hold` waits on; the next flush is `interval_ms` after a
    /// message that went out, and not before the quiet hours end when something is held.
    pub fn flushed(
        &mut self,
        gid: &GroupId,
        hold: BTreeMap<String, Waiting>,
        sent: bool,
        interval_ms: i64,
        quiet_until_ms: Option<i64>,
        now_ms: i64,
    ) {
        let Some(g) = self.groups.get_mut(gid) else {
            return;
        };
        if sent {
            g.next_flush_ms = now_ms.saturating_add(interval_ms);
        }
        if let Some(until) = quiet_until_ms.filter(|_| !hold.is_empty()) {
            g.next_flush_ms = g.next_flush_ms.max(until);
        }
        g.items = hold;
    }
}

/// A flushed group's findings, sorted out.
#[derive(Debug, Default)]
pub struct Split {
    /// Dedup keys of findings silenced or inhibited while they waited.
    pub dropped: Vec<String>,
    /// Held back by quiet hours.
    pub hold: BTreeMap<String, Waiting>,
    /// To send, by event time.
    pub send: Vec<Waiting>,
}

/// Sorts a flushed group's findings: `drop` says which are silenced or inhibited now; in
/// quiet hours (`quiet_except`: the severity that still goes out) the less severe wait.
pub fn split(
    waiting: BTreeMap<String, Waiting>,
    drop: impl Fn(&Waiting) -> bool,
    quiet_except: Option<Severity>,
) -> Split {
    let mut out = Split::default();
    for (k, w) in waiting {
        if drop(&w) {
            out.dropped.push(k);
        } else if quiet_except.is_some_and(|except| w.item.severity < except) {
            out.hold.insert(k, w);
        } else {
            out.send.push(w);
        }
    }
    out.send
        .sort_by(|a, b| (a.item.at_ms, &a.item.dedup_key).cmp(&(b.item.at_ms, &b.item.dedup_key)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::route::Kind;

    fn waiting(key: &str, at: i64, severity: Severity) -> Waiting {
        Waiting {
            item: Item {
                kind: Kind::NotificationFailed,
                key_id: "k".into(),
                owner: None,
                at_ms: at,
                severity,
                summary: String::new(),
                evidence: serde_json::Value::Null,
                dedup_key: key.into(),
            },
            raised_ms: at,
            repeated: false,
        }
    }

    fn gid(values: &str) -> GroupId {
        GroupId {
            recipient: "owner:o".into(),
            receiver: "owner".into(),
            route: 0,
            values: values.into(),
        }
    }

    #[test]
    fn a_group_waits_then_flushes_at_its_interval() {
        let mut g = Groups::default();
        g.add(gid("a"), waiting("f1", 0, Severity::Info), 30);
        assert!(g.refresh("owner:o", &waiting("f1", 5, Severity::Info).item, 5));
        assert!(!g.refresh("owner:p", &waiting("f1", 5, Severity::Info).item, 5));
        g.add(gid("a"), waiting("f2", 10, Severity::Info), 999);
        assert_eq!(
            g.next_flush_ms(),
            Some(30),
            "the group keeps its first flush time"
        );
        assert!(g.due(29, false).is_empty());
        assert_eq!(g.due(29, true), [gid("a")]);
        assert_eq!(g.due(30, false), [gid("a")]);
        let items = g.take(&gid("a")).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(g.next_flush_ms(), None, "taken out");
        for k in items.keys() {
            g.forget(&("owner:o".into(), k.clone()));
        }
        g.flushed(&gid("a"), BTreeMap::new(), true, 300, None, 30);
        g.prune(329);
        g.add(gid("a"), waiting("f3", 100, Severity::Info), 130);
        assert_eq!(
            g.next_flush_ms(),
            Some(330),
            "group_interval after the last message"
        );
        g.take(&gid("a"));
        g.flushed(&gid("a"), BTreeMap::new(), false, 300, None, 330);
        g.prune(330);
        assert!(g.take(&gid("a")).is_none(), "empty and past its interval");
    }

    #[test]
    fn held_findings_wait_for_the_end_of_quiet_hours() {
        let mut g = Groups::default();
        g.add(gid("a"), waiting("f1", 0, Severity::Info), 0);
        let items = g.take(&gid("a")).unwrap();
        g.flushed(&gid("a"), items, false, 300, Some(5000), 0);
        assert_eq!(g.next_flush_ms(), Some(5000));
        assert!(g.is_waiting(&("owner:o".into(), "f1".into())));
        g.put_back(&gid("a"), [waiting("f2", 1, Severity::Info)]);
        assert_eq!(g.take(&gid("a")).unwrap().len(), 2);
    }

    #[test]
    fn split_drops_holds_and_sends_by_time() {
        let items: BTreeMap<String, Waiting> = [
            waiting("a", 30, Severity::Info),
            waiting("b", 10, Severity::Critical),
            waiting("c", 20, Severity::Warning),
            waiting("x", 0, Severity::Critical),
        ]
        .into_iter()
        .map(|w| (w.item.dedup_key.clone(), w))
        .collect();
        // (quiet hours except, dropped, held, sent)
        type Case = (
            Option<Severity>,
            &'static [&'static str],
            &'static [&'static str],
            &'static [&'static str],
        );
        let cases: [Case; 3] = [
            (None, &["x"], &[], &["b", "c", "a"]),
            (Some(Severity::Warning), &["x"], &["a"], &["b", "c"]),
            (Some(Severity::Critical), &["x"], &["a", "c"], &["b"]),
        ];
        for (quiet, dropped, held, sent) in cases {
            let s = split(items.clone(), |w| w.item.dedup_key == "x", quiet);
            assert_eq!(s.dropped, dropped, "{quiet:?}");
            assert_eq!(s.hold.keys().collect::<Vec<_>>(), held, "{quiet:?}");
            let keys: Vec<&str> = s.send.iter().map(|w| w.item.dedup_key.as_str()).collect();
            assert_eq!(keys, sent, "{quiet:?}");
        }
    }
}
