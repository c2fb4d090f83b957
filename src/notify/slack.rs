//! Slack incoming webhooks: a POST of `{"text": …}` (mrkdwn) to the recipient's webhook URL.
//!
//! The URL is the secret (anyone holding it can post): it is read from the variable or file
//! the registry names when a message goes out, never logged, stripped from errors.
//!
//! Outcomes (Slack answers in plain text): 200 `ok` delivered; 429 retried after
//! `Retry-After`; 5xx, timeouts and connection failures retried; 400 `invalid_payload`,
//! 403 `invalid_token` / `action_prohibited`, 404 `no_service` / `channel_not_found`, 410
//! `channel_is_archived` are permanent.

use serde_json::json;

use super::channel::{excerpt, http_error, retry_after, url_secrets, DeliveryError};
use crate::registry::Secret;

/// Posts one message (mrkdwn text).
pub async fn send(http: &reqwest::Client, url: &Secret, text: &str) -> Result<(), DeliveryError> {
    let owned = url_secrets(url.expose());
    let secrets: Vec<&str> = owned.iter().map(String::as_str).collect();
    let body = json!({ "text": text, "unfurl_links": false, "unfurl_media": false });
    let resp = http
        .post(url.expose())
        .json(&body)
        .send()
        .await
        .map_err(|e| http_error(e, &secrets))?;
    let status = resp.status();
    let wait = retry_after(resp.headers());
    let answer = resp.text().await.unwrap_or_default();
    if status.is_success() {
        return Ok(());
    }
    let detail = format!(
        "slack answered {}: {}",
        status.as_u16(),
        excerpt(&answer, &secrets)
    );
    if status.as_u16() == 429 || status.is_server_error() || status.as_u16() == 408 {
        Err(DeliveryError::Transient {
            detail,
            retry_after: wait,
        })
    } else {
        Err(DeliveryError::permanent(detail))
    }
}
