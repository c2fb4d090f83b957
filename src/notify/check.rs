//! The notifier's entry points outside the pipeline: `keywatch check-config` checks the
//! templates ([`check_templates`]), `check-config --connect` reaches the email servers and
//! checks the Telegram tokens ([`reach_channels`]), and `keywatch notify test` sends one test
//! message ([`send_test`]), through the same targets, templates and channels as the
//! pipeline.
//!
//! Contract: none writes the notification log; `check_templates` reads template files
//! only (no secrets, no network); `reach_channels` sends nothing and its answers hold no
//! secret.

use std::collections::HashMap;

use super::channel::{Console, Transports};
use super::config::{self, ChannelKind, Config};
use super::group::GroupId;
use super::message::{Context, Entry};
use super::render::{message_id, recipient_of, targets, Audience, Renderer, WebhookBody};
use super::route::{Item, Kind};
use super::template::{self, Templates};
use super::{wall_ms, NotifyError};
use crate::config::ConfigError;
use crate::detect::Severity;
use crate::registry::Registry;

/// For `keywatch check-config --connect`: one line per email channel (connected to its
/// server with TLS and AUTH as configured, NOOP, nothing sent) and per Telegram channel
/// (the token checked with `getMe`): (what, Ok(detail) | Err(reason)). A secret that
/// cannot be read fails its channel's line; no line holds a secret.
pub async fn reach_channels(config: &Config) -> Vec<(String, Result<String, String>)> {
    let mut out = Vec::new();
    for (name, c) in &config.channels {
        let what = match &c.kind {
            ChannelKind::Email(s) => format!("smtp {}:{} (channel {name})", s.host, s.port),
            ChannelKind::Telegram(s) => format!("telegram {} (channel {name})", s.api_url),
            _ => continue,
        };
        let result = match Transports::build(config, Some(name), Console::Stdout) {
            Err(e) => Err(e.to_string()),
            Ok(t) => match t.reach(name).await {
                Some(r) => r,
                None => continue,
            },
        };
        out.push((what, result));
    }
    out
}

/// For `keywatch check-config`: the templates compile and render a sample of every kind
/// for every channel type. Reads the template files; no secrets, no network.
pub fn check_templates(config: &Config) -> Result<(), ConfigError> {
    let templates = Templates::load(config.templates_dir.as_deref())?;
    let source = serde_json::json!({
        "ip": "192.0.2.1", "user_agent": "sample/1.0", "endpoints": ["/v1/sample"],
        "gateways": ["edge-1"], "first_seen": "2026-11-20T08:00:00.000Z",
        "last_seen": "2026-11-20T09:00:00.000Z", "requests": 12, "failures": 0,
    });
    let items: Vec<Item> = Kind::all()
        .map(|kind| Item {
            kind,
            key_id: "sample-key".into(),
            owner: Some("sample-owner".into()),
            at_ms: 1_795_132_800_000,
            severity: Severity::Warning,
            summary: format!("a sample {kind} finding"),
            evidence: serde_json::json!({
                "old_key": "sample-key", "old_name": "sample A", "new_key": "sample-key-2",
                "new_name": "sample B", "started": "2026-11-10T08:00:00.000Z",
                "deadline": "2026-11-24T17:00:00.000Z", "share_24h": 0.5,
                "old_requests": 10, "new_requests": 10, "step": "3d",
                "lingering_sources": [source.clone()], "lingering_count": 1,
                "rotation": {"old_key": "sample-key", "new_key": "sample-key-2"},
                "ip": "192.0.2.1", "user_agent": "sample/1.0", "method": "GET",
                "endpoint": "/v1/sample", "gateway": "edge-1", "accepted": true,
                "forecast": {"completion": "2026-11-30T00:00:00.000Z"},
            }),
            dedup_key: format!("sample:{kind}"),
        })
        .collect();
    let rotations = HashMap::new();
    for test in [false, true] {
        let ctx = Context {
            test,
            recipient: "owner:sample-owner",
            receiver: config::OWNER_RECEIVER,
            owner: Some("sample-owner"),
            tz: chrono_tz::Tz::UTC,
            entries: if test {
                Vec::new()
            } else {
                items
                    .iter()
                    .map(|item| Entry {
                        item,
                        repeated: false,
                    })
                    .collect()
            },
            rotations: &rotations,
        };
        let value = minijinja::Value::from(minijinja::value::Serde(ctx.to_value("sample", 0)));
        for (name, _) in template::BUILT_IN {
            templates
                .render(name, &value)
                .map_err(|reason| ConfigError {
                    file: config.templates_dir.as_ref().map_or_else(
                        || format!("<built-in {name}>"),
                        |d| d.join(name).display().to_string(),
                    ),
                    line: None,
                    field: String::new(),
                    reason,
                })?;
        }
    }
    Ok(())
}

/// `keywatch notify test --channel NAME --owner OWNER`: sends one test message to the owner
/// (a registry owner, or a team receiver of that name) on one channel, without retrying or
/// logging it. Returns where it went.
pub async fn send_test(
    config: &Config,
    registry: &Registry,
    channel: &str,
    owner: &str,
) -> Result<String, NotifyError> {
    let ch = config.channels.get(channel).ok_or_else(|| {
        let known: Vec<&str> = config.channels.keys().map(String::as_str).collect();
        NotifyError::Invalid(if known.is_empty() {
            format!(
                "unknown channel `{channel}`: {} defines no channels",
                config.origin
            )
        } else {
            format!(
                "unknown channel `{channel}`, expected one of {}",
                known.join(", ")
            )
        })
    })?;
    let (receiver, reg_owner, tz) = if let Some(o) = registry.owner(owner) {
        let mut r = config
            .receivers
            .get(config::OWNER_RECEIVER)
            .cloned()
            .expect("the owner receiver always exists");
        r.owner = true;
        (r, Some(o), o.timezone)
    } else if let Some(r) = config.receivers.get(owner).filter(|r| !r.owner) {
        (r.clone(), None, r.timezone)
    } else {
        return Err(NotifyError::Invalid(format!(
            "unknown owner `{owner}`: not in {} nor a receiver in {}",
            registry.origin, config.origin
        )));
    };
    let recipient = recipient_of(&receiver, Some(owner));
    let target = targets(config, &receiver, &recipient, reg_owner, Some(channel))
        .into_iter()
        .next()
        .ok_or_else(|| {
            let what = match &ch.kind {
                ChannelKind::Email(_) => "email address",
                ChannelKind::Telegram(_) => "telegram_chat_id",
                ChannelKind::Slack => "Slack webhook (slack_webhook_env or slack_webhook_file)",
                _ => "contact",
            };
            let origin = if reg_owner.is_some() {
                &registry.origin
            } else {
                &config.origin
            };
            NotifyError::Invalid(format!(
                "{owner} has no {what} in {origin} for the {} channel `{channel}`",
                ch.kind.type_name()
            ))
        })?;
    let transports = Transports::build(config, Some(channel), Console::Stdout)?;
    let renderer = Renderer::load(config)?;
    let rotations = HashMap::new();
    let ctx = Context {
        test: true,
        recipient: &recipient,
        receiver: &receiver.name,
        owner: reg_owner.map(|o| o.name.as_str()),
        tz,
        entries: Vec::new(),
        rotations: &rotations,
    };
    let now = wall_ms();
    let id = format!(
        "test-{}",
        message_id(&recipient, channel, &target.target, "test", now, &[])
    );
    let gid = GroupId {
        recipient: recipient.clone(),
        receiver: receiver.name.clone(),
        route: 0,
        values: "test".into(),
    };
    let to = Audience {
        gid: &gid,
        receiver: &receiver,
        owner: Some(owner),
        tz,
    };
    let body = WebhookBody {
        id: &id,
        to: &to,
        severity: Severity::Info,
        send: &[],
        test: true,
    };
    let rendered = renderer.render(
        target.channel_type,
        &ctx.to_value(channel, now),
        config.max_parts,
        &body,
    );
    let (_, result) = transports
        .send(
            channel,
            &id,
            &recipient,
            &target.address,
            &rendered,
            0,
            None,
        )
        .await;
    result
        .map(|()| format!("{} via {channel}", target.target))
        .map_err(NotifyError::Delivery)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_templates_render_every_kind() {
        check_templates(&Config::default()).unwrap();
    }

    #[tokio::test]
    async fn test_messages_go_out_or_say_what_is_missing() {
        let config = Config::parse(
            "routes.toml",
            "[channels.out]\ntype = \"console\"\n[channels.tg]\ntype = \"telegram\"\n\
             bot_token_env = \"KW_UNIT_NO_SUCH_TOKEN\"\n[receivers.owner]\nowner = true\n\
             channels = [\"out\"]\n",
        )
        .unwrap();
        let registry = Registry::parse("keys.toml", "[owners.acme]\n").unwrap();
        assert_eq!(
            send_test(&config, &registry, "out", "acme").await.unwrap(),
            "console via out"
        );
        // (channel, owner, error)
        let cases = [
            (
                "nope",
                "acme",
                "unknown channel `nope`, expected one of out, tg",
            ),
            (
                "out",
                "nobody",
                "unknown owner `nobody`: not in keys.toml nor a receiver in routes.toml",
            ),
            (
                "tg",
                "acme",
                "acme has no telegram_chat_id in keys.toml for the telegram channel `tg`",
            ),
        ];
        for (channel, owner, want) in cases {
            let e = send_test(&config, &registry, channel, owner)
                .await
                .unwrap_err();
            assert_eq!(e.to_string(), want, "{channel} {owner}");
        }
    }
}
