//! Slack incoming webhooks: a POST of `{"text": …}` (mrkdwn) to the recipient's webhook URL.
//!
//! The URL is the secret (anyone holding it can post): it is read from the variable or file
//! the registry names when a message goes out, never logged, stripped from errors.
//!
//! Outcomes (Slack answers in plain text): 200 `ok` delivered; 429 retried after
//! `Retry-After`; 5xx, timeouts and connection failures retried; 400 `invalid_payload`,
//! 403 `invalid_token` / `action_prohibited`, 404 `no_service` / `channel_not_found`, 410
//! `channel_is_archived` are permanent.
//!
//! This module owns the channel whole: the webhook is the recipient's (no settings of its
//! own), its markup's escaping ([`escape_mrkdwn`]: `&`, `<`, `>` as Slack asks, backticks as
//! `ˋ`, so a value can neither open a link or a mention nor leave a code span) and splitting
//! ([`split_mrkdwn`]: code blocks closed in each part, entities never cut), and its sending.

use serde_json::json;

use super::{excerpt, http_error, retry_after, url_secrets, DeliveryError};
use crate::registry::Secret;

/// Posts one message (mrkdwn text).
pub async fn send(http: &reqwest::Client, url: &Secret, text: &str) -> Result<(), DeliveryError> {
    let owned = url_secrets(url.expose());
    let secrets: Vec<&str> = owned.iter().map(String::as_str).collect();
    let body = json!({ "text": text, "unfurl_links": false, "unfurl_media": false });
    let resp = http
        .post(url.expose())
        .json(&body)
        .send()
        .await
        .map_err(|e| http_error(e, &secrets))?;
    let status = resp.status();
    let wait = retry_after(resp.headers());
    let answer = resp.text().await.unwrap_or_default();
    if status.is_success() {
        return Ok(());
    }
    let detail = format!(
        "slack answered {}: {}",
        status.as_u16(),
        excerpt(&answer, &secrets)
    );
    if status.as_u16() == 429 || status.is_server_error() || status.as_u16() == 408 {
        Err(DeliveryError::Transient {
            detail,
            retry_after: wait,
        })
    } else {
        Err(DeliveryError::permanent(detail))
    }
}

/// Slack shows long texts collapsed and cuts them past 40 000 characters; 4000 stays readable.
pub const SLACK_LIMIT: usize = 4000;

/// `&`, `<`, `>` as Slack asks, and backticks as `ˋ` so a value cannot leave a code span.
pub fn escape_mrkdwn(s: &str) -> String {
    super::escape_with(s, |c| match c {
        '&' => Some("&amp;"),
        '<' => Some("&lt;"),
        '>' => Some("&gt;"),
        '`' => Some("\u{02CB}"),
        _ => None,
    })
}

/// Splits Slack mrkdwn into parts of at most `limit` characters, at line ends where it can,
/// keeping code blocks (```) closed in each part and never cutting an entity.
pub fn split_mrkdwn(text: &str, limit: usize, max_parts: usize) -> Vec<String> {
    super::at_most(
        |limit| split_mrkdwn_raw(text, limit),
        limit,
        max_parts,
        |cut| format!("\n_{cut}_"),
    )
}

fn split_mrkdwn_raw(text: &str, limit: usize) -> Vec<String> {
    const FENCE: &str = "```";
    let limit = limit.max(16);
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut cur_len = 0usize;
    let mut in_code = false;
    let flush = |cur: &mut String, cur_len: &mut usize, in_code: bool, parts: &mut Vec<String>| {
        let mut p = std::mem::take(cur);
        if in_code {
            if !p.ends_with('\n') {
                p.push('\n');
            }
            p.push_str(FENCE);
        }
        parts.push(p.trim_end_matches('\n').to_owned());
        *cur = if in_code {
            format!("{FENCE}\n")
        } else {
            String::new()
        };
        *cur_len = cur.chars().count();
    };
    for line in text.split_inclusive('\n') {
        let fences = line.matches(FENCE).count();
        let after = in_code ^ (fences % 2 == 1);
        let len = line.chars().count();
        // Room to close a code block at the end of this part.
        let closing = if after { FENCE.len() + 1 } else { 0 };
        if cur_len + len + closing > limit && cur_len > if in_code { 4 } else { 0 } {
            flush(&mut cur, &mut cur_len, in_code, &mut parts);
        }
        if cur_len + len + closing <= limit {
            cur.push_str(line);
            cur_len += len;
            in_code = after;
            continue;
        }
        // One line longer than a part: cut it by characters, never inside an entity or a
        // fence, closing and reopening a code block around the cut.
        let mut rest = line;
        let mut state = in_code;
        while !rest.is_empty() {
            let room = limit.saturating_sub(cur_len + FENCE.len() + 1).max(1);
            let mut end = rest.char_indices().nth(room).map_or(rest.len(), |(i, _)| i);
            if end < rest.len() {
                if let Some(amp) = rest[..end].rfind('&') {
                    if !rest[amp..end].contains(';')
                        && rest[amp..].find(';').is_some_and(|s| s < 10)
                        && amp > 0
                    {
                        end = amp;
                    }
                }
                while end > 1 && rest[..end].ends_with('`') && rest[end..].starts_with('`') {
                    end -= 1;
                }
            }
            let piece = &rest[..end];
            if piece.matches(FENCE).count() % 2 == 1 {
                state = !state;
            }
            cur.push_str(piece);
            cur_len += piece.chars().count();
            rest = &rest[end..];
            if !rest.is_empty() {
                flush(&mut cur, &mut cur_len, state, &mut parts);
            }
        }
        in_code = state;
    }
    if !cur.trim().is_empty() || parts.is_empty() {
        let mut p = cur;
        if in_code {
            p.push_str(FENCE);
        }
        parts.push(p.trim_end_matches('\n').to_owned());
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mrkdwn_splits_keep_code_blocks_closed() {
        let mut text = String::from("*Sources*\n```\n");
        for i in 0..300 {
            text.push_str(&format!(
                "10.0.0.{i}  curl/8 &amp; more {}\n",
                "y".repeat(20)
            ));
        }
        text.push_str("```\nWhat to do: switch.");
        let parts = split_mrkdwn(&text, SLACK_LIMIT, 10);
        assert!(parts.len() >= 3);
        for p in &parts {
            assert!(p.chars().count() <= SLACK_LIMIT);
            assert_eq!(p.matches("```").count() % 2, 0, "unbalanced: {p}");
            assert!(!p.contains("&am\n") && !p.ends_with("&am"));
        }
        let joined = parts.join("\n");
        for i in 0..300 {
            assert_eq!(joined.matches(&format!("10.0.0.{i}  ")).count(), 1);
        }
        assert!(parts.last().unwrap().ends_with("What to do: switch."));
        // A single huge line.
        let huge = format!("```{}```", "&amp;".repeat(3000));
        for p in split_mrkdwn(&huge, SLACK_LIMIT, 10) {
            assert!(p.chars().count() <= SLACK_LIMIT);
            assert_eq!(p.matches("```").count() % 2, 0, "{}", &p[..40]);
            let inner = p.trim_start_matches("```").trim_end_matches("```").trim();
            assert!(
                inner.split("&amp;").all(|r| r.is_empty() || r == "\n"),
                "entity cut"
            );
        }
    }

    #[test]
    fn short_messages_stay_whole() {
        assert_eq!(split_mrkdwn("*hi*\n```a```", 4000, 5), ["*hi*\n```a```"]);
    }
}
