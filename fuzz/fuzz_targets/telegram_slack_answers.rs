//! What Telegram and Slack answer, as keywatch reads it: the Bot API's answer to
//! `sendMessage` (status, JSON or not, `ok`, `error_code`, `parameters.retry_after` /
//! `migrate_to_chat_id`, the description as teloxide's typed error) and to `getUpdates`
//! (teloxide's `Update`s from hostile JSON), Slack's status/Retry-After/body, and the
//! caption split of a Telegram message with a photo. Asserts: no secret (a bot token, a
//! webhook path) in any error's detail or in teloxide's error; a 2xx `{"ok":true}` is
//! delivered and a refusal is not; caption at most 1024 UTF-16 units, the parts after it at
//! most 4096.
#![no_main]

use arbitrary::Arbitrary;
use keywatch::notify::channel_fuzz as ch;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    status: u16,
    retry_after: Vec<u8>,
    /// Which body: as given, or a Bot API answer built from the fields below.
    shape: u8,
    body: String,
    ok: bool,
    error_code: Option<i64>,
    description: String,
    retry: Option<u64>,
    migrate: Option<i64>,
    result: String,
    token_id: u32,
    token_rest: String,
    pieces: Vec<(u8, String)>,
    max_parts: u8,
}

fuzz_target!(|input: Input| {
    // A token of the Bot API's shape (`<bot id>:<secret>`), which nothing keywatch writes
    // itself can spell.
    let rest: String = input
        .token_rest
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let token = format!("{}:{rest}", input.token_id);
    let secrets: Vec<&str> = if rest.len() >= 8 { vec![&token] } else { Vec::new() };
    let with_secret = |s: &str| -> String {
        // Let the answer echo the token somewhere, as a hostile proxy might.
        match input.shape % 3 {
            0 => s.to_owned(),
            1 => format!("{s} /bot{token}/sendMessage"),
            _ => format!("{token}{s}"),
        }
    };
    let body = match input.shape % 4 {
        0 => with_secret(&input.body),
        _ => {
            let mut a = serde_json::json!({
                "ok": input.ok,
                "description": with_secret(&input.description),
            });
            if let Some(c) = input.error_code {
                a["error_code"] = c.into();
            }
            if let Some(r) = input.retry {
                a["parameters"]["retry_after"] = r.into();
            }
            if let Some(m) = input.migrate {
                a["parameters"]["migrate_to_chat_id"] = m.into();
            }
            a["result"] = serde_json::from_str(&input.result).unwrap_or(serde_json::Value::Null);
            a.to_string()
        }
    };
    let no_secret = |what: &str| {
        for s in &secrets {
            assert!(!what.contains(s), "the token in {what:?}");
        }
    };
    match ch::telegram_send_answer(input.status, &body, &secrets) {
        Ok(()) => assert!((200..300).contains(&input.status), "{} {body}", input.status),
        Err((e, debug)) => {
            no_secret(e.detail());
            no_secret(&debug);
            assert!(e.detail().starts_with("telegram answered"), "{e}");
        }
    }
    match ch::telegram_updates_answer(input.status, &body, &secrets) {
        Ok(_) => assert!((200..300).contains(&input.status)),
        Err((e, debug)) => {
            no_secret(e.detail());
            no_secret(&debug);
        }
    }
    match ch::slack_answer(input.status, &input.retry_after, &body, &secrets) {
        Ok(()) => assert!((200..300).contains(&input.status)),
        Err(e) => no_secret(e.detail()),
    }

    // A message with a photo: its caption and what follows.
    let mut html = String::new();
    for (tag, text) in input.pieces.iter().take(64) {
        let t = ch::telegram_escape(text);
        match tag % 5 {
            0 => html.push_str(&format!("<b>{t}</b>")),
            1 => html.push_str(&format!("<code>{t}</code>")),
            2 => html.push_str(&format!("<pre>{t}</pre>\n")),
            3 => html.push_str(&format!("<i>{t}</i>\n")),
            _ => html.push_str(&t),
        }
    }
    let max_parts = usize::from(input.max_parts % 8) + 1;
    let parts = ch::telegram_caption_split(&html, max_parts);
    assert!(!parts.is_empty());
    assert!(parts.len() <= max_parts.max(2), "{} parts", parts.len());
    assert!(ch::telegram_utf16_len(&parts[0]) <= 1024);
    for p in &parts[1..] {
        assert!(!p.is_empty());
        assert!(ch::telegram_utf16_len(p) <= 4096);
    }
});
