//! What a platform team runs around the daemon, checked with the real tools: the alert rules
//! on keywatch itself (`promtool check rules` and `promtool test rules`, from Debian's
//! `prometheus` package), a real Prometheus scraping a running keywatch with those rules
//! loaded, and the Helm chart (`helm lint`, `helm template`; helm is built from the Go module
//! proxy by scripts/test.sh) rendered and read back: the StatefulSet's volume, probes,
//! secrets and security, and the config it mounts accepted by `keywatch check-config`.
//! scripts/test.sh installs the tools; a missing one fails these tests. Also what the probes
//! say: an instance whose store does not answer at start waits for it, alive and not ready.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{self, keywatch, run_ok};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A tool the test command installs: its path, or a failure that says how to get it.
fn tool(name: &str) -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_default();
    let gobin = Path::new(&home).join("go/bin").join(name);
    if gobin.exists() {
        return gobin;
    }
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name} is needed: scripts/test.sh installs it (promtool and prometheus: apt-get \
         install prometheus; helm: go install helm.sh/helm/v4/cmd/helm)"
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// The metric names an expression text uses.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("keywatch_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        out.insert(name);
    }
    out
}

#[test]
fn alert_rules_check_and_their_unit_tests_pass() {
    let dir = root().join("deploy/prometheus");
    let promtool = tool("promtool");
    let checked = ok(Command::new(&promtool)
        .args(["check", "rules", "alerts.yml"])
        .current_dir(&dir));
    assert!(checked.contains("SUCCESS: 10 rules found"), "{checked}");
    let tested = ok(Command::new(&promtool)
        .args(["test", "rules", "alerts.test.yml"])
        .current_dir(&dir));
    assert!(tested.contains("SUCCESS"), "{tested}");

    // Every metric an alert reads is one keywatch exports (the catalogue the README's
    // table and /metrics come from), and every alert has a unit test.
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    let names = metric_names(&rules);
    assert!(names.len() >= 8, "{names:?}");
    for name in &names {
        assert!(
            keywatch::telemetry::find(name).is_some(),
            "alerts.yml reads {name}, which keywatch does not export"
        );
    }
    let tests = std::fs::read_to_string(dir.join("alerts.test.yml")).unwrap();
    for line in rules.lines() {
        if let Some(alert) = line.trim().strip_prefix("- alert: ") {
            assert!(
                tests.contains(&format!("alertname: {alert}")),
                "alert {alert} has no unit test in alerts.test.yml"
            );
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    Some(resp.split_once("\r\n\r\n")?.1.to_owned())
}

/// A Prometheus query's result vector.
fn query(port: u16, expr: &str) -> Vec<Value> {
    let q: String = expr
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    http_get(port, &format!("/api/v1/query?query={q}"))
        .and_then(|body| serde_json::from_str::<Value>(&body).ok())
        .and_then(|v| v["data"]["result"].as_array().cloned())
        .unwrap_or_default()
}

/// Kills a child when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_real_prometheus_scrapes_keywatch_and_loads_its_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let log = support::sample(dir.path(), "kong", 2_000, 7);
    let kw_port = free_port();
    let config = support::config(
        dir.path(),
        &log,
        "kong",
        &format!("[server]\nlisten = \"127.0.0.1:{kw_port}\"\n"),
    );
    // Follow the log (a daemon), so that it keeps serving /metrics.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("follow = false", "follow = true");
    std::fs::write(&config, text).unwrap();
    let _kw = Killed(support::spawn_quiet(&mut support::run_config(&config)));

    let prom_port = free_port();
    let prom_yml = dir.path().join("prometheus.yml");
    std::fs::write(
        &prom_yml,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules:?}\n\
             scrape_configs:\n  - job_name: keywatch\n    static_configs:\n      - targets: [\"127.0.0.1:{kw_port}\"]\n",
            rules = root().join("deploy/prometheus/alerts.yml")
        ),
    )
    .unwrap();
    let _prom = Killed(
        Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", prom_yml.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts"),
    );

    // Prometheus finds keywatch up and reads the events it stored.
    let deadline = Instant::now() + Duration::from_secs(90);
    let events = loop {
        let up = query(prom_port, "up{job=\"keywatch\"}");
        let events = query(prom_port, "keywatch_events_total{job=\"keywatch\"}");
        if let (Some(u), Some(e)) = (up.first(), events.first()) {
            let value = |v: &Value| v["value"][1].as_str().unwrap().parse::<f64>().unwrap();
            if value(u) == 1.0 && value(e) > 0.0 {
                break value(e);
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape keywatch's events within 90 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(events, 2_000.0, "every sample line is an event");
    // Ready: the store open, the models warmed up (no lifecycle topic, no consumer group).
    let ready = http_get(kw_port, "/readyz").unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&ready).unwrap()["status"],
        "ready",
        "{ready}"
    );

    // It loaded every alert rule, and evaluates them without error on keywatch's series.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rules: Value = http_get(prom_port, "/api/v1/rules")
            .and_then(|b| serde_json::from_str(&b).ok())
            .unwrap_or(Value::Null);
        let all: Vec<&Value> = rules["data"]["groups"]
            .as_array()
            .map(|g| {
                g.iter()
                    .flat_map(|g| g["rules"].as_array().unwrap().iter())
                    .collect()
            })
            .unwrap_or_default();
        let evaluated = all
            .iter()
            .filter(|r| r["health"] == "ok" && r["lastEvaluation"] != "0001-01-01T00:00:00Z")
            .count();
        if all.len() == 10 && evaluated == 10 {
            // A healthy keywatch fires none of them.
            let firing: Vec<&Value> = all
                .iter()
                .copied()
                .filter(|r| r["state"] == "firing")
                .collect();
            assert!(
                firing.is_empty(),
                "alerts firing on a healthy keywatch: {firing:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not evaluate the 10 rules: {rules}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `helm template` of the chart with `args`, as documents.
fn render(args: &[&str]) -> Vec<Value> {
    let out = Command::new(tool("helm"))
        .args(["template", "kw", "deploy/helm/keywatch"])
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "helm template: {err}");
    // Only the symlinked files (the shipped rules and alerts) are worth a word from helm.
    for line in err.lines() {
        assert!(
            line.contains("found symbolic link"),
            "helm template: {line}"
        );
    }
    support::yaml_docs(&String::from_utf8_lossy(&out.stdout))
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

#[test]
fn the_helm_chart_lints_renders_and_mounts_a_config_keywatch_accepts() {
    let linted = ok(Command::new(tool("helm"))
        .args(["lint", "--strict", "deploy/helm/keywatch"])
        .current_dir(root()));
    assert!(linted.contains("0 chart(s) failed"), "{linted}");

    let docs = render(&[
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "replicas=3",
    ]);
    let sts = of_kind(&docs, "StatefulSet");
    assert_eq!(sts["metadata"]["name"], "kw-keywatch");
    assert_eq!(sts["spec"]["replicas"], 3);
    let pod = &sts["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(
        c["args"],
        serde_json::json!(["run", "--config", "/etc/keywatch/keywatch.toml"])
    );
    // One volume per pod for state_dir: the notification log and dead letters survive a
    // restart and are not shared.
    let claim = &sts["spec"]["volumeClaimTemplates"][0];
    assert_eq!(claim["metadata"]["name"], "state");
    let mounts = c["volumeMounts"].as_array().unwrap();
    assert!(mounts
        .iter()
        .any(|m| m["name"] == "state" && m["mountPath"] == "/var/lib/keywatch"));
    // Probes: liveness on /healthz, readiness on /readyz, on the metrics port.
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["ports"][0]["name"], "metrics");
    assert_eq!(c["ports"][0]["containerPort"], 9464);
    // Secrets from a Secret, never inlined; hardened; a bad config stops the rollout.
    assert_eq!(c["envFrom"][0]["secretRef"]["name"], "keywatch");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["initContainers"][0]["args"][0], "check-config");
    assert!(c["resources"]["requests"]["memory"].is_string());

    let svc = of_kind(&docs, "Service");
    assert_eq!(svc["spec"]["clusterIP"], "None");
    let sm = of_kind(&docs, "ServiceMonitor");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    // The PrometheusRule carries the promtool-tested rules, unchanged.
    let rule = of_kind(&docs, "PrometheusRule");
    let alerts = support::yaml_docs(
        &std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).unwrap(),
    );
    assert_eq!(rule["spec"]["groups"], alerts[0]["groups"]);

    // The mounted files, as the pod sees them, pass `keywatch check-config`.
    let cm = of_kind(&docs, "ConfigMap");
    let etc = tempfile::tempdir().unwrap();
    let rules = etc.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    let fix = |s: &str| {
        s.replace("/etc/keywatch/rules", rules.to_str().unwrap())
            .replace(
                "/var/lib/keywatch",
                etc.path().join("state").to_str().unwrap(),
            )
    };
    for (name, text) in cm["data"].as_object().unwrap() {
        let to = if name == "keywatch.toml" {
            etc.path().join(name)
        } else {
            rules.join(name)
        };
        std::fs::write(to, fix(text.as_str().unwrap())).unwrap();
    }
    // The image ships rules/templates next to them.
    let tpl = rules.join("templates");
    std::fs::create_dir_all(&tpl).unwrap();
    for e in std::fs::read_dir(root().join("rules/templates")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, tpl.join(p.file_name().unwrap())).unwrap();
    }
    let out = run_ok(
        keywatch()
            .arg("check-config")
            .arg(etc.path().join("keywatch.toml"))
            .env("CLICKHOUSE_PASSWORD", "x")
            .env("KEYWATCH_FINGERPRINT_SECRET", support::SECRET),
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("kafka"), "{said}");

    // Without the operator's CRDs nothing of theirs is rendered.
    let plain = render(&[]);
    assert!(plain
        .iter()
        .all(|d| d["kind"] != "ServiceMonitor" && d["kind"] != "PrometheusRule"));
}

#[test]
fn completions_and_man_pages_come_from_the_command_line() {
    let out = run_ok(keywatch().args(["completions", "bash"]));
    let bash = String::from_utf8(out.stdout).unwrap();
    assert!(bash.contains("complete -F _keywatch") && bash.contains("backtest"));
    // The script is valid bash.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("keywatch.bash");
    std::fs::write(&script, &bash).unwrap();
    ok(Command::new("bash").arg("-n").arg(&script));
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = run_ok(keywatch().args(["completions", shell]));
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("check-config"), "{shell}: {text}");
    }
    let bad = keywatch().args(["completions", "tcsh"]).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid value 'tcsh'"));

    // One page per command, each naming its synopsis as typed.
    let man = dir.path().join("man");
    run_ok(keywatch().args(["man", "--out"]).arg(&man));
    let pages: BTreeSet<String> = std::fs::read_dir(&man)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for p in [
        "keywatch.1",
        "keywatch-run.1",
        "keywatch-backtest.1",
        "keywatch-silence-add.1",
    ] {
        assert!(pages.contains(p), "{p} missing: {pages:?}");
    }
    let add = std::fs::read_to_string(man.join("keywatch-silence-add.1")).unwrap();
    assert!(add.starts_with(".ie") && add.contains(".TH keywatch-silence-add 1"));
    assert!(add.contains("\\fBkeywatch silence add\\fR"), "{add}");
    let top = run_ok(keywatch().arg("man"));
    assert!(String::from_utf8_lossy(&top.stdout).contains(".SH SUBCOMMANDS"));
}

#[test]
fn backtest_shows_progress_on_a_terminal_and_nothing_in_a_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let log = support::sample(dir.path(), "kong", 3_000, 3);
    let config = support::config(dir.path(), &log, "kong", "");
    // A pipe (as in scripts and CI): the findings on stdout, one summary line on stderr.
    let piped = run_ok(
        support::keywatch()
            .arg("backtest")
            .arg("--config")
            .arg(&config)
            .arg("--input")
            .arg(&log)
            .env("KW_TEST_SECRET", support::SECRET),
    );
    let err = String::from_utf8_lossy(&piped.stderr);
    assert!(!err.contains("of the log") && !err.contains('\r'), "{err}");
    assert!(err.contains("finding(s)"), "{err}");

    // A terminal (script(1) gives it one): the bar is drawn on stderr, then cleared.
    let cmd = format!(
        "{} backtest --config {} --input {} >/dev/null",
        env!("CARGO_BIN_EXE_keywatch"),
        config.display(),
        log.display()
    );
    let tty = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("KW_TEST_SECRET", support::SECRET)
        .env("TERM", "xterm")
        .output()
        .expect("script (util-linux) runs");
    let seen = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{seen}");
    assert!(
        seen.contains("of the log"),
        "no progress bar on a terminal: {seen:?}"
    );
    assert!(seen.contains("finding(s)"), "{seen}");
}

#[test]
fn a_store_down_at_start_is_waited_for_and_readyz_says_why() {
    use crate::support::clickhouse::{fresh_database, ClickHouse};
    let dir = tempfile::tempdir().unwrap();
    let log = support::sample(dir.path(), "kong", 2_000, 11);
    let lines = support::lines_of(&log).len() as u64;
    // A private server, stopped: its port answers nothing until it starts again.
    let ch = ClickHouse::start(&dir.path().join("clickhouse"));
    ch.stop();
    let database = fresh_database("kwwait");
    let port = free_port();
    let daemon_config = |name: &str, server: &str| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "state_dir = {state:?}\n\
                 [input]\nkind = \"file\"\npath = {log:?}\nformat = \"kong\"\nfollow = false\n\
                 [fingerprint]\nsecret_env = \"KW_TEST_SECRET\"\n\
                 [store]\nkind = \"clickhouse\"\n\
                 [store.clickhouse]\nurl = \"{url}\"\ndatabase = \"{database}\"\n\
                 insert_timeout = \"2s\"\nretention_days = 0\n{server}",
                state = dir.path().join(format!("state-{name}")),
                url = ch.url,
            ),
        )
        .unwrap();
        path
    };
    // Its log in `{name}.log`, read by the assertions.
    let spawn = |config: &Path, name: &str| {
        let log = std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap();
        Killed(
            support::run_config(config)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    };

    // The first instance waits, alive but not ready, and says why; SIGTERM stops it.
    let first = daemon_config(
        "first",
        &format!("[server]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let mut a = spawn(&first, "first");
    let deadline = Instant::now() + Duration::from_secs(60);
    let (health, reasons) = loop {
        if let (Some(h), Some(r)) = (http_get(port, "/healthz"), http_get(port, "/readyz")) {
            let r: Value = serde_json::from_str(&r).unwrap();
            let reasons: Vec<String> = r["reasons"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect();
            if reasons
                .iter()
                .any(|r| r.starts_with("the store does not answer"))
            {
                break (h, reasons);
            }
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never said the store does not answer"
        );
        if let Some(status) = a.0.try_wait().unwrap() {
            panic!(
                "keywatch exited ({status}): {}",
                std::fs::read_to_string(dir.path().join("first.log")).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(health.contains("\"status\":\"ok\""), "{health}");
    assert!(
        reasons.iter().any(|r| r.contains("the store: opening it")),
        "{reasons:?}"
    );
    let status = support::sigterm(&mut a.0, Duration::from_secs(20));
    assert!(!status.success(), "stopped before it could start: {status}");
    let text = std::fs::read_to_string(dir.path().join("first.log")).unwrap();
    assert!(
        text.contains("the store does not answer yet, retrying")
            && text.contains("asked to stop while waiting for the store"),
        "{text}"
    );

    // The second instance starts while the server is down and stores everything once it
    // is back.
    let second = daemon_config("second", "[server]\nenabled = false\n");
    let mut b = spawn(&second, "second");
    std::thread::sleep(Duration::from_secs(2));
    assert!(b.0.try_wait().unwrap().is_none(), "keywatch exited");
    ch.restart_after_stop();
    let status = support::wait_with_timeout(&mut b.0, Duration::from_secs(120));
    let text = std::fs::read_to_string(dir.path().join("second.log")).unwrap();
    assert!(status.success(), "{status}: {text}");
    assert!(
        text.contains("the store does not answer yet, retrying"),
        "{text}"
    );
    assert_eq!(ch.totals(&database), Some((lines, lines)));
}

#[test]
fn readyz_says_what_an_instance_still_waits_for() {
    // A consumer-group member whose brokers never answer: alive, but not ready, and it
    // says why.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let dead = free_port();
    let config = dir.path().join("keywatch.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {state:?}\n[input]\nkind = \"kafka\"\nformat = \"kong\"\n\
             [input.kafka]\nbrokers = \"127.0.0.1:{dead}\"\ntopics = [\"gateway-logs\"]\n\
             group_id = \"keywatch\"\n[fingerprint]\nsecret_env = \"KW_TEST_SECRET\"\n\
             [server]\nlisten = \"127.0.0.1:{port}\"\n",
            state = dir.path().join("state")
        ),
    )
    .unwrap();
    let _kw = Killed(support::spawn_quiet(&mut support::run_config(&config)));
    let deadline = Instant::now() + Duration::from_secs(60);
    let (health, ready) = loop {
        if let (Some(h), Some(r)) = (http_get(port, "/healthz"), http_get(port, "/readyz")) {
            let r: Value = serde_json::from_str(&r).unwrap();
            // Past the start-up steps: only the assignment is missing.
            if r["reasons"].as_array().is_some_and(|a| a.len() == 1) {
                break (h, r);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no answer from /readyz within 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(health.contains("\"status\":\"ok\""), "{health}");
    assert_eq!(ready["status"], "not ready");
    assert_eq!(
        ready["reasons"][0],
        "waiting for the consumer group's assignment of partitions"
    );
}
