//! Stand-ins for the services keywatch notifies through, for the notification tests and the
//! latency benchmark.
//!
//! - [`StandIn`]: one local HTTP server that answers like the Telegram Bot API
//!   (`POST /bot<TOKEN>/sendMessage`, `sendPhoto` uploads as `multipart/form-data` with a
//!   PNG and a caption of at most 1024 characters after entities parsing, and the methods of a bot that talks to its users:
//!   `getUpdates`, `answerCallbackQuery`, `editMessageReplyMarkup`, `setWebhook`,
//!   `deleteWebhook`, checked as in [`telegram_bot`]), Slack incoming webhooks (`POST /services/…`) and a
//!   generic JSON webhook (any other path), and checks requests as the real services do:
//!   Telegram refuses an unknown token (401 `Unauthorized`, 404 for a path that is no
//!   token at all), an unknown chat ("Bad Request: chat not found"), an
//!   empty or too long text, and HTML it cannot parse ("Bad Request: can't parse entities");
//!   Slack refuses an unknown webhook (404 `no_service`), a payload without text (400
//!   `invalid_payload`) and blocks past Block Kit's limits (400 `invalid_blocks`,
//!   [`check_slack_blocks`]). A [`Mode`] makes it fail on demand (429 with retry_after /
//!   Retry-After, 5xx, hanging).
//! - [`Smtp`]: a real SMTP server (Debian's python3-aiosmtpd), with STARTTLS and AUTH when
//!   asked, keeping every accepted message.
#![allow(dead_code)]

mod slack_blocks;
mod telegram_bot;
mod telegram_html;

pub use slack_blocks::check_slack_blocks;
pub use telegram_bot::BotState;
// The latency bench includes this tree too and never asks for the bot's name.
#[allow(unused_imports)]
pub use telegram_bot::BOT_USERNAME;
pub use telegram_html::{check_telegram_caption, check_telegram_html};

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// How the stand-in answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Like the real service (its checks apply).
    Ok,
    /// This status for everything (503: down).
    Status(u16),
    /// 429 with Retry-After (Slack, webhook) or `parameters.retry_after` (Telegram).
    RateLimit(u64),
    /// Takes the request and never answers (not accepted).
    Hang,
    /// Takes the request as accepted and never answers (the answer is lost).
    AcceptThenHang,
}

/// Which API a request was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Telegram,
    Slack,
    Webhook,
}

/// A request the stand-in got, and what it answered.
#[derive(Debug, Clone)]
pub struct Request {
    pub api: Api,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Value,
    pub status: u16,
    /// Whether the real service would have taken the message.
    pub accepted: bool,
    pub answer: String,
    pub at: Instant,
    /// The file parts of a `multipart/form-data` request (`sendPhoto`).
    pub files: Vec<FilePart>,
}

/// A file part of a multipart request.
#[derive(Debug, Clone)]
pub struct FilePart {
    /// The form field (`photo`).
    pub field: String,
    pub file_name: Option<String>,
    pub content_type: Option<String>,
    pub data: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// A Telegram message's `reply_markup` (JSON text in a multipart form, an object in a
    /// JSON body), Null without one.
    pub fn reply_markup(&self) -> Value {
        match &self.body["reply_markup"] {
            Value::String(j) => serde_json::from_str(j).unwrap_or(Value::Null),
            v => v.clone(),
        }
    }

    /// The message text (Telegram and Slack `text`, webhook `text`; a Telegram photo's
    /// caption).
    pub fn text(&self) -> &str {
        self.body["text"]
            .as_str()
            .or_else(|| self.body["caption"].as_str())
            .unwrap_or("")
    }
}

struct Shared {
    mode: Mutex<Mode>,
    requests: Mutex<Vec<Request>>,
    telegram_token: String,
    telegram_chats: HashSet<String>,
    slack_paths: HashSet<String>,
    next_message_id: Mutex<u64>,
    bot: BotState,
}

/// A local HTTP server for Telegram, Slack and webhooks, on its own thread and runtime (so
/// that it serves whatever the test's runtime does).
pub struct StandIn {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl StandIn {
    /// Telegram accepts `token` and the chats in `chats`; Slack the webhook paths in
    /// `slack_paths` (`/services/T0/B0/xyz`).
    pub fn start(token: &str, chats: &[&str], slack_paths: &[&str]) -> StandIn {
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Ok),
            requests: Mutex::new(Vec::new()),
            telegram_token: token.to_owned(),
            telegram_chats: chats.iter().map(|s| s.to_string()).collect(),
            slack_paths: slack_paths.iter().map(|s| s.to_string()).collect(),
            next_message_id: Mutex::new(1),
            bot: BotState::default(),
        });
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let s = shared.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let app = axum::Router::new().fallback(
                    move |uri: Uri, headers: HeaderMap, body: Bytes| {
                        let s = s.clone();
                        async move { handle(&s, uri, headers, body).await }
                    },
                );
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stop_rx.await;
                    })
                    .await
                    .unwrap();
            });
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        StandIn {
            addr,
            shared,
            stop: Some(stop_tx),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    /// The bot side of the Telegram stand-in: put updates in, see webhooks and markups.
    pub fn bot(&self) -> &BotState {
        &self.shared.bot
    }

    /// Telegram requests for `method` (`sendMessage`, `getUpdates`, ...).
    pub fn telegram_calls(&self, method: &str) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.api == Api::Telegram && r.path.ends_with(&format!("/{method}")))
            .collect()
    }

    /// Messages the Bot API took for `chat`: texts and photos, in order.
    pub fn sent_to(&self, chat: &str) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| {
                r.api == Api::Telegram
                    && (r.path.ends_with("/sendMessage") || r.path.ends_with("/sendPhoto"))
                    && r.accepted
                    && chat_of(&r.body) == chat
            })
            .collect()
    }

    /// Waits (really) until `chat` got `n` messages; panics after `timeout`.
    pub fn wait_sent_to(&self, chat: &str, n: usize, timeout: Duration) -> Vec<Request> {
        let start = Instant::now();
        loop {
            let a = self.sent_to(chat);
            if a.len() >= n {
                return a;
            }
            assert!(
                start.elapsed() < timeout,
                "{} of {n} messages to {chat} after {timeout:?}: {:?}",
                a.len(),
                self.telegram_calls("sendMessage")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn accepted(&self) -> Vec<Request> {
        self.requests().into_iter().filter(|r| r.accepted).collect()
    }

    /// Waits (really) until `n` requests were accepted; panics after `timeout`.
    pub fn wait_accepted(&self, n: usize, timeout: Duration) -> Vec<Request> {
        let start = Instant::now();
        loop {
            let a = self.accepted();
            if a.len() >= n {
                return a;
            }
            assert!(
                start.elapsed() < timeout,
                "{} of {n} messages accepted after {timeout:?}",
                a.len()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

fn form_decode(s: &str) -> Value {
    let mut out = serde_json::Map::new();
    for pair in s.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dec = |x: &str| {
            let x = x.replace('+', " ");
            let mut bytes = Vec::new();
            let b = x.as_bytes();
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'%' && i + 2 < b.len() {
                    if let Ok(n) = u8::from_str_radix(&x[i + 1..i + 3], 16) {
                        bytes.push(n);
                        i += 3;
                        continue;
                    }
                }
                bytes.push(b[i]);
                i += 1;
            }
            String::from_utf8_lossy(&bytes).into_owned()
        };
        out.insert(dec(k), Value::String(dec(v)));
    }
    Value::Object(out)
}

async fn handle(s: &Shared, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path().to_owned();
    let api = if path.starts_with("/bot") && path[1..].contains('/') {
        Api::Telegram
    } else if path.starts_with("/services/") {
        Api::Slack
    } else {
        Api::Webhook
    };
    let text = String::from_utf8_lossy(&body).into_owned();
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut files = Vec::new();
    let json: Value = if content_type.starts_with("application/x-www-form-urlencoded") {
        form_decode(&text)
    } else if content_type.starts_with("multipart/form-data") {
        match multipart_decode(content_type, &body).await {
            Ok((fields, f)) => {
                files = f;
                fields
            }
            // The real API answers an unreadable form as it does a body it cannot parse.
            Err(_) => Value::Null,
        }
    } else {
        serde_json::from_str(&text).unwrap_or(Value::Null)
    };
    let mode = *s.mode.lock().unwrap();
    let (status, answer, retry_after, accepted) = match mode {
        Mode::Hang | Mode::AcceptThenHang => {
            record(
                s,
                api,
                &path,
                &headers,
                &json,
                0,
                mode == Mode::AcceptThenHang,
                "",
                files,
            );
            std::future::pending::<()>().await;
            unreachable!()
        }
        Mode::Status(code) => match api {
            Api::Telegram => (
                code,
                json!({"ok": false, "error_code": code, "description": "Internal Server Error"})
                    .to_string(),
                None,
                false,
            ),
            Api::Slack if code == 400 => (code, "invalid_payload".to_owned(), None, false),
            Api::Slack if code == 404 => (code, "no_service".to_owned(), None, false),
            // Some servers echo what they refused; keywatch must not pass that on.
            Api::Webhook if code == 401 => (
                code,
                format!(
                    "unauthorized: {} for {path}",
                    headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                ),
                None,
                false,
            ),
            _ => (code, "service unavailable".to_owned(), None, false),
        },
        Mode::RateLimit(after) => match api {
            Api::Telegram => (
                429,
                json!({"ok": false, "error_code": 429,
                       "description": format!("Too Many Requests: retry after {after}"),
                       "parameters": {"retry_after": after}})
                .to_string(),
                None,
                false,
            ),
            _ => (429, "rate_limited".to_owned(), Some(after), false),
        },
        Mode::Ok => match api {
            Api::Telegram => telegram(s, &path, &json, &files).await,
            Api::Slack => slack(s, &path, &json),
            Api::Webhook => (200, "ok".to_owned(), None, true),
        },
    };
    record(
        s, api, &path, &headers, &json, status, accepted, &answer, files,
    );
    let mut resp = (StatusCode::from_u16(status).unwrap(), answer).into_response();
    if let Some(a) = retry_after {
        resp.headers_mut()
            .insert("retry-after", a.to_string().parse().unwrap());
    }
    if api == Api::Telegram {
        resp.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
    }
    resp
}

#[allow(clippy::too_many_arguments)]
fn record(
    s: &Shared,
    api: Api,
    path: &str,
    headers: &HeaderMap,
    body: &Value,
    status: u16,
    accepted: bool,
    answer: &str,
    files: Vec<FilePart>,
) {
    s.requests.lock().unwrap().push(Request {
        api,
        path: path.to_owned(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
            .collect(),
        body: body.clone(),
        status,
        accepted,
        answer: answer.to_owned(),
        at: Instant::now(),
        files,
    });
}

fn tg_error(code: u16, description: &str) -> (u16, String, Option<u64>, bool) {
    (
        code,
        json!({"ok": false, "error_code": code, "description": description}).to_string(),
        None,
        false,
    )
}

fn chat_of(body: &Value) -> String {
    match &body["chat_id"] {
        Value::Number(n) => n.to_string(),
        Value::String(c) => c.clone(),
        _ => String::new(),
    }
}

async fn telegram(
    s: &Shared,
    path: &str,
    body: &Value,
    files: &[FilePart],
) -> (u16, String, Option<u64>, bool) {
    let (token, method) = path["/bot".len()..]
        .split_once('/')
        .unwrap_or((&path["/bot".len()..], ""));
    if token != s.telegram_token {
        // As the real API: a token of the right shape (`<bot id>:<secret>`) that is not
        // the bot's is refused 401; anything else is not a bot path at all.
        let shaped = token.split_once(':').is_some_and(|(id, rest)| {
            !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) && !rest.is_empty()
        });
        return if shaped {
            tg_error(401, "Unauthorized")
        } else {
            tg_error(404, "Not Found")
        };
    }
    // Method names are case-insensitive.
    match method.to_ascii_lowercase().as_str() {
        "sendmessage" => send_message(s, body),
        "sendphoto" => send_photo(s, body, files),
        "getme" => s.bot.get_me(),
        "getupdates" => s.bot.get_updates(body).await,
        "answercallbackquery" => s.bot.answer_callback_query(body),
        "editmessagereplymarkup" => s.bot.edit_message_reply_markup(body),
        "setwebhook" => s.bot.set_webhook(body),
        "deletewebhook" => s.bot.delete_webhook(),
        _ => tg_error(404, "Not Found: method not found"),
    }
}

fn send_message(s: &Shared, body: &Value) -> (u16, String, Option<u64>, bool) {
    let chat = match &body["chat_id"] {
        Value::Number(n) => n.to_string(),
        Value::String(c) => c.clone(),
        _ => return tg_error(400, "Bad Request: chat_id is empty"),
    };
    let Some(text) = body["text"].as_str() else {
        return tg_error(400, "Bad Request: message text is empty");
    };
    if body["parse_mode"] == "HTML" {
        if let Err(e) = check_telegram_html(text) {
            return tg_error(400, &format!("Bad Request: {e}"));
        }
    } else if text.is_empty() {
        return tg_error(400, "Bad Request: message text is empty");
    }
    if !s.telegram_chats.contains(&chat) {
        return tg_error(400, "Bad Request: chat not found");
    }
    let markup = body.get("reply_markup").cloned().unwrap_or(Value::Null);
    if let Err(e) = telegram_bot::check_markup(&markup) {
        return tg_error(400, &e);
    }
    let mut id = s.next_message_id.lock().unwrap();
    *id += 1;
    s.bot.sent_message(&chat, *id as i64, &markup);
    (
        200,
        json!({"ok": true, "result": {"message_id": *id,
               "chat": {"id": chat.parse::<i64>().map_or(json!(chat), |n| json!(n)), "type": "private"},
               "date": 1_795_132_800, "text": "…"}})
        .to_string(),
        None,
        true,
    )
}

/// A `multipart/form-data` body as a server reads it (multer, as axum does): the text
/// fields as a JSON object of strings, and the file parts.
async fn multipart_decode(
    content_type: &str,
    body: &[u8],
) -> Result<(Value, Vec<FilePart>), multer::Error> {
    let boundary = multer::parse_boundary(content_type)?;
    let mut form = multer::Multipart::with_reader(std::io::Cursor::new(body.to_vec()), boundary);
    let mut fields = serde_json::Map::new();
    let mut files = Vec::new();
    while let Some(field) = form.next_field().await? {
        let name = field.name().unwrap_or("").to_owned();
        let file_name = field.file_name().map(str::to_owned);
        let content_type = field.content_type().map(|m| m.to_string());
        let data = field.bytes().await?.to_vec();
        if file_name.is_some() {
            files.push(FilePart {
                field: name,
                file_name,
                content_type,
                data,
            });
        } else {
            fields.insert(
                name,
                Value::String(String::from_utf8_lossy(&data).into_owned()),
            );
        }
    }
    Ok((Value::Object(fields), files))
}

/// A PNG's size from its header, as the Bot API's image processing reads it first; the
/// whole image is decoded too (a truncated or corrupt one is refused).
fn png_size(data: &[u8]) -> Result<(u32, u32), String> {
    let mut reader = png::Decoder::new(std::io::Cursor::new(data))
        .read_info()
        .map_err(|e| e.to_string())?;
    let (w, h) = (reader.info().width, reader.info().height);
    let mut buf = vec![0; reader.output_buffer_size().ok_or("too large")?];
    reader.next_frame(&mut buf).map_err(|e| e.to_string())?;
    Ok((w, h))
}

/// `sendPhoto` as the Bot API checks it: an upload is `multipart/form-data` (a JSON body
/// can only name a photo by file id or URL, which keywatch never does), `chat_id` a known
/// chat, a `photo` file part that is an image Telegram can process (here: a PNG whose
/// header and data decode, with both sides > 0 and at most 10,000 in sum, under 10 MB),
/// a caption of at most 1024 characters after entities parsing, `parse_mode` HTML as in
/// `sendMessage`, and `reply_markup` (JSON text in a form) an inline keyboard.
fn send_photo(s: &Shared, body: &Value, files: &[FilePart]) -> (u16, String, Option<u64>, bool) {
    let chat = match &body["chat_id"] {
        Value::String(c) if !c.is_empty() => c.clone(),
        Value::Number(n) => n.to_string(),
        _ => return tg_error(400, "Bad Request: chat_id is empty"),
    };
    let Some(photo) = files.iter().find(|f| f.field == "photo") else {
        return tg_error(400, "Bad Request: there is no photo in the request");
    };
    if photo.data.len() > 10 << 20 {
        return tg_error(400, "Bad Request: PHOTO_INVALID_DIMENSIONS");
    }
    match png_size(&photo.data) {
        Ok((w, h)) if w > 0 && h > 0 && w + h <= 10_000 => {}
        Ok(_) => return tg_error(400, "Bad Request: PHOTO_INVALID_DIMENSIONS"),
        Err(_) => return tg_error(400, "Bad Request: IMAGE_PROCESS_FAILED"),
    }
    let caption = body["caption"].as_str().unwrap_or("");
    let parsed_len = if body["parse_mode"] == "HTML" {
        match check_telegram_caption(caption) {
            Ok(n) => n,
            Err(e) => return tg_error(400, &format!("Bad Request: {e}")),
        }
    } else if body["parse_mode"].is_null() {
        caption.encode_utf16().count()
    } else {
        return tg_error(400, "Bad Request: unsupported parse_mode");
    };
    if parsed_len > 1024 {
        return tg_error(400, "Bad Request: message caption is too long");
    }
    if !s.telegram_chats.contains(&chat) {
        return tg_error(400, "Bad Request: chat not found");
    }
    let markup = match body.get("reply_markup") {
        None => Value::Null,
        Some(Value::String(j)) => match serde_json::from_str(j) {
            Ok(v) => v,
            Err(_) => {
                return tg_error(
                    400,
                    "Bad Request: can't parse reply keyboard markup JSON object",
                )
            }
        },
        Some(v) => v.clone(),
    };
    if let Err(e) = telegram_bot::check_markup(&markup) {
        return tg_error(400, &e);
    }
    let mut id = s.next_message_id.lock().unwrap();
    *id += 1;
    s.bot.sent_message(&chat, *id as i64, &markup);
    (
        200,
        json!({"ok": true, "result": {"message_id": *id,
               "chat": {"id": chat.parse::<i64>().map_or(json!(chat), |n| json!(n)), "type": "private"},
               "date": 1_795_132_800,
               "photo": [{"file_id": "AgAD-photo", "file_unique_id": "AQAD", "width": 320, "height": 160}],
               "caption": "…"}})
        .to_string(),
        None,
        true,
    )
}

fn slack(s: &Shared, path: &str, body: &Value) -> (u16, String, Option<u64>, bool) {
    if !s.slack_paths.contains(path) {
        return (404, "no_service".to_owned(), None, false);
    }
    if let Err(e) = check_slack_blocks(body) {
        return (400, format!("invalid_blocks: {e}"), None, false);
    }
    match body["text"].as_str() {
        Some(t) if !t.trim().is_empty() => (200, "ok".to_owned(), None, true),
        _ => (400, "invalid_payload".to_owned(), None, false),
    }
}

/// A real SMTP server (aiosmtpd) on a free port; killed when dropped.
pub struct Smtp {
    pub port: u16,
    pub out: PathBuf,
    child: Child,
}

/// The Debian python that has aiosmtpd.
pub const SMTP_PYTHON: &str = "/usr/bin/python3";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Smtp {
    /// Starts aiosmtpd on `port` writing messages to `out`; with `tls` (cert, key) STARTTLS
    /// is required, with `auth` (user, password file) AUTH is.
    pub fn start(
        port: u16,
        out: &Path,
        tls: Option<(&Path, &Path)>,
        auth: Option<(&str, &Path)>,
    ) -> Smtp {
        Smtp::start_with(port, out, tls.map(|t| ("--tls", t.0, t.1)), auth)
    }

    /// Like [`Smtp::start`] with TLS from the first byte (like port 465).
    pub fn start_implicit_tls(port: u16, out: &Path, cert: &Path, key: &Path) -> Smtp {
        Smtp::start_with(port, out, Some(("--implicit-tls", cert, key)), None)
    }

    fn start_with(
        port: u16,
        out: &Path,
        tls: Option<(&str, &Path, &Path)>,
        auth: Option<(&str, &Path)>,
    ) -> Smtp {
        let ok = Command::new(SMTP_PYTHON)
            .args(["-c", "import aiosmtpd"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "the SMTP tests need Debian's python3-aiosmtpd: apt-get install -y python3-aiosmtpd"
        );
        std::fs::create_dir_all(out).unwrap();
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/support/standins/smtp_server.py");
        let mut cmd = Command::new(SMTP_PYTHON);
        cmd.arg(script).arg(port.to_string()).arg(out);
        if let Some((flag, cert, key)) = tls {
            cmd.arg(flag).arg(cert).arg(key);
        }
        if let Some((user, pass)) = auth {
            cmd.arg("--auth").arg(user).arg(pass);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting aiosmtpd");
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "READY", "aiosmtpd did not start");
        Smtp {
            port,
            out: out.to_owned(),
            child,
        }
    }

    /// The messages accepted so far, oldest first (see smtp_server.py for the fields).
    pub fn messages(&self) -> Vec<Value> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
            .collect()
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `openssl ARGS` in `dir` (scripts/test.sh installs it), failing the test with its
/// stderr when it fails: the tests make their own CAs and certificates.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("running openssl (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for `localhost` and 127.0.0.1 signed by it (openssl):
/// returns (ca.pem, server.pem, server.key).
pub fn test_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| openssl(dir, args);
    std::fs::write(
        dir.join("ext.cnf"),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=keywatch test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}
