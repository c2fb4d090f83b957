//! Telegram's HTML parse mode as the Bot API applies it, for the Telegram stand-in
//! (tests/support) and for the unit tests of `src/notify/channel/telegram.rs`, which
//! include this file: one checker for both.

/// Supported tags, properly nested and closed; `&` only in entities; 1 to 4096 characters
/// of text after parsing.
pub fn check_telegram_html(s: &str) -> Result<(), String> {
    check(s, false)
}

/// [`check_telegram_html`], and no bare `>` in the text.
pub fn check_keywatch_html(s: &str) -> Result<(), String> {
    check(s, true)
}

/// A photo caption in HTML mode: the tags and entities of [`check_telegram_html`], may be
/// empty; its length after parsing (UTF-16 units), which the caller holds to 1024.
pub fn check_telegram_caption(s: &str) -> Result<usize, String> {
    if s.is_empty() {
        return Ok(0);
    }
    parse(s, false, usize::MAX)
}

fn check(s: &str, keywatch: bool) -> Result<(), String> {
    parse(s, keywatch, 4096).map(|_| ())
}

fn parse(s: &str, keywatch: bool, limit: usize) -> Result<usize, String> {
    const TAGS: [&str; 17] = [
        "b",
        "strong",
        "i",
        "em",
        "u",
        "ins",
        "s",
        "strike",
        "del",
        "a",
        "code",
        "pre",
        "span",
        "tg-spoiler",
        "blockquote",
        "tg-emoji",
        "tg-time",
    ];
    let mut stack: Vec<String> = Vec::new();
    let mut chars = 0usize;
    let mut i = 0;
    while i < s.len() {
        let rest = &s[i..];
        if rest.starts_with('<') {
            let end = rest
                .find('>')
                .ok_or("can't parse entities: unclosed start tag")?;
            let inner = &rest[1..end];
            if let Some(name) = inner.strip_prefix('/') {
                match stack.pop() {
                    Some(open) if open == name.trim() => {}
                    _ => {
                        return Err(format!(
                            "can't parse entities: unexpected end tag \"{name}\""
                        ))
                    }
                }
            } else {
                let name = inner.split_whitespace().next().unwrap_or("");
                if !TAGS.contains(&name) {
                    return Err(format!(
                        "can't parse entities: unsupported start tag \"{name}\""
                    ));
                }
                stack.push(name.to_owned());
            }
            i += end + 1;
        } else if rest.starts_with('&') {
            let end = rest
                .find(';')
                .filter(|e| *e <= 10)
                .ok_or("can't parse entities: character entity expected")?;
            let ent = &rest[1..end];
            let ok = matches!(ent, "lt" | "gt" | "amp" | "quot")
                || ent.strip_prefix('#').is_some_and(|n| {
                    n.parse::<u32>().is_ok()
                        || n.strip_prefix('x')
                            .is_some_and(|h| u32::from_str_radix(h, 16).is_ok())
                });
            if !ok {
                return Err(format!("can't parse entities: unsupported entity &{ent};"));
            }
            chars += 1;
            i += end + 1;
        } else if keywatch && rest.starts_with('>') {
            // Telegram accepts a bare '>', but keywatch escapes every value: one in its
            // output means a value went out unescaped.
            return Err("bare > in text".into());
        } else {
            let c = rest.chars().next().unwrap();
            chars += c.len_utf16();
            i += c.len_utf8();
        }
    }
    if let Some(open) = stack.pop() {
        return Err(format!(
            "can't parse entities: can't find end tag corresponding to start tag \"{open}\""
        ));
    }
    if chars == 0 {
        return Err("message text is empty".into());
    }
    if chars > limit {
        return Err("message is too long".into());
    }
    Ok(chars)
}
