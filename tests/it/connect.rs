//! `keywatch check-config --connect` for the notification channels: a real SMTP server
//! (aiosmtpd) with STARTTLS and AUTH, reached as configured; a port nobody listens on; the
//! Telegram stand-in's `getMe` with the bot's token and with a wrong one. One line each,
//! exit 3 when one fails, and no password or token in the output.

use std::path::Path;

use crate::support::{free_port, keywatch, Smtp, StandIn, BOT_USERNAME};

const TOKEN: &str = "5550001:connect-check-token-AbCdEf";
const WRONG_TOKEN: &str = "5550001:not-the-bot-token-XyZ";
const PASSWORD: &str = "smtp-connect-Pa55-secret";

/// keywatch.toml naming `routes` (the input is never opened by check-config).
fn config(dir: &Path, routes: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("routes.toml"), routes).unwrap();
    let path = dir.join("keywatch.toml");
    std::fs::write(
        &path,
        format!(
            "state_dir = {state:?}\n[input]\nkind = \"file\"\npath = {log:?}\n\
             [rules]\nroutes = {routes:?}\n",
            state = dir.join("state"),
            log = dir.join("access.log"),
            routes = dir.join("routes.toml"),
        ),
    )
    .unwrap();
    path
}

/// Runs `check-config --connect`: (exit code, stdout + stderr).
fn check(config: &Path) -> (i32, String) {
    let out = keywatch()
        .arg("check-config")
        .arg(config)
        .arg("--connect")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn line<'a>(out: &'a str, starts: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(starts))
        .unwrap_or_else(|| panic!("no line starting with `{starts}`:\n{out}"))
}

#[test]
fn smtp_servers_are_reached_with_tls_and_login_as_configured() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = crate::support::test_certificates(dir.path());
    let pass = dir.path().join("smtp-pass");
    std::fs::write(&pass, format!("{PASSWORD}\n")).unwrap();
    let port = free_port();
    let smtp = Smtp::start(
        port,
        &dir.path().join("mail"),
        Some((&cert, &key)),
        Some(("keywatch", &pass)),
    );
    let wrong = dir.path().join("wrong-pass");
    std::fs::write(&wrong, "not-the-password-Qq9\n").unwrap();
    let closed = free_port();
    let channel = |name: &str, port: u16, pass: &Path| {
        format!(
            "[channels.{name}]\ntype = \"email\"\nhost = \"127.0.0.1\"\nport = {port}\n\
             security = \"starttls\"\ntls_server_name = \"localhost\"\nca_file = {ca:?}\n\
             username = \"keywatch\"\npassword_file = {pass:?}\n\
             from = \"keywatch <keywatch@example.com>\"\n"
        )
    };
    let routes = format!(
        "[retry]\ntimeout = \"3s\"\n{}{}{}\
         [receivers.security]\nchannels = [\"mail\", \"badlogin\", \"down\"]\n\
         email = [\"security@example.com\"]\n[[routes]]\nreceivers = [\"security\"]\n",
        channel("mail", port, &pass),
        channel("badlogin", port, &wrong),
        channel("down", closed, &pass),
    );
    let (code, out) = check(&config(dir.path(), &routes));
    assert_eq!(code, 3, "{out}");
    let ok = line(&out, &format!("smtp 127.0.0.1:{port} (channel mail): "));
    assert!(ok.contains(": ok: connected"), "{out}");
    let bad = line(&out, &format!("smtp 127.0.0.1:{port} (channel badlogin): "));
    assert!(
        bad.contains("FAILED") && bad.contains("535"),
        "a refused login says so: {out}"
    );
    let down = line(&out, &format!("smtp 127.0.0.1:{closed} (channel down): "));
    assert!(
        down.contains("FAILED") && down.to_lowercase().contains("connection refused"),
        "{out}"
    );
    assert!(
        !out.contains(PASSWORD) && !out.contains("not-the-password-Qq9"),
        "{out}"
    );
    // Reached, not used: nothing was sent.
    assert!(smtp.messages().is_empty());
}

#[test]
fn telegram_tokens_are_checked_with_get_me() {
    let api = StandIn::start(TOKEN, &[], &[]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(dir.path().join("wrong"), format!("{WRONG_TOKEN}\n")).unwrap();
    let routes = format!(
        "[channels.tg]\ntype = \"telegram\"\napi_url = \"{url}\"\nbot_token_file = {good:?}\n\
         [channels.tg_wrong]\ntype = \"telegram\"\napi_url = \"{url}\"\nbot_token_file = {bad:?}\n\
         [receivers.security]\nchannels = [\"tg\", \"tg_wrong\"]\ntelegram_chat_id = \"-1001\"\n\
         [[routes]]\nreceivers = [\"security\"]\n",
        url = api.url(),
        good = dir.path().join("token"),
        bad = dir.path().join("wrong"),
    );
    let (code, out) = check(&config(dir.path(), &routes));
    assert_eq!(code, 3, "{out}");
    let ok = line(&out, &format!("telegram {} (channel tg): ", api.url()));
    assert!(
        ok.ends_with(&format!("ok: token valid: bot @{BOT_USERNAME}")),
        "{out}"
    );
    let wrong = line(
        &out,
        &format!("telegram {} (channel tg_wrong): ", api.url()),
    );
    assert!(
        wrong.contains("FAILED: telegram answered 401: Unauthorized"),
        "{out}"
    );
    assert!(!out.contains(TOKEN) && !out.contains(WRONG_TOKEN), "{out}");
    assert!(!out.contains("connect-check-token") && !out.contains("not-the-bot-token"));
    // getMe only: nothing was sent.
    assert_eq!(api.telegram_calls("getMe").len(), 2);
    assert!(api.telegram_calls("sendMessage").is_empty());
}
