//! The owners' Telegram bot: owners link their chats themselves and talk to keywatch.
//!
//! - Linking: `keywatch telegram link OWNER` prints a one-time code ([`links`]); the owner
//!   sends `/start CODE` to the bot and the chat is linked to that owner. A `telegram_chat_id`
//!   in `keys.toml` still wins; a linked chat is used for owners without one
//!   ([`crate::registry::Registry::with_linked_chats`]).
//! - Commands: `/status` (the owner's rotations as of the last evaluation: share on the new
//!   key, deadline in the owner's time zone, forecast, sources still on the old key),
//!   `/snooze 2d` (a silence on the owner), `/help`. Reminders carry inline buttons
//!   Acknowledge (holds the key's notifications [`ACK_HOLD`]) and Snooze 1 day / 3 days:
//!   each creates a silence in the notification log ([`crate::notify::silence_add`]) whose
//!   reason says who pressed it in which chat, so the next reminder step waits and
//!   `keywatch silence list` shows the operators who snoozed what.
//! - Only chats linked to an owner (or named in `keys.toml`) get answers; others get a
//!   short refusal. A chat gets at most [`MAX_WRONG_CODES`] wrong codes an hour and
//!   [`MAX_COMMANDS`] commands a minute; a button works only on the chat owner's keys.
//! - Updates: long polling ([`Bot::poll`]) by the instance that evaluates rotations (the
//!   only one with rotations to show; Telegram answers 409 to a second poller, which waits
//!   and tries again), or a webhook ([`WEBHOOK_PATH`] on the daemon's HTTP server, which
//!   checks `X-Telegram-Bot-Api-Secret-Token`) set with `setWebhook` at start.
//!
//! Every call goes through the channel's teloxide-based [`Api`] (paced per chat and bot).

pub mod links;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use teloxide_core::payloads::{
    AnswerCallbackQuery, AnswerCallbackQuerySetters, EditMessageReplyMarkup, GetUpdates,
    GetUpdatesSetters, SetWebhook, SetWebhookSetters,
};
use teloxide_core::types::{
    AllowedUpdate, CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, Message, Update,
    UpdateKind, User,
};
use teloxide_core::ApiError;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::channel::telegram::{escape_html, html_message};
pub use super::channel::telegram::{Api, BotMode, CallError};
use super::log::MessageFinding;
use super::{silence_add, Matcher};
use crate::detect::{FindingKind, RotationClass, RotationStatus};
use crate::registry::{format_local, Registry, Secret};
use links::{CodeRefused, Links};

/// Where the daemon's HTTP server takes Telegram's updates in webhook mode.
pub const WEBHOOK_PATH: &str = "/telegram/webhook";
/// How long Acknowledge holds a key's notifications.
pub const ACK_HOLD: Duration = Duration::from_secs(12 * 3600);
/// The longest `/snooze`.
pub const MAX_SNOOZE: Duration = Duration::from_secs(14 * 24 * 3600);
/// Wrong codes a chat may send an hour.
pub const MAX_WRONG_CODES: usize = 5;
/// Commands (and button presses) a chat may send a minute.
pub const MAX_COMMANDS: usize = 20;
/// Long polling: how long Telegram holds a `getUpdates` without updates.
pub const POLL_SECS: u32 = 25;

const HELP: &str = "<b>keywatch</b> tells you about your API keys' rotations.\n\
/status: your rotations: share on the new key, deadline, forecast, who is still on the old key\n\
/snooze 2d: no notifications about your keys for a while (at most 14d)\n\
/help: this text\n\
Reminders have buttons: <i>Acknowledge</i> (quiet for 12 h), <i>Snooze 1 day</i>, <i>Snooze 3 days</i>.";

const NOT_LINKED: &str = "This chat is not linked to a keywatch owner. Ask your operator \
for a code (<code>keywatch telegram link OWNER</code>) and send <code>/start CODE</code> here.";

/// The key a rotation reminder is about (the first progress finding with a key), for its
/// buttons.
pub fn reminder_key(findings: &[MessageFinding]) -> Option<String> {
    findings
        .iter()
        .find(|f| {
            f.key_id != "-"
                && f.kind
                    .parse::<FindingKind>()
                    .is_ok_and(|k| k.info().rotation == RotationClass::Progress)
        })
        .map(|f| f.key_id.clone())
}

/// What a button asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Button {
    Acknowledge(String),
    Snooze { days: u32, key: String },
}

impl Button {
    /// `kw:ack:KEY`, `kw:s1:KEY`, `kw:s3:KEY`: at most 64 bytes (Telegram's limit).
    fn data(&self) -> String {
        match self {
            Button::Acknowledge(k) => format!("kw:ack:{k}"),
            Button::Snooze { days, key } => format!("kw:s{days}:{key}"),
        }
    }

    fn parse(data: &str) -> Option<Button> {
        let rest = data.strip_prefix("kw:")?;
        let (what, key) = rest.split_once(':')?;
        if key.is_empty() {
            return None;
        }
        match what {
            "ack" => Some(Button::Acknowledge(key.to_owned())),
            "s1" => Some(Button::Snooze {
                days: 1,
                key: key.to_owned(),
            }),
            "s3" => Some(Button::Snooze {
                days: 3,
                key: key.to_owned(),
            }),
            _ => None,
        }
    }
}

/// Acknowledge / Snooze 1 day / 3 days for a reminder about `key`; none when the key id is
/// too long for a button's data.
pub fn reminder_buttons(key: &str) -> Option<InlineKeyboardMarkup> {
    let b = |label: &str, button: Button| {
        let data = button.data();
        (data.len() <= 64).then(|| InlineKeyboardButton::callback(label, data))
    };
    Some(InlineKeyboardMarkup::new([
        vec![b("Acknowledge", Button::Acknowledge(key.to_owned()))?],
        vec![
            b(
                "Snooze 1 day",
                Button::Snooze {
                    days: 1,
                    key: key.to_owned(),
                },
            )?,
            b(
                "Snooze 3 days",
                Button::Snooze {
                    days: 3,
                    key: key.to_owned(),
                },
            )?,
        ],
    ]))
}

/// The bot's configuration: the telegram channel with `bot` set.
#[derive(Debug, Clone)]
pub struct BotConfig {
    pub channel: String,
    pub api_url: String,
    pub token: Secret,
    pub mode: BotMode,
}

/// The telegram channel of `config` with a bot, if any (at most one: one bot per token, and
/// a second would answer the same owners).
pub fn bot_config(config: &super::Config) -> Result<Option<BotConfig>, String> {
    let mut found = None;
    for (name, c) in &config.channels {
        if let super::config::ChannelKind::Telegram(s) = &c.kind {
            if s.bot == BotMode::Off {
                continue;
            }
            if found.is_some() {
                return Err(format!(
                    "{}: channels.{name}.bot: only one telegram channel may have a bot",
                    config.origin
                ));
            }
            let token = s
                .bot_token
                .resolve()
                .map_err(|e| format!("{}: channels.{name}.bot_token: {e}", config.origin))?;
            found = Some(BotConfig {
                channel: name.clone(),
                api_url: s.api_url.clone(),
                token,
                mode: s.bot.clone(),
            });
        }
    }
    Ok(found)
}

/// What the bot reads: the registry (with linked chats) and the last evaluation's
/// rotations, both fed by the daemon.
#[derive(Clone)]
pub struct Feeds {
    /// The registry as configured (file and lifecycle topic), without linked chats.
    pub configured: watch::Receiver<Arc<Registry>>,
    /// With the linked chats (what the notifier uses).
    pub registry: watch::Receiver<Arc<Registry>>,
    pub rotations: watch::Receiver<Arc<Vec<RotationStatus>>>,
}

#[derive(Default)]
struct Limits {
    wrong_codes: HashMap<i64, Vec<i64>>,
    commands: HashMap<i64, Vec<i64>>,
}

impl Limits {
    /// Records an event of `chat` at `now` in `map`; whether it is within `max` per
    /// `window_ms`.
    fn allow(
        map: &mut HashMap<i64, Vec<i64>>,
        chat: i64,
        now: i64,
        window_ms: i64,
        max: usize,
    ) -> bool {
        if map.len() > 10_000 {
            map.retain(|_, v| v.last().is_some_and(|t| now - t < window_ms));
        }
        let v = map.entry(chat).or_default();
        v.retain(|t| now - t < window_ms);
        if v.len() >= max {
            return false;
        }
        v.push(now);
        true
    }

    fn wrong_codes(&self, chat: i64, now: i64) -> usize {
        self.wrong_codes
            .get(&chat)
            .map_or(0, |v| v.iter().filter(|t| now - **t < 3_600_000).count())
    }
}

/// The bot: answers updates, whether they come from polling or the webhook.
pub struct Bot {
    api: Arc<Api>,
    state_dir: PathBuf,
    feeds: Feeds,
    limits: Mutex<Limits>,
    /// Told when a chat is linked, so the notifier learns of it at once.
    linked: watch::Sender<u64>,
}

fn now_ms() -> i64 {
    super::wall_ms()
}

fn who(u: Option<&User>) -> String {
    match u {
        Some(u) => match &u.username {
            Some(n) => format!("@{n}"),
            None => format!("user {}", u.id),
        },
        None => "someone".to_owned(),
    }
}

impl Bot {
    pub fn new(
        http: reqwest::Client,
        config: &BotConfig,
        state_dir: PathBuf,
        feeds: Feeds,
        linked: watch::Sender<u64>,
    ) -> Result<Bot, String> {
        Ok(Bot {
            api: Arc::new(Api::new(http, &config.api_url, &config.token)?),
            state_dir,
            feeds,
            limits: Mutex::new(Limits::default()),
            linked,
        })
    }

    /// The owner a chat belongs to: `keys.toml`'s `telegram_chat_id` first, then links.
    fn owner_of_chat(&self, chat: i64) -> Option<String> {
        let registry = self.feeds.configured.borrow().clone();
        let by_registry = registry
            .owners()
            .find(|o| o.telegram_chat_id.as_deref() == Some(&chat.to_string()))
            .map(|o| o.name.clone());
        by_registry.or_else(|| {
            Links::open(&self.state_dir)
                .and_then(|l| l.owner_of(chat))
                .unwrap_or_else(|e| {
                    tracing::error!(error = %e, "telegram links");
                    None
                })
        })
    }

    async fn reply(&self, chat: i64, html: &str) {
        let c = chat.to_string();
        if let Err(e) = self
            .api
            .call_ok(&html_message(&c, html, None), Some(&c))
            .await
        {
            tracing::warn!(chat, error = %e, "telegram bot: reply not sent");
        }
    }

    /// Handles one update (a message or a button).
    pub async fn handle(&self, update: Update) {
        tracing::debug!(update = update.id.0, "telegram bot: update");
        match update.kind {
            UpdateKind::Message(m) => self.message(m).await,
            UpdateKind::CallbackQuery(q) => self.callback(q).await,
            other => tracing::debug!(?other, "telegram bot: update ignored"),
        }
    }

    async fn message(&self, m: Message) {
        let chat = m.chat.id.0;
        let Some(text) = m.text() else { return };
        let text = text.trim();
        if !text.starts_with('/') {
            return;
        }
        let now = now_ms();
        let allowed = {
            let mut l = self.limits.lock().expect("limits");
            Limits::allow(&mut l.commands, chat, now, 60_000, MAX_COMMANDS + 1)
        };
        if !allowed {
            return;
        }
        let over = {
            let l = self.limits.lock().expect("limits");
            l.commands
                .get(&chat)
                .is_some_and(|v| v.len() > MAX_COMMANDS)
        };
        if over {
            self.reply(chat, "Too many commands: try again in a minute.")
                .await;
            return;
        }
        tracing::debug!(chat, "telegram bot: command");
        let (cmd, arg) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
        // `/status@keywatch_bot` in groups.
        let cmd = cmd.split('@').next().unwrap_or(cmd);
        let arg = arg.trim();
        let by = who(m.from.as_ref());
        let answer = match cmd {
            "/start" if arg.is_empty() => match self.owner_of_chat(chat) {
                Some(o) => format!(
                    "This chat is linked to <b>{}</b>.\n\n{HELP}",
                    escape_html(&o)
                ),
                None => NOT_LINKED.to_owned(),
            },
            "/start" => self.start(chat, arg, &by, now),
            "/help" => match self.owner_of_chat(chat) {
                Some(_) => HELP.to_owned(),
                None => NOT_LINKED.to_owned(),
            },
            "/status" => match self.owner_of_chat(chat) {
                Some(o) => self.status(&o),
                None => NOT_LINKED.to_owned(),
            },
            "/snooze" => match self.owner_of_chat(chat) {
                Some(o) => self.snooze(&o, arg, chat, &by, now),
                None => NOT_LINKED.to_owned(),
            },
            _ => match self.owner_of_chat(chat) {
                Some(_) => "Unknown command: /help lists them.".to_owned(),
                None => NOT_LINKED.to_owned(),
            },
        };
        tracing::debug!(chat, "telegram bot: replying");
        self.reply(chat, &answer).await;
        tracing::debug!(chat, "telegram bot: replied");
    }

    fn start(&self, chat: i64, code: &str, by: &str, now: i64) -> String {
        {
            let l = self.limits.lock().expect("limits");
            if l.wrong_codes(chat, now) >= MAX_WRONG_CODES {
                return "Too many wrong codes: try again in an hour.".to_owned();
            }
        }
        let result = Links::open(&self.state_dir).and_then(|mut l| l.redeem(code, chat, by, now));
        match result {
            Ok(Ok(owner)) => {
                tracing::info!(chat, owner = %owner, by, "telegram chat linked");
                self.linked.send_modify(|n| *n += 1);
                format!(
                    "Linked: this chat gets <b>{}</b>'s notifications.\n\n{HELP}",
                    escape_html(&owner)
                )
            }
            Ok(Err(refused)) => {
                let mut l = self.limits.lock().expect("limits");
                Limits::allow(&mut l.wrong_codes, chat, now, 3_600_000, usize::MAX);
                match refused {
                    CodeRefused::Expired => {
                        "This code has expired or was used already: ask your operator for a new one."
                            .to_owned()
                    }
                    CodeRefused::Unknown => {
                        "Unknown code: check it, or ask your operator for a new one.".to_owned()
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "telegram links");
                "keywatch cannot link chats right now: try again later.".to_owned()
            }
        }
    }

    /// `/status`: the owner's rotations as of the last evaluation.
    pub fn status(&self, owner: &str) -> String {
        let rotations = self.feeds.rotations.borrow().clone();
        let registry = self.feeds.registry.borrow().clone();
        let tz = registry
            .owner(owner)
            .map_or(chrono_tz::Tz::UTC, |o| o.timezone);
        let mine: Vec<&RotationStatus> = rotations.iter().filter(|r| r.owner == owner).collect();
        if mine.is_empty() {
            return format!("No rotation of <b>{}</b> in progress.", escape_html(owner));
        }
        let mut out = format!("<b>Rotations of {}</b>\n", escape_html(owner));
        for r in mine {
            let name = |n: &Option<String>, id: &str| escape_html(n.as_deref().unwrap_or(id));
            out.push_str(&format!(
                "\n<b>{}</b> → <b>{}</b>: {}\n",
                name(&r.old_name, &r.old_key),
                name(&r.new_name, &r.new_key),
                r.phase.as_str()
            ));
            match r.share_24h {
                Some(s) => out.push_str(&format!("{:.0}% on the new key (24 h)\n", s * 100.0)),
                None => out.push_str("no traffic in the last 24 h\n"),
            }
            out.push_str(&format!("deadline {}\n", format_local(r.deadline_ms, tz)));
            let f = &r.forecast;
            let forecast = match f.completion_ms {
                _ if f.stalled => "stalled".to_owned(),
                Some(t) => format!("done by {}", format_local(t, tz)),
                None => "not enough data yet".to_owned(),
            };
            out.push_str(&format!("forecast: {forecast}\n"));
            if r.lingering.is_empty() {
                out.push_str("nothing left on the old key\n");
            } else {
                out.push_str(&format!("{} still on the old key:\n", r.lingering.len()));
                for s in r.lingering.iter().take(10) {
                    out.push_str(&format!(
                        "• <code>{}</code> {} (last {})\n",
                        escape_html(&s.ip),
                        escape_html(&s.user_agent),
                        format_local(s.last_seen_ms, tz)
                    ));
                }
                if r.lingering.len() > 10 {
                    out.push_str(&format!("… and {} more\n", r.lingering.len() - 10));
                }
            }
        }
        out
    }

    fn silence(
        &self,
        matcher: &Matcher,
        hold: Duration,
        reason: &str,
        now: i64,
    ) -> Result<i64, String> {
        let mut log =
            crate::store::SqliteStore::open(&self.state_dir).map_err(|e| e.to_string())?;
        silence_add(
            &mut log,
            matcher,
            now + hold.as_millis() as i64,
            reason,
            now,
        )
        .map(|s| s.id)
        .map_err(|e| e.to_string())
    }

    fn snooze(&self, owner: &str, arg: &str, chat: i64, by: &str, now: i64) -> String {
        let hold = match humantime::parse_duration(arg) {
            Ok(d) if d >= Duration::from_secs(60) && d <= MAX_SNOOZE => d,
            _ => return "Usage: <code>/snooze 2d</code> (1m to 14d).".to_owned(),
        };
        let reason = format!("snoozed {arg} in Telegram by {by} (chat {chat})");
        match self.silence(&Matcher::Owner(owner.to_owned()), hold, &reason, now) {
            Ok(id) => {
                let tz = self
                    .feeds
                    .registry
                    .borrow()
                    .owner(owner)
                    .map_or(chrono_tz::Tz::UTC, |o| o.timezone);
                format!(
                    "Snoozed: no notifications about <b>{}</b>'s keys until {} (silence {id}).",
                    escape_html(owner),
                    format_local(now + hold.as_millis() as i64, tz)
                )
            }
            Err(e) => {
                tracing::error!(error = %e, "telegram bot: silence");
                "keywatch cannot snooze right now: try again later.".to_owned()
            }
        }
    }

    async fn callback(&self, q: CallbackQuery) {
        let now = now_ms();
        let answer = |text: String, alert: bool| {
            let api = self.api.clone();
            let id = q.id.clone();
            async move {
                let p = AnswerCallbackQuery::new(id).text(text).show_alert(alert);
                if let Err(e) = api.call_ok(&p, None).await {
                    tracing::warn!(error = %e, "telegram bot: answerCallbackQuery");
                }
            }
        };
        let Some(msg) = q.message.as_ref() else {
            return answer("This message is too old.".into(), false).await;
        };
        let chat = msg.chat().id.0;
        let allowed = {
            let mut l = self.limits.lock().expect("limits");
            Limits::allow(&mut l.commands, chat, now, 60_000, MAX_COMMANDS)
        };
        if !allowed {
            return answer("Too many requests: try again in a minute.".into(), false).await;
        }
        let Some(owner) = self.owner_of_chat(chat) else {
            return answer("This chat is not linked to a keywatch owner.".into(), true).await;
        };
        let Some(button) = q.data.as_deref().and_then(Button::parse) else {
            return answer("Unknown button.".into(), false).await;
        };
        let key = match &button {
            Button::Acknowledge(k) | Button::Snooze { key: k, .. } => k.clone(),
        };
        let registry = self.feeds.registry.borrow().clone();
        let key_owner = registry.key(&key).map(|k| k.owner.clone());
        if key_owner.as_deref() != Some(owner.as_str()) {
            return answer(format!("This key is not {owner}'s."), true).await;
        }
        let by = who(Some(&q.from));
        let (hold, what) = match button {
            Button::Acknowledge(_) => (ACK_HOLD, "acknowledged".to_owned()),
            Button::Snooze { days, .. } => (
                Duration::from_secs(u64::from(days) * 24 * 3600),
                format!("snoozed {days}d"),
            ),
        };
        let reason = format!("{what} in Telegram by {by} (chat {chat})");
        match self.silence(&Matcher::Key(key.clone()), hold, &reason, now) {
            Ok(id) => {
                let tz = registry
                    .owner(&owner)
                    .map_or(chrono_tz::Tz::UTC, |o| o.timezone);
                tracing::info!(chat, key = %key, by = %by, silence = id, "{what} in Telegram");
                answer(
                    format!(
                        "{} until {} (silence {id})",
                        if what == "acknowledged" {
                            "Acknowledged: quiet"
                        } else {
                            "Snoozed"
                        },
                        format_local(now + hold.as_millis() as i64, tz)
                    ),
                    false,
                )
                .await;
                // The buttons go: the reminder is answered.
                let edit = EditMessageReplyMarkup::new(msg.chat().id, msg.id());
                if let Err(e) = self.api.call_ok(&edit, Some(&chat.to_string())).await {
                    tracing::warn!(error = %e, "telegram bot: editMessageReplyMarkup");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "telegram bot: silence");
                answer(
                    "keywatch cannot snooze right now: try again later.".into(),
                    true,
                )
                .await;
            }
        }
    }

    /// Long polling until `cancel`, while `active` (this instance evaluates rotations).
    pub async fn poll(
        self: Arc<Self>,
        active: Arc<std::sync::atomic::AtomicBool>,
        cancel: CancellationToken,
    ) {
        let mut offset: Option<i32> = None;
        let mut backoff = Duration::from_secs(1);
        loop {
            if cancel.is_cancelled() {
                // Confirms what was handled, so that the next poller does not get it again.
                if let Some(o) = offset {
                    let p = GetUpdates::new().offset(o).timeout(0).limit(1);
                    let _ = tokio::time::timeout(
                        Duration::from_secs(3),
                        self.api.call_with(&p, None, Some(Duration::from_secs(3))),
                    )
                    .await;
                }
                return;
            }
            if !active.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::select! {
                    _ = cancel.cancelled() => continue,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
            let mut p = GetUpdates::new()
                .timeout(POLL_SECS)
                .allowed_updates([AllowedUpdate::Message, AllowedUpdate::CallbackQuery]);
            if let Some(o) = offset {
                p = p.offset(o);
            }
            let http_timeout = Duration::from_secs(u64::from(POLL_SECS) + 10);
            let got = tokio::select! {
                _ = cancel.cancelled() => continue,
                r = self.api.call_with(&p, None, Some(http_timeout)) => r,
            };
            match got {
                Ok(updates) => {
                    tracing::debug!(updates = updates.len(), "telegram bot: getUpdates");
                    backoff = Duration::from_secs(1);
                    for u in updates {
                        offset = Some(i32::try_from(u.id.0).unwrap_or(i32::MAX).saturating_add(1));
                        self.handle(u).await;
                    }
                }
                Err(e) => {
                    if matches!(e.api_error(), Some(ApiError::TerminatedByOtherGetUpdates)) {
                        tracing::warn!(
                            "telegram bot: another process polls this bot token (409); \
                             only one may: waiting"
                        );
                        backoff = Duration::from_secs(5);
                    } else {
                        tracing::warn!(error = %e, "telegram bot: getUpdates failed");
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => continue,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                }
            }
        }
    }

    /// Webhook mode: sets the webhook, then answers the updates the HTTP server hands over.
    pub async fn serve_webhook(
        self: Arc<Self>,
        url: &str,
        secret: &Secret,
        mut updates: mpsc::Receiver<Update>,
        cancel: CancellationToken,
    ) {
        match reqwest::Url::parse(&format!("{}{WEBHOOK_PATH}", url.trim_end_matches('/'))) {
            Ok(u) => {
                let p = SetWebhook::new(u)
                    .secret_token(secret.expose())
                    .allowed_updates([AllowedUpdate::Message, AllowedUpdate::CallbackQuery]);
                match self.api.call_ok(&p, None).await {
                    Ok(_) => tracing::info!("telegram bot: webhook set"),
                    Err(e) => tracing::error!(error = %e, "telegram bot: setWebhook failed"),
                }
            }
            Err(e) => tracing::error!(error = %e, "telegram bot: webhook_url"),
        }
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                u = updates.recv() => match u {
                    Some(u) => self.handle(u).await,
                    None => return,
                },
            }
        }
    }
}

/// Whether a webhook request carries the secret (compared in constant time).
pub fn webhook_secret_ok(got: Option<&[u8]>, secret: &Secret) -> bool {
    let want = secret.expose().as_bytes();
    match got {
        Some(g) if g.len() == want.len() => {
            g.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buttons_round_trip_and_respect_telegrams_limit() {
        let m = reminder_buttons("key-old").unwrap();
        let datas: Vec<String> = m
            .inline_keyboard
            .iter()
            .flatten()
            .map(|b| match &b.kind {
                teloxide_core::types::InlineKeyboardButtonKind::CallbackData(d) => d.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(datas, ["kw:ack:key-old", "kw:s1:key-old", "kw:s3:key-old"]);
        assert_eq!(
            Button::parse("kw:s3:key-old"),
            Some(Button::Snooze {
                days: 3,
                key: "key-old".into()
            })
        );
        assert_eq!(Button::parse("kw:s9:k"), None);
        assert_eq!(Button::parse("kw:ack:"), None);
        assert!(reminder_buttons(&"k".repeat(60)).is_none());
    }

    #[test]
    fn reminders_are_progress_findings_with_a_key() {
        let f = |kind: &str, key: &str| MessageFinding {
            dedup_key: "d".into(),
            kind: kind.into(),
            key_id: key.into(),
            owner: None,
        };
        assert_eq!(
            reminder_key(&[f("unknown_key", "x"), f("lingering_old_key", "old")]).as_deref(),
            Some("old")
        );
        assert_eq!(reminder_key(&[f("safe_to_revoke", "old")]), None);
    }

    #[test]
    fn webhook_secret_is_compared_whole() {
        let s = crate::registry::SecretRef::Env("X".into());
        let _ = s;
        let secret = secret_for_test("abc123");
        assert!(webhook_secret_ok(Some(b"abc123"), &secret));
        assert!(!webhook_secret_ok(Some(b"abc124"), &secret));
        assert!(!webhook_secret_ok(Some(b"abc"), &secret));
        assert!(!webhook_secret_ok(None, &secret));
    }

    fn secret_for_test(s: &str) -> Secret {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, s).unwrap();
        crate::registry::SecretRef::File(p).resolve().unwrap()
    }
}

/// What [`run_feed`] keeps up to date for the bot (the other ends of [`Feeds`]).
pub struct FeedSenders {
    pub configured: watch::Sender<Arc<Registry>>,
    pub registry: watch::Sender<Arc<Registry>>,
    pub rotations: watch::Sender<Arc<Vec<RotationStatus>>>,
}

/// Sits between the pipeline and the notifier: passes every input on, gives the notifier
/// the registry with the chats owners linked (again whenever a chat is linked by the bot,
/// or unlinked from another process, read every [`LINKS_REFRESH`]), and gives the bot the
/// registry and the rotations of each evaluation (for `/status`). Ends when the pipeline
/// drops its sender, dropping the notifier's.
pub async fn run_feed(
    mut from: mpsc::Receiver<crate::notify::Input>,
    to: mpsc::Sender<crate::notify::Input>,
    mut base: Arc<Registry>,
    state_dir: PathBuf,
    out: FeedSenders,
    mut linked: watch::Receiver<u64>,
) {
    let FeedSenders {
        configured: configured_tx,
        registry: registry_tx,
        rotations: rotations_tx,
    } = out;
    use crate::notify::Input;
    let read_links = || match Links::open(&state_dir).and_then(|l| l.newest_by_owner()) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::error!(error = %e, "telegram links");
            None
        }
    };
    let mut links = read_links().unwrap_or_default();
    let mut tick = tokio::time::interval(LINKS_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let merged = |base: &Registry, links: &std::collections::BTreeMap<String, String>| {
        Arc::new(base.with_linked_chats(links))
    };
    loop {
        let changed = tokio::select! {
            input = from.recv() => {
                let Some(input) = input else { return };
                let input = match input {
                    Input::Registry(r) => {
                        base = r;
                        configured_tx.send_replace(base.clone());
                        let m = merged(&base, &links);
                        registry_tx.send_replace(m.clone());
                        Input::Registry(m)
                    }
                    Input::Evaluated { findings, rotations } => {
                        rotations_tx.send_replace(Arc::new(rotations.clone()));
                        Input::Evaluated { findings, rotations }
                    }
                    other => other,
                };
                if to.send(input).await.is_err() {
                    return;
                }
                false
            }
            r = linked.changed() => r.is_ok(),
            _ = tick.tick() => true,
        };
        if changed {
            if let Some(fresh) = read_links() {
                if fresh != links {
                    links = fresh;
                    let m = merged(&base, &links);
                    registry_tx.send_replace(m.clone());
                    if to.send(Input::Registry(m)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// How often [`run_feed`] reads the links again (the CLI unlinks from another process).
pub const LINKS_REFRESH: Duration = Duration::from_secs(2);

/// The registry with the linked chats of `state_dir`.
pub fn registry_with_links(base: &Registry, state_dir: &std::path::Path) -> Registry {
    match Links::open(state_dir).and_then(|l| l.newest_by_owner()) {
        Ok(m) => base.with_linked_chats(&m),
        Err(e) => {
            tracing::error!(error = %e, "telegram links");
            base.clone()
        }
    }
}

#[cfg(test)]
mod parse_tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn updates_as_telegram_sends_them_parse() {
        let u: Update = serde_json::from_str(
            r#"{"message":{"chat":{"first_name":"owner","id":4242,"type":"private"},"date":1795132800,"from":{"first_name":"alice","id":4242,"is_bot":false,"username":"alice"},"message_id":5001,"text":"/status"},"update_id":100001}"#,
        )
        .unwrap();
        match u.kind {
            UpdateKind::Message(m) => assert_eq!(m.text(), Some("/status")),
            other => panic!("{other:?}"),
        }
        // What `Api::call` avoids: read back from a `Value`, the kind is lost.
        let v: Value = serde_json::from_str(
            r#"{"message":{"chat":{"first_name":"owner","id":4242,"type":"private"},"date":1795132800,"from":{"first_name":"alice","id":4242,"is_bot":false,"username":"alice"},"message_id":5001,"text":"/status"},"update_id":100001}"#,
        )
        .unwrap();
        let from_value =
            serde_json::from_value::<Update>(v).map(|u| matches!(u.kind, UpdateKind::Message(_)));
        assert_ne!(from_value.ok(), Some(true));
    }
}
