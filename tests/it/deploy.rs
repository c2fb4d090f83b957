//! The docker-compose stack, the Dockerfile and the systemd unit, checked as far as this
//! machine can without a Docker engine: `docker-compose config` (installed by
//! scripts/test.sh), keywatch's own `check-config` on the config as the container sees it,
//! the traffic generator run for real, the YAML of Grafana's provisioning, Prometheus and
//! Vector read back, `vector validate` when Vector is installed, and
//! `systemd-analyze verify` for the unit.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{self, keywatch};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn has(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A YAML file's one document, as JSON ([`support::yaml_docs`]).
fn yaml(text: &str) -> Value {
    let mut docs = support::yaml_docs(text);
    assert_eq!(docs.len(), 1, "one YAML document expected");
    docs.remove(0)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `docker-compose config`: the file validated and normalized (paths absolute).
fn compose_config() -> String {
    assert!(
        has("docker-compose"),
        "docker-compose is needed (scripts/test.sh installs it: apt-get install docker-compose)"
    );
    let out = Command::new("docker-compose")
        .args(["-f", "docker-compose.yml", "config"])
        .current_dir(root())
        .env_remove("CLICKHOUSE_PASSWORD")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker-compose config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    let s = &compose["services"][name];
    assert!(s.is_object(), "docker-compose.yml has no service {name}");
    s
}

/// `(source, target)` of a service's volumes; bind sources are absolute after
/// `docker-compose config`.
fn mounts(svc: &Value) -> Vec<(String, String)> {
    svc["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let parts: Vec<&str> = v.as_str().unwrap().split(':').collect();
            (parts[0].to_owned(), parts[1].to_owned())
        })
        .collect()
}

fn env<'a>(svc: &'a Value, name: &str) -> &'a str {
    svc["environment"][name]
        .as_str()
        .unwrap_or_else(|| panic!("no {name} in {}", svc["environment"]))
}

#[test]
fn compose_file_is_valid_and_starts_in_order() {
    let normalized = compose_config();
    let out = Command::new("docker-compose")
        .args(["-f", "docker-compose.yml", "config", "-q"])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(out.status.success());
    let c = yaml(&normalized);

    let services: BTreeSet<&str> = c["services"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for s in [
        "kafka",
        "kafka-topics",
        "clickhouse",
        "grafana",
        "keywatch",
        "mailpit",
        "vector",
        "traffic",
        "prometheus",
    ] {
        assert!(services.contains(s), "no service {s}");
    }
    assert!(service(&c, "kafka")["image"]
        .as_str()
        .unwrap()
        .starts_with("apache/kafka:"));
    assert_eq!(
        env(service(&c, "kafka"), "KAFKA_PROCESS_ROLES"),
        "broker,controller",
        "Kafka in KRaft mode"
    );
    assert!(service(&c, "clickhouse")["image"]
        .as_str()
        .unwrap()
        .starts_with("clickhouse/clickhouse-server:"));
    assert!(env(service(&c, "grafana"), "GF_INSTALL_PLUGINS")
        .split(',')
        .any(|p| p.trim() == "grafana-clickhouse-datasource"));
    assert!(service(&c, "keywatch")["build"]["context"].is_string());

    // Every service that others wait for has a healthcheck, and every wait is on health
    // (or on a one-shot job finishing), never on a bare start.
    for (name, svc) in c["services"].as_object().unwrap() {
        let Some(deps) = svc["depends_on"].as_object() else {
            continue;
        };
        for (dep, cond) in deps {
            let cond = cond["condition"].as_str().unwrap();
            match cond {
                "service_healthy" => assert!(
                    c["services"][dep]["healthcheck"]["test"].is_array(),
                    "{name} waits for {dep}, which has no healthcheck"
                ),
                "service_completed_successfully" => assert_eq!(
                    c["services"][dep]["restart"], "no",
                    "{dep} is a one-shot job"
                ),
                other => panic!("{name} waits for {dep} with condition {other}"),
            }
        }
    }
    let waits = |a: &str, b: &str| c["services"][a]["depends_on"][b].is_object();
    assert!(waits("keywatch", "clickhouse") && waits("keywatch", "kafka-topics"));
    assert!(waits("kafka-topics", "kafka") && waits("vector", "kafka-topics"));
    assert!(waits("vector", "traffic") && waits("grafana", "clickhouse"));
    for s in [
        "kafka",
        "clickhouse",
        "mailpit",
        "traffic",
        "keywatch",
        "prometheus",
        "grafana",
        "vector",
    ] {
        assert!(
            c["services"][s]["healthcheck"]["test"].is_array(),
            "{s} has no healthcheck"
        );
    }

    // The pieces agree with each other: the topic Vector writes is the one keywatch reads
    // and the one created; Grafana mounts the dashboards where the provisioning looks.
    let kw = read("deploy/keywatch.toml");
    let kw: toml::Value = toml::from_str(&kw).unwrap();
    let topic = kw["input"]["kafka"]["topics"][0].as_str().unwrap();
    let brokers = kw["input"]["kafka"]["brokers"].as_str().unwrap();
    let topics_cmd = c["services"]["kafka-topics"]["command"].to_string();
    assert!(topics_cmd.contains(&format!("{topic}:")), "{topics_cmd}");
    assert!(topics_cmd.contains(&format!(
        "{}:",
        kw["input"]["kafka"]["dead_letter_topic"].as_str().unwrap()
    )));
    assert!(topics_cmd.contains(&format!(
        "{}:",
        kw["rules"]["lifecycle"]["topic"].as_str().unwrap()
    )));
    {
        let v = yaml(&read("deploy/vector.yaml"));
        let sink = &v["sinks"]["kafka"];
        assert_eq!(sink["type"], "kafka");
        assert_eq!(sink["topic"], topic);
        assert_eq!(sink["bootstrap_servers"], brokers);
        assert_eq!(
            sink["encoding"]["codec"], "text",
            "lines go to Kafka as they are"
        );
        assert_eq!(sink["key_field"], "key_id");
        assert_eq!(
            v["sources"]["gateway_log"]["include"][0],
            env(service(&c, "traffic"), "LOG")
        );
        let vector_mounts = mounts(service(&c, "vector"));
        assert!(vector_mounts
            .iter()
            .any(|(s, t)| s == "gateway-logs" && t == "/var/log/gateway"));
    }
    let grafana = mounts(service(&c, "grafana"));
    let provider = yaml(&read("dashboards/provisioning/dashboards/keywatch.yml"));
    let path = provider["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    assert!(
        grafana
            .iter()
            .any(|(s, t)| Path::new(s) == root().join("dashboards") && t == path),
        "{grafana:?}"
    );
    let prom = yaml(&read("deploy/prometheus.yml"));
    let target = prom["scrape_configs"][0]["static_configs"][0]["targets"][0]
        .as_str()
        .unwrap();
    let port = kw["server"]["listen"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap();
    assert_eq!(target, format!("keywatch:{port}"));
    // The alert rules on keywatch itself are mounted where prometheus.yml names them.
    let rule_file = prom["rule_files"][0].as_str().unwrap();
    let prom_mounts = mounts(service(&c, "prometheus"));
    assert!(
        prom_mounts.iter().any(|(s, t)| Path::new(s)
            == root().join("deploy/prometheus/alerts.yml")
            && t == rule_file),
        "{prom_mounts:?}"
    );
}

#[test]
fn grafana_provisioning_matches_the_dashboards() {
    let ds = yaml(&read("dashboards/provisioning/datasources/clickhouse.yml"));
    let sources = ds["datasources"].as_array().unwrap();
    let by_type = |t: &str| sources.iter().find(|d| d["type"] == t).unwrap();
    let ch = by_type("grafana-clickhouse-datasource");
    assert_eq!(ch["jsonData"]["protocol"], "http");
    assert_eq!(ch["jsonData"]["defaultDatabase"], "keywatch");
    let prom = by_type("prometheus");
    // Every datasource uid a dashboard uses is provisioned, with the right type.
    let mut used = BTreeSet::new();
    for e in std::fs::read_dir(root().join("dashboards")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            let d: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            let mut here = BTreeSet::new();
            collect_datasources(&d, &mut here);
            // Panels name a datasource variable (`${clickhouse}`): the uid it defaults to.
            for (t, u) in here {
                let uid = match u.strip_prefix("${").and_then(|u| u.strip_suffix('}')) {
                    Some(var) => d["templating"]["list"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|v| v["name"] == var && v["type"] == "datasource")
                        .unwrap_or_else(|| panic!("{}: no datasource variable {var}", p.display()))
                        ["current"]["value"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                    None => u,
                };
                used.insert((t, uid));
            }
        }
    }
    let provisioned: BTreeSet<(String, String)> = [ch, prom]
        .iter()
        .map(|d| {
            (
                d["type"].as_str().unwrap().to_owned(),
                d["uid"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    used.remove(&("grafana".to_owned(), "-- Grafana --".to_owned()));
    assert_eq!(used, provisioned);
    // The database the dashboards read is the one keywatch writes in the stack.
    let kw: toml::Value = toml::from_str(&read("deploy/keywatch.toml")).unwrap();
    assert_eq!(
        kw["store"]["clickhouse"]["database"].as_str(),
        ch["jsonData"]["defaultDatabase"].as_str()
    );
}

fn collect_datasources(v: &Value, out: &mut BTreeSet<(String, String)>) {
    match v {
        Value::Object(m) => {
            if let Some(ds) = m.get("datasource") {
                if let (Some(t), Some(u)) = (ds["type"].as_str(), ds["uid"].as_str()) {
                    out.insert((t.to_owned(), u.to_owned()));
                }
            }
            m.values().for_each(|x| collect_datasources(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| collect_datasources(x, out)),
        _ => {}
    }
}

/// Runs deploy/traffic.sh for a few seconds: the log it writes and the registry.
fn run_traffic(dir: &Path, lines: usize) -> (PathBuf, PathBuf, i64) {
    let log = dir.join("var/log/gateway/access.log");
    let registry = dir.join("etc/keywatch/registry/keys.toml");
    let bin = Path::new(env!("CARGO_BIN_EXE_keywatch"));
    let before = chrono::Utc::now().timestamp_millis();
    let mut child = Command::new("bash")
        .arg(root().join("deploy/traffic.sh"))
        .env("LOG", &log)
        .env("REGISTRY_IN", root().join("deploy/keys.toml"))
        .env("REGISTRY_OUT", &registry)
        .env("LINES", lines.to_string())
        .env("RATE", "3")
        .env("KEYWATCH", bin)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // History first, then 3 lines a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = std::fs::read_to_string(&log)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if n >= lines + 6 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "traffic.sh stopped early"
        );
        assert!(std::time::Instant::now() < deadline, "{n} lines after 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    (log, registry, before)
}

/// The human log format colours field names.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn started_at(line: &str) -> i64 {
    let v: Value = serde_json::from_str(line).unwrap();
    v["started_at"].as_i64().unwrap()
}

#[test]
fn traffic_generator_shifts_log_and_registry_together() {
    let dir = tempfile::tempdir().unwrap();
    let (log, registry, before) = run_traffic(dir.path(), 2000);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // The history ends now, the live lines are stamped as they are written.
    let history_end = started_at(lines[1999]);
    assert!(
        (history_end - before).abs() < 5_000,
        "{history_end} vs {before}"
    );
    for l in &lines[2000..] {
        assert!(started_at(l) >= before && started_at(l) <= before + 60_000);
    }
    // The same shift on the registry's times: the rotation starts where the traffic on the
    // new key starts.
    let first_new = lines
        .iter()
        .find(|l| l.contains("ac009636-a60d-420a-bec7-5e2bf891558f"))
        .map(|l| started_at(l))
        .unwrap();
    let reg: toml::Value = toml::from_str(&std::fs::read_to_string(&registry).unwrap()).unwrap();
    let a = reg["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"].as_str() == Some("acme-billing A"))
        .unwrap();
    let rot = chrono::DateTime::parse_from_rfc3339(a["rotation_started"].as_str().unwrap())
        .unwrap()
        .timestamp_millis();
    assert!(
        rot <= first_new && first_new - rot < 12 * 3_600_000,
        "rotation start {rot}, first request with the new key {first_new}"
    );
    let deadline = chrono::DateTime::parse_from_rfc3339(a["deadline"].as_str().unwrap())
        .unwrap()
        .timestamp_millis();
    // In deploy/keys.toml the deadline is 3 days 2 h 36 min after the start.
    assert_eq!(deadline - rot, ((3 * 24 + 2) * 60 + 36) * 60_000);
    // keywatch decodes every line.
    let cfg = dir.path().join("kw.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n[input]\nkind = \"file\"\npath = {log:?}\nformat = \"kong\"\n\
             follow = false\n[server]\nenabled = false\n[rules]\nkeys = {registry:?}\n",
            dir.path().join("state")
        ),
    )
    .unwrap();
    let out = crate::support::run_ok(keywatch().args(["run", "--config"]).arg(&cfg));
    let err = strip_ansi(&String::from_utf8_lossy(&out.stderr));
    assert!(
        err.contains(&format!("events={}", lines.len())) && err.contains("dead_letters=0"),
        "{err}"
    );
}

#[test]
fn keywatch_config_of_the_stack_checks() {
    let normalized = compose_config();
    let c = yaml(&normalized);
    let kw = service(&c, "keywatch");
    // The container's file system, from the service's mounts: bind mounts as links, the
    // registry volume written by the traffic generator.
    let dir = tempfile::tempdir().unwrap();
    let fs = dir.path().join("root");
    for (source, target) in mounts(kw) {
        let at = fs.join(target.trim_start_matches('/'));
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        if source.starts_with('/') {
            std::os::unix::fs::symlink(&source, &at).unwrap();
        } else {
            std::fs::create_dir_all(&at).unwrap();
        }
    }
    let traffic = service(&c, "traffic");
    assert!(mounts(traffic)
        .iter()
        .any(|(s, t)| s == "registry" && t == "/etc/keywatch/registry"));
    run_traffic(&fs, 500);
    // keywatch.toml with the container's absolute paths moved under `fs`.
    let text = read("deploy/keywatch.toml")
        .replace(
            "\"/etc/keywatch/",
            &format!("\"{}/etc/keywatch/", fs.display()),
        )
        .replace(
            "\"/var/lib/keywatch",
            &format!("\"{}/var/lib/keywatch", fs.display()),
        );
    assert!(
        !text.contains("\"/etc/") && !text.contains("\"/var/"),
        "{text}"
    );
    let config = fs.join("etc/keywatch/keywatch.checked.toml");
    std::fs::write(&config, text).unwrap();
    let check = |config: &Path| {
        let mut cmd = keywatch();
        cmd.arg("check-config").arg(config);
        for name in ["CLICKHOUSE_PASSWORD", "KEYWATCH_FINGERPRINT_SECRET"] {
            cmd.env(name, env(kw, name));
        }
        cmd.output().unwrap()
    };
    let out = check(&config);
    assert!(
        out.status.success(),
        "keywatch check-config deploy/keywatch.toml:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(": ok (input Kafka"), "{said}");

    // It does read the registry the generator wrote: without it, the config is refused.
    std::fs::remove_file(fs.join("etc/keywatch/registry/keys.toml")).unwrap();
    let out = check(&config);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("keys.toml"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "needs the vector binary, which neither Debian nor crates.io ship; deploy/vector.yaml is checked as YAML by compose_file_is_valid_and_starts_in_order"]
fn vector_config_validates() {
    assert!(has("vector"), "vector is not installed");
    let out = Command::new("vector")
        .args(["validate", "--no-environment"])
        .arg(root().join("deploy/vector.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vector validate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn systemd_unit_verifies() {
    let unit = read("deploy/keywatch.service");
    for must in [
        "DynamicUser=yes",
        "StateDirectory=keywatch",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "ExecStart=/usr/local/bin/keywatch run --config /etc/keywatch/keywatch.toml",
    ] {
        assert!(
            unit.lines().any(|l| l == must),
            "deploy/keywatch.service: {must}"
        );
    }
    assert!(
        has("systemd-analyze"),
        "systemd-analyze is needed (scripts/test.sh installs it: apt-get install systemd)"
    );
    // verify wants the binary where ExecStart says: point it at the one built here.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keywatch.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/keywatch", env!("CARGO_BIN_EXE_keywatch")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on unknown or malformed settings too; it only warns.
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {err}"
    );
}

#[test]
fn dockerfile_builds_from_what_the_context_holds() {
    let docker = read("Dockerfile");
    let ignore = read(".dockerignore");
    let allowed: Vec<&str> = ignore
        .lines()
        .filter_map(|l| l.strip_prefix('!'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    let mut copied = 0;
    for line in docker.lines() {
        let Some(args) = line.strip_prefix("COPY ") else {
            continue;
        };
        if args.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = args.split_whitespace().collect();
        for src in &parts[..parts.len() - 1] {
            assert!(
                root().join(src).exists(),
                "Dockerfile copies {src}, which is missing"
            );
            assert!(
                allowed.iter().any(|a| src == a),
                "Dockerfile copies {src}, which .dockerignore leaves out"
            );
            copied += 1;
        }
    }
    assert!(copied >= 5);
    // Two stages; the runtime runs as an unprivileged user.
    let froms: Vec<&str> = docker.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    let runtime = &docker[docker.rfind("\nFROM ").unwrap()..];
    assert!(runtime.contains("\nUSER keywatch"), "{runtime}");
    assert!(runtime.contains("useradd --system"));
    // The manifest's benches are all in benches/ (the dependency stage copies only that).
    let manifest: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    for b in manifest["bench"].as_array().unwrap() {
        let name = b["name"].as_str().unwrap();
        assert!(root().join(format!("benches/{name}.rs")).exists(), "{name}");
    }
}
