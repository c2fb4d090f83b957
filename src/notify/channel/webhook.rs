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
//! This module owns the channel whole: its settings in `routes.toml` ([`settings`]) and its
//! sending; the body is JSON, so it needs no escaping of its own.

use serde_json::Value;

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
];

#[derive(Debug, Clone, PartialEq)]
pub struct WebhookSettings {
    pub url: UrlRef,
    /// The value of the Authorization header (`Bearer …`).
    pub authorization: Option<SecretRef>,
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
    Ok(WebhookSettings { url, authorization })
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
}

impl Webhook {
    pub fn new(url: Url, authorization: Option<Secret>) -> Webhook {
        Webhook { url, authorization }
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
        let secrets: Vec<&str> = owned.iter().map(String::as_str).collect();
        let mut req = http
            .post(self.url.as_str())
            .header("Idempotency-Key", id)
            .json(body);
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
    use super::*;
    use std::io::{Read, Write};

    fn peak_rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/self/status")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_endless_answer_is_read_only_up_to_the_bound() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // A webhook that answers 500 with a 1 GiB body (chunked), or until keywatch hangs up.
        let server = std::thread::spawn(move || -> u64 {
            let (mut s, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "the request ended early");
                head.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n")
                .unwrap();
            let chunk = [b"10000\r\n".as_slice(), &[b'x'; 0x10000], b"\r\n"].concat();
            let mut sent = 0u64;
            while sent < 1 << 30 {
                if s.write_all(&chunk).is_err() {
                    break;
                }
                sent += 0x10000;
            }
            sent
        });
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
