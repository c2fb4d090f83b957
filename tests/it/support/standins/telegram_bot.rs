//! The Bot API methods a bot uses besides `sendMessage`, for the Telegram stand-in, checked
//! as the real API does (https://core.telegram.org/bots/api):
//!
//! - `getUpdates`: updates after `offset` (an offset confirms and drops the ones before it),
//!   long polling up to `timeout` seconds until one arrives, `limit` 1..=100,
//!   `allowed_updates` known names only; 409 `Conflict: terminated by other getUpdates
//!   request` while another `getUpdates` is waiting, 409 `can't use getUpdates method while
//!   webhook is active` after `setWebhook`.
//! - `answerCallbackQuery`: a query id the stand-in handed out and not yet answered, text
//!   at most 200 characters.
//! - `editMessageReplyMarkup`: a message the bot sent to that chat; "message is not
//!   modified" when the markup is the same.
//! - `setWebhook`: an HTTPS URL on port 443, 80, 88 or 8443, `secret_token` of 1 to 256
//!   characters `A-Za-z0-9_-`; `deleteWebhook`.
//! - `getMe`: the bot itself (`BOT_USERNAME`), with the fields of the real answer.
//! - `reply_markup` of `sendMessage`: an inline keyboard of rows of buttons, each with a text
//!   and exactly one action, `callback_data` 1 to 64 bytes.
//!
//! Tests put updates in with [`BotState::push_message`] and [`BotState::push_callback`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

/// What the stand-in's bot knows.
#[derive(Default)]
pub struct BotState {
    /// Updates not yet confirmed, oldest first.
    updates: Mutex<Vec<Value>>,
    next_update: Mutex<i64>,
    arrived: tokio::sync::Notify,
    polling: AtomicBool,
    /// `setWebhook`'s body while one is set.
    pub webhook: Mutex<Option<Value>>,
    /// Messages sent: (chat, message id) → the reply markup (Null without).
    pub sent: Mutex<HashMap<(String, i64), Value>>,
    open_queries: Mutex<HashSet<String>>,
    next_query: Mutex<u64>,
}

type Answer = (u16, String, Option<u64>, bool);

fn ok(result: Value) -> Answer {
    (
        200,
        json!({"ok": true, "result": result}).to_string(),
        None,
        false,
    )
}

fn err(code: u16, description: &str) -> Answer {
    (
        code,
        json!({"ok": false, "error_code": code, "description": description}).to_string(),
        None,
        false,
    )
}

fn user(id: i64, username: &str) -> Value {
    json!({"id": id, "is_bot": false, "first_name": username, "username": username})
}

fn chat(id: i64) -> Value {
    json!({"id": id, "type": "private", "first_name": "owner"})
}

/// The stand-in bot's username, as `getMe` tells it.
pub const BOT_USERNAME: &str = "keywatch_test_bot";

impl BotState {
    /// `getMe`: the bot's user, as the real API answers it.
    pub fn get_me(&self) -> Answer {
        ok(json!({
            "id": 7_000_000_001i64,
            "is_bot": true,
            "first_name": "keywatch test",
            "username": BOT_USERNAME,
            "can_join_groups": true,
            "can_read_all_group_messages": false,
            "supports_inline_queries": false,
            "can_connect_to_business": false,
            "has_main_web_app": false
        }))
    }

    fn push(&self, kind: &str, value: Value) -> i64 {
        let mut n = self.next_update.lock().unwrap();
        *n += 1;
        let id = 100_000 + *n;
        self.updates
            .lock()
            .unwrap()
            .push(json!({"update_id": id, kind: value}));
        self.arrived.notify_waiters();
        id
    }

    /// A text message from `username` in the private chat `chat_id`.
    pub fn push_message(&self, chat_id: i64, username: &str, text: &str) -> Value {
        let n = *self.next_update.lock().unwrap() + 1;
        let m = json!({
            "message_id": 5000 + n,
            "from": user(chat_id, username),
            "chat": chat(chat_id),
            "date": 1_795_132_800,
            "text": text,
        });
        let id = self.push("message", m.clone());
        json!({"update_id": id, "message": m})
    }

    /// A press on a button of the bot's message `message_id` in `chat_id`: the update (with
    /// the query id the bot must answer).
    pub fn push_callback(
        &self,
        chat_id: i64,
        message_id: i64,
        username: &str,
        data: &str,
    ) -> Value {
        let qid = {
            let mut q = self.next_query.lock().unwrap();
            *q += 1;
            format!("q{}", *q)
        };
        self.open_queries.lock().unwrap().insert(qid.clone());
        let q = json!({
            "id": qid,
            "from": user(chat_id, username),
            "message": {
                "message_id": message_id,
                "chat": chat(chat_id),
                "date": 1_795_132_800,
                "text": "…",
            },
            "chat_instance": "ci-1",
            "data": data,
        });
        let id = self.push("callback_query", q.clone());
        json!({"update_id": id, "callback_query": q})
    }

    /// Records a message the bot sent.
    pub fn sent_message(&self, chat: &str, id: i64, markup: &Value) {
        self.sent
            .lock()
            .unwrap()
            .insert((chat.to_owned(), id), markup.clone());
    }

    pub fn polling(&self) -> bool {
        self.polling.load(Ordering::SeqCst)
    }
}

/// `reply_markup` as the API checks it (an inline keyboard); the error description if not.
pub fn check_markup(m: &Value) -> Result<(), String> {
    if m.is_null() {
        return Ok(());
    }
    let rows = m["inline_keyboard"]
        .as_array()
        .ok_or("Bad Request: can't parse reply keyboard markup JSON object")?;
    for row in rows {
        let buttons = row
            .as_array()
            .ok_or("Bad Request: can't parse inline keyboard button: InlineKeyboardButton must be an Object")?;
        for b in buttons {
            let text = b["text"].as_str().unwrap_or("");
            if text.is_empty() {
                return Err(
                    "Bad Request: text buttons are unallowed in the inline keyboard".into(),
                );
            }
            let actions = [
                "callback_data",
                "url",
                "switch_inline_query",
                "pay",
                "web_app",
            ]
            .iter()
            .filter(|k| !b[**k].is_null())
            .count();
            if actions != 1 {
                return Err(
                    "Bad Request: can't parse inline keyboard button: exactly one of the optional fields must be used"
                        .into(),
                );
            }
            if let Some(d) = b.get("callback_data") {
                let len = d.as_str().map_or(0, str::len);
                if !(1..=64).contains(&len) {
                    return Err("Bad Request: BUTTON_DATA_INVALID".into());
                }
            }
        }
    }
    Ok(())
}

const KNOWN_UPDATES: [&str; 8] = [
    "message",
    "edited_message",
    "channel_post",
    "callback_query",
    "inline_query",
    "my_chat_member",
    "chat_member",
    "poll",
];

impl BotState {
    /// `getUpdates`.
    pub async fn get_updates(&self, body: &Value) -> Answer {
        if self.webhook.lock().unwrap().is_some() {
            return err(
                409,
                "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first",
            );
        }
        let timeout = match &body["timeout"] {
            Value::Null => 0,
            v => match v.as_u64() {
                Some(t) => t,
                None => return err(400, "Bad Request: wrong parameter timeout"),
            },
        };
        let limit = match &body["limit"] {
            Value::Null => 100,
            v => match v.as_u64() {
                Some(l) if (1..=100).contains(&l) => l as usize,
                _ => return err(400, "Bad Request: wrong parameter limit"),
            },
        };
        let allowed: Option<Vec<String>> = match &body["allowed_updates"] {
            Value::Null => None,
            Value::Array(a) => {
                let mut out = Vec::new();
                for x in a {
                    match x.as_str() {
                        Some(n) if KNOWN_UPDATES.contains(&n) => out.push(n.to_owned()),
                        _ => return err(400, "Bad Request: wrong parameter allowed_updates"),
                    }
                }
                Some(out)
            }
            _ => return err(400, "Bad Request: wrong parameter allowed_updates"),
        };
        if let Some(o) = body["offset"].as_i64() {
            self.updates
                .lock()
                .unwrap()
                .retain(|u| u["update_id"].as_i64().unwrap() >= o);
        }
        if self.polling.swap(true, Ordering::SeqCst) {
            return err(
                409,
                "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running",
            );
        }
        // A poller that goes away (its connection closed) stops polling.
        struct Polling<'a>(&'a AtomicBool);
        impl Drop for Polling<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        let _polling = Polling(&self.polling);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let result = loop {
            let notified = self.arrived.notified();
            let ready: Vec<Value> = self
                .updates
                .lock()
                .unwrap()
                .iter()
                .filter(|u| {
                    allowed
                        .as_ref()
                        .is_none_or(|a| a.iter().any(|k| u.get(k.as_str()).is_some()))
                })
                .take(limit)
                .cloned()
                .collect();
            if !ready.is_empty() || tokio::time::Instant::now() >= deadline {
                break ready;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        };
        ok(Value::Array(result))
    }

    pub fn answer_callback_query(&self, body: &Value) -> Answer {
        let Some(id) = body["callback_query_id"].as_str() else {
            return err(
                400,
                "Bad Request: query is too old and response timeout expired or query ID is invalid",
            );
        };
        if body["text"]
            .as_str()
            .is_some_and(|t| t.chars().count() > 200)
        {
            return err(400, "Bad Request: MESSAGE_TOO_LONG");
        }
        if !self.open_queries.lock().unwrap().remove(id) {
            return err(
                400,
                "Bad Request: query is too old and response timeout expired or query ID is invalid",
            );
        }
        ok(json!(true))
    }

    pub fn edit_message_reply_markup(&self, body: &Value) -> Answer {
        let chat = match &body["chat_id"] {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            _ => return err(400, "Bad Request: chat_id is empty"),
        };
        let Some(mid) = body["message_id"].as_i64() else {
            return err(400, "Bad Request: message identifier is not specified");
        };
        let markup = body.get("reply_markup").cloned().unwrap_or(Value::Null);
        if let Err(e) = check_markup(&markup) {
            return err(400, &e);
        }
        let mut sent = self.sent.lock().unwrap();
        let Some(old) = sent.get_mut(&(chat.clone(), mid)) else {
            return err(400, "Bad Request: message to edit not found");
        };
        if *old == markup {
            return err(
                400,
                "Bad Request: message is not modified: specified new message content and reply markup are exactly the same as a current content and reply markup of the message",
            );
        }
        *old = markup;
        ok(
            json!({"message_id": mid, "chat": {"id": chat.parse::<i64>().unwrap_or(0), "type": "private"}, "date": 1_795_132_800, "text": "…"}),
        )
    }

    pub fn set_webhook(&self, body: &Value) -> Answer {
        let url = body["url"].as_str().unwrap_or("");
        if url.is_empty() {
            *self.webhook.lock().unwrap() = None;
            return ok(json!(true));
        }
        let Ok(u) = reqwest::Url::parse(url) else {
            return err(
                400,
                "Bad Request: bad webhook: Failed to resolve host: Name or service not known",
            );
        };
        if u.scheme() != "https" {
            return err(
                400,
                "Bad Request: bad webhook: An HTTPS URL must be provided for webhook",
            );
        }
        if !matches!(u.port_or_known_default(), Some(443 | 80 | 88 | 8443)) {
            return err(
                400,
                "Bad Request: bad webhook: Webhook can be set up only on ports 80, 88, 443 or 8443",
            );
        }
        if let Some(s) = body.get("secret_token") {
            let s = s.as_str().unwrap_or("");
            let good = (1..=256).contains(&s.len())
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !good {
                return err(
                    400,
                    "Bad Request: secret token contains unallowed characters",
                );
            }
        }
        *self.webhook.lock().unwrap() = Some(body.clone());
        ok(json!(true))
    }

    pub fn delete_webhook(&self) -> Answer {
        *self.webhook.lock().unwrap() = None;
        ok(json!(true))
    }
}
