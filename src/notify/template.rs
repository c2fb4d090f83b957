//! Messages from templates (minijinja), with the escaping each channel needs (the
//! channels' own escapes: `channel::telegram::escape_html`, `channel::slack::escape_mrkdwn`).
//!
//! Templates (built in from `rules/templates/`, replaced per file by `defaults.templates`):
//! - `subject.j2`: one line: the email subject, and the first line elsewhere;
//! - `text.j2`: plain text: email body, console, the generic webhook's `text`;
//! - `telegram.html.j2`: Telegram HTML (`parse_mode=HTML`). Every value is escaped (`&`,
//!   `<`, `>`, `"`), so a user agent like `<script>` shows as text;
//! - `email.html.j2`: the email's HTML part (beside `text.j2`'s text part). Every value is
//!   escaped for HTML (`&`, `<`, `>`, `"`, `'`: also safe inside attribute values);
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
//! Long messages are split by their channel (`channel::telegram::split_html`,
//! `channel::slack::split_mrkdwn`), without breaking their markup.

use std::path::Path;

use minijinja::value::Value;
use minijinja::{AutoEscape, Environment, Error, ErrorKind, State};

use super::channel::email::escape_email_html;
use super::channel::slack::escape_mrkdwn;
use super::channel::telegram::escape_html;
use crate::config::ConfigError;

pub const SUBJECT: &str = "subject.j2";
pub const TEXT: &str = "text.j2";
pub const TELEGRAM: &str = "telegram.html.j2";
pub const SLACK: &str = "slack.mrkdwn.j2";
pub const EMAIL_HTML: &str = "email.html.j2";

/// The built-in templates, by name.
pub const BUILT_IN: [(&str, &str); 5] = [
    (SUBJECT, include_str!("../../rules/templates/subject.j2")),
    (TEXT, include_str!("../../rules/templates/text.j2")),
    (
        EMAIL_HTML,
        include_str!("../../rules/templates/email.html.j2"),
    ),
    (
        TELEGRAM,
        include_str!("../../rules/templates/telegram.html.j2"),
    ),
    (SLACK, include_str!("../../rules/templates/slack.mrkdwn.j2")),
];

const TELEGRAM_ESC: &str = "telegram";
const SLACK_ESC: &str = "slack";
const EMAIL_ESC: &str = "email";

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
            if name == EMAIL_HTML {
                AutoEscape::Custom(EMAIL_ESC.into())
            } else if name.ends_with(".html.j2") {
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
        AutoEscape::Custom(m) if m == EMAIL_ESC => escape_email_html(s),
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
        AutoEscape::Custom(m) if m == EMAIL_ESC => Value::from_safe_string(format!(
            "<code style=\"font-family:Menlo,Consolas,monospace;font-size:90%;background:#f6f8fa;padding:1px 4px;border-radius:3px;\">{}</code>",
            escape_email_html(&s)
        )),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::channel::telegram::html_check::check_keywatch_html;

    const HOSTILE: &str = "<script>alert(1)</script> *bold* _it_ ~x~ `tick` ```fence``` &amp; <b>x</b> \"q\" <@U123> <!channel>";

    fn render(name: &str, v: &str) -> String {
        render_named(&format!("t.{name}"), v)
    }

    /// Renders `{{ v }}|{{ v|code }}|{{ v|cut(5) }}` as a template called `name`.
    fn render_named(name: &str, v: &str) -> String {
        let mut env = Templates::load(None).unwrap().env;
        env.add_template_owned(
            name.to_owned(),
            "{{ v }}|{{ v|code }}|{{ v|cut(5) }}".to_owned(),
        )
        .unwrap();
        env.get_template(name)
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
        check_keywatch_html(&out).unwrap();
    }

    #[test]
    fn email_html_values_are_escaped_also_for_attributes() {
        let out = render_named(EMAIL_HTML, HOSTILE);
        let (plain, rest) = out.split_once('|').unwrap();
        for bad in ['<', '>', '"', '\''] {
            assert!(!plain.contains(bad), "{bad} in {plain}");
        }
        assert!(plain.starts_with("&lt;script&gt;alert(1)&lt;/script&gt; *bold*"));
        assert!(plain.contains("&amp;amp;") && plain.contains("&quot;q&quot;"));
        assert!(rest.starts_with("<code style="), "{rest}");
        assert!(rest.contains(">&lt;script&gt;"));
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
}
