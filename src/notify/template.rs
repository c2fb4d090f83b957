//! Messages from templates (minijinja), with the escaping each channel needs, and long
//! messages split without breaking their markup.
//!
//! Templates (built in from `rules/templates/`, replaced per file by `defaults.templates`):
//! - `subject.j2`: one line: the email subject, and the first line elsewhere;
//! - `text.j2`: plain text: email body, console, the generic webhook's `text`;
//! - `telegram.html.j2`: Telegram HTML (`parse_mode=HTML`). Every value is escaped (`&`,
//!   `<`, `>`, `"`), so a user agent like `<script>` shows as text;
//! - `slack.mrkdwn.j2`: Slack mrkdwn. Every value is escaped (`&`, `<`, `>`, as Slack asks)
//!   and its backticks become `ˋ` (U+02CB), so that a value can neither open a link or a
//!   mention nor leave a code span; the templates show values that come from traffic (user
//!   agents, IPs, endpoints, names) inside code spans, where `*bold*` and `_it_` do not
//!   format.
//!
//! Filters: `code` (an inline code span in the template's markup), `cut(n)` (at most `n`
//! characters, with `…`), `local` (an RFC 3339 time or epoch milliseconds in the message's
//! time zone, `tz`), `pct` (a share 0..1 as `62 %`).
//!
//! Splitting: Telegram counts at most 4096 characters (UTF-16 code units, the stricter
//! reading) per message; [`split_html`] cuts at line ends where it can, never inside a tag
//! or an entity, closes the tags open at the cut and opens them again in the next part.
//! [`split_mrkdwn`] does the same for Slack's code blocks (```) and entities.

use std::path::Path;

use minijinja::value::Value;
use minijinja::{AutoEscape, Environment, Error, ErrorKind, State};

use crate::config::ConfigError;

pub const SUBJECT: &str = "subject.j2";
pub const TEXT: &str = "text.j2";
pub const TELEGRAM: &str = "telegram.html.j2";
pub const SLACK: &str = "slack.mrkdwn.j2";

/// The built-in templates, by name.
pub const BUILT_IN: [(&str, &str); 4] = [
    (SUBJECT, include_str!("../../rules/templates/subject.j2")),
    (TEXT, include_str!("../../rules/templates/text.j2")),
    (
        TELEGRAM,
        include_str!("../../rules/templates/telegram.html.j2"),
    ),
    (SLACK, include_str!("../../rules/templates/slack.mrkdwn.j2")),
];

/// Telegram's limit per message.
pub const TELEGRAM_LIMIT: usize = 4096;
/// Slack shows long texts collapsed and cuts them past 40 000 characters; 4000 stays readable.
pub const SLACK_LIMIT: usize = 4000;

const TELEGRAM_ESC: &str = "telegram";
const SLACK_ESC: &str = "slack";

/// `&`, `<`, `>` and `"` as entities: all Telegram's HTML mode needs.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// `&`, `<`, `>` as Slack asks, and backticks as `ˋ` so a value cannot leave a code span.
pub fn escape_mrkdwn(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '`' => out.push('\u{02CB}'),
            c => out.push(c),
        }
    }
    out
}

/// Length as Telegram counts it (UTF-16 code units).
pub fn utf16_len(s: &str) -> usize {
    s.chars().map(char::len_utf16).sum()
}

/// The templates of one configuration, compiled.
#[derive(Debug)]
pub struct Templates {
    env: Environment<'static>,
}

impl Templates {
    /// The built-in templates, each replaced by a file of the same name in `dir` if there is
    /// one. A template that does not compile is an error naming the file and line.
    pub fn load(dir: Option<&Path>) -> Result<Templates, ConfigError> {
        let mut env = Environment::new();
        // A block tag on a line of its own leaves no blank line behind.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("the default delimiters"),
        );
        env.set_auto_escape_callback(|name| {
            if name.ends_with(".html.j2") {
                AutoEscape::Custom(TELEGRAM_ESC.into())
            } else if name.ends_with(".mrkdwn.j2") {
                AutoEscape::Custom(SLACK_ESC.into())
            } else {
                AutoEscape::None
            }
        });
        env.set_formatter(|out, state, value| {
            if value.is_undefined() || value.is_none() {
                return Ok(());
            }
            if value.is_safe() {
                return out
                    .write_str(value.as_str().unwrap_or_default())
                    .map_err(Error::from);
            }
            let text = match value.as_str() {
                Some(s) => s.to_owned(),
                None => value.to_string(),
            };
            let text = escape_for(state.auto_escape(), &text);
            out.write_str(&text).map_err(Error::from)
        });
        env.add_filter("code", code);
        env.add_filter("cut", cut);
        env.add_filter("local", local);
        env.add_filter("pct", pct);
        for (name, builtin) in BUILT_IN {
            let (source, origin) = match dir.map(|d| d.join(name)) {
                Some(p) if p.exists() => {
                    let text = std::fs::read_to_string(&p).map_err(|e| ConfigError {
                        file: p.display().to_string(),
                        line: None,
                        field: String::new(),
                        reason: format!("cannot read: {e}"),
                    })?;
                    (text, p.display().to_string())
                }
                _ => (builtin.to_owned(), format!("<built-in {name}>")),
            };
            env.add_template_owned(name, source)
                .map_err(|e| ConfigError {
                    file: origin,
                    line: e.line(),
                    field: String::new(),
                    reason: e.detail().unwrap_or("invalid template").to_owned(),
                })?;
        }
        Ok(Templates { env })
    }

    /// Renders a template with `ctx`; the error says which template and where.
    pub fn render(&self, name: &str, ctx: &Value) -> Result<String, String> {
        let t = self
            .env
            .get_template(name)
            .map_err(|e| format!("template {name}: {e}"))?;
        t.render(ctx).map_err(|e| {
            format!(
                "template {name}{}: {}",
                e.line().map_or(String::new(), |l| format!(":{l}")),
                e.detail().unwrap_or("cannot render")
            )
        })
    }
}

fn escape_for(mode: &AutoEscape, s: &str) -> String {
    match mode {
        AutoEscape::Custom(m) if m == TELEGRAM_ESC => escape_html(s),
        AutoEscape::Custom(m) if m == SLACK_ESC => escape_mrkdwn(s),
        _ => s.to_owned(),
    }
}

fn plain(v: &Value) -> String {
    if v.is_none() || v.is_undefined() {
        return String::new();
    }
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

/// An inline code span in the markup of the template being rendered.
fn code(state: &State, v: Value) -> Value {
    let s = plain(&v);
    match state.auto_escape() {
        AutoEscape::Custom(m) if m == TELEGRAM_ESC => {
            Value::from_safe_string(format!("<code>{}</code>", escape_html(&s)))
        }
        AutoEscape::Custom(m) if m == SLACK_ESC => {
            if s.is_empty() {
                // An empty span would show two backticks.
                Value::from_safe_string("-".into())
            } else {
                Value::from_safe_string(format!("`{}`", escape_mrkdwn(&s)))
            }
        }
        _ => Value::from(s),
    }
}

/// At most `n` characters; a cut value ends with `…`.
fn cut(v: Value, n: usize) -> Value {
    let s = plain(&v);
    if s.chars().count() <= n {
        return Value::from(s);
    }
    let mut out: String = s.chars().take(n.saturating_sub(1)).collect();
    out.push('…');
    Value::from(out)
}

/// An RFC 3339 time or epoch milliseconds, in the message's time zone (`tz`).
fn local(state: &State, v: Value) -> Result<Value, Error> {
    let ms = if let Some(ms) = v.as_i64() {
        ms
    } else if let Some(s) = v.as_str() {
        match chrono::DateTime::parse_from_rfc3339(s) {
            Ok(t) => t.timestamp_millis(),
            Err(_) => return Ok(Value::from(s)),
        }
    } else if v.is_none() || v.is_undefined() {
        return Ok(Value::from(""));
    } else {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("local: expected a time, found {}", v.kind()),
        ));
    };
    let tz: chrono_tz::Tz = state
        .lookup("tz")
        .and_then(|t| t.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(chrono_tz::Tz::UTC);
    Ok(Value::from(crate::registry::format_local(ms, tz)))
}

/// A share (0..1) as a percentage; nothing known: `no traffic`.
fn pct(v: Value) -> Value {
    match f64::try_from(v.clone()).ok() {
        Some(x) if !v.is_none() => Value::from(format!("{:.0} %", x * 100.0)),
        _ => Value::from("no traffic"),
    }
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
    let parts = split_html_raw(text, limit);
    if parts.len() <= max_parts.max(1) {
        return parts;
    }
    let marker_room = 64;
    let parts = split_html_raw(text, limit.saturating_sub(marker_room).max(marker_room));
    let dropped = parts.len() - max_parts.max(1);
    let mut kept: Vec<String> = parts.into_iter().take(max_parts.max(1)).collect();
    if let Some(last) = kept.last_mut() {
        last.push_str(&format!(
            "\n<i>… cut: {dropped} more part{} not sent</i>",
            if dropped == 1 { "" } else { "s" }
        ));
    }
    kept
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

/// Splits Slack mrkdwn into parts of at most `limit` characters, at line ends where it can,
/// keeping code blocks (```) closed in each part and never cutting an entity.
pub fn split_mrkdwn(text: &str, limit: usize, max_parts: usize) -> Vec<String> {
    let parts = split_mrkdwn_raw(text, limit);
    if parts.len() <= max_parts.max(1) {
        return parts;
    }
    let marker_room = 64;
    let parts = split_mrkdwn_raw(text, limit.saturating_sub(marker_room).max(marker_room));
    let dropped = parts.len() - max_parts.max(1);
    let mut kept: Vec<String> = parts.into_iter().take(max_parts.max(1)).collect();
    if let Some(last) = kept.last_mut() {
        last.push_str(&format!(
            "\n_… cut: {dropped} more part{} not sent_",
            if dropped == 1 { "" } else { "s" }
        ));
    }
    kept
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
pub(crate) mod tests {
    use super::*;

    /// Checks Telegram HTML like the Bot API does: known tags, properly nested and closed,
    /// `&` only as an entity, at most `limit` characters of text after parsing.
    pub(crate) fn telegram_html_ok(s: &str) -> Result<(), String> {
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
                let end = rest.find('>').ok_or("can't parse entities: unclosed tag")?;
                let inner = &rest[1..end];
                if let Some(name) = inner.strip_prefix('/') {
                    match stack.pop() {
                        Some(open) if open == name => {}
                        other => {
                            return Err(format!(
                                "can't parse entities: unexpected end tag {name}, open {other:?}"
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
                let end = rest.find(';').ok_or("can't parse entities: bare &")?;
                let ent = &rest[1..end];
                let ok = matches!(ent, "lt" | "gt" | "amp" | "quot")
                    || ent.strip_prefix('#').is_some_and(|n| {
                        n.parse::<u32>().is_ok()
                            || n.strip_prefix('x')
                                .is_some_and(|h| u32::from_str_radix(h, 16).is_ok())
                    });
                if !ok {
                    return Err(format!("can't parse entities: unknown entity &{ent};"));
                }
                chars += 1;
                i += end + 1;
            } else if rest.starts_with('>') {
                // Telegram accepts a bare '>' but keywatch never writes one from a value.
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
        if chars > TELEGRAM_LIMIT {
            return Err("message is too long".into());
        }
        Ok(())
    }

    const HOSTILE: &str = "<script>alert(1)</script> *bold* _it_ ~x~ `tick` ```fence``` &amp; <b>x</b> \"q\" <@U123> <!channel>";

    fn render(name: &str, v: &str) -> String {
        let mut env = Templates::load(None).unwrap().env;
        env.add_template_owned(
            format!("t.{name}"),
            "{{ v }}|{{ v|code }}|{{ v|cut(5) }}".to_owned(),
        )
        .unwrap();
        env.get_template(&format!("t.{name}"))
            .unwrap()
            .render(minijinja::context! { v => v })
            .unwrap()
    }

    #[test]
    fn telegram_values_are_escaped() {
        let out = render("html.j2", HOSTILE);
        let (plain, rest) = out.split_once('|').unwrap();
        assert!(!plain.contains('<') && !plain.contains('>'), "{plain}");
        assert!(plain.starts_with("&lt;script&gt;alert(1)&lt;/script&gt; *bold*"));
        assert!(plain.contains("&amp;amp;"));
        assert!(rest.starts_with("<code>&lt;script&gt;"));
        telegram_html_ok(&out).unwrap();
    }

    #[test]
    fn slack_values_are_escaped_and_stay_in_code() {
        let out = render("mrkdwn.j2", HOSTILE);
        let (plain, rest) = out.split_once('|').unwrap();
        for bad in ['<', '>', '`'] {
            assert!(!plain.contains(bad), "{bad} in {plain}");
        }
        assert!(plain.contains("&lt;@U123&gt; &lt;!channel&gt;"));
        assert!(plain.contains("ˋtickˋ"));
        let (code, _) = rest.split_once('|').unwrap();
        // One span: opened and closed by the template's own backticks only.
        assert_eq!(code.matches('`').count(), 2, "{code}");
        assert!(code.starts_with('`') && code.ends_with('`'));
        assert!(code.contains("*bold*"), "inside a code span, not formatted");
    }

    #[test]
    fn plain_text_is_left_alone_and_cut_counts_characters() {
        let out = render("j2", "ünïcödé-string");
        assert_eq!(out, "ünïcödé-string|ünïcödé-string|ünïc…");
    }

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
            telegram_html_ok(p).unwrap_or_else(|e| panic!("{e}: {p}"));
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
            telegram_html_ok(p).unwrap_or_else(|e| panic!("{e}: {}", &p[..100]));
        }
        let limited = split_html(&text, TELEGRAM_LIMIT, 2);
        assert_eq!(limited.len(), 2);
        assert!(
            limited[1].ends_with("more parts not sent</i>"),
            "{}",
            &limited[1][limited[1].len() - 80..]
        );
        telegram_html_ok(&limited[1]).unwrap();
    }

    #[test]
    fn edited_templates_replace_the_built_ins_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SUBJECT), "custom {{ count }}").unwrap();
        let t = Templates::load(Some(dir.path())).unwrap();
        let ctx = minijinja::context! { count => 3 };
        assert_eq!(t.render(SUBJECT, &ctx).unwrap(), "custom 3");
        std::fs::write(dir.path().join(TEXT), "line\n{% if x %}unclosed").unwrap();
        let e = Templates::load(Some(dir.path())).unwrap_err();
        assert_eq!(e.file, dir.path().join(TEXT).display().to_string());
        assert_eq!(e.line, Some(2));
        assert!(e.reason.contains("unexpected end of input"), "{}", e.reason);
        std::fs::write(dir.path().join(TEXT), "{{ x|nosuchfilter }}").unwrap();
        let config = crate::notify::Config {
            templates_dir: Some(dir.path().to_owned()),
            ..crate::notify::Config::default()
        };
        let e = crate::notify::check_templates(&config).unwrap_err();
        assert!(e.to_string().contains("text.j2"), "{e}");
        assert!(e.to_string().contains("nosuchfilter"), "{e}");
        // The shipped templates pass.
        crate::notify::check_templates(&crate::notify::Config::default()).unwrap();
    }

    #[test]
    fn short_messages_stay_whole() {
        assert_eq!(split_html("<b>hi</b>", 4096, 5), ["<b>hi</b>"]);
        assert_eq!(split_mrkdwn("*hi*\n```a```", 4000, 5), ["*hi*\n```a```"]);
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
}
