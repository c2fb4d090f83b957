//! Lifecycle events from a real Apache Kafka broker: a rotation announced only on
//! the lifecycle topic is tracked exactly like one written in the registry file; a key
//! revoked while keywatch runs is caught on its next use; bad events are refused, counted
//! and kept aside without stopping anything.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::kafka::{unique, Broker};
use crate::support::*;
use serde_json::Value;

const EXAMPLE_REGISTRY: &str = include_str!("../../examples/registry.toml");
const OLD: &str = "bb3ab5b2-819d-4491-b795-90ac9c7824e4";
const NEW: &str = "ac009636-a60d-420a-bec7-5e2bf891558f";
const HOOLI: &str = "d95cf136-d366-47db-9db6-681926721e82";

/// The example registry's owners and every key but acme-billing's two (which the lifecycle
/// topic announces instead).
fn registry_without_acme_keys() -> String {
    let mut out = String::new();
    for (i, block) in EXAMPLE_REGISTRY.split("[[keys]]").enumerate() {
        if i == 0 {
            out.push_str(block);
        } else if !block.contains("owner = \"acme-billing\"") {
            out.push_str("[[keys]]");
            out.push_str(block);
        }
    }
    assert!(!out.contains(OLD) && out.contains(HOOLI));
    out
}

fn produce(broker: &Broker, topic: &str, lines: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    run_ok(
        keywatch()
            .current_dir(dir.path())
            .args([
                "produce",
                "--brokers",
                &broker.brokers(),
                "--topic",
                topic,
                "--file",
            ])
            .arg(&file),
    );
}

/// `keywatch findings --json` of a config's state.
fn findings(config: &Path) -> Vec<Value> {
    let out = run_ok(
        keywatch()
            .args(["findings", "--json", "--config"])
            .arg(config)
            .env("KW_TEST_SECRET", SECRET),
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// What a finding says, without when it was computed: (kind, key, owner, dedup key).
fn about(f: &Value) -> (String, String, String, String) {
    let s = |k: &str| f[k].as_str().unwrap_or("-").to_owned();
    (s("kind"), s("key_id"), s("owner"), s("dedup_key"))
}

fn dead_letters(state: &Path) -> Vec<Value> {
    let path = state.join("lifecycle-dead-letter.jsonl");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_rotation_announced_on_kafka_is_tracked_like_one_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let log = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/gateway.log");

    // Reference: the quick start, the rotation written in the registry file.
    let ref_dir = dir.path().join("file");
    std::fs::create_dir_all(&ref_dir).unwrap();
    let ref_config = config(
        &ref_dir,
        &log,
        "kong",
        &format!(
            "[rules]\nkeys = {:?}\n",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/registry.toml")
        ),
    );
    run_ok(&mut run_config(&ref_config));
    let expected: BTreeSet<_> = findings(&ref_config)
        .iter()
        .map(about)
        .filter(|(_, key, _, _)| key == OLD || key == NEW)
        .collect();
    assert!(
        expected.iter().any(|(k, ..)| k == "lingering_old_key"),
        "the sample's rotation has lingering sources: {expected:?}"
    );

    // The same rotation, announced on a 3-partition lifecycle topic, with two bad events.
    let broker_dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(broker_dir.path());
    let topic = unique("lifecycle");
    broker.create_topic(&topic, 3);
    produce(
        &broker,
        &topic,
        &[
            &format!(
                r#"{{"type":"key_created","key_id":"{OLD}","owner":"acme-billing","name":"acme-billing A","version":1,"created_at":"2026-05-04","expires_at":"2027-05-04","scopes":["invoices:read","invoices:write","payments:write"]}}"#
            ),
            r#"{"type":"key_revoked","key_id":"no-such-key"}"#,
            &format!(
                r#"{{"type":"key_created","key_id":"{NEW}","owner":"acme-billing","name":"acme-billing B","version":2,"created_at":"2026-11-21T15:24","expires_at":"2027-11-21","scopes":["invoices:read","invoices:write","payments:write"]}}"#
            ),
            "this is not an event",
            &format!(
                r#"{{"type":"rotation_started","key_id":"{OLD}","successor":"{NEW}","started_at":"2026-11-21T15:24","deadline":"2026-11-24T18:00"}}"#
            ),
        ],
    );
    let kafka_dir = dir.path().join("kafka");
    std::fs::create_dir_all(&kafka_dir).unwrap();
    let registry = kafka_dir.join("registry.toml");
    std::fs::write(&registry, registry_without_acme_keys()).unwrap();
    let kafka_config = config(
        &kafka_dir,
        &log,
        "kong",
        &format!(
            "[rules]\nkeys = {registry:?}\n[rules.lifecycle]\nbrokers = {:?}\ntopic = {topic:?}\n",
            broker.brokers()
        ),
    );
    let out = run_ok(&mut run_config(&kafka_config));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let got: BTreeSet<_> = findings(&kafka_config)
        .iter()
        .map(about)
        .filter(|(_, key, _, _)| key == OLD || key == NEW)
        .collect();
    assert_eq!(got, expected, "stdout:\n{stdout}");

    // The two bad events were kept aside with their reasons; the good ones were not.
    let dead = dead_letters(&kafka_dir.join("state"));
    let reasons: Vec<&str> = dead.iter().map(|d| d["reason"].as_str().unwrap()).collect();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("unknown key no-such-key")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("expected")),
        "{reasons:?}"
    );
    assert!(dead.iter().all(|d| d["topic"] == topic.as_str()));
}

#[test]
fn a_key_revoked_while_keywatch_runs_is_caught_at_its_next_use() {
    let dir = tempfile::tempdir().unwrap();
    let all = lines_of(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/gateway.log"));
    let half = all.len() / 2;
    // hooli-sync's primary key is used in both halves of the sample.
    let (first, second) = all.split_at(half);
    assert!(first.iter().any(|l| l.contains(HOOLI)) && second.iter().any(|l| l.contains(HOOLI)));
    // Revoked as of the first line of the second half.
    let cut_ms = serde_json::from_str::<Value>(&second[0]).unwrap()["started_at"]
        .as_i64()
        .unwrap();
    let revoked_at = chrono::DateTime::from_timestamp_millis(cut_ms)
        .unwrap()
        .to_rfc3339();

    let log = dir.path().join("access.log");
    std::fs::write(&log, first.join("\n") + "\n").unwrap();
    let registry = dir.path().join("registry.toml");
    std::fs::write(&registry, EXAMPLE_REGISTRY).unwrap();
    let broker_dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(broker_dir.path());
    let topic = unique("lifecycle");
    broker.create_topic(&topic, 1);

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = config(
        dir.path(),
        &log,
        "kong",
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\
             [rules]\nkeys = {registry:?}\nevaluate_every = \"1s\"\n\
             [rules.lifecycle]\nbrokers = {:?}\ntopic = {topic:?}\n",
            broker.brokers()
        ),
    );
    // Follow the file.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("follow = false", "follow = true");
    std::fs::write(&cfg, text).unwrap();
    let mut daemon = spawn_quiet(&mut run_config(&cfg));

    let state = dir.path().join("state");
    wait_for("the first half stored", || {
        try_totals(&state).filter(|(r, _)| *r > 0)
    });
    assert!(
        !findings(&cfg)
            .iter()
            .any(|f| f["kind"] == "revoked_key_used"),
        "nothing is revoked yet"
    );

    produce(
        &broker,
        &topic,
        &[&format!(
            r#"{{"type":"key_revoked","key_id":"{HOOLI}","revoked_at":"{revoked_at}"}}"#
        )],
    );
    wait_for("the lifecycle event applied", || {
        metric(port, "keywatch_lifecycle_events_total{outcome=\"applied\"}").filter(|v| *v >= 1.0)
    });
    let mut appended = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut appended, (second.join("\n") + "\n").as_bytes()).unwrap();

    let revoked = wait_for("a revoked_key_used finding", || {
        let found: Vec<Value> = findings(&cfg)
            .into_iter()
            .filter(|f| f["kind"] == "revoked_key_used")
            .collect();
        (!found.is_empty()).then_some(found)
    });
    assert!(revoked.iter().all(|f| f["key_id"] == HOOLI), "{revoked:?}");
    assert!(revoked.iter().all(|f| f["owner"] == "hooli-sync"));
    assert!(
        revoked.iter().all(|f| {
            chrono::DateTime::parse_from_rfc3339(f["at"].as_str().unwrap())
                .unwrap()
                .timestamp_millis()
                >= cut_ms
        }),
        "only uses after the revocation: {revoked:?}"
    );
    assert!(dead_letters(&state).is_empty());

    sigterm(&daemon);
    let status = wait_with_timeout(&mut daemon, Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
}

fn sigterm(child: &std::process::Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
