//! Notifications end to end inside the library: real findings from the detectors, the
//! notifier with its SQLite log, a real SMTP server (aiosmtpd) and local stand-ins for the
//! Telegram Bot API, Slack webhooks and a generic webhook (tests/support). Time is
//! simulated: `handle` and `tick` take it as a parameter, so a five-minute outage and days of
//! reminders run in milliseconds.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{free_port, Api, Mode, Smtp, StandIn};
use keywatch::aggregate::{SourceKey, SourceStats};
use keywatch::detect::{
    evaluate_rotation, Engine, Finding, FindingKind, HourRow, Policy, RotationData, RotationStatus,
};
use keywatch::event::{AuthEvent, Outcome};
use keywatch::notify::{self, Config, Console, Matcher, Notifier};
use keywatch::registry::Registry;
use keywatch::store::SqliteStore;

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;
const DAY: i64 = 24 * HOUR;

fn at(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_millis()
}

/// A user agent meant to break markup, and a very long one.
const HOSTILE_UA: &str =
    "<script>alert('x')</script> *bold* _it_ ~strike~ `tick` ```fence``` &amp; <@U0> <!here> \"q\"";

fn long_ua() -> String {
    format!("{HOSTILE_UA} {}", "A".repeat(5000))
}

const TOKEN: &str = "123456789:AAH-test-bot-token-secret";
const SLACK_PATH: &str = "/services/T000/B000/slack-secret-part";

/// keys.toml for the tests: acme-billing (Berlin) rotating key-a to key-b, a revoked key, and
/// an owner whose name is hostile markup.
fn registry_text(dir: &Path, slack_url: &str) -> String {
    std::fs::write(dir.join("slack-acme"), format!("{slack_url}\n")).unwrap();
    format!(
        r#"
[owners.acme-billing]
timezone = "Europe/Berlin"
email = ["billing@acme.example", "oncall@acme.example"]
telegram_chat_id = -1001
slack_webhook_file = "{dir}/slack-acme"

[owners."evil <b>&co</b> *x*"]
timezone = "America/New_York"
telegram_chat_id = "@evil_chat"
slack_webhook_file = "{dir}/slack-acme"

[owners.nobody]

[[keys]]
id = "key-a"
name = "billing <A> *v1*"
owner = "acme-billing"
state = "rotating"
successor = "key-b"
rotation_started = "2026-11-10T09:00"
deadline = "2026-11-24T18:00"

[[keys]]
id = "key-b"
name = "billing B"
owner = "acme-billing"
version = 2

[[keys]]
id = "key-old"
name = "old billing key"
owner = "acme-billing"
state = "revoked"
revoked = "2026-11-01T00:00:00Z"

[[keys]]
id = "key-evil"
owner = "evil <b>&co</b> *x*"
state = "revoked"

[[keys]]
id = "key-nobody"
owner = "nobody"
state = "revoked"
"#,
        dir = dir.display()
    )
}

struct Env {
    dir: tempfile::TempDir,
    registry: Arc<Registry>,
    config: Config,
    console: Arc<Mutex<Vec<String>>>,
}

impl Env {
    /// `routes` is routes.toml text; `{api}` in it becomes the stand-in's URL and `{dir}`
    /// the test directory (where `token` holds the bot token).
    fn new(stand_in: &StandIn, routes: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
        let registry = Registry::parse(
            "keys.toml",
            &registry_text(dir.path(), &format!("{}{SLACK_PATH}", stand_in.url())),
        )
        .unwrap();
        let routes = routes
            .replace("{api}", &stand_in.url())
            .replace("{dir}", &dir.path().display().to_string());
        let config = Config::parse("routes.toml", &routes).unwrap();
        Env {
            dir,
            registry: Arc::new(registry),
            config,
            console: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// A notifier on the test's log, as after a (re)start.
    fn notifier(&self) -> Notifier {
        let store = SqliteStore::open(&self.dir.path().join("state")).unwrap();
        Notifier::with_console(
            self.config.clone(),
            self.registry.clone(),
            store,
            Console::Capture(self.console.clone()),
        )
        .unwrap()
    }

    fn log(&self) -> SqliteStore {
        SqliteStore::open(&self.dir.path().join("state")).unwrap()
    }

    fn console(&self) -> Vec<String> {
        self.console.lock().unwrap().clone()
    }
}

/// The stream detector's finding for a request with `key` from `ip`.
fn key_used(registry: &Arc<Registry>, key: &str, ip: &str, ua: &str, ts: i64) -> Finding {
    let mut engine = Engine::new(registry.clone(), Policy::default());
    let mut ev = AuthEvent::new(ts, key.to_owned().into(), 200, Outcome::Ok);
    ev.source_ip = Some(ip.to_owned().into());
    ev.user_agent = Some(ua.to_owned().into());
    ev.method = Some("POST".into());
    ev.endpoint = Some("/v1/invoices".into());
    ev.gateway = Some("edge-1".into());
    let found = engine.take_pending();
    assert!(found.is_empty());
    engine.observe(&ev);
    let mut found = engine.take_pending();
    assert_eq!(found.len(), 1, "{found:?}");
    found.remove(0)
}

/// The rotation of key-a at `now`, with `sources` (ip, user agent) still on the old key, as
/// the rotation detector sees it.
fn rotation(
    registry: &Registry,
    now: i64,
    sources: &[(String, String)],
) -> (RotationStatus, Vec<Finding>) {
    let old = registry.key("key-a").unwrap();
    let new = registry.key("key-b");
    let row = |key: &str, ip: &str, ua: &str, first: i64, last: i64, n: u64| {
        (
            SourceKey {
                key_id: key.into(),
                ip: ip.into(),
                user_agent: ua.into(),
                endpoint: "/v1/invoices".into(),
                gateway: "edge-1".into(),
            },
            SourceStats {
                first_seen_ms: first,
                last_seen_ms: last,
                requests: n,
                failures: 0,
            },
        )
    };
    let start = old.rotation.unwrap().started_ms;
    let data = RotationData {
        old_key: "key-a".into(),
        new_key: "key-b".into(),
        old_sources: sources
            .iter()
            .enumerate()
            .map(|(i, (ip, ua))| row("key-a", ip, ua, start - DAY, now - 10 * MIN, 100 + i as u64))
            .collect(),
        new_sources: vec![row(
            "key-b",
            "10.9.9.9",
            "switched/1.0",
            start + HOUR,
            now - MIN,
            300,
        )],
        hourly: (1..=48)
            .map(|h| HourRow {
                hour_ms: (now / HOUR - h) * HOUR,
                old_requests: 10,
                old_failures: 0,
                new_requests: 30,
                new_failures: 0,
            })
            .collect(),
    };
    evaluate_rotation(
        now,
        old,
        new,
        registry.timezone_of("key-a"),
        &Policy::default(),
        &data,
    )
}

fn sources(n: usize, ua: &str) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("10.0.{}.{}", i / 250, i % 250 + 1),
                format!("{ua} #{i}"),
            )
        })
        .collect()
}

fn of_kind(found: &[Finding], kind: FindingKind) -> Vec<Finding> {
    found.iter().filter(|f| f.kind == kind).cloned().collect()
}

fn states(log: &SqliteStore) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for m in log.notify_messages(i64::MIN).unwrap() {
        *out.entry(m.state).or_default() += 1;
    }
    out
}

const RETRY: &str = r#"
[retry]
first = "1s"
max = "30s"
give_up_after = "1h"
timeout = "2s"
"#;

#[tokio::test]
async fn email_goes_through_a_real_smtp_server_with_starttls_and_auth() {
    let hook = StandIn::start(TOKEN, &[], &[]);
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = crate::support::test_certificates(certs.path());
    let pass = certs.path().join("smtp-pass");
    std::fs::write(&pass, "smtp-Pa55-secret\n").unwrap();
    let port = free_port();
    let smtp = Smtp::start(
        port,
        &certs.path().join("mail"),
        Some((&cert, &key)),
        Some(("keywatch", &pass)),
    );
    let routes = format!(
        r#"
{RETRY}
[channels.mail]
type = "email"
host = "127.0.0.1"
port = {port}
security = "starttls"
tls_server_name = "localhost"
ca_file = "{ca}"
username = "keywatch"
password_file = "{pass}"
from = "keywatch <keywatch@example.com>"
[receivers.owner]
owner = true
channels = ["mail"]
[[routes]]
kinds = ["revoked_key_used"]
receivers = ["owner"]
group_wait = "0s"
"#,
        ca = ca.display(),
        pass = pass.display()
    );
    let env = Env::new(&hook, &routes);
    let mut n = env.notifier();
    let t0 = at("2026-11-20T10:00:00Z");
    let f = key_used(&env.registry, "key-old", "203.0.113.7", HOSTILE_UA, t0);
    n.handle(vec![f.clone()], &[], t0).await.unwrap();

    let mails = smtp.messages();
    assert_eq!(mails.len(), 1, "{mails:?}");
    let m = &mails[0];
    assert_eq!(m["mail_from"], "keywatch@example.com");
    assert_eq!(
        m["rcpt_tos"],
        serde_json::json!(["billing@acme.example", "oncall@acme.example"])
    );
    assert_eq!(
        m["subject"],
        "[keywatch] Revoked key used: old billing key (acme-billing)"
    );
    // Text and HTML alternatives (the HTML is checked in notify_html.rs).
    assert_eq!(m["content_type"], "multipart/alternative");
    let body = m["body"].as_str().unwrap();
    // Plain text: the user agent as it was, the time in the owner's zone, what to do.
    assert!(body.contains(HOSTILE_UA), "{body}");
    assert!(body.contains("2026-11-20 11:00 CET"), "{body}");
    assert!(body.contains("the gateway ACCEPTED it"), "{body}");
    assert!(
        body.contains("What to do: someone still holds this key"),
        "{body}"
    );
    let log = env.log();
    let msgs = log.notify_messages(i64::MIN).unwrap();
    assert_eq!(msgs.len(), 1);
    assert_eq!(m["message_id"], format!("<{}@keywatch>", msgs[0].id));
    assert_eq!(msgs[0].state, "sent");
    assert_eq!(
        msgs[0].target,
        "email:billing@acme.example,oncall@acme.example"
    );

    // Raised again (the next evaluation, a replay): not sent again.
    n.handle(vec![f], &[], t0 + MIN).await.unwrap();
    n.tick(t0 + HOUR).await.unwrap();
    assert_eq!(smtp.messages().len(), 1);

    // A wrong password is refused by the server (535): permanent, no retry.
    std::fs::write(&pass, "wrong-password\n").unwrap();
    let env2 = Env::new(&hook, &routes);
    let mut n2 = env2.notifier();
    std::fs::write(&pass, "smtp-Pa55-secret\n").unwrap();
    let f = key_used(&env2.registry, "key-old", "203.0.113.8", "curl/8", t0);
    n2.handle(vec![f], &[], t0).await.unwrap();
    n2.tick(t0 + HOUR).await.unwrap();
    let log2 = env2.log();
    let failed: Vec<_> = log2
        .notify_messages(i64::MIN)
        .unwrap()
        .into_iter()
        .filter(|m| m.channel == "mail")
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(
        (failed[0].state.as_str(), failed[0].attempts),
        ("failed", 1)
    );
    let err = failed[0].last_error.as_deref().unwrap();
    assert!(
        err.contains("535") || err.to_lowercase().contains("auth"),
        "{err}"
    );
    assert_eq!(smtp.messages().len(), 1);
}

#[tokio::test]
async fn email_over_implicit_tls_checks_the_certificate() {
    let hook = StandIn::start(TOKEN, &[], &[]);
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = crate::support::test_certificates(certs.path());
    let port = free_port();
    let smtp = Smtp::start_implicit_tls(port, &certs.path().join("mail"), &cert, &key);
    let routes = |ca: &str| {
        format!(
            r#"
{RETRY}
[channels.mail]
type = "email"
host = "127.0.0.1"
port = {port}
security = "tls"
tls_server_name = "localhost"
{ca}
from = "keywatch@example.com"
[receivers.owner]
owner = true
channels = ["mail"]
[[routes]]
kinds = ["revoked_key_used"]
receivers = ["owner"]
group_wait = "0s"
"#
        )
    };
    let t0 = at("2026-11-20T10:00:00Z");
    // Without the CA, the certificate is not trusted: permanent.
    let env = Env::new(&hook, &routes(""));
    let mut n = env.notifier();
    let f = key_used(&env.registry, "key-old", "203.0.113.7", "curl/8", t0);
    n.handle(vec![f], &[], t0).await.unwrap();
    let m = &env.log().notify_messages(i64::MIN).unwrap()[0];
    assert_eq!(m.state, "failed", "{m:?}");
    assert!(smtp.messages().is_empty());
    // With it: delivered.
    let env = Env::new(&hook, &routes(&format!("ca_file = \"{}\"", ca.display())));
    let mut n = env.notifier();
    let f = key_used(&env.registry, "key-old", "203.0.113.7", "curl/8", t0);
    n.handle(vec![f], &[], t0).await.unwrap();
    assert_eq!(smtp.messages().len(), 1);
    assert_eq!(
        env.log().notify_messages(i64::MIN).unwrap()[0].state,
        "sent"
    );
}

#[tokio::test]
async fn email_is_retried_while_the_server_is_down_and_sent_once() {
    let hook = StandIn::start(TOKEN, &[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let routes = format!(
        r#"
{RETRY}
[channels.mail]
type = "email"
host = "127.0.0.1"
port = {port}
security = "none"
from = "keywatch@example.com"
[receivers.owner]
owner = true
channels = ["mail"]
[[routes]]
receivers = ["owner"]
group_wait = "0s"
"#
    );
    let env = Env::new(&hook, &routes);
    let mut n = env.notifier();
    let t0 = at("2026-11-20T10:00:00Z");
    let f = key_used(&env.registry, "key-old", "203.0.113.7", "curl/8", t0);
    n.handle(vec![f.clone()], &[], t0).await.unwrap();
    let log = env.log();
    let m = &log.notify_messages(i64::MIN).unwrap()[0];
    assert_eq!((m.state.as_str(), m.attempts), ("pending", 1));
    assert!(m.next_attempt_ms > t0, "a retry is scheduled");

    let smtp = Smtp::start(port, &dir.path().join("mail"), None, None);
    // Restarted while the server was down: the queued message survives.
    drop(n);
    let mut n = env.notifier();
    n.tick(t0 + 10_000).await.unwrap();
    n.handle(vec![f], &[], t0 + 20_000).await.unwrap();
    n.tick(t0 + HOUR).await.unwrap();
    assert_eq!(smtp.messages().len(), 1);
    let m = &log.notify_messages(i64::MIN).unwrap()[0];
    assert_eq!((m.state.as_str(), m.attempts), ("sent", 2));
}

/// Owners on Telegram and Slack; delivery failures to the operations webhook at `ops`.
fn chat_routes(max_parts: usize, ops: &str) -> String {
    format!(
        r#"
[defaults]
group_wait = "0s"
max_parts = {max_parts}
{RETRY}
[channels.tg]
type = "telegram"
api_url = "{{api}}"
bot_token_file = "{{dir}}/token"
[channels.slack]
type = "slack"
[channels.hook]
type = "webhook"
url = "{ops}/hook"
[receivers.owner]
owner = true
channels = ["tg", "slack"]
[receivers.operations]
channels = ["hook"]
[[routes]]
kinds = ["notification_failed"]
receivers = ["operations"]
group_wait = "0s"
[[routes]]
receivers = ["owner"]
"#
    )
}

#[tokio::test]
async fn telegram_and_slack_escape_hostile_strings_and_split_long_messages() {
    let api = StandIn::start(TOKEN, &["-1001", "@evil_chat"], &[SLACK_PATH]);
    let env = Env::new(&api, &chat_routes(10, &api.url()));
    let mut n = env.notifier();
    let now = at("2026-11-21T10:00:00Z");
    // 120 sources still on the old key, each with a hostile user agent, one of 5000+ chars.
    let mut srcs = sources(120, HOSTILE_UA);
    srcs[0].1 = long_ua();
    let (status, found) = rotation(&env.registry, now, &srcs);
    let reminder = of_kind(&found, FindingKind::RotationReminder);
    assert_eq!(reminder.len(), 1, "{found:?}");
    n.handle(reminder, std::slice::from_ref(&status), now)
        .await
        .unwrap();

    let tg: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.api == Api::Telegram)
        .collect();
    assert!(tg.len() >= 2, "split into several messages: {}", tg.len());
    assert!(tg.len() <= 10);
    // The adoption chart first, as a photo whose caption is the message's head.
    assert!(tg[0].path.ends_with("/sendPhoto"), "{}", tg[0].path);
    assert!(tg[0].text().encode_utf16().count() <= 1024);
    for r in &tg {
        assert!(r.accepted, "{}: {}", r.status, r.answer);
        assert_eq!(r.body["parse_mode"], "HTML");
        // A number in JSON, text in a multipart form.
        let chat = match &r.body["chat_id"] {
            serde_json::Value::String(c) => c.clone(),
            other => other.to_string(),
        };
        assert_eq!(chat, "-1001");
        assert!(r.text().encode_utf16().count() <= 4096);
    }
    let all: String = tg.iter().map(|r| r.text()).collect::<Vec<_>>().join("\n");
    assert!(
        all.contains("<b>Rotation reminder (7d)</b>"),
        "{}",
        &all[..300]
    );
    assert!(all.contains("&lt;script&gt;alert('x')&lt;/script&gt;"));
    assert!(!all.contains("<script>"));
    assert!(all.contains("<code>billing &lt;A&gt; *v1*</code>"));
    assert!(
        all.contains("2026-11-24 18:00 CET"),
        "the deadline in the owner's zone"
    );
    assert!(
        all.contains("<b>75 %</b> of the requests"),
        "the share already moved"
    );
    assert!(all.contains("<b>What to do:</b>"));
    // The first 50 sources (most requests first) are listed, each once and whole; the rest
    // are counted.
    assert_eq!(status.lingering.len(), 120);
    for ip in status.lingering.iter().take(50).map(|l| &l.ip) {
        assert_eq!(
            all.matches(&format!("<code>{ip}</code>")).count(),
            1,
            "{ip}"
        );
    }
    assert!(all.contains("… and 70 more"));
    // The 5000-character user agent is cut.
    assert!(!all.contains(&"A".repeat(300)));

    let slack: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.api == Api::Slack)
        .collect();
    // Block Kit: everything fits one message of at most 50 blocks (the stand-in refuses
    // more, and any text past Slack's limits); the mrkdwn text is the fallback.
    assert_eq!(slack.len(), 1);
    let blocks = slack[0].body["blocks"].as_array().unwrap();
    assert!(blocks.len() <= 50 && blocks.len() > 5, "{}", blocks.len());
    let block_text: String = blocks
        .iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    for ip in status.lingering.iter().take(50).map(|l| &l.ip) {
        assert!(block_text.contains(&format!("`{ip}`")), "{ip}");
    }
    assert!(block_text.contains("… and 70 more"));
    assert!(!block_text.contains("<script>") && block_text.contains("&lt;script&gt;"));
    for r in &slack {
        assert!(r.accepted, "{}: {}", r.status, r.answer);
        let t = r.text();
        assert!(t.chars().count() <= 4000);
        assert!(
            !t.contains('<') && !t.contains('>'),
            "raw angle bracket in {t}"
        );
        // Code spans are balanced on every line, so `*bold*` from a user agent stays inside
        // one and formats nothing.
        for line in t.lines() {
            assert_eq!(line.matches('`').count() % 2, 0, "{line}");
            if let Some(i) = line.find("*bold*") {
                assert_eq!(
                    line[..i].matches('`').count() % 2,
                    1,
                    "outside code: {line}"
                );
            }
        }
    }
    let all: String = slack
        .iter()
        .map(|r| r.text())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(all.contains("*Rotation reminder (7d)*"));
    assert!(all.contains("&lt;script&gt;") && all.contains("&lt;!here&gt;"));
    assert!(all.contains("ˋtickˋ"), "user backticks cannot close a span");

    // A hostile owner name and key use: escaped, accepted by the strict stand-in.
    let f = key_used(&env.registry, "key-evil", "198.51.100.1", &long_ua(), now);
    n.handle(vec![f], &[], now + MIN).await.unwrap();
    let last_tg = api
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.api == Api::Telegram)
        .unwrap();
    assert!(last_tg.accepted, "{}", last_tg.answer);
    assert_eq!(last_tg.body["chat_id"], "@evil_chat");
    assert!(last_tg
        .text()
        .contains("(evil &lt;b&gt;&amp;co&lt;/b&gt; *x*)"));
    assert_eq!(states(&env.log()), BTreeMap::from([("sent".to_owned(), 4)]));
}

#[tokio::test]
async fn telegram_chat_not_found_is_permanent_and_tells_the_operators() {
    let api = StandIn::start(TOKEN, &["@evil_chat"], &[SLACK_PATH]);
    let env = Env::new(&api, &chat_routes(5, &api.url()));
    let mut n = env.notifier();
    let t0 = at("2026-11-21T10:00:00Z");
    let f = key_used(&env.registry, "key-old", "203.0.113.9", "curl/8", t0);
    n.handle(vec![f], &[], t0).await.unwrap();
    for i in 1..=10 {
        n.tick(t0 + i * MIN).await.unwrap();
    }
    let tg: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.api == Api::Telegram)
        .collect();
    assert_eq!(tg.len(), 1, "not retried");
    assert_eq!(tg[0].status, 400);
    assert!(tg[0].answer.contains("chat not found"));
    let log = env.log();
    let failed: Vec<_> = log
        .notify_messages(i64::MIN)
        .unwrap()
        .into_iter()
        .filter(|m| m.state == "failed")
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].channel, "tg");
    assert!(failed[0]
        .last_error
        .as_deref()
        .unwrap()
        .contains("telegram answered 400: Bad Request: chat not found"));
    // Slack got it; the operators heard about Telegram once, on their webhook.
    let hooks: Vec<_> = api
        .accepted()
        .into_iter()
        .filter(|r| r.api == Api::Webhook)
        .collect();
    assert_eq!(hooks.len(), 1);
    let f = &hooks[0].body["findings"][0];
    assert_eq!(f["kind"], "notification_failed");
    assert_eq!(f["evidence"]["channel"], "tg");
    assert_eq!(f["evidence"]["target"], "telegram:-1001");
    assert!(f["summary"].as_str().unwrap().contains("chat not found"));
    assert_eq!(
        api.accepted()
            .iter()
            .filter(|r| r.api == Api::Slack)
            .count(),
        1
    );

    // Another failure to the same chat within a day: the operators are not told again.
    let f = key_used(&env.registry, "key-old", "203.0.113.10", "curl/8", t0);
    n.handle(vec![f], &[], t0 + HOUR).await.unwrap();
    assert_eq!(
        api.accepted()
            .iter()
            .filter(|r| r.api == Api::Webhook)
            .count(),
        1
    );
}

#[tokio::test]
async fn telegram_429_waits_for_retry_after_and_5xx_is_retried() {
    let api = StandIn::start(TOKEN, &["-1001"], &[SLACK_PATH]);
    let routes =
        chat_routes(5, &api.url()).replace("channels = [\"tg\", \"slack\"]", "channels = [\"tg\"]");
    let env = Env::new(&api, &routes);
    // Every attempt also goes to the sink (the ClickHouse notifications table in full mode).
    let (sink, mut records) = tokio::sync::mpsc::channel(16);
    let mut n = env.notifier().with_attempt_sink(sink);
    let t0 = at("2026-11-21T10:00:00Z");
    api.set_mode(Mode::RateLimit(7));
    let f = key_used(&env.registry, "key-old", "203.0.113.9", "curl/8", t0);
    n.handle(vec![f], &[], t0).await.unwrap();
    assert_eq!(api.requests().len(), 1);
    let log = env.log();
    let m = &log.notify_messages(i64::MIN).unwrap()[0];
    assert!(
        m.next_attempt_ms >= t0 + 7_000,
        "{} < retry_after",
        m.next_attempt_ms - t0
    );
    api.set_mode(Mode::Status(502));
    n.tick(t0 + 5_000).await.unwrap();
    assert_eq!(api.requests().len(), 1, "not before retry_after");
    n.tick(t0 + 8_000).await.unwrap();
    assert_eq!(api.requests().len(), 2);
    api.set_mode(Mode::Ok);
    n.tick(t0 + 60_000).await.unwrap();
    assert_eq!(api.accepted().len(), 1);
    let attempts: Vec<_> = log
        .notify_attempts(&m.id)
        .unwrap()
        .into_iter()
        .map(|a| a.outcome.unwrap())
        .collect();
    assert_eq!(attempts, ["transient", "transient", "ok"]);
    let mut sunk = Vec::new();
    while let Ok(r) = records.try_recv() {
        sunk.push((r.attempt, r.outcome, r.channel_type, r.target));
    }
    assert_eq!(
        sunk,
        [
            (
                1,
                "transient",
                "telegram".to_owned(),
                "telegram:-1001".to_owned()
            ),
            (
                2,
                "transient",
                "telegram".to_owned(),
                "telegram:-1001".to_owned()
            ),
            (3, "ok", "telegram".to_owned(), "telegram:-1001".to_owned()),
        ]
    );
}

#[tokio::test]
async fn slack_answers_decide_between_retry_and_failure() {
    let api = StandIn::start(TOKEN, &[], &[SLACK_PATH]);
    let ops = StandIn::start(TOKEN, &[], &[]);
    let routes = chat_routes(5, &ops.url())
        .replace("channels = [\"tg\", \"slack\"]", "channels = [\"slack\"]");
    let env = Env::new(&api, &routes);
    let mut n = env.notifier();
    let t0 = at("2026-11-21T10:00:00Z");
    let slack_ok = |api: &StandIn| {
        api.accepted()
            .into_iter()
            .filter(|r| r.api == Api::Slack)
            .count()
    };

    // 429 with Retry-After: waits that long; 500: retried.
    api.set_mode(Mode::RateLimit(20));
    let f = key_used(&env.registry, "key-old", "203.0.113.1", "curl/8", t0);
    n.handle(vec![f], &[], t0).await.unwrap();
    api.set_mode(Mode::Status(500));
    n.tick(t0 + 19_000).await.unwrap();
    assert_eq!(api.requests().len(), 1);
    n.tick(t0 + 21_000).await.unwrap();
    assert_eq!(api.requests().len(), 2);
    api.set_mode(Mode::Ok);
    n.tick(t0 + 60_000).await.unwrap();
    assert_eq!(slack_ok(&api), 1);

    // 400 invalid_payload and 404 no_service: permanent, the operators hear of each.
    for (code, word) in [(400, "invalid_payload"), (404, "no_service")] {
        api.set_mode(Mode::Status(code));
        let before = api.requests().len();
        let f = key_used(
            &env.registry,
            "key-old",
            &format!("203.0.113.{code}"),
            "x",
            t0,
        );
        n.handle(vec![f], &[], t0 + DAY * i64::from(code))
            .await
            .unwrap();
        api.set_mode(Mode::Ok);
        for i in 1..5 {
            n.tick(t0 + DAY * i64::from(code) + i * MIN).await.unwrap();
        }
        let slack_tries = api.requests()[before..]
            .iter()
            .filter(|r| r.api == Api::Slack)
            .count();
        assert_eq!(slack_tries, 1, "{code} is not retried");
        let hook = ops.accepted().pop().expect("operators told");
        assert!(hook.text().contains(word), "{}", hook.text());
        assert!(
            !hook.text().contains("slack-secret-part"),
            "{}",
            hook.text()
        );
    }
}

#[tokio::test]
async fn a_five_minute_outage_delivers_every_due_message_once() {
    let api = StandIn::start(TOKEN, &[], &[]);
    let routes = format!(
        r#"
{RETRY}
[channels.hook]
type = "webhook"
url = "{{api}}/hook"
[receivers.security]
channels = ["hook"]
[[routes]]
receivers = ["security"]
group_by = ["finding"]
group_wait = "0s"
"#
    );
    let env = Env::new(&api, &routes);
    let mut n = env.notifier();
    let t0 = at("2026-11-21T10:00:00Z");
    api.set_mode(Mode::Status(503));
    let mut raised = Vec::new();
    // During the outage: a finding every 10 s (30 of them), ticks in between.
    let mut t = t0;
    let mut i = 0;
    while t < t0 + 5 * MIN {
        let f = key_used(
            &env.registry,
            "key-old",
            &format!("192.0.2.{i}"),
            "curl/8",
            t,
        );
        raised.push(f.clone());
        n.handle(vec![f], &[], t).await.unwrap();
        n.tick(t + 5_000).await.unwrap();
        t += 10_000;
        i += 1;
    }
    assert_eq!(raised.len(), 30);
    assert!(api.accepted().is_empty());
    let tries_during_outage = api.requests().len();
    assert!(tries_during_outage > 30, "retried: {tries_during_outage}");
    api.set_mode(Mode::Ok);
    while t < t0 + 15 * MIN {
        n.tick(t).await.unwrap();
        t += 5_000;
    }
    // A replay raises them all again: nothing new.
    n.handle(raised.clone(), &[], t).await.unwrap();
    n.tick(t + HOUR).await.unwrap();

    let accepted = api.accepted();
    let mut per_fact: BTreeMap<String, usize> = BTreeMap::new();
    for r in &accepted {
        for f in r.body["findings"].as_array().unwrap() {
            *per_fact
                .entry(f["dedup_key"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    assert_eq!(per_fact.len(), 30);
    assert!(per_fact.values().all(|c| *c == 1), "{per_fact:?}");
    assert_eq!(accepted.len(), 30);
    assert_eq!(
        states(&env.log()),
        BTreeMap::from([("sent".to_owned(), 30)])
    );
    // Each arrived within the backoff cap (30 s, +10 %) of the channel coming back.
    let log = env.log();
    for m in log.notify_messages(i64::MIN).unwrap() {
        assert!(m.sent_ms.unwrap() <= t0 + 5 * MIN + 40_000, "{m:?}");
    }
}

#[tokio::test]
async fn a_restart_during_an_outage_sends_no_duplicate() {
    let api = StandIn::start(TOKEN, &[], &[]);
    let routes = format!(
        r#"
{RETRY}
[channels.hook]
type = "webhook"
url = "{{api}}/hook"
[receivers.security]
channels = ["hook"]
[[routes]]
receivers = ["security"]
group_by = ["finding"]
group_wait = "0s"
"#
    );
    let env = Env::new(&api, &routes);
    let t0 = at("2026-11-21T10:00:00Z");
    let f = key_used(&env.registry, "key-old", "192.0.2.1", "curl/8", t0);

    // The channel hangs; keywatch is killed in the middle of the attempt.
    api.set_mode(Mode::Hang);
    let mut n = env.notifier();
    let cut = tokio::time::timeout(
        Duration::from_millis(300),
        n.handle(vec![f.clone()], &[], t0),
    )
    .await;
    assert!(cut.is_err(), "the attempt hangs");
    drop(n);
    assert_eq!(
        env.log().notify_messages(i64::MIN).unwrap()[0].state,
        "sending"
    );

    // Restarted while still down: retried, refused, queued.
    api.set_mode(Mode::Status(503));
    let mut n = env.notifier();
    n.handle(vec![f.clone()], &[], t0 + MIN).await.unwrap();
    n.tick(t0 + MIN).await.unwrap();
    assert_eq!(
        env.log().notify_messages(i64::MIN).unwrap()[0].state,
        "pending"
    );
    // Killed between two attempts, restarted once the channel is back.
    drop(n);
    api.set_mode(Mode::Ok);
    let mut n = env.notifier();
    n.handle(vec![f.clone()], &[], t0 + 2 * MIN).await.unwrap();
    n.tick(t0 + 10 * MIN).await.unwrap();
    drop(n);
    let mut n = env.notifier();
    n.handle(vec![f], &[], t0 + 11 * MIN).await.unwrap();
    n.tick(t0 + HOUR).await.unwrap();

    assert_eq!(
        api.accepted().len(),
        1,
        "exactly one message reached the channel"
    );
    let log = env.log();
    let m = &log.notify_messages(i64::MIN).unwrap()[0];
    assert_eq!(m.state, "sent");
    let outcomes: Vec<_> = log
        .notify_attempts(&m.id)
        .unwrap()
        .into_iter()
        .map(|a| a.outcome.unwrap())
        .collect();
    assert_eq!(outcomes[0], "interrupted");
    assert_eq!(outcomes.last().unwrap(), "ok");
    assert!(outcomes.contains(&"transient".to_owned()));
}

#[tokio::test]
async fn a_restart_after_the_channel_took_the_message_repeats_it_with_the_same_idempotency_key() {
    let api = StandIn::start(TOKEN, &[], &[]);
    let routes = format!(
        r#"
{RETRY}
[channels.hook]
type = "webhook"
url = "{{api}}/hook"
[receivers.security]
channels = ["hook"]
[[routes]]
receivers = ["security"]
group_wait = "0s"
"#
    );
    let env = Env::new(&api, &routes);
    let t0 = at("2026-11-21T10:00:00Z");
    let f = key_used(&env.registry, "key-old", "192.0.2.1", "curl/8", t0);
    // The channel takes the message; keywatch dies before the answer comes.
    api.set_mode(Mode::AcceptThenHang);
    let mut n = env.notifier();
    let _ = tokio::time::timeout(Duration::from_millis(300), n.handle(vec![f], &[], t0)).await;
    drop(n);
    api.set_mode(Mode::Ok);
    let mut n = env.notifier();
    n.tick(t0 + MIN).await.unwrap();
    // The documented window: sent again once, and the receiver can tell it is the same one.
    let got = api.accepted();
    assert_eq!(got.len(), 2);
    let key = |r: &crate::support::Request| r.header("idempotency-key").unwrap().to_owned();
    assert_eq!(key(&got[0]), key(&got[1]));
    assert_eq!(got[0].body["id"], got[1].body["id"]);
    assert_eq!(got[0].body["id"].as_str().unwrap(), key(&got[0]));
}

#[tokio::test]
async fn reminder_steps_are_sent_once_each_across_restarts_and_replays() {
    let api = StandIn::start(TOKEN, &[], &[]);
    let routes = format!(
        r#"
{RETRY}
[channels.hook]
type = "webhook"
url = "{{api}}/hook"
[receivers.owner]
owner = true
channels = ["hook"]
[[routes]]
kinds = ["rotation_reminder"]
receivers = ["owner"]
group_wait = "0s"
"#
    );
    let env = Env::new(&api, &routes);
    let srcs = sources(3, "billing-sync/2.1");
    // Every 6 hours from a week and a half before the deadline to three days after it, each
    // evaluation twice (a replay), and a restart every third evaluation.
    let mut t = at("2026-11-16T00:00:00Z");
    let end = at("2026-11-27T20:00:00Z");
    let mut n = env.notifier();
    let mut k = 0;
    while t <= end {
        let (status, found) = rotation(&env.registry, t, &srcs);
        for _ in 0..2 {
            n.handle(found.clone(), std::slice::from_ref(&status), t)
                .await
                .unwrap();
        }
        n.tick(t + MIN).await.unwrap();
        k += 1;
        if k % 3 == 0 {
            drop(n);
            n = env.notifier();
        }
        t += 6 * HOUR;
    }
    let steps: Vec<String> = api
        .accepted()
        .iter()
        .map(|r| {
            r.body["findings"][0]["evidence"]["step"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        steps,
        [
            "7d",
            "3d",
            "1d",
            "due",
            "overdue #1",
            "overdue #2",
            "overdue #3"
        ]
    );
    // Each lists the sources, the share moved, the deadline in the owner's zone, what to do.
    let text = api.accepted()[1].text().to_owned();
    assert!(
        text.contains("== Rotation reminder (3d): billing <A> *v1* (acme-billing)"),
        "{text}"
    );
    assert!(text.contains("Deadline: 2026-11-24 18:00 CET"), "{text}");
    assert!(
        text.contains("75 % of the requests of the last 24 hours"),
        "{text}"
    );
    assert!(
        text.contains("3 source(s) still send the old key"),
        "{text}"
    );
    for (ip, ua) in &srcs {
        assert!(text.contains(&format!("{ip}  {ua}")), "{ip} in {text}");
    }
    assert!(
        text.contains("What to do: configure the new key billing B"),
        "{text}"
    );
    let overdue = api.accepted()[4].text().to_owned();
    assert!(overdue.contains("which has passed"), "{overdue}");
}

#[tokio::test]
async fn quiet_hours_hold_all_but_critical_until_morning_in_the_owner_zone() {
    let api = StandIn::start(TOKEN, &[], &[]);
    let routes = format!(
        r#"
{RETRY}
[channels.hook]
type = "webhook"
url = "{{api}}/hook"
[receivers.owner]
owner = true
channels = ["hook"]
quiet_hours = {{ start = "22:00", end = "07:00", except = "critical" }}
[[routes]]
receivers = ["owner"]
group_wait = "0s"
group_by = ["finding"]
"#
    );
    let env = Env::new(&api, &routes);
    let mut n = env.notifier();
    // 23:30 in Berlin (CET): the 3d reminder waits, a revoked key used goes out at once.
    let night = at("2026-11-21T22:30:00Z");
    let (status, found) = rotation(&env.registry, night, &sources(2, "sync"));
    let mut batch = of_kind(&found, FindingKind::RotationReminder);
    batch.push(key_used(
        &env.registry,
        "key-old",
        "192.0.2.7",
        "curl/8",
        night,
    ));
    n.handle(batch, &[status], night).await.unwrap();
    let kinds = |api: &StandIn| -> Vec<String> {
        api.accepted()
            .iter()
            .map(|r| r.body["findings"][0]["kind"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(kinds(&api), ["revoked_key_used"]);
    // Held across a restart, sent at 07:00 local (06:00 UTC), not a minute before.
    drop(n);
    let mut n = env.notifier();
    n.tick(at("2026-11-22T05:59:00Z")).await.unwrap();
    assert_eq!(kinds(&api).len(), 1);
    n.tick(at("2026-11-22T06:00:00Z")).await.unwrap();
    assert_eq!(kinds(&api), ["revoked_key_used", "rotation_reminder"]);
    assert_eq!(n.next_wakeup_ms().unwrap(), None);
}

#[tokio::test]
async fn sources_are_grouped_safe_to_revoke_inhibits_and_silences_hold_back() {
    let api = StandIn::start(TOKEN, &[], &[]);
    let routes = format!(
        r#"
[defaults]
group_wait = "1m"
group_interval = "10m"
{RETRY}
[channels.hook]
type = "webhook"
url = "{{api}}/hook"
[receivers.owner]
owner = true
channels = ["hook"]
[[routes]]
receivers = ["owner"]
[[inhibit]]
source = ["safe_to_revoke"]
targets = ["lingering_old_key", "rotation_reminder"]
"#
    );
    let env = Env::new(&api, &routes);
    let mut n = env.notifier();
    let t0 = at("2026-11-21T10:00:00Z");
    // Three lingering sources of one rotation, raised over 30 s (stream-like, without a
    // rotation status): one message after the wait, listing the three.
    let srcs = sources(3, "sync");
    for (i, s) in srcs.iter().enumerate() {
        let (_, found) = rotation(&env.registry, t0, std::slice::from_ref(s));
        let lingering = of_kind(&found, FindingKind::LingeringOldKey);
        n.handle(lingering, &[], t0 + i as i64 * 10_000)
            .await
            .unwrap();
    }
    assert!(api.accepted().is_empty(), "group wait");
    n.tick(t0 + MIN).await.unwrap();
    let got = api.accepted();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body["findings"].as_array().unwrap().len(), 3);
    assert!(
        got[0].text().contains("3 source(s) still send the old key"),
        "{}",
        got[0].text()
    );

    // A new source waits for the group interval; meanwhile the key becomes safe to revoke:
    // the waiting lingering finding is dropped.
    let (status, found) = rotation(&env.registry, t0 + 2 * MIN, &sources(4, "sync"));
    n.handle(
        of_kind(&found, FindingKind::LingeringOldKey),
        &[status],
        t0 + 2 * MIN,
    )
    .await
    .unwrap();
    let safe = Finding {
        kind: FindingKind::SafeToRevoke,
        key_id: "key-a".into(),
        owner: Some("acme-billing".into()),
        at_ms: t0 + 3 * MIN,
        severity: keywatch::detect::Severity::Info,
        summary: "billing <A> *v1* (acme-billing) is safe to revoke".into(),
        evidence: serde_json::json!({"old_key": "key-a", "new_key": "key-b", "old_name": "billing <A> *v1*"}),
        dedup_key: "safe_to_revoke:key-a:key-b".into(),
    };
    n.handle(vec![safe], &[], t0 + 3 * MIN).await.unwrap();
    n.tick(t0 + 20 * MIN).await.unwrap();
    let kinds: Vec<String> = api
        .accepted()
        .iter()
        .flat_map(|r| {
            r.body["findings"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["kind"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "lingering_old_key",
            "lingering_old_key",
            "lingering_old_key",
            "safe_to_revoke"
        ]
    );

    // `keywatch silence add owner=acme-billing` (from the CLI, on the same database).
    let mut cli = env.log();
    let s = notify::silence_add(
        &mut cli,
        &"owner=acme-billing".parse::<Matcher>().unwrap(),
        t0 + DAY,
        "migration weekend",
        t0,
    )
    .unwrap();
    let before = api.accepted().len();
    let f = key_used(&env.registry, "key-old", "192.0.2.50", "curl/8", t0 + HOUR);
    n.handle(vec![f.clone()], &[], t0 + HOUR).await.unwrap();
    n.tick(t0 + 2 * HOUR).await.unwrap();
    assert_eq!(api.accepted().len(), before, "silenced");
    assert_eq!(
        notify::silence_list(&cli, t0 + HOUR, false).unwrap(),
        vec![s.clone()]
    );
    assert!(notify::silence_remove(&mut cli, s.id, t0 + 3 * HOUR).unwrap());
    // Raised again after the silence ends: told.
    n.handle(vec![f], &[], t0 + 3 * HOUR + 5_000).await.unwrap();
    n.tick(t0 + 4 * HOUR).await.unwrap();
    assert_eq!(api.accepted().len(), before + 1);
}

/// Captures what tracing writes, for the secret checks.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuf {
    type Writer = LogBuf;
    fn make_writer(&'a self) -> LogBuf {
        self.clone()
    }
}

#[tokio::test]
async fn no_secret_appears_in_errors_logs_or_the_notification_log() {
    let logs = LogBuf::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let api = StandIn::start("999:another-token", &["-1001"], &["/services/other"]);
    // The webhook refuses (401) and echoes the Authorization header and path, as some do.
    let hook = StandIn::start(TOKEN, &[], &[]);
    hook.set_mode(Mode::Status(401));
    let closed = free_port();
    let dir = tempfile::tempdir().unwrap();
    let hook_url = format!("{}/hook/webhook-url-secret", hook.url());
    std::fs::write(dir.path().join("hook-url"), &hook_url).unwrap();
    std::fs::write(
        dir.path().join("hook-auth"),
        "Bearer hook-auth-secret-value",
    )
    .unwrap();
    std::fs::write(dir.path().join("smtp-pass"), "smtp-password-secret").unwrap();
    let routes = format!(
        r#"
{RETRY}
[channels.tg]
type = "telegram"
api_url = "{{api}}"
bot_token_file = "{{dir}}/token"
[channels.tg_down]
type = "telegram"
api_url = "http://127.0.0.1:{closed}"
bot_token_file = "{{dir}}/token"
[channels.slack]
type = "slack"
[channels.hook]
type = "webhook"
url_file = "{d}/hook-url"
authorization_file = "{d}/hook-auth"
[channels.mail]
type = "email"
host = "127.0.0.1"
port = {closed}
security = "none"
username = "kw"
password_file = "{d}/smtp-pass"
from = "keywatch@example.com"
[receivers.owner]
owner = true
channels = ["tg", "tg_down", "slack", "hook", "mail"]
[[routes]]
receivers = ["owner"]
group_wait = "0s"
"#,
        d = dir.path().display()
    );
    let env = Env::new(&api, &routes);
    let mut n = env.notifier();
    let t0 = at("2026-11-21T10:00:00Z");
    let f = key_used(&env.registry, "key-old", "192.0.2.1", "curl/8", t0);
    n.handle(vec![f], &[], t0).await.unwrap();
    for i in 1..=5 {
        n.tick(t0 + i * MIN).await.unwrap();
    }
    // `notify test` errors.
    let mut errors = Vec::new();
    for ch in ["tg", "tg_down", "slack", "hook", "mail"] {
        match notify::send_test(&env.config, &env.registry, ch, "acme-billing").await {
            Ok(to) => errors.push(format!("ok {to}")),
            Err(e) => errors.push(e.to_string()),
        }
    }
    drop(_guard);

    let secrets = [
        TOKEN,
        "AAH-test-bot-token-secret",
        "slack-secret-part",
        "webhook-url-secret",
        "hook-auth-secret-value",
        "smtp-password-secret",
    ];
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("notification failed"),
        "the failures were logged: {logs}"
    );
    let log = env.log();
    let mut stored = String::new();
    for m in log.notify_messages(i64::MIN).unwrap() {
        stored.push_str(&format!("{m:?}\n"));
        for a in log.notify_attempts(&m.id).unwrap() {
            stored.push_str(&format!("{a:?}\n"));
        }
    }
    assert!(
        stored.contains("telegram answered 401: Unauthorized"),
        "{stored}"
    );
    assert!(
        stored.contains("slack answered 404: no_service"),
        "{stored}"
    );
    assert!(
        stored.contains("webhook answered 401: unauthorized: <redacted> for <redacted>"),
        "{stored}"
    );
    assert!(
        hook.requests()
            .iter()
            .any(|r| r.header("authorization") == Some("Bearer hook-auth-secret-value")),
        "the header was sent"
    );
    assert!(stored.to_lowercase().contains("connect"), "{stored}");
    let config_debug = format!("{:?} {:?}", env.config, env.registry);
    let all_errors = errors.join("\n");
    assert!(
        all_errors.contains("telegram answered 401: Unauthorized"),
        "{all_errors}"
    );
    for s in secrets {
        assert!(!logs.contains(s), "{s} in the logs:\n{logs}");
        assert!(
            !stored.contains(s),
            "{s} in the notification log:\n{stored}"
        );
        assert!(!config_debug.contains(s), "{s} in Debug output");
        assert!(!all_errors.contains(s), "{s} in an error: {all_errors}");
    }
}

#[tokio::test]
async fn notify_test_sends_one_message_or_says_why_not() {
    let api = StandIn::start(TOKEN, &["-1001"], &[SLACK_PATH]);
    let env = Env::new(&api, &chat_routes(5, &api.url()));
    let to = notify::send_test(&env.config, &env.registry, "tg", "acme-billing")
        .await
        .unwrap();
    assert_eq!(to, "telegram:-1001 via tg");
    let to = notify::send_test(&env.config, &env.registry, "slack", "acme-billing")
        .await
        .unwrap();
    assert_eq!(to, "slack:owner:acme-billing via slack");
    let to = notify::send_test(&env.config, &env.registry, "hook", "operations")
        .await
        .unwrap();
    assert_eq!(to, "webhook:hook via hook");
    let got = api.accepted();
    assert_eq!(got.len(), 3);
    assert!(
        got[0].text().contains("<b>keywatch test message</b>"),
        "{}",
        got[0].text()
    );
    assert!(got[1].text().contains("*keywatch test message*"));
    assert_eq!(got[2].body["test"], true);
    // Nothing in the log: a test is not a notification.
    assert!(env.log().notify_messages(i64::MIN).unwrap().is_empty());

    let err = |ch: &str, owner: &str| {
        let c = env.config.clone();
        let r = env.registry.clone();
        let (ch, owner) = (ch.to_owned(), owner.to_owned());
        async move {
            notify::send_test(&c, &r, &ch, &owner)
                .await
                .unwrap_err()
                .to_string()
        }
    };
    assert_eq!(
        err("pager", "acme-billing").await,
        "unknown channel `pager`, expected one of hook, slack, tg"
    );
    assert!(err("tg", "ghost")
        .await
        .starts_with("unknown owner `ghost`"));
    assert_eq!(
        err("tg", "nobody").await,
        "nobody has no telegram_chat_id in keys.toml for the telegram channel `tg`"
    );
    api.set_mode(Mode::Status(503));
    assert_eq!(
        err("tg", "acme-billing").await,
        "telegram answered 503: Internal Server Error (transient)"
    );
}

#[tokio::test]
async fn without_channels_messages_go_to_the_console_once() {
    let api = StandIn::start(TOKEN, &[], &[]);
    let env = Env::new(&api, "");
    let defaults = Config {
        origin: "routes.toml".into(),
        ..Config::default()
    };
    assert_eq!(env.config, defaults);
    let t0 = at("2026-11-21T10:00:00Z");
    let f = key_used(&env.registry, "key-nobody", "192.0.2.1", "curl/8", t0);
    let mut n = env.notifier();
    n.handle(vec![f.clone()], &[], t0).await.unwrap();
    assert!(env.console().is_empty(), "the default group wait is 30 s");
    n.tick(t0 + 30_000).await.unwrap();
    let out = env.console();
    assert_eq!(out.len(), 1);
    assert!(
        out[0].starts_with(
            "--- keywatch → owner:nobody ---\n[keywatch] Revoked key used: key-nobody (nobody)"
        ),
        "{}",
        out[0]
    );
    drop(n);
    let mut n = env.notifier();
    n.handle(vec![f], &[], t0 + HOUR).await.unwrap();
    n.tick(t0 + 2 * HOUR).await.unwrap();
    assert_eq!(env.console().len(), 1);
}

/// The stand-in refuses what the Bot API refuses, or the tests above would prove nothing.
#[test]
fn the_stand_in_checks_telegram_html_like_the_bot_api() {
    use crate::support::check_telegram_html as check;
    assert!(check("<b>ok</b> &lt;x&gt; &amp; &#128512;").is_ok());
    assert!(check("<b>unclosed")
        .unwrap_err()
        .contains("can't find end tag"));
    assert!(check("<script>x</script>")
        .unwrap_err()
        .contains("unsupported start tag"));
    assert!(check("a & b").unwrap_err().contains("can't parse entities"));
    assert!(check("<b><i>x</b></i>")
        .unwrap_err()
        .contains("unexpected end tag"));
    assert!(check(&"x".repeat(4097)).unwrap_err().contains("too long"));
}

/// Anomaly findings get their own section in every channel: what was seen against what was
/// expected (the summary), how unusual it is for statistical ones, and what to do; hostile
/// strings from the traffic (a user agent in a new-source summary) stay escaped.
#[tokio::test]
async fn anomaly_findings_say_how_unusual_and_what_to_do_in_every_channel() {
    let api = StandIn::start(TOKEN, &["-1001", "@evil_chat"], &[SLACK_PATH]);
    let env = Env::new(&api, &chat_routes(10, &api.url()));
    let mut n = env.notifier();
    let now = at("2026-11-21T10:00:00Z");
    let anomaly = |kind: FindingKind, summary: String, surprise: serde_json::Value| Finding {
        kind,
        key_id: "key-old".into(),
        owner: env.registry.key("key-old").map(|k| k.owner.clone()),
        at_ms: now,
        severity: keywatch::detect::Severity::Warning,
        summary,
        evidence: serde_json::json!({"model": "test", "surprise": surprise, "score": 0.93}),
        dedup_key: format!("{}:key-old:test", kind.as_str()),
    };
    let found = vec![
        anomaly(
            FindingKind::VolumeAnomaly,
            "key key-old sent 900 requests in the hour, about 110 expected".into(),
            serde_json::json!(9.26),
        ),
        anomaly(
            FindingKind::NewSource,
            format!("key key-old was used from a new user agent {HOSTILE_UA}"),
            serde_json::Value::Null,
        ),
    ];
    n.handle(found, &[], now).await.unwrap();

    let tg: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.api == Api::Telegram)
        .collect();
    assert!(!tg.is_empty());
    assert!(tg.iter().all(|r| r.accepted), "{:?}", tg[0].answer);
    let all: String = tg.iter().map(|r| r.text()).collect::<Vec<_>>().join("\n");
    assert!(
        all.contains("about 110 expected (how unusual: score 0.93, about one chance in 10^9)"),
        "{all}"
    );
    assert!(all.contains("<b>What to do:</b> check the client that uses this key"));
    assert!(all.contains("<b>What to do:</b> check that this use of the key is yours"));
    assert!(all.contains("&lt;script&gt;") && !all.contains("<script>"));
    // A rule finding states a fact: no probability is made up for it.
    assert_eq!(all.matches("how unusual").count(), 1);

    let slack: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.api == Api::Slack)
        .collect();
    assert!(slack.iter().all(|r| r.accepted));
    let all: String = slack
        .iter()
        .map(|r| r.text())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(all.contains("*What to do:* check that this use of the key is yours"));
    assert!(all.contains("how unusual: score 0.93"));
    assert!(!all.contains('<') && !all.contains('>'), "{all}");
}
