//! Telegram Bot API: `sendMessage` with `parse_mode=HTML` to the recipient's chat.
//!
//! Plain HTTPS with reqwest rather than teloxide: keywatch needs the answer's `error_code`
//! to tell a server error (retry) from a refused message (do not), teloxide-core drops it
//! and sleeps 10 s by itself on a 5xx, and one request type does not need a bot framework.
//!
//! The bot token is part of the URL path (`/bot<TOKEN>/sendMessage`): the URL is never
//! logged, errors are stripped of it and scrubbed of the token.
//!
//! Outcomes: `{"ok":true}` delivered; 429 (or `parameters.retry_after`) retried after the
//! wait asked for; 5xx, timeouts and connection failures retried; any other refusal
//! (`Bad Request: chat not found`, `can't parse entities`, 401 bad token, 403 bot blocked)
//! is permanent.
//!
//! This module owns the channel whole: its settings ([`settings`]), its markup's escaping
//! ([`escape_html`]: `&`, `<`, `>`, `"`, so a user agent like `<script>` shows as text) and
//! splitting ([`split_html`]: Telegram counts at most 4096 characters, UTF-16 code units,
//! the stricter reading, per message; parts are cut at line ends where possible, never
//! inside a tag or an entity, and the tags open at a cut are closed and opened again), and
//! its sending.

use std::time::Duration;

use serde_json::{json, Value};

use super::{excerpt, http_error, DeliveryError};
use crate::config::ConfigError;
use crate::notify::config::ChannelTable;
use crate::registry::{Secret, SecretRef};

/// The Bot API base URL.
pub const TELEGRAM_API: &str = "https://api.telegram.org";

/// The fields of a telegram channel in `routes.toml`.
pub(crate) const FIELDS: &[&str] = &["api_url", "bot_token_env", "bot_token_file"];

#[derive(Debug, Clone, PartialEq)]
pub struct TelegramSettings {
    pub api_url: String,
    pub bot_token: SecretRef,
}

/// Reads a telegram channel's table: the bot token is named (`bot_token_env` or
/// `bot_token_file`), the API URL defaults to Telegram's.
pub(crate) fn settings(t: &ChannelTable<'_>) -> Result<TelegramSettings, ConfigError> {
    let c = t.raw;
    let api_url = match &c.api_url {
        Some(v) => t.http_url("api_url", v)?,
        None => TELEGRAM_API.to_owned(),
    };
    let bot_token = t
        .secret("bot_token", &c.bot_token_env, &c.bot_token_file)?
        .ok_or_else(|| {
            t.err(
                "bot_token_env",
                None,
                "a telegram channel needs bot_token_env or bot_token_file",
            )
        })?;
    Ok(TelegramSettings { api_url, bot_token })
}

pub struct Telegram {
    api_url: String,
    token: Secret,
}

impl Telegram {
    pub fn new(api_url: &str, token: Secret) -> Telegram {
        Telegram {
            api_url: api_url.trim_end_matches('/').to_owned(),
            token,
        }
    }

    /// Sends one message (at most 4096 characters of HTML) to `chat_id`.
    pub async fn send(
        &self,
        http: &reqwest::Client,
        chat_id: &str,
        html: &str,
    ) -> Result<(), DeliveryError> {
        let secrets = [self.token.expose()];
        let chat: Value = match chat_id.parse::<i64>() {
            Ok(n) => json!(n),
            Err(_) => json!(chat_id),
        };
        let body = json!({
            "chat_id": chat,
            "text": html,
            "parse_mode": "HTML",
            "link_preview_options": { "is_disabled": true },
        });
        let url = format!("{}/bot{}/sendMessage", self.api_url, self.token.expose());
        let resp = http
            .post(url)
            .json(&body)
            .send()
            .await
            .map_err(|e| http_error(e, &secrets))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| http_error(e, &secrets))?;
        let answer: Option<Value> = serde_json::from_str(&text).ok();
        if status.is_success() && answer.as_ref().is_some_and(|a| a["ok"] == true) {
            return Ok(());
        }
        let code = answer
            .as_ref()
            .and_then(|a| a["error_code"].as_u64())
            .unwrap_or(u64::from(status.as_u16()));
        let description = answer
            .as_ref()
            .and_then(|a| a["description"].as_str())
            .map_or_else(|| excerpt(&text, &secrets), |d| excerpt(d, &secrets));
        let retry_after = answer
            .as_ref()
            .and_then(|a| a["parameters"]["retry_after"].as_u64())
            .map(Duration::from_secs);
        let detail = format!("telegram answered {code}: {description}");
        if code == 429 || retry_after.is_some() || code >= 500 || status.is_server_error() {
            return Err(DeliveryError::Transient {
                detail,
                retry_after,
            });
        }
        if let Some(to) = answer
            .as_ref()
            .and_then(|a| a["parameters"]["migrate_to_chat_id"].as_i64())
        {
            return Err(DeliveryError::permanent(format!(
                "{detail}; the group is now chat {to}: update telegram_chat_id"
            )));
        }
        Err(DeliveryError::permanent(detail))
    }
}

/// Telegram's limit per message.
pub const TELEGRAM_LIMIT: usize = 4096;

/// `&`, `<`, `>` and `"` as entities: all Telegram's HTML mode needs.
pub fn escape_html(s: &str) -> String {
    super::escape_with(s, |c| match c {
        '&' => Some("&amp;"),
        '<' => Some("&lt;"),
        '>' => Some("&gt;"),
        '"' => Some("&quot;"),
        _ => None,
    })
}

/// Length as Telegram counts it (UTF-16 code units).
pub fn utf16_len(s: &str) -> usize {
    s.chars().map(char::len_utf16).sum()
}

/// A piece of HTML: a tag, an entity, or one character of text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HtmlTok<'a> {
    Open { name: &'a str, raw: &'a str },
    Close(&'a str),
    Text(&'a str),
}

fn tokenize_html(text: &str) -> Vec<HtmlTok<'_>> {
    let mut out = Vec::new();
    let mut i = 0;
    let b = text.as_bytes();
    while i < text.len() {
        let rest = &text[i..];
        let len = match b[i] {
            b'<' => match rest.find('>') {
                Some(end) => {
                    let raw = &rest[..=end];
                    let inner = raw[1..raw.len() - 1].trim();
                    if let Some(name) = inner.strip_prefix('/') {
                        out.push(HtmlTok::Close(name.trim()));
                    } else {
                        let name = inner
                            .split(|c: char| c.is_whitespace())
                            .next()
                            .unwrap_or("");
                        out.push(HtmlTok::Open { name, raw });
                    }
                    raw.len()
                }
                None => {
                    out.push(HtmlTok::Text(&rest[..1]));
                    1
                }
            },
            b'&' => {
                let end = rest.bytes().take(12).position(|c| c == b';');
                let n = end.map_or(1, |e| e + 1);
                out.push(HtmlTok::Text(&rest[..n]));
                n
            }
            _ => {
                let n = rest.chars().next().map_or(1, char::len_utf8);
                out.push(HtmlTok::Text(&rest[..n]));
                n
            }
        };
        i += len;
    }
    out
}

/// An open tag: its name and how it was written.
type OpenTag<'a> = (&'a str, &'a str);

fn closers(stack: &[OpenTag<'_>]) -> String {
    stack
        .iter()
        .rev()
        .map(|(name, _)| format!("</{name}>"))
        .collect()
}

fn openers(stack: &[OpenTag<'_>]) -> String {
    stack.iter().map(|(_, raw)| *raw).collect()
}

/// Splits Telegram HTML into parts of at most `limit` UTF-16 units, each valid on its own.
/// More than `max_parts` parts: the first `max_parts` are kept and the last says so.
pub fn split_html(text: &str, limit: usize, max_parts: usize) -> Vec<String> {
    super::at_most(
        |limit| split_html_raw(text, limit),
        limit,
        max_parts,
        |cut| format!("\n<i>{cut}</i>"),
    )
}

fn split_html_raw(text: &str, limit: usize) -> Vec<String> {
    let toks = tokenize_html(text);
    let mut parts = Vec::new();
    let mut stack: Vec<OpenTag<'_>> = Vec::new();
    let mut cur = String::new();
    let mut cur_len = 0usize;
    // After the last newline of the current part: the bytes to keep, the tags open there,
    // and the token to go on from.
    let mut brk: Option<(usize, Vec<OpenTag<'_>>, usize)> = None;
    // Whether the current part has text (tags alone are never a part).
    let mut content = false;
    let mut i = 0;
    while i < toks.len() {
        let t = toks[i];
        let mut next = stack.clone();
        let written: std::borrow::Cow<'_, str> = match t {
            HtmlTok::Open { name, raw } => {
                next.push((name, raw));
                raw.into()
            }
            HtmlTok::Close(name) => {
                if let Some(pos) = next.iter().rposition(|(n, _)| *n == name) {
                    next.truncate(pos);
                }
                format!("</{name}>").into()
            }
            HtmlTok::Text(s) => s.into(),
        };
        let need = cur_len + utf16_len(&written) + utf16_len(&closers(&next));
        if need > limit && content {
            let mut part = match brk.take() {
                Some((keep, open, resume)) => {
                    stack = open;
                    i = resume;
                    cur[..keep].to_owned()
                }
                None => std::mem::take(&mut cur),
            };
            part.push_str(&closers(&stack));
            parts.push(part);
            cur = openers(&stack);
            cur_len = utf16_len(&cur);
            content = false;
            continue;
        }
        cur.push_str(&written);
        cur_len += utf16_len(&written);
        stack = next;
        if let HtmlTok::Text(s) = t {
            content = true;
            if s == "\n" {
                brk = Some((cur.len(), stack.clone(), i + 1));
            }
        }
        i += 1;
    }
    if content || parts.is_empty() {
        cur.push_str(&closers(&stack));
        parts.push(cur);
    }
    parts
        .into_iter()
        .map(|p| p.trim_end_matches('\n').to_owned())
        .collect()
}

/// The Bot API's HTML check, shared with the integration tests' Telegram stand-in.
#[cfg(test)]
#[allow(dead_code)] // the stand-in's lenient check is not used here
#[path = "../../../tests/it/support/standins/telegram_html.rs"]
pub(crate) mod html_check;

#[cfg(test)]
mod tests {
    use super::html_check::check_keywatch_html;
    use super::*;

    #[test]
    fn html_splits_at_lines_and_keeps_tags_balanced() {
        let line = |i: usize| format!("<b>row {i}</b> <code>{}</code>\n", "x".repeat(50));
        let mut text = String::from("<b>header</b>\n<pre>");
        for i in 0..200 {
            text.push_str(&line(i));
        }
        text.push_str("</pre>\n<i>end</i>");
        let parts = split_html(&text, TELEGRAM_LIMIT, 10);
        assert!(parts.len() >= 3, "{}", parts.len());
        for p in &parts {
            check_keywatch_html(p).unwrap_or_else(|e| panic!("{e}: {p}"));
            assert!(utf16_len(p) <= TELEGRAM_LIMIT);
        }
        // Every row arrives once, whole.
        let joined = parts.join("\n");
        for i in 0..200 {
            assert_eq!(
                joined.matches(&format!("<b>row {i}</b>")).count(),
                1,
                "row {i}"
            );
        }
        assert!(
            parts[1].starts_with("<pre>"),
            "reopened: {}",
            &parts[1][..20]
        );
    }

    #[test]
    fn html_cuts_a_huge_line_between_entities() {
        let ua = escape_html(&"<&>\"😀".repeat(2000));
        let text = format!("<b>ua</b> <code>{ua}</code>");
        let parts = split_html(&text, TELEGRAM_LIMIT, 10);
        assert!(parts.len() > 1);
        for p in &parts {
            check_keywatch_html(p).unwrap_or_else(|e| panic!("{e}: {}", &p[..100]));
        }
        let limited = split_html(&text, TELEGRAM_LIMIT, 2);
        assert_eq!(limited.len(), 2);
        assert!(
            limited[1].ends_with("more parts not sent</i>"),
            "{}",
            &limited[1][limited[1].len() - 80..]
        );
        check_keywatch_html(&limited[1]).unwrap();
    }

    #[test]
    fn short_messages_stay_whole() {
        assert_eq!(split_html("<b>hi</b>", 4096, 5), ["<b>hi</b>"]);
    }
}
