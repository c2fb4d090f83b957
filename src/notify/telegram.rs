//! Telegram Bot API: `sendMessage` with `parse_mode=HTML` to the recipient's chat.
//!
//! Plain HTTPS with reqwest rather than teloxide: keywatch needs the answer's `error_code`
//! to tell a server error (retry) from a refused message (do not), teloxide-core drops it
//! and sleeps 10 s by itself on a 5xx, and one request type does not need a bot framework.
//!
//! The bot token is part of the URL path (`/bot<TOKEN>/sendMessage`): the URL is never
//! logged, errors are stripped of it and scrubbed of the token.
//!
//! Outcomes: `{"ok":true}` delivered; 429 (or `parameters.retry_after`) retried after the
//! wait asked for; 5xx, timeouts and connection failures retried; any other refusal
//! (`Bad Request: chat not found`, `can't parse entities`, 401 bad token, 403 bot blocked)
//! is permanent.

use std::time::Duration;

use serde_json::{json, Value};

use super::channel::{excerpt, http_error, DeliveryError};
use crate::registry::Secret;

pub struct Telegram {
    api_url: String,
    token: Secret,
}

impl Telegram {
    pub fn new(api_url: &str, token: Secret) -> Telegram {
        Telegram {
            api_url: api_url.trim_end_matches('/').to_owned(),
            token,
        }
    }

    /// Sends one message (at most 4096 characters of HTML) to `chat_id`.
    pub async fn send(
        &self,
        http: &reqwest::Client,
        chat_id: &str,
        html: &str,
    ) -> Result<(), DeliveryError> {
        let secrets = [self.token.expose()];
        let chat: Value = match chat_id.parse::<i64>() {
            Ok(n) => json!(n),
            Err(_) => json!(chat_id),
        };
        let body = json!({
            "chat_id": chat,
            "text": html,
            "parse_mode": "HTML",
            "link_preview_options": { "is_disabled": true },
        });
        let url = format!("{}/bot{}/sendMessage", self.api_url, self.token.expose());
        let resp = http
            .post(url)
            .json(&body)
            .send()
            .await
            .map_err(|e| http_error(e, &secrets))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| http_error(e, &secrets))?;
        let answer: Option<Value> = serde_json::from_str(&text).ok();
        if status.is_success() && answer.as_ref().is_some_and(|a| a["ok"] == true) {
            return Ok(());
        }
        let code = answer
            .as_ref()
            .and_then(|a| a["error_code"].as_u64())
            .unwrap_or(u64::from(status.as_u16()));
        let description = answer
            .as_ref()
            .and_then(|a| a["description"].as_str())
            .map_or_else(|| excerpt(&text, &secrets), |d| excerpt(d, &secrets));
        let retry_after = answer
            .as_ref()
            .and_then(|a| a["parameters"]["retry_after"].as_u64())
            .map(Duration::from_secs);
        let detail = format!("telegram answered {code}: {description}");
        if code == 429 || retry_after.is_some() || code >= 500 || status.is_server_error() {
            return Err(DeliveryError::Transient {
                detail,
                retry_after,
            });
        }
        if let Some(to) = answer
            .as_ref()
            .and_then(|a| a["parameters"]["migrate_to_chat_id"].as_i64())
        {
            return Err(DeliveryError::permanent(format!(
                "{detail}; the group is now chat {to}: update telegram_chat_id"
            )));
        }
        Err(DeliveryError::permanent(detail))
    }
}
