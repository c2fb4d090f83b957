//! Silences (stage 2 of the pipeline, with [`super::inhibit`]): `keywatch silence` sets
//! them in the notification log by key or owner until a time; the notifier holds back the
//! findings they match, when the findings arrive and again when their group flushes.
//!
//! Contract: the CLI writes silences from another process, so [`Silences`] reads them from
//! the log again at most once a second ([`REFRESH_MS`]); a silence takes effect within that.

use std::str::FromStr;

use serde::Serialize;

use super::log::{NotifyLog, SilenceRow};
use super::route::Item;
use super::{Hold, NotifyError};

/// How often silences are read again (the CLI writes them from another process).
pub const REFRESH_MS: i64 = 1000;

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
    store: &mut impl NotifyLog,
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
    store: &impl NotifyLog,
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
pub fn silence_remove(
    store: &mut impl NotifyLog,
    id: i64,
    now_ms: i64,
) -> Result<bool, NotifyError> {
    Ok(store.silence_end(id, now_ms)?)
}

/// The silences in force, as the notifier reads them: a cache of the log refreshed at
/// most every [`REFRESH_MS`].
#[derive(Debug, Default)]
pub struct Silences {
    active: Vec<Silence>,
    read_ms: Option<i64>,
}

impl Hold for Silences {
    fn holds(&self, item: &Item, _raised_ms: i64, now_ms: i64) -> bool {
        self.silenced(item, now_ms)
    }

    fn metric(&self) -> &'static str {
        "keywatch_notify_silenced_total"
    }
}

impl Silences {
    /// Reads the silences again unless they were read less than [`REFRESH_MS`] ago.
    pub fn refresh(&mut self, log: &impl NotifyLog, now_ms: i64) -> Result<(), NotifyError> {
        let fresh = self
            .read_ms
            .is_some_and(|t| now_ms >= t && now_ms - t < REFRESH_MS);
        if !fresh {
            self.active = silence_list(log, now_ms, false)?;
            self.read_ms = Some(now_ms);
        }
        Ok(())
    }

    /// Whether a silence in force at `now_ms` matches the item.
    pub fn silenced(&self, item: &Item, now_ms: i64) -> bool {
        self.active
            .iter()
            .any(|s| s.active_at(now_ms) && s.matches(&item.key_id, item.owner.as_deref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::route::Kind;
    use crate::store::SqliteStore;

    #[test]
    fn matchers_parse() {
        assert_eq!("key=k1".parse(), Ok(Matcher::Key("k1".into())));
        assert_eq!("owner= acme ".parse(), Ok(Matcher::Owner("acme".into())));
        assert!("ip=1.2.3.4".parse::<Matcher>().is_err());
        assert!("key=".parse::<Matcher>().is_err());
        assert!("acme".parse::<Matcher>().is_err());
    }

    fn item(key: &str, owner: Option<&str>) -> Item {
        Item {
            kind: Kind::NotificationFailed,
            key_id: key.into(),
            owner: owner.map(str::to_owned),
            at_ms: 0,
            severity: crate::detect::Severity::Info,
            summary: String::new(),
            evidence: serde_json::Value::Null,
            dedup_key: format!("d:{key}"),
        }
    }

    #[test]
    fn silences_match_by_key_or_owner_until_they_end_and_are_reread_each_second() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SqliteStore::open(dir.path()).unwrap();
        let key = silence_add(&mut log, &Matcher::Key("k1".into()), 10_000, " r ", 0).unwrap();
        assert_eq!(key.reason, "r");
        assert!(silence_add(&mut log, &Matcher::Key("k".into()), 5, "", 5).is_err());
        let mut s = Silences::default();
        s.refresh(&log, 0).unwrap();
        // (item, time, silenced)
        let cases = [
            (item("k1", None), 0, true),
            (item("k1", Some("acme")), 9_999, true),
            (item("k1", None), 10_000, false),
            (item("k2", Some("acme")), 0, false),
        ];
        for (i, at, want) in &cases {
            assert_eq!(s.silenced(i, *at), *want, "{} at {at}", i.key_id);
        }
        silence_add(&mut log, &Matcher::Owner("acme".into()), 10_000, "", 100).unwrap();
        s.refresh(&log, 999).unwrap();
        assert!(
            !s.silenced(&item("k2", Some("acme")), 999),
            "read less than a second ago"
        );
        s.refresh(&log, 1000).unwrap();
        assert!(s.silenced(&item("k2", Some("acme")), 1000));
        assert!(silence_remove(&mut log, key.id, 2000).unwrap());
        assert!(!silence_remove(&mut log, key.id, 2000).unwrap());
        assert_eq!(silence_list(&log, 2000, false).unwrap().len(), 1);
        assert_eq!(silence_list(&log, 2000, true).unwrap().len(), 2);
    }
}
