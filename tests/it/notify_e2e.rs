//! Acceptance: the real binary, following a gateway log, notifies a webhook when a revoked
//! key is used: exactly one message, within a few seconds, and none again after a restart.
//!
//! Like Alertmanager's acceptance tests: `keywatch run --config FILE` with a
//! `[rules] keys = …, policy = …, routes = …` section, a local webhook (tests/support), and
//! the time window in which the message must arrive.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::StandIn;

const SECRET: &str = "notify-e2e-fingerprint-secret-0123456789";
const REVOKED: &str = "5b0e3c1a-revoked-key-0001";

/// One Kong log record: a request with credential `key` from `ip`.
pub fn kong_line(key: &str, ip: &str, ts_ms: i64) -> String {
    format!(
        r#"{{"request":{{"method":"POST","uri":"/v1/invoices","url":"https://api.example.com/v1/invoices","querystring":{{}},"size":120,"headers":{{"host":"api.example.com","user-agent":"billing-sync/2.1"}},"id":"req-{ts_ms}"}},"upstream_uri":"/v1/invoices","response":{{"status":200,"size":10,"headers":{{}}}},"latencies":{{"request":12,"kong":1,"proxy":11}},"client_ip":"{ip}","started_at":{ts_ms},"authenticated_entity":{{"id":"{key}"}},"consumer":{{"id":"c-1","username":"acme-billing"}}}}"#
    )
}

/// keys.toml, routes.toml and keywatch.toml in `dir` for a daemon following `log` and
/// notifying the webhook at `hook`.
pub fn write_config(dir: &Path, log: &Path, hook: &str) -> std::path::PathBuf {
    std::fs::write(
        dir.join("keys.toml"),
        format!(
            "[owners.acme-billing]\ntimezone = \"Europe/Berlin\"\n\
             [[keys]]\nid = \"{REVOKED}\"\nname = \"billing 2025\"\nowner = \"acme-billing\"\n\
             state = \"revoked\"\n\
             [[keys]]\nid = \"live-key-0002\"\nowner = \"acme-billing\"\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("routes.toml"),
        format!(
            r#"
[channels.hook]
type = "webhook"
url = "{hook}/keywatch"
[receivers.security]
channels = ["hook"]
[[routes]]
kinds = ["revoked_key_used"]
receivers = ["security"]
group_by = ["finding"]
group_wait = "0s"
"#
        ),
    )
    .unwrap();
    let config = dir.join("keywatch.toml");
    std::fs::write(
        &config,
        format!(
            r#"state_dir = {state:?}
[input]
kind = "file"
path = {log:?}
format = "kong"
follow = true
start_at = "beginning"
[fingerprint]
secret_env = "KW_NOTIFY_E2E_SECRET"
[pipeline]
batch_max_wait = "20ms"
[server]
enabled = false
[rules]
keys = {keys:?}
policy = {policy:?}
routes = {routes:?}
"#,
            state = dir.join("state"),
            keys = dir.join("keys.toml"),
            policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/policy.toml"),
            routes = dir.join("routes.toml"),
        ),
    )
    .unwrap();
    config
}

pub fn spawn(config: &Path) -> Daemon {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keywatch"))
        .arg("run")
        .arg("--config")
        .arg(config)
        .env("KW_NOTIFY_E2E_SECRET", SECRET)
        .env_remove("KEYWATCH_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting keywatch");
    let mut pipe = child.stderr.take().expect("piped");
    let stderr = std::thread::spawn(move || {
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut pipe, &mut err);
        err
    });
    Daemon { child, stderr }
}

/// The daemon under test, its standard error read as it comes: a pipe nobody reads fills
/// up (64 KiB, a few hundred log lines) and blocks the daemon at its next log line.
pub struct Daemon {
    child: Child,
    stderr: std::thread::JoinHandle<String>,
}

impl std::ops::Deref for Daemon {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.child
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

pub fn stop(mut d: Daemon) -> String {
    let _ = Command::new("kill")
        .args(["-TERM", &d.id().to_string()])
        .status();
    let start = Instant::now();
    while d.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(15) {
            let _ = d.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    d.stderr.join().unwrap_or_default()
}

fn append(log: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new().append(true).open(log).unwrap();
    writeln!(f, "{line}").unwrap();
    f.flush().unwrap();
}

#[test]
fn a_revoked_key_used_reaches_the_webhook_once_within_seconds() {
    let hook = StandIn::start("unused:token", &[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let now = chrono::Utc::now().timestamp_millis();
    // Normal traffic first, so the daemon is known to be following.
    std::fs::write(&log, kong_line("live-key-0002", "10.0.0.1", now) + "\n").unwrap();
    let config = write_config(dir.path(), &log, &hook.url());
    let child = spawn(&config);
    let db = dir.path().join("state/keywatch.db");
    let start = Instant::now();
    while !db.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "keywatch did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));

    let sent = Instant::now();
    append(&log, &kong_line(REVOKED, "203.0.113.66", now + 1000));
    let got = hook.wait_accepted(1, Duration::from_secs(5));
    let took = got[0].at.duration_since(sent);
    // Nothing more arrives: one message for one use.
    std::thread::sleep(Duration::from_secs(2));
    let stderr = stop(child);
    let all = hook.accepted();
    assert_eq!(all.len(), 1, "{all:?}\n{stderr}");
    let f = &all[0].body["findings"][0];
    assert_eq!(f["kind"], "revoked_key_used");
    assert_eq!(f["key_id"], REVOKED);
    assert_eq!(f["evidence"]["ip"], "203.0.113.66");
    assert!(all[0].header("idempotency-key").is_some());
    assert!(took < Duration::from_secs(5), "{took:?}");
    eprintln!("revoked key used → webhook: {took:?}");

    // A restart reads the log again from its stored position and the notification log: the
    // use is not told twice.
    let child = spawn(&config);
    std::thread::sleep(Duration::from_secs(3));
    let stderr = stop(child);
    assert_eq!(hook.accepted().len(), 1, "{stderr}");
}

/// The reminder path through the real daemon: the detectors evaluate the rotation every
/// second and hand every evaluation to the notifier; the owner gets one grouped message
/// (the reminder step and both hosts still on the old key), not one per evaluation, and
/// not again after a restart.
#[test]
fn a_rotation_reminder_lists_the_lingering_hosts_once_across_evaluations_and_restarts() {
    const OLD: &str = "rotating-old-key-0001";
    const NEW: &str = "rotating-new-key-0002";
    let hook = StandIn::start("unused:token", &[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let now = chrono::Utc::now().timestamp_millis();
    let hour = 3_600_000;
    let fmt = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap()
            .to_rfc3339()
    };
    // Started 30 h ago, due in 2 days: the "3d" step (a day ago) is the one due now.
    let mut lines = Vec::new();
    for i in 0..6 {
        let t = now - 90 * 60_000 + i * 60_000;
        lines.push(kong_line(OLD, "10.1.1.1", t));
        lines.push(kong_line(OLD, "10.2.2.2", t + 1));
        lines.push(kong_line(NEW, "10.3.3.3", t + 2));
    }
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    let config = write_config(dir.path(), &log, &hook.url());
    std::fs::write(
        dir.path().join("keys.toml"),
        format!(
            "[owners.acme-billing]\ntimezone = \"Europe/Berlin\"\n\
             [[keys]]\nid = \"{OLD}\"\nowner = \"acme-billing\"\nstate = \"rotating\"\n\
             successor = \"{NEW}\"\nrotation_started = {:?}\ndeadline = {:?}\n\
             [[keys]]\nid = \"{NEW}\"\nowner = \"acme-billing\"\n",
            fmt(now - 30 * hour),
            fmt(now + 48 * hour),
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("routes.toml"),
        format!(
            r#"
[channels.hook]
type = "webhook"
url = "{}/keywatch"
[receivers.owner]
owner = true
channels = ["hook"]
[[routes]]
kinds = ["rotation_reminder", "lingering_old_key"]
receivers = ["owner"]
group_by = ["key"]
group_wait = "1s"
"#,
            hook.url()
        ),
    )
    .unwrap();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[rules]\n", "[rules]\nevaluate_every = \"1s\"\n");
    std::fs::write(&config, text).unwrap();

    let child = spawn(&config);
    let got = hook.wait_accepted(1, Duration::from_secs(20));
    // Several more evaluations: nothing new to tell.
    std::thread::sleep(Duration::from_secs(4));
    let stderr = stop(child);
    let all = hook.accepted();
    assert_eq!(all.len(), 1, "{all:?}\n{stderr}");
    let findings = got[0].body["findings"].as_array().unwrap();
    let kinds: std::collections::BTreeSet<&str> = findings
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["lingering_old_key", "rotation_reminder"].into(),
        "{findings:?}"
    );
    let lingering: std::collections::BTreeSet<&str> = findings
        .iter()
        .filter(|f| f["kind"] == "lingering_old_key")
        .map(|f| f["evidence"]["ip"].as_str().unwrap())
        .collect();
    assert_eq!(lingering, ["10.1.1.1", "10.2.2.2"].into());
    assert!(findings
        .iter()
        .all(|f| f["key_id"] == OLD && f["owner"] == "acme-billing"));
    let reminder = findings
        .iter()
        .find(|f| f["kind"] == "rotation_reminder")
        .unwrap();
    assert!(
        reminder["dedup_key"].as_str().unwrap().ends_with(":3d"),
        "{reminder}"
    );

    // A restart evaluates the same rotation again: the log knows it was told.
    let child = spawn(&config);
    std::thread::sleep(Duration::from_secs(4));
    let stderr = stop(child);
    assert_eq!(hook.accepted().len(), 1, "{stderr}");
}

/// Nothing lost, nothing told twice across kill -9: 300 uses of a revoked key, each from its
/// own host, spread through 30,000 lines that the daemon reads in small batches while it is
/// killed five times at random moments. Every stored finding reaches the webhook under
/// exactly one idempotency key (a message cut short by a kill may be posted again, with
/// the same key, which is how a receiver tells a retry from a new message).
#[test]
fn revoked_key_uses_are_told_once_each_across_kill_9() {
    let hook = StandIn::start("unused:token", &[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let start = chrono::Utc::now().timestamp_millis() - 3_600_000;
    let mut lines = Vec::with_capacity(30_000);
    let mut uses = std::collections::BTreeSet::new();
    for i in 0..30_000i64 {
        if i % 100 == 50 {
            let ip = format!("10.9.{}.{}", i / 25_600, (i / 100) % 256);
            lines.push(kong_line(REVOKED, &ip, start + i * 100));
            uses.insert(ip);
        } else {
            lines.push(kong_line("live-key-0002", "10.0.0.1", start + i * 100));
        }
    }
    assert_eq!(uses.len(), 300);
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    let config = write_config(dir.path(), &log, &hook.url());
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[pipeline]\n", "[pipeline]\nbatch_max_events = 200\n");
    std::fs::write(&config, text).unwrap();

    let db = dir.path().join("state/keywatch.db");
    let stored = || {
        keywatch::store::SqliteStore::open_read_only(&dir.path().join("state"))
            .ok()
            .and_then(|s| s.totals().ok())
            .map_or(0, |(r, _)| r)
    };
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut progress = Vec::new();
    for _ in 0..5 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let mut child = spawn(&config);
        let t = Instant::now();
        while !db.exists() && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(100 + rng % 500));
        child.kill().unwrap();
        child.wait().unwrap();
        progress.push(stored());
    }
    let child = spawn(&config);
    let t = Instant::now();
    while stored() < 30_000 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "stuck at {}",
            stored()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Let the last messages go out.
    let t = Instant::now();
    let told = |hook: &StandIn| {
        let mut by_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in hook.accepted() {
            let key = r.header("idempotency-key").unwrap().to_owned();
            let ips: Vec<String> = r.body["findings"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["evidence"]["ip"].as_str().unwrap().to_owned())
                .collect();
            let e = by_key.entry(key).or_insert_with(|| ips.clone());
            assert_eq!(*e, ips, "a retry carries the same message");
        }
        by_key
    };
    while told(&hook).values().map(Vec::len).sum::<usize>() < 300
        && t.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let stderr = stop(child);
    eprintln!(
        "events stored after each kill: {progress:?}; posts {} for {} messages",
        hook.accepted().len(),
        told(&hook).len()
    );
    let mut told_ips: Vec<String> = told(&hook).into_values().flatten().collect();
    told_ips.sort();
    let mut expected: Vec<String> = uses.into_iter().collect();
    expected.sort();
    assert_eq!(told_ips, expected, "each use told exactly once\n{stderr}");
}
