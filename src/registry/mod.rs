//! The key registry: which keys exist, who owns them, and where each one is in its life.
//!
//! Contract:
//! - A [`Registry`] is a plain value: built from a TOML file ([`Registry::load`],
//!   [`Registry::parse`], schema in `rules/README.md`) and changed by [`LifecycleEvent`]s
//!   ([`Registry::apply`]). The detectors read it through an `Arc` and never change it; a
//!   reload builds a new one and swaps the `Arc` ([`RegistryWatcher`]).
//! - A key's `id` is what keywatch sees in traffic: the gateway's key id, or the `fp:…`
//!   fingerprint of raw key material (`keywatch fingerprint` prints it). Its `aliases` are
//!   the other names the same key goes by: gateways log a credential id when they accept a
//!   request and only the presented key (fingerprinted) or an id header when they refuse
//!   one, so [`Registry::key`] finds a key by its id or any alias, and one key's accepted
//!   and rejected requests meet. The registry never holds raw key material.
//! - A key has a history, not one state: creation, rotation start (and deadline),
//!   deprecation, revocation and expiry each apply from their own time. [`Key::state_at`]
//!   answers "what was this key's state at t", so a key that rotated and was revoked later
//!   was rotating before the revocation. `state` is the latest state, as written; a
//!   transition without a time applies at any time.
//! - Every time is milliseconds since the Unix epoch (UTC). Times written without an offset
//!   are read in the owner's time zone ([`parse_time`]), so that "18:00 on the 24th" means
//!   what the owner means on either side of a daylight-saving change.
//! - Owner contacts name their secrets (a Slack webhook URL) by environment variable or file
//!   ([`SecretRef`]); the registry never holds the secret itself, so printing it (Debug
//!   included) cannot leak one.
//! - Parsing and applying events do no IO; only [`Registry::load`] and the watcher read files.

pub(crate) mod contacts;
mod file;
mod lifecycle;
mod watch;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

pub use file::parse_toml;
pub(crate) use file::{line_of, read_text};
pub use lifecycle::LifecycleEvent;
pub use watch::{RegistryWatcher, Reload};

/// Where a key is in its life. `expired` is not a state: it follows from [`Key::expires_ms`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// In use, nothing planned.
    #[default]
    Active,
    /// Being replaced by its successor: both are accepted until the deadline.
    Rotating,
    /// Replaced; still accepted by the gateway, but nobody should use it any more.
    Deprecated,
    /// No longer accepted: any use is a security finding.
    Revoked,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Rotating => "rotating",
            KeyState::Deprecated => "deprecated",
            KeyState::Revoked => "revoked",
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rotation of a key to its successor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rotation {
    pub started_ms: i64,
    /// When every client must be on the successor; without one, the policy's grace period
    /// after the start.
    pub deadline_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Key {
    /// The gateway's key id, or the `fp:…` fingerprint of raw key material.
    pub id: String,
    /// A short human name (`billing-2026`); keys ids are often UUIDs nobody recognizes.
    pub name: Option<String>,
    /// Name of an [`Owner`] in the same registry.
    pub owner: String,
    pub version: u32,
    pub created_ms: Option<i64>,
    pub expires_ms: Option<i64>,
    pub state: KeyState,
    /// The key that replaces this one (states rotating, deprecated, revoked).
    pub successor: Option<String>,
    /// Set when the key is (or was) rotated to its successor.
    pub rotation: Option<Rotation>,
    /// When the key was revoked; without it a revoked key counts as revoked at any time
    /// (set it when backtesting history from before the revocation).
    pub revoked_ms: Option<i64>,
    /// When the key was deprecated (still accepted, nobody should use it); without it a
    /// deprecated key is deprecated from its rotation's start, or at any time.
    pub deprecated_ms: Option<i64>,
    /// Other ids of the same key: the `fp:…` fingerprint of its secret (what a refused
    /// request carries), the gateway's id, an id header's value.
    pub aliases: Vec<String>,
    pub scopes: Vec<String>,
}

impl Key {
    /// A new active key with nothing but an id and an owner.
    pub fn new(id: impl Into<String>, owner: impl Into<String>) -> Key {
        Key {
            id: id.into(),
            name: None,
            owner: owner.into(),
            version: 1,
            created_ms: None,
            expires_ms: None,
            state: KeyState::Active,
            successor: None,
            rotation: None,
            revoked_ms: None,
            deprecated_ms: None,
            aliases: Vec::new(),
            scopes: Vec::new(),
        }
    }

    /// The name if there is one, else the id.
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.id)
    }

    /// Whether a request at `ts_ms` with this key used a revoked key.
    pub fn is_revoked_at(&self, ts_ms: i64) -> bool {
        self.state == KeyState::Revoked && !matches!(self.revoked_ms, Some(r) if ts_ms < r)
    }

    /// The key's state at `ts_ms`: each transition applies from its own time (revocation,
    /// deprecation, rotation start); one written without a time applies at any time.
    /// Expiry is not a state: see [`Key::is_expired_at`].
    pub fn state_at(&self, ts_ms: i64) -> KeyState {
        if self.is_revoked_at(ts_ms) {
            return KeyState::Revoked;
        }
        let started = self.rotation.map(|r| r.started_ms);
        let deprecated = match (self.deprecated_ms, self.state) {
            (Some(d), _) => ts_ms >= d,
            // Written `deprecated` without a time: from the rotation's start, if any.
            (None, KeyState::Deprecated) => started.is_none_or(|s| ts_ms >= s),
            (None, _) => false,
        };
        if deprecated {
            KeyState::Deprecated
        } else if (self.successor.is_some() && started.is_some_and(|s| ts_ms >= s))
            || (self.state == KeyState::Rotating && started.is_none())
        {
            KeyState::Rotating
        } else {
            KeyState::Active
        }
    }

    /// The successor and rotation when the key is being replaced at `ts_ms` (or will be:
    /// a rotation that starts later counts, as scheduled): it has a rotation and is not
    /// revoked at `ts_ms`.
    pub fn rotation_at(&self, ts_ms: i64) -> Option<(&str, Rotation)> {
        let (s, r) = self.open_rotation()?;
        (!self.is_revoked_at(ts_ms)).then_some((s, r))
    }

    /// Whether `id` names this key (its id or an alias).
    pub fn answers_to(&self, id: &str) -> bool {
        self.id == id || self.aliases.iter().any(|a| a == id)
    }

    /// Whether the key had expired at `ts_ms`.
    pub fn is_expired_at(&self, ts_ms: i64) -> bool {
        self.expires_ms.is_some_and(|e| ts_ms >= e)
    }

    /// The successor and rotation of a key that is (or was) replaced: state rotating or
    /// deprecated with a rotation start, or revoked at a known time after a rotation (the
    /// rotation was open until then: [`Key::rotation_at`] says whether it is at a time).
    pub fn open_rotation(&self) -> Option<(&str, Rotation)> {
        match (self.state, &self.successor, self.rotation) {
            (KeyState::Rotating | KeyState::Deprecated, Some(s), Some(r)) => Some((s, r)),
            (KeyState::Revoked, Some(s), Some(r)) if self.revoked_ms.is_some() => Some((s, r)),
            _ => None,
        }
    }
}

/// Where a secret comes from. The value is read by whoever needs it (the notifier), never
/// stored in the registry.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretRef {
    /// An environment variable holding the value.
    Env(String),
    /// A file holding the value (trailing whitespace ignored).
    File(PathBuf),
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(name) => write!(f, "env:{name}"),
            SecretRef::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// A secret value: shown as `<redacted>` by Debug and Display.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl SecretRef {
    /// Reads the secret (IO: environment or file). The error names the source, never the
    /// value.
    pub fn resolve(&self) -> Result<Secret, String> {
        let value = match self {
            SecretRef::Env(name) => std::env::var(name)
                .map_err(|_| format!("environment variable {name} is not set"))?,
            SecretRef::File(p) => std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?,
        };
        let value = value.trim_end().to_owned();
        if value.is_empty() {
            return Err(format!("{self:?} is empty"));
        }
        Ok(Secret(value))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Owner {
    pub name: String,
    /// Times written without an offset, deadlines shown to the owner, and reminders counted
    /// in days are in this zone.
    #[serde(serialize_with = "tz_name")]
    pub timezone: Tz,
    pub email: Vec<String>,
    /// A Telegram chat id (`-1001234567890`) or channel name (`@acme_ops`).
    pub telegram_chat_id: Option<String>,
    pub slack_webhook: Option<SecretRef>,
}

fn tz_name<S: serde::Serializer>(tz: &Tz, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(tz.name())
}

impl Owner {
    /// An owner with no contacts, in UTC (for owners that only lifecycle events name).
    pub fn bare(name: impl Into<String>) -> Owner {
        Owner {
            name: name.into(),
            timezone: Tz::UTC,
            email: Vec::new(),
            telegram_chat_id: None,
            slack_webhook: None,
        }
    }
}

/// Keys and owners. Cheap to clone for small registries; share it through an `Arc`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Registry {
    /// Where it came from, for messages (`rules/keys.toml`, `<empty>`).
    pub origin: String,
    keys: BTreeMap<String, Key>,
    /// Alias → the id of the key it names.
    aliases: BTreeMap<String, String>,
    owners: BTreeMap<String, Owner>,
}

impl Registry {
    /// A registry that knows nothing (no rules file): no key counts as unknown.
    pub fn empty() -> Registry {
        Registry {
            origin: "<empty>".to_owned(),
            ..Registry::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key with this id or alias.
    pub fn key(&self, id: &str) -> Option<&Key> {
        self.keys
            .get(id)
            .or_else(|| self.aliases.get(id).and_then(|k| self.keys.get(k)))
    }

    /// The registry id of the key `id` names (itself for an id or an unknown key).
    pub fn canonical<'a>(&'a self, id: &'a str) -> &'a str {
        self.key(id).map_or(id, |k| k.id.as_str())
    }

    pub fn owner(&self, name: &str) -> Option<&Owner> {
        self.owners.get(name)
    }

    /// The owner of a key, if both are known.
    pub fn owner_of(&self, key_id: &str) -> Option<&Owner> {
        self.key(key_id).and_then(|k| self.owner(&k.owner))
    }

    /// The time zone of a key's owner (UTC when unknown).
    pub fn timezone_of(&self, key_id: &str) -> Tz {
        self.owner_of(key_id).map_or(Tz::UTC, |o| o.timezone)
    }

    /// Keys by id.
    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.keys.values()
    }

    /// Owners by name.
    pub fn owners(&self) -> impl Iterator<Item = &Owner> {
        self.owners.values()
    }

    /// This registry with the Telegram chats owners linked themselves (owner → chat id,
    /// `keywatch telegram link`) for the owners it knows that have no `telegram_chat_id`:
    /// the registry's own chat wins.
    pub fn with_linked_chats(&self, chats: &BTreeMap<String, String>) -> Registry {
        let mut out = self.clone();
        for (owner, chat) in chats {
            if let Some(o) = out.owners.get_mut(owner) {
                if o.telegram_chat_id.is_none() {
                    o.telegram_chat_id = Some(chat.clone());
                }
            }
        }
        out
    }

    /// Every key being replaced (rotating or deprecated, with a rotation start, or revoked
    /// at a known time after one), with its successor's id and the rotation.
    pub fn rotations(&self) -> impl Iterator<Item = (&Key, &str, Rotation)> {
        self.keys
            .values()
            .filter_map(|k| k.open_rotation().map(|(s, r)| (k, s, r)))
    }

    /// The rotations open at `ts_ms` (not yet revoked then).
    pub fn rotations_at(&self, ts_ms: i64) -> impl Iterator<Item = (&Key, &str, Rotation)> {
        self.keys
            .values()
            .filter_map(move |k| k.rotation_at(ts_ms).map(|(s, r)| (k, s, r)))
    }

    /// The open rotation (at `ts_ms`) whose successor is `new_id` (an id or alias).
    pub fn rotation_to(&self, new_id: &str, ts_ms: i64) -> Option<(&Key, Rotation)> {
        let new = self.key(new_id)?;
        self.rotations_at(ts_ms)
            .find(|(_, s, _)| *s == new.id)
            .map(|(k, _, r)| (k, r))
    }

    /// Adds or replaces a key. The caller keeps the registry consistent (the owner exists,
    /// no alias names two keys); [`Registry::apply`] and the file loader do.
    pub fn insert_key(&mut self, key: Key) {
        self.aliases.retain(|_, k| *k != key.id);
        for a in &key.aliases {
            self.aliases.insert(a.clone(), key.id.clone());
        }
        self.keys.insert(key.id.clone(), key);
    }

    /// Adds or replaces an owner.
    pub fn insert_owner(&mut self, owner: Owner) {
        self.owners.insert(owner.name.clone(), owner);
    }

    /// The key with this id or alias. Changing its aliases needs [`Registry::insert_key`].
    pub(crate) fn key_mut(&mut self, id: &str) -> Option<&mut Key> {
        let id = match self.aliases.get(id) {
            Some(k) if !self.keys.contains_key(id) => k.clone(),
            _ => id.to_owned(),
        };
        self.keys.get_mut(&id)
    }
}

/// Parses a time as an owner writes it:
/// - RFC 3339 with an offset: `2026-11-24T18:00:00+01:00`, `2026-11-24T17:00:00Z`;
/// - a local date-time in `tz`: `2026-11-24T18:00`, `2026-11-24T18:00:00`, `2026-11-24 18:00`;
/// - a local date in `tz`, meaning its midnight: `2026-11-24`.
///
/// A local time the clocks skip (the hour lost when daylight-saving time starts) is refused;
/// one they show twice (the hour repeated when it ends) means the first of the two.
pub fn parse_time(s: &str, tz: Tz) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    let naive = [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
    ]
    .iter()
    .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
    .or_else(|| {
        NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
    })
    .ok_or_else(|| {
        format!(
            "expected a time like \"2026-11-24T18:00:00+01:00\", \"2026-11-24T18:00\" \
                 (in the owner's time zone) or \"2026-11-24\", found `{s}`"
        )
    })?;
    local_to_utc(naive, tz).ok_or_else(|| {
        format!(
            "{s} does not exist in {}: the clocks skip it when daylight-saving time starts",
            tz.name()
        )
    })
}

/// The instant a local wall-clock time names in `tz`: the first of two when the clocks
/// repeat it, `None` when they skip it.
pub(crate) fn local_to_utc(naive: NaiveDateTime, tz: Tz) -> Option<i64> {
    tz.from_local_datetime(&naive)
        .earliest()
        .map(|t| t.timestamp_millis())
}

/// Parses an IANA time zone name (`Europe/Berlin`, `UTC`).
pub fn parse_timezone(name: &str) -> Result<Tz, String> {
    name.trim().parse::<Tz>().map_err(|_| {
        format!(
            "unknown time zone `{name}`, expected an IANA name like \"Europe/Berlin\" or \"UTC\""
        )
    })
}

/// `2026-11-24 18:00 CET` in `tz`.
pub fn format_local(ms: i64, tz: Tz) -> String {
    match Utc.timestamp_millis_opt(ms).single() {
        Some(t) => t.with_timezone(&tz).format("%Y-%m-%d %H:%M %Z").to_string(),
        None => ms.to_string(),
    }
}

/// `2026-11-24T17:00:00.000Z`.
pub fn format_rfc3339(ms: i64) -> String {
    match Utc.timestamp_millis_opt(ms).single() {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        None => ms.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    #[test]
    fn linked_chats_fill_in_and_the_files_chat_wins() {
        let r = Registry::parse(
            "keys.toml",
            "[owners.a]\ntelegram_chat_id = -100\n[owners.b]\n[[keys]]\nid = \"k\"\nowner = \"b\"\n",
        )
        .unwrap();
        let links: BTreeMap<String, String> = [("a", "1"), ("b", "2"), ("ghost", "3")]
            .into_iter()
            .map(|(o, c)| (o.to_owned(), c.to_owned()))
            .collect();
        let m = r.with_linked_chats(&links);
        assert_eq!(
            m.owner("a").unwrap().telegram_chat_id.as_deref(),
            Some("-100")
        );
        assert_eq!(m.owner("b").unwrap().telegram_chat_id.as_deref(), Some("2"));
        assert!(m.owner("ghost").is_none());
    }

    #[test]
    fn times_with_offsets_ignore_the_zone() {
        let berlin = parse_timezone("Europe/Berlin").unwrap();
        assert_eq!(
            parse_time("2026-11-24T18:00:00+01:00", berlin),
            Ok(utc("2026-11-24T17:00:00Z"))
        );
        assert_eq!(
            parse_time("2026-11-24T17:00:00Z", Tz::America__New_York),
            Ok(utc("2026-11-24T17:00:00Z"))
        );
    }

    #[test]
    fn local_times_follow_daylight_saving_time() {
        let berlin = parse_timezone("Europe/Berlin").unwrap();
        let ny = parse_timezone("America/New_York").unwrap();
        let cases: &[(Tz, &str, &str)] = &[
            // Europe: CET (+1) until 2026-03-29 02:00, CEST (+2) until 2026-10-25 03:00.
            (berlin, "2026-03-28T12:00", "2026-03-28T11:00:00Z"),
            (berlin, "2026-03-29T12:00", "2026-03-29T10:00:00Z"),
            (berlin, "2026-03-29T01:59:59", "2026-03-29T00:59:59Z"),
            (berlin, "2026-03-29T03:00", "2026-03-29T01:00:00Z"),
            (berlin, "2026-10-24 12:00", "2026-10-24T10:00:00Z"),
            (berlin, "2026-10-26T12:00", "2026-10-26T11:00:00Z"),
            // 02:30 happens twice on 2026-10-25: the first one, still in CEST.
            (berlin, "2026-10-25T02:30", "2026-10-25T00:30:00Z"),
            (berlin, "2026-11-24", "2026-11-23T23:00:00Z"),
            // US: EST (-5) until 2026-03-08 02:00, EDT (-4) until 2026-11-01 02:00.
            (ny, "2026-03-07T12:00", "2026-03-07T17:00:00Z"),
            (ny, "2026-03-08T12:00", "2026-03-08T16:00:00Z"),
            (ny, "2026-11-01T01:30", "2026-11-01T05:30:00Z"),
            (ny, "2026-11-02T12:00", "2026-11-02T17:00:00Z"),
            (Tz::UTC, "2026-11-24T18:00", "2026-11-24T18:00:00Z"),
        ];
        for (tz, local, want) in cases {
            assert_eq!(parse_time(local, *tz), Ok(utc(want)), "{local} in {tz}");
        }
    }

    #[test]
    fn skipped_local_times_and_garbage_are_refused() {
        let berlin = parse_timezone("Europe/Berlin").unwrap();
        assert_eq!(
            parse_time("2026-03-29T02:30", berlin).unwrap_err(),
            "2026-03-29T02:30 does not exist in Europe/Berlin: the clocks skip it when \
             daylight-saving time starts"
        );
        assert!(parse_time("2026-03-08T02:30", Tz::America__New_York).is_err());
        assert!(parse_time("next tuesday", berlin)
            .unwrap_err()
            .contains("found `next tuesday`"));
        assert!(parse_timezone("Europe/Berlinn")
            .unwrap_err()
            .starts_with("unknown time zone `Europe/Berlinn`"));
    }

    #[test]
    fn secrets_never_show() {
        let r = SecretRef::Env("KW_TEST_SLACK_SECRET_REF".into());
        assert_eq!(format!("{r:?}"), "env:KW_TEST_SLACK_SECRET_REF");
        let s = Secret("https://hooks.slack.com/services/T0/B0/xyz".into());
        assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
        assert_eq!(s.expose(), "https://hooks.slack.com/services/T0/B0/xyz");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hook");
        std::fs::write(&p, "https://hooks.slack.com/services/T0/B0/abc\n").unwrap();
        let got = SecretRef::File(p).resolve().unwrap();
        assert_eq!(got.expose(), "https://hooks.slack.com/services/T0/B0/abc");
    }

    #[test]
    fn a_keys_state_follows_its_history() {
        // Rotated at 100, deprecated at 200, revoked at 300.
        let mut k = Key::new("k", "o");
        k.state = KeyState::Revoked;
        k.successor = Some("n".into());
        k.rotation = Some(Rotation {
            started_ms: 100,
            deadline_ms: Some(250),
        });
        k.deprecated_ms = Some(200);
        k.revoked_ms = Some(300);
        let cases = [
            (99, KeyState::Active, true),
            (100, KeyState::Rotating, true),
            (199, KeyState::Rotating, true),
            (200, KeyState::Deprecated, true),
            (299, KeyState::Deprecated, true),
            (300, KeyState::Revoked, false),
            (10_000, KeyState::Revoked, false),
        ];
        for (t, state, open) in cases {
            assert_eq!(k.state_at(t), state, "at {t}");
            assert_eq!(k.rotation_at(t).is_some(), open, "rotation at {t}");
        }
        // Without times, the written state applies at any time.
        let mut k = Key::new("k", "o");
        k.state = KeyState::Revoked;
        assert_eq!(k.state_at(0), KeyState::Revoked);
        k.state = KeyState::Deprecated;
        assert_eq!(k.state_at(0), KeyState::Deprecated);
        // A rotation that starts later is scheduled: open, still active.
        k.state = KeyState::Rotating;
        k.successor = Some("n".into());
        k.rotation = Some(Rotation {
            started_ms: 100,
            deadline_ms: None,
        });
        assert_eq!(k.state_at(50), KeyState::Active);
        assert!(k.rotation_at(50).is_some());
        // Revoked without a time after a rotation: no rotation is open at any time.
        k.state = KeyState::Revoked;
        assert!(k.open_rotation().is_none());
    }

    #[test]
    fn keys_are_found_by_their_aliases() {
        let mut reg = Registry::empty();
        let mut k = Key::new("gw-1", "o");
        k.aliases = vec!["fp:0011".into(), "hdr-1".into()];
        reg.insert_key(k.clone());
        for id in ["gw-1", "fp:0011", "hdr-1"] {
            assert_eq!(reg.key(id).map(|k| k.id.as_str()), Some("gw-1"), "{id}");
            assert_eq!(reg.canonical(id), "gw-1");
        }
        assert!(reg.key("fp:9999").is_none());
        assert_eq!(reg.canonical("fp:9999"), "fp:9999");
        // Replacing the key drops aliases it no longer has.
        k.aliases = vec!["fp:0011".into()];
        reg.insert_key(k);
        assert!(reg.key("hdr-1").is_none());
        assert!(reg.key_mut("fp:0011").is_some());
    }

    #[test]
    fn revocation_and_expiry_are_timed() {
        let mut k = Key::new("k", "o");
        assert!(!k.is_revoked_at(0));
        k.state = KeyState::Revoked;
        assert!(k.is_revoked_at(0));
        k.revoked_ms = Some(100);
        assert!(!k.is_revoked_at(99));
        assert!(k.is_revoked_at(100));
        k.expires_ms = Some(50);
        assert!(!k.is_expired_at(49));
        assert!(k.is_expired_at(50));
    }
}
