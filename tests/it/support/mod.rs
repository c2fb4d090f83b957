//! Helpers shared by the integration tests: run the real binary on real files.
#![allow(dead_code)]

pub mod clickhouse;
pub mod kafka;
pub mod standins;

pub use standins::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use keywatch::store::SqliteStore;

pub fn keywatch() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keywatch"));
    c.env_remove("KEYWATCH_LOG");
    c
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("running keywatch");
    assert!(
        out.status.success(),
        "keywatch failed: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Writes a sample log with the real `keywatch sample` command.
pub fn sample(dir: &Path, preset: &str, lines: usize, seed: u64) -> PathBuf {
    let path = dir.join(format!("{preset}-{seed}.log"));
    run_ok(
        keywatch()
            .args([
                "sample",
                "--preset",
                preset,
                "--lines",
                &lines.to_string(),
                "--seed",
                &seed.to_string(),
                "--output",
            ])
            .arg(&path),
    );
    path
}

/// A config reading `log` once (no follow) into `state`, server off unless `extra` says.
pub fn config(dir: &Path, log: &Path, preset: &str, extra: &str) -> PathBuf {
    let path = dir.join("keywatch.toml");
    let text = format!(
        "state_dir = {state:?}\n\
         [input]\nkind = \"file\"\npath = {log:?}\nformat = {preset:?}\nfollow = false\n\
         [fingerprint]\nsecret_env = \"KW_TEST_SECRET\"\n\
         {extra}",
        state = dir.join("state"),
    );
    let text = if extra.contains("[server]") {
        text
    } else {
        format!("{text}\n[server]\nenabled = false\n")
    };
    std::fs::write(&path, text).unwrap();
    path
}

pub const SECRET: &str = "integration-test-secret-0123456789";

pub fn run_config(config: &Path) -> Command {
    let mut c = keywatch();
    c.arg("run")
        .arg("--config")
        .arg(config)
        .env("KW_TEST_SECRET", SECRET);
    c
}

/// Like [`totals`], while keywatch may still be creating the database: `None` until it can
/// be read.
pub fn try_totals(state: &Path) -> Option<(u64, u64)> {
    SqliteStore::open_read_only(state).ok()?.totals().ok()
}

/// (requests in rollups, requests in sources).
pub fn totals(state: &Path) -> (u64, u64) {
    SqliteStore::open_read_only(state)
        .unwrap()
        .totals()
        .unwrap()
}

pub fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits for a child to exit, killing it after `timeout` (a hung test fails, it does not hang).
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!("keywatch did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGTERM to `child` and waits for it to exit (a failure after `timeout`).
pub fn sigterm(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(sent, "kill -TERM {}", child.id());
    wait_with_timeout(child, timeout)
}

/// Starts keywatch with its stdout discarded and its logs in a file (never an unread pipe:
/// a full pipe would block the daemon). The log's path is printed, for failures.
pub fn spawn_quiet(cmd: &mut Command) -> Child {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join("keywatch-test-logs");
    std::fs::create_dir_all(&dir).unwrap();
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = dir.join(format!("{}-{n}.log", std::process::id()));
    eprintln!("keywatch log: {}", path.display());
    let log = std::fs::File::create(&path).unwrap();
    cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap()
}

/// Every value of a JSON string field in a log of JSON lines.
pub fn json_field_values(log: &Path, field: &str) -> Vec<String> {
    let mut out: Vec<String> = lines_of(log)
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get(field).and_then(|s| s.as_str()).map(str::to_owned))
        .filter(|s| s.len() > 8)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// One value of a daemon's `/metrics` on `port` (`None` while it does not answer or does
/// not have the metric yet).
pub fn metric(port: u16, name: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    resp.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Every YAML document of `text`, as JSON, read by Debian's python3 with its yaml module
/// (python3-yaml, which scripts/test.sh installs; no YAML crate in keywatch). A missing
/// module fails the test, saying so.
pub fn yaml_docs(text: &str) -> Vec<serde_json::Value> {
    use std::io::Write;
    let mut child = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("No module named 'yaml'"),
            "python3-yaml is needed (scripts/test.sh installs it: apt-get install python3-yaml)"
        );
        panic!("not valid YAML: {err}\n{text}");
    }
    serde_json::from_slice(&out.stdout).unwrap()
}
