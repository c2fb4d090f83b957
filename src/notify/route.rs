//! Routing: which receivers a finding goes to, how it is grouped, when the recipient does
//! not want to be disturbed, and which findings silence others. Pure, no IO.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use chrono::{NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::detect::{Finding, FindingKind, KindInfo, Severity};
use crate::registry::local_to_utc;

/// What a notification is about: a finding's kind, or the notifier's own trouble.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Finding(FindingKind),
    /// A message could not be delivered for good (a permanent error, or retried too long):
    /// the operators have to fix a contact or a channel.
    NotificationFailed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Finding(k) => k.as_str(),
            Kind::NotificationFailed => "notification_failed",
        }
    }

    /// Every kind, findings first.
    pub fn all() -> impl Iterator<Item = Kind> {
        FindingKind::ALL
            .into_iter()
            .map(Kind::Finding)
            .chain([Kind::NotificationFailed])
    }

    /// The heading of the kind in messages.
    pub fn title(self) -> &'static str {
        match self {
            Kind::Finding(k) => k.title(),
            Kind::NotificationFailed => "Notification failed",
        }
    }

    /// The finding kind's facts (`detect::KINDS`); none for the notifier's own kind.
    pub fn finding(self) -> Option<&'static KindInfo> {
        match self {
            Kind::Finding(k) => Some(k.info()),
            Kind::NotificationFailed => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::all().find(|k| k.as_str() == s.trim()).ok_or_else(|| {
            let all: Vec<_> = Kind::all().map(|k| k.as_str()).collect();
            format!("unknown kind `{s}`, expected one of {}", all.join(", "))
        })
    }
}

impl Serialize for Kind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What the notifier tells: a finding, or a delivery failure for the operators.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub kind: Kind,
    pub key_id: String,
    pub owner: Option<String>,
    pub at_ms: i64,
    pub severity: Severity,
    pub summary: String,
    pub evidence: serde_json::Value,
    /// Names the fact; the notification log counts what was told by it.
    pub dedup_key: String,
}

impl From<Finding> for Item {
    fn from(f: Finding) -> Item {
        Item {
            kind: Kind::Finding(f.kind),
            key_id: f.key_id,
            owner: f.owner,
            at_ms: f.at_ms,
            severity: f.severity,
            summary: f.summary,
            evidence: f.evidence,
            dedup_key: f.dedup_key,
        }
    }
}

/// What findings of a group have in common.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupBy {
    Owner,
    Key,
    Kind,
    /// Every finding alone.
    Finding,
}

impl FromStr for GroupBy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "owner" => Ok(GroupBy::Owner),
            "key" => Ok(GroupBy::Key),
            "kind" => Ok(GroupBy::Kind),
            "finding" => Ok(GroupBy::Finding),
            other => Err(format!(
                "unknown grouping `{other}`, expected owner, key, kind or finding"
            )),
        }
    }
}

/// One `[[routes]]` entry, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Kinds it takes; `None`: all.
    pub kinds: Option<BTreeSet<Kind>>,
    pub min_severity: Severity,
    /// Owners it takes; `None`: all (findings without an owner too).
    pub owners: Option<BTreeSet<String>>,
    pub receivers: Vec<String>,
    pub group_by: Vec<GroupBy>,
    pub group_wait_ms: i64,
    pub group_interval_ms: i64,
    /// Overrides the per-kind repeat interval: `Some(None)` never repeats.
    pub repeat_ms: Option<Option<i64>>,
    /// Whether later routes are still tried after this one matched.
    pub continue_matching: bool,
}

impl Route {
    pub fn matches(&self, item: &Item) -> bool {
        self.kinds.as_ref().is_none_or(|k| k.contains(&item.kind))
            && item.severity >= self.min_severity
            && self
                .owners
                .as_ref()
                .is_none_or(|o| item.owner.as_ref().is_some_and(|x| o.contains(x)))
    }

    /// The values of the grouping labels, joined: findings with equal values share a message.
    pub fn group_values(&self, item: &Item) -> String {
        let mut out = Vec::with_capacity(self.group_by.len());
        for g in &self.group_by {
            out.push(match g {
                GroupBy::Owner => item.owner.clone().unwrap_or_else(|| "-".into()),
                GroupBy::Key => item.key_id.clone(),
                GroupBy::Kind => item.kind.as_str().to_owned(),
                GroupBy::Finding => item.dedup_key.clone(),
            });
        }
        out.join("|")
    }
}

/// The routes a finding takes, in order, with the receivers of each: every matching route
/// until one without `continue`.
pub fn matching<'r>(routes: &'r [Route], item: &Item) -> Vec<(usize, &'r str)> {
    let mut out = Vec::new();
    for (i, r) in routes.iter().enumerate() {
        if r.matches(item) {
            out.extend(r.receivers.iter().map(|name| (i, name.as_str())));
            if !r.continue_matching {
                break;
            }
        }
    }
    out
}

/// Hours in which a recipient only gets findings of at least `except` severity; the rest
/// waits until the hours end. In the recipient's time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietHours {
    pub start: NaiveTime,
    pub end: NaiveTime,
    pub except: Severity,
}

impl QuietHours {
    /// When the quiet hours around `now_ms` end, if `now_ms` is inside them.
    pub fn until(&self, now_ms: i64, tz: Tz) -> Option<i64> {
        let local = Utc
            .timestamp_millis_opt(now_ms)
            .single()?
            .with_timezone(&tz);
        let t = local.time();
        let inside = if self.start <= self.end {
            t >= self.start && t < self.end
        } else {
            t >= self.start || t < self.end
        };
        if !inside || self.start == self.end {
            return None;
        }
        let mut day = local.date_naive();
        if t >= self.end {
            day = day.succ_opt()?;
        }
        // An end the clocks skip (daylight-saving time starts) comes a little later.
        (0..=180)
            .map(|m| day.and_time(self.end) + chrono::Duration::minutes(m))
            .find_map(|n| local_to_utc(n, tz))
    }
}

/// `[[inhibit]]`: while a source finding holds for a key (or owner), target findings of the
/// same key (or owner) raised no later than it are not sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Inhibit {
    pub sources: BTreeSet<Kind>,
    pub targets: BTreeSet<Kind>,
    pub equal: Equal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Equal {
    Key,
    Owner,
}

impl Inhibit {
    /// The value a source and a target must share, or `None` when the item has none.
    pub fn value<'i>(&self, item: &'i Item) -> Option<&'i str> {
        match self.equal {
            Equal::Key => Some(item.key_id.as_str()),
            Equal::Owner => item.owner.as_deref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(kind: FindingKind, sev: Severity, owner: Option<&str>) -> Item {
        Item {
            kind: Kind::Finding(kind),
            key_id: "k1".into(),
            owner: owner.map(Into::into),
            at_ms: 0,
            severity: sev,
            summary: String::new(),
            evidence: serde_json::Value::Null,
            dedup_key: format!("{kind}:k1"),
        }
    }

    fn route(kinds: &[Kind], min: Severity, receivers: &[&str], cont: bool) -> Route {
        Route {
            kinds: (!kinds.is_empty()).then(|| kinds.iter().copied().collect()),
            min_severity: min,
            owners: None,
            receivers: receivers.iter().map(|s| s.to_string()).collect(),
            group_by: vec![GroupBy::Key, GroupBy::Kind],
            group_wait_ms: 0,
            group_interval_ms: 0,
            repeat_ms: None,
            continue_matching: cont,
        }
    }

    #[test]
    fn routes_match_in_order_until_one_does_not_continue() {
        use FindingKind::*;
        let routes = vec![
            route(
                &[Kind::Finding(RevokedKeyUsed), Kind::Finding(FailedRollover)],
                Severity::Warning,
                &["security"],
                true,
            ),
            route(
                &[
                    Kind::Finding(RotationReminder),
                    Kind::Finding(FailedRollover),
                ],
                Severity::Info,
                &["owner"],
                false,
            ),
            route(&[], Severity::Info, &["operations"], false),
        ];
        let cases: &[(FindingKind, Severity, &[&str])] = &[
            (
                RevokedKeyUsed,
                Severity::Critical,
                &["security", "operations"],
            ),
            (FailedRollover, Severity::Warning, &["security", "owner"]),
            (FailedRollover, Severity::Info, &["owner"]),
            (RotationReminder, Severity::Info, &["owner"]),
            (UnknownKey, Severity::Info, &["operations"]),
        ];
        for (kind, sev, want) in cases {
            let got: Vec<&str> = matching(&routes, &item(*kind, *sev, Some("acme")))
                .into_iter()
                .map(|(_, r)| r)
                .collect();
            assert_eq!(&got, want, "{kind} {sev}");
        }
        let mut by_owner = route(&[], Severity::Info, &["x"], false);
        by_owner.owners = Some(["acme".to_owned()].into());
        assert!(by_owner.matches(&item(UnknownKey, Severity::Info, Some("acme"))));
        assert!(!by_owner.matches(&item(UnknownKey, Severity::Info, Some("other"))));
        assert!(!by_owner.matches(&item(UnknownKey, Severity::Info, None)));
    }

    #[test]
    fn groups_follow_the_labels() {
        let mut r = route(&[], Severity::Info, &["owner"], false);
        let a = item(
            FindingKind::LingeringOldKey,
            Severity::Warning,
            Some("acme"),
        );
        let mut b = a.clone();
        b.dedup_key = "other source".into();
        assert_eq!(r.group_values(&a), r.group_values(&b));
        assert_eq!(r.group_values(&a), "k1|lingering_old_key");
        r.group_by = vec![GroupBy::Finding];
        assert_ne!(r.group_values(&a), r.group_values(&b));
        r.group_by = vec![GroupBy::Owner];
        assert_eq!(
            r.group_values(&item(FindingKind::UnknownKey, Severity::Info, None)),
            "-"
        );
    }

    #[test]
    fn kinds_parse_and_name_the_alternatives() {
        for k in Kind::all() {
            assert_eq!(k.as_str().parse::<Kind>(), Ok(k));
        }
        let e = "revoked".parse::<Kind>().unwrap_err();
        assert!(e.starts_with("unknown kind `revoked`, expected one of lingering_old_key"));
        assert!(e.ends_with("notification_failed"), "{e}");
    }

    fn at(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn quiet_hours_are_local_and_may_span_midnight() {
        let q = QuietHours {
            start: NaiveTime::from_hms_opt(22, 0, 0).unwrap(),
            end: NaiveTime::from_hms_opt(7, 0, 0).unwrap(),
            except: Severity::Critical,
        };
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        // 21:59 local (CET = UTC+1): not quiet.
        assert_eq!(q.until(at("2026-11-24T20:59:00Z"), berlin), None);
        // 22:30 local: until 07:00 local the next day.
        assert_eq!(
            q.until(at("2026-11-24T21:30:00Z"), berlin),
            Some(at("2026-11-25T06:00:00Z"))
        );
        // 03:00 local: until 07:00 the same day.
        assert_eq!(
            q.until(at("2026-11-25T02:00:00Z"), berlin),
            Some(at("2026-11-25T06:00:00Z"))
        );
        assert_eq!(q.until(at("2026-11-25T06:00:00Z"), berlin), None);
        // The night daylight-saving time starts (2026-03-29): 07:00 is CEST (UTC+2).
        assert_eq!(
            q.until(at("2026-03-28T23:00:00Z"), berlin),
            Some(at("2026-03-29T05:00:00Z"))
        );
        let day = QuietHours {
            start: NaiveTime::from_hms_opt(12, 0, 0).unwrap(),
            end: NaiveTime::from_hms_opt(13, 0, 0).unwrap(),
            except: Severity::Critical,
        };
        assert_eq!(
            day.until(at("2026-11-24T12:30:00Z"), Tz::UTC),
            Some(at("2026-11-24T13:00:00Z"))
        );
        assert_eq!(day.until(at("2026-11-24T13:30:00Z"), Tz::UTC), None);
    }
}
