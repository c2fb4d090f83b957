//! Authentication events: the one record keywatch reads per API request.
//!
//! Decoding is pure (no IO): a gateway log line goes in, zero or more [`AuthEvent`]s come
//! out. Raw key material never leaves this module: a decoder hands it to the
//! [`Fingerprinter`] while it still borrows the input line, and the event only carries the
//! keyed fingerprint and a short display hint.
//!
//! Events borrow from the input line where the JSON allows it (no escapes), so the hot path
//! allocates only for fields that are kept past the batch.
//!
//! # Bounds
//!
//! Whatever the input, decoding neither panics nor grows without bound (FUZZING.md):
//! - a line longer than the decoder's limit ([`Decoder::with_max_line_bytes`], default
//!   [`DEFAULT_MAX_LINE_BYTES`], `input.max_line_bytes`) is refused unread as
//!   [`DecodeError::TooLong`], and so is the `<line too long: N bytes>` marker the file and
//!   stdin sources put in place of a line they did not buffer ([`too_long_marker`]). This is
//!   the bound for Kafka messages, which arrive whole;
//! - nesting: serde_json refuses input nested deeper than 128 arrays/objects ("recursion
//!   limit exceeded"), for the typed preset records and for the mapping's `Value` alike;
//!   values a preset skips are skipped without recursion. Checked by
//!   `deep_nesting_is_refused_without_overflow` below for every format;
//! - a Kong batch holds at most [`MAX_BATCH_RECORDS`] records; the array is refused at the
//!   first record past the limit, before it is built. Other arrays inside a record are
//!   skipped unbuilt by the presets; the generic mapping builds a `serde_json::Value`, whose
//!   size is bounded by the line's (a few times the line length at most).

mod fingerprint;
mod formats;
mod fpcache;
mod mapping;
mod outcome;
mod redact;
mod time;
mod value;

use std::borrow::Cow;

pub use fingerprint::{Fingerprinter, FINGERPRINT_PREFIX};
pub use formats::{Decoder, Format, KeyFallbacks, PRESETS};
pub use mapping::{FieldMapping, LatencyUnit, TimestampFormat};
pub use outcome::Outcome;
pub use time::{epoch_to_ms, parse_timestamp};

/// The default for [`Decoder::with_max_line_bytes`] (and `input.max_line_bytes`): 1 MiB.
pub const DEFAULT_MAX_LINE_BYTES: usize = 1 << 20;

/// Records per Kong batch (a JSON array on one line) at most.
pub const MAX_BATCH_RECORDS: usize = 10_000;

const TOO_LONG_PREFIX: &str = "<line too long: ";
const TOO_LONG_SUFFIX: &str = " bytes>";

/// The line a source puts in place of one longer than its limit, which it skipped unread:
/// `<line too long: N bytes>`. No format decodes it; [`Decoder::decode`] turns it into
/// [`DecodeError::TooLong`] and [`Decoder::redact`] keeps it as is.
pub fn too_long_marker(bytes: u64) -> String {
    format!("{TOO_LONG_PREFIX}{bytes}{TOO_LONG_SUFFIX}")
}

/// The size a [`too_long_marker`] line gives, if `line` is one.
fn parse_too_long_marker(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(TOO_LONG_PREFIX.as_bytes())?;
    let digits = rest.strip_suffix(TOO_LONG_SUFFIX.as_bytes())?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The key id used for requests that presented no key at all.
pub const NO_KEY: &str = "-";

/// One authentication attempt, as seen by the gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthEvent<'a> {
    /// Event time in milliseconds since the Unix epoch (UTC).
    pub ts_ms: i64,
    /// The key's id from the gateway (Kong credential id, AWS apiKeyId, ...), or the
    /// fingerprint (`fp:...`) of raw key material; [`NO_KEY`] when no key was presented.
    pub key_id: Cow<'a, str>,
    /// The last characters of raw key material, so that a human can tell keys apart.
    /// Only set for fingerprinted keys long enough that the hint reveals little.
    pub key_hint: Option<String>,
    /// The gateway's client / consumer name, when it logs one.
    pub consumer: Option<Cow<'a, str>>,
    /// The client's IP address (no port).
    pub source_ip: Option<Cow<'a, str>>,
    pub user_agent: Option<Cow<'a, str>>,
    pub method: Option<Cow<'a, str>>,
    /// The route name when the gateway logs one, else the path without its query string.
    pub endpoint: Option<Cow<'a, str>>,
    /// HTTP status sent to the client; 0 when the log has none.
    pub status: u16,
    pub outcome: Outcome,
    /// Total request latency in milliseconds, as the gateway measured it.
    pub latency_ms: Option<f64>,
    /// Which gateway (host, node or configured label) saw the request.
    pub gateway: Option<Cow<'a, str>>,
    pub request_id: Option<Cow<'a, str>>,
}

impl<'a> AuthEvent<'a> {
    /// An event with only the required fields set; decoders fill in the rest.
    pub fn new(ts_ms: i64, key_id: Cow<'a, str>, status: u16, outcome: Outcome) -> Self {
        AuthEvent {
            ts_ms,
            key_id,
            key_hint: None,
            consumer: None,
            source_ip: None,
            user_agent: None,
            method: None,
            endpoint: None,
            status,
            outcome,
            latency_ms: None,
            gateway: None,
            request_id: None,
        }
    }

    /// Detaches the event from the line it was decoded from.
    pub fn into_owned(self) -> AuthEvent<'static> {
        fn own(c: Option<Cow<'_, str>>) -> Option<Cow<'static, str>> {
            c.map(|c| Cow::Owned(c.into_owned()))
        }
        AuthEvent {
            ts_ms: self.ts_ms,
            key_id: Cow::Owned(self.key_id.into_owned()),
            key_hint: self.key_hint,
            consumer: own(self.consumer),
            source_ip: own(self.source_ip),
            user_agent: own(self.user_agent),
            method: own(self.method),
            endpoint: own(self.endpoint),
            status: self.status,
            outcome: self.outcome,
            latency_ms: self.latency_ms,
            gateway: own(self.gateway),
            request_id: own(self.request_id),
        }
    }
}

/// Why a line could not be turned into events. The message never quotes key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("line is not UTF-8")]
    NotUtf8,
    /// Longer than the limit: not parsed (nor copied into the dead letter).
    #[error("line too long: {bytes} bytes (limit {limit})")]
    TooLong { bytes: u64, limit: usize },
}

impl DecodeError {
    /// A short, stable label for metrics (`keywatch_events_rejected_total{reason=...}`).
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Json(_) => "json",
            DecodeError::Missing(_) => "missing_field",
            DecodeError::Invalid { .. } => "invalid_field",
            DecodeError::NotUtf8 => "not_utf8",
            DecodeError::TooLong { .. } => "too_long",
        }
    }

    pub(crate) fn json(e: serde_json::Error) -> Self {
        // serde_json's messages quote the offending *type* and position, not the value, so
        // they are safe to log; keep only the category and position.
        DecodeError::Json(e.to_string())
    }
}

/// Reduces a request path to an endpoint: no query string, and path segments that look like
/// ids (numbers, UUIDs, long hex) replaced by `:id`, so that per-key sources stay few.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    let path = path.split(['?', '#']).next().unwrap_or("");
    if !path.split('/').any(looks_like_id) {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(if looks_like_id(seg) { ":id" } else { seg });
    }
    Cow::Owned(out)
}

fn looks_like_id(seg: &str) -> bool {
    if seg.is_empty() {
        return false;
    }
    let b = seg.as_bytes();
    if b.iter().all(u8::is_ascii_digit) {
        return true;
    }
    let hexish = b.iter().all(|c| c.is_ascii_hexdigit() || *c == b'-');
    hexish && b.len() >= 16 && b.iter().any(u8::is_ascii_digit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized() {
        let cases = [
            ("/v1/orders", "/v1/orders"),
            ("/v1/orders?limit=10", "/v1/orders"),
            ("/v1/orders/12345", "/v1/orders/:id"),
            (
                "/v1/users/3f2b8c1e-9d4a-4c1b-8e2f-1a2b3c4d5e6f/keys",
                "/v1/users/:id/keys",
            ),
            ("/v1/blob/deadbeefdeadbeef01", "/v1/blob/:id"),
            ("/v1/face/feed", "/v1/face/feed"),
            ("/", "/"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_path(input), want, "{input}");
        }
    }
}
