//! Making a rejected line safe to keep: the values of fields that hold raw key material are
//! replaced by their fingerprint id.
//!
//! This works on the text, not on parsed JSON, because the lines it sees are the ones that
//! failed to decode (truncated, not JSON at all, ...) and because the rest of the line must
//! stay as it was. It finds the field names anywhere (at any depth of a JSON object, inside
//! JSON strings such as a logged query string, in `name=value` text) and replaces the value
//! that follows `"name":` / `name=` / `name:`.

use std::borrow::Cow;

use memchr::memmem;

use super::fingerprint::FINGERPRINT_PREFIX;
use super::Fingerprinter;

/// Field names whose values are raw key material, lowercase. A name matches when the
/// character before it is not a letter or digit (so `http_x_api_key`, `request_X-Api-Key`
/// and `Proxy-Authorization` match too) and the one after it is not a name character.
const SECRET_NAMES: &[&str] = &[
    "api_key",
    "api-key",
    "apikey",
    "x-api-key",
    "x_api_key",
    "authorization",
    "request_x-api-key",
];

#[derive(Debug, Clone)]
pub(super) struct Redactor {
    /// Lowercase names, longest first.
    names: Vec<String>,
}

impl Redactor {
    /// The standard names plus `extra` (the format's own secret fields).
    pub(super) fn new(extra: &[&str]) -> Self {
        let mut names: Vec<String> = SECRET_NAMES
            .iter()
            .chain(extra)
            .map(|n| n.trim().to_ascii_lowercase())
            .filter(|n| !n.is_empty())
            .collect();
        names.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        names.dedup();
        Redactor { names }
    }

    pub(super) fn redact(&self, line: &[u8], fp: &Fingerprinter) -> String {
        let text = String::from_utf8_lossy(line);
        let lower = text.to_ascii_lowercase();
        let hay = lower.as_bytes();

        let mut found: Vec<(usize, usize)> = Vec::new();
        for name in &self.names {
            for start in memmem::find_iter(hay, name.as_bytes()) {
                let end = start + name.len();
                let left_ok = start == 0 || !hay[start - 1].is_ascii_alphanumeric();
                let right_ok = hay
                    .get(end)
                    .is_none_or(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c == b'-'));
                if left_ok && right_ok {
                    found.push((start, end));
                }
            }
        }
        if found.is_empty() {
            return text.into_owned();
        }
        // Leftmost first; at the same start the longer name.
        found.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));

        let mut out = String::with_capacity(text.len() + 32);
        let mut copied = 0;
        for (start, end) in found {
            if start < copied {
                continue;
            }
            if let Some(r) = replacement_after(&text, end, fp) {
                out.push_str(&text[copied..r.start]);
                out.push_str(&r.with);
                copied = r.end;
            }
        }
        out.push_str(&text[copied..]);
        out
    }
}

struct Replacement {
    start: usize,
    end: usize,
    with: String,
}

/// Finds the value after a secret name ending at `i` and what to replace it with.
fn replacement_after(text: &str, mut i: usize, fp: &Fingerprinter) -> Option<Replacement> {
    let b = text.as_bytes();
    // The name's closing quote: `"`, `\"` (JSON inside a JSON string) or `'`.
    let mut quoted = false;
    if b[i..].starts_with(b"\\\"") {
        i += 2;
    } else if matches!(b.get(i), Some(b'"' | b'\'')) {
        quoted = b[i] == b'"';
        i += 1;
    }
    i = skip_spaces(b, i);
    let sep = *b.get(i)?;
    if sep != b':' && sep != b'=' {
        return None;
    }
    i = skip_spaces(b, i + 1);
    let c = *b.get(i)?;

    if b[i..].starts_with(b"\\\"") {
        // "...\"api_key\":\"value\"..."
        let start = i + 2;
        let end = memmem::find(&b[start..], b"\\\"").map_or(b.len(), |k| start + k);
        return replace_span(start, end, fp, &text[start..end]);
    }
    match c {
        b'"' => {
            let start = i + 1;
            let end = json_string_end(b, start);
            let raw = &text[start..end];
            // Fingerprint what the decoder would have seen: the unescaped string.
            let value: Cow<str> = if raw.contains('\\') && end < b.len() {
                serde_json::from_str::<String>(&text[i..=end])
                    .map_or(Cow::Borrowed(raw), Cow::Owned)
            } else {
                Cow::Borrowed(raw)
            };
            replace_span(start, end, fp, &value)
        }
        b'\'' => {
            let start = i + 1;
            let end = memchr::memchr(b'\'', &b[start..]).map_or(b.len(), |k| start + k);
            replace_span(start, end, fp, &text[start..end])
        }
        b'[' => replace_list(text, i, fp),
        b'{' => None, // nested names are found on their own
        _ => {
            let mut end = bare_end(b, i);
            let word = &text[i..end];
            if matches!(word, "null" | "true" | "false") {
                return None;
            }
            // "Authorization: Bearer abc": the credential is the next word.
            let scheme = ["bearer", "basic", "token", "digest", "apikey"]
                .iter()
                .any(|s| word.eq_ignore_ascii_case(s));
            if scheme && b.get(end) == Some(&b' ') {
                end = bare_end(b, end + 1);
            }
            let mut r = replace_span(i, end, fp, &text[i..end])?;
            if quoted && sep == b':' {
                // A JSON number or literal: keep the JSON valid.
                r.with = format!("\"{}\"", r.with);
            }
            Some(r)
        }
    }
}

fn replace_span(start: usize, end: usize, fp: &Fingerprinter, value: &str) -> Option<Replacement> {
    let v = value.trim();
    if v.is_empty() || v == "-" || v.eq_ignore_ascii_case("redacted") || is_fingerprint(v) {
        return None;
    }
    Some(Replacement {
        start,
        end,
        with: fp.key_id(value),
    })
}

/// A JSON list of strings (a repeated header): each string replaced.
fn replace_list(text: &str, open: usize, fp: &Fingerprinter) -> Option<Replacement> {
    let b = text.as_bytes();
    let mut with = String::from("[");
    let mut i = open + 1;
    let mut copied = i;
    let mut changed = false;
    while i < b.len() {
        match b[i] {
            b']' => {
                i += 1;
                break;
            }
            b'"' => {
                let start = i + 1;
                let end = json_string_end(b, start);
                with.push_str(&text[copied..start]);
                match replace_span(start, end, fp, &text[start..end]) {
                    Some(r) => {
                        with.push_str(&r.with);
                        changed = true;
                    }
                    None => with.push_str(&text[start..end]),
                }
                copied = end;
                i = end + 1;
            }
            b'[' | b'{' => return None,
            _ => i += 1,
        }
    }
    let i = i.min(b.len());
    with.push_str(&text[copied..i]);
    changed.then_some(Replacement {
        start: open,
        end: i,
        with,
    })
}

fn is_fingerprint(v: &str) -> bool {
    v.strip_prefix(FINGERPRINT_PREFIX)
        .is_some_and(|h| h.len() == 24 && h.bytes().all(|c| c.is_ascii_hexdigit()))
}

fn skip_spaces(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t')) {
        i += 1;
    }
    i
}

/// The index of the closing quote of a JSON string whose content starts at `start`, or the
/// end of the text if it is cut off.
fn json_string_end(b: &[u8], start: usize) -> usize {
    let mut j = start;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return j,
            _ => j += 1,
        }
    }
    b.len()
}

/// The end of an unquoted value.
fn bare_end(b: &[u8], start: usize) -> usize {
    let mut j = start;
    while j < b.len() {
        match b[j] {
            b' ' | b'\t' | b',' | b';' | b'&' | b'}' | b']' | b'"' | b'\'' | b')' | b'\\' => break,
            _ => j += 1,
        }
    }
    j
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_by_name_in_any_shape() {
        let fp = Fingerprinter::new(b"s", 4);
        let r = Redactor::new(&["token"]);
        let k = "sk_live_4eC39HqLyjWDarjtT1zdp7dc";
        let id = fp.key_id(k);
        let cases: Vec<(String, String)> = vec![
            (
                format!(r#"{{"api_key":"{k}","n":1}}"#),
                format!(r#"{{"api_key":"{id}","n":1}}"#),
            ),
            (
                format!(r#"{{"a":{{"b":{{"X-API-KEY" : "{k}"}}}}}}"#),
                format!(r#"{{"a":{{"b":{{"X-API-KEY" : "{id}"}}}}}}"#),
            ),
            (
                r#"{"apikey":12345}"#.to_string(),
                format!(r#"{{"apikey":"{}"}}"#, fp.key_id("12345")),
            ),
            (
                format!(r#"{{"x-api-key":["{k}","other"]}}"#),
                format!(r#"{{"x-api-key":["{id}","{}"]}}"#, fp.key_id("other")),
            ),
            (
                format!(r#"{{"http_x_api_key":"{k}"}}"#),
                format!(r#"{{"http_x_api_key":"{id}"}}"#),
            ),
            (
                format!(r#"{{"request_X-Api-Key":"{k}"}}"#),
                format!(r#"{{"request_X-Api-Key":"{id}"}}"#),
            ),
            (
                format!(r#"{{"authorization":"Bearer {k}"}}"#),
                format!(
                    r#"{{"authorization":"{}"}}"#,
                    fp.key_id(&format!("Bearer {k}"))
                ),
            ),
            // escapes: the fingerprint is of the unescaped value
            (
                r#"{"api_key":"ab\"cd\u0041"}"#.to_string(),
                format!(r#"{{"api_key":"{}"}}"#, fp.key_id("ab\"cdA")),
            ),
            // a query string inside a JSON value
            (
                format!(r#"{{"uri":"/v1/x?apikey={k}&b=2"}}"#),
                format!(r#"{{"uri":"/v1/x?apikey={id}&b=2"}}"#),
            ),
            // JSON inside a JSON string
            (
                format!(r#"{{"body":"{{\"api_key\":\"{k}\"}}"}}"#),
                format!(r#"{{"body":"{{\"api_key\":\"{id}\"}}"}}"#),
            ),
            // truncated
            (
                format!(r#"{{"api_key":"{k}"#),
                format!(r#"{{"api_key":"{id}"#),
            ),
            // plain text
            (
                format!("api_key={k} status=401"),
                format!("api_key={id} status=401"),
            ),
            (format!("X-Api-Key: {k}"), format!("X-Api-Key: {id}")),
            (
                format!("Authorization: Bearer {k} next"),
                format!("Authorization: {} next", fp.key_id(&format!("Bearer {k}"))),
            ),
            (format!("api_key='{k}'"), format!("api_key='{id}'")),
            // extra names
            (
                format!(r#"{{"token":"{k}"}}"#),
                format!(r#"{{"token":"{id}"}}"#),
            ),
            // left alone
            (
                r#"{"api_key_id":"abc","apiKeyId":"x"}"#.into(),
                r#"{"api_key_id":"abc","apiKeyId":"x"}"#.into(),
            ),
            (
                r#"{"api_key":"-","apikey":"","x-api-key":null}"#.into(),
                r#"{"api_key":"-","apikey":"","x-api-key":null}"#.into(),
            ),
            (
                r#"{"request_X-Api-Key":"REDACTED"}"#.into(),
                r#"{"request_X-Api-Key":"REDACTED"}"#.into(),
            ),
            (
                format!(r#"{{"api_key":"{id}"}}"#),
                format!(r#"{{"api_key":"{id}"}}"#),
            ),
            (
                r#"{"header":"x-api-key","monkey":"banana"}"#.into(),
                r#"{"header":"x-api-key","monkey":"banana"}"#.into(),
            ),
            (
                r#"{"authorization":{"type":"basic"}}"#.into(),
                r#"{"authorization":{"type":"basic"}}"#.into(),
            ),
        ];
        for (line, want) in cases {
            let got = r.redact(line.as_bytes(), &fp);
            assert_eq!(got, want, "{line}");
            assert!(!got.contains(k), "{got}");
        }
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let fp = Fingerprinter::new(b"s", 4);
        let r = Redactor::new(&[]);
        let got = r.redact(b"api_key=abc\xff\xfe def", &fp);
        assert_eq!(
            got,
            format!("api_key={} def", fp.key_id("abc\u{fffd}\u{fffd}"))
        );
    }
}
