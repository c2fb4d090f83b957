//! What channels answer, as keywatch reads it: the webhook's status/Retry-After/body
//! classification, `Retry-After` for every channel, the excerpt kept in errors (no secret
//! in it), and the Telegram HTML / Slack mrkdwn splitters (parts within the limit, at most
//! `max_parts`).
#![no_main]

use arbitrary::Arbitrary;
use keywatch::notify::channel_fuzz as ch;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    status: u16,
    retry_after: Vec<u8>,
    body: String,
    secret: String,
    pieces: Vec<(u8, String)>,
    limit: u16,
    max_parts: u8,
}

fuzz_target!(|input: Input| {
    let _ = ch::retry_after(&input.retry_after);
    let secret = input.secret.trim();
    // A "secret" with angle brackets can be spelled by the scrubber's own `<redacted>`
    // markers next to each other; tokens, passwords and URLs have none.
    let secrets: Vec<&str> = if secret.chars().count() >= 8 && !secret.contains(['<', '>']) {
        vec![secret]
    } else {
        Vec::new()
    };
    let excerpt = ch::excerpt(&input.body, &secrets);
    assert!(excerpt.chars().count() <= 200, "{excerpt}");
    for s in &secrets {
        assert!(!excerpt.contains(s), "a secret in {excerpt:?}");
    }
    match ch::webhook_answer(input.status, &input.retry_after, &input.body, &secrets) {
        Ok(()) => {
            assert!((200..300).contains(&input.status) || input.status < 100 || input.status > 999)
        }
        Err(e) => {
            // keywatch's own words are no leak (a "secret" may overlap them): the answer's
            // excerpt after them must hold no secret.
            let prefix = format!("webhook answered {}: ", input.status);
            let answer = e.detail().strip_prefix(&prefix).unwrap_or(e.detail());
            for s in &secrets {
                assert!(!answer.contains(s), "a secret in {:?}", e.detail());
            }
        }
    }

    // Markup as the templates produce it: escaped values inside the channels' tags.
    let mut html = String::new();
    let mut mrkdwn = String::new();
    for (tag, text) in input.pieces.iter().take(64) {
        let t = ch::telegram_escape(text);
        let s = ch::slack_escape(text);
        match tag % 5 {
            0 => html.push_str(&format!("<b>{t}</b>")),
            1 => html.push_str(&format!("<code>{t}</code>")),
            2 => html.push_str(&format!("<pre>{t}</pre>\n")),
            3 => html.push_str(&format!("<i>{t}</i>\n")),
            _ => html.push_str(&t),
        }
        match tag % 4 {
            0 => mrkdwn.push_str(&format!("*{s}*")),
            1 => mrkdwn.push_str(&format!("`{s}`")),
            2 => mrkdwn.push_str(&format!("```\n{s}\n```\n")),
            _ => mrkdwn.push_str(&format!("{s}\n")),
        }
    }
    let limit = usize::from(input.limit % 4096).max(64);
    let max_parts = usize::from(input.max_parts % 8) + 1;
    let parts = ch::telegram_split(&html, limit, max_parts);
    assert!(parts.len() <= max_parts);
    for p in &parts {
        assert!(
            ch::telegram_utf16_len(p) <= limit,
            "{} > {limit}",
            ch::telegram_utf16_len(p)
        );
    }
    let parts = ch::slack_split(&mrkdwn, limit, max_parts);
    assert!(parts.len() <= max_parts);
    for p in &parts {
        assert!(
            p.chars().count() <= limit,
            "{} > {limit}",
            p.chars().count()
        );
    }
});
