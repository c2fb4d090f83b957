//! Contact fields shared by the key registry (owners) and the routes file (team receivers):
//! one validation, so that an address the registry accepts is one the mailer can send to.

use std::ops::Range;

use toml::Spanned;

/// Email addresses, trimmed; the error is (index, span, reason).
pub(crate) fn emails(
    list: &[Spanned<String>],
) -> Result<Vec<String>, (usize, Range<usize>, String)> {
    list.iter()
        .enumerate()
        .map(|(i, e)| {
            let addr = e.get_ref().trim();
            match addr.parse::<lettre::Address>() {
                Ok(_) => Ok(addr.to_owned()),
                Err(_) => Err((
                    i,
                    e.span(),
                    format!("expected an email address like \"ops@example.com\", found `{addr}`"),
                )),
            }
        })
        .collect()
}

/// A Telegram chat: a numeric id (number or string) or a `@channel`; the error is
/// (span, reason).
pub(crate) fn telegram_chat_id(
    v: &Option<Spanned<toml::Value>>,
) -> Result<Option<String>, (Range<usize>, String)> {
    let Some(v) = v else { return Ok(None) };
    match v.get_ref() {
        toml::Value::Integer(i) => Ok(Some(i.to_string())),
        toml::Value::String(s)
            if (s.starts_with('@') && s.len() > 1) || s.parse::<i64>().is_ok() =>
        {
            Ok(Some(s.clone()))
        }
        _ => Err((
            v.span(),
            "expected a chat id like -1001234567890 or a channel like \"@acme_ops\"".into(),
        )),
    }
}
