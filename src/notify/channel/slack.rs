//! Slack incoming webhooks: a POST of `{"text": …, "blocks": […]}` to the recipient's
//! webhook URL. The blocks (Block Kit: a header per section, its facts as section fields,
//! the sources still on the old key as a list, what to do, a context line) are what Slack
//! shows; `text` (`slack.mrkdwn.j2`, mrkdwn) is the fallback that notifications and
//! clients without blocks show. [`blocks`] keeps Slack's limits: at most 50 blocks per
//! message ([`MAX_BLOCKS`]; more go in following messages), 3,000 characters per section
//! text ([`MAX_TEXT`]), 2,000 per field and at most 10 fields, 150 per header.
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

use serde_json::{json, Value};

use super::{
    answer_text, excerpt, http_error, retry_after, url_secrets, DeliveryError, MAX_ANSWER_BYTES,
};
use crate::registry::Secret;

/// Posts one message: mrkdwn text, with its blocks when it has any.
pub async fn send(
    http: &reqwest::Client,
    url: &Secret,
    text: &str,
    blocks: Option<&Value>,
) -> Result<(), DeliveryError> {
    let owned = url_secrets(url.expose());
    let secrets: Vec<&str> = owned.iter().map(String::as_str).collect();
    let mut body = json!({ "text": text, "unfurl_links": false, "unfurl_media": false });
    if let Some(b) = blocks.filter(|b| b.as_array().is_some_and(|a| !a.is_empty())) {
        body["blocks"] = b.clone();
    }
    let resp = http
        .post(url.expose())
        .json(&body)
        .send()
        .await
        .map_err(|e| http_error(e, &secrets))?;
    let status = resp.status();
    let wait = retry_after(resp.headers());
    // Bounded: what Slack says is a word (`ok`, `invalid_payload`); a broken proxy's
    // endless answer is not read past the bound. An answer that fails midway is read as
    // empty: its status is what counts.
    let answer = answer_text(resp, MAX_ANSWER_BYTES)
        .await
        .unwrap_or_default();
    classify(status.as_u16(), wait, &answer, &secrets)
}

/// Slack's answer (status, `Retry-After`, body) as keywatch reads it: 2xx delivered; 408,
/// 429 and 5xx retried (after `wait`); anything else refused for good. The detail holds an
/// excerpt of the body scrubbed of `secrets`.
pub(crate) fn classify(
    status: u16,
    wait: Option<std::time::Duration>,
    answer: &str,
    secrets: &[&str],
) -> Result<(), DeliveryError> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let detail = format!("slack answered {status}: {}", excerpt(answer, secrets));
    if status == 429 || status >= 500 || status == 408 {
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

/// Blocks in one Slack message.
pub const MAX_BLOCKS: usize = 50;
/// Characters in a section's text.
pub const MAX_TEXT: usize = 3000;
/// Characters in a section field, fields in a section, characters in a header.
pub const MAX_FIELD: usize = 2000;
pub const MAX_FIELDS: usize = 10;
pub const MAX_HEADER: usize = 150;
/// Sources and findings listed (the text fallback lists as many; the rest are counted).
const LISTED: usize = 50;

fn plain(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// At most `n` characters, with `…` when cut (before escaping: an entity is never cut).
fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(n.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// A value from traffic or the registry as an inline code span (`-` when empty).
fn code(v: &str, n: usize) -> String {
    if v.is_empty() {
        "-".to_owned()
    } else {
        format!("`{}`", escape_mrkdwn(&cut(v, n)))
    }
}

fn header(text: &str) -> Value {
    json!({"type": "header", "text": {"type": "plain_text", "text": cut(text, MAX_HEADER), "emoji": false}})
}

fn section(text: &str) -> Value {
    json!({"type": "section", "text": {"type": "mrkdwn", "text": text}})
}

/// Lines packed into as few sections as fit [`MAX_TEXT`] (a line is never split: each is
/// built from cut values, far below the limit).
fn sections_of(lines: &[String], out: &mut Vec<Value>) {
    let mut cur = String::new();
    for line in lines {
        let line = cut(line, MAX_TEXT);
        if !cur.is_empty() && cur.chars().count() + 1 + line.chars().count() > MAX_TEXT {
            out.push(section(&std::mem::take(&mut cur)));
        }
        if !cur.is_empty() {
            cur.push('\n');
        }
        cur.push_str(&line);
    }
    if !cur.is_empty() {
        out.push(section(&cur));
    }
}

/// The Block Kit messages for a template context (see `notify::message`): each at most
/// [`MAX_BLOCKS`] blocks, at most `max_parts` messages (a cut is said in the last one).
pub fn blocks(ctx: &Value, max_parts: usize) -> Vec<Vec<Value>> {
    let mut all: Vec<Value> = Vec::new();
    if ctx["test"] == true {
        all.push(header("keywatch test message"));
        all.push(section(&format!(
            "A test message for {} on the {} channel. If you can read it, keywatch can reach you here.",
            code(&plain(&ctx["recipient"]), 200),
            escape_mrkdwn(&plain(&ctx["channel"]))
        )));
    }
    for (i, s) in ctx["sections"].as_array().into_iter().flatten().enumerate() {
        if i > 0 {
            all.push(json!({"type": "divider"}));
        }
        all.push(header(&format!(
            "{}: {}",
            plain(&s["title"]),
            plain(&s["key_label"])
        )));
        let r = &s["rotation"];
        let kind = s["kind"].as_str().unwrap_or("");
        let progress = !r.is_null()
            && matches!(
                kind,
                "rotation_reminder" | "rotation_overdue" | "rotation_at_risk" | "lingering_old_key"
            );
        let mut fields = vec![
            format!("*Severity*\n{}", escape_mrkdwn(&plain(&s["severity"]))),
            format!("*Owner*\n{}", code(&plain(&s["owner"]), 200)),
        ];
        if !r.is_null() {
            if !r["phase"].is_null() {
                fields.push(format!("*Phase*\n{}", escape_mrkdwn(&plain(&r["phase"]))));
            }
            fields.push(format!(
                "*Deadline*\n{}{}",
                escape_mrkdwn(&plain(&r["deadline_local"])),
                if r["overdue"] == true {
                    " (passed)"
                } else {
                    ""
                }
            ));
            fields.push(format!(
                "*On the new key (24 h)*\n{}",
                r["share"]
                    .as_f64()
                    .map_or("no traffic".to_owned(), |x| format!("{:.0} %", x * 100.0))
            ));
            if let Some(f) = r["forecast_local"].as_str() {
                fields.push(format!("*Forecast completion*\n{}", escape_mrkdwn(f)));
            }
            fields.push(format!(
                "*Old key → new key*\n{} → {}",
                code(&plain(&r["old_label"]), 200),
                code(&plain(&r["new_label"]), 200)
            ));
        }
        let fields: Vec<Value> = fields
            .iter()
            .take(MAX_FIELDS)
            .map(|f| json!({"type": "mrkdwn", "text": cut(f, MAX_FIELD)}))
            .collect();
        all.push(json!({"type": "section", "fields": fields}));
        let mut lines: Vec<String> = Vec::new();
        if progress {
            if s["kinds"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "rotation_at_risk"))
            {
                lines.push(match r["forecast_local"].as_str() {
                    Some(f) => format!(
                        "At the current pace the switch completes around *{}*, after the deadline.",
                        escape_mrkdwn(f)
                    ),
                    None => "The switch to the new key has stalled.".to_owned(),
                });
            }
            let count = r["lingering_count"].as_u64().unwrap_or(0);
            if count > 0 {
                lines.push(format!("*{count} source(s) still send the old key:*"));
                for x in r["lingering"].as_array().into_iter().flatten().take(LISTED) {
                    let endpoints = plain(&x["endpoints"]);
                    lines.push(format!(
                        "• {} {}: {} requests, last at {}{}",
                        code(&plain(&x["ip"]), 64),
                        code(&plain(&x["user_agent"]), 160),
                        plain(&x["requests"]),
                        escape_mrkdwn(&plain(&x["last_seen_local"])),
                        if endpoints.is_empty() {
                            String::new()
                        } else {
                            format!(", {}", code(&endpoints, 200))
                        }
                    ));
                }
                let more = r["lingering_more"].as_u64().unwrap_or(0);
                if more > 0 {
                    lines.push(format!("… and {more} more"));
                }
            }
        } else {
            let findings = s["findings"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            for f in findings.iter().take(LISTED) {
                let at = escape_mrkdwn(&plain(&f["at_local"]));
                let src = &f["source"];
                // A key use names its host and request; other findings say it in a summary.
                lines.push(if src.is_object() {
                    let ev = &f["evidence"];
                    format!(
                        "• {at}: {} {} sent {}; the gateway *{}* it",
                        code(&plain(&src["ip"]), 64),
                        code(&plain(&src["user_agent"]), 160),
                        code(
                            format!("{} {}", plain(&ev["method"]), plain(&ev["endpoint"])).trim(),
                            200
                        ),
                        if ev["accepted"] == true {
                            "accepted"
                        } else {
                            "refused"
                        }
                    )
                } else {
                    format!("• {at}: {}", code(&plain(&f["summary"]), 500))
                });
            }
            if findings.len() > LISTED {
                lines.push(format!("… and {} more", findings.len() - LISTED));
            }
        }
        sections_of(&lines, &mut all);
        let todo = match kind {
            _ if progress => Some(format!(
                "*What to do:* configure the new key {} on every source above and restart it. keywatch tells you when {} can be revoked.",
                code(&plain(&r["new_label"]), 200),
                code(&plain(&r["old_label"]), 200)
            )),
            "safe_to_revoke" => Some(format!(
                "*What to do:* revoke {} at the gateway, then mark it revoked in keys.toml.",
                code(&plain(&r["old_label"]), 200)
            )),
            "revoked_key_used" | "expired_key_used" => Some(
                "*What to do:* someone still holds this key. Find the host above and remove the key from it.".to_owned(),
            ),
            _ => None,
        };
        if let Some(t) = todo {
            all.push(section(&t));
        }
    }
    all.push(
        json!({"type": "context", "elements": [{"type": "mrkdwn", "text": cut(&format!(
        "keywatch · to {} · times in {}",
        code(&plain(&ctx["recipient"]), 200),
        escape_mrkdwn(&plain(&ctx["tz"]))
    ), MAX_FIELD)}]}),
    );
    let mut msgs: Vec<Vec<Value>> = all.chunks(MAX_BLOCKS).map(<[Value]>::to_vec).collect();
    let max_parts = max_parts.max(1);
    if msgs.len() > max_parts {
        let dropped: usize = msgs[max_parts..].iter().map(Vec::len).sum();
        msgs.truncate(max_parts);
        let last = msgs.last_mut().expect("max_parts >= 1");
        last.truncate(MAX_BLOCKS - 1);
        let s = if dropped == 1 { "" } else { "s" };
        last.push(json!({"type": "context", "elements": [{"type": "mrkdwn",
            "text": format!("_… cut: {dropped} more block{s} not sent_")}]}));
    }
    msgs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_endless_answer_is_read_only_up_to_the_bound() {
        use super::super::endless::{endless_answer, peak_rss_kib};
        use super::super::MAX_ANSWER_BYTES;
        // A broken proxy in front of Slack answering 503 with 1 GiB.
        let (addr, server) = endless_answer("503 Service Unavailable", "text/plain", b"");
        let dir = tempfile::tempdir().unwrap();
        let path = "/services/T0/B0/slack-secret-part";
        std::fs::write(dir.path().join("hook"), format!("http://{addr}{path}")).unwrap();
        let url = crate::registry::SecretRef::File(dir.path().join("hook"))
            .resolve()
            .unwrap();
        let before = peak_rss_kib();
        let err = send(&reqwest::Client::new(), &url, "hi", None)
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(
            err.detail().starts_with("slack answered 503: xxxx"),
            "{err:?}"
        );
        let sent = tokio::task::spawn_blocking(move || server.join().unwrap())
            .await
            .unwrap();
        println!(
            "Slack wrote {} KiB of its answer before keywatch hung up (bound {} KiB); \
             peak RSS {before} KiB -> {} KiB",
            sent >> 10,
            MAX_ANSWER_BYTES >> 10,
            peak_rss_kib()
        );
        assert!(sent < 256 << 20, "{sent} bytes read");
    }

    #[test]
    fn answers_are_classified() {
        let secrets = ["/services/T0/B0/slack-secret-part"];
        assert_eq!(classify(200, None, "ok", &secrets), Ok(()));
        let e = classify(
            429,
            Some(std::time::Duration::from_secs(2)),
            "rate_limited",
            &secrets,
        )
        .unwrap_err();
        assert_eq!(
            e,
            DeliveryError::Transient {
                detail: "slack answered 429: rate_limited".into(),
                retry_after: Some(std::time::Duration::from_secs(2))
            }
        );
        assert!(classify(503, None, "", &secrets)
            .unwrap_err()
            .is_transient());
        let e = classify(
            404,
            None,
            "no_service /services/T0/B0/slack-secret-part",
            &secrets,
        )
        .unwrap_err();
        assert!(!e.is_transient());
        assert_eq!(e.detail(), "slack answered 404: no_service <redacted>");
    }

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

#[cfg(test)]
mod block_tests {
    use super::*;

    #[test]
    fn many_sections_keep_every_slack_limit() {
        let hostile = "<script>`x`</script> *b* <!here> &amp; ".repeat(20);
        let sections: Vec<Value> = (0..40)
            .map(|i| {
                json!({
                    "title": format!("Revoked key used {hostile}"),
                    "key_label": hostile,
                    "owner": hostile,
                    "kind": "revoked_key_used",
                    "severity": "critical",
                    "rotation": null,
                    "findings": (0..60).map(|j| json!({
                        "at_local": "2026-11-20 11:00 CET",
                        "summary": format!("{i}/{j} {hostile}"),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let ctx = json!({"test": false, "recipient": "owner:x", "tz": "UTC", "sections": sections});
        let msgs = blocks(&ctx, 100);
        assert!(msgs.len() > 1);
        for m in &msgs {
            assert!(m.len() <= MAX_BLOCKS);
            for b in m {
                if let Some(t) = b["text"]["text"].as_str() {
                    let max = if b["type"] == "header" {
                        MAX_HEADER
                    } else {
                        MAX_TEXT
                    };
                    assert!(t.chars().count() <= max, "{}", t.chars().count());
                    if b["type"] != "header" {
                        assert!(!t.contains('<') && !t.contains('>'));
                    }
                }
                for f in b["fields"].as_array().into_iter().flatten() {
                    assert!(f["text"].as_str().unwrap().chars().count() <= MAX_FIELD);
                }
            }
        }
        let few = blocks(&ctx, 2);
        assert_eq!(few.len(), 2);
        let last = few[1].last().unwrap();
        assert!(last["elements"][0]["text"]
            .as_str()
            .unwrap()
            .contains("more blocks not sent"));
    }
}
