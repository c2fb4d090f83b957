//! Lifecycle events: how automated setups tell keywatch that a key was created, a rotation
//! started, or a key was revoked or expired (one JSON object per Kafka message, schema in
//! `rules/README.md`).
//!
//! Contract: [`Registry::apply`] is idempotent (a redelivered event changes nothing) and
//! all-or-nothing (an event it refuses leaves the registry as it was). Times without an
//! offset are read in the key owner's time zone.

use serde::{Deserialize, Serialize};

use super::{parse_time, Key, KeyState, Owner, Registry, Rotation};

/// One change in a key's life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LifecycleEvent {
    /// A key exists (again: replaying it updates the fields it gives). An owner the registry
    /// does not know is added without contacts, in UTC.
    KeyCreated {
        key_id: String,
        owner: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        created_at: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        scopes: Vec<String>,
        /// Other ids of the key (the `fp:…` of its secret, an id header's value); added to
        /// the ones it has.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        aliases: Vec<String>,
    },
    /// `key_id` is being replaced by `successor` (added, owned by the same owner, when the
    /// registry does not know it yet). Without a deadline, the policy's grace period applies.
    RotationStarted {
        key_id: String,
        successor: String,
        started_at: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deadline: Option<String>,
    },
    /// The gateway no longer accepts the key. Without `revoked_at` the key counts as revoked
    /// at any time.
    KeyRevoked {
        key_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revoked_at: Option<String>,
    },
    /// The key expired (or will) at `expired_at`.
    KeyExpired { key_id: String, expired_at: String },
    /// The key is deprecated from `deprecated_at` on (still accepted; nobody should use
    /// it). Without a time, from when the event is applied ([`Registry::apply_at`]) or at
    /// any time ([`Registry::apply`]).
    KeyDeprecated {
        key_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deprecated_at: Option<String>,
    },
}

impl LifecycleEvent {
    /// Parses one event from JSON; the error says what is wrong, with the field.
    pub fn from_json(bytes: &[u8]) -> Result<LifecycleEvent, String> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            if path == "." {
                e.into_inner().to_string()
            } else {
                format!("{path}: {}", e.into_inner())
            }
        })
    }

    /// The key the event is about.
    pub fn key_id(&self) -> &str {
        match self {
            LifecycleEvent::KeyCreated { key_id, .. }
            | LifecycleEvent::RotationStarted { key_id, .. }
            | LifecycleEvent::KeyRevoked { key_id, .. }
            | LifecycleEvent::KeyExpired { key_id, .. }
            | LifecycleEvent::KeyDeprecated { key_id, .. } => key_id,
        }
    }

    /// When the event takes effect, by its own time (in the key owner's zone when written
    /// without an offset): `created_at`, `started_at`, `revoked_at`, `expired_at`,
    /// `deprecated_at`. `None` when the event names no time. A replay applies events in
    /// this order, each before the traffic at or after its time.
    pub fn effective_ms(&self, registry: &Registry) -> Result<Option<i64>, String> {
        let tz = match self {
            LifecycleEvent::KeyCreated { owner, .. } => registry
                .owner(owner.trim())
                .map_or(chrono_tz::Tz::UTC, |o| o.timezone),
            _ => registry.timezone_of(self.key_id().trim()),
        };
        let (field, t) = match self {
            LifecycleEvent::KeyCreated { created_at, .. } => ("created_at", created_at.as_deref()),
            LifecycleEvent::RotationStarted { started_at, .. } => {
                ("started_at", Some(started_at.as_str()))
            }
            LifecycleEvent::KeyRevoked { revoked_at, .. } => ("revoked_at", revoked_at.as_deref()),
            LifecycleEvent::KeyExpired { expired_at, .. } => {
                ("expired_at", Some(expired_at.as_str()))
            }
            LifecycleEvent::KeyDeprecated { deprecated_at, .. } => {
                ("deprecated_at", deprecated_at.as_deref())
            }
        };
        t.map(|t| parse_time(t, tz).map_err(|e| format!("{field}: {e}")))
            .transpose()
    }
}

impl Registry {
    /// Applies a lifecycle event received (or replayed) at `at_ms`: like
    /// [`Registry::apply`], but a revocation or deprecation that names no time takes effect
    /// at `at_ms` rather than at any time, so that history before it is judged with the
    /// key's earlier state. A backtest or the daemon calls this in event-time order with
    /// the traffic ([`LifecycleEvent::effective_ms`] gives the order).
    pub fn apply_at(&mut self, ev: &LifecycleEvent, at_ms: i64) -> Result<(), String> {
        let at = crate::registry::format_rfc3339(at_ms);
        match ev {
            LifecycleEvent::KeyRevoked {
                key_id,
                revoked_at: None,
            } => self.apply(&LifecycleEvent::KeyRevoked {
                key_id: key_id.clone(),
                revoked_at: Some(at),
            }),
            LifecycleEvent::KeyDeprecated {
                key_id,
                deprecated_at: None,
            } => self.apply(&LifecycleEvent::KeyDeprecated {
                key_id: key_id.clone(),
                deprecated_at: Some(at),
            }),
            _ => self.apply(ev),
        }
    }

    /// Applies a lifecycle event. On an error (unknown key, bad time, a rotation of a revoked
    /// key, ...) the registry is unchanged.
    pub fn apply(&mut self, ev: &LifecycleEvent) -> Result<(), String> {
        let id = ev.key_id().trim();
        if id.is_empty() || id == crate::event::NO_KEY {
            return Err(format!("key_id: expected a key id, found `{id}`"));
        }
        match ev {
            LifecycleEvent::KeyCreated {
                owner,
                name,
                version,
                created_at,
                expires_at,
                scopes,
                aliases,
                ..
            } => {
                let owner = owner.trim();
                if owner.is_empty() {
                    return Err("owner: must not be empty".into());
                }
                let tz = self.owner(owner).map_or(chrono_tz::Tz::UTC, |o| o.timezone);
                let time = |field: &str, v: &Option<String>| {
                    v.as_deref()
                        .map(|s| parse_time(s, tz).map_err(|e| format!("{field}: {e}")))
                        .transpose()
                };
                let created_ms = time("created_at", created_at)?;
                let expires_ms = time("expires_at", expires_at)?;
                if version == &Some(0) {
                    return Err("version: must be at least 1".into());
                }
                let mut key = match self.key(id) {
                    Some(k) if k.owner != owner => {
                        return Err(format!("key {id} belongs to {}, not to {owner}", k.owner))
                    }
                    Some(k) => k.clone(),
                    None => Key::new(id, owner),
                };
                if name.is_some() {
                    key.name.clone_from(name);
                }
                if let Some(v) = version {
                    key.version = *v;
                }
                key.created_ms = created_ms.or(key.created_ms);
                key.expires_ms = expires_ms.or(key.expires_ms);
                if !scopes.is_empty() {
                    key.scopes.clone_from(scopes);
                }
                for a in aliases {
                    let a = a.trim();
                    if a.is_empty() || a == crate::event::NO_KEY || a == id {
                        return Err(format!("aliases: expected another id of {id}, found `{a}`"));
                    }
                    if let Some(other) = self.key(a).filter(|k| k.id != id) {
                        return Err(format!("aliases: `{a}` already names key {}", other.id));
                    }
                    if !key.aliases.iter().any(|x| x == a) {
                        key.aliases.push(a.to_owned());
                    }
                }
                if self.owner(owner).is_none() {
                    self.insert_owner(Owner::bare(owner));
                }
                self.insert_key(key);
                Ok(())
            }
            LifecycleEvent::RotationStarted {
                successor,
                started_at,
                deadline,
                ..
            } => {
                let successor = successor.trim();
                let old = self
                    .key(id)
                    .ok_or_else(|| format!("unknown key {id}: send key_created first"))?;
                if old.state == KeyState::Revoked {
                    return Err(format!("key {id} is revoked: it cannot be rotated"));
                }
                if successor.is_empty() || successor == id {
                    return Err(format!(
                        "successor: expected another key than {id}, found `{successor}`"
                    ));
                }
                let tz = self.timezone_of(id);
                let started_ms =
                    parse_time(started_at, tz).map_err(|e| format!("started_at: {e}"))?;
                let deadline_ms = deadline
                    .as_deref()
                    .map(|d| parse_time(d, tz).map_err(|e| format!("deadline: {e}")))
                    .transpose()?;
                if deadline_ms.is_some_and(|d| d <= started_ms) {
                    return Err("deadline: must be after started_at".into());
                }
                let new = match self.key(successor) {
                    Some(s) if s.owner != old.owner => {
                        return Err(format!(
                            "successor {successor} belongs to {}, not to {}",
                            s.owner, old.owner
                        ))
                    }
                    Some(s) if s.successor.as_deref() == Some(id) => {
                        return Err(format!(
                            "successor {successor} names {id} as its own successor"
                        ))
                    }
                    Some(_) => None,
                    None => {
                        let mut k = Key::new(successor, old.owner.clone());
                        k.version = old.version.saturating_add(1);
                        k.created_ms = Some(started_ms);
                        Some(k)
                    }
                };
                if let Some(k) = new {
                    self.insert_key(k);
                }
                let old = self.key_mut(id).expect("checked above");
                old.state = KeyState::Rotating;
                old.successor = Some(successor.to_owned());
                old.rotation = Some(Rotation {
                    started_ms,
                    deadline_ms,
                });
                Ok(())
            }
            LifecycleEvent::KeyRevoked { revoked_at, .. } => {
                let tz = self.timezone_of(id);
                let revoked_ms = revoked_at
                    .as_deref()
                    .map(|t| parse_time(t, tz).map_err(|e| format!("revoked_at: {e}")))
                    .transpose()?;
                let key = self
                    .key_mut(id)
                    .ok_or_else(|| format!("unknown key {id}: send key_created first"))?;
                key.state = KeyState::Revoked;
                key.revoked_ms = revoked_ms;
                Ok(())
            }
            LifecycleEvent::KeyDeprecated { deprecated_at, .. } => {
                let tz = self.timezone_of(id);
                let deprecated_ms = deprecated_at
                    .as_deref()
                    .map(|t| parse_time(t, tz).map_err(|e| format!("deprecated_at: {e}")))
                    .transpose()?;
                let key = self
                    .key_mut(id)
                    .ok_or_else(|| format!("unknown key {id}: send key_created first"))?;
                if key.state == KeyState::Revoked {
                    // History only: the revocation stays the latest state.
                    key.deprecated_ms = deprecated_ms.or(key.deprecated_ms);
                } else {
                    key.state = KeyState::Deprecated;
                    key.deprecated_ms = deprecated_ms;
                }
                Ok(())
            }
            LifecycleEvent::KeyExpired { expired_at, .. } => {
                let tz = self.timezone_of(id);
                let at = parse_time(expired_at, tz).map_err(|e| format!("expired_at: {e}"))?;
                let key = self
                    .key_mut(id)
                    .ok_or_else(|| format!("unknown key {id}: send key_created first"))?;
                key.expires_ms = Some(key.expires_ms.map_or(at, |e| e.min(at)));
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(json: &str) -> LifecycleEvent {
        LifecycleEvent::from_json(json.as_bytes()).unwrap()
    }

    fn ms(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn events_apply_from_their_own_time() {
        let mut reg = Registry::parse("keys.toml", "[owners.o]\n").unwrap();
        let events = [
            r#"{"type":"key_created","key_id":"A","owner":"o","created_at":"2026-11-01T00:00:00Z","aliases":["fp:00aa"]}"#,
            r#"{"type":"rotation_started","key_id":"fp:00aa","successor":"B","started_at":"2026-11-10T00:00:00Z"}"#,
            r#"{"type":"key_deprecated","key_id":"A","deprecated_at":"2026-11-12T00:00:00Z"}"#,
            // No time: it applies from when it is applied, not at any time.
            r#"{"type":"key_revoked","key_id":"A"}"#,
        ];
        let mut order = Vec::new();
        for (i, e) in events.iter().enumerate() {
            let e = ev(e);
            order.push(e.effective_ms(&reg).unwrap());
            reg.apply_at(&e, ms("2026-11-20T00:00:00Z") + i as i64)
                .unwrap();
        }
        assert_eq!(order[1], Some(ms("2026-11-10T00:00:00Z")));
        assert_eq!(order[3], None);
        let a = reg.key("fp:00aa").unwrap();
        assert_eq!(a.id, "A");
        let cases = [
            ("2026-11-09T23:59:59Z", KeyState::Active),
            ("2026-11-10T00:00:00Z", KeyState::Rotating),
            ("2026-11-12T00:00:00Z", KeyState::Deprecated),
            ("2026-11-20T00:00:00.003Z", KeyState::Revoked),
        ];
        for (t, want) in cases {
            assert_eq!(a.state_at(ms(t)), want, "{t}");
        }
        assert!(a.rotation_at(ms("2026-11-15T00:00:00Z")).is_some());
        assert!(a.rotation_at(ms("2026-11-21T00:00:00Z")).is_none());
        // An alias that names another key is refused.
        let clash = ev(r#"{"type":"key_created","key_id":"C","owner":"o","aliases":["fp:00aa"]}"#);
        assert!(reg
            .apply(&clash)
            .unwrap_err()
            .contains("already names key A"));
    }

    #[test]
    fn a_key_is_created_rotated_and_revoked() {
        let mut reg =
            Registry::parse("keys.toml", "[owners.acme]\ntimezone = \"Europe/Berlin\"\n").unwrap();
        let created = ev(
            r#"{"type":"key_created","key_id":"A","owner":"acme","name":"acme A",
            "created_at":"2026-05-01","scopes":["invoices:read"]}"#,
        );
        reg.apply(&created).unwrap();
        let a = reg.key("A").unwrap();
        assert_eq!(a.state, KeyState::Active);
        assert_eq!(a.created_ms, Some(ms("2026-04-30T22:00:00Z")));

        let rot = ev(r#"{"type":"rotation_started","key_id":"A","successor":"B",
            "started_at":"2026-11-21T15:24:00+01:00","deadline":"2026-11-24T18:00"}"#);
        reg.apply(&rot).unwrap();
        let snapshot = reg.clone();
        // Redelivery changes nothing.
        reg.apply(&rot).unwrap();
        reg.apply(&created).unwrap();
        assert_eq!(reg, snapshot);
        let a = reg.key("A").unwrap();
        assert_eq!(a.state, KeyState::Rotating);
        assert_eq!(
            a.rotation,
            Some(Rotation {
                started_ms: ms("2026-11-21T14:24:00Z"),
                deadline_ms: Some(ms("2026-11-24T17:00:00Z")),
            })
        );
        let b = reg.key("B").expect("the successor is added");
        assert_eq!((b.owner.as_str(), b.version), ("acme", 2));
        assert_eq!(reg.rotations().count(), 1);

        reg.apply(&ev(
            r#"{"type":"key_revoked","key_id":"A","revoked_at":"2026-11-30T09:00:00Z"}"#,
        ))
        .unwrap();
        let a = reg.key("A").unwrap();
        assert_eq!(a.state, KeyState::Revoked);
        assert!(!a.is_revoked_at(ms("2026-11-30T08:59:59Z")));
        assert!(a.is_revoked_at(ms("2026-11-30T09:00:00Z")));
        // The rotation stays in the key's history: open until the revocation, not after.
        assert_eq!(reg.rotations_at(ms("2026-11-30T08:59:59Z")).count(), 1);
        assert_eq!(reg.rotations_at(ms("2026-11-30T09:00:00Z")).count(), 0);

        reg.apply(&ev(
            r#"{"type":"key_expired","key_id":"B","expired_at":"2027-01-01"}"#,
        ))
        .unwrap();
        assert_eq!(
            reg.key("B").unwrap().expires_ms,
            Some(ms("2026-12-31T23:00:00Z"))
        );
    }

    #[test]
    fn refused_events_change_nothing() {
        let mut reg = Registry::empty();
        reg.apply(&ev(r#"{"type":"key_created","key_id":"A","owner":"acme"}"#))
            .unwrap();
        assert!(reg.owner("acme").is_some(), "a bare owner is added");
        reg.apply(&ev(
            r#"{"type":"key_created","key_id":"X","owner":"other"}"#,
        ))
        .unwrap();
        let before = reg.clone();
        let cases = [
            (
                r#"{"type":"rotation_started","key_id":"Z","successor":"B","started_at":"2026-11-21"}"#,
                "unknown key Z: send key_created first",
            ),
            (
                r#"{"type":"rotation_started","key_id":"A","successor":"A","started_at":"2026-11-21"}"#,
                "successor: expected another key than A, found `A`",
            ),
            (
                r#"{"type":"rotation_started","key_id":"A","successor":"X","started_at":"2026-11-21"}"#,
                "successor X belongs to other, not to acme",
            ),
            (
                r#"{"type":"rotation_started","key_id":"A","successor":"B","started_at":"2026-11-21","deadline":"2026-11-20"}"#,
                "deadline: must be after started_at",
            ),
            (
                r#"{"type":"rotation_started","key_id":"A","successor":"B","started_at":"soon"}"#,
                "started_at: expected a time like",
            ),
            (
                r#"{"type":"key_created","key_id":"A","owner":"other"}"#,
                "key A belongs to acme, not to other",
            ),
            (r#"{"type":"key_revoked","key_id":"Q"}"#, "unknown key Q"),
            (
                r#"{"type":"key_revoked","key_id":"-"}"#,
                "key_id: expected a key id",
            ),
        ];
        for (json, want) in cases {
            let err = reg.apply(&ev(json)).unwrap_err();
            assert!(err.starts_with(want), "{json}: {err}");
            assert_eq!(reg, before, "{json}");
        }
    }

    #[test]
    fn bad_json_names_the_problem() {
        let cases = [
            (
                r#"{"type":"key_exploded","key_id":"A"}"#,
                "unknown variant `key_exploded`",
            ),
            (r#"{"type":"key_revoked"}"#, "missing field `key_id`"),
            (
                r#"{"type":"key_revoked","key_id":"A","when":"now"}"#,
                "unknown field `when`",
            ),
            (r#"{"key_id":"A"}"#, "missing field `type`"),
        ];
        for (json, want) in cases {
            let err = LifecycleEvent::from_json(json.as_bytes()).unwrap_err();
            assert!(err.contains(want), "{json}: {err}");
        }
        // Round trip.
        let e = LifecycleEvent::RotationStarted {
            key_id: "A".into(),
            successor: "B".into(),
            started_at: "2026-11-21T14:24:00Z".into(),
            deadline: None,
        };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            r#"{"type":"rotation_started","key_id":"A","successor":"B","started_at":"2026-11-21T14:24:00Z"}"#
        );
        assert_eq!(LifecycleEvent::from_json(json.as_bytes()).unwrap(), e);
    }
}
