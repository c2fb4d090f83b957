//! The reminder as its owner gets it: a rotation's findings from the detector, through the
//! notifier to a real SMTP server (aiosmtpd) and the strict Slack stand-in. The mail is
//! parsed as a mail client would (mail-parser): text and HTML alternatives, the adoption
//! chart inline by `cid:`; the HTML is parsed (scraper) and its numbers compared with the
//! rotation view, the PNG decoded and its plotted data compared too; hostile owner, key and
//! user-agent strings must come out escaped in every format, and no secret anywhere.
//! Headless Chromium renders the HTML and the screenshot is kept under
//! `target/tmp/notify-artifacts/` for a person to look at. On Telegram the reminder is the
//! same chart as a photo (`sendPhoto`, a multipart upload the stand-in checks as the Bot API
//! does) with the head of the text as its caption and the rest in messages after it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use mail_parser::{MessageParser, MimeHeaders, PartType};
use scraper::{Html, Selector};

use crate::support::{free_port, Api, Smtp, StandIn};
use keywatch::aggregate::{SourceKey, SourceStats};
use keywatch::chart::{self, AdoptionChart};
use keywatch::detect::{evaluate_rotation, Finding, HourRow, Policy, RotationData, RotationStatus};
use keywatch::notify::{Config, Console, Notifier};
use keywatch::registry::{format_local, Registry};
use keywatch::store::SqliteStore;

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;
const DAY: i64 = 24 * HOUR;

/// Markup, quotes and Slack syntax in every string that comes from outside keywatch.
const EVIL_OWNER: &str = "evil <b>&co</b> 'x' *y*";
const EVIL_KEY_NAME: &str = "billing <A> \"v1\" </td><script>k()</script>";
const HOSTILE_UA: &str = "<script>alert('x')</script> *bold* `tick` <!here> \"q\" </td></tr><img src=x onerror=alert(1)>";
const SLACK_PATH: &str = "/services/T000/B000/slack-secret-part";

fn at(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_millis()
}

fn registry(dir: &Path, slack_url: &str) -> Registry {
    std::fs::write(dir.join("slack-evil"), format!("{slack_url}\n")).unwrap();
    let text = format!(
        r#"
[owners."{EVIL_OWNER}"]
timezone = "Europe/Berlin"
email = ["billing@acme.example"]
slack_webhook_file = "{dir}/slack-evil"

[[keys]]
id = "key-a"
name = '{EVIL_KEY_NAME}'
owner = "{EVIL_OWNER}"
state = "rotating"
successor = "key-b"
rotation_started = "2026-11-10T09:00"
deadline = "2026-11-24T18:00"

[[keys]]
id = "key-b"
name = "billing B"
owner = "{EVIL_OWNER}"
version = 2
"#,
        dir = dir.display()
    );
    Registry::parse("keys.toml", &text).unwrap()
}

/// Eleven days of a rotation that moves most traffic in its first week and then slows
/// down, with four hosts still on the old key (hostile user agents), as the detector sees it.
fn rotation(registry: &Registry, now: i64) -> (RotationStatus, Vec<Finding>) {
    let old = registry.key("key-a").unwrap();
    let start = old.rotation.unwrap().started_ms;
    let row = |key: &str, ip: &str, ua: &str, first: i64, last: i64, n: u64| {
        (
            SourceKey {
                key_id: key.into(),
                ip: ip.into(),
                user_agent: ua.into(),
                endpoint: "/v1/invoices?customer=<x>".into(),
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
    let start_hour = start / HOUR * HOUR;
    let hourly = (0..(now - start_hour) / HOUR)
        .map(|h| {
            let t = start_hour + h * HOUR;
            // Office hours carry more traffic; the share rises fast, then slowly.
            let local_hour = (h + 10) % 24;
            let requests = if (8..19).contains(&local_hour) {
                120
            } else {
                30
            };
            let share = (1.0 - (-(h as f64) / 70.0).exp()) * 0.82;
            let new = (requests as f64 * share).round() as u64;
            HourRow {
                hour_ms: t,
                old_requests: requests - new,
                old_failures: 0,
                new_requests: new,
                new_failures: 0,
            }
        })
        .collect();
    let data = RotationData {
        old_key: "key-a".into(),
        new_key: "key-b".into(),
        old_sources: vec![
            row(
                "key-a",
                "10.20.1.13",
                "python-requests/2.31.0",
                start - DAY,
                now - 5 * MIN,
                5400,
            ),
            row(
                "key-a",
                "10.20.7.2",
                HOSTILE_UA,
                start - DAY,
                now - 20 * MIN,
                1300,
            ),
            row(
                "key-a",
                "10.20.9.44",
                &format!("{HOSTILE_UA} {}", "A".repeat(3000)),
                start,
                now - HOUR,
                210,
            ),
            row("key-a", "", "cron-billing/0.9", start, now - 2 * HOUR, 48),
        ],
        new_sources: vec![row(
            "key-b",
            "10.9.9.9",
            "switched/1.0",
            start + HOUR,
            now - MIN,
            30_000,
        )],
        hourly,
    };
    evaluate_rotation(
        now,
        old,
        registry.key("key-b"),
        registry.timezone_of("key-a"),
        &Policy::default(),
        &data,
    )
}

fn routes(port: u16) -> String {
    format!(
        r#"
[defaults]
group_wait = "0s"
[retry]
first = "1s"
max = "30s"
give_up_after = "1h"
timeout = "5s"
[channels.mail]
type = "email"
host = "127.0.0.1"
port = {port}
security = "none"
from = "keywatch <keywatch@example.com>"
[channels.slack]
type = "slack"
[receivers.owner]
owner = true
channels = ["mail", "slack"]
[[routes]]
receivers = ["owner"]
"#
    )
}

fn select<'a>(doc: &'a Html, css: &str) -> Vec<scraper::ElementRef<'a>> {
    doc.select(&Selector::parse(css).unwrap()).collect()
}

fn text_of(e: &scraper::ElementRef<'_>) -> String {
    e.text()
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where test artifacts go: under the target directory.
fn artifacts() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("notify-artifacts");
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test]
async fn the_reminder_email_is_html_with_the_adoption_chart_and_the_rotation_views_numbers() {
    let api = StandIn::start("1:unused", &[], &[SLACK_PATH]);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let smtp = Smtp::start(port, &dir.path().join("mail"), None, None);
    let registry = Arc::new(registry(dir.path(), &format!("{}{SLACK_PATH}", api.url())));
    let config = Config::parse("routes.toml", &routes(port)).unwrap();
    let store = SqliteStore::open(&dir.path().join("state")).unwrap();
    let console = Arc::new(Mutex::new(Vec::new()));
    let mut n =
        Notifier::with_console(config, registry.clone(), store, Console::Capture(console)).unwrap();
    let now = at("2026-11-21T10:00:00Z");
    let (status, found) = rotation(&registry, now);
    assert_eq!(status.lingering.len(), 4, "{:?}", status.lingering);
    assert!(
        status.forecast.completion_ms.is_some(),
        "{:?}",
        status.forecast
    );
    n.handle(found, std::slice::from_ref(&status), now)
        .await
        .unwrap();

    // --- The MIME structure, as a mail client parses it.
    let mails = smtp.messages();
    assert_eq!(mails.len(), 1, "{mails:?}");
    let raw = mails[0]["data"].as_str().unwrap();
    let msg = MessageParser::default().parse(raw.as_bytes()).unwrap();
    let ct = |p: &mail_parser::MessagePart<'_>| {
        let c = p.content_type().unwrap();
        format!("{}/{}", c.ctype(), c.subtype().unwrap_or(""))
    };
    let root = &msg.parts[0];
    assert_eq!(ct(root), "multipart/alternative");
    let alts = root.sub_parts().unwrap();
    assert_eq!(alts.len(), 2, "text, then the HTML with its pictures");
    let text_part = &msg.parts[alts[0] as usize];
    assert_eq!(ct(text_part), "text/plain");
    let related = &msg.parts[alts[1] as usize];
    assert_eq!(ct(related), "multipart/related");
    let rel = related.sub_parts().unwrap();
    assert_eq!(rel.len(), 2);
    let html_part = &msg.parts[rel[0] as usize];
    assert_eq!(ct(html_part), "text/html");
    let img = &msg.parts[rel[1] as usize];
    assert_eq!(ct(img), "image/png");
    assert!(img.content_disposition().unwrap().is_inline());
    let cid = img
        .content_id()
        .unwrap()
        .trim_matches(['<', '>'])
        .to_owned();
    let png_bytes = match &img.body {
        PartType::Binary(b) | PartType::InlineBinary(b) => b.to_vec(),
        other => panic!("the chart is not binary: {other:?}"),
    };
    let html = match &html_part.body {
        PartType::Html(h) => h.to_string(),
        other => panic!("{other:?}"),
    };
    let text = text_part.text_contents().unwrap().to_owned();
    assert!(
        html.contains(&format!("src=\"cid:{cid}\"")),
        "the HTML shows the inline chart by its cid {cid}"
    );

    // --- The HTML: nothing loaded from outside, the rotation view's numbers.
    let doc = Html::parse_document(&html);
    for e in select(&doc, "[src], [href]") {
        for attr in ["src", "href"] {
            if let Some(v) = e.value().attr(attr) {
                assert!(v.starts_with("cid:"), "{attr}={v}: an external resource");
            }
        }
    }
    assert!(select(&doc, "script, link, iframe, object").is_empty());
    let tz: chrono_tz::Tz = "Europe/Berlin".parse().unwrap();
    let share = format!("{:.0} %", status.share_24h.unwrap() * 100.0);
    assert_eq!(text_of(&select(&doc, "strong.share")[0]), share);
    let bar = select(&doc, "td.bar");
    assert_eq!(
        bar[0].value().attr("width").unwrap(),
        format!("{:.0}%", status.share_24h.unwrap() * 100.0)
    );
    let deadline = text_of(&select(&doc, "td.deadline")[0]);
    assert!(
        deadline.starts_with(&format_local(status.deadline_ms, tz)),
        "{deadline}"
    );
    assert_eq!(deadline, "2026-11-24 18:00 CET");
    assert_eq!(text_of(&select(&doc, ".phase")[0]), status.phase.as_str());
    let forecast = text_of(&select(&doc, "td.forecast")[0]);
    assert!(
        forecast.contains(&format_local(status.forecast.completion_ms.unwrap(), tz)),
        "{forecast}"
    );
    // The same numbers as `keywatch rotations` prints from the same view.
    let table = keywatch::cli::report_rotation::rotations_table(std::slice::from_ref(&status));
    assert!(table.contains(&share), "{table}");
    assert!(table.contains(&format_local(status.deadline_ms, tz)));
    // One row per source still on the old key, in the view's order, with its numbers.
    let rows = select(&doc, "table.sources tr");
    assert_eq!(
        rows.len(),
        status.lingering.len() + 1,
        "a header and a row per source"
    );
    let td = Selector::parse("td").unwrap();
    for (row, src) in rows[1..].iter().zip(&status.lingering) {
        let cells: Vec<String> = row.select(&td).map(|c| text_of(&c)).collect();
        assert_eq!(
            cells[0],
            if src.ip.is_empty() {
                "(no IP)"
            } else {
                &src.ip
            }
        );
        assert_eq!(cells[3], src.requests.to_string());
        assert_eq!(cells[4], format_local(src.last_seen_ms, tz));
        // The user agent as text (its markup is text), cut at 160 characters.
        let ua = src
            .user_agent
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let head: String = ua.chars().take(40).collect();
        assert!(cells[1].starts_with(&head), "{} / {head}", cells[1]);
        assert!(cells[1].chars().count() <= 160, "{}", cells[1]);
    }

    // --- Hostile strings: escaped in the HTML (never markup), as they are in the text.
    for bad in ["<script", "<img src=x", "</td></tr><img", "<b>&co"] {
        assert!(!html.contains(bad), "{bad} unescaped in the HTML");
    }
    assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
    assert!(html.contains("evil &lt;b&gt;&amp;co&lt;/b&gt; &#39;x&#39; *y*"));
    assert!(html
        .contains("billing &lt;A&gt; &quot;v1&quot; &lt;/td&gt;&lt;script&gt;k()&lt;/script&gt;"));
    // Parsed, they come back as the owner's strings.
    let all_text = text_of(&select(&doc, "body")[0]);
    assert!(all_text.contains(EVIL_OWNER) && all_text.contains(EVIL_KEY_NAME));
    assert!(all_text.contains("<script>alert('x')</script> *bold*"));
    assert!(text.contains(HOSTILE_UA) && text.contains(EVIL_KEY_NAME));
    assert!(
        !text.contains(&"A".repeat(300)),
        "the long user agent is cut"
    );
    assert_eq!(
        mails[0]["subject"].as_str().unwrap(),
        msg.subject().unwrap(),
        "one subject"
    );

    // --- The chart: a PNG of the announced size whose plotted data is the view's.
    let dec = png::Decoder::new(std::io::Cursor::new(&png_bytes));
    let reader = dec.read_info().unwrap();
    assert_eq!(
        (reader.info().width, reader.info().height),
        (chart::WIDTH, chart::HEIGHT)
    );
    let data = chart::png_data(&png_bytes).expect("the chart carries its data");
    // Through the same JSON text on both sides (serde_json's float parsing is not exact).
    let want: serde_json::Value =
        serde_json::from_str(&serde_json::to_string(&AdoptionChart::from_status(&status)).unwrap())
            .unwrap();
    assert!(
        data == want,
        "the chart's data differs from the rotation view's"
    );
    let points = data["points"].as_array().unwrap();
    assert_eq!(points.len(), status.share.len());
    for (p, s) in points.iter().zip(&status.share) {
        assert_eq!(p["hour_ms"], s.hour_ms);
        assert_eq!(p["requests"], s.requests);
        assert!((p["share"].as_f64().unwrap() - s.share).abs() < 1e-12);
    }
    assert_eq!(data["deadline_ms"], status.deadline_ms);
    assert_eq!(data["forecast_ms"], status.forecast.completion_ms.unwrap());

    // --- Slack: Block Kit within its limits (the stand-in refuses more), escaped.
    let slack: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.api == Api::Slack)
        .collect();
    assert_eq!(slack.len(), 1);
    assert!(slack[0].accepted, "{}", slack[0].answer);
    let blocks = slack[0].body["blocks"].as_array().unwrap();
    assert_eq!(blocks[0]["type"], "header");
    assert!(blocks.iter().any(|b| b["fields"].is_array()));
    assert_eq!(blocks.last().unwrap()["type"], "context");
    let block_json = serde_json::to_string(blocks).unwrap();
    assert!(block_json.contains(&share));
    for b in blocks {
        let texts = b["text"]["text"].as_str().into_iter().chain(
            b["fields"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f["text"].as_str()),
        );
        for t in texts {
            if b["type"] == "header" {
                continue; // plain text: Slack shows it as it is
            }
            assert!(!t.contains('<') && !t.contains('>'), "raw markup in {t}");
            for line in t.lines() {
                assert_eq!(
                    line.matches('`').count() % 2,
                    0,
                    "unbalanced code span: {line}"
                );
            }
        }
    }
    assert!(block_json.contains("&lt;!here&gt;") && block_json.contains("ˋtickˋ"));
    assert!(!slack[0].text().is_empty(), "the text fallback is kept");

    // --- No secret anywhere: the Slack webhook's secret path is in no mail, no log row.
    let secret = SLACK_PATH.rsplit('/').next().unwrap();
    assert!(!raw.contains(secret));
    assert!(!block_json.contains(secret));
    let log = SqliteStore::open(&dir.path().join("state")).unwrap();
    for m in log.notify_messages(i64::MIN).unwrap() {
        assert!(
            !m.payload.contains(secret) && !m.address.contains(secret),
            "{}",
            m.address
        );
        assert_eq!(m.state, "sent");
    }

    // --- What the owner sees: Chromium renders the HTML (the chart from a file beside it,
    // as a mail client resolves the cid) and the screenshot is kept.
    let out = artifacts();
    std::fs::write(out.join("adoption-chart.png"), &png_bytes).unwrap();
    std::fs::write(
        out.join("reminder-email.html"),
        html.replace(&format!("cid:{cid}"), "adoption-chart.png"),
    )
    .unwrap();
    let shot = out.join("reminder-email.png");
    screenshot(&out.join("reminder-email.html"), &shot, (760, 1500));
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = dec.read_info().unwrap();
    assert_eq!((reader.info().width, reader.info().height), (760, 1500));
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buf).unwrap();
    let px = frame.line_size / frame.width as usize;
    let pixels: std::collections::HashSet<&[u8]> = buf[..frame.buffer_size()].chunks(px).collect();
    assert!(
        pixels.len() > 50,
        "a rendered page, not a blank one: {} colours",
        pixels.len()
    );
}

/// Debian's chromium, headless: a screenshot of `html` at `size`. Panics when Chromium is
/// missing (scripts/test.sh installs it).
fn screenshot(html: &Path, out: &Path, size: (u32, u32)) {
    let bin = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()))
        .expect("headless Chromium is needed to render the email: apt-get install chromium (scripts/test.sh does)");
    let _ = std::fs::remove_file(out);
    let profile = tempfile::tempdir().unwrap();
    let o = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--force-device-scale-factor=1",
            &format!("--user-data-dir={}", profile.path().display()),
            &format!("--window-size={},{}", size.0, size.1),
            &format!("--screenshot={}", out.display()),
            &format!("file://{}", html.display()),
        ])
        .output()
        .unwrap();
    assert!(
        out.exists(),
        "chromium wrote no screenshot: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `keywatch rotations --chart DIR` on the quick-start sample: one PNG per rotation, drawn
/// from the same view as the table it prints (its share and deadline), and the table's
/// share column carries the sparkline.
#[test]
fn rotations_chart_writes_one_png_per_rotation_from_the_printed_view() {
    use crate::support::{config, keywatch, run_ok, SECRET};
    let dir = tempfile::tempdir().unwrap();
    let cwd = std::env::current_dir().unwrap();
    let cfg = config(
        dir.path(),
        &cwd.join("examples/gateway.log"),
        "kong",
        &format!("[rules]\nkeys = {:?}\n", cwd.join("examples/registry.toml")),
    );
    run_ok(
        keywatch()
            .args(["run", "--config"])
            .arg(&cfg)
            .env("KW_TEST_SECRET", SECRET),
    );
    let charts = dir.path().join("charts");
    let out = run_ok(
        keywatch()
            .args(["rotations", "--config"])
            .arg(&cfg)
            .arg("--chart")
            .arg(&charts),
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut pngs: Vec<PathBuf> = std::fs::read_dir(&charts)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    pngs.sort();
    let rotations = stdout.matches(" → ").count();
    assert!(rotations >= 1, "{stdout}");
    assert_eq!(
        pngs.len(),
        1,
        "one rotation in the sample: {pngs:?}\n{stdout}"
    );
    assert!(
        stdout.contains(&format!("{}", pngs[0].display())),
        "{stdout}"
    );
    let bytes = std::fs::read(&pngs[0]).unwrap();
    let data = chart::png_data(&bytes).expect("a chart written by keywatch");
    let share = format!("{:.0} %", data["share_24h"].as_f64().unwrap() * 100.0);
    assert!(
        stdout.contains(&share),
        "the table's share {share}:\n{stdout}"
    );
    let tz: chrono_tz::Tz = data["timezone"].as_str().unwrap().parse().unwrap();
    let deadline = format_local(data["deadline_ms"].as_i64().unwrap(), tz);
    assert!(stdout.contains(&deadline), "{deadline}:\n{stdout}");
    assert!(
        stdout.chars().any(|c| ('▁'..='█').contains(&c)),
        "a sparkline in the table:\n{stdout}"
    );
    assert!(!data["points"].as_array().unwrap().is_empty());
}

/// A message too big for one Slack message (more than 50 blocks: twenty leaked keys used
/// from hostile hosts) goes as several, each within Block Kit's limits as the strict
/// stand-in checks them, with the text fallback on each; every key is in one of them.
#[tokio::test]
async fn slack_messages_past_fifty_blocks_go_in_several_within_the_limits() {
    use keywatch::detect::Engine;
    use keywatch::event::{AuthEvent, Outcome};
    let api = StandIn::start("1:unused", &[], &[SLACK_PATH]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("slack-evil"),
        format!("{}{SLACK_PATH}\n", api.url()),
    )
    .unwrap();
    let mut keys = format!(
        "[owners.\"{EVIL_OWNER}\"]\nslack_webhook_file = \"{}/slack-evil\"\n",
        dir.path().display()
    );
    for i in 0..20 {
        keys.push_str(&format!(
            "[[keys]]\nid = \"leaked-{i}\"\nname = '{EVIL_KEY_NAME} {i}'\nowner = \"{EVIL_OWNER}\"\nstate = \"revoked\"\n"
        ));
    }
    let registry = Arc::new(Registry::parse("keys.toml", &keys).unwrap());
    let config = Config::parse(
        "routes.toml",
        "[defaults]\ngroup_wait = \"0s\"\nmax_parts = 10\n[channels.slack]\ntype = \"slack\"\n\
         [receivers.owner]\nowner = true\nchannels = [\"slack\"]\n[[routes]]\nreceivers = [\"owner\"]\n",
    )
    .unwrap();
    let store = SqliteStore::open(&dir.path().join("state")).unwrap();
    let mut n = Notifier::with_console(
        config,
        registry.clone(),
        store,
        Console::Capture(Arc::new(Mutex::new(Vec::new()))),
    )
    .unwrap();
    let now = at("2026-11-21T10:00:00Z");
    let mut engine = Engine::new(registry.clone(), Policy::default());
    for i in 0..20 {
        let mut ev = AuthEvent::new(now, format!("leaked-{i}").into(), 200, Outcome::Ok);
        ev.source_ip = Some(format!("198.51.100.{i}").into());
        ev.user_agent = Some(HOSTILE_UA.to_owned().into());
        ev.endpoint = Some("/v1/<x>".into());
        engine.observe(&ev);
    }
    let found = engine.take_pending();
    assert_eq!(found.len(), 20);
    n.handle(found, &[], now).await.unwrap();

    let slack: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.api == Api::Slack)
        .collect();
    assert!(slack.len() >= 2, "{} messages", slack.len());
    let mut all = String::new();
    for r in &slack {
        assert!(r.accepted, "{}: {}", r.status, r.answer);
        let blocks = r.body["blocks"].as_array().unwrap();
        assert!(blocks.len() <= 50, "{}", blocks.len());
        assert!(!r.text().is_empty());
        // Markup only in plain-text headers (shown as they are); none in mrkdwn.
        for b in blocks.iter().filter(|b| b["type"] != "header") {
            all.push_str(&serde_json::to_string(b).unwrap());
        }
    }
    for i in 0..20 {
        assert!(all.contains(&format!("`198.51.100.{i}`")), "source {i}");
    }
    assert!(!all.contains("<script>") && all.contains("&lt;script&gt;"));
}

const TG_TOKEN: &str = "987654:tg-photo-secret-part";
const TG_CHAT: &str = "4242";

fn tg_registry(dir: &Path) -> Registry {
    let text = format!(
        r#"
[owners."{EVIL_OWNER}"]
timezone = "Europe/Berlin"
telegram_chat_id = {TG_CHAT}

[[keys]]
id = "key-a"
name = '{EVIL_KEY_NAME}'
owner = "{EVIL_OWNER}"
state = "rotating"
successor = "key-b"
rotation_started = "2026-11-10T09:00"
deadline = "2026-11-24T18:00"

[[keys]]
id = "key-b"
name = "billing B"
owner = "{EVIL_OWNER}"
version = 2

[[keys]]
id = "key-c"
name = "old <c> & co"
owner = "{EVIL_OWNER}"
"#
    );
    let _ = dir;
    Registry::parse("keys.toml", &text).unwrap()
}

fn tg_routes(api_url: &str, token_file: &Path) -> String {
    format!(
        r#"
[defaults]
group_wait = "0s"
[retry]
first = "1s"
max = "30s"
give_up_after = "1h"
timeout = "5s"
[channels.tg]
type = "telegram"
api_url = "{api_url}"
bot_token_file = "{}"
bot = "poll"
[receivers.owner]
owner = true
channels = ["tg"]
[[routes]]
receivers = ["owner"]
"#,
        token_file.display()
    )
}

/// The text of Telegram HTML as the app shows it (tags out, entities read).
fn tg_text(html: &str) -> String {
    let doc = Html::parse_fragment(html);
    doc.root_element().text().collect()
}

#[tokio::test]
async fn on_telegram_the_reminder_is_the_chart_as_a_photo_with_its_caption_then_the_rest() {
    let api = StandIn::start(TG_TOKEN, &[TG_CHAT], &[]);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("tg-token");
    std::fs::write(&token_file, format!("{TG_TOKEN}\n")).unwrap();
    let registry = Arc::new(tg_registry(dir.path()));
    let config = Config::parse("routes.toml", &tg_routes(&api.url(), &token_file)).unwrap();
    let store = SqliteStore::open(&dir.path().join("state")).unwrap();
    let console = Arc::new(Mutex::new(Vec::new()));
    let mut n =
        Notifier::with_console(config, registry.clone(), store, Console::Capture(console)).unwrap();
    let now = at("2026-11-21T10:00:00Z");
    let (status, found) = rotation(&registry, now);
    n.handle(found, std::slice::from_ref(&status), now)
        .await
        .unwrap();

    // --- One photo, then the rest of the message as text, in that order.
    let calls: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.api == Api::Telegram)
        .collect();
    let photos = api.telegram_calls("sendPhoto");
    assert_eq!(photos.len(), 1, "{calls:?}");
    let photo = &photos[0];
    assert!(
        photo.accepted,
        "the Bot API refused the photo: {}",
        photo.answer
    );
    assert!(
        photo
            .header("content-type")
            .unwrap()
            .starts_with("multipart/form-data; boundary="),
        "{:?}",
        photo.header("content-type")
    );
    let texts = api.telegram_calls("sendMessage");
    assert!(texts.iter().all(|t| t.accepted), "{texts:?}");
    assert!(
        !texts.is_empty(),
        "the rest of the message follows the photo"
    );
    assert_eq!(api.sent_to(TG_CHAT).len(), texts.len() + 1);
    assert!(
        calls[0].path.ends_with("/sendPhoto"),
        "the photo comes first"
    );
    assert!(texts.iter().all(|t| t.at >= photo.at));

    // --- The photo: the rotation's adoption chart, a PNG of the chart's size.
    assert_eq!(photo.files.len(), 1);
    let file = &photo.files[0];
    assert_eq!(file.field, "photo");
    assert_eq!(file.content_type.as_deref(), Some("image/png"));
    let reader = png::Decoder::new(std::io::Cursor::new(&file.data))
        .read_info()
        .unwrap();
    assert_eq!(
        (reader.info().width, reader.info().height),
        (chart::WIDTH, chart::HEIGHT)
    );
    let data = chart::png_data(&file.data).expect("the chart carries its data");
    let want: serde_json::Value =
        serde_json::from_str(&serde_json::to_string(&AdoptionChart::from_status(&status)).unwrap())
            .unwrap();
    assert!(data == want, "the photo is not this rotation's chart");

    // --- The caption: HTML within 1024 characters after parsing; with the rest, the whole
    // message, nothing lost at the cut.
    assert_eq!(photo.body["chat_id"], TG_CHAT);
    assert_eq!(photo.body["parse_mode"], "HTML");
    let caption = photo.body["caption"].as_str().unwrap();
    let parsed = crate::support::check_telegram_caption(caption).unwrap();
    assert!((1..=1024).contains(&parsed), "{parsed}");
    assert!(caption.encode_utf16().count() <= 1024);
    assert!(
        caption.contains(&format!("{:.0}", status.share_24h.unwrap() * 100.0)),
        "the share in the caption: {caption}"
    );
    let rest: Vec<&str> = texts.iter().map(|t| t.text()).collect();
    let whole = format!("{caption}\n{}", rest.join("\n"));
    // For a person to look at: the photo, the caption and the messages after it.
    let out = artifacts();
    std::fs::write(out.join("telegram-photo.png"), &file.data).unwrap();
    std::fs::write(
        out.join("telegram-reminder.txt"),
        format!(
            "--- photo caption ({parsed} characters after parsing)\n{caption}\n--- {} message(s) after it\n{}\n",
            rest.len(),
            rest.join("\n---\n")
        ),
    )
    .unwrap();
    for t in &rest {
        crate::support::check_telegram_html(t).unwrap();
    }
    let shown = tg_text(&whole);
    for (i, src) in status.lingering.iter().enumerate() {
        assert!(
            shown.contains(&format!("{} requests", src.requests)),
            "source {i} ({} requests) lost: {shown}",
            src.requests
        );
    }
    assert!(shown.contains("What to do:"), "{shown}");

    // --- The buttons on the last message, which carries them; none on the photo.
    assert!(photo.body.get("reply_markup").is_none(), "{:?}", photo.body);
    let last = texts.last().unwrap();
    let buttons = serde_json::to_string(&last.body["reply_markup"]).unwrap();
    assert!(buttons.contains("kw:ack:key-a"), "{buttons}");
    for t in &texts[..texts.len() - 1] {
        assert!(t.body.get("reply_markup").is_none());
    }

    // --- Hostile strings are text, never markup, in the caption and the rest.
    for bad in ["<script", "<img src=x", "</td></tr>", "<b>&co", "<A>"] {
        assert!(!whole.contains(bad), "{bad} unescaped: {whole}");
    }
    assert!(
        whole.contains("&lt;script&gt;alert('x')&lt;/script&gt;"),
        "{whole}"
    );
    assert!(whole.contains("evil &lt;b&gt;&amp;co&lt;/b&gt;"), "{whole}");
    assert!(
        whole.contains(
            "billing &lt;A&gt; &quot;v1&quot; &lt;/td&gt;&lt;script&gt;k()&lt;/script&gt;"
        ),
        "{whole}"
    );
    assert!(shown.contains(EVIL_OWNER) && shown.contains(EVIL_KEY_NAME));

    // --- No secret in any request's content or headers (the token is only in the path,
    // where the Bot API wants it), nor in the log.
    let secret = TG_TOKEN.split_once(':').unwrap().1;
    for r in api.requests() {
        assert!(!r.body.to_string().contains(secret), "{:?}", r.body);
        for (k, v) in &r.headers {
            assert!(!v.contains(secret), "{k}: {v}");
        }
        for f in &r.files {
            assert!(!f.data.windows(secret.len()).any(|w| w == secret.as_bytes()));
        }
    }
    let log = SqliteStore::open(&dir.path().join("state")).unwrap();
    let rows = log.notify_messages(i64::MIN).unwrap();
    assert!(!rows.is_empty());
    for m in &rows {
        assert!(!m.payload.contains(secret) && !m.address.contains(secret));
        assert_eq!(m.state, "sent", "{}", m.payload);
    }

    // --- A finding without a rotation stays text: no photo, one message.
    let later = now + HOUR;
    let age = Finding {
        kind: keywatch::detect::FindingKind::KeyAgeExceeded,
        key_id: "key-c".into(),
        owner: Some(EVIL_OWNER.into()),
        at_ms: later,
        severity: keywatch::detect::Severity::Warning,
        summary: "key old <c> & co is 400 days old".into(),
        evidence: serde_json::json!({}),
        dedup_key: "key_age_exceeded:key-c".into(),
    };
    let before = api.sent_to(TG_CHAT).len();
    n.handle(vec![age], std::slice::from_ref(&status), later)
        .await
        .unwrap();
    assert_eq!(api.telegram_calls("sendPhoto").len(), 1, "no second photo");
    let after = api.sent_to(TG_CHAT);
    assert_eq!(after.len(), before + 1);
    let age_text = after.last().unwrap().text();
    assert!(age_text.contains("old &lt;c&gt; &amp; co"), "{age_text}");
    assert!(after.last().unwrap().body.get("reply_markup").is_none());

    // --- Without a rotation view (no chart can be drawn), the same reminder is text alone
    // (a notifier of its own, so that nothing is held back as already sent).
    let config = Config::parse("routes.toml", &tg_routes(&api.url(), &token_file)).unwrap();
    let store = SqliteStore::open(&dir.path().join("state2")).unwrap();
    let console = Arc::new(Mutex::new(Vec::new()));
    let mut n2 =
        Notifier::with_console(config, registry.clone(), store, Console::Capture(console)).unwrap();
    let before = api.sent_to(TG_CHAT).len();
    let (_, found) = rotation(&registry, now);
    n2.handle(found, &[], now).await.unwrap();
    assert_eq!(
        api.telegram_calls("sendPhoto").len(),
        1,
        "no photo without a chart"
    );
    let after = api.sent_to(TG_CHAT);
    assert!(after.len() > before, "the reminder went as text");
    let buttons = serde_json::to_string(&after.last().unwrap().body["reply_markup"]).unwrap();
    assert!(buttons.contains("kw:ack:key-a"), "{buttons}");
}
