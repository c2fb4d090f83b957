//! Redaction of what leaves the notifier: an attempt stored outside it (the ClickHouse
//! tables a consumer group shares, which dashboards read) must not carry a channel secret.
//!
//! Contract: only this module knows the shapes of secrets in targets and error texts
//! (Telegram chat ids, bot tokens, webhook URLs with their paths and queries, userinfo);
//! the stores call [`AttemptRecord::redacted`] on the raw record, once, before writing
//! (redacting twice doubles the `<redacted>` marks of a URL). Error texts were already
//! scrubbed of the channel's own secrets (`channel::scrub`); this is the second line, for
//! what a server echoed in other shapes.

use super::log::AttemptRecord;

impl AttemptRecord {
    /// The attempt as it may be stored outside the notifier: no channel secret in it
    /// ([`redact_attempt`]).
    pub fn redacted(&self) -> AttemptRecord {
        redact_attempt(self)
    }
}

/// An attempt as it may be stored outside the notifier: no channel secret in it.
/// - `target`: a Telegram chat id keeps its last 4 characters (`telegram:…7890`); a URL
///   keeps its scheme and host.
/// - `detail` (the error text, already scrubbed by the channels): the raw chat id, URL paths
///   and queries, and bot-token-shaped words (`123456:ABC…`) are replaced.
pub fn redact_attempt(r: &AttemptRecord) -> AttemptRecord {
    let mut out = r.clone();
    let mut chat: Option<&str> = None;
    if let Some(id) = r.target.strip_prefix("telegram:") {
        chat = Some(id).filter(|c| !c.is_empty());
        out.target = format!("telegram:{}", tail(id));
    } else {
        out.target = redact_text(&r.target);
    }
    out.detail = r.detail.as_ref().map(|d| {
        let mut d = redact_text(d);
        if let Some(c) = chat.filter(|c| c.len() >= 4) {
            d = d.replace(c, &tail(c));
        }
        d
    });
    out
}

fn tail(id: &str) -> String {
    let chars: Vec<char> = id.chars().collect();
    let keep = if chars.len() > 4 { 4 } else { 0 };
    let last: String = chars[chars.len() - keep..].iter().collect();
    format!("…{last}")
}

/// Replaces URL paths and queries, and bot-token-shaped words.
fn redact_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while !rest.is_empty() {
        // Words end at whitespace and at characters that quote or bracket them.
        let end = rest
            .find(|c: char| c.is_whitespace() || "\"'<>()[]{},;`".contains(c))
            .unwrap_or(rest.len());
        let (word, after) = rest.split_at(end);
        out.push_str(&redact_word(word));
        let mut chars = after.chars();
        if let Some(c) = chars.next() {
            out.push(c);
        }
        rest = chars.as_str();
    }
    out
}

fn redact_word(w: &str) -> String {
    let lower = w.to_ascii_lowercase();
    if let Some(i) = lower.find("://") {
        let after = &w[i + 3..];
        let host_end = after.find(['/', '?', '#']).unwrap_or(after.len());
        if host_end < after.len() {
            // Userinfo (`user:pass@host`) is a secret too.
            let host = &after[..host_end];
            let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
            return format!("{}{host}/<redacted>", &w[..i + 3]);
        }
        let host = after.rsplit_once('@').map_or(after, |(_, h)| h);
        return format!("{}{host}", &w[..i + 3]);
    }
    // Telegram bot tokens: digits, a colon, 30 or more URL-safe characters (maybe after
    // `bot`, as in API paths).
    let bare = w.trim_start_matches("bot");
    if let Some((id, secret)) = bare.split_once(':') {
        if id.len() >= 5
            && id.bytes().all(|b| b.is_ascii_digit())
            && secret.len() >= 30
            && secret
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return "<redacted>".to_owned();
        }
    }
    w.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(target: &str, detail: Option<&str>) -> AttemptRecord {
        AttemptRecord {
            message_id: "m1".into(),
            recipient: "acme".into(),
            receiver: "owner".into(),
            channel: "tg".into(),
            channel_type: "telegram".into(),
            target: target.into(),
            kinds: "lingering_old_key".into(),
            findings: Vec::new(),
            severity: "warning".into(),
            created_ms: 1,
            attempt: 1,
            started_ms: 2,
            finished_ms: 3,
            outcome: "transient",
            detail: detail.map(str::to_owned),
        }
    }

    #[test]
    fn attempts_lose_their_secrets() {
        let token = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw";
        let hook = "https://hooks.slack.com/services/T000/B000/XXXXXXXXXXXXXXXXXXXXXXXX";
        let cases = [
            (
                attempt(
                    "telegram:-1001234567890",
                    Some(&format!(
                        "error sending to https://api.telegram.org/bot{token}/sendMessage \
                         for chat -1001234567890 (token {token})"
                    )),
                ),
                "telegram:…7890",
                Some(
                    "error sending to https://api.telegram.org/<redacted> for chat \
                     …7890 (token <redacted>)",
                ),
            ),
            (
                attempt(
                    "slack:acme",
                    Some(&format!("posting to \"{hook}\": 404 no_service")),
                ),
                "slack:acme",
                Some("posting to \"https://hooks.slack.com/<redacted>\": 404 no_service"),
            ),
            (
                attempt(
                    "webhook:ops",
                    Some("POST https://user:pw@hooks.example.com?key=abc failed"),
                ),
                "webhook:ops",
                Some("POST https://hooks.example.com/<redacted> failed"),
            ),
            (
                attempt("email:a@x.example,b@y.example", None),
                "email:a@x.example,b@y.example",
                None,
            ),
            (
                attempt("telegram:42", Some("chat 42")),
                "telegram:…",
                Some("chat 42"),
            ),
        ];
        for (a, target, detail) in cases {
            let r = redact_attempt(&a);
            assert_eq!(r.target, target, "{a:?}");
            assert_eq!(r.detail.as_deref(), detail, "{a:?}");
            assert_eq!(r.message_id, a.message_id);
        }
    }
}
