//! The anomaly models inside the daemon: the real binary reads a generated log with known
//! incidents, raises and stores anomaly findings, stays quiet on clean traffic, and keeps
//! its baselines across a restart (warm-up from the SQLite store) without raising a fact
//! twice.

use std::io::Write;
use std::path::Path;

use crate::support::{config, keywatch, run_config, run_ok, SECRET};
use keywatch::anomaly::eval::Rng;
use keywatch::detect::{Finding, FindingKind};
use keywatch::store::SqliteStore;

const START: i64 = 1_767_571_200_000; // 2026-01-05T00:00:00Z, a Monday
const MIN: i64 = 60_000;
const KEY: &str = "kw-billing-1";
const USUAL_IPS: [&str; 3] = ["10.1.2.3", "10.1.2.4", "192.0.2.7"];

/// Requests per minute: a daily cycle (busy by day, quiet at night), quieter weekends.
fn rate(minute: i64) -> f64 {
    let t = START + minute * MIN;
    let day = (t % 86_400_000) as f64 / 86_400_000.0;
    let dow = (t / 86_400_000 + 3) % 7; // 0 = Monday
    let weekend = if dow >= 5 { 0.5 } else { 1.0 };
    0.6 * (6.0 + 5.0 * (std::f64::consts::TAU * (day - 0.3)).sin()) * weekend
}

/// Appends JSON lines for minutes `from..to`: `scale` times the usual volume from the usual
/// sources, plus `extra` requests a minute from `extra_src` (ip, user agent) when given.
fn append(
    log: &Path,
    rng: &mut Rng,
    from: i64,
    to: i64,
    scale: impl Fn(i64) -> f64,
    extra: Option<(&str, &str, u64)>,
) {
    let mut f = std::io::BufWriter::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap(),
    );
    for m in from..to {
        let mut events: Vec<(&str, &str)> = Vec::new();
        let n = rng.poisson(rate(m) * scale(m)) as u64;
        for i in 0..n {
            events.push((
                USUAL_IPS[(m as usize + i as usize) % 3],
                "billing-client/2.1",
            ));
        }
        if let Some((ip, ua, k)) = extra {
            events.extend((0..k).map(|_| (ip, ua)));
        }
        let step = MIN / (events.len() as i64 + 1);
        for (i, (ip, ua)) in events.into_iter().enumerate() {
            let status = if rng.chance(0.01) { 401 } else { 200 };
            let lat = 40.0 * (0.8 + 0.4 * rng.f());
            writeln!(
                f,
                r#"{{"ts":{},"key":"{KEY}","ip":"{ip}","ua":"{ua}","path":"/v1/invoices","status":{status},"lat":{lat:.1}}}"#,
                START + m * MIN + (i as i64 + 1) * step
            )
            .unwrap();
        }
    }
    f.flush().unwrap();
}

fn setup(dir: &Path) -> std::path::PathBuf {
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[owners.acme-billing]\n[[keys]]\nid = \"{KEY}\"\nname = \"billing\"\nowner = \"acme-billing\"\n\
             created = \"2025-12-01\"\n"
        ),
    )
    .unwrap();
    let log = dir.join("gateway.log");
    config(
        dir,
        &log,
        "json",
        &format!(
            "[input.mapping]\ntimestamp = \"ts\"\ntimestamp_format = \"epoch_ms\"\nkey_id = \"key\"\n\
             source_ip = \"ip\"\nuser_agent = \"ua\"\npath = \"path\"\nstatus = \"status\"\n\
             latency = \"lat\"\n[rules]\nkeys = {keys:?}\n"
        ),
    )
}

/// The stored findings, as `keywatch findings --json` prints them.
fn findings(cfg: &Path) -> Vec<Finding> {
    let out = run_ok(
        keywatch()
            .args(["findings", "--json", "--config"])
            .arg(cfg)
            .env("KW_TEST_SECRET", SECRET),
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn anomalies(found: &[Finding]) -> Vec<&Finding> {
    found.iter().filter(|f| f.kind.is_anomaly()).collect()
}

fn run(cfg: &Path) -> String {
    let out = run_ok(run_config(cfg).env("KEYWATCH_LOG", "keywatch=info"));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn incidents_are_raised_after_a_restart_from_stored_baselines_and_told_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path());
    let log = dir.path().join("gateway.log");
    let mut rng = Rng::new(7);

    // Ten clean days: nothing anomalous.
    append(&log, &mut rng, 0, 10 * 1440, |_| 1.0, None);
    let first = run(&cfg);
    let found = findings(&cfg);
    assert!(anomalies(&found).is_empty(), "{found:#?}\n{first}");

    // The next day, after a restart: the daemon reads only this day's lines (the stored
    // position), so every baseline must come from the warm-up. At 14:00 the key sends 8
    // times its usual volume for an hour, and a new host with a new client joins.
    let day = 10 * 1440;
    let incident = day + 14 * 60;
    append(&log, &mut rng, day, incident, |_| 1.0, None);
    append(
        &log,
        &mut rng,
        incident,
        incident + 60,
        |_| 8.0,
        Some(("203.0.113.9", "python-requests/2.31", 2)),
    );
    append(&log, &mut rng, incident + 60, day + 1440, |_| 1.0, None);
    let second = run(&cfg);
    assert!(
        second.contains("anomaly models warmed up from stored history"),
        "{second}"
    );
    let found = findings(&cfg);
    let kinds: Vec<FindingKind> = anomalies(&found).iter().map(|f| f.kind).collect();
    assert!(kinds.contains(&FindingKind::VolumeAnomaly), "{found:#?}");
    assert!(kinds.contains(&FindingKind::NewSource), "{found:#?}");
    for f in anomalies(&found) {
        assert_eq!(f.key_id, KEY);
        assert_eq!(f.owner.as_deref(), Some("acme-billing"), "{f:#?}");
        assert!(
            f.at_ms >= START + incident * MIN && f.at_ms < START + (incident + 61) * MIN,
            "raised outside the incident: {f:#?}"
        );
        let e = &f.evidence;
        for field in ["expected", "seen", "surprise", "score", "model"] {
            assert!(e.get(field).is_some(), "{field} missing: {e}");
        }
        assert!(!f.summary.contains('\n'));
        assert!(f.dedup_key.starts_with(&format!("{}:{KEY}:", f.kind)));
    }
    let volume = found
        .iter()
        .find(|f| f.kind == FindingKind::VolumeAnomaly)
        .unwrap();
    assert!(volume.evidence["surprise"].as_f64().unwrap() >= 8.0);
    let new_source: Vec<&Finding> = found
        .iter()
        .filter(|f| f.kind == FindingKind::NewSource)
        .collect();
    assert!(
        new_source
            .iter()
            .any(|f| f.evidence["seen"]["network"] == "203.0.113.0/24"),
        "{new_source:#?}"
    );
    assert!(
        new_source
            .iter()
            .any(|f| f.evidence["seen"]["user_agent"] == "python-requests/2.31"),
        "{new_source:#?}"
    );

    // Another restart, and the new host keeps sending: it is known now (the warm-up reads
    // the stored sources), so nothing is raised again and every fact stays one row.
    append(
        &log,
        &mut rng,
        day + 1440,
        day + 1440 + 6 * 60,
        |_| 1.0,
        Some(("203.0.113.9", "python-requests/2.31", 1)),
    );
    let before = stored_anomalies(dir.path());
    let third = run(&cfg);
    assert_eq!(stored_anomalies(dir.path()), before, "{third}");
}

/// `(dedup key, times raised)` of every stored anomaly finding. (The minute burst and the
/// hourly volume of one hour are one fact: one row, raised twice.)
fn stored_anomalies(dir: &Path) -> Vec<(String, u64)> {
    let store = SqliteStore::open_read_only(&dir.join("state")).unwrap();
    let mut v: Vec<(String, u64)> = store
        .findings(None, None)
        .unwrap()
        .into_iter()
        .filter(|f| f.finding.kind.is_anomaly())
        .map(|f| (f.finding.dedup_key, f.count))
        .collect();
    v.sort();
    v
}

/// Points the config at a policy file holding `policy`.
fn with_policy(dir: &Path, cfg: &Path, policy: &str) {
    let path = dir.join("policy.toml");
    std::fs::write(&path, policy).unwrap();
    let text = std::fs::read_to_string(cfg)
        .unwrap()
        .replace("[rules]\n", &format!("[rules]\npolicy = {path:?}\n"));
    std::fs::write(cfg, text).unwrap();
}

/// Nine days, then two hours at 8 times the volume with a new host, then the rest of the
/// tenth day, in `dir/gateway.log`.
fn write_incident_log(dir: &Path) -> std::path::PathBuf {
    let log = dir.join("gateway.log");
    let mut rng = Rng::new(7);
    append(&log, &mut rng, 0, 9 * 1440 + 14 * 60, |_| 1.0, None);
    append(
        &log,
        &mut rng,
        9 * 1440 + 14 * 60,
        9 * 1440 + 16 * 60,
        |_| 8.0,
        Some(("203.0.113.9", "python-requests/2.31", 2)),
    );
    append(&log, &mut rng, 9 * 1440 + 16 * 60, 10 * 1440, |_| 1.0, None);
    log
}

/// The incident log in one run.
fn incident_in_one_run(policy: Option<&str>) -> Vec<Finding> {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path());
    if let Some(p) = policy {
        with_policy(dir.path(), &cfg, p);
    }
    write_incident_log(dir.path());
    run(&cfg);
    findings(&cfg)
}

#[test]
fn disabled_models_raise_nothing() {
    let on = incident_in_one_run(None);
    assert!(!anomalies(&on).is_empty(), "{on:#?}");
    let off = incident_in_one_run(Some("[anomaly]\nenabled = false\n"));
    assert!(anomalies(&off).is_empty(), "{off:#?}");
}

#[test]
fn without_the_warm_up_a_restart_forgets_the_baselines() {
    // The counterpart of the restart test: with warm_up_max_rows = 0 the second run starts
    // cold and the hour at 8 times the volume goes unnoticed.
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path());
    with_policy(dir.path(), &cfg, "[anomaly]\nwarm_up_max_rows = 0\n");
    let log = dir.path().join("gateway.log");
    let mut rng = Rng::new(7);
    append(&log, &mut rng, 0, 10 * 1440, |_| 1.0, None);
    run(&cfg);
    let incident = 10 * 1440 + 14 * 60;
    append(&log, &mut rng, 10 * 1440, incident, |_| 1.0, None);
    append(&log, &mut rng, incident, incident + 60, |_| 8.0, None);
    append(&log, &mut rng, incident + 60, 11 * 1440, |_| 1.0, None);
    let second = run(&cfg);
    assert!(!second.contains("warmed up"), "{second}");
    let found = findings(&cfg);
    assert!(anomalies(&found).is_empty(), "{found:#?}");
}

/// `keywatch backtest` runs the same models over the same log with event time as the clock:
/// it raises the same anomaly facts (kind, key, dedup key) as the daemon stored.
#[test]
fn the_backtest_raises_the_anomalies_the_daemon_stores() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path());
    let log = write_incident_log(dir.path());
    run(&cfg);
    let facts = |found: &[Finding]| -> std::collections::BTreeSet<(String, String, String)> {
        anomalies(found)
            .iter()
            .map(|f| {
                (
                    f.kind.as_str().to_owned(),
                    f.key_id.clone(),
                    f.dedup_key.clone(),
                )
            })
            .collect()
    };
    let daemon = facts(&findings(&cfg));
    assert!(!daemon.is_empty());

    let out = run_ok(
        keywatch()
            .args(["backtest", "--config"])
            .arg(&cfg)
            .arg("--input")
            .arg(&log)
            .env("KW_TEST_SECRET", SECRET),
    );
    let backtest: Vec<Finding> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(facts(&backtest), daemon);
    // Each fact once.
    assert_eq!(anomalies(&backtest).len(), daemon.len());
}
