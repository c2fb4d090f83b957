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
