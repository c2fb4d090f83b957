//! The Grafana dashboards in dashboards/: their JSON, and every panel's SQL run on data that
//! keywatch itself wrote.
//!
//! `every_clickhouse_query_answers_on_data_keywatch_wrote` generates a Kong log with known
//! truth (`keywatch::sample`), stores it in ClickHouse with the real binary in full mode
//! (`store.kind = "clickhouse"`), adds the findings `keywatch backtest` raises for the same log
//! and a notification log, then expands every panel, variable and annotation query the way
//! the grafana-clickhouse-datasource plugin does (template variables first, then the
//! backend's macros: pkg/macros/macros.go of grafana/clickhouse-datasource) and checks the
//! answers against the truth. The expanded statements, with the rows they ran on and
//! ClickHouse 18.16's answers, go to target/tmp/dashboard-sql-catalog.json for
//! tests/chdb/run.sh to run again on a current ClickHouse.
//!
//! `health_dashboard_reads_metrics_keywatch_exports` checks the Prometheus dashboard against
//! a running daemon's /metrics.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::clickhouse::ClickHouse;
use crate::support::{keywatch, run_ok};
use keywatch::detect::Finding;
use keywatch::event::{AuthEvent, Decoder, Fingerprinter, Format, Outcome, NO_KEY};
use keywatch::notify::AttemptRecord;
use keywatch::sample::{generate_sample, SampleOptions, Truth};
use keywatch::store::clickhouse::catalog::Step;
use keywatch::store::clickhouse::{ClickHouseConfig, ClickHouseStore, ServerFeatures, Sql, Table};
use serde_json::Value;

/// Panels name their data source by a datasource variable (so that an imported dashboard
/// can use any data source of the type), which defaults to the stack's provisioned one.
const CLICKHOUSE_UID: &str = "${clickhouse}";
const PROMETHEUS_UID: &str = "${prometheus}";
/// The provisioned data sources (dashboards/provisioning/datasources/clickhouse.yml).
const PROVISIONED: [(&str, &str, &str); 2] = [
    (
        "clickhouse",
        "grafana-clickhouse-datasource",
        "keywatch-clickhouse",
    ),
    ("prometheus", "prometheus", "keywatch-prometheus"),
];
const ALL: &str = "__all";
/// Registry deadline of acme-billing's rotation in examples/registry.toml:
/// 2026-11-24T18:00 Europe/Berlin.
const DEADLINE_MS: i64 = 1_795_539_600_000;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------------------
// Dashboards as JSON

struct Dashboard {
    file: String,
    json: Value,
}

fn dashboards() -> Vec<Dashboard> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root().join("dashboards")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).unwrap();
            let json: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
            out.push(Dashboard {
                file: path.file_name().unwrap().to_string_lossy().into_owned(),
                json,
            });
        }
    }
    out.sort_by(|a, b| a.file.cmp(&b.file));
    out
}

fn dashboard(uid: &str) -> Dashboard {
    dashboards()
        .into_iter()
        .find(|d| d.json["uid"] == uid)
        .unwrap_or_else(|| panic!("no dashboard with uid {uid}"))
}

fn arr(v: &Value) -> &Vec<Value> {
    v.as_array().expect("a JSON array")
}

/// One SQL query of a dashboard: a panel target, a template variable or an annotation.
#[derive(Debug, Clone)]
struct Query {
    /// `panel TITLE/REF`, `var NAME`, `annotation NAME`.
    name: String,
    sql: String,
}

fn clickhouse_queries(d: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    for v in arr(&d["templating"]["list"]) {
        if v["type"] == "query" {
            out.push(Query {
                name: format!("var {}", v["name"].as_str().unwrap()),
                sql: v["query"]["rawSql"].as_str().unwrap().to_owned(),
            });
        }
    }
    for a in arr(&d["annotations"]["list"]) {
        if let Some(sql) = a["target"]["rawSql"].as_str() {
            out.push(Query {
                name: format!("annotation {}", a["name"].as_str().unwrap()),
                sql: sql.to_owned(),
            });
        }
    }
    for p in arr(&d["panels"]) {
        for t in arr(&p["targets"]) {
            if t["datasource"]["uid"] == CLICKHOUSE_UID {
                out.push(Query {
                    name: format!(
                        "panel {}/{}",
                        p["title"].as_str().unwrap(),
                        t["refId"].as_str().unwrap()
                    ),
                    sql: t["rawSql"].as_str().unwrap().to_owned(),
                });
            }
        }
    }
    out
}

#[test]
fn dashboards_are_well_formed() {
    let all = dashboards();
    let uids: BTreeSet<&str> = all
        .iter()
        .map(|d| d.json["uid"].as_str().unwrap())
        .collect();
    assert_eq!(
        uids,
        BTreeSet::from([
            "keywatch-findings",
            "keywatch-health",
            "keywatch-keys",
            "keywatch-rotations"
        ])
    );
    for d in &all {
        let j = &d.json;
        assert!(j["title"].as_str().unwrap().starts_with("keywatch / "));
        assert!(
            j.get("id").is_none(),
            "{}: provisioned dashboards carry no id",
            d.file
        );
        let vars: BTreeSet<&str> = arr(&j["templating"]["list"])
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        // A datasource variable per data source used, defaulting to the provisioned one,
        // before the variables whose queries use it; and an import input for each.
        let list = arr(&j["templating"]["list"]);
        for (name, plugin, uid) in PROVISIONED {
            let Some(pos) = list.iter().position(|v| v["name"] == name) else {
                assert!(
                    !j.to_string().contains(&format!("${{{name}}}")),
                    "{}: ${name} used but not defined",
                    d.file
                );
                continue;
            };
            let v = &list[pos];
            assert_eq!(v["type"], "datasource", "{}", d.file);
            assert_eq!(v["query"], plugin, "{}", d.file);
            assert_eq!(v["current"]["value"], uid, "{}", d.file);
            assert!(
                list[..pos].iter().all(|o| o["type"] != "query"),
                "{}: ${name} must come before the query variables",
                d.file
            );
            assert!(
                arr(&j["__inputs"])
                    .iter()
                    .any(|i| i["type"] == "datasource" && i["pluginId"] == plugin),
                "{}: no import input for {plugin}",
                d.file
            );
        }
        // Panels do not overlap on the 24-column grid.
        let mut cells = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for p in arr(&j["panels"]) {
            let title = p["title"].as_str().unwrap();
            assert!(
                ids.insert(p["id"].as_u64().unwrap()),
                "{}: duplicate id",
                d.file
            );
            let g = &p["gridPos"];
            let (x, y, w, h) = (
                g["x"].as_u64().unwrap(),
                g["y"].as_u64().unwrap(),
                g["w"].as_u64().unwrap(),
                g["h"].as_u64().unwrap(),
            );
            assert!(x + w <= 24 && w > 0 && h > 0, "{}: {title}: {g}", d.file);
            for cx in x..x + w {
                for cy in y..y + h {
                    assert!(cells.insert((cx, cy)), "{}: {title} overlaps", d.file);
                }
            }
            let targets = arr(&p["targets"]);
            assert!(!targets.is_empty(), "{}: {title} has no query", d.file);
            for t in targets {
                let uid = t["datasource"]["uid"].as_str().unwrap();
                match t["datasource"]["type"].as_str().unwrap() {
                    "grafana-clickhouse-datasource" => {
                        assert_eq!(uid, CLICKHOUSE_UID);
                        assert_eq!(t["editorType"], "sql");
                        let sql = t["rawSql"].as_str().unwrap();
                        assert!(sql.starts_with("SELECT "), "{}: {title}: {sql}", d.file);
                        // Format 0 is a time series, 1 a table in the plugin.
                        let series = t["format"] == 0;
                        assert_eq!(series, p["type"] == "timeseries", "{}: {title}", d.file);
                        if series {
                            assert!(sql.contains(" AS time,"), "{}: {title}", d.file);
                        }
                    }
                    "prometheus" => {
                        assert_eq!(uid, PROMETHEUS_UID);
                        assert!(!t["expr"].as_str().unwrap().is_empty());
                    }
                    other => panic!("{}: {title}: datasource {other}", d.file),
                }
            }
        }
        // Every ${var} a query uses is defined, and $__timeInterval (toStartOfInterval,
        // missing on ClickHouse 18.16) is not used.
        for q in clickhouse_queries(j) {
            for name in variables_in(&q.sql) {
                assert!(
                    vars.contains(name.as_str()),
                    "{}: {}: ${name}",
                    d.file,
                    q.name
                );
            }
            assert!(!q.sql.contains("$__timeInterval"), "{}: {}", d.file, q.name);
        }
    }
}

fn variables_in(sql: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = sql;
    while let Some(i) = rest.find("${") {
        let end = rest[i..].find('}').unwrap();
        out.insert(rest[i + 2..i + end].to_owned());
        rest = &rest[i + end..];
    }
    out
}

// ---------------------------------------------------------------------------------------
// The plugin's expansion

/// The dashboard time range and interval a query runs with.
#[derive(Debug, Clone, Copy)]
struct Range {
    from_ms: i64,
    to_ms: i64,
    interval_ms: i64,
}

/// Grafana's template variables (`${name}`, `$name`; single values are inserted as they
/// are by the plugin's `format`), then the backend macros of grafana-clickhouse-datasource
/// exactly as pkg/macros/macros.go renders them.
fn expand(sql: &str, vars: &BTreeMap<&str, String>, r: Range) -> Result<String, String> {
    // 1. Template variables (frontend). `$__...` names are macros, left to the backend.
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(body) = after.strip_prefix('{') {
            let end = body.find('}').ok_or("unclosed ${")?;
            let name = &body[..end];
            out.push_str(vars.get(name).ok_or(format!("unknown variable {name}"))?);
            rest = &body[end + 1..];
        } else if after.starts_with("__") {
            out.push('$');
            rest = after;
        } else {
            let n = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            let name = &after[..n];
            out.push_str(vars.get(name).ok_or(format!("unknown variable {name}"))?);
            rest = &after[n..];
        }
    }
    out.push_str(rest);

    // 2. Macros (backend, sqlds): `$__name` with optional `(args)`.
    let secs = |ms: i64| ms.div_euclid(1000);
    let sql = out;
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql.as_str();
    while let Some(i) = rest.find("$__") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 3..];
        let n = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..n];
        let mut tail = &after[n..];
        let mut args: Vec<String> = Vec::new();
        if let Some(inner) = tail.strip_prefix('(') {
            let end = inner.find(')').ok_or("unclosed macro arguments")?;
            args = inner[..end]
                .split(',')
                .map(|a| a.trim().to_owned())
                .filter(|a| !a.is_empty())
                .collect();
            tail = &inner[end + 1..];
        }
        let dt = |ms: i64| format!("toDateTime({})", secs(ms));
        let dt64 = |ms: i64| format!("fromUnixTimestamp64Milli({ms})");
        let one = || -> Result<&str, String> {
            match args.as_slice() {
                [a] => Ok(a.as_str()),
                _ => Err(format!(
                    "$__{name}: expected 1 argument, received {}",
                    args.len()
                )),
            }
        };
        let interval_s = (r.interval_ms / 1000).max(1);
        let text = match name {
            "fromTime" => dt(r.from_ms),
            "toTime" => dt(r.to_ms),
            "fromTime_ms" => dt64(r.from_ms),
            "toTime_ms" => dt64(r.to_ms),
            "timeFilter" => {
                let c = one()?;
                format!("{c} >= {} AND {c} <= {}", dt(r.from_ms), dt(r.to_ms))
            }
            "timeFilter_ms" => {
                let c = one()?;
                format!("{c} >= {} AND {c} <= {}", dt64(r.from_ms), dt64(r.to_ms))
            }
            "timeInterval" => format!(
                "toStartOfInterval(toDateTime({}), INTERVAL {interval_s} second)",
                one()?
            ),
            "interval_s" => interval_s.to_string(),
            other => return Err(format!("macro $__{other} not expanded by this test")),
        };
        out.push_str(&text);
        rest = tail;
    }
    out.push_str(rest);
    if out.contains('$') {
        return Err(format!("left unexpanded: {out}"));
    }
    Ok(out)
}

#[test]
fn expansion_matches_the_plugin() {
    let vars = BTreeMap::from([("db", "kw".to_owned()), ("key", "k1".to_owned())]);
    let r = Range {
        from_ms: 1_795_132_800_123,
        to_ms: 1_795_136_400_999,
        interval_ms: 30_000,
    };
    assert_eq!(
        expand(
            "SELECT $__timeInterval(ts) AS time FROM ${db}.t WHERE $__timeFilter(ts) AND k = '$key' AND n = $__interval_s AND $__fromTime < $__toTime_ms",
            &vars,
            r
        )
        .unwrap(),
        "SELECT toStartOfInterval(toDateTime(ts), INTERVAL 30 second) AS time FROM kw.t WHERE \
         ts >= toDateTime(1795132800) AND ts <= toDateTime(1795136400) AND k = 'k1' AND n = 30 \
         AND toDateTime(1795132800) < fromUnixTimestamp64Milli(1795136400999)"
    );
    assert!(expand("SELECT ${nope}", &vars, r).is_err());
    assert!(expand("SELECT $__timeFilter(a, b)", &vars, r).is_err());
    assert!(expand("SELECT $__unknownMacro", &vars, r).is_err());
}

// ---------------------------------------------------------------------------------------
// ClickHouse over HTTP

struct Http {
    url: String,
    client: reqwest::blocking::Client,
}

impl Http {
    fn new(url: &str) -> Http {
        Http {
            url: url.to_owned(),
            client: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        }
    }

    fn bytes(&self, sql: &str) -> Result<Vec<u8>, String> {
        let r = self
            .client
            .post(&self.url)
            .body(sql.to_owned())
            .send()
            .map_err(|e| e.to_string())?;
        let ok = r.status().is_success();
        let body = r.bytes().map_err(|e| e.to_string())?.to_vec();
        if ok {
            Ok(body)
        } else {
            Err(String::from_utf8_lossy(&body).into_owned())
        }
    }

    fn tsv(&self, sql: &str) -> Result<String, String> {
        self.bytes(&format!("{sql} FORMAT TabSeparated"))
            .map(|b| String::from_utf8(b).unwrap())
    }
}

/// A TabSeparated answer as rows of fields.
fn rows(tsv: &str) -> Vec<Vec<String>> {
    tsv.lines()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

fn num(s: &str) -> f64 {
    s.parse().unwrap_or_else(|_| panic!("not a number: {s:?}"))
}

// ---------------------------------------------------------------------------------------
// Data keywatch wrote

struct Fixture {
    _dir: tempfile::TempDir,
    /// The server or cluster, kept running while the fixture lives.
    _server: Box<dyn std::any::Any>,
    http: Http,
    database: String,
    truth: Truth,
    /// Decoded events of the log (as the daemon decodes them).
    events: Vec<AuthEvent<'static>>,
    /// The findings the daemon stored, as `keywatch findings` reads them.
    findings: Vec<Finding>,
    /// The notification log written.
    notifications: Vec<AttemptRecord>,
}

const ROTATION_KINDS: [&str; 6] = [
    "lingering_old_key",
    "rotation_at_risk",
    "rotation_overdue",
    "rotation_reminder",
    "safe_to_revoke",
    "failed_rollover",
];
const ANOMALY_KINDS: [&str; 10] = [
    "volume_anomaly",
    "failure_rate_spike",
    "latency_shift",
    "new_source",
    "dormant_key_woke",
    "out_of_scope_use",
    "behaviour_anomaly",
    "failed_rollover",
    "revoked_key_used",
    "expired_key_used",
];

fn kind(f: &Finding) -> String {
    serde_json::to_value(f.kind)
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

fn evidence_str<'a>(f: &'a Finding, field: &str) -> Option<&'a str> {
    let e = &f.evidence;
    e[field]
        .as_str()
        .or_else(|| e["rotation"][field].as_str())
        .or_else(|| e["forecast"][field].as_str())
}

fn fixture() -> Fixture {
    let dir = tempfile::Builder::new()
        .prefix("keywatch-dash-")
        .tempdir()
        .unwrap();
    let server = ClickHouse::shared_or_start(&dir.path().join("clickhouse"));
    let url = server.url.clone();
    fixture_on(dir, Box::new(server), &url, None)
}

/// The fixture on a server or, with `cluster` (a cluster's name in the servers'
/// remote_servers), on a ClickHouse cluster through the server at `url`.
fn fixture_on(
    dir: tempfile::TempDir,
    server: Box<dyn std::any::Any>,
    url: &str,
    cluster: Option<&str>,
) -> Fixture {
    let http = Http::new(url);
    let database = format!(
        "kw_dash_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );

    // A Kong log with known truth; the key ids are the registry's (examples/registry.toml).
    let sample = generate_sample(&SampleOptions {
        lines: 6000,
        ..SampleOptions::default()
    })
    .unwrap();
    let log = dir.path().join("gateway.log");
    std::fs::write(&log, sample.lines.join("\n") + "\n").unwrap();
    let decoder = Decoder::new(
        Format::preset("kong").unwrap(),
        Fingerprinter::new(b"dashboards-test", 4),
        None,
    );
    let mut events = Vec::new();
    for line in &sample.lines {
        let mut out = Vec::new();
        decoder.decode(line.as_bytes(), &mut out).unwrap();
        events.extend(out.into_iter().map(AuthEvent::into_owned));
    }

    // keywatch in full mode (ClickHouse store) reads the log once. A one-shot read of a
    // log evaluates rotations every `rules.evaluate_every` of event time, each evaluation
    // reading the store and storing its findings, and cuts the commits there while a
    // rotation is open: at the default minute that is 5,760 evaluations and 2,900 commits
    // over the sample's four days (6 minutes on one server, 14 on the two-shard cluster,
    // whose commits are replicated quorum inserts). A quarter of an hour raises the same
    // findings; the dashboards read what was stored, not how often it was evaluated.
    let config = dir.path().join("keywatch.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {state:?}\n\
             [input]\nkind = \"file\"\npath = {log:?}\nformat = \"kong\"\nfollow = false\n\
             [store]\nkind = \"clickhouse\"\n\
             [store.clickhouse]\nurl = {url:?}\ndatabase = {database:?}\nretention_days = 0\n\
             {cluster_section}\
             [server]\nenabled = false\n\
             [rules]\nkeys = {keys:?}\npolicy = {policy:?}\nevaluate_every = \"15m\"\n",
            state = dir.path().join("state"),
            cluster_section = cluster
                .map(|c| format!("[store.clickhouse.cluster]\nname = {c:?}\n"))
                .unwrap_or_default(),
            keys = root().join("examples/registry.toml"),
            policy = root().join("rules/policy.toml"),
        ),
    )
    .unwrap();
    run_ok(keywatch().arg("run").arg("--config").arg(&config));
    let stored = http
        .tsv(&format!(
            "SELECT sum(requests) FROM {database}.keywatch_rollup_minute"
        ))
        .unwrap();
    assert_eq!(stored.trim(), sample.lines.len().to_string());

    // The findings the daemon stored, as keywatch itself reads them back
    // (`keywatch findings`, from the finding_state table).
    let out = run_ok(
        keywatch()
            .args(["findings", "--since", "3650d", "--json", "--config"])
            .arg(&config),
    );
    let findings: Vec<Finding> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        findings.iter().any(|f| kind(f) == "rotation_at_risk"),
        "the sample's rotation is at risk: {findings:?}"
    );
    // A notification log, written with the store's own API.
    let notifications = attempts(&findings);
    let store = ClickHouseStore::open_standalone(
        &ClickHouseConfig {
            url: url.to_owned(),
            database: database.clone(),
            retention_days: 0,
            cluster: cluster.map(keywatch::store::clickhouse::ClusterConfig::named),
            ..ClickHouseConfig::default()
        },
        None,
    )
    .unwrap();
    store.record_attempts(&notifications).unwrap();
    drop(store);

    Fixture {
        _dir: dir,
        _server: server,
        http,
        database,
        truth: sample.truth,
        events,
        findings,
        notifications,
    }
}

/// The chat id of acme-billing's Telegram chat (examples/registry.toml): never shown whole.
const CHAT_ID: &str = "-1001234567890";

/// Attempts of three messages about the rotation: the owner's email delivered at once,
/// Slack after one 429, Telegram refused for good; and the security team's email.
fn attempts(findings: &[Finding]) -> Vec<AttemptRecord> {
    let f = findings
        .iter()
        .find(|f| kind(f) == "rotation_at_risk")
        .unwrap();
    let at = f.at_ms;
    let rec = |id: &str,
               recipient: &str,
               channel: &str,
               target: String,
               attempt: u32,
               outcome: &'static str,
               detail: Option<&str>,
               delay_ms: i64| AttemptRecord {
        message_id: id.into(),
        recipient: recipient.into(),
        receiver: if recipient == "security" {
            "security".into()
        } else {
            "owner".into()
        },
        channel: channel.into(),
        channel_type: channel.into(),
        target,
        kinds: "lingering_old_key,rotation_at_risk".into(),
        findings: Vec::new(),
        severity: "warning".into(),
        created_ms: at + 30_000,
        attempt,
        started_ms: at + delay_ms,
        finished_ms: at + delay_ms + 200,
        outcome,
        detail: detail.map(str::to_owned),
    };
    vec![
        rec(
            "m-email",
            "acme-billing",
            "email",
            "billing-oncall@acme.example".into(),
            1,
            "ok",
            None,
            31_000,
        ),
        rec(
            "m-slack",
            "acme-billing",
            "slack",
            "https://hooks.slack.com/services/T0/B0/SECRET".into(),
            1,
            "transient",
            Some("429 retry after 2 s"),
            31_000,
        ),
        rec(
            "m-slack",
            "acme-billing",
            "slack",
            "https://hooks.slack.com/services/T0/B0/SECRET".into(),
            2,
            "ok",
            None,
            33_000,
        ),
        rec(
            "m-telegram",
            "acme-billing",
            "telegram",
            format!("telegram:{CHAT_ID}"),
            1,
            "permanent",
            Some("400 Bad Request: chat not found"),
            31_000,
        ),
        rec(
            "m-security",
            "security",
            "email",
            "security@keywatch.local".into(),
            1,
            "ok",
            None,
            32_000,
        ),
    ]
}

// ---------------------------------------------------------------------------------------
// Running the dashboards

/// One run of one query: the expanded SQL and the answer (TabSeparated).
struct Ran {
    label: String,
    sql: String,
    answer: String,
}

struct Runner<'f> {
    fx: &'f Fixture,
    range: Range,
    ran: Vec<Ran>,
    /// Labels whose answers the test asserted on.
    checked: BTreeSet<String>,
}

impl Runner<'_> {
    /// Runs every ClickHouse query of `uid` with `vars`; answers by query name.
    fn run(
        &mut self,
        uid: &str,
        pass: &str,
        vars: &BTreeMap<&'static str, String>,
    ) -> HashMap<String, Vec<Vec<String>>> {
        let d = dashboard(uid);
        let mut out = HashMap::new();
        for q in clickhouse_queries(&d.json) {
            let sql = expand(&q.sql, vars, self.range)
                .unwrap_or_else(|e| panic!("{uid}: {}: {e}", q.name));
            let answer = self
                .fx
                .http
                .tsv(&sql)
                .unwrap_or_else(|e| panic!("{uid}: {}:\n{sql}\n{e}", q.name));
            self.ran.push(Ran {
                label: format!("{uid} {pass} {}", q.name),
                sql,
                answer: answer.clone(),
            });
            out.insert(q.name.clone(), rows(&answer));
        }
        out
    }

    fn check<'a>(
        &mut self,
        answers: &'a HashMap<String, Vec<Vec<String>>>,
        uid: &str,
        pass: &str,
        name: &str,
    ) -> &'a Vec<Vec<String>> {
        self.checked.insert(format!("{uid} {pass} {name}"));
        answers
            .get(name)
            .unwrap_or_else(|| panic!("{uid}: no query named {name}"))
    }
}

fn vars(database: &str, extra: &[(&'static str, &str)]) -> BTreeMap<&'static str, String> {
    let mut v = BTreeMap::from([
        ("db", database.to_owned()),
        ("prefix", "keywatch_".to_owned()),
    ]);
    for (k, val) in extra {
        v.insert(*k, (*val).to_owned());
    }
    v
}

fn column(rows: &[Vec<String>], i: usize) -> Vec<&str> {
    rows.iter().map(|r| r[i].as_str()).collect()
}

fn sum(rows: &[Vec<String>], i: usize) -> f64 {
    rows.iter().map(|r| num(&r[i])).sum()
}

#[test]
fn every_clickhouse_query_answers_on_data_keywatch_wrote() {
    let fx = fixture();
    let ran = check_every_query(&fx);
    write_chdb_catalog(
        &fx,
        &ran,
        "dashboard-sql-catalog.json",
        "every_clickhouse_query_answers_on_data_keywatch_wrote",
    );
}

/// The same queries on a cluster of two shards (`store.clickhouse.cluster`): the tables
/// they name are Distributed tables and tables every server holds, so they read the
/// whole cluster and answer the same.
#[test]
fn every_clickhouse_query_answers_on_a_cluster() {
    let cluster = crate::cluster::cluster(2, 1);
    let dir = tempfile::Builder::new()
        .prefix("keywatch-dash-cluster-")
        .tempdir()
        .unwrap();
    let url = cluster.nodes[1].2.clone();
    let fx = fixture_on(dir, Box::new(cluster), &url, Some("keywatch"));
    let ran = check_every_query(&fx);
    // The reads are plain SQL whatever the engines behind the names: chdb checks them on
    // plain tables holding what the cluster's Distributed tables read, against the
    // cluster's answers (ON CLUSTER DDL and Replicated tables need ZooKeeper and remote
    // servers, which chdb has not).
    write_chdb_catalog(
        &fx,
        &ran,
        "dashboard-cluster-sql-catalog.json",
        "every_clickhouse_query_answers_on_a_cluster",
    );
}

/// Runs and checks every query of every ClickHouse dashboard; returns what ran.
fn check_every_query(fx: &Fixture) -> Vec<Ran> {
    let t = &fx.truth;
    let old = t.rotation.old_key.identity.clone();
    let new = t.rotation.new_key.identity.clone();
    let range = Range {
        from_ms: t.start_ms - t.start_ms.rem_euclid(1000),
        to_ms: t.end_ms + 86_400_000,
        interval_ms: 3_600_000,
    };
    let in_range = |f: &Finding| f.at_ms >= range.from_ms && f.at_ms / 1000 <= range.to_ms / 1000;
    let mut r = Runner {
        fx,
        range,
        ran: Vec::new(),
        checked: BTreeSet::new(),
    };
    let requests_of = |key: &str| -> usize {
        if key == NO_KEY {
            return t.scanner_requests;
        }
        t.clients
            .iter()
            .flat_map(|c| &c.keys)
            .find(|k| k.identity == key)
            .unwrap_or_else(|| panic!("no key {key} in the truth"))
            .requests
    };

    // ---- Rotations, with the variables' own answers as Grafana would pick them.
    let uid = "keywatch-rotations";
    let mut owner_choices = Vec::new();
    for owner in [ALL, "acme-billing"] {
        let pass = format!("owner={owner}");
        // The variables first: old_key from the rotation findings, new_key from old_key.
        let a = r.run(
            uid,
            &pass,
            &vars(
                &fx.database,
                &[("owner", owner), ("old_key", ""), ("new_key", "")],
            ),
        );
        let owners = column(r.check(&a, uid, &pass, "var owner"), 0)
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>();
        let want: BTreeSet<String> = fx.findings.iter().filter_map(|f| f.owner.clone()).collect();
        assert_eq!(owners, want.into_iter().collect::<Vec<_>>());
        owner_choices = owners;
        let old_keys = r.check(&a, uid, &pass, "var old_key");
        assert_eq!(old_keys, &vec![vec![old.clone()]], "{pass}");
        let v = vars(
            &fx.database,
            &[("owner", owner), ("old_key", &old), ("new_key", "")],
        );
        let a = r.run(uid, &pass, &v);
        assert_eq!(
            r.check(&a, uid, &pass, "var new_key"),
            &vec![vec![new.clone()]]
        );
        let v = vars(
            &fx.database,
            &[("owner", owner), ("old_key", &old), ("new_key", &new)],
        );
        let a = r.run(uid, &pass, &v);

        let share = r.check(
            &a,
            uid,
            &pass,
            "panel Share of the client's traffic on the new key/A",
        );
        assert!(
            share.len() > 48,
            "hourly buckets over 4 days: {}",
            share.len()
        );
        for row in share {
            let (n, o) = (num(&row[1]), num(&row[2]));
            assert!((n + o - 1.0).abs() < 1e-9, "shares sum to 1: {row:?}");
        }
        // Before the rotation starts nothing uses the new key; at the end the laggards
        // still use the old one.
        let start_s = t.rotation.start_ms / 1000;
        let before: Vec<_> = share
            .iter()
            .filter(|row| bucket_end_s(&row[0], 3600) <= start_s)
            .collect();
        assert!(!before.is_empty() && before.iter().all(|row| num(&row[1]) == 0.0));
        let last = share.last().unwrap();
        assert!(num(&last[2]) > 0.0, "laggards keep the old key: {last:?}");

        let (o_req, n_req) = (t.rotation.old_key.requests, t.rotation.new_key.requests);
        let range_share = r.check(&a, uid, &pass, "panel New-key share (range)/A");
        let want = n_req as f64 / (o_req + n_req) as f64;
        assert!(
            (num(&range_share[0][0]) - want).abs() < 1e-9,
            "{range_share:?} vs {want}"
        );

        let deadline = r.check(&a, uid, &pass, "panel Deadline/A");
        assert_eq!(deadline, &vec![vec![DEADLINE_MS.to_string()]]);

        let at_risk = fx
            .findings
            .iter()
            .filter(|f| kind(f) == "rotation_at_risk")
            .max_by_key(|f| f.at_ms)
            .unwrap();
        let forecast = r.check(&a, uid, &pass, "panel Forecast completion/A");
        match evidence_str(at_risk, "completion") {
            Some(c) => {
                let ms = chrono::DateTime::parse_from_rfc3339(c)
                    .unwrap()
                    .timestamp_millis();
                assert_eq!(forecast, &vec![vec![(ms / 1000 * 1000).to_string()]]);
            }
            None => assert!(forecast.is_empty(), "{forecast:?}"),
        }

        let per_key = r.check(&a, uid, &pass, "panel Requests: old key vs new key/A");
        assert_eq!(sum(per_key, 1) as usize, o_req);
        assert_eq!(sum(per_key, 2) as usize, n_req);
        assert_eq!(sum(per_key, 3) as usize, t.rotation.fumbled_401s);

        let rot_findings = r.check(&a, uid, &pass, "panel Rotation findings/A");
        let want = fx
            .findings
            .iter()
            .filter(|f| {
                ROTATION_KINDS.contains(&kind(f).as_str())
                    && evidence_str(f, "old_key") == Some(&old)
                    && in_range(f)
            })
            .count();
        assert_eq!(rot_findings.len(), want);

        let lingering = r.check(&a, uid, &pass, "panel Sources still on the old key/A");
        let ips: BTreeSet<&str> = column(lingering, 0).into_iter().collect();
        let laggards: BTreeSet<&str> = t.rotation.laggards.iter().map(String::as_str).collect();
        assert_eq!(ips, laggards, "{lingering:?}");
    }
    assert!(owner_choices.contains(&"acme-billing".to_owned()));

    // ---- Keys: every key for All; acme-billing's two keys for its owner.
    let uid = "keywatch-keys";
    let all_keys: BTreeSet<String> = t
        .clients
        .iter()
        .flat_map(|c| &c.keys)
        .map(|k| k.identity.clone())
        .chain([NO_KEY.to_owned()])
        .collect();
    // The key with the most anomaly findings (the daemon feeds the per-key models).
    let mut anomalies_per_key: BTreeMap<&str, usize> = BTreeMap::new();
    for f in &fx.findings {
        if f.key_id != NO_KEY && ANOMALY_KINDS.contains(&kind(f).as_str()) {
            *anomalies_per_key.entry(f.key_id.as_str()).or_default() += 1;
        }
    }
    let anomalous = anomalies_per_key
        .iter()
        .max_by_key(|(k, n)| (**n, *k))
        .map(|(k, _)| k.to_string())
        .expect("the daemon raised anomaly findings");
    for (owner, key) in [
        (ALL, old.as_str()),
        ("acme-billing", new.as_str()),
        (ALL, anomalous.as_str()),
    ] {
        let pass = format!("owner={owner},key={key}");
        let a = r.run(
            uid,
            &pass,
            &vars(&fx.database, &[("owner", owner), ("key", key)]),
        );
        let keys: BTreeSet<String> = column(r.check(&a, uid, &pass, "var key"), 0)
            .into_iter()
            .map(str::to_owned)
            .collect();
        let want_keys: BTreeSet<String> = if owner == ALL {
            all_keys.clone()
        } else {
            BTreeSet::from([old.clone(), new.clone()])
        };
        assert_eq!(keys, want_keys);
        let owners = column(r.check(&a, uid, &pass, "var owner"), 0);
        assert!(owners.contains(&"acme-billing"), "{owners:?}");

        let series = r.check(&a, uid, &pass, "panel Requests per key/A");
        let mut per_key: BTreeMap<&str, f64> = BTreeMap::new();
        for row in series {
            *per_key.entry(row[1].as_str()).or_default() += num(&row[2]);
        }
        assert_eq!(
            per_key
                .keys()
                .map(|k| k.to_string())
                .collect::<BTreeSet<_>>(),
            want_keys
        );
        for (k, n) in &per_key {
            assert_eq!(*n as usize, requests_of(k), "{k}");
        }

        let table = r.check(&a, uid, &pass, "panel Keys/A");
        assert_eq!(table.len(), want_keys.len());
        for row in table {
            assert_eq!(num(&row[1]) as usize, requests_of(&row[0]), "{row:?}");
            assert!((num(&row[3]) - (num(&row[2]) / num(&row[1]))).abs() < 1e-4);
        }
        if owner == ALL {
            // Every failure of the sample: 429s of the noisy client, the fumbled rollover's
            // 401s, the scanner's rejected requests.
            let want = t.rate_limited + t.rotation.fumbled_401s + t.scanner_requests;
            assert_eq!(sum(table, 2) as usize, want);
        }

        let mine: Vec<&AuthEvent> = fx.events.iter().filter(|e| e.key_id == key).collect();
        let failures = r.check(&a, uid, &pass, "panel Failures by outcome: ${key}/A");
        let invalid = mine
            .iter()
            .filter(|e| e.outcome == Outcome::InvalidKey)
            .count();
        assert_eq!(sum(failures, 1) as usize, invalid);
        // Auth failures only: a 404 or 500 with a valid key is an `ok` outcome.
        let rejected = mine.iter().filter(|e| e.outcome != Outcome::Ok).count();
        let all_failures: f64 = (1..=6).map(|i| sum(failures, i)).sum();
        assert_eq!(all_failures as usize, rejected);
        if key == new {
            assert_eq!(invalid, t.rotation.fumbled_401s);
        }

        let lat = r.check(&a, uid, &pass, "panel Latency: ${key}/A");
        let lats: Vec<f64> = mine.iter().filter_map(|e| e.latency_ms).collect();
        let max = lats.iter().cloned().fold(0.0, f64::max);
        let top = lat.iter().map(|row| num(&row[2])).fold(0.0, f64::max);
        assert!((top - max).abs() < 1e-6, "max latency {top} vs {max}");
        let quantiles = r.check(&a, uid, &pass, "panel Latency: ${key}/B");
        assert_eq!(quantiles.len(), lat.len());
        for (q, l) in quantiles.iter().zip(lat) {
            assert_eq!(q[0], l[0]);
            let (p50, p95, max) = (num(&q[1]), num(&q[2]), num(&l[2]));
            assert!(p50 <= p95 && p95 <= max + 1e-9, "{q:?} {l:?}");
        }

        let sources = r.check(&a, uid, &pass, "panel Sources of ${key}/A");
        assert_eq!(sum(sources, 6) as usize, requests_of(key));
        let ips: BTreeSet<&str> = column(sources, 0).into_iter().collect();
        let want_ips: BTreeSet<&str> = mine.iter().filter_map(|e| e.source_ip.as_deref()).collect();
        assert_eq!(ips, want_ips);
        if key == new {
            let switched: BTreeSet<&str> =
                t.rotation.switched.iter().map(|s| s.ip.as_str()).collect();
            assert_eq!(ips, switched);
        }

        let names_key = |f: &&Finding| {
            (f.key_id == key || evidence_str(f, "new_key") == Some(key)) && in_range(f)
        };
        let about = r.check(&a, uid, &pass, "panel Findings about ${key}/A");
        assert_eq!(about.len(), fx.findings.iter().filter(names_key).count());
        assert!(!about.is_empty());
        let anomalies = r.check(&a, uid, &pass, "annotation Anomalies");
        let want = fx
            .findings
            .iter()
            .filter(|f| f.key_id == key && ANOMALY_KINDS.contains(&kind(f).as_str()) && in_range(f))
            .count();
        assert_eq!(anomalies.len(), want);
        let others = r.check(&a, uid, &pass, "annotation Other findings");
        let want = fx
            .findings
            .iter()
            .filter(names_key)
            .filter(|f| !ANOMALY_KINDS.contains(&kind(f).as_str()))
            .count();
        assert_eq!(others.len(), want);
        if key == anomalous {
            assert!(!anomalies.is_empty());
        }
        if key == old {
            // The broken rollover on the new key is marked on the old key's graphs.
            assert!(
                anomalies.iter().any(|row| row[1] == "failed_rollover"),
                "{anomalies:?}"
            );
        }
    }

    // ---- Findings and notifications.
    let uid = "keywatch-findings";
    for (owner, key, kind_var) in [
        (ALL, ALL, ALL),
        ("acme-billing", ALL, ALL),
        (ALL, ALL, "lingering_old_key"),
        (ALL, anomalous.as_str(), ALL),
    ] {
        let pass = format!("owner={owner},key={key},kind={kind_var}");
        let a = r.run(
            uid,
            &pass,
            &vars(
                &fx.database,
                &[("owner", owner), ("key", key), ("kind", kind_var)],
            ),
        );
        let kinds: BTreeSet<String> = fx.findings.iter().map(kind).collect();
        let got: BTreeSet<String> = column(r.check(&a, uid, &pass, "var kind"), 0)
            .into_iter()
            .map(str::to_owned)
            .collect();
        assert_eq!(got, kinds);
        r.check(&a, uid, &pass, "var owner");
        let keys: BTreeSet<&str> = column(r.check(&a, uid, &pass, "var key"), 0)
            .into_iter()
            .collect();
        let want_keys: BTreeSet<&str> = fx
            .findings
            .iter()
            .filter(|f| owner == ALL || f.owner.as_deref() == Some(owner))
            .map(|f| f.key_id.as_str())
            .collect();
        assert_eq!(keys, want_keys);
        let want: Vec<&Finding> = fx
            .findings
            .iter()
            .filter(|f| owner == ALL || f.owner.as_deref() == Some(owner))
            .filter(|f| key == ALL || f.key_id == key)
            .filter(|f| kind_var == ALL || kind(f) == kind_var)
            .filter(|f| in_range(f))
            .collect();
        assert!(!want.is_empty());
        let by_kind = r.check(&a, uid, &pass, "panel New findings by kind/A");
        // Each fact once; the range covers every first raise of the facts last raised in it.
        assert_eq!(sum(by_kind, 2) as usize, want.len());
        let by_severity = r.check(&a, uid, &pass, "panel By severity/A");
        for row in by_severity {
            let n = want
                .iter()
                .filter(|f| f.severity.as_str() == row[0])
                .count();
            assert_eq!(num(&row[1]) as usize, n, "{row:?}");
            assert!(
                num(&row[3]) >= num(&row[1]),
                "raised at least once each: {row:?}"
            );
        }
        assert_eq!(sum(by_severity, 1) as usize, want.len());
        let table = r.check(&a, uid, &pass, "panel Findings/A");
        assert_eq!(table.len(), want.len());
        let newest = want.iter().map(|f| f.at_ms / 1000).max().unwrap();
        assert_eq!(table[0][0], datetime(newest));
        for row in table {
            assert!(row[1] <= row[0], "first raise after the last: {row:?}");
            assert!(num(&row[2]) >= 1.0);
        }

        // Notifications, filtered by the owner they went to.
        let n: Vec<&AttemptRecord> = fx
            .notifications
            .iter()
            .filter(|a| owner == ALL || a.recipient == owner)
            .collect();
        let attempts = r.check(&a, uid, &pass, "panel Notification attempts by outcome/A");
        assert_eq!(sum(attempts, 2) as usize, n.len());
        let by_channel = r.check(&a, uid, &pass, "panel Delivery by channel/A");
        let email_messages = if owner == ALL { "2" } else { "1" };
        assert_eq!(
            by_channel
                .iter()
                .map(|row| (
                    row[0].as_str(),
                    row[2].as_str(),
                    row[3].as_str(),
                    row[4].as_str()
                ))
                .collect::<Vec<_>>(),
            vec![
                ("email", email_messages, "0", email_messages),
                ("slack", "1", "1", "1"),
                ("telegram", "0", "1", "1")
            ]
        );
        let sent = r.check(&a, uid, &pass, "panel What was sent to whom/A");
        assert_eq!(sent.len(), n.len());
        let recipients: BTreeSet<&str> = column(sent, 1).into_iter().collect();
        let want_recipients: BTreeSet<&str> = n.iter().map(|a| a.recipient.as_str()).collect();
        assert_eq!(recipients, want_recipients);
        let failed = r.check(&a, uid, &pass, "panel Delivery failures/A");
        assert_eq!(
            failed
                .iter()
                .map(|row| (row[2].as_str(), row[5].as_str(), row[6].as_str()))
                .collect::<BTreeSet<_>>(),
            BTreeSet::from([
                ("slack", "transient", "429 retry after 2 s"),
                ("telegram", "permanent", "400 Bad Request: chat not found")
            ])
        );
        // The dashboards show where messages went without the secrets in it.
        for row in sent.iter().chain(failed) {
            let line = row.join("\t");
            for secret in [CHAT_ID, "SECRET", "/services/"] {
                assert!(!line.contains(secret), "{secret} shown: {line}");
            }
        }
    }

    // Every query of every ClickHouse dashboard was run and its answer checked.
    for d in dashboards() {
        for q in clickhouse_queries(&d.json) {
            let uid = d.json["uid"].as_str().unwrap();
            assert!(
                r.checked
                    .iter()
                    .any(|c| c.starts_with(&format!("{uid} "))
                        && c.ends_with(&format!(" {}", q.name))),
                "{uid}: {} is not checked by this test",
                q.name
            );
        }
    }

    r.ran
}

/// The end (in seconds) of the bucket starting at `time` (`YYYY-MM-DD hh:mm:ss`, UTC).
fn bucket_end_s(time: &str, interval_s: i64) -> i64 {
    chrono::NaiveDateTime::parse_from_str(time, "%Y-%m-%d %H:%M:%S")
        .unwrap()
        .and_utc()
        .timestamp()
        + interval_s
}

fn datetime(s: i64) -> String {
    chrono::DateTime::from_timestamp(s, 0)
        .unwrap()
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

// ---------------------------------------------------------------------------------------
// The same statements for a current ClickHouse (tests/chdb/run.sh)

/// Writes target/tmp/`file` in the format of tests/chdb/check_schema.py: the current
/// single-server schema, the rows keywatch wrote here (dumped as RowBinary; on a cluster
/// through the Distributed tables, so every shard's), and every expanded dashboard query
/// with this server's (or cluster's) answer to compare.
fn write_chdb_catalog(fx: &Fixture, ran: &[Ran], file: &str, test: &str) {
    const CHDB_DATABASE: &str = "keywatch_dashboards";
    let sql = Sql::new(CHDB_DATABASE, "keywatch_");
    let features = ServerFeatures::current();
    let mut steps = vec![Step::Execute {
        name: "create_database".into(),
        sql: sql.create_database(),
    }];
    for (i, m) in sql.migrations(&features, 0).iter().enumerate() {
        for (j, s) in m.iter().enumerate() {
            steps.push(Step::Execute {
                name: format!("migration_{}_{}", i + 1, j + 1),
                sql: s.clone(),
            });
        }
    }
    let here = Sql::new(&fx.database, "keywatch_");
    for t in [
        Table::Events,
        Table::RollupMinute,
        Table::KeySources,
        Table::KeysSeen,
        Table::Offsets,
        Table::Findings,
        Table::Notifications,
        Table::FindingState,
        Table::NotifyAttempts,
    ] {
        let cols = t.columns();
        let names: Vec<&str> = cols.iter().map(|(n, _)| n.as_str()).collect();
        let data = fx
            .http
            .bytes(&format!(
                "SELECT {} FROM {} FORMAT RowBinary",
                names.join(", "),
                here.table(t)
            ))
            .unwrap();
        let n: usize = fx
            .http
            .tsv(&format!("SELECT count() FROM {}", here.table(t)))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(n > 0, "{}: no rows", here.table(t));
        steps.push(Step::Insert {
            name: format!("rows_{}", t.suffix()),
            table: sql.table(t),
            sql: sql.insert(t),
            columns: names.join(", "),
            structure: cols
                .iter()
                .map(|(n, ty)| format!("{n} {ty}"))
                .collect::<Vec<_>>()
                .join(", "),
            settings: features
                .insert_settings
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            rows: n,
            data_hex: hex::encode(data),
        });
    }
    for (i, q) in ran.iter().enumerate() {
        steps.push(Step::Query {
            name: format!("{i:03} {}", q.label),
            sql: q
                .sql
                .replace(&format!("{}.", fx.database), &format!("{CHDB_DATABASE}.")),
            compare: true,
            expected: Some(q.answer.clone()),
        });
    }
    let version = fx.http.tsv("SELECT version()").unwrap();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(file);
    let doc = serde_json::json!({
        "written_by": format!("tests/it/dashboards.rs {test}"),
        "answers_from": version.trim(),
        "steps": steps,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    eprintln!("wrote {} ({} queries)", out.display(), ran.len());
}

// ---------------------------------------------------------------------------------------
// Health: the Prometheus dashboard against a running daemon

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    Some(resp.split_once("\r\n\r\n")?.1.to_owned())
}

/// Metric names (`keywatch_…`) in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("keywatch_") {
        let tail = &rest[i..];
        let n = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        // A histogram's series are its name plus _bucket, _sum and _count.
        let name = &tail[..n];
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.insert(name.to_owned());
        rest = &tail[n..];
    }
    out
}

/// Every `"keywatch_…"` string literal under src/: the metrics keywatch can export.
fn metrics_in_source(dir: &Path, out: &mut BTreeSet<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            metrics_in_source(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let text = std::fs::read_to_string(&p).unwrap();
            for name in metric_names(&text) {
                if text.contains(&format!("\"{name}\"")) {
                    out.insert(name);
                }
            }
        }
    }
}

#[test]
fn health_dashboard_reads_metrics_keywatch_exports() {
    let d = dashboard("keywatch-health");
    let mut exprs = Vec::new();
    for p in arr(&d.json["panels"]) {
        for t in arr(&p["targets"]) {
            exprs.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    assert!(used.len() >= 12, "{used:?}");

    // A daemon following a log, with /metrics on.
    let dir = tempfile::tempdir().unwrap();
    let log = crate::support::sample(dir.path(), "kong", 2000, 3);
    let port = free_port();
    let config = crate::support::config(
        dir.path(),
        &log,
        "kong",
        &format!("[server]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("follow = false", "follow = true");
    std::fs::write(&config, text).unwrap();
    let mut child = crate::support::run_config(&config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        if let Some(b) = get(port, "/metrics") {
            if b.lines().any(|l| l == "keywatch_events_total 2000") {
                break b;
            }
        }
        assert!(Instant::now() < deadline, "no metrics with 2000 events");
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();

    let scraped = metric_names(&body);
    // What every instance exports as soon as it has stored a batch.
    for name in [
        "keywatch_events_total",
        "keywatch_source_lines_total",
        "keywatch_batches_committed_total",
        "keywatch_store_commit_seconds",
        "keywatch_last_commit_timestamp_seconds",
        "keywatch_source_lag_bytes",
    ] {
        assert!(used.contains(name), "the health dashboard shows {name}");
        assert!(scraped.contains(name), "/metrics has {name}:\n{body}");
    }
    // The commit time is a histogram (the dashboard computes its quantiles from the
    // buckets, which add up across the instances of a group).
    for le in ["0.01", "0.1", "1", "+Inf"] {
        assert!(
            body.contains(&format!(
                "keywatch_store_commit_seconds_bucket{{le=\"{le}\"}}"
            )),
            "{body}"
        );
    }
    assert!(
        body.contains("# TYPE keywatch_store_commit_seconds histogram"),
        "{body}"
    );
    assert!(body.contains("keywatch_build_info{version="), "{body}");
    // The others appear once something happens (Kafka, errors, findings): they must at
    // least be metrics keywatch's source emits.
    let mut known = BTreeSet::new();
    metrics_in_source(&root().join("src"), &mut known);
    for name in &used {
        assert!(
            scraped.contains(name) || known.contains(name),
            "the health dashboard uses {name}, which keywatch does not export"
        );
    }
}
