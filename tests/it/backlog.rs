//! A daemon that starts behind (a backlog: after an outage, or a first start on a full log)
//! must not judge rotations on a half-read past: until it has caught up, a host that
//! switched to the new key later in the backlog would look like it still lingers.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::support::*;
use keywatch::registry::format_rfc3339;
use keywatch::sample::{generate_sample, SampleOptions};
use serde_json::Value;

/// A drop guard: the daemon is killed if the test fails before stopping it.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn rotations_are_judged_once_a_backlog_is_read_not_halfway() {
    let s = generate_sample(&SampleOptions::default()).unwrap();
    let t = &s.truth;
    let rot = &t.rotation;
    // The sample, shifted so that it ends now: a daemon following it judges at wall-clock
    // time what the log says happened up to now.
    let last = s
        .lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["started_at"].as_i64())
        .max()
        .unwrap();
    let shift = chrono::Utc::now().timestamp_millis() - last;
    let lines: Vec<String> = s
        .lines
        .iter()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            let ts = v["started_at"].as_i64().unwrap();
            v["started_at"] = (ts + shift).into();
            v.to_string()
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();

    let mut keys = format!(
        "[owners.acme-billing]\ntimezone = \"Europe/Berlin\"\n\
         [[keys]]\nid = {:?}\nowner = \"acme-billing\"\nstate = \"rotating\"\n\
         successor = {:?}\nrotation_started = {:?}\ndeadline = {:?}\n\
         [[keys]]\nid = {:?}\nowner = \"acme-billing\"\n",
        rot.old_key.identity,
        rot.new_key.identity,
        format_rfc3339(rot.start_ms + shift),
        format_rfc3339(chrono::Utc::now().timestamp_millis() + 48 * 3_600_000),
        rot.new_key.identity,
    );
    for c in t.clients.iter().filter(|c| c.name != "acme-billing") {
        keys.push_str(&format!("[owners.{}]\n", c.name));
        for k in &c.keys {
            keys.push_str(&format!(
                "[[keys]]\nid = {:?}\nowner = {:?}\n",
                k.identity, c.name
            ));
        }
    }
    let registry = dir.path().join("keys.toml");
    std::fs::write(&registry, keys).unwrap();
    // Small batches and an evaluation every 50 ms: many chances to judge halfway.
    let cfg = config(
        dir.path(),
        &log,
        "kong",
        &format!(
            "[pipeline]\nbatch_max_events = 40\nbatch_max_wait = \"20ms\"\n\
             [rules]\nkeys = {registry:?}\nevaluate_every = \"50ms\"\n"
        ),
    );
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("follow = false", "follow = true");
    std::fs::write(&cfg, text).unwrap();

    let mut daemon = Running(spawn_quiet(&mut run_config(&cfg)));
    let state = dir.path().join("state");
    let started = Instant::now();
    let events = lines.len() as u64;
    while try_totals(&state).map_or(0, |(r, _)| r) < events {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "stored {:?} of {events}",
            try_totals(&state)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Caught up: the next evaluations judge the whole past.
    std::thread::sleep(Duration::from_millis(500));
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &daemon.0.id().to_string()])
        .status();
    let status = wait_with_timeout(&mut daemon.0, Duration::from_secs(30));
    assert!(status.success(), "{status:?}");

    let out = run_ok(
        keywatch()
            .args([
                "findings",
                "--json",
                "--kind",
                "lingering_old_key",
                "--config",
            ])
            .arg(&cfg)
            .env("KW_TEST_SECRET", SECRET),
    );
    let lingering: BTreeSet<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["evidence"]["ip"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let laggards: BTreeSet<String> = rot.laggards.iter().cloned().collect();
    assert_eq!(laggards.len(), 2);
    // Exactly the hosts that never switched: none of those that switched later in the log
    // was ever reported, not even by an evaluation during the backlog.
    assert_eq!(lingering, laggards);
}
