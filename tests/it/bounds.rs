//! Bounds on what others send (issue 18): an over-long log line is dead-lettered with its
//! size without being read into memory (by the daemon, and counted by `keywatch backtest`), and the metrics server refuses an oversized or
//! slow request head. Each test prints the memory it measured (peak RSS) rather than timing
//! anything; the assertions are on behaviour, and on memory only with a wide margin.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use keywatch::daemon::server::{self, Health, HEADER_READ_TIMEOUT};
use tokio_util::sync::CancellationToken;

use crate::support::{run_config, SECRET};

const KONG: &str = r#"{"started_at":1614232669000,"response":{"status":200},"request":{"method":"GET","uri":"/v1/x"},"authenticated_entity":{"id":"key-1"},"client_ip":"10.0.0.1"}"#;

/// Runs `keywatch run` on `log` under GNU time; returns the peak RSS in KiB and stderr.
fn run_measured(dir: &Path, log: &Path, max_line_bytes: usize) -> (u64, String) {
    let state = dir.join(format!("state-{max_line_bytes}"));
    let config = dir.join("keywatch.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {state:?}\n[input]\nkind = \"file\"\npath = {log:?}\nfollow = false\n\
             max_line_bytes = {max_line_bytes}\n[fingerprint]\nsecret_env = \"KW_TEST_SECRET\"\n\
             [server]\nenabled = false\n"
        ),
    )
    .unwrap();
    let run = run_config(&config);
    let mut timed = Command::new("/usr/bin/time");
    timed.arg("-v").arg(run.get_program()).args(run.get_args());
    timed
        .env("KW_TEST_SECRET", SECRET)
        .env_remove("KEYWATCH_LOG");
    let out = timed
        .output()
        .expect("GNU time (/usr/bin/time, Debian's `time` package) runs keywatch");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "keywatch failed:\n{stderr}");
    let kib = stderr
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Maximum resident set size (kbytes): ")
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in:\n{stderr}"));
    (kib, state.join("dead-letter.jsonl").display().to_string())
}

#[test]
fn an_over_long_line_is_dead_lettered_with_its_size_and_memory_stays_flat() {
    let dir = tempfile::tempdir().unwrap();
    // Short lines around one of 256 MiB (no newline inside, as a runaway writer makes).
    let long_len: u64 = 256 << 20;
    let log = dir.path().join("gateway.log");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&log).unwrap());
        writeln!(f, "{KONG}").unwrap();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..(long_len >> 20) {
            f.write_all(&chunk).unwrap();
        }
        writeln!(f).unwrap();
        writeln!(f, "{KONG}").unwrap();
    }
    let short = dir.path().join("short.log");
    std::fs::write(&short, format!("{KONG}\n{KONG}\n")).unwrap();

    let (baseline_kib, _) = run_measured(dir.path(), &short, 64 * 1024);
    let (peak_kib, dead_letters) = run_measured(dir.path(), &log, 64 * 1024);
    println!(
        "peak RSS: {baseline_kib} KiB for two short lines, {peak_kib} KiB with a {} MiB line \
         between them (input.max_line_bytes = 65536)",
        long_len >> 20
    );
    // Reading the line whole would add at least its 256 MiB.
    assert!(
        peak_kib < baseline_kib + 64 * 1024,
        "peak RSS {peak_kib} KiB against {baseline_kib} KiB without the long line"
    );
    let text = std::fs::read_to_string(&dead_letters).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 1, "{text}");
    let r = &records[0];
    assert_eq!(
        r["reason"],
        format!("line too long: {long_len} bytes (limit 65536)")
    );
    assert_eq!(r["line"], format!("<line too long: {long_len} bytes>"));
    assert_eq!(r["offset"], KONG.len() as u64 + 1);
}

/// `keywatch backtest --input LOG` under GNU time: (peak RSS in KiB, stdout, stderr).
fn backtest_measured(dir: &Path, log: &Path, max_line_bytes: usize) -> (u64, String, String) {
    let config = dir.join("backtest.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\n[input]\nkind = \"file\"\npath = {log:?}\nfollow = false\n\
             max_line_bytes = {max_line_bytes}\n[fingerprint]\nsecret_env = \"KW_TEST_SECRET\"\n\
             [server]\nenabled = false\n",
            dir.join("backtest-state")
        ),
    )
    .unwrap();
    let out = Command::new("/usr/bin/time")
        .arg("-v")
        .arg(env!("CARGO_BIN_EXE_keywatch"))
        .args(["backtest", "--config"])
        .arg(&config)
        .arg("--input")
        .arg(log)
        .env("KW_TEST_SECRET", SECRET)
        .env_remove("KEYWATCH_LOG")
        .output()
        .expect("GNU time (/usr/bin/time, Debian's `time` package) runs keywatch");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "keywatch backtest failed:\n{stderr}");
    let kib = stderr
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Maximum resident set size (kbytes): ")
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in:\n{stderr}"));
    (
        kib,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

#[test]
fn backtest_skips_an_over_long_line_unread_and_says_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let long_len: u64 = 256 << 20;
    let log = dir.path().join("gateway.log");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&log).unwrap());
        writeln!(f, "{KONG}").unwrap();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..(long_len >> 20) {
            f.write_all(&chunk).unwrap();
        }
        writeln!(f).unwrap();
        writeln!(f, "{KONG}").unwrap();
    }
    let short = dir.path().join("short.log");
    std::fs::write(&short, format!("{KONG}\n{KONG}\n")).unwrap();

    let (baseline_kib, base_out, base_err) = backtest_measured(dir.path(), &short, 64 * 1024);
    let (peak_kib, out, err) = backtest_measured(dir.path(), &log, 64 * 1024);
    println!(
        "keywatch backtest peak RSS: {baseline_kib} KiB for two short lines, {peak_kib} KiB \
         with a {} MiB line between them (input.max_line_bytes = 65536)",
        long_len >> 20
    );
    assert!(
        peak_kib < baseline_kib + 64 * 1024,
        "peak RSS {peak_kib} KiB against {baseline_kib} KiB without the long line"
    );
    // The line is said with its offset and size, and counted; the lines around it replay
    // as without it.
    assert!(
        err.contains(&format!(
            "skipped the line at byte {} of {}: {long_len} bytes, longer than \
             input.max_line_bytes (65536)",
            KONG.len() + 1,
            log.display()
        )),
        "{err}"
    );
    assert!(
        err.contains("1 line(s) did not decode and were skipped (1 too long)"),
        "{err}"
    );
    assert!(!base_err.contains("did not decode"), "{base_err}");
    assert_eq!(out, base_out, "the same findings as without the long line");
}

/// VmHWM of this process, KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

fn start_server(rt: &tokio::runtime::Runtime, cancel: &CancellationToken) -> std::net::SocketAddr {
    let (addr, _task) = rt
        .block_on(server::serve(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(Health::default()),
            None,
            cancel.clone(),
        ))
        .unwrap();
    addr
}

fn get_healthz(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn the_metrics_server_refuses_an_oversized_request_head_without_buffering_it() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cancel = CancellationToken::new();
    let addr = start_server(&rt, &cancel);
    let before = peak_rss_kib();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    // 64 MiB of headers: the server must answer and close long before.
    let header = format!("x-pad: {}\r\n", "a".repeat(1000));
    let mut sent = 0usize;
    while sent < 64 << 20 {
        if s.write_all(header.as_bytes()).is_err() {
            break;
        }
        sent += header.len();
    }
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    println!(
        "sent {} KiB of request head before the server closed; peak RSS {} KiB -> {} KiB",
        sent >> 10,
        before,
        peak_rss_kib()
    );
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "answer after {sent} bytes: {answer:?}"
    );
    assert!(sent < 64 << 20, "the server read all 64 MiB");
    // Still serving.
    assert!(get_healthz(addr).starts_with("HTTP/1.1 200"));
    cancel.cancel();
}

#[test]
fn the_metrics_server_drops_a_client_that_never_finishes_its_request_head() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cancel = CancellationToken::new();
    let addr = start_server(&rt, &cancel);
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    // A generous deadline: the assertion is that the server closes at all.
    s.set_read_timeout(Some(HEADER_READ_TIMEOUT * 3)).unwrap();
    let mut buf = Vec::new();
    let closed = match s.read_to_end(&mut buf) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(
        closed,
        "the connection is still open {:?} after a partial head",
        HEADER_READ_TIMEOUT * 3
    );
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    assert!(get_healthz(addr).starts_with("HTTP/1.1 200"));
    cancel.cancel();
}
