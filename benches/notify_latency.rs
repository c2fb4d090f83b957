//! Latency from a revoked-key event entering keywatch to the webhook receiving the message,
//! p50 / p99 / max over 1,000 events (goal: p99 under one second).
//!
//! Two measurements:
//! - `daemon`: the real binary following a log file (`keywatch run`, with
//!   `[rules] routes`): from appending the line to the local webhook (tests/it/support/standins) having
//!   the request.
//! - `notifier`: the library alone: from `Notifier::handle` receiving the finding to the
//!   webhook having the request (routing, the SQLite log, rendering, HTTP).
//!
//! `cargo bench --bench notify_latency` (release build). Events are paced (one every 10 ms)
//! so that the figure is latency, not a queue under overload. Each event uses its own
//! source IP, so each is its own finding and its own message (`group_by = ["finding"]`).

#[path = "../tests/it/support/standins/mod.rs"]
mod support;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keywatch::detect::{Engine, Policy};
use keywatch::event::{AuthEvent, Outcome};
use keywatch::notify::{Config, Console, Notifier};
use keywatch::registry::Registry;
use keywatch::store::SqliteStore;
use support::StandIn;

const EVENTS: usize = 1000;
const PACE: Duration = Duration::from_millis(10);
const REVOKED: &str = "5b0e3c1a-revoked-key-0001";

fn ip(i: usize) -> String {
    format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256)
}

fn report(name: &str, mut lat: Vec<Duration>, lost: usize) {
    lat.sort();
    let q = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "notify_latency/{name}: {} events, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms{}",
        lat.len(),
        q(0.5).as_secs_f64() * 1e3,
        q(0.99).as_secs_f64() * 1e3,
        lat.last().unwrap().as_secs_f64() * 1e3,
        if lost > 0 {
            format!(", {lost} not delivered")
        } else {
            String::new()
        }
    );
}

const ROUTES: &str = r#"
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
"#;

const KEYS: &str = "[owners.acme-billing]\n\
    [[keys]]\nid = \"5b0e3c1a-revoked-key-0001\"\nowner = \"acme-billing\"\nstate = \"revoked\"\n";

/// The notifier alone, in process.
fn notifier() {
    let hook = StandIn::start("unused:token", &[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::parse("keys.toml", KEYS).unwrap());
    let config = Config::parse("routes.toml", &ROUTES.replace("{hook}", &hook.url())).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut engine = Engine::new(registry.clone(), Policy::default());
    let mut n = Notifier::with_console(
        config,
        registry,
        SqliteStore::open(dir.path()).unwrap(),
        Console::capture().0,
    )
    .unwrap();
    let mut started = Vec::with_capacity(EVENTS);
    rt.block_on(async {
        for i in 0..EVENTS {
            let now = keywatch::notify::wall_ms();
            let mut ev = AuthEvent::new(now, REVOKED.into(), 200, Outcome::Ok);
            ev.source_ip = Some(ip(i).into());
            engine.observe(&ev);
            let found = engine.take_pending();
            let t = Instant::now();
            n.handle(found, &[], now).await.unwrap();
            started.push(t);
            tokio::time::sleep(PACE).await;
        }
    });
    let got = hook.wait_accepted(EVENTS, Duration::from_secs(60));
    let mut at: HashMap<String, Instant> = HashMap::new();
    for r in &got {
        at.insert(
            r.body["findings"][0]["evidence"]["ip"]
                .as_str()
                .unwrap()
                .to_owned(),
            r.at,
        );
    }
    let lat: Vec<Duration> = (0..EVENTS)
        .filter_map(|i| at.get(&ip(i)).map(|a| a.duration_since(started[i])))
        .collect();
    let lost = EVENTS - lat.len();
    report("notifier", lat, lost);
}

fn kong_line(ip: &str, ts_ms: i64) -> String {
    format!(
        r#"{{"request":{{"method":"POST","uri":"/v1/invoices","headers":{{"user-agent":"bench/1"}},"id":"r{ts_ms}"}},"response":{{"status":200}},"latencies":{{"request":5,"kong":1,"proxy":4}},"client_ip":"{ip}","started_at":{ts_ms},"authenticated_entity":{{"id":"{REVOKED}"}}}}"#
    )
}

/// The real daemon following a file. `Err` says why it was skipped.
fn daemon() -> Result<(), String> {
    let hook = StandIn::start("unused:token", &[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("keys.toml"), KEYS).unwrap();
    std::fs::write(d.join("routes.toml"), ROUTES.replace("{hook}", &hook.url())).unwrap();
    let log = d.join("access.log");
    std::fs::write(&log, "").unwrap();
    let config = d.join("keywatch.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {state:?}\n[input]\nkind = \"file\"\npath = {log:?}\nformat = \"kong\"\n\
             follow = true\n[fingerprint]\nsecret_env = \"KW_BENCH_SECRET\"\n\
             [pipeline]\nbatch_max_wait = \"20ms\"\n[server]\nenabled = false\n\
             [rules]\nkeys = {keys:?}\npolicy = {policy:?}\nroutes = {routes:?}\n",
            state = d.join("state"),
            keys = d.join("keys.toml"),
            policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/policy.toml"),
            routes = d.join("routes.toml"),
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_keywatch");
    let check = Command::new(bin)
        .args(["check-config"])
        .arg(&config)
        .env("KW_BENCH_SECRET", "bench-secret-0123456789abcdef")
        .output()
        .map_err(|e| format!("cannot run keywatch: {e}"))?;
    if !check.status.success() {
        return Err(format!(
            "`keywatch check-config` refuses [rules] routes: {}",
            String::from_utf8_lossy(&check.stderr).trim()
        ));
    }
    let mut child = Command::new(bin)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("KW_BENCH_SECRET", "bench-secret-0123456789abcdef")
        .env_remove("KEYWATCH_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start keywatch: {e}"))?;
    // Ready once the first event made it through.
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    let warm = Instant::now();
    writeln!(f, "{}", kong_line("192.0.2.1", keywatch::notify::wall_ms())).unwrap();
    while hook.accepted().is_empty() {
        if warm.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            return Err("no notification from the daemon within 20 s: not wired yet?".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut written = Vec::with_capacity(EVENTS);
    for i in 0..EVENTS {
        writeln!(f, "{}", kong_line(&ip(i), keywatch::notify::wall_ms())).unwrap();
        f.flush().unwrap();
        written.push(Instant::now());
        std::thread::sleep(PACE);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while hook.accepted().len() < EVENTS + 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let mut at: HashMap<String, Instant> = HashMap::new();
    for r in hook.accepted() {
        for f in r.body["findings"].as_array().into_iter().flatten() {
            at.entry(f["evidence"]["ip"].as_str().unwrap_or("").to_owned())
                .or_insert(r.at);
        }
    }
    let lat: Vec<Duration> = (0..EVENTS)
        .filter_map(|i| at.get(&ip(i)).map(|a| a.duration_since(written[i])))
        .collect();
    if lat.is_empty() {
        return Err("no event reached the webhook".into());
    }
    let lost = EVENTS - lat.len();
    report("daemon", lat, lost);
    Ok(())
}

fn main() {
    // `cargo test --benches` runs benches with --bench absent: keep it quick there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("notify_latency: run with `cargo bench --bench notify_latency`");
        return;
    }
    if let Err(why) = daemon() {
        println!("notify_latency/daemon: skipped: {why}");
    }
    notifier();
}
