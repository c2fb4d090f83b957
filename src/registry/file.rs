//! The registry file (`rules/keys.toml`, schema in `rules/README.md`): TOML parsed with
//! `deny_unknown_fields`, then validated (time zones, times in the owner's zone, owner and
//! successor references). Every error is a [`ConfigError`] naming the file, the line when
//! known, the dotted field and the reason.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::IgnoredAny;
use serde::Deserialize;
use toml::Spanned;

use super::{parse_time, parse_timezone, Key, KeyState, Owner, Registry, Rotation, SecretRef};
use crate::config::ConfigError;

pub use crate::config::{line_of, parse_toml};

/// Reads a rules file; the error names the file.
pub(crate) fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        line: None,
        field: String::new(),
        reason: format!("cannot read: {e}"),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    #[serde(default)]
    owners: BTreeMap<String, RawOwner>,
    #[serde(default)]
    keys: Vec<RawKey>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOwner {
    timezone: Option<Spanned<String>>,
    #[serde(default)]
    email: Vec<Spanned<String>>,
    telegram_chat_id: Option<Spanned<toml::Value>>,
    slack_webhook_env: Option<Spanned<String>>,
    slack_webhook_file: Option<PathBuf>,
    /// Refused with a message of its own: a webhook URL is a secret.
    slack_webhook: Option<Spanned<IgnoredAny>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: Spanned<String>,
    name: Option<String>,
    owner: Spanned<String>,
    #[serde(default = "one")]
    version: u32,
    created: Option<Spanned<toml::Value>>,
    expires: Option<Spanned<toml::Value>>,
    #[serde(default)]
    state: KeyState,
    successor: Option<Spanned<String>>,
    rotation_started: Option<Spanned<toml::Value>>,
    deadline: Option<Spanned<toml::Value>>,
    revoked: Option<Spanned<toml::Value>>,
    deprecated: Option<Spanned<toml::Value>>,
    /// Other ids of the key (the `fp:…` of its secret, an id header's value).
    #[serde(default)]
    aliases: Vec<Spanned<String>>,
    #[serde(default)]
    scopes: Vec<String>,
}

fn one() -> u32 {
    1
}

impl Registry {
    /// Reads and validates a registry file.
    pub fn load(path: &Path) -> Result<Registry, ConfigError> {
        let text = read_text(path)?;
        Registry::parse(&path.display().to_string(), &text)
    }

    /// Parses and validates registry TOML; `file` is only used in errors. No IO.
    pub fn parse(file: &str, text: &str) -> Result<Registry, ConfigError> {
        let raw: RawRegistry = parse_toml(file, text)?;
        Validator { file, text }.registry(raw)
    }
}

struct Validator<'a> {
    file: &'a str,
    text: &'a str,
}

impl Validator<'_> {
    fn err(&self, field: String, span: Option<Range<usize>>, reason: String) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            line: line_of(self.text, span),
            field,
            reason,
        }
    }

    fn registry(&self, raw: RawRegistry) -> Result<Registry, ConfigError> {
        let mut reg = Registry {
            origin: self.file.to_owned(),
            ..Registry::default()
        };
        for (name, o) in raw.owners {
            let owner = self.owner(&name, o)?;
            reg.insert_owner(owner);
        }

        let mut lines: HashMap<String, usize> = HashMap::new();
        for (i, k) in raw.keys.iter().enumerate() {
            let key = self.key(i, k, &reg)?;
            if let Some(first) = lines.insert(key.id.clone(), i) {
                return Err(self.err(
                    format!("keys[{i}].id"),
                    Some(k.id.span()),
                    format!("duplicate key id `{}`, also keys[{first}]", key.id),
                ));
            }
            reg.insert_key(key);
        }
        // An id or alias names one key: the same name twice would tie two keys' traffic.
        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, k) in raw.keys.iter().enumerate() {
            names.entry(k.id.get_ref().trim().to_owned()).or_insert(i);
        }
        for (i, k) in raw.keys.iter().enumerate() {
            for (j, a) in k.aliases.iter().enumerate() {
                let name = a.get_ref().trim();
                if let Some(other) = names.insert(name.to_owned(), i) {
                    return Err(self.err(
                        format!("keys[{i}].aliases[{j}]"),
                        Some(a.span()),
                        format!("`{name}` already names keys[{other}]: an alias names one key"),
                    ));
                }
            }
        }

        // Successors must be listed keys of the same owner.
        for (i, k) in raw.keys.iter().enumerate() {
            let Some(s) = &k.successor else { continue };
            let field = format!("keys[{i}].successor");
            let reason = match reg.key(s.get_ref()) {
                None => Some(format!(
                    "unknown key `{}`: list the successor under [[keys]] too",
                    s.get_ref()
                )),
                Some(succ) if succ.owner != *k.owner.get_ref() => Some(format!(
                    "`{}` belongs to `{}`, not to `{}`",
                    s.get_ref(),
                    succ.owner,
                    k.owner.get_ref()
                )),
                Some(succ) if succ.successor.as_deref() == Some(k.id.get_ref().as_str()) => {
                    Some(format!(
                        "`{}` names `{}` as its own successor: a rotation cannot go both ways",
                        s.get_ref(),
                        k.id.get_ref()
                    ))
                }
                Some(_) => None,
            };
            if let Some(reason) = reason {
                return Err(self.err(field, Some(s.span()), reason));
            }
        }
        Ok(reg)
    }

    fn owner(&self, name: &str, o: RawOwner) -> Result<Owner, ConfigError> {
        let f = |field: &str| format!("owners.{name}.{field}");
        if name.trim().is_empty() {
            return Err(self.err(
                "owners".into(),
                None,
                "an owner name must not be empty".into(),
            ));
        }
        if let Some(s) = &o.slack_webhook {
            return Err(self.err(
                f("slack_webhook"),
                Some(s.span()),
                "a webhook URL is a secret: name it with slack_webhook_env or \
                 slack_webhook_file instead"
                    .into(),
            ));
        }
        let timezone = match &o.timezone {
            Some(tz) => parse_timezone(tz.get_ref())
                .map_err(|e| self.err(f("timezone"), Some(tz.span()), e))?,
            None => chrono_tz::Tz::UTC,
        };
        let email = super::contacts::emails(&o.email).map_err(|(i, span, reason)| {
            self.err(format!("owners.{name}.email[{i}]"), Some(span), reason)
        })?;
        let telegram_chat_id = super::contacts::telegram_chat_id(&o.telegram_chat_id)
            .map_err(|(span, reason)| self.err(f("telegram_chat_id"), Some(span), reason))?;
        let slack_webhook = match (&o.slack_webhook_env, &o.slack_webhook_file) {
            (Some(_), Some(_)) => {
                return Err(self.err(
                    format!("owners.{name}"),
                    None,
                    "set slack_webhook_env or slack_webhook_file, not both".into(),
                ))
            }
            (Some(env), None) if env.get_ref().trim().is_empty() => {
                return Err(self.err(
                    f("slack_webhook_env"),
                    Some(env.span()),
                    "must not be empty".into(),
                ))
            }
            (Some(env), None) => Some(SecretRef::Env(env.get_ref().trim().to_owned())),
            (None, Some(p)) if p.as_os_str().is_empty() => {
                return Err(self.err(f("slack_webhook_file"), None, "must not be empty".into()))
            }
            (None, Some(p)) => Some(SecretRef::File(p.clone())),
            (None, None) => None,
        };
        Ok(Owner {
            name: name.to_owned(),
            timezone,
            email,
            telegram_chat_id,
            slack_webhook,
        })
    }

    fn time(
        &self,
        field: String,
        v: &Option<Spanned<toml::Value>>,
        tz: chrono_tz::Tz,
    ) -> Result<Option<i64>, ConfigError> {
        let Some(v) = v else { return Ok(None) };
        let text = match v.get_ref() {
            toml::Value::String(s) => s.clone(),
            toml::Value::Datetime(d) => d.to_string(),
            other => {
                return Err(self.err(
                    field,
                    Some(v.span()),
                    format!(
                        "expected a time like \"2026-11-24T18:00\", found {}",
                        other.type_str()
                    ),
                ))
            }
        };
        parse_time(&text, tz)
            .map(Some)
            .map_err(|e| self.err(field, Some(v.span()), e))
    }

    fn key(&self, i: usize, k: &RawKey, reg: &Registry) -> Result<Key, ConfigError> {
        let f = |field: &str| format!("keys[{i}].{field}");
        let id = k.id.get_ref().trim();
        if id.is_empty() {
            return Err(self.err(f("id"), Some(k.id.span()), "must not be empty".into()));
        }
        if id == crate::event::NO_KEY {
            return Err(self.err(
                f("id"),
                Some(k.id.span()),
                "`-` stands for requests without a key, it cannot be a key id".into(),
            ));
        }
        let owner_name = k.owner.get_ref();
        let Some(owner) = reg.owner(owner_name) else {
            let known: Vec<&str> = reg.owners().map(|o| o.name.as_str()).collect();
            return Err(self.err(
                f("owner"),
                Some(k.owner.span()),
                if known.is_empty() {
                    format!("unknown owner `{owner_name}`: define it under [owners.{owner_name}]")
                } else {
                    format!(
                        "unknown owner `{owner_name}`, expected one of {}",
                        known.join(", ")
                    )
                },
            ));
        };
        if k.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
            return Err(self.err(f("name"), None, "must not be empty when set".into()));
        }
        if k.version == 0 {
            return Err(self.err(f("version"), None, "must be at least 1".into()));
        }
        let tz = owner.timezone;
        let created_ms = self.time(f("created"), &k.created, tz)?;
        let expires_ms = self.time(f("expires"), &k.expires, tz)?;
        let started_ms = self.time(f("rotation_started"), &k.rotation_started, tz)?;
        let deadline_ms = self.time(f("deadline"), &k.deadline, tz)?;
        let revoked_ms = self.time(f("revoked"), &k.revoked, tz)?;
        let deprecated_ms = self.time(f("deprecated"), &k.deprecated, tz)?;
        let mut aliases = Vec::new();
        for (j, a) in k.aliases.iter().enumerate() {
            let name = a.get_ref().trim();
            if name.is_empty() || name == crate::event::NO_KEY || name == id {
                return Err(self.err(
                    format!("keys[{i}].aliases[{j}]"),
                    Some(a.span()),
                    format!("expected another id of key `{id}`, found `{name}`"),
                ));
            }
            aliases.push(name.to_owned());
        }
        if let (Some(c), Some(e)) = (created_ms, expires_ms) {
            if e <= c {
                return Err(self.err(
                    f("expires"),
                    k.expires.as_ref().map(|v| v.span()),
                    "must be after created".into(),
                ));
            }
        }

        let successor = k.successor.as_ref().map(|s| s.get_ref().trim().to_owned());
        let span_of = |v: &Option<Spanned<toml::Value>>| v.as_ref().map(|v| v.span());
        match k.state {
            KeyState::Active => {
                if let Some(s) = &k.successor {
                    return Err(self.err(
                        f("successor"),
                        Some(s.span()),
                        "only used with state \"rotating\", \"deprecated\" or \"revoked\"".into(),
                    ));
                }
                if k.rotation_started.is_some() {
                    return Err(self.err(
                        f("rotation_started"),
                        span_of(&k.rotation_started),
                        "only used with state \"rotating\", \"deprecated\" or \"revoked\"".into(),
                    ));
                }
            }
            KeyState::Rotating => {
                if successor.is_none() {
                    return Err(self.err(
                        f("successor"),
                        None,
                        "required when state = \"rotating\"".into(),
                    ));
                }
                if started_ms.is_none() {
                    return Err(self.err(
                        f("rotation_started"),
                        None,
                        "required when state = \"rotating\"".into(),
                    ));
                }
            }
            KeyState::Deprecated | KeyState::Revoked => {}
        }
        if successor.as_deref() == Some(id) {
            return Err(self.err(
                f("successor"),
                k.successor.as_ref().map(|s| s.span()),
                "a key cannot succeed itself".into(),
            ));
        }
        if started_ms.is_some() && successor.is_none() {
            return Err(self.err(
                f("rotation_started"),
                span_of(&k.rotation_started),
                "a rotation needs a successor".into(),
            ));
        }
        if let Some(d) = deadline_ms {
            match started_ms {
                None => {
                    return Err(self.err(
                        f("deadline"),
                        span_of(&k.deadline),
                        "only used with rotation_started".into(),
                    ))
                }
                Some(s) if d <= s => {
                    return Err(self.err(
                        f("deadline"),
                        span_of(&k.deadline),
                        "must be after rotation_started".into(),
                    ))
                }
                Some(_) => {}
            }
        }
        if revoked_ms.is_some() && k.state != KeyState::Revoked {
            return Err(self.err(
                f("revoked"),
                span_of(&k.revoked),
                "only used with state = \"revoked\"".into(),
            ));
        }
        if deprecated_ms.is_some() && !matches!(k.state, KeyState::Deprecated | KeyState::Revoked) {
            return Err(self.err(
                f("deprecated"),
                span_of(&k.deprecated),
                "only used with state = \"deprecated\" or \"revoked\"".into(),
            ));
        }
        // Each transition applies from its own time: they must come in the order of a life.
        let order = [
            ("rotation_started", started_ms, &k.rotation_started),
            ("deprecated", deprecated_ms, &k.deprecated),
            ("revoked", revoked_ms, &k.revoked),
        ];
        for (a, b) in [(0, 1), (0, 2), (1, 2)] {
            if let ((an, Some(at), _), (bn, Some(bt), bv)) = (order[a], order[b]) {
                if bt < at {
                    return Err(self.err(f(bn), span_of(bv), format!("must not be before {an}")));
                }
            }
        }
        Ok(Key {
            id: id.to_owned(),
            name: k.name.as_ref().map(|n| n.trim().to_owned()),
            owner: owner_name.clone(),
            version: k.version,
            created_ms,
            expires_ms,
            state: k.state,
            successor,
            rotation: started_ms.map(|started_ms| Rotation {
                started_ms,
                deadline_ms,
            }),
            revoked_ms,
            deprecated_ms,
            aliases,
            scopes: k.scopes.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[owners.acme-billing]
timezone = "Europe/Berlin"
email = ["billing-oncall@acme.example", "cto@acme.example"]
telegram_chat_id = -1001234567890
slack_webhook_env = "KEYWATCH_SLACK_ACME"

[owners.globex]
timezone = "America/New_York"
telegram_chat_id = "@globex_ops"
slack_webhook_file = "/run/secrets/globex-slack"

[[keys]]
id = "key-a"
name = "acme A"
owner = "acme-billing"
created = 2026-05-01
expires = "2027-05-01T00:00:00Z"
state = "rotating"
successor = "key-b"
rotation_started = "2026-11-21T15:24"
deadline = 2026-11-24T18:00:00
scopes = ["invoices:read", "invoices:write"]

[[keys]]
id = "key-b"
owner = "acme-billing"
version = 2
created = "2026-11-21T15:24"

[[keys]]
id = "fp:0123456789abcdef01234567"
owner = "globex"
state = "revoked"
revoked = "2026-11-01T09:00"
"#;

    fn ms(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn a_full_registry_is_read() {
        let reg = Registry::parse("keys.toml", GOOD).unwrap();
        let acme = reg.owner("acme-billing").unwrap();
        assert_eq!(acme.timezone, chrono_tz::Europe::Berlin);
        assert_eq!(acme.email.len(), 2);
        assert_eq!(acme.telegram_chat_id.as_deref(), Some("-1001234567890"));
        assert_eq!(
            acme.slack_webhook,
            Some(SecretRef::Env("KEYWATCH_SLACK_ACME".into()))
        );
        let globex = reg.owner("globex").unwrap();
        assert_eq!(globex.telegram_chat_id.as_deref(), Some("@globex_ops"));

        let a = reg.key("key-a").unwrap();
        assert_eq!(a.state, KeyState::Rotating);
        assert_eq!(a.label(), "acme A");
        assert_eq!(a.successor.as_deref(), Some("key-b"));
        // Local times are in Berlin (CET, +1 in November); dates are local midnight (CEST).
        assert_eq!(
            a.rotation,
            Some(Rotation {
                started_ms: ms("2026-11-21T14:24:00Z"),
                deadline_ms: Some(ms("2026-11-24T17:00:00Z")),
            })
        );
        assert_eq!(a.created_ms, Some(ms("2026-04-30T22:00:00Z")));
        assert_eq!(a.expires_ms, Some(ms("2027-05-01T00:00:00Z")));
        assert_eq!(a.scopes, ["invoices:read", "invoices:write"]);
        assert_eq!(reg.key("key-b").unwrap().version, 2);
        let revoked = reg.key("fp:0123456789abcdef01234567").unwrap();
        // New York is on EST (-5) on 2026-11-01 09:00 (DST ended at 02:00 that day).
        assert_eq!(revoked.revoked_ms, Some(ms("2026-11-01T14:00:00Z")));
        let rotations: Vec<_> = reg.rotations().map(|(k, s, _)| (&*k.id, s)).collect();
        assert_eq!(rotations, [("key-a", "key-b")]);
        // No webhook URL anywhere in the debug output, only where it comes from.
        let debug = format!("{reg:?}");
        assert!(debug.contains("env:KEYWATCH_SLACK_ACME"), "{debug}");
    }

    #[test]
    fn errors_name_file_line_field_and_reason() {
        let owner = "[owners.o]\ntimezone = \"UTC\"\n";
        let cases: Vec<(String, &str)> = vec![
            (
                "[owners.o]\ntimezone = \"Mars/Olympus\"\n".into(),
                "keys.toml:2: owners.o.timezone: unknown time zone `Mars/Olympus`, expected an IANA name like \"Europe/Berlin\" or \"UTC\"",
            ),
            (
                "[owners.o]\ntimezon = \"UTC\"\n".into(),
                "keys.toml:2: owners.o.timezon: unknown field `timezon`, expected one of `timezone`, `email`, `telegram_chat_id`, `slack_webhook_env`, `slack_webhook_file`, `slack_webhook`",
            ),
            (
                "[owners.o]\nslack_webhook = \"https://hooks.slack.com/services/T/B/secret\"\n".into(),
                "keys.toml:2: owners.o.slack_webhook: a webhook URL is a secret: name it with slack_webhook_env or slack_webhook_file instead",
            ),
            (
                "[owners.o]\nemail = [\"ops@acme.example\", \"not-an-address\"]\n".into(),
                "keys.toml:2: owners.o.email[1]: expected an email address like \"ops@example.com\", found `not-an-address`",
            ),
            (
                "[owners.o]\ntelegram_chat_id = \"acme\"\n".into(),
                "keys.toml:2: owners.o.telegram_chat_id: expected a chat id like -1001234567890 or a channel like \"@acme_ops\"",
            ),
            (
                "[owners.o]\nslack_webhook_env = \"A\"\nslack_webhook_file = \"/b\"\n".into(),
                "keys.toml: owners.o: set slack_webhook_env or slack_webhook_file, not both",
            ),
            (
                format!("{owner}[[keys]]\nid = \"k\"\nowner = \"p\"\n"),
                "keys.toml:5: keys[0].owner: unknown owner `p`, expected one of o",
            ),
            (
                format!("{owner}[[keys]]\nid = \"k\"\nowner = \"o\"\naliases = [\"fp:01\"]\n[[keys]]\nid = \"j\"\nowner = \"o\"\naliases = [\"fp:01\"]\n"),
                "keys.toml:10: keys[1].aliases[0]: `fp:01` already names keys[0]: an alias names one key",
            ),
            (
                format!("{owner}[[keys]]\nid = \"k\"\nowner = \"o\"\naliases = [\"k\"]\n"),
                "keys.toml:6: keys[0].aliases[0]: expected another id of key `k`, found `k`",
            ),
            (
                format!("{owner}[[keys]]\nid = \"k\"\nowner = \"o\"\ndeprecated = \"2026-11-01\"\n"),
                "keys.toml:6: keys[0].deprecated: only used with state = \"deprecated\" or \"revoked\"",
            ),
            (
                format!("{owner}[[keys]]\nid = \"k\"\nowner = \"o\"\nstate = \"revoked\"\nsuccessor = \"j\"\nrotation_started = \"2026-11-10\"\nrevoked = \"2026-11-01\"\n[[keys]]\nid = \"j\"\nowner = \"o\"\n"),
                "keys.toml:9: keys[0].revoked: must not be before rotation_started",
            ),
            (
                format!("{owner}[[keys]]\nid = \"k\"\nowner = \"o\"\nstate = \"rotatin\"\n"),
                "keys.toml:6: keys[0].state: unknown variant `rotatin`, expected one of `active`, `rotating`, `deprecated`, `revoked`",
            ),
            (
                format!("{owner}[[keys]]\nid = \"k\"\nowner = \"o\"\nversion = \"two\"\n"),
                "keys.toml:6: keys[0].version: invalid type: string \"two\", expected u32",
            ),
            (
                format!("{owner}[[keys]]\nid = \"k\"\nowner = \"o\"\nstate = \"rotating\"\nrotation_started = \"2026-11-21\"\n"),
                "keys.toml: keys[0].successor: required when state = \"rotating\"",
            ),
            (
                format!("{owner}[[keys]]\nid = \"k\"\nowner = \"o\"\nstate = \"rotating\"\nsuccessor = \"k2\"\nrotation_started = \"2026-11-21\"\n"),
                "keys.toml:7: keys[0].successor: unknown key `k2`: list the successor under [[keys]] too",
            ),
            (
                format!("{owner}[[keys]]\nid = \"k\"\nowner = \"o\"\nstate = \"rotating\"\nsuccessor = \"k2\"\nrotation_started = \"2026-11-21\"\ndeadline = \"2026-11-20\"\n[[keys]]\nid = \"k2\"\nowner = \"o\"\n"),
                "keys.toml:9: keys[0].deadline: must be after rotation_started",
            ),
            (
                format!("{owner}[[keys]]\nid = \"k\"\nowner = \"o\"\ncreated = \"yesterday\"\n"),
                "keys.toml:6: keys[0].created: expected a time like \"2026-11-24T18:00:00+01:00\", \"2026-11-24T18:00\" (in the owner's time zone) or \"2026-11-24\", found `yesterday`",
            ),
            (
                "[owners.o]\ntimezone = \"Europe/Berlin\"\n[[keys]]\nid = \"k\"\nowner = \"o\"\ncreated = \"2026-03-29T02:15\"\n".into(),
                "keys.toml:6: keys[0].created: 2026-03-29T02:15 does not exist in Europe/Berlin: the clocks skip it when daylight-saving time starts",
            ),
            (
                format!("{owner}[[keys]]\nid = \"k\"\nowner = \"o\"\n[[keys]]\nid = \"k\"\nowner = \"o\"\n"),
                "keys.toml:7: keys[1].id: duplicate key id `k`, also keys[0]",
            ),
            (
                format!("{owner}[[keys]]\nid = \"k\"\nowner = \"o\"\nsuccessor = \"x\"\n"),
                "keys.toml:6: keys[0].successor: only used with state \"rotating\", \"deprecated\" or \"revoked\"",
            ),
            (
                format!("{owner}[[keys]]\nid = \"k\"\nowner = \"o\"\nrevoked = 2026-11-01\n"),
                "keys.toml:6: keys[0].revoked: only used with state = \"revoked\"",
            ),
            (
                "[owners.o]\n[owners.p]\n[[keys]]\nid = \"a\"\nowner = \"o\"\nstate = \"deprecated\"\nsuccessor = \"b\"\n[[keys]]\nid = \"b\"\nowner = \"p\"\n".into(),
                "keys.toml:7: keys[0].successor: `b` belongs to `p`, not to `o`",
            ),
            ("[[keys]\n".into(), "keys.toml:1: unclosed array table, expected `]`"),
        ];
        for (text, want) in cases {
            let got = Registry::parse("keys.toml", &text).map(|_| ()).unwrap_err();
            assert_eq!(got.to_string(), want, "{text}");
        }
    }

    #[test]
    fn an_empty_file_is_an_empty_registry() {
        let reg = Registry::parse("keys.toml", "# nothing yet\n").unwrap();
        assert!(reg.is_empty());
        assert_eq!(reg.origin, "keys.toml");
    }
}
