//! `keywatch run --dry-run` end to end: the real binary reads a gateway log with a revoked
//! key's use and a route to a real SMTP server (aiosmtpd). The dry run stores the finding
//! and prints the message it would send, and the server gets nothing; the next (real) run
//! tells the same fact, because the dry run left the notification log as it was. With the
//! owners' Telegram bot configured, the dry run leaves the bot off (no Bot API call at all)
//! and still renders to the chat an owner linked to it.

use std::io::Write;
use std::path::Path;

use crate::notify_e2e::kong_line;
use crate::support::{free_port, keywatch, run_config, Smtp, SECRET};

const REVOKED: &str = "5b0e3c1a-revoked-key-0001";

fn append(log: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    writeln!(f, "{line}").unwrap();
}

/// A one-shot config reading `log`, routing revoked-key uses to the SMTP server on `port`.
fn write_config(dir: &Path, log: &Path, port: u16) -> std::path::PathBuf {
    std::fs::write(
        dir.join("keys.toml"),
        format!(
            "[owners.acme-billing]\n[[keys]]\nid = \"{REVOKED}\"\nowner = \"acme-billing\"\n\
             state = \"revoked\"\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("routes.toml"),
        format!(
            r#"
[channels.mail]
type = "email"
host = "127.0.0.1"
port = {port}
security = "none"
from = "keywatch <keywatch@example.com>"
[receivers.security]
channels = ["mail"]
email = ["security@example.com"]
[[routes]]
kinds = ["revoked_key_used"]
receivers = ["security"]
group_by = ["finding"]
group_wait = "0s"
[retry]
timeout = "5s"
"#
        ),
    )
    .unwrap();
    crate::support::config(
        dir,
        log,
        "kong",
        &format!(
            "[rules]\nkeys = {keys:?}\nroutes = {routes:?}\n",
            keys = dir.join("keys.toml"),
            routes = dir.join("routes.toml"),
        ),
    )
}

fn run(config: &Path, dry_run: bool) -> (String, String) {
    let mut cmd = run_config(config);
    if dry_run {
        cmd.arg("--dry-run");
    }
    let out = crate::support::run_ok(&mut cmd);
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_dry_run_renders_and_stores_but_sends_nothing_and_the_next_run_still_sends() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let smtp = Smtp::start(port, &dir.path().join("mail"), None, None);
    let log = dir.path().join("access.log");
    let t0 = chrono::Utc::now().timestamp_millis();
    append(&log, &kong_line(REVOKED, "203.0.113.66", t0));
    let config = write_config(dir.path(), &log, port);

    let (stdout, stderr) = run(&config, true);
    assert!(
        stderr.contains("dry run: findings are detected and stored as usual"),
        "no start-up line saying dry run is on:\n{stderr}"
    );
    assert!(
        stdout.contains("dry run, not sent")
            && stdout.contains("via mail to security@example.com")
            && stdout.contains("203.0.113.66"),
        "the message the dry run would send is not printed:\n{stdout}"
    );
    assert!(
        stderr.contains("dry run: notification rendered, not sent"),
        "{stderr}"
    );
    // Give a stray delivery time to arrive before saying none did.
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(smtp.messages().is_empty(), "{:?}", smtp.messages());
    // Detected and stored as usual.
    let findings = crate::support::run_ok(
        keywatch()
            .args(["findings", "--json", "--config"])
            .arg(&config)
            .env("KW_TEST_SECRET", SECRET),
    );
    let findings = String::from_utf8_lossy(&findings.stdout);
    assert!(
        findings.contains("revoked_key_used") && findings.contains("203.0.113.66"),
        "{findings}"
    );

    // The key is used again from the same address: the same fact. The dry run did not mark
    // it told, so the real run sends it.
    append(&log, &kong_line(REVOKED, "203.0.113.66", t0 + 1000));
    let (stdout, stderr) = run(&config, false);
    assert!(!stdout.contains("dry run"), "{stdout}");
    assert!(!stderr.contains("dry run"), "{stderr}");
    let mails = smtp.messages();
    assert_eq!(mails.len(), 1, "{mails:?}\n{stderr}");
    assert_eq!(mails[0]["rcpt_tos"][0], "security@example.com");
    assert!(
        mails[0]["body"].as_str().unwrap().contains("203.0.113.66"),
        "{}",
        mails[0]["body"]
    );

    // Told now: a dry run of a third use has nothing new to render, and sends nothing.
    append(&log, &kong_line(REVOKED, "203.0.113.66", t0 + 2000));
    let (stdout, _) = run(&config, true);
    assert!(!stdout.contains("dry run, not sent"), "{stdout}");
    assert_eq!(smtp.messages().len(), 1);
}

#[test]
fn a_dry_run_keeps_the_owners_bot_off_and_still_knows_the_chats_linked_to_it() {
    use keywatch::notify::bot::links::Links;
    const TOKEN: &str = "424242:dry-run-bot-token-AbCdEf";
    const CHAT: i64 = 4242;
    let api = crate::support::StandIn::start(TOKEN, &[&CHAT.to_string()], &[]);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    append(
        &log,
        &kong_line(
            REVOKED,
            "203.0.113.77",
            chrono::Utc::now().timestamp_millis(),
        ),
    );
    std::fs::write(
        dir.path().join("keys.toml"),
        format!(
            "[owners.acme-billing]\n[[keys]]\nid = \"{REVOKED}\"\nowner = \"acme-billing\"\n\
             state = \"revoked\"\n"
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(
        dir.path().join("routes.toml"),
        format!(
            "[channels.tg]\ntype = \"telegram\"\napi_url = \"{api}\"\nbot_token_file = {token:?}\n\
             bot = \"poll\"\n[receivers.owner]\nowner = true\nchannels = [\"tg\"]\n\
             [[routes]]\nkinds = [\"revoked_key_used\"]\nreceivers = [\"owner\"]\n\
             group_wait = \"0s\"\n",
            api = api.url(),
            token = dir.path().join("token"),
        ),
    )
    .unwrap();
    let config = crate::support::config(
        dir.path(),
        &log,
        "kong",
        &format!(
            "[rules]\nkeys = {keys:?}\nroutes = {routes:?}\n",
            keys = dir.path().join("keys.toml"),
            routes = dir.path().join("routes.toml"),
        ),
    );
    // The owner linked their chat to the bot earlier (the registry names no chat).
    let state = dir.path().join("state");
    let now = chrono::Utc::now().timestamp_millis();
    let mut links = Links::open(&state).unwrap();
    let code = links
        .new_code("acme-billing", std::time::Duration::from_secs(600), now)
        .unwrap();
    assert_eq!(
        links.redeem(&code, CHAT, "owner", now).unwrap().unwrap(),
        "acme-billing"
    );
    drop(links);

    let (stdout, stderr) = run(&config, true);
    assert!(
        stderr.contains("dry run: the owners' Telegram bot is off"),
        "{stderr}"
    );
    assert!(
        stdout.contains(&format!("via tg to Telegram chat {CHAT}"))
            && stdout.contains("203.0.113.77"),
        "the message to the linked chat is not printed:\n{stdout}"
    );
    // Nothing reached the Bot API: no message, no polling, no webhook.
    assert!(api.requests().is_empty(), "{:?}", api.requests());
}
