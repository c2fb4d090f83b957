//! Rotations, findings and notification attempts in full mode, against a real ClickHouse:
//! the same answers as the embedded store on the same batches, findings new once (across a
//! reopened store too), attempts stored without secrets, and the real binary giving the
//! same `rotations` / `findings` output in full and embedded mode.
//!
//! `KEYWATCH_TEST_CLICKHOUSE_URL` names a running server (scripts/test.sh starts one);
//! without it, a private one is started in a temporary directory.

use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use keywatch::aggregate::Aggregate;
use keywatch::detect::{Finding, FindingKind, RotationSource, Severity};
use keywatch::event::{Decoder, Fingerprinter, Format};
use keywatch::notify::{run_attempt_sink, AttemptRecord};
use keywatch::sample::{generate_sample, SampleOptions};
use keywatch::source::Position;
use keywatch::store::clickhouse::{ClickHouseConfig, ClickHouseStore, Table};
use keywatch::store::{
    BatchWrite, Checkpoint, DetectionStore, Origin, SqliteStore, Store, StoredEvent,
};

use crate::support::clickhouse::ClickHouse;
use crate::support::{keywatch, run_ok};

fn server() -> Arc<ClickHouse> {
    static SHARED: Mutex<Weak<ClickHouse>> = Mutex::new(Weak::new());
    static DIR: Mutex<Option<tempfile::TempDir>> = Mutex::new(None);
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = shared.upgrade() {
        return s;
    }
    let mut dir = DIR.lock().unwrap_or_else(|e| e.into_inner());
    let d = dir.get_or_insert_with(|| {
        tempfile::Builder::new()
            .prefix("keywatch-chd-")
            .tempdir()
            .unwrap()
    });
    let s = Arc::new(ClickHouse::shared_or_start(d.path()));
    *shared = Arc::downgrade(&s);
    s
}

fn database() -> String {
    crate::support::clickhouse::fresh_database("kwdet")
}

fn config(ch: &ClickHouse) -> ClickHouseConfig {
    ClickHouseConfig {
        url: ch.url.clone(),
        database: database(),
        insert_timeout: Duration::from_secs(10),
        mutation_timeout: Duration::from_secs(60),
        // The samples are of fixed dates (November 2026): kept whatever today is.
        retention_days: 0,
        ..ClickHouseConfig::default()
    }
}

fn open(cfg: &ClickHouseConfig) -> ClickHouseStore {
    ClickHouseStore::open_standalone(cfg, None).expect("opening the ClickHouse store")
}

/// The sample's events, decoded as the daemon decodes them, with their line offsets.
fn sample_events(lines: usize) -> (keywatch::sample::Sample, Vec<StoredEvent<'static>>) {
    let s = generate_sample(&SampleOptions {
        lines,
        ..SampleOptions::default()
    })
    .unwrap();
    let d = Decoder::new(
        Format::preset("kong").unwrap(),
        Fingerprinter::new(b"detection-test", 4),
        None,
    );
    let mut events = Vec::new();
    let mut offset = 0i64;
    for line in &s.lines {
        let mut out = Vec::new();
        d.decode(line.as_bytes(), &mut out).unwrap();
        for (i, e) in out.into_iter().enumerate() {
            events.push(StoredEvent {
                event: e.into_owned(),
                origin: Origin {
                    partition: 0,
                    offset,
                    index: i as u32,
                },
            });
        }
        offset += line.len() as i64 + 1;
    }
    (s, events)
}

fn file_position(offset: u64) -> Position {
    Position::Stdin { offset }
}

/// Commits `events` as a file batch ending at `end` (the pipeline's shape).
fn commit(store: &mut dyn Store, events: &[StoredEvent<'_>], end: u64) {
    let mut agg = Aggregate::default();
    for e in events {
        agg.add(&e.event);
    }
    let position = file_position(end);
    store
        .commit(&BatchWrite {
            aggregate: &agg,
            events,
            checkpoint: Some(Checkpoint {
                source: "file:sample.log",
                position: &position,
            }),
        })
        .unwrap();
}

fn sorted(mut d: keywatch::detect::RotationData) -> keywatch::detect::RotationData {
    d.old_sources.sort_by(|a, b| a.0.cmp(&b.0));
    d.new_sources.sort_by(|a, b| a.0.cmp(&b.0));
    d
}

#[test]
fn rotation_data_equals_the_embedded_store_and_ignores_uncommitted_batches() {
    let ch = server();
    let cfg = config(&ch);
    let mut store = open(&cfg);
    let dir = tempfile::tempdir().unwrap();
    let mut sqlite = SqliteStore::open(dir.path()).unwrap();

    let (sample, events) = sample_events(4000);
    let rot = &sample.truth.rotation;
    let (old, new) = (rot.old_key.identity.as_str(), rot.new_key.identity.as_str());
    // Batches of uneven sizes, some minutes and sources split across batches.
    let mut at: usize = 0;
    for size in [1, 700, 13, 1500, 999, usize::MAX] {
        let end = at.saturating_add(size).min(events.len() - 1);
        let batch = &events[at..end];
        let pos = events[end].origin.offset as u64;
        commit(&mut store, batch, pos);
        commit(&mut sqlite, batch, pos);
        at = end;
    }
    // The last events written but never committed (a crash before the offsets row): they
    // must not count until a retry commits them.
    let tail = &events[at..];
    assert!(!tail.is_empty());
    let mut agg = Aggregate::default();
    for e in tail {
        agg.add(&e.event);
    }
    let end = file_position(u64::MAX / 2);
    store
        .commit_without_offsets(&BatchWrite {
            aggregate: &agg,
            events: tail,
            checkpoint: Some(Checkpoint {
                source: "file:sample.log",
                position: &end,
            }),
        })
        .unwrap();

    let first = events.iter().map(|e| e.event.ts_ms).min().unwrap();
    let other = sample
        .truth
        .clients
        .iter()
        .find(|c| c.name != "acme-billing")
        .unwrap();
    let other_key = other.keys[0].identity.as_str();
    let mut checked = 0;
    for (o, n) in [(old, new), (new, old), (old, other_key), (old, old)] {
        for since in [
            i64::MIN,
            0,
            first,
            rot.start_ms,
            rot.start_ms + 1_800_123,
            i64::MAX / 2,
        ] {
            let want = sorted(sqlite.rotation_data(o, n, since).unwrap());
            let got = sorted(store.rotation_data(o, n, since).unwrap());
            assert_eq!(got, want, "rotation_data({o}, {n}, {since})");
            checked += want.hourly.len();
        }
    }
    assert!(
        checked > 100,
        "the sample should give many hours ({checked})"
    );
    let d = store.rotation_data(old, new, rot.start_ms).unwrap();
    assert!(d
        .hourly
        .iter()
        .any(|h| h.old_requests > 0 && h.new_requests > 0));
    assert!(d.old_sources.len() >= 5, "{:?}", d.old_sources);

    // Once the batch is committed (recovery removes its rows, the retry writes them), the
    // stores agree again with it counted.
    store
        .recover("file:sample.log", &[(String::new(), 0)])
        .unwrap();
    let pos = tail.last().unwrap().origin.offset as u64 + 1;
    commit(&mut store, tail, pos);
    commit(&mut sqlite, tail, pos);
    for since in [i64::MIN, rot.start_ms] {
        assert_eq!(
            sorted(store.rotation_data(old, new, since).unwrap()),
            sorted(sqlite.rotation_data(old, new, since).unwrap())
        );
    }
}

fn finding(kind: FindingKind, dedup: &str, at_ms: i64, owner: Option<&str>) -> Finding {
    Finding {
        kind,
        key_id: "A".into(),
        owner: owner.map(str::to_owned),
        at_ms,
        severity: Severity::Warning,
        summary: format!("{dedup} at {at_ms}: o'brien \"quoted\"\t中"),
        evidence: serde_json::json!({"at": at_ms, "sources": ["10.0.0.1", "ua \\ 'x'"]}),
        dedup_key: dedup.into(),
    }
}

/// Every answer of record_findings and findings, side by side with the embedded store.
#[test]
fn findings_are_new_once_across_a_restart_like_the_embedded_store() {
    let ch = server();
    let cfg = config(&ch);
    let dir = tempfile::tempdir().unwrap();
    let mut sqlite = SqliteStore::open(dir.path()).unwrap();
    let mut store = open(&cfg);

    let a = finding(FindingKind::LingeringOldKey, "l:1", 1_000, Some("acme"));
    let b = finding(FindingKind::SafeToRevoke, "s:1", 2_000, None);
    let c = finding(FindingKind::RevokedKeyUsed, "r:1", 1_500, Some("acme"));
    let first = [a.clone(), b.clone(), a.clone(), c.clone()];
    let want = sqlite.record_findings(&first).unwrap();
    assert_eq!(want, [a.clone(), b.clone(), c.clone()]);
    // Through the trait, as the daemon calls it.
    let got = DetectionStore::record_findings(&mut store, &first).unwrap();
    assert_eq!(got, want);
    assert!(store.record_findings(&[]).unwrap().is_empty());
    drop(store);

    // A restart: a new store (and a new instance id) on the same database.
    let store = open(&cfg);
    let a2 = finding(FindingKind::LingeringOldKey, "l:1", 5_000, Some("acme"));
    let early = finding(FindingKind::RevokedKeyUsed, "r:1", 500, Some("acme"));
    let d = finding(FindingKind::RotationReminder, "rem:7d", 3_000, Some("acme"));
    let second = [a2.clone(), b.clone(), early.clone(), d.clone()];
    assert_eq!(sqlite.record_findings(&second).unwrap(), vec![d.clone()]);
    assert_eq!(store.record_findings(&second).unwrap(), vec![d.clone()]);
    // Another instance raising known facts finds them known.
    assert!(store
        .record_findings_as_instance(&[a2.clone(), d.clone()], "other")
        .unwrap()
        .is_empty());
    sqlite.record_findings(&[a2.clone(), d.clone()]).unwrap();

    for (since, kind) in [
        (None, None),
        (Some(2_000), None),
        (Some(5_001), None),
        (None, Some(FindingKind::SafeToRevoke)),
        (None, Some(FindingKind::LingeringOldKey)),
        (Some(1_000), Some(FindingKind::RevokedKeyUsed)),
        (None, Some(FindingKind::UnknownKey)),
    ] {
        let want = sqlite.findings(since, kind).unwrap();
        let got = store.findings(since, kind).unwrap();
        assert_eq!(got, want, "findings({since:?}, {kind:?})");
    }
    let all = store.findings(None, None).unwrap();
    assert_eq!(all.len(), 4);
    let l = all.iter().find(|f| f.finding.dedup_key == "l:1").unwrap();
    assert_eq!((l.first_at_ms, l.last_at_ms, l.count), (1_000, 5_000, 4));
    assert_eq!(l.finding, {
        let mut f = a2.clone();
        f.at_ms = 5_000;
        f
    });
    let r = all.iter().find(|f| f.finding.dedup_key == "r:1").unwrap();
    assert_eq!((r.first_at_ms, r.last_at_ms, r.count), (500, 1_500, 2));
    let s = all.iter().find(|f| f.finding.dedup_key == "s:1").unwrap();
    assert_eq!(s.finding.owner, None);
    assert_eq!(s.count, 2);

    // The version 1 table the dashboards read: one row per fact once merged, the latest.
    let v1 = store
        .query_tsv(&format!(
            "SELECT dedup_key, toUInt32(at), owner FROM {} FINAL ORDER BY dedup_key",
            store.sql().table(Table::Findings)
        ))
        .unwrap();
    assert_eq!(
        v1,
        "l:1\t5\tacme\nr:1\t1\tacme\nrem:7d\t3\tacme\ns:1\t2\t\n"
    );

    // A read-only store (the CLI) reads the same.
    let ro = ClickHouseStore::open_read_only(&cfg, None, None).unwrap();
    assert_eq!(ro.findings(None, None).unwrap(), all);
}

#[test]
fn many_findings_at_once_are_stored_in_chunks() {
    let ch = server();
    let cfg = config(&ch);
    let store = open(&cfg);
    let many: Vec<Finding> = (0..1_234)
        .map(|i| finding(FindingKind::LingeringOldKey, &format!("l:{i:05}"), i, None))
        .collect();
    assert_eq!(store.record_findings(&many).unwrap(), many);
    assert!(store.record_findings(&many).unwrap().is_empty());
    let stored = store.findings(None, None).unwrap();
    assert_eq!(stored.len(), many.len());
    assert!(stored.iter().all(|f| f.count == 2));
}

/// Instances share the findings: a fact another instance stored is known. (Two instances
/// inserting the same fact at once, and the read-back deciding between them, are covered
/// by the unit test of `claimed` in src/store/clickhouse/detection.rs.)
#[test]
fn a_fact_stored_by_another_instance_is_known() {
    let ch = server();
    let cfg = config(&ch);
    let store = open(&cfg);
    let f = finding(FindingKind::RotationAtRisk, "risk:1", 10, None);
    assert_eq!(
        store
            .record_findings_as_instance(std::slice::from_ref(&f), "b")
            .unwrap(),
        vec![f.clone()]
    );
    assert!(store
        .record_findings_as_instance(std::slice::from_ref(&f), "a")
        .unwrap()
        .is_empty());
    let claimed = store
        .query_tsv(&format!(
            "SELECT raised, claimed_by FROM {} ORDER BY raised",
            store.sql().table(Table::FindingState)
        ))
        .unwrap();
    // The fact keeps the instance that first stored it.
    assert_eq!(claimed, "1\tb\n2\tb\n");
}

fn attempt(i: u32, target: &str, detail: Option<&str>) -> AttemptRecord {
    AttemptRecord {
        message_id: format!("m-{i}"),
        recipient: "acme-billing".into(),
        receiver: "owner".into(),
        channel: "tg".into(),
        channel_type: "telegram".into(),
        target: target.into(),
        kinds: "lingering_old_key".into(),
        findings: vec![format!("lingering_old_key:old:new:10.0.0.{i}|curl")],
        severity: "warning".into(),
        created_ms: 1_795_168_800_000,
        attempt: i,
        started_ms: 1_795_168_800_000 + i64::from(i),
        finished_ms: 1_795_168_800_100 + i64::from(i),
        outcome: "transient",
        detail: detail.map(str::to_owned),
    }
}

#[test]
fn attempts_are_stored_without_secrets() {
    let ch = server();
    let cfg = config(&ch);
    let store = open(&cfg);
    let token = "987654321:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsawq";
    let chat = "-1009876543210";
    let hook = "https://hooks.slack.com/services/T0001/B0001/abcdefghijklmnopqrstuvwx";
    let rows = [
        attempt(
            1,
            &format!("telegram:{chat}"),
            Some(&format!(
                "429 from https://api.telegram.org/bot{token}/sendMessage chat_id={chat}"
            )),
        ),
        attempt(
            2,
            "slack:acme-billing",
            Some(&format!("POST {hook}: 404 no_service")),
        ),
        attempt(3, "email:billing-oncall@acme.example", None),
    ];
    store.record_attempts(&rows).unwrap();
    let table = store.sql().table(Table::NotifyAttempts);
    let all = store
        .query_tsv(&format!("SELECT * FROM {table} ORDER BY attempt"))
        .unwrap();
    assert_eq!(all.lines().count(), 3, "{all}");
    // The version 1 table the dashboards read holds the same attempts, as safe.
    let v1 = store
        .query_tsv(&format!(
            "SELECT * FROM {} ORDER BY attempt",
            store.sql().table(Table::Notifications)
        ))
        .unwrap();
    assert_eq!(v1.lines().count(), 3, "{v1}");
    assert!(v1.starts_with("m-1\tlingering_old_key:old:new:10.0.0.1|curl\ttg\ttelegram:…3210\t0\t1\ttransient\t429 from https://api.telegram.org/<redacted> chat_id=…3210\t"), "{v1}");
    let all = format!("{all}{v1}");
    for secret in [token, chat, hook, "/services/", "AAHdqTcv"] {
        assert!(!all.contains(secret), "{secret} stored in:\n{all}");
    }
    assert!(all.contains("telegram:…3210"), "{all}");
    assert!(all.contains("https://api.telegram.org/<redacted>"), "{all}");
    assert!(all.contains("email:billing-oncall@acme.example"), "{all}");
    let first = store
        .query_tsv(&format!(
            "SELECT message_id, recipient, channel_type, kinds, created_ms, attempt, \
             started_ms, finished_ms, outcome, toUInt32(at) FROM {table} WHERE attempt = 1"
        ))
        .unwrap();
    assert_eq!(
        first.trim(),
        "m-1\tacme-billing\ttelegram\tlingering_old_key\t1795168800000\t1\t1795168800001\t\
         1795168800101\ttransient\t1795168800"
    );
}

#[test]
fn the_attempt_sink_batches_and_drains_on_close() {
    let ch = server();
    let cfg = config(&ch);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = ClickHouseStore::open(&cfg, None, rt.handle().clone()).unwrap();
    let table = store.sql().table(Table::NotifyAttempts);
    let reader = store.clone();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let sink = rt.spawn(run_attempt_sink(store, rx));
    for i in 0..1_203 {
        tx.blocking_send(attempt(i, "webhook:ops", None)).unwrap();
    }
    // Within a few flush periods, what was sent so far is there, the channel still open.
    let count = || -> u64 {
        reader
            .query_tsv(&format!("SELECT count() FROM {table}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let mut seen = 0;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(100));
        seen = count();
        if seen == 1_203 {
            break;
        }
    }
    assert_eq!(seen, 1_203);
    // The last ones arrive just before the channel closes: drained, not lost.
    for i in 1_203..1_210 {
        tx.blocking_send(attempt(i, "webhook:ops", None)).unwrap();
    }
    drop(tx);
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), sink)
            .await
            .expect("the sink ends once its channel is closed")
            .unwrap();
    });
    let n = reader
        .query_tsv(&format!(
            "SELECT count(), uniqExact(message_id) FROM {table}"
        ))
        .unwrap();
    assert_eq!(n.trim(), "1210\t1210");
    drop(reader);
    rt.shutdown_background();
}

// ---------------------------------------------------------------------------------------
// The real binary

fn write_config(dir: &Path, log: &Path, state: &str, store: &str) -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = dir.join(format!("{state}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n{store}\n[input]\nkind = \"file\"\npath = {:?}\nformat = \"kong\"\n\
             follow = false\n[server]\nenabled = false\n[rules]\nkeys = {:?}\npolicy = {:?}\n",
            dir.join(state),
            log,
            root.join("examples/registry.toml"),
            root.join("rules/policy.toml"),
        ),
    )
    .unwrap();
    cfg
}

fn stdout(cmd: &mut std::process::Command) -> String {
    String::from_utf8(run_ok(cmd).stdout).unwrap()
}

#[test]
fn full_mode_shows_the_same_rotations_and_findings_as_embedded_mode() {
    let ch = server();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("gateway.log");
    run_ok(keywatch().args(["sample", "-o"]).arg(&log));
    let db = database();
    let embedded = write_config(dir.path(), &log, "embedded", "");
    let full = write_config(
        dir.path(),
        &log,
        "full",
        &format!(
            "[store]\nkind = \"clickhouse\"\n[store.clickhouse]\nurl = {:?}\ndatabase = {db:?}\nretention_days = 0\n",
            ch.url
        ),
    );
    let run_e = stdout(keywatch().arg("run").arg("--config").arg(&embedded));
    let run_f = stdout(keywatch().arg("run").arg("--config").arg(&full));
    let raised = |s: &str| {
        s.split("Findings raised by this run:")
            .nth(1)
            .map(str::to_owned)
    };
    assert!(raised(&run_e).is_some(), "{run_e}");
    assert_eq!(raised(&run_f), raised(&run_e), "findings raised by the run");

    // Every notification attempt of the full-mode run (the console, without routes) is in
    // ClickHouse too, as in the embedded notification log.
    let sqlite_attempts: u64 = {
        let conn = rusqlite::Connection::open(dir.path().join("full/keywatch.db")).unwrap();
        conn.query_row(
            "SELECT count(*) FROM notify_attempts WHERE finished_ms IS NOT NULL",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap() as u64
    };
    assert!(sqlite_attempts > 0, "the run notified nothing");
    let store = open(&ClickHouseConfig {
        database: db.clone(),
        ..config(&ch)
    });
    let in_clickhouse: u64 = store
        .query_tsv(&format!(
            "SELECT count() FROM {}",
            store.sql().table(Table::NotifyAttempts)
        ))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(in_clickhouse, sqlite_attempts);
    // Each stored finding joins to what was told about it: the notifications rows name the
    // findings by dedup key.
    let told: std::collections::BTreeSet<String> = store
        .query_tsv(&format!(
            "SELECT DISTINCT finding_key FROM {}",
            store.sql().table(Table::Notifications)
        ))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let raised: std::collections::BTreeSet<String> = stdout(
        keywatch()
            .args(["findings", "--json", "--config"])
            .arg(&full),
    )
    .lines()
    .map(|l| {
        serde_json::from_str::<serde_json::Value>(l).unwrap()["dedup_key"]
            .as_str()
            .unwrap()
            .to_owned()
    })
    .collect();
    assert_eq!(told, raised);

    let rotations = |cfg: &Path| stdout(keywatch().arg("rotations").arg("--config").arg(cfg));
    let (rot_e, rot_f) = (rotations(&embedded), rotations(&full));
    assert!(rot_e.contains("Rotations as of"), "{rot_e}");
    assert_eq!(rot_f, rot_e);

    for args in [
        vec!["findings"],
        vec!["findings", "--json"],
        vec!["findings", "--since", "24h"],
        vec!["findings", "--kind", "lingering_old_key", "--json"],
    ] {
        let out = |cfg: &Path| stdout(keywatch().args(&args).arg("--config").arg(cfg));
        let (e, f) = (out(&embedded), out(&full));
        assert!(
            !e.trim().is_empty() && !e.starts_with("no findings"),
            "{args:?}: {e}"
        );
        assert_eq!(f, e, "{args:?}");
    }
    let lingering = stdout(
        keywatch()
            .args(["findings", "--kind", "lingering_old_key", "--json"])
            .arg("--config")
            .arg(&full),
    );
    // The sample's two hosts still on the old key.
    assert!(lingering.lines().count() >= 2, "{lingering}");

    // A second run reads nothing new and raises nothing new: the findings are unchanged
    // but for their counts, in both modes alike.
    run_ok(keywatch().arg("run").arg("--config").arg(&embedded));
    run_ok(keywatch().arg("run").arg("--config").arg(&full));
    let json = |cfg: &Path| {
        stdout(
            keywatch()
                .args(["findings", "--json"])
                .arg("--config")
                .arg(cfg),
        )
    };
    assert_eq!(json(&full), json(&embedded));
    let table = |cfg: &Path| stdout(keywatch().arg("findings").arg("--config").arg(cfg));
    assert_eq!(table(&full), table(&embedded));

    // Nothing there yet: said plainly.
    let empty = write_config(
        dir.path(),
        &log,
        "empty",
        &format!(
            "[store]\nkind = \"clickhouse\"\n[store.clickhouse]\nurl = {:?}\ndatabase = {:?}\nretention_days = 0\n",
            ch.url,
            database()
        ),
    );
    let out = keywatch()
        .arg("findings")
        .arg("--config")
        .arg(&empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no keywatch tables"), "{err}");
}

/// Two instances of a group, each with its own notification log, sharing ClickHouse: what
/// one delivered, the other does not tell again (the evaluator moved, say); what one only
/// queued and never delivered, the other tells.
#[test]
fn a_fact_delivered_by_another_instance_is_not_told_again() {
    use keywatch::notify::{Config as NotifyConfig, Console, Notifier};
    let ch = server();
    let cfg = config(&ch);
    let store = open(&cfg);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let registry = Arc::new(
        keywatch::registry::Registry::parse(
            "keys.toml",
            "[owners.acme-billing]\n[[keys]]\nid = \"old\"\nowner = \"acme-billing\"\n",
        )
        .unwrap(),
    );
    let t0 = 1_795_168_800_000;
    let delivered = finding(
        FindingKind::LingeringOldKey,
        "lingering:old:10.0.0.1",
        t0,
        Some("acme-billing"),
    );
    let queued = finding(
        FindingKind::LingeringOldKey,
        "lingering:old:10.0.0.2",
        t0,
        Some("acme-billing"),
    );
    let instance = |dir: &Path| {
        let (console, told) = Console::capture();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let n = Notifier::with_console(
            NotifyConfig::default(),
            registry.clone(),
            SqliteStore::open(dir).unwrap(),
            console,
        )
        .unwrap()
        .with_attempt_sink(tx)
        .with_shared_log(Arc::new(store.clone()));
        (n, told, rx)
    };

    // Instance A tells both; only the first delivery reaches ClickHouse (A dies before
    // its sink writes the second).
    let dir_a = tempfile::tempdir().unwrap();
    let (mut a, told_a, mut records) = instance(dir_a.path());
    rt.block_on(async {
        a.handle(vec![delivered.clone(), queued.clone()], &[], t0)
            .await
            .unwrap();
        a.drain(t0).await.unwrap();
    });
    assert_eq!(told_a.lock().unwrap().len(), 1, "one grouped message");
    let mut recs = Vec::new();
    while let Ok(r) = records.try_recv() {
        recs.push(r);
    }
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].outcome, "ok");
    let mut rec = recs.remove(0);
    rec.findings.retain(|k| k == &delivered.dedup_key);
    store.record_attempts(&[rec]).unwrap();

    // Instance B, a fresh log, raises both again: only the one never delivered is told.
    let dir_b = tempfile::tempdir().unwrap();
    let (mut b, told_b, _records) = instance(dir_b.path());
    rt.block_on(async {
        b.handle(vec![delivered.clone(), queued.clone()], &[], t0 + 60_000)
            .await
            .unwrap();
        b.drain(t0 + 60_000).await.unwrap();
    });
    let told_b = told_b.lock().unwrap().clone();
    assert_eq!(told_b.len(), 1, "{told_b:?}");
    assert!(
        told_b[0].contains("10.0.0.2") || told_b[0].contains(&queued.summary),
        "{told_b:?}"
    );
    assert!(!told_b[0].contains(&delivered.summary), "{told_b:?}");
}
