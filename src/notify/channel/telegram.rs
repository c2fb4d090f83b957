//! Telegram Bot API through teloxide-core: `sendMessage` with `parse_mode=HTML` to the
//! recipient's chat, and every call the owners' bot makes (`crate::notify::bot`).
//!
//! teloxide-core gives the API its types: the payloads ([`SendMessage`], `GetUpdates`,
//! `AnswerCallbackQuery`, ...), the objects (`Update`, `Message`, `CallbackQuery`, the
//! inline keyboards), the base URL and token of its [`Bot`] (built on keywatch's reqwest
//! client, so keywatch's timeouts and no-redirect policy hold, with the API URL set for
//! tests), and its error types: an answer's description becomes a typed [`ApiError`]
//! (`ChatNotFound`, `BotBlocked`, `InvalidToken`, `TerminatedByOtherGetUpdates`, ...),
//! `parameters.retry_after` a [`RequestError::RetryAfter`] and `parameters.migrate_to_chat_id`
//! a [`RequestError::MigrateToChatId`], as teloxide itself reads them.
//!
//! Wrapped, not used as is: teloxide's `Requester::send` (its `net::request_json`) drops the
//! answer's `error_code` and sleeps 10 s by itself after any 5xx before it returns. Keywatch
//! needs the code to tell a server error (retry on its own schedule) from a refused message
//! (do not), and a 10 s stall inside an attempt would hold a delivery slot and overrun the
//! attempt's deadline. So [`Api::call`] posts teloxide's serialized payload to
//! `{api_url}/bot{token}/{Payload::NAME}` itself and reads the answer into the payload's
//! typed output or into [`CallError`] (code, teloxide error, description). For the same
//! reason teloxide's `Throttle` adaptor (which only paces requests sent through
//! `Requester`) is replaced by [`Pacer`]: at most one message a second per chat and 30 a
//! second per bot, as Telegram asks; messages wait their turn instead of being refused with
//! 429.
//!
//! The bot token is part of the URL path (`/bot<TOKEN>/sendMessage`): the URL is never
//! logged, errors are stripped of it and scrubbed of the token.
//!
//! Outcomes: `{"ok":true}` delivered; 429 (or `parameters.retry_after`) retried after the
//! wait asked for; 5xx, timeouts, connection failures and answers that are not JSON retried;
//! any other refusal (`Bad Request: chat not found`, `can't parse entities`, 401 bad token,
//! 403 bot blocked, a group migrated to a supergroup) is permanent.
//!
//! This module owns the channel whole: its settings ([`settings`]), its markup's escaping
//! ([`escape_html`]: `&`, `<`, `>`, `"`, so a user agent like `<script>` shows as text) and
//! splitting ([`split_html`]: Telegram counts at most 4096 characters, UTF-16 code units,
//! the stricter reading, per message; parts are cut at line ends where possible, never
//! inside a tag or an entity, and the tags open at a cut are closed and opened again), and
//! its sending.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use teloxide_core::payloads::{
    GetMe, SendMessage, SendMessageSetters, SendPhoto, SendPhotoSetters,
};
use teloxide_core::requests::Payload;
use teloxide_core::types::{
    ChatId, InlineKeyboardMarkup, InputFile, LinkPreviewOptions, ParseMode, Recipient, ReplyMarkup,
    Seconds,
};
use teloxide_core::{ApiError, Bot, RequestError};
use tokio::time::Instant;

use super::{answer_text, excerpt, http_error, scrub, DeliveryError, MAX_ANSWER_BYTES};
use crate::config::ConfigError;
use crate::notify::config::ChannelTable;
use crate::registry::{Secret, SecretRef};

/// The Bot API base URL.
pub const TELEGRAM_API: &str = "https://api.telegram.org";

/// The fields of a telegram channel in `routes.toml`.
pub(crate) const FIELDS: &[&str] = &[
    "api_url",
    "bot_token_env",
    "bot_token_file",
    "bot",
    "webhook_url",
    "webhook_secret_env",
    "webhook_secret_file",
];

/// How the owners' bot of a telegram channel gets its updates.
#[derive(Debug, Clone, PartialEq)]
pub enum BotMode {
    /// No bot: the channel only sends.
    Off,
    /// Long polling with `getUpdates` (the rotation evaluator of a consumer group only:
    /// Telegram answers 409 to a second poller of a token).
    Poll,
    /// Telegram posts updates to `url` (the daemon's HTTP server, path
    /// [`crate::notify::bot::WEBHOOK_PATH`]) with the secret in
    /// `X-Telegram-Bot-Api-Secret-Token`.
    Webhook { url: String, secret: SecretRef },
}

#[derive(Debug, Clone, PartialEq)]
pub struct TelegramSettings {
    pub api_url: String,
    pub bot_token: SecretRef,
    pub bot: BotMode,
}

/// Reads a telegram channel's table: the bot token is named (`bot_token_env` or
/// `bot_token_file`), the API URL defaults to Telegram's; `bot = "poll"` or `"webhook"`
/// (with `webhook_url` and `webhook_secret_env`/`_file`) turns on the owners' bot.
pub(crate) fn settings(t: &ChannelTable<'_>) -> Result<TelegramSettings, ConfigError> {
    let c = t.raw;
    let api_url = match &c.api_url {
        Some(v) => t.http_url("api_url", v)?,
        None => TELEGRAM_API.to_owned(),
    };
    let bot_token = t
        .secret("bot_token", &c.bot_token_env, &c.bot_token_file)?
        .ok_or_else(|| {
            t.err(
                "bot_token_env",
                None,
                "a telegram channel needs bot_token_env or bot_token_file",
            )
        })?;
    let bot = match c.bot.as_ref().map(|b| (b.get_ref().as_str(), b.span())) {
        None | Some(("off", _)) => BotMode::Off,
        Some(("poll", _)) => BotMode::Poll,
        Some(("webhook", span)) => {
            let url =
                match &c.webhook_url {
                    Some(v) => t.http_url("webhook_url", v)?,
                    None => return Err(t.err(
                        "webhook_url",
                        Some(span),
                        "bot = \"webhook\" needs webhook_url (the public URL Telegram posts to)",
                    )),
                };
            let secret = t
                .secret(
                    "webhook_secret",
                    &c.webhook_secret_env,
                    &c.webhook_secret_file,
                )?
                .ok_or_else(|| {
                    t.err(
                        "webhook_secret_env",
                        Some(span.clone()),
                        "bot = \"webhook\" needs webhook_secret_env or webhook_secret_file",
                    )
                })?;
            BotMode::Webhook { url, secret }
        }
        Some((other, span)) => {
            return Err(t.err(
                "bot",
                Some(span),
                format!("expected \"off\", \"poll\" or \"webhook\", found `{other}`"),
            ))
        }
    };
    Ok(TelegramSettings {
        api_url,
        bot_token,
        bot,
    })
}

/// Pacing as Telegram asks for it: one message a second per chat, 30 a second per bot.
/// Hand-written (a map and a queue of times) because teloxide's `Throttle` paces only
/// requests sent through its `Requester`, which [`Api::call`] replaces.
#[derive(Debug, Default)]
pub struct Pacer {
    state: tokio::sync::Mutex<PaceState>,
}

#[derive(Debug, Default)]
struct PaceState {
    /// When each chat may get its next message.
    chats: HashMap<String, Instant>,
    /// The send times of the last second (at most [`PER_BOT`]).
    recent: VecDeque<Instant>,
}

/// Messages a second per chat and per bot.
pub const PER_CHAT_GAP: Duration = Duration::from_secs(1);
pub const PER_BOT: usize = 30;

impl Pacer {
    /// Waits for the next slot of `chat` (and of the bot): slots are handed out in the order
    /// asked for, so a burst to one chat goes out a second apart.
    pub async fn wait(&self, chat: Option<&str>) {
        let at = self.state.lock().await.reserve(chat, Instant::now());
        tokio::time::sleep_until(at).await;
    }
}

impl PaceState {
    /// The next slot of `chat` and of the bot at or after `now`, reserved.
    fn reserve(&mut self, chat: Option<&str>, now: Instant) -> Instant {
        let mut at = now;
        if let Some(c) = chat {
            if let Some(next) = self.chats.get(c) {
                at = at.max(*next);
            }
        }
        if self.recent.len() >= PER_BOT {
            let oldest = self.recent[self.recent.len() - PER_BOT];
            at = at.max(oldest + Duration::from_secs(1));
        }
        if let Some(c) = chat {
            if self.chats.len() > 10_000 {
                self.chats.retain(|_, next| *next > now);
            }
            self.chats.insert(c.to_owned(), at + PER_CHAT_GAP);
        }
        // Slots are handed out in order, so the last PER_BOT are the latest.
        self.recent.push_back(at);
        while self.recent.len() > PER_BOT {
            self.recent.pop_front();
        }
        at
    }
}

/// A Bot API call that did not succeed.
#[derive(Debug)]
pub enum CallError {
    /// Telegram answered `ok: false`: the HTTP status or `error_code`, teloxide's reading
    /// of the answer, and the description (scrubbed of the token).
    Api {
        code: u16,
        error: RequestError,
        description: String,
    },
    /// No answer that says anything: the connection failed, timed out, or the body was
    /// not the Bot API's JSON (a proxy's error page).
    Transport(DeliveryError),
}

impl CallError {
    /// Keywatch's reading: retry or not.
    pub fn delivery(&self) -> DeliveryError {
        match self {
            CallError::Transport(e) => e.clone(),
            CallError::Api {
                code,
                error,
                description,
            } => {
                let detail = format!("telegram answered {code}: {description}");
                match error {
                    RequestError::RetryAfter(s) => DeliveryError::Transient {
                        detail,
                        retry_after: Some(s.duration()),
                    },
                    _ if *code == 429 || *code >= 500 => DeliveryError::transient(detail),
                    RequestError::MigrateToChatId(to) => DeliveryError::permanent(format!(
                        "{detail}; the group is now chat {to}: update telegram_chat_id or link the chat again"
                    )),
                    _ => DeliveryError::permanent(detail),
                }
            }
        }
    }

    /// The typed API error, when Telegram answered with one.
    pub fn api_error(&self) -> Option<&ApiError> {
        match self {
            CallError::Api {
                error: RequestError::Api(e),
                ..
            } => Some(e),
            _ => None,
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.delivery())
    }
}

/// A bot: teloxide's [`Bot`] (token, API URL, keywatch's HTTP client) and its [`Pacer`].
pub struct Api {
    bot: Bot,
    pacer: Pacer,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Api { token: <redacted> }")
    }
}

impl Api {
    pub fn new(http: reqwest::Client, api_url: &str, token: &Secret) -> Result<Api, String> {
        let url = reqwest::Url::parse(&format!("{}/", api_url.trim_end_matches('/')))
            .map_err(|e| format!("api_url: {e}"))?;
        Ok(Api {
            bot: Bot::with_client(token.expose(), http).set_api_url(url),
            pacer: Pacer::default(),
        })
    }

    /// The bot's token, to scrub from anything shown.
    fn secrets(&self) -> [&str; 1] {
        [self.bot.token()]
    }

    /// Calls `P::NAME` with `payload`, paced for `chat` when it sends to one.
    pub async fn call<P>(&self, payload: &P, chat: Option<&str>) -> Result<P::Output, CallError>
    where
        P: Payload + Serialize,
        P::Output: DeserializeOwned,
    {
        self.call_with(payload, chat, None).await
    }

    /// [`Api::call`] that only asks whether the call succeeded: a sent message is sent even
    /// when its echo has a shape this teloxide version cannot read (that must not make
    /// keywatch send it again).
    pub async fn call_ok<P>(&self, payload: &P, chat: Option<&str>) -> Result<(), CallError>
    where
        P: Payload + Serialize,
    {
        self.call_as::<P, serde::de::IgnoredAny>(payload, chat, None)
            .await
            .map(|_| ())
    }

    /// [`Api::call`] with a longer HTTP timeout (long polling).
    pub async fn call_with<P>(
        &self,
        payload: &P,
        chat: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<P::Output, CallError>
    where
        P: Payload + Serialize,
        P::Output: DeserializeOwned,
    {
        self.call_as::<P, P::Output>(payload, chat, timeout).await
    }

    async fn call_as<P, T>(
        &self,
        payload: &P,
        chat: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<T, CallError>
    where
        P: Payload + Serialize,
        T: DeserializeOwned,
    {
        let req = self.bot.client().post(self.method_url::<P>()).json(payload);
        self.exchange::<P, T>(req, chat, timeout).await
    }

    /// `{api_url}/bot{token}/{method}`: never logged (the token is in it).
    fn method_url<P: Payload>(&self) -> String {
        // teloxide names payloads in Rust's case (`SendMessage`); the Bot API documents
        // (and matches case-insensitively) `sendMessage`.
        let mut method = P::NAME.to_owned();
        if let Some(first) = method.get_mut(..1) {
            first.make_ascii_lowercase();
        }
        format!("{}bot{}/{method}", self.bot.api_url(), self.bot.token())
    }

    /// Sends `payload` as `multipart/form-data` with `file` as its `field` part (a photo
    /// upload), paced for `chat`; only asks whether it succeeded, as [`Api::call_ok`].
    ///
    /// teloxide's own multipart serializer is private to it (its `Requester` uses it, with
    /// the drawbacks in the module doc), so the form is built here from the payload's
    /// serialization: scalars as text parts, objects (`reply_markup`) as JSON text, as the
    /// Bot API reads a form; the payload's own value for `field` (teloxide writes
    /// `attach://<random id>` for an in-memory file) is replaced by the file part itself.
    pub async fn call_multipart_ok<P>(
        &self,
        payload: &P,
        field: &'static str,
        file: UploadFile,
        chat: Option<&str>,
    ) -> Result<(), CallError>
    where
        P: Payload + Serialize,
    {
        let Value::Object(fields) = serde_json::to_value(payload).map_err(|e| {
            CallError::Transport(DeliveryError::permanent(format!(
                "cannot serialize {}: {e}",
                P::NAME
            )))
        })?
        else {
            return Err(CallError::Transport(DeliveryError::permanent(format!(
                "{} does not serialize to an object",
                P::NAME
            ))));
        };
        let mut form = reqwest::multipart::Form::new();
        for (k, v) in fields {
            if k == field || v.is_null() {
                continue;
            }
            let text = match v {
                Value::String(s) => s,
                other => other.to_string(),
            };
            form = form.text(k, text);
        }
        let part = reqwest::multipart::Part::bytes(file.data)
            .file_name(file.name)
            .mime_str(file.content_type)
            .map_err(|e| CallError::Transport(DeliveryError::permanent(format!("{field}: {e}"))))?;
        form = form.part(field, part);
        let req = self
            .bot
            .client()
            .post(self.method_url::<P>())
            .multipart(form);
        self.exchange::<P, serde::de::IgnoredAny>(req, chat, None)
            .await
            .map(|_| ())
    }

    /// Sends one request and reads its answer: at most [`answer_bound`] bytes of it, then
    /// [`classify`].
    async fn exchange<P, T>(
        &self,
        mut req: reqwest::RequestBuilder,
        chat: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<T, CallError>
    where
        P: Payload,
        T: DeserializeOwned,
    {
        if chat.is_some() {
            self.pacer.wait(chat).await;
        }
        tracing::debug!(method = P::NAME, "telegram call");
        let secrets = self.secrets();
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| CallError::Transport(http_error(e, &secrets)))?;
        let status = resp.status().as_u16();
        let bound = answer_bound(P::NAME);
        let text = answer_text(resp, bound)
            .await
            .map_err(|e| CallError::Transport(http_error(e, &secrets)))?;
        classify(P::NAME, status, &text, bound, &secrets)
    }
}

/// The most of an answer to `method` that is read: [`MAX_ANSWER_BYTES`] holds any error
/// and the echo of a sent message many times over, except in the worst case of a 4096
/// character text whose every character is an entity (each about 40 bytes of JSON), hence
/// 1 MiB; `getUpdates` hands out up to 100 such messages at once.
pub(crate) fn answer_bound(method: &str) -> usize {
    if method.eq_ignore_ascii_case("GetUpdates") {
        MAX_UPDATES_ANSWER_BYTES
    } else {
        MAX_CALL_ANSWER_BYTES
    }
}

/// See [`answer_bound`].
pub(crate) const MAX_CALL_ANSWER_BYTES: usize = 16 * MAX_ANSWER_BYTES;
pub(crate) const MAX_UPDATES_ANSWER_BYTES: usize = 32 << 20;

/// A file sent in a multipart call.
#[derive(Debug, Clone)]
pub struct UploadFile {
    pub name: String,
    pub content_type: &'static str,
    pub data: Vec<u8>,
}

/// Reads the Bot API's answer to `method` (HTTP `status`, body `text`, read up to `bound`
/// bytes) into its typed result or a [`CallError`]; descriptions are scrubbed of
/// `secrets`. An answer that is not the API's JSON (a proxy's error page, or one cut at
/// `bound`) is a transport error: permanent for a 4xx, else transient.
pub(crate) fn classify<T: DeserializeOwned>(
    method: &str,
    status: u16,
    text: &str,
    bound: usize,
    secrets: &[&str],
) -> Result<T, CallError> {
    let success = (200..300).contains(&status);
    let Ok(answer) = serde_json::from_str::<Value>(text) else {
        let cut = if text.len() >= bound {
            format!(" (an answer longer than {bound} bytes, not read further)")
        } else {
            String::new()
        };
        let detail = format!(
            "telegram answered {status}: {}{cut}",
            excerpt(text, secrets)
        );
        return Err(CallError::Transport(if (400..500).contains(&status) {
            DeliveryError::permanent(detail)
        } else {
            DeliveryError::transient(detail)
        }));
    };
    if answer["ok"] == true && success {
        // From the text, not from `answer`: teloxide's types (an `Update`'s kind) do not
        // all read back from a `serde_json::Value`.
        #[derive(serde::Deserialize)]
        struct Answer<T> {
            result: T,
        }
        return serde_json::from_str::<Answer<T>>(text)
            .map(|a| a.result)
            .map_err(|e| {
                CallError::Transport(DeliveryError::transient(format!(
                    "telegram's answer to {method} cannot be read: {}",
                    excerpt(&e.to_string(), secrets)
                )))
            });
    }
    let code = answer["error_code"]
        .as_u64()
        .and_then(|c| u16::try_from(c).ok())
        .unwrap_or(status);
    let raw = answer["description"].as_str().unwrap_or("").to_owned();
    let description = excerpt(&raw, secrets);
    let params = &answer["parameters"];
    let error = if let Some(s) = params["retry_after"].as_u64() {
        RequestError::RetryAfter(Seconds::from_seconds(u32::try_from(s).unwrap_or(u32::MAX)))
    } else if let Some(to) = params["migrate_to_chat_id"].as_i64() {
        RequestError::MigrateToChatId(ChatId(to))
    } else {
        // teloxide's reading, from the scrubbed description: an unknown one is kept as
        // `ApiError::Unknown`, which must not carry the token either.
        let d = scrub(&raw, secrets);
        RequestError::Api(
            serde_json::from_value::<ApiError>(Value::String(d.clone()))
                .unwrap_or(ApiError::Unknown(d)),
        )
    };
    Err(CallError::Api {
        code,
        error,
        description,
    })
}

/// A chat id as the Bot API takes it: a number, or `@channel`.
pub fn recipient(chat_id: &str) -> Recipient {
    match chat_id.parse::<i64>() {
        Ok(n) => Recipient::Id(ChatId(n)),
        Err(_) => Recipient::ChannelUsername(chat_id.to_owned()),
    }
}

/// One HTML message to `chat_id`, without link previews, with `buttons` when given.
pub fn html_message(
    chat_id: &str,
    html: &str,
    buttons: Option<InlineKeyboardMarkup>,
) -> SendMessage {
    let mut m = SendMessage::new(recipient(chat_id), html)
        .parse_mode(ParseMode::Html)
        .link_preview_options(LinkPreviewOptions {
            is_disabled: true,
            url: None,
            prefer_small_media: false,
            prefer_large_media: false,
            show_above_text: false,
        });
    if let Some(b) = buttons {
        m = m.reply_markup(ReplyMarkup::InlineKeyboard(b));
    }
    m
}

/// The channel's transport: one [`Api`] for the channel's token.
pub struct Telegram {
    api: Api,
}

impl Telegram {
    pub fn new(http: &reqwest::Client, api_url: &str, token: Secret) -> Result<Telegram, String> {
        Ok(Telegram {
            api: Api::new(http.clone(), api_url, &token)?,
        })
    }

    /// `check-config --connect`: `getMe` checks the token without sending anything; the
    /// bot's username, or why not (never with the token: [`Api`] scrubs it).
    pub async fn get_me(&self) -> Result<String, String> {
        match self.api.call(&GetMe::new(), None).await {
            Ok(me) => Ok(me
                .user
                .username
                .unwrap_or_else(|| me.user.first_name.clone())),
            Err(e) => Err(e.delivery().detail().to_owned()),
        }
    }

    /// Sends one message (at most 4096 characters of HTML) to `chat_id`, with `buttons`
    /// under it when given.
    pub async fn send(
        &self,
        chat_id: &str,
        html: &str,
        buttons: Option<InlineKeyboardMarkup>,
    ) -> Result<(), DeliveryError> {
        self.api
            .call_ok(&html_message(chat_id, html, buttons), Some(chat_id))
            .await
            .map(|_| ())
            .map_err(|e| e.delivery())
    }

    /// Sends `png` as a photo to `chat_id` with `caption` (at most [`CAPTION_LIMIT`]
    /// characters of HTML, [`split_caption`]) under it, and `buttons` when given.
    pub async fn send_photo(
        &self,
        chat_id: &str,
        png: &[u8],
        caption: &str,
        buttons: Option<InlineKeyboardMarkup>,
    ) -> Result<(), DeliveryError> {
        let mut p = SendPhoto::new(recipient(chat_id), InputFile::memory(png.to_vec()))
            .caption(caption)
            .parse_mode(ParseMode::Html);
        if let Some(b) = buttons {
            p = p.reply_markup(ReplyMarkup::InlineKeyboard(b));
        }
        let file = UploadFile {
            name: "adoption.png".to_owned(),
            content_type: "image/png",
            data: png.to_vec(),
        };
        self.api
            .call_multipart_ok(&p, "photo", file, Some(chat_id))
            .await
            .map_err(|e| e.delivery())
    }
}

/// Telegram's limit per message.
pub const TELEGRAM_LIMIT: usize = 4096;

/// Telegram's limit per photo caption ("0-1024 characters after entities parsing").
pub const CAPTION_LIMIT: usize = 1024;

/// A message that goes with a photo: the caption (at most [`CAPTION_LIMIT`] UTF-16 units of
/// HTML, tags and entities counted as written, so within Telegram's limit after parsing
/// too; cut at a line end where possible, never inside a tag or an entity, the tags open at
/// the cut closed), then the rest of `text` in messages of at most [`TELEGRAM_LIMIT`], the
/// tags open at the cut opened again. At most `max_parts` parts in all, the caption one of
/// them.
pub fn split_caption(text: &str, max_parts: usize) -> Vec<String> {
    let (caption, rest) = split_first(text, CAPTION_LIMIT);
    let mut parts = vec![caption];
    let rest = rest.trim_start_matches('\n');
    if !rest.is_empty() {
        // A rest of tags alone (a block closed right after the cut) is no message.
        parts.extend(
            split_html(rest, TELEGRAM_LIMIT, max_parts.saturating_sub(1).max(1))
                .into_iter()
                .filter(|p| !p.is_empty()),
        );
    }
    parts
}

/// The first part of [`split_html`] at `limit`, and the text it leaves (valid HTML on its
/// own: the tags open at the cut are opened again).
fn split_first(text: &str, limit: usize) -> (String, String) {
    let mut parts = split_html_raw(text, limit, Some(1));
    let rest = if parts.len() > 1 {
        parts.pop().unwrap_or_default()
    } else {
        String::new()
    };
    (parts.pop().unwrap_or_default(), rest)
}

/// `&`, `<`, `>` and `"` as entities: all Telegram's HTML mode needs.
pub fn escape_html(s: &str) -> String {
    super::escape_with(s, |c| match c {
        '&' => Some("&amp;"),
        '<' => Some("&lt;"),
        '>' => Some("&gt;"),
        '"' => Some("&quot;"),
        _ => None,
    })
}

/// Length as Telegram counts it (UTF-16 code units).
pub fn utf16_len(s: &str) -> usize {
    s.chars().map(char::len_utf16).sum()
}

/// A piece of HTML: a tag, an entity, or one character of text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HtmlTok<'a> {
    Open { name: &'a str, raw: &'a str },
    Close(&'a str),
    Text(&'a str),
}

fn tokenize_html(text: &str) -> Vec<HtmlTok<'_>> {
    let mut out = Vec::new();
    let mut i = 0;
    let b = text.as_bytes();
    while i < text.len() {
        let rest = &text[i..];
        let len = match b[i] {
            b'<' => match rest.find('>') {
                Some(end) => {
                    let raw = &rest[..=end];
                    let inner = raw[1..raw.len() - 1].trim();
                    if let Some(name) = inner.strip_prefix('/') {
                        out.push(HtmlTok::Close(name.trim()));
                    } else {
                        let name = inner
                            .split(|c: char| c.is_whitespace())
                            .next()
                            .unwrap_or("");
                        out.push(HtmlTok::Open { name, raw });
                    }
                    raw.len()
                }
                None => {
                    out.push(HtmlTok::Text(&rest[..1]));
                    1
                }
            },
            b'&' => {
                let end = rest.bytes().take(12).position(|c| c == b';');
                let n = end.map_or(1, |e| e + 1);
                out.push(HtmlTok::Text(&rest[..n]));
                n
            }
            _ => {
                let n = rest.chars().next().map_or(1, char::len_utf8);
                out.push(HtmlTok::Text(&rest[..n]));
                n
            }
        };
        i += len;
    }
    out
}

/// An open tag: its name and how it was written.
type OpenTag<'a> = (&'a str, &'a str);

fn closers(stack: &[OpenTag<'_>]) -> String {
    stack
        .iter()
        .rev()
        .map(|(name, _)| format!("</{name}>"))
        .collect()
}

fn openers(stack: &[OpenTag<'_>]) -> String {
    stack.iter().map(|(_, raw)| *raw).collect()
}

/// Splits Telegram HTML into parts of at most `limit` UTF-16 units, each valid on its own.
/// More than `max_parts` parts: the first `max_parts` are kept and the last says so.
pub fn split_html(text: &str, limit: usize, max_parts: usize) -> Vec<String> {
    super::at_most(
        |limit| split_html_raw(text, limit, None),
        limit,
        max_parts,
        |cut| format!("\n<i>{cut}</i>"),
    )
}

/// The parts of `text`; with `stop_after = Some(n)`, the first n parts and then the rest
/// of the text unsplit (its open tags opened again) as one more.
fn split_html_raw(text: &str, limit: usize, stop_after: Option<usize>) -> Vec<String> {
    let toks = tokenize_html(text);
    let mut parts = Vec::new();
    let mut stack: Vec<OpenTag<'_>> = Vec::new();
    let mut cur = String::new();
    let mut cur_len = 0usize;
    // After the last newline of the current part: the bytes to keep, the tags open there,
    // and the token to go on from.
    let mut brk: Option<(usize, Vec<OpenTag<'_>>, usize)> = None;
    // Whether the current part has text (tags alone are never a part).
    let mut content = false;
    let mut i = 0;
    while i < toks.len() {
        let t = toks[i];
        // An element with nothing in it is dropped: tags alone are never content, and
        // without this a run of empty elements never made a part break.
        if let (HtmlTok::Close(name), Some((top, raw))) = (t, stack.last()) {
            if *top == name && cur.ends_with(raw) {
                cur.truncate(cur.len() - raw.len());
                cur_len -= utf16_len(raw);
                stack.pop();
                i += 1;
                continue;
            }
        }
        let mut next = stack.clone();
        let written: std::borrow::Cow<'_, str> = match t {
            HtmlTok::Open { name, raw } => {
                next.push((name, raw));
                raw.into()
            }
            HtmlTok::Close(name) => {
                if let Some(pos) = next.iter().rposition(|(n, _)| *n == name) {
                    next.truncate(pos);
                }
                format!("</{name}>").into()
            }
            HtmlTok::Text(s) => s.into(),
        };
        let need = cur_len + utf16_len(&written) + utf16_len(&closers(&next));
        if need > limit && content {
            let mut part = match brk.take() {
                Some((keep, open, resume)) => {
                    stack = open;
                    i = resume;
                    cur[..keep].to_owned()
                }
                None => std::mem::take(&mut cur),
            };
            part.push_str(&closers(&stack));
            parts.push(part);
            cur = openers(&stack);
            cur_len = utf16_len(&cur);
            content = false;
            if stop_after == Some(parts.len()) {
                for t in &toks[i..] {
                    match *t {
                        HtmlTok::Open { raw, .. } => cur.push_str(raw),
                        HtmlTok::Close(name) => {
                            cur.push_str("</");
                            cur.push_str(name);
                            cur.push('>');
                        }
                        HtmlTok::Text(s) => cur.push_str(s),
                    }
                }
                parts.push(cur);
                return parts
                    .into_iter()
                    .map(|p| p.trim_end_matches('\n').to_owned())
                    .collect();
            }
            continue;
        }
        cur.push_str(&written);
        cur_len += utf16_len(&written);
        stack = next;
        if let HtmlTok::Text(s) = t {
            content = true;
            if s == "\n" {
                brk = Some((cur.len(), stack.clone(), i + 1));
            }
        }
        i += 1;
    }
    if content || parts.is_empty() {
        cur.push_str(&closers(&stack));
        parts.push(cur);
    }
    parts
        .into_iter()
        .map(|p| p.trim_end_matches('\n').to_owned())
        .collect()
}

/// The Bot API's HTML check, shared with the integration tests' Telegram stand-in.
#[cfg(test)]
#[allow(dead_code)] // the stand-in's lenient check is not used here
#[path = "../../../tests/it/support/standins/telegram_html.rs"]
pub(crate) mod html_check;

#[cfg(test)]
mod tests {
    use super::html_check::check_keywatch_html;
    use super::*;

    #[test]
    fn empty_elements_are_dropped_and_never_outgrow_a_part() {
        // Found by fuzzing (channel_answers): 64 empty elements made one part of 448 units.
        let text = "<b></b>".repeat(64) + "<b>x</b>";
        let parts = split_html(&text, 64, 1);
        assert_eq!(parts, ["<b>x</b>"]);
        assert_eq!(split_html(&"<i></i>".repeat(100), 64, 1), [""]);
    }

    #[test]
    fn html_splits_at_lines_and_keeps_tags_balanced() {
        let line = |i: usize| format!("<b>row {i}</b> <code>{}</code>\n", "x".repeat(50));
        let mut text = String::from("<b>header</b>\n<pre>");
        for i in 0..200 {
            text.push_str(&line(i));
        }
        text.push_str("</pre>\n<i>end</i>");
        let parts = split_html(&text, TELEGRAM_LIMIT, 10);
        assert!(parts.len() >= 3, "{}", parts.len());
        for p in &parts {
            check_keywatch_html(p).unwrap_or_else(|e| panic!("{e}: {p}"));
            assert!(utf16_len(p) <= TELEGRAM_LIMIT);
        }
        // Every row arrives once, whole.
        let joined = parts.join("\n");
        for i in 0..200 {
            assert_eq!(
                joined.matches(&format!("<b>row {i}</b>")).count(),
                1,
                "row {i}"
            );
        }
        assert!(
            parts[1].starts_with("<pre>"),
            "reopened: {}",
            &parts[1][..20]
        );
    }

    #[test]
    fn html_cuts_a_huge_line_between_entities() {
        let ua = escape_html(&"<&>\"😀".repeat(2000));
        let text = format!("<b>ua</b> <code>{ua}</code>");
        let parts = split_html(&text, TELEGRAM_LIMIT, 10);
        assert!(parts.len() > 1);
        for p in &parts {
            check_keywatch_html(p).unwrap_or_else(|e| panic!("{e}: {}", &p[..100]));
        }
        let limited = split_html(&text, TELEGRAM_LIMIT, 2);
        assert_eq!(limited.len(), 2);
        assert!(
            limited[1].ends_with("more parts not sent</i>"),
            "{}",
            &limited[1][limited[1].len() - 80..]
        );
        check_keywatch_html(&limited[1]).unwrap();
    }

    #[test]
    fn pacing_gives_a_chat_one_message_a_second_and_the_bot_thirty() {
        let t0 = Instant::now();
        let mut p = PaceState::default();
        let s = |d: Duration| d.as_millis();
        // A burst to one chat: a second apart.
        let slots: Vec<u128> = (0..3).map(|_| s(p.reserve(Some("1"), t0) - t0)).collect();
        assert_eq!(slots, [0, 1000, 2000]);
        // Other chats are not held back by it, until the bot's 30 a second are used.
        let mut p = PaceState::default();
        let slots: Vec<u128> = (0..61)
            .map(|i| s(p.reserve(Some(&i.to_string()), t0) - t0))
            .collect();
        assert!(slots[..30].iter().all(|x| *x == 0), "{slots:?}");
        assert!(slots[30..60].iter().all(|x| *x == 1000), "{slots:?}");
        assert_eq!(slots[60], 2000);
        // Calls without a chat (answers to buttons) count for the bot only.
        let mut p = PaceState::default();
        p.reserve(Some("1"), t0);
        assert_eq!(s(p.reserve(None, t0) - t0), 0);
    }

    #[test]
    fn answers_map_to_retry_or_not() {
        let api = |code: u16, error: RequestError| CallError::Api {
            code,
            error,
            description: "d".into(),
        };
        let e = api(429, RequestError::RetryAfter(Seconds::from_seconds(7))).delivery();
        assert_eq!(
            e,
            DeliveryError::Transient {
                detail: "telegram answered 429: d".into(),
                retry_after: Some(Duration::from_secs(7))
            }
        );
        assert!(api(
            502,
            RequestError::Api(ApiError::Unknown("Bad Gateway".into()))
        )
        .delivery()
        .is_transient());
        assert!(!api(400, RequestError::Api(ApiError::ChatNotFound))
            .delivery()
            .is_transient());
        let migrated = api(400, RequestError::MigrateToChatId(ChatId(-100123))).delivery();
        assert!(!migrated.is_transient());
        assert!(
            migrated.detail().contains("the group is now chat -100123"),
            "{migrated}"
        );
        // The description becomes teloxide's typed error.
        let typed: ApiError = serde_json::from_value(Value::String(
            "Forbidden: bot was blocked by the user".into(),
        ))
        .unwrap();
        assert_eq!(typed, ApiError::BotBlocked);
    }

    /// The text a Telegram HTML shows (tags out, entities as one character each).
    fn shown(html: &str) -> String {
        let mut out = String::new();
        for t in tokenize_html(html) {
            if let HtmlTok::Text(s) = t {
                out.push_str(s);
            }
        }
        out
    }

    #[test]
    fn a_caption_is_cut_within_its_limit_and_the_rest_follows_whole() {
        let mut text = String::from("<b>header</b> <code>k&lt;1&gt;</code>\n<pre>");
        for i in 0..60 {
            text.push_str(&format!("row {i} <code>{}</code>\n", "é&amp;".repeat(8)));
        }
        text.push_str("</pre>\n<i>end</i>");
        let parts = split_caption(&text, 10);
        assert!(parts.len() >= 2, "{parts:?}");
        assert!(
            utf16_len(&parts[0]) <= CAPTION_LIMIT,
            "{}",
            utf16_len(&parts[0])
        );
        for p in &parts {
            check_keywatch_html(p).unwrap_or_else(|e| panic!("{e}: {p}"));
            assert!(utf16_len(p) <= TELEGRAM_LIMIT);
        }
        // Cut at a line end inside the <pre>, which the next part opens again.
        assert!(parts[0].ends_with("</pre>"), "{}", parts[0]);
        assert!(parts[1].starts_with("<pre>row "), "{}", &parts[1][..20]);
        // Nothing lost, nothing twice.
        let joined: String = parts
            .iter()
            .map(|p| shown(p))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(joined.replace('\n', ""), shown(&text).replace('\n', ""));
        // A short message is its caption alone.
        assert_eq!(split_caption("<b>hi</b>\nthere", 5), ["<b>hi</b>\nthere"]);
        // At most max_parts parts in all (the caption and one more at least).
        let long = "line of text\n".repeat(2000);
        let limited = split_caption(&long, 3);
        assert_eq!(limited.len(), 3);
        assert!(limited[2].ends_with("more parts not sent</i>"));
        assert_eq!(split_caption(&long, 1).len(), 2);
    }

    #[test]
    fn answers_are_classified_without_the_token() {
        let token = "123456:AAE-secret-token";
        let secrets = [token];
        let bound = answer_bound("SendMessage");
        let send = |status: u16, body: &str| {
            classify::<serde::de::IgnoredAny>("SendMessage", status, body, bound, &secrets)
                .map(|_| ())
        };
        assert!(send(200, r#"{"ok":true,"result":{"message_id":1}}"#).is_ok());
        let e = send(
            400,
            &format!(r#"{{"ok":false,"error_code":400,"description":"Bad Request: chat not found /bot{token}/x"}}"#),
        )
        .unwrap_err();
        assert!(
            matches!(e.api_error(), Some(ApiError::Unknown(d)) if !d.contains(token)),
            "{e:?}"
        );
        assert!(!e.delivery().is_transient());
        assert!(!format!("{e:?}").contains(token));
        let e = send(
            400,
            r#"{"ok":false,"error_code":400,"description":"Bad Request: chat not found"}"#,
        )
        .unwrap_err();
        assert_eq!(e.api_error(), Some(&ApiError::ChatNotFound));
        let e = send(
            429,
            r#"{"ok":false,"error_code":429,"description":"Too Many Requests","parameters":{"retry_after":3}}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.delivery(),
            DeliveryError::Transient {
                detail: "telegram answered 429: Too Many Requests".into(),
                retry_after: Some(Duration::from_secs(3))
            }
        );
        // Not the API's JSON: a proxy's page is retried after a 5xx, not after a 4xx; an
        // answer cut at the bound says so.
        assert!(send(502, &format!("<html>bad gateway {token}</html>"))
            .unwrap_err()
            .delivery()
            .is_transient());
        let e = send(413, "<html>too large</html>").unwrap_err().delivery();
        assert!(!e.is_transient());
        let cut = format!(r#"{{"ok":true,"result":{{"text":"{}"#, "x".repeat(bound));
        let e = send(200, &cut).unwrap_err().delivery();
        assert!(e.is_transient());
        assert!(
            e.detail().ends_with(&format!(
                "(an answer longer than {bound} bytes, not read further)"
            )),
            "{e}"
        );
        // `ok: true` with an error status is no success.
        assert!(send(500, r#"{"ok":true,"result":true}"#).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_endless_answer_is_read_only_up_to_the_bound() {
        use super::super::endless::{endless_answer, peak_rss_kib};
        // A Bot API (or a proxy in front of it) answering 502 with 1 GiB.
        let (addr, server) = endless_answer(
            "502 Bad Gateway",
            "application/json",
            br#"{"ok":false,"description":"#,
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "123456:AAE-secret-token").unwrap();
        let token = SecretRef::File(dir.path().join("token")).resolve().unwrap();
        let before = peak_rss_kib();
        let tg = Telegram::new(&reqwest::Client::new(), &format!("http://{addr}"), token).unwrap();
        let err = tg.send("42", "<b>hi</b>", None).await.unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(
            err.detail()
                .starts_with(r#"telegram answered 502: {"ok":false,"description":xxx"#),
            "{err:?}"
        );
        assert!(
            err.detail().contains("longer than 1048576 bytes"),
            "{err:?}"
        );
        let sent = tokio::task::spawn_blocking(move || server.join().unwrap())
            .await
            .unwrap();
        println!(
            "the Bot API wrote {} KiB of its answer before keywatch hung up (bound {} KiB); \
             peak RSS {before} KiB -> {} KiB",
            sent >> 10,
            MAX_CALL_ANSWER_BYTES >> 10,
            peak_rss_kib()
        );
        assert!(sent < 256 << 20, "{sent} bytes read");
    }

    #[test]
    fn short_messages_stay_whole() {
        assert_eq!(split_html("<b>hi</b>", 4096, 5), ["<b>hi</b>"]);
    }
}
