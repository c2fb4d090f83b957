//! Kafka over SASL_SSL with SCRAM-SHA-512, against Apache Kafka: a certificate made by
//! openssl, a SCRAM user added when the broker's storage is formatted. Needs the
//! `kafka-tls` feature (librdkafka with OpenSSL): `cargo test --features kafka-tls --test
//! kafka_tls`, as scripts/test.sh runs it.
#![cfg(feature = "kafka-tls")]

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::kafka::{unique, Broker};
use crate::support::*;

const PASSWORD: &str = "scram-pass-7f3a9c";

fn config(dir: &Path, brokers: &str, ca: &Path, topic: &str, user: &str) -> std::path::PathBuf {
    let path = dir.join("kw.toml");
    std::fs::write(
        &path,
        format!(
            "state_dir = {:?}\n\
             [input]\nkind = \"kafka\"\nformat = \"nginx\"\n\
             [input.kafka]\nbrokers = \"{brokers}\"\ntopics = [\"{topic}\"]\ngroup_id = \"{}\"\n\
             [input.kafka.properties]\n\
             \"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanisms\" = \"SCRAM-SHA-512\"\n\
             \"sasl.username\" = \"{user}\"\n\"ssl.ca.location\" = {ca:?}\n\
             [input.kafka.properties_env]\n\"sasl.password\" = \"KW_TEST_KAFKA_PASSWORD\"\n\
             [fingerprint]\nsecret_env = \"KW_TEST_SECRET\"\n\
             [pipeline]\nbatch_max_events = 500\nbatch_max_wait = \"100ms\"\n\
             [server]\nenabled = false\n",
            dir.join("state"),
            unique("g"),
        ),
    )
    .unwrap();
    path
}

#[test]
fn sasl_ssl_scram_sha_512_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, ca) = Broker::start_sasl_ssl(dir.path(), "keywatch", PASSWORD);
    let topic = unique("events");
    let n = 2000;
    let log = sample(dir.path(), "nginx", n, 80);
    let ca_s = ca.to_str().unwrap();
    // keywatch produce over SASL_SSL (the topic is created on first use).
    run_ok(
        keywatch()
            .args(["produce", "--brokers", &broker.brokers(), "--topic", &topic])
            .args([
                "-X",
                "security.protocol=SASL_SSL",
                "-X",
                "sasl.mechanisms=SCRAM-SHA-512",
            ])
            .args(["-X", "sasl.username=keywatch"])
            .args(["-X", &format!("sasl.password={PASSWORD}")])
            .args(["-X", &format!("ssl.ca.location={ca_s}")])
            .arg("--file")
            .arg(&log),
    );

    let cfg = config(dir.path(), &broker.brokers(), &ca, &topic, "keywatch");
    let out = keywatch()
        .arg("check-config")
        .arg(&cfg)
        .arg("--connect")
        .env("KW_TEST_SECRET", SECRET)
        .env("KW_TEST_KAFKA_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains(&format!("topics {topic}")), "{stdout}");

    let mut child = spawn_quiet(
        run_config(&cfg)
            .env("KW_TEST_SECRET", SECRET)
            .env("KW_TEST_KAFKA_PASSWORD", PASSWORD),
    );
    let state = dir.path().join("state");
    let start = Instant::now();
    while try_totals(&state).map_or(0, |(t, _)| t) < n as u64
        && start.elapsed() < Duration::from_secs(90)
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = wait_with_timeout(&mut child, Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    assert_eq!(totals(&state), (n as u64, n as u64));

    // A wrong password: refused, said plainly, and never printed.
    let out = keywatch()
        .arg("check-config")
        .arg(&cfg)
        .arg("--connect")
        .env("KW_TEST_SECRET", SECRET)
        .env("KW_TEST_KAFKA_PASSWORD", "wrong-pass-0c1d2e")
        .output()
        .unwrap();
    let all = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{all}");
    assert!(all.contains("FAILED"), "{all}");
    assert!(
        !all.contains("wrong-pass-0c1d2e") && !all.contains(PASSWORD),
        "{all}"
    );
}
