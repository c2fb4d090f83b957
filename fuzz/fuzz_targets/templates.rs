//! The built-in templates rendered with hostile values (what traffic and config put in a
//! finding: key ids, owners, user agents, endpoints, summaries), for every channel: no
//! panic, every Telegram/Slack part within its limit, and no value's markup survives
//! unescaped into Telegram HTML or Slack mrkdwn.
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use keywatch::detect::Severity;
use keywatch::notify::channel_fuzz::telegram_utf16_len;
use keywatch::notify::message::{render, Context, Entry};
use keywatch::notify::route::{Item, Kind};
use keywatch::notify::template::Templates;
use libfuzzer_sys::fuzz_target;

/// Every value starts with this: found verbatim in HTML or mrkdwn, a value was not escaped.
const TAG: &str = "<kwx>";

#[derive(Debug, Arbitrary)]
struct Input {
    kinds: Vec<u8>,
    key_id: String,
    owner: String,
    summary: String,
    user_agent: String,
    endpoint: String,
    ip: String,
    name: String,
    share: f64,
    at_ms: i64,
    max_parts: u8,
    test: bool,
}

fn templates() -> &'static Templates {
    static T: OnceLock<Templates> = OnceLock::new();
    T.get_or_init(|| Templates::load(None).expect("the built-in templates compile"))
}

fuzz_target!(|input: Input| {
    let v = |s: &str| format!("{TAG}{s}");
    let source = serde_json::json!({
        "ip": v(&input.ip), "user_agent": v(&input.user_agent), "endpoints": [v(&input.endpoint)],
        "gateways": [v(&input.name)], "first_seen": v(&input.ip), "last_seen": "2026-11-20T09:00:00.000Z",
        "requests": input.at_ms, "failures": input.share,
    });
    let all: Vec<Kind> = Kind::all().collect();
    let items: Vec<Item> = input
        .kinds
        .iter()
        .take(8)
        .map(|k| {
            let kind = all[*k as usize % all.len()];
            Item {
                kind,
                key_id: v(&input.key_id),
                owner: Some(v(&input.owner)),
                at_ms: input.at_ms,
                severity: Severity::Warning,
                summary: v(&input.summary),
                evidence: serde_json::json!({
                    "old_key": v(&input.key_id), "old_name": v(&input.name), "new_key": v(&input.owner),
                    "new_name": v(&input.name), "started": v(&input.summary),
                    "deadline": "2026-11-24T17:00:00.000Z", "share_24h": input.share,
                    "old_requests": input.at_ms, "new_requests": 10, "step": v(&input.name),
                    "lingering_sources": [source.clone(), source.clone()], "lingering_count": input.at_ms,
                    "rotation": {"old_key": v(&input.key_id), "new_key": v(&input.owner)},
                    "ip": v(&input.ip), "user_agent": v(&input.user_agent), "method": v(&input.name),
                    "endpoint": v(&input.endpoint), "gateway": v(&input.name), "accepted": input.test,
                    "forecast": {"completion": v(&input.summary)},
                }),
                dedup_key: format!("{kind}:{}", input.key_id),
            }
        })
        .collect();
    let rotations = HashMap::new();
    let owner = v(&input.owner);
    let ctx = Context {
        test: input.test,
        recipient: &owner,
        receiver: "owner",
        owner: Some(&owner),
        tz: chrono_tz::Tz::UTC,
        entries: items
            .iter()
            .map(|item| Entry {
                item,
                repeated: false,
            })
            .collect(),
        rotations: &rotations,
    };
    let max_parts = usize::from(input.max_parts % 8) + 1;
    for channel in ["email", "telegram", "slack", "webhook", "console"] {
        let value = ctx.to_value(channel, input.at_ms);
        let r = render(
            channel,
            &value,
            templates(),
            templates(),
            max_parts,
            |s, t| serde_json::json!({ "subject": s, "text": t }),
        );
        assert!(!r.subject.contains('\n'), "subject {:?}", r.subject);
        assert!(r.parts.len() <= max_parts, "{} parts", r.parts.len());
        for part in &r.parts {
            match channel {
                "telegram" => {
                    assert!(telegram_utf16_len(part) <= 4096, "{part}");
                    assert!(!part.contains("<kwx"), "unescaped in Telegram HTML: {part}");
                }
                "slack" => {
                    assert!(part.chars().count() <= 4000, "{part}");
                    assert!(!part.contains("<kwx"), "unescaped in Slack mrkdwn: {part}");
                }
                _ => {}
            }
        }
    }
});
