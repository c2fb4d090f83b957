//! `keywatch backtest --from/--to`: replaying a time range of the events stored in
//! ClickHouse, against a real server. A log ingested in full mode and replayed from
//! ClickHouse raises exactly what replaying the log file raises; a narrower window raises
//! what the file of just its events raises; a batch that was written but never committed is
//! not replayed; events come back page by page in the same order whatever the page size; and
//! the command refuses a SQLite config and `--input` with `--from`.
//!
//! `KEYWATCH_TEST_CLICKHOUSE_URL` names a running server (scripts/test.sh starts one);
//! without it, a private one is started in a temporary directory.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;

use keywatch::aggregate::Aggregate;
use keywatch::event::{Decoder, Fingerprinter, Format};
use keywatch::source::Position;
use keywatch::store::clickhouse::{ClickHouseConfig, ClickHouseStore, Table};
use keywatch::store::{BatchWrite, Checkpoint, Origin, Store, StoredEvent};

use crate::support::clickhouse::{fresh_database, ClickHouse};
use crate::support::{keywatch, run_ok};

const DAY_MS: i64 = 86_400_000;

fn write_config(dir: &Path, log: &Path, name: &str, store: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n{store}\n[input]\nkind = \"file\"\npath = {:?}\nformat = \"kong\"\n\
             follow = false\n[server]\nenabled = false\n[rules]\nkeys = {:?}\npolicy = {:?}\n",
            dir.join("state"),
            log,
            root.join("examples/registry.toml"),
            root.join("rules/policy.toml"),
        ),
    )
    .unwrap();
    cfg
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// `keywatch backtest --config CFG ARGS...`: (stdout lines, stderr).
fn backtest(cfg: &Path, args: &[&str]) -> (Vec<String>, String) {
    let out = run_ok(
        keywatch()
            .arg("backtest")
            .arg("--config")
            .arg(cfg)
            .args(args),
    );
    let lines = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    (lines, String::from_utf8(out.stderr).unwrap())
}

fn backtest_range(cfg: &Path, from: i64, to: Option<i64>) -> (Vec<String>, String) {
    let mut args = vec!["--from".to_owned(), rfc3339(from)];
    if let Some(to) = to {
        args.extend(["--to".to_owned(), rfc3339(to)]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    backtest(cfg, &args)
}

fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// (kind, key_id, dedup_key) of each finding.
fn facts(lines: &[String]) -> BTreeSet<(String, String, String)> {
    lines
        .iter()
        .map(|l| {
            let v = json(l);
            let s = |k: &str| v[k].as_str().unwrap().to_owned();
            (s("kind"), s("key_id"), s("dedup_key"))
        })
        .collect()
}

fn at_ms(line: &str) -> i64 {
    let v = json(line);
    chrono::DateTime::parse_from_rfc3339(v["at"].as_str().unwrap())
        .unwrap()
        .timestamp_millis()
}

fn kind(line: &str) -> String {
    json(line)["kind"].as_str().unwrap().to_owned()
}

/// Each line's event time (every sample line is one event).
fn line_times(log: &Path) -> Vec<(String, i64)> {
    let d = Decoder::new(
        Format::preset("kong").unwrap(),
        Fingerprinter::new(b"only-the-time-matters", 4),
        None,
    );
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| {
            let mut out = Vec::new();
            d.decode(l.as_bytes(), &mut out).unwrap();
            assert_eq!(out.len(), 1, "{l}");
            (l.to_owned(), out[0].ts_ms)
        })
        .collect()
}

fn replayed(stderr: &str) -> u64 {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("replayed "))
        .and_then(|l| l.split(' ').next())
        .unwrap_or_else(|| panic!("no `replayed N event(s)` in {stderr}"))
        .parse()
        .unwrap()
}

#[test]
fn a_range_replayed_from_clickhouse_raises_what_the_log_raises() {
    let dir = tempfile::tempdir().unwrap();
    let ch = ClickHouse::shared_or_start(&dir.path().join("clickhouse"));
    let log = dir.path().join("gateway.log");
    run_ok(keywatch().args(["sample", "-o"]).arg(&log));
    let db = fresh_database("kwbt");
    let cfg = write_config(
        dir.path(),
        &log,
        "full",
        &format!(
            "[store]\nkind = \"clickhouse\"\n[store.clickhouse]\nurl = {:?}\ndatabase = {db:?}\nretention_days = 0\n",
            ch.url
        ),
    );
    run_ok(keywatch().arg("run").arg("--config").arg(&cfg));

    let times = line_times(&log);
    let first = times.iter().map(|t| t.1).min().unwrap();
    let last = times.iter().map(|t| t.1).max().unwrap();

    // A batch written but never committed (a crash before its offsets row), a week after
    // the log: the same events, so that they would raise findings if they counted.
    let ch_cfg = ClickHouseConfig {
        url: ch.url.clone(),
        database: db.clone(),
        retention_days: 0,
        ..ClickHouseConfig::default()
    };
    let mut store = ClickHouseStore::open_standalone(&ch_cfg, None).unwrap();
    let config = keywatch::config::load(&cfg).unwrap();
    let decoder = keywatch::daemon::decoder(&config).unwrap();
    let shift = (last - first) + 7 * DAY_MS;
    let mut crashed = Vec::new();
    let mut offset = 0i64;
    for (line, _) in &times {
        let mut out = Vec::new();
        decoder.decode(line.as_bytes(), &mut out).unwrap();
        for (i, mut e) in out.into_iter().enumerate() {
            e.ts_ms += shift;
            crashed.push(StoredEvent {
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
    let batch = |events: &[StoredEvent<'_>]| {
        let mut agg = Aggregate::default();
        for e in events {
            agg.add(&e.event);
        }
        agg
    };
    let agg = batch(&crashed);
    let end = Position::Stdin {
        offset: offset as u64,
    };
    let write = BatchWrite {
        aggregate: &agg,
        events: &crashed,
        checkpoint: Some(Checkpoint {
            source: "file:crashed.log",
            position: &end,
        }),
    };
    store.commit_without_offsets(&write).unwrap();

    // The whole log: the same findings, in the same order, as replaying the file.
    let (from_log, err) = backtest(&cfg, &["--input", log.to_str().unwrap()]);
    assert!(from_log.len() >= 5, "{from_log:?}\n{err}");
    let (from_ch, err) = backtest_range(&cfg, first, Some(last + 1));
    assert_eq!(replayed(&err), times.len() as u64, "{err}");
    assert_eq!(facts(&from_ch), facts(&from_log));
    assert_eq!(from_ch, from_log);
    assert!(
        err.contains(&format!("{} finding(s)", from_log.len())),
        "{err}"
    );
    // Without --to: everything from --from on, the uncommitted batch left out.
    let (open_ended, err) = backtest_range(&cfg, first - 3_600_000, None);
    assert_eq!(replayed(&err), times.len() as u64, "{err}");
    assert_eq!(open_ended, from_log);
    // --to excludes its own instant: the last event is left out.
    let (_, err) = backtest_range(&cfg, first, Some(last));
    let at_last = times.iter().filter(|t| t.1 == last).count() as u64;
    assert_eq!(replayed(&err), times.len() as u64 - at_last, "{err}");

    // The uncommitted batch's window: nothing replayed, nothing raised.
    let (none, err) = backtest_range(&cfg, first + shift, Some(last + shift + 1));
    assert_eq!(replayed(&err), 0, "{err}");
    assert!(none.is_empty(), "{none:?}");

    // A narrower window (edges inside hours): exactly what the file of its events raises,
    // which holds the first burst of unknown keys and not the second.
    let bursts: Vec<i64> = from_log
        .iter()
        .filter(|l| kind(l) == "unknown_key_burst")
        .map(|l| at_ms(l))
        .collect();
    assert!(bursts.len() >= 2, "{from_log:?}");
    let (w1, w2) = (
        bursts[0] - 3 * 3_600_000 + 17,
        bursts[1] - 3 * 3_600_000 + 17,
    );
    let part = dir.path().join("window.log");
    let mut text = String::new();
    for (line, ts) in &times {
        if (w1..w2).contains(ts) {
            text.push_str(line);
            text.push('\n');
        }
    }
    std::fs::write(&part, &text).unwrap();
    let (window_log, _) = backtest(&cfg, &["--input", part.to_str().unwrap()]);
    let (window, err) = backtest_range(&cfg, w1, Some(w2));
    assert_eq!(replayed(&err), text.lines().count() as u64, "{err}");
    assert!(!window.is_empty());
    assert_eq!(facts(&window), facts(&window_log));
    assert_eq!(window, window_log);
    let window_bursts: Vec<i64> = window
        .iter()
        .filter(|l| kind(l) == "unknown_key_burst")
        .map(|l| at_ms(l))
        .collect();
    assert_eq!(window_bursts, vec![bursts[0]], "{window:?}");
    assert!(facts(&window) != facts(&from_log));
    for l in &window {
        assert!(at_ms(l) < w2, "raised after the window: {l}");
    }

    // Paging: any page size gives the same events in the same order, which is the order
    // of the file here (sorted by time, ties by line).
    let all: Vec<_> = store
        .replay(i64::MIN, i64::MAX)
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    assert_eq!(all.len(), times.len());
    let decoded: Vec<_> = times
        .iter()
        .map(|(l, _)| {
            let mut out = Vec::new();
            decoder.decode(l.as_bytes(), &mut out).unwrap();
            out.pop().unwrap().into_owned()
        })
        .collect();
    let mut sorted = decoded.clone();
    sorted.sort_by_key(|e| e.ts_ms);
    assert_eq!(all, sorted, "events come back as they were decoded");
    for page in [1, 7, 1000] {
        let paged: Vec<_> = store
            .replay_paged(w1, w2, page)
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let want: Vec<_> = sorted
            .iter()
            .filter(|e| (w1..w2).contains(&e.ts_ms))
            .cloned()
            .collect();
        assert_eq!(paged, want, "pages of {page}");
    }

    // Once the batch is committed (recovery, then the retry), its window replays.
    store
        .recover("file:crashed.log", &[(String::new(), 0)])
        .unwrap();
    assert_eq!(
        store
            .query_tsv(&format!(
                "SELECT count() FROM {} WHERE src = 'file:crashed.log'",
                store.sql().table(Table::Events)
            ))
            .unwrap()
            .trim(),
        "0"
    );
    store.commit(&write).unwrap();
    let (now_committed, err) = backtest_range(&cfg, first + shift, Some(last + shift + 1));
    assert_eq!(replayed(&err), crashed.len() as u64, "{err}");
    assert!(!now_committed.is_empty());
}

fn failed(out: Output) -> String {
    assert!(!out.status.success(), "{out:?}");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn a_range_needs_a_clickhouse_store() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("gateway.log");
    std::fs::write(&log, "").unwrap();
    let cfg = write_config(dir.path(), &log, "embedded", "");
    let err = failed(
        keywatch()
            .arg("backtest")
            .arg("--config")
            .arg(&cfg)
            .args(["--from", "2026-11-20T00:00:00Z"])
            .output()
            .unwrap(),
    );
    assert!(err.contains("store.kind"), "{err}");
    assert!(err.contains("clickhouse"), "{err}");
    assert!(err.contains(cfg.to_str().unwrap()), "{err}");

    // One of --input and --from, not both, not neither; --to only with --from.
    let run = |args: &[&str]| {
        keywatch()
            .arg("backtest")
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .output()
            .unwrap()
    };
    let log = log.to_str().unwrap();
    let both = run(&["--input", log, "--from", "2026-11-20T00:00:00Z"]);
    assert_eq!(both.status.code(), Some(2));
    let err = failed(both);
    assert!(err.contains("cannot be used with"), "{err}");
    let neither = run(&[]);
    assert_eq!(neither.status.code(), Some(2));
    let err = failed(neither);
    assert!(err.contains("--input") && err.contains("--from"), "{err}");
    let to_alone = run(&["--input", log, "--to", "2026-11-20T00:00:00Z"]);
    assert_eq!(to_alone.status.code(), Some(2));
    let err = failed(run(&["--from", "yesterday"]));
    assert!(err.contains("RFC 3339"), "{err}");
    let err = failed(run(&[
        "--from",
        "2026-11-20T00:00:00Z",
        "--to",
        "2026-11-19T00:00:00Z",
    ]));
    assert!(err.contains("--to must be after --from"), "{err}");
}
