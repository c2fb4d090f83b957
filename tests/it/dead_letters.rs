//! Dead letters kept as configured: the real daemon follows a log of malformed lines with a
//! small `[dead_letter]` budget; the newest dead letters are on disk, in order, and those
//! rotation deleted are counted by `keywatch_dead_letters_dropped_total`: kept + dropped is
//! every line.

use std::time::{Duration, Instant};

use crate::support::{free_port, metric, run_config, spawn_quiet};

/// Lines dead-lettered so far, whatever the reason (the sum over the label).
fn rejected(port: u16) -> Option<u64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let values: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with("keywatch_events_rejected_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum::<f64>() as u64)
}

const LINES: u64 = 5000;

#[test]
fn a_small_budget_keeps_the_newest_dead_letters_and_counts_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let text: String = (0..LINES).map(|i| format!("garbage {i:05}\n")).collect();
    std::fs::write(&log, text).unwrap();
    let port = free_port();
    let config = crate::support::config(
        dir.path(),
        &log,
        "kong",
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\
             [dead_letter]\nmax_bytes = 4096\nkeep_files = 3\n"
        ),
    );
    // Follow the file so that the daemon (and its metrics) stays up once it has read it.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("follow = false", "follow = true\nstart_at = \"beginning\"");
    std::fs::write(&config, text).unwrap();
    let mut child = spawn_quiet(&mut run_config(&config));
    let start = Instant::now();
    let mut all_rejected = None;
    while start.elapsed() < Duration::from_secs(60) {
        all_rejected = rejected(port).filter(|n| *n == LINES);
        if all_rejected.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // A line is counted just before its dead letter is written (and a rotation done): give
    // the last write a moment, then ask.
    std::thread::sleep(Duration::from_millis(500));
    let dropped = metric(
        port,
        r#"keywatch_dead_letters_dropped_total{file="dead-letter.jsonl"}"#,
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    crate::support::wait_with_timeout(&mut child, Duration::from_secs(20));
    assert!(
        all_rejected.is_some(),
        "the daemon did not dead-letter all {LINES} lines within 60 s"
    );
    let dropped = dropped.expect("keywatch_dead_letters_dropped_total is exported") as u64;

    let state = dir.path().join("state");
    let mut kept = Vec::new();
    for n in (0..=3).rev() {
        let name = match n {
            0 => "dead-letter.jsonl".to_owned(),
            n => format!("dead-letter.jsonl.{n}"),
        };
        let text = std::fs::read_to_string(state.join(&name)).unwrap();
        assert!(
            text.len() <= 4096 + 512,
            "{name} is {} bytes, past max_bytes by more than one record",
            text.len()
        );
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let line = v["line"].as_str().unwrap();
            kept.push(line.trim_start_matches("garbage ").parse::<u64>().unwrap());
        }
    }
    assert!(!state.join("dead-letter.jsonl.4").exists());
    assert!(dropped > 0 && (kept.len() as u64) < LINES);
    // The newest, in order, with nothing missing between them; the rest were counted.
    assert_eq!(kept, (LINES - kept.len() as u64..LINES).collect::<Vec<_>>());
    assert_eq!(kept.len() as u64 + dropped, LINES);
}
