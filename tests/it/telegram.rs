//! The owners' Telegram bot end to end: the real binary (`keywatch run`, `keywatch telegram
//! link|chats|unlink`, `keywatch silence`) against the strict Bot API stand-in
//! (support::standins: getUpdates with offsets and long polling, 409 for a second poller,
//! sendMessage with reply markup, answerCallbackQuery, editMessageReplyMarkup, setWebhook).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::notify_e2e::{kong_line, spawn, stop, write_config, Daemon};
use crate::support::StandIn;

const TOKEN: &str = "123456:telegram-e2e-token-AbCdEf";
const CHAT: i64 = 4242;
const STRANGER: i64 = 777;
const OLD: &str = "rotating-old-key-0001";
const NEW: &str = "rotating-new-key-0002";
const HOUR: i64 = 3_600_000;

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339()
}

/// keys.toml: acme-billing (no telegram_chat_id: its chat is linked) with `OLD` rotating to
/// `NEW` when `deadline_ms` is given, else both keys simply active.
fn keys(dir: &Path, rotation: Option<(i64, i64)>) {
    let old = match rotation {
        Some((started, deadline)) => format!(
            "state = \"rotating\"\nsuccessor = \"{NEW}\"\nrotation_started = {:?}\ndeadline = {:?}\n",
            rfc3339(started),
            rfc3339(deadline)
        ),
        None => String::new(),
    };
    std::fs::write(
        dir.join("keys.toml"),
        format!(
            "[owners.acme-billing]\ntimezone = \"Europe/Berlin\"\n\
             [owners.globex]\ntimezone = \"UTC\"\n\
             [[keys]]\nid = \"{OLD}\"\nowner = \"acme-billing\"\n{old}\
             [[keys]]\nid = \"{NEW}\"\nowner = \"acme-billing\"\n"
        ),
    )
    .unwrap();
}

/// A daemon config in `dir` following a log of `OLD` and `NEW` traffic, the bot on the
/// stand-in (`bot` is the channel's bot lines), evaluating every second.
fn setup(dir: &Path, api: &StandIn, bot: &str, server: Option<u16>) -> PathBuf {
    let now = chrono::Utc::now().timestamp_millis();
    let log = dir.join("access.log");
    let mut lines = Vec::new();
    for i in 0..6 {
        let t = now - 90 * 60_000 + i * 60_000;
        lines.push(kong_line(OLD, "10.1.1.1", t));
        lines.push(kong_line(NEW, "10.3.3.3", t + 2));
    }
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    let config = write_config(dir, &log, "http://127.0.0.1:9");
    keys(dir, None);
    std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(
        dir.join("routes.toml"),
        format!(
            r#"
[retry]
timeout = "5s"
[channels.tg]
type = "telegram"
api_url = "{api}"
bot_token_file = "{token}"
{bot}
[receivers.owner]
owner = true
channels = ["tg"]
[[routes]]
kinds = ["rotation_reminder", "lingering_old_key"]
receivers = ["owner"]
group_by = ["key"]
group_wait = "1s"
"#,
            api = api.url(),
            token = dir.join("token").display(),
        ),
    )
    .unwrap();
    let server = match server {
        Some(p) => format!("[server]\nlisten = \"127.0.0.1:{p}\"\n"),
        None => "[server]\nenabled = false\n".to_owned(),
    };
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[rules]\n", "[rules]\nevaluate_every = \"1s\"\n")
        .replace("[server]\nenabled = false\n", &server);
    std::fs::write(&config, text).unwrap();
    config
}

fn keywatch(config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_keywatch"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env(
            "KW_NOTIFY_E2E_SECRET",
            "notify-e2e-fingerprint-secret-0123456789",
        )
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn link_code(config: &Path, owner: &str, ttl: &str) -> String {
    let (ok, out, err) = keywatch(config, &["telegram", "link", owner, "--ttl", ttl]);
    assert!(ok, "{err}");
    assert!(err.contains(&format!("/start {}", out.trim())), "{err}");
    out.trim().to_owned()
}

fn wait_for(what: &str, timeout: Duration, f: impl FnMut() -> bool) {
    assert!(waited(timeout, f), "{what} after {timeout:?}");
}

fn waited(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Waits for `f`, or fails with the daemon's log.
fn wait_daemon(daemon: Daemon, what: &str, timeout: Duration, f: impl FnMut() -> bool) -> Daemon {
    if waited(timeout, f) {
        return daemon;
    }
    panic!("{what} after {timeout:?}; keywatch said:\n{}", stop(daemon));
}

/// Sends `text` from `chat` and waits for the bot's next message to that chat.
fn say(api: &StandIn, chat: i64, text: &str) -> String {
    let before = api.sent_to(&chat.to_string()).len();
    api.bot().push_message(chat, "alice", text);
    if !waited(Duration::from_secs(10), || {
        api.sent_to(&chat.to_string()).len() > before
    }) {
        let polls: Vec<(u16, String)> = api
            .telegram_calls("getUpdates")
            .into_iter()
            .map(|r| (r.status, r.answer))
            .collect();
        panic!("no answer to {text} in {chat}; polls: {polls:?}");
    }
    let got = api.sent_to(&chat.to_string());
    got[before].text().to_owned()
}

fn message_id(r: &crate::support::standins::Request) -> i64 {
    let a: Value = serde_json::from_str(&r.answer).unwrap();
    a["result"]["message_id"].as_i64().unwrap()
}

#[test]
fn owners_link_their_chats_with_one_time_codes_and_one_poller_answers() {
    let api = StandIn::start(TOKEN, &[&CHAT.to_string(), &STRANGER.to_string()], &[]);
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), &api, "bot = \"poll\"", None);

    let (ok, _, err) = keywatch(&config, &["telegram", "link", "ghost"]);
    assert!(!ok);
    assert!(err.contains("unknown owner `ghost`"), "{err}");
    let good = link_code(&config, "acme-billing", "15m");
    let soon_expired = link_code(&config, "acme-billing", "1s");
    assert_ne!(good, soon_expired);

    let daemon = wait_daemon(
        spawn(&config),
        "keywatch polls",
        Duration::from_secs(20),
        || api.bot().polling(),
    );
    // Not linked yet: a refusal, no status.
    api.bot().push_message(CHAT, "alice", "/status");
    let daemon = wait_daemon(
        daemon,
        "an answer to /status",
        Duration::from_secs(10),
        || !api.sent_to(&CHAT.to_string()).is_empty(),
    );
    assert!(api.sent_to(&CHAT.to_string())[0]
        .text()
        .contains("not linked"));
    assert!(say(&api, CHAT, "/start WRONGCODE9").contains("Unknown code"));
    std::thread::sleep(Duration::from_millis(1200));
    assert!(say(&api, CHAT, &format!("/start {soon_expired}")).contains("expired"));
    let linked = say(&api, CHAT, &format!("/start {good}"));
    assert!(
        linked.contains("Linked") && linked.contains("acme-billing"),
        "{linked}"
    );
    // Used once.
    assert!(say(&api, STRANGER, &format!("/start {good}")).contains("expired"));
    assert!(say(&api, STRANGER, "/help").contains("not linked"));
    assert!(say(&api, CHAT, "/help").contains("/snooze"));
    assert!(say(&api, CHAT, "/status").contains("No rotation of <b>acme-billing</b>"));

    let (ok, chats, err) = keywatch(&config, &["telegram", "chats"]);
    assert!(ok, "{err}");
    assert!(
        chats.contains(&format!("{CHAT}\tacme-billing\tlinked")) && chats.contains("by @alice"),
        "{chats}"
    );
    assert!(!chats.contains(&STRANGER.to_string()), "{chats}");

    // A second process polling the same token gets 409 and waits; updates are answered once.
    let dir2 = tempfile::tempdir().unwrap();
    let config2 = setup(dir2.path(), &api, "bot = \"poll\"", None);
    let second = spawn(&config2);
    wait_for(
        "a 409 for the second poller",
        Duration::from_secs(30),
        || {
            api.telegram_calls("getUpdates")
                .iter()
                .any(|r| r.status == 409)
        },
    );
    let before = api.sent_to(&CHAT.to_string()).len();
    assert!(say(&api, CHAT, "/help").contains("/status"));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        api.sent_to(&CHAT.to_string()).len(),
        before + 1,
        "answered once"
    );
    let err2 = stop(second);
    assert!(
        err2.contains("another process polls this bot token"),
        "{err2}"
    );

    // Offsets confirm what was read: no update is handed out twice.
    let mut seen = std::collections::BTreeSet::new();
    for r in api.telegram_calls("getUpdates") {
        assert!(r.body["timeout"].as_u64().unwrap() > 0, "long polling");
        let a: Value = serde_json::from_str(&r.answer).unwrap();
        for u in a["result"].as_array().into_iter().flatten() {
            assert!(seen.insert(u["update_id"].as_i64().unwrap()), "{u} twice");
        }
    }
    assert!(seen.len() >= 9, "{seen:?}");

    let (ok, out, _) = keywatch(&config, &["telegram", "unlink", &CHAT.to_string()]);
    assert!(ok && out.contains("unlinked"), "{out}");
    let after = say(&api, CHAT, "/status");
    assert!(after.contains("not linked"), "{after}");
    let stderr = stop(daemon);
    assert!(!stderr.contains(TOKEN), "the token is never logged");
    let db = std::fs::read(dir.path().join("state/telegram.sqlite")).unwrap();
    let db = String::from_utf8_lossy(&db);
    assert!(!db.contains(&good), "codes are stored hashed");
}

#[test]
fn a_snoozed_reminder_holds_the_next_step_back_and_status_answers_from_the_store() {
    let api = StandIn::start(TOKEN, &[&CHAT.to_string()], &[]);
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), &api, "bot = \"poll\"", None);
    let chat = CHAT.to_string();

    // Linked while nothing rotates.
    let code = link_code(&config, "acme-billing", "15m");
    let daemon = wait_daemon(
        spawn(&config),
        "keywatch polls",
        Duration::from_secs(20),
        || api.bot().polling(),
    );
    assert!(say(&api, CHAT, &format!("/start {code}")).contains("Linked"));
    stop(daemon);

    // Started 30 h ago, due in 2 days: the "3d" step is due, to the linked chat.
    let now = chrono::Utc::now().timestamp_millis();
    keys(dir.path(), Some((now - 30 * HOUR, now + 48 * HOUR)));
    let daemon = spawn(&config);
    let sent = api.wait_sent_to(&chat, 2, Duration::from_secs(30));
    let reminder = &sent[1];
    assert!(reminder.text().contains(OLD), "{}", reminder.text());
    let markup = reminder.reply_markup();
    let buttons: Vec<(&str, &str)> = markup["inline_keyboard"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap())
        .map(|b| {
            (
                b["text"].as_str().unwrap(),
                b["callback_data"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        buttons,
        [
            ("Acknowledge", &*format!("kw:ack:{OLD}")),
            ("Snooze 1 day", &*format!("kw:s1:{OLD}")),
            ("Snooze 3 days", &*format!("kw:s3:{OLD}")),
        ]
    );
    assert_eq!(reminder.body["parse_mode"], "HTML");

    // /status from the last evaluation over the store.
    let status = say(&api, CHAT, "/status");
    for want in [
        "Rotations of acme-billing",
        "on the new key (24 h)",
        "deadline 20",
        "forecast:",
        "still on the old key",
        "10.1.1.1",
    ] {
        assert!(status.contains(want), "{want}: {status}");
    }

    // Snooze 3 days: answered, the buttons go, a silence says who.
    let mid = message_id(reminder);
    api.bot()
        .push_callback(CHAT, mid, "alice", &format!("kw:s3:{OLD}"));
    wait_for("the button answered", Duration::from_secs(10), || {
        api.telegram_calls("answerCallbackQuery")
            .iter()
            .any(|r| r.status == 200)
    });
    let answered = &api.telegram_calls("answerCallbackQuery")[0];
    assert!(
        answered.body["text"]
            .as_str()
            .unwrap()
            .starts_with("Snoozed until"),
        "{}",
        answered.body
    );
    wait_for("the buttons removed", Duration::from_secs(10), || {
        api.telegram_calls("editMessageReplyMarkup")
            .iter()
            .any(|r| r.status == 200)
    });
    assert!(api.bot().sent.lock().unwrap()[&(chat.clone(), mid)].is_null());
    // A forged button for a key of nobody in this chat does nothing.
    api.bot()
        .push_callback(CHAT, mid, "alice", "kw:s3:someone-elses-key");
    wait_for("the forged button refused", Duration::from_secs(10), || {
        api.telegram_calls("answerCallbackQuery").len() >= 2
    });
    assert!(api.telegram_calls("answerCallbackQuery")[1].body["text"]
        .as_str()
        .unwrap()
        .contains("not acme-billing's"));
    let (ok, silences, _) = keywatch(&config, &["silence", "list"]);
    assert!(ok);
    assert_eq!(silences.lines().count(), 1, "{silences}");
    assert!(
        silences.contains(&format!("key={OLD}"))
            && silences.contains(&format!("snoozed 3d in Telegram by @alice (chat {CHAT})")),
        "{silences}"
    );
    let silence_id = silences.split('\t').next().unwrap().to_owned();
    stop(daemon);

    // A day before the deadline now: the "1d" step is due, and waits for the silence.
    keys(dir.path(), Some((now - 30 * HOUR, now + 20 * HOUR)));
    let before = api.sent_to(&chat).len();
    let daemon = spawn(&config);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(api.sent_to(&chat).len(), before, "held back by the snooze");
    let (ok, _, _) = keywatch(&config, &["silence", "remove", &silence_id]);
    assert!(ok);
    let sent = api.wait_sent_to(&chat, before + 1, Duration::from_secs(20));
    assert!(
        !sent[before].reply_markup().is_null(),
        "the next step, with its buttons"
    );
    let stderr = stop(daemon);
    assert!(!stderr.contains(TOKEN));
}

#[test]
fn webhook_mode_sets_the_webhook_and_takes_updates_only_with_the_secret() {
    let api = StandIn::start(TOKEN, &[&CHAT.to_string()], &[]);
    let dir = tempfile::tempdir().unwrap();
    let port = crate::support::standins::free_port();
    std::fs::write(dir.path().join("hook-secret"), "s3cr3t_Hook-token\n").unwrap();
    let bot = format!(
        "bot = \"webhook\"\nwebhook_url = \"https://keywatch.example.test\"\nwebhook_secret_file = {:?}",
        dir.path().join("hook-secret")
    );
    let config = setup(dir.path(), &api, &bot, Some(port));
    let code = link_code(&config, "acme-billing", "15m");
    let daemon = wait_daemon(
        spawn(&config),
        "setWebhook",
        Duration::from_secs(20),
        || api.bot().webhook.lock().unwrap().is_some(),
    );
    let hook = api.bot().webhook.lock().unwrap().clone().unwrap();
    assert_eq!(
        hook["url"],
        "https://keywatch.example.test/telegram/webhook"
    );
    assert_eq!(hook["secret_token"], "s3cr3t_Hook-token");

    let update = api
        .bot()
        .push_message(CHAT, "alice", &format!("/start {code}"));
    let url = format!("http://127.0.0.1:{port}/telegram/webhook");
    let client = reqwest::blocking::Client::new();
    let post = |secret: Option<&str>| {
        let mut r = client.post(&url).json(&update);
        if let Some(s) = secret {
            r = r.header("X-Telegram-Bot-Api-Secret-Token", s);
        }
        r.send().unwrap().status().as_u16()
    };
    assert_eq!(post(None), 401);
    assert_eq!(post(Some("s3cr3t_Hook-tokeN")), 401);
    assert!(api.sent_to(&CHAT.to_string()).is_empty());
    assert_eq!(post(Some("s3cr3t_Hook-token")), 200);
    let got = api.wait_sent_to(&CHAT.to_string(), 1, Duration::from_secs(10));
    assert!(got[0].text().contains("Linked"), "{}", got[0].text());
    stop(daemon);
    assert!(
        api.telegram_calls("getUpdates").is_empty(),
        "no polling in webhook mode"
    );
}
