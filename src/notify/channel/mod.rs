//! Delivery to one target: the channels' transports, built once with their secrets, and
//! what an attempt's failure means (retry or not).
//!
//! Each channel is a module that owns it whole: its settings in `routes.toml` (its fields
//! and how they are read), its markup's escaping and splitting, and its sending:
//! [`email`], [`telegram`], [`slack`], [`webhook`], and the [`Console`]. This module holds
//! what they share (errors, scrubbing, the stored [`Address`]) and dispatches a message to
//! its channel ([`Transports`]).
//!
//! Secrets (SMTP password, bot token, webhook URLs and authorization) live only in the
//! transports. Errors are described from status codes, API descriptions and error chains
//! with URLs stripped (`reqwest::Error::without_url`), and every description goes through
//! [`scrub`] with the transport's secrets before it is logged or stored.
//!
//! A channel's answer is read with [`answer_text`]: at most [`MAX_ANSWER_BYTES`] of it, so
//! a broken or hostile endpoint answering gigabytes costs no more memory than a short error.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::config::{ChannelKind, Config};
use super::message::Rendered;
use super::NotifyError;
use crate::registry::{Secret, SecretRef};

mod console;
pub mod email;
pub mod slack;
pub mod telegram;
pub mod webhook;

pub use console::Console;

/// Why an attempt failed, and whether another can succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryError {
    /// Worth retrying: rate limited (with the wait the channel asked for), a server error, a
    /// timeout, a connection that failed.
    Transient {
        detail: String,
        retry_after: Option<Duration>,
    },
    /// Retrying cannot help: an unknown chat or webhook, a refused payload, bad credentials.
    Permanent { detail: String },
}

impl DeliveryError {
    pub fn detail(&self) -> &str {
        match self {
            DeliveryError::Transient { detail, .. } | DeliveryError::Permanent { detail } => detail,
        }
    }

    pub fn is_transient(&self) -> bool {
        matches!(self, DeliveryError::Transient { .. })
    }

    pub(crate) fn transient(detail: impl Into<String>) -> DeliveryError {
        DeliveryError::Transient {
            detail: detail.into(),
            retry_after: None,
        }
    }

    pub(crate) fn permanent(detail: impl Into<String>) -> DeliveryError {
        DeliveryError::Permanent {
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeliveryError::Transient { detail, .. } => write!(f, "{detail} (transient)"),
            DeliveryError::Permanent { detail } => write!(f, "{detail} (permanent)"),
        }
    }
}

/// Replaces every occurrence of a secret (and its URL-encoded form) by `<redacted>`.
pub fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_owned();
    for s in secrets {
        if s.len() < 4 {
            continue;
        }
        out = out.replace(s, "<redacted>");
        let encoded = s.replace(':', "%3A").replace('/', "%2F");
        if encoded != *s {
            out = out.replace(&encoded, "<redacted>");
        }
    }
    out
}

/// What to scrub for a secret URL: the URL, and its path and query, which are where the
/// secret part of a webhook URL usually is (a server may echo them).
pub(crate) fn url_secrets(url: &str) -> Vec<String> {
    let mut out = vec![url.to_owned()];
    if let Some(rest) = url.split_once("://").map(|x| x.1) {
        if let Some(i) = rest.find('/') {
            let path_query = &rest[i..];
            out.push(path_query.to_owned());
            let (path, query) = path_query.split_once('?').unwrap_or((path_query, ""));
            if path.len() > 1 {
                out.push(path.to_owned());
            }
            if !query.is_empty() {
                out.push(query.to_owned());
            }
        }
    }
    out
}

/// `s` with the characters `entity` names replaced (a markup's escaping).
pub(crate) fn escape_with(s: &str, entity: impl Fn(char) -> Option<&'static str>) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match entity(c) {
            Some(e) => out.push_str(e),
            None => out.push(c),
        }
    }
    out
}

/// A message split by `split(limit)` in at most `max_parts` parts: when there are more, the
/// text is split again with room for a marker, the first `max_parts` are kept and the last
/// says how many were not sent (`mark` puts the sentence in the channel's markup).
pub(crate) fn at_most(
    split: impl Fn(usize) -> Vec<String>,
    limit: usize,
    max_parts: usize,
    mark: impl Fn(&str) -> String,
) -> Vec<String> {
    let max_parts = max_parts.max(1);
    let parts = split(limit);
    if parts.len() <= max_parts {
        return parts;
    }
    // Room for the marker, as long as it can get (a count of up to 99,999 parts): its bytes
    // bound both its characters and its UTF-16 units.
    let marker_room = mark("… cut: 99999 more parts not sent").len();
    let parts = split(limit.saturating_sub(marker_room).max(1));
    let dropped = parts.len() - max_parts;
    let mut kept: Vec<String> = parts.into_iter().take(max_parts).collect();
    if let Some(last) = kept.last_mut() {
        let s = if dropped == 1 { "" } else { "s" };
        last.push_str(&mark(&format!("… cut: {dropped} more part{s} not sent")));
    }
    kept
}

/// An error with its causes, `a: b: c`.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        src = s.source();
    }
    out
}

/// Whether an error chain says a TLS certificate was refused (untrusted, expired, for
/// another name): retrying cannot help until someone fixes the certificate or `ca_file`.
/// rustls reports it inside an I/O or connection error, so the text is all there is.
pub(crate) fn is_certificate_error(chain: &str) -> bool {
    let c = chain.to_ascii_lowercase();
    c.contains("invalid peer certificate") || c.contains("certificate verify failed")
}

/// A reqwest failure without its URL; timeouts and connection trouble are transient, a
/// refused certificate is not.
pub(crate) fn http_error(e: reqwest::Error, secrets: &[&str]) -> DeliveryError {
    let builder = e.is_builder();
    let timeout = e.is_timeout();
    let detail = scrub(&chain(&e.without_url()), secrets);
    let detail = if timeout && !detail.contains("timed out") {
        format!("{detail} (timed out)")
    } else {
        detail
    };
    if builder || is_certificate_error(&detail) {
        DeliveryError::permanent(detail)
    } else {
        DeliveryError::transient(detail)
    }
}

/// `Retry-After` in seconds or as an HTTP date.
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(s) = v.parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    let t = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let ms = t.timestamp_millis() - chrono::Utc::now().timestamp_millis();
    Some(Duration::from_millis(ms.max(0) as u64))
}

/// Bytes of a channel's answer read at most: every API error keywatch reads fits many
/// times over (the excerpt kept is 200 characters).
pub(crate) const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The body of `resp` as text (invalid UTF-8 replaced), cut at `max` bytes: the rest is
/// never read (the connection is dropped with the response), so memory stays bounded
/// whatever the channel sends.
pub(crate) async fn answer_text(
    mut resp: reqwest::Response,
    max: usize,
) -> Result<String, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = max - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= max {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// A short, secret-free excerpt of a response body.
pub(crate) fn excerpt(body: &str, secrets: &[&str]) -> String {
    // Secrets out first, then the cut: cutting first could leave the head of a secret that
    // straddles the cut, and scrubbing after the cut could make the excerpt longer (found by
    // fuzzing channel_answers).
    let one: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    scrub(one.trim(), secrets).chars().take(200).collect()
}

/// How a message reaches its target, stored with the message (no secret in it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Address {
    Console,
    Email {
        to: Vec<String>,
    },
    Telegram {
        chat_id: String,
    },
    /// The recipient's Slack webhook, by the name of its variable or file.
    Slack {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        env: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file: Option<PathBuf>,
    },
    /// The channel's URL.
    Webhook,
}

impl Address {
    pub(crate) fn slack(r: &SecretRef) -> Address {
        match r {
            SecretRef::Env(e) => Address::Slack {
                env: Some(e.clone()),
                file: None,
            },
            SecretRef::File(p) => Address::Slack {
                env: None,
                file: Some(p.clone()),
            },
        }
    }

    /// Where a message goes, for the dry run's output: no secret is in an address (a Slack
    /// webhook is named by its variable or file, a webhook URL not at all).
    fn describe(&self) -> String {
        match self {
            Address::Console => "the console".into(),
            Address::Email { to } => to.join(", "),
            Address::Telegram { chat_id } => format!("Telegram chat {chat_id}"),
            Address::Slack { env: Some(e), .. } => format!("the Slack webhook in ${e}"),
            Address::Slack { file: Some(f), .. } => {
                format!("the Slack webhook in {}", f.display())
            }
            Address::Slack { .. } => "a Slack webhook".into(),
            Address::Webhook => "the channel's webhook".into(),
        }
    }

    fn slack_ref(&self) -> Option<SecretRef> {
        match self {
            Address::Slack { env: Some(e), .. } => Some(SecretRef::Env(e.clone())),
            Address::Slack { file: Some(f), .. } => Some(SecretRef::File(f.clone())),
            _ => None,
        }
    }
}

enum Transport {
    Console,
    Email(Box<email::Mailer>),
    /// With whether the channel's bot answers (buttons only then).
    Telegram(telegram::Telegram, bool),
    Slack,
    Webhook(webhook::Webhook),
}

/// Every configured channel, ready to send.
pub(crate) struct Transports {
    http: reqwest::Client,
    /// Longest an attempt at one part may take, whatever the client library does (lettre's
    /// async transport times out connecting only, not a server that stops answering).
    deadline: Duration,
    channels: BTreeMap<String, Transport>,
    console: Console,
    /// `run --dry-run`: every message is rendered to the console instead of sent.
    dry_run: bool,
}

impl Transports {
    /// Builds the transports of `config` (only `only` when given), reading their secrets.
    pub(crate) fn build(
        config: &Config,
        only: Option<&str>,
        console: Console,
    ) -> Result<Transports, NotifyError> {
        let http = reqwest::Client::builder()
            .timeout(config.retry.timeout)
            .connect_timeout(config.retry.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("keywatch/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| NotifyError::Channel(format!("cannot build the HTTP client: {e}")))?;
        let mut channels = BTreeMap::new();
        for (name, c) in &config.channels {
            if only.is_some_and(|o| o != name) {
                continue;
            }
            let secret = |field: &str, r: &SecretRef| -> Result<Secret, NotifyError> {
                r.resolve().map_err(|e| {
                    NotifyError::Channel(format!("{}: channels.{name}.{field}: {e}", config.origin))
                })
            };
            let t = match &c.kind {
                ChannelKind::Console => Transport::Console,
                ChannelKind::Slack => Transport::Slack,
                ChannelKind::Email(s) => {
                    let password = match &s.password {
                        Some(p) => Some(secret("password", p)?),
                        None => None,
                    };
                    let mailer =
                        email::Mailer::new(s, password, config.retry.timeout).map_err(|e| {
                            NotifyError::Channel(format!("{}: channels.{name}: {e}", config.origin))
                        })?;
                    Transport::Email(Box::new(mailer))
                }
                ChannelKind::Telegram(s) => Transport::Telegram(
                    telegram::Telegram::new(&http, &s.api_url, secret("bot_token", &s.bot_token)?)
                        .map_err(|e| {
                            NotifyError::Channel(format!("{}: channels.{name}.{e}", config.origin))
                        })?,
                    s.bot != telegram::BotMode::Off,
                ),
                ChannelKind::Webhook(s) => {
                    let url = match &s.url {
                        webhook::UrlRef::Plain(u) => webhook::Url::Plain(u.clone()),
                        webhook::UrlRef::Secret(r) => webhook::Url::Secret(secret("url", r)?),
                    };
                    let auth = match &s.authorization {
                        Some(r) => Some(secret("authorization", r)?),
                        None => None,
                    };
                    let signing = match &s.signing_secret {
                        Some(r) => Some(secret("signing_secret", r)?),
                        None => None,
                    };
                    Transport::Webhook(webhook::Webhook::new(url, auth).signed_with(signing))
                }
            };
            channels.insert(name.clone(), t);
        }
        Ok(Transports {
            http,
            deadline: config.retry.timeout * 3,
            channels,
            console,
            dry_run: false,
        })
    }

    /// Renders every message to the console, with its channel and target, instead of
    /// sending it (`run --dry-run`; see `notify::dry_run`). The transports are still built,
    /// so a missing secret fails the dry run like the real one.
    pub(crate) fn dry_run(mut self) -> Transports {
        self.dry_run = true;
        self
    }

    /// `check-config --connect` for channel `name`: an email channel connects to its server
    /// (TLS and AUTH as configured, nothing sent), a Telegram channel checks its token with
    /// `getMe`. `None` for the other types (reaching them would send). The answer is what
    /// was reached, or why not, without secrets.
    pub(crate) async fn reach(&self, name: &str) -> Option<Result<String, String>> {
        let timed_out = || format!("no answer within {} s", self.deadline.as_secs());
        match self.channels.get(name)? {
            Transport::Email(m) => Some(
                tokio::time::timeout(self.deadline, m.test_connection())
                    .await
                    .unwrap_or_else(|_| Err(timed_out()))
                    .map(|()| "connected, TLS and login as configured".to_owned()),
            ),
            Transport::Telegram(t, _) => Some(
                tokio::time::timeout(self.deadline, t.get_me())
                    .await
                    .unwrap_or_else(|_| Err(timed_out()))
                    .map(|user| format!("token valid: bot @{user}")),
            ),
            _ => None,
        }
    }

    async fn guarded(
        &self,
        f: impl std::future::Future<Output = Result<(), DeliveryError>>,
    ) -> Result<(), DeliveryError> {
        tokio::time::timeout(self.deadline, f)
            .await
            .unwrap_or_else(|_| {
                Err(DeliveryError::transient(format!(
                    "no answer within {} s",
                    self.deadline.as_secs()
                )))
            })
    }

    /// Sends the parts of `rendered` from `parts_done` on; returns how many parts are done
    /// and the outcome. `reminder_key`: the key a rotation reminder is about, for the
    /// Acknowledge and Snooze buttons of a Telegram channel with a bot.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn send(
        &self,
        channel: &str,
        id: &str,
        recipient: &str,
        address: &Address,
        rendered: &Rendered,
        parts_done: u32,
        reminder_key: Option<&str>,
    ) -> (u32, Result<(), DeliveryError>) {
        if self.dry_run {
            self.console.write(&format!(
                "--- keywatch (dry run, not sent) → {recipient} via {channel} to {} ---\n{}\n\n{}\n",
                address.describe(),
                rendered.subject,
                rendered.text
            ));
            return (rendered.parts.len().max(1) as u32, Ok(()));
        }
        let transport = match self.channels.get(channel) {
            Some(t) => t,
            None if *address == Address::Console => &Transport::Console,
            None => {
                return (
                    parts_done,
                    Err(DeliveryError::permanent(format!(
                        "channel `{channel}` is no longer configured"
                    ))),
                )
            }
        };
        match (transport, address) {
            (_, Address::Console) | (Transport::Console, _) => {
                self.console.write(&format!(
                    "--- keywatch → {recipient} ---\n{}\n\n{}\n",
                    rendered.subject, rendered.text
                ));
                (1, Ok(()))
            }
            (Transport::Email(m), Address::Email { to }) => {
                let r = self.guarded(m.send(id, to, rendered)).await;
                (u32::from(r.is_ok()), r)
            }
            (Transport::Telegram(t, bot), Address::Telegram { chat_id }) => {
                let mut done = parts_done;
                let last = rendered.parts.len().saturating_sub(1);
                for (i, part) in rendered.parts.iter().enumerate().skip(parts_done as usize) {
                    let buttons = reminder_key
                        .filter(|_| *bot && i == last)
                        .and_then(crate::notify::bot::reminder_buttons);
                    // A message with a picture (the adoption chart) sends it first, with
                    // the first part as its caption (`render`: `telegram::split_caption`).
                    let photo = rendered.images.first().filter(|_| i == 0);
                    let sent = match photo {
                        Some(img) => {
                            self.guarded(t.send_photo(chat_id, &img.data, part, buttons))
                                .await
                        }
                        None => self.guarded(t.send(chat_id, part, buttons)).await,
                    };
                    if let Err(e) = sent {
                        return (done, Err(e));
                    }
                    done += 1;
                }
                (done, Ok(()))
            }
            (Transport::Slack, a @ Address::Slack { .. }) => {
                let url = match a.slack_ref().map(|r| r.resolve()) {
                    Some(Ok(u)) => u,
                    Some(Err(e)) => {
                        return (
                            parts_done,
                            Err(DeliveryError::permanent(format!(
                                "the Slack webhook of {recipient}: {e}"
                            ))),
                        )
                    }
                    None => {
                        return (
                            parts_done,
                            Err(DeliveryError::permanent("no Slack webhook")),
                        )
                    }
                };
                let mut done = parts_done;
                for (part, i) in rendered.parts.iter().zip(0..).skip(parts_done as usize) {
                    let blocks = rendered.blocks.get(i);
                    if let Err(e) = self
                        .guarded(slack::send(&self.http, &url, part, blocks))
                        .await
                    {
                        return (done, Err(e));
                    }
                    done += 1;
                }
                (done, Ok(()))
            }
            (Transport::Webhook(w), Address::Webhook) => {
                let r = self.guarded(w.send(&self.http, id, &rendered.body)).await;
                (u32::from(r.is_ok()), r)
            }
            _ => (
                parts_done,
                Err(DeliveryError::permanent(format!(
                    "channel `{channel}` cannot send to this address"
                ))),
            ),
        }
    }
}

/// Entry points for the fuzz targets (fuzz/): the parsers of channel answers and the
/// channels' markup, which are not public otherwise. Not an API.
#[doc(hidden)]
pub mod fuzz {
    use std::time::Duration;

    pub use super::DeliveryError;

    /// A webhook answer (status, `Retry-After` header, body) as the channel classifies it;
    /// the detail is scrubbed of `secrets`.
    pub fn webhook_answer(
        status: u16,
        retry_after: &[u8],
        body: &str,
        secrets: &[&str],
    ) -> Result<(), DeliveryError> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Ok(v) = reqwest::header::HeaderValue::from_bytes(retry_after) {
            headers.insert(reqwest::header::RETRY_AFTER, v);
        }
        let status = reqwest::StatusCode::from_u16(status).unwrap_or(reqwest::StatusCode::OK);
        super::webhook::classify(status, super::retry_after(&headers), body, secrets)
    }

    /// A Slack webhook's answer as the channel classifies it.
    pub fn slack_answer(
        status: u16,
        retry_after: &[u8],
        body: &str,
        secrets: &[&str],
    ) -> Result<(), DeliveryError> {
        super::slack::classify(status, self::retry_after(retry_after), body, secrets)
    }

    /// A Bot API answer to `sendMessage` (whose result keywatch ignores) as the channel
    /// classifies it; `body` is cut at the bound first, as the channel reads it. The
    /// error's detail, with teloxide's typed error for the caller to check too.
    pub fn telegram_send_answer(
        status: u16,
        body: &str,
        secrets: &[&str],
    ) -> Result<(), (DeliveryError, String)> {
        let bound = super::telegram::answer_bound("SendMessage");
        super::telegram::classify::<serde::de::IgnoredAny>(
            "SendMessage",
            status,
            body,
            bound,
            secrets,
        )
        .map(|_| ())
        .map_err(|e| (e.delivery(), format!("{e:?}")))
    }

    /// A Bot API answer to `getUpdates`, read into teloxide's updates; how many.
    pub fn telegram_updates_answer(
        status: u16,
        body: &str,
        secrets: &[&str],
    ) -> Result<usize, (DeliveryError, String)> {
        let bound = super::telegram::answer_bound("GetUpdates");
        super::telegram::classify::<Vec<teloxide_core::types::Update>>(
            "GetUpdates",
            status,
            body,
            bound,
            secrets,
        )
        .map(|u| u.len())
        .map_err(|e| (e.delivery(), format!("{e:?}")))
    }

    /// A Telegram message with a photo: caption and the parts after it.
    pub fn telegram_caption_split(text: &str, max_parts: usize) -> Vec<String> {
        super::telegram::split_caption(text, max_parts)
    }

    /// `Retry-After` as every channel reads it.
    pub fn retry_after(value: &[u8]) -> Option<Duration> {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::RETRY_AFTER,
            reqwest::header::HeaderValue::from_bytes(value).ok()?,
        );
        super::retry_after(&headers)
    }

    /// The excerpt of an answer kept in errors.
    pub fn excerpt(body: &str, secrets: &[&str]) -> String {
        super::excerpt(body, secrets)
    }

    pub fn telegram_split(text: &str, limit: usize, max_parts: usize) -> Vec<String> {
        super::telegram::split_html(text, limit, max_parts)
    }

    pub fn telegram_escape(s: &str) -> String {
        super::telegram::escape_html(s)
    }

    pub fn telegram_utf16_len(s: &str) -> usize {
        super::telegram::utf16_len(s)
    }

    pub fn slack_split(text: &str, limit: usize, max_parts: usize) -> Vec<String> {
        super::slack::split_mrkdwn(text, limit, max_parts)
    }

    pub fn slack_escape(s: &str) -> String {
        super::slack::escape_mrkdwn(s)
    }
}

/// A server that answers one request with an endless body, for the tests that the channels
/// read their answers bounded.
#[cfg(test)]
pub(crate) mod endless {
    use std::io::{Read, Write};
    use std::net::SocketAddr;
    use std::thread::JoinHandle;

    /// The test process's peak resident set (VmHWM), in KiB.
    pub(crate) fn peak_rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/self/status")
    }

    /// Answers the first request with `status` (`500 Internal Server Error`), `head` as the
    /// body's first bytes, then `x` in 64 KiB chunks up to 1 GiB or until the client hangs
    /// up; the thread returns how many bytes of body it wrote.
    pub(crate) fn endless_answer(
        status: &str,
        content_type: &str,
        head: &[u8],
    ) -> (SocketAddr, JoinHandle<u64>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let first = format!(
            "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let head = head.to_vec();
        let server = std::thread::spawn(move || -> u64 {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "the request ended early");
                req.extend_from_slice(&buf[..n]);
            }
            s.write_all(first.as_bytes()).unwrap();
            let mut sent = 0u64;
            if !head.is_empty() {
                s.write_all(format!("{:x}\r\n", head.len()).as_bytes())
                    .unwrap();
                s.write_all(&head).unwrap();
                s.write_all(b"\r\n").unwrap();
                sent += head.len() as u64;
            }
            let chunk = [b"10000\r\n".as_slice(), &[b'x'; 0x10000], b"\r\n"].concat();
            while sent < 1 << 30 {
                if s.write_all(&chunk).is_err() {
                    break;
                }
                sent += 0x10000;
            }
            sent
        });
        (addr, server)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_removes_secrets_and_their_encodings() {
        let token = "123456:ABC-secret";
        let s = format!("error for /bot{token}/sendMessage and bot123456%3AABC-secret");
        assert_eq!(
            scrub(&s, &[token]),
            "error for /bot<redacted>/sendMessage and bot<redacted>"
        );
        assert_eq!(scrub("short", &["ab"]), "short");
    }

    #[test]
    fn secret_urls_are_scrubbed_with_their_paths() {
        let url = "https://hooks.slack.com/services/T0/B0/xyz?k=v";
        let owned = url_secrets(url);
        let s: Vec<&str> = owned.iter().map(String::as_str).collect();
        assert_eq!(
            scrub("posted to https://hooks.slack.com/services/T0/B0/xyz?k=v; echo /services/T0/B0/xyz", &s),
            "posted to <redacted>; echo <redacted>"
        );
    }

    #[test]
    fn addresses_round_trip_without_secrets() {
        for a in [
            Address::Console,
            Address::Email {
                to: vec!["a@b.example".into()],
            },
            Address::Telegram {
                chat_id: "-100".into(),
            },
            Address::slack(&SecretRef::Env("SLACK_X".into())),
            Address::Webhook,
        ] {
            let j = serde_json::to_string(&a).unwrap();
            assert_eq!(serde_json::from_str::<Address>(&j).unwrap(), a, "{j}");
        }
        assert_eq!(
            serde_json::to_string(&Address::slack(&SecretRef::Env("SLACK_X".into()))).unwrap(),
            r#"{"type":"slack","env":"SLACK_X"}"#
        );
    }
}
