//! The generic JSON webhook: a POST of the message as JSON (version 1, below) to the
//! channel's URL, with an `Idempotency-Key` header (the message id, also `id` in the body),
//! so that a receiver that remembers ids sees a message once even when keywatch sends it
//! twice (a restart in the middle of an attempt).
//!
//! ```json
//! {"version": "1", "id": "…", "receiver": "security", "recipient": "team:security",
//!  "owner": null, "severity": "critical", "subject": "…", "text": "…", "test": false,
//!  "findings": [{"kind": "revoked_key_used", "key_id": "…", "owner": "acme", "at": "…",
//!                "severity": "critical", "summary": "…", "evidence": {…}, "dedup_key": "…"}]}
//! ```
//!
//! Outcomes: 2xx delivered; 408, 429 (after `Retry-After`), 5xx, timeouts and connection
//! failures retried; other answers permanent. The URL may be a secret (`url_env`,
//! `url_file`), and so is the Authorization header value: neither is logged.
//!
//! Signed calls: with `signing_secret_env` (or `_file`) set, every request carries
//! `X-Keywatch-Signature: t=UNIX_SECONDS,v1=HEX`, where HEX is the HMAC-SHA256, keyed with
//! the secret, of the timestamp, a dot and the raw body (`t.body`), so that a receiver can
//! tell keywatch's calls from anyone's and refuse replays. To verify: take `t` and `v1` from
//! the header, compute the HMAC of `"{t}." + body` as received (before parsing the JSON),
//! compare in constant time, and refuse a `t` more than five minutes from your clock
//! ([`verify`] does exactly this). Retries of a message are signed anew.
//!
//! This module owns the channel whole: its settings in `routes.toml` ([`settings`]) and its
//! sending; the body is JSON, so it needs no escaping of its own.

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use std::time::Duration;

use super::{
    answer_text, excerpt, http_error, retry_after, url_secrets, DeliveryError, MAX_ANSWER_BYTES,
};
use crate::config::ConfigError;
use crate::notify::config::ChannelTable;
use crate::registry::{Secret, SecretRef};

/// The fields of a webhook channel in `routes.toml`.
pub(crate) const FIELDS: &[&str] = &[
    "url",
    "url_env",
    "url_file",
    "authorization_env",
    "authorization_file",
    "signing_secret_env",
    "signing_secret_file",
];

/// The header that carries the signature of a signed call.
pub const SIGNATURE_HEADER: &str = "X-Keywatch-Signature";

/// How far a signed call's timestamp may be from the receiver's clock in [`verify`].
pub const SIGNATURE_TOLERANCE_S: i64 = 300;

#[derive(Debug, Clone, PartialEq)]
pub struct WebhookSettings {
    pub url: UrlRef,
    /// The value of the Authorization header (`Bearer …`).
    pub authorization: Option<SecretRef>,
    /// The HMAC key of [`SIGNATURE_HEADER`]; unsigned without one.
    pub signing_secret: Option<SecretRef>,
}

/// A URL written in the file (not secret), or named (secret).
#[derive(Debug, Clone, PartialEq)]
pub enum UrlRef {
    Plain(String),
    Secret(SecretRef),
}

/// Reads a webhook channel's table: one of `url`, `url_env`, `url_file`, and maybe a named
/// Authorization value.
pub(crate) fn settings(t: &ChannelTable<'_>) -> Result<WebhookSettings, ConfigError> {
    let c = t.raw;
    let secret = t.secret("url", &c.url_env, &c.url_file)?;
    let url = match (&c.url, secret) {
        (Some(u), None) => UrlRef::Plain(t.http_url("url", u)?),
        (None, Some(s)) => UrlRef::Secret(s),
        (Some(u), Some(_)) => {
            return Err(t.err(
                "url",
                Some(u.span()),
                "set one of url, url_env and url_file",
            ))
        }
        (None, None) => {
            return Err(t.err(
                "url",
                None,
                "a webhook channel needs url, url_env or url_file",
            ))
        }
    };
    let authorization: Option<SecretRef> =
        t.secret("authorization", &c.authorization_env, &c.authorization_file)?;
    let signing_secret: Option<SecretRef> = t.secret(
        "signing_secret",
        &c.signing_secret_env,
        &c.signing_secret_file,
    )?;
    Ok(WebhookSettings {
        url,
        authorization,
        signing_secret,
    })
}

pub enum Url {
    Plain(String),
    Secret(Secret),
}

impl Url {
    fn as_str(&self) -> &str {
        match self {
            Url::Plain(s) => s,
            Url::Secret(s) => s.expose(),
        }
    }
}

pub struct Webhook {
    url: Url,
    authorization: Option<Secret>,
    signing: Option<Secret>,
}

/// The `v1` signature of a call: hex HMAC-SHA256 of `"{timestamp}." + body`.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Checks a [`SIGNATURE_HEADER`] value against the raw body, as a receiver should: the
/// signature in constant time, and the timestamp within [`SIGNATURE_TOLERANCE_S`] of
/// `now_s`.
pub fn verify(secret: &[u8], header: &str, body: &[u8], now_s: i64) -> Result<(), &'static str> {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", x)) => t = x.parse::<i64>().ok(),
            Some(("v1", x)) => v1 = hex::decode(x).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return Err("malformed signature header");
    };
    if (now_s - t).abs() > SIGNATURE_TOLERANCE_S {
        return Err("timestamp too far from now");
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&v1)
        .map_err(|_| "signature does not match")
}

impl Webhook {
    pub fn new(url: Url, authorization: Option<Secret>) -> Webhook {
        Webhook {
            url,
            authorization,
            signing: None,
        }
    }

    /// Signs every call with `secret` ([`SIGNATURE_HEADER`]); `None`: unsigned.
    pub fn signed_with(mut self, secret: Option<Secret>) -> Webhook {
        self.signing = secret;
        self
    }

    pub async fn send(
        &self,
        http: &reqwest::Client,
        id: &str,
        body: &Value,
    ) -> Result<(), DeliveryError> {
        let mut owned = Vec::new();
        if let Url::Secret(s) = &self.url {
            owned.extend(url_secrets(s.expose()));
        }
        if let Some(a) = &self.authorization {
            owned.push(a.expose().to_owned());
            // `Bearer xyz`: the token alone, too.
            if let Some((_, token)) = a.expose().split_once(' ') {
                owned.push(token.to_owned());
            }
        }
        if let Some(k) = &self.signing {
            owned.push(k.expose().to_owned());
        }
        let secrets: Vec<&str> = owned.iter().map(String::as_str).collect();
        // The bytes sent are the bytes signed.
        let bytes = serde_json::to_vec(body).expect("a JSON value serializes");
        let mut req = http
            .post(self.url.as_str())
            .header("Idempotency-Key", id)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        if let Some(k) = &self.signing {
            let t = chrono::Utc::now().timestamp();
            let v1 = signature(k.expose().as_bytes(), t, &bytes);
            req = req.header(SIGNATURE_HEADER, format!("t={t},v1={v1}"));
        }
        let mut req = req.body(bytes);
        if let Some(a) = &self.authorization {
            req = req.header(reqwest::header::AUTHORIZATION, a.expose());
        }
        let resp = req.send().await.map_err(|e| http_error(e, &secrets))?;
        let status = resp.status();
        let wait = retry_after(resp.headers());
        if status.is_success() {
            return Ok(());
        }
        let answer = answer_text(resp, MAX_ANSWER_BYTES)
            .await
            .unwrap_or_default();
        classify(status, wait, &answer, &secrets)
    }
}

/// What a webhook's answer means: 2xx delivered; 408, 429 and 5xx worth retrying (after
/// `wait`, the answer's `Retry-After`); anything else permanent. The detail quotes a
/// scrubbed excerpt of the body.
pub(crate) fn classify(
    status: reqwest::StatusCode,
    wait: Option<Duration>,
    answer: &str,
    secrets: &[&str],
) -> Result<(), DeliveryError> {
    if status.is_success() {
        return Ok(());
    }
    let detail = format!(
        "webhook answered {}: {}",
        status.as_u16(),
        excerpt(answer, secrets)
    );
    if matches!(status.as_u16(), 408 | 429) || status.is_server_error() {
        Err(DeliveryError::Transient {
            detail,
            retry_after: wait,
        })
    } else {
        Err(DeliveryError::permanent(detail))
    }
}

#[cfg(test)]
mod tests {
    use super::super::endless::{endless_answer, peak_rss_kib};
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_endless_answer_is_read_only_up_to_the_bound() {
        // A webhook that answers 500 with a 1 GiB body (chunked), or until keywatch hangs up.
        let (addr, server) = endless_answer("500 Internal Server Error", "text/plain", b"");
        let before = peak_rss_kib();
        let hook = Webhook::new(Url::Plain(format!("http://{addr}/hook")), None);
        let err = hook
            .send(&reqwest::Client::new(), "id-1", &serde_json::json!({}))
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(
            err.detail().starts_with("webhook answered 500: xxxx"),
            "{err:?}"
        );
        // The connection closes in the runtime's tasks: wait without blocking them.
        let sent = tokio::task::spawn_blocking(move || server.join().unwrap())
            .await
            .unwrap();
        println!(
            "the webhook wrote {} KiB of its answer before keywatch hung up (bound {} KiB); \
             peak RSS {before} KiB -> {} KiB",
            sent >> 10,
            MAX_ANSWER_BYTES >> 10,
            peak_rss_kib()
        );
        // Socket buffers take a few MiB; reading the answer whole would take all 1 GiB.
        assert!(sent < 256 << 20, "{sent} bytes read");
    }
}

#[cfg(test)]
mod signing_tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // The same as Python's hmac.new(b"whsec-test", b'1796400000.{"a":1}', sha256).
        assert_eq!(
            signature(b"whsec-test", 1_796_400_000, br#"{"a":1}"#),
            "4b534dcd3311a110dc96b723bba9b65b15c76fbdab6c810003f07b71aba7b767"
        );
        let header = format!("t=1796400000,v1={}", signature(b"k", 1_796_400_000, b"{}"));
        assert_eq!(verify(b"k", &header, b"{}", 1_796_400_100), Ok(()));
        assert_eq!(
            verify(b"k", &header, b"{} ", 1_796_400_100),
            Err("signature does not match")
        );
        assert_eq!(
            verify(b"other", &header, b"{}", 1_796_400_100),
            Err("signature does not match")
        );
        assert_eq!(
            verify(b"k", &header, b"{}", 1_796_400_000 + 301),
            Err("timestamp too far from now")
        );
        assert_eq!(
            verify(b"k", "v1=00", b"{}", 0),
            Err("malformed signature header")
        );
    }

    /// A receiver on loopback keeping each call's headers and raw body.
    async fn receiver() -> (String, Arc<Mutex<Vec<(axum::http::HeaderMap, Vec<u8>)>>>) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let keep = got.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let keep = keep.clone();
                    async move {
                        keep.lock().unwrap().push((headers, body.to_vec()));
                        "ok"
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, got)
    }

    #[tokio::test]
    async fn signed_calls_verify_and_a_tampered_body_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("signing");
        std::fs::write(&key, "whsec-0123456789").unwrap();
        let secret = SecretRef::File(key).resolve().unwrap();
        let (url, got) = receiver().await;
        let hook = Webhook::new(Url::Plain(url.clone()), None).signed_with(Some(secret));
        let body = serde_json::json!({"version": "1", "id": "m1", "text": "revoked key used"});
        hook.send(&reqwest::Client::new(), "m1", &body)
            .await
            .unwrap();
        // Unsigned without a secret.
        Webhook::new(Url::Plain(url), None)
            .send(&reqwest::Client::new(), "m2", &body)
            .await
            .unwrap();

        let got = got.lock().unwrap().clone();
        assert_eq!(got.len(), 2);
        let (headers, raw) = &got[0];
        let header = headers[SIGNATURE_HEADER].to_str().unwrap();
        let now = chrono::Utc::now().timestamp();
        assert_eq!(verify(b"whsec-0123456789", header, raw, now), Ok(()));
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(serde_json::from_slice::<Value>(raw).unwrap(), body);
        // A receiver that checks refuses a changed body, or a replay an hour later.
        let mut tampered = raw.clone();
        tampered.extend_from_slice(b" ");
        assert!(verify(b"whsec-0123456789", header, &tampered, now).is_err());
        let forged = String::from_utf8(raw.clone())
            .unwrap()
            .replace("revoked key used", "all fine");
        assert!(verify(b"whsec-0123456789", header, forged.as_bytes(), now).is_err());
        assert!(verify(b"whsec-0123456789", header, raw, now + 3600).is_err());
        assert!(got[1].0.get(SIGNATURE_HEADER).is_none());
    }
}
