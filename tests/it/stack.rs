//! Acceptance: the docker-compose stack as docker-compose.yml wires it, without Docker.
//!
//! Real parts only: deploy/traffic.sh writes the Kong history and the shifted registry,
//! `keywatch produce` ships the history into a 3-partition `gateway-logs` topic of a real
//! Apache Kafka broker as Vector would, and the real binary runs with a config
//! derived from deploy/keywatch.toml and deploy/routes.toml (only hosts, ports, paths and
//! timings changed), storing into a real ClickHouse and mailing a real SMTP server
//! (aiosmtpd, in place of Mailpit). The test checks what a user of the stack would see:
//! every event stored, the rotation with its two laggard hosts, the owner's email naming
//! them and the deadline, the attempts in ClickHouse, a key revoked on the lifecycle topic
//! caught on its next use, and a clean stop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::clickhouse::{fresh_database, ClickHouse};
use crate::support::kafka::{messages_in, Broker};
use crate::support::Smtp;
use crate::support::{keywatch, metric, run_ok, wait_with_timeout};
use serde_json::Value;

/// The history's size and seed (the compose stack's default seed; fewer lines than its
/// 20000, for time).
const LINES: usize = 4000;
const SEED: u64 = 1;
const FINGERPRINT_SECRET: &str = "stack-test-fingerprint-secret-0123456789";
/// The password of the `keywatch` user of the test servers (scripts/clickhouse.sh).
const CLICKHOUSE_PASSWORD: &str = "keywatch-test";
/// hooli-sync's primary key in deploy/keys.toml: used by the traffic, revoked on the
/// lifecycle topic by the test.
const REVOKED: &str = "d95cf136-d366-47db-9db6-681926721e82";
const WAIT: Duration = Duration::from_secs(90);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Kills the child processes it holds when dropped, so that a failed assertion leaves
/// nothing running (the broker and the SMTP server stop on their own drop).
#[derive(Default)]
struct Reaper {
    children: Vec<Child>,
}

impl Reaper {
    fn hold(&mut self, child: Child) -> usize {
        self.children.push(child);
        self.children.len() - 1
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for c in &mut self.children {
            // Only a child not reaped yet: its pid cannot belong to another process.
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Every keywatch command of the test, with the secrets the stack passes in its
/// environment.
fn kw() -> Command {
    let mut c = keywatch();
    c.env("KEYWATCH_FINGERPRINT_SECRET", FINGERPRINT_SECRET)
        .env("CLICKHOUSE_PASSWORD", CLICKHOUSE_PASSWORD);
    c
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < WAIT,
            "timed out after {WAIT:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Runs deploy/traffic.sh as the `traffic` service does and stops it once the history is
/// written (at its first live line): (the history's lines, the shifted registry).
fn run_traffic(dir: &Path, reaper: &mut Reaper) -> (Vec<String>, PathBuf) {
    let log = dir.join("var/log/gateway/access.log");
    let registry = dir.join("etc/keywatch/registry/keys.toml");
    let child = Command::new("bash")
        .arg(root().join("deploy/traffic.sh"))
        .env("LOG", &log)
        .env("REGISTRY_IN", root().join("deploy/keys.toml"))
        .env("REGISTRY_OUT", &registry)
        .env("LINES", LINES.to_string())
        .env("SEED", SEED.to_string())
        .env("RATE", "1")
        .env("KEYWATCH", env!("CARGO_BIN_EXE_keywatch"))
        .stdout(Stdio::null())
        // Its scratch directory (mktemp -d), which a killed script leaves behind.
        .env("TMPDIR", dir)
        .stderr(std::fs::File::create(dir.join("traffic.err")).unwrap())
        .spawn()
        .expect("running deploy/traffic.sh");
    let i = reaper.hold(child);
    wait_for("deploy/traffic.sh to write its history", || {
        assert!(
            reaper.children[i].try_wait().unwrap().is_none(),
            "deploy/traffic.sh stopped early: {}",
            std::fs::read_to_string(dir.join("traffic.err")).unwrap_or_default()
        );
        let n = std::fs::read_to_string(&log)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        (n > LINES && registry.exists()).then_some(())
    });
    // The live loop's `sleep 1` outlives the script by at most a second.
    let _ = Command::new("kill")
        .args(["-TERM", &reaper.children[i].id().to_string()])
        .status();
    let _ = reaper.children[i].wait();
    let history: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .take(LINES)
        .map(str::to_owned)
        .collect();
    (history, registry)
}

fn read_toml(path: &Path) -> toml::Table {
    toml::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn table<'a>(t: &'a mut toml::Table, key: &str) -> &'a mut toml::Table {
    t.get_mut(key)
        .and_then(toml::Value::as_table_mut)
        .unwrap_or_else(|| panic!("no [{key}] table"))
}

/// Sets a key that the shipped file has (the test breaks when the file's shape changes).
fn set(t: &mut toml::Table, key: &str, v: impl Into<toml::Value>) {
    assert!(t.contains_key(key), "the shipped config has no `{key}`");
    t.insert(key.to_owned(), v.into());
}

fn path_str(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

/// deploy/routes.toml with the mail channel pointed at the local SMTP server, and the
/// templates and group wait made local and short.
fn routes(dir: &Path, smtp_port: u16) -> (PathBuf, toml::Table) {
    let mut r = read_toml(&root().join("deploy/routes.toml"));
    let defaults = table(&mut r, "defaults");
    set(
        defaults,
        "templates",
        path_str(&root().join("rules/templates")),
    );
    set(defaults, "group_wait", "1s");
    let mail = table(table(&mut r, "channels"), "mail");
    assert_eq!(mail["type"].as_str(), Some("email"));
    set(mail, "host", "127.0.0.1");
    set(mail, "port", i64::from(smtp_port));
    // Mailpit, like aiosmtpd here, speaks plain SMTP.
    assert_eq!(mail["security"].as_str(), Some("none"));
    let path = dir.join("routes.toml");
    std::fs::write(&path, toml::to_string(&r).unwrap()).unwrap();
    (path, r)
}

/// deploy/keywatch.toml with hosts, ports, paths and timings made local.
fn keywatch_config(
    dir: &Path,
    brokers: &str,
    ch: &ClickHouse,
    database: &str,
    registry: &Path,
    routes: &Path,
    port: u16,
) -> (PathBuf, toml::Table) {
    let mut c = read_toml(&root().join("deploy/keywatch.toml"));
    set(&mut c, "state_dir", path_str(&dir.join("state")));
    let kafka = table(table(&mut c, "input"), "kafka");
    set(kafka, "brokers", brokers);
    let clickhouse = table(table(&mut c, "store"), "clickhouse");
    set(clickhouse, "url", ch.url.as_str());
    set(clickhouse, "database", database);
    let rules = table(&mut c, "rules");
    set(rules, "keys", path_str(registry));
    set(rules, "policy", path_str(&root().join("rules/policy.toml")));
    set(rules, "routes", path_str(routes));
    // The shipped "1m" would make the test wait a minute; 10 s still lets keywatch consume
    // the whole backlog before its first evaluation. Rotations are evaluated at wall-clock
    // time over what is stored so far, so an evaluation halfway through the backlog would
    // see hosts that switched later as still on the old key (see the lingering check).
    set(rules, "evaluate_every", "10s");
    set(
        table(&mut c, "server"),
        "listen",
        format!("127.0.0.1:{port}"),
    );
    let path = dir.join("keywatch.toml");
    std::fs::write(&path, toml::to_string(&c).unwrap()).unwrap();
    (path, c)
}

fn str_at<'a>(t: &'a toml::Table, path: &[&str]) -> &'a str {
    let mut v = t.get(path[0]).unwrap();
    for k in &path[1..] {
        v = v.get(k).unwrap_or_else(|| panic!("no {path:?}"));
    }
    v.as_str()
        .unwrap_or_else(|| panic!("{path:?} is not a string"))
}

fn produce(brokers: &str, topic: &str, lines: &[String], config: Option<&Path>, dir: &Path) {
    let file = dir.join(format!("{topic}-{}.jsonl", lines.len()));
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let mut cmd = kw();
    cmd.current_dir(dir)
        .args(["produce", "--brokers", brokers, "--topic", topic, "--file"])
        .arg(&file);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    run_ok(&mut cmd);
}

/// Rows of a query (JSONEachRow) as the test servers' `default` user.
fn query(ch: &ClickHouse, sql: &str) -> Vec<Value> {
    let r = reqwest::blocking::Client::new()
        .post(&ch.url)
        .body(format!("{sql} FORMAT JSONEachRow"))
        .send()
        .unwrap();
    let status = r.status();
    let text = r.text().unwrap();
    assert!(status.is_success(), "{sql}: {text}");
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn findings(config: &Path) -> (String, Vec<Value>) {
    let out = run_ok(kw().args(["findings", "--json", "--config"]).arg(config));
    let text = String::from_utf8(out.stdout).unwrap();
    let parsed = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (text, parsed)
}

fn ip_of(f: &Value) -> String {
    f["evidence"]["ip"]
        .as_str()
        .or(f["source"]["ip"].as_str())
        .unwrap_or("")
        .to_owned()
}

fn started_at(line: &str) -> i64 {
    serde_json::from_str::<Value>(line).unwrap()["started_at"]
        .as_i64()
        .unwrap()
}

#[test]
fn the_compose_stack_wiring_works_end_to_end() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut reaper = Reaper::default();

    // 1. The traffic service: history ending now, and the registry with the same shift.
    let (history, registry) = run_traffic(d, &mut reaper);
    assert_eq!(history.len(), LINES);
    let truth = keywatch::sample::scenario_truth(&keywatch::sample::SampleOptions {
        lines: LINES,
        seed: SEED,
        ..Default::default()
    })
    .unwrap();
    let mut laggards = truth.rotation.laggards.clone();
    laggards.sort();
    let switched: Vec<String> = truth
        .rotation
        .switched
        .iter()
        .map(|s| s.ip.clone())
        .collect();
    let old_key = truth.rotation.old_key.identity.clone();
    let reg = read_toml(&registry);
    let keys = reg["keys"].as_array().unwrap();
    let key_a = keys
        .iter()
        .find(|k| k["id"].as_str() == Some(old_key.as_str()))
        .expect("acme-billing's old key is in deploy/keys.toml");
    assert_eq!(key_a["state"].as_str(), Some("rotating"));
    let owner = key_a["owner"].as_str().unwrap().to_owned();
    let owner_table = &reg["owners"][owner.as_str()];
    let owner_mail = owner_table["email"][0].as_str().unwrap().to_owned();
    let tz: chrono_tz::Tz = owner_table["timezone"].as_str().unwrap().parse().unwrap();
    let deadline_ms = chrono::DateTime::parse_from_rfc3339(key_a["deadline"].as_str().unwrap())
        .unwrap()
        .timestamp_millis();
    let deadline_local = keywatch::registry::format_local(deadline_ms, tz);
    let revoked_key = keys
        .iter()
        .find(|k| k["id"].as_str() == Some(REVOKED))
        .expect("the key to revoke is in deploy/keys.toml");
    let revoked_owner = revoked_key["owner"].as_str().unwrap().to_owned();
    let revoked_lines: Vec<&String> = history.iter().filter(|l| l.contains(REVOKED)).collect();
    assert!(revoked_lines.len() >= 3, "the traffic uses {REVOKED}");

    // The services: broker with the compose file's topics, ClickHouse, SMTP.
    let broker_dir = d.join("kafka");
    std::fs::create_dir_all(&broker_dir).unwrap();
    let broker = Broker::start(&broker_dir);
    let brokers = broker.brokers();
    let ch_dir = d.join("clickhouse");
    std::fs::create_dir_all(&ch_dir).unwrap();
    let ch = ClickHouse::shared_or_start(&ch_dir);
    let database = fresh_database("kwstack");
    let smtp_port = crate::support::free_port();
    let smtp = Smtp::start(smtp_port, &d.join("mail"), None, None);
    let port = crate::support::free_port();
    let (routes, routes_cfg) = routes(d, smtp_port);
    let security_mail = routes_cfg["receivers"]["security"]["email"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let (config, cfg) = keywatch_config(d, &brokers, &ch, &database, &registry, &routes, port);
    let logs_topic = cfg["input"]["kafka"]["topics"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let dead_topic = str_at(&cfg, &["input", "kafka", "dead_letter_topic"]).to_owned();
    let lifecycle_topic = str_at(&cfg, &["rules", "lifecycle", "topic"]).to_owned();
    // As the kafka-topics service creates them.
    broker.create_topic(&logs_topic, 3);
    broker.create_topic(&dead_topic, 1);
    broker.create_topic(&lifecycle_topic, 1);
    run_ok(kw().arg("check-config").arg(&config));

    // 2. Vector's part: the history into the topic, keyed by key id.
    produce(&brokers, &logs_topic, &history, Some(&config), d);
    assert_eq!(messages_in(&brokers, &logs_topic), LINES as i64);
    eprintln!("[{:?}] history produced", t0.elapsed());

    // 3. keywatch as the stack runs it.
    let log_path = std::env::temp_dir().join(format!(
        "keywatch-test-logs/stack-{}-{database}.log",
        std::process::id()
    ));
    std::fs::create_dir_all(log_path.parent().unwrap()).unwrap();
    eprintln!("keywatch log: {}", log_path.display());
    let daemon = reaper.hold(
        kw().args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );

    // 4. Every event stored, none dead-lettered.
    wait_for("every produced event in ClickHouse", || {
        ch.totals(&database)
            .filter(|(rollups, events)| *rollups == LINES as u64 && *events == LINES as u64)
    });
    let evaluations = metric(port, "keywatch_evaluations_total").unwrap_or(0.0);
    eprintln!(
        "[{:?}] history stored ({evaluations} rotation evaluations before)",
        t0.elapsed()
    );
    assert_eq!(messages_in(&brokers, &dead_topic), 0, "dead letters");
    wait_for("keywatch_events_total to count every event", || {
        metric(port, "keywatch_events_total").filter(|v| *v == LINES as f64)
    });

    // The rotation and its laggards, as `keywatch rotations` and `findings` print them.
    let lingering = wait_for("lingering_old_key findings for the laggards", || {
        let (_, f) = findings(&config);
        let mut ips: Vec<String> = f
            .iter()
            .filter(|f| f["kind"] == "lingering_old_key")
            .map(ip_of)
            .collect();
        ips.sort();
        let wrong: Vec<&String> = ips.iter().filter(|ip| !laggards.contains(ip)).collect();
        assert!(
            wrong.is_empty(),
            "lingering_old_key for {wrong:?}, which switched to the new key (the sample's \
             laggards are {laggards:?}); {evaluations} evaluation(s) ran before the whole \
             history was stored"
        );
        (ips == laggards).then_some(f)
    });
    let lingering: Vec<Value> = lingering
        .into_iter()
        .filter(|f| f["kind"] == "lingering_old_key")
        .collect();
    assert!(lingering.iter().all(|f| f["key_id"] == old_key.as_str()));
    let out = run_ok(kw().args(["rotations", "--config"]).arg(&config));
    let rotations = String::from_utf8(out.stdout).unwrap();
    assert!(
        rotations.contains(&owner) && rotations.contains(&old_key),
        "{rotations}"
    );
    for ip in &laggards {
        assert!(rotations.contains(ip.as_str()), "{ip} in\n{rotations}");
    }
    for ip in &switched {
        assert!(!rotations.contains(ip.as_str()), "{ip} moved:\n{rotations}");
    }
    eprintln!("[{:?}] findings and rotations", t0.elapsed());

    // The owner's email names both hosts and the deadline.
    let mail = wait_for("the owner's email about the lingering hosts", || {
        smtp.messages().into_iter().find(|m| {
            let to = m["rcpt_tos"].to_string();
            let body = m["body"].as_str().unwrap_or("");
            to.contains(&owner_mail) && laggards.iter().all(|ip| body.contains(ip.as_str()))
        })
    });
    let body = mail["body"].as_str().unwrap();
    assert!(
        body.contains(&deadline_local),
        "{deadline_local} in\n{body}"
    );
    for ip in &switched {
        assert!(!body.contains(ip.as_str()), "{ip} moved:\n{body}");
    }
    eprintln!("[{:?}] owner's email", t0.elapsed());

    // The attempts in ClickHouse, and the findings they carried.
    let table = |name: &str| format!("{database}.keywatch_{name}");
    wait_for("the owner's delivered attempt in notify_attempts", || {
        let rows = query(
            &ch,
            &format!(
                "SELECT target, outcome, kinds FROM {} ORDER BY started_ms",
                table("notify_attempts")
            ),
        );
        rows.iter()
            .any(|r| {
                r["outcome"] == "ok"
                    && r["target"].as_str().unwrap_or("").contains(&owner_mail)
                    && r["kinds"]
                        .as_str()
                        .unwrap_or("")
                        .contains("lingering_old_key")
            })
            .then_some(())
    });
    // Each finding an attempt carried has its row in `notifications` (written after the
    // attempt's row).
    let lingering_keys: Vec<&str> = lingering
        .iter()
        .map(|f| f["dedup_key"].as_str().unwrap())
        .collect();
    let mut told = Vec::new();
    wait_for(
        "the lingering findings in notifications.finding_key",
        || {
            told = query(
                &ch,
                &format!(
                    "SELECT DISTINCT finding_key FROM {}",
                    table("notifications")
                ),
            )
            .iter()
            .map(|r| r["finding_key"].as_str().unwrap().to_owned())
            .collect::<Vec<String>>();
            lingering_keys
                .iter()
                .all(|k| told.iter().any(|t| t == k))
                .then_some(())
        },
    );

    // 5. A key revoked on the lifecycle topic, caught on its next use.
    let revoked_at = chrono::Utc::now() - chrono::Duration::hours(1);
    let event = format!(
        r#"{{"type":"key_revoked","key_id":"{REVOKED}","revoked_at":"{}"}}"#,
        revoked_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    produce(&brokers, &lifecycle_topic, &[event], None, d);
    wait_for("the lifecycle event applied", || {
        metric(port, "keywatch_lifecycle_events_total{outcome=\"applied\"}").filter(|v| *v >= 1.0)
    });
    let now = chrono::Utc::now().timestamp_millis();
    let revoked_ip = serde_json::from_str::<Value>(revoked_lines[0]).unwrap()["client_ip"]
        .as_str()
        .unwrap()
        .to_owned();
    let fresh: Vec<String> = revoked_lines
        .iter()
        .filter(|l| l.contains(&format!("\"client_ip\":\"{revoked_ip}\"")))
        .take(3)
        .enumerate()
        .map(|(i, l)| {
            l.replace(
                &format!("\"started_at\":{}", started_at(l)),
                &format!("\"started_at\":{}", now + i as i64),
            )
        })
        .collect();
    produce(&brokers, &logs_topic, &fresh, Some(&config), d);
    let revoked = wait_for("a revoked_key_used finding", || {
        let (_, f) = findings(&config);
        let r: Vec<Value> = f
            .into_iter()
            .filter(|f| f["kind"] == "revoked_key_used")
            .collect();
        (!r.is_empty()).then_some(r)
    });
    assert!(
        revoked.iter().all(|f| f["key_id"] == REVOKED),
        "{revoked:?}"
    );
    assert!(revoked.iter().all(|f| f["owner"] == revoked_owner.as_str()));
    assert!(
        revoked.iter().all(|f| ip_of(f) == revoked_ip
            && chrono::DateTime::parse_from_rfc3339(f["at"].as_str().unwrap())
                .unwrap()
                .timestamp_millis()
                >= now),
        "only the fresh uses: {revoked:?}"
    );
    let revoked_name = revoked_key["name"].as_str().unwrap();
    wait_for("the security team's email about the revoked key", || {
        smtp.messages().into_iter().find(|m| {
            let body = m["body"].as_str().unwrap_or("");
            m["rcpt_tos"].to_string().contains(&security_mail)
                && body.contains(revoked_name)
                && body.contains(&revoked_ip)
        })
    });
    eprintln!("[{:?}] revoked key caught", t0.elapsed());

    // No raw secret anywhere a user looks.
    let (findings_text, all_findings) = findings(&config);
    let mails: String = smtp
        .messages()
        .iter()
        .map(|m| m["data"].as_str().unwrap_or("").to_owned())
        .collect();
    // SIGTERM: a clean stop.
    let pid = reaper.children[daemon].id();
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let status = wait_with_timeout(&mut reaper.children[daemon], Duration::from_secs(30));
    let daemon_log = std::fs::read_to_string(&log_path).unwrap();
    assert!(status.success(), "{status:?}\n{daemon_log}");
    let mut secrets = vec![
        FINGERPRINT_SECRET.to_owned(),
        CLICKHOUSE_PASSWORD.to_owned(),
    ];
    secrets.extend(truth.scanner_keys.iter().cloned());
    for (what, text) in [
        ("the emails", &mails),
        ("the findings", &findings_text),
        ("keywatch's log", &daemon_log),
    ] {
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "{what} show a secret");
        }
    }
    // The stack's traffic is the sample's clients calling what their scopes in
    // deploy/keys.toml allow.
    let out_of_scope: Vec<&Value> = all_findings
        .iter()
        .filter(|f| f["kind"] == "out_of_scope_use")
        .collect();
    assert!(out_of_scope.is_empty(), "false alarms: {out_of_scope:#?}");
    eprintln!("[{:?}] done", t0.elapsed());
}
