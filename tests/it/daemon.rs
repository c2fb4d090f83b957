//! The daemon in follow mode: picks up appended lines, serves /metrics and /healthz, and
//! shuts down cleanly on SIGTERM with its position saved. A one-shot replay stopped by
//! SIGTERM stops at its next evaluation, and the next start finishes it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::*;
use keywatch::source::Position;
use keywatch::store::{SqliteStore, Store};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.0 GET; returns (status line, body).
fn get(port: u16, path: &str) -> Option<(String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_owned(), body.to_owned()))
}

fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn follows_appends_serves_metrics_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let full = lines_of(&sample(dir.path(), "traefik", 1000, 5));
    let log = dir.path().join("access.log");
    std::fs::write(&log, full[..600].join("\n") + "\n").unwrap();

    let port = free_port();
    let cfg = config(
        dir.path(),
        &log,
        "traefik",
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[pipeline]\nbatch_max_wait = \"50ms\"\n"
        ),
    );
    // `config` writes follow = false; this test follows.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("follow = false", "follow = true");
    std::fs::write(&cfg, text).unwrap();

    let mut child = spawn_quiet(&mut run_config(&cfg));
    let events = |want: f64| {
        eventually("the events metric", || {
            let (_, body) = get(port, "/metrics")?;
            (metric(&body, "keywatch_events_total")? >= want).then_some(body)
        })
    };
    let body = events(600.0);
    assert_eq!(metric(&body, "keywatch_events_total"), Some(600.0));

    // Appended lines, one of them written in two parts, are read as they come.
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    write!(f, "{}\n{}", full[600..999].join("\n"), &full[999][..20]).unwrap();
    f.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    writeln!(f, "{}", &full[999][20..]).unwrap();
    drop(f);
    let body = events(1000.0);
    assert_eq!(metric(&body, "keywatch_events_total"), Some(1000.0));
    // The anomaly models saw every batch: one model per key that sent a key.
    let modelled = metric(&body, "keywatch_anomaly_keys").unwrap();
    assert!(
        metric(&body, "keywatch_anomaly_batch_seconds_count").unwrap() >= 2.0,
        "fed at least the two reads"
    );

    let (status, health) = get(port, "/healthz").unwrap();
    assert!(status.contains("200"), "{status}");
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["status"], "ok");
    assert!(health["last_commit_ms"].as_i64().unwrap() > 0);

    // SIGTERM: a clean exit with the position at the end of the file.
    let status = sigterm(&mut child, Duration::from_secs(10));
    assert!(status.success(), "{status:?}");

    let state = dir.path().join("state");
    assert_eq!(totals(&state), (1000, 1000));
    let store = SqliteStore::open(&state).unwrap();
    let keys = store
        .key_usage(None)
        .unwrap()
        .iter()
        .filter(|k| k.key_id != "-")
        .count();
    assert!(keys > 0);
    assert_eq!(modelled, keys as f64);
    let source = format!("file:{}", log.display());
    match store.position(&source).unwrap() {
        Some(Position::File(p)) => {
            assert_eq!(p.offset, std::fs::metadata(&log).unwrap().len())
        }
        other => panic!("unexpected position {other:?}"),
    }
}

/// The findings `keywatch findings --json` lists for `config`, each without its `count`
/// (how many evaluations saw it: a stop adds one at the point it stopped).
fn findings_of(config: &std::path::Path) -> Vec<serde_json::Value> {
    let out = run_ok(
        keywatch()
            .args(["findings", "--since", "3650d", "--json", "--config"])
            .arg(config)
            .env("KW_TEST_SECRET", SECRET),
    );
    let mut all: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let mut f: serde_json::Value = serde_json::from_str(l).unwrap();
            f.as_object_mut().unwrap().remove("count");
            f
        })
        .collect();
    all.sort_by_key(|f| f.to_string());
    all
}

#[test]
fn sigterm_during_a_replay_stops_at_its_next_evaluation_and_the_rerun_counts_once() {
    // Four days of a Kong log read once, evaluated every ten minutes of event time while the
    // sample's rotation is open: hundreds of evaluations, each cutting the batch.
    let log_dir = tempfile::tempdir().unwrap();
    let log = sample(log_dir.path(), "kong", 20_000, 5);
    let lines = lines_of(&log).len() as u64;
    let extra = format!(
        "[pipeline]\nbatch_max_events = 100000\n\
         [rules]\nkeys = {:?}\nevaluate_every = \"10m\"\n",
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/registry.toml")
    );
    let whole = tempfile::tempdir().unwrap();
    let whole_cfg = config(whole.path(), &log, "kong", &extra);
    run_ok(&mut run_config(&whole_cfg));

    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &log, "kong", &extra);
    let state = dir.path().join("state");
    let mut child = spawn_quiet(&mut run_config(&cfg));
    let started = Instant::now();
    while try_totals(&state).map_or(0, |(r, _)| r) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "nothing stored within 60 s"
        );
        assert!(child.try_wait().unwrap().is_none(), "keywatch exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = sigterm(&mut child, Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    // It stopped within the log (at an evaluation of the batch in hand), not after the
    // batches it had read.
    let (stored, _) = totals(&state);
    assert!(
        stored < lines,
        "stored {stored} of {lines} lines: SIGTERM came after the end"
    );
    let source = format!("file:{}", log.display());
    let store = SqliteStore::open(&state).unwrap();
    match store.position(&source).unwrap() {
        Some(Position::File(p)) => {
            assert!(p.offset < std::fs::metadata(&log).unwrap().len(), "{p:?}")
        }
        other => panic!("unexpected position {other:?}"),
    }
    drop(store);

    // The next start reads the rest: every line once, and the findings of the whole run.
    run_ok(&mut run_config(&cfg));
    assert_eq!(totals(&state), (lines, lines));
    let whole_findings = findings_of(&whole_cfg);
    assert!(whole_findings.len() >= 5, "{whole_findings:?}");
    assert_eq!(findings_of(&cfg), whole_findings);
}
