//! The real binary on real files: config checks, a one-shot run, bad input, secrets.

use std::io::Write;

use crate::support::*;

#[test]
fn check_config_accepts_the_example() {
    let out = run_ok(keywatch().args(["check-config", "examples/keywatch.toml"]));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with("examples/keywatch.toml: ok"), "{stdout}");
}

#[test]
fn check_config_names_file_field_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[input]\nkind = \"file\"\nformat = \"kongg\"\npath = \"x.log\"\n",
            "input.format: unknown format `kongg`, expected one of kong, tyk, traefik, envoy, nginx, aws-apigw, json",
        ),
        (
            "[input]\nkind = \"file\"\n\n[server]\nlisten = \"everywhere\"\n",
            "input.path: required when input.kind = \"file\"",
        ),
        (
            "[pipeline]\nbatch_max_wait = \"a while\"\n",
            ":2: pipeline.batch_max_wait: expected a duration like \"200ms\" or \"1m\", found `a while`",
        ),
    ];
    for (text, want) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = keywatch().arg("check-config").arg(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        let expected = if want.starts_with(':') {
            format!("{}{want}\n", path.display())
        } else {
            format!("{}: {want}\n", path.display())
        };
        assert_eq!(stderr, expected);
        // `run` refuses the same file with the same message.
        let out = keywatch()
            .arg("run")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(want),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_one_shot_run_stores_every_event_once_and_shows_usage() {
    let dir = tempfile::tempdir().unwrap();
    let log = sample(dir.path(), "kong", 3000, 7);
    let cfg = config(dir.path(), &log, "kong", "");
    let out = run_ok(&mut run_config(&cfg));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("acme-billing"), "{stdout}");
    assert!(stdout.contains("requests"), "{stdout}");

    let state = dir.path().join("state");
    let (rollups, sources) = totals(&state);
    assert_eq!(rollups, 3000);
    assert_eq!(sources, 3000);

    // A second run resumes from the stored position: nothing is counted twice.
    run_ok(&mut run_config(&cfg));
    assert_eq!(totals(&state), (3000, 3000));

    // Appended lines are picked up, and only they.
    let extra: Vec<String> = lines_of(&log).into_iter().take(10).collect();
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    writeln!(f, "{}", extra.join("\n")).unwrap();
    drop(f);
    run_ok(&mut run_config(&cfg));
    assert_eq!(totals(&state), (3010, 3010));

    // `keywatch usage` shows the same table, and a key's sources.
    let out = run_ok(keywatch().arg("usage").arg("--config").arg(&cfg));
    let usage = String::from_utf8(out.stdout).unwrap();
    assert!(usage.contains("acme-billing"), "{usage}");
}

#[test]
fn bad_lines_are_dead_lettered_redacted_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let log = sample(dir.path(), "nginx", 500, 3);
    let raw_keys = json_field_values(&log, "http_x_api_key");
    assert!(raw_keys.len() >= 3, "the sample has raw keys: {raw_keys:?}");
    let leaked = &raw_keys[0];

    let mut lines = lines_of(&log);
    let bad = [
        "this is not json".to_owned(),
        format!("{{\"remote_addr\":\"10.0.0.9\",\"http_x_api_key\":\"{leaked}\",\"status\":"),
        "{\"remote_addr\":\"10.0.0.9\",\"status\":\"200\"}".to_owned(),
        "{\"time_iso8601\":\"2026-11-21T10:00:00+00:00\",\"status\":{\"code\":200}}".to_owned(),
    ];
    for (i, b) in bad.iter().enumerate() {
        lines.insert(100 * (i + 1), b.clone());
    }
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();

    let cfg = config(dir.path(), &log, "nginx", "[log]\nlevel = \"debug\"\n");
    let out = run_ok(&mut run_config(&cfg));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stdout.contains("4 line(s) could not be decoded"),
        "{stdout}"
    );

    let state = dir.path().join("state");
    assert_eq!(totals(&state), (500, 500));
    let dl = std::fs::read_to_string(state.join("dead-letter.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = dl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 4, "{dl}");
    for r in &records {
        assert!(!r["reason"].as_str().unwrap().is_empty());
        assert!(r["offset"].as_u64().unwrap() > 0);
    }
    assert!(records[0]["reason"]
        .as_str()
        .unwrap()
        .starts_with("not valid JSON"));
    assert_eq!(stderr.matches("rejected a line").count(), 4, "{stderr}");

    // The raw key in the broken line is fingerprinted in the dead letter, and no raw key
    // reaches the database, the logs or the report.
    assert!(
        records[1]["line"].as_str().unwrap().contains("fp:"),
        "{}",
        records[1]
    );
    let mut db = Vec::new();
    for entry in std::fs::read_dir(&state).unwrap() {
        db.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    let db = String::from_utf8_lossy(&db);
    for key in &raw_keys {
        assert!(!db.contains(key.as_str()), "raw key in the state directory");
        assert!(!stderr.contains(key.as_str()), "raw key in the logs");
        assert!(!stdout.contains(key.as_str()), "raw key in the report");
    }
}

/// The daemon reading a log once and `keywatch backtest` of the same log run the same
/// pipeline with the same event-time clock: they raise the same findings at the same times,
/// in whatever batches the daemon read the file. (The anomaly models' incidents:
/// `anomaly_daemon::the_backtest_raises_the_anomalies_the_daemon_stores`.)
#[test]
fn a_one_shot_run_and_a_backtest_raise_the_same_findings() {
    let dir = tempfile::tempdir().unwrap();
    let log = sample(dir.path(), "kong", 8000, 3);
    let cwd = std::env::current_dir().unwrap();
    let extra = format!(
        "[pipeline]\nbatch_max_events = 700\n\
         [rules]\nkeys = {:?}\npolicy = {:?}\nevaluate_every = \"1h\"\n",
        cwd.join("examples/registry.toml"),
        cwd.join("rules/policy.toml"),
    );
    let config = config(dir.path(), &log, "kong", &extra);
    run_ok(&mut run_config(&config));
    // Each fact as first raised (a state such as a lingering source is raised again at
    // every evaluation; the table keeps its first time).
    let daemon: std::collections::BTreeSet<(String, String, String)> =
        keywatch::store::SqliteStore::open_read_only(&dir.path().join("state"))
            .unwrap()
            .findings(None, None)
            .unwrap()
            .into_iter()
            .map(|f| {
                (
                    f.finding.kind.as_str().to_owned(),
                    f.finding.dedup_key,
                    keywatch::registry::format_rfc3339(f.first_at_ms),
                )
            })
            .collect();
    let replayed = run_ok(
        keywatch()
            .args(["backtest", "--every", "1h", "--config"])
            .arg(&config)
            .arg("--input")
            .arg(&log)
            .env("KW_TEST_SECRET", SECRET),
    );
    let facts = |out: &[u8]| -> std::collections::BTreeSet<(String, String, String)> {
        String::from_utf8_lossy(out)
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["kind"].as_str().unwrap().to_owned(),
                    v["dedup_key"].as_str().unwrap().to_owned(),
                    v["at"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let backtest = facts(&replayed.stdout);
    assert!(
        daemon.iter().any(|(k, _, _)| k == "lingering_old_key"),
        "{daemon:#?}"
    );
    assert_eq!(daemon, backtest);
}

/// `backtest --lifecycle`: lifecycle events apply at their own time, in event-time order with
/// the traffic. Key A of the quick-start sample is active in the file; the events start its
/// rotation, then revoke it while two hosts still send it.
#[test]
fn backtest_applies_lifecycle_events_at_their_time() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = std::env::current_dir().unwrap();
    let registry = std::fs::read_to_string(cwd.join("examples/registry.toml")).unwrap();
    let active = registry
        .replace("state = \"rotating\"\n", "")
        .replace("successor = \"ac009636-a60d-420a-bec7-5e2bf891558f\"\n", "")
        .replace("rotation_started = \"2026-11-21T15:24\"\n", "")
        .replace("deadline = \"2026-11-24T18:00\"\n", "");
    assert!(!active.contains("rotation_started"), "{active}");
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, active).unwrap();
    let events = dir.path().join("lifecycle.jsonl");
    std::fs::write(
        &events,
        "{\"type\":\"key_revoked\",\"key_id\":\"bb3ab5b2-819d-4491-b795-90ac9c7824e4\",\
         \"revoked_at\":\"2026-11-23T12:00:00Z\"}\n\
         {\"type\":\"rotation_started\",\"key_id\":\"bb3ab5b2-819d-4491-b795-90ac9c7824e4\",\
         \"successor\":\"ac009636-a60d-420a-bec7-5e2bf891558f\",\
         \"started_at\":\"2026-11-21T15:24\",\"deadline\":\"2026-11-24T18:00\"}\n",
    )
    .unwrap();
    let config = config(
        dir.path(),
        &cwd.join("examples/gateway.log"),
        "kong",
        &format!("[rules]\nkeys = {keys:?}\n"),
    );
    let backtest = |lifecycle: bool| -> Vec<serde_json::Value> {
        let mut cmd = keywatch();
        cmd.args(["backtest", "--config"])
            .arg(&config)
            .arg("--input")
            .arg(cwd.join("examples/gateway.log"))
            .env("KW_TEST_SECRET", SECRET);
        if lifecycle {
            cmd.arg("--lifecycle").arg(&events);
        }
        String::from_utf8(run_ok(&mut cmd).stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let of = |found: &[serde_json::Value], kind: &str| -> Vec<String> {
        found
            .iter()
            .filter(|f| f["kind"] == kind)
            .map(|f| f["at"].as_str().unwrap().to_owned())
            .collect()
    };
    let without = backtest(false);
    assert!(of(&without, "lingering_old_key").is_empty(), "{without:#?}");
    assert!(of(&without, "revoked_key_used").is_empty(), "{without:#?}");

    let with = backtest(true);
    let lingering = of(&with, "lingering_old_key");
    let revoked = of(&with, "revoked_key_used");
    assert!(!lingering.is_empty(), "{with:#?}");
    assert!(!revoked.is_empty(), "{with:#?}");
    // RFC 3339 in UTC compares as text.
    let (started, revoked_at) = ("2026-11-21T14:24:00.000Z", "2026-11-23T12:00:00.000Z");
    assert!(
        lingering
            .iter()
            .all(|at| at.as_str() >= started && at.as_str() < revoked_at),
        "{lingering:?}"
    );
    assert!(
        revoked.iter().all(|at| at.as_str() >= revoked_at),
        "{revoked:?}"
    );
}
