//! Rendering (stage 5 of the pipeline): a flushed group's findings become one message per
//! target of the recipient (an email address list, a Telegram chat, a Slack webhook, the
//! generic webhook, or the console), rendered with the channel's templates
//! ([`super::message`], [`super::template`]) and ready to queue in the log.
//!
//! Contract: pure but for the template files read at start. A message's id is a hash of
//! where it goes, the group, the time and its facts, so the same flush gives the same ids
//! (the idempotency key of the webhook and email). No secret is in a message: a Slack
//! webhook is addressed by the name of its variable or file.
//!
//! An email about a rotation the notifier has a view of carries its adoption chart
//! ([`crate::chart`], drawn from that same view so the picture and the numbers agree) as an
//! inline image that the HTML names by `cid:`; a chart that cannot be drawn leaves the
//! HTML without it, never the message unsent. A Telegram message about a rotation carries
//! the chart of its first rotation as a photo, its text's head as the caption and the rest
//! in the messages after it; without a chart it is text alone.

use std::collections::HashMap;

use chrono_tz::Tz;
use sha2::{Digest, Sha256};

use super::channel::Address;
use super::config::{ChannelKind, Config, Receiver};
use super::group::{GroupId, Waiting};
use super::log::{MessageFinding, NewMessage};
use super::message::{self, Context, Entry, InlineImage, Rendered};
use super::template::Templates;
use crate::config::ConfigError;
use crate::detect::{RotationStatus, Severity};
use crate::registry::{Owner, Registry};

/// `owner:NAME` for the owner receiver, `team:NAME`. The notifier sends findings without an
/// owner to the operators' receiver (`Config::operators`) instead; `owner:-` is what is left
/// for a caller that does not.
pub fn recipient_of(receiver: &Receiver, owner: Option<&str>) -> String {
    if receiver.owner {
        format!("owner:{}", owner.unwrap_or("-"))
    } else {
        format!("team:{}", receiver.name)
    }
}

/// The owner a recipient names, if any.
pub fn owner_name(recipient: &str) -> Option<&str> {
    recipient.strip_prefix("owner:").filter(|o| *o != "-")
}

/// Where a message goes on one channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub channel: String,
    pub channel_type: &'static str,
    /// Without secrets: `email:a@x`, `telegram:-100…`, `slack:owner:acme`.
    pub target: String,
    pub address: Address,
}

/// The targets of a receiver on its channels (or on `only`): those its contacts allow. None
/// at all: the console.
pub fn targets(
    config: &Config,
    receiver: &Receiver,
    recipient: &str,
    owner: Option<&Owner>,
    only: Option<&str>,
) -> Vec<Target> {
    let mut out = Vec::new();
    let channels: Vec<&str> = match only {
        Some(c) => vec![c],
        None => receiver.channels.iter().map(String::as_str).collect(),
    };
    for name in channels {
        let Some(ch) = config.channels.get(name) else {
            continue;
        };
        let (email, chat, slack) = if receiver.owner {
            (
                owner.map(|o| o.email.clone()).unwrap_or_default(),
                owner.and_then(|o| o.telegram_chat_id.clone()),
                owner.and_then(|o| o.slack_webhook.clone()),
            )
        } else {
            (
                receiver.email.clone(),
                receiver.telegram_chat_id.clone(),
                receiver.slack_webhook.clone(),
            )
        };
        let t = match &ch.kind {
            ChannelKind::Console => Some(("console".to_owned(), Address::Console)),
            ChannelKind::Email(_) => (!email.is_empty()).then(|| {
                (
                    format!("email:{}", email.join(",")),
                    Address::Email { to: email },
                )
            }),
            ChannelKind::Telegram(_) => {
                chat.map(|c| (format!("telegram:{c}"), Address::Telegram { chat_id: c }))
            }
            ChannelKind::Slack => slack.map(|r| (format!("slack:{recipient}"), Address::slack(&r))),
            ChannelKind::Webhook(_) => Some((format!("webhook:{name}"), Address::Webhook)),
        };
        if let Some((target, address)) = t {
            out.push(Target {
                channel: name.to_owned(),
                channel_type: ch.kind.type_name(),
                target,
                address,
            });
        }
    }
    if out.is_empty() && only.is_none() {
        out.push(Target {
            channel: "console".to_owned(),
            channel_type: "console",
            target: "console".to_owned(),
            address: Address::Console,
        });
    }
    out
}

/// A stable id from where a message goes, its group, its time and its facts.
pub fn message_id(
    recipient: &str,
    channel: &str,
    target: &str,
    group: &str,
    now_ms: i64,
    send: &[Waiting],
) -> String {
    let mut h = Sha256::new();
    for part in [recipient, channel, target, group, &now_ms.to_string()] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    for w in send {
        h.update(w.item.dedup_key.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..12])
}

/// Who a group's message is for.
pub struct Audience<'a> {
    pub gid: &'a GroupId,
    pub receiver: &'a Receiver,
    /// The owner the recipient names.
    pub owner: Option<&'a str>,
    /// The recipient's time zone.
    pub tz: Tz,
}

/// The generic webhook's JSON body.
pub struct WebhookBody<'a> {
    pub id: &'a str,
    pub to: &'a Audience<'a>,
    pub severity: Severity,
    pub send: &'a [Waiting],
    pub test: bool,
}

impl WebhookBody<'_> {
    pub fn to_value(&self, subject: &str, text: &str) -> serde_json::Value {
        serde_json::json!({
            "version": "1",
            "id": self.id,
            "receiver": self.to.gid.receiver,
            "recipient": self.to.gid.recipient,
            "owner": self.to.owner,
            "group_key": self.to.gid.values,
            "severity": self.severity.as_str(),
            "subject": subject,
            "text": text,
            "test": self.test,
            "findings": self.send.iter().map(|w| serde_json::json!({
                "kind": w.item.kind.as_str(),
                "key_id": w.item.key_id,
                "owner": w.item.owner,
                "at": crate::registry::format_rfc3339(w.item.at_ms),
                "severity": w.item.severity.as_str(),
                "summary": w.item.summary,
                "evidence": w.item.evidence,
                "dedup_key": w.item.dedup_key,
                "repeated": w.repeated,
            })).collect::<Vec<_>>(),
        })
    }
}

/// The templates: the configured ones, and the built-in ones for when a user template
/// fails at render time.
pub struct Renderer {
    templates: Templates,
    fallback: Templates,
}

impl Renderer {
    /// Reads the templates of `config` (the built-in ones where it names none).
    pub fn load(config: &Config) -> Result<Renderer, ConfigError> {
        Ok(Renderer {
            templates: Templates::load(config.templates_dir.as_deref())?,
            fallback: Templates::load(None)?,
        })
    }

    /// Renders a template context for one channel type.
    pub fn render(
        &self,
        channel_type: &str,
        ctx: &serde_json::Value,
        max_parts: usize,
        body: &WebhookBody<'_>,
    ) -> Rendered {
        message::render(
            channel_type,
            ctx,
            &self.templates,
            &self.fallback,
            max_parts,
            |subject, text| body.to_value(subject, text),
        )
    }

    /// The messages of a group flush: one per target of the recipient.
    pub fn compose(
        &self,
        config: &Config,
        registry: &Registry,
        rotations: &HashMap<String, RotationStatus>,
        to: &Audience<'_>,
        send: &[Waiting],
        now_ms: i64,
    ) -> Vec<NewMessage> {
        let gid = to.gid;
        let reg_owner = to.owner.and_then(|o| registry.owner(o));
        let ctx = Context {
            test: false,
            recipient: &gid.recipient,
            receiver: &gid.receiver,
            owner: to.owner,
            tz: to.tz,
            entries: send
                .iter()
                .map(|w| Entry {
                    item: &w.item,
                    repeated: w.repeated,
                })
                .collect(),
            rotations,
        };
        let severity = send
            .iter()
            .map(|w| w.item.severity)
            .max()
            .unwrap_or(Severity::Info);
        let mut kinds: Vec<&str> = send.iter().map(|w| w.item.kind.as_str()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        let findings: Vec<MessageFinding> = send
            .iter()
            .map(|w| MessageFinding {
                dedup_key: w.item.dedup_key.clone(),
                kind: w.item.kind.as_str().to_owned(),
                key_id: w.item.key_id.clone(),
                owner: w.item.owner.clone(),
            })
            .collect();
        let mut out = Vec::new();
        let mut charts = Charts::default();
        for t in targets(config, to.receiver, &gid.recipient, reg_owner, None) {
            let id = message_id(
                &gid.recipient,
                &t.channel,
                &t.target,
                &gid.values,
                now_ms,
                send,
            );
            let mut value = ctx.to_value(&t.channel, now_ms);
            let images = match t.channel_type {
                "email" => charts.attach(&mut value, rotations),
                "telegram" => charts.photo(&mut value, rotations).into_iter().collect(),
                _ => Vec::new(),
            };
            let body = WebhookBody {
                id: &id,
                to,
                severity,
                send,
                test: false,
            };
            let mut rendered = self.render(t.channel_type, &value, config.max_parts, &body);
            rendered.images = if t.channel_type == "telegram" {
                images
            } else {
                // Only the pictures the HTML shows (an edited template may leave a chart out).
                images
                    .into_iter()
                    .filter(|i| rendered.html.contains(&format!("cid:{}", i.cid)))
                    .collect()
            };
            out.push(NewMessage {
                id,
                recipient: gid.recipient.clone(),
                receiver: gid.receiver.clone(),
                channel: t.channel,
                channel_type: t.channel_type.to_owned(),
                target: t.target,
                address: serde_json::to_string(&t.address).expect("an address serializes"),
                group_key: gid.values.clone(),
                kinds: kinds.join(","),
                severity: severity.as_str().to_owned(),
                created_ms: now_ms,
                payload: serde_json::to_string(&rendered).expect("a message serializes"),
                findings: findings.clone(),
            });
        }
        out
    }
}

/// The adoption charts of one flush, drawn once however many targets show them.
#[derive(Default)]
struct Charts {
    drawn: HashMap<String, Option<Vec<u8>>>,
}

impl Charts {
    /// The chart of `status`, drawn the first time it is asked for; `None` when it cannot
    /// be drawn (the message goes without it).
    fn png(&mut self, status: &RotationStatus) -> Option<&Vec<u8>> {
        self.drawn
            .entry(status.old_key.clone())
            .or_insert_with(|| match crate::chart::adoption_png(status) {
                Ok(png) => Some(png),
                Err(e) => {
                    tracing::warn!(key = %status.old_key, error = %e, "no adoption chart in the message");
                    None
                }
            })
            .as_ref()
    }

    /// A Telegram message's photo: the chart of its first rotation section (a message
    /// carries one photo), and `photo = true` in the context so that the text is split as
    /// its caption and what follows (`message::render`). `None`: no rotation in the
    /// message, or no chart drawn; the message goes as text.
    fn photo(
        &mut self,
        ctx: &mut serde_json::Value,
        rotations: &HashMap<String, RotationStatus>,
    ) -> Option<InlineImage> {
        let status = ctx["sections"].as_array()?.iter().find_map(|s| {
            s["rotation"]["old_key"]
                .as_str()
                .and_then(|k| rotations.get(k))
        })?;
        let data = self.png(status)?.clone();
        ctx["photo"] = serde_json::json!(true);
        Some(InlineImage {
            cid: "adoption-1@keywatch".to_owned(),
            content_type: "image/png".to_owned(),
            data,
        })
    }

    /// Names the chart of each rotation section in the context (`rotation.chart_cid`) and
    /// returns the pictures to send with the HTML.
    fn attach(
        &mut self,
        ctx: &mut serde_json::Value,
        rotations: &HashMap<String, RotationStatus>,
    ) -> Vec<InlineImage> {
        let mut images = Vec::new();
        let Some(sections) = ctx["sections"].as_array_mut() else {
            return images;
        };
        for s in sections {
            let r = &mut s["rotation"];
            let Some(status) = r["old_key"].as_str().and_then(|k| rotations.get(k)) else {
                continue;
            };
            if let Some(png) = self.png(status) {
                let cid = format!("adoption-{}@keywatch", images.len() + 1);
                r["chart_cid"] = serde_json::json!(cid);
                images.push(InlineImage {
                    cid,
                    content_type: "image/png".to_owned(),
                    data: png.clone(),
                });
            }
        }
        images
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::FindingKind;
    use crate::notify::route::{Item, Kind};

    const ROUTES: &str = r#"
[channels.mail]
type = "email"
host = "localhost"
from = "keywatch@example.com"

[channels.tg]
type = "telegram"
bot_token_env = "KW_TEST_TOKEN"

[channels.hook]
type = "webhook"
url = "http://localhost:1/hook"

[receivers.owner]
owner = true
channels = ["mail", "tg", "hook"]

[receivers.ops]
channels = ["tg"]
telegram_chat_id = -100
"#;

    const KEYS: &str = "[owners.acme]\nemail = [\"a@acme.example\"]\n\
        [owners.mute]\n[[keys]]\nid = \"k1\"\nowner = \"acme\"\n";

    fn waiting(kind: FindingKind, key: &str, severity: Severity) -> Waiting {
        Waiting {
            item: Item {
                kind: Kind::Finding(kind),
                key_id: "k1".into(),
                owner: Some("acme".into()),
                at_ms: 1_795_132_800_000,
                severity,
                summary: format!("{kind} on k1"),
                evidence: serde_json::json!({}),
                dedup_key: key.into(),
            },
            raised_ms: 0,
            repeated: false,
        }
    }

    #[test]
    fn targets_follow_the_contacts_and_fall_back_to_the_console() {
        let config = Config::parse("routes.toml", ROUTES).unwrap();
        let registry = Registry::parse("keys.toml", KEYS).unwrap();
        let owner = &config.receivers["owner"];
        let ops = &config.receivers["ops"];
        // (receiver, owner, only, targets)
        let cases: [(&Receiver, &str, Option<&str>, &[&str]); 5] = [
            (
                owner,
                "acme",
                None,
                &["email:a@acme.example", "webhook:hook"],
            ),
            (owner, "mute", None, &["webhook:hook"]),
            (owner, "mute", Some("tg"), &[]),
            (ops, "-", None, &["telegram:-100"]),
            (ops, "-", Some("mail"), &[]),
        ];
        for (receiver, name, only, want) in cases {
            let recipient = recipient_of(receiver, Some(name));
            let got = targets(&config, receiver, &recipient, registry.owner(name), only);
            let got: Vec<&str> = got.iter().map(|t| t.target.as_str()).collect();
            assert_eq!(got, want, "{} {name} {only:?}", receiver.name);
        }
        let mut no_channels = ops.clone();
        no_channels.channels.clear();
        let t = targets(&config, &no_channels, "team:ops", None, None);
        assert_eq!(t[0].address, Address::Console);
    }

    #[test]
    fn recipients_name_owners_or_teams() {
        let config = Config::parse("routes.toml", ROUTES).unwrap();
        let owner = &config.receivers["owner"];
        assert_eq!(recipient_of(owner, Some("acme")), "owner:acme");
        assert_eq!(recipient_of(owner, None), "owner:-");
        assert_eq!(
            recipient_of(&config.receivers["ops"], Some("acme")),
            "team:ops"
        );
        assert_eq!(owner_name("owner:acme"), Some("acme"));
        assert_eq!(owner_name("owner:-"), None);
        assert_eq!(owner_name("team:ops"), None);
    }

    #[test]
    fn a_group_becomes_one_message_per_target_with_stable_ids() {
        let config = Config::parse("routes.toml", ROUTES).unwrap();
        let registry = Registry::parse("keys.toml", KEYS).unwrap();
        let renderer = Renderer::load(&config).unwrap();
        let gid = GroupId {
            recipient: "owner:acme".into(),
            receiver: "owner".into(),
            route: 0,
            values: "acme".into(),
        };
        let to = Audience {
            gid: &gid,
            receiver: &config.receivers["owner"],
            owner: Some("acme"),
            tz: Tz::UTC,
        };
        let send = [
            waiting(FindingKind::UnknownKey, "u:1", Severity::Info),
            waiting(FindingKind::RevokedKeyUsed, "r:1", Severity::Critical),
        ];
        let rotations = HashMap::new();
        let m = renderer.compose(&config, &registry, &rotations, &to, &send, 5);
        let channels: Vec<&str> = m.iter().map(|m| m.channel_type.as_str()).collect();
        assert_eq!(channels, ["email", "webhook"]);
        for m in &m {
            assert_eq!(m.kinds, "revoked_key_used,unknown_key");
            assert_eq!(m.severity, "critical");
            assert_eq!(m.findings.len(), 2);
            assert_eq!(m.created_ms, 5);
        }
        let again = renderer.compose(&config, &registry, &rotations, &to, &send, 5);
        assert_eq!(m[0].id, again[0].id);
        assert_ne!(m[0].id, m[1].id);
        let later = renderer.compose(&config, &registry, &rotations, &to, &send, 6);
        assert_ne!(m[0].id, later[0].id);
        let body: Rendered = serde_json::from_str(&m[1].payload).unwrap();
        assert_eq!(body.body["id"], m[1].id.as_str());
        assert_eq!(body.body["findings"].as_array().unwrap().len(), 2);
        assert_eq!(body.body["test"], false);
    }
}
