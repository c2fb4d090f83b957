//! `rules/routes.toml`: channels (how to send), receivers (who), routes (which findings go to
//! whom, grouped how), inhibitions, repeat intervals per kind, retries, templates. Schema in
//! `rules/README.md`.
//!
//! Parsing and validation do no IO: secrets are named (`*_env`, `*_file`) and only read when
//! the notifier starts ([`crate::notify::Notifier::new`]), so `keywatch check-config` works
//! on a machine without them. Every error is a [`ConfigError`] with file, line when known,
//! dotted field and reason.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::NaiveTime;
use chrono_tz::Tz;
use serde::Deserialize;
use toml::Spanned;

use super::channel::{email, telegram, webhook};
// Each channel owns its settings; they are named here too, with the file they come from.
pub use super::channel::email::{EmailSettings, SmtpSecurity};
pub use super::channel::telegram::{TelegramSettings, TELEGRAM_API};
pub use super::channel::webhook::{UrlRef, WebhookSettings};
use super::route::{Equal, GroupBy, Inhibit, Kind, QuietHours, Route};
use crate::config::{duration, ConfigError};
use crate::detect::{FindingKind, Severity};
use crate::registry::{line_of, parse_timezone, parse_toml, read_text, SecretRef};

/// The name of the built-in receiver that stands for a finding's key owner.
pub const OWNER_RECEIVER: &str = "owner";

/// The receiver that hears what has no owner when `defaults.operators` is not set: the
/// routes file's `operations` receiver when it has one, else this built-in one (the console).
pub const OPERATORS_RECEIVER: &str = "operators";

/// The notifier's configuration, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where it came from, for messages (`rules/routes.toml`, `<defaults>`).
    pub origin: String,
    /// Templates that replace the built-in ones (files named like them); `None`: built-ins.
    pub templates_dir: Option<PathBuf>,
    /// A long Telegram or Slack message is split into at most this many messages; the last
    /// one says what was cut.
    pub max_parts: usize,
    pub repeat: Repeat,
    pub retry: Retry,
    pub channels: BTreeMap<String, Channel>,
    pub receivers: BTreeMap<String, Receiver>,
    /// The receiver (a team, never the owner receiver) that gets a finding routed to the
    /// owner receiver when the finding has no owner: an unknown key's burst, say.
    pub operators: String,
    pub routes: Vec<Route>,
    pub inhibit: Vec<Inhibit>,
}

/// How long after telling a fact the notifier tells it again, if it is raised again.
#[derive(Debug, Clone, PartialEq)]
pub struct Repeat {
    /// `None`: never.
    pub default_ms: Option<i64>,
    pub by_kind: BTreeMap<Kind, Option<i64>>,
}

impl Repeat {
    /// The repeat interval of a kind; `None`: never.
    pub fn of(&self, kind: Kind) -> Option<i64> {
        self.by_kind.get(&kind).copied().unwrap_or(self.default_ms)
    }
}

/// Retries of transient failures: exponential backoff from `first_ms` up to `max_ms` (or
/// the channel's Retry-After when longer), until `give_up_after_ms` after the message was
/// queued.
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    pub first_ms: i64,
    pub max_ms: i64,
    pub give_up_after_ms: i64,
    /// Per request (connect, send, answer).
    pub timeout: Duration,
    /// Messages sent at the same time.
    pub parallel: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Channel {
    pub name: String,
    pub kind: ChannelKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ChannelKind {
    /// Standard output: the embedded default.
    Console,
    Email(EmailSettings),
    Telegram(TelegramSettings),
    /// Slack incoming webhooks: the URL is the recipient's (owner or receiver).
    Slack,
    Webhook(WebhookSettings),
}

impl ChannelKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            ChannelKind::Console => "console",
            ChannelKind::Email(_) => "email",
            ChannelKind::Telegram(_) => "telegram",
            ChannelKind::Slack => "slack",
            ChannelKind::Webhook(_) => "webhook",
        }
    }
}

/// Who gets a message: the key's owner (contacts from the registry), or a team with the
/// contacts written here.
#[derive(Debug, Clone, PartialEq)]
pub struct Receiver {
    pub name: String,
    /// The finding's key owner, with the contacts in `keys.toml`.
    pub owner: bool,
    /// Channels to use, in order; the contacts decide which apply. None that applies: the
    /// console.
    pub channels: Vec<String>,
    pub email: Vec<String>,
    pub telegram_chat_id: Option<String>,
    pub slack_webhook: Option<SecretRef>,
    /// For quiet hours and times in messages; an owner receiver uses the owner's zone.
    pub timezone: Tz,
    pub quiet_hours: Option<QuietHours>,
}

impl Receiver {
    /// The built-in operators receiver: no channel, so the console.
    fn operators_default() -> Receiver {
        Receiver {
            name: OPERATORS_RECEIVER.to_owned(),
            owner: false,
            ..Receiver::owner_default()
        }
    }

    fn owner_default() -> Receiver {
        Receiver {
            name: OWNER_RECEIVER.to_owned(),
            owner: true,
            channels: Vec::new(),
            email: Vec::new(),
            telegram_chat_id: None,
            slack_webhook: None,
            timezone: Tz::UTC,
            quiet_hours: None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::parse("<defaults>", "").expect("the default routes are valid")
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoutes {
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    repeat: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    channels: BTreeMap<String, RawChannel>,
    #[serde(default)]
    receivers: BTreeMap<String, RawReceiver>,
    routes: Option<Vec<RawRoute>>,
    #[serde(default)]
    inhibit: Vec<RawInhibit>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    group_wait: Option<Spanned<String>>,
    group_interval: Option<Spanned<String>>,
    group_by: Option<Vec<Spanned<String>>>,
    templates: Option<PathBuf>,
    max_parts: Option<Spanned<usize>>,
    operators: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    first: Option<Spanned<String>>,
    max: Option<Spanned<String>>,
    give_up_after: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    parallel: Option<Spanned<usize>>,
}

/// One table for every channel type, so that a field of the wrong type gets a message that
/// says so.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawChannel {
    #[serde(rename = "type")]
    pub(crate) kind: Spanned<String>,
    // email
    pub(crate) host: Option<Spanned<String>>,
    pub(crate) port: Option<Spanned<u16>>,
    pub(crate) security: Option<Spanned<String>>,
    pub(crate) username: Option<Spanned<String>>,
    pub(crate) password_env: Option<Spanned<String>>,
    pub(crate) password_file: Option<Spanned<PathBuf>>,
    pub(crate) from: Option<Spanned<String>>,
    pub(crate) tls_server_name: Option<Spanned<String>>,
    pub(crate) ca_file: Option<Spanned<PathBuf>>,
    // telegram
    pub(crate) api_url: Option<Spanned<String>>,
    pub(crate) bot_token_env: Option<Spanned<String>>,
    pub(crate) bot_token_file: Option<Spanned<PathBuf>>,
    /// Refused with a message of its own: a token is a secret.
    pub(crate) bot_token: Option<Spanned<toml::Value>>,
    pub(crate) bot: Option<Spanned<String>>,
    pub(crate) webhook_url: Option<Spanned<String>>,
    pub(crate) webhook_secret_env: Option<Spanned<String>>,
    pub(crate) webhook_secret_file: Option<Spanned<PathBuf>>,
    // webhook
    pub(crate) url: Option<Spanned<String>>,
    pub(crate) url_env: Option<Spanned<String>>,
    pub(crate) url_file: Option<Spanned<PathBuf>>,
    pub(crate) authorization_env: Option<Spanned<String>>,
    pub(crate) authorization_file: Option<Spanned<PathBuf>>,
    pub(crate) signing_secret_env: Option<Spanned<String>>,
    pub(crate) signing_secret_file: Option<Spanned<PathBuf>>,
    /// Refused: secrets are named, never written.
    pub(crate) password: Option<Spanned<toml::Value>>,
    pub(crate) authorization: Option<Spanned<toml::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReceiver {
    #[serde(default)]
    owner: bool,
    #[serde(default)]
    channels: Vec<Spanned<String>>,
    #[serde(default)]
    email: Vec<Spanned<String>>,
    telegram_chat_id: Option<Spanned<toml::Value>>,
    slack_webhook_env: Option<Spanned<String>>,
    slack_webhook_file: Option<Spanned<PathBuf>>,
    slack_webhook: Option<Spanned<toml::Value>>,
    timezone: Option<Spanned<String>>,
    quiet_hours: Option<RawQuiet>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuiet {
    start: Spanned<String>,
    end: Spanned<String>,
    except: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    kinds: Option<Vec<Spanned<String>>>,
    min_severity: Option<Spanned<String>>,
    owners: Option<Vec<String>>,
    receivers: Vec<Spanned<String>>,
    group_by: Option<Vec<Spanned<String>>>,
    group_wait: Option<Spanned<String>>,
    group_interval: Option<Spanned<String>>,
    repeat_interval: Option<Spanned<String>>,
    #[serde(default, rename = "continue")]
    continue_matching: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInhibit {
    source: Vec<Spanned<String>>,
    targets: Vec<Spanned<String>>,
    equal: Option<Spanned<String>>,
}

const DEFAULT_GROUP_WAIT: &str = "30s";
const DEFAULT_GROUP_INTERVAL: &str = "5m";
const DEFAULT_REPEAT: &str = "24h";
impl Config {
    /// Reads and validates a routes file; templates named relative to it.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read_text(path)?;
        Config::parse(&path.display().to_string(), &text)
    }

    /// Parses and validates routes TOML; `file` names it in errors and anchors a relative
    /// templates directory. No IO.
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        let raw: RawRoutes = parse_toml(file, text)?;
        Validator { file, text }.config(raw)
    }

    /// Whether findings of this kind go anywhere.
    pub fn routes_kind(&self, kind: Kind) -> bool {
        self.routes
            .iter()
            .any(|r| r.kinds.as_ref().is_none_or(|k| k.contains(&kind)))
    }
}

/// One `[channels.NAME]` table, for the channel modules that read their own settings from
/// it (`channel::email::settings`, ...): errors name `channels.NAME.FIELD`.
pub(crate) struct ChannelTable<'a> {
    v: &'a Validator<'a>,
    name: &'a str,
    pub(crate) raw: &'a RawChannel,
}

impl ChannelTable<'_> {
    pub(crate) fn err(
        &self,
        field: &str,
        span: Option<Range<usize>>,
        reason: impl Into<String>,
    ) -> ConfigError {
        self.v
            .err(format!("channels.{}.{field}", self.name), span, reason)
    }

    /// A secret named by `FIELD_env` or `FIELD_file`, if either is set.
    pub(crate) fn secret(
        &self,
        field: &str,
        env: &Option<Spanned<String>>,
        file: &Option<Spanned<PathBuf>>,
    ) -> Result<Option<SecretRef>, ConfigError> {
        self.v
            .secret(&format!("channels.{}.{field}", self.name), env, file)
    }

    /// An http:// or https:// URL, without a trailing slash.
    pub(crate) fn http_url(&self, field: &str, v: &Spanned<String>) -> Result<String, ConfigError> {
        let u = v.get_ref().trim();
        if (u.starts_with("http://") || u.starts_with("https://")) && u.len() > 8 {
            Ok(u.trim_end_matches('/').to_owned())
        } else {
            Err(self.err(
                field,
                Some(v.span()),
                format!("expected an http:// or https:// URL, found `{u}`"),
            ))
        }
    }
}

struct Validator<'a> {
    file: &'a str,
    text: &'a str,
}

impl Validator<'_> {
    fn err(
        &self,
        field: impl Into<String>,
        span: Option<Range<usize>>,
        reason: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            line: line_of(self.text, span),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn duration_ms(&self, field: &str, v: &Spanned<String>) -> Result<i64, ConfigError> {
        duration::parse(v.get_ref())
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .map_err(|e| self.err(field, Some(v.span()), e))
    }

    fn positive_ms(&self, field: &str, v: &Spanned<String>) -> Result<i64, ConfigError> {
        let ms = self.duration_ms(field, v)?;
        if ms <= 0 {
            return Err(self.err(field, Some(v.span()), "must be more than 0"));
        }
        Ok(ms)
    }

    /// `"never"` or a positive duration.
    fn repeat_ms(&self, field: &str, v: &Spanned<String>) -> Result<Option<i64>, ConfigError> {
        if v.get_ref().trim() == "never" {
            return Ok(None);
        }
        let ms = self.duration_ms(field, v).map_err(|mut e| {
            e.reason = format!(
                "expected \"never\" or a duration like \"24h\", found `{}`",
                v.get_ref()
            );
            e
        })?;
        if ms <= 0 {
            return Err(self.err(
                field,
                Some(v.span()),
                "must be more than 0; write \"never\" to tell each fact once",
            ));
        }
        Ok(Some(ms))
    }

    fn kind(&self, field: String, v: &Spanned<String>) -> Result<Kind, ConfigError> {
        v.get_ref()
            .parse()
            .map_err(|e: String| self.err(field, Some(v.span()), e))
    }

    fn kinds(&self, field: &str, v: &[Spanned<String>]) -> Result<BTreeSet<Kind>, ConfigError> {
        if v.is_empty() {
            return Err(self.err(field, None, "must name at least one kind"));
        }
        v.iter()
            .enumerate()
            .map(|(i, k)| self.kind(format!("{field}[{i}]"), k))
            .collect()
    }

    fn group_by(&self, field: &str, v: &[Spanned<String>]) -> Result<Vec<GroupBy>, ConfigError> {
        v.iter()
            .enumerate()
            .map(|(i, g)| {
                g.get_ref()
                    .parse()
                    .map_err(|e: String| self.err(format!("{field}[{i}]"), Some(g.span()), e))
            })
            .collect()
    }

    fn secret(
        &self,
        field: &str,
        env: &Option<Spanned<String>>,
        file: &Option<Spanned<PathBuf>>,
    ) -> Result<Option<SecretRef>, ConfigError> {
        match (env, file) {
            (Some(e), Some(_)) => Err(self.err(
                format!("{field}_env"),
                Some(e.span()),
                format!("set {field}_env or {field}_file, not both"),
            )),
            (Some(e), None) if e.get_ref().trim().is_empty() => {
                Err(self.err(format!("{field}_env"), Some(e.span()), "must not be empty"))
            }
            (Some(e), None) => Ok(Some(SecretRef::Env(e.get_ref().trim().to_owned()))),
            (None, Some(p)) if p.get_ref().as_os_str().is_empty() => {
                Err(self.err(format!("{field}_file"), Some(p.span()), "must not be empty"))
            }
            (None, Some(p)) => Ok(Some(SecretRef::File(p.get_ref().clone()))),
            (None, None) => Ok(None),
        }
    }

    fn config(&self, raw: RawRoutes) -> Result<Config, ConfigError> {
        let d = &raw.defaults;
        let group_wait_ms = match &d.group_wait {
            Some(v) => self.duration_ms("defaults.group_wait", v)?,
            None => duration::parse(DEFAULT_GROUP_WAIT)
                .expect("valid")
                .as_millis() as i64,
        };
        let group_interval_ms = match &d.group_interval {
            Some(v) => self.positive_ms("defaults.group_interval", v)?,
            None => duration::parse(DEFAULT_GROUP_INTERVAL)
                .expect("valid")
                .as_millis() as i64,
        };
        let group_by = match &d.group_by {
            Some(v) => self.group_by("defaults.group_by", v)?,
            None => vec![GroupBy::Key],
        };
        let max_parts = match &d.max_parts {
            Some(v) if *v.get_ref() == 0 || *v.get_ref() > 100 => {
                return Err(self.err(
                    "defaults.max_parts",
                    Some(v.span()),
                    format!("expected 1 to 100, found {}", v.get_ref()),
                ))
            }
            Some(v) => *v.get_ref(),
            None => 5,
        };
        let templates_dir = d.templates.as_ref().map(|p| {
            if p.is_relative() {
                Path::new(self.file)
                    .parent()
                    .unwrap_or(Path::new(""))
                    .join(p)
            } else {
                p.clone()
            }
        });

        let repeat = self.repeat(&raw.repeat)?;
        let retry = self.retry(&raw.retry)?;

        let mut channels = BTreeMap::new();
        for (name, c) in &raw.channels {
            channels.insert(name.clone(), self.channel(name, c)?);
        }
        let mut receivers = BTreeMap::new();
        for (name, r) in &raw.receivers {
            receivers.insert(name.clone(), self.receiver(name, r, &channels)?);
        }
        receivers
            .entry(OWNER_RECEIVER.to_owned())
            .or_insert_with(Receiver::owner_default);
        let routes = match &raw.routes {
            None => vec![Route {
                kinds: None,
                min_severity: Severity::Info,
                owners: None,
                receivers: vec![OWNER_RECEIVER.to_owned()],
                group_by: group_by.clone(),
                group_wait_ms,
                group_interval_ms,
                repeat_ms: None,
                continue_matching: false,
            }],
            Some(routes) => routes
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    self.route(
                        i,
                        r,
                        &receivers,
                        &group_by,
                        group_wait_ms,
                        group_interval_ms,
                    )
                })
                .collect::<Result<_, _>>()?,
        };

        // After the routes: they may not name the built-in operators receiver.
        let operators = match &d.operators {
            Some(v) => {
                let name = v.get_ref().trim();
                match receivers.get(name) {
                    Some(r) if !r.owner => name.to_owned(),
                    Some(_) => {
                        return Err(self.err(
                            "defaults.operators",
                            Some(v.span()),
                            format!(
                                "`{name}` is an owner receiver: findings without an owner need \
                                 a team receiver"
                            ),
                        ))
                    }
                    None => {
                        let known: Vec<&str> = receivers
                            .iter()
                            .filter(|(_, r)| !r.owner)
                            .map(|(n, _)| n.as_str())
                            .collect();
                        return Err(self.err(
                            "defaults.operators",
                            Some(v.span()),
                            format!(
                                "undefined receiver `{name}` (team receivers: {})",
                                if known.is_empty() {
                                    "none".to_owned()
                                } else {
                                    known.join(", ")
                                }
                            ),
                        ));
                    }
                }
            }
            None => match receivers.get("operations") {
                Some(r) if !r.owner => "operations".to_owned(),
                _ => {
                    let r = receivers
                        .entry(OPERATORS_RECEIVER.to_owned())
                        .or_insert_with(Receiver::operators_default);
                    if r.owner {
                        return Err(self.err(
                            "defaults.operators",
                            None,
                            "receiver `operators` is an owner receiver: name the team receiver \
                             for findings without an owner here",
                        ));
                    }
                    OPERATORS_RECEIVER.to_owned()
                }
            },
        };

        let mut inhibit = Vec::new();
        for (i, r) in raw.inhibit.iter().enumerate() {
            let f = |x: &str| format!("inhibit[{i}].{x}");
            let equal = match &r.equal {
                None => Equal::Key,
                Some(v) => match v.get_ref().trim() {
                    "key" => Equal::Key,
                    "owner" => Equal::Owner,
                    other => {
                        return Err(self.err(
                            f("equal"),
                            Some(v.span()),
                            format!("expected \"key\" or \"owner\", found `{other}`"),
                        ))
                    }
                },
            };
            inhibit.push(Inhibit {
                sources: self.kinds(&f("source"), &r.source)?,
                targets: self.kinds(&f("targets"), &r.targets)?,
                equal,
            });
        }

        Ok(Config {
            origin: self.file.to_owned(),
            templates_dir,
            max_parts,
            repeat,
            retry,
            channels,
            receivers,
            operators,
            routes,
            inhibit,
        })
    }

    fn repeat(&self, raw: &BTreeMap<String, Spanned<String>>) -> Result<Repeat, ConfigError> {
        let default_ms = match raw.get("default") {
            Some(v) => self.repeat_ms("repeat.default", v)?,
            None => Some(duration::parse(DEFAULT_REPEAT).expect("valid").as_millis() as i64),
        };
        // Kinds told once unless the file says otherwise (`KindInfo::repeats`).
        let mut by_kind: BTreeMap<Kind, Option<i64>> = FindingKind::ALL
            .into_iter()
            .filter(|k| !k.info().repeats)
            .map(|k| (Kind::Finding(k), None))
            .collect();
        for (name, v) in raw {
            if name == "default" {
                continue;
            }
            let field = format!("repeat.{name}");
            let kind: Kind = name.parse().map_err(|e: String| {
                self.err(&field, Some(v.span()), format!("{e}, or default"))
            })?;
            by_kind.insert(kind, self.repeat_ms(&field, v)?);
        }
        Ok(Repeat {
            default_ms,
            by_kind,
        })
    }

    fn retry(&self, r: &RawRetry) -> Result<Retry, ConfigError> {
        let get = |field: &str, v: &Option<Spanned<String>>, default: &str| match v {
            Some(v) => self.positive_ms(&format!("retry.{field}"), v),
            None => Ok(duration::parse(default).expect("valid").as_millis() as i64),
        };
        let first_ms = get("first", &r.first, "1s")?;
        let max_ms = get("max", &r.max, "1m")?;
        if max_ms < first_ms {
            return Err(self.err(
                "retry.max",
                r.max.as_ref().map(|v| v.span()),
                "must not be less than retry.first",
            ));
        }
        let parallel = match &r.parallel {
            Some(v) if *v.get_ref() == 0 => {
                return Err(self.err("retry.parallel", Some(v.span()), "must be at least 1"))
            }
            Some(v) => *v.get_ref(),
            None => 8,
        };
        Ok(Retry {
            first_ms,
            max_ms,
            give_up_after_ms: get("give_up_after", &r.give_up_after, "24h")?,
            timeout: Duration::from_millis(get("timeout", &r.timeout, "10s")? as u64),
            parallel,
        })
    }

    fn channel(&self, name: &str, c: &RawChannel) -> Result<Channel, ConfigError> {
        let f = |x: &str| format!("channels.{name}.{x}");
        for (field, v) in [
            ("bot_token", c.bot_token.as_ref().map(|v| v.span())),
            ("password", c.password.as_ref().map(|v| v.span())),
            ("authorization", c.authorization.as_ref().map(|v| v.span())),
        ] {
            if let Some(span) = v {
                return Err(self.err(
                    f(field),
                    Some(span),
                    format!(
                        "a secret is never written in the file: name it with {field}_env or \
                         {field}_file instead"
                    ),
                ));
            }
        }
        let kind = c.kind.get_ref().trim();
        // Which optional fields each type takes.
        let set: Vec<(&str, Option<Range<usize>>)> = vec![
            ("host", c.host.as_ref().map(|v| v.span())),
            ("port", c.port.as_ref().map(|v| v.span())),
            ("security", c.security.as_ref().map(|v| v.span())),
            ("username", c.username.as_ref().map(|v| v.span())),
            ("password_env", c.password_env.as_ref().map(|v| v.span())),
            ("password_file", c.password_file.as_ref().map(|v| v.span())),
            ("from", c.from.as_ref().map(|v| v.span())),
            (
                "tls_server_name",
                c.tls_server_name.as_ref().map(|v| v.span()),
            ),
            ("ca_file", c.ca_file.as_ref().map(|v| v.span())),
            ("api_url", c.api_url.as_ref().map(|v| v.span())),
            ("bot_token_env", c.bot_token_env.as_ref().map(|v| v.span())),
            (
                "bot_token_file",
                c.bot_token_file.as_ref().map(|v| v.span()),
            ),
            ("url", c.url.as_ref().map(|v| v.span())),
            ("url_env", c.url_env.as_ref().map(|v| v.span())),
            ("url_file", c.url_file.as_ref().map(|v| v.span())),
            (
                "authorization_env",
                c.authorization_env.as_ref().map(|v| v.span()),
            ),
            (
                "authorization_file",
                c.authorization_file.as_ref().map(|v| v.span()),
            ),
            (
                "signing_secret_env",
                c.signing_secret_env.as_ref().map(|v| v.span()),
            ),
            (
                "signing_secret_file",
                c.signing_secret_file.as_ref().map(|v| v.span()),
            ),
        ];
        let allowed: &[&str] = match kind {
            "console" | "slack" => &[],
            "email" => email::FIELDS,
            "telegram" => telegram::FIELDS,
            "webhook" => webhook::FIELDS,
            other => {
                return Err(self.err(
                    f("type"),
                    Some(c.kind.span()),
                    format!(
                        "unknown channel type `{other}`, expected one of email, telegram, slack, \
                         webhook, console"
                    ),
                ))
            }
        };
        for (field, span) in &set {
            if span.is_some() && !allowed.contains(field) {
                return Err(self.err(
                    f(field),
                    span.clone(),
                    format!("not a field of a {kind} channel"),
                ));
            }
        }
        let table = ChannelTable {
            v: self,
            name,
            raw: c,
        };
        let kind = match kind {
            "console" => ChannelKind::Console,
            "slack" => ChannelKind::Slack,
            "email" => ChannelKind::Email(email::settings(&table)?),
            "telegram" => ChannelKind::Telegram(telegram::settings(&table)?),
            _ => ChannelKind::Webhook(webhook::settings(&table)?),
        };
        Ok(Channel {
            name: name.to_owned(),
            kind,
        })
    }

    fn receiver(
        &self,
        name: &str,
        r: &RawReceiver,
        channels: &BTreeMap<String, Channel>,
    ) -> Result<Receiver, ConfigError> {
        let f = |x: &str| format!("receivers.{name}.{x}");
        if let Some(v) = &r.slack_webhook {
            return Err(self.err(
                f("slack_webhook"),
                Some(v.span()),
                "a webhook URL is a secret: name it with slack_webhook_env or slack_webhook_file \
                 instead",
            ));
        }
        if r.owner
            && (!r.email.is_empty()
                || r.telegram_chat_id.is_some()
                || r.slack_webhook_env.is_some()
                || r.slack_webhook_file.is_some()
                || r.timezone.is_some())
        {
            return Err(self.err(
                f("owner"),
                None,
                "an owner receiver takes its contacts and time zone from keys.toml: remove \
                 email, telegram_chat_id, slack_webhook_* and timezone",
            ));
        }
        let mut names = Vec::new();
        for (i, c) in r.channels.iter().enumerate() {
            let cname = c.get_ref().trim();
            if !channels.contains_key(cname) {
                let known: Vec<&str> = channels.keys().map(String::as_str).collect();
                return Err(self.err(
                    format!("receivers.{name}.channels[{i}]"),
                    Some(c.span()),
                    if known.is_empty() {
                        format!("undefined channel `{cname}`: define it under [channels.{cname}]")
                    } else {
                        format!(
                            "undefined channel `{cname}`, expected one of {}",
                            known.join(", ")
                        )
                    },
                ));
            }
            names.push(cname.to_owned());
        }
        let email = crate::registry::contacts::emails(&r.email).map_err(|(i, span, reason)| {
            self.err(format!("receivers.{name}.email[{i}]"), Some(span), reason)
        })?;
        let telegram_chat_id = crate::registry::contacts::telegram_chat_id(&r.telegram_chat_id)
            .map_err(|(span, reason)| self.err(f("telegram_chat_id"), Some(span), reason))?;
        let slack_webhook = self.secret(
            &f("slack_webhook"),
            &r.slack_webhook_env,
            &r.slack_webhook_file,
        )?;
        let timezone = match &r.timezone {
            Some(tz) => parse_timezone(tz.get_ref())
                .map_err(|e| self.err(f("timezone"), Some(tz.span()), e))?,
            None => Tz::UTC,
        };
        let quiet_hours = match &r.quiet_hours {
            None => None,
            Some(q) => {
                let time = |field: &str, v: &Spanned<String>| {
                    NaiveTime::parse_from_str(v.get_ref().trim(), "%H:%M").map_err(|_| {
                        self.err(
                            f(&format!("quiet_hours.{field}")),
                            Some(v.span()),
                            format!("expected a time like \"22:00\", found `{}`", v.get_ref()),
                        )
                    })
                };
                let except = match &q.except {
                    None => Severity::Critical,
                    Some(v) => v.get_ref().parse().map_err(|e: String| {
                        self.err(f("quiet_hours.except"), Some(v.span()), e)
                    })?,
                };
                let (start, end) = (time("start", &q.start)?, time("end", &q.end)?);
                if start == end {
                    return Err(self.err(
                        f("quiet_hours.end"),
                        Some(q.end.span()),
                        "must differ from start",
                    ));
                }
                Some(QuietHours { start, end, except })
            }
        };
        Ok(Receiver {
            name: name.to_owned(),
            owner: r.owner,
            channels: names,
            email,
            telegram_chat_id,
            slack_webhook,
            timezone,
            quiet_hours,
        })
    }

    fn route(
        &self,
        i: usize,
        r: &RawRoute,
        receivers: &BTreeMap<String, Receiver>,
        group_by: &[GroupBy],
        group_wait_ms: i64,
        group_interval_ms: i64,
    ) -> Result<Route, ConfigError> {
        let f = |x: &str| format!("routes[{i}].{x}");
        if r.receivers.is_empty() {
            return Err(self.err(f("receivers"), None, "must name at least one receiver"));
        }
        let mut names = Vec::new();
        for (j, name) in r.receivers.iter().enumerate() {
            let n = name.get_ref().trim();
            if !receivers.contains_key(n) {
                let known: Vec<&str> = receivers.keys().map(String::as_str).collect();
                return Err(self.err(
                    format!("routes[{i}].receivers[{j}]"),
                    Some(name.span()),
                    format!(
                        "undefined receiver `{n}`, expected one of {}",
                        known.join(", ")
                    ),
                ));
            }
            names.push(n.to_owned());
        }
        let kinds = match &r.kinds {
            None => None,
            Some(k) => Some(self.kinds(&f("kinds"), k)?),
        };
        let min_severity = match &r.min_severity {
            None => Severity::Info,
            Some(v) => v
                .get_ref()
                .parse()
                .map_err(|e: String| self.err(f("min_severity"), Some(v.span()), e))?,
        };
        Ok(Route {
            kinds,
            min_severity,
            owners: r.owners.as_ref().map(|o| o.iter().cloned().collect()),
            receivers: names,
            group_by: match &r.group_by {
                Some(g) => self.group_by(&f("group_by"), g)?,
                None => group_by.to_vec(),
            },
            group_wait_ms: match &r.group_wait {
                Some(v) => self.duration_ms(&f("group_wait"), v)?,
                None => group_wait_ms,
            },
            group_interval_ms: match &r.group_interval {
                Some(v) => self.positive_ms(&f("group_interval"), v)?,
                None => group_interval_ms,
            },
            repeat_ms: match &r.repeat_interval {
                Some(v) => Some(self.repeat_ms(&f("repeat_interval"), v)?),
                None => None,
            },
            continue_matching: r.continue_matching,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse("routes.toml", text).unwrap_err().to_string()
    }

    #[test]
    fn the_defaults_send_everything_to_the_owner() {
        let c = Config::default();
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.routes[0].receivers, ["owner"]);
        assert!(c.receivers["owner"].owner);
        assert!(c.receivers["owner"].channels.is_empty());
        assert_eq!(c.routes[0].group_wait_ms, 30_000);
        assert_eq!(
            c.repeat.of(Kind::Finding(FindingKind::RotationReminder)),
            None
        );
        assert_eq!(
            c.repeat.of(Kind::Finding(FindingKind::LingeringOldKey)),
            Some(86_400_000)
        );
        assert_eq!(c.retry.first_ms, 1000);
        assert_eq!(c.max_parts, 5);
    }

    #[test]
    fn the_shipped_routes_are_valid() {
        let text = include_str!("../../rules/routes.toml");
        let c = Config::parse("rules/routes.toml", text).unwrap();
        assert!(c.routes.len() >= 3);
        assert_eq!(c.templates_dir, Some(PathBuf::from("rules/templates")));
        for k in FindingKind::ALL {
            assert!(c.routes_kind(Kind::Finding(k)), "{k} goes nowhere");
        }
        assert!(c.routes_kind(Kind::NotificationFailed));
        assert!(!c.inhibit.is_empty());
    }

    #[test]
    fn a_full_file_is_read() {
        let c = Config::parse(
            "rules/routes.toml",
            r#"
[defaults]
group_wait = "0s"
group_interval = "1m"
templates = "/etc/keywatch/templates"
max_parts = 3
[repeat]
default = "12h"
lingering_old_key = "never"
[retry]
first = "500ms"
max = "30s"
give_up_after = "1h"
timeout = "5s"
parallel = 2
[channels.mail]
type = "email"
host = "smtp.example.com"
security = "tls"
username = "kw"
password_file = "/run/secrets/smtp"
from = "keywatch <kw@example.com>"
[channels.tg]
type = "telegram"
bot_token_env = "TG_TOKEN"
api_url = "http://127.0.0.1:9000/"
[channels.slack]
type = "slack"
[channels.hook]
type = "webhook"
url = "https://hooks.example.com/keywatch"
authorization_env = "HOOK_AUTH"
[receivers.owner]
owner = true
channels = ["mail", "tg", "slack"]
quiet_hours = { start = "22:00", end = "07:30", except = "warning" }
[receivers.security]
email = ["sec@example.com"]
telegram_chat_id = -1001234
slack_webhook_env = "SLACK_SEC"
timezone = "Europe/Berlin"
channels = ["mail", "hook"]
[[routes]]
kinds = ["revoked_key_used", "failed_rollover"]
min_severity = "warning"
receivers = ["security"]
group_by = ["finding"]
repeat_interval = "1h"
continue = true
[[routes]]
receivers = ["owner"]
owners = ["acme"]
[[inhibit]]
source = ["safe_to_revoke"]
targets = ["lingering_old_key", "rotation_reminder"]
"#,
        )
        .unwrap();
        assert_eq!(
            c.templates_dir,
            Some(PathBuf::from("/etc/keywatch/templates"))
        );
        assert_eq!(c.max_parts, 3);
        assert_eq!(
            c.repeat.of(Kind::Finding(FindingKind::RotationAtRisk)),
            Some(43_200_000)
        );
        assert_eq!(
            c.repeat.of(Kind::Finding(FindingKind::LingeringOldKey)),
            None
        );
        assert_eq!(c.retry.timeout, Duration::from_secs(5));
        let ChannelKind::Email(mail) = &c.channels["mail"].kind else {
            panic!()
        };
        assert_eq!((mail.port, mail.security), (465, SmtpSecurity::Tls));
        assert_eq!(
            mail.password,
            Some(SecretRef::File("/run/secrets/smtp".into()))
        );
        let ChannelKind::Telegram(tg) = &c.channels["tg"].kind else {
            panic!()
        };
        assert_eq!(tg.api_url, "http://127.0.0.1:9000");
        let sec = &c.receivers["security"];
        assert_eq!(sec.telegram_chat_id.as_deref(), Some("-1001234"));
        assert_eq!(sec.timezone.name(), "Europe/Berlin");
        let q = c.receivers["owner"].quiet_hours.unwrap();
        assert_eq!(q.except, Severity::Warning);
        assert_eq!(c.routes[0].group_by, [GroupBy::Finding]);
        assert_eq!(c.routes[0].repeat_ms, Some(Some(3_600_000)));
        assert_eq!(c.routes[1].group_wait_ms, 0);
        assert_eq!(c.inhibit[0].equal, Equal::Key);
    }

    #[test]
    fn bad_files_say_where_and_why() {
        let cases: &[(&str, &str)] = &[
            (
                "[[routes]]\nreceivers = [\"owner\", \"securty\"]\n",
                "routes.toml:2: routes[0].receivers[1]: undefined receiver `securty`, expected one of owner",
            ),
            (
                "[receivers.sec]\nemail = [\"a@b.example\"]\nchannels = [\"mail\"]\n",
                "routes.toml:3: receivers.sec.channels[0]: undefined channel `mail`: define it under [channels.mail]",
            ),
            (
                "[[routes]]\nkinds = [\"revoked\"]\nreceivers = [\"owner\"]\n",
                "routes.toml:2: routes[0].kinds[0]: unknown kind `revoked`, expected one of",
            ),
            (
                "[channels.tg]\ntype = \"telegram\"\nbot_token = \"123:abc\"\n",
                "routes.toml:3: channels.tg.bot_token: a secret is never written in the file",
            ),
            (
                "[channels.tg]\ntype = \"telegram\"\nhost = \"x\"\nbot_token_env = \"T\"\n",
                "routes.toml:3: channels.tg.host: not a field of a telegram channel",
            ),
            (
                "[channels.x]\ntype = \"pager\"\n",
                "routes.toml:2: channels.x.type: unknown channel type `pager`",
            ),
            (
                "[channels.m]\ntype = \"email\"\nhost = \"h\"\nfrom = \"not an address\"\n",
                "routes.toml:4: channels.m.from: expected an address like",
            ),
            (
                "[channels.h]\ntype = \"webhook\"\nurl = \"ftp://x\"\n",
                "routes.toml:3: channels.h.url: expected an http:// or https:// URL, found `ftp://x`",
            ),
            (
                "[repeat]\nrotation_overdue = \"0s\"\n",
                "routes.toml:2: repeat.rotation_overdue: must be more than 0; write \"never\"",
            ),
            (
                "[repeat]\nlingering = \"1h\"\n",
                "routes.toml:2: repeat.lingering: unknown kind `lingering`",
            ),
            (
                "[defaults]\ngroup_wait = \"soon\"\n",
                "routes.toml:2: defaults.group_wait: expected a duration like",
            ),
            (
                "[receivers.sec]\nquiet_hours = { start = \"22h\", end = \"07:00\" }\n",
                "routes.toml:2: receivers.sec.quiet_hours.start: expected a time like \"22:00\", found `22h`",
            ),
            (
                "[receivers.owner]\nowner = true\nemail = [\"a@b.example\"]\n",
                "routes.toml: receivers.owner.owner: an owner receiver takes its contacts",
            ),
            (
                "[[routes]]\nreceivers = [\"owner\"]\nsevere = true\n",
                "routes.toml:3: routes[0].severe: unknown field `severe`, expected one of `kinds`",
            ),
            (
                "[[inhibit]]\nsource = [\"safe_to_revoke\"]\ntargets = [\"lingering_old_key\"]\nequal = \"rotation\"\n",
                "routes.toml:4: inhibit[0].equal: expected \"key\" or \"owner\", found `rotation`",
            ),
        ];
        for (text, want) in cases {
            let got = err(text);
            assert!(got.starts_with(want), "got  {got}\nwant {want}");
        }
    }
}
