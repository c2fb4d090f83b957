//! Authentication events: the one record keywatch reads per API request.
//!
//! Decoding is pure (no IO): a gateway log line goes in, zero or more [`AuthEvent`]s come
//! out. Raw key material never leaves this module: a decoder hands it to the
//! [`Fingerprinter`] while it still borrows the input line, and the event only carries the
//! keyed fingerprint and a short display hint.
//!
//! Events borrow from the input line where the JSON allows it (no escapes), so the hot path
//! allocates only for fields that are kept past the batch.

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
}

impl DecodeError {
    /// A short, stable label for metrics (`keywatch_events_rejected_total{reason=...}`).
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Json(_) => "json",
            DecodeError::Missing(_) => "missing_field",
            DecodeError::Invalid { .. } => "invalid_field",
            DecodeError::NotUtf8 => "not_utf8",
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
